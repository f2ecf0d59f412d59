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
    let mut server = Netns::new("s");
    let client = Netns::new("c");
    link(&server, "10.231.0.1/24", &client, "10.231.0.2/24");
    let _nginx = nginx_in(&mut server, "127.0.0.1:8081", "legacy nginx says hi\n");

    let wg = WgGo::new(&client, "10.192.0.2/24", None);
    let mg_key = meshgate::core::keys::PrivateKey::generate();
    let cfg = server_config(
        &mg_key.to_base64(),
        51820,
        &format!(
            "  - name: wgo\n    public_key: {}\n    allowed_ips: [10.192.0.2/32]\n",
            wg.public_key()
        ),
        "127.0.0.1:9000",
        "127.0.0.1:8081",
    );
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

    // Restart the server process; the client is not touched.
    mg.kill();
    let mut mg = NsMeshgate::start(&server, cfg.path(), "127.0.0.1:9000");
    let ok = wait_until(Duration::from_secs(10), || {
        client.curl("http://10.192.0.1:8080/", 2).0 == 200
    });
    assert!(
        ok,
        "no curl through the tunnel within 10 s of the restart:\n{}",
        mg.log_text()
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
