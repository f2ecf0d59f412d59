//! The h2 door (HTTP/2 CONNECT over TLS 1.3, HBONE) in process, with
//! certificates made here: hyper as the client for every status and
//! refusal, the client certificate's identity and the trace context in the
//! audit record, `Forwarded` believed only from a trusted gateway, GOAWAY on
//! drain while an open tunnel carries on; then clients we did not write:
//! pycurl (libcurl with nghttp2, proxy type HTTPS2) and Node's `http2`.

mod common;

use common::free_port;
use common::hbone::*;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use configstore::MemStore;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate::core::node::Node;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/2 connection to the door at `port` with TLS `tls`.
async fn h2_connect(
    port: u16,
    tls: rustls::ClientConfig,
) -> Result<SendRequest<Empty<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("gw.test").unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One CONNECT: its status, `x-meshgate-reason`, and the tunnel if 200.
async fn connect(
    send: &mut SendRequest<Empty<Bytes>>,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        StatusCode,
        String,
        Option<TokioIo<hyper::upgrade::Upgraded>>,
    ),
    String,
> {
    let mut req = Request::builder().method(method).uri(target);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let reason = resp
        .headers()
        .get("x-meshgate-reason")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let tunnel = if status == StatusCode::OK {
        Some(TokioIo::new(hyper::upgrade::on(resp).await.unwrap()))
    } else {
        None
    };
    Ok((status, reason, tunnel))
}

async fn echo(t: &mut TokioIo<hyper::upgrade::Upgraded>, msg: &[u8]) -> Vec<u8> {
    t.write_all(msg).await.unwrap();
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut buf))
        .await
        .expect("echo timed out")
        .unwrap();
    buf
}

