//! A userspace TCP/IP stack for one virtual network: the `userspace` engine.
//!
//! A [`NetStack`] holds the node's VPN addresses and the TCP connections on
//! them. TCP is meshgate's own (`core::engine::tcp`: SACK, RACK-TLP, PRR,
//! CUBIC, pacing); a smoltcp [`Interface`](smoltcp::iface::Interface)
//! (medium IP, no sockets) answers what no connection takes: ICMP echo,
//! resets for unknown segments, ICMP errors. Packets come in through
//! [`NetStack::inject`] (the WireGuard module hands over what it decrypted)
//! and every packet the stack emits goes to a [`PacketSink`] (which encrypts
//! it for the right peer). On top of it, pipes listen with
//! [`NetStack::listen_tcp`] and dial with [`NetStack::connect_tcp`]; the
//! streams are tokio `AsyncRead`/`AsyncWrite`, so the core proxy joins them
//! like any other [`Stream::Io`](crate::core::net::proxy::Stream::Io). No root and
//! no TUN device are needed.
//!
//! # Threading
//!
//! One tokio task per stack owns the connections. They sit behind one
//! `std::sync::Mutex` that streams lock for a moment to copy bytes straight
//! between their caller's buffer and the socket's buffer; it is never held
//! across an `.await`, and the task takes it in short slices (at most 64
//! packets in and 64 out per hold), handing packets to the sink only after
//! releasing it. Inbound packets wait in a separate bounded queue, so
//! [`NetStack::inject`] never waits for the stack. The task sleeps until a
//! packet arrives, a stream has read, written or closed, or a TCP timer is
//! due; then it takes the whole inbound queue at once and runs until no
//! connection has anything more to send. Streams are woken exactly when data
//! or buffer space is there. Packet buffers are recycled: the steady state
//! allocates nothing per packet.
//!
//! Inbound segments are routed to their connection by a 4-tuple lookup, and
//! only connections with work (a packet, a stream call, a due timer from a
//! deadline heap) are polled, so the cost per packet stays flat as
//! connections grow. Measured (release, 2 cores, two stacks back to back,
//! no WireGuard): 14-16 Gbit/s one way, with or without 1000 idle
//! connections open.
//!
//! # TCP
//!
//! Every connection may buffer `tcp_buffer` bytes each way (window scaling
//! follows from the size; memory is taken as bytes wait),
//! SACK, timestamps, CUBIC with pacing, no Nagle, no keep-alive unless
//! configured, and a dead-peer timeout ([`NetStackConfig::tcp_timeout`]).
//! The stack looks at each inbound SYN and gives it a new connection: every
//! SYN to a listened address finds one, up to
//! [`NetStackConfig::listen_backlog`] half-open connections per listener
//! (further SYNs are dropped and counted; the peer retries). Established
//! connections queue for [`NetTcpListener::accept`]. SYNs to a port nobody
//! listens on are answered with a reset. A dropped stream closes gracefully
//! (FIN), or with a reset if received data was left unread, and the stack
//! reaps the connection once closed (TIME-WAIT is skipped: nobody owns the
//! connection any more) or timed out; [`NetStack::socket_count`] is zero
//! again once all connections have ended.
//!
//! # Limits
//!
//! - Memory: a connection holds what waits in it: received bytes its reader
//!   has not taken (up to the window offered, which grows with the
//!   path towards `tcp_buffer`, 16 MiB by default) and sent bytes
//!   not yet acknowledged plus what the writer queued (up to twice the
//!   congestion window, at most `tcp_buffer`). A bulk transfer across a
//!   long, fast path uses megabytes; a second after it goes quiet, a
//!   connection gives its buffers back.
//! - At most [`MAX_ADDRESSES`] addresses per stack (smoltcp's compile-time
//!   limit; one IPv4 and one IPv6 address is the usual case).
//! - No IP fragment reassembly: fragmented packets are dropped (WireGuard
//!   peers use the tunnel MTU, and TCP does not fragment).
//! - Receiving in batches, the stack acknowledges a busy connection once per
//!   batch of up to 64 segments (as GRO does), not every second segment;
//!   out-of-order data is acknowledged at once, with SACK blocks.
//! - A connection to one of the stack's own addresses is not looped back;
//!   it leaves through the sink like any other.
//! - UDP ([`NetStack::bind_udp`]) bypasses smoltcp: datagrams for a bound
//!   port are queued for their socket; UDP to other ports is answered with
//!   ICMP port unreachable. Datagrams larger than the MTU are refused, not
//!   fragmented.
//!
//! # Layout
//!
//! - `packet`: header checks and the TCP peek on raw packets (sans-IO).
//! - `device`: the smoltcp phy device (for the ICMP and reset path), queues
//!   of recycled packet buffers.
//! - `stack`: the shared state, the per-round logic and the task.
//! - `tcp`: [`NetTcpListener`] and [`NetTcpStream`].
//! - `udp`: [`NetUdpSocket`] and the table of bound ports.
//! - [`metrics`]: the engine's counters under `meshgate_netstack_`.

