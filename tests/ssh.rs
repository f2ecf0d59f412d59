//! The SSH door with the stock OpenSSH client on loopback: `-L`, `-W`,
//! `-D` with curl, the session banner, refused keys and `permitopen`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A `kind: ssh` door on 127.0.0.1:`port`, its host key in `dir`, letting
/// `keys` in, with `extra` lines.
fn door_doc(dir: &Path, port: u16, keys: &[&str], extra: &str) -> String {
    let mut doc = format!(
        "kind: ssh\nlisten: 127.0.0.1:{port}\nhost_key_file: {}\n{extra}authorized_keys:\n",
        dir.join("host_key").display()
    );
    for k in keys {
        doc.push_str(&format!("  - {k}\n"));
    }
    doc
}

fn ssh(key: &Path, port: u16) -> Command {
    ssh_logging(key, port, "ERROR")
}

/// `ssh` with `key` to 127.0.0.1's `port`, logging at `level` (INFO shows
/// "Allocated port" lines).
fn ssh_logging(key: &Path, port: u16, level: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        &format!("LogLevel={level}"),
        "-o",
        "ExitOnForwardFailure=yes",
        "-p",
        &port.to_string(),
        "-i",
    ])
    .arg(key);
    c
}

struct Bg(Child);
impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn openssh_forwards_through_the_ssh_door() {
    if !have("ssh") || !have("ssh-keygen") || !have("curl") {
        return;
    }
    let Some(nginx) = Nginx::start() else { return };
    let echo = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = ssh_keygen(dir.path(), "alice");
    let (bob, bob_pub) = ssh_keygen(dir.path(), "bob");
    let (carol, _) = ssh_keygen(dir.path(), "carol");
    let keys = dir.path().join("authorized_keys");
    let bob_listen = free_port();
    std::fs::write(
        &keys,
        format!(
            "{alice_pub}\npermitopen=\"127.0.0.1:{}\",permitlisten=\"{bob_listen}\" {bob_pub}\n",
            nginx.addr.port()
        ),
    )
    .unwrap();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/ssh.yaml",
        &format!(
            "kind: ssh\nlisten: 127.0.0.1:{port}\nhost_key_file: {}\nauthorized_keys_file: {}\n",
            dir.path().join("host_key").display(),
            keys.display()
        ),
    );
    cfg.loopback_vnet("acme");
    let mg = Meshgate::start(&cfg);

    // A session channel: the banner, no shell.
    let out = ssh(&alice, port)
        .arg("alice@127.0.0.1")
        .arg("uptime")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tenant acme, identity alice"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ssh -W: stdin/stdout to the echo server through the spine.
    let mut w = ssh(&alice, port)
        .arg("-W")
        .arg(echo.to_string())
        .arg("alice@127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    w.stdin
        .take()
        .unwrap()
        .write_all(b"through ssh -W\n")
        .unwrap();
    let out = w.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through ssh -W\n");

    // ssh -L, then curl the local end.
    let lport = free_port();
    let _l = Bg(ssh(&alice, port)
        .args([
            "-N",
            "-L",
            &format!("{lport}:127.0.0.1:{}", nginx.addr.port()),
        ])
        .arg("alice@127.0.0.1")
        .spawn()
        .unwrap());
    assert!(wait_until(Duration::from_secs(10), || curl(&format!(
        "http://127.0.0.1:{lport}/"
    ))
    .0 == 200));
    assert!(curl(&format!("http://127.0.0.1:{lport}/"))
        .1
        .contains("hello from nginx"));

    // ssh -D: OpenSSH's SOCKS, with names resolved by meshgate.
    let dport = free_port();
    let _d = Bg(ssh(&alice, port)
        .args(["-N", "-D", &format!("127.0.0.1:{dport}")])
        .arg("alice@127.0.0.1")
        .spawn()
        .unwrap());
    let socks_ok = wait_until(Duration::from_secs(10), || {
        Command::new("curl")
            .args([
                "-sf",
                "--max-time",
                "5",
                "--socks5-hostname",
                &format!("127.0.0.1:{dport}"),
            ])
            .arg(format!("http://localhost:{}/", nginx.addr.port()))
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).contains("hello from nginx")
            })
    });
    assert!(socks_ok, "{}", mg.log_text());

    // bob may open nginx only; carol's key is unknown.
    let out = ssh(&bob, port)
        .arg("-W")
        .arg(echo.to_string())
        .arg("bob@127.0.0.1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("administratively prohibited") || err.contains("stdio forwarding failed"),
        "{err}"
    );
    let out = ssh(&carol, port)
        .arg("carol@127.0.0.1")
        .arg("true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new("ssh")
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "PubkeyAuthentication=no",
            "-p",
            &port.to_string(),
            "x@127.0.0.1",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no key, no entry");
    let m = |reason: &str| {
        mg.metric(&format!(
            "meshgate_rejected_total{{tenant=\"acme\",instance=\"ssh\",reason=\"{reason}\"}}"
        ))
    };
    assert!(
        wait_until(Duration::from_secs(2), || m("permitopen") >= 1.0
            && m("unknown_key") >= 1.0),
        "{}",
        mg.metrics()
    );

    // ssh -R 0: the gateway allocates a port, says which, and connections
    // to it come back through the session; it goes when ssh exits.
    let (r, allocated) = remote_forward(&alice, port, &format!("0:{echo}"));
    assert_ne!(allocated, 0, "ssh -R exited");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", allocated)).unwrap();
    assert_eq!(
        echo_roundtrip(&mut s, b"published with -R").unwrap(),
        b"published with -R"
    );
    drop(s);
    drop(r);
    assert!(
        wait_until(Duration::from_secs(5), || std::net::TcpStream::connect((
            "127.0.0.1",
            allocated
        ))
        .is_err()),
        "the -R port outlived the session"
    );
    // bob may publish only his port.
    let out = ssh(&bob, port)
        .args(["-N", "-R", &format!("{}:{echo}", free_port())])
        .arg("bob@127.0.0.1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "bob published another port");
    assert!(wait_until(Duration::from_secs(2), || m("permitlisten") >= 1.0));

    // The flows carry the key's identity.
    let log = mg.log_text();
    assert!(
        log.lines().any(|l| l.contains("meshgate::audit")
            && l.contains("alice")
            && l.contains(&echo.to_string())),
        "{log}"
    );
    // The status shows the host key's fingerprint, as ssh-keygen computes it.
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(dir.path().join("host_key"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    assert!(
        !fp.is_empty() && mg.http_get("/api/v1/modules").unwrap().1.contains(&fp),
        "{fp}"
    );
}

/// Signs `key`'s public half with `ca`: principals, validity (`-V`).
fn sign(ca: &Path, key: &Path, id: &str, principals: &str, validity: &str) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", id, "-n", principals, "-V", validity])
        .arg(key.with_extension("pub"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen -s failed");
}

#[test]
fn certificates_from_the_tenant_ca_log_in_with_their_principal() {
    if !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, ca_pub) = ssh_keygen(d, "ca");
    let (other_ca, _) = ssh_keygen(d, "other-ca");
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/ssh.yaml",
        &door_doc(
            d,
            port,
            &[&format!("'cert-authority,principals=\"ops,dev\" {ca_pub}'")],
            "",
        ),
    );
    let mg = Meshgate::start(&cfg);
    let login = |key: &Path| {
        let out = ssh(key, port)
            .arg("someone@127.0.0.1")
            .arg("x")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    // A valid certificate: its principal is the identity.
    let (good, _) = ssh_keygen(d, "good");
    sign(&ca, &good, "good-cert", "ops", "-5m:+1h");
    let (ok, text) = login(&good);
    assert!(
        ok && text.contains("identity ops"),
        "{text}\n{}",
        mg.log_text()
    );
    // Expired, another CA's, a principal the CA line does not accept, and
    // the CA key itself used as a plain key: refused.
    let (old, _) = ssh_keygen(d, "old");
    sign(&ca, &old, "old-cert", "ops", "-2h:-1h");
    assert!(!login(&old).0, "an expired certificate got in");
    let (stranger, _) = ssh_keygen(d, "stranger");
    sign(&other_ca, &stranger, "stranger-cert", "ops", "-5m:+1h");
    assert!(!login(&stranger).0, "another CA's certificate got in");
    let (wrong, _) = ssh_keygen(d, "wrong");
    sign(&ca, &wrong, "wrong-cert", "root", "-5m:+1h");
    assert!(!login(&wrong).0, "a principal outside principals= got in");
    assert!(!login(&ca).0, "the CA key logged in as a plain key");
    let m = |reason: &str| {
        mg.metric(&format!(
            "meshgate_rejected_total{{tenant=\"acme\",instance=\"ssh\",reason=\"{reason}\"}}"
        ))
    };
    assert!(
        wait_until(Duration::from_secs(2), || m("cert_unknown_ca") >= 1.0
            && m("cert_principal") >= 1.0
            && m("unknown_key") >= 1.0),
        "{}",
        mg.metrics()
    );
    // A connection that never authenticates (a probe: banner, then gone)
    // is counted too, though no auth attempt reached meshgate.
    let before = m("unauthenticated");
    {
        use std::io::Read;
        let mut probe = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut banner = [0u8; 8];
        probe.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"SSH-2.0-");
    }
    assert!(
        wait_until(Duration::from_secs(2), || m("unauthenticated") > before),
        "{}",
        mg.metrics()
    );
}

/// A server on 127.0.0.1 that writes `n` bytes to every connection.
fn source(n: usize) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let chunk = vec![7u8; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if s.write_all(&chunk[..k]).is_err() {
                        return;
                    }
                    left -= k;
                }
            });
        }
    });
    addr
}

