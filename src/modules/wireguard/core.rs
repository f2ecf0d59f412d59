//! WireGuard's protocol logic for one instance, without I/O: the peer
//! table, cryptokey routing, handshake limits, replay floors, roaming, hub
//! forwarding and the timers' decisions. No socket, no task, no clock of
//! its own: every entry point takes `now`, and everything leaves through a
//! [`Wire`] (datagrams to send, packets for the node's stack). The driver
//! ([`super::device`]) owns the socket, the tasks and name lookups; the
//! simulator (`sim.rs`) and the fuzz target drive the same core
//! through in-memory wires.
//!
//! - Incoming datagrams are matched to a peer without trying every key:
//!   handshake initiations by the anonymous handshake parse (the sender's
//!   static key), everything else by the receiver index, whose upper 24
//!   bits are random per peer and map to its slot. Each source address has
//!   a token bucket for handshake messages (20/s, burst 10) spent before any
//!   crypto ([`Core::admit`]); a shared rate limiter answers with cookies
//!   under load.
//! - After decryption the inner source address must route back to the
//!   sending peer (longest prefix over all peers' allowed IPs, as the
//!   kernel's cryptokey routing); otherwise the packet is dropped and counted.
//! - Packets to the node's own addresses go to the stack
//!   ([`Wire::deliver`]); packets to another peer's allowed IPs are
//!   forwarded (hub routing) when `forward` allows it (default: when the
//!   node has a subnet address, e.g. a `/24`), with the TTL decremented
//!   (ICMP time exceeded back at 0), each one tracked as an IP flow
//!   (5-tuple, the sending peer as identity, flow-start hooks, bytes, idle
//!   expiry: [`crate::core::spine::ipflow`]); the rest are dropped.
//! - Outgoing packets (from the stack, or forwarded) go to the peer whose
//!   allowed IPs contain the destination (longest prefix). What the stack
//!   emits in one batch is held per endpoint and leaves as one
//!   [`Wire::send_batch`] (UDP GSO in the driver).
//! - [`Core::poll_at`] says when [`Core::tick`] wants to run: every 250 ms
//!   while the interface is active; every 5 s for one whose peers have no
//!   session, no handshake under way and no persistent keepalive (nothing
//!   for 10 minutes), and any datagram or packet wakes it
//!   ([`Wire::wake`]). A peer's boringtun `Tunn` (11 KB) is made on its
//!   first datagram or packet, so idle peers cost little.
//! - Endpoints roam only to the source of what decrypted under the peer's
//!   keys (data, a handshake response, an initiation we answer), never on
//!   cookie replies or cookie-answered initiations; configured endpoint
//!   names are re-resolved while a peer is silent ([`Core::tick`] returns
//!   the names to look up, [`Core::resolved`] takes the answer). Nothing
//!   is ever sent to an unauthenticated source except a cookie reply.
//!
//! Two things are not sans-IO, and why. boringtun's `Tunn` reads the
//! monotonic clock itself for its session timers (its `mock-instant`
//! feature would swap the clock for the whole build), so rekeys and
//! keepalives follow real time while everything of ours follows `now`.
//! And the core takes `&self` with a lock per peer rather than `&mut
//! self`: the stack's thread encrypts while the receive task decrypts and
//! the handshake task does Diffie-Hellman, and one lock around the whole
//! core would serialize the three.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use serde::Serialize;

use super::config::{routed_nets, PeerConfig, WireGuardConfig};
use super::metrics::{PeerMetrics, WgMetrics};
use super::replay::{self, Tai64n};
use crate::core::addr::HostPort;
use crate::core::engine::userspace::metrics::NetStackMetrics;
use crate::core::metrics::{InstanceMetrics, Metrics};
use crate::core::net::prefix::PrefixTable;
use crate::core::spine::flow::FlowTable;
use crate::core::spine::ipflow::{hop, time_exceeded, Admit, Hop, IpFlows};
use crate::core::spine::vnetstack::VnetStack;

/// Handshake messages per second (all peers) before cookies are required.
/// Each one passes the limiter twice (our peer lookup, then boringtun's own
/// check), so this admits about half as many handshakes.
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// How often boringtun's timers run while the interface is active.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How long an idle interface (one whose peers have no session, no
/// handshake under way and no persistent keepalive) rests when no peer's
/// endpoint is a name to look up again: anything that happens to it wakes
/// it sooner ([`Wire::wake`]), so this only bounds a rest nothing ends.
/// (A rest of seconds costs 100,000 idle tenants 20,000 wake-ups a second.)
const IDLE_REST: Duration = Duration::from_secs(3600);
/// An interface is active this long after its last datagram or packet:
/// longer than boringtun keeps a session's keys (3 × REJECT_AFTER_TIME,
/// 540 s), so every session expires on time.
const ACTIVE_FOR: Duration = Duration::from_secs(600);
/// `last_activity` of an interface nothing has happened to yet.
const NEVER: u64 = u64::MAX;
/// WireGuard's REKEY_TIMEOUT: the shortest gap between handshake attempts.
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a silent peer's endpoint name is resolved again.
const RERESOLVE_EVERY: Duration = Duration::from_secs(30);
/// Handshake messages one source address may send per second, and its burst
/// (the kernel's WireGuard allows 20/s with a burst of 5 initiations).
const PER_SOURCE_RATE: f64 = 20.0;
const PER_SOURCE_BURST: f64 = 10.0;
/// Most source addresses tracked; the oldest idle ones are forgotten.
const PER_SOURCE_MAX: usize = 16_384;

/// One source's handshake tokens.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Whether a datagram is a handshake initiation or response (types 1, 2).
fn is_handshake(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(1 | 2))
}

/// The first byte of a handshake response message.
const HANDSHAKE_RESPONSE: u8 = 2;

/// What kind of message arrived (decides whether the endpoint may move).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    Initiation,
    Response,
    CookieReply,
    Data,
}

/// Largest UDP datagram we read, and the scratch buffer size.
const MAX_DATAGRAM: usize = 65_535;
/// Room boringtun needs beyond the payload.
const BUF_LEN: usize = MAX_DATAGRAM + 256;

thread_local! {
    /// Scratch buffer for encapsulation on whatever thread sends.
    static ENCAP_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF_LEN]);
}

