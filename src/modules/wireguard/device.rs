//! The driver of one WireGuard instance: its UDP socket, its engine (or the
//! vnet's stack it links to), the tasks that feed the protocol [`Core`],
//! and name lookups. Everything the protocol decides is in [`super::core`];
//! this file moves bytes and time.
//!
//! - The receive task drains the socket in UDP GRO batches, splits them,
//!   processes data and cookie replies at once, and passes handshake
//!   messages the core admitted to the handshake task through a bounded
//!   queue (more are dropped, counted `handshake_queue_full`), so their
//!   Diffie-Hellman work never delays data.
//! - What the engine emits in one batch leaves through [`Core::send_ip_held`]
//!   and [`Core::flush_held`] as one `sendmsg` with UDP GSO (up to 64
//!   datagrams), one by one where the kernel refuses GSO. Batching is where
//!   the throughput is: one system call per datagram each way cost most of
//!   a core.
//! - The timer task sleeps until [`Core::poll_at`] (an idle interface costs
//!   one wakeup every 5 s; activity ends the rest through [`Wire::wake`]),
//!   runs [`Core::tick`] and looks up the endpoint names it returns.
//! - A task that panics (a bug) is reported through [`Device::failed`];
//!   the module restarts the device.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::config::{routed_nets, WireGuardConfig};
use super::core::{Core, Lookup, Wire};
use super::port;
use super::replay::Tai64n;
use crate::core::engine::{self, EngineConfig, EngineError, EngineKind, IpEngine};
use crate::core::engine::{PacketSink, StackOwner};
use crate::core::metrics::{InstanceMetrics, Metrics};
use crate::core::net::resolve;
use crate::core::spine::flow::FlowTable;
use crate::core::spine::vnetstack::{Link, VnetStack};

/// How long one endpoint lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshake messages waiting for the handshake task; more are dropped
/// (counted `handshake_queue_full`) and their senders retry.
const HANDSHAKE_QUEUE: usize = 256;
/// Datagrams the receive task handles before it yields.
const RECV_BATCH: usize = 64;
/// Largest UDP datagram we read.
const MAX_DATAGRAM: usize = 65_535;
/// Room the core needs beyond the payload.
const BUF_LEN: usize = MAX_DATAGRAM + 256;

/// A thread's buffers for received datagrams and what decrypting them writes.
struct Scratch {
    rx: Vec<u8>,
    out: Vec<u8>,
}

thread_local! {
    /// Scratch buffers of the receive, handshake and timer tasks, per
    /// thread: never held across an `.await`.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        rx: vec![0u8; MAX_DATAGRAM],
        out: vec![0u8; BUF_LEN],
    });
}

/// What [`read_datagrams`] hands each datagram to.
pub(super) trait Datagrams {
    /// One datagram from `src`, read at `now`; `out` is decryption room.
    /// False ends the reading.
    fn datagram(&mut self, now: Instant, datagram: &[u8], src: SocketAddr, out: &mut [u8]) -> bool;
    /// The end of what one wakeup drained.
    fn batch_end(&mut self);
}

/// Reads `socket` until `cancel` (an instance's own, or a shared port's):
/// each wakeup drains what is there into the thread's scratch buffers (no
/// buffer per socket: an idle one holds none), a batch at a time so other
/// tasks get their turn, and splits UDP GRO batches into their datagrams.
pub(super) async fn read_datagrams(
    socket: &UdpSocket,
    cancel: &CancellationToken,
    to: &mut impl Datagrams,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.readable() => if let Err(e) = r {
                tracing::debug!(error = %e, "udp socket failed");
                return;
            },
        }
        for _ in 0..RECV_BATCH {
            let more = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let Scratch { rx, out } = &mut *scratch;
                let (n, src, segment) = match crate::core::net::datagram::try_recv_batch(socket, rx)
                {
                    Ok(x) => x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(false),
                    Err(e) => {
                        tracing::debug!(error = %e, "udp recv failed");
                        return Some(true);
                    }
                };
                let src = canonical(src);
                let now = Instant::now();
                // With GRO, several datagrams of one source in a row.
                for datagram in rx[..n].chunks(segment.unwrap_or(n).max(1)) {
                    if !to.datagram(now, datagram, src, out) {
                        return None;
                    }
                }
                Some(true)
            });
            match more {
                Some(true) => {}
                Some(false) => break,
                None => return,
            }
        }
        to.batch_end();
    }
}

