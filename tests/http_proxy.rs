//! The HTTP proxy front door on loopback with curl as the client: forward
//! proxying (`curl -x`) and CONNECT tunnels (`curl -p -x`), Basic
//! authentication (407), refusals with their status and reason header.

mod common;

use common::*;

/// curl through the proxy: (exit code, status, headers+body, stderr).
fn curl_x(args: &[&str], url: &str) -> (i32, u16, String, String) {
    let mut all = vec!["-D", "-"];
    all.extend_from_slice(args);
    curl_with(&all, url)
}

#[test]
fn curl_forwards_and_tunnels_through_the_http_proxy() {
    let Some(nginx) = Nginx::start() else { return };
    if !have("curl") {
        return;
    }
    let cfg = ConfigDir::new();
    let port = free_port();
    let closed = free_port();
    cfg.write(
        "tenants/acme/corp.yaml",
        &format!(
            "kind: vnet\nroutes:\n  - to: 127.0.0.3\n    via: reject\n  - to: 127.0.0.0/8\n    via: direct\n  - to: \"*\"\n    via: direct\nhosts:\n  web: {}\n",
            nginx.addr.ip()
        ),
    );
    cfg.write(
        "tenants/acme/proxy.yaml",
        &format!("kind: http_proxy\nlisten: 127.0.0.1:{port}\nusers:\n  - name: alice\n    password: wonderland\n"),
    );
    let mg = Meshgate::start(&cfg);
    let proxy = format!("http://alice:wonderland@127.0.0.1:{port}");
    let url = format!("http://web:{}/", nginx.addr.port());

    // Forward proxying; `web` is a name of the vnet, resolved by meshgate.
    let (rc, status, body, err) = curl_x(&["-x", &proxy], &url);
    assert_eq!((rc, status), (0, 200), "{err}\n{}", mg.log_text());
    assert!(body.contains("hello from nginx"), "{body}");
    // A CONNECT tunnel to the same page.
    let (rc, status, body, err) = curl_x(&["-p", "-x", &proxy], &url);
    assert_eq!((rc, status), (0, 200), "{err}");
    assert!(
        body.contains("HTTP/1.1 200 Connection established") || body.contains("200"),
        "{body}"
    );
    assert!(body.contains("hello from nginx"), "{body}");

    // No credentials, or wrong ones: 407 with Proxy-Authenticate.
    let (_, status, head, _) = curl_x(&["-x", &format!("http://127.0.0.1:{port}")], &url);
    assert_eq!(status, 407);
    assert!(
        head.to_lowercase().contains("proxy-authenticate: basic"),
        "{head}"
    );
    let (_, status, _, _) = curl_x(
        &["-x", &format!("http://alice:rabbit@127.0.0.1:{port}")],
        &url,
    );
    assert_eq!(status, 407);
    assert!(wait_until(std::time::Duration::from_secs(2), || {
        mg.metric("meshgate_rejected_total{tenant=\"acme\",instance=\"proxy\",reason=\"auth_failed\"}") >= 1.0
            && mg.metric("meshgate_rejected_total{tenant=\"acme\",instance=\"proxy\",reason=\"auth_required\"}") >= 1.0
    }));
    assert!(!mg.log_text().contains("rabbit"));

    // A reject route: 403 with the reason; a closed port: 502.
    let (_, status, head, _) = curl_x(&["-x", &proxy], "http://127.0.0.3/");
    assert_eq!(status, 403, "{head}");
    assert!(
        head.to_lowercase().contains("x-meshgate-reason: rejected"),
        "{head}"
    );
    let (rc, _, _, err) = curl_x(&["-p", "-x", &proxy], "http://127.0.0.3/");
    assert_ne!(rc, 0);
    assert!(err.contains("403"), "{err}");
    let (_, status, head, _) = curl_x(&["-x", &proxy], &format!("http://127.0.0.1:{closed}/"));
    assert_eq!(status, 502, "{head}");
    assert!(
        head.to_lowercase()
            .contains("x-meshgate-reason: dial_refused"),
        "{head}"
    );

    // Bad input: an oversized head is refused (431), garbage gets 400, a
    // CONNECT without a port 400; nothing is buffered without bound.
    let raw = |req: &[u8]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = s.write_all(req);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).to_string()
    };
    let mut big = b"GET http://web/ HTTP/1.1\r\nHost: web\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    big.extend_from_slice(b"\r\n\r\n");
    assert!(raw(&big).starts_with("HTTP/1.1 431"), "{}", raw(&big));
    assert!(raw(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    let r = raw(b"CONNECT web HTTP/1.1\r\nHost: web\r\nConnection: close\r\nProxy-Authorization: Basic YWxpY2U6d29uZGVybGFuZA==\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    // The audit lines name the user.
    let log = mg.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("meshgate::audit") && l.contains("alice") && l.contains("corp")),
        "{log}"
    );
}
