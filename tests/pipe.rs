//! End-to-end tests of pipes with the real `meshgate` binary on loopback,
//! real clients (curl, promtool) and a real upstream (nginx). No root.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

fn active(m: &Meshgate, tenant: &str, instance: &str) -> f64 {
    m.metric(&format!(
        r#"meshgate_connections_active{{tenant="{tenant}",instance="{instance}"}}"#
    ))
}

#[test]
fn curl_through_pipe_to_nginx_and_200_concurrent() {
    let Some(nginx) = Nginx::start() else { return };
    if !have("curl") {
        return;
    }
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.pipe("default", "web", port, nginx.addr);
    let mg = Meshgate::start(&cfg);
    let url = format!("http://127.0.0.1:{port}/index.html");

    let (status, body) = curl(&url);
    assert_eq!(status, 200);
    assert_eq!(body, "<h1>hello from nginx behind meshgate</h1>\n");
    assert!(wait_until(Duration::from_secs(5), || active(
        &mg, "default", "web"
    ) == 0.0));
    let baseline_fds = mg.fd_count();

    // 200 transfers at once from one curl (--parallel), each on its own connection.
    let mut args: Vec<String> = vec![
        "-s".into(),
        "--parallel".into(),
        "--parallel-immediate".into(),
        "--parallel-max".into(),
        "200".into(),
        "--max-time".into(),
        "30".into(),
        "-w".into(),
        "%{http_code}\n".into(),
        "-H".into(),
        "Connection: close".into(),
    ];
    for _ in 0..200 {
        args.push("-o".into());
        args.push("/dev/null".into());
        args.push(url.clone());
    }
    let out = Command::new("curl").args(&args).output().unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    let ok = codes.lines().filter(|l| *l == "200").count();
    assert_eq!(ok, 200, "curl statuses: {codes}");

    let total = mg.metric(r#"meshgate_connections_total{tenant="default",instance="web"}"#);
    assert_eq!(total, 201.0, "connections counted; curl said: {codes}");
    assert!(
        wait_until(Duration::from_secs(5), || active(&mg, "default", "web")
            == 0.0),
        "active connections stay above 0"
    );
    assert!(
        // A leak stays; closing 200 sockets under a loaded test run may take
        // a few seconds. (At or below: the baseline may include the admin
        // connection of the readiness probe, closed since.)
        wait_until(Duration::from_secs(15), || mg.fd_count() <= baseline_fds),
        "fd count {} > baseline {baseline_fds}",
        mg.fd_count()
    );
    assert_eq!(mg.json("/api/v1/flows").as_array().unwrap().len(), 0);
    let down = mg
        .metric(r#"meshgate_bytes_total{tenant="default",instance="web",direction="downstream"}"#);
    assert!(down > 201.0 * 42.0, "downstream bytes {down}");
}

#[test]
fn promtool_accepts_metrics() {
    if !have("promtool") {
        return;
    }
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.pipe("default", "web", port, echo_server());
    // A refused dial, so dial error series exist too.
    cfg.pipe(
        "default",
        "dead",
        free_port(),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let mg = Meshgate::start(&cfg);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(echo_roundtrip(&mut s, b"ping").unwrap(), b"ping");
    let text = mg.metrics();
    assert!(text.contains("meshgate_connections_total"), "{text}");
    let out = run_with_stdin(
        Command::new("promtool").args(["check", "metrics"]),
        text.as_bytes(),
    );
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (file under the config dir, its content, what stderr must name)
fn bad_configs() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        (
            "tenants/default/web.yaml",
            "kind: pipe\nlisten: 127.0.0.1:8080\nremot: 127.0.0.1:80\n",
            vec!["tenants/default/web.yaml", "key `remot`", "unknown field"],
        ),
        (
            "tenants/default/web.yaml",
            "kind: pipe\nlisten: 127.0.0.1:8080\nremote: 127.0.0.1:70000\n",
            vec![
                "tenants/default/web.yaml",
                "key `remote`",
                "invalid port 70000",
            ],
        ),
        (
            "tenants/default/web.yaml",
            "kind: pype\nlisten: 127.0.0.1:8080\nremote: 127.0.0.1:80\n",
            vec![
                "tenants/default/web.yaml",
                "key `kind`",
                "unknown kind `pype`",
            ],
        ),
        (
            "meshgate.yaml",
            "node: x\nadmn: 127.0.0.1:9000\n",
            vec!["meshgate.yaml", "key `admn`"],
        ),
    ]
}

/// `--check` passes a config the server would warn about at start, and
/// shows the same warnings (they used to appear only at run time): a
/// SOCKS door without authentication off loopback, a secret file others
/// may read.
#[test]
fn check_shows_the_warnings_the_server_would_log() {
    use std::os::unix::fs::PermissionsExt;
    let cfg = ConfigDir::new();
    let pw = cfg.path().join("alice.pw");
    std::fs::write(&pw, "secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    cfg.write(
        "tenants/acme/open.yaml",
        &format!("kind: socks\nlisten: 0.0.0.0:{}\n", free_port()),
    );
    cfg.write(
        "tenants/acme/web.yaml",
        &format!(
            "kind: http_proxy\nlisten: 127.0.0.1:{}\nusers:\n  - name: alice\n    password_file: {}\n",
            free_port(),
            pw.display()
        ),
    );
    let out = check(cfg.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("SOCKS without authentication"), "{err}");
    assert!(err.contains("readable by other users"), "{err}");
    // A config with neither: no warning.
    let quiet = ConfigDir::new();
    quiet.write(
        "tenants/acme/open.yaml",
        &format!("kind: socks\nlisten: 127.0.0.1:{}\n", free_port()),
    );
    let out = check(quiet.path());
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("WARN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A misspelt folder is not silently an empty config: `--check` and the
/// server both say what they do not read and what is expected.
#[test]
fn config_meshgate_does_not_read_is_named() {
    let cfg = ConfigDir::new();
    cfg.write(
        "tenants/acme/web.yaml",
        &format!(
            "kind: pipe\nlisten: 127.0.0.1:{}\nremote: 127.0.0.1:9\n",
            free_port()
        ),
    );
    // The same probe on a config that is all read: no warning.
    let out = check(cfg.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("not read"), "{err}");
    cfg.write(
        "tenant/beta/web.yaml",
        &format!(
            "kind: pipe\nlisten: 127.0.0.1:{}\nremote: 127.0.0.1:9\n",
            free_port()
        ),
    );
    let out = check(cfg.path());
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{err}");
    assert!(
        stdout.contains("(1 tenants, 1 module instances)"),
        "{stdout}"
    );
    assert!(
        err.contains(
            "tenant/: not read: a tenant's documents go in tenants/<tenant>/<instance>.yaml"
        ),
        "{err}"
    );
    let mg = Meshgate::start(&cfg);
    assert!(
        mg.log_text().contains("tenant/: not read"),
        "{}",
        mg.log_text()
    );
}

#[test]
fn check_names_file_and_key() {
    for (file, text, expect) in bad_configs() {
        let cfg = ConfigDir::new();
        cfg.write(file, text);
        let out = check(cfg.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} accepted: {text}");
        for e in expect {
            assert!(err.contains(e), "stderr lacks `{e}`: {err}");
        }
        // The server refuses to start on the same config.
        let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .arg("--config-dir")
            .arg(cfg.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
    }

    // An unreadable file: a dangling link (unreadable even for root).
    let cfg = ConfigDir::new();
    std::fs::create_dir_all(cfg.path().join("tenants/default")).unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent/web.yaml",
        cfg.path().join("tenants/default/web.yaml"),
    )
    .unwrap();
    let out = check(cfg.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tenants/default/web.yaml: cannot read"),
        "{err}"
    );

    // All errors at once, and meshgatectl agrees.
    let cfg = ConfigDir::new();
    cfg.write("tenants/a/x.yaml", "kind: pipe\nlisten: 1\n");
    cfg.write("tenants/b/y.yaml", "kind: nope\n");
    let out = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
        .arg("check")
        .arg(cfg.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tenants/a/x.yaml: key `remote`: missing field"),
        "{err}"
    );
    assert!(err.contains("tenants/b/y.yaml: key `kind`"), "{err}");

    // A good config passes.
    let cfg = ConfigDir::new();
    cfg.pipe("default", "web", 8080, "127.0.0.1:80".parse().unwrap());
    let out = check(cfg.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config OK (1 tenants, 1 module instances)")
    );
}

#[test]
fn reload_rejects_bad_edit_and_applies_good_edit_live() {
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port_a = free_port();
    cfg.pipe("default", "a", port_a, echo);
    let mg = Meshgate::start(&cfg);

    // A connection through pipe a stays open across every edit below.
    let mut held = TcpStream::connect(("127.0.0.1", port_a)).unwrap();
    assert_eq!(echo_roundtrip(&mut held, b"before").unwrap(), b"before");

    // A bad edit of a: rejected, counted, logged; a keeps serving.
    cfg.write(
        "tenants/default/a.yaml",
        &format!("kind: pipe\nlisten: 127.0.0.1:{port_a}\nremote: {echo}\nmax_conections: 3\n"),
    );
    let failed = r#"meshgate_config_reloads_total{tenant="default",instance="a",result="failed"}"#;
    assert!(
        wait_until(Duration::from_secs(3), || mg.metric(failed) == 1.0),
        "bad edit not counted"
    );
    assert!(mg.log_text().contains("max_conections"), "error not logged");
    let modules = mg.json("/api/v1/modules");
    assert!(modules[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("max_conections"));
    let mut fresh = TcpStream::connect(("127.0.0.1", port_a)).unwrap();
    assert_eq!(echo_roundtrip(&mut fresh, b"still").unwrap(), b"still");

    // A good edit: a new pipe b, live within 2 s, no restart.
    let port_b = free_port();
    let pid = mg.pid();
    cfg.pipe("default", "b", port_b, echo);
    let live = wait_until(Duration::from_secs(2), || {
        TcpStream::connect(("127.0.0.1", port_b))
            .and_then(|mut s| echo_roundtrip(&mut s, b"new"))
            .is_ok_and(|b| b == b"new")
    });
    assert!(live, "pipe b not live within 2 s");
    assert_eq!(mg.pid(), pid);
    assert_eq!(
        mg.metric(r#"meshgate_config_reloads_total{tenant="default",instance="b",result="ok"}"#),
        1.0
    );

    // Moving a to another port: the new port serves, the old refuses, and the
    // connection opened before every edit still works.
    let port_a2 = free_port();
    cfg.pipe("default", "a", port_a2, echo);
    assert!(wait_until(Duration::from_secs(2), || TcpStream::connect((
        "127.0.0.1",
        port_a2
    ))
    .is_ok()));
    assert!(wait_until(Duration::from_secs(2), || TcpStream::connect((
        "127.0.0.1",
        port_a
    ))
    .is_err()));
    assert_eq!(echo_roundtrip(&mut held, b"after").unwrap(), b"after");
    drop(fresh);
}

/// `--config-dir` relative to the working directory (`./dir`, as typed in
/// a shell): an edit applies live, as with an absolute path (it used to
/// be ignored, silently).
#[test]
fn a_relative_config_dir_reloads_too() {
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port_a = free_port();
    cfg.pipe("default", "a", port_a, echo);
    let _mg = Meshgate::start_relative(&cfg);
    let works = |port: u16| {
        TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| echo_roundtrip(&mut s, b"x"))
            .is_ok_and(|b| b == b"x")
    };
    assert!(works(port_a));
    let port_b = free_port();
    assert!(!works(port_b));
    cfg.pipe("default", "b", port_b, echo);
    assert!(
        wait_until(Duration::from_secs(3), || works(port_b)),
        "an edit under a relative --config-dir did not apply"
    );
}

#[test]
fn removing_a_tenant_stops_only_its_pipes() {
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let (p1, p2) = (free_port(), free_port());
    cfg.pipe("t1", "web", p1, echo);
    cfg.pipe("t2", "web", p2, echo);
    let mg = Meshgate::start(&cfg);
    for p in [p1, p2] {
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        assert_eq!(echo_roundtrip(&mut s, b"x").unwrap(), b"x");
    }
    let mut t2_conn = TcpStream::connect(("127.0.0.1", p2)).unwrap();
    assert_eq!(echo_roundtrip(&mut t2_conn, b"t2").unwrap(), b"t2");

    std::fs::remove_dir_all(cfg.path().join("tenants/t1")).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || TcpStream::connect((
            "127.0.0.1",
            p1
        ))
        .is_err()),
        "t1's pipe still accepts"
    );
    let mut s = TcpStream::connect(("127.0.0.1", p2)).unwrap();
    assert_eq!(echo_roundtrip(&mut s, b"y").unwrap(), b"y");
    assert_eq!(
        echo_roundtrip(&mut t2_conn, b"t2 again").unwrap(),
        b"t2 again"
    );
    let tenants = mg.json("/api/v1/tenants");
    let names: Vec<&str> = tenants
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["t2"]);
}

#[test]
fn sigterm_lets_a_100mb_transfer_finish_and_refuses_new_connections() {
    let Some(nginx) = Nginx::start() else { return };
    if !have("curl") {
        return;
    }
    // 100 MB of pseudo-random bytes.
    let mut data = vec![0u8; 100 * 1000 * 1000];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(nginx.root.join("big.bin"), &data).unwrap();
    let want = hex(&Sha256::digest(&data));
    drop(data);

    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.pipe("default", "web", port, nginx.addr);
    let mut mg = Meshgate::start(&cfg);
    let out = tempfile::NamedTempFile::new().unwrap();
    // ~4 s at 25 MB/s: SIGTERM lands mid-transfer.
    let mut dl = Command::new("curl")
        .args(["-s", "--limit-rate", "25M", "--max-time", "60", "-o"])
        .arg(out.path())
        .arg(format!("http://127.0.0.1:{port}/big.bin"))
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || std::fs::metadata(
        out.path()
    )
    .map(|m| m.len() > 5_000_000)
    .unwrap_or(false)));
    mg.signal("TERM");
    assert!(
        wait_until(Duration::from_secs(2), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()),
        "new connections still accepted while draining"
    );
    let status = dl.wait().unwrap();
    assert!(status.success(), "curl failed: {status}");
    let got = hex(&Sha256::digest(std::fs::read(out.path()).unwrap()));
    assert_eq!(got, want, "transfer corrupted or cut short");
    let exit = mg.child.wait().unwrap();
    assert!(exit.success(), "meshgate exit: {exit}\n{}", mg.log_text());
    assert!(mg.log_text().contains("draining"));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn max_connections_refuses_and_counts() {
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/default/web.yaml",
        &format!("kind: pipe\nlisten: 127.0.0.1:{port}\nremote: {echo}\nmax_connections: 2\n"),
    );
    let mg = Meshgate::start(&cfg);
    let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(echo_roundtrip(&mut a, b"a").unwrap(), b"a");
    assert_eq!(echo_roundtrip(&mut b, b"b").unwrap(), b"b");
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = c.write_all(b"c");
    let mut buf = [0u8; 1];
    assert!(
        matches!(c.read(&mut buf), Ok(0) | Err(_)),
        "third connection served"
    );
    assert_eq!(
        mg.metric(
            r#"meshgate_rejected_total{tenant="default",instance="web",reason="max_connections"}"#
        ),
        1.0
    );
    drop(a);
    // A slot frees up when a connection ends.
    assert!(wait_until(Duration::from_secs(3), || {
        TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| echo_roundtrip(&mut s, b"d"))
            .is_ok()
    }));
}