/// A running WireGuard interface: the core and what drives it.
pub struct Device {
    core: Core,
    wire: Arc<UdpWire>,
    socket: Arc<UdpSocket>,
    net: Net,
    /// Handshake messages for the handshake task.
    handshakes: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    cancel: CancellationToken,
    /// Why a task of the running device panicked, once one did.
    failure: tokio::sync::watch::Sender<Option<String>>,
}

/// The real wire: the UDP socket (IPv4 mapped onto a dual-stack socket) and
/// the engine that holds the node's addresses.
struct UdpWire {
    socket: Arc<UdpSocket>,
    dual_stack: bool,
    net: OnceLock<Net>,
    /// UDP GSO works here (off after the first refusal).
    gso: AtomicBool,
    /// Ends the timer task's idle rest.
    wake: Notify,
    /// The instance's place on a shared port (`share_port`): session
    /// indices are drawn port-wide.
    shared: Option<port::Membership>,
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

    fn wake(&self) {
        self.wake.notify_one();
    }

    fn new_session(&self, taken: &HashSet<u32>) -> u32 {
        match &self.shared {
            // Port-wide unique, so never one of this instance's either.
            Some(m) => m.new_session(),
            None => super::core::random_session(taken),
        }
    }

    fn release_session(&self, session: u32) {
        if let Some(m) = &self.shared {
            m.release_session(session);
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
    /// Another instance sharing the port has the same key.
    #[error("UDP port {port} is shared with another instance that has the same private key: give each instance its own key")]
    SameKey {
        /// The shared port.
        port: u16,
    },
    /// The engine cannot start.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Hands packets from the engine to the device (cryptokey routing).
struct StackSink(Mutex<Weak<Device>>);

impl StackSink {
    fn device(&self) -> Option<Arc<Device>> {
        self.0.lock().expect("sink poisoned").upgrade()
    }
}

impl PacketSink for StackSink {
    fn send(&self, packet: &[u8]) {
        if let Some(dev) = self.device() {
            dev.core.send_ip_held(Instant::now(), packet);
        }
    }

    fn flush(&self) {
        if let Some(dev) = self.device() {
            dev.core.flush_held();
        }
    }
}

impl Device {
    /// Binds, starts the engine (or links to the vnet's stack) and the
    /// data plane tasks.
    /// `replay_floors` are the initiation timestamps of the device this
    /// one replaces ([`Core::replay_floors`]), empty for a first start.
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
        let (socket, dual_stack, shared) = if cfg.share_port {
            let public = cfg.public_key.0;
            let m = port::join(port, &public, &metrics).map_err(|e| match e {
                port::ShareError::Bind(source) => StartError::Bind { port, source },
                port::ShareError::Join(_) => StartError::SameKey { port },
            })?;
            (m.socket(), m.dual_stack(), Some(m))
        } else {
            let (socket, dual_stack) =
                bind_udp(port).map_err(|source| StartError::Bind { port, source })?;
            (Arc::new(socket), dual_stack, None)
        };
        let wire = Arc::new(UdpWire {
            socket: socket.clone(),
            dual_stack,
            net: OnceLock::new(),
            gso: AtomicBool::new(true),
            wake: Notify::new(),
            shared,
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
        let vnet = match &net {
            Net::Vnet(stack) => Some(stack.clone()),
            Net::Own(_) => None,
        };
        let core = Core::new(
            tenant,
            instance,
            &cfg,
            metrics,
            flows,
            instance_metrics,
            wire.clone(),
            vnet,
            Instant::now(),
        );
        let (handshakes, queue) = mpsc::channel(HANDSHAKE_QUEUE);
        let dev = Arc::new(Device {
            core,
            wire,
            socket,
            net: net.clone(),
            handshakes,
            cancel: CancellationToken::new(),
            failure: tokio::sync::watch::Sender::new(None),
        });
        *sink.0.lock().expect("sink poisoned") = Arc::downgrade(&dev);
        dev.core.inherit(replay_floors);
        dev.core.set_peers(&cfg.peers);
        if let Net::Vnet(stack) = &net {
            let link: Weak<dyn Link> = Arc::downgrade(&dev) as Weak<dyn Link>;
            stack.link(instance, routed_nets(&cfg.peers), link);
        }
        let mut tasks = tokio::task::JoinSet::new();
        match &dev.wire.shared {
            // The port's task reads and routes to us.
            Some(m) => m.attach(Arc::downgrade(&dev)),
            None => {
                tasks.spawn(dev.clone().recv_loop());
            }
        }
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

    /// The protocol state: its queries (`peer_status`, `replay_floors`,
    /// ...) and its reloads (`set_peers`).
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The UDP port the interface listens on.
    pub fn listen_port(&self) -> u16 {
        self.socket.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The engine holding the node's addresses.
    pub fn engine(&self) -> Option<Arc<dyn IpEngine>> {
        self.net.engine()
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

    /// Reports a bug met on the device's behalf (a panic on a shared
    /// port's task) as its own tasks' panics are: the module restarts it.
    pub(super) fn fail(&self, why: String) {
        self.cancel.cancel();
        if let Some(m) = &self.wire.shared {
            m.leave();
        }
        self.failure.send_replace(Some(why));
    }

    /// Stops the tasks and the engine, and leaves a shared port.
    pub fn shutdown(self: &Arc<Self>) {
        self.cancel.cancel();
        if let Some(m) = &self.wire.shared {
            m.leave();
        }
        match &self.net {
            Net::Own(e) => e.shutdown(),
            Net::Vnet(s) => {
                let me: Weak<dyn Link> = Arc::downgrade(self) as Weak<dyn Link>;
                s.unlink(self.core.instance(), &me);
            }
        }
        self.core.close();
    }

    /// One datagram from the socket (its own or a shared port's): data and
    /// cookie replies are processed at once, handshake messages the core
    /// admits go to [`Device::handshake_loop`].
    pub(super) fn receive(&self, now: Instant, datagram: &[u8], src: SocketAddr, out: &mut [u8]) {
        if !self.core.admit(now, datagram, src) {
            return;
        }
        if !Core::is_handshake(datagram) {
            self.core.process(now, datagram, src, out);
        } else if let Err(mpsc::error::TrySendError::Full(_)) =
            self.handshakes.try_send((datagram.to_vec(), src))
        {
            self.core.drop_datagram("handshake_queue_full");
        }
    }

    /// The end of a batch of received datagrams: the engine takes what it
    /// held back (coalesced segments).
    pub(super) fn flush_delivered(&self) {
        self.wire.flush_delivered();
    }

    /// Reads the instance's own socket.
    async fn recv_loop(self: Arc<Self>) {
        struct Own<'a>(&'a Device);
        impl Datagrams for Own<'_> {
            fn datagram(
                &mut self,
                now: Instant,
                d: &[u8],
                src: SocketAddr,
                out: &mut [u8],
            ) -> bool {
                self.0.receive(now, d, src, out);
                true
            }
            fn batch_end(&mut self) {
                // What the engine held back of this batch (coalesced segments).
                self.0.wire.flush_delivered();
            }
        }
        read_datagrams(&self.socket, &self.cancel, &mut Own(&self)).await
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
            SCRATCH.with(|s| {
                self.core
                    .process(Instant::now(), &datagram, src, &mut s.borrow_mut().out)
            });
            self.wire.flush_delivered();
        }
    }

    /// Runs the core's timers when it asks ([`Core::poll_at`]) and looks up
    /// the endpoint names it returns.
    async fn timer_loop(self: Arc<Self>) {
        loop {
            let at = self.core.poll_at(Instant::now());
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = self.wire.wake.notified() => {}
            }
            let lookups = SCRATCH.with(|s| self.core.tick(Instant::now(), &mut s.borrow_mut().out));
            for lookup in lookups {
                self.look_up(lookup);
            }
        }
    }

    /// Looks an endpoint name up on a task of its own and hands the answer
    /// to the core.
    fn look_up(self: &Arc<Self>, lookup: Lookup) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let answer = resolve::on_host(&lookup.endpoint.host, RESOLVE_TIMEOUT).await;
            let Some(dev) = weak.upgrade() else { return };
            match answer {
                Ok(ips) => {
                    if let Some(ip) = ips.first() {
                        let addr = SocketAddr::new(*ip, lookup.endpoint.port);
                        dev.core.resolved(&lookup, addr);
                    }
                }
                Err(e) => {
                    tracing::warn!(tenant = %dev.core.tenant(), instance = %dev.core.instance(), peer = %lookup.name, error = %e, "cannot resolve endpoint")
                }
            }
        });
    }
}

/// A link of its vnet's stack: what the stack sends to our peers.
impl Link for Device {
    fn send_ip(&self, packet: &[u8]) {
        self.core.send_ip_held(Instant::now(), packet)
    }

    fn flush(&self) {
        self.core.flush_held()
    }

    fn addresses_changed(&self, addresses: &[IpNet]) {
        self.core.addresses_changed(addresses)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Binds the UDP socket: dual-stack `[::]:port` where the host has IPv6,
/// else `0.0.0.0:port`.
pub(super) fn bind_udp(port: u16) -> std::io::Result<(UdpSocket, bool)> {
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

/// The text a panic carried.
pub(super) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
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
