//! The shared state of one stack, what one round of its task does, and the
//! task itself.
//!
//! Each connection has its own one-socket smoltcp `SocketSet`; all share
//! the one `Interface`. smoltcp walks the whole set it is given for every
//! packet it receives and on every transmit pass, so with a single set a
//! thousand idle connections cut a bulk transfer's throughput twentyfold.
//! Here inbound TCP segments are routed to their connection by a 4-tuple
//! lookup, and only connections with work (marked dirty by a packet, a
//! stream or a due timer) are polled: the cost per packet does not grow
//! with the number of connections.
//!
//! A round: fire due timers, take the inbound queue in one swap, feed up to
//! [`INGRESS_BUDGET`] packets to smoltcp one by one (a SYN to a listener
//! gets a fresh listening socket first), let the dirty connections transmit
//! up to [`EGRESS_BUDGET`] packets, settle each polled connection
//! (handshake done, orphan closed, timeout policy, next timer), release the
//! lock, hand the packets to the sink. Rounds repeat until nothing is left;
//! then the task sleeps until a packet, a stream or the earliest timer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use std::time::Instant;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpCidr};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::super::tcp::cc::Algorithm;
use super::super::tcp::seq::Seq;
use super::super::tcp::socket::{self as tcp, Socket};
use super::super::tcp::wire;
use super::device::Device;
use super::packet::{self, TcpPeek};
use super::tcp::NetTcpStream;
use super::{NetError, NetStackConfig, NetStackStats, PacketSink, MAX_ADDRESSES};

/// Inbound packets fed to smoltcp per lock hold.
const INGRESS_BUDGET: usize = 64;
/// Packets smoltcp may emit per lock hold before the outbox is flushed.
const EGRESS_BUDGET: usize = 64;
/// Rounds before the task yields to the runtime while still busy.
const ROUNDS_PER_PUMP: usize = 64;
/// The soonest a connection is polled again when it asks for "now" right
/// after a full poll (it would otherwise spin).
const MIN_TIMER: Duration = Duration::from_millis(1);
/// Ephemeral ports, as IANA suggests.
const EPHEMERAL_FIRST: u16 = 49152;
/// The listener key of transparent listeners
/// ([`State::add_transparent_listener`]): no connection has port 0.
const TRANSPARENT_PORT: u16 = 0;
const EPHEMERAL_COUNT: u32 = 65536 - EPHEMERAL_FIRST as u32;
/// Spare transmit buffers kept.
const SPARE_TX_BUFFERS: usize = 1024;
/// Spare inbound buffers kept (at most the queue size).
const SPARE_RX_BUFFERS: usize = 4096;

/// The limits every part of the stack reads (a clamped copy of the config).
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub mtu: usize,
    pub tcp_buffer: usize,
    pub tcp_memory: usize,
    pub inbound_queue: usize,
    pub backlog: usize,
    pub keep_alive: Option<Duration>,
    pub tcp_timeout: Duration,
    pub congestion: Algorithm,
}

impl Limits {
    fn new(cfg: &NetStackConfig) -> Self {
        let keep_alive = cfg.keep_alive.filter(|d| !d.is_zero());
        let mut tcp_timeout = cfg.tcp_timeout.max(Duration::from_secs(1));
        if let Some(k) = keep_alive {
            // Keep-alive answers must have a chance to refresh the timer.
            tcp_timeout = tcp_timeout.max(k * 2);
        }
        Limits {
            mtu: cfg.mtu.clamp(576, 65535),
            tcp_buffer: cfg.tcp_buffer.clamp(4096, 256 << 20),
            tcp_memory: cfg.tcp_memory,
            inbound_queue: cfg.inbound_queue.max(1),
            backlog: cfg.listen_backlog.max(1),
            keep_alive,
            tcp_timeout,
            congestion: cfg.congestion,
        }
    }

    /// The timeout of a socket a stream owns. A socket aborts when the
    /// peer has been silent that long, idle or not, so it is armed only
    /// while sent data waits for an acknowledgement, or always with
    /// keep-alive (whose probes the peer answers).
    fn stream_timeout(&self, unacked: bool) -> Option<Duration> {
        (unacked || self.keep_alive.is_some()).then_some(self.tcp_timeout)
    }

    /// How sockets of this stack are built.
    pub fn socket_config(&self) -> tcp::Config {
        tcp::Config {
            mtu: self.mtu,
            recv_buffer: self.tcp_buffer,
            send_buffer: self.tcp_buffer,
            keep_alive: self.keep_alive,
            congestion: self.congestion,
        }
    }
}

