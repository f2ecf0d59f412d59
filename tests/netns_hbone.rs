//! The h2 door in front of a tenant's WireGuard site, with real peers:
//! nginx lives in a site namespace behind wireguard-go; meshgate (the real
//! binary, in the gateway namespace) is the site's WireGuard peer and has
//! an h2 door whose vnet routes the site's addresses over that tunnel.
//! pycurl (libcurl 8 with nghttp2, proxy type HTTPS2, a client
//! certificate) fetches the site's page through the door; a certificate
//! from another CA fails the handshake; a policy denial is a 403 with its
//! reason.

mod common;

use std::path::Path;
use std::time::Duration;

use common::hbone::{pycurl_path, run, Pki, ALICE, MALLORY, PYCURL};
use common::netns::*;
use common::*;

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn pycurl_fetches_nginx_in_a_wireguard_site_through_the_h2_door() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("curl") {
        skip("needs root, wireguard-go, wg, nginx, curl");
        return;
    }
    let Some(pydeps) = pycurl_path() else { return };
    let pki = Pki::new();
    let gw = Netns::new("hg");
    let mut site = Netns::new("hs");
    link(&gw, "10.244.1.1/24", &site, "10.244.1.2/24");
    let key = meshgate::core::keys::PrivateKey::generate();
    let wg = WgGo::new(&site, "10.60.0.2/24", Some(51821));
    wg.add_peer(
        &site,
        &key.public_key().to_string(),
        "allowed-ips 10.60.0.1/32 endpoint 10.244.1.1:51820",
    );
    let _nginx = nginx_in(&mut site, "10.60.0.2:80", "site nginx\n");
    // The page is only in the site: the gateway's own network has no way there.
    assert_eq!(
        site.curl("http://10.60.0.2/", 3),
        (200, "site nginx\n".into())
    );
    assert_ne!(gw.curl("http://10.60.0.2/", 3).0, 200);

    let cfg = tempfile::tempdir().unwrap();
    let c = cfg.path();
    write(c, "meshgate.yaml", "node: gw\nadmin: 127.0.0.1:9000\n");
    write(
        c,
        "tenants/acme/wg0.yaml",
        &format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: 51820\naddress: 10.60.0.1/24\npeers:\n  - name: site\n    public_key: {}\n    endpoint: 10.244.1.2:51821\n    allowed_ips: [10.60.0.2/32]\n    persistent_keepalive: 5\n",
            key.to_base64(),
            wg.public_key()
        ),
    );
    write(
        c,
        "tenants/acme/sites.yaml",
        "kind: vnet\nroutes:\n  - to: 10.60.0.0/24\n    via: wg0\n",
    );
    write(
        c,
        "tenants/acme/policy.yaml",
        &format!("kind: policy\nrules:\n  - name: no-mallory\n    action: deny\n    identities: [\"{MALLORY}\"]\n"),
    );
    write(
        c,
        "tenants/acme/hbone.yaml",
        &format!(
            "kind: h2\nlisten: 127.0.0.1:15008\nvnet: sites\ntls_cert: {}\ntls_key: {}\nclient_ca: {}\n",
            pki.s("server.pem"),
            pki.s("server.key"),
            pki.s("ca.pem")
        ),
    );
    let mg = NsMeshgate::start(&gw, c, "127.0.0.1:9000");
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let pycurl = |who: &str| {
        let out = run(gw
            .cmd("python3")
            .args([
                "-c",
                PYCURL,
                "15008",
                "10.60.0.2:80",
                &pki.s("ca.pem"),
                &pki.s(&format!("{who}.pem")),
                &pki.s(&format!("{who}.key")),
                tp,
            ])
            .env("PYTHONPATH", &pydeps));
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // The tunnel's first handshake may still be under way: a few tries.
    let mut out = String::new();
    let fetched = wait_until(Duration::from_secs(15), || {
        out = pycurl("alice");
        out.starts_with("status 200")
    });
    assert!(fetched, "{out}\n{}", mg.log_text());
    assert!(out.contains("site nginx"), "{out}");
    assert!(
        out.contains("CONNECT: 'h2' negotiated") || out.contains("h2"),
        "{out}"
    );
    let out = pycurl("mallory");
    assert!(out.contains("403"), "{out}");
    let out = pycurl("impostor");
    assert!(out.starts_with("error"), "{out}");
    // The audit line names alice, the site's address and the trace.
    let log = mg.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("flow ended") && l.contains(ALICE) && l.contains("10.60.0.2:80"))
        .unwrap_or_else(|| panic!("no audit line for alice:\n{log}"));
    assert!(line.contains("reason=closed"), "{line}");
    assert!(
        mg.metric(
            &gw,
            "meshgate_rejected_total{tenant=\"acme\",instance=\"hbone\",reason=\"tls_handshake\"}"
        ) >= 1.0
    );
}
