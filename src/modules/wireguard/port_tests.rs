//! The shared port's routing without a socket: real cores of two tenants
//! behind one [`Router`], clients talking to them through it.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use configstore::Document;
use etherparse::PacketBuilder;
use serde_json::json;

use super::{JoinError, Route, Router};
use crate::core::keys::PrivateKey;
use crate::core::metrics::Metrics;
use crate::core::spine::flow::FlowTable;
use crate::modules::wireguard::config::WireGuardConfig;
use crate::modules::wireguard::core::{Core, Wire};

/// The port's address.
const PORT: &str = "192.0.2.1:51820";

/// What a core sent and delivered; a member's wire draws its session
/// indices from the router.
struct TestWire {
    sent: Mutex<VecDeque<(SocketAddr, Vec<u8>)>>,
    delivered: Mutex<Vec<Vec<u8>>>,
    member: Option<(Arc<Mutex<Router<usize>>>, u64)>,
}

impl Wire for TestWire {
    fn send_to(&self, data: &[u8], to: SocketAddr) -> bool {
        self.sent.lock().unwrap().push_back((to, data.to_vec()));
        true
    }
    fn deliver(&self, packet: &[u8]) -> bool {
        self.delivered.lock().unwrap().push(packet.to_vec());
        true
    }
    fn new_session(&self, taken: &HashSet<u32>) -> u32 {
        match &self.member {
            Some((router, id)) => router.lock().unwrap().new_session(*id, Instant::now(), || {
                rand_core::RngCore::next_u32(&mut rand_core::OsRng)
            }),
            None => crate::modules::wireguard::core::random_session(taken),
        }
    }
    fn release_session(&self, session: u32) {
        if let Some((router, id)) = &self.member {
            router
                .lock()
                .unwrap()
                .release_session(*id, session, Instant::now());
        }
    }
}

struct Node {
    core: Core,
    wire: Arc<TestWire>,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
}

