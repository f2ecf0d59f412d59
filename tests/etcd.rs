//! The etcd store (feature `etcd`) against Debian's etcd, started here on
//! loopback, written with its own `etcdctl`: three nodes in this process
//! share one prefix. A put reaches all three within a second (printed); a
//! node cut off from etcd while revisions are compacted reads everything
//! again and ends in the same state as the others; etcd restarted in the
//! middle of 100 puts loses and repeats nothing; a bad document leaves the
//! old config running everywhere and shows in each node's status key and
//! in `meshgatectl fleet status`.
#![cfg(feature = "etcd")]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, have};
use configstore::etcd::{EtcdAuth, EtcdStore, EtcdUrl};
use configstore::ConfigStore;
use meshgate::core::node::Node;

/// An etcd server on loopback with its own data directory.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client: u16,
    peer: u16,
    /// The network namespace it runs in (none: this one).
    ns: Option<String>,
}

impl Etcd {
    fn start() -> Etcd {
        Self::start_in(None)
    }

    fn start_in(ns: Option<&str>) -> Etcd {
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client: free_port(),
            peer: free_port(),
            ns: ns.map(str::to_string),
        };
        e.launch();
        e
    }

    /// `program` here, or inside the namespace.
    fn command(&self, program: &str) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn launch(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = self
            .command("etcd")
            .args([
                "--name",
                "t",
                "--data-dir",
                &self.dir.path().join("data").display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("t={peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd");
        self.child = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if self.try_ctl(&["endpoint", "health"]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not come up");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }

    fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &format!("http://{}", self.endpoint())])
            .args(["--command-timeout", "2s"])
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into())
        }
    }

    fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"))
    }

    fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    /// The store's current revision.
    fn revision(&self) -> i64 {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["Status"]["header"]["revision"].as_i64().unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay to etcd that can be cut (every connection closed, new ones
/// refused) and restored on the same port.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let port = free_port();
        let (up, cut) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(tokio::sync::Notify::new()),
        );
        let (u, c) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            loop {
                let Ok((mut a, _)) = l.accept().await else {
                    return;
                };
                if !u.load(Ordering::SeqCst) {
                    continue;
                }
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(mut b) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = c.notified() => {}
                    }
                });
            }
        });
        Relay { port, up, cut }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn node(endpoint: &str, name: &str) -> (Node, Arc<EtcdStore>) {
    let url = EtcdUrl::parse(&format!("etcd://{endpoint}/mg")).unwrap();
    let store = Arc::new(
        EtcdStore::connect(url, EtcdAuth::default(), name, Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let mut node = Node::new(
        store.clone(),
        meshgate::modules::builtin_factories(),
        Vec::new(),
    );
    node.start().await.unwrap();
    (node, store)
}

/// `tenant/instance` -> source of what runs on `node`.
async fn running(node: &Node) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = node
        .registry()
        .status()
        .await
        .into_iter()
        .filter(|s| s.last_error.is_none())
        .map(|s| {
            (
                format!("{}/{}", s.tenant, s.instance),
                s.details.to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn instances(node: &Node) -> Vec<String> {
    running(node).await.into_iter().map(|(k, _)| k).collect()
}

/// Debian's etcd-server and etcd-client (scripts/test.sh installs them).
fn etcd_ok() -> bool {
    have("etcd") && have("etcdctl")
}

fn vnet(route: &str) -> String {
    format!("kind: vnet\nroutes:\n  - to: {route}\n    via: direct\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_reaches_three_nodes_within_a_second_and_a_bad_one_changes_nothing() {
    if !etcd_ok() {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(node(&ep, name).await);
    }
    // A pipe, on every node (each on a port of its own).
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let put = Instant::now();
    etcd.put(
        "/mg/tenants/acme/web",
        &format!("kind: pipe\nlisten: 127.0.0.1:0\nremote: {echo_addr}\n"),
    );
    let mut everywhere = None;
    while put.elapsed() < Duration::from_secs(5) {
        let mut all = true;
        for (n, _) in &nodes {
            all &= instances(n).await.contains(&"acme/web".to_string());
        }
        if all {
            everywhere = Some(put.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = everywhere.expect("the pipe never ran on all three nodes");
    eprintln!("etcdctl put -> running on 3 nodes in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // A bad document for the running pipe: every node keeps the old one
    // and says so, in its status and in etcd.
    etcd.put("/mg/tenants/acme/web", "kind: pipe\nlisten: [unclosed\n");
    for (n, _) in &nodes {
        let mut refused = false;
        for _ in 0..100 {
            let st = n.registry().status().await;
            let web = st.iter().find(|s| s.instance == "web").unwrap();
            if web.last_error.is_some() {
                assert_eq!(
                    web.state,
                    meshgate::core::spine::registry::ModuleState::Running
                );
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "a node took the bad document");
    }
    for name in ["a", "b", "c"] {
        let mut shown = String::new();
        for _ in 0..100 {
            shown = etcd.ctl(&["get", &format!("/mg/status/{name}"), "--print-value-only"]);
            if shown.contains("acme") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let v: serde_json::Value = serde_json::from_str(shown.trim()).unwrap();
        assert_eq!(v["rejected"][0]["instance"], "web", "{v}");
        assert!(
            v["rejected"][0]["error"]
                .as_str()
                .unwrap()
                .contains("etcd /mg/tenants/acme/web"),
            "{v}"
        );
    }
    let fleet = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
        .args(["fleet", "status", "--store", &format!("etcd://{ep}/mg")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&fleet.stdout);
    assert!(
        fleet.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&fleet.stderr)
    );
    for name in ["a", "b", "c"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains("alive") && l.contains("acme/web")),
            "{text}"
        );
    }
    // Fixed: every node takes it and the status clears.
    etcd.put(
        "/mg/tenants/acme/web",
        &format!("kind: pipe\nlisten: 127.0.0.1:0\nremote: {echo_addr}\nidle_timeout: 5m\n"),
    );
    for (n, _) in &nodes {
        let mut ok = false;
        for _ in 0..100 {
            let st = n.registry().status().await;
            if st
                .iter()
                .any(|s| s.instance == "web" && s.last_error.is_none())
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok);
    }
    for (n, _) in nodes {
        n.shutdown(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_across_a_compaction_reads_everything_again() {
    if !etcd_ok() {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    etcd.put("/mg/tenants/acme/keep", &vnet("10.0.0.0/8"));
    etcd.put("/mg/tenants/acme/gone", &vnet("10.1.0.0/16"));
    etcd.put("/mg/tenants/acme/changed", &vnet("10.2.0.0/16"));
    let (a, _) = node(&ep, "a").await;
    let relay = Relay::start(ep.parse().unwrap()).await;
    let (c, c_store) = node(&format!("127.0.0.1:{}", relay.port), "c").await;
    assert_eq!(running(&a).await, running(&c).await);
    let before = c_store.revision();

    relay.cut();
    etcd.ctl(&["del", "/mg/tenants/acme/gone"]);
    etcd.put("/mg/tenants/acme/changed", &vnet("10.3.0.0/16"));
    etcd.put("/mg/tenants/other/new", &vnet("10.4.0.0/16"));
    let now = etcd.revision();
    etcd.ctl(&["compact", &now.to_string()]);
    // A saw it all; C, cut off, still runs what it had.
    let want = vec![
        "acme/changed".to_string(),
        "acme/keep".into(),
        "other/new".into(),
    ];
    let mut a_done = false;
    for _ in 0..100 {
        if instances(&a).await == want {
            a_done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a_done, "{:?}", instances(&a).await);
    assert_eq!(c_store.revision(), before);
    assert!(instances(&c).await.contains(&"acme/gone".to_string()));

    relay.restore();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) && running(&c).await != running(&a).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running(&c).await, running(&a).await);
    assert!(c_store.revision() >= now);
    // It got there by reading everything again (its revision was gone).
    assert_eq!(c_store.rereads(), 1);
    eprintln!(
        "the cut-off node caught up {:?} after the relay came back",
        t.elapsed()
    );
    a.shutdown(Duration::from_millis(50)).await;
    c.shutdown(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_amid_100_puts_loses_and_repeats_nothing() {
    if !etcd_ok() {
        return;
    }
    let mut etcd = Etcd::start();
    let ep = etcd.endpoint();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(node(&ep, name).await);
    }
    for i in 0..100 {
        if i == 50 {
            etcd.kill();
            etcd.launch();
        }
        let key = format!("/mg/tenants/t/k{i}");
        let doc = vnet(&format!("10.{i}.0.0/16"));
        let t = Instant::now();
        while etcd.try_ctl(&["put", &key, &doc]).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "put {i} never succeeded"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let want: Vec<String> = {
        let mut w: Vec<String> = (0..100).map(|i| format!("t/k{i}")).collect();
        w.sort();
        w
    };
    for (n, store) in &nodes {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(15) && instances(n).await != want {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(instances(n).await, want);
        // Each started once, with its one document.
        let m = n.registry().metrics().encode();
        for i in 0..100 {
            let series = format!(
                "meshgate_config_reloads_total{{tenant=\"t\",instance=\"k{i}\",result=\"ok\"}} "
            );
            let count = m
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .map(|v| v.trim().to_string());
            assert_eq!(count.as_deref(), Some("1"), "k{i}");
        }
        assert!(store.revision() >= 100);
        // Resumed from its revision: nothing was compacted, nothing read again.
        assert_eq!(store.rereads(), 0);
        assert!(store.tenants().await.unwrap().contains(&"t".to_string()));
    }
    for (n, _) in nodes {
        n.shutdown(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_users_wants_the_password() {
    if !etcd_ok() {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    etcd.put("/mg/tenants/acme/corp", &vnet("10.0.0.0/8"));
    etcd.ctl(&["user", "add", "root:rootpw"]);
    etcd.ctl(&["user", "add", "gw:gwpw"]);
    etcd.ctl(&["role", "add", "fleet"]);
    etcd.ctl(&[
        "role",
        "grant-permission",
        "fleet",
        "--prefix=true",
        "readwrite",
        "/mg/",
    ]);
    etcd.ctl(&["user", "grant-role", "gw", "fleet"]);
    etcd.ctl(&["auth", "enable"]);
    let url = || EtcdUrl::parse(&format!("etcd://{ep}/mg")).unwrap();
    let auth = |pw: &str| EtcdAuth {
        user: Some(("gw".into(), pw.into())),
        ..EtcdAuth::default()
    };
    // The same connect, with the right password, reads the prefix.
    let store = EtcdStore::connect(url(), auth("gwpw"), "a", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(store.tenants().await.unwrap(), ["acme"]);
    let err = EtcdStore::connect(url(), auth("wrong"), "a", Duration::from_secs(5))
        .await
        .err()
        .expect("a wrong password was taken");
    let text = err.to_string();
    assert!(text.contains("etcd http://127.0.0.1:"), "{text}");
    assert!(
        text.to_lowercase().contains("authentication failed"),
        "{text}"
    );
}

/// The binary on an etcd store: `meshgate --store etcd://.../mg
/// --node-name a` takes its node document (the admin address) and the
/// pipe etcd holds, carries a connection, and shows alive in `meshgatectl
/// fleet status`.
#[test]
fn meshgate_runs_from_an_etcd_store() {
    if !etcd_ok() {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        a
    });
    let (admin, pipe) = (free_port(), free_port());
    etcd.put("/mg/nodes/a", &format!("admin: 127.0.0.1:{admin}\n"));
    etcd.put(
        "/mg/tenants/acme/web.json",
        &format!(r#"{{"kind": "pipe", "listen": "127.0.0.1:{pipe}", "remote": "{echo}"}}"#),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["--store", &format!("etcd://{ep}/mg"), "--node-name", "a"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let roundtrip = || -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", pipe)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 5];
        s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) && !roundtrip() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = roundtrip();
    let fleet = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
        .args(["fleet", "status", "--store", &format!("etcd://{ep}/mg")])
        .output()
        .unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(ok, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&fleet.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with('a') && l.contains("alive")),
        "{text}"
    );
    // The node's admin address came from its document in etcd.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&format!("127.0.0.1:{admin}")), "{log}");
}

/// `meshgatectl apply DIR --etcd URL`: the directory checked, then written
/// in one transaction; what it no longer has is deleted; a directory that
/// fails the check writes nothing; `--dry-run` says what would change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshgatectl_apply_writes_a_directory_all_or_nothing() {
    if !etcd_ok() {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let url = format!("etcd://{ep}/mg");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |rel: &str, text: &str| {
        let p = d.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("tenants/acme/corp.yaml", &vnet("10.0.0.0/8"));
    write(
        "tenants/acme/web.json",
        r#"{"kind": "pipe", "listen": "127.0.0.1:0", "remote": "127.0.0.1:9"}"#,
    );
    write("nodes/a.yaml", "log: info\n");
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let dirs = d.display().to_string();
    // Dry run: says what, writes nothing.
    let (ok, text) = ctl(&["apply", &dirs, "--etcd", &url, "--dry-run"]);
    assert!(ok, "{text}");
    assert!(text.contains("would put /mg/tenants/acme/web"), "{text}");
    assert_eq!(
        etcd.ctl(&["get", "--prefix", "/mg/", "--keys-only"]).trim(),
        ""
    );

    let (ok, text) = ctl(&["apply", &dirs, "--etcd", &url]);
    assert!(ok, "{text}");
    assert!(text.contains("applied: 3 written, 0 deleted"), "{text}");
    let keys = etcd.ctl(&["get", "--prefix", "/mg/", "--keys-only"]);
    for k in [
        "/mg/nodes/a",
        "/mg/tenants/acme/corp",
        "/mg/tenants/acme/web",
    ] {
        assert!(keys.lines().any(|l| l == k), "{keys}");
    }
    let (n, _) = node(&ep, "a").await;
    assert_eq!(instances(&n).await, ["acme/corp", "acme/web"]);

    // web gone, corp changed: one transaction, and the node follows.
    std::fs::remove_file(d.join("tenants/acme/web.json")).unwrap();
    write("tenants/acme/corp.yaml", &vnet("10.9.0.0/16"));
    let (ok, text) = ctl(&["apply", &dirs, "--etcd", &url]);
    assert!(ok, "{text}");
    assert!(text.contains("deleted /mg/tenants/acme/web"), "{text}");
    assert!(
        text.contains("applied: 1 written, 1 deleted, 1 unchanged"),
        "{text}"
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) && instances(&n).await != ["acme/corp"] {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(instances(&n).await, ["acme/corp"]);

    // A directory that fails the check: nothing written.
    let before = etcd.revision();
    write("tenants/acme/bad.yaml", "kind: pipe\nlisten: nowhere\n");
    write("tenants/acme/more.yaml", &vnet("10.8.0.0/16"));
    let (ok, text) = ctl(&["apply", &dirs, "--etcd", &url]);
    assert!(!ok, "{text}");
    assert!(text.contains("tenants/acme/bad.yaml"), "{text}");
    assert!(text.contains("nothing was written"), "{text}");
    assert_eq!(etcd.revision(), before);

    // A placement: checked as the nodes read it, then written.
    std::fs::remove_file(d.join("tenants/acme/bad.yaml")).unwrap();
    write("placement/acme.yaml", "replicas: 0\n");
    let (ok, text) = ctl(&["apply", &dirs, "--etcd", &url]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("placement/acme") && text.contains("`replicas`: 0"),
        "{text}"
    );
    assert_eq!(etcd.revision(), before);
    write("placement/acme.yaml", "nodes: [b]\n");
    let (ok, text) = ctl(&["apply", &dirs, "--etcd", &url]);
    assert!(ok, "{text}");
    assert!(text.contains("put /mg/placement/acme"), "{text}");
    // Node a is not among acme's nodes any more: it stops running it.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) && !instances(&n).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(instances(&n).await, Vec::<String>::new());
    n.shutdown(Duration::from_millis(50)).await;
}

fn placed_nodes(stores: &[(&str, &Arc<EtcdStore>)], tenant: &str) -> Vec<String> {
    stores
        .iter()
        .filter(|(_, s)| s.placed().iter().any(|t| t == tenant))
        .map(|(n, _)| n.to_string())
        .collect()
}

/// Placement: a `replicas: 1` tenant limited to nodes labelled
/// `region: eu` runs on exactly one of them (and on no other node), while
/// a tenant without placement runs on all four. When its node crashes
/// (stops renewing its lease, revokes nothing), another eligible node runs
/// it within the lease's TTL (printed); a drained node hands it on at once
/// and stops running anything; a bad placement key changes nothing and
/// shows in `fleet status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_one_tenant_runs_once_and_moves_when_its_node_dies_or_drains() {
    if !etcd_ok() {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let ttl = Duration::from_secs(3);
    for (n, region) in [("a", "eu"), ("b", "eu"), ("c", "eu"), ("d", "us")] {
        etcd.put(
            &format!("/mg/nodes/{n}"),
            &format!("lease_ttl: 3s\nlabels:\n  region: {region}\n"),
        );
    }
    etcd.put("/mg/placement/acme", "labels: {region: eu}\nreplicas: 1\n");
    etcd.put("/mg/tenants/acme/net", &vnet("10.9.0.0/16"));
    etcd.put("/mg/tenants/everywhere/net", &vnet("10.8.0.0/16"));
    let mut nodes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let (node, store) = node(&ep, name).await;
        nodes.push((name, node, store));
    }
    let stores =
        || -> Vec<(&str, &Arc<EtcdStore>)> { nodes.iter().map(|(n, _, s)| (*n, s)).collect() };
    wait_for("acme on one eu node", Duration::from_secs(5), || {
        placed_nodes(&stores(), "acme").len() == 1
    })
    .await;
    // It stays on one node (the others do not take it after the grace).
    tokio::time::sleep(placement_grace() + Duration::from_millis(500)).await;
    let holder = placed_nodes(&stores(), "acme");
    assert_eq!(holder.len(), 1, "{holder:?}");
    let holder = holder[0].clone();
    assert_ne!(holder, "d", "d is not in region eu");
    assert_eq!(placed_nodes(&stores(), "everywhere").len(), 4);
    // The registry runs what the store shows it.
    for (n, node, _) in &nodes {
        let runs = instances(node).await.contains(&"acme/net".to_string());
        assert_eq!(runs, *n == holder, "node {n}");
        assert!(instances(node)
            .await
            .contains(&"everywhere/net".to_string()));
    }

    // The holder crashes: another eu node runs acme within the TTL.
    let dead = nodes.iter().position(|(n, ..)| *n == holder).unwrap();
    nodes[dead].2.crash();
    let crashed = Instant::now();
    let alive = |n: &str| n != holder;
    wait_for("acme moved", ttl + Duration::from_secs(3), || {
        let p = placed_nodes(&stores(), "acme");
        p.iter().filter(|n| alive(n)).count() == 1
    })
    .await;
    let moved = crashed.elapsed();
    let second = placed_nodes(&stores(), "acme")
        .into_iter()
        .find(|n| alive(n))
        .unwrap();
    eprintln!("replicas: 1 tenant moved from crashed {holder} to {second} in {moved:?} (lease TTL {ttl:?})");
    assert!(moved <= ttl, "{moved:?}");
    assert_ne!(second, "d");
    let idx = nodes.iter().position(|(n, ..)| *n == second).unwrap();
    let t = Instant::now();
    while !instances(&nodes[idx].1)
        .await
        .contains(&"acme/net".to_string())
    {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "placed but not running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Drained: the last eu node takes it at once; the drained one runs nothing.
    let url = EtcdUrl::parse(&format!("etcd://{ep}/mg")).unwrap();
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
            .args(args)
            .args(["--store", &format!("etcd://{ep}/mg")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ctl(&["drain", &second]), format!("{second}: drained\n"));
    let third = ["a", "b", "c"]
        .into_iter()
        .find(|n| *n != holder && *n != second)
        .unwrap();
    let took = wait_for("acme after the drain", Duration::from_secs(3), || {
        placed_nodes(&stores(), "acme") == [third.to_string()]
            || placed_nodes(&stores(), "acme").contains(&third.to_string())
                && !placed_nodes(&stores(), "acme").contains(&second)
    })
    .await;
    eprintln!("drained {second}: acme on {third} after {took:?}");
    wait_for(
        "the drained node runs nothing",
        Duration::from_secs(2),
        || nodes[idx].2.placed().is_empty(),
    )
    .await;
    let (_, fleet) = configstore::etcd::fleet_status(&url, &EtcdAuth::default())
        .await
        .unwrap();
    let of = |n: &str| fleet.iter().find(|f| f.node == n).unwrap().clone();
    assert!(of(&second).drained && of(&second).alive, "{fleet:?}");
    assert_eq!(of(third).holds, ["acme"], "{fleet:?}");
    let table = ctl(&["fleet", "status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(second.as_str()) && l.contains("alive,drained")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(third) && l.contains(" acme ")),
        "{table}"
    );

    // A bad placement key: acme stays where it runs; fleet status says why.
    etcd.put("/mg/placement/acme", "replicas: many\n");
    let t = Instant::now();
    let shown = loop {
        let (_, fleet) = configstore::etcd::fleet_status(&url, &EtcdAuth::default())
            .await
            .unwrap();
        let f = fleet.iter().find(|f| f.node == third).unwrap().clone();
        if !f.rejected.is_empty() {
            break f;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{fleet:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shown.rejected[0].0, "acme/placement", "{shown:?}");
    assert!(shown.rejected[0].1.contains("replicas"), "{shown:?}");
    assert_eq!(
        placed_nodes(&stores(), "acme")
            .iter()
            .filter(|n| alive(n))
            .count(),
        1
    );
    // Undrained: it takes tenants again, but acme does not move back.
    assert_eq!(ctl(&["undrain", &second]), format!("{second}: undrained\n"));
    wait_for(
        "everywhere back on the undrained node",
        Duration::from_secs(3),
        || nodes[idx].2.placed().contains(&"everywhere".to_string()),
    )
    .await;
    assert!(!nodes[idx].2.placed().contains(&"acme".to_string()));

    // The holder stops gracefully (SIGTERM's path): its lease is revoked,
    // so acme moves at once, without waiting for the lease to expire.
    let t3 = nodes.iter().position(|(n, ..)| *n == third).unwrap();
    let (_, node3, _) = nodes.remove(t3);
    node3.shutdown(Duration::from_millis(50)).await;
    let stopped = Instant::now();
    wait_for("acme after a graceful stop", Duration::from_secs(1), || {
        nodes
            .iter()
            .any(|(n, _, s)| *n == second && s.placed().contains(&"acme".to_string()))
    })
    .await;
    eprintln!(
        "graceful stop of {third}: acme on {second} after {:?}",
        stopped.elapsed()
    );
}

async fn wait_for(what: &str, limit: Duration, f: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return t.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {limit:?}");
}

fn placement_grace() -> Duration {
    configstore::etcd::placement::GRACE
}

/// Failover as a WireGuard peer sees it, with real processes: two
/// meshgate nodes on one host (the WireGuard port is the shared address
/// peers use), a `replicas: 1` tenant with a WireGuard instance and a pipe
/// to nginx, and a wireguard-go client. SIGKILL of the node running it:
/// the other node runs it within the lease's TTL (10 s, the default) and
/// the client reaches nginx through it again once wireguard-go starts a
/// new handshake (it does 15 s after data goes unanswered). Both times
/// are printed.
#[test]
fn sigkill_of_the_node_running_a_wireguard_tenant_and_wireguard_go_reaches_it_on_the_other() {
    use common::netns::{can_netns, nginx_in, Netns, WgGo};
    if !etcd_ok()
        || !can_netns()
        || !have("wireguard-go")
        || !have("wg")
        || !have("nginx")
        || !have("curl")
    {
        return;
    }
    let mut ns = Netns::new("fo");
    let etcd = Etcd::start_in(Some(&ns.name));
    let url = format!("etcd://{}/mg", etcd.endpoint());
    let _www = nginx_in(&mut ns, "127.0.0.1:8081", "behind the fleet\n");
    let server = meshgate::core::keys::PrivateKey::generate();
    let wg = WgGo::new(&ns, "10.192.0.2/24", None);
    wg.add_peer(
        &ns,
        &server.public_key().to_string(),
        "endpoint 127.0.0.1:51820 allowed-ips 10.192.0.0/24",
    );
    for (n, admin) in [("a", 9101), ("b", 9102)] {
        etcd.put(
            &format!("/mg/nodes/{n}"),
            &format!("admin: 127.0.0.1:{admin}\n"),
        );
    }
    etcd.put("/mg/placement/acme", "replicas: 1\n");
    etcd.put(
        "/mg/tenants/acme/wg0",
        &format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: 51820\naddress: 10.192.0.1/24\npeers:\n  - name: laptop\n    public_key: {}\n    allowed_ips: [10.192.0.2/32]\n",
            server.to_base64(),
            wg.public_key()
        ),
    );
    etcd.put(
        "/mg/tenants/acme/web",
        "kind: pipe\nlisten: 10.192.0.1:8080\nlisten_via: wg0\nremote: 127.0.0.1:8081\n",
    );
    struct Nodes(Vec<(Child, std::path::PathBuf)>, tempfile::TempDir);
    impl Drop for Nodes {
        fn drop(&mut self) {
            for (c, log) in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
                if std::thread::panicking() {
                    eprintln!(
                        "--- {} ---\n{}",
                        log.display(),
                        std::fs::read_to_string(&*log).unwrap_or_default()
                    );
                }
            }
        }
    }
    let mut nodes = Nodes(Vec::new(), tempfile::tempdir().unwrap());
    let mut spawn = |name: &str| {
        let log = nodes.1.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = ns
            .cmd(env!("CARGO_BIN_EXE_meshgate"))
            .args(["--store", &url, "--node-name", name])
            .env("MESHGATE_LOG", "info")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        nodes.0.push((child, log));
    };
    let fetch = |ns: &Netns| ns.curl("http://10.192.0.1:8080/", 3);
    let runs_wg = |ns: &Netns, admin: u16| {
        let (code, body) = ns.curl(&format!("http://127.0.0.1:{admin}/api/v1/modules"), 2);
        code == 200 && body.contains("\"wg0\"")
    };
    spawn("a");
    assert!(
        common::wait_until(Duration::from_secs(15), || fetch(&ns).0 == 200),
        "wireguard-go never reached nginx through node a"
    );
    assert_eq!(fetch(&ns).1, "behind the fleet\n");
    assert!(runs_wg(&ns, 9101));
    spawn("b");
    assert!(common::wait_until(Duration::from_secs(10), || ns
        .curl("http://127.0.0.1:9102/readyz", 1)
        .0
        == 200));
    // b is up and does not run it (the same probe that found it on a).
    std::thread::sleep(Duration::from_secs(3));
    assert!(!runs_wg(&ns, 9102), "both nodes run the replicas: 1 tenant");

    let (a, _) = &mut nodes.0[0];
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    let killed = Instant::now();
    assert!(
        common::wait_until(Duration::from_secs(15), || runs_wg(&ns, 9102)),
        "node b never took the tenant over"
    );
    let ran = killed.elapsed();
    assert!(
        common::wait_until(Duration::from_secs(40), || fetch(&ns).0 == 200),
        "wireguard-go never reached nginx through node b"
    );
    let reached = killed.elapsed();
    eprintln!(
        "SIGKILL of the node running acme: b ran it after {ran:?} (lease TTL 10s); wireguard-go reached nginx through b after {reached:?}"
    );
    assert!(ran <= Duration::from_secs(10), "{ran:?}");
    let show = ns.sh(&format!("wg show {} latest-handshakes", wg.iface));
    assert!(!show.trim().ends_with("\t0"), "{show}");
}

/// Bad input from etcd: keys outside the layout are ignored and reported
/// (log and status key); an etcd whose revision went below the one a node
/// applied (its data lost, or restored from an older backup) is refused:
/// the node keeps running its config and says why in its status key,
/// while the same probe showed the new etcd's documents reach a node that
/// had not seen the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_going_backwards_and_keys_outside_the_layout_are_refused_and_reported() {
    if !etcd_ok() {
        return;
    }
    let mut etcd = Etcd::start();
    let ep = etcd.endpoint();
    let url = EtcdUrl::parse(&format!("etcd://{ep}/mg")).unwrap();
    etcd.put("/mg/tenants/acme/a", &vnet("10.1.0.0/16"));
    for i in 0..20 {
        etcd.put("/mg/tenants/acme/b", &vnet(&format!("10.2.{i}.0/24")));
    }
    etcd.put("/mg/stray/thing", "x");
    etcd.put("/mg/tenants/acme/x/y", "kind: vnet\n");
    let (n, _store) = node(&ep, "a").await;
    assert_eq!(instances(&n).await, ["acme/a", "acme/b"]);
    let rejected_of = |node: &'static str| {
        let url = url.clone();
        async move {
            let (_, fleet) = configstore::etcd::fleet_status(&url, &EtcdAuth::default())
                .await
                .unwrap();
            fleet
                .into_iter()
                .find(|f| f.node == node)
                .map(|f| f.rejected)
                .unwrap_or_default()
        }
    };
    let r = rejected_of("a").await;
    for k in ["-/stray/thing", "-/tenants/acme/x/y"] {
        assert!(r.iter().any(|(key, _)| key == k), "{k}: {r:?}");
    }

    // etcd loses its data: a fresh one on the same address, revision 2.
    etcd.kill();
    std::fs::remove_dir_all(etcd.dir.path().join("data")).unwrap();
    etcd.launch();
    etcd.put("/mg/tenants/other/c", &vnet("10.3.0.0/16"));
    let t = Instant::now();
    let why = loop {
        if let Some((_, why)) = rejected_of("a")
            .await
            .into_iter()
            .find(|(k, _)| k == "-/revision")
        {
            break why;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(why.contains("below the"), "{why}");
    assert_eq!(instances(&n).await, ["acme/a", "acme/b"], "rolled back");
    // The same documents reach a node that starts now.
    let (fresh, _s) = node(&ep, "b").await;
    assert_eq!(instances(&fresh).await, ["other/c"]);
    assert_eq!(instances(&n).await, ["acme/a", "acme/b"]);
}
