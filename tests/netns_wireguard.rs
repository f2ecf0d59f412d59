//! End-to-end WireGuard tests in network namespaces with real peers:
//! wireguard-go configured by `wg`, nginx, curl, ping. Root only.

mod common;

use std::time::Duration;

use common::netns::*;
use common::*;

/// meshgate's config dir for a WireGuard server with one pipe on its VPN address.
fn server_config(
    key: &str,
    port: u16,
    peers: &str,
    admin: &str,
    pipe_remote: &str,
) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("meshgate.yaml"),
        format!("node: server\nadmin: {admin}\ndrain_timeout: 1s\n"),
    )
    .unwrap();
    std::fs::create_dir_all(d.path().join("tenants/default")).unwrap();
    std::fs::write(
        d.path().join("tenants/default/wg0.yaml"),
        format!("kind: wireguard\nprivate_key: {key}\nlisten_port: {port}\naddress: 10.192.0.1/24\npeers:\n{peers}"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("tenants/default/web.yaml"),
        format!("kind: pipe\nlisten: 10.192.0.1:8080\nlisten_via: wg0\nremote: {pipe_remote}\n"),
    )
    .unwrap();
    d
}

/// A meshgate server (its pipe to nginx on 127.0.0.1:8081) and a
/// wireguard-go client `wgo` at 10.192.0.2, joined by a veth on
/// 10.231.{net}.0/24 (server .1, client .2). meshgate is not started yet.
struct WgoClient {
    server: Netns,
    client: Netns,
    wg: WgGo,
    key: meshgate::core::keys::PrivateKey,
    cfg: tempfile::TempDir,
    _nginx: tempfile::TempDir,
}

fn wgo_client_of_meshgate(net: u8, body: &str) -> WgoClient {
    let mut server = Netns::new("s");
    let client = Netns::new("c");
    link(
        &server,
        &format!("10.231.{net}.1/24"),
        &client,
        &format!("10.231.{net}.2/24"),
    );
    let nginx = nginx_in(&mut server, "127.0.0.1:8081", body);
    let wg = WgGo::new(&client, "10.192.0.2/24", None);
    let key = meshgate::core::keys::PrivateKey::generate();
    let cfg = server_config(
        &key.to_base64(),
        51820,
        &format!(
            "  - name: wgo\n    public_key: {}\n    allowed_ips: [10.192.0.2/32]\n",
            wg.public_key()
        ),
        "127.0.0.1:9000",
        "127.0.0.1:8081",
    );
    WgoClient {
        server,
        client,
        wg,
        key,
        cfg,
        _nginx: nginx,
    }
}