/// One peer of the instance.
pub struct Peer {
    /// Slot in the peer table.
    pub index: u32,
    /// The upper 24 bits of its session indices: random (as the kernel's),
    /// so an off-path attacker cannot aim at a peer's sessions.
    session: u32,
    /// Its config (name, key, allowed IPs, ...).
    pub cfg: PeerConfig,
    /// Its tunnel state, made on first use: a `Tunn` is 11 KB (eight
    /// session slots inline), and most peers of a large node are idle.
    tunn: Arc<Mutex<Option<Box<Tunn>>>>,
    endpoint: Arc<Mutex<Option<SocketAddr>>>,
    last_handshake_seen: Mutex<Option<Duration>>,
    /// Wall time of the latest handshake, as the timer saw it complete;
    /// kept after the session expires (`wg show` still says when).
    last_handshake_at: Mutex<Option<SystemTime>>,
    last_resolve: Mutex<Option<Instant>>,
    /// The configured endpoint name changed: resolve it at the next tick
    /// even while the peer is talking.
    resolve_now: AtomicBool,
    /// When we last answered session-less data with a handshake.
    last_unsolicited_init: Mutex<Option<Instant>>,
    /// The last initiation its `Tunn` accepted (raw), whose timestamp a
    /// successor must exceed.
    last_initiation: Mutex<Option<Vec<u8>>>,
    /// Set on a peer rebuilt with a fresh `Tunn` (which would take any
    /// timestamp): initiations must be newer than this one until the new
    /// `Tunn` has accepted one of its own.
    replay_floor: Mutex<Option<Tai64n>>,
    /// Its series, made on first use: 100,000 idle instances of 10 peers
    /// would otherwise hold 4 million series nobody has anything for.
    metrics: Arc<OnceLock<PeerMetrics>>,
}

impl Peer {
    /// The newest initiation timestamp this peer accepted (or inherited).
    fn newest_timestamp(&self, ours: &x25519::StaticSecret) -> Option<Tai64n> {
        let accepted = self
            .last_initiation
            .lock()
            .expect("poisoned")
            .as_deref()
            .and_then(|d| replay::initiation_timestamp(ours, d))
            .map(|(_, t)| t);
        let floor = *self.replay_floor.lock().expect("poisoned");
        accepted.max(floor)
    }

    /// When the latest handshake completed, given boringtun's time since
    /// the current session's (`None` once the session expired).
    fn last_handshake(&self, since: Option<Duration>) -> Option<SystemTime> {
        let live = since.and_then(|d| SystemTime::now().checked_sub(d));
        let recorded = *self.last_handshake_at.lock().expect("poisoned");
        match (live, recorded) {
            // The timer saw this handshake: its time, the same on every
            // call (`live` moves by microseconds).
            (Some(l), Some(r))
                if l.duration_since(r).unwrap_or_else(|e| e.duration())
                    < Duration::from_secs(1) =>
            {
                Some(r)
            }
            // Newer than the last timer round.
            (Some(l), _) => Some(l),
            // The session expired: still say when it was.
            (None, r) => r,
        }
    }
}

/// What the admin API and `meshgatectl wg show` show of a peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Peer name.
    pub name: String,
    /// Base64 public key.
    pub public_key: String,
    /// Current endpoint, if known.
    pub endpoint: Option<String>,
    /// Allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Seconds since the latest handshake.
    pub latest_handshake_secs: Option<u64>,
    /// Payload bytes received.
    pub rx_bytes: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u64>,
}

/// The peers and the cryptokey routing table; replaced whole on reload.
struct PeerTable {
    slots: Vec<Option<Arc<Peer>>>,
    by_key: HashMap<[u8; 32], u32>,
    /// Session index (upper 24 bits) → slot.
    by_session: HashMap<u32, u32>,
    /// Allowed IPs → slot (cryptokey routing).
    routes: PrefixTable<u32>,
}

impl PeerTable {
    fn get(&self, index: u32) -> Option<&Arc<Peer>> {
        self.slots.get(index as usize)?.as_ref()
    }

    /// The peer a receiver index (from a response, cookie or data) names.
    fn by_receiver(&self, receiver_idx: u32) -> Option<&Arc<Peer>> {
        self.by_session
            .get(&(receiver_idx >> 8))
            .and_then(|i| self.get(*i))
    }

    fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(dst).and_then(|i| self.get(*i))
    }

    fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.slots.iter().flatten()
    }
}

/// The protocol state of one WireGuard instance (see the module docs).
pub struct Core {
    tenant: String,
    instance: String,
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// The node's addresses (a linked device's follow its vnet's).
    addresses: RwLock<Vec<IpNet>>,
    /// The inner MTU: a decrypted packet larger than this is dropped.
    mtu: usize,
    /// Forward between peers: as configured, else when the node has a
    /// subnet address.
    forward: AtomicBool,
    forward_configured: Option<bool>,
    /// Where datagrams and decrypted packets go: the driver's socket and
    /// engine, or a simulated network.
    wire: Arc<dyn Wire>,
    /// The vnet's stack when the instance is one of its links: it decides
    /// which addresses are local, and takes what none of our peers routes.
    vnet: Option<Arc<VnetStack>>,
    rate_limiter: Arc<RateLimiter>,
    /// Handshake messages per source address (a token bucket each, as the
    /// kernel keeps): one source cannot take the whole handshake budget.
    per_source: Mutex<HashMap<IpAddr, Bucket>>,
    table: RwLock<Arc<PeerTable>>,
    /// Timestamps handed down to peers not built yet (from the device this
    /// one replaced, or a peer rebuilt by `set_peers`), by public key.
    replay_floors: Mutex<HashMap<[u8; 32], Tai64n>>,
    wg_metrics: Arc<WgMetrics>,
    stack_metrics: Arc<NetStackMetrics>,
    /// Packets forwarded between peers, tracked as flows.
    ip_flows: IpFlows,
    /// When forwarded flows were last expired.
    flows_expired: Mutex<Instant>,
    /// Encrypted datagrams of the stack's current batch.
    tx: Mutex<TxBatch>,
    /// When the core was built, on the caller's clock and on the wall
    /// clock: `last_activity` counts from it, handshake times convert by it.
    born: Instant,
    born_wall: SystemTime,
    /// Milliseconds after `born` of the last datagram or packet (`NEVER`).
    last_activity: std::sync::atomic::AtomicU64,
    /// The driver sleeps until [`Core::poll_at`]'s long idle deadline;
    /// activity ends that sleep through [`Wire::wake`].
    idle: AtomicBool,
}

