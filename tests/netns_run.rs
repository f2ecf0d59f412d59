//! `meshgate run -- CMD` as an unprivileged user (nobody, with user
//! namespaces and a TUN it may open): CMD reaches nginx inside a tenant's
//! WireGuard site (a real wireguard-go peer in another namespace) by name,
//! runs as nobody with no capability, and reaches nothing the tenant's
//! vnet has no route for, although the host where meshgate runs reaches it.
//! Only that tenant's modules start, and the namespace goes with CMD.

mod common;

use std::path::Path;

use common::netns::*;
use common::*;

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Helper processes of a namespace labelled `label` still running.
fn helpers(label: &str) -> usize {
    kernel_engine_helpers()
        .iter()
        .filter(|(_, cmdline)| cmdline.contains(label))
        .count()
}

#[test]
fn meshgate_run_reaches_a_wireguard_site_by_name_and_nothing_else() {
    if !need_root()
        || !can_netns()
        || !userns_allowed()
        || !have("wireguard-go")
        || !have("nginx")
        || !have("curl")
        || !have("setpriv")
    {
        skip("needs root, user namespaces, wireguard-go, nginx, curl, setpriv");
        return;
    }
    let mut site = Netns::new("rsite");
    let host = Netns::new("rhost");
    link(
        &host,
        "10.232.40.1/24,fd00:232::1/64",
        &site,
        "10.232.40.2/24,fd00:232::2/64",
    );
    let wg = WgGo::new(&site, "10.194.0.2/24", Some(51820));
    let _nginx = nginx_in(&mut site, "0.0.0.0:80", "inside the site\n");
    let _nginx6 = nginx_in(&mut site, "[::]:80", "inside the site\n");
    // A UDP echo in the site, for datagrams from inside.
    let mut echo = site.cmd("python3");
    echo.args([
        "-c",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 7007))\nwhile True:\n    d, a = s.recvfrom(2048)\n    s.sendto(d, a)\n",
    ]);
    site.spawn(echo);

    let key = meshgate::core::keys::PrivateKey::generate();
    let cfg = tempfile::tempdir().unwrap();
    let d = cfg.path();
    write(d, "meshgate.yaml", "admin: off\ndrain_timeout: 1s\n");
    write(
        d,
        "tenants/acme/corp.yaml",
        "kind: vnet\ndefault: true\nhosts:\n  nginx: 10.194.0.2\nroutes:\n  - to: fd00:232::/64\n    via: direct\n",
    );
    write(
        d,
        "tenants/acme/wg0.yaml",
        &format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.194.0.1/32\nvnet: corp\nuapi: off\npeers:\n  - name: site\n    public_key: {}\n    endpoint: 10.232.40.2:51820\n    allowed_ips: [10.194.0.0/24]\n    persistent_keepalive: 5\n",
            key.to_base64(),
            wg.public_key()
        ),
    );
    // Another tenant's pipe: `run --tenant acme` must not start it.
    write(
        d,
        "tenants/other/web.yaml",
        "kind: pipe\nlisten: 127.0.0.1:18181\nremote: 10.232.40.2:80\n",
    );
    wg.add_peer(
        &site,
        &key.public_key().to_string(),
        "allowed-ips 10.194.0.1/32",
    );
    open_to_all(d);
    // /dev/net/tun is 0600 root here: nobody gets its own open TUN node.
    let (_dev, wrapper) = tun_for_nobody();

    // The probe that must fail from inside first succeeds from the host
    // meshgate runs on.
    assert_eq!(
        host.curl("http://10.232.40.2/", 5),
        (200, "inside the site\n".to_string())
    );

    let inside = "\
        id -u; grep CapEff /proc/self/status; \
        for i in 1 2 3 4 5 6 7 8 9 10; do out=$(curl -s -m 3 http://nginx/) && break; sleep 1; done; \
        echo \"site: $out\"; \
        echo \"host: $(curl -s -m 5 -o /dev/null -w '%{http_code}' http://10.232.40.2/)\"; \
        echo \"v6: $(curl -g -s -m 5 'http://[fd00:232::2]/')\"; \
        python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.sendto(b'ping', ('nginx', 7007)); print('udp:', s.recvfrom(100)[0].decode())\"; \
        exit 7";
    let out = host
        .cmd("unshare")
        .args(["-m", "sh", "-c", &wrapper, "sh"])
        .arg(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--config-dir")
        .arg(d)
        .args(["run", "--tenant", "acme", "--", "sh", "-c", inside])
        .env("MESHGATE_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nlog:\n{log}");
    // CMD's status is meshgate's.
    assert_eq!(out.status.code(), Some(7), "{ctx}");
    let lines: Vec<&str> = stdout.lines().collect();
    // nobody, without a capability.
    assert_eq!(lines.first(), Some(&NOBODY), "{ctx}");
    assert_eq!(lines.get(1), Some(&"CapEff:\t0000000000000000"), "{ctx}");
    // By name, through the tenant's WireGuard site.
    assert!(stdout.contains("site: inside the site\n"), "{ctx}");
    assert!(
        log.contains("dst=\"nginx:80\"") && log.contains("dialed=Some(\"10.194.0.2:80\")"),
        "{ctx}"
    );
    // UDP too, by name, through the site's WireGuard, answered from the
    // address the program sent to (else the socket would not take it).
    assert!(stdout.contains("udp: ping\n"), "{ctx}");
    assert!(
        log.contains("protocol=udp") && log.contains("dst=\"nginx:7007\""),
        "{ctx}"
    );
    // IPv6 leaves the namespace too, where the vnet routes it (the site's
    // link address, `direct` from the host meshgate runs on).
    assert!(stdout.contains("v6: inside the site\n"), "{ctx}");
    assert!(log.contains("dst=\"[fd00:232::2]:80\""), "{ctx}");
    // The host's reach is not CMD's: no route in the vnet, refused.
    assert!(stdout.contains("host: 000\n"), "{ctx}");
    assert!(
        log.contains("dst=\"10.232.40.2:80\"") && log.contains("reason=no_route"),
        "{ctx}"
    );
    // Only acme started; the namespace went with CMD.
    assert!(
        log.contains("tenant=\"acme\" instance=meshgate-run kind=netns"),
        "{ctx}"
    );
    assert!(!log.contains("tenant=\"other\""), "{ctx}");
    assert_eq!(helpers("acme/meshgate-run"), 0);

    // What a user gets wrong is said: a tenant that is not there (naming
    // those that are), a command that is not there (127, as a shell says).
    let run = |tenant: &str, cmd: &str| {
        host.cmd("unshare")
            .args(["-m", "sh", "-c", &wrapper, "sh"])
            .arg(env!("CARGO_BIN_EXE_meshgate"))
            .arg("--config-dir")
            .arg(d)
            .args(["run", "--tenant", tenant, "--", cmd])
            .output()
            .unwrap()
    };
    let out = run("acmee", "true");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("has no tenant `acmee` (it has: acme, other)"),
        "{err}"
    );
    let out = run("acme", "/no/such/program");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{err}");
    assert!(err.contains("cannot run \"/no/such/program\""), "{err}");
    assert_eq!(helpers("acme/meshgate-run"), 0);
}