mod device;
pub mod metrics;
mod packet;
mod stack;
mod tcp;
#[cfg(test)]
mod tests;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use stack::Shared;

/// What the stack's door makes of a raw packet before smoltcp sees it:
/// whether it is accepted, and whether it is a TCP SYN. For fuzzing the
/// packet parser; never panics.
pub fn inspect_packet(packet: &[u8]) -> (bool, bool) {
    let ok = packet::check(packet).is_ok();
    let syn = packet::peek_tcp(packet).is_some_and(|t| t.is_syn());
    (ok, syn)
}
pub use tcp::{NetTcpListener, NetTcpStream};
pub use udp::{NetUdpSocket, NetUdpTransparent};

/// The most addresses one stack can hold (smoltcp's `iface-max-addr-count`).
pub const MAX_ADDRESSES: usize = 2;

pub use super::PacketSink;

/// How a [`NetStack`] is built. [`NetStackConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct NetStackConfig {
    /// The node's addresses with their prefix, e.g. `10.192.0.1/24` (IPv4
    /// and/or IPv6). The prefix picks the source address for a dial: the one
    /// whose network contains the destination, else the first of the family.
    /// Non-unicast addresses and those beyond [`MAX_ADDRESSES`] are ignored
    /// (with a warning); [`NetStack::addresses`] says which are in use.
    pub addresses: Vec<IpNet>,
    /// IP MTU of the virtual link. Default 1420 (WireGuard's); clamped to
    /// 576..=65535.
    pub mtu: usize,
    /// The most each TCP connection buffers to receive and to send, in
    /// bytes. The receive window offered starts at 1 MiB and doubles while
    /// the sender fills half of it each round trip, up to this; memory is
    /// taken as bytes wait, not up front (the receive ring grows only when
    /// the reader lags, the send queue is held to twice the congestion
    /// window) and given back after a second of quiet. Default 16 MiB (a
    /// 1 Gbit/s path with 60 ms of RTT, with BBR's headroom); clamped to
    /// 4 KiB..=256 MiB.
    pub tcp_buffer: usize,
    /// Packets queued into the stack before [`NetStack::inject`] drops.
    /// Default 4096. Packets over `mtu` are refused, so the queue holds at
    /// most `inbound_queue × mtu` bytes (about 6 MiB by default).
    pub inbound_queue: usize,
    /// Per listener: the most half-open connections, and the most
    /// established connections waiting for [`NetTcpListener::accept`].
    /// Default 1024.
    pub listen_backlog: usize,
    /// The most buffer memory all TCP connections of the stack may hold
    /// before their windows stop growing and writers may queue only
    /// 256 KiB each (as Linux's `tcp_mem` pressure). Default 256 MiB.
    pub tcp_memory: usize,
    /// TCP keep-alive interval. Default `None` (off).
    pub keep_alive: Option<Duration>,
    /// TCP congestion control. Default BBR (random loss on the path is not
    /// taken for congestion); CUBIC on request.
    pub congestion: crate::core::engine::tcp::cc::Algorithm,
    /// A connection is aborted when its peer has been silent this long while
    /// we wait for it: during an incoming handshake, while sent data is
    /// unacknowledged, after the stream was dropped (closing), and, with
    /// keep-alive on, at any time. Idle connections without keep-alive stay
    /// open; outgoing handshakes use the connect timeout. Default 60 s; at
    /// least 1 s, and at least twice `keep_alive`.
    pub tcp_timeout: Duration,
}

