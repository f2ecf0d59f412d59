//! The `kernel` engine end to end: a TUN in an unnamed user + network
//! namespace, run by an unprivileged meshgate, carrying a wireguard-go
//! peer's ping and curl; a clear refusal where `/dev/net/tun` is closed to
//! the user; nothing left behind when meshgate is killed. Root only (the
//! tests make the namespaces and switch users themselves).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::netns::*;
use common::*;

fn config(key: &str, peer_key: &str, admin: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::write(
        p.join("meshgate.yaml"),
        format!("node: server\nadmin: {admin}\ndrain_timeout: 1s\nengine: kernel\n"),
    )
    .unwrap();
    std::fs::create_dir_all(p.join("tenants/default")).unwrap();
    std::fs::write(
        p.join("tenants/default/wg0.yaml"),
        format!(
            "kind: wireguard\nprivate_key: {key}\nlisten_port: 51820\naddress: 10.192.0.1/24\nuapi: off\n\
             peers:\n  - name: wgo\n    public_key: {peer_key}\n    allowed_ips: [10.192.0.2/32]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        p.join("tenants/default/web.yaml"),
        "kind: pipe\nlisten: 10.192.0.1:8080\nlisten_via: wg0\nremote: 127.0.0.1:8081\n",
    )
    .unwrap();
    open_to_all(p);
    d
}

/// The kernel engine helpers whose parent is `pid`: (pid, uid, net namespace).
fn helpers_of(pid: u32) -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    for (p, _) in kernel_engine_helpers() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok())
        };
        if field("PPid:") != Some(pid) {
            continue;
        }
        let ns = std::fs::read_link(format!("/proc/{p}/ns/net"))
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        out.push((p, field("Uid:").unwrap_or(u32::MAX), ns));
    }
    out
}

/// Whether any process is in network namespace `ns` (`net:[inode]`).
fn namespace_in_use(ns: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_link(e.path().join("ns/net")).is_ok_and(|l| l.display().to_string() == ns)
    })
}

