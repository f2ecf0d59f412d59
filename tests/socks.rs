//! The SOCKS front door on loopback, with curl as the real client (SOCKS5
//! with remote names, SOCKS4a, username/password) and a raw client for the
//! reply codes and UDP ASSOCIATE.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;

/// A raw SOCKS5 CONNECT with username/password; returns the reply code.
fn raw_connect(door: SocketAddr, user: &str, pw: &str, host: &str, port: u16) -> u8 {
    let mut s = TcpStream::connect(door).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[5, 1, 2]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 2]);
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(pw.len() as u8);
    auth.extend_from_slice(pw.as_bytes());
    s.write_all(&auth).unwrap();
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [1, 0], "auth");
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    rep[1]
}

fn door(cfg: &ConfigDir, port: u16, nginx: SocketAddr) {
    // Two vnets: `web` is nginx in frankfurt (the default); in sydney it is
    // 127.0.0.2, where nothing listens. 127.0.0.3 is refused by a route.
    cfg.write(
        "tenants/acme/frankfurt.yaml",
        &format!(
            "kind: vnet\ndefault: true\nroutes:\n  - to: 127.0.0.3\n    via: reject\n  - to: 127.0.0.0/8\n    via: direct\n  - to: \"*\"\n    via: direct\nhosts:\n  web: {}\n",
            nginx.ip()
        ),
    );
    cfg.write(
        "tenants/acme/sydney.yaml",
        "kind: vnet\nroutes:\n  - to: \"*\"\n    via: direct\nhosts:\n  web: 127.0.0.2\n",
    );
    cfg.write(
        "tenants/acme/socks.yaml",
        &format!(
            "kind: socks\nlisten: 127.0.0.1:{port}\nconnect_timeout: 2s\nusers:\n  - name: alice\n    password: wonderland\n    vnets: [sydney]\n  - name: bob\n    password: builder\n"
        ),
    );
}

#[test]
fn curl_reaches_nginx_through_socks5_with_a_password() {
    let Some(nginx) = Nginx::start() else { return };
    if !have("curl") {
        return;
    }
    let cfg = ConfigDir::new();
    let port = free_port();
    let closed = free_port();
    door(&cfg, port, nginx.addr);
    let mg = Meshgate::start(&cfg);
    let proxy = format!("socks5h://alice:wonderland@127.0.0.1:{port}");
    let url = format!("http://web:{}/", nginx.addr.port());

    // The name `web` is resolved by meshgate in the user's vnet (hosts), never by curl.
    let (rc, status, body, err) = curl_with(&["-x", &proxy], &url);
    assert_eq!((rc, status), (0, 200), "{err}\n{}", mg.log_text());
    assert!(body.contains("hello from nginx"), "{body}");
    // By IP, SOCKS5 with local resolution.
    let (rc, status, _, err) = curl_with(
        &["-x", &format!("socks5://bob:builder@127.0.0.1:{port}")],
        &format!("http://{}/", nginx.addr),
    );
    assert_eq!((rc, status), (0, 200), "{err}");

    // A wrong password: the handshake fails and is counted.
    let (rc, _, _, err) = curl_with(
        &["-x", &format!("socks5h://alice:rabbit@127.0.0.1:{port}")],
        &url,
    );
    assert_ne!(rc, 0, "a wrong password got through");
    assert!(
        err.to_lowercase().contains("auth") || err.contains("SOCKS"),
        "{err}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || {
            mg.metric("meshgate_rejected_total{tenant=\"acme\",instance=\"socks\",reason=\"auth_failed\"}") >= 1.0
        }),
        "{}",
        mg.metrics()
    );
    assert!(!mg.log_text().contains("rabbit"), "the password was logged");

    // alice@sydney routes in sydney, where `web` is 127.0.0.2: refused (0x05).
    let code = raw_connect(
        mg_addr(port),
        "alice@sydney",
        "wonderland",
        "web",
        nginx.addr.port(),
    );
    assert_eq!(code, 0x05, "connection refused in sydney");
    // bob may not pick sydney.
    let mut s = TcpStream::connect(mg_addr(port)).unwrap();
    s.write_all(&[5, 1, 2, 1, 10]).unwrap();
    s.write_all(b"bob@sydney\x07builder").unwrap();
    let mut m = [0u8; 4];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 2, 1, 1], "bob@sydney must fail authentication");

    // A `reject` route: 0x02, not allowed by ruleset; curl says so too.
    assert_eq!(
        raw_connect(mg_addr(port), "bob", "builder", "127.0.0.3", 80),
        0x02
    );
    // A closed port: 0x05; an unknown vnet name resolves nowhere: 0x04.
    assert_eq!(
        raw_connect(mg_addr(port), "bob", "builder", "127.0.0.1", closed),
        0x05
    );
    assert_eq!(
        raw_connect(mg_addr(port), "bob", "builder", "no-such-host.invalid", 80),
        0x04
    );

    // The flow's identity is the user: the audit line says who and which route.
    let log = mg.log_text();
    assert!(
        log.lines().any(|l| l.contains("meshgate::audit")
            && l.contains("alice")
            && l.contains("frankfurt")),
        "{log}"
    );
}

