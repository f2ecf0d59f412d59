//! WireGuard's protocol logic in a simulated network: devices without
//! sockets or IP stacks ([`Device::simulated`]) exchange datagrams through
//! in-memory queues, with a fault injector that drops, duplicates,
//! reorders and corrupts. Runs in milliseconds, deterministically seeded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use configstore::Document;
use etherparse::PacketBuilder;
use serde_json::json;

use super::config::WireGuardConfig;
use super::core::{Core, Wire};
use crate::core::keys::PrivateKey;
use crate::core::metrics::Metrics;
use crate::core::spine::flow::FlowTable;

thread_local! {
    /// The simulation's clock (each test runs on a thread of its own).
    static CLOCK: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The simulated time: starts at the real time of the first call and
/// moves only by [`advance`].
fn now() -> Instant {
    CLOCK.with(|c| {
        let t = c.get().unwrap_or_else(Instant::now);
        c.set(Some(t));
        t
    })
}

/// Moves the simulated clock on.
fn advance(by: Duration) {
    let t = now() + by;
    CLOCK.with(|c| c.set(Some(t)));
}

/// What one device sent and delivered.
#[derive(Default)]
struct MemWire {
    sent: Mutex<VecDeque<(SocketAddr, Vec<u8>)>>,
    delivered: Mutex<Vec<Vec<u8>>>,
    /// Times the core ended the driver's idle rest.
    wakes: std::sync::atomic::AtomicUsize,
}

impl Wire for MemWire {
    fn send_to(&self, data: &[u8], to: SocketAddr) -> bool {
        self.sent.lock().unwrap().push_back((to, data.to_vec()));
        true
    }
    fn deliver(&self, packet: &[u8]) -> bool {
        self.delivered.lock().unwrap().push(packet.to_vec());
        true
    }
    fn wake(&self) {
        self.wakes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A node of the simulation: its device, wire, address and metrics.
struct Node {
    dev: Core,
    dev_config: WireGuardConfig,
    wire: Arc<MemWire>,
    addr: SocketAddr,
    /// The addresses a NAT in front of the node mapped it to since, newest
    /// last: it sends from the newest and still receives on all.
    nat: std::cell::RefCell<Vec<SocketAddr>>,
    metrics: Arc<Metrics>,
    flows: Arc<FlowTable>,
}

impl Node {
    fn new(name: &str, key: &PrivateKey, addr: &str, doc: serde_json::Value) -> Node {
        let mut value = doc;
        value["private_key"] = json!(key.to_base64());
        let cfg = WireGuardConfig::from_document(&Document {
            source: format!("sim {name}"),
            value,
        })
        .unwrap();
        let wire = Arc::new(MemWire::default());
        let metrics = Arc::new(Metrics::new());
        let flows = Arc::new(FlowTable::new(vec![]));
        let dev = Core::simulated(
            "sim",
            name,
            &cfg,
            metrics.clone(),
            flows.clone(),
            wire.clone(),
            now(),
        );
        Node {
            dev,
            dev_config: cfg,
            wire,
            addr: addr.parse().unwrap(),
            nat: Default::default(),
            metrics,
            flows,
        }
    }

    /// Where its datagrams come from: the NAT's newest mapping, or its own
    /// address.
    fn source(&self) -> SocketAddr {
        self.nat.borrow().last().copied().unwrap_or(self.addr)
    }

    /// Whether a datagram to `to` reaches the node: its own address, or
    /// its NAT's newest mapping (older ones are gone).
    fn reachable_at(&self, to: SocketAddr) -> bool {
        match self.nat.borrow().last() {
            Some(mapped) => to == *mapped,
            None => to == self.addr,
        }
    }

    /// The NAT maps the node to a new source port.
    fn rebind(&self) {
        let now = self.source();
        let next = SocketAddr::new(now.ip(), now.port().wrapping_add(1));
        self.nat.borrow_mut().push(next);
    }

    /// Cookie replies this node sent.
    fn dev_cookies_sent(&self) -> f64 {
        self.wire
            .sent
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, d)| d[0] == 3)
            .count() as f64
    }

    fn delivered(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.wire.delivered.lock().unwrap())
    }

    fn drops(&self, reason: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("meshgate_wg_dropped_packets_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Faults applied to datagrams in flight (a tiny xorshift PRNG, seeded).
struct Faults {
    seed: u64,
    drop_pct: u64,
    dup_pct: u64,
    corrupt_pct: u64,
    reorder: bool,
    /// Percent of the datagrams of the node at `nat` (its own address)
    /// before which its NAT maps it to a new source port and forgets the
    /// old mapping (the node behind it does not know).
    rebind_pct: u64,
    nat: Option<SocketAddr>,
}

impl Faults {
    fn none() -> Faults {
        Faults {
            seed: 1,
            drop_pct: 0,
            dup_pct: 0,
            corrupt_pct: 0,
            reorder: false,
            rebind_pct: 0,
            nat: None,
        }
    }
    fn next(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }
    fn roll(&mut self, pct: u64) -> bool {
        pct > 0 && self.next() % 100 < pct
    }
}

/// Moves datagrams between nodes until none is in flight (or `rounds` pass).
/// Handshake messages are never faulted (their retries take real seconds);
/// data is.
fn pump(nodes: &[&Node], faults: &mut Faults, rounds: usize) {
    let mut buf = vec![0u8; 65_536 + 256];
    for _ in 0..rounds {
        let mut moved = false;
        for from in nodes {
            let mut batch: Vec<(SocketAddr, Vec<u8>)> =
                from.wire.sent.lock().unwrap().drain(..).collect();
            if faults.reorder && batch.len() > 1 {
                let k = (faults.next() as usize) % batch.len();
                batch.swap(0, k);
            }
            for (to, mut d) in batch {
                moved = true;
                let Some(dst) = nodes.iter().find(|n| n.reachable_at(to)) else {
                    continue;
                };
                if faults.nat == Some(from.addr) && faults.roll(faults.rebind_pct) {
                    from.rebind();
                }
                let src = from.source();
                let is_data = d.first() == Some(&4);
                if is_data && faults.roll(faults.drop_pct) {
                    continue;
                }
                if is_data && faults.roll(faults.corrupt_pct) {
                    let i = 16 + (faults.next() as usize) % (d.len() - 16);
                    d[i] ^= 0x5a;
                }
                let copies = if is_data && faults.roll(faults.dup_pct) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    dst.dev.handle(now(), &d, src, &mut buf);
                }
            }
        }
        if !moved {
            return;
        }
    }
}

fn ping(src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .icmpv4_echo_request(1, seq)
        .write(&mut out, &seq.to_be_bytes())
        .unwrap();
    out
}

/// Every client greets the hub (`10.192.0.n` → `.1`), so all sessions are
/// up; the hub's inbox is emptied.
fn greet(hub: &Node, clients: &[(&Node, u8)], f: &mut Faults) {
    let mut all: Vec<&Node> = vec![hub];
    for (c, n) in clients {
        c.dev
            .send_ip(now(), &ping([10, 192, 0, *n], [10, 192, 0, 1], 1), None);
        all.push(c);
    }
    pump(&all, f, 20);
    hub.delivered();
}

/// A hub (10.192.0.1/24) and two clients (.2, .3), keyed and introduced.
fn hub_and_clients() -> (Node, Node, Node) {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let (hub, two, three) = (hub(&keys), client(&keys, 2), client(&keys, 3));
    (hub, two, three)
}

/// The hub of `keys` (hub, client .2, client .3).
fn hub(keys: &[PrivateKey; 3]) -> Node {
    Node::new(
        "hub",
        &keys[0],
        "192.0.2.1:51820",
        json!({"kind": "wireguard", "address": "10.192.0.1/24", "peers": [
            {"name": "two", "public_key": keys[1].public_key().to_string(), "allowed_ips": ["10.192.0.2/32"]},
            {"name": "three", "public_key": keys[2].public_key().to_string(), "allowed_ips": ["10.192.0.3/32"]},
        ]}),
    )
}

/// Client `n` (2 or 3) of `keys`.
fn client(keys: &[PrivateKey; 3], n: usize) -> Node {
    Node::new(
        if n == 2 { "two" } else { "three" },
        &keys[n - 1],
        &format!("198.51.100.{n}:40000"),
        json!({"kind": "wireguard", "address": format!("10.192.0.{n}/32"), "peers": [
            {"name": "hub", "public_key": keys[0].public_key().to_string(), "endpoint": "192.0.2.1:51820", "allowed_ips": ["10.192.0.0/24"]},
        ]}),
    )
}

#[test]
fn a_handshake_then_packets_reach_the_stack() {
    let (hub, two, _three) = hub_and_clients();
    let mut f = Faults::none();
    let p = ping([10, 192, 0, 2], [10, 192, 0, 1], 1);
    two.dev.send_ip(now(), &p, None); // queued behind a handshake initiation
    pump(&[&hub, &two], &mut f, 10);
    assert_eq!(hub.delivered(), vec![p.clone()]);
    // The hub learnt the client's endpoint from the authenticated handshake.
    let status = hub.dev.peer_status();
    assert_eq!(status[0].endpoint.as_deref(), Some("198.51.100.2:40000"));
    // Replies route back by cryptokey routing.
    let back = ping([10, 192, 0, 1], [10, 192, 0, 2], 1);
    hub.dev.send_ip(now(), &back, None);
    pump(&[&hub, &two], &mut f, 10);
    assert_eq!(two.delivered(), vec![back]);
}

#[test]
fn wg_sees_the_handshake_time_and_a_moved_endpoint() {
    let (hub, two, _three) = hub_and_clients();
    let mut f = Faults::none();
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    pump(&[&hub, &two], &mut f, 10);
    let mut buf = vec![0u8; 70_000];
    two.dev.tick(now(), &mut buf); // the timer records the handshake
    let first = two.dev.uapi_peers()[0].last_handshake.expect("a handshake");
    assert!(first.elapsed().unwrap() < std::time::Duration::from_secs(5));
    std::thread::sleep(std::time::Duration::from_millis(5));
    let again = two.dev.uapi_peers()[0].last_handshake;
    assert_eq!(again, Some(first), "the same time on every `get`");

    // The hub moved: a reload (or `wg set ... endpoint`) says so, the
    // session stays, and the endpoint applies at once.
    let mut cfg = two.dev_config.clone();
    cfg.peers[0].endpoint = Some("192.0.2.99:51820".parse().unwrap());
    cfg.peers[0]
        .allowed_ips
        .push("10.9.0.0/16".parse().unwrap());
    two.dev.set_peers(&cfg.peers);
    let peer = &two.dev.uapi_peers()[0];
    assert_eq!(peer.endpoint, Some("192.0.2.99:51820".parse().unwrap()));
    assert_eq!(peer.last_handshake, Some(first), "session kept");
    assert_eq!(peer.allowed_ips.len(), 2);
}

#[test]
fn corrupted_replayed_and_spoofed_packets_are_dropped_and_counted() {
    let (hub, two, _three) = hub_and_clients();
    let mut f = Faults::none();
    greet(&hub, &[(&two, 2)], &mut f);
    let mut buf = vec![0u8; 70_000];

    // Capture one data datagram and play with it.
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 2), None);
    let (_, d) = two.wire.sent.lock().unwrap().pop_front().unwrap();
    hub.dev.handle(now(), &d, two.addr, &mut buf);
    assert_eq!(hub.delivered().len(), 1);
    hub.dev.handle(now(), &d, two.addr, &mut buf); // replay
    assert!(hub.delivered().is_empty());
    assert_eq!(hub.drops("replay"), 1.0);
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 4), None);
    let (_, mut bad) = two.wire.sent.lock().unwrap().pop_front().unwrap();
    let n = bad.len();
    bad[n - 1] ^= 1; // corrupt the tag of a fresh packet
    hub.dev.handle(now(), &bad, two.addr, &mut buf);
    assert!(hub.delivered().is_empty());
    assert_eq!(hub.drops("decrypt_failed"), 1.0);

    // An inner source outside the sender's allowed IPs.
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 99], [10, 192, 0, 1], 3), None);
    pump(&[&hub, &two], &mut f, 10);
    assert!(hub.delivered().is_empty());
    assert_eq!(hub.drops("source_not_allowed"), 1.0);

    // Garbage of every length never panics.
    for len in 0..200 {
        let junk: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
        hub.dev.handle(now(), &junk, two.addr, &mut buf);
    }
    assert!(hub.delivered().is_empty());
}

