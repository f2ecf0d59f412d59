//! Stock `wg` (Debian's wireguard-tools) against meshgate, as Cloud-Gateway's
//! users inspect it: `wg show wg0`, `wg show wg0 dump`, `wg showconf`,
//! `wg set` adding a peer that then handshakes, `wg syncconf` removing it.
//! The server is a Cloud-Gateway node from a `conf.yaml`; its clients are
//! wireguard-go, one over IPv6, one over IPv4.
//!
//! A second test does the same on loopback with meshgate nodes only
//! (`uapi: <dir>` in the document): `wg show`, `wg show all dump`, `wg
//! showconf`, and `wg set` adding a node that then carries traffic. A third
//! checks the name rules: one interface name per process, one live socket
//! per path.
//!
//! `wg` finds interfaces in `/var/run/wireguard`, which every namespace
//! shares; the node's socket goes to a directory of the test's own
//! (`uapi:`, or `MESHGATE_TENANT__DEFAULT__WG0__UAPI` over a Cloud-Gateway
//! document), and `wg` runs in a private mount namespace (root) where that
//! directory is `/var/run/wireguard`.

mod common;

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::netns::{can_netns, can_netns_quiet, link, Netns, NsMeshgate, WgGo};
use common::{echo_roundtrip, echo_server, have, wait_until, ConfigDir, Meshgate};
use configstore::cloudgateway::vpn_address;
use meshgate::core::keys::PrivateKey;