fn mg_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn socks4a_and_no_auth_and_bad_requests() {
    let Some(nginx) = Nginx::start() else { return };
    if !have("curl") {
        return;
    }
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/socks.yaml",
        &format!("kind: socks\nlisten: 127.0.0.1:{port}\nhandshake_timeout: 1s\n"),
    );
    cfg.loopback_vnet("acme");
    let mg = Meshgate::start(&cfg);
    let (rc, status, _, err) = curl_with(
        &["-x", &format!("socks4a://127.0.0.1:{port}")],
        &format!("http://localhost:{}/", nginx.addr.port()),
    );
    assert_eq!((rc, status), (0, 200), "{err}");
    let (rc, status, _, err) = curl_with(
        &["-x", &format!("socks5h://127.0.0.1:{port}")],
        &format!("http://{}/", nginx.addr),
    );
    assert_eq!((rc, status), (0, 200), "{err}");

    // BIND: command not supported (0x07). Address type 9: 0x08.
    let mut s = TcpStream::connect(mg_addr(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80])
        .unwrap();
    let mut r = [0u8; 12];
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[..3], &[5, 0, 5]);
    assert_eq!(r[3], 0x07);
    let mut s = TcpStream::connect(mg_addr(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[5, 1, 0, 5, 1, 0, 9, 1, 2]).unwrap();
    let mut r = [0u8; 4];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, [5, 0, 5, 0x08]);
    // Garbage and silence are counted, and the door keeps serving.
    let mut g = TcpStream::connect(mg_addr(port)).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _silent = TcpStream::connect(mg_addr(port)).unwrap();
    assert!(
        wait_until(Duration::from_secs(4), || {
            mg.metric("meshgate_rejected_total{tenant=\"acme\",instance=\"socks\",reason=\"bad_request\"}") >= 1.0
            && mg.metric("meshgate_rejected_total{tenant=\"acme\",instance=\"socks\",reason=\"handshake_timeout\"}") >= 1.0
        }),
        "{}",
        mg.metrics()
    );
    let (rc, _, _, err) = curl_with(
        &["-x", &format!("socks5h://127.0.0.1:{port}")],
        &format!("http://{}/", nginx.addr),
    );
    assert_eq!(rc, 0, "{err}");
}

#[test]
fn udp_associate_relays_datagrams_and_drops_fragments() {
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.write(
        "tenants/acme/socks.yaml",
        &format!("kind: socks\nlisten: 127.0.0.1:{port}\n"),
    );
    cfg.loopback_vnet("acme");
    let mg = Meshgate::start(&cfg);
    // A UDP echo server.
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b) {
            let _ = echo.send_to(&b[..n], from);
        }
    });
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut ctl = TcpStream::connect(mg_addr(port)).unwrap();
    ctl.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ctl.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    ctl.read_exact(&mut m).unwrap();
    let cport = client.local_addr().unwrap().port().to_be_bytes();
    ctl.write_all(&[5, 3, 0, 1, 127, 0, 0, 1, cport[0], cport[1]])
        .unwrap();
    let mut rep = [0u8; 10];
    ctl.read_exact(&mut rep).unwrap();
    assert_eq!(rep[1], 0, "UDP ASSOCIATE refused");
    let relay = SocketAddr::from((
        [rep[4], rep[5], rep[6], rep[7]],
        u16::from_be_bytes([rep[8], rep[9]]),
    ));

    let header = |frag: u8| {
        let mut h = vec![0, 0, frag, 1];
        match echo_addr {
            SocketAddr::V4(a) => h.extend_from_slice(&a.ip().octets()),
            _ => unreachable!(),
        }
        h.extend_from_slice(&echo_addr.port().to_be_bytes());
        h
    };
    // A fragment is dropped; the next whole datagram is relayed and answered.
    let mut frag = header(1);
    frag.extend_from_slice(b"fragment");
    client.send_to(&frag, relay).unwrap();
    let mut d = header(0);
    d.extend_from_slice(b"ping over socks");
    client.send_to(&d, relay).unwrap();
    let mut b = [0u8; 2048];
    let (n, from) = client.recv_from(&mut b).unwrap();
    assert_eq!(from, relay);
    assert_eq!(
        &b[..n],
        &d[..],
        "the answer comes back with the echo server's header"
    );
    assert!(wait_until(Duration::from_secs(2), || {
        mg.metric(
            "meshgate_rejected_total{tenant=\"acme\",instance=\"socks\",reason=\"udp_fragment\"}",
        ) >= 1.0
    }));
    // A thousand datagrams each way, none lost.
    for i in 0..1000u32 {
        let mut d = header(0);
        d.extend_from_slice(&i.to_be_bytes());
        client.send_to(&d, relay).unwrap();
        let (n, _) = client.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], &d[..], "datagram {i}");
    }
    // A datagram from another port than the one announced is not relayed.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(&d, relay).unwrap();
    assert!(wait_until(Duration::from_secs(2), || {
        mg.metric("meshgate_rejected_total{tenant=\"acme\",instance=\"socks\",reason=\"udp_foreign_source\"}") >= 1.0
    }));
    // Closing the control connection ends the association.
    drop(ctl);
    std::thread::sleep(Duration::from_millis(300));
    client.send_to(&d, relay).unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(
        client.recv_from(&mut b).is_err(),
        "relay still answering after the control connection closed"
    );
}