#[test]
fn wireguard_go_client_pings_and_curls_meshgate_then_survives_a_restart() {
    if !can_netns()
        || !have("wireguard-go")
        || !have("wg")
        || !have("nginx")
        || !have("curl")
        || !have("ping")
    {
        return;
    }
    let WgoClient {
        server,
        client,
        wg,
        key: mg_key,
        cfg,
        _nginx,
    } = wgo_client_of_meshgate(0, "legacy nginx says hi\n");
    let mut mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");
    wg.add_peer(
        &client,
        &mg_key.public_key().to_string(),
        "endpoint 10.231.0.1:51820 allowed-ips 10.192.0.0/24",
    );

    // Ping meshgate's VPN address from the wireguard-go side.
    let ping = client.try_sh("ping -c 3 -i 0.2 -W 2 10.192.0.1");
    assert!(
        ping.status.success(),
        "ping failed: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    // curl a pipe that listens on meshgate's VPN address.
    let (status, body) = client.curl("http://10.192.0.1:8080/", 10);
    assert_eq!((status, body.as_str()), (200, "legacy nginx says hi\n"));

    // `wg show` on the wireguard-go side sees the handshake and traffic.
    let show = client.sh(&format!("wg show {}", wg.iface));
    assert!(show.contains("latest handshake"), "{show}");
    assert!(show.contains("transfer"), "{show}");

    // meshgatectl wg show, inside the server namespace.
    let out = server
        .cmd(env!("CARGO_BIN_EXE_meshgatectl"))
        .args(["--admin", "127.0.0.1:9000", "wg", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("public key: {}", mg_key.public_key())),
        "{text}"
    );
    assert!(
        text.contains(&format!("peer: {}", wg.public_key())),
        "{text}"
    );
    assert!(text.contains("latest handshake"), "{text}");
    assert!(text.contains("endpoint: 10.231.0.2:"), "{text}");

    // Restart the server process; the client is not touched. The restarted
    // server sends nothing to the unauthenticated source of the client's
    // session-less data (no reflection): the client re-handshakes on its own
    // once its data goes unanswered (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, 15 s),
    // as with the kernel's WireGuard.
    mg.kill();
    let mut mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");
    let t0 = std::time::Instant::now();
    let ok = wait_until(Duration::from_secs(35), || {
        client.curl("http://10.192.0.1:8080/", 2).0 == 200
    });
    assert!(
        ok,
        "no curl through the tunnel within 35 s of the restart:\n{}",
        mg.log_text()
    );
    eprintln!("tunnel back {:?} after the restart", t0.elapsed());
    assert!(
        mg.metric_sum(&server, "meshgate_wg_dropped_packets_total{") >= 1.0,
        "the old session's packets were dropped and counted"
    );
    mg.kill();
}

#[test]
fn meshgate_client_reaches_nginx_behind_a_wireguard_go_server() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("curl") {
        return;
    }
    let mut server = Netns::new("s");
    let client = Netns::new("c");
    link(&server, "10.231.1.1/24", &client, "10.231.1.2/24");
    let wg = WgGo::new(&server, "10.192.0.1/24", Some(51820));
    let _nginx = nginx_in(&mut server, "10.192.0.1:80", "behind wireguard-go\n");

    let mg_key = meshgate::core::keys::PrivateKey::generate();
    wg.add_peer(
        &server,
        &mg_key.public_key().to_string(),
        "allowed-ips 10.192.0.2/32",
    );
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("meshgate.yaml"),
        "node: client\nadmin: 127.0.0.1:9000\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.path().join("tenants/default")).unwrap();
    std::fs::write(
        d.path().join("tenants/default/wg0.yaml"),
        format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.192.0.2/32\npeers:\n  - name: server\n    public_key: {}\n    endpoint: 10.231.1.1:51820\n    allowed_ips: [10.192.0.0/24]\n    persistent_keepalive: 25\n",
            mg_key.to_base64(),
            wg.public_key()
        ),
    )
    .unwrap();
    std::fs::write(
        d.path().join("tenants/default/web.yaml"),
        "kind: pipe\nlisten: 127.0.0.1:8080\nvia: wg0\nremote: 10.192.0.1:80\n",
    )
    .unwrap();
    let _mg = NsMeshgate::start(&client, d.path(), "127.0.0.1:9000");
    let (status, body) = client.curl("http://127.0.0.1:8080/", 10);
    assert_eq!((status, body.as_str()), (200, "behind wireguard-go\n"));
    let show = server.sh(&format!("wg show {}", wg.iface));
    assert!(show.contains("latest handshake"), "{show}");
}