#[test]
fn the_hub_forwards_between_clients_as_tracked_flows() {
    let (hub, two, three) = hub_and_clients();
    let mut f = Faults::none();
    let nodes = [&hub, &two, &three];
    greet(&hub, &[(&two, 2), (&three, 3)], &mut f);
    let p = ping([10, 192, 0, 2], [10, 192, 0, 3], 9);
    two.dev.send_ip(now(), &p, None);
    pump(&nodes, &mut f, 20);
    let got = three.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][12..], p[12..], "the same packet, one hop older");
    assert_eq!(got[0][8], p[8] - 1);
    let flows = hub.flows.snapshot();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].ctx.identity.as_deref(), Some("two"));
    assert_eq!(flows[0].ctx.dst, "10.192.0.3:1");
}

#[test]
fn lossy_duplicating_reordering_paths_deliver_each_packet_at_most_once() {
    for seed in [7u64, 42, 1234, 99_991] {
        let (hub, two, _three) = hub_and_clients();
        let mut f = Faults::none();
        two.dev
            .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 0), None);
        pump(&[&hub, &two], &mut f, 10);
        hub.delivered();
        let mut f = Faults {
            seed,
            drop_pct: 10,
            dup_pct: 10,
            corrupt_pct: 5,
            reorder: true,
            rebind_pct: 0,
            nat: None,
        };
        let sent: Vec<Vec<u8>> = (1..=200)
            .map(|i| ping([10, 192, 0, 2], [10, 192, 0, 1], i))
            .collect();
        for p in &sent {
            two.dev.send_ip(now(), p, None);
            if p[27] % 8 == 0 {
                pump(&[&hub, &two], &mut f, 10);
            }
        }
        pump(&[&hub, &two], &mut f, 10);
        let got = hub.delivered();
        let mut seen = std::collections::HashSet::new();
        for g in &got {
            assert!(
                sent.contains(g),
                "seed {seed}: a packet that was never sent"
            );
            assert!(seen.insert(g.clone()), "seed {seed}: delivered twice");
        }
        // Most get through; the rest were dropped or corrupted, and counted.
        assert!(got.len() >= 140, "seed {seed}: only {} of 200", got.len());
        assert!(
            hub.drops("replay") >= 1.0,
            "seed {seed}: duplicates are counted"
        );
    }
}