/// Runs `wg ARGS` with `dir` as its `/var/run/wireguard`; (success, stdout+stderr).
fn wg(dir: &Path, args: &str) -> (bool, String) {
    let out = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            &format!(
                "mount --bind {} /var/run/wireguard && wg {args}",
                dir.display()
            ),
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A wireguard-go client of the server: its own VPN address, a route to the
/// VPN through its interface.
fn client(ns: &Netns, key: PrivateKey, addr: &str, server_pub: &str, endpoint: &str) -> WgGo {
    let w = WgGo::with_key(ns, key, &format!("{addr}/32"), None);
    w.add_peer(
        ns,
        server_pub,
        &format!("endpoint {endpoint} allowed-ips 10.192.0.0/24 persistent-keepalive 1"),
    );
    ns.sh(&format!("ip route add 10.192.0.0/24 dev {}", w.iface));
    w
}

#[test]
fn stock_wg_shows_and_changes_a_meshgate_interface() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("unshare") || !have("ping") {
        return;
    }
    std::fs::create_dir_all("/var/run/wireguard").unwrap();
    let server = Netns::new("s");
    let c1 = Netns::new("a");
    let c2 = Netns::new("b");
    link(
        &server,
        "10.233.1.1/24,fd00:233::1/64",
        &c1,
        "10.233.1.2/24,fd00:233::2/64",
    );
    link(&server, "10.233.2.1/24", &c2, "10.233.2.2/24");

    // Keys whose Cloud-Gateway addresses differ.
    let (s_key, k1) = loop {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        if vpn_address(&a.public_key().to_string()) != vpn_address(&b.public_key().to_string()) {
            break (a, b);
        }
    };
    let (s_pub, c1_pub) = (s_key.public_key().to_string(), k1.public_key().to_string());
    let (s_vpn, c1_vpn) = (vpn_address(&s_pub), vpn_address(&c1_pub));

    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("conf.yaml"),
        format!(
            "type: server\nname: server\npublic_key: {s_pub}\nprivate_key: {}\npeers:\n  - name: client\n    public_key: {c1_pub}\npipes:\n  - name: nginx\n    port: 8080\n    remote: nginx:80\n",
            s_key.to_base64()
        ),
    )
    .unwrap();
    let sock_dir = tempfile::tempdir().unwrap();
    let _mg = {
        // The socket directory is an env override over the Cloud-Gateway store.
        std::env::set_var("MESHGATE_TENANT__DEFAULT__WG0__UAPI", sock_dir.path());
        let mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");
        std::env::remove_var("MESHGATE_TENANT__DEFAULT__WG0__UAPI");
        mg
    };
    let sock = sock_dir.path().join("wg0.sock");
    assert!(sock.exists(), "no socket at {}", sock.display());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket carries the private key");

    // Client one over IPv6.
    let w1 = client(&c1, k1, &c1_vpn.to_string(), &s_pub, "[fd00:233::1]:8765");
    let ping = c1.try_sh(&format!("ping -c 2 -i 0.2 -W 3 {s_vpn}"));
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let (ok, show) = wg(sock_dir.path(), "show wg0");
    assert!(ok, "{show}");
    for want in [
        "interface: wg0".to_string(),
        format!("public key: {s_pub}"),
        "private key: (hidden)".into(),
        "listening port: 8765".into(),
        format!("peer: {c1_pub}"),
        "endpoint: [fd00:233::2]:".into(),
        format!("allowed ips: {c1_vpn}/32"),
        "latest handshake:".into(),
        "transfer:".into(),
    ] {
        assert!(show.contains(&want), "`{want}` missing from:\n{show}");
    }
    assert!(
        !show.contains(&s_key.to_base64()),
        "wg show printed the private key"
    );

    // `wg show all dump`: one interface line, one peer line, tab-separated.
    let (ok, dump) = wg(sock_dir.path(), "show wg0 dump");
    assert!(ok, "{dump}");
    let lines: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{dump}");
    assert_eq!(lines[0][1], s_pub);
    assert_eq!(lines[0][2], "8765");
    assert_eq!(lines[1][0], c1_pub);
    assert_eq!(lines[1][3], format!("{c1_vpn}/32"));
    assert!(
        lines[1][4].parse::<u64>().unwrap() > 0,
        "latest handshake: {dump}"
    );

    // showconf prints the private key: that is what the 0600 socket is for.
    let (ok, conf) = wg(sock_dir.path(), "showconf wg0");
    assert!(ok, "{conf}");
    assert!(
        conf.contains(&format!("PrivateKey = {}", s_key.to_base64())),
        "{conf}"
    );
    assert!(conf.contains("ListenPort = 8765"), "{conf}");

    // `wg set` adds client two (IPv4), which then handshakes.
    let k2 = PrivateKey::generate();
    let c2_pub = k2.public_key().to_string();
    let (ok, out) = wg(
        sock_dir.path(),
        &format!("set wg0 peer {c2_pub} allowed-ips 10.192.0.254/32"),
    );
    assert!(ok, "wg set: {out}");
    let _w2 = client(&c2, k2, "10.192.0.254", &s_pub, "10.233.2.1:8765");
    let ping = c2.try_sh(&format!("ping -c 2 -i 0.2 -W 3 {s_vpn}"));
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // And it reaches client one through the hub.
    let ping = c2.try_sh(&format!("ping -c 1 -W 3 {c1_vpn}"));
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let (_, show) = wg(sock_dir.path(), "show wg0");
    assert!(show.contains(&format!("peer: {c2_pub}")), "{show}");
    assert!(show.contains("endpoint: 10.233.2.2:"), "{show}");
    assert!(show.contains("allowed ips: 10.192.0.254/32"), "{show}");
    assert_eq!(show.matches("latest handshake").count(), 2, "{show}");
    assert!(
        _mg.log_text().contains("configuration changed with `wg`"),
        "{}",
        _mg.log_text()
    );

    // `wg syncconf` to a config without client two removes it live.
    let (_, conf) = wg(sock_dir.path(), "showconf wg0");
    let without: String = conf
        .split("\n\n")
        .filter(|section| !section.contains(&c2_pub))
        .collect::<Vec<_>>()
        .join("\n\n");
    let f = sock_dir.path().join("wg0.conf");
    std::fs::write(&f, without).unwrap();
    let (ok, out) = wg(sock_dir.path(), &format!("syncconf wg0 {}", f.display()));
    assert!(ok, "wg syncconf: {out}");
    let gone = wait_until(Duration::from_secs(3), || {
        !wg(sock_dir.path(), "show wg0").1.contains(&c2_pub)
    });
    assert!(gone);
    assert!(wg(sock_dir.path(), "show wg0").1.contains(&c1_pub));

    // A refused change keeps the old config: an allowed IP another peer owns.
    let (ok, out) = wg(
        sock_dir.path(),
        &format!("set wg0 peer {c2_pub} allowed-ips {c1_vpn}/32"),
    );
    assert!(!ok, "{out}");
    assert!(out.contains("Invalid argument"), "{out}");
    let ping = c1.try_sh(&format!("ping -c 1 -W 3 {s_vpn}"));
    assert!(ping.status.success());
    drop(w1);
}