/// Two tenants on one server, both 10.1.0.0/16 with the same client and
/// backend addresses. Each tenant's traffic reaches only its own side, in
/// both directions; a spoofed source and a client aimed at the other
/// tenant's port are dropped and counted.
#[test]
fn tenants_with_overlapping_networks_never_meet() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("curl") {
        return;
    }
    let mut server = Netns::new("s");
    let mut c1 = Netns::new("a");
    let mut c2 = Netns::new("b");
    link(&server, "10.231.2.1/24", &c1, "10.231.2.2/24");
    link(&server, "10.231.3.1/24", &c2, "10.231.3.2/24");
    let _b1 = nginx_in(&mut server, "127.0.0.1:9091", "backend of tenant one\n");
    let _b2 = nginx_in(&mut server, "127.0.0.1:9092", "backend of tenant two\n");

    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("meshgate.yaml"),
        "node: server\nadmin: 127.0.0.1:9000\n",
    )
    .unwrap();
    let mut clients = Vec::new();
    let mut _nginxes = Vec::new();
    for (i, ns) in [&mut c1, &mut c2].into_iter().enumerate() {
        let n = i + 1;
        let wg = WgGo::new(ns, "10.1.0.2/16", None);
        _nginxes.push(nginx_in(
            ns,
            "10.1.0.2:80",
            &format!("client of tenant {n}\n"),
        ));
        let key = meshgate::core::keys::PrivateKey::generate();
        let t = cfg.path().join(format!("tenants/t{n}"));
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(
            t.join("wg0.yaml"),
            format!(
                "kind: wireguard\nprivate_key: {}\nlisten_port: 5182{n}\naddress: 10.1.0.1/16\npeers:\n  - name: client\n    public_key: {}\n    allowed_ips: [10.1.0.2/32]\n",
                key.to_base64(),
                wg.public_key()
            ),
        )
        .unwrap();
        std::fs::write(
            t.join("in.yaml"),
            format!(
                "kind: pipe\nlisten: 10.1.0.1:8080\nlisten_via: wg0\nremote: 127.0.0.1:909{n}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            t.join("out.yaml"),
            format!("kind: pipe\nlisten: 127.0.0.1:808{n}\nvia: wg0\nremote: 10.1.0.2:80\n"),
        )
        .unwrap();
        wg.add_peer(
            ns,
            &key.public_key().to_string(),
            &format!(
                "endpoint 10.231.{}.1:5182{n} allowed-ips 10.1.0.0/16",
                n + 1
            ),
        );
        clients.push((wg, key));
    }
    let mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");

    // Client → server: each client reaches its own tenant's backend.
    assert_eq!(
        c1.curl("http://10.1.0.1:8080/", 10),
        (200, "backend of tenant one\n".into())
    );
    assert_eq!(
        c2.curl("http://10.1.0.1:8080/", 10),
        (200, "backend of tenant two\n".into())
    );
    // Server → client: each tenant's pipe reaches its own client's 10.1.0.2.
    assert_eq!(
        server.curl("http://127.0.0.1:8081/", 10),
        (200, "client of tenant 1\n".into())
    );
    assert_eq!(
        server.curl("http://127.0.0.1:8082/", 10),
        (200, "client of tenant 2\n".into())
    );

    // A spoofed inner source (10.1.0.3 is not client 1's allowed IP).
    c1.sh(&format!(
        "ip addr add 10.1.0.3/32 dev {}",
        clients[0].0.iface
    ));
    let spoof = c1.try_sh("curl -s --max-time 2 --interface 10.1.0.3 http://10.1.0.1:8080/");
    assert!(!spoof.status.success(), "spoofed source was served");
    let spoofed = r#"meshgate_wg_dropped_packets_total{tenant="t1",instance="wg0",peer="client",reason="source_not_allowed"}"#;
    assert!(mg.metric(&server, spoofed) >= 1.0);

    // Client 1 aimed at tenant two's port: its packets are not for t2's key.
    let t2_drops = r#"meshgate_wg_dropped_packets_total{tenant="t2""#;
    let before = mg.metric_sum(&server, t2_drops);
    let (wg1, key1) = &clients[0];
    wg1.add_peer(
        &c1,
        &key1.public_key().to_string(),
        "endpoint 10.231.2.1:51822",
    );
    let (status, _) = c1.curl("http://10.1.0.1:8080/", 3);
    assert_eq!(status, 0, "client 1 got an answer from tenant two's port");
    assert!(
        mg.metric_sum(&server, t2_drops) > before,
        "tenant two did not count client 1's packets"
    );
    // Nothing of client 1 ever reached tenant two's backend or client.
    assert_eq!(
        mg.metric(
            &server,
            r#"meshgate_connections_total{tenant="t2",instance="in"}"#
        ),
        1.0
    );
}

