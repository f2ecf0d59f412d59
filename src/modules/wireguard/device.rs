//! The WireGuard data plane of one instance: a UDP socket, one
//! `boringtun::noise::Tunn` per peer, cryptokey routing and the rules
//! boringtun leaves to us.
//!
//! - Incoming datagrams are matched to a peer without trying every key:
//!   handshake initiations by the anonymous handshake parse (the sender's
//!   static key), everything else by the receiver index, whose upper 24
//!   bits are random per peer and map to its slot. Each source address has
//!   a token bucket for handshake messages (20/s, burst 10) spent before any
//!   crypto; a shared rate limiter answers with cookies under load.
//!   Handshakes then run on their own task behind a bounded queue, so their
//!   Diffie-Hellman work never delays the data the receive task decrypts.
//! - After decryption the inner source address must route back to the
//!   sending peer (longest prefix over all peers' allowed IPs, as the
//!   kernel's cryptokey routing); otherwise the packet is dropped and counted.
//! - Packets to the node's own addresses go to the engine (the userspace
//!   IP stack, or the kernel engine's TUN);
//!   packets to another peer's allowed IPs are forwarded (hub routing) when
//!   `forward` allows it (default: when the node has a subnet address, e.g.
//!   a `/24`), with the TTL decremented (ICMP time exceeded back at 0), each
//!   one tracked as an IP
//!   flow (5-tuple, the sending peer as identity, flow-start hooks, bytes,
//!   idle expiry: [`crate::core::spine::ipflow`]); the rest are dropped.
//! - Outgoing packets (from the stack, or forwarded) go to the peer whose
//!   allowed IPs contain the destination (longest prefix). What the engine
//!   emits in one batch is held per endpoint and sent with UDP GSO (one
//!   `sendmsg` for up to 64 datagrams, [`PacketSink::flush`] ends the
//!   batch), one by one where the kernel refuses GSO; receives take UDP GRO
//!   batches and split them. Batching is where the throughput is: one
//!   system call per datagram each way cost most of a core.
//! - Timers run every 250 ms while the interface is active; one whose
//!   peers have no session, no handshake under way and no persistent
//!   keepalive (nothing for 10 minutes) looks every 5 s instead, and any
//!   datagram or packet wakes it. A peer's boringtun `Tunn` (11 KB) is made
//!   on its first datagram or packet, so idle peers cost little.
//! - Endpoints roam only to the source of what
//!   decrypted under the peer's keys (data, a handshake response, an
//!   initiation we answer), never on cookie replies or cookie-answered
//!   initiations; configured endpoint names are re-resolved while a peer is
//!   silent. Nothing is ever sent to an unauthenticated source except a
//!   cookie reply.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{routed_nets, PeerConfig, WireGuardConfig};
use super::metrics::{PeerMetrics, WgMetrics};
use super::replay::{self, Tai64n};
use crate::core::engine::userspace::metrics::NetStackMetrics;
use crate::core::engine::{self, EngineConfig, EngineError, EngineKind, IpEngine};
use crate::core::engine::{PacketSink, StackOwner};
use crate::core::metrics::{InstanceMetrics, Metrics};
use crate::core::net::prefix::PrefixTable;
use crate::core::net::resolve;
use crate::core::spine::flow::FlowTable;
use crate::core::spine::ipflow::{hop, time_exceeded, Admit, Hop, IpFlows};
use crate::core::spine::vnetstack::{Link, VnetStack};

/// Handshake messages per second (all peers) before cookies are required.
/// Each one passes the limiter twice (our peer lookup, then boringtun's own
/// check), so this admits about half as many handshakes.
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// How often boringtun's timers run while the interface is active.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often the timer task looks at an idle interface (one whose peers
/// have no session, no handshake under way and no persistent keepalive).
const IDLE_TICK: Duration = Duration::from_secs(5);
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
/// How long one endpoint resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Handshake messages waiting for the handshake task; more are dropped
/// (counted `handshake_queue_full`) and their senders retry.
const HANDSHAKE_QUEUE: usize = 256;

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