impl NetStackConfig {
    /// The defaults for these addresses.
    pub fn new(addresses: Vec<IpNet>) -> Self {
        NetStackConfig {
            addresses,
            mtu: 1420,
            tcp_buffer: 16 << 20,
            inbound_queue: 4096,
            listen_backlog: 1024,
            tcp_memory: 256 << 20,
            keep_alive: None,
            congestion: Default::default(),
            tcp_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a stack operation failed. Messages name the address involved.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The peer answered the SYN with a reset: nothing listens there.
    #[error("connection refused by {0}")]
    Refused(SocketAddr),
    /// No answer to the SYN within the connect timeout.
    #[error("no answer from {0} within the connect timeout")]
    Timeout(SocketAddr),
    /// Another listener or connection already uses this address and port.
    #[error("{0} is already in use on this virtual network")]
    AddrInUse(SocketAddr),
    /// The stack has no address of the destination's family to send from.
    #[error("cannot reach {0}: this virtual network has no address of that IP family")]
    NoSourceAddress(SocketAddr),
    /// Listening on an address that is not one of the stack's.
    #[error("{0} is not an address of this virtual network")]
    NotLocal(SocketAddr),
    /// A destination that cannot be dialed (unspecified, multicast, port 0).
    #[error("{0} is not a valid destination")]
    InvalidAddress(SocketAddr),
    /// Every ephemeral port of this source address is taken.
    #[error("no free local port on {0} (all of 49152-65535 in use)")]
    NoFreePort(IpAddr),
    /// The stack was shut down.
    #[error("the virtual network's IP stack is shut down")]
    Closed,
}

/// Counters of one stack, read with [`NetStack::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStackStats {
    /// Packets accepted by [`NetStack::inject`].
    pub packets_in: u64,
    /// Packets handed to the [`PacketSink`].
    pub packets_out: u64,
    /// Packets [`NetStack::inject`] dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Packets [`NetStack::inject`] dropped as not IP, truncated, over the
    /// MTU, or from a source address no peer can have (unspecified,
    /// multicast, broadcast).
    pub dropped_malformed: u64,
    /// SYNs to a port nobody listens on (answered with a reset).
    pub dropped_no_listener: u64,
    /// Other TCP segments that match no connection (answered with a reset,
    /// unless they are resets): late packets of closed connections, scans.
    pub dropped_no_connection: u64,
    /// TCP segments with a bad checksum or header, dropped after
    /// [`NetStack::inject`] accepted the packet.
    pub dropped_bad_segment: u64,
    /// SYNs dropped because the listener had `listen_backlog` half-open
    /// connections, plus connections reset because its accept queue was full.
    pub dropped_backlog: u64,
    /// TCP connections open now (handshaking, established or closing).
    pub tcp_connections: u64,
    /// Segments retransmitted (fast recovery, timeouts, probes).
    pub tcp_retransmits: u64,
    /// Retransmission timeouts.
    pub tcp_timeouts: u64,
    /// Tail loss probes sent.
    pub tcp_loss_probes: u64,
    /// Fast recoveries entered (losses found by SACK and time).
    pub tcp_recoveries: u64,
    /// Buffer memory the TCP connections hold now, bytes.
    pub tcp_buffer_bytes: u64,
}

/// A cheap handle to one running stack; clones share it.
///
/// The stack's task stops on [`NetStack::shutdown`] or when the last handle
/// is dropped; listeners and streams alone do not keep it running.
#[derive(Clone)]
pub struct NetStack {
    owner: Arc<Owner>,
}

/// Stops the task when the last [`NetStack`] clone goes.
struct Owner {
    shared: Arc<Shared>,
    /// Where UDP sockets send (the stack's own output).
    sink: Arc<dyn PacketSink>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl NetStack {
    /// Builds the stack and starts its task on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(cfg: NetStackConfig, sink: Arc<dyn PacketSink>) -> NetStack {
        let shared = Shared::new(cfg);
        tokio::spawn(stack::run(shared.clone(), sink.clone()));
        NetStack {
            owner: Arc::new(Owner { shared, sink }),
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    /// Queues one IP packet into the stack. Never blocks. Returns `false`
    /// (and counts it) if the queue is full, the packet is not a well-formed
    /// IP packet, or the stack is shut down.
    pub fn inject(&self, packet: &[u8]) -> bool {
        self.shared().inject(packet)
    }

    /// Listens for TCP connections on `addr`: one of the stack's addresses,
    /// or the unspecified address of a family for all of that family's
    /// addresses. Port 0 picks a free port ([`NetTcpListener::local_addr`]).
    /// Dropping the listener stops listening.
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<NetTcpListener, NetError> {
        tcp::listen(self.shared(), addr)
    }

    /// Listens for TCP connections to any address and port of one family
    /// that no other listener takes: what a TPROXY rule gives a kernel
    /// socket, for a stack that is a namespace's only way out (`kind:
    /// netns`). Accepted streams' [`NetTcpStream::local_addr`] is the
    /// address the client dialed. [`NetTcpListener::local_addr`] is the
    /// family's unspecified address with port 0. One per family.
    pub fn listen_transparent(&self, ipv6: bool) -> Result<NetTcpListener, NetError> {
        tcp::listen_transparent(self.shared(), ipv6)
    }

    /// Opens a TCP connection to `dst` from the stack's address of the same
    /// family (preferring one whose prefix contains `dst`) and an ephemeral
    /// port. Fails with [`NetError::Refused`] on a reset,
    /// [`NetError::Timeout`] after `timeout`, [`NetError::NoSourceAddress`]
    /// without an address of that family.
    pub async fn connect_tcp(
        &self,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<NetTcpStream, NetError> {
        tcp::connect(self.shared(), dst, timeout).await
    }

    /// Binds a UDP socket on `local` (one of the stack's addresses or the
    /// unspecified address of a family; port 0 picks one).
    pub fn bind_udp(&self, local: SocketAddr) -> std::io::Result<NetUdpSocket> {
        udp::bind(self.shared(), self.owner.sink.clone(), local)
    }

    /// Takes every UDP datagram no bound socket takes, to any address
    /// ([`NetUdpTransparent`]; one per stack, `AddrInUse` for a second).
    pub fn transparent_udp(&self) -> std::io::Result<NetUdpTransparent> {
        udp::transparent(self.shared(), self.owner.sink.clone())
    }

    /// The addresses in use (see [`NetStackConfig::addresses`]).
    pub fn addresses(&self) -> &[IpNet] {
        &self.shared().addresses
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NetStackStats {
        self.shared().stats()
    }

    /// TCP connections the stack holds in any state (handshaking, open,
    /// closing): each is one smoltcp socket. Zero again once all have
    /// closed; equal to [`NetStackStats::tcp_connections`].
    pub fn socket_count(&self) -> usize {
        self.shared().socket_count()
    }

    /// Stops the task. Open streams then fail with `ConnectionAborted`,
    /// pending accepts and connects with [`NetError::Closed`], and peers get
    /// a reset. Idempotent.
    pub fn shutdown(&self) {
        self.shared().stop.cancel();
    }
}

impl std::fmt::Debug for NetStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetStack")
            .field("addresses", &self.addresses())
            .finish_non_exhaustive()
    }
}

/// The userspace engine behind the one interface every on-ramp uses.
#[async_trait::async_trait]
impl super::IpEngine for NetStack {
    fn kind(&self) -> super::EngineKind {
        super::EngineKind::Userspace
    }

    fn inject(&self, packet: &[u8]) -> bool {
        self.shared().inject_held(packet)
    }

    fn flush(&self) {
        self.shared().end_batch();
    }

    fn addresses(&self) -> Vec<IpNet> {
        NetStack::addresses(self).to_vec()
    }

    async fn listen_tcp(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<Box<dyn crate::core::net::listen::StreamListener>> {
        use std::io::{Error, ErrorKind};
        let l = NetStack::listen_tcp(self, addr)
            .await
            .map_err(|e| match e {
                NetError::AddrInUse(_) => Error::new(ErrorKind::AddrInUse, e.to_string()),
                other => Error::new(ErrorKind::AddrNotAvailable, other.to_string()),
            })?;
        Ok(Box::new(l))
    }

    async fn connect_tcp(
        &self,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<crate::core::net::proxy::Stream, crate::core::net::dial::DialError> {
        use crate::core::net::dial::DialError;
        match NetStack::connect_tcp(self, dst, timeout).await {
            Ok(s) => Ok(crate::core::net::proxy::Stream::io(s)),
            Err(NetError::Refused(_)) => Err(DialError::Refused(dst.to_string())),
            Err(NetError::Timeout(_)) => Err(DialError::Timeout {
                target: dst.to_string(),
                timeout,
            }),
            Err(e) => Err(DialError::Io {
                target: dst.to_string(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    async fn bind_udp(
        &self,
        local: SocketAddr,
    ) -> std::io::Result<Arc<dyn crate::core::net::datagram::DatagramSocket>> {
        Ok(Arc::new(NetStack::bind_udp(self, local)?))
    }

    fn stats(&self) -> Option<NetStackStats> {
        Some(NetStack::stats(self))
    }

    fn shutdown(&self) {
        NetStack::shutdown(self)
    }
}
