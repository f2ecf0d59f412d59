//! Hostile clients cannot hold the node: silent connections to every door
//! neither delay SIGTERM past `drain_timeout` + 1 s nor hold up another
//! tenant's change when their door is removed; another tenant's traffic
//! flows throughout.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// Doors of tenant acme (SOCKS, HTTP proxy, SSH) with silent clients
/// connected to each, and tenant beta's pipe to an echo.
struct Scene {
    cfg: ConfigDir,
    mg: Meshgate,
    _silent: Vec<TcpStream>,
    beta: u16,
    ports: [u16; 3],
    _keys: tempfile::TempDir,
}

fn scene(drain: &str) -> Option<Scene> {
    if !have("ssh-keygen") {
        return None;
    }
    let keys = tempfile::tempdir().unwrap();
    let (_, alice_pub) = ssh_keygen(keys.path(), "alice");
    let cfg = ConfigDir::new();
    cfg.write(
        "meshgate.yaml",
        &format!(
            "node: test\nadmin: 127.0.0.1:{}\ndrain_timeout: {drain}\n",
            cfg.admin_port
        ),
    );
    let ports = [free_port(), free_port(), free_port()];
    cfg.write(
        "tenants/acme/socks.yaml",
        &format!(
            "kind: socks\nlisten: 127.0.0.1:{}\nhandshake_timeout: 1h\n",
            ports[0]
        ),
    );
    cfg.write(
        "tenants/acme/web.yaml",
        &format!(
            "kind: http_proxy\nlisten: 127.0.0.1:{}\nhandshake_timeout: 1h\n",
            ports[1]
        ),
    );
    cfg.write(
        "tenants/acme/door.yaml",
        &format!(
            "kind: ssh\nlisten: 127.0.0.1:{}\nhost_key_file: {}\nhandshake_timeout: 1h\nauthorized_keys:\n  - {alice_pub}\n",
            ports[2],
            keys.path().join("host_key").display()
        ),
    );
    let echo = echo_server();
    let beta = free_port();
    cfg.pipe("beta", "web", beta, echo);
    let mg = Meshgate::start(&cfg);
    // Silent clients on every door: connected, saying nothing.
    let mut silent = Vec::new();
    for port in ports {
        for _ in 0..5 {
            silent.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
    }
    // An HTTP client that sent a request and keeps its connection idle.
    {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", ports[1])).unwrap();
        s.write_all(b"GET http://192.0.2.1/ HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 256];
        let _ = s.read(&mut b);
        silent.push(s);
    }
    let s = Scene {
        cfg,
        mg,
        _silent: silent,
        beta,
        ports,
        _keys: keys,
    };
    assert!(s.beta_works());
    Some(s)
}

impl Scene {
    /// Connections acme's doors hold now (`active` in their status).
    fn held(&self) -> u64 {
        let modules = self.mg.json("/api/v1/modules?tenant=acme");
        modules
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["details"]["active"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn beta_works(&self) -> bool {
        open(self.beta).is_some()
    }
}

#[test]
fn sigterm_with_silent_clients_exits_within_the_drain_timeout() {
    let Some(mut s) = scene("1s") else { return };
    // The silent clients are there (positive control: the doors hold them).
    assert!(
        wait_until(Duration::from_secs(3), || s.held() >= 15),
        "{}",
        s.held()
    );
    assert!(s.beta_works());
    let t0 = Instant::now();
    s.mg.signal("TERM");
    let exited = wait_until(Duration::from_secs(10), || {
        s.mg.child.try_wait().unwrap().is_some()
    });
    let took = t0.elapsed();
    eprintln!("SIGTERM with 16 silent clients: exited after {took:?} (drain_timeout 1 s)");
    assert!(exited, "still running\n{}", s.mg.log_text());
    assert!(
        took < Duration::from_millis(2500),
        "took {took:?}\n{}",
        s.mg.log_text()
    );
}

#[test]
fn removing_a_door_with_silent_clients_holds_up_no_other_tenant() {
    let Some(s) = scene("30s") else { return };
    assert!(
        wait_until(Duration::from_secs(3), || s.held() >= 15),
        "{}",
        s.held()
    );
    // Remove acme's doors while their clients are silent; then change beta.
    let t0 = Instant::now();
    for name in ["socks", "web", "door"] {
        std::fs::remove_file(s.cfg.path().join(format!("tenants/acme/{name}.yaml"))).unwrap();
    }
    let echo = echo_server();
    let new_port = free_port();
    s.cfg.pipe("beta", "api", new_port, echo);
    let applied = wait_until(Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", new_port)).is_ok()
    });
    let took = t0.elapsed();
    eprintln!("beta's change applied {took:?} after acme's doors were removed");
    assert!(applied, "beta's change never applied\n{}", s.mg.log_text());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The admin API answers, and beta's traffic flowed throughout.
    assert_eq!(s.mg.http_get("/api/v1/tenants").map(|r| r.0), Some(200));
    assert!(s.beta_works());
    // acme's doors are gone: their listeners refuse.
    for port in s.ports {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still accepts"
        );
    }
}

/// A node with `tenant_max_flows: MAX` and pipes of tenants acme and beta
/// to one echo server: (config, acme's port, beta's port).
fn budget_scene(max: u64) -> (ConfigDir, u16, u16) {
    let cfg = ConfigDir::new();
    cfg.write(
        "meshgate.yaml",
        &format!(
            "node: test\nadmin: 127.0.0.1:{}\ntenant_max_flows: {max}\n",
            cfg.admin_port
        ),
    );
    let echo = echo_server();
    let (acme, beta) = (free_port(), free_port());
    cfg.pipe("acme", "web", acme, echo);
    cfg.pipe("beta", "web", beta, echo);
    (cfg, acme, beta)
}

/// A connection to an echo pipe that echoes (held open by the caller).
fn open(port: u16) -> Option<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    (echo_roundtrip(&mut s, b"x").ok()? == b"x").then_some(s)
}

/// A budget per tenant: with `tenant_max_flows: 3`, acme's fourth
/// connection is refused (counted), beta's go on, and a closed one of
/// acme's makes room.
#[test]
fn a_tenants_flow_budget_leaves_the_others_theirs() {
    let (cfg, acme, beta) = budget_scene(3);
    let mg = Meshgate::start(&cfg);
    let mut held: Vec<TcpStream> = (0..3).map(|_| open(acme).expect("within budget")).collect();
    assert!(
        open(acme).is_none(),
        "a fourth flow past tenant_max_flows: 3"
    );
    assert!(wait_until(Duration::from_secs(2), || {
        mg.metric(
        r#"meshgate_policy_decisions_total{tenant="acme",instance="web",rule="tenant_max_flows",result="deny"}"#
    ) >= 1.0
    }));
    // beta has its own budget.
    let beta_held: Vec<TcpStream> = (0..3).map(|_| open(beta).expect("beta's budget")).collect();
    // One of acme's ends: room for one more.
    drop(held.pop());
    assert!(
        wait_until(Duration::from_secs(3), || open(acme).is_some()),
        "a closed flow did not make room\n{}",
        mg.log_text()
    );
    drop(beta_held);
}

/// A tenant's own budget (`limits: max_flows` in its policy) overrides the
/// node's: acme may hold 2, beta the node's 4; lifting acme's limit by
/// editing the document takes effect without a restart.
#[test]
fn a_tenants_own_limit_overrides_the_node_default() {
    let (cfg, acme, beta) = budget_scene(4);
    cfg.write(
        "tenants/acme/policy.yaml",
        "kind: policy\nlimits:\n  max_flows: 2\n",
    );
    let mg = Meshgate::start(&cfg);
    let mut acme_held: Vec<TcpStream> = (0..2)
        .map(|_| open(acme).expect("within acme's 2"))
        .collect();
    assert!(
        open(acme).is_none(),
        "a third flow past acme's max_flows: 2"
    );
    let beta_held: Vec<TcpStream> = (0..4)
        .map(|_| open(beta).expect("beta has the node's 4"))
        .collect();
    assert!(
        open(beta).is_none(),
        "a fifth flow past tenant_max_flows: 4"
    );
    // Lift acme's limit: its third flow now opens.
    cfg.write(
        "tenants/acme/policy.yaml",
        "kind: policy\nlimits:\n  max_flows: 3\n",
    );
    assert!(
        wait_until(Duration::from_secs(5), || match open(acme) {
            Some(s) => {
                acme_held.push(s);
                true
            }
            None => false,
        }),
        "the new limit did not apply\n{}",
        mg.log_text()
    );
    drop((acme_held, beta_held));
}

/// Every door caps the clients still in their handshake, per source
/// (`per_source_max_startups`) as the SSH door does: past 3 silent
/// clients acme's SOCKS and HTTP doors close a new connection at once
/// (counted), beta's pipe works throughout, and once the silent clients
/// go the same probes get answers.
#[test]
fn silent_clients_past_the_startup_cap_are_refused_at_once() {
    use std::io::{Read, Write};
    let cfg = ConfigDir::new();
    cfg.write(
        "meshgate.yaml",
        &format!("node: test\nadmin: 127.0.0.1:{}\n", cfg.admin_port),
    );
    let (socks, web) = (free_port(), free_port());
    cfg.write(
        "tenants/acme/socks.yaml",
        &format!("kind: socks\nlisten: 127.0.0.1:{socks}\nhandshake_timeout: 1h\nper_source_max_startups: 3\n"),
    );
    cfg.write(
        "tenants/acme/web.yaml",
        &format!("kind: http_proxy\nlisten: 127.0.0.1:{web}\nhandshake_timeout: 1h\nper_source_max_startups: 3\n"),
    );
    let echo = echo_server();
    let beta = free_port();
    cfg.pipe("beta", "web", beta, echo);
    let mg = Meshgate::start(&cfg);
    let beta_works = || open(beta).is_some();
    // A SOCKS5 greeting answered, and an HTTP request answered.
    let socks_answers = || -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", socks)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut b = [0u8; 2];
        s.write_all(&[5, 1, 0]).is_ok() && s.read_exact(&mut b).is_ok() && b == [5, 0]
    };
    let http_answers = || -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", web)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut b = [0u8; 12];
        s.write_all(b"GET http://192.0.2.1/ HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n")
            .is_ok()
            && s.read_exact(&mut b).is_ok()
            && b.starts_with(b"HTTP/1.1 ")
    };
    assert!(socks_answers() && http_answers() && beta_works());
    // Three silent clients on each door, then the probes: refused.
    let mut silent = Vec::new();
    for port in [socks, web] {
        for _ in 0..3 {
            silent.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
    }
    assert!(wait_until(Duration::from_secs(3), || {
        mg.json("/api/v1/modules?tenant=acme").as_array().map(|a| {
            a.iter()
                .filter_map(|m| m["details"]["active"].as_u64())
                .sum::<u64>()
        }) == Some(6)
    }));
    let started = Instant::now();
    assert!(!socks_answers(), "a fourth SOCKS client in its handshake");
    assert!(!http_answers(), "a fourth HTTP client without a request");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not at a deadline"
    );
    for door in ["socks", "web"] {
        assert!(
            mg.metric(&format!(
                "meshgate_rejected_total{{tenant=\"acme\",instance=\"{door}\",reason=\"per_source_max_startups\"}}"
            )) >= 1.0,
            "{door}: refusal not counted"
        );
    }
    assert!(beta_works(), "another tenant's pipe");
    drop(silent);
    assert!(
        wait_until(Duration::from_secs(3), || socks_answers() && http_answers()),
        "the doors did not take clients again\n{}",
        mg.log_text()
    );
}