/// Datagrams the receive task handles before it yields.
const RECV_BATCH: usize = 64;

/// A thread's buffers for received datagrams and what decrypting them writes.
struct Scratch {
    rx: Vec<u8>,
    out: Vec<u8>,
}

thread_local! {
    /// Scratch buffer for encapsulation on whatever thread sends.
    static ENCAP_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF_LEN]);
    /// Scratch buffers of the receive, handshake and timer tasks, per
    /// thread: never held across an `.await`.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        rx: vec![0u8; MAX_DATAGRAM],
        out: vec![0u8; BUF_LEN],
    });
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
    metrics: PeerMetrics,
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

/// A running WireGuard interface.
pub struct Device {
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
    /// Where datagrams and decrypted packets go: the UDP socket and the
    /// engine ([`UdpWire`]), or a simulated network in tests.
    wire: Arc<dyn Wire>,
    /// The socket and engine when running for real; `None` in simulations.
    io: Option<DeviceIo>,
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
    cancel: CancellationToken,
    /// Why a task of the running device panicked, once one did.
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// Encrypted datagrams of the engine's current batch.
    tx: Mutex<TxBatch>,
    /// When the device was built: the clock of `last_activity`.
    born: Instant,
    /// Milliseconds after `born` of the last datagram or packet (`NEVER`).
    last_activity: std::sync::atomic::AtomicU64,
    /// The timer task sleeps long (an idle interface costs no wakeups);
    /// activity wakes it.
    idle: AtomicBool,
    wake: tokio::sync::Notify,
}

/// What the protocol logic sends out through: socket-free, so the logic
/// runs against a simulated network in tests.
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

/// The real wire: the UDP socket (IPv4 mapped onto a dual-stack socket) and
/// the engine that holds the node's addresses.
struct UdpWire {
    socket: Arc<UdpSocket>,
    dual_stack: bool,
    net: std::sync::OnceLock<Net>,
    /// UDP GSO works here (off after the first refusal).
    gso: AtomicBool,
}

impl UdpWire {
    /// IPv4 destinations as IPv4-mapped on a dual-stack socket.
    fn socket_addr(&self, to: SocketAddr) -> SocketAddr {
        match (self.dual_stack, to) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            _ => to,
        }
    }
}

impl Wire for UdpWire {
    fn send_batch(&self, data: &[u8], segment: usize, to: SocketAddr) -> bool {
        if self.gso.load(Ordering::Relaxed) && data.len() > segment {
            let addr = self.socket_addr(to);
            match crate::core::net::datagram::try_send_segments(&self.socket, data, segment, addr) {
                Ok(_) => return true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::info!(error = %e, "UDP GSO refused; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
            }
        }
        data.chunks(segment).all(|d| self.send_to(d, to))
    }

    fn send_to(&self, data: &[u8], to: SocketAddr) -> bool {
        let to = self.socket_addr(to);
        match self.socket.try_send_to(data, to) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, %to, "udp send failed");
                false
            }
        }
    }

    fn deliver(&self, packet: &[u8]) -> bool {
        self.net.get().is_some_and(|n| n.inject(packet))
    }

    fn flush_delivered(&self) {
        match self.net.get() {
            Some(Net::Own(e)) => e.flush(),
            Some(Net::Vnet(s)) => s.flush(),
            None => {}
        }
    }
}

/// Where a device's packets for the node's addresses go.
#[derive(Clone)]
pub enum Net {
    /// Its own engine, holding the interface's addresses.
    Own(Arc<dyn IpEngine>),
    /// The IP stack of the vnet it attaches to, shared with the vnet's
    /// other links.
    Vnet(Arc<VnetStack>),
}

impl Net {
    fn inject(&self, packet: &[u8]) -> bool {
        match self {
            Net::Own(e) => e.inject(packet),
            Net::Vnet(s) => s.inject(packet),
        }
    }

    /// The engine running now.
    pub fn engine(&self) -> Option<Arc<dyn IpEngine>> {
        match self {
            Net::Own(e) => Some(e.clone()),
            Net::Vnet(s) => s.engine(),
        }
    }
}