#[test]
fn dial_errors_are_counted_by_reason() {
    let cfg = ConfigDir::new();
    let port = free_port();
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    cfg.pipe("default", "web", port, dead);
    let mg = Meshgate::start(&cfg);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        r#"meshgate_dial_errors_total{tenant="default",instance="web",reason="refused"}"#
    ) == 1.0));
}

#[test]
fn udp_pipe_carries_datagrams_both_ways() {
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = backend.send_to(&reply, from);
        }
    });
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/default/dns.yaml",
        &format!("kind: pipe\nprotocol: udp\nlisten: 127.0.0.1:{port}\nremote: {backend_addr}\nidle_timeout: 1s\n"),
    );
    let mg = Meshgate::start(&cfg);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    for i in 0..3 {
        let msg = format!("hello {i}");
        client.send_to(msg.as_bytes(), ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("echo:{msg}").as_bytes());
    }
    // One session for one client address; it ends after the idle timeout.
    assert_eq!(
        mg.metric(r#"meshgate_connections_total{tenant="default",instance="dns"}"#),
        1.0
    );
    assert!(wait_until(Duration::from_secs(4), || active(
        &mg, "default", "dns"
    ) == 0.0));
}

/// 2,000 UDP sources against `max_connections: 100`: 100 sessions, the
/// rest refused and counted, and the pipe keeps serving its sessions and,
/// once they idle out, new clients.
#[test]
fn udp_sources_beyond_max_connections_are_refused_without_stalling() {
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf) {
            let _ = backend.send_to(&buf[..n], from);
        }
    });
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/default/dns.yaml",
        &format!("kind: pipe\nprotocol: udp\nlisten: 127.0.0.1:{port}\nremote: {backend_addr}\nidle_timeout: 2s\nmax_connections: 100\n"),
    );
    let mg = Meshgate::start(&cfg);
    let first = UdpSocket::bind("127.0.0.1:0").unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = [0u8; 64];
    first.send_to(b"first", ("127.0.0.1", port)).unwrap();
    assert_eq!(first.recv(&mut buf).unwrap(), 5);
    // 2,000 more sources (ports of 127.0.0.0/8 addresses), one datagram each.
    let flood: Vec<UdpSocket> = (0..2000u32)
        .map(|i| {
            UdpSocket::bind((
                std::net::Ipv4Addr::new(127, 3, (i / 200) as u8, (i % 200 + 1) as u8),
                0,
            ))
            .unwrap()
        })
        .collect();
    // At 20,000 a second: faster, the kernel's socket buffer drops them
    // before meshgate could count them.
    for batch in flood.chunks(100) {
        for s in batch {
            s.send_to(b"x", ("127.0.0.1", port)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rejected =
        r#"meshgate_rejected_total{tenant="default",instance="dns",reason="max_connections"}"#;
    assert!(
        wait_until(Duration::from_secs(5), || mg.metric(rejected) >= 1900.0),
        "{} refused",
        mg.metric(rejected)
    );
    assert!(active(&mg, "default", "dns") <= 100.0);
    // The first session is served meanwhile.
    let t = std::time::Instant::now();
    first.send_to(b"again", ("127.0.0.1", port)).unwrap();
    assert_eq!(first.recv(&mut buf).unwrap(), 5);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "answered after {:?}",
        t.elapsed()
    );
    // Once the flood's sessions idle out, a new source is admitted.
    assert!(wait_until(Duration::from_secs(8), || active(
        &mg, "default", "dns"
    ) <= 1.0));
    let late = UdpSocket::bind("127.0.0.1:0").unwrap();
    late.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    late.send_to(b"late", ("127.0.0.1", port)).unwrap();
    assert_eq!(late.recv(&mut buf).unwrap(), 4);
}

/// Hundreds of half-open connections to the admin API (connect, send
/// nothing) cost a bounded amount: pipes keep accepting meanwhile, and the
/// API answers again once the header timeout has closed them. A request
/// with a body is refused.
#[test]
fn half_open_admin_connections_do_not_stop_pipes() {
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.pipe("default", "web", port, echo);
    let m = Meshgate::start(&cfg);
    let idle: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect(m.admin).ok())
        .collect();
    assert!(idle.len() >= 300, "only {} connections opened", idle.len());
    // The data plane does not notice.
    for i in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let msg = format!("ping {i}");
        assert_eq!(
            echo_roundtrip(&mut s, msg.as_bytes()).unwrap(),
            msg.as_bytes()
        );
    }
    // The API is back once the idle connections timed out (5 s headers).
    let back = wait_until(Duration::from_secs(12), || {
        m.http_get("/healthz").is_some_and(|(s, _)| s == 200)
    });
    assert!(back, "{}", m.log_text());
    drop(idle);
    // No request bodies.
    let mut s = TcpStream::connect(m.admin).unwrap();
    s.write_all(b"POST /api/v1/node HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
}