/// A TCP connection to `to` from the loopback address `from` (Linux
/// answers for all of 127.0.0.0/8), so one test plays several clients.
fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&std::net::SocketAddr::from((from, 0)).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

/// Whether the node closed `s` (EOF or reset) within `within`.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn hostile_admin_clients_cannot_keep_the_operator_out() {
    use std::io::{Read, Write};
    const TOKEN: &str = "hostile-test-token-0123456789";
    let cfg = ConfigDir::new();
    cfg.write(
        "meshgate.yaml",
        &format!(
            "node: test\nadmin: 127.0.0.1:{}\nadmin_token: {TOKEN}\ndrain_timeout: 1s\nlog: info\n",
            cfg.admin_port
        ),
    );
    let echo = echo_server();
    let beta = free_port();
    cfg.pipe("beta", "web", beta, echo);
    let mg = Meshgate::start(&cfg);
    let admin = mg.admin;
    let refused = |reason: &str| {
        mg.metric(&format!(
            "meshgate_admin_refused_total{{reason=\"{reason}\"}}"
        ))
    };
    let api = |from: [u8; 4], path: &str, token: Option<&str>| -> Option<u16> {
        let mut s = connect_from(from, admin).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{auth}\r\n"
        )
        .ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        String::from_utf8_lossy(&head[9..12]).parse().ok()
    };
    // The operator's call answers first (positive control).
    assert_eq!(api([127, 0, 0, 1], "/api/v1/node", Some(TOKEN)), Some(200));

    // beta's client keeps going through its pipe the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let victim = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut trips, mut failures) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match open(beta).map(|mut s| echo_roundtrip(&mut s, b"beta")) {
                    Some(Ok(b)) if b == b"beta" => trips += 1,
                    _ => failures += 1,
                }
            }
            (trips, failures)
        })
    };

    // One address opens 100 connections and says nothing: it holds 64,
    // the rest are closed at accept.
    let mut silent: Vec<TcpStream> = (0..100)
        .filter_map(|_| connect_from([127, 0, 0, 2], admin).ok())
        .collect();
    assert_eq!(silent.len(), 100);
    assert!(
        wait_until(Duration::from_secs(3), || refused("per_source") >= 36.0),
        "{}",
        mg.metrics()
    );
    assert_eq!(refused("per_source"), 36.0, "{}", mg.metrics());
    // Meanwhile the operator, from another address, is served at once,
    // and a third address without the token gets 401, counted.
    let t = Instant::now();
    assert_eq!(api([127, 0, 0, 1], "/api/v1/node", Some(TOKEN)), Some(200));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    for _ in 0..20 {
        assert_eq!(api([127, 0, 0, 3], "/api/v1/events", None), Some(401));
    }
    assert_eq!(refused("unauthorized"), 20.0, "{}", mg.metrics());
    // Live streams: 32 are served, the 33rd gets 503, counted.
    let mut streams = Vec::new();
    for _ in 0..32 {
        let mut s = connect_from([127, 0, 0, 4], admin).unwrap();
        write!(
            s,
            "GET /api/v1/events HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        streams.push(s);
    }
    assert_eq!(
        api([127, 0, 0, 4], "/api/v1/events", Some(TOKEN)),
        Some(503)
    );
    assert_eq!(refused("streams"), 1.0, "{}", mg.metrics());
    drop(streams);
    // The silent ones are closed at the header deadline (5 s), counted,
    // and their address is served again.
    let t = Instant::now();
    let all_closed = silent
        .iter_mut()
        .all(|s| closed_by_peer(s, Duration::from_secs(8)));
    assert!(
        all_closed,
        "silent clients still held after {:?}",
        t.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(2), || refused("header_timeout") >= 64.0),
        "{}",
        mg.metrics()
    );
    assert_eq!(api([127, 0, 0, 2], "/api/v1/node", Some(TOKEN)), Some(200));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (trips, failures) = victim.join().unwrap();
    eprintln!(
        "beta: {trips} round trips during the admin flood; silent clients closed after {:?}",
        t.elapsed()
    );
    assert!(trips >= 50, "beta made only {trips} round trips");
    assert_eq!(failures, 0, "beta: {failures} failed");
    // Nothing of this is a tenant's refusal.
    assert!(
        !mg.metrics()
            .lines()
            .any(|l| l.starts_with("meshgate_rejected_total")),
        "{}",
        mg.metrics()
    );
}