/// What a device is started on: an engine of its own, or its vnet's stack.
pub enum NetChoice {
    /// Start an engine of this kind for the interface's addresses.
    Own(EngineKind),
    /// Link to the vnet's stack.
    Vnet(Arc<VnetStack>),
}

/// The socket and the network of a running device.
struct DeviceIo {
    socket: Arc<UdpSocket>,
    net: Net,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The UDP port cannot be bound.
    #[error("cannot bind UDP port {port}: {source}")]
    Bind {
        /// The port asked for (0: any).
        port: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The engine cannot start.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Hands packets from the engine to the device (cryptokey routing).
struct StackSink(Mutex<Weak<Device>>);

impl PacketSink for StackSink {
    fn send(&self, packet: &[u8]) {
        let dev = self.0.lock().expect("sink poisoned").upgrade();
        if let Some(dev) = dev {
            dev.encrypt(packet, None, true);
        }
    }

    fn flush(&self) {
        let dev = self.0.lock().expect("sink poisoned").upgrade();
        if let Some(dev) = dev {
            dev.flush_held();
        }
    }
}

/// Binds the UDP socket: dual-stack `[::]:port` where the host has IPv6,
/// else `0.0.0.0:port`.
fn bind_udp(port: u16) -> std::io::Result<(UdpSocket, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = (|| {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_only_v6(false)?;
        s.set_nonblocking(true)?;
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok::<_, std::io::Error>(s)
    })();
    let (s, dual) = match v6 {
        Ok(s) => (s, true),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(e),
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_nonblocking(true)?;
            let _ = s.set_recv_buffer_size(4 << 20);
            let _ = s.set_send_buffer_size(4 << 20);
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            (s, false)
        }
    };
    let socket = UdpSocket::from_std(s.into())?;
    // Several datagrams per receive where the kernel can.
    crate::core::net::datagram::enable_gro(&socket);
    Ok((socket, dual))
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

/// The text a panic carried.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// `::ffff:a.b.c.d` → `a.b.c.d`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
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

impl Device {
    /// Binds, starts the engine (or links to the vnet's stack) and the
    /// data plane tasks.
    /// `replay_floors` are the initiation timestamps of the device this
    /// one replaces ([`Device::replay_floors`]), empty for a first start.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        tenant: &str,
        instance: &str,
        cfg: &WireGuardConfig,
        net: NetChoice,
        metrics: Arc<Metrics>,
        flows: Arc<FlowTable>,
        instance_metrics: InstanceMetrics,
        replay_floors: HashMap<[u8; 32], Tai64n>,
    ) -> Result<Arc<Device>, StartError> {
        let port = cfg.listen_port.unwrap_or(0);
        let (socket, dual_stack) =
            bind_udp(port).map_err(|source| StartError::Bind { port, source })?;
        let socket = Arc::new(socket);
        let wire = Arc::new(UdpWire {
            socket: socket.clone(),
            dual_stack,
            net: std::sync::OnceLock::new(),
            gso: AtomicBool::new(true),
        });
        let sink = Arc::new(StackSink(Mutex::new(Weak::new())));
        let mut cfg = cfg.clone();
        let net = match net {
            NetChoice::Own(kind) => {
                let engine_cfg = EngineConfig {
                    addresses: cfg.addresses.clone(),
                    mtu: cfg.mtu,
                    keep_alive: cfg.tcp_keepalive,
                    tcp_timeout: cfg.tcp_timeout,
                    congestion_control: cfg.congestion_control.clone(),
                    label: format!("{tenant}/{instance}"),
                    owner: Some(StackOwner {
                        metrics: metrics.clone(),
                        tenant: tenant.to_string(),
                        instance: instance.to_string(),
                    }),
                };
                Net::Own(engine::start(kind, &engine_cfg, sink.clone()).await?)
            }
            NetChoice::Vnet(stack) => {
                if cfg.addresses.is_empty() {
                    cfg.addresses = stack.addresses();
                }
                Net::Vnet(stack)
            }
        };
        let _ = wire.net.set(net.clone());
        let dev = Arc::new(Self::build(
            tenant,
            instance,
            &cfg,
            metrics,
            flows,
            instance_metrics,
            wire,
            Some(DeviceIo {
                socket,
                net: net.clone(),
            }),
        ));
        *sink.0.lock().expect("sink poisoned") = Arc::downgrade(&dev);
        dev.inherit(replay_floors);
        dev.set_peers(&cfg.peers);
        if let Net::Vnet(stack) = &net {
            let link: Weak<dyn Link> = Arc::downgrade(&dev) as Weak<dyn Link>;
            stack.link(instance, routed_nets(&cfg.peers), link);
        }
        let (handshakes, queue) = mpsc::channel(HANDSHAKE_QUEUE);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(dev.clone().recv_loop(handshakes));
        tasks.spawn(dev.clone().handshake_loop(queue));
        tasks.spawn(dev.clone().timer_loop());
        // A task that panics (a bug; its locks may be poisoned) is reported
        // through `failure`, and the module restarts the whole device.
        let weak = Arc::downgrade(&dev);
        tokio::spawn(async move {
            while let Some(ended) = tasks.join_next().await {
                let Err(e) = ended else { continue };
                if !e.is_panic() {
                    continue;
                }
                let why = panic_message(e.into_panic());
                if let Some(dev) = weak.upgrade() {
                    dev.cancel.cancel();
                    dev.failure.send_replace(Some(why));
                }
                return;
            }
        });
        Ok(dev)
    }

    /// The protocol logic alone, over `wire`: no socket, no stack, no tasks.
    /// The caller feeds datagrams ([`Device::handle_datagram`]), packets
    /// ([`Device::send_ip`]) and clock ticks ([`Device::tick`]).
    #[allow(clippy::too_many_arguments)]
    fn build(
        tenant: &str,
        instance: &str,
        cfg: &WireGuardConfig,
        metrics: Arc<Metrics>,
        flows: Arc<FlowTable>,
        instance_metrics: InstanceMetrics,
        wire: Arc<dyn Wire>,
        io: Option<DeviceIo>,
    ) -> Device {
        let private = x25519::StaticSecret::from(*cfg.private_key.as_bytes());
        let public = x25519::PublicKey::from(&private);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let forward = cfg.forward.unwrap_or_else(|| has_subnet(&cfg.addresses));
        Device {
            tenant: tenant.into(),
            instance: instance.into(),
            private,
            public,
            addresses: RwLock::new(cfg.addresses.clone()),
            mtu: cfg.mtu,
            forward: AtomicBool::new(forward),
            forward_configured: cfg.forward,
            wire,
            io,
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
            cancel: CancellationToken::new(),
            failure: tokio::sync::watch::Sender::new(None),
            tx: Mutex::new(TxBatch::default()),
            born: Instant::now(),
            last_activity: std::sync::atomic::AtomicU64::new(NEVER),
            idle: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// A device without socket or stack, sending through `wire` (tests and
    /// simulations).
    pub fn simulated(
        tenant: &str,
        instance: &str,
        cfg: &WireGuardConfig,
        metrics: Arc<Metrics>,
        flows: Arc<FlowTable>,
        wire: Arc<dyn Wire>,
    ) -> Arc<Device> {
        let im = metrics.instance(tenant, instance);
        let dev = Arc::new(Self::build(
            tenant, instance, cfg, metrics, flows, im, wire, None,
        ));
        dev.set_peers(&cfg.peers);
        dev
    }

    /// The UDP port the interface listens on (0 in a simulation).
    pub fn listen_port(&self) -> u16 {
        self.io
            .as_ref()
            .and_then(|io| io.socket.local_addr().ok())
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// The base64 public key.
    pub fn public_key(&self) -> String {
        crate::core::keys::PublicKey(self.public.to_bytes()).to_string()
    }

    /// The engine holding the node's addresses (`None` in a simulation).
    pub fn engine(&self) -> Option<Arc<dyn IpEngine>> {
        self.io.as_ref().and_then(|io| io.net.engine())
    }

    /// The vnet stack this device is a link of, if any.
    pub fn vnet_stack(&self) -> Option<&Arc<VnetStack>> {
        match self.io.as_ref().map(|io| &io.net) {
            Some(Net::Vnet(s)) => Some(s),
            _ => None,
        }
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

    /// Resolves with the panic message when a task of the device panicked;
    /// `None` when the device is gone without one.
    pub fn failed(&self) -> impl std::future::Future<Output = Option<String>> + Send + 'static {
        let mut rx = self.failure.subscribe();
        async move {
            let failed = rx.wait_for(Option::is_some).await.ok()?;
            failed.clone()
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
        self.touch();
    }

    /// Stops the tasks and the engine.
    pub fn shutdown(self: &Arc<Self>) {
        self.cancel.cancel();
        match self.io.as_ref().map(|io| &io.net) {
            Some(Net::Own(e)) => e.shutdown(),
            Some(Net::Vnet(s)) => {
                let me: Weak<dyn Link> = Arc::downgrade(self) as Weak<dyn Link>;
                s.unlink(&self.instance, &me);
            }
            None => {}
        }
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
        // New peers may need keepalives: let the timer task look again.
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
        let mut sessions: std::collections::HashSet<u32> =
            slots.iter().flatten().map(|p| p.session).collect();
        for cfg in new {
            let index = match slots.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    slots.push(None);
                    slots.len() - 1
                }
            };
            let session = loop {
                let candidate = rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> 8;
                if sessions.insert(candidate) {
                    break candidate;
                }
            };
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
            metrics: self
                .wg_metrics
                .peer(&self.tenant, &self.instance, &cfg.name),
        }
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
                    peer.metrics.tx_bytes.inc_by(data.len() as u64);
                } else {
                    self.drop_packet(Some(peer), "send_failed");
                }
            }
            None => self.drop_packet(Some(peer), "no_endpoint"),
        }
    }

