//! The node in process: the registry's start, reconcile, reload, rejection
//! and removal paths against an in-memory store, with real sockets on
//! loopback but no binary and no files. Flow hooks (policy) are plugged in
//! as a library user would.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use configstore::MemStore;
use meshgate::core::node::Node;
use meshgate::core::spine::flow::{Flow, FlowEnd, FlowObserver, Verdict};
use meshgate::modules::builtin_factories;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers every connection with `tag` and then echoes.
async fn backend(tag: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(tag.as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    common::free_port()
}

/// Connects to the pipe on `port` and reads the backend's tag ("" when the
/// connection is refused or closed without data).
async fn tag_at(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    }
}

async fn eventually(mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..60 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn pipe(port: u16, remote: SocketAddr) -> serde_json::Value {
    json!({"kind": "pipe", "listen": format!("127.0.0.1:{port}"), "remote": remote.to_string()})
}

#[tokio::test]
async fn reconcile_reload_reject_and_remove_in_process() {
    let (a, b) = (backend("A").await, backend("B").await);
    let store = Arc::new(MemStore::new());
    let port = free_port();
    store.set("acme", "web", pipe(port, a));
    let mut node = Node::new(store.clone(), builtin_factories(), Vec::new());
    node.start().await.unwrap();
    assert!(node.registry().is_ready());
    assert_eq!(tag_at(port).await, "A");

    // A changed remote reloads: new connections go to B.
    store.set("acme", "web", pipe(port, b));
    assert!(eventually(async || tag_at(port).await == "B").await);

    // A bad change is rejected, named, and the old config keeps serving.
    store.set(
        "acme",
        "web",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{port}"), "remote": "127.0.0.1:0"}),
    );
    let reg = node.registry().clone();
    assert!(
        eventually(async || {
            reg.status().await.iter().any(|s| {
                s.instance == "web"
                    && s.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("key `remote`"))
            })
        })
        .await
    );
    assert_eq!(tag_at(port).await, "B");

    // A new tenant appears, then the first goes away.
    let port2 = free_port();
    store.set("other", "web", pipe(port2, a));
    assert!(eventually(async || tag_at(port2).await == "A").await);
    store.remove("acme", "web");
    assert!(eventually(async || TcpStream::connect(("127.0.0.1", port)).await.is_err()).await);
    assert_eq!(tag_at(port2).await, "A");

    node.shutdown(Duration::from_secs(1)).await;
    assert!(TcpStream::connect(("127.0.0.1", port2)).await.is_err());
}

/// A UDP backend that answers every datagram with `tag` and the datagram.
async fn udp_backend(tag: &'static str) -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut reply = tag.as_bytes().to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, from).await;
        }
    });
    addr
}

/// Sends `msg` to the pipe's UDP port; the answer ("" if none in 1 s).
async fn udp_at(port: u16, msg: &[u8]) -> String {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        if s.send_to(msg, ("127.0.0.1", port)).await.is_err() {
            return String::new();
        }
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.recv(&mut buf)).await
        {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    String::new()
}

/// A pipe is a door like the others: a reload from `tcp` to `udp` on the
/// same port binds the UDP socket and closes the TCP listener, and back.
#[tokio::test]
async fn a_pipe_reloaded_from_tcp_to_udp_and_back_moves_its_listener() {
    let (tcp, udp) = (backend("T").await, udp_backend("U").await);
    let store = Arc::new(MemStore::new());
    let port = free_port();
    store.set("acme", "web", pipe(port, tcp));
    let mut node = Node::new(store.clone(), builtin_factories(), Vec::new());
    node.start().await.unwrap();
    assert_eq!(tag_at(port).await, "T");
    assert_eq!(udp_at(port, b"x").await, "", "no UDP yet");

    let mut doc = pipe(port, udp);
    doc["protocol"] = json!("udp");
    store.set("acme", "web", doc);
    assert!(eventually(async || udp_at(port, b"hello").await == "Uhello").await);
    assert!(
        eventually(async || TcpStream::connect(("127.0.0.1", port)).await.is_err()).await,
        "the TCP listener closed"
    );
    let status = node.registry().status().await;
    let web = status.iter().find(|s| s.instance == "web").unwrap();
    assert_eq!(web.details["protocol"], "udp", "{:?}", web.details);

    store.set("acme", "web", pipe(port, tcp));
    assert!(eventually(async || tag_at(port).await == "T").await);
    assert!(eventually(async || udp_at(port, b"x").await.is_empty()).await);
    node.shutdown(Duration::from_secs(1)).await;
}