/// What the core sends out through, and what it asks of its driver.
pub trait Wire: Send + Sync + 'static {
    /// Sends one datagram to `to`; false if it could not be sent.
    fn send_to(&self, data: &[u8], to: SocketAddr) -> bool;
    /// Hands a decrypted packet for one of the node's addresses to its IP
    /// stack; false if the stack refused it (queue full).
    fn deliver(&self, packet: &[u8]) -> bool;
    /// Sends `data` to `to` as datagrams of `segment` bytes each (the last
    /// may be shorter); false if they could not all be sent.
    fn send_batch(&self, data: &[u8], segment: usize, to: SocketAddr) -> bool {
        data.chunks(segment).all(|d| self.send_to(d, to))
    }
    /// The end of a batch of [`Wire::deliver`] calls.
    fn flush_delivered(&self) {}
    /// Something happened while the core was idle: [`Core::poll_at`] is
    /// sooner now than the driver's current wait.
    fn wake(&self) {}
    /// A fresh session index (24 bits, random, as the kernel's) for a new
    /// peer, not one of `taken`. A driver sharing its port with other
    /// instances draws it port-wide, so datagrams find their instance.
    fn new_session(&self, taken: &HashSet<u32>) -> u32 {
        random_session(taken)
    }
    /// A session index [`Wire::new_session`] gave is no longer used.
    fn release_session(&self, _session: u32) {}
}

/// A random 24-bit session index not in `taken`.
pub fn random_session(taken: &HashSet<u32>) -> u32 {
    loop {
        let candidate = rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> 8;
        if !taken.contains(&candidate) {
            return candidate;
        }
    }
}

/// A configured endpoint name to look up ([`Core::tick`] asks, the driver
/// looks, [`Core::resolved`] takes the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The peer's public key.
    pub peer: [u8; 32],
    /// The peer's name, for logs.
    pub name: String,
    /// The configured host and port.
    pub endpoint: HostPort,
}

/// Datagrams held back for one system call (UDP GSO), at most.
const MAX_SEGMENTS: usize = 64;
/// And at most this many bytes.
const MAX_BATCH_BYTES: usize = 60_000;

/// Encrypted datagrams for one endpoint, held until the engine's batch ends.
#[derive(Default)]
struct TxBatch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// A shorter datagram came: nothing may follow it in this batch.
    closed: bool,
    /// The peer's byte counter.
    tx_bytes: Option<prometheus_client::metrics::counter::Counter>,
}

/// A configured endpoint given as an IP address (a name waits for resolution).
fn configured_endpoint(cfg: &PeerConfig) -> Option<SocketAddr> {
    let hp = cfg.endpoint.as_ref()?;
    hp.ip().map(|ip| SocketAddr::new(ip, hp.port))
}

/// A peer's time since its latest handshake and bytes sent and received
/// (nothing yet for a peer without a tunnel).
fn peer_stats(p: &Peer) -> (Option<Duration>, usize, usize) {
    match p.tunn.lock().expect("tunn poisoned").as_deref() {
        Some(t) => {
            let (since, tx, rx, _, _) = t.stats();
            (since, tx, rx)
        }
        None => (None, 0, 0),
    }
}

/// Which drop counter an error from boringtun belongs to.
fn drop_reason(e: &WireGuardError) -> &'static str {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => "replay",
        WireGuardError::InvalidAeadTag | WireGuardError::InvalidMac | WireGuardError::WrongKey => {
            "decrypt_failed"
        }
        WireGuardError::UnderLoad => "under_load",
        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => "no_session",
        _ => "invalid",
    }
}

