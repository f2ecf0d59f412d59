//! The bodies of the fuzz targets, one function per target, so that one
//! piece of code is both what `cargo fuzz` (nightly, `fuzz/fuzz_targets/`)
//! drives and what the stable test suite runs over the checked-in seeds
//! (`fuzz/seeds/<target>/`, `tests/fuzz_seeds.rs`): a machine without
//! nightly still exercises every target. Each function states what must
//! hold for any input; a violation panics.
//!
//! Not an API: hidden from the docs, kept out of the binaries.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use configstore::format::{parse, Format};
use configstore::Document;

use crate::core::keys::PrivateKey;
use crate::core::metrics::Metrics;
use crate::core::spine::flow::{FlowTable, Protocol};
use crate::modules::wireguard::core::{Core, Wire};
use crate::modules::wireguard::port::Router;
use crate::modules::wireguard::WireGuardConfig;

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for the seed runner.
pub const TARGETS: &[(&str, Target)] = &[
    ("authorized_keys", authorized_keys),
    ("config_documents", config_documents),
    ("dns_query", dns_query),
    ("h2_request", h2_request),
    ("http_proxy", http_proxy),
    ("ip_packets", ip_packets),
    ("policy", policy),
    ("proxy_protocol", proxy_protocol),
    ("socks", socks),
    ("tcp_segments", tcp_segments),
    ("uapi_parse", uapi_parse),
    ("wg_datagram", wg_datagram),
];

/// `authorized_keys` text from arbitrary bytes: parsing returns keys or a
/// message naming the line, never a panic.
pub fn authorized_keys(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        match crate::modules::ssh::keys::parse_authorized_keys(text) {
            Ok(keys) => assert!(keys.iter().all(|k| !k.identity.is_empty())),
            Err(e) => assert!(e.starts_with("line ")),
        }
    }
}

/// Any bytes as a DNS query to the stub a `kind: netns` namespace asks:
/// reading never panics, a question read is answered with a reply that
/// parses back to the addresses of its type, and anything else gets a
/// header-only error or nothing.
pub fn dns_query(data: &[u8]) {
    use crate::core::net::dns;
    use std::net::IpAddr;
    match dns::parse_query(data) {
        Ok(q) => {
            assert!(q.name.len() <= 253);
            let addrs: [IpAddr; 2] = [
                [198, 18, 0, 1].into(),
                [0xfd00u16, 0, 0, 0, 0, 0, 0, 1].into(),
            ];
            let r = dns::encode_reply(&q, &addrs, 5, 0);
            let mut again = r.clone();
            again[2] &= 0x7f;
            again[6..8].copy_from_slice(&[0, 0]);
            if q.qtype == dns::TYPE_A || q.qtype == dns::TYPE_AAAA {
                let got = dns::parse_response(&r, q.id, q.qtype).expect("our reply parses");
                let want: Vec<IpAddr> = addrs
                    .iter()
                    .copied()
                    .filter(|a| a.is_ipv4() == (q.qtype == dns::TYPE_A))
                    .collect();
                assert_eq!(got, want);
                // Our reply's question reads back as the same question.
                let name_len = if q.name.is_empty() {
                    1
                } else {
                    q.name.len() + 2
                };
                let back =
                    dns::parse_query(&again[..12 + name_len + 4]).expect("our question reads back");
                assert_eq!((back.id, back.name, back.qtype), (q.id, q.name, q.qtype));
            }
        }
        Err(_) => {
            if let Some(e) = dns::encode_error(data, dns::RCODE_FORMERR) {
                assert_eq!(e.len(), 12);
                assert_eq!(e[..2], data[..2]);
            }
        }
    }
}

/// Any YAML, JSON or TOML text as a module document of every kind: a
/// config or an error naming the source, never a panic.
pub fn config_documents(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for format in [Format::Yaml, Format::Json, Format::Toml] {
        if let Ok(value) = parse(&text, format, "fuzz.yaml") {
            let doc = Document {
                source: "fuzz.yaml".into(),
                value,
            };
            let _ = crate::modules::pipe::PipeConfig::from_document(&doc);
            let _ = crate::modules::vnet::VnetConfig::from_document(&doc);
            let _ = WireGuardConfig::from_document(&doc);
        }
    }
}

/// The HTTP proxy's own parsing: `Proxy-Authorization` values never panic,
/// and what parses has the user before the first colon. (Request heads are
/// hyper's, bounded by the door's limits.)
pub fn http_proxy(data: &[u8]) {
    if let Some((user, _password)) = crate::modules::http_proxy::parse_basic(data) {
        assert!(!user.contains(':'));
    }
}