#[test]
fn a_stalled_channel_does_not_stall_the_session_and_tenants_keep_their_keys() {
    if !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (alice, alice_pub) = ssh_keygen(d, "alice");
    let (bob, bob_pub) = ssh_keygen(d, "bob");
    let cfg = ConfigDir::new();
    let (pa, pb) = (free_port(), free_port());
    for (tenant, port, key) in [("a", pa, &alice_pub), ("b", pb, &bob_pub)] {
        cfg.write(
            &format!("tenants/{tenant}/ssh.yaml"),
            &format!(
                "kind: ssh\nlisten: 127.0.0.1:{port}\nhost_key_file: {}\nauthorized_keys:\n  - {key}\n",
                d.join(format!("host_{tenant}")).display()
            ),
        );
        cfg.loopback_vnet(tenant);
    }
    let mg = Meshgate::start(&cfg);
    // Tenant isolation: each key opens its own tenant's door only.
    let try_login = |key: &Path, port: u16| {
        ssh(key, port)
            .arg("u@127.0.0.1")
            .arg("x")
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(try_login(&alice, pa) && try_login(&bob, pb));
    assert!(
        !try_login(&alice, pb) && !try_login(&bob, pa),
        "a key crossed tenants"
    );

    // Two forwards on one session: one channel's reader stops, the other
    // channel still moves 32 MB.
    let big = source(256 << 20);
    let (l1, l2) = (free_port(), free_port());
    let _fwd = Bg(ssh(&alice, pa)
        .args([
            "-N",
            "-L",
            &format!("{l1}:{big}"),
            "-L",
            &format!("{l2}:{big}"),
        ])
        .arg("u@127.0.0.1")
        .spawn()
        .unwrap());
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", l2)).is_ok()
    }));
    let stalled = std::net::TcpStream::connect(("127.0.0.1", l1)).unwrap();
    std::thread::sleep(Duration::from_millis(500)); // let its windows fill
    let t = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", l2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < (32 << 20) {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(
        got >= 32 << 20,
        "only {got} bytes while another channel was stalled ({:?})\n{}",
        t.elapsed(),
        mg.log_text()
    );
    drop(stalled);
}