/// Denies flows to one destination; records every end.
#[derive(Default)]
struct Policy {
    deny: Mutex<Option<String>>,
    ends: Mutex<Vec<String>>,
}

impl FlowObserver for Policy {
    fn on_start(&self, flow: &Flow) -> Verdict {
        match self.deny.lock().unwrap().as_deref() {
            Some(d) if flow.ctx.dst == d => Verdict::Deny(format!("{d} is off limits")),
            _ => Verdict::Allow,
        }
    }
    fn on_end(&self, flow: &Flow, end: &FlowEnd) {
        let d = flow.decision();
        self.ends.lock().unwrap().push(format!(
            "{} {} {}",
            d.verdict,
            d.route.unwrap_or_default(),
            end.reason
        ));
    }
}

#[tokio::test]
async fn policy_hooks_and_live_route_changes_keep_open_flows() {
    let a = backend("A").await;
    let store = Arc::new(MemStore::new());
    let port = free_port();
    store.set(
        "acme",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}]}),
    );
    store.set("acme", "web", pipe(port, a));
    let policy = Arc::new(Policy::default());
    let mut node = Node::new(store.clone(), builtin_factories(), vec![policy.clone()]);
    node.start().await.unwrap();

    // An open flow with the route in force.
    let mut open = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 8];
    let n = open.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"A");

    // The vnet now rejects loopback: new flows are refused, the open one lives.
    store.set(
        "acme",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "reject"}]}),
    );
    assert!(eventually(async || tag_at(port).await.is_empty()).await);
    open.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");

    // Back to direct, and the policy hook denies this destination.
    store.set(
        "acme",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}]}),
    );
    assert!(eventually(async || tag_at(port).await == "A").await);
    *policy.deny.lock().unwrap() = Some(a.to_string());
    assert_eq!(tag_at(port).await, "");
    drop(open);
    let route = "corp: 127.0.0.0/8 -> direct";
    let closed = format!("allow {route} closed");
    assert!(
        eventually(async || policy.ends.lock().unwrap().contains(&closed)).await,
        "the open flow ends normally: {:?}",
        policy.ends.lock().unwrap()
    );
    let text = node.registry().metrics().encode();
    assert!(
        text.contains(r#"meshgate_rejected_total{tenant="acme",instance="web",reason="denied"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"meshgate_dial_errors_total{tenant="acme",instance="web",reason="rejected"}"#
        ),
        "{text}"
    );
    node.shutdown(Duration::from_secs(1)).await;

    let ends = policy.ends.lock().unwrap().clone();
    assert!(
        ends.contains(&format!("deny ({a} is off limits) {route} denied")),
        "{ends:?}"
    );
    assert!(
        ends.iter()
            .any(|e| e.contains("127.0.0.0/8 -> reject") && e.ends_with("rejected")),
        "{ends:?}"
    );
}

