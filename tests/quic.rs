//! QUIC (feature `quic`) in process: west's pipe goes `via:` a quic_link
//! to east's quic door, which dials a service only it is told of. East
//! audits the pipe's client (west's certificate is trusted to say it) and
//! the link's identity; a refusal there is the flow's end here; a client
//! without a certificate is refused in the handshake; when east restarts,
//! the link is back within 2 s of east listening.
#![cfg(feature = "quic")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::free_port;
use common::hbone::*;
use configstore::MemStore;
use meshgate::core::node::Node;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn detail(node: &Node, instance: &str, key: &str) -> serde_json::Value {
    let st = node.registry().status().await;
    st.iter()
        .find(|s| s.instance == instance)
        .map(|s| s.details[key].clone())
        .unwrap_or_default()
}

async fn wait_for(node: &Node, instance: &str, key: &str, want: serde_json::Value) -> bool {
    for _ in 0..150 {
        if detail(node, instance, key).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn roundtrip(port: u16, msg: &[u8]) -> std::io::Result<(Vec<u8>, std::net::SocketAddr)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let me = s.local_addr()?;
    s.write_all(msg).await?;
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok((buf, me))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_link_carries_pipes_to_the_far_node_and_reconnects() {
    let pki = Pki::new();
    let echo = echo_task().await;
    let (door_port, pipe_port, seven_port) = (free_port(), free_port(), free_port());
    let east = Arc::new(MemStore::new());
    east.set(
        "east",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}],
               "hosts": {"echo.east": echo.ip().to_string()}}),
    );
    east.set(
        "east",
        "policy",
        json!({"kind": "policy", "rules": [{"name": "not-7", "action": "deny", "to": ["127.0.0.7"]}]}),
    );
    east.set(
        "east",
        "door",
        json!({"kind": "quic", "listen": format!("127.0.0.1:{door_port}"), "vnet": "corp",
               "tls_cert": pki.s("server.pem"), "tls_key": pki.s("server.key"),
               "client_ca": pki.s("ca.pem"), "trust_forwarded": [GATEWAY],
               "handshake_timeout": "1s"}),
    );
    let east_audit = Arc::new(Audit::default());
    let east_node = start(&east, &east_audit).await;

    let west = Arc::new(MemStore::new());
    let link = |cert: &str| {
        json!({"kind": "quic_link", "server": format!("127.0.0.1:{door_port}"), "server_name": "gw.test",
               "ca": pki.s("ca.pem"), "tls_cert": pki.s(&format!("{cert}.pem")),
               "tls_key": pki.s(&format!("{cert}.key")), "connect_timeout": "2s"})
    };
    west.set("west", "to-east", link("gateway"));
    west.set(
        "west",
        "echo",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{pipe_port}"),
               "remote": format!("echo.east:{}", echo.port()), "via": "to-east"}),
    );
    west.set(
        "west",
        "seven",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{seven_port}"),
               "remote": format!("127.0.0.7:{}", echo.port()), "via": "to-east"}),
    );
    let west_audit = Arc::new(Audit::default());
    let west_node = start(&west, &west_audit).await;
    assert!(
        wait_for(&west_node, "to-east", "connected", json!(true)).await,
        "the link never came up: {}",
        detail(&west_node, "to-east", "last_error").await
    );

    let (back, me) = roundtrip(pipe_port, b"west to east over quic")
        .await
        .unwrap();
    assert_eq!(back, b"west to east over quic");
    let r = east_audit
        .find(|r| r["requested"] == format!("echo.east:{}", echo.port()))
        .await;
    assert_eq!(r["source"], me.to_string(), "{r}");
    assert_eq!(r["identity"], GATEWAY, "{r}");
    assert_eq!(r["onramp"]["kind"], "quic", "{r}");
    assert!(detail(&west_node, "to-east", "rtt_ms").await.is_number());

    // Many flows at once on the one connection.
    let many: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move { roundtrip(pipe_port, format!("flow {i}").as_bytes()).await })
        })
        .collect();
    for (i, t) in many.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap().0, format!("flow {i}").as_bytes());
    }

    // East's policy refuses 127.0.0.7: west's flow ends as no_route.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", seven_port))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    let r = west_audit
        .find(|r| r["onramp"]["instance"] == "seven")
        .await;
    assert_eq!(r["end"], "dial_no_route", "{r}");
    assert_eq!(
        east_audit.find(|r| r["verdict"] == "deny").await["rule"],
        "not-7"
    );

    // A link whose certificate is from another CA never comes up, and
    // east counts the failed handshakes.
    west.set("west", "to-east", link("impostor"));
    assert!(wait_for(&west_node, "to-east", "connected", json!(false)).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        detail(&west_node, "to-east", "connected").await,
        json!(false)
    );
    assert!(roundtrip(pipe_port, b"x").await.is_err());
    let metrics = east_node.registry().metrics().encode();
    assert!(
        metrics.contains(
            "meshgate_rejected_total{tenant=\"east\",instance=\"door\",reason=\"tls_handshake\"}"
        ),
        "{metrics}"
    );
    west.set("west", "to-east", link("gateway"));
    assert!(wait_for(&west_node, "to-east", "connected", json!(true)).await);

    // East restarts: the link is back within 2 s of east listening.
    east_node.shutdown(Duration::from_millis(100)).await;
    assert!(
        wait_for(&west_node, "to-east", "connected", json!(false)).await,
        "still connected"
    );
    assert!(roundtrip(pipe_port, b"x").await.is_err());
    let east_node = start(&east, &east_audit).await;
    let since = std::time::Instant::now();
    assert!(wait_for(&west_node, "to-east", "connected", json!(true)).await);
    let took = since.elapsed();
    eprintln!("quic link back {took:?} after the door listened again");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(roundtrip(pipe_port, b"again").await.unwrap().0, b"again");
    // The link's metrics say the same.
    let m = west_node.registry().metrics().encode();
    let series = |name: &str| {
        let key = format!(
            "meshgate_link_{name}{{tenant=\"west\",instance=\"to-east\",transport=\"quic\"}} "
        );
        m.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {key} in\n{m}"))
    };
    assert_eq!(series("up"), 1.0);
    assert!(series("reconnects_total") >= 2.0);
    assert!(series("flows_total") >= 22.0);
    assert!(series("rtt_microseconds") > 0.0);

    west_node.shutdown(Duration::from_millis(100)).await;
    east_node.shutdown(Duration::from_millis(100)).await;
}

