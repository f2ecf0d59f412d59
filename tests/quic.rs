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