#[test]
fn a_wider_peer_cannot_speak_for_a_narrower_one() {
    // A owns 10.192.0.2/32; B owns 10.192.0.0/25, which also contains .2.
    let (kh, ka, kb) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let hub = Node::new(
        "hub",
        &kh,
        "192.0.2.1:51820",
        json!({"kind": "wireguard", "address": "10.192.0.1/24", "peers": [
            {"name": "a", "public_key": ka.public_key().to_string(), "allowed_ips": ["10.192.0.2/32"]},
            {"name": "b", "public_key": kb.public_key().to_string(), "allowed_ips": ["10.192.0.0/25"]},
        ]}),
    );
    let b = Node::new(
        "b",
        &kb,
        "198.51.100.9:40000",
        json!({"kind": "wireguard", "address": "10.192.0.9/32", "peers": [
            {"name": "hub", "public_key": kh.public_key().to_string(), "endpoint": "192.0.2.1:51820", "allowed_ips": ["10.192.0.0/24"]},
        ]}),
    );
    let mut f = Faults::none();
    let own = ping([10, 192, 0, 9], [10, 192, 0, 1], 1);
    b.dev.send_ip(now(), &own, None);
    pump(&[&hub, &b], &mut f, 10);
    assert_eq!(hub.delivered(), vec![own], "B speaks for its own addresses");
    b.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 2), None);
    pump(&[&hub, &b], &mut f, 10);
    assert!(hub.delivered().is_empty(), "B spoofing A's address");
    assert_eq!(hub.drops("source_not_allowed"), 1.0);
}