impl Node {
    fn new(
        name: &str,
        key: &PrivateKey,
        addr: &str,
        doc: serde_json::Value,
        member: Option<(Arc<Mutex<Router<usize>>>, u64)>,
    ) -> Node {
        let mut value = doc;
        value["private_key"] = json!(key.to_base64());
        let cfg = WireGuardConfig::from_document(&Document {
            source: format!("port test {name}"),
            value,
        })
        .unwrap();
        let wire = Arc::new(TestWire {
            sent: Default::default(),
            delivered: Default::default(),
            member,
        });
        let metrics = Arc::new(Metrics::new());
        let core = Core::simulated(
            name,
            "wg0",
            &cfg,
            metrics.clone(),
            Arc::new(FlowTable::new(vec![])),
            wire.clone(),
            Instant::now(),
        );
        Node {
            core,
            wire,
            addr: addr.parse().unwrap(),
            metrics,
        }
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

fn ping(src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .icmpv4_echo_request(1, seq)
        .write(&mut out, &seq.to_be_bytes())
        .unwrap();
    out
}

/// Two tenants' hubs (both 10.192.0.1/24, each with a client 10.192.0.2)
/// on one port, and their clients (10.192.0.2, one of each tenant).
struct World {
    router: Arc<Mutex<Router<usize>>>,
    hubs: Vec<Node>,
    clients: Vec<Node>,
    /// What went unrouted, by reason.
    unrouted: Vec<&'static str>,
}

impl World {
    fn new() -> World {
        let router = Arc::new(Mutex::new(Router::new(Instant::now(), 1_000_000.0)));
        let (mut hubs, mut clients) = (Vec::new(), Vec::new());
        for (i, tenant) in ["red", "blue"].into_iter().enumerate() {
            let (hub_key, client_key) = (PrivateKey::generate(), PrivateKey::generate());
            let id = router
                .lock()
                .unwrap()
                .join(&hub_key.public_key().0)
                .unwrap();
            let hub = Node::new(
                tenant,
                &hub_key,
                PORT,
                json!({"kind": "wireguard", "address": "10.192.0.1/24", "peers": [
                    {"name": "client", "public_key": client_key.public_key().to_string(), "allowed_ips": ["10.192.0.2/32"]},
                ]}),
                Some((router.clone(), id)),
            );
            router.lock().unwrap().attach(id, i);
            let client = Node::new(
                &format!("{tenant}-client"),
                &client_key,
                &format!("198.51.100.{}:40000", i + 1),
                json!({"kind": "wireguard", "address": "10.192.0.2/32", "peers": [
                    {"name": "hub", "public_key": hub_key.public_key().to_string(), "endpoint": PORT, "allowed_ips": ["10.192.0.0/24"]},
                ]}),
                None,
            );
            hubs.push(hub);
            clients.push(client);
        }
        World {
            router,
            hubs,
            clients,
            unrouted: Vec::new(),
        }
    }

    /// Carries datagrams until none is in flight: clients' through the
    /// router to a hub, hubs' to the client at the address.
    fn pump(&mut self) {
        let mut out = vec![0u8; 70_000];
        for _ in 0..20 {
            let mut moved = false;
            for c in &self.clients {
                let sent: Vec<_> = c.wire.sent.lock().unwrap().drain(..).collect();
                for (to, d) in sent {
                    moved = true;
                    assert_eq!(to, PORT.parse().unwrap());
                    let (route, _) = self
                        .router
                        .lock()
                        .unwrap()
                        .route(Instant::now(), &d, c.addr);
                    match route {
                        Route::To(i) => {
                            self.hubs[i]
                                .core
                                .handle(Instant::now(), &d, c.addr, &mut out)
                        }
                        Route::Unrouted(reason) => self.unrouted.push(reason),
                    }
                }
            }
            for h in &self.hubs {
                let sent: Vec<_> = h.wire.sent.lock().unwrap().drain(..).collect();
                for (to, d) in sent {
                    moved = true;
                    if let Some(c) = self.clients.iter().find(|c| c.addr == to) {
                        c.core
                            .handle(Instant::now(), &d, PORT.parse().unwrap(), &mut out);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }
}

#[test]
fn two_tenants_with_the_same_addresses_on_one_port_each_reach_only_their_own() {
    let mut w = World::new();
    for (i, c) in w.clients.iter().enumerate() {
        c.core.send_ip(
            Instant::now(),
            &ping([10, 192, 0, 2], [10, 192, 0, 1], i as u16),
            None,
        );
    }
    w.pump();
    assert!(w.unrouted.is_empty(), "{:?}", w.unrouted);
    // Each hub got its own client's ping, and only that.
    for (i, h) in w.hubs.iter().enumerate() {
        assert_eq!(
            h.delivered(),
            vec![ping([10, 192, 0, 2], [10, 192, 0, 1], i as u16)]
        );
    }
    // Replies to the same inner address go to each tenant's own client.
    for (i, h) in w.hubs.iter().enumerate() {
        h.core.send_ip(
            Instant::now(),
            &ping([10, 192, 0, 1], [10, 192, 0, 2], 100 + i as u16),
            None,
        );
    }
    w.pump();
    for (i, c) in w.clients.iter().enumerate() {
        assert_eq!(
            c.delivered(),
            vec![ping([10, 192, 0, 1], [10, 192, 0, 2], 100 + i as u16)]
        );
    }
    // Data keeps flowing both ways, routed by session index alone.
    for round in 0..20u16 {
        for c in &w.clients {
            c.core.send_ip(
                Instant::now(),
                &ping([10, 192, 0, 2], [10, 192, 0, 1], 1000 + round),
                None,
            );
        }
    }
    w.pump();
    assert_eq!(w.hubs[0].delivered().len(), 20);
    assert_eq!(w.hubs[1].delivered().len(), 20);
    assert!(w.unrouted.is_empty(), "{:?}", w.unrouted);
    // Red's client speaking to blue's key (it knows it, and MAC1 routes the
    // initiation there): blue has no such peer, and red's hub sees nothing.
    let blue_public = w.hubs[1].core.public_key();
    let stray = Node::new(
        "stray",
        &PrivateKey::generate(),
        "198.51.100.9:40000",
        json!({"kind": "wireguard", "address": "10.192.0.2/32", "peers": [
            {"name": "hub", "public_key": blue_public, "endpoint": PORT, "allowed_ips": ["10.192.0.0/24"]},
        ]}),
        None,
    );
    stray.core.send_ip(
        Instant::now(),
        &ping([10, 192, 0, 2], [10, 192, 0, 1], 7),
        None,
    );
    let (_, init) = stray.wire.sent.lock().unwrap().pop_front().unwrap();
    let (route, _) = w
        .router
        .lock()
        .unwrap()
        .route(Instant::now(), &init, stray.addr);
    assert_eq!(route, Route::To(1), "routed by MAC1 to blue");
    let mut out = vec![0u8; 70_000];
    w.hubs[1]
        .core
        .handle(Instant::now(), &init, stray.addr, &mut out);
    assert_eq!(w.hubs[1].drops("unknown_peer"), 1.0);
    assert!(w.hubs[1].wire.sent.lock().unwrap().is_empty());
    assert!(w.hubs[0].delivered().is_empty() && w.hubs[1].delivered().is_empty());
}

#[test]
fn initiations_are_found_by_mac1_and_a_hint_makes_it_one_check() {
    let mut router: Router<usize> = Router::new(Instant::now(), 1_000_000.0);
    let keys: Vec<PrivateKey> = (0..50).map(|_| PrivateKey::generate()).collect();
    for (i, k) in keys.iter().enumerate() {
        let id = router.join(&k.public_key().0).unwrap();
        router.attach(id, i);
    }
    // An initiation for the 40th member, made by a real core.
    let client = Node::new(
        "client",
        &PrivateKey::generate(),
        "198.51.100.1:40000",
        json!({"kind": "wireguard", "address": "10.192.0.2/32", "peers": [
            {"name": "hub", "public_key": keys[39].public_key().to_string(), "endpoint": PORT, "allowed_ips": ["10.192.0.0/24"]},
        ]}),
        None,
    );
    client.core.send_ip(
        Instant::now(),
        &ping([10, 192, 0, 2], [10, 192, 0, 1], 1),
        None,
    );
    let (_, init) = client.wire.sent.lock().unwrap().pop_front().unwrap();
    let src: SocketAddr = "198.51.100.1:40000".parse().unwrap();
    assert_eq!(
        router.route(Instant::now(), &init, src),
        (Route::To(39), 40),
        "a scan in join order"
    );
    assert_eq!(
        router.route(Instant::now(), &init, src),
        (Route::To(39), 1),
        "the source's hint first"
    );
    // Another source: no hint, a scan again.
    let other: SocketAddr = "198.51.100.2:40000".parse().unwrap();
    assert_eq!(router.route(Instant::now(), &init, other).1, 40);
    // A forged MAC1 matches no one, after every member was checked once.
    let mut forged = init.clone();
    forged[120] ^= 1;
    assert_eq!(
        router.route(Instant::now(), &forged, src),
        (Route::Unrouted("no_mac1_match"), 50)
    );
    // Malformed and unknown datagrams are refused without a check.
    assert_eq!(
        router.route(Instant::now(), &init[..100], src),
        (Route::Unrouted("malformed"), 0)
    );
    let mut data = vec![4u8; 48];
    data[4..8].copy_from_slice(&0x1234_5600u32.to_le_bytes());
    assert_eq!(
        router.route(Instant::now(), &data, src),
        (Route::Unrouted("unknown_index"), 0)
    );
}

#[test]
fn scans_spend_a_budget_and_an_empty_one_drops() {
    let t0 = Instant::now();
    let mut router: Router<usize> = Router::new(t0, 10.0);
    let keys: Vec<PrivateKey> = (0..20).map(|_| PrivateKey::generate()).collect();
    for (i, k) in keys.iter().enumerate() {
        let id = router.join(&k.public_key().0).unwrap();
        router.attach(id, i);
    }
    let client = Node::new(
        "client",
        &PrivateKey::generate(),
        "198.51.100.1:40000",
        json!({"kind": "wireguard", "address": "10.192.0.2/32", "peers": [
            {"name": "hub", "public_key": keys[19].public_key().to_string(), "endpoint": PORT, "allowed_ips": ["10.192.0.0/24"]},
        ]}),
        None,
    );
    client
        .core
        .send_ip(t0, &ping([10, 192, 0, 2], [10, 192, 0, 1], 1), None);
    let (_, init) = client.wire.sent.lock().unwrap().pop_front().unwrap();
    let src: SocketAddr = "198.51.100.1:40000".parse().unwrap();
    // 10 checks a second: the 20th member is out of reach now...
    assert_eq!(
        router.route(t0, &init, src),
        (Route::Unrouted("scan_budget"), 10)
    );
    // ... and a second later still (the burst is one second's worth)...
    assert_eq!(
        router.route(t0 + Duration::from_secs(1), &init, src).0,
        Route::Unrouted("scan_budget")
    );
    // ... but a port with a budget for it finds it.
    let mut ample: Router<usize> = Router::new(t0, 20.0);
    for (i, k) in keys.iter().enumerate() {
        let id = ample.join(&k.public_key().0).unwrap();
        ample.attach(id, i);
    }
    assert_eq!(ample.route(t0, &init, src), (Route::To(19), 20));
    // Once found, the hint costs no budget.
    assert_eq!(ample.route(t0, &init, src), (Route::To(19), 1));
}

#[test]
fn session_indices_are_unique_port_wide_and_quarantined_when_freed() {
    let t0 = Instant::now();
    let mut router: Router<usize> = Router::new(t0, 1_000_000.0);
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let ida = router.join(&a.public_key().0).unwrap();
    let idb = router.join(&b.public_key().0).unwrap();
    router.attach(ida, 0);
    router.attach(idb, 1);
    assert_eq!(
        router.join(&a.public_key().0),
        Err(JoinError::SameKey),
        "two members with one key could not be told apart"
    );
    let draws = |seq: Vec<u32>| {
        let mut it = seq.into_iter();
        move || it.next().expect("drew more than scripted")
    };
    assert_eq!(router.new_session(ida, t0, draws(vec![5])), 5);
    // B draws 5 too: taken on the port, drawn again.
    assert_eq!(router.new_session(idb, t0, draws(vec![5, 6])), 6);
    let data = |session: u32| {
        let mut d = vec![4u8; 48];
        d[4..8].copy_from_slice(&(session << 8 | 3).to_le_bytes());
        d
    };
    let src: SocketAddr = "198.51.100.1:1".parse().unwrap();
    assert_eq!(router.route(t0, &data(5), src).0, Route::To(0));
    assert_eq!(router.route(t0, &data(6), src).0, Route::To(1));
    // A freed index routes nowhere, and is not drawn for ten minutes.
    router.release_session(ida, 5, t0);
    assert_eq!(
        router.route(t0, &data(5), src).0,
        Route::Unrouted("unknown_index")
    );
    assert_eq!(router.new_session(idb, t0, draws(vec![5, 7])), 7);
    let later = t0 + Duration::from_secs(601);
    assert_eq!(router.new_session(idb, later, draws(vec![5])), 5);
    assert_eq!(router.route(later, &data(5), src).0, Route::To(1));
    // A member that leaves takes its indices along.
    router.leave(idb, later);
    for s in [5, 6, 7] {
        assert_eq!(
            router.route(later, &data(s), src).0,
            Route::Unrouted("unknown_index")
        );
    }
    // Releasing another member's index changes nothing.
    assert_eq!(router.new_session(ida, later, draws(vec![9])), 9);
    router.release_session(idb, 9, later);
    assert_eq!(router.route(later, &data(9), src).0, Route::To(0));
}

#[test]
fn one_source_cannot_take_the_scan_budget() {
    let t0 = Instant::now();
    let mut router: Router<usize> = Router::new(t0, 1_000_000.0);
    let keys: Vec<PrivateKey> = (0..3).map(|_| PrivateKey::generate()).collect();
    for (i, k) in keys.iter().enumerate() {
        let id = router.join(&k.public_key().0).unwrap();
        router.attach(id, i);
    }
    let mut junk = vec![0u8; 148];
    junk[0] = 1;
    let flooder: SocketAddr = "203.0.113.7:1".parse().unwrap();
    // A burst of 4 scans, then nothing until its bucket refills.
    for _ in 0..4 {
        assert_eq!(
            router.route(t0, &junk, flooder),
            (Route::Unrouted("no_mac1_match"), 3)
        );
    }
    assert_eq!(
        router.route(t0, &junk, flooder),
        (Route::Unrouted("scan_rate"), 0)
    );
    // Another source still scans, and finds its instance.
    let mut init = junk.clone();
    super::stamp_mac1(&keys[2].public_key().0, &mut init);
    let other: SocketAddr = "198.51.100.1:1".parse().unwrap();
    assert_eq!(router.route(t0, &init, other), (Route::To(2), 3));
    // Half a second later the flooder may scan once more (2 a second).
    let later = t0 + Duration::from_millis(500);
    assert_eq!(
        router.route(later, &junk, flooder).0,
        Route::Unrouted("no_mac1_match")
    );
    assert_eq!(
        router.route(later, &junk, flooder).0,
        Route::Unrouted("scan_rate")
    );
}