/// The h2 door's own reading of a CONNECT request (HTTP/2 framing and
/// header decoding are the `h2` crate's, bounded by the door's limits):
/// the first line as the `:authority`, then as a `Forwarded` value, the
/// rest as `traceparent` (the second line) and `baggage` values. Never
/// panics; what is kept is within its limits.
pub fn h2_request(data: &[u8]) {
    use crate::core::spine::flow::Trace;
    use crate::core::spine::onramp::http::connect_target;
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let first = lines.first().copied().unwrap_or_default();
    if let Ok(a) = hyper::http::uri::Authority::try_from(first) {
        if let Some(t) = connect_target(Some(&a)) {
            assert!(!t.host.is_empty() && t.port.to_string().len() <= 5);
        }
    }
    let _ = crate::core::spine::onramp::http::parse_forwarded(first);
    if let Some(t) = Trace::parse(
        lines.iter().skip(1).take(1).copied(),
        lines.iter().skip(2).copied(),
    ) {
        if let Some(tp) = &t.traceparent {
            assert!(tp.len() >= 55 && tp.len() <= 256);
        }
        if let Some(b) = &t.baggage {
            assert!(b.len() <= Trace::MAX_BAGGAGE);
        }
    }
}

/// Any bytes as an IP packet: the userspace stack's door, the
/// forwarded-flow tracker, the router's TTL handling, the DNS answer
/// parser and the kernel engine's TUN frame splitter never panic.
pub fn ip_packets(data: &[u8]) {
    use crate::core::spine::ipflow::{hop, time_exceeded, IpFlows};
    static FLOWS: OnceLock<IpFlows> = OnceLock::new();
    let flows = FLOWS.get_or_init(|| {
        let m = Metrics::new();
        IpFlows::new(
            "fuzz",
            "wg0",
            Arc::new(FlowTable::new(vec![])),
            m.instance("fuzz", "wg0"),
        )
    });
    let _ = crate::core::engine::userspace::inspect_packet(data);
    let _ = flows.packet(data, "peer", Instant::now());
    if flows.len() > 10_000 {
        flows.clear();
    }
    let _ = crate::core::engine::kernel::offload::split(data, &mut Vec::new(), |_| {});
    let mut copy = data.to_vec();
    let _ = hop(&mut copy);
    let _ = time_exceeded(data, IpAddr::from([10, 0, 0, 1]));
    let _ = time_exceeded(data, "fd00::1".parse().expect("an address"));
    let id = u16::from_be_bytes([*data.first().unwrap_or(&0), *data.get(1).unwrap_or(&0)]);
    let _ = crate::core::net::dns::parse_response(data, id, crate::core::net::dns::TYPE_A);
}

/// Any text as a `kind: policy` document (a rule set or an error naming
/// the file and key, never a panic), what parses compiled and asked a
/// decision derived from the same bytes; and the first line as a
/// destination host: an address or a name, never a panic, and an address
/// it gives is the address it prints as.
pub fn policy(data: &[u8]) {
    use crate::core::spine::dest::{self, Host};
    use crate::core::spine::policy::{Facts, PolicySet};
    let text = String::from_utf8_lossy(data);
    let host = text.lines().next().unwrap_or_default();
    match dest::normalize_host(host) {
        Host::Ip(ip) => {
            assert_eq!(dest::normalize_host(&ip.to_string()), Host::Ip(ip));
            let _ = (dest::never(ip), dest::protected(ip));
        }
        Host::Name(n) => assert!(!n.ends_with('.')),
    }
    for format in [Format::Yaml, Format::Json] {
        let Ok(value) = parse(&text, format, "fuzz.yaml") else {
            continue;
        };
        let doc = Document {
            source: "fuzz.yaml".into(),
            value,
        };
        if let Ok(p) = crate::modules::policy::config::from_document(&doc) {
            let set = PolicySet::new(p.rules, p.default_deny);
            let b = |i: usize| data.get(i).copied().unwrap_or(0);
            let facts = Facts {
                door: "socks",
                kind: "socks",
                identity: Some(host),
                src: IpAddr::from([10, b(0), b(1), b(2)]),
                host: Some(host),
                ip: Some(IpAddr::from([b(3), b(4), b(5), b(6)])),
                port: u16::from_be_bytes([b(7), b(8)]),
                protocol: Protocol::Tcp,
            };
            let d = set.decide(&facts);
            // Without rules or `default: deny` nothing is denied.
            assert!(!set.is_empty() || !d.deny);
        }
    }
}