#[test]
fn replayed_initiations_from_a_spoofed_source_never_move_the_endpoint() {
    let (hub, two, _three) = hub_and_clients();
    let mut f = Faults::none();
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    // Keep a copy of the client's initiation before it is delivered.
    let (_, init) = two.wire.sent.lock().unwrap().front().cloned().unwrap();
    assert_eq!(init[0], 1, "a handshake initiation");
    pump(&[&hub, &two], &mut f, 10);
    hub.delivered();
    let mut buf = vec![0u8; 70_000];
    // A stranger's initiation (valid MAC, unknown key) passes the hub's own
    // limiter check once and is dropped: interleaved with the replay it
    // shifts which of the two limiter checks a replay meets under load,
    // until boringtun's own check answers a replay with a cookie.
    let stranger = Node::new(
        "stranger",
        &PrivateKey::generate(),
        "203.0.113.5:5555",
        json!({"kind": "wireguard", "address": "10.9.9.9/32", "peers": [
            {"name": "hub", "public_key": hub.dev.public_key(), "endpoint": "192.0.2.1:51820", "allowed_ips": ["10.192.0.0/24"]},
        ]}),
    );
    stranger
        .dev
        .send_ip(now(), &ping([10, 9, 9, 9], [10, 192, 0, 1], 1), None);
    let (_, stranger_init) = stranger.wire.sent.lock().unwrap().pop_front().unwrap();
    // Spoofed addresses are cheap: every message from another one, so the
    // per-source limiter lets them through and the shared one fills up.
    let spoof =
        |i: u32| SocketAddr::from(([203, 0, 113, (i % 250) as u8], 6000 + (i / 250) as u16));
    for i in 0..600u32 {
        if i % 3 == 0 {
            hub.dev.handle(
                now(),
                &stranger_init,
                SocketAddr::from(([198, 18, (i % 250) as u8, 1], 5555)),
                &mut buf,
            );
        }
        hub.dev.handle(now(), &init, spoof(i), &mut buf);
    }
    assert!(hub.drops("unknown_peer") >= 1.0);
    assert!(
        hub.drops("under_load") + hub.dev_cookies_sent() >= 1.0,
        "the hub went under load"
    );
    let status = hub.dev.peer_status();
    assert_eq!(status[0].endpoint.as_deref(), Some("198.51.100.2:40000"));
    // Whatever went to the spoofed source is cookies, never a handshake
    // response or data.
    let sent = hub.wire.sent.lock().unwrap();
    assert!(
        sent.iter()
            .filter(|(to, _)| matches!(to.ip(), std::net::IpAddr::V4(v4) if v4.octets()[..3] == [203, 0, 113]))
            .all(|(_, d)| d[0] == 3),
        "only cookie replies go to an unverified source"
    );
    drop(sent);
    // And traffic still flows to the real client.
    let back = ping([10, 192, 0, 1], [10, 192, 0, 2], 7);
    hub.dev.send_ip(now(), &back, None);
    pump(&[&hub, &two], &mut f, 10);
    assert_eq!(two.delivered(), vec![back]);
}

#[test]
fn data_without_a_session_gets_no_answer_to_its_source() {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let (first, two) = (hub(&keys), client(&keys, 2));
    let mut f = Faults::none();
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    pump(&[&first, &two], &mut f, 10);
    assert_eq!(first.delivered().len(), 1);
    // The hub restarts: same keys and peers, no sessions, no endpoints.
    drop(first);
    let restarted = hub(&keys);
    let mut buf = vec![0u8; 70_000];
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 2), None);
    let (_, data) = two.wire.sent.lock().unwrap().pop_front().unwrap();
    assert_eq!(data[0], 4, "a data packet of the old session");
    restarted.dev.handle(now(), &data, two.addr, &mut buf);
    // Its receiver index names no session of the restarted hub (indices
    // are drawn anew): dropped and counted either way.
    assert_eq!(
        restarted.drops("no_session") + restarted.drops("unknown_peer"),
        1.0
    );
    assert!(
        restarted.wire.sent.lock().unwrap().is_empty(),
        "nothing goes to an unauthenticated source"
    );
    // The client's own handshake brings the tunnel back.
    let p = ping([10, 192, 0, 2], [10, 192, 0, 1], 3);
    let mut fresh_two = client(&keys, 2);
    fresh_two.addr = two.addr;
    fresh_two.dev.send_ip(now(), &p, None);
    pump(&[&restarted, &fresh_two], &mut f, 10);
    assert_eq!(restarted.delivered(), vec![p]);
}

