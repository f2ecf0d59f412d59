//! Gateway links between two real meshgate processes in two network
//! namespaces (feature `quic`): node A's pipe goes `via:` a link group
//! `[quic, h2]` to node B, which alone reaches nginx. With UDP to B's QUIC
//! port dropped (iptables in B) new connections keep working over HTTP/2
//! within 5 s; with the rule removed they return to QUIC; after B is
//! SIGKILLed and restarted, the QUIC link is back within 2 s of B
//! listening. Both links also publish a service only A reaches on B
//! (`forwards:`, allowed by B's `publish:` lists), and B's curl fetches it
//! over each, again after B's restart. iperf3's UDP test runs from A to
//! B's iperf3 server through a UDP pipe over the group: its datagrams
//! travel as QUIC datagrams (the h2 link carries none). Last, A's address
//! changes under the QUIC connection, which migrates without a reconnect.
#![cfg(feature = "quic")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::hbone::{Pki, GATEWAY};
use common::netns::*;
use common::*;

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A's module status `instance`'s `key`.
fn status(a: &Netns, instance: &str, key: &str) -> serde_json::Value {
    let (_, body) = a.curl("http://127.0.0.1:9000/api/v1/modules", 3);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array()
        .and_then(|m| m.iter().find(|m| m["instance"] == instance))
        .map(|m| m["details"][key].clone())
        .unwrap_or_default()
}

