//! Reverse publishing over h2 and QUIC links, in process: west's link
//! asks east's door to publish a port (`forwards:`), and connections to
//! that port on east reach a service only west can reach. East's
//! `publish:` list decides who may publish which port: a port it does not
//! allow is refused (counted, shown in the link's status) and not bound.
//! Both sides audit the connection: east with west's certificate as the
//! identity, west with the east client's address as the source. When west
//! goes away, the port on east closes.

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

/// Waits up to 5 s for `pred` on an instance's status detail `key`.
async fn wait_for(
    node: &Node,
    instance: &str,
    key: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..250 {
        last = detail(node, instance, key).await;
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{instance}.{key} never got there: {last}");
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

fn rejected(node: &Node, instance: &str, reason: &str) -> f64 {
    let text = node.registry().metrics().encode();
    let series = format!(
        "meshgate_rejected_total{{tenant=\"east\",instance=\"{instance}\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// `transport`: `h2` or `quic`.
async fn publishes_over(transport: &str) {
    let pki = Pki::new();
    // West's service: east cannot reach it but through the link.
    let echo = echo_task().await;
    let (door_port, published, refused) = (free_port(), free_port(), free_port());
    let east = Arc::new(MemStore::new());
    east.set(
        "east",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}]}),
    );
    east.set(
        "east",
        "door",
        json!({"kind": transport, "listen": format!("127.0.0.1:{door_port}"), "vnet": "corp",
               "tls_cert": pki.s("server.pem"), "tls_key": pki.s("server.key"),
               "client_ca": pki.s("ca.pem"), "trust_forwarded": [GATEWAY],
               "publish": [{"identity": GATEWAY, "ports": [published]},
                           {"identity": ALICE, "ports": [refused]}]}),
    );
    let east_audit = Arc::new(Audit::default());
    let east_node = start(&east, &east_audit).await;

    let west = Arc::new(MemStore::new());
    west.set(
        "west",
        "corp",
        json!({"kind": "vnet", "routes": [{"to": "127.0.0.0/8", "via": "direct"}]}),
    );
    west.set(
        "west",
        "to-east",
        json!({"kind": format!("{transport}_link"), "server": format!("127.0.0.1:{door_port}"),
               "server_name": "gw.test", "ca": pki.s("ca.pem"),
               "tls_cert": pki.s("gateway.pem"), "tls_key": pki.s("gateway.key"),
               "vnet": "corp",
               "forwards": [{"remote_port": published, "to": echo.to_string()},
                            {"remote_port": refused, "to": echo.to_string()}]}),
    );
    let west_audit = Arc::new(Audit::default());
    let west_node = start(&west, &west_audit).await;

    // East refuses the port its list gives to another identity; the link
    // says so, and east does not listen there.
    let forwards = wait_for(&west_node, "to-east", "forwards", |f| {
        f[1]["state"].as_str().unwrap_or("").starts_with("refused")
    })
    .await;
    assert!(
        forwards[1]["state"]
            .as_str()
            .unwrap()
            .contains("403 permitlisten"),
        "{forwards}"
    );
    assert!(rejected(&east_node, "door", "permitlisten") >= 1.0);

    // The allowed port: connections on east reach west's service, more
    // at once than the link keeps parked.
    let mut clients = Vec::new();
    for i in 0..10u8 {
        clients.push(tokio::spawn(async move {
            for _ in 0..100 {
                if let Ok(r) = roundtrip(published, &[i; 100]).await {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("port {published} never answered");
        }));
    }
    let mut sources = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (got, me) = c.await.unwrap();
        assert_eq!(got, vec![i as u8; 100]);
        sources.push(me);
    }
    // The same probe on the refused port: nothing listens there.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", refused))
            .await
            .is_err(),
        "port {refused} was published although east's list refuses it"
    );
    let forwards = detail(&west_node, "to-east", "forwards").await;
    assert_eq!(forwards[0]["state"], "published", "{forwards}");
    let ports = detail(&east_node, "door", "published").await;
    assert_eq!(ports[0]["identity"], GATEWAY, "{ports}");
    assert_eq!(ports[0]["port"], published, "{ports}");

    // East audits the publisher; west audits east's client as the source.
    let r = east_audit
        .find(|r| r["requested"] == format!("published 127.0.0.1:{published}"))
        .await;
    assert_eq!(r["identity"], GATEWAY, "{r}");
    let src = sources[0].to_string();
    let r = west_audit.find(|r| r["source"] == src).await;
    assert_eq!(r["identity"], format!("{transport}-link:to-east"), "{r}");
    assert_eq!(r["dialed"], echo.to_string(), "{r}");

    // West goes away: the port on east closes with its connection.
    west_node.shutdown(Duration::from_millis(100)).await;
    let mut closed = false;
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", published))
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "port {published} stayed open after west left");
    east_node.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_link_publishes_a_port_on_the_far_node() {
    publishes_over("h2").await;
}

#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_link_publishes_a_port_on_the_far_node() {
    publishes_over("quic").await;
}