/// A UDP echo server on loopback: each datagram back to its sender.
async fn udp_echo() -> std::net::SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// UDP flows over a quic_link: west's UDP pipe reaches a UDP service only
/// east knows of, as a UDP flow on east with the link's identity. Small
/// datagrams travel as QUIC DATAGRAM frames; one larger than the path
/// takes goes as a capsule on the flow's stream, whole. East's policy
/// refuses a target: nothing comes back, and east audits the denial. A
/// second tenant's UDP pipe on east keeps working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_link_carries_udp_flows_as_datagrams() {
    let pki = Pki::new();
    let echo = udp_echo().await;
    let (door_port, pipe_port, seven_port, other_port) =
        (free_port(), free_port(), free_port(), free_port());
    let east = Arc::new(MemStore::new());
    east.set(
        "east",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}],
               "hosts": {"echo.east": echo.ip().to_string()}}),
    );
    east.set(
        "east",
        "policy",
        json!({"kind": "policy", "rules": [{"name": "not-7", "action": "deny", "to": ["127.0.0.7"]}]}),
    );
    east.set(
        "east",
        "door",
        json!({"kind": "quic", "listen": format!("127.0.0.1:{door_port}"), "vnet": "corp",
               "tls_cert": pki.s("server.pem"), "tls_key": pki.s("server.key"),
               "client_ca": pki.s("ca.pem")}),
    );
    east.set(
        "other",
        "udp",
        json!({"kind": "pipe", "protocol": "udp", "listen": format!("127.0.0.1:{other_port}"),
               "remote": echo.to_string()}),
    );
    let east_audit = Arc::new(Audit::default());
    let east_node = start(&east, &east_audit).await;

    let west = Arc::new(MemStore::new());
    west.set(
        "west",
        "to-east",
        json!({"kind": "quic_link", "server": format!("127.0.0.1:{door_port}"), "server_name": "gw.test",
               "ca": pki.s("ca.pem"), "tls_cert": pki.s("gateway.pem"), "tls_key": pki.s("gateway.key")}),
    );
    west.set(
        "west",
        "dns",
        json!({"kind": "pipe", "protocol": "udp", "listen": format!("127.0.0.1:{pipe_port}"),
               "remote": echo.to_string(), "via": "to-east"}),
    );
    west.set(
        "west",
        "seven",
        json!({"kind": "pipe", "protocol": "udp", "listen": format!("127.0.0.1:{seven_port}"),
               "remote": format!("127.0.0.7:{}", echo.port()), "via": "to-east"}),
    );
    let west_audit = Arc::new(Audit::default());
    let west_node = start(&west, &west_audit).await;
    assert!(wait_for(&west_node, "to-east", "connected", json!(true)).await);

    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = async |port: u16, msg: &[u8]| -> Option<Vec<u8>> {
        client.send_to(msg, ("127.0.0.1", port)).await.unwrap();
        let mut buf = vec![0u8; 65_536];
        match tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    };
    for i in 0..20u8 {
        let msg = vec![i; 100];
        assert_eq!(
            ask(pipe_port, &msg).await.as_deref(),
            Some(&msg[..]),
            "datagram {i}"
        );
    }
    // They went as QUIC DATAGRAM frames, both ways.
    for key in ["datagrams_sent", "datagrams_received"] {
        let n = detail(&west_node, "to-east", key).await;
        assert!(n.as_u64() >= Some(20), "{key}: {n}");
    }
    // Larger than any QUIC datagram the path takes: a capsule, whole.
    let big: Vec<u8> = (0..8000u32).map(|i| i as u8).collect();
    assert_eq!(ask(pipe_port, &big).await.as_deref(), Some(&big[..]));
    // The other tenant's UDP on east answers meanwhile.
    assert_eq!(
        ask(other_port, b"other").await.as_deref(),
        Some(&b"other"[..])
    );

    // The same probe to a target east's policy denies: no answer.
    assert_eq!(ask(seven_port, b"seven").await, None);
    let r = east_audit.find(|r| r["verdict"] == "deny").await;
    assert_eq!(r["rule"], "not-7", "{r}");
    assert_eq!(r["protocol"], "udp", "{r}");

    // West goes away: east's UDP flow ends with its stream, and east
    // audits it with the link's identity.
    west_node.shutdown(Duration::from_millis(100)).await;
    let r = east_audit
        .find(|r| {
            r["protocol"] == "udp" && r["requested"] == echo.to_string() && r["identity"] == GATEWAY
        })
        .await;
    assert_eq!(r["onramp"]["kind"], "quic", "{r}");
    assert_eq!(r["dialed"], echo.to_string(), "{r}");
    assert!(r["bytes_up"].as_u64() >= Some(2000 + 8000), "{r}");
    east_node.shutdown(Duration::from_millis(100)).await;
}