fn rejected(node: &Node, reason: &str) -> f64 {
    let text = node.registry().metrics().encode();
    let series = format!(
        "meshgate_rejected_total{{tenant=\"acme\",instance=\"hbone\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Waits up to 3 s for `meshgate_rejected_total{reason}` to reach `n`.
async fn rejected_at_least(node: &Node, reason: &str, n: f64) -> bool {
    for _ in 0..60 {
        if rejected(node, reason) >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn door(pki: &Pki, port: u16, more: serde_json::Value) -> serde_json::Value {
    let mut d = json!({
        "kind": "h2",
        "listen": format!("127.0.0.1:{port}"),
        "vnet": "corp",
        "tls_cert": pki.s("server.pem"),
        "tls_key": pki.s("server.key"),
        "client_ca": pki.s("ca.pem"),
        "trust_forwarded": [GATEWAY],
        "handshake_timeout": "500ms",
        "connect_timeout": "2s",
    });
    for (k, v) in more.as_object().unwrap() {
        d[k] = v.clone();
    }
    d
}

fn tenant(store: &MemStore, pki: &Pki, port: u16) {
    store.set(
        "acme",
        "corp",
        json!({"kind": "vnet", "routes": [
            {"to": "127.0.0.3", "via": "reject"},
            {"to": "127.0.0.0/8", "via": "direct"},
        ]}),
    );
    store.set(
        "acme",
        "policy",
        json!({"kind": "policy", "rules": [
            {"name": "no-mallory", "action": "deny", "identities": [MALLORY]},
        ]}),
    );
    store.set("acme", "hbone", door(pki, port, json!({})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_connects_refuses_and_audits_with_the_client_identity() {
    let pki = Pki::new();
    let echo_addr = echo_task().await;
    let closed = free_port();
    let port = free_port();
    let store = Arc::new(MemStore::new());
    tenant(&store, &pki, port);
    let audit = Arc::new(Audit::default());
    let node = start(&store, &audit).await;

    // Alice's tunnel echoes; two streams share one connection.
    let mut alice = h2_connect(port, pki.client(Some("alice"))).await.unwrap();
    let target = echo_addr.to_string();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, _, tunnel) = connect(
        &mut alice,
        Method::CONNECT,
        &target,
        &[
            ("traceparent", tp),
            ("baggage", "tenant=acme"),
            ("forwarded", "for=\"10.9.8.7:1234\""),
        ],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut tunnel = tunnel.unwrap();
    let (status, _, second) = connect(&mut alice, Method::CONNECT, &target, &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut second = second.unwrap();
    assert_eq!(echo(&mut tunnel, b"hello over h2").await, b"hello over h2");
    assert_eq!(echo(&mut second, b"second stream").await, b"second stream");
    let status = node.registry().status().await;
    let hbone = status.iter().find(|s| s.instance == "hbone").unwrap();
    assert_eq!(hbone.details["streams"], 2, "{:?}", hbone.details);
    assert_eq!(hbone.details["client_auth"], "required");
    drop(second);
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    // The record: alice's identity, her own address (she is not a trusted
    // gateway, so her Forwarded header is ignored), the trace context.
    let r = audit.find(|r| r["traceparent"] == tp).await;
    assert_eq!(r["identity"], ALICE, "{r}");
    assert_eq!(r["onramp"]["kind"], "h2", "{r}");
    assert_eq!(r["requested"], target, "{r}");
    assert_eq!(r["baggage"], "tenant=acme", "{r}");
    assert!(
        r["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    // The second stream sent none.
    let r = audit
        .find(|r| r["requested"] == target && r["traceparent"].is_null())
        .await;
    assert!(r["baggage"].is_null(), "{r}");

    // A trusted gateway's Forwarded source is the flow's source.
    let mut gw = h2_connect(port, pki.client(Some("gateway"))).await.unwrap();
    let (status, _, t) = connect(
        &mut gw,
        Method::CONNECT,
        &target,
        &[("forwarded", "for=\"10.9.8.7:1234\";proto=https")],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    drop(t);
    let r = audit.find(|r| r["identity"] == GATEWAY).await;
    assert_eq!(r["source"], "10.9.8.7:1234", "{r}");

    // Refusals, each with its status and reason.
    let cases: [(&str, Method, String, StatusCode, &str); 4] = [
        (
            "alice",
            Method::CONNECT,
            format!("127.0.0.1:{closed}"),
            StatusCode::SERVICE_UNAVAILABLE,
            "dial_refused",
        ),
        (
            "alice",
            Method::CONNECT,
            format!("127.0.0.3:{}", echo_addr.port()),
            StatusCode::FORBIDDEN,
            "rejected",
        ),
        (
            "mallory",
            Method::CONNECT,
            target.clone(),
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            "alice",
            Method::GET,
            format!("http://{target}/"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (who, method, to, want, reason) in cases {
        let mut c = h2_connect(port, pki.client(Some(who))).await.unwrap();
        let (status, got, _) = connect(&mut c, method.clone(), &to, &[]).await.unwrap();
        assert_eq!(
            (status, got.as_str()),
            (want, reason),
            "{who} {method} {to}"
        );
    }
    let r = audit.of(&target).await;
    assert_eq!(r["end"], "closed");
    let denied = audit
        .0
        .lock()
        .unwrap()
        .iter()
        .find(|r| r["identity"] == MALLORY)
        .cloned()
        .unwrap();
    assert_eq!(
        (denied["verdict"].as_str(), denied["rule"].as_str()),
        (Some("deny"), Some("no-mallory"))
    );
    assert!(rejected_at_least(&node, "bad_request", 1.0).await);

    node.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals_are_counted_and_other_tenants_flows_go_on() {
    let pki = Pki::new();
    let echo_addr = echo_task().await;
    let port = free_port();
    let strict = free_port();
    let store = Arc::new(MemStore::new());
    tenant(&store, &pki, port);
    // A door whose identities are SPIFFE IDs only.
    store.set(
        "acme",
        "strict",
        door(&pki, strict, json!({"identity_from": ["spiffe"]})),
    );
    let audit = Arc::new(Audit::default());
    let node = start(&store, &audit).await;
    let target = echo_addr.to_string();

    // An open tunnel that must keep working through everything below.
    let mut alice = h2_connect(port, pki.client(Some("alice"))).await.unwrap();
    let (status, _, t) = connect(&mut alice, Method::CONNECT, &target, &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut kept = t.unwrap();
    assert_eq!(echo(&mut kept, b"before").await, b"before");

    // No certificate, and one from another CA: the handshake fails.
    for who in [None, Some("impostor")] {
        let r = async {
            let mut c = h2_connect(port, pki.client(who)).await?;
            connect(&mut c, Method::CONNECT, &target, &[])
                .await
                .map(|_| ())
        }
        .await;
        assert!(r.is_err(), "{who:?} got through");
    }
    assert!(
        rejected_at_least(&node, "tls_handshake", 2.0).await,
        "{}",
        node.registry().metrics().encode()
    );

    // A certificate that names no identity the door takes: 401.
    let mut c = h2_connect(strict, pki.client(Some("nameless")))
        .await
        .unwrap();
    let (status, reason, _) = connect(&mut c, Method::CONNECT, &target, &[])
        .await
        .unwrap();
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::UNAUTHORIZED, "identity_required")
    );
    // The same probe with a SPIFFE ID passes.
    let mut c = h2_connect(strict, pki.client(Some("alice"))).await.unwrap();
    assert_eq!(
        connect(&mut c, Method::CONNECT, &target, &[])
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );

    // Clients that stall in the handshake: silent, and half a ClientHello.
    let mut stalled = Vec::new();
    for bytes in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(bytes).await.unwrap();
        stalled.push(s);
    }
    // Not TLS at all.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    plain
        .write_all(b"CONNECT x:1 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), plain.read_to_end(&mut sink)).await;
    for mut s in stalled {
        let mut b = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a stalled client was kept: {closed:?}"
        );
    }
    assert!(rejected_at_least(&node, "handshake_timeout", 2.0).await);
    assert!(rejected_at_least(&node, "tls_handshake", 3.0).await);
    assert_eq!(echo(&mut kept, b"after").await, b"after");

    node.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_goaway_and_the_open_tunnel_finishes() {
    let pki = Pki::new();
    let echo_addr = echo_task().await;
    let port = free_port();
    let store = Arc::new(MemStore::new());
    tenant(&store, &pki, port);
    let audit = Arc::new(Audit::default());
    let node = start(&store, &audit).await;
    let target = echo_addr.to_string();
    let mut alice = h2_connect(port, pki.client(Some("alice"))).await.unwrap();
    let (status, _, t) = connect(&mut alice, Method::CONNECT, &target, &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut open = t.unwrap();
    // The same probe as after the drain, first while it is up.
    let (status, _, t) = connect(&mut alice, Method::CONNECT, &target, &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    drop(t);

    let shutdown = tokio::spawn(node.shutdown(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // GOAWAY: a new stream on the connection is refused by the client's
    // own stack; the open tunnel still carries bytes.
    let r = connect(&mut alice, Method::CONNECT, &target, &[]).await;
    assert!(
        r.is_err(),
        "a new stream after GOAWAY: {:?}",
        r.map(|r| r.0)
    );
    assert_eq!(echo(&mut open, b"still here").await, b"still here");
    // And nothing new is accepted.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    open.shutdown().await.unwrap();
    drop(open);
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the drain waited past its open tunnel's end")
        .unwrap();
}

const NODE: &str = r#"
const http2 = require('http2'), fs = require('fs');
const [door, target, ca, cert, key] = process.argv.slice(1);
const s = http2.connect('https://localhost:' + door, { ca: fs.readFileSync(ca),
  cert: fs.readFileSync(cert), key: fs.readFileSync(key), servername: 'gw.test', minVersion: 'TLSv1.3' });
s.on('error', e => { console.log('error', e.code); process.exit(0); });
const req = s.request({ ':method': 'CONNECT', ':authority': target });
let body = '';
req.on('response', h => {
  console.log('status', h[':status'], h['x-meshgate-reason'] || '');
  if (h[':status'] != 200) { req.close(); s.close(); return; }
  req.write('GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n');
});
req.on('data', d => body += d);
req.on('end', () => { console.log(body); req.end(); s.close(); });
req.on('error', e => { console.log('error', e.code); s.close(); });
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pycurl_and_node_fetch_nginx_through_the_door() {
    let Some(nginx) = common::Nginx::start() else {
        return;
    };
    let pydeps = pycurl_path();
    let node_js = common::have("node");
    if !node_js {
        common::skip("node (Debian: nodejs)");
    }
    let pki = Pki::new();
    let port = free_port();
    let store = Arc::new(MemStore::new());
    tenant(&store, &pki, port);
    let audit = Arc::new(Audit::default());
    let node = start(&store, &audit).await;
    let web = nginx.addr.to_string();
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    if let Some(deps) = pydeps {
        let pycurl = |who: &'static str, target: String| {
            let (deps, pki_ca, cert, key) = (
                deps.clone(),
                pki.s("ca.pem"),
                pki.s(&format!("{who}.pem")),
                pki.s(&format!("{who}.key")),
            );
            tokio::task::spawn_blocking(move || {
                let out = run(std::process::Command::new("python3")
                    .args([
                        "-c",
                        PYCURL,
                        &port.to_string(),
                        &target,
                        &pki_ca,
                        &cert,
                        &key,
                        tp,
                    ])
                    .env("PYTHONPATH", deps));
                // What curl printed (its verbose log) after what it fetched.
                format!(
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        let out = pycurl("alice", web.clone()).await.unwrap();
        assert!(
            out.starts_with("status 200") && out.contains("hello from nginx"),
            "{out}"
        );
        let r = audit.of(&web).await;
        assert_eq!(
            (
                r["identity"].as_str(),
                r["traceparent"].as_str(),
                r["baggage"].as_str()
            ),
            (Some(ALICE), Some(tp), Some("client=pycurl")),
            "{r}"
        );
        // A policy deny: curl reports the proxy's 403.
        let out = pycurl("mallory", web.clone()).await.unwrap();
        assert!(out.contains("403"), "{out}");
        // A certificate from another CA: the TLS handshake fails.
        let out = pycurl("impostor", web.clone()).await.unwrap();
        assert!(out.starts_with("error"), "{out}");
        assert!(!out.contains("hello from nginx"), "{out}");
    }
    if node_js {
        let js = |who: &'static str, target: String| {
            let (pki_ca, cert, key) = (
                pki.s("ca.pem"),
                pki.s(&format!("{who}.pem")),
                pki.s(&format!("{who}.key")),
            );
            tokio::task::spawn_blocking(move || {
                let out = run(std::process::Command::new("node").args([
                    "-e",
                    NODE,
                    "--",
                    &port.to_string(),
                    &target,
                    &pki_ca,
                    &cert,
                    &key,
                ]));
                String::from_utf8_lossy(&out.stdout).to_string()
            })
        };
        let out = js("alice", web.clone()).await.unwrap();
        assert!(
            out.starts_with("status 200") && out.contains("hello from nginx"),
            "{out}"
        );
        let out = js("mallory", web.clone()).await.unwrap();
        assert!(out.starts_with("status 403 denied"), "{out}");
        let out = js("alice", "127.0.0.3:80".into()).await.unwrap();
        assert!(out.starts_with("status 403 rejected"), "{out}");
    }
    node.shutdown(Duration::from_millis(100)).await;
}

/// Two nodes in one process: west's pipe goes `via:` an h2 link to east's
/// h2 door, which dials a service only it is told of (a name in its
/// vnet's `hosts:`). East audits the pipe's client as the source (west's
/// certificate is trusted to say it) and the link's identity; a refusal
/// on the far side comes back as the flow's end; when east restarts the
/// link is back within 2 s of east listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_link_carries_a_pipe_to_the_far_node_and_reconnects() {
    let pki = Pki::new();
    let echo_addr = echo_task().await;
    let (door_port, pipe_port, denied_port) = (free_port(), free_port(), free_port());
    let east = Arc::new(MemStore::new());
    east.set(
        "east",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}],
               "hosts": {"echo.east": echo_addr.ip().to_string()}}),
    );
    east.set(
        "east",
        "policy",
        json!({"kind": "policy", "rules": [
            {"name": "not-7", "action": "deny", "to": ["127.0.0.7"]},
        ]}),
    );
    east.set("east", "hbone", door(&pki, door_port, json!({})));
    let east_audit = Arc::new(Audit::default());
    let east_node = start(&east, &east_audit).await;

    let west = Arc::new(MemStore::new());
    west.set(
        "west",
        "to-east",
        json!({"kind": "h2_link", "server": format!("127.0.0.1:{door_port}"), "server_name": "gw.test",
               "ca": pki.s("ca.pem"), "tls_cert": pki.s("gateway.pem"), "tls_key": pki.s("gateway.key")}),
    );
    west.set(
        "west",
        "echo",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{pipe_port}"),
               "remote": format!("echo.east:{}", echo_addr.port()), "via": "to-east"}),
    );
    west.set(
        "west",
        "seven",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{denied_port}"),
               "remote": format!("127.0.0.7:{}", echo_addr.port()), "via": "to-east"}),
    );
    let west_audit = Arc::new(Audit::default());
    let west_node = start(&west, &west_audit).await;

    let link_up = async |node: &Node| {
        for _ in 0..100 {
            let st = node.registry().status().await;
            if st
                .iter()
                .any(|s| s.instance == "to-east" && s.details["connected"] == true)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(link_up(&west_node).await, "the link never came up");
    let roundtrip = async |msg: &[u8]| -> std::io::Result<Vec<u8>> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", pipe_port)).await?;
        s.write_all(msg).await?;
        let mut buf = vec![0; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        Ok(buf)
    };
    let client = tokio::net::TcpStream::connect(("127.0.0.1", pipe_port))
        .await
        .unwrap();
    let client_addr = client.local_addr().unwrap();
    let mut client = client;
    client.write_all(b"west to east").await.unwrap();
    let mut buf = [0u8; 12];
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"west to east");
    drop(client);
    // East saw west's client, through west's certificate.
    let r = east_audit
        .find(|r| r["requested"] == format!("echo.east:{}", echo_addr.port()))
        .await;
    assert_eq!(r["source"], client_addr.to_string(), "{r}");
    assert_eq!(r["identity"], GATEWAY, "{r}");
    assert_eq!(r["dialed"], echo_addr.to_string(), "{r}");
    let st = west_node.registry().status().await;
    let link = st.iter().find(|s| s.instance == "to-east").unwrap();
    assert_eq!(link.details["transport"], "h2", "{:?}", link.details);

    // East's policy refuses 127.0.0.7: west's flow ends, and says why.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", denied_port))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    assert!(sink.is_empty());
    let r = west_audit
        .find(|r| r["onramp"]["instance"] == "seven")
        .await;
    assert_eq!(r["end"], "dial_no_route", "{r}");
    let r = east_audit.find(|r| r["verdict"] == "deny").await;
    assert_eq!(r["rule"], "not-7", "{r}");

    // East goes away: west's dials fail at once, as `no_route`.
    east_node.shutdown(Duration::from_millis(100)).await;
    let mut down = false;
    for _ in 0..100 {
        let st = west_node.registry().status().await;
        if st
            .iter()
            .any(|s| s.instance == "to-east" && s.details["connected"] == false)
        {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(down, "the link still says connected");
    assert!(roundtrip(b"x").await.is_err());
    // East back on the same port: the link is back within 2 s of it listening.
    let east_node = start(&east, &east_audit).await;
    let back = std::time::Instant::now();
    assert!(link_up(&west_node).await, "the link did not come back");
    let took = back.elapsed();
    assert!(took < Duration::from_secs(2), "the link took {took:?}");
    eprintln!("h2 link back {took:?} after the door listened again");
    assert_eq!(roundtrip(b"again").await.unwrap(), b"again");

    west_node.shutdown(Duration::from_millis(100)).await;
    east_node.shutdown(Duration::from_millis(100)).await;
}

/// An HTTP/2 client that writes frames by hand: for requests no
/// well-behaved client sends.
struct RawH2 {
    io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

/// A frame read back: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_HEADERS: u8 = 4;

/// HPACK: a literal header field without indexing, new name (RFC 7541
/// 6.2.2), lengths as 7-bit prefixed integers.
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    fn int(out: &mut Vec<u8>, mut n: usize) {
        if n < 127 {
            out.push(n as u8);
            return;
        }
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }
    let mut out = Vec::new();
    for (k, v) in headers {
        out.push(0);
        int(&mut out, k.len());
        out.extend_from_slice(k.as_bytes());
        int(&mut out, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

impl RawH2 {
    async fn connect(port: u16, tls: rustls::ClientConfig) -> RawH2 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut io = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from("gw.test").unwrap(), tcp)
            .await
            .unwrap();
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut raw = RawH2 { io };
        raw.frame(SETTINGS, 0, 0, &[]).await;
        // The door's SETTINGS, acknowledged, so its limits are in force.
        let s = raw.until(|f| f.0 == SETTINGS && f.1 & 1 == 0).await;
        assert!(s.is_some(), "no SETTINGS from the door");
        raw.frame(SETTINGS, 1, 0, &[]).await;
        raw
    }

    async fn frame(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        // The door may already have closed: a write error is an answer too.
        let _ = self.io.write_all(&f).await;
    }

    async fn read(&mut self) -> Option<Frame> {
        let mut h = [0u8; 9];
        self.io.read_exact(&mut h).await.ok()?;
        let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
        let mut p = vec![0; len];
        self.io.read_exact(&mut p).await.ok()?;
        Some((
            h[3],
            h[4],
            u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
            p,
        ))
    }

    /// Frames until one `pred` accepts (`Some`), or the connection ends
    /// or 5 s pass (`None`).
    async fn until(&mut self, pred: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let f = tokio::time::timeout_at(deadline, self.read())
                .await
                .ok()??;
            if pred(&f) {
                return Some(f);
            }
        }
    }
}

fn code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(payload[at..at + 4].try_into().unwrap())
}

/// Requests no client should send, each answered with HTTP/2's own error
/// and none costing more than its budget, while another client's tunnel
/// keeps carrying bytes and another tenant's pipe its round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http2_gets_the_protocol_s_errors_and_others_flow_on() {
    let pki = Pki::new();
    let echo_addr = echo_task().await;
    let (port, narrow) = (free_port(), free_port());
    let store = Arc::new(MemStore::new());
    tenant(&store, &pki, port);
    store.set(
        "acme",
        "narrow",
        door(&pki, narrow, json!({"max_streams": 2})),
    );
    let other_port = free_port();
    store.set(
        "other",
        "echo",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{other_port}"), "remote": echo_addr.to_string()}),
    );
    let audit = Arc::new(Audit::default());
    let node = start(&store, &audit).await;
    let target = echo_addr.to_string();
    // Another tenant's traffic on the same node, all along.
    let bystander = Bystander::start(other_port);

    let mut alice = h2_connect(port, pki.client(Some("alice"))).await.unwrap();
    let (status, _, t) = connect(&mut alice, Method::CONNECT, &target, &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut kept = t.unwrap();

    // The probe the refusals below vary: a well-formed CONNECT by hand
    // gets its 200 (a HEADERS frame back on stream 1).
    let mut raw = RawH2::connect(port, pki.client(Some("alice"))).await;
    let ok = hpack(&[(":method", "CONNECT"), (":authority", &target)]);
    raw.frame(HEADERS, END_HEADERS, 1, &ok).await;
    let f = raw
        .until(|f| f.2 == 1 && (f.0 == HEADERS || f.0 == RST_STREAM))
        .await;
    assert_eq!(f.map(|f| f.0), Some(HEADERS));

    // CONNECT without an authority: refused as a bad request (400; or a
    // reset as a protocol error, RST_STREAM PROTOCOL_ERROR = 1).
    raw.frame(HEADERS, END_HEADERS, 3, &hpack(&[(":method", "CONNECT")]))
        .await;
    let f = raw
        .until(|f| f.2 == 3 || f.0 == GOAWAY)
        .await
        .expect("no answer");
    match f.0 {
        HEADERS => assert!(rejected_at_least(&node, "bad_request", 1.0).await),
        _ => assert_eq!((f.0, code(&f.3, 0)), (RST_STREAM, 1), "{f:?}"),
    }

    // Headers past max_header_list (64 KiB): refused (431 or a reset).
    let big = "x".repeat(70 * 1024);
    raw.frame(
        HEADERS,
        END_HEADERS,
        5,
        &hpack(&[
            (":method", "CONNECT"),
            (":authority", &target),
            ("x-big", &big),
        ]),
    )
    .await;
    let f = raw.until(|f| f.2 == 5 || f.0 == GOAWAY).await;
    assert!(
        matches!(f, Some((HEADERS | RST_STREAM | GOAWAY, ..)) | None),
        "{f:?}"
    );
    drop(raw);

    // More streams than max_streams (2): the third is refused
    // (RST_STREAM REFUSED_STREAM = 7) while the first two stay open.
    let mut raw = RawH2::connect(narrow, pki.client(Some("alice"))).await;
    for id in [1, 3, 5] {
        raw.frame(HEADERS, END_HEADERS, id, &ok).await;
    }
    let f = raw.until(|f| f.2 == 5).await.expect("stream 5 unanswered");
    assert_eq!((f.0, code(&f.3, 0)), (RST_STREAM, 7), "{f:?}");
    drop(raw);

    // Rapid reset (CVE-2023-44487): streams opened and reset at once are
    // bounded; the door ends the connection with GOAWAY
    // (ENHANCE_YOUR_CALM = 11) rather than dialing for each.
    let mut raw = RawH2::connect(port, pki.client(Some("alice"))).await;
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        raw.frame(HEADERS, END_HEADERS, id, &ok).await;
        raw.frame(RST_STREAM, 0, id, &8u32.to_be_bytes()).await;
    }
    let f = raw.until(|f| f.0 == GOAWAY).await;
    match f {
        Some(f) => assert_eq!(code(&f.3, 4), 11, "{f:?}"),
        None => panic!("2000 reset streams and no GOAWAY"),
    }
    drop(raw);

    // Garbage after the preface: GOAWAY and the connection ends.
    let mut raw = RawH2::connect(port, pki.client(Some("alice"))).await;
    let _ = raw.io.write_all(&[0xff; 64]).await;
    let f = raw.until(|f| f.0 == GOAWAY).await;
    assert!(
        f.is_some_and(|f| code(&f.3, 4) != 0),
        "garbage without a GOAWAY error"
    );

    // Alice's tunnel carried on through all of it.
    assert_eq!(echo(&mut kept, b"still flowing").await, b"still flowing");
    let st = node.registry().status().await;
    let hbone = st.iter().find(|s| s.instance == "hbone").unwrap();
    assert!(
        hbone.details["streams"].as_u64().unwrap() <= 2,
        "{:?}",
        hbone.details
    );
    bystander.check(1).await;
    node.shutdown(Duration::from_millis(100)).await;
}