/// A UDP port free on loopback right now.
fn free_udp_port() -> u16 {
    // Free for TCP and UDP, outside the ephemeral range.
    common::free_port()
}

/// A WireGuard client node: `address`, one peer `hub` at `hub_port`, and a
/// pipe from 127.0.0.1:`pipe_port` through the tunnel to the hub's echo.
fn client_node(
    key: &PrivateKey,
    port: u16,
    address: &str,
    hub_pub: &str,
    hub_port: u16,
) -> (ConfigDir, u16) {
    let cfg = ConfigDir::new();
    cfg.write(
        "tenants/default/wg0.yaml",
        &format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: {port}\naddress: {address}/32\nuapi: off\npeers:\n  - name: hub\n    public_key: {hub_pub}\n    endpoint: 127.0.0.1:{hub_port}\n    allowed_ips: [10.192.0.0/24]\n",
            key.to_base64()
        ),
    );
    let pipe_port = common::free_port();
    cfg.write(
        "tenants/default/echo.yaml",
        &format!("kind: pipe\nlisten: 127.0.0.1:{pipe_port}\nvia: wg0\nremote: 10.192.0.1:7000\nconnect_timeout: 2s\n"),
    );
    (cfg, pipe_port)
}

/// An echo round trip through a client's pipe (and so the tunnel), retried
/// while the handshake runs.
fn echo_through(pipe_port: u16, within: Duration) -> bool {
    wait_until(within, || {
        TcpStream::connect(("127.0.0.1", pipe_port))
            .and_then(|mut s| echo_roundtrip(&mut s, b"through the tunnel"))
            .is_ok_and(|back| back == b"through the tunnel")
    })
}