/// Two WireGuard instances in one node (two tenants on loopback), as in
/// the README: the client's peer `server` is given by a network
/// (`10.192.0.0/24`), which names no host to dial. `--check` and start-up
/// refuse a pipe's `peer: server` with the reason (it used to dial
/// 10.192.0.0 and time out); a peer `nosuch` is refused naming the peers
/// there are; with the server's own address listed, the same pipe carries
/// a connection through the tunnel to the server's pipe on the same port.
#[tokio::test]
async fn a_pipe_peer_is_the_peer_s_own_address_checked_before_start() {
    use meshgate::core::keys::PrivateKey;
    let backend = backend("S").await;
    let (s_key, c_key) = (PrivateKey::generate(), PrivateKey::generate());
    let (s_port, c_port, pipe_port) = (free_udp_port(), free_udp_port(), free_port());
    let store = Arc::new(MemStore::new());
    store.set(
        "srv",
        "wg0",
        json!({"kind": "wireguard", "private_key": s_key.to_base64(),
               "listen_port": s_port, "address": "10.192.0.1/24",
               "peers": [{"name": "client", "public_key": c_key.public_key().to_string(),
                          "endpoint": format!("127.0.0.1:{c_port}"),
                          "allowed_ips": ["10.192.0.2/32"]}]}),
    );
    store.set(
        "srv",
        "web",
        json!({"kind": "pipe", "listen": format!("10.192.0.1:{pipe_port}"), "listen_via": "wg0",
               "remote": backend.to_string()}),
    );
    let client_wg = |allowed: serde_json::Value| {
        json!({"kind": "wireguard", "private_key": c_key.to_base64(),
               "listen_port": c_port, "address": "10.192.0.2/32",
               "peers": [{"name": "server", "public_key": s_key.public_key().to_string(),
                          "endpoint": format!("127.0.0.1:{s_port}"),
                          "allowed_ips": allowed, "persistent_keepalive": 1}]})
    };
    let client_pipe = |peer: &str| {
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{pipe_port}"), "via": "wg0",
               "peer": peer})
    };
    let registry =
        |store: &Arc<MemStore>| meshgate::core::node::registry(store.clone(), builtin_factories());
    let errors = async |store: &Arc<MemStore>| -> Vec<String> {
        registry(store)
            .check()
            .await
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    };

    store.set("cli", "wg0", client_wg(json!(["10.192.0.0/24"])));
    store.set("cli", "web", client_pipe("server"));
    let e = errors(&store).await;
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("key `peer`"), "{e:?}");
    assert!(
        e[0].contains(
            "`wg0` has peer server, but its allowed_ips (10.192.0.0/24) hold no single address"
        ),
        "{e:?}"
    );
    store.set("cli", "web", client_pipe("nosuch"));
    let e = errors(&store).await;
    assert!(
        e.len() == 1 && e[0].contains("`wg0` (wireguard) has no peer nosuch; it has: peer server"),
        "{e:?}"
    );
    let mut refused = Node::new(store.clone(), builtin_factories(), Vec::new());
    assert!(
        refused.start().await.is_err(),
        "start-up runs the same check"
    );

    // The server's own address listed: checked, started, carried.
    store.set(
        "cli",
        "wg0",
        client_wg(json!(["10.192.0.1/32", "10.192.0.0/24"])),
    );
    store.set("cli", "web", client_pipe("server"));
    assert_eq!(errors(&store).await, Vec::<String>::new());
    let mut node = Node::new(store.clone(), builtin_factories(), Vec::new());
    node.start().await.unwrap();
    assert!(
        eventually(async || tag_at(pipe_port).await == "S").await,
        "the pipe reaches the server's pipe at 10.192.0.1 through the tunnel"
    );
    node.shutdown(Duration::from_secs(1)).await;
}

fn free_udp_port() -> u16 {
    // Free for TCP and UDP, outside the ephemeral range.
    common::free_port()
}

/// A plain HTTP GET to the admin API: (status line, body).
async fn admin_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// One tenant that cannot start at boot (its port is taken) no longer
/// stops the node: it is refused and reported (`/readyz`, `/api/v1/node`,
/// `/api/v1/modules`, a metric) while another tenant's pipe serves; once
/// the port is free, its next document starts it. A node where nothing at
/// all can start still fails to start.
#[tokio::test]
async fn a_tenant_that_cannot_start_is_refused_while_the_others_run() {
    let backend_addr = backend("B").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let beta_port = free_port();
    let store = Arc::new(MemStore::new());
    store.set("acme", "web", pipe(taken_port, backend_addr));
    store.set("beta", "web", pipe(beta_port, backend_addr));
    let mut node = Node::new(store.clone(), builtin_factories(), Vec::new());
    node.start()
        .await
        .expect("beta starts although acme cannot");
    assert_eq!(tag_at(beta_port).await, "B", "beta serves");
    let reg = node.registry().clone();
    let refused = reg.refused();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "acme/web");
    assert!(
        refused[0]
            .1
            .contains("key `listen`: cannot listen on 127.0.0.1:"),
        "{refused:?}"
    );
    let text = reg.metrics().encode();
    assert!(
        text.contains(r#"meshgate_instances_refused{tenant="acme",instance="web"} 1"#),
        "{text}"
    );
    let status = reg.status().await;
    let acme = status
        .iter()
        .find(|s| s.tenant == "acme")
        .expect("acme shown");
    assert_eq!(serde_json::to_value(acme.state).unwrap(), "refused");
    assert!(acme
        .last_error
        .as_deref()
        .unwrap()
        .contains("cannot listen"));

    // The admin API says so: ready, with the refused instance named.
    let admin = meshgate::core::node::admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    meshgate::core::node::admin::spawn_on_own_runtime(
        admin,
        meshgate::core::node::admin::Admin::new(reg.clone(), "n"),
        stop.clone(),
    )
    .unwrap();
    let (line, body) = admin_get(admin_addr, "/readyz").await;
    assert!(line.contains("200"), "{line}");
    assert!(body.contains("refused acme/web: "), "{body}");
    let (_, body) = admin_get(admin_addr, "/api/v1/node").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["refused"][0]["instance"], "acme/web", "{v}");

    // The port comes free; the next document starts acme.
    drop(taken);
    store.set("acme", "web", pipe(taken_port, backend_addr));
    assert!(eventually(async || tag_at(taken_port).await == "B").await);
    assert!(reg.refused().is_empty());
    assert!(!reg
        .metrics()
        .encode()
        .contains("meshgate_instances_refused{"));
    let (_, body) = admin_get(admin_addr, "/readyz").await;
    assert_eq!(body, "ready\n");
    stop.cancel();
    node.shutdown(Duration::from_secs(1)).await;

    // Nothing can start: the node does not start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let only = Arc::new(MemStore::new());
    only.set(
        "acme",
        "web",
        pipe(taken.local_addr().unwrap().port(), backend_addr),
    );
    let mut node = Node::new(only, builtin_factories(), Vec::new());
    let e = node.start().await.unwrap_err();
    assert!(e[0].contains("cannot listen"), "{e:?}");
}