/// Counters behind [`NetStackStats`].
#[derive(Default)]
pub(super) struct Counters {
    packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_no_listener: AtomicU64,
    dropped_no_connection: AtomicU64,
    dropped_bad_segment: AtomicU64,
    tcp_retransmits: AtomicU64,
    tcp_timeouts: AtomicU64,
    tcp_loss_probes: AtomicU64,
    tcp_recoveries: AtomicU64,
    dropped_backlog: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Packets waiting for the task, and the spare buffers `inject` copies into.
struct Inbound {
    queue: VecDeque<Vec<u8>>,
    /// Packets of a batch not yet handed over (see `Shared::inject_held`):
    /// the task does not see them, so a batch is never split between two
    /// rounds by a task that is already running.
    held: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
    closed: bool,
}

/// Everything one stack shares between its task, its handles and streams.
pub(super) struct Shared {
    state: Mutex<State>,
    inbound: Mutex<Inbound>,
    /// Poked by `inject` (queue became non-empty) and by streams after they
    /// read, write or close; the task wakes on it.
    pub wake: Notify,
    /// Cancelled by `shutdown` or when the last `NetStack` goes.
    pub stop: CancellationToken,
    pub counters: Counters,
    /// The addresses in use.
    pub addresses: Vec<IpNet>,
    pub limits: Limits,
    /// Bound UDP sockets (datagrams bypass smoltcp).
    pub udp: super::udp::UdpTable,
    epoch: std::time::Instant,
}

/// Who a connection belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Handshaking for the listener with this id (on this port).
    Pending { port: u16, listener: u64 },
    /// A `NetTcpStream` (connecting, established, closing).
    Stream,
    /// The stream was dropped; the stack closes the socket and reaps it.
    Orphan,
}

/// One TCP connection.
struct Conn {
    /// Unique for the stack's lifetime: streams, timers and the dirty queue
    /// carry it, so a reused slot is never mistaken for its old occupant.
    id: u64,
    socket: Socket,
    role: Role,
    /// (local, remote), the key in `State::by_tuple`.
    tuple: (SocketAddr, SocketAddr),
    /// The local (address, port) an active open reserved.
    port: Option<(IpAddr, u16)>,
    /// Queued in `State::dirty`.
    dirty: bool,
    /// The earliest timer queued in `State::timers` for it.
    timer: Option<Instant>,
    /// The socket's loss-handling counts already added to the stack's.
    reported: tcp::Stats,
    /// The socket's buffer memory already counted in `State::buffered`.
    reported_alloc: usize,
}

/// One listening address and port.
struct Listener {
    id: u64,
    /// A stack address, or the unspecified address of a family.
    addr: IpAddr,
    accept: mpsc::Sender<NetTcpStream>,
    /// Connections in SYN-RECEIVED.
    half_open: usize,
}

impl Listener {
    fn matches(&self, ip: IpAddr) -> bool {
        self.addr == ip || (self.addr.is_unspecified() && self.addr.is_ipv4() == ip.is_ipv4())
    }
}

/// Where an inbound packet goes.
enum Target {
    /// A connection.
    Conn(usize),
    /// smoltcp's empty socket set: it answers (RST, ICMP) or drops.
    Stray,
    /// Dropped unseen.
    Drop,
}

/// The interface, the connections and the bookkeeping around them, behind
/// `Shared::state`.
pub(super) struct State {
    iface: Interface,
    /// Connections by slot; `None` slots are listed in `free`.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    by_tuple: HashMap<(SocketAddr, SocketAddr), usize>,
    /// Socket-less set for packets no connection takes.
    stray: SocketSet<'static>,
    /// Connections to poll: (slot, id).
    dirty: VecDeque<(usize, u64)>,
    /// Connection timers: (when, slot, id), earliest first.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Initial sequence numbers: a keyed hash of the 4-tuple and the clock
    /// (RFC 6528).
    iss_key: std::collections::hash_map::RandomState,
    clock_base: Instant,
    /// Listeners by port.
    listeners: HashMap<u16, Vec<Listener>>,
    /// Local (address, port) pairs taken by listeners and active opens.
    ports: HashSet<(IpAddr, u16)>,
    next_port: HashMap<IpAddr, u16>,
    next_id: u64,
    /// Buffer memory all connections hold (as of their last poll).
    buffered: usize,
    /// The task has stopped.
    pub closed: bool,
}

/// What `Shared::pump` left to do.
pub(super) enum Pump {
    /// Out of work; come back after this long (or on a wake-up).
    Idle(Option<Duration>),
    /// The round budget ran out with work left.
    Busy,
}

fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The configured addresses smoltcp can hold: unicast, no duplicates, at
/// most [`MAX_ADDRESSES`].
fn usable_addresses(configured: &[IpNet]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for net in configured {
        let ip = net.addr();
        let unicast = match ip {
            IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
        };
        if !unicast {
            warn!(address = %net, "netstack: ignoring a non-unicast address");
        } else if out.iter().any(|n| n.addr() == ip) {
            warn!(address = %net, "netstack: ignoring a duplicate address");
        } else if out.len() == MAX_ADDRESSES {
            warn!(
                address = %net,
                "netstack: ignoring an address beyond the limit of {MAX_ADDRESSES} per network"
            );
        } else {
            out.push(*net);
        }
    }
    out
}

impl Shared {
    /// Builds the interface; nothing runs until [`run`] is spawned.
    pub fn new(cfg: NetStackConfig) -> Arc<Shared> {
        let limits = Limits::new(&cfg);
        let addresses = usable_addresses(&cfg.addresses);
        let mut dev = Device::new(limits.mtu);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = random_seed();
        let mut iface = Interface::new(config, &mut dev, SmolInstant::ZERO);
        iface.update_ip_addrs(|ips| {
            for net in &addresses {
                // Cannot fail: `usable_addresses` keeps at most the capacity.
                let _ = ips.push(IpCidr::new(net.addr().into(), net.prefix_len()));
            }
        });
        // Default routes, so replies reach peers outside the prefixes. With
        // medium IP the gateway is never resolved; our own address will do.
        if let Some(v4) = addresses.iter().find_map(|n| match n.addr() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }) {
            let _ = iface.routes_mut().add_default_ipv4_route(v4);
        }
        if let Some(v6) = addresses.iter().find_map(|n| match n.addr() {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }) {
            let _ = iface.routes_mut().add_default_ipv6_route(v6);
        }
        Arc::new(Shared {
            state: Mutex::new(State {
                iface,
                conns: Vec::new(),
                free: Vec::new(),
                live: 0,
                by_tuple: HashMap::new(),
                stray: SocketSet::new(Vec::new()),
                dirty: VecDeque::new(),
                timers: BinaryHeap::new(),
                iss_key: Default::default(),
                clock_base: Instant::now(),
                listeners: HashMap::new(),
                ports: HashSet::new(),
                next_port: HashMap::new(),
                next_id: 1,
                buffered: 0,
                closed: false,
            }),
            inbound: Mutex::new(Inbound {
                // Grows with use: an idle stack holds no queue.
                queue: VecDeque::new(),
                held: VecDeque::new(),
                free: Vec::new(),
                closed: false,
            }),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            counters: Counters::default(),
            addresses,
            limits,
            udp: Default::default(),
            epoch: std::time::Instant::now(),
        })
    }

    /// Locks the state. A panic elsewhere does not poison the stack for
    /// everyone: the state is consistent between smoltcp calls.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_inbound(&self) -> MutexGuard<'_, Inbound> {
        self.inbound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    /// The same moment on smoltcp's clock (for the ICMP and reset path).
    fn smol(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    /// See [`NetStack::inject`](super::NetStack::inject).
    pub fn inject(&self, packet: &[u8]) -> bool {
        self.enqueue(packet, true)
    }

    /// Queues a packet of a batch without waking the stack until
    /// [`end_batch`](Self::end_batch) (or a full round's worth is queued): the
    /// batch's segments of one connection are then taken in one round and
    /// acknowledged once, as GRO does for the kernel.
    pub fn inject_held(&self, packet: &[u8]) -> bool {
        self.enqueue(packet, false)
    }

    /// The end of a batch of [`inject_held`](Self::inject_held) calls:
    /// hands it over and wakes the task.
    pub fn end_batch(&self) {
        let moved = {
            let mut inbound = self.lock_inbound();
            let Inbound { queue, held, .. } = &mut *inbound;
            let moved = !held.is_empty();
            queue.append(held);
            moved
        };
        if moved {
            self.wake.notify_one();
        }
    }

    fn enqueue(&self, packet: &[u8], wake_now: bool) -> bool {
        // Over the MTU is malformed here (the tunnel drops it before, and
        // counts it): so the inbound queue holds at most
        // `inbound_queue × mtu` bytes, and a recycled buffer at most `mtu`.
        if packet.len() > self.limits.mtu || packet::check(packet).is_err() {
            bump(&self.counters.dropped_malformed);
            return false;
        }
        if self.udp.deliver(packet) {
            bump(&self.counters.packets_in);
            return true;
        }
        let wake = {
            let mut inbound = self.lock_inbound();
            if inbound.closed {
                return false;
            }
            if inbound.queue.len() + inbound.held.len() >= self.limits.inbound_queue {
                drop(inbound);
                bump(&self.counters.dropped_queue_full);
                return false;
            }
            let mut buf = inbound.free.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(packet);
            if wake_now {
                inbound.queue.push_back(buf);
                inbound.queue.len() == 1
            } else {
                // A round's worth held: hand it over (a round takes no more).
                inbound.held.push_back(buf);
                let full = inbound.held.len() >= INGRESS_BUDGET;
                if full {
                    let Inbound { queue, held, .. } = &mut *inbound;
                    queue.append(held);
                }
                full
            }
        };
        bump(&self.counters.packets_in);
        if wake {
            self.wake.notify_one();
        }
        true
    }

    /// See [`NetStack::stats`](super::NetStack::stats).
    pub fn stats(&self) -> NetStackStats {
        let st = self.lock();
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStackStats {
            packets_in: get(&c.packets_in),
            packets_out: get(&c.packets_out),
            dropped_queue_full: get(&c.dropped_queue_full),
            dropped_malformed: get(&c.dropped_malformed),
            dropped_no_listener: get(&c.dropped_no_listener),
            dropped_no_connection: get(&c.dropped_no_connection),
            dropped_bad_segment: get(&c.dropped_bad_segment),
            tcp_retransmits: get(&c.tcp_retransmits),
            tcp_timeouts: get(&c.tcp_timeouts),
            tcp_loss_probes: get(&c.tcp_loss_probes),
            tcp_recoveries: get(&c.tcp_recoveries),
            dropped_backlog: get(&c.dropped_backlog),
            tcp_connections: st.live as u64,
            tcp_buffer_bytes: st.buffered as u64,
        }
    }

    /// See [`NetStack::socket_count`](super::NetStack::socket_count).
    pub fn socket_count(&self) -> usize {
        self.lock().live
    }

    /// Hands back spent inbound buffers and, if the device has nothing left,
    /// takes the whole inbound queue. Returns whether packets are waiting.
    fn refill(&self, dev: &mut Device) -> bool {
        let mut inbound = self.lock_inbound();
        let keep = self.limits.inbound_queue.min(SPARE_RX_BUFFERS);
        let room = keep.saturating_sub(inbound.free.len());
        let n = dev.rx_done.len().min(room);
        inbound.free.extend(dev.rx_done.drain(..n));
        dev.rx_done.clear();
        if dev.rx.is_empty() && !inbound.queue.is_empty() {
            std::mem::swap(&mut inbound.queue, &mut dev.rx);
        }
        !dev.rx.is_empty()
    }

    /// Hands emitted packets to the sink (without the state lock).
    fn flush(&self, dev: &mut Device, sink: &dyn PacketSink) {
        let n = dev.outbox.len();
        if n == 0 {
            return;
        }
        for (buf, len) in dev.outbox.drain(..) {
            sink.send(&buf[..len]);
            if dev.tx_free.len() < SPARE_TX_BUFFERS {
                dev.tx_free.push(buf);
            }
        }
        sink.flush();
        self.counters
            .packets_out
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Runs rounds until the stack is idle or the round budget is spent.
    pub fn pump(self: &Arc<Self>, dev: &mut Device, sink: &dyn PacketSink) -> Pump {
        for _ in 0..ROUNDS_PER_PUMP {
            self.refill(dev);
            let mut st = self.lock();
            if st.closed {
                return Pump::Idle(None);
            }
            let now = self.now();
            st.fire_timers(now);
            st.ingress(self, dev, now);
            st.egress(self, dev, now, EGRESS_BUDGET);
            let idle = dev.rx.is_empty() && st.dirty.is_empty();
            let delay = if idle { Some(st.next_timer(now)) } else { None };
            drop(st);
            self.flush(dev, sink);
            if let Some(delay) = delay {
                if !self.refill(dev) {
                    return Pump::Idle(delay);
                }
            }
        }
        Pump::Busy
    }

    /// Final round on shutdown: abort everything, reset peers, refuse
    /// further work.
    fn finish(self: &Arc<Self>, dev: &mut Device, sink: &dyn PacketSink) {
        {
            let mut inbound = self.lock_inbound();
            inbound.closed = true;
            inbound.queue.clear();
            inbound.held.clear();
        }
        dev.rx.clear();
        let mut st = self.lock();
        if st.closed {
            return;
        }
        // Accepts see their channel close; queued streams fail on first use.
        st.listeners.clear();
        for slot in 0..st.conns.len() {
            if let Some(conn) = st.conns[slot].as_mut() {
                conn.socket.abort();
                let id = conn.id;
                st.mark(slot, id);
            }
        }
        let now = self.now();
        st.egress(self, dev, now, usize::MAX);
        for slot in 0..st.conns.len() {
            if matches!(&st.conns[slot], Some(c) if c.role != Role::Stream) {
                st.remove(slot);
            }
        }
        st.closed = true;
        drop(st);
        self.flush(dev, sink);
        debug!("netstack: stopped");
    }
}

/// The stack's task.
pub(super) async fn run(shared: Arc<Shared>, sink: Arc<dyn PacketSink>) {
    let mut dev = Device::new(shared.limits.mtu);
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    loop {
        if shared.stop.is_cancelled() {
            break;
        }
        let delay = match shared.pump(&mut dev, &*sink) {
            Pump::Busy => {
                tokio::task::yield_now().await;
                continue;
            }
            Pump::Idle(delay) => delay,
        };
        if let Some(d) = delay {
            sleep.as_mut().reset(tokio::time::Instant::now() + d);
        }
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = &mut sleep, if delay.is_some() => {}
        }
    }
    shared.finish(&mut dev, &*sink);
}

fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

impl State {
    fn conn(&mut self, slot: usize, id: u64) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot)
            .and_then(Option::as_mut)
            .filter(|c| c.id == id)
    }

    /// The socket of the connection (slot, id), if it still exists.
    pub fn socket(&mut self, slot: usize, id: u64) -> Option<&mut Socket> {
        self.conn(slot, id).map(|c| &mut c.socket)
    }

    /// Queues a connection for polling (the caller wakes the task).
    pub fn mark(&mut self, slot: usize, id: u64) {
        if let Some(conn) = self.conn(slot, id) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push_back((slot, id));
            }
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn insert(
        &mut self,
        socket: Socket,
        role: Role,
        tuple: (SocketAddr, SocketAddr),
        port: Option<(IpAddr, u16)>,
    ) -> (usize, u64) {
        let id = self.take_id();
        let conn = Conn {
            id,
            socket,
            role,
            tuple,
            port,
            dirty: false,
            timer: None,
            reported: tcp::Stats::default(),
            reported_alloc: 0,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.conns[slot] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.by_tuple.insert(tuple, slot);
        if let Some(port) = port {
            self.ports.insert(port);
        }
        self.live += 1;
        (slot, id)
    }

    /// Forgets a connection and everything recorded about it.
    fn remove(&mut self, slot: usize) -> Option<Conn> {
        let conn = self.conns.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.live -= 1;
        self.buffered -= conn.reported_alloc;
        if self.by_tuple.get(&conn.tuple) == Some(&slot) {
            self.by_tuple.remove(&conn.tuple);
        }
        if let Some(port) = conn.port {
            self.ports.remove(&port);
        }
        if let Role::Pending { port, listener } = conn.role {
            if let Some(l) = self.listener_mut(port, listener) {
                l.half_open = l.half_open.saturating_sub(1);
            }
        }
        Some(conn)
    }

    fn listener_mut(&mut self, port: u16, id: u64) -> Option<&mut Listener> {
        self.listeners
            .get_mut(&port)?
            .iter_mut()
            .find(|l| l.id == id)
    }

    /// Is (ip, port) taken, counting listeners on the unspecified address?
    fn port_taken(&self, ip: IpAddr, port: u16) -> bool {
        if ip.is_unspecified() {
            self.ports
                .iter()
                .any(|(a, p)| *p == port && a.is_ipv4() == ip.is_ipv4())
        } else {
            self.ports.contains(&(ip, port)) || self.ports.contains(&(unspecified(ip), port))
        }
    }

    /// The next free ephemeral port of `ip`, sequentially.
    fn free_port(&mut self, ip: IpAddr) -> Result<u16, NetError> {
        let mut next = *self.next_port.get(&ip).unwrap_or(&EPHEMERAL_FIRST);
        for _ in 0..EPHEMERAL_COUNT {
            let port = next;
            next = if port == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                port + 1
            };
            if !self.port_taken(ip, port) {
                self.next_port.insert(ip, next);
                return Ok(port);
            }
        }
        Err(NetError::NoFreePort(ip))
    }

    /// Registers a listener. `addr` was checked against the stack's
    /// addresses by the caller.
    pub fn add_listener(
        &mut self,
        addr: SocketAddr,
        backlog: usize,
    ) -> Result<(u64, SocketAddr, mpsc::Receiver<NetTcpStream>), NetError> {
        if self.closed {
            return Err(NetError::Closed);
        }
        let ip = addr.ip();
        let port = match addr.port() {
            0 => self.free_port(ip)?,
            p => p,
        };
        let local = SocketAddr::new(ip, port);
        if self.port_taken(ip, port) {
            return Err(NetError::AddrInUse(local));
        }
        let (tx, rx) = mpsc::channel(backlog);
        let id = self.take_id();
        self.ports.insert((ip, port));
        self.listeners.entry(port).or_default().push(Listener {
            id,
            addr: ip,
            accept: tx,
            half_open: 0,
        });
        Ok((id, local, rx))
    }

    /// Registers a transparent listener of one family: under port 0, which
    /// no real connection uses, so [`State::route`] finds it after the
    /// port's own listeners.
    pub fn add_transparent_listener(
        &mut self,
        ipv6: bool,
        backlog: usize,
    ) -> Result<(u64, SocketAddr, mpsc::Receiver<NetTcpStream>), NetError> {
        if self.closed {
            return Err(NetError::Closed);
        }
        let ip: IpAddr = if ipv6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let local = SocketAddr::new(ip, TRANSPARENT_PORT);
        if self.ports.contains(&(ip, TRANSPARENT_PORT)) {
            return Err(NetError::AddrInUse(local));
        }
        let (tx, rx) = mpsc::channel(backlog);
        let id = self.take_id();
        self.ports.insert((ip, TRANSPARENT_PORT));
        self.listeners
            .entry(TRANSPARENT_PORT)
            .or_default()
            .push(Listener {
                id,
                addr: ip,
                accept: tx,
                half_open: 0,
            });
        Ok((id, local, rx))
    }

    /// Stops a listener; its half-open connections are reset.
    pub fn remove_listener(&mut self, local: SocketAddr, id: u64) {
        let port = local.port();
        let Some(list) = self.listeners.get_mut(&port) else {
            return;
        };
        let Some(i) = list.iter().position(|l| l.id == id) else {
            return;
        };
        let listener = list.swap_remove(i);
        if list.is_empty() {
            self.listeners.remove(&port);
        }
        self.ports.remove(&(listener.addr, port));
        if listener.half_open == 0 {
            return;
        }
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            if conn.role == (Role::Pending { port, listener: id }) {
                conn.role = Role::Orphan;
                conn.socket.abort();
                let id = conn.id;
                self.mark(slot, id);
            }
        }
    }

    /// Starts an active open from `src`; the caller waits for the handshake.
    pub fn start_connect(
        &mut self,
        shared: &Shared,
        src: IpAddr,
        dst: SocketAddr,
    ) -> Result<(usize, u64, SocketAddr), NetError> {
        if self.closed {
            return Err(NetError::Closed);
        }
        let mut port = self.free_port(src)?;
        // A passive connection may still hold this exact 4-tuple (its
        // listener's port was freed since); take the next port then.
        for _ in 0..EPHEMERAL_COUNT {
            if !self
                .by_tuple
                .contains_key(&(SocketAddr::new(src, port), dst))
            {
                break;
            }
            port = self.free_port(src)?;
        }
        let local = SocketAddr::new(src, port);
        let now = shared.now();
        let iss = self.iss(local, dst, now);
        let mut socket = Socket::connect(shared.limits.socket_config(), local, dst, iss, now);
        // Opened under memory pressure: a small window from the start.
        socket.set_memory_pressure(self.buffered > shared.limits.tcp_memory);
        socket.set_timeout(shared.limits.stream_timeout(false));
        let (slot, id) = self.insert(socket, Role::Stream, (local, dst), Some((src, port)));
        self.mark(slot, id);
        Ok((slot, id, local))
    }

    /// A stream let go of its connection: close it (reset if received data
    /// would be lost, as a kernel does); it is reaped once closed.
    pub fn release(&mut self, slot: usize, id: u64, timeout: Duration) {
        let closed = self.closed;
        let Some(conn) = self.conn(slot, id) else {
            return;
        };
        let socket = &mut conn.socket;
        if closed || socket.is_done() {
            self.remove(slot);
            return;
        }
        if socket.can_recv() {
            socket.abort();
        } else {
            socket.close();
        }
        socket.set_timeout(Some(timeout));
        conn.role = Role::Orphan;
        self.mark(slot, id);
    }

    /// A fresh initial sequence number for a connection (RFC 6528: a
    /// keyed hash of the 4-tuple plus a 4 µs clock).
    fn iss(&self, local: SocketAddr, remote: SocketAddr, now: Instant) -> Seq {
        let mut h = self.iss_key.build_hasher();
        std::hash::Hash::hash(&(local, remote), &mut h);
        let clock = (now.duration_since(self.clock_base).as_micros() / 4) as u32;
        Seq((h.finish() as u32).wrapping_add(clock))
    }

    /// Feeds up to [`INGRESS_BUDGET`] queued packets to their connections
    /// (or to smoltcp, for ICMP and resets).
    fn ingress(&mut self, shared: &Shared, dev: &mut Device, now: Instant) {
        for _ in 0..INGRESS_BUDGET {
            let Some(pkt) = dev.rx.front() else {
                return;
            };
            let seg = packet::peek_tcp(pkt);
            let target = match &seg {
                Some(seg) => self.route(shared, seg, pkt, now),
                None => Target::Stray,
            };
            match target {
                Target::Drop => dev.skip_rx(),
                Target::Stray => {
                    let now = shared.smol(now);
                    self.iface.poll_ingress_single(now, dev, &mut self.stray);
                }
                Target::Conn(slot) => {
                    let peek = seg.unwrap_or_else(|| unreachable!("only TCP goes to a connection"));
                    let parsed =
                        wire::parse(peek.src.ip(), peek.dst.ip(), &pkt[peek.offset..peek.end]);
                    match (parsed, self.conns[slot].as_mut()) {
                        (Ok(segment), Some(conn)) => {
                            conn.socket.handle(now, &segment);
                            let id = conn.id;
                            self.mark(slot, id);
                        }
                        (Err(_), _) => bump(&shared.counters.dropped_bad_segment),
                        (_, None) => {}
                    }
                    dev.skip_rx();
                }
            }
        }
    }

    /// Picks the connection for a TCP segment; a SYN to a listener gets a
    /// new connection first.
    fn route(&mut self, shared: &Shared, seg: &TcpPeek, pkt: &[u8], now: Instant) -> Target {
        if let Some(&slot) = self.by_tuple.get(&(seg.dst, seg.src)) {
            return Target::Conn(slot);
        }
        if !seg.is_syn() {
            // No connection: smoltcp answers with a reset.
            bump(&shared.counters.dropped_no_connection);
            return Target::Stray;
        }
        let backlog = shared.limits.backlog;
        let own = self.iface.has_ip_addr(seg.dst.ip());
        let port = seg.dst.port();
        // The port's own listener on one of our addresses, else a
        // transparent one of the family (any address, any port).
        let key = match self.listeners.get(&port) {
            Some(list) if own && list.iter().any(|l| l.matches(seg.dst.ip())) => port,
            _ if port != TRANSPARENT_PORT => TRANSPARENT_PORT,
            _ => port,
        };
        let found = self
            .listeners
            .get_mut(&key)
            .and_then(|list| list.iter_mut().find(|l| l.matches(seg.dst.ip())));
        let Some(listener) = found else {
            bump(&shared.counters.dropped_no_listener);
            return Target::Stray;
        };
        if listener.half_open >= backlog {
            // The peer retries; by then a slot may be free.
            bump(&shared.counters.dropped_backlog);
            return Target::Drop;
        }
        if !own && key != TRANSPARENT_PORT {
            return Target::Stray;
        }
        let Ok(syn) = wire::parse(seg.src.ip(), seg.dst.ip(), &pkt[seg.offset..seg.end]) else {
            bump(&shared.counters.dropped_bad_segment);
            return Target::Drop;
        };
        listener.half_open += 1;
        let role = Role::Pending {
            port: key,
            listener: listener.id,
        };
        let iss = self.iss(seg.dst, seg.src, now);
        let mut socket = Socket::accept(shared.limits.socket_config(), &syn, iss, now);
        socket.set_memory_pressure(self.buffered > shared.limits.tcp_memory);
        // Bounds the handshake; replaced once accepted.
        socket.set_timeout(Some(shared.limits.tcp_timeout));
        let (slot, id) = self.insert(socket, role, (seg.dst, seg.src), None);
        self.mark(slot, id);
        // The SYN is consumed by the new socket.
        Target::Drop
    }

    /// Lets the dirty connections transmit, until all are done or `budget`
    /// packets wait in the outbox.
    fn egress(&mut self, shared: &Arc<Shared>, dev: &mut Device, now: Instant, budget: usize) {
        while let Some((slot, id)) = self.dirty.pop_front() {
            let Some(conn) = self
                .conns
                .get_mut(slot)
                .and_then(Option::as_mut)
                .filter(|c| c.id == id)
            else {
                continue;
            };
            conn.dirty = false;
            loop {
                if dev.outbox.len() >= budget {
                    // Its turn again after the others.
                    conn.dirty = true;
                    self.dirty.push_back((slot, id));
                    return;
                }
                let mut buf = dev.tx_free.pop().unwrap_or_default();
                buf.clear();
                if !conn.socket.poll_transmit(now, &mut buf) {
                    dev.tx_free.push(buf);
                    break;
                }
                let len = buf.len();
                dev.outbox.push((buf, len));
            }
            self.settle(shared, slot, now);
        }
    }

    /// After a poll: hand over finished handshakes, reap closed orphans,
    /// keep the timeout policy, and schedule the connection's next timer.
    fn settle(&mut self, shared: &Arc<Shared>, slot: usize, now: Instant) {
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        let stats = conn.socket.stats();
        if stats != conn.reported {
            let c = &shared.counters;
            let r = conn.reported;
            c.tcp_retransmits
                .fetch_add(stats.retransmits - r.retransmits, Ordering::Relaxed);
            c.tcp_timeouts
                .fetch_add(stats.timeouts - r.timeouts, Ordering::Relaxed);
            c.tcp_loss_probes
                .fetch_add(stats.probes - r.probes, Ordering::Relaxed);
            c.tcp_recoveries
                .fetch_add(stats.recoveries - r.recoveries, Ordering::Relaxed);
            conn.reported = stats;
        }
        let alloc = conn.socket.allocated();
        if alloc != conn.reported_alloc {
            self.buffered = self.buffered + alloc - conn.reported_alloc;
            conn.reported_alloc = alloc;
        }
        conn.socket
            .set_memory_pressure(self.buffered > shared.limits.tcp_memory);
        let id = conn.id;
        match conn.role {
            Role::Pending { port, listener } => match conn.socket.state() {
                tcp::State::SynReceived => {}
                tcp::State::Established | tcp::State::CloseWait => {
                    if let Some(l) = self.listener_mut(port, listener) {
                        l.half_open = l.half_open.saturating_sub(1);
                    }
                    self.deliver(shared, slot, port, listener);
                }
                _ => {
                    self.remove(slot);
                    return;
                }
            },
            Role::Orphan => {
                let socket = &mut conn.socket;
                if socket.is_done() {
                    self.remove(slot);
                    return;
                }
                if socket.can_recv() && socket.state() != tcp::State::Closed {
                    // Data for a stream nobody reads: reset, like a kernel.
                    socket.abort();
                    self.mark(slot, id);
                    return;
                }
            }
            Role::Stream => {
                let limits = shared.limits;
                let socket = &mut conn.socket;
                if socket.is_active() {
                    let want = limits.stream_timeout(socket.send_queue() > 0);
                    if socket.timeout() != want {
                        socket.set_timeout(want);
                    }
                }
            }
        }
        self.schedule(slot, now);
    }

    /// Queues a finished handshake on its listener (or resets it if the
    /// listener is gone or full).
    fn deliver(&mut self, shared: &Arc<Shared>, slot: usize, port: u16, listener: u64) {
        let limits = shared.limits;
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        conn.role = Role::Stream;
        let id = conn.id;
        let (local, peer) = conn.tuple;
        conn.socket.set_timeout(limits.stream_timeout(false));
        let stream = NetTcpStream::attach(shared.clone(), slot, id, local, peer);
        let sent = match self.listener_mut(port, listener) {
            Some(l) => l.accept.try_send(stream).map_err(|e| e.into_inner()),
            None => Err(stream),
        };
        if let Err(stream) = sent {
            // Accept queue full, or the listener is going away.
            stream.detach();
            bump(&shared.counters.dropped_backlog);
            if let Some(conn) = self.conns[slot].as_mut() {
                conn.role = Role::Orphan;
                conn.socket.abort();
            }
            self.mark(slot, id);
        }
    }

    /// Queues the connection's next timer, if earlier than the one already
    /// queued.
    fn schedule(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        let Some(at) = conn.socket.poll_at() else {
            return;
        };
        let at = at.max(now + MIN_TIMER);
        if conn.timer.is_none_or(|t| at < t) {
            conn.timer = Some(at);
            self.timers.push(Reverse((at, slot, conn.id)));
        }
    }

    /// Marks connections whose timer is due.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, slot, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(conn) = self.conn(slot, id) {
                if conn.timer == Some(at) {
                    conn.timer = None;
                    self.mark(slot, id);
                }
            }
        }
    }

    /// How long until the earliest live timer.
    fn next_timer(&mut self, now: Instant) -> Option<Duration> {
        while let Some(Reverse((at, slot, id))) = self.timers.peek().copied() {
            match self.conn(slot, id) {
                Some(conn) if conn.timer == Some(at) => {
                    return Some(at.saturating_duration_since(now).max(MIN_TIMER));
                }
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }
}

#[cfg(test)]
impl Shared {
    /// Runs the stack synchronously until idle (tests drive it without a
    /// task).
    pub fn pump_until_idle(self: &Arc<Self>, dev: &mut Device, sink: &dyn PacketSink) {
        while let Pump::Busy = self.pump(dev, sink) {}
    }

    /// Listens without the async wrapper.
    pub fn listen_now(self: &Arc<Self>, addr: SocketAddr) -> mpsc::Receiver<NetTcpStream> {
        self.lock()
            .add_listener(addr, self.limits.backlog)
            .unwrap()
            .2
    }
}
