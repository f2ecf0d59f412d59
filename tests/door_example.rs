//! The door of `examples/door/forward.rs` (a whole door in under 100
//! lines, `docs/ARCHITECTURE.md`'s worked example) registered beside the
//! built-in kinds and used by curl against nginx, in process: checked,
//! started, reloaded to a new target, refused with a clear error, counted,
//! shown, stopped.

mod common;
#[path = "../examples/door/forward.rs"]
mod forward;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use configstore::MemStore;
use meshgate::core::node::Node;
use meshgate::core::spine::door::DoorFactory;
use meshgate::core::spine::module::ModuleFactory;
use serde_json::json;

fn factories() -> Vec<Arc<dyn ModuleFactory>> {
    let mut f = meshgate::modules::builtin_factories();
    f.push(Arc::new(DoorFactory::<forward::Forward>::default()));
    f
}

/// curl through the door, off the runtime's threads.
async fn curl_at(port: u16) -> (u16, String) {
    tokio::task::spawn_blocking(move || curl(&format!("http://127.0.0.1:{port}/")))
        .await
        .unwrap()
}

#[test]
fn the_example_door_is_under_100_lines() {
    let text = include_str!("../examples/door/forward.rs");
    let lines = text.lines().count();
    assert!(lines < 100, "examples/door/forward.rs has {lines} lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_example_door_to_nginx_reload_and_refusal() {
    let (Some(a), Some(b)) = (
        Nginx::start_with("", |root| {
            std::fs::write(root.join("index.html"), "nginx a\n").unwrap();
            format!("root {};", root.display())
        }),
        Nginx::start_with("", |root| {
            std::fs::write(root.join("index.html"), "nginx b\n").unwrap();
            format!("root {};", root.display())
        }),
    ) else {
        return;
    };
    if !have("curl") {
        return;
    }
    let port = free_port();
    let door = |to: std::net::SocketAddr| json!({"kind": "forward", "listen": format!("127.0.0.1:{port}"), "to": to.to_string()});
    let store = Arc::new(MemStore::new());
    store.set("acme", "front", door(a.addr));
    // The kind is checked as the built-in ones are.
    let reg = meshgate::core::node::registry(store.clone(), factories());
    assert!(reg.check().await.is_empty());
    let mut node = Node::new(store.clone(), factories(), Vec::new());
    node.start().await.unwrap();

    assert_eq!(curl_at(port).await, (200, "nginx a\n".into()));
    // A reload moves the target for new connections.
    store.set("acme", "front", door(b.addr));
    let mut moved = false;
    for _ in 0..40 {
        if curl_at(port).await == (200, "nginx b\n".into()) {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved, "the reload did not move the target");
    // A bad edit is refused naming the file and key, and every key the
    // kind takes; the running door serves on.
    store.set(
        "acme",
        "front",
        json!({"kind": "forward", "listen": format!("127.0.0.1:{port}"), "too": b.addr.to_string()}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = node.registry().status().await;
    let front = status.iter().find(|s| s.instance == "front").unwrap();
    let err = front.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("key `too`") && err.contains("`to`") && err.contains("`max_connections`"),
        "{err}"
    );
    assert_eq!(front.details["to"], b.addr.to_string());
    assert_eq!(curl_at(port).await, (200, "nginx b\n".into()));
    // Counted as every connection is.
    let text = node.registry().metrics().encode();
    assert!(
        text.contains(r#"meshgate_connections_total{tenant="acme",instance="front"}"#),
        "{text}"
    );
    node.shutdown(Duration::from_secs(1)).await;
    assert_eq!(curl_at(port).await.0, 0, "stopped: nothing listens");
}
