//! Cloud-Gateway as a user has it: the seed's `conf.yaml` files unchanged,
//! meshgate as a Cloud-Gateway client of a wireguard-go server (IPv4 and
//! IPv6 endpoints), and the drop-in config directory `/etc/cloudgateway`.
//! The demos over three nodes run in `tests/examples.rs`.

mod common;

use std::process::Command;

use common::have;
use common::netns::{can_netns, link, nginx_in, Netns, NsMeshgate, WgGo};
use configstore::cloudgateway::vpn_address;
use meshgate::core::keys::PrivateKey;

/// The pipe as the seed writes it in the minimal demo, on every node.
const SEED_PIPE: &str = "pipes:\n  - name: nginx\n    port: 8080\n    remote: nginx:80\n";

/// Two keys whose Cloud-Gateway VPN addresses differ.
fn two_keys() -> (PrivateKey, PrivateKey) {
    loop {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        if vpn_address(&a.public_key().to_string()) != vpn_address(&b.public_key().to_string()) {
            return (a, b);
        }
    }
}

fn client_conf(key: &PrivateKey, server: &PrivateKey, endpoint: &str) -> String {
    format!(
        "type: client\nname: client\npublic_key: {}\nprivate_key: {}\npeers:\n  - name: server\n    public_key: {}\n    endpoint: {endpoint}\n{SEED_PIPE}",
        key.public_key(),
        key.to_base64(),
        server.public_key(),
    )
}

fn server_conf(key: &PrivateKey, client: &PrivateKey) -> String {
    format!(
        "type: server\nname: server\npublic_key: {}\nprivate_key: {}\npeers:\n  - name: client\n    public_key: {}\n{SEED_PIPE}",
        key.public_key(),
        key.to_base64(),
        client.public_key(),
    )
}

/// Both nodes' documents pass every module's own config check (the same
/// check `meshgate --check` and start-up run), so the translation cannot
/// drift from the modules' config types unnoticed.
#[tokio::test]
async fn seed_files_pass_the_module_checks() {
    let (s, c) = two_keys();
    for text in [server_conf(&s, &c), client_conf(&c, &s, "server:8765")] {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("conf.yaml"), &text).unwrap();
        let summary =
            meshgate::core::node::check_dir(d.path(), meshgate::modules::builtin_factories())
                .await
                .unwrap_or_else(|e| panic!("{text}\n{e:?}"));
        assert_eq!(summary.tenants, 1);
    }
}

/// meshgate as Cloud-Gateway's client of a wireguard-go server: the client's
/// pipe carries `remote: nginx:80` as in the seed, which the client does not
/// resolve: it dials the server's VPN address at the pipe's port.
fn client_of_wireguard_go_server(ipv6: bool) {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("curl") {
        return;
    }
    let mut server = Netns::new("s");
    let client = Netns::new("c");
    link(
        &server,
        "10.232.1.1/24,fd00:232::1/64",
        &client,
        "10.232.1.2/24,fd00:232::2/64",
    );
    let (wg_key, mg_key) = two_keys();
    let server_vpn = vpn_address(&wg_key.public_key().to_string());
    let client_vpn = vpn_address(&mg_key.public_key().to_string());
    let wg = WgGo::with_key(
        &server,
        wg_key.clone(),
        &format!("{server_vpn}/24"),
        Some(8765),
    );
    let _nginx = nginx_in(
        &mut server,
        &format!("{server_vpn}:8080"),
        "behind wireguard-go\n",
    );
    wg.add_peer(
        &server,
        &mg_key.public_key().to_string(),
        &format!("allowed-ips {client_vpn}/32"),
    );

    let endpoint = if ipv6 {
        "[fd00:232::1]:8765"
    } else {
        "10.232.1.1:8765"
    };
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("conf.yaml"),
        client_conf(&mg_key, &wg_key, endpoint),
    )
    .unwrap();
    let _mg = NsMeshgate::start(&client, d.path(), "127.0.0.1:9000");

    let (status, body) = client.curl("http://localhost:8080/", 10);
    assert_eq!((status, body.as_str()), (200, "behind wireguard-go\n"));
    let show = server.sh(&format!("wg show {}", wg.iface));
    assert!(show.contains("latest handshake"), "{show}");
    let client_endpoint = if ipv6 {
        "[fd00:232::2]:"
    } else {
        "10.232.1.2:"
    };
    assert!(
        show.contains(&format!("endpoint: {client_endpoint}")),
        "{show}"
    );
    assert!(
        show.contains(&format!("allowed ips: {client_vpn}/32")),
        "{show}"
    );
}

#[test]
fn cloud_gateway_client_of_wireguard_go_server() {
    client_of_wireguard_go_server(false);
}

#[test]
fn cloud_gateway_client_of_wireguard_go_server_over_ipv6() {
    client_of_wireguard_go_server(true);
}

/// Without `--config-dir` and `MESHGATE_CONFIG_DIR`, meshgate reads
/// `/etc/meshgate`, else `/etc/cloudgateway` (where Cloud-Gateway's image
/// mounts its volume), and says which. Run in a private mount and network
/// namespace with an empty `/etc`, so the host's own `/etc` is untouched.
#[test]
fn drop_in_reads_etc_cloudgateway() {
    if !can_netns() || !have("unshare") || !have("curl") {
        return;
    }
    let (s, c) = two_keys();
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("conf.yaml");
    std::fs::write(&conf, server_conf(&s, &c)).unwrap();
    let bin = env!("CARGO_BIN_EXE_meshgate");
    let script = format!(
        "set -e\n\
         ip link set lo up\n\
         mount -t tmpfs none /etc\n\
         mkdir /etc/cloudgateway\n\
         cp {conf} /etc/cloudgateway/conf.yaml\n\
         env -u MESHGATE_CONFIG_DIR CLOUD_GATEWAY_ENGINE=boringtun {bin} > {log} 2>&1 &\n\
         pid=$!\n\
         ok=0\n\
         for i in $(seq 50); do\n\
           if curl -sf -o /dev/null http://127.0.0.1:9000/readyz; then ok=1; break; fi\n\
           sleep 0.2\n\
         done\n\
         curl -s -o /dev/null -w '%{{local_port}}' http://127.0.0.1:9000/readyz || true\n\
         kill $pid; wait $pid || true\n\
         test $ok = 1\n",
        conf = conf.display(),
        log = d.path().join("log").display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--net", "sh", "-c", &script])
        .output()
        .unwrap();
    let log = std::fs::read_to_string(d.path().join("log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}{}\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("/etc/cloudgateway"), "{log}");
    assert!(log.contains("chosen by default"), "{log}");

    // And an unsupported engine is refused, naming the variable.
    let out = Command::new(bin)
        .args(["--config-dir"])
        .arg(d.path())
        .arg("--check")
        .env("CLOUD_GATEWAY_ENGINE", "kernel-module")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("CLOUD_GATEWAY_ENGINE: unsupported engine `kernel-module`"),
        "{err}"
    );
}