/// Two gateways on loopback joined by `kind: ssh_link`: the link is a route
/// connector (a pipe `via:` it reaches nginx by a name resolved on the far
/// side) and publishes a reverse forward there. Killed and restarted, the
/// far gateway gets the link back within the backoff, and the forward with it.
#[test]
fn a_gateway_link_reconnects_and_publishes_its_forwards_again() {
    if !have("ssh-keygen") || !have("curl") {
        return;
    }
    let Some(nginx) = Nginx::start() else { return };
    let echo = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let (east_host, east_host_pub) = ssh_keygen(dir.path(), "east_host");
    let (west_key, west_pub) = ssh_keygen(dir.path(), "west_link");
    let door = free_port();
    let published = free_port();
    let east = ConfigDir::new();
    east.write(
        "tenants/acme/door.yaml",
        &format!(
            "kind: ssh\nlisten: 127.0.0.1:{door}\nhost_key_file: {}\nmax_channels: 4\nauthorized_keys:\n  - {west_pub}\n",
            east_host.display()
        ),
    );
    // The link's far side checks what it is asked for under its own rules.
    east.loopback_vnet("acme");
    let west = ConfigDir::new();
    west.write(
        "tenants/acme/east.yaml",
        &format!(
            "kind: ssh_link\nserver: 127.0.0.1:{door}\nhost_key: {east_host_pub}\nkey_file: {}\nbackoff_max: 4s\nkeepalive: 1s\nforwards:\n  - remote_port: {published}\n    to: {echo}\n",
            west_key.display()
        ),
    );
    let web = free_port();
    west.write(
        "tenants/acme/web.yaml",
        &format!(
            "kind: pipe\nlisten: 127.0.0.1:{web}\nremote: localhost:{}\nvia: east\n",
            nginx.addr.port()
        ),
    );
    let mut mg_east = Meshgate::start(&east);
    let mg_west = Meshgate::start(&west);
    let link = |mg: &Meshgate| {
        mg.json("/api/v1/modules")
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["instance"] == "east")
            .unwrap()["details"]
            .clone()
    };
    let through_pipe = || curl(&format!("http://127.0.0.1:{web}/")).0 == 200;
    let through_forward = || {
        std::net::TcpStream::connect(("127.0.0.1", published))
            .ok()
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                echo_roundtrip(&mut s, b"ping").ok()
            })
            .is_some_and(|r| r == b"ping")
    };
    assert!(
        wait_until(Duration::from_secs(10), through_pipe),
        "the pipe through the link:\n{}\n{}",
        mg_west.log_text(),
        mg_east.log_text()
    );
    assert!(wait_until(Duration::from_secs(5), through_forward));
    // One short flow after another: each channel leaves the door's count
    // when its flow ends (max_channels is 4 here), whichever side closes
    // first.
    for i in 0..20 {
        assert!(
            through_pipe(),
            "flow {i} through the link was refused:\n{}",
            mg_east.log_text()
        );
    }
    let status = link(&mg_west);
    assert_eq!(status["connected"], true);
    assert_eq!(status["reconnects"], 0);
    assert_eq!(
        status["public_key"].as_str().unwrap().split(' ').nth(1),
        west_pub.split(' ').nth(1)
    );
    // The east gateway dies: the link goes down, and with it both ways.
    mg_east.signal("KILL");
    let _ = mg_east.child.wait();
    assert!(wait_until(Duration::from_secs(6), || link(&mg_west)
        ["connected"]
        == false));
    assert!(!through_pipe());
    assert!(!through_forward());
    // Back after a while: the link returns within the backoff (4 s at
    // most here, jittered), its reverse forward registered again.
    std::thread::sleep(Duration::from_secs(3));
    let t = std::time::Instant::now();
    mg_east = Meshgate::start(&east);
    assert!(
        wait_until(Duration::from_secs(8), through_forward),
        "the reverse forward did not come back:\n{}",
        mg_west.log_text()
    );
    assert!(wait_until(Duration::from_secs(2), through_pipe));
    eprintln!("link back {:?} after the restart", t.elapsed());
    let status = link(&mg_west);
    assert_eq!(status["connected"], true);
    assert!(status["reconnects"].as_u64().unwrap() >= 1);
    // A wrong host key: never connects, says why.
    let (_, other_pub) = ssh_keygen(dir.path(), "other");
    let wrong = ConfigDir::new();
    wrong.write(
        "tenants/acme/east.yaml",
        &format!(
            "kind: ssh_link\nserver: 127.0.0.1:{door}\nhost_key: {other_pub}\nkey_file: {}\n",
            west_key.display()
        ),
    );
    let mg_wrong = Meshgate::start(&wrong);
    assert!(wait_until(Duration::from_secs(5), || mg_wrong
        .log_text()
        .contains("host key is not the one configured")));
    assert_eq!(link(&mg_wrong)["connected"], false);
    drop(mg_east);
}