#[test]
fn session_indices_are_random_not_slot_numbers() {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (h, two) = (hub(&keys), client(&keys, 2));
        two.dev
            .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
        let mut f = Faults::none();
        // Deliver the initiation; the hub's response carries its sender index.
        let (_, init) = two.wire.sent.lock().unwrap().pop_front().unwrap();
        let mut buf = vec![0u8; 70_000];
        h.dev.handle(now(), &init, two.addr, &mut buf);
        let (_, resp) = h.wire.sent.lock().unwrap().front().cloned().unwrap();
        assert_eq!(resp[0], 2);
        let sender = u32::from_le_bytes([resp[4], resp[5], resp[6], resp[7]]);
        assert!(sender >> 8 > 1, "the index is not the slot: {sender:#x}");
        seen.push(sender >> 8);
        pump(&[&h, &two], &mut f, 10);
    }
    assert_ne!(seen[0], seen[1], "each start draws anew");
}

#[test]
fn a_reload_that_moves_an_endpoint_is_applied_to_a_kept_peer() {
    let (hub, two, _three) = hub_and_clients();
    let mut f = Faults::none();
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    pump(&[&hub, &two], &mut f, 10);
    // The hub moved: the config says so; the next datagram goes there.
    let mut cfg = two.dev_config.clone();
    cfg.peers[0].endpoint = Some("192.0.2.99:51820".parse().unwrap());
    two.dev.set_peers(&cfg.peers);
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 2), None);
    let (to, _) = two.wire.sent.lock().unwrap().pop_front().unwrap();
    assert_eq!(to, "192.0.2.99:51820".parse::<SocketAddr>().unwrap());
}

/// `packet` (IPv4) with TTL 1: it expires at the next router.
fn last_hop(mut packet: Vec<u8>) -> Vec<u8> {
    packet[8] = 1;
    let h = etherparse::Ipv4HeaderSlice::from_slice(&packet)
        .unwrap()
        .to_header();
    let csum = h.calc_header_checksum();
    packet[10..12].copy_from_slice(&csum.to_be_bytes());
    packet
}

#[test]
fn forwarding_decrements_ttl_answers_expiry_and_can_be_off() {
    let (hub, two, three) = hub_and_clients();
    let mut f = Faults::none();
    let nodes = [&hub, &two, &three];
    greet(&hub, &[(&two, 2), (&three, 3)], &mut f);
    // TTL 64 arrives as 63.
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 3], 2), None);
    pump(&nodes, &mut f, 20);
    let got = three.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][8], 63);
    // TTL 1 dies at the hub, and the sender hears why from 10.192.0.1.
    let short = last_hop(ping([10, 192, 0, 2], [10, 192, 0, 3], 3));
    two.dev.send_ip(now(), &short, None);
    pump(&nodes, &mut f, 20);
    assert!(three.delivered().is_empty());
    assert_eq!(hub.drops("ttl_exceeded"), 1.0);
    let back = two.delivered();
    assert_eq!(back.len(), 1);
    let s = etherparse::SlicedPacket::from_ip(&back[0]).unwrap();
    assert!(matches!(
        s.transport,
        Some(etherparse::TransportSlice::Icmpv4(ref i)) if matches!(i.icmp_type(), etherparse::Icmpv4Type::TimeExceeded(_))
    ));

    // `forward: false`: a hub that does not relay between its peers.
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let closed = Node::new(
        "hub",
        &keys[0],
        "192.0.2.1:51820",
        json!({"kind": "wireguard", "address": "10.192.0.1/24", "forward": false, "peers": [
            {"name": "two", "public_key": keys[1].public_key().to_string(), "allowed_ips": ["10.192.0.2/32"]},
            {"name": "three", "public_key": keys[2].public_key().to_string(), "allowed_ips": ["10.192.0.3/32"]},
        ]}),
    );
    let (c2, c3) = (client(&keys, 2), client(&keys, 3));
    let nodes = [&closed, &c2, &c3];
    c2.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    c3.dev
        .send_ip(now(), &ping([10, 192, 0, 3], [10, 192, 0, 1], 1), None);
    pump(&nodes, &mut f, 20);
    assert_eq!(
        closed.delivered().len(),
        2,
        "it still serves its own address"
    );
    c2.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 3], 2), None);
    pump(&nodes, &mut f, 20);
    assert!(c3.delivered().is_empty());
    assert_eq!(closed.drops("no_route"), 1.0);
}

#[test]
fn a_removed_peer_leaves_no_series() {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let (h, two) = (hub(&keys), client(&keys, 2));
    let mut f = Faults::none();
    greet(&h, &[(&two, 2)], &mut f);
    // Something to count for `two`: a spoofed source.
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 99], [10, 192, 0, 1], 3), None);
    pump(&[&h, &two], &mut f, 10);
    let text = h.metrics.encode();
    assert!(text.contains("peer=\"two\""), "{text}");
    let only_three = json!({"kind": "wireguard", "address": "10.192.0.1/24", "private_key": keys[0].to_base64(), "peers": [
        {"name": "three", "public_key": keys[2].public_key().to_string(), "allowed_ips": ["10.192.0.3/32"]},
    ]});
    let cfg = WireGuardConfig::from_document(&Document {
        source: "sim".into(),
        value: only_three,
    })
    .unwrap();
    h.dev.set_peers(&cfg.peers);
    let text = h.metrics.encode();
    assert!(!text.contains("peer=\"two\""), "{text}");
    h.dev.forget_metrics();
    assert!(!h.metrics.encode().contains("peer=\"three\""));
}