#[test]
fn unprivileged_kernel_engine_carries_a_wireguard_go_peer() {
    if !need_root()
        || !can_netns()
        || !userns_allowed()
        || !have("wireguard-go")
        || !have("nginx")
        || !have("curl")
        || !have("ping")
    {
        skip("needs root, user namespaces, wireguard-go, nginx, curl, ping");
        return;
    }
    let mut server = Netns::new("ks");
    let client = Netns::new("kc");
    link(&server, "10.231.40.1/24", &client, "10.231.40.2/24");
    let _nginx = nginx_in(&mut server, "127.0.0.1:8081", "behind the kernel engine\n");
    let wg = WgGo::new(&client, "10.192.0.2/24", None);
    let key = meshgate::core::keys::PrivateKey::generate();
    let cfg = config(&key.to_base64(), &wg.public_key(), "127.0.0.1:9000");

    // /dev/net/tun is 0600 root here: the test gives the unprivileged
    // meshgate its own open TUN node, bound over /dev/net/tun in a private
    // mount namespace, so nothing changes for the rest of the machine.
    let (_dev, script) = tun_for_nobody();
    let mg = NsMeshgate::start_wrapped(
        &server,
        &["unshare", "-m", "sh", "-c", &script, "sh"],
        cfg.path(),
        "127.0.0.1:9000",
    );
    let log = mg.log_text();
    assert!(log.contains("kernel engine up"), "{log}");

    // The helper runs as the unprivileged user, in a namespace of its own.
    let helpers = helpers_of(mg.child.id());
    assert_eq!(helpers.len(), 1, "one helper per engine: {helpers:?}");
    let (_, uid, helper_ns) = &helpers[0];
    assert_eq!(*uid, 65534, "the helper runs as nobody");
    let server_ns = server.sh("readlink /proc/self/ns/net").trim().to_string();
    assert_ne!(*helper_ns, server_ns, "the TUN lives in its own namespace");
    // Nothing on the namespace's own network changed: no TUN there.
    let links = server.sh("ip -o link");
    assert!(!links.contains("mg0"), "{links}");

    wg.add_peer(
        &client,
        &key.public_key().to_string(),
        "endpoint 10.231.40.1:51820 allowed-ips 10.192.0.0/24",
    );
    // The kernel in the engine's namespace answers ping; its TCP carries curl.
    let ping = client.try_sh("ping -c 3 -i 0.2 -W 2 10.192.0.1");
    assert!(
        ping.status.success(),
        "ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let (status, body) = client.curl("http://10.192.0.1:8080/", 10);
    assert_eq!(
        (status, body.as_str()),
        (200, "behind the kernel engine\n"),
        "{}",
        mg.log_text()
    );
    // Twenty requests in a row: connections come and go cleanly.
    let out = client.sh(
        "for i in $(seq 1 20); do curl -s -o /dev/null -w '%{http_code} ' http://10.192.0.1:8080/; done",
    );
    assert_eq!(out.trim(), vec!["200"; 20].join(" "));
    let (_, status_json) = server.curl("http://127.0.0.1:9000/api/v1/modules", 3);
    assert!(
        status_json.contains("\"engine\": \"kernel\"")
            || status_json.contains("\"engine\":\"kernel\""),
        "{status_json}"
    );
}

#[test]
fn kernel_engine_without_tun_access_is_refused_clearly() {
    if !need_root() || !have("setpriv") {
        skip("needs root (to run meshgate as another user)");
        return;
    }
    let tun_open_to_all = std::fs::metadata("/dev/net/tun")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
        .unwrap_or(false);
    if tun_open_to_all {
        skip("/dev/net/tun is open to every user on this machine");
        return;
    }
    let key = meshgate::core::keys::PrivateKey::generate();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("meshgate.yaml"),
        "admin: off\nengine: kernel\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.path().join("tenants/acme")).unwrap();
    std::fs::write(
        d.path().join("tenants/acme/wg0.yaml"),
        format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.9.0.1/24\nuapi: off\n",
            key.to_base64()
        ),
    )
    .unwrap();
    open_to_all(d.path());
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--config-dir")
        .arg(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for needle in [
        "tenants/acme/wg0.yaml",
        "engine `kernel`",
        "/dev/net/tun",
        "as uid 65534",
        "`engine: userspace`",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn nothing_is_left_when_meshgate_is_killed() {
    if !need_root() || !can_netns() {
        skip("needs root");
        return;
    }
    let key = meshgate::core::keys::PrivateKey::generate();
    let cfg = ConfigDir::new();
    cfg.write(
        "meshgate.yaml",
        &format!("admin: 127.0.0.1:{}\nengine: kernel\n", cfg.admin_port),
    );
    for name in ["a", "b"] {
        cfg.write(
            &format!("tenants/acme/wg-{name}.yaml"),
            &format!(
                "kind: wireguard\nprivate_key: {}\naddress: 10.1.0.1/16\nuapi: off\n",
                key.to_base64()
            ),
        );
    }
    // Graceful stop first, then SIGKILL: neither leaves a helper or a namespace.
    let mut seen = Vec::new();
    for graceful in [true, false] {
        let mut mg = Meshgate::start(&cfg);
        let helpers = helpers_of(mg.pid());
        seen.extend(helpers.iter().map(|h| h.2.clone()));
        assert_eq!(
            helpers.len(),
            2,
            "two instances, two engines, the same 10.1.0.1 each: {helpers:?}"
        );
        assert_ne!(
            helpers[0].2, helpers[1].2,
            "each engine has its own namespace"
        );
        if graceful {
            stop_gracefully(&mut mg.child);
        } else {
            mg.child.kill().unwrap();
            mg.child.wait().unwrap();
        }
        for (pid, _, ns) in &helpers {
            let gone = wait_until(Duration::from_secs(5), || {
                !Path::new(&format!("/proc/{pid}")).exists() && !namespace_in_use(ns)
            });
            assert!(
                gone,
                "helper {pid} or its namespace {ns} outlived meshgate (graceful: {graceful})"
            );
        }
    }
    // Nothing named was left either: no host link called mg0, and no
    // `ip netns` name pins a helper's namespace.
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(links.status.success());
    assert!(!String::from_utf8_lossy(&links.stdout).contains(": mg0"));
    let named: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .map(|m| format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&m)))
                .collect()
        })
        .unwrap_or_default();
    for ns in &seen {
        assert!(!named.contains(ns), "{ns} is pinned under /run/netns");
    }
}