/// Runs `ssh -N -R SPEC` in the background; the port the gateway allocated
/// (for `-R name:0:...`), read from ssh's "Allocated port" line.
fn remote_forward(key: &Path, port: u16, spec: &str) -> (Bg, u16) {
    let mut r = ssh_logging(key, port, "INFO")
        .args(["-N", "-R", spec, "alice@127.0.0.1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(r.stderr.take().unwrap());
    let mut line = String::new();
    let allocated = loop {
        line.clear();
        if std::io::BufRead::read_line(&mut err, &mut line).unwrap() == 0 {
            break 0;
        }
        if let Some(rest) = line.strip_prefix("Allocated port ") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    (Bg(r), allocated)
}

/// `ssh -R web:0:...` publishes `web.ssh.<tenant>`: a SOCKS user of the
/// tenant reaches the service by that name; the name goes with the session,
/// and a second session cannot take it meanwhile.
#[test]
fn ssh_r_with_a_name_publishes_it_in_the_tenant() {
    if !have("ssh") || !have("ssh-keygen") || !have("curl") {
        return;
    }
    let Some(nginx) = Nginx::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = ssh_keygen(dir.path(), "alice");
    let cfg = ConfigDir::new();
    let (port, socks) = (free_port(), free_port());
    cfg.write(
        "tenants/default/door.yaml",
        &door_doc(dir.path(), port, &[&alice_pub], ""),
    );
    cfg.write(
        "tenants/default/socks.yaml",
        &format!("kind: socks\nlisten: 127.0.0.1:{socks}\n"),
    );
    let mg = Meshgate::start(&cfg);
    let (session, allocated) = remote_forward(&alice, port, &format!("web:0:{}", nginx.addr));
    assert_ne!(allocated, 0, "{}", mg.log_text());
    let by_name = || {
        curl_with(
            &["--socks5-hostname", &format!("127.0.0.1:{socks}")],
            &format!("http://web.ssh.default:{allocated}/"),
        )
    };
    let (_, status, _, _) = by_name();
    assert_eq!(status, 200, "{}", mg.log_text());
    // Logins and channels are counted per identity and type.
    let ssh_metric = |family: &str, extra: &str| {
        mg.metric(&format!(
            r#"meshgate_ssh_{family}_total{{tenant="default",instance="door",identity="alice"{extra}}}"#
        ))
    };
    assert!(ssh_metric("sessions", "") >= 1.0, "{}", mg.metrics());
    assert_eq!(ssh_metric("channels", r#",type="tcpip-forward""#), 1.0);
    assert!(wait_until(Duration::from_secs(2), || ssh_metric(
        "channels",
        r#",type="forwarded-tcpip""#
    ) >= 1.0));
    // A second session cannot take the name while the first holds it.
    let (_other, none) = remote_forward(&alice, port, &format!("web:0:{}", nginx.addr));
    assert_eq!(none, 0, "a second session published the same name");
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        r#"meshgate_rejected_total{tenant="default",instance="door",reason="name_taken"}"#
    ) >= 1.0));
    // The name goes with the session.
    drop(session);
    assert!(
        wait_until(Duration::from_secs(5), || by_name().1 != 200),
        "the name outlived its session"
    );
}

/// `ssh -R /dir/web.sock:host:port` publishes a Unix socket, only inside
/// the door's `streamlocal_dir`, mode 0600; it goes with the session.
#[test]
fn ssh_r_publishes_a_unix_socket_inside_its_directory_only() {
    if !have("ssh") || !have("ssh-keygen") || !have("curl") {
        return;
    }
    let Some(nginx) = Nginx::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = ssh_keygen(dir.path(), "alice");
    let sockets = dir.path().join("sockets");
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/default/door.yaml",
        &door_doc(
            dir.path(),
            port,
            &[&alice_pub],
            &format!("streamlocal_dir: {}\n", sockets.display()),
        ),
    );
    let mg = Meshgate::start(&cfg);
    let sock = sockets.join("web.sock");
    let session = Bg(ssh(&alice, port)
        .args(["-N", "-R", &format!("{}:{}", sock.display(), nginx.addr)])
        .arg("alice@127.0.0.1")
        .spawn()
        .unwrap());
    assert!(
        wait_until(Duration::from_secs(5), || sock.exists()),
        "{}",
        mg.log_text()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (_, status, _, _) = curl_with(
        &["--unix-socket", &sock.display().to_string()],
        "http://web/",
    );
    assert_eq!(status, 200, "{}", mg.log_text());
    assert!(wait_until(Duration::from_secs(2), || {
        mg.metric(
        r#"meshgate_ssh_channels_total{tenant="default",instance="door",identity="alice",type="forwarded-streamlocal"}"#
    ) >= 1.0
    }));
    drop(session);
    assert!(
        wait_until(Duration::from_secs(5), || !sock.exists()),
        "the socket outlived its session"
    );
    // Anywhere else: refused and counted.
    let outside = dir.path().join("elsewhere.sock");
    let out = ssh(&alice, port)
        .args(["-N", "-R", &format!("{}:{}", outside.display(), nginx.addr)])
        .arg("alice@127.0.0.1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!outside.exists());
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        r#"meshgate_rejected_total{tenant="default",instance="door",reason="streamlocal_path"}"#
    ) >= 1.0));
}