/// PROXY protocol headers: parsing never panics, a whole header never
/// claims more bytes than given (nor more than the limit), and what we
/// encode parses back to the same addresses.
pub fn proxy_protocol(data: &[u8]) {
    use crate::core::net::proxy_protocol::{encode, parse, Version, MAX_HEADER};
    if let Ok(Some((_, n))) = parse(data) {
        assert!(n <= data.len() && n <= MAX_HEADER);
    }
    if data.len() >= 36 {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        a.copy_from_slice(&data[..16]);
        b.copy_from_slice(&data[16..32]);
        let src = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(a)),
            u16::from_be_bytes([data[32], data[33]]),
        );
        let dst = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(b)),
            u16::from_be_bytes([data[34], data[35]]),
        );
        for v in [Version::V1, Version::V2] {
            let h = encode(v, src, dst);
            let (got, n) = parse(&h)
                .expect("our own header parses")
                .expect("our own header is whole");
            assert_eq!(n, h.len());
            let canon = |s: SocketAddr| (s.ip().to_canonical(), s.port());
            let (s, d) = got.addrs.expect("addresses in our own header");
            assert_eq!((canon(s), canon(d)), (canon(src), canon(dst)));
        }
    }
}

/// SOCKS messages: every parser returns a message, a need for more bytes,
/// or an error, never a panic; a whole message never claims more bytes than
/// it was given, and a message cut short is never whole.
pub fn socks(data: &[u8]) {
    use crate::modules::socks::proto;
    fn check<T>(data: &[u8], parse: impl Fn(&[u8]) -> proto::Parsed<T>) {
        if let Ok(Some((_, n))) = parse(data) {
            assert!(n <= data.len() && n > 0);
            assert!(!matches!(parse(&data[..n - 1]), Ok(Some(_))));
        }
    }
    check(data, proto::parse_greeting);
    check(data, proto::parse_credentials);
    check(data, proto::parse_request);
    check(data, proto::parse_socks4);
    if let Ok(Some((_, at))) = proto::parse_udp(data) {
        assert!(at <= data.len());
    }
}

/// Any bytes as TCP segments: the parser never panics, and a connection
/// (meshgate's own TCP) fed arbitrary segments, checksum or not, never
/// panics and keeps its invariants while it answers.
pub fn tcp_segments(data: &[u8]) {
    use crate::core::engine::tcp::cc::Algorithm;
    use crate::core::engine::tcp::seq::Seq;
    use crate::core::engine::tcp::socket::{Config, Socket};
    use crate::core::engine::tcp::wire::{self, Header, Options, SYN};
    let a = SocketAddr::from(([10, 0, 0, 1], 40000));
    let b = SocketAddr::from(([10, 0, 0, 2], 80));
    let _ = wire::parse(a.ip(), b.ip(), data);
    let cfg = Config {
        mtu: 1420,
        recv_buffer: 1 << 16,
        send_buffer: 1 << 16,
        keep_alive: Some(Duration::from_secs(1)),
        congestion: if data.first().is_some_and(|b| b & 1 == 1) {
            Algorithm::Cubic
        } else {
            Algorithm::Bbr
        },
    };
    let now = Instant::now();
    // A passive open from a well-formed SYN, then the fuzzer's segments.
    let mut syn = Vec::new();
    let options = Options {
        mss: Some(1380),
        window_scale: Some(7),
        sack_permitted: true,
        timestamp: Some((1, 0)),
        ..Options::default()
    };
    let header = Header {
        src: a,
        dst: b,
        seq: Seq(1000),
        ack: Seq(0),
        flags: SYN,
        window: 65535,
        options,
    };
    wire::emit(&mut syn, &header, [&[], &[]], 1);
    let parsed = wire::parse(a.ip(), b.ip(), &syn[20..]).expect("our own SYN parses");
    let mut socket = Socket::accept(cfg, &parsed, Seq(5000), now);
    let _ = socket.send_slice(&[7u8; 30_000]);
    let mut out = Vec::new();
    let mut t = now;
    for (i, chunk) in data.chunks(64).enumerate() {
        t += Duration::from_millis(u64::from(chunk[0] % 50));
        if let Ok(seg) = wire::parse_unchecked(a.ip(), b.ip(), chunk) {
            socket.handle(t, &seg);
        }
        for _ in 0..100 {
            out.clear();
            if !socket.poll_transmit(t, &mut out) {
                break;
            }
            assert!(out.len() <= 1420, "a packet over the MTU");
        }
        let mut buf = [0u8; 4096];
        let _ = socket.recv_slice(&mut buf);
        if i % 7 == 3 {
            let _ = socket.send_slice(chunk);
        }
        if let Some(at) = socket.poll_at() {
            t = t.max(at.min(t + Duration::from_secs(2)));
        }
    }
}