#[test]
fn one_source_cannot_take_the_handshake_budget() {
    let (hub, two, three) = hub_and_clients();
    let mut f = Faults::none();
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    let (_, init) = two.wire.sent.lock().unwrap().front().cloned().unwrap();
    pump(&[&hub, &two], &mut f, 10);
    let mut buf = vec![0u8; 70_000];
    let flooder: SocketAddr = "203.0.113.7:7777".parse().unwrap();
    for _ in 0..1000 {
        hub.dev.handle(now(), &init, flooder, &mut buf);
    }
    // The clock stands still: the burst of 10 passes, the rest is dropped.
    assert_eq!(hub.drops("handshake_rate"), 990.0);
    // A second later the bucket is full again: a burst of 10, no more.
    advance(Duration::from_secs(1));
    for _ in 0..30 {
        hub.dev.handle(now(), &init, flooder, &mut buf);
    }
    assert_eq!(hub.drops("handshake_rate"), 1010.0);
    // Then 20 a second pass, and twice that rate loses half.
    for _ in 0..20 {
        advance(Duration::from_millis(50));
        hub.dev.handle(now(), &init, flooder, &mut buf);
    }
    assert_eq!(hub.drops("handshake_rate"), 1010.0);
    for _ in 0..20 {
        advance(Duration::from_millis(25));
        hub.dev.handle(now(), &init, flooder, &mut buf);
    }
    assert_eq!(hub.drops("handshake_rate"), 1020.0);
    // Another peer, from its own address, still gets its handshake.
    greet(&hub, &[(&three, 3)], &mut f);
    let p = ping([10, 192, 0, 1], [10, 192, 0, 3], 2);
    hub.dev.send_ip(now(), &p, None);
    pump(&[&hub, &three], &mut f, 10);
    assert_eq!(three.delivered(), vec![p]);
}

#[test]
fn inner_packets_over_the_mtu_are_dropped_and_counted() {
    let (hub, two, _three) = hub_and_clients();
    let mut f = Faults::none();
    greet(&hub, &[(&two, 2)], &mut f);
    let mut big = Vec::new();
    PacketBuilder::ipv4([10, 192, 0, 2], [10, 192, 0, 1], 64)
        .udp(1, 2)
        .write(&mut big, &vec![0u8; 1500])
        .unwrap();
    two.dev.send_ip(now(), &big, None);
    pump(&[&hub, &two], &mut f, 10);
    assert!(hub.delivered().is_empty());
    assert_eq!(hub.drops("over_mtu"), 1.0);
}

#[test]
fn a_rebuilt_peer_refuses_initiations_its_predecessor_saw() {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let (hub, two) = (hub(&keys), client(&keys, 2));
    let mut f = Faults::none();
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    let (_, init) = two.wire.sent.lock().unwrap().front().cloned().unwrap();
    assert_eq!(init[0], 1);
    pump(&[&hub, &two], &mut f, 10);
    assert_eq!(hub.delivered().len(), 1);
    let mut buf = vec![0u8; 70_000];
    let replay_answered = |node: &Node, buf: &mut Vec<u8>| {
        node.wire.sent.lock().unwrap().clear();
        node.dev.handle(now(), &init, two.addr, buf);
        !node.wire.sent.lock().unwrap().is_empty()
    };

    // A reload changes the peer's keepalive: boringtun has no setter, so
    // the peer gets a fresh `Tunn`, which alone would take the old
    // initiation as new.
    let mut cfg = hub.dev_config.clone();
    cfg.peers[0].persistent_keepalive = Some(std::time::Duration::from_secs(25));
    hub.dev.set_peers(&cfg.peers);
    assert!(!replay_answered(&hub, &mut buf), "a replay was answered");
    assert_eq!(hub.drops("replay"), 1.0);

    // An interface restart (a new device with the same key) inherits the
    // timestamps too.
    let floors = hub.dev.replay_floors();
    assert_eq!(floors.len(), 1);
    let restarted = self::hub(&keys);
    restarted.dev.inherit(floors);
    restarted.dev.set_peers(&[]);
    restarted.dev.set_peers(&cfg.peers);
    assert!(
        !replay_answered(&restarted, &mut buf),
        "a replay was answered after a restart"
    );
    assert_eq!(restarted.drops("replay"), 1.0);

    // The real client's next handshake is newer and works.
    let mut fresh = client(&keys, 2);
    fresh.addr = two.addr;
    let p = ping([10, 192, 0, 2], [10, 192, 0, 1], 2);
    fresh.dev.send_ip(now(), &p, None);
    pump(&[&restarted, &fresh], &mut f, 10);
    assert_eq!(restarted.delivered(), vec![p]);
}

