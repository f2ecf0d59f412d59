//! The PROXY protocol with nginx as the backend that reads it: a pipe that
//! sends it (v1 and v2), and a pipe that accepts it from a trusted hop in
//! front and passes the real client on.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

/// nginx that requires the PROXY protocol and answers with the client
/// address it learnt from it.
fn nginx_pp() -> Nginx {
    Nginx::start_with(" proxy_protocol", |_| {
        "set_real_ip_from 127.0.0.1; real_ip_header proxy_protocol; location / { return 200 \"client $remote_addr\\n\"; }".into()
    })
    .expect("nginx")
}

/// curl from source address `from` → (status, body).
fn curl_from(from: &str, url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "--interface",
            from,
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn nginx_sees_the_real_client_through_pipes_speaking_proxy_protocol() {
    if !have("nginx") || !have("curl") {
        return;
    }
    let nginx = nginx_pp();
    let backend = nginx.addr.port();
    let cfg = ConfigDir::new();
    let (v1, v2, front, inner) = (free_port(), free_port(), free_port(), free_port());
    // Direct: a pipe sending v1, one sending v2.
    cfg.write(
        "tenants/t/v1.yaml",
        &format!(
            "kind: pipe\nlisten: 127.0.0.1:{v1}\nremote: 127.0.0.1:{backend}\nproxy_protocol: v1\n"
        ),
    );
    cfg.write(
        "tenants/t/v2.yaml",
        &format!(
            "kind: pipe\nlisten: 127.0.0.1:{v2}\nremote: 127.0.0.1:{backend}\nproxy_protocol: v2\n"
        ),
    );
    // Two hops: `front` (a load balancer, here a pipe) sends v2 to `inner`,
    // which trusts 127.0.0.1 only, reads the header, and sends v1 on.
    cfg.write(
        "tenants/t/front.yaml",
        &format!(
            "kind: pipe\nlisten: 0.0.0.0:{front}\nremote: 127.0.0.1:{inner}\nproxy_protocol: v2\n"
        ),
    );
    cfg.write(
        "tenants/t/inner.yaml",
        &format!(
            "kind: pipe\nlisten: 0.0.0.0:{inner}\nremote: 127.0.0.1:{backend}\nproxy_protocol: v1\naccept_proxy_protocol: [127.0.0.1/32]\n"
        ),
    );
    let mg = Meshgate::start(&cfg);
    assert_eq!(
        curl_from("127.0.0.5", &format!("http://127.0.0.1:{v1}/")),
        (200, "client 127.0.0.5\n".into())
    );
    assert_eq!(
        curl_from("127.0.0.6", &format!("http://127.0.0.1:{v2}/")),
        (200, "client 127.0.0.6\n".into())
    );
    assert_eq!(
        curl_from("127.0.0.7", &format!("http://127.0.0.1:{front}/")),
        (200, "client 127.0.0.7\n".into()),
        "{}",
        mg.log_text()
    );
    // The inner pipe's flow is the real client's: the audit line says so.
    assert!(wait_until(Duration::from_secs(2), || mg
        .log_text()
        .lines()
        .any(|l| l.contains("meshgate::audit")
            && l.contains("inner")
            && l.contains("127.0.0.7"))));

    // A trusted source that sends no header is closed and counted; a source
    // outside the trusted range is a client itself (its bytes go on as sent).
    let mut s = TcpStream::connect(("127.0.0.1", inner)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(wait_until(Duration::from_secs(2), || {
        mg.metric(
            "meshgate_rejected_total{tenant=\"t\",instance=\"inner\",reason=\"proxy_protocol\"}",
        ) == 1.0
    }));
    assert_eq!(
        curl_from("127.0.0.8", &format!("http://127.0.0.1:{inner}/")),
        (200, "client 127.0.0.8\n".into())
    );
}