#[test]
fn stock_wg_drives_meshgate_nodes_on_loopback() {
    if !have("wg") || !have("unshare") {
        return;
    }
    if !can_netns_quiet() {
        common::skip("`wg` runs in a private mount namespace here (unshare -m + mount --bind), which needs root");
        return;
    }
    let (ka, kb, kc) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let (a_pub, b_pub, c_pub) = (
        ka.public_key().to_string(),
        kb.public_key().to_string(),
        kc.public_key().to_string(),
    );
    let (pa, pb, pc) = (free_udp_port(), free_udp_port(), free_udp_port());
    let sock_dir = tempfile::tempdir().unwrap();
    let echo = echo_server();

    // The hub: interface `mgt0`, its socket in our directory, one peer (b)
    // and an echo service on its VPN address.
    let a = ConfigDir::new();
    a.write(
        "tenants/default/wg0.yaml",
        &format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: {pa}\naddress: 10.192.0.1/24\ninterface: mgt0\nuapi: {}\npeers:\n  - name: b\n    public_key: {b_pub}\n    endpoint: 127.0.0.1:{pb}\n    allowed_ips: [10.192.0.2/32]\n",
            ka.to_base64(),
            sock_dir.path().display()
        ),
    );
    a.write(
        "tenants/default/echo.yaml",
        &format!("kind: pipe\nlisten: 10.192.0.1:7000\nlisten_via: wg0\nremote: {echo}\n"),
    );
    let mg_a = Meshgate::start(&a);
    let (b, b_pipe) = client_node(&kb, pb, "10.192.0.2", &a_pub, pa);
    let _mg_b = Meshgate::start(&b);
    // c knows the hub; the hub does not know c yet.
    let (c, c_pipe) = client_node(&kc, pc, "10.192.0.9", &a_pub, pa);
    let mg_c = Meshgate::start(&c);

    let sock = sock_dir.path().join("mgt0.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket carries the private key");

    assert!(
        echo_through(b_pipe, Duration::from_secs(10)),
        "b cannot reach the hub"
    );
    let (ok, show) = wg(sock_dir.path(), "show mgt0");
    assert!(ok, "{show}");
    for want in [
        "interface: mgt0".to_string(),
        format!("public key: {a_pub}"),
        "private key: (hidden)".into(),
        format!("listening port: {pa}"),
        format!("peer: {b_pub}"),
        format!("endpoint: 127.0.0.1:{pb}"),
        "allowed ips: 10.192.0.2/32".into(),
        "latest handshake:".into(),
        "transfer:".into(),
    ] {
        assert!(show.contains(&want), "`{want}` missing from:\n{show}");
    }
    assert!(
        !show.contains(&ka.to_base64()),
        "wg show printed the private key"
    );

    let (ok, conf) = wg(sock_dir.path(), "showconf mgt0");
    assert!(ok, "{conf}");
    assert!(
        conf.contains(&format!("PrivateKey = {}", ka.to_base64())),
        "{conf}"
    );
    assert!(conf.contains(&format!("ListenPort = {pa}")), "{conf}");

    // c cannot get through before the hub knows it.
    assert!(!echo_through(c_pipe, Duration::from_millis(500)));
    let (ok, out) = wg(
        sock_dir.path(),
        &format!("set mgt0 peer {c_pub} allowed-ips 10.192.0.9/32 endpoint 127.0.0.1:{pc}"),
    );
    assert!(ok, "wg set: {out}");
    assert!(
        echo_through(c_pipe, Duration::from_secs(20)),
        "c cannot reach the hub after `wg set`:\n{}",
        mg_a.log_text()
    );
    let c_status = mg_c.json("/api/v1/modules");
    let c_wg = c_status
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["kind"] == "wireguard")
        .unwrap();
    assert!(
        c_wg["details"]["peers"][0]["latest_handshake_secs"].is_u64(),
        "{c_status}"
    );
    let (_, show) = wg(sock_dir.path(), "show mgt0");
    assert!(show.contains(&format!("peer: {c_pub}")), "{show}");
    assert!(show.contains("allowed ips: 10.192.0.9/32"), "{show}");
    assert_eq!(show.matches("latest handshake").count(), 2, "{show}");
    // The peer the API added has a name derived from its key.
    let a_status = mg_a.json("/api/v1/modules");
    let short: String = c_pub
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    assert!(
        a_status.to_string().contains(&format!("key-{short}")),
        "{a_status}"
    );

    // `wg show all dump`: tab-separated, an interface line of 5 fields and
    // a line of 9 per peer, each starting with the interface's name.
    let (ok, dump) = wg(sock_dir.path(), "show all dump");
    assert!(ok, "{dump}");
    let lines: Vec<Vec<&str>> = dump
        .lines()
        .filter(|l| l.starts_with("mgt0\t"))
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(lines.len(), 3, "{dump}");
    let pa_text = pa.to_string();
    assert_eq!(
        lines[0],
        vec![
            "mgt0",
            ka.to_base64().as_str(),
            a_pub.as_str(),
            pa_text.as_str(),
            "off"
        ]
    );
    for peer in &lines[1..] {
        assert_eq!(peer.len(), 9, "{dump}");
        assert!(peer[1] == b_pub || peer[1] == c_pub, "{dump}");
        assert_eq!(peer[2], "(none)");
        assert!(peer[3].starts_with("127.0.0.1:"), "{dump}");
        for n in &peer[5..8] {
            assert!(n.parse::<u64>().unwrap() > 0, "{dump}");
        }
        assert_eq!(peer[8], "off");
    }

    let log = mg_a.log_text();
    assert!(
        log.contains("configuration changed with `wg` over the UAPI socket"),
        "{log}"
    );
    assert!(!log.contains(&ka.to_base64()), "private key logged");

    // A new private key restarts the interface on the same port.
    let new_key = PrivateKey::generate();
    let key_file = sock_dir.path().join("new.key");
    std::fs::write(&key_file, new_key.to_base64()).unwrap();
    let (ok, out) = wg(
        sock_dir.path(),
        &format!("set mgt0 private-key {}", key_file.display()),
    );
    assert!(ok, "wg set private-key: {out}");
    let (ok, show) = wg(sock_dir.path(), "show mgt0");
    assert!(ok, "{show}");
    assert!(
        show.contains(&format!("public key: {}", new_key.public_key())),
        "{show}"
    );
    assert!(show.contains(&format!("listening port: {pa}")), "{show}");
    // A port in use is refused with EADDRINUSE; the interface stays as it was.
    let taken = std::net::UdpSocket::bind("[::]:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (ok, out) = wg(
        sock_dir.path(),
        &format!("set mgt0 listen-port {taken_port}"),
    );
    assert!(!ok && out.contains("Address already in use"), "{out}");
    let (ok, show) = wg(sock_dir.path(), "show mgt0");
    assert!(
        ok && show.contains(&format!("listening port: {pa}")),
        "{show}"
    );
    assert_eq!(show.matches("peer: ").count(), 2, "{show}");

    // Stop: the socket goes with the process.
    mg_a.signal("TERM");
    assert!(
        wait_until(Duration::from_secs(5), || !sock.exists()),
        "socket left behind"
    );
}