/// Two tenants' instances (the same addresses, 10.1.0.1/16) and 50 idle
/// ones of a third share UDP port 51820: each wireguard-go client reaches
/// its own tenant's backend through the one port, and a client that knows
/// the other tenant's key reaches nothing there.
#[test]
fn tenants_sharing_one_udp_port_never_meet() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("curl") {
        return;
    }
    let mut server = Netns::new("s");
    let mut c1 = Netns::new("a");
    let mut c2 = Netns::new("b");
    link(&server, "10.231.20.1/24", &c1, "10.231.20.2/24");
    link(&server, "10.231.21.1/24", &c2, "10.231.21.2/24");
    let _b1 = nginx_in(&mut server, "127.0.0.1:9091", "backend of tenant one\n");
    let _b2 = nginx_in(&mut server, "127.0.0.1:9092", "backend of tenant two\n");

    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("meshgate.yaml"),
        "node: server\nadmin: 127.0.0.1:9000\n",
    )
    .unwrap();
    // The idle neighbours, sharing the port (their MAC1 is checked too).
    let idle = cfg.path().join("tenants/idle");
    std::fs::create_dir_all(&idle).unwrap();
    for i in 0..50 {
        std::fs::write(
            idle.join(format!("wg{i}.yaml")),
            format!(
                "kind: wireguard\nprivate_key: {}\nlisten_port: 51820\nshare_port: true\nuapi: off\naddress: 10.9.{i}.1/24\n",
                meshgate::core::keys::PrivateKey::generate().to_base64()
            ),
        )
        .unwrap();
    }
    let mut clients = Vec::new();
    let mut keys = Vec::new();
    for (i, ns) in [&mut c1, &mut c2].into_iter().enumerate() {
        let n = i + 1;
        let wg = WgGo::new(ns, "10.1.0.2/16", None);
        let key = meshgate::core::keys::PrivateKey::generate();
        let t = cfg.path().join(format!("tenants/s{n}"));
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(
            t.join("wg0.yaml"),
            format!(
                "kind: wireguard\nprivate_key: {}\nlisten_port: 51820\nshare_port: true\naddress: 10.1.0.1/16\npeers:\n  - name: client\n    public_key: {}\n    allowed_ips: [10.1.0.2/32]\n",
                key.to_base64(),
                wg.public_key()
            ),
        )
        .unwrap();
        std::fs::write(
            t.join("in.yaml"),
            format!(
                "kind: pipe\nlisten: 10.1.0.1:8080\nlisten_via: wg0\nremote: 127.0.0.1:909{n}\n"
            ),
        )
        .unwrap();
        wg.add_peer(
            ns,
            &key.public_key().to_string(),
            &format!("endpoint 10.231.{}.1:51820 allowed-ips 10.1.0.0/16", 19 + n),
        );
        clients.push(wg);
        keys.push(key);
    }
    let mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");

    // Each client reaches its own tenant's backend, through the one port.
    assert_eq!(
        c1.curl("http://10.1.0.1:8080/", 10),
        (200, "backend of tenant one\n".into())
    );
    assert_eq!(
        c2.curl("http://10.1.0.1:8080/", 10),
        (200, "backend of tenant two\n".into())
    );
    let port = |name: &str| {
        mg.metric(
            &server,
            &format!("meshgate_wg_port_{name}{{port=\"51820\"}}"),
        )
    };
    assert_eq!(port("members"), 52.0);
    assert!(port("initiations_total") >= 2.0);
    assert!(port("mac1_checks_total") >= port("initiations_total"));
    // `wg` sees each instance on the shared port.
    let show = server.sh("wg show s1-wg0 listen-port");
    assert_eq!(show.trim(), "51820");

    // A flood of junk initiations (random bytes, so no MAC1 matches) from
    // a third host with 16 addresses, while both tenants' clients go on
    // and client 1 is made to handshake again. Each flooding address gets
    // its few scans a second; the rest is refused before any MAC1 check
    // and counted; client 1's new initiation is routed by its address's
    // hint, in one check.
    let x = Netns::new("x");
    let (_, x_if) = link(&server, "10.231.22.1/24", &x, "10.231.22.2/24");
    for i in 3..=17 {
        x.sh(&format!("ip addr add 10.231.22.{i}/24 dev {x_if}"));
    }
    let unrouted = |reason: &str| {
        let (_, body) = server.curl("http://127.0.0.1:9000/metrics", 3);
        body.lines()
            .filter(|l| {
                l.starts_with("meshgate_wg_port_unrouted_datagrams_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let (rate0, nomatch0, hints0) = (
        unrouted("scan_rate"),
        unrouted("no_mac1_match"),
        port("hint_hits_total"),
    );
    let flood = x
        .cmd("python3")
        .arg("-c")
        .arg(
            "import os, socket, time\n\
             socks = []\n\
             for i in range(2, 18):\n\
             \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             \x20   s.bind(('10.231.22.%d' % i, 0)); s.setblocking(False); socks.append(s)\n\
             n, end = 0, time.time() + 4\n\
             while time.time() < end:\n\
             \x20   for s in socks:\n\
             \x20       try:\n\
             \x20           s.sendto(b'\\x01\\x00\\x00\\x00' + os.urandom(144), ('10.231.22.1', 51820)); n += 1\n\
             \x20       except OSError:\n\
             \x20           pass\n\
             print(n)\n",
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let server_key = keys[0].public_key().to_string();
    c1.sh(&format!(
        "wg set {} peer {server_key} remove",
        clients[0].iface
    ));
    clients[0].add_peer(
        &c1,
        &server_key,
        "endpoint 10.231.20.1:51820 allowed-ips 10.1.0.0/16",
    );
    assert_eq!(
        c1.curl("http://10.1.0.1:8080/", 10),
        (200, "backend of tenant one\n".into()),
        "client 1, handshaking during the flood"
    );
    assert_eq!(
        c2.curl("http://10.1.0.1:8080/", 10),
        (200, "backend of tenant two\n".into()),
        "client 2, during the flood"
    );
    let out = flood.wait_with_output().unwrap();
    let sent: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    let (rate, nomatch) = (
        unrouted("scan_rate") - rate0,
        unrouted("no_mac1_match") - nomatch0,
    );
    assert!(sent >= 10_000.0, "the flood sent {sent} datagrams");
    eprintln!("flood: {sent} junk initiations sent, {rate} refused by the per-source scan rate, {nomatch} scanned without a match");
    let (rate, nomatch) = (
        unrouted("scan_rate") - rate0,
        unrouted("no_mac1_match") - nomatch0,
    );
    assert!(
        rate >= 5_000.0,
        "{rate} of {sent} junk initiations refused by the per-source scan rate\n{}",
        mg.log_text()
    );
    // 16 sources, each 4 scans at once and 2 a second after, over the
    // flood's 4 s and a margin.
    assert!(
        (1.0..=16.0 * (4.0 + 2.0 * 6.0)).contains(&nomatch),
        "{nomatch} scans found no MAC1 match"
    );
    assert!(
        port("hint_hits_total") > hints0,
        "client 1 routed by its hint"
    );

    // Client 1 is given tenant two's public key as its server: MAC1 takes
    // its initiation to tenant two, which has no such peer.
    let t2_unknown = r#"meshgate_wg_dropped_packets_total{tenant="s2",instance="wg0",peer="-",reason="unknown_peer"}"#;
    let before = mg.metric(&server, t2_unknown);
    let t2_conns = r#"meshgate_connections_total{tenant="s2",instance="in"}"#;
    let conns_before = mg.metric(&server, t2_conns);
    assert_eq!(conns_before, 2.0, "client 2's two requests");
    clients[0].add_peer(
        &c1,
        &keys[1].public_key().to_string(),
        "endpoint 10.231.20.1:51820 allowed-ips 10.1.0.0/16",
    );
    let (status, _) = c1.curl("http://10.1.0.1:8080/", 3);
    assert_eq!(status, 0, "client 1 got an answer from tenant two");
    assert!(
        mg.metric(&server, t2_unknown) > before,
        "tenant two did not count client 1's initiations"
    );
    assert_eq!(
        mg.metric(&server, t2_conns),
        conns_before,
        "only client 2 ever reached tenant two's backend"
    );
}

/// A server holding a /24 forwards between its peers: two wireguard-go
/// A hub: meshgate in `server` with peers `one` (10.192.0.2, wireguard-go
/// in `c1`) and `two` (10.192.0.3 in `c2`), on veths 10.231.`net`.0/24 and
/// 10.231.`net+1`.0/24; `more` writes documents into the tenant before it
/// starts. Both peers have a session when it returns.
struct Hub {
    server: Netns,
    c1: Netns,
    _c2: Netns,
    _w: (WgGo, WgGo),
    mg: NsMeshgate,
    _cfg: tempfile::TempDir,
}

fn hub(net: u8, more: impl FnOnce(&std::path::Path)) -> Hub {
    let server = Netns::new("s");
    let c1 = Netns::new("a");
    let c2 = Netns::new("b");
    link(
        &server,
        &format!("10.231.{net}.1/24"),
        &c1,
        &format!("10.231.{net}.2/24"),
    );
    link(
        &server,
        &format!("10.231.{}.1/24", net + 1),
        &c2,
        &format!("10.231.{}.2/24", net + 1),
    );
    let w1 = WgGo::new(&c1, "10.192.0.2/24", None);
    let w2 = WgGo::new(&c2, "10.192.0.3/24", None);
    let key = meshgate::core::keys::PrivateKey::generate();
    let cfg = server_config(
        &key.to_base64(),
        51820,
        &format!(
            "  - name: one\n    public_key: {}\n    allowed_ips: [10.192.0.2/32]\n  - name: two\n    public_key: {}\n    allowed_ips: [10.192.0.3/32]\n",
            w1.public_key(),
            w2.public_key()
        ),
        "127.0.0.1:9000",
        "127.0.0.1:1",
    );
    more(&cfg.path().join("tenants/default"));
    let mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");
    for (ns, w, n) in [(&c1, &w1, net), (&c2, &w2, net + 1)] {
        w.add_peer(
            ns,
            &key.public_key().to_string(),
            &format!(
                "endpoint 10.231.{n}.1:51820 allowed-ips 10.192.0.0/24 persistent-keepalive 1"
            ),
        );
    }
    // Both clients have a session once their keepalives got through.
    assert!(wait_until(Duration::from_secs(5), || {
        mg.metric_sum(&server, "meshgate_wg_handshakes_total{") >= 2.0
    }));
    Hub {
        server,
        c1,
        _c2: c2,
        _w: (w1, w2),
        mg,
        _cfg: cfg,
    }
}

/// clients ping each other through meshgate (hub routing).
#[test]
fn clients_reach_each_other_through_the_hub() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("ping") {
        return;
    }
    let Hub {
        server,
        c1,
        _c2,
        _w,
        mg: _mg,
        _cfg,
    } = hub(4, |_| {});
    let ping = c1.try_sh("ping -c 3 -i 0.2 -W 2 10.192.0.3");
    assert!(
        ping.status.success(),
        "client one cannot reach client two through the hub: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // The forwarded pings are one IP flow: 5-tuple, the sending peer, bytes
    // both ways, the route it took.
    let (_, body) = server.curl("http://127.0.0.1:9000/api/v1/flows", 3);
    let flows: serde_json::Value = serde_json::from_str(&body).unwrap();
    let icmp: Vec<&serde_json::Value> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["protocol"] == "icmp")
        .collect();
    assert_eq!(icmp.len(), 1, "{body}");
    let f = icmp[0];
    assert!(f["src"].as_str().unwrap().starts_with("10.192.0.2:"), "{f}");
    assert!(f["dst"].as_str().unwrap().starts_with("10.192.0.3:"), "{f}");
    assert_eq!(f["identity"], "one", "{f}");
    assert_eq!(f["instance"], "wg0", "{f}");
    assert_eq!(f["verdict"], "allow", "{f}");
    assert_eq!(f["route"], "forwarded by wg0", "{f}");
    assert!(f["bytes_up"].as_u64().unwrap() >= 3 * 84, "{f}");
    assert!(f["bytes_down"].as_u64().unwrap() >= 3 * 84, "{f}");
}

/// A policy decides the IP flows a hub forwards: peer `one` may not ping
/// `two`, while `two` pings `one` (same hub, same test); a flow the policy
/// denies is counted and audited; once the rule is gone a new ping passes.
#[test]
fn a_policy_denies_a_forwarded_ip_flow() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("ping") {
        return;
    }
    let Hub {
        server,
        c1,
        _c2: c2,
        _w,
        mg,
        _cfg: cfg,
    } = hub(14, |tenant| {
        std::fs::write(
            tenant.join("policy.yaml"),
            "kind: policy\nrules:\n  - name: one-not-two\n    action: deny\n    doors: [wireguard]\n    identities: [one]\n    to: [10.192.0.3/32]\n    protocols: [icmp]\n",
        )
        .unwrap();
    });
    let policy = cfg.path().join("tenants/default/policy.yaml");
    // Allowed: two → one (the hub forwards, and the path works).
    let ping = c2.try_sh("ping -c 2 -i 0.2 -W 2 10.192.0.2");
    assert!(
        ping.status.success(),
        "two cannot reach one: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // Denied: one → two.
    let ping = c1.try_sh("ping -c 2 -i 0.2 -W 1 10.192.0.3");
    assert!(
        !ping.status.success(),
        "one reached two through a deny rule"
    );
    assert!(
        mg.metric(
            &server,
            "meshgate_policy_decisions_total{tenant=\"default\",instance=\"wg0\",rule=\"one-not-two\",result=\"deny\"}"
        ) >= 1.0,
        "{}",
        mg.log_text()
    );
    // The rule goes: a new ping (a new flow) passes.
    std::fs::remove_file(&policy).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || c1
            .try_sh("ping -c 1 -W 1 10.192.0.3")
            .status
            .success()),
        "one still cannot reach two without the rule\n{}",
        mg.log_text()
    );
}

