//! Stacks joined back to back in memory, hand-built packets, and fuzzing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use etherparse::{
    Icmpv4Type, Icmpv6Type, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::device::Device;
use super::stack::Shared;
use super::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A sink that injects into another stack: one direction of a wire, which
/// a test can cut.
#[derive(Default)]
struct Wire(OnceLock<Arc<Shared>>, AtomicBool);

impl PacketSink for Wire {
    fn send(&self, packet: &[u8]) {
        if self.1.load(Ordering::Relaxed) {
            return;
        }
        if let Some(peer) = self.0.get() {
            peer.inject(packet);
        }
    }
}

/// A sink that drops everything (an unreachable network).
struct Void;

impl PacketSink for Void {
    fn send(&self, _: &[u8]) {}
}

/// A sink that keeps every packet.
#[derive(Default)]
struct Capture(Mutex<Vec<Vec<u8>>>);

impl PacketSink for Capture {
    fn send(&self, packet: &[u8]) {
        self.0.lock().unwrap().push(packet.to_vec());
    }
}

impl Capture {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Two stacks on one wire.
fn pair(a: &str, b: &str) -> (NetStack, NetStack) {
    let (sa, sb, _) = wired(
        NetStackConfig::new(vec![net(a)]),
        NetStackConfig::new(vec![net(b)]),
    );
    (sa, sb)
}

/// Two stacks on one wire, and the wire (both directions) to cut.
fn wired(a: NetStackConfig, b: NetStackConfig) -> (NetStack, NetStack, [Arc<Wire>; 2]) {
    let to_b = Arc::new(Wire::default());
    let to_a = Arc::new(Wire::default());
    let sa = NetStack::spawn(a, to_b.clone());
    let sb = NetStack::spawn(b, to_a.clone());
    let _ = to_b.0.set(sb.shared().clone());
    let _ = to_a.0.set(sa.shared().clone());
    (sa, sb, [to_a, to_b])
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress within {LIMIT:?}"))
}

/// Waits until `f` holds, polling.
async fn eventually(what: &str, max: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < max, "{what}: still false after {max:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connected(
    a: &NetStack,
    l: &mut NetTcpListener,
    dst: SocketAddr,
) -> (NetTcpStream, NetTcpStream) {
    let (c, s) = tokio::join!(a.connect_tcp(dst, Duration::from_secs(5)), l.accept());
    (c.unwrap(), s.unwrap().0)
}

/// What `core::net::proxy::Stream::io` and spawning need.
#[test]
fn handles_and_streams_are_sendable() {
    fn stream<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static>() {}
    fn sendable<T: Send + Sync + 'static>() {}
    stream::<NetTcpStream>();
    sendable::<NetStack>();
    sendable::<NetTcpListener>();
    sendable::<NetError>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_then_half_close() {
    const LEN: usize = 16 << 20;
    let (a, b) = pair("10.9.0.1/24", "10.9.0.2/24");
    let mut l = b.listen_tcp(sa("10.9.0.2:80")).await.unwrap();
    assert_eq!(l.local_addr(), sa("10.9.0.2:80"));
    let (ca, cb) = connected(&a, &mut l, sa("10.9.0.2:80")).await;
    assert_eq!(ca.peer_addr(), sa("10.9.0.2:80"));
    assert_eq!(cb.peer_addr(), ca.local_addr());
    assert_eq!(
        ca.local_addr().ip(),
        "10.9.0.1".parse::<std::net::IpAddr>().unwrap()
    );

    let (mut ra, mut wa) = tokio::io::split(ca);
    let (mut rb, mut wb) = tokio::io::split(cb);
    let data_a = Arc::new(pattern(1, LEN));
    let data_b = Arc::new(pattern(2, LEN));
    let (da, db) = (data_a.clone(), data_b.clone());
    let send_a = tokio::spawn(async move {
        wa.write_all(&da).await.unwrap();
        wa
    });
    let send_b = tokio::spawn(async move {
        wb.write_all(&db).await.unwrap();
        wb
    });
    let recv_b = tokio::spawn(async move {
        let mut buf = vec![0u8; LEN];
        rb.read_exact(&mut buf).await.unwrap();
        (rb, buf)
    });
    let recv_a = tokio::spawn(async move {
        let mut buf = vec![0u8; LEN];
        ra.read_exact(&mut buf).await.unwrap();
        (ra, buf)
    });
    let (mut wa, mut wb) = within("send", async {
        (send_a.await.unwrap(), send_b.await.unwrap())
    })
    .await;
    let ((mut ra, got_a), (mut rb, got_b)) = within("receive", async {
        (recv_a.await.unwrap(), recv_b.await.unwrap())
    })
    .await;
    assert!(got_b == *data_a, "A to B corrupted");
    assert!(got_a == *data_b, "B to A corrupted");

    // Half-close: A stops sending, B sees EOF and still answers.
    wa.shutdown().await.unwrap();
    let mut one = [0u8; 16];
    let n = within("EOF at B", rb.read(&mut one)).await.unwrap();
    assert_eq!(n, 0, "B must see EOF after A's shutdown");
    let reply = pattern(3, 300_000);
    within("reply", wb.write_all(&reply)).await.unwrap();
    wb.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("reply at A", ra.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(got == reply, "reply after half-close corrupted");
    assert!(a.stats().packets_out > 0 && b.stats().packets_in > 0);
    assert_eq!(a.stats().dropped_malformed, 0);

    drop((ra, wa, rb, wb));
    eventually("sockets reaped", Duration::from_secs(5), || {
        a.socket_count() == 0 && b.socket_count() == 0
    })
    .await;
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn refused_and_timeout() {
    let (a, b) = pair("10.9.0.1/24", "10.9.0.2/24");
    let start = Instant::now();
    let e = a
        .connect_tcp(sa("10.9.0.2:81"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(e, NetError::Refused(d) if d == sa("10.9.0.2:81")),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(b.stats().dropped_no_listener, 1);

    let lonely = NetStack::spawn(
        NetStackConfig::new(vec![net("10.9.0.1/24")]),
        Arc::new(Void),
    );
    let start = Instant::now();
    let e = lonely
        .connect_tcp(sa("10.9.0.2:80"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Timeout(_)), "{e}");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(e.to_string().contains("10.9.0.2:80"), "{e}");

    let e = lonely
        .connect_tcp(sa("[fd00::2]:80"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::NoSourceAddress(_)), "{e}");
    let e = lonely
        .connect_tcp(sa("0.0.0.0:80"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::InvalidAddress(_)), "{e}");

    // Failed connects leave nothing behind.
    eventually("sockets reaped", Duration::from_secs(3), || {
        a.socket_count() == 0 && lonely.socket_count() == 0
    })
    .await;
    for s in [a, b, lonely] {
        s.shutdown();
    }
}

#[tokio::test]
async fn listen_errors_and_any_address() {
    let (a, b) = pair("10.9.0.1/24", "10.9.0.2/24");
    let e = b.listen_tcp(sa("10.9.0.3:80")).await.unwrap_err();
    assert!(matches!(e, NetError::NotLocal(_)), "{e}");
    let e = b.listen_tcp(sa("[::]:80")).await.unwrap_err();
    assert!(matches!(e, NetError::NotLocal(_)), "{e}");

    let mut any = b.listen_tcp(sa("0.0.0.0:80")).await.unwrap();
    let e = b.listen_tcp(sa("10.9.0.2:80")).await.unwrap_err();
    assert!(matches!(e, NetError::AddrInUse(_)), "{e}");
    let (mut c, mut s) = connected(&a, &mut any, sa("10.9.0.2:80")).await;
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // Port 0 picks one; dropping the listener frees the port.
    let l = b.listen_tcp(sa("10.9.0.2:0")).await.unwrap();
    let port = l.local_addr().port();
    assert!(port >= 49152, "{port}");
    drop(l);
    let e = a
        .connect_tcp(
            SocketAddr::new("10.9.0.2".parse().unwrap(), port),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Refused(_)), "{e}");
    let again = b
        .listen_tcp(SocketAddr::new("10.9.0.2".parse().unwrap(), port))
        .await;
    assert!(again.is_ok());

    // Shutdown: streams fail, accept ends.
    b.shutdown();
    let e = within("accept after shutdown", any.accept())
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Closed), "{e}");
    let e = within("read after shutdown", s.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted);
    // A saw the reset.
    let r = within("read after peer shutdown", c.read(&mut buf)).await;
    assert!(
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!(!b.inject(&[0x45; 20]));
    a.shutdown();
}

/// A transparent listener takes connections to any address and port of
/// its family that no listener of the stack's own takes, and its streams
/// say where the client meant to go.
#[tokio::test]
async fn a_transparent_listener_takes_any_destination_and_knows_it() {
    use crate::core::net::listen::StreamListener as _;
    let (a, b) = pair("10.9.0.1/24", "10.9.0.2/24");
    let far = sa("203.0.113.7:443");
    // Without one, nothing answers for an address that is not b's.
    let e = a
        .connect_tcp(far, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Timeout(_)), "{e}");

    let mut own = b.listen_tcp(sa("10.9.0.2:80")).await.unwrap();
    let mut any = b.listen_transparent(false).unwrap();
    assert_eq!(any.local_addr(), sa("0.0.0.0:0"));
    let e = b.listen_transparent(false).unwrap_err();
    assert!(matches!(e, NetError::AddrInUse(_)), "{e}");

    let (mut c, mut s) = connected(&a, &mut any, far).await;
    assert_eq!(s.local_addr(), far);
    assert_eq!(s.peer_addr(), c.local_addr());
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");

    // The port's own listener still wins on b's own address; another port
    // of b's address goes to the transparent one.
    let (_c2, s2) = connected(&a, &mut own, sa("10.9.0.2:80")).await;
    assert_eq!(s2.local_addr(), sa("10.9.0.2:80"));
    let c3 = a.connect_tcp(sa("10.9.0.2:81"), Duration::from_secs(5));
    let (c3, got) = tokio::join!(c3, any.accept_addressed());
    let (_, src, dst) = got.unwrap();
    assert_eq!(
        (src, dst),
        (c3.unwrap().local_addr(), Some(sa("10.9.0.2:81")))
    );

    // Dropped: nothing answers there again.
    drop(any);
    let e = a
        .connect_tcp(sa("203.0.113.8:443"), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Timeout(_)), "{e}");
    a.shutdown();
    b.shutdown();
}

/// Transparent UDP takes datagrams to any address no bound socket takes,
/// and answers from the address the client sent to.
#[tokio::test]
async fn transparent_udp_takes_any_destination_and_answers_from_it() {
    use crate::core::net::datagram::DatagramSocket;
    let (a, b) = pair("10.9.0.1/24", "10.9.0.2/24");
    let client = a.bind_udp(sa("10.9.0.1:0")).unwrap();
    let own = b.bind_udp(sa("10.9.0.2:53")).unwrap();
    let any = b.transparent_udp().unwrap();
    let e = b.transparent_udp().err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    let far = sa("203.0.113.9:5000");
    client.send_to(b"hello", far).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, from, to) = within("transparent recv", any.recv(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        (&buf[..n], from, to),
        (&b"hello"[..], client.local_addr().unwrap(), far)
    );
    any.reply_from(far).send_to(b"back", from).await.unwrap();
    let (n, src) = within("reply", client.recv_from(&mut buf)).await.unwrap();
    assert_eq!((&buf[..n], src), (&b"back"[..], far));
    // A bound socket still takes its own port.
    client.send_to(b"dns", sa("10.9.0.2:53")).await.unwrap();
    let (n, _) = within("bound recv", own.recv_from(&mut buf)).await.unwrap();
    assert_eq!(&buf[..n], b"dns");
    // Dropped: another may take its place.
    drop(any);
    assert!(b.transparent_udp().is_ok());
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn tcp_over_ipv6_from_a_dual_stack_node() {
    let (a, b, _) = wired(
        NetStackConfig::new(vec![net("10.9.0.1/24"), net("fd00::1/64")]),
        NetStackConfig::new(vec![net("fd00::2/64")]),
    );
    let mut l = b.listen_tcp(sa("[::]:443")).await.unwrap();
    let (mut c, mut s) = connected(&a, &mut l, sa("[fd00::2]:443")).await;
    assert_eq!(
        c.local_addr().ip(),
        "fd00::1".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(s.peer_addr(), c.local_addr());
    let data = pattern(7, 200_000);
    let (_, got) = tokio::join!(
        async {
            c.write_all(&data).await.unwrap();
            c.shutdown().await.unwrap();
        },
        async {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        }
    );
    assert!(got == data, "IPv6 transfer corrupted");
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peers_time_out_idle_connections_do_not() {
    let mut cfg = NetStackConfig::new(vec![net("10.9.0.1/24")]);
    cfg.tcp_timeout = Duration::from_secs(1);
    let mut cfg_b = cfg.clone();
    cfg_b.addresses = vec![net("10.9.0.2/24")];
    let (a, b, wire) = wired(cfg, cfg_b);
    let mut l = b.listen_tcp(sa("10.9.0.2:22")).await.unwrap();
    let (mut c, mut s) = connected(&a, &mut l, sa("10.9.0.2:22")).await;

    // Idle well past the timeout: still alive (no keep-alive, no data).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.write_all(b"still there?").await.unwrap();
    let mut buf = [0u8; 12];
    within("idle connection", s.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"still there?");

    // The peer vanishes while data waits for its acknowledgement.
    for w in &wire {
        w.1.store(true, Ordering::Relaxed);
    }
    c.write_all(b"hello?").await.unwrap();
    let start = Instant::now();
    let r = within("dead peer", c.read(&mut buf)).await;
    assert!(
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // A dropped stream to a dead peer is reaped too (its FIN is never
    // acknowledged).
    drop(s);
    drop(c);
    eventually("orphans reaped", Duration::from_secs(5), || {
        a.socket_count() == 0 && b.socket_count() == 0
    })
    .await;
    a.shutdown();
    b.shutdown();
}

fn echo_reply_v4(packets: &[Vec<u8>]) -> Option<(u16, u16, Vec<u8>)> {
    packets.iter().find_map(|p| {
        let h = PacketHeaders::from_ip_slice(p).ok()?;
        let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
            return None;
        };
        assert_eq!(ip.source, [10, 9, 0, 1]);
        assert_eq!(ip.destination, [10, 9, 0, 2]);
        match h.transport? {
            TransportHeader::Icmpv4(icmp) => match icmp.icmp_type {
                Icmpv4Type::EchoReply(e) => Some((e.id, e.seq, h.payload.slice().to_vec())),
                _ => None,
            },
            _ => None,
        }
    })
}

fn echo_reply_v6(packets: &[Vec<u8>]) -> Option<(u16, u16, Vec<u8>)> {
    packets.iter().find_map(|p| {
        let h = PacketHeaders::from_ip_slice(p).ok()?;
        match h.transport? {
            TransportHeader::Icmpv6(icmp) => match icmp.icmp_type {
                Icmpv6Type::EchoReply(e) => Some((e.id, e.seq, h.payload.slice().to_vec())),
                _ => None,
            },
            _ => None,
        }
    })
}

#[tokio::test]
async fn answers_ping_v4_and_v6() {
    let cap = Arc::new(Capture::default());
    let stack = NetStack::spawn(
        NetStackConfig::new(vec![net("10.9.0.1/24"), net("fd00::1/64")]),
        cap.clone(),
    );
    let payload = pattern(9, 56);
    let mut req = Vec::new();
    PacketBuilder::ipv4([10, 9, 0, 2], [10, 9, 0, 1], 64)
        .icmpv4_echo_request(0x1234, 7)
        .write(&mut req, &payload)
        .unwrap();
    assert!(stack.inject(&req));
    let mut got = Vec::new();
    eventually("echo reply v4", Duration::from_secs(2), || {
        got.extend(cap.take());
        echo_reply_v4(&got).is_some()
    })
    .await;
    assert_eq!(echo_reply_v4(&got).unwrap(), (0x1234, 7, payload.clone()));

    let src: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
    let dst: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
    let mut req = Vec::new();
    PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
        .icmpv6_echo_request(0x4321, 9)
        .write(&mut req, &payload)
        .unwrap();
    assert!(stack.inject(&req));
    let mut got = Vec::new();
    eventually("echo reply v6", Duration::from_secs(2), || {
        got.extend(cap.take());
        echo_reply_v6(&got).is_some()
    })
    .await;
    assert_eq!(echo_reply_v6(&got).unwrap(), (0x4321, 9, payload));
    stack.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_connections_then_empty() {
    const CONNS: usize = 100;
    const LEN: usize = 64 << 10;
    let (a, b) = pair("10.9.0.1/24", "10.9.0.2/24");
    let mut l = b.listen_tcp(sa("10.9.0.2:7")).await.unwrap();
    // Echo server.
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..CONNS {
            let (s, _) = l.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    let mut clients = Vec::new();
    for i in 0..CONNS {
        let a = a.clone();
        clients.push(tokio::spawn(async move {
            let s = a
                .connect_tcp(sa("10.9.0.2:7"), Duration::from_secs(10))
                .await
                .unwrap();
            let data = pattern(100 + i as u64, LEN);
            let (mut r, mut w) = tokio::io::split(s);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            let _w = writer.await.unwrap();
            assert!(back == data, "connection {i} corrupted");
        }));
    }
    within("clients", async {
        for c in clients {
            c.await.unwrap();
        }
    })
    .await;
    assert_eq!(
        within("server", server).await.unwrap(),
        (CONNS * LEN) as u64
    );
    assert_eq!(a.stats().dropped_backlog + b.stats().dropped_backlog, 0);
    eventually("socket sets empty", Duration::from_secs(5), || {
        a.socket_count() == 0 && b.socket_count() == 0
    })
    .await;
    assert_eq!(a.stats().tcp_connections, 0);
    assert_eq!(b.stats().tcp_connections, 0);
    a.shutdown();
    b.shutdown();
}

/// `cargo test --release --lib engine::userspace -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figure; run in release"]
async fn throughput_two_stacks() {
    throughput(0).await;
}

/// The same with idle connections open on both stacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figure; run in release"]
async fn throughput_with_idle_connections() {
    throughput(1000).await;
}

async fn throughput(idle: usize) {
    const LEN: usize = 256 << 20;
    const CHUNK: usize = 256 << 10;
    let (a, b) = pair("10.9.0.1/24", "10.9.0.2/24");
    let mut l = b.listen_tcp(sa("10.9.0.2:5001")).await.unwrap();
    let mut idlers = Vec::new();
    for _ in 0..idle {
        idlers.push(connected(&a, &mut l, sa("10.9.0.2:5001")).await);
    }
    let (mut c, mut s) = connected(&a, &mut l, sa("10.9.0.2:5001")).await;
    let chunk = pattern(5, CHUNK);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < LEN {
            c.write_all(&chunk).await.unwrap();
            sent += CHUNK;
        }
        c.shutdown().await.unwrap();
        c
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0usize;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let _c = writer.await.unwrap();
    assert_eq!(got, LEN);
    let mbs = LEN as f64 / secs / 1e6;
    println!(
        "netstack throughput ({idle} idle connections): {} MiB in {secs:.2} s = {mbs:.0} MB/s = {:.2} Gbit/s (a: {:?}, b: {:?})",
        LEN >> 20,
        mbs * 8.0 / 1000.0,
        a.stats(),
        b.stats()
    );
    a.shutdown();
    b.shutdown();
}

// ---- driven synchronously, without a task ----

/// One stack with listeners on every address, pumped by hand.
struct Bench {
    shared: Arc<Shared>,
    dev: Device,
    sink: Capture,
    _accepts: Vec<tokio::sync::mpsc::Receiver<NetTcpStream>>,
}

impl Bench {
    fn new(backlog: usize) -> Bench {
        let mut cfg = NetStackConfig::new(vec![net("10.9.0.1/24"), net("fd00::1/64")]);
        cfg.listen_backlog = backlog;
        let shared = Shared::new(cfg);
        let accepts = vec![
            shared.listen_now(sa("0.0.0.0:80")),
            shared.listen_now(sa("[::]:80")),
        ];
        Bench {
            dev: Device::new(shared.limits.mtu),
            shared,
            sink: Capture::default(),
            _accepts: accepts,
        }
    }

    fn feed(&mut self, packet: &[u8]) -> bool {
        let ok = self.shared.inject(packet);
        self.shared.pump_until_idle(&mut self.dev, &self.sink);
        ok
    }
}

fn syn_v4(src_port: u16, seq: u32) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv4([10, 9, 0, 2], [10, 9, 0, 1], 64)
        .tcp(src_port, 80, seq, 64240)
        .syn()
        .write(&mut p, &[])
        .unwrap();
    p
}

#[test]
fn syn_backlog_and_resets() {
    let mut t = Bench::new(4);
    for port in 0..10 {
        t.feed(&syn_v4(40000 + port, 1000));
    }
    assert_eq!(t.shared.socket_count(), 4);
    assert_eq!(t.shared.stats().dropped_backlog, 6);
    // A retransmitted SYN gets no second socket.
    t.feed(&syn_v4(40000, 1000));
    assert_eq!(t.shared.socket_count(), 4);
    // A reset turns a half-open socket back to listening in smoltcp; the
    // stack drops it instead.
    let mut rst = Vec::new();
    PacketBuilder::ipv4([10, 9, 0, 2], [10, 9, 0, 1], 64)
        .tcp(40000, 80, 1001, 0)
        .rst()
        .write(&mut rst, &[])
        .unwrap();
    t.feed(&rst);
    assert_eq!(t.shared.socket_count(), 3);
    // Now there is room again.
    t.feed(&syn_v4(40009, 5000));
    assert_eq!(t.shared.socket_count(), 4);
    // SYN-ACKs went out for every accepted SYN.
    let synacks = t
        .sink
        .take()
        .iter()
        .filter(|p| {
            matches!(PacketHeaders::from_ip_slice(p).map(|h| h.transport),
                Ok(Some(TransportHeader::Tcp(tcp))) if tcp.syn && tcp.ack)
        })
        .count();
    assert!(synacks >= 5, "{synacks}");
}

/// A packet built from fuzzed fields: real headers, odd contents.
fn crafted() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..6,
        any::<bool>(),
        any::<u16>(),
        any::<[bool; 5]>(),
        any::<(u32, u32, u16)>(),
        proptest::collection::vec(any::<u8>(), 0..1500),
        proptest::option::of((any::<usize>(), any::<u8>())),
    )
        .prop_map(|(kind, v6, sport, flags, (seq, ack, win), payload, flip)| {
            let builder = if v6 {
                let src: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
                let dst: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
                PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            } else {
                PacketBuilder::ipv4([10, 9, 0, 2], [10, 9, 0, 1], 64)
            };
            let dport = if kind % 2 == 0 { 80 } else { sport };
            let mut out = Vec::new();
            let _ = match kind {
                0..=2 => {
                    let mut b = builder.tcp(sport, dport, seq, win);
                    if flags[0] {
                        b = b.syn();
                    }
                    if flags[1] {
                        b = b.ack(ack);
                    }
                    if flags[2] {
                        b = b.fin();
                    }
                    if flags[3] {
                        b = b.rst();
                    }
                    if flags[4] {
                        b = b.psh();
                    }
                    b.write(&mut out, &payload)
                }
                3 => builder.udp(sport, dport).write(&mut out, &payload),
                4 if v6 => builder
                    .icmpv6_echo_request(sport, dport)
                    .write(&mut out, &payload),
                _ => builder
                    .icmpv4_echo_request(sport, dport)
                    .write(&mut out, &payload),
            };
            if let Some((at, byte)) = flip {
                if !out.is_empty() {
                    let i = at % out.len();
                    out[i] ^= byte;
                }
            }
            out
        })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1600), 1..20)
    ) {
        let mut t = Bench::new(8);
        for p in &packets {
            t.feed(p);
        }
        let s = t.shared.stats();
        prop_assert_eq!(s.packets_in + s.dropped_malformed + s.dropped_queue_full, packets.len() as u64);
    }

    #[test]
    fn crafted_packets_never_panic(packets in proptest::collection::vec(crafted(), 1..40)) {
        let mut t = Bench::new(8);
        for p in &packets {
            t.feed(p);
        }
        let s = t.shared.stats();
        prop_assert_eq!(s.packets_in + s.dropped_malformed + s.dropped_queue_full, packets.len() as u64);
        prop_assert!(t.shared.socket_count() <= 16);
    }
}

#[tokio::test]
async fn udp_datagrams_cross_two_stacks_and_unbound_ports_are_refused() {
    use crate::core::net::datagram::DatagramSocket;
    let (a, b) = pair("10.0.0.1/24", "10.0.0.2/24");
    let server = b.bind_udp(sa("0.0.0.0:5353")).unwrap();
    let client = a.bind_udp(sa("10.0.0.1:0")).unwrap();
    let local = DatagramSocket::local_addr(&client).unwrap();
    assert!(local.port() >= 49152, "{local}");
    assert_eq!(
        b.bind_udp(sa("10.0.0.2:5353")).map(|_| ()).ok(),
        Some(()),
        "a specific address beside the wildcard"
    );
    assert_eq!(
        b.bind_udp(sa("0.0.0.0:5353")).err().map(|e| e.kind()),
        Some(std::io::ErrorKind::AddrInUse)
    );
    assert_eq!(
        a.bind_udp(sa("10.9.9.9:1")).err().map(|e| e.kind()),
        Some(std::io::ErrorKind::AddrNotAvailable)
    );
    client
        .send_to(b"question", sa("10.0.0.2:5353"))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(LIMIT, server.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"question"[..], local));
    server.send_to(b"answer", from).await.unwrap();
    let (n, from) = tokio::time::timeout(LIMIT, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"answer"[..], sa("10.0.0.2:5353")));
    // Too big for the MTU: refused, not fragmented.
    let big = vec![0u8; 2000];
    assert!(client.send_to(&big, sa("10.0.0.2:5353")).await.is_err());
    // A dropped socket frees its port.
    drop(server);
    assert!(b.bind_udp(sa("0.0.0.0:5353")).is_ok());
}

