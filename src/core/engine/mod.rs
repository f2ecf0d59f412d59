//! Engines: the data planes that carry a vnet's IP packets.
//!
//! A module that terminates a network (a WireGuard instance) starts one
//! engine with [`start`] and a [`PacketSink`] for what the engine sends; it
//! hands the engine every decrypted packet for the node's own addresses
//! ([`IpEngine::inject`]). Pipes and every other on-ramp listen and dial
//! through the [`IpEngine`] trait, whatever the engine:
//!
//! - [`userspace`] (default): a userspace TCP/IP stack per network, on
//!   meshgate's own TCP ([`tcp`]). No root, no TUN, no capability.
//! - [`kernel`]: a TUN device in an unnamed user + network namespace of its
//!   own, so the kernel's TCP (CUBIC/BBR, SACK, RACK, pacing) terminates the
//!   tunnelled connections. Needs user namespaces and access to
//!   `/dev/net/tun`; nothing on the host's network changes.
//!
//! A vnet says which engine carries it (`engine:`), else the node's
//! default (`engine:` in `meshgate.yaml`, `MESHGATE_NODE__ENGINE`).

pub mod kernel;
pub mod tcp;
pub mod userspace;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::core::net::dial::DialError;
use crate::core::net::listen::StreamListener;
use crate::core::net::proxy::Stream;

pub use userspace::NetStackStats;

/// Which data plane carries a vnet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// A userspace TCP/IP stack: no root, no TUN.
    #[default]
    Userspace,
    /// A TUN in an unnamed user + network namespace: the kernel's TCP.
    Kernel,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Userspace => "userspace",
            EngineKind::Kernel => "kernel",
        })
    }
}

/// Receives every IP packet an engine emits.
///
/// Called from the engine's task, one packet at a time. It must not block:
/// encrypt and `try_send`, or queue.
pub trait PacketSink: Send + Sync + 'static {
    /// Takes one IP packet (IPv4 or IPv6, no link header). The slice is only
    /// valid for the call. The sink may hold it back to send it with the
    /// rest of the batch.
    fn send(&self, packet: &[u8]);
    /// The end of a batch of [`PacketSink::send`] calls: send what is held
    /// back (several datagrams in one system call, where the sink can).
    fn flush(&self) {}
}

/// Keep-alive of tunnelled TCP connections unless configured.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// Dead-peer timeout of tunnelled TCP connections unless configured.
pub const DEFAULT_TCP_TIMEOUT: Duration = Duration::from_secs(90);

/// How an engine is built, whatever its kind.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The node's addresses in the network, with their prefix
    /// (`10.192.0.1/24`).
    pub addresses: Vec<IpNet>,
    /// IP MTU of the virtual link (1420 for WireGuard).
    pub mtu: usize,
    /// TCP keep-alive interval for tunnelled connections (`None`: off).
    pub keep_alive: Option<Duration>,
    /// A tunnelled connection whose peer is silent this long while data
    /// waits is aborted.
    pub tcp_timeout: Duration,
    /// The tunnelled connections' TCP congestion control. `kernel`: any
    /// the kernel has (`bbr`, `cubic`, ...), `None` for BBR where
    /// available; `userspace`: `bbr` (also for `None`) or `cubic`.
    pub congestion_control: Option<String>,
    /// `tenant/instance`, for logs and the helper's process title.
    pub label: String,
    /// Whose stack it is, for its counters in `/metrics`
    /// (`meshgate_netstack_*`); `None` reports nothing (tests).
    pub owner: Option<StackOwner>,
}

/// The owner of a stack, under whose labels its counters are reported.
#[derive(Clone)]
pub struct StackOwner {
    /// The node's metrics.
    pub metrics: Arc<crate::core::metrics::Metrics>,
    /// Tenant name.
    pub tenant: String,
    /// The instance owning the stack (a WireGuard instance, a vnet).
    pub instance: String,
}

impl std::fmt::Debug for StackOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.instance)
    }
}

/// Why an engine could not start. Each message says what is missing and
/// what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The kernel engine cannot run on this machine or as this user.
    #[error("engine `kernel`: {0}")]
    Kernel(String),
}

/// A running engine: one network's IP stack, as every on-ramp uses it.
#[async_trait]
pub trait IpEngine: Send + Sync + 'static {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
    /// Hands one IP packet for the node's addresses to the stack. Never
    /// blocks; `false` if it was dropped (queue full, malformed, stopped).
    /// The engine may hold it back to pass it on with the rest of the batch.
    fn inject(&self, packet: &[u8]) -> bool;
    /// The end of a batch of [`IpEngine::inject`] calls: pass on what is
    /// held back.
    fn flush(&self) {}
    /// The node's addresses in this network.
    fn addresses(&self) -> Vec<IpNet>;
    /// Listens for TCP on one of the addresses (or the unspecified address
    /// of a family). `AddrInUse` and `AddrNotAvailable` say why not.
    async fn listen_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn StreamListener>>;
    /// Opens a TCP connection to `dst` from the node's address.
    async fn connect_tcp(&self, dst: SocketAddr, timeout: Duration) -> Result<Stream, DialError>;
    /// Binds a UDP socket on `local`: one of the addresses, or the
    /// unspecified address of a family (port 0: any free port).
    async fn bind_udp(
        &self,
        local: SocketAddr,
    ) -> io::Result<Arc<dyn crate::core::net::datagram::DatagramSocket>>;
    /// The userspace stack's counters (`None` for engines that keep none).
    fn stats(&self) -> Option<NetStackStats>;
    /// Stops the engine: open connections end, the stack goes away.
    fn shutdown(&self);
}