/// The value of one series in the node's metrics text (0 when absent).
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A `kind: vnet` stack reports its own counters (they were exported
/// nowhere: only a WireGuard instance's own stack pushed them), as does a
/// WireGuard instance's own stack; both are read at the scrape, and the
/// vnet's series go with it.
#[tokio::test]
async fn every_userspace_stack_reports_its_counters_vnet_stacks_included() {
    use meshgate::core::keys::PrivateKey;
    let backend = backend("V").await;
    let (s_key, c_key) = (PrivateKey::generate(), PrivateKey::generate());
    let (s_port, c_port, pipe_port) = (free_udp_port(), free_udp_port(), free_port());
    let store = Arc::new(MemStore::new());
    // The server: one vnet stack (10.60.0.1/16), a WireGuard link into it.
    // As the README's `sites` example: a configured vnet routes nothing by
    // itself, so the backend on the host's loopback needs its route.
    store.set(
        "srv",
        "sites",
        json!({"kind": "vnet", "address": "10.60.0.1/16",
               "routes": [{"to": backend.ip().to_string(), "via": "direct"}]}),
    );
    store.set(
        "srv",
        "wg0",
        json!({"kind": "wireguard", "private_key": s_key.to_base64(),
               "listen_port": s_port, "vnet": "sites",
               "peers": [{"name": "client", "public_key": c_key.public_key().to_string(),
                          "endpoint": format!("127.0.0.1:{c_port}"),
                          "allowed_ips": ["10.60.1.0/24"]}]}),
    );
    store.set(
        "srv",
        "web",
        json!({"kind": "pipe", "listen": format!("10.60.0.1:{pipe_port}"), "listen_via": "sites",
               "remote": backend.to_string()}),
    );
    // The client: its own stack.
    store.set(
        "cli",
        "wg0",
        json!({"kind": "wireguard", "private_key": c_key.to_base64(),
               "listen_port": c_port, "address": "10.60.1.2/32",
               "peers": [{"name": "server", "public_key": s_key.public_key().to_string(),
                          "endpoint": format!("127.0.0.1:{s_port}"),
                          "allowed_ips": ["10.60.0.1/32"], "persistent_keepalive": 1}]}),
    );
    store.set(
        "cli",
        "web",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{pipe_port}"), "via": "wg0",
               "remote": format!("10.60.0.1:{pipe_port}")}),
    );
    let mut node = Node::new(store.clone(), builtin_factories(), Vec::new());
    node.start().await.unwrap();
    let metrics = node.registry().metrics().clone();
    let vnet_in = r#"meshgate_netstack_packets_in_total{tenant="srv",instance="sites"}"#;
    let client_out = r#"meshgate_netstack_packets_out_total{tenant="cli",instance="wg0"}"#;
    assert_eq!(series(&metrics.encode(), vnet_in), 0.0, "nothing moved yet");
    assert!(
        eventually(async || tag_at(pipe_port).await == "V").await,
        "{:?}\n{}",
        node.registry().refused(),
        metrics.encode()
    );
    let text = metrics.encode();
    assert!(series(&text, vnet_in) > 0.0, "{text}");
    assert!(series(&text, client_out) > 0.0, "{text}");
    assert!(
        !text.contains(r#"meshgate_netstack_packets_in_total{tenant="srv",instance="wg0"}"#),
        "a link of the vnet's stack reports no stack of its own: {text}"
    );
    // The vnet goes (with what used it): so do its series, all of them.
    store.remove("srv", "web");
    store.remove("srv", "wg0");
    store.remove("srv", "sites");
    assert!(
        eventually(async || !metrics.encode().contains(r#"tenant="srv""#)).await,
        "{}",
        metrics.encode()
    );
    node.shutdown(Duration::from_secs(1)).await;
}