/// A quinn client for the door at `port`, with `who`'s certificate.
async fn quic_client(pki: &Pki, who: &str, port: u16) -> quinn::Connection {
    let mut tls = pki.client(Some(who));
    tls.alpn_protocols = vec![meshgate::modules::quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep.connect(([127, 0, 0, 1], port).into(), "gw.test")
        .unwrap()
        .await
        .unwrap()
}

/// A UDP relay in front of `port` that passes each client's first
/// datagram (its Initial, with the ClientHello) and nothing after: the
/// handshake stalls half-way. Everything from the door goes back.
async fn stalling_relay(port: u16) -> u16 {
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let relay_port = front.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        let mut buf = vec![0u8; 2048];
        while let Ok((n, client)) = front.recv_from(&mut buf).await {
            if !seen.insert(client) {
                continue;
            }
            let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            up.send_to(&buf[..n], ("127.0.0.1", port)).await.unwrap();
            let front = front.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok(n) = up.recv(&mut buf).await {
                    let _ = front.send_to(&buf[..n], client).await;
                }
            });
        }
    });
    relay_port
}

fn rejected(node: &Node, reason: &str) -> f64 {
    let text = node.registry().metrics().encode();
    let series = format!(
        "meshgate_rejected_total{{tenant=\"east\",instance=\"door\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Hostile clients of a QUIC door, while another tenant's pipe on the same
/// node carries traffic throughout: garbage datagrams at the port,
/// handshakes that stall after the ClientHello (cut at `handshake_timeout`,
/// and past `max_startups` refused), a client that opens every stream it
/// may and sends no head (its streams reset at `handshake_timeout`, and it
/// cannot open more than `max_streams` meanwhile; the credit comes back
/// once it gives the streams up), heads that are garbage
/// or too long (`400`), and datagrams for flows that do not exist or are
/// not flows at all (dropped). The door answers a well-behaved client
/// after all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_quic_clients_are_bounded_and_others_flow_on() {
    let pki = Pki::new();
    let echo = echo_task().await;
    let (door_port, other_port) = (free_port(), free_port());
    let east = Arc::new(MemStore::new());
    east.set(
        "east",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}]}),
    );
    east.set(
        "east",
        "door",
        json!({"kind": "quic", "listen": format!("127.0.0.1:{door_port}"), "vnet": "corp",
               "tls_cert": pki.s("server.pem"), "tls_key": pki.s("server.key"),
               "client_ca": pki.s("ca.pem"), "handshake_timeout": "500ms",
               "max_startups": "3", "max_streams": 8}),
    );
    east.set(
        "other",
        "echo",
        json!({"kind": "pipe", "listen": format!("127.0.0.1:{other_port}"), "remote": echo.to_string()}),
    );
    let audit = Arc::new(Audit::default());
    let node = start(&east, &audit).await;

    // The other tenant's traffic, all along.
    let bystander = Bystander::start(other_port);

    // Garbage at the port.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u32 {
        let len = 1 + (i as usize * 7919) % 1400;
        let bytes: Vec<u8> = (0..len).map(|j| (i as usize * 31 + j * 17) as u8).collect();
        junk.send_to(&bytes, ("127.0.0.1", door_port))
            .await
            .unwrap();
    }

    // Handshakes that stall after the ClientHello: cut at handshake_timeout;
    // past max_startups (3) at once, refused.
    let relay = stalling_relay(door_port).await;
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut tls = pki.client(Some("alice"));
        tls.alpn_protocols = vec![meshgate::modules::quic::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = ep
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                ([127, 0, 0, 1], relay).into(),
                "gw.test",
            )
            .unwrap();
        stalled.push((ep, tokio::spawn(async move { connecting.await.is_ok() })));
    }
    let mut cut = false;
    for _ in 0..60 {
        if rejected(&node, "handshake_timeout") >= 1.0 && rejected(&node, "max_startups") >= 1.0 {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cut,
        "handshake_timeout {}, max_startups {}",
        rejected(&node, "handshake_timeout"),
        rejected(&node, "max_startups")
    );

    // A client that opens every stream it may and sends no head.
    let greedy = quic_client(&pki, "alice", door_port).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let (mut send, recv) = greedy.open_bi().await.unwrap();
        // A stream is announced by its first frame.
        send.write_all(b"C").await.unwrap();
        held.push((send, recv));
    }
    // The ninth waits for credit.
    let ninth = tokio::time::timeout(Duration::from_millis(200), greedy.open_bi()).await;
    assert!(ninth.is_err(), "a ninth stream opened past max_streams");
    let before = rejected(&node, "handshake_timeout");
    // At handshake_timeout the door resets them (counted), and credit
    // comes back.
    for (_, recv) in held.iter_mut() {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(3), recv.read(&mut b)).await;
        assert!(matches!(r, Ok(Err(_)) | Ok(Ok(None))), "{r:?}");
    }
    assert!(rejected(&node, "handshake_timeout") >= before + 8.0);
    // The door also stopped reading them; a client that gives its halves up
    // (quinn resets a stopped stream when it is dropped) gets the credit
    // back. One that holds them holds only its own connection's credit.
    drop(held);
    let (mut send, _recv) = tokio::time::timeout(Duration::from_secs(2), greedy.open_bi())
        .await
        .expect("no credit came back")
        .unwrap();
    send.write_all(b"x").await.unwrap();

    // Heads that are garbage, or longer than 16 KiB: 400.
    for head in [
        b"\x00\x01\x02 garbage\r\n\r\n".to_vec(),
        b"CONNECT\r\n\r\n".to_vec(),
        vec![b'a'; 17 * 1024],
    ] {
        let (mut send, mut recv) = greedy.open_bi().await.unwrap();
        let _ = send.write_all(&head).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut b = [0u8; 256];
            while let Ok(Some(n)) = recv.read(&mut b).await {
                answer.extend_from_slice(&b[..n]);
            }
        })
        .await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    }

    // Datagrams for no flow, for another context, and not even a varint.
    for d in [&b"\x3f\x00data"[..], b"\x00\x05data", b"", b"\xff"] {
        let _ = greedy.send_datagram(bytes::Bytes::copy_from_slice(d));
    }

    // After all that, a well-behaved client tunnels.
    let good = quic_client(&pki, "alice", door_port).await;
    let (mut send, mut recv) = good.open_bi().await.unwrap();
    send.write_all(format!("CONNECT {echo} HTTP/1.1\r\n\r\nhello").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.ends_with(b"hello") {
        let n = tokio::time::timeout(Duration::from_secs(3), recv.read(&mut b))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.extend_from_slice(&b[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    bystander.check(10).await;
    drop(stalled);
    node.shutdown(Duration::from_millis(100)).await;
}