/// Deadlines before trust: silent connections hold no door. Past
/// `per_source_max_startups` a new unauthenticated connection is closed at
/// once; the silent ones are closed at `handshake_timeout`; then a real
/// `ssh` logs in, while another tenant's pipe carried traffic throughout.
#[test]
fn silent_connections_are_closed_at_the_login_deadline() {
    use std::io::Read;
    if !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = ssh_keygen(dir.path(), "alice");
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/door.yaml",
        &door_doc(
            dir.path(),
            port,
            &[&alice_pub],
            "handshake_timeout: 2s\nper_source_max_startups: 3\n",
        ),
    );
    cfg.loopback_vnet("acme");
    let other = free_port();
    cfg.pipe("beta", "web", other, echo);
    let mg = Meshgate::start(&cfg);
    let beta_works = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", other)).unwrap();
        echo_roundtrip(&mut s, b"beta").unwrap() == b"beta"
    };
    assert!(beta_works());

    // Three silent clients (they read the banner and say nothing).
    let t0 = std::time::Instant::now();
    let mut silent: Vec<std::net::TcpStream> = (0..3)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut banner = [0u8; 4];
            s.read_exact(&mut banner).unwrap();
            assert_eq!(&banner, b"SSH-");
            s
        })
        .collect();
    // A fourth from the same address: closed at once, counted.
    let mut fourth = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut b = [0u8; 64];
    assert_eq!(
        fourth.read(&mut b).unwrap_or(0),
        0,
        "a fourth startup was served"
    );
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        r#"meshgate_rejected_total{tenant="acme",instance="door",reason="per_source_max_startups"}"#
    ) >= 1.0));
    assert!(beta_works(), "another tenant's traffic stopped");
    // The silent ones are closed at the deadline (2 s), not held.
    for s in &mut silent {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let held = t0.elapsed();
    eprintln!("silent clients closed after {held:?} (deadline 2 s)");
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_secs(4),
        "{held:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || mg.metric(
            r#"meshgate_rejected_total{tenant="acme",instance="door",reason="handshake_timeout"}"#
        ) >= 3.0),
        "{}",
        mg.metrics()
    );
    // A real client logs in and forwards.
    let out = ssh(&alice, port)
        .args(["-W", &echo.to_string(), "alice@127.0.0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = {
        let mut c = out;
        c.stdin.take().unwrap().write_all(b"hello").unwrap();
        c.wait_with_output().unwrap()
    };
    assert_eq!(out.stdout, b"hello", "{}", mg.log_text());
    assert!(beta_works());
}