/// WireGuard UAPI requests: parsing never panics, and a parsed `set` turns
/// into the next config document or an EINVAL, never a panic.
pub fn uapi_parse(data: &[u8]) {
    use crate::modules::wireguard::uapi::{apply_set, errno, parse, Request};
    if let Ok(Request::Set(req)) = parse(data) {
        let doc = serde_json::json!({
            "kind": "wireguard",
            "private_key_file": "/etc/meshgate/wg0.key",
            "address": "10.192.0.1/24",
            "peers": [
                {"name": "a", "public_key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=", "allowed_ips": ["10.192.0.2/32"]},
            ],
        });
        match apply_set(&doc, &req, &[9; 32]) {
            Ok(next) => assert!(next["peers"].is_array()),
            Err(e) => assert_eq!(e.errno, errno::EINVAL),
        }
    }
}

/// What a simulated device sent, for the next step of the exchange.
#[derive(Default)]
struct Capture(Mutex<Vec<(SocketAddr, Vec<u8>)>>);

impl Wire for Capture {
    fn send_to(&self, data: &[u8], to: SocketAddr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((to, data.to_vec()));
        true
    }
    fn deliver(&self, _: &[u8]) -> bool {
        true
    }
}

impl Capture {
    fn take(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A hub with two peers (fixed keys) and one of those peers as a device of
/// its own, its handshake with the hub done: what the fuzzer sends from it
/// arrives authenticated, so the paths after decryption (allowed-IPs
/// checks, flow tracking, forwarding to the other peer) are reached.
struct WgWorld {
    hub: Core,
    hub_wire: Arc<Capture>,
    client: Core,
    client_wire: Arc<Capture>,
    /// A shared port with the hub and two others on it: raw datagrams are
    /// routed there too.
    port: Mutex<Router<usize>>,
}

const HUB_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), 51820);
const CLIENT_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2)), 51820);

fn fixed_key(byte: u8) -> PrivateKey {
    use base64::Engine;
    PrivateKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32]))
        .expect("32 bytes are a key")
}

fn simulated(name: &str, doc: serde_json::Value, wire: Arc<Capture>) -> Core {
    let cfg = WireGuardConfig::from_document(&Document {
        source: format!("fuzz {name}"),
        value: doc,
    })
    .expect("the fuzz world's documents are valid");
    Core::simulated(
        "fuzz",
        name,
        &cfg,
        Arc::new(Metrics::new()),
        Arc::new(FlowTable::new(vec![])),
        wire,
        Instant::now(),
    )
}