#[test]
fn a_link_group_falls_back_to_h2_when_udp_is_dropped_and_returns_to_quic() {
    if !can_netns() || !have("nginx") || !have("curl") || !have("iptables") || !have("iperf3") {
        skip("needs root, nginx, curl, iptables, iperf3");
        return;
    }
    let pki = Pki::new();
    let mut a = Netns::new("la");
    let mut b = Netns::new("lb");
    let (a_dev, _) = link(&a, "10.243.1.2/24", &b, "10.243.1.1/24");
    let _nginx = nginx_in(&mut b, "127.0.0.1:8080", "only b\n");
    // Only B reaches it: the same request from A fails.
    assert_eq!(
        b.curl("http://127.0.0.1:8080/", 3),
        (200, "only b\n".into())
    );
    assert_ne!(a.curl("http://127.0.0.1:8080/", 3).0, 200);
    // And one only A reaches, for B through A's reverse forwards.
    let _nginx_a = nginx_in(&mut a, "127.0.0.1:8090", "only a\n");
    assert_eq!(
        a.curl("http://127.0.0.1:8090/", 3),
        (200, "only a\n".into())
    );
    assert_ne!(b.curl("http://127.0.0.1:8090/", 3).0, 200);

    // iperf3's server, which only B reaches.
    let mut iperf = b.cmd("iperf3");
    iperf.args(["-s", "-B", "127.0.0.1", "-p", "5201"]);
    iperf.stdout(std::process::Stdio::null());
    b.spawn(iperf);

    let bdir = tempfile::tempdir().unwrap();
    let bd = bdir.path();
    write(bd, "meshgate.yaml", "node: b\nadmin: 127.0.0.1:9000\n");
    write(
        bd,
        "tenants/default/corp.yaml",
        "kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\nhosts:\n  web: 127.0.0.1\n",
    );
    let tls = format!(
        "vnet: corp\ntls_cert: {}\ntls_key: {}\nclient_ca: {}\ntrust_forwarded: [\"{GATEWAY}\"]\npublish:\n  - identity: \"{GATEWAY}\"\n    ports: [18091, 18092]\n",
        pki.s("server.pem"),
        pki.s("server.key"),
        pki.s("ca.pem")
    );
    write(
        bd,
        "tenants/default/quic.yaml",
        &format!("kind: quic\nlisten: 10.243.1.1:15009\n{tls}"),
    );
    write(
        bd,
        "tenants/default/hbone.yaml",
        &format!("kind: h2\nlisten: 10.243.1.1:15008\n{tls}"),
    );

    let adir = tempfile::tempdir().unwrap();
    let ad = adir.path();
    write(ad, "meshgate.yaml", "node: a\nadmin: 127.0.0.1:9000\n");
    write(
        ad,
        "tenants/default/corp.yaml",
        "kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n",
    );
    let client = format!(
        "server_name: gw.test\nca: {}\ntls_cert: {}\ntls_key: {}\nvnet: corp\n",
        pki.s("ca.pem"),
        pki.s("gateway.pem"),
        pki.s("gateway.key")
    );
    write(
        ad,
        "tenants/default/b-quic.yaml",
        &format!("kind: quic_link\nserver: 10.243.1.1:15009\n{client}forwards:\n  - remote_port: 18091\n    to: 127.0.0.1:8090\n"),
    );
    write(
        ad,
        "tenants/default/b-h2.yaml",
        &format!("kind: h2_link\nserver: 10.243.1.1:15008\n{client}forwards:\n  - remote_port: 18092\n    to: 127.0.0.1:8090\n"),
    );
    write(
        ad,
        "tenants/default/b.yaml",
        "kind: link_group\nlinks: [b-quic, b-h2]\n",
    );
    write(
        ad,
        "tenants/default/web.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8081\nremote: web:8080\nvia: b\n",
    );
    // iperf3's control connection and its UDP datagrams, both via the group.
    write(
        ad,
        "tenants/default/iperf-tcp.yaml",
        "kind: pipe\nlisten: 127.0.0.1:5201\nremote: 127.0.0.1:5201\nvia: b\n",
    );
    write(
        ad,
        "tenants/default/iperf-udp.yaml",
        "kind: pipe\nprotocol: udp\nlisten: 127.0.0.1:5201\nremote: 127.0.0.1:5201\nvia: b\n",
    );

    let mut mg_b = NsMeshgate::start(&b, bd, "127.0.0.1:9000");
    let mg_a = NsMeshgate::start(&a, ad, "127.0.0.1:9000");
    let get = || a.curl("http://127.0.0.1:8081/", 5);
    // Both links connect at start; a request in the moment between the h2
    // and the QUIC handshake rightly goes over h2 (the group takes the first
    // link that is up), so wait for QUIC to be the active one first.
    assert!(
        wait_until(Duration::from_secs(10), || status(&a, "b", "active")
            == "b-quic"
            && status(&a, "b-h2", "connected") == true),
        "{}\n{}",
        mg_a.log_text(),
        mg_b.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(10), || get()
            == (200, "only b\n".into())),
        "{}\n{}",
        mg_a.log_text(),
        mg_b.log_text()
    );
    assert_eq!(status(&a, "b", "last_used"), "b-quic");
    assert_eq!(status(&a, "b", "active"), "b-quic");
    assert!(status(&a, "b-quic", "rtt_ms").is_number());
    let ctl = a.sh(&format!(
        "{} --admin 127.0.0.1:9000 status",
        env!("CARGO_BIN_EXE_meshgatectl")
    ));
    assert!(ctl.contains("quic 10.243.1.1:15009 up rtt "), "{ctl}");
    assert!(ctl.contains("h2 10.243.1.1:15008 up"), "{ctl}");
    assert!(ctl.contains("failover via b-quic"), "{ctl}");

    // Reverse publishing: B fetches A's nginx on the ports each link
    // published there.
    for port in [18091, 18092] {
        let url = format!("http://127.0.0.1:{port}/");
        assert!(
            wait_until(Duration::from_secs(5), || b.curl(&url, 3)
                == (200, "only a\n".into())),
            "{url} from B:\n{}\n{}",
            mg_a.log_text(),
            mg_b.log_text()
        );
    }

    // iperf3 over UDP: every datagram through the QUIC link.
    let out = a.try_sh("iperf3 -c 127.0.0.1 -p 5201 -u -b 20M -l 1000 -t 2 --json");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3: {e}\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            mg_a.log_text()
        )
    });
    let sum = &report["end"]["sum"];
    let (packets, lost) = (sum["packets"].as_u64(), sum["lost_percent"].as_f64());
    eprintln!("iperf3 UDP over QUIC: {packets:?} datagrams, {lost:?} % lost");
    assert!(packets >= Some(1000), "{report}");
    assert!(lost.is_some_and(|l| l < 5.0), "{report}");
    assert!(status(&a, "b-quic", "datagrams_sent").as_u64() >= Some(1000));

    // UDP to B's QUIC port dropped: new connections go over HTTP/2.
    b.sh("iptables -I INPUT -p udp --dport 15009 -j DROP");
    let blocked = Instant::now();
    let mut via_h2 = None;
    while blocked.elapsed() < Duration::from_secs(10) {
        if get() == (200, "only b\n".into()) && status(&a, "b", "last_used") == "b-h2" {
            via_h2 = Some(blocked.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = via_h2.unwrap_or_else(|| panic!("no fallback to h2:\n{}", mg_a.log_text()));
    eprintln!("fell back to h2 {took:?} after UDP was dropped");
    assert!(took < Duration::from_secs(5), "fallback took {took:?}");
    // Once QUIC is known down, flows go straight to h2.
    assert!(
        wait_until(Duration::from_secs(5), || status(&a, "b", "active")
            == "b-h2"),
        "b-quic: connected {}, last_error {}, active {}:\n{}",
        status(&a, "b-quic", "connected"),
        status(&a, "b-quic", "last_error"),
        status(&a, "b", "active"),
        mg_a.log_text()
    );
    let t = Instant::now();
    assert_eq!(get(), (200, "only b\n".into()));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // The rule removed: back to QUIC.
    b.sh("iptables -D INPUT -p udp --dport 15009 -j DROP");
    assert!(
        wait_until(Duration::from_secs(5), || {
            get() == (200, "only b\n".into()) && status(&a, "b", "last_used") == "b-quic"
        }),
        "did not return to quic:\n{}",
        mg_a.log_text()
    );

    // B SIGKILLed and restarted: QUIC is back within 2 s of B listening.
    mg_b.child.kill().unwrap();
    let _ = mg_b.child.wait();
    let mg_b = NsMeshgate::start(&b, bd, "127.0.0.1:9000");
    let listening = Instant::now();
    let mut back = None;
    while listening.elapsed() < Duration::from_secs(10) {
        if status(&a, "b-quic", "connected") == true
            && status(&a, "b-quic", "reconnects").as_u64() >= Some(2)
        {
            back = Some(listening.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let back = back.unwrap_or_else(|| panic!("quic link not back:\n{}", mg_a.log_text()));
    eprintln!("quic link back {back:?} after B was listening again");
    assert!(
        back < Duration::from_secs(2),
        "{back:?}\n{}",
        mg_a.log_text()
    );
    assert!(wait_until(Duration::from_secs(3), || get() == (200, "only b\n".into())));
    // The restarted B publishes A's ports again, as the links park anew.
    for port in [18091, 18092] {
        let url = format!("http://127.0.0.1:{port}/");
        assert!(
            wait_until(Duration::from_secs(5), || b.curl(&url, 3)
                == (200, "only a\n".into())),
            "{url} from B after its restart:\n{}",
            mg_a.log_text()
        );
    }

    // A's address changes under the QUIC connection: it migrates (no
    // reconnect) and carries on.
    let reconnects = status(&a, "b-quic", "reconnects");
    a.sh(&format!(
        "sysctl -qw net.ipv4.conf.{a_dev}.promote_secondaries=1 && ip addr add 10.243.1.3/24 dev {a_dev} && ip addr del 10.243.1.2/24 dev {a_dev}"
    ));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(get(), (200, "only b\n".into()));
    assert_eq!(status(&a, "b", "last_used"), "b-quic");
    assert_eq!(status(&a, "b-quic", "connected"), true);
    assert_eq!(
        status(&a, "b-quic", "reconnects"),
        reconnects,
        "the QUIC connection did not survive the address change:\n{}",
        mg_a.log_text()
    );
    drop(mg_b);
}
