//! Stock `wg` (Debian's wireguard-tools) against meshgate, as Cloud-Gateway's
//! users inspect it: `wg show wg0`, `wg show wg0 dump`, `wg showconf`,
//! `wg set` adding a peer that then handshakes, `wg syncconf` removing it.
//! The server is a Cloud-Gateway node from a `conf.yaml`; its clients are
//! wireguard-go, one over IPv6, one over IPv4.
//!
//! `wg` finds interfaces in `/var/run/wireguard`, which every namespace
//! shares; the node's socket goes to a directory of the test's own
//! (`MESHGATE_TENANT__DEFAULT__WG0__UAPI`), and `wg` runs in a private mount
//! namespace where that directory is `/var/run/wireguard`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::netns::{can_netns, link, Netns, NsMeshgate, WgGo};
use common::{have, wait_until};
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