impl WgWorld {
    fn get() -> &'static WgWorld {
        static WORLD: OnceLock<WgWorld> = OnceLock::new();
        WORLD.get_or_init(|| {
            let (hub_key, client_key, other_key) = (fixed_key(1), fixed_key(2), fixed_key(3));
            let hub_wire = Arc::new(Capture::default());
            let client_wire = Arc::new(Capture::default());
            let hub = simulated(
                "hub",
                serde_json::json!({
                    "kind": "wireguard",
                    "private_key": hub_key.to_base64(),
                    "address": "10.192.0.1/24",
                    "forward": true,
                    "peers": [
                        {"name": "client", "public_key": client_key.public_key().to_string(), "allowed_ips": ["10.192.0.2/32"]},
                        {"name": "other", "public_key": other_key.public_key().to_string(), "allowed_ips": ["10.192.0.3/32"], "endpoint": "192.0.2.3:51820"},
                    ],
                }),
                hub_wire.clone(),
            );
            let client = simulated(
                "client",
                serde_json::json!({
                    "kind": "wireguard",
                    "private_key": client_key.to_base64(),
                    "address": "10.192.0.2/24",
                    "peers": [
                        {"name": "hub", "public_key": hub_key.public_key().to_string(), "allowed_ips": ["10.192.0.0/24"], "endpoint": HUB_ADDR.to_string()},
                    ],
                }),
                client_wire.clone(),
            );
            let mut port = Router::new(Instant::now(), 1_000_000.0);
            for (i, key) in [hub_key, fixed_key(4), fixed_key(5)].iter().enumerate() {
                let id = port
                    .join(&key.public_key().0)
                    .expect("distinct keys");
                port.attach(id, i);
            }
            let w = WgWorld {
                hub,
                hub_wire,
                client,
                client_wire,
                port: Mutex::new(port),
            };
            // The handshake, started by the first packet the client sends.
            w.client
                .send_ip(Instant::now(), &udp_packet([10, 192, 0, 1], b"hello"), None);
            w.pump(&mut vec![0u8; 70_000]);
            w
        })
    }

    /// Carries what either side sent to the other until nothing is in
    /// flight (bounded); what goes elsewhere is dropped.
    fn pump(&self, out: &mut [u8]) {
        for _ in 0..8 {
            let from_client = self.client_wire.take();
            let from_hub = self.hub_wire.take();
            if from_client.is_empty() && from_hub.is_empty() {
                break;
            }
            for (to, d) in from_client {
                if to == HUB_ADDR {
                    self.hub.handle(Instant::now(), &d, CLIENT_ADDR, out);
                }
            }
            for (to, d) in from_hub {
                if to == CLIENT_ADDR {
                    self.client.handle(Instant::now(), &d, HUB_ADDR, out);
                }
            }
        }
    }
}

/// An IPv4/UDP packet from the client's address to `dst` carrying `body`
/// (checksums left zero: the hub's checks are the fuzzer's to find).
fn udp_packet(dst: [u8; 4], body: &[u8]) -> Vec<u8> {
    let body = &body[..body.len().min(1300)];
    let total = 28 + body.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    p.extend_from_slice(&[10, 192, 0, 2]);
    p.extend_from_slice(&dst);
    let udp_len = 8 + body.len();
    p.extend_from_slice(&[0x30, 0x39, 0, 53, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    p.extend_from_slice(body);
    p
}

/// Any datagram into a WireGuard hub's socket-free core: dropped and
/// counted, never a panic. The first byte picks the mode: `0..=127` sends
/// the rest as a raw datagram from an address it picks (routed by a shared
/// port's router first); `128..=191` has the
/// authenticated client encrypt the rest as its IP packet; `192..=255` has
/// it send the rest as the body of a UDP packet to the hub or (odd) to the
/// hub's other peer, so the forwarding path sees it.
pub fn wg_datagram(data: &[u8]) {
    let w = WgWorld::get();
    let (first, rest) = data.split_first().unwrap_or((&0, &[]));
    let mut out = vec![0u8; 70_000];
    match *first {
        0..=127 => {
            let src = SocketAddr::from(([192, 0, 2, *first], 51820));
            let _ =
                w.port
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .route(Instant::now(), rest, src);
            w.hub.handle(Instant::now(), rest, src, &mut out);
        }
        128..=191 => {
            w.client.send_ip(Instant::now(), rest, None);
            w.pump(&mut out);
        }
        _ => {
            let dst = if first & 1 == 1 {
                [10, 192, 0, 3]
            } else {
                [10, 192, 0, 1]
            };
            w.client
                .send_ip(Instant::now(), &udp_packet(dst, rest), None);
            w.pump(&mut out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_rx(w: &WgWorld) -> (Option<u64>, u64) {
        let s = w.hub.peer_status();
        let c = s.iter().find(|p| p.name == "client").expect("peer client");
        (c.latest_handshake_secs, c.rx_bytes)
    }

    #[test]
    fn the_wireguard_target_reaches_the_hub_authenticated() {
        let w = WgWorld::get();
        let (handshake, before) = client_rx(w);
        assert!(
            handshake.is_some(),
            "the fuzz world's handshake did not complete"
        );
        wg_datagram(&[0xC0, b'x']);
        wg_datagram(&[0xC1, b'y']);
        let (_, after) = client_rx(w);
        assert!(
            after > before,
            "nothing the client sent was decrypted by the hub"
        );
    }

    #[test]
    fn every_target_takes_empty_and_tiny_inputs() {
        for (name, run) in TARGETS {
            for input in [&[][..], &[0][..], &[0xff; 3][..]] {
                let r = std::panic::catch_unwind(|| run(input));
                assert!(r.is_ok(), "target {name} panicked on {input:?}");
            }
        }
    }
}