/// Starts an engine of `kind` for `cfg`; every packet it sends goes to `sink`.
pub async fn start(
    kind: EngineKind,
    cfg: &EngineConfig,
    sink: Arc<dyn PacketSink>,
) -> Result<Arc<dyn IpEngine>, EngineError> {
    let engine = start_kind(kind, cfg, sink).await?;
    if let Some(o) = &cfg.owner {
        o.metrics
            .refreshed_subsystem::<userspace::metrics::NetStackMetrics>()
            .track(&o.tenant, &o.instance, &engine);
    }
    Ok(engine)
}

async fn start_kind(
    kind: EngineKind,
    cfg: &EngineConfig,
    sink: Arc<dyn PacketSink>,
) -> Result<Arc<dyn IpEngine>, EngineError> {
    match kind {
        EngineKind::Userspace => {
            let mut c = userspace::NetStackConfig::new(cfg.addresses.clone());
            c.mtu = cfg.mtu;
            c.keep_alive = cfg.keep_alive;
            c.tcp_timeout = cfg.tcp_timeout;
            if let Some(name) = &cfg.congestion_control {
                match tcp::cc::Algorithm::from_name(name) {
                    Some(a) => c.congestion = a,
                    None => tracing::warn!(
                        engine = %cfg.label,
                        congestion_control = %name,
                        "the userspace engine has `bbr` and `cubic`; using bbr"
                    ),
                }
            }
            Ok(Arc::new(userspace::NetStack::spawn(c, sink)))
        }
        EngineKind::Kernel => Ok(kernel::KernelEngine::start(cfg, sink).await?),
    }
}

/// Finds the engine a handle stands for, at each use (it may be restarted).
pub type EngineSource = Arc<dyn Fn() -> io::Result<Arc<dyn IpEngine>> + Send + Sync>;
/// The VPN address of a named peer of the network, if it has such a peer.
pub type PeerAddresses = Arc<dyn Fn(&str) -> Option<std::net::IpAddr> + Send + Sync>;

/// A module's network as a capability for other modules: listening
/// (`listen_via:`) and dialing (routes, `via:`) in whatever engine runs it
/// now, so a restarted engine is followed without rebinding the handle.
#[derive(Clone)]
pub struct EngineNetwork {
    engine: EngineSource,
    peers: Option<PeerAddresses>,
}

impl EngineNetwork {
    /// A handle over `engine`; `peers` answers `peer: <name>` lookups.
    pub fn new(engine: EngineSource, peers: Option<PeerAddresses>) -> Self {
        EngineNetwork { engine, peers }
    }

    fn engine(&self) -> io::Result<Arc<dyn IpEngine>> {
        (self.engine)()
    }
}

#[async_trait]
impl crate::core::net::listen::VirtualNetwork for EngineNetwork {
    async fn listen_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn StreamListener>> {
        self.engine()?.listen_tcp(addr).await
    }

    async fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> io::Result<Arc<dyn crate::core::net::datagram::DatagramSocket>> {
        self.engine()?.bind_udp(addr).await
    }

    fn addresses(&self) -> Vec<IpNet> {
        self.engine().map(|e| e.addresses()).unwrap_or_default()
    }

    fn peer_address(&self, peer: &str) -> Option<std::net::IpAddr> {
        self.peers.as_ref().and_then(|p| p(peer))
    }
}

#[async_trait]
impl crate::core::net::dial::Dialer for EngineNetwork {
    async fn dial_tcp(
        &self,
        target: &crate::core::addr::HostPort,
        timeout: Duration,
        _meta: &crate::core::net::dial::DialMeta,
    ) -> Result<Stream, DialError> {
        let ip = target.ip().ok_or_else(|| {
            DialError::NoRoute(format!(
                "{target}: names are not resolved inside a virtual network; use an address, or the vnet's `hosts:`/`dns:`"
            ))
        })?;
        let engine = self
            .engine()
            .map_err(|e| DialError::NoRoute(e.to_string()))?;
        engine
            .connect_tcp(SocketAddr::new(ip, target.port), timeout)
            .await
    }

    async fn bind_udp(
        &self,
        remote: SocketAddr,
    ) -> Result<Arc<dyn crate::core::net::datagram::DatagramSocket>, DialError> {
        let engine = self
            .engine()
            .map_err(|e| DialError::NoRoute(e.to_string()))?;
        engine
            .bind_udp(crate::core::net::datagram::any_for(remote))
            .await
            .map_err(|e| DialError::from_io(&remote, e))
    }
}