#[test]
fn idle_interfaces_rest_their_timers_until_something_happens() {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let (hub, two) = (hub(&keys), client(&keys, 2));
    // Nothing happened yet, and no peer needs keepalives: the timers rest.
    assert!(hub.dev.may_idle(now()) && two.dev.may_idle(now()));
    let mut f = Faults::none();
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    pump(&[&hub, &two], &mut f, 10);
    assert!(!hub.dev.may_idle(now()), "a handshake and data: active");
    assert!(!two.dev.may_idle(now()));
    // A peer with a keepalive and an endpoint keeps them running.
    let mut cfg = two.dev_config.clone();
    cfg.peers[0].persistent_keepalive = Some(std::time::Duration::from_secs(25));
    let fresh = client(&keys, 2);
    assert!(fresh.dev.may_idle(now()));
    fresh.dev.set_peers(&cfg.peers);
    assert!(!fresh.dev.may_idle(now()));
}

#[test]
fn a_persistent_keepalive_peer_handshakes_without_traffic() {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let (hub, two) = (hub(&keys), client(&keys, 2));
    let mut cfg = two.dev_config.clone();
    cfg.peers[0].persistent_keepalive = Some(std::time::Duration::from_secs(25));
    two.dev.set_peers(&cfg.peers);
    // No packet was sent: the first timer round starts the tunnel (a
    // keepalive at once, as the kernel sends one), so the hub learns where
    // the client is and can reach it first.
    let mut buf = vec![0u8; 70_000];
    two.dev.tick(now(), &mut buf);
    let sent = two.wire.sent.lock().unwrap().clone();
    assert!(
        sent.iter().any(|(_, d)| d[0] == 1),
        "no handshake initiation from a keepalive peer"
    );
    let mut f = Faults::none();
    pump(&[&hub, &two], &mut f, 10);
    let back = ping([10, 192, 0, 1], [10, 192, 0, 2], 3);
    hub.dev.send_ip(now(), &back, None);
    pump(&[&hub, &two], &mut f, 10);
    assert_eq!(two.delivered(), vec![back]);
}

#[test]
fn held_batches_leave_in_order_and_split_at_size_changes() {
    let (hub, two, _three) = hub_and_clients();
    let mut f = Faults::none();
    greet(&hub, &[(&two, 2)], &mut f);
    // What an engine batch emits: same-size packets, a shorter one, more.
    let sizes = [100usize, 100, 100, 40, 100, 100];
    let packets: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut out = Vec::new();
            PacketBuilder::ipv4([10, 192, 0, 2], [10, 192, 0, 1], 64)
                .udp(1000, 2000)
                .write(&mut out, &vec![i as u8; *n])
                .unwrap();
            out
        })
        .collect();
    for p in &packets {
        two.dev.send_ip_held(now(), p);
    }
    // The shorter datagram ended the first batch: its four left when the
    // next one could not follow; the last two wait for the flush.
    assert_eq!(two.wire.sent.lock().unwrap().len(), 4);
    two.dev.flush_held();
    assert_eq!(two.wire.sent.lock().unwrap().len(), 6);
    pump(&[&hub, &two], &mut f, 10);
    assert_eq!(hub.delivered(), packets, "all of them, in order");
}

#[test]
fn a_vnet_restart_moves_the_icmp_source_and_the_forward_default() {
    let (hub, two, three) = hub_and_clients();
    let mut f = Faults::none();
    let nodes = [&hub, &two, &three];
    greet(&hub, &[(&two, 2), (&three, 3)], &mut f);
    // The vnet's engine restarts on a host address: no longer a hub.
    hub.dev
        .addresses_changed(&["10.192.0.1/32".parse().unwrap()]);
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 3], 2), None);
    pump(&nodes, &mut f, 20);
    assert!(three.delivered().is_empty());
    assert_eq!(hub.drops("no_route"), 1.0);
    // Then on another subnet address: forwarding again, and an expired
    // packet is answered from the new address.
    hub.dev
        .addresses_changed(&["10.192.0.7/24".parse().unwrap()]);
    let short = last_hop(ping([10, 192, 0, 2], [10, 192, 0, 3], 3));
    two.dev.send_ip(now(), &short, None);
    pump(&nodes, &mut f, 20);
    let back = two.delivered();
    assert_eq!(back.len(), 1);
    assert_eq!(
        &back[0][12..16],
        &[10, 192, 0, 7],
        "ICMP from the new address"
    );
    two.dev
        .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 3], 4), None);
    pump(&nodes, &mut f, 20);
    assert_eq!(three.delivered().len(), 1, "forwarded again");
}

#[test]
fn the_timers_rest_after_ten_quiet_minutes_and_traffic_wakes_them() {
    let (hub, two, _three) = hub_and_clients();
    greet(&hub, &[(&two, 2)], &mut Faults::none());
    let t = now();
    assert_eq!(
        hub.dev.poll_at(t),
        t + Duration::from_millis(250),
        "active: a timer round every 250 ms"
    );
    advance(Duration::from_secs(9 * 60));
    let t = now();
    assert_eq!(hub.dev.poll_at(t), t + Duration::from_millis(250));
    advance(Duration::from_secs(61));
    let t = now();
    assert_eq!(
        hub.dev.poll_at(t),
        t + Duration::from_secs(3600),
        "ten quiet minutes: resting until woken (no endpoint is a name)"
    );
    let mut buf = vec![0u8; 70_000];
    assert!(hub.dev.tick(t, &mut buf).is_empty());
    assert!(
        hub.wire.sent.lock().unwrap().is_empty(),
        "a resting round sends nothing"
    );
    let woken = || hub.wire.wakes.load(std::sync::atomic::Ordering::Relaxed);
    let before = woken();
    hub.dev
        .send_ip(t, &ping([10, 192, 0, 1], [10, 192, 0, 2], 1), None);
    assert_eq!(woken(), before + 1, "traffic ends the rest");
    assert_eq!(hub.dev.poll_at(t), t + Duration::from_millis(250));
    hub.dev
        .send_ip(t, &ping([10, 192, 0, 1], [10, 192, 0, 2], 2), None);
    assert_eq!(woken(), before + 1, "an active core wakes no one");
}