/// A server that trickles bytes to every connection for a minute.
fn trickle_server() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                for _ in 0..1200 {
                    if s.write_all(&[b'x'; 1024]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
    addr
}

/// `ssh -L` to `slow` as `user`, and a download through it that has
/// started: the ssh client and the local end of the download.
fn held_download(
    key: &Path,
    port: u16,
    user: &str,
    slow: std::net::SocketAddr,
) -> (Bg, std::net::TcpStream) {
    use std::io::Read;
    let local = free_port();
    let child = ssh(key, port)
        .args([
            "-N",
            "-L",
            &format!("127.0.0.1:{local}:{slow}"),
            &format!("{user}@127.0.0.1"),
        ])
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            local
        ))
        .is_ok()),
        "{user}'s forward did not come up"
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", local)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1024];
    s.read_exact(&mut b).unwrap();
    (Bg(child), s)
}

/// How long after `t0` the download `s` ended (panics after 5 s).
fn ended_after(
    s: &mut std::net::TcpStream,
    t0: std::time::Instant,
    log: impl Fn() -> String,
) -> Duration {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return t0.elapsed(),
            Ok(_) if t0.elapsed() > Duration::from_secs(5) => {
                panic!("the download outlived its key\n{}", log())
            }
            Ok(_) => {}
        }
    }
}

/// Whether `s` keeps delivering for a second.
fn keeps_flowing(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        if !matches!(s.read(&mut buf), Ok(n) if n > 0) {
            return false;
        }
    }
    true
}