    /// Routes an IP packet to the peer whose allowed IPs hold its destination
    /// and sends it encrypted. `from` is the peer it came from when forwarding.
    pub fn send_ip(&self, packet: &[u8], from: Option<u32>) {
        self.encrypt(packet, from, false)
    }

    /// [`Device::send_ip`], the datagram held back for the engine's batch
    /// when `hold` ([`Device::flush_held`] sends it).
    fn encrypt(&self, packet: &[u8], from: Option<u32>, hold: bool) {
        let Some(dst) = Tunn::dst_address(packet) else {
            return self.drop_packet(None, "malformed");
        };
        let table = self.table();
        let Some(peer) = table.route(dst) else {
            return self.drop_packet(None, "no_route");
        };
        self.touch();
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

    /// Reads datagrams: data and cookie replies are handled here, handshake
    /// messages (two Diffie-Hellman each) go to [`Device::handshake_loop`]
    /// through a bounded queue, so a burst of them never delays data.
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
            tx.tx_bytes = Some(peer.metrics.tx_bytes.clone());
        }
        tx.buf.extend_from_slice(datagram);
        tx.count += 1;
        tx.closed = datagram.len() < tx.segment;
    }

    /// Encrypts `packet` into the held batch, as the engine's sink does.
    #[cfg(test)]
    pub(crate) fn hold_for_test(&self, packet: &[u8]) {
        self.encrypt(packet, None, true)
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

    async fn recv_loop(self: Arc<Self>, handshakes: mpsc::Sender<(Vec<u8>, SocketAddr)>) {
        let Some(socket) = self.io.as_ref().map(|io| io.socket.clone()) else {
            return;
        };
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = socket.readable() => if let Err(e) = r {
                    tracing::debug!(error = %e, "udp socket failed");
                    return;
                },
            }
            // Drain what is there into the thread's scratch buffers (no
            // buffer per interface: an idle one holds none), a batch at a
            // time so other tasks get their turn.
            for _ in 0..RECV_BATCH {
                let more = SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let Scratch { rx, out } = &mut *scratch;
                    let (n, src, segment) =
                        match crate::core::net::datagram::try_recv_batch(&socket, rx) {
                            Ok(x) => x,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                            Err(e) => {
                                tracing::debug!(error = %e, "udp recv failed");
                                return true;
                            }
                        };
                    let src = canonical(src);
                    // With GRO, several datagrams of one source in a row.
                    for datagram in rx[..n].chunks(segment.unwrap_or(n).max(1)) {
                        if !is_handshake(datagram) {
                            self.process(datagram, src, out);
                        } else if self.admit_handshake(src) {
                            if let Err(mpsc::error::TrySendError::Full(_)) =
                                handshakes.try_send((datagram.to_vec(), src))
                            {
                                self.drop_packet(None, "handshake_queue_full");
                            }
                        }
                    }
                    true
                });
                if !more {
                    break;
                }
            }
            // What the engine held back of this batch (coalesced segments).
            self.wire.flush_delivered();
        }
    }

    /// Runs the handshakes [`Device::recv_loop`] queued, one at a time.
    async fn handshake_loop(self: Arc<Self>, mut queue: mpsc::Receiver<(Vec<u8>, SocketAddr)>) {
        loop {
            let (datagram, src) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                m = queue.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
            };
            SCRATCH.with(|s| self.process(&datagram, src, &mut s.borrow_mut().out));
            self.wire.flush_delivered();
        }
    }

    /// Handles one datagram from the network, handshakes inline (the
    /// socket-free path of tests and fuzzing). Never panics on bad input.
    pub fn handle_datagram(&self, datagram: &[u8], src: SocketAddr, out: &mut [u8]) {
        if !is_handshake(datagram) || self.admit_handshake(src) {
            self.process(datagram, src, out);
            self.wire.flush_delivered();
        }
    }

    /// Handshake messages (types 1 and 2) spend a token of their source
    /// before any crypto; a flood from one address is dropped here.
    fn admit_handshake(&self, src: SocketAddr) -> bool {
        // The shared limiter is reset by the timer: keep it running.
        self.touch();
        let ok = self.handshake_token(src.ip(), Instant::now());
        if !ok {
            self.drop_packet(None, "handshake_rate");
        }
        ok
    }

    /// One datagram, past the per-source limit.
    fn process(&self, datagram: &[u8], src: SocketAddr, out: &mut [u8]) {
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
        self.touch();
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
                    if last.is_none_or(|t| t.elapsed() >= REKEY_TIMEOUT) {
                        *last = Some(Instant::now());
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
                self.route_inbound(peer, p, IpAddr::V4(inner_src));
            }
            TunnResult::WriteToTunnelV6(p, inner_src) => {
                self.roam(peer, src, datagram.len());
                drop(guard);
                self.route_inbound(peer, p, IpAddr::V6(inner_src));
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
        peer.metrics.rx_bytes.inc_by(len as u64);
        let mut ep = peer.endpoint.lock().expect("poisoned");
        if *ep != Some(src) {
            if ep.is_some() {
                tracing::info!(tenant = %self.tenant, instance = %self.instance, peer = %peer.cfg.name, endpoint = %src, "peer endpoint changed");
            }
            *ep = Some(src);
        }
    }

    /// A decrypted packet from `peer`: check its source, then deliver or forward.
    fn route_inbound(&self, peer: &Peer, packet: &mut [u8], inner_src: IpAddr) {
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
            match self.ip_flows.packet(packet, &peer.cfg.name, Instant::now()) {
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
                Hop::Forward => self.send_ip(packet, Some(peer.index)),
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
                        self.send_ip(&icmp, None);
                    }
                }
            }
        } else {
            self.drop_packet(Some(peer), "no_route");
        }
    }

    /// Something happened (a datagram from a peer, a packet to send, new
    /// peers): timers run at full rate again.
    fn touch(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.last_activity.store(now, Ordering::Relaxed);
        self.wake_timers();
    }

    /// Ends an idle wait of the timer task, if it is in one.
    fn wake_timers(&self) {
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Whether the timers may rest: nothing for `ACTIVE_FOR`, and no peer
    /// that must send keepalives.
    pub(super) fn may_idle(&self) -> bool {
        let last = self.last_activity.load(Ordering::Relaxed);
        (last == NEVER
            || self
                .born
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
                > ACTIVE_FOR)
            && !self.table().peers().any(|p| {
                p.cfg.persistent_keepalive.is_some()
                    && (p.cfg.endpoint.is_some() || p.endpoint.lock().expect("poisoned").is_some())
            })
    }

    async fn timer_loop(self: Arc<Self>) {
        let mut last_second = Instant::now();
        loop {
            let rest = self.may_idle();
            // Set before waiting: a touch from now on wakes the wait.
            self.idle.store(rest, Ordering::Release);
            let wait = if rest { IDLE_TICK } else { TIMER_TICK };
            let woken = tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => false,
                _ = self.wake.notified(), if rest => true,
            };
            if rest && !woken {
                // Still idle: no session, no handshake, nothing for
                // boringtun's timers; only names may want resolving.
                for peer in self.table().peers() {
                    self.maybe_resolve(peer);
                }
                continue;
            }
            if last_second.elapsed() >= Duration::from_secs(1) {
                last_second = Instant::now();
                self.ip_flows.expire(Instant::now());
            }
            SCRATCH.with(|s| self.tick(&mut s.borrow_mut().out));
        }
    }

    /// One timer round (every 250 ms, or 5 s while idle): boringtun's timers for every
    /// peer (keepalives, rekeys, retransmitted handshakes), handshake
    /// bookkeeping, endpoint re-resolution, and the limiter's reset.
    pub fn tick(&self, buf: &mut [u8]) {
        // The limiter is shared by all peers, so boringtun leaves its
        // reset to us.
        self.rate_limiter.reset_count();
        let table = self.table();
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
                    self.maybe_resolve(peer);
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
                        peer.metrics.handshakes.inc();
                        let wall = SystemTime::now().checked_sub(d);
                        *peer.last_handshake_at.lock().expect("poisoned") = wall;
                        let at = wall
                            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                            .unwrap_or_default();
                        peer.metrics.last_handshake.set(at.as_secs() as i64);
                        tracing::debug!(tenant = %self.tenant, instance = %self.instance, peer = %peer.cfg.name, "handshake completed");
                    }
                }
                *seen = since;
            }
            self.maybe_resolve(peer);
        }
    }

    /// Resolves a peer's endpoint name while it is silent (no handshake in
    /// the last 3 minutes), at most every [`RERESOLVE_EVERY`].
    fn maybe_resolve(&self, peer: &Arc<Peer>) {
        let Some(hp) = peer.cfg.endpoint.clone() else {
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
        if !forced && (fresh || last.is_some_and(|t| t.elapsed() < RERESOLVE_EVERY)) {
            return;
        }
        *last = Some(Instant::now());
        let endpoint = peer.endpoint.clone();
        let (tenant, instance, name) = (
            self.tenant.clone(),
            self.instance.clone(),
            peer.cfg.name.clone(),
        );
        tokio::spawn(async move {
            match resolve::on_host(&hp.host, RESOLVE_TIMEOUT).await {
                Ok(ips) => {
                    if let Some(a) = ips.first().map(|ip| SocketAddr::new(*ip, hp.port)) {
                        let mut ep = endpoint.lock().expect("poisoned");
                        if *ep != Some(a) {
                            tracing::info!(%tenant, %instance, peer = %name, endpoint = %a, host = %hp.host, "endpoint resolved");
                            *ep = Some(a);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%tenant, %instance, peer = %name, error = %e, "cannot resolve endpoint")
                }
            }
        });
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

/// A link of its vnet's stack: what the stack sends to our peers.
impl Link for Device {
    fn send_ip(&self, packet: &[u8]) {
        self.encrypt(packet, None, true)
    }

    fn flush(&self) {
        self.flush_held()
    }

    fn addresses_changed(&self, addresses: &[IpNet]) {
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

impl Drop for Device {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