#[test]
fn endpoint_names_are_looked_up_when_the_core_asks() {
    let keys = [
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    ];
    let hub = hub(&keys);
    let named = |host: &str| {
        json!({"kind": "wireguard", "address": "10.192.0.2/32", "peers": [
            {"name": "hub", "public_key": keys[0].public_key().to_string(), "endpoint": format!("{host}:51820"), "allowed_ips": ["10.192.0.0/24"]},
        ]})
    };
    let two = Node::new(
        "two",
        &keys[1],
        "198.51.100.2:40000",
        named("hub.sim.example"),
    );
    let mut buf = vec![0u8; 70_000];
    let asked = two.dev.tick(now(), &mut buf);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].name, "hub");
    assert_eq!(asked[0].endpoint.host, "hub.sim.example");
    assert_eq!(asked[0].endpoint.port, 51820);
    // Idle, it rests until the name is due again (a core whose endpoints
    // are addresses rests until woken).
    let t = now();
    assert_eq!(two.dev.poll_at(t), t + Duration::from_secs(30));
    assert_eq!(hub.dev.poll_at(t), t + Duration::from_secs(3600));
    // Not again for 30 s.
    advance(Duration::from_secs(29));
    assert!(two.dev.tick(now(), &mut buf).is_empty());
    advance(Duration::from_secs(1));
    let again = two.dev.tick(now(), &mut buf);
    assert_eq!(again, asked);
    assert_eq!(two.dev.peer_status()[0].endpoint, None, "no answer yet");
    // The driver's answer: the tunnel comes up.
    two.dev.resolved(&again[0], hub.addr);
    let p = ping([10, 192, 0, 2], [10, 192, 0, 1], 1);
    two.dev.send_ip(now(), &p, None);
    pump(&[&hub, &two], &mut Faults::none(), 10);
    assert_eq!(hub.delivered(), vec![p]);
    // A talking peer's name is not looked up.
    two.dev.tick(now(), &mut buf);
    advance(Duration::from_secs(31));
    assert!(two.dev.tick(now(), &mut buf).is_empty());
    // A reload names another host: looked up at once; a late answer for
    // the old name changes nothing.
    let cfg = WireGuardConfig::from_document(&Document {
        source: "sim two".into(),
        value: {
            let mut v = named("hub2.sim.example");
            v["private_key"] = json!(keys[1].to_base64());
            v
        },
    })
    .unwrap();
    two.dev.set_peers(&cfg.peers);
    two.dev
        .resolved(&again[0], "192.0.2.99:51820".parse().unwrap());
    assert_eq!(
        two.dev.peer_status()[0].endpoint.as_deref(),
        Some("192.0.2.1:51820")
    );
    let asked = two.dev.tick(now(), &mut buf);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].endpoint.host, "hub2.sim.example");
}

#[test]
fn a_client_behind_a_rebinding_nat_keeps_its_tunnel() {
    for seed in [3u64, 77, 4242] {
        let (hub, two, _three) = hub_and_clients();
        greet(&hub, &[(&two, 2)], &mut Faults::none());
        let mut f = Faults {
            seed,
            drop_pct: 5,
            dup_pct: 5,
            corrupt_pct: 0,
            reorder: true,
            rebind_pct: 5,
            nat: Some(two.addr),
        };
        for i in 1..=100u16 {
            two.dev
                .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], i), None);
            hub.dev
                .send_ip(now(), &ping([10, 192, 0, 1], [10, 192, 0, 2], i), None);
            pump(&[&hub, &two], &mut f, 10);
        }
        let (there, back) = (hub.delivered(), two.delivered());
        let mappings = two.nat.borrow().len();
        assert!(
            mappings >= 3,
            "seed {seed}: the NAT moved the client {mappings} times"
        );
        // Each way most arrive: the hub follows the client to each new
        // mapping on its next authenticated datagram.
        assert!(
            there.len() >= 85,
            "seed {seed}: {} of 100 to the hub",
            there.len()
        );
        assert!(back.len() >= 80, "seed {seed}: {} of 100 back", back.len());
        let once: std::collections::HashSet<_> = back.iter().collect();
        assert_eq!(once.len(), back.len(), "seed {seed}: delivered twice");
        // And ends at the newest one.
        two.dev
            .send_ip(now(), &ping([10, 192, 0, 2], [10, 192, 0, 1], 0), None);
        pump(&[&hub, &two], &mut Faults::none(), 10);
        assert_eq!(
            hub.dev.peer_status()[0].endpoint,
            Some(two.source().to_string()),
            "seed {seed}"
        );
    }
}