/// Access ends when it is revoked: taking alice's key out of the door's
/// `authorized_keys` ends her session and her `ssh -L` download within a
/// second; bob's session, admitted by a line that stays, goes on.
#[test]
fn removing_a_key_ends_its_sessions_and_forwards() {
    if !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = ssh_keygen(dir.path(), "alice");
    let (bob, bob_pub) = ssh_keygen(dir.path(), "bob");
    let slow = trickle_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/door.yaml",
        &door_doc(dir.path(), port, &[&alice_pub, &bob_pub], ""),
    );
    cfg.loopback_vnet("acme");
    let mg = Meshgate::start(&cfg);
    let (mut alice_ssh, mut a) = held_download(&alice, port, "alice", slow);
    let (_bob_ssh, mut b) = held_download(&bob, port, "bob", slow);
    // Alice's line goes.
    let t0 = std::time::Instant::now();
    cfg.write(
        "tenants/acme/door.yaml",
        &door_doc(dir.path(), port, &[&bob_pub], ""),
    );
    let ended = ended_after(&mut a, t0, || mg.log_text());
    eprintln!("alice's forward ended {ended:?} after her key was removed");
    assert!(ended < Duration::from_millis(1500), "{ended:?}");
    assert!(
        wait_until(Duration::from_secs(2), || alice_ssh
            .0
            .try_wait()
            .unwrap()
            .is_some()),
        "alice's ssh still runs"
    );
    assert_eq!(
        mg.metric(r#"meshgate_rejected_total{tenant="acme",instance="door",reason="key_revoked"}"#),
        1.0
    );
    // Bob's download and new forwards go on.
    assert!(keeps_flowing(&mut b), "bob's download ended");
    let _ = held_download(&bob, port, "bob", slow);
    // And alice cannot log in again.
    let out = ssh(&alice, port)
        .args(["-W", &slow.to_string(), "alice@127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Certificate extensions are enforced as OpenSSH does: a certificate made
/// with `ssh-keygen -O clear` logs in but cannot forward; one with
/// `-O permit-port-forwarding` can.
#[test]
fn certificate_extensions_decide_forwarding() {
    if !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, ca_pub) = ssh_keygen(d, "ca");
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/ssh.yaml",
        &door_doc(d, port, &[&format!("cert-authority {ca_pub}")], ""),
    );
    cfg.loopback_vnet("acme");
    let mg = Meshgate::start(&cfg);
    let signed = |name: &str, options: &[&str]| {
        let (key, _) = ssh_keygen(d, name);
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", name, "-n", "ops", "-V", "-5m:+1h"])
            .args(options.iter().flat_map(|o| ["-O", o]))
            .arg(key.with_extension("pub"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "ssh-keygen -s failed");
        key
    };
    let forward = |key: &Path| {
        let mut c = ssh(key, port)
            .args(["-W", &echo.to_string(), "ops@127.0.0.1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(b"ping").unwrap();
        let out = c.wait_with_output().unwrap();
        (out.stdout, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let login = |key: &Path| {
        ssh(key, port)
            .args(["ops@127.0.0.1", "x"])
            .output()
            .unwrap()
            .status
            .success()
    };
    let permitted = signed("permitted", &["clear", "permit-port-forwarding"]);
    let cleared = signed("cleared", &["clear"]);
    // Both log in; only the one with the extension forwards.
    assert!(login(&permitted) && login(&cleared), "{}", mg.log_text());
    assert_eq!(forward(&permitted).0, b"ping", "{}", mg.log_text());
    let (out, err) = forward(&cleared);
    assert!(
        out.is_empty(),
        "a certificate without permit-port-forwarding forwarded"
    );
    assert!(
        err.contains("stdio forwarding failed") || err.contains("prohibited"),
        "{err}"
    );
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        r#"meshgate_rejected_total{tenant="acme",instance="ssh",reason="forwarding_disabled"}"#
    ) >= 1.0));
}

/// A budget per session: `max_channels` channels open at once (more are
/// refused and counted, and a closed one makes room), `max_remote_forwards`
/// `ssh -R` listeners. Channels go over one multiplexed OpenSSH session.
#[test]
fn a_session_has_a_channel_and_listener_budget() {
    if !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = ssh_keygen(dir.path(), "alice");
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/door.yaml",
        &door_doc(
            dir.path(),
            port,
            &[&alice_pub],
            "max_channels: 3\nmax_remote_forwards: 2\n",
        ),
    );
    cfg.loopback_vnet("acme");
    let mg = Meshgate::start(&cfg);
    let ctl = dir.path().join("ctl");
    let _master = Bg(ssh(&alice, port)
        .args(["-M", "-S"])
        .arg(&ctl)
        .args(["-N", "alice@127.0.0.1"])
        .spawn()
        .unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || ctl.exists()),
        "no control socket"
    );
    // A channel held open: `ssh -W` through the master, its stdin kept.
    let channel = || {
        let mut c = ssh(&alice, port)
            .arg("-S")
            .arg(&ctl)
            .args(["-W", &echo.to_string(), "alice@127.0.0.1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(b"ping").unwrap();
        let mut out = c.stdout.take().unwrap();
        let mut b = [0u8; 4];
        let ok = std::io::Read::read_exact(&mut out, &mut b).is_ok() && &b == b"ping";
        (ok, (Bg(c), stdin))
    };
    let mut held = Vec::new();
    for i in 0..3 {
        let (ok, h) = channel();
        assert!(ok, "channel {i} did not work\n{}", mg.log_text());
        held.push(h);
    }
    let (ok, _fourth) = channel();
    assert!(!ok, "a fourth channel opened past max_channels: 3");
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        r#"meshgate_rejected_total{tenant="acme",instance="door",reason="max_channels"}"#
    ) >= 1.0));
    // Closing one makes room.
    drop(held.pop());
    assert!(
        wait_until(Duration::from_secs(5), || channel().0),
        "a closed channel did not make room\n{}",
        mg.log_text()
    );
    // Three `-R` listeners in one session: refused past two.
    let out = ssh(&alice, port)
        // Three different specs (OpenSSH drops a repeated one).
        .args([
            "-N",
            "-R",
            "0:127.0.0.1:1",
            "-R",
            "0:127.0.0.1:2",
            "-R",
            "0:127.0.0.1:3",
            "alice@127.0.0.1",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "three -R listeners with max_remote_forwards: 2"
    );
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        r#"meshgate_rejected_total{tenant="acme",instance="door",reason="max_remote_forwards"}"#
    ) >= 1.0));
}