impl Core {
    /// The core of instance `tenant/instance` as `cfg` describes it,
    /// sending through `wire`; `vnet` is the stack of the vnet it is a
    /// link of. `now` is the caller's clock.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tenant: &str,
        instance: &str,
        cfg: &WireGuardConfig,
        metrics: Arc<Metrics>,
        flows: Arc<FlowTable>,
        instance_metrics: InstanceMetrics,
        wire: Arc<dyn Wire>,
        vnet: Option<Arc<VnetStack>>,
        now: Instant,
    ) -> Core {
        let private = x25519::StaticSecret::from(*cfg.private_key.as_bytes());
        let public = x25519::PublicKey::from(cfg.public_key.0);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let forward = cfg.forward.unwrap_or_else(|| has_subnet(&cfg.addresses));
        Core {
            tenant: tenant.into(),
            instance: instance.into(),
            private,
            public,
            addresses: RwLock::new(cfg.addresses.clone()),
            mtu: cfg.mtu,
            forward: AtomicBool::new(forward),
            forward_configured: cfg.forward,
            wire,
            vnet,
            rate_limiter,
            per_source: Mutex::new(HashMap::new()),
            replay_floors: Mutex::new(HashMap::new()),
            table: RwLock::new(Arc::new(PeerTable {
                slots: Vec::new(),
                by_key: HashMap::new(),
                by_session: HashMap::new(),
                routes: PrefixTable::new(),
            })),
            wg_metrics: metrics.subsystem::<WgMetrics>(),
            stack_metrics: metrics.subsystem::<NetStackMetrics>(),
            ip_flows: IpFlows::new(tenant, instance, flows, instance_metrics),
            flows_expired: Mutex::new(now),
            tx: Mutex::new(TxBatch::default()),
            born: now,
            born_wall: SystemTime::now(),
            last_activity: std::sync::atomic::AtomicU64::new(NEVER),
            idle: AtomicBool::new(false),
        }
    }

    /// A core of its own (no vnet) with `cfg`'s peers installed: what
    /// simulations and the fuzz target drive.
    pub fn simulated(
        tenant: &str,
        instance: &str,
        cfg: &WireGuardConfig,
        metrics: Arc<Metrics>,
        flows: Arc<FlowTable>,
        wire: Arc<dyn Wire>,
        now: Instant,
    ) -> Core {
        let im = metrics.instance(tenant, instance);
        let core = Core::new(tenant, instance, cfg, metrics, flows, im, wire, None, now);
        core.set_peers(&cfg.peers);
        core
    }

    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The tenant's name.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Counts a datagram the driver dropped before the core saw it.
    pub fn drop_datagram(&self, reason: &'static str) {
        self.drop_packet(None, reason)
    }

    /// The base64 public key.
    pub fn public_key(&self) -> String {
        crate::core::keys::PublicKey(self.public.to_bytes()).to_string()
    }

    /// The vnet stack this instance is a link of, if any.
    pub fn vnet_stack(&self) -> Option<&Arc<VnetStack>> {
        self.vnet.as_ref()
    }

    /// Whether `ip` is one of the node's addresses (the vnet's, for a link).
    fn is_local(&self, ip: IpAddr) -> bool {
        match self.vnet_stack() {
            Some(s) => s.is_local(ip),
            None => self
                .addresses
                .read()
                .expect("poisoned")
                .iter()
                .any(|n| n.addr() == ip),
        }
    }

    /// Poisons a peer's lock the way a bug would: a thread panics while
    /// holding it.
    #[cfg(test)]
    pub(crate) fn poison_a_peer(&self) {
        let table = self.table();
        let peer = table.peers().next().expect("a peer").clone();
        let _ = std::thread::spawn(move || {
            let _held = peer.tunn.lock();
            panic!("injected: a panic while a peer's lock is held");
        })
        .join();
        // As if traffic followed: the timers run at full rate and meet it.
        self.touch(Instant::now());
    }

    /// The instance stops: its forwarded flows end now.
    pub fn close(&self) {
        self.ip_flows.clear();
    }

    /// Deletes this instance's metric series (its peers' and its stack's):
    /// the instance is gone.
    pub fn forget_metrics(&self) {
        for p in self.table().peers() {
            self.wg_metrics
                .forget(&self.tenant, &self.instance, Some(&p.cfg.name));
        }
        self.wg_metrics.forget(&self.tenant, &self.instance, None);
        self.stack_metrics.forget(&self.tenant, &self.instance);
    }

    /// Installs a new peer list. Peers whose key, preshared key and keepalive
    /// are unchanged keep their sessions and endpoint.
    pub fn set_peers(&self, peers: &[PeerConfig]) {
        // New peers may need keepalives: let the timers look again.
        self.wake_timers();
        let old = self.table();
        for gone in old
            .peers()
            .filter(|p| !peers.iter().any(|n| n.name == p.cfg.name))
        {
            self.wg_metrics
                .forget(&self.tenant, &self.instance, Some(&gone.cfg.name));
        }
        // Kept peers keep their slot (their session indices carry it); new
        // peers take free slots, so adding a peer disturbs no one.
        let mut slots: Vec<Option<Arc<Peer>>> = vec![None; old.slots.len()];
        let mut new = Vec::new();
        for cfg in peers {
            let kept = old
                .by_key
                .get(&cfg.public_key.0)
                .and_then(|i| old.get(*i))
                .filter(|p| {
                    p.cfg.preshared_key == cfg.preshared_key
                        && p.cfg.persistent_keepalive == cfg.persistent_keepalive
                });
            match kept {
                Some(p) => {
                    // A changed endpoint (a reload, `wg set ... endpoint`)
                    // applies now; an unchanged one keeps where the peer
                    // roamed to.
                    let endpoint_changed = p.cfg.endpoint != cfg.endpoint;
                    if endpoint_changed {
                        if let Some(addr) = configured_endpoint(cfg) {
                            *p.endpoint.lock().expect("poisoned") = Some(addr);
                        }
                    }
                    slots[p.index as usize] = Some(Arc::new(Peer {
                        index: p.index,
                        session: p.session,
                        cfg: cfg.clone(),
                        tunn: p.tunn.clone(),
                        endpoint: p.endpoint.clone(),
                        last_handshake_seen: Mutex::new(
                            *p.last_handshake_seen.lock().expect("poisoned"),
                        ),
                        last_handshake_at: Mutex::new(
                            *p.last_handshake_at.lock().expect("poisoned"),
                        ),
                        last_resolve: Mutex::new(None),
                        resolve_now: AtomicBool::new(
                            endpoint_changed
                                && cfg.endpoint.as_ref().is_some_and(|e| e.ip().is_none()),
                        ),
                        last_unsolicited_init: Mutex::new(None),
                        last_initiation: Mutex::new(
                            p.last_initiation.lock().expect("poisoned").clone(),
                        ),
                        replay_floor: Mutex::new(*p.replay_floor.lock().expect("poisoned")),
                        metrics: p.metrics.clone(),
                    }))
                }
                None => {
                    // Same key, new `Tunn` (preshared key or keepalive
                    // changed): the successor inherits the newest timestamp.
                    let rebuilt = old.by_key.get(&cfg.public_key.0).and_then(|i| old.get(*i));
                    if let Some(t) = rebuilt.and_then(|p| p.newest_timestamp(&self.private)) {
                        self.replay_floors
                            .lock()
                            .expect("poisoned")
                            .insert(cfg.public_key.0, t);
                    }
                    new.push(cfg)
                }
            }
        }
        let mut sessions: HashSet<u32> = slots.iter().flatten().map(|p| p.session).collect();
        for cfg in new {
            let index = match slots.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    slots.push(None);
                    slots.len() - 1
                }
            };
            let session = self.wire.new_session(&sessions);
            sessions.insert(session);
            slots[index] = Some(Arc::new(self.new_peer(index as u32, session, cfg)));
        }
        while slots.last().is_some_and(Option::is_none) {
            slots.pop();
        }
        let mut by_key = HashMap::new();
        let mut by_session = HashMap::new();
        let mut routes = PrefixTable::new();
        for p in slots.iter().flatten() {
            by_key.insert(p.cfg.public_key.0, p.index);
            by_session.insert(p.session, p.index);
            for n in &p.cfg.allowed_ips {
                routes.insert_first(*n, p.index);
            }
        }
        if let Some(stack) = self.vnet_stack() {
            stack.set_nets(&self.instance, routed_nets(peers));
        }
        *self.table.write().expect("table poisoned") = Arc::new(PeerTable {
            slots,
            by_key,
            by_session,
            routes,
        });
        for gone in old.peers().filter(|p| !sessions.contains(&p.session)) {
            self.wire.release_session(gone.session);
        }
    }

    /// The peer's tunnel, made now if it has none yet.
    fn tunn<'a>(
        &self,
        peer: &Peer,
        guard: &'a mut std::sync::MutexGuard<'_, Option<Box<Tunn>>>,
    ) -> &'a mut Tunn {
        guard.get_or_insert_with(|| {
            Box::new(Tunn::new(
                self.private.clone(),
                x25519::PublicKey::from(peer.cfg.public_key.0),
                peer.cfg.preshared_key,
                peer.cfg.persistent_keepalive.map(|d| d.as_secs() as u16),
                peer.session,
                Some(self.rate_limiter.clone()),
            ))
        })
    }

    fn new_peer(&self, index: u32, session: u32, cfg: &PeerConfig) -> Peer {
        Peer {
            index,
            session,
            cfg: cfg.clone(),
            tunn: Arc::new(Mutex::new(None)),
            endpoint: Arc::new(Mutex::new(configured_endpoint(cfg))),
            last_handshake_seen: Mutex::new(None),
            last_handshake_at: Mutex::new(None),
            last_resolve: Mutex::new(None),
            resolve_now: AtomicBool::new(false),
            last_unsolicited_init: Mutex::new(None),
            last_initiation: Mutex::new(None),
            replay_floor: Mutex::new(
                self.replay_floors
                    .lock()
                    .expect("poisoned")
                    .remove(&cfg.public_key.0),
            ),
            metrics: Arc::default(),
        }
    }

    /// A peer's series (made now if this is their first use).
    fn peer_metrics<'p>(&self, peer: &'p Peer) -> &'p PeerMetrics {
        peer.metrics.get_or_init(|| {
            self.wg_metrics
                .peer(&self.tenant, &self.instance, &peer.cfg.name)
        })
    }

    fn table(&self) -> Arc<PeerTable> {
        self.table.read().expect("table poisoned").clone()
    }

    fn drop_packet(&self, peer: Option<&Peer>, reason: &str) {
        let name = peer.map(|p| p.cfg.name.as_str()).unwrap_or("-");
        self.wg_metrics
            .drop_packet(&self.tenant, &self.instance, name, reason);
        tracing::debug!(tenant = %self.tenant, instance = %self.instance, peer = name, reason, "packet dropped");
    }

    fn send_to(&self, data: &[u8], to: SocketAddr) -> bool {
        self.wire.send_to(data, to)
    }

    fn send_to_peer(&self, peer: &Peer, data: &[u8]) {
        let endpoint = *peer.endpoint.lock().expect("poisoned");
        match endpoint {
            Some(ep) => {
                if self.send_to(data, ep) {
                    self.peer_metrics(peer).tx_bytes.inc_by(data.len() as u64);
                } else {
                    self.drop_packet(Some(peer), "send_failed");
                }
            }
            None => self.drop_packet(Some(peer), "no_endpoint"),
        }
    }

    /// Routes an IP packet to the peer whose allowed IPs hold its destination
    /// and sends it encrypted. `from` is the peer it came from when forwarding.
    pub fn send_ip(&self, now: Instant, packet: &[u8], from: Option<u32>) {
        self.encrypt(now, packet, from, false)
    }

    /// [`Core::send_ip`] for a packet of the stack's current batch: the
    /// datagram is held back and leaves with the batch
    /// ([`Core::flush_held`]).
    pub fn send_ip_held(&self, now: Instant, packet: &[u8]) {
        self.encrypt(now, packet, None, true)
    }

    fn encrypt(&self, now: Instant, packet: &[u8], from: Option<u32>, hold: bool) {
        let Some(dst) = Tunn::dst_address(packet) else {
            return self.drop_packet(None, "malformed");
        };
        let table = self.table();
        let Some(peer) = table.route(dst) else {
            return self.drop_packet(None, "no_route");
        };
        self.touch(now);
        if Some(peer.index) == from {
            return self.drop_packet(Some(peer), "no_route");
        }
        ENCAP_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut guard = peer.tunn.lock().expect("tunn poisoned");
            let tunn = self.tunn(peer, &mut guard);
            match tunn.encapsulate(packet, &mut buf) {
                TunnResult::WriteToNetwork(p) if hold => self.hold(peer, p),
                TunnResult::WriteToNetwork(p) => self.send_to_peer(peer, p),
                TunnResult::Err(e) => self.drop_packet(Some(peer), drop_reason(&e)),
                _ => {}
            }
        });
    }

    /// Adds an encrypted datagram to the batch (sending the batch first if
    /// it cannot follow).
    fn hold(&self, peer: &Peer, datagram: &[u8]) {
        let Some(to) = *peer.endpoint.lock().expect("poisoned") else {
            return self.drop_packet(Some(peer), "no_endpoint");
        };
        let mut tx = self.tx.lock().expect("poisoned");
        let follows = tx.to == Some(to)
            && !tx.closed
            && datagram.len() <= tx.segment
            && tx.count < MAX_SEGMENTS
            && tx.buf.len() + datagram.len() <= MAX_BATCH_BYTES;
        if tx.count > 0 && !follows {
            self.send_held(&mut tx);
        }
        if tx.count == 0 {
            tx.to = Some(to);
            tx.segment = datagram.len();
            tx.tx_bytes = Some(self.peer_metrics(peer).tx_bytes.clone());
        }
        tx.buf.extend_from_slice(datagram);
        tx.count += 1;
        tx.closed = datagram.len() < tx.segment;
    }

    /// Sends the datagrams held back, in one system call where it can.
    pub fn flush_held(&self) {
        let mut tx = self.tx.lock().expect("poisoned");
        self.send_held(&mut tx);
    }

    fn send_held(&self, tx: &mut TxBatch) {
        if tx.count == 0 {
            return;
        }
        let Some(to) = tx.to else { return };
        let sent = if tx.count == 1 {
            self.wire.send_to(&tx.buf, to)
        } else {
            self.wire.send_batch(&tx.buf, tx.segment, to)
        };
        if sent {
            if let Some(c) = &tx.tx_bytes {
                c.inc_by(tx.buf.len() as u64);
            }
        } else {
            self.drop_packet(None, "send_failed");
        }
        tx.buf.clear();
        tx.count = 0;
        tx.closed = false;
        tx.to = None;
        tx.tx_bytes = None;
    }

    /// Handles one datagram from the network, handshakes inline: admits
    /// it ([`Core::admit`]), processes it ([`Core::process`]) and ends the
    /// stack's batch. Never panics on bad input.
    pub fn handle(&self, now: Instant, datagram: &[u8], src: SocketAddr, out: &mut [u8]) {
        if self.admit(now, datagram, src) {
            self.process(now, datagram, src, out);
            self.wire.flush_delivered();
        }
    }

    /// Handshake messages (types 1 and 2) spend a token of their source
    /// before any crypto; a flood from one address is dropped here (false).
    /// Other messages pass. The driver admits on its receive task and runs
    /// what it admitted of handshakes on another.
    pub fn admit(&self, now: Instant, datagram: &[u8], src: SocketAddr) -> bool {
        if !is_handshake(datagram) {
            return true;
        }
        // The shared limiter is reset by the timer: keep it running.
        self.touch(now);
        let ok = self.handshake_token(src.ip(), now);
        if !ok {
            self.drop_packet(None, "handshake_rate");
        }
        ok
    }

    /// Whether a datagram is a handshake message (the driver runs those on
    /// a task of their own: two Diffie-Hellman each).
    pub fn is_handshake(datagram: &[u8]) -> bool {
        is_handshake(datagram)
    }

    /// One datagram [`Core::admit`] let through: decrypts, checks and
    /// routes it, and answers what needs an answer. `out` is scratch room
    /// of at least 65,535 + 256 bytes.
    pub fn process(&self, now: Instant, datagram: &[u8], src: SocketAddr, out: &mut [u8]) {
        let table = self.table();
        let packet = match self
            .rate_limiter
            .verify_packet(Some(src.ip()), datagram, out)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.send_to(cookie, src);
                return;
            }
            Err(TunnResult::Err(e)) => return self.drop_packet(None, drop_reason(&e)),
            Err(_) => return self.drop_packet(None, "invalid"),
        };
        let peer = match &packet {
            Packet::HandshakeInit(init) => parse_handshake_anon(&self.private, &self.public, init)
                .ok()
                .and_then(|hh| table.by_key.get(&hh.peer_static_public))
                .and_then(|i| table.get(*i)),
            Packet::HandshakeResponse(r) => table.by_receiver(r.receiver_idx),
            Packet::PacketCookieReply(c) => table.by_receiver(c.receiver_idx),
            Packet::PacketData(d) => table.by_receiver(d.receiver_idx),
        };
        let Some(peer) = peer else {
            return self.drop_packet(None, "unknown_peer");
        };
        self.touch(now);
        // Endpoints move only on what decrypted under the peer's keys: data
        // (keepalives included), a handshake response, and an initiation we
        // answer with a response. Never on a cookie reply (anyone who knows
        // our public key can forge one) nor on an initiation answered with a
        // cookie because we are under load: those would let a spoofed
        // source steal the peer's traffic.
        let kind = match &packet {
            Packet::HandshakeInit(_) => Received::Initiation,
            Packet::HandshakeResponse(_) => Received::Response,
            Packet::PacketCookieReply(_) => Received::CookieReply,
            Packet::PacketData(_) => Received::Data,
        };
        if kind == Received::Initiation && !self.newer_than_floor(peer, datagram) {
            return self.drop_packet(Some(peer), "replay");
        }
        let mut guard = peer.tunn.lock().expect("tunn poisoned");
        let tunn = self.tunn(peer, &mut guard);
        match tunn.decapsulate(Some(src.ip()), datagram, out) {
            TunnResult::Done => {
                if matches!(kind, Received::Data | Received::Response) {
                    self.roam(peer, src, datagram.len());
                }
            }
            TunnResult::Err(WireGuardError::NoCurrentSession) if kind == Received::Data => {
                // Data for a session we do not have (we restarted). Nothing
                // goes to `src`: it is not authenticated. If we know where
                // the peer is, offer a fresh handshake there (at most every
                // REKEY_TIMEOUT); otherwise the peer re-handshakes on its own
                // when its data goes unanswered, as with the kernel.
                self.drop_packet(Some(peer), "no_session");
                if peer.endpoint.lock().expect("poisoned").is_some() {
                    let mut last = peer.last_unsolicited_init.lock().expect("poisoned");
                    if last.is_none_or(|t| now.saturating_duration_since(t) >= REKEY_TIMEOUT) {
                        *last = Some(now);
                        if let TunnResult::WriteToNetwork(init) =
                            tunn.format_handshake_initiation(out, false)
                        {
                            self.send_to_peer(peer, init);
                        }
                    }
                }
            }
            TunnResult::Err(e) => self.drop_packet(Some(peer), drop_reason(&e)),
            TunnResult::WriteToNetwork(p) => {
                let authenticated = match kind {
                    // Our answer is a handshake response (type 2) only if
                    // the initiation verified; a cookie reply (type 3) means
                    // "under load, prove your address".
                    Received::Initiation => p.first() == Some(&HANDSHAKE_RESPONSE),
                    Received::Response | Received::Data => true,
                    Received::CookieReply => false,
                };
                if authenticated {
                    if kind == Received::Initiation {
                        *peer.last_initiation.lock().expect("poisoned") = Some(datagram.to_vec());
                        // The `Tunn` now holds a newer timestamp itself.
                        *peer.replay_floor.lock().expect("poisoned") = None;
                    }
                    self.roam(peer, src, datagram.len());
                    self.send_to_peer(peer, p);
                    // Flush packets boringtun queued while the handshake ran.
                    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], out) {
                        self.send_to_peer(peer, p);
                    }
                } else {
                    // A cookie goes back where the initiation came from;
                    // the endpoint stays.
                    self.send_to(p, src);
                }
            }
            TunnResult::WriteToTunnelV4(p, inner_src) => {
                self.roam(peer, src, datagram.len());
                drop(guard);
                self.route_inbound(now, peer, p, IpAddr::V4(inner_src));
            }
            TunnResult::WriteToTunnelV6(p, inner_src) => {
                self.roam(peer, src, datagram.len());
                drop(guard);
                self.route_inbound(now, peer, p, IpAddr::V6(inner_src));
            }
        }
    }

    /// For a rebuilt peer, whether an initiation is newer than the last one
    /// its predecessor accepted (boringtun checks later ones itself).
    fn newer_than_floor(&self, peer: &Peer, datagram: &[u8]) -> bool {
        let Some(floor) = *peer.replay_floor.lock().expect("poisoned") else {
            return true;
        };
        replay::initiation_timestamp(&self.private, datagram).is_some_and(|(_, t)| t > floor)
    }

    /// The newest initiation timestamp of every peer, for the device that
    /// replaces this one (an interface restart keeping the key).
    pub fn replay_floors(&self) -> HashMap<[u8; 32], Tai64n> {
        self.table()
            .peers()
            .filter_map(|p| Some((p.cfg.public_key.0, p.newest_timestamp(&self.private)?)))
            .collect()
    }

    /// Takes the timestamps of the device this one replaces, before any
    /// peer is built.
    pub(super) fn inherit(&self, floors: HashMap<[u8; 32], Tai64n>) {
        *self.replay_floors.lock().expect("poisoned") = floors;
    }

    /// Takes one handshake token of `ip`; false when its bucket is empty.
    fn handshake_token(&self, ip: IpAddr, now: Instant) -> bool {
        let mut map = self.per_source.lock().expect("poisoned");
        if map.len() >= PER_SOURCE_MAX && !map.contains_key(&ip) {
            // Forget sources whose bucket has refilled: they lose nothing.
            let full = PER_SOURCE_BURST / PER_SOURCE_RATE;
            map.retain(|_, b| now.saturating_duration_since(b.last).as_secs_f64() < full);
            if map.len() >= PER_SOURCE_MAX {
                return false;
            }
        }
        let b = map.entry(ip).or_insert(Bucket {
            tokens: PER_SOURCE_BURST,
            last: now,
        });
        let refill = now.saturating_duration_since(b.last).as_secs_f64() * PER_SOURCE_RATE;
        b.tokens = (b.tokens + refill).min(PER_SOURCE_BURST);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Records an authenticated packet from `src`: the endpoint roams there.
    fn roam(&self, peer: &Peer, src: SocketAddr, len: usize) {
        self.peer_metrics(peer).rx_bytes.inc_by(len as u64);
        let mut ep = peer.endpoint.lock().expect("poisoned");
        if *ep != Some(src) {
            if ep.is_some() {
                tracing::info!(tenant = %self.tenant, instance = %self.instance, peer = %peer.cfg.name, endpoint = %src, "peer endpoint changed");
            }
            *ep = Some(src);
        }
    }

    /// A decrypted packet from `peer`: check its source, then deliver or forward.
    fn route_inbound(&self, now: Instant, peer: &Peer, packet: &mut [u8], inner_src: IpAddr) {
        if packet.is_empty() {
            return; // keepalive
        }
        if packet.len() > self.mtu {
            // Larger than the tunnel's MTU: a well-behaved peer never sends
            // it, and it would cost the stack or the next peer a buffer.
            return self.drop_packet(Some(peer), "over_mtu");
        }
        // Cryptokey routing: the source must route back to the sender
        // (longest prefix), not merely lie in one of its allowed IPs: with
        // A = 10.192.0.2/32 and B = 10.192.0.0/25, B cannot speak as .2.
        if self.table().route(inner_src).map(|p| p.index) != Some(peer.index) {
            return self.drop_packet(Some(peer), "source_not_allowed");
        }
        let Some(dst) = Tunn::dst_address(packet) else {
            return self.drop_packet(Some(peer), "malformed");
        };
        if self.is_local(dst) {
            if !self.wire.deliver(packet) {
                self.drop_packet(Some(peer), "stack_queue_full");
            }
        } else if self.forward.load(Ordering::Relaxed) {
            match self.ip_flows.packet(packet, &peer.cfg.name, now) {
                Admit::Forward => {}
                Admit::Drop(reason) => return self.drop_packet(Some(peer), reason),
            }
            match hop(packet) {
                // To another link of the vnet when none of our peers has it.
                Hop::Forward
                    if self.table().route(dst).is_none()
                        && self
                            .vnet_stack()
                            .is_some_and(|s| s.forward(&self.instance, packet)) => {}
                Hop::Forward => self.send_ip(now, packet, Some(peer.index)),
                Hop::Malformed => self.drop_packet(Some(peer), "malformed"),
                Hop::Expired => {
                    self.drop_packet(Some(peer), "ttl_exceeded");
                    // Tell the sender, from our address of its family.
                    let me = self
                        .addresses
                        .read()
                        .expect("poisoned")
                        .iter()
                        .map(|n| n.addr())
                        .find(|a| a.is_ipv4() == inner_src.is_ipv4());
                    if let Some(icmp) = me.and_then(|me| time_exceeded(packet, me)) {
                        self.send_ip(now, &icmp, None);
                    }
                }
            }
        } else {
            self.drop_packet(Some(peer), "no_route");
        }
    }

    /// Something happened (a datagram from a peer, a packet to send, new
    /// peers): timers run at full rate again.
    fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.born).as_millis() as u64;
        self.last_activity.store(ms, Ordering::Relaxed);
        self.wake_timers();
    }

    /// Ends an idle wait of the driver, if it is in one.
    fn wake_timers(&self) {
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::AcqRel) {
            self.wire.wake();
        }
    }

    /// Whether the timers may rest: nothing for `ACTIVE_FOR`, and no peer
    /// that must send keepalives.
    pub fn may_idle(&self, now: Instant) -> bool {
        let last = self.last_activity.load(Ordering::Relaxed);
        (last == NEVER
            || now
                .saturating_duration_since(self.born)
                .saturating_sub(Duration::from_millis(last))
                > ACTIVE_FOR)
            && !self.table().peers().any(|p| {
                p.cfg.persistent_keepalive.is_some()
                    && (p.cfg.endpoint.is_some() || p.endpoint.lock().expect("poisoned").is_some())
            })
    }

    /// When [`Core::tick`] wants to run next: a timer round from now
    /// while the interface is active; while it may idle, when a peer's
    /// endpoint name is due for another lookup, else a long rest (any
    /// activity calls [`Wire::wake`] to end the rest early).
    pub fn poll_at(&self, now: Instant) -> Instant {
        let rest = self.may_idle(now);
        // Set before the driver waits: a touch from now on wakes the wait.
        self.idle.store(rest, Ordering::Release);
        if !rest {
            return now + TIMER_TICK;
        }
        let names = self
            .table()
            .peers()
            .any(|p| p.cfg.endpoint.as_ref().is_some_and(|e| e.ip().is_none()));
        now + if names { RERESOLVE_EVERY } else { IDLE_REST }
    }

    /// One timer round, at [`Core::poll_at`]: boringtun's timers for every
    /// peer (keepalives, rekeys, retransmitted handshakes), handshake
    /// bookkeeping, the limiter's reset and the expiry of forwarded flows;
    /// while the interface rests, only the endpoint names due for a lookup.
    /// Returns those names: the driver looks them up and hands the answers
    /// to [`Core::resolved`]. `buf` is scratch room as for
    /// [`Core::process`].
    pub fn tick(&self, now: Instant, buf: &mut [u8]) -> Vec<Lookup> {
        let mut lookups = Vec::new();
        let table = self.table();
        if self.may_idle(now) {
            // No session, no handshake, nothing for boringtun's timers.
            for peer in table.peers() {
                self.maybe_resolve(now, peer, &mut lookups);
            }
            return lookups;
        }
        {
            let mut expired = self.flows_expired.lock().expect("poisoned");
            if now.saturating_duration_since(*expired) >= Duration::from_secs(1) {
                *expired = now;
                self.ip_flows.expire(now);
            }
        }
        // The limiter is shared by all peers, so boringtun leaves its
        // reset to us.
        self.rate_limiter.reset_count();
        for peer in table.peers() {
            {
                let mut guard = peer.tunn.lock().expect("tunn poisoned");
                // A peer that never had traffic has no timers to run,
                // unless it keeps the tunnel up itself: a persistent
                // keepalive with an endpoint handshakes at once.
                let keeps_alive = peer.cfg.persistent_keepalive.is_some()
                    && peer.endpoint.lock().expect("poisoned").is_some();
                let fresh = keeps_alive && guard.is_none();
                let tunn = if keeps_alive {
                    Some(self.tunn(peer, &mut guard))
                } else {
                    guard.as_deref_mut()
                };
                let Some(tunn) = tunn else {
                    drop(guard);
                    self.maybe_resolve(now, peer, &mut lookups);
                    continue;
                };
                if fresh {
                    // As the kernel does when a keepalive is set on an
                    // interface that is up: one at once (it starts the
                    // handshake), so the other side learns where we are.
                    if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&[], buf) {
                        self.send_to_peer(peer, p);
                    }
                }
                match tunn.update_timers(buf) {
                    TunnResult::WriteToNetwork(p) => self.send_to_peer(peer, p),
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                    TunnResult::Err(e) => {
                        tracing::debug!(peer = %peer.cfg.name, error = ?e, "timer error")
                    }
                    _ => {}
                }
                let since = tunn.stats().0;
                let mut seen = peer.last_handshake_seen.lock().expect("poisoned");
                if let Some(d) = since {
                    if seen.is_none_or(|prev| d < prev) {
                        self.peer_metrics(peer).handshakes.inc();
                        let wall = self.wall(now).checked_sub(d);
                        *peer.last_handshake_at.lock().expect("poisoned") = wall;
                        let at = wall
                            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                            .unwrap_or_default();
                        self.peer_metrics(peer)
                            .last_handshake
                            .set(at.as_secs() as i64);
                        tracing::debug!(tenant = %self.tenant, instance = %self.instance, peer = %peer.cfg.name, "handshake completed");
                    }
                }
                *seen = since;
            }
            self.maybe_resolve(now, peer, &mut lookups);
        }
        lookups
    }

    /// The wall clock time of `now`.
    fn wall(&self, now: Instant) -> SystemTime {
        self.born_wall + now.saturating_duration_since(self.born)
    }

    /// Asks for a peer's endpoint name to be looked up while the peer is
    /// silent (no handshake in the last 3 minutes), at most every
    /// [`RERESOLVE_EVERY`], or at once after its name changed.
    fn maybe_resolve(&self, now: Instant, peer: &Arc<Peer>, lookups: &mut Vec<Lookup>) {
        let Some(hp) = peer.cfg.endpoint.as_ref() else {
            return;
        };
        if hp.ip().is_some() {
            return;
        }
        let fresh = peer
            .last_handshake_seen
            .lock()
            .expect("poisoned")
            .is_some_and(|d| d < Duration::from_secs(180));
        let mut last = peer.last_resolve.lock().expect("poisoned");
        let forced = peer.resolve_now.swap(false, Ordering::Relaxed);
        let recent = last.is_some_and(|t| now.saturating_duration_since(t) < RERESOLVE_EVERY);
        if !forced && (fresh || recent) {
            return;
        }
        *last = Some(now);
        lookups.push(Lookup {
            peer: peer.cfg.public_key.0,
            name: peer.cfg.name.clone(),
            endpoint: hp.clone(),
        });
    }

    /// The answer to a [`Lookup`]: the peer's endpoint moves to `addr`, if
    /// the peer is still there with the same endpoint name.
    pub fn resolved(&self, lookup: &Lookup, addr: SocketAddr) {
        let table = self.table();
        let Some(peer) = table.by_key.get(&lookup.peer).and_then(|i| table.get(*i)) else {
            return;
        };
        if peer.cfg.endpoint.as_ref() != Some(&lookup.endpoint) {
            return;
        }
        let mut ep = peer.endpoint.lock().expect("poisoned");
        if *ep != Some(addr) {
            tracing::info!(tenant = %self.tenant, instance = %self.instance, peer = %peer.cfg.name, endpoint = %addr, host = %lookup.endpoint.host, "endpoint resolved");
            *ep = Some(addr);
        }
    }

    /// Peer states for the admin API.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.table()
            .peers()
            .map(|p| {
                let (since, tx, rx) = peer_stats(p);
                PeerStatus {
                    name: p.cfg.name.clone(),
                    public_key: p.cfg.public_key.to_string(),
                    endpoint: p.endpoint.lock().expect("poisoned").map(|e| e.to_string()),
                    allowed_ips: p.cfg.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    latest_handshake_secs: p
                        .last_handshake(since)
                        .map(|t| t.elapsed().unwrap_or_default().as_secs()),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    persistent_keepalive: p.cfg.persistent_keepalive.map(|d| d.as_secs()),
                }
            })
            .collect()
    }

    /// Peer states for `wg` (the UAPI `get`).
    pub fn uapi_peers(&self) -> Vec<super::uapi::PeerState> {
        self.table()
            .peers()
            .map(|p| {
                let (since, tx, rx) = peer_stats(p);
                super::uapi::PeerState {
                    public_key: p.cfg.public_key.0,
                    preshared_key: p.cfg.preshared_key,
                    endpoint: *p.endpoint.lock().expect("poisoned"),
                    last_handshake: p.last_handshake(since),
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                    persistent_keepalive: p
                        .cfg
                        .persistent_keepalive
                        .map_or(0, |d| d.as_secs() as u16),
                    allowed_ips: p.cfg.allowed_ips.clone(),
                }
            })
            .collect()
    }

    /// The VPN address of a peer: the first address of its first allowed network.
    pub fn peer_address(&self, name: &str) -> Option<IpAddr> {
        self.table()
            .peers()
            .find(|p| p.cfg.name == name)
            .and_then(|p| p.cfg.address())
    }
}

impl Core {
    /// The vnet's addresses changed (the instance is one of its links).
    pub fn addresses_changed(&self, addresses: &[IpNet]) {
        *self.addresses.write().expect("poisoned") = addresses.to_vec();
        if self.forward_configured.is_none() {
            self.forward.store(has_subnet(addresses), Ordering::Relaxed);
        }
    }
}

/// Does any address have a subnet (so the node is a hub by default)?
fn has_subnet(addresses: &[IpNet]) -> bool {
    addresses
        .iter()
        .any(|n| n.prefix_len() < n.max_prefix_len())
}