/// 50 idle connections from a wireguard-go peer through a `listen_via` pipe;
/// then the peer's interface is deleted. Tunnelled TCP keep-alives find it
/// gone: every connection ends within twice `tcp_timeout`.
#[test]
fn connections_of_a_vanished_peer_end_within_the_timeout() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("python3") {
        return;
    }
    let WgoClient {
        server,
        client,
        wg,
        key,
        cfg,
        _nginx,
    } = wgo_client_of_meshgate(6, "held\n");
    // Short timeouts for the test: keep-alive every second, 3 s to give up.
    let wg0 = cfg.path().join("tenants/default/wg0.yaml");
    let mut text = std::fs::read_to_string(&wg0).unwrap();
    text.push_str("tcp_keepalive: 1s\ntcp_timeout: 3s\n");
    std::fs::write(&wg0, text).unwrap();
    let mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");
    wg.add_peer(
        &client,
        &key.public_key().to_string(),
        "endpoint 10.231.6.1:51820 allowed-ips 10.192.0.0/24 persistent-keepalive 1",
    );
    let mut holder = client.cmd("python3");
    holder.args([
        "-c",
        "import socket, time\n\
         s = [socket.create_connection(('10.192.0.1', 8080), timeout=5) for _ in range(50)]\n\
         print('open', flush=True)\n\
         time.sleep(120)",
    ]);
    let mut client = client;
    client.spawn(holder);
    let active = "meshgate_connections_active{tenant=\"default\",instance=\"web\"} ";
    assert!(
        wait_until(Duration::from_secs(15), || mg.metric(&server, active)
            == 50.0),
        "50 connections did not open: {}\n{}",
        mg.metric(&server, active),
        mg.log_text()
    );
    // The peer vanishes.
    client.sh(&format!("ip link del {}", wg.iface));
    let t0 = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(6), || mg.metric(&server, active) == 0.0),
        "still {} active after 6 s",
        mg.metric(&server, active)
    );
    eprintln!("all 50 ended {:?} after the peer vanished", t0.elapsed());
}