/// The same through the door's `authorized_keys_file`: the file is
/// watched, and a key taken out of it ends that key's session and `-L`
/// download within a second, with no change to the document.
#[test]
fn removing_a_key_from_the_keys_file_ends_its_sessions() {
    if !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = ssh_keygen(dir.path(), "alice");
    let (bob, bob_pub) = ssh_keygen(dir.path(), "bob");
    let keys = dir.path().join("authorized_keys");
    std::fs::write(&keys, format!("{alice_pub}\n{bob_pub}\n")).unwrap();
    let slow = trickle_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/door.yaml",
        &format!(
            "kind: ssh\nlisten: 127.0.0.1:{port}\nhost_key_file: {}\nauthorized_keys_file: {}\n",
            dir.path().join("host_key").display(),
            keys.display()
        ),
    );
    cfg.loopback_vnet("acme");
    let mg = Meshgate::start(&cfg);
    let (_a, mut a) = held_download(&alice, port, "alice", slow);
    let (_b, mut b) = held_download(&bob, port, "bob", slow);
    let t0 = std::time::Instant::now();
    std::fs::write(&keys, format!("{bob_pub}\n")).unwrap();
    let ended = ended_after(&mut a, t0, || mg.log_text());
    eprintln!("alice's forward ended {ended:?} after the keys file changed");
    assert!(ended < Duration::from_millis(1500), "{ended:?}");
    assert!(keeps_flowing(&mut b), "bob's download ended");
    assert!(mg
        .log_text()
        .contains("authorized_keys_file changed: keys applied"));
}

#[test]
fn a_key_file_with_a_passphrase_is_refused_saying_how_to_remove_it() {
    if !have("ssh-keygen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The same probe on a key without a passphrase loads.
    let (plain, _) = ssh_keygen(dir.path(), "plain");
    meshgate::modules::ssh::keys::load_or_create_key(&plain, "link key").unwrap();
    let locked = dir.path().join("locked");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "secret", "-C", "locked", "-f"])
        .arg(&locked)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen failed");
    let e = meshgate::modules::ssh::keys::load_or_create_key(&locked, "link key").unwrap_err();
    assert!(
        e.contains("passphrase") && e.contains("ssh-keygen -p"),
        "{e}"
    );
}