/// One direction of a wire that loses every `n`th packet.
struct Lossy {
    peer: OnceLock<Arc<Shared>>,
    n: u64,
    count: std::sync::atomic::AtomicU64,
}

impl PacketSink for Lossy {
    fn send(&self, packet: &[u8]) {
        let i = self.count.fetch_add(1, Ordering::Relaxed);
        if i % self.n == self.n - 1 {
            return;
        }
        if let Some(peer) = self.peer.get() {
            peer.inject(packet);
        }
    }
}

#[tokio::test]
async fn a_lossy_wire_is_repaired_and_the_repairs_are_counted() {
    // Every 50th data packet is lost (ACKs pass): the stream arrives whole
    // and the sender's counters show how its TCP repaired it.
    let to_b = Arc::new(Lossy {
        peer: OnceLock::new(),
        n: 50,
        count: Default::default(),
    });
    let to_a = Arc::new(Wire::default());
    let a = NetStack::spawn(NetStackConfig::new(vec![net("10.0.0.1/24")]), to_b.clone());
    let b = NetStack::spawn(NetStackConfig::new(vec![net("10.0.0.2/24")]), to_a.clone());
    let _ = to_b.peer.set(b.shared().clone());
    let _ = to_a.0.set(a.shared().clone());
    let mut l = b.listen_tcp(sa("10.0.0.2:80")).await.unwrap();
    let data = pattern(11, 4 << 20);
    let expect = data.clone();
    let send = tokio::spawn({
        let a = a.clone();
        async move {
            let mut s = a.connect_tcp(sa("10.0.0.2:80"), LIMIT).await.unwrap();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            // Held until the peer has read everything.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
    });
    let (mut s, _) = within("accept", l.accept()).await.unwrap();
    let mut got = Vec::new();
    within("the whole stream", s.read_to_end(&mut got))
        .await
        .unwrap();
    drop(s);
    assert!(
        got == expect,
        "the stream arrived changed ({} bytes)",
        got.len()
    );
    within("sender done", send).await.unwrap();
    let st = a.stats();
    assert!(st.tcp_retransmits >= 50, "{st:?}");
    assert!(st.tcp_recoveries >= 1, "{st:?}");
    assert_eq!(b.stats().tcp_retransmits, 0, "the receiver lost nothing");
}

#[tokio::test]
async fn buffer_memory_is_counted_and_given_back() {
    // A reader that waits makes its stack hold the window's bytes; once
    // the streams are gone, both stacks hold nothing.
    let (a, b) = pair("10.0.0.1/24", "10.0.0.2/24");
    let mut l = b.listen_tcp(sa("10.0.0.2:80")).await.unwrap();
    let data = pattern(12, 4 << 20);
    let writer = tokio::spawn({
        let a = a.clone();
        let data = data.clone();
        async move {
            let mut s = a.connect_tcp(sa("10.0.0.2:80"), LIMIT).await.unwrap();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            s
        }
    });
    let (mut s, _) = within("accept", l.accept()).await.unwrap();
    eventually("the receiver's ring fills", LIMIT, || {
        b.stats().tcp_buffer_bytes >= 512 * 1024
    })
    .await;
    let mut got = Vec::new();
    within("read", s.read_to_end(&mut got)).await.unwrap();
    assert!(got == data);
    drop(s);
    drop(within("writer", writer).await.unwrap());
    eventually("all buffers given back", LIMIT, || {
        a.stats().tcp_buffer_bytes == 0 && b.stats().tcp_buffer_bytes == 0
    })
    .await;
}