/// Runs meshgate on `cfg` expecting it to refuse to start; its stderr.
fn refused_start(cfg: &ConfigDir) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--config-dir")
        .arg(cfg.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited && !out.status.success(), "meshgate started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn interface_names_are_unique_per_process_and_sockets_per_path() {
    let wg_doc = |name: &str, uapi: &str| {
        format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.192.0.1/24\ninterface: {name}\nuapi: {uapi}\n",
            PrivateKey::generate().to_base64()
        )
    };
    // Two instances of one process, one name: an error naming both.
    let cfg = ConfigDir::new();
    cfg.write("tenants/t1/wg1.yaml", &wg_doc("mgdup", "off"));
    cfg.write("tenants/t2/wg2.yaml", &wg_doc("mgdup", "off"));
    let err = refused_start(&cfg);
    assert!(
        err.contains("WireGuard interface name `mgdup` is already claimed by"),
        "{err}"
    );
    // `--check` finds it too, without starting anything.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--config-dir")
        .arg(cfg.path())
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("`mgdup` is already claimed by tenants/t1/wg1.yaml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(err.contains("t1/wg1") && err.contains("t2/wg2"), "{err}");

    // Default names longer than Linux's 15 characters that share their
    // first 15: both start, each with its own socket.
    let sock_dir = tempfile::tempdir().unwrap();
    let dir = sock_dir.path().display().to_string();
    let long = ConfigDir::new();
    for i in ["wg1", "wg2"] {
        long.write(
            &format!("tenants/a-very-long-tenant-name/{i}.yaml"),
            &format!(
                "kind: wireguard\nprivate_key: {}\naddress: 10.192.0.1/24\nuapi: {dir}\n",
                PrivateKey::generate().to_base64()
            ),
        );
    }
    let mg = Meshgate::start(&long);
    let socks: Vec<String> = std::fs::read_dir(sock_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(socks.len(), 2, "{socks:?}");
    for s in &socks {
        let name = s.strip_suffix(".sock").unwrap();
        assert!(name.len() <= 15 && name.starts_with("a-very-lon-"), "{s}");
        let (ok, out) = wg(sock_dir.path(), &format!("show {name}"));
        assert!(ok && out.contains("public key"), "{out}");
    }
    drop(mg);

    // A live socket of another process at an explicit `uapi:` path: refused.
    let sock_dir = tempfile::tempdir().unwrap();
    let dir = sock_dir.path().display().to_string();
    let first = ConfigDir::new();
    first.write("tenants/default/wg0.yaml", &wg_doc("mglive", &dir));
    let _mg = Meshgate::start(&first);
    let second = ConfigDir::new();
    second.write("tenants/default/wg0.yaml", &wg_doc("mglive", &dir));
    let err = refused_start(&second);
    assert!(
        err.contains("key `uapi`") && err.contains("another live process"),
        "{err}"
    );
    assert!(
        sock_dir.path().join("mglive.sock").exists(),
        "the live socket was removed"
    );

    // A stale socket (its process killed): replaced.
    let mut killed = _mg;
    killed.signal("KILL");
    let _ = killed.child.wait();
    assert!(
        sock_dir.path().join("mglive.sock").exists(),
        "SIGKILL leaves it"
    );
    let _mg = Meshgate::start(&second);
    assert!(std::os::unix::net::UnixStream::connect(sock_dir.path().join("mglive.sock")).is_ok());
}
