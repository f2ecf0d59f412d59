//! Listening: where an on-ramp accepts ([`ListenOn`]), the accept loop
//! every stream on-ramp shares ([`OnRamp::serve`]: the connection limit,
//! the PROXY header of a trusted load balancer, binding again when the
//! network under a VPN listener restarts), and a door's replaceable
//! listener ([`DoorListener`]).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::logs;
use crate::core::net::listen::{bind_host_tcp, HostListener, StreamListener};
use crate::core::net::proxy::Stream;
use crate::core::net::proxy_protocol;

use super::OnRamp;
use crate::core::spine::reject::RejectReason;

/// How long a VPN listener waits between attempts to bind again after its
/// network went away (an interface restart).
const REBIND_EVERY: Duration = Duration::from_millis(100);

/// Where an on-ramp accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    /// The host network (`[::]` is dual-stack).
    Host(SocketAddr),
    /// A VPN address inside the network of a module of the tenant (a
    /// WireGuard instance), by instance name.
    Module {
        /// The module hosting the network.
        module: String,
        /// The address in that network.
        addr: SocketAddr,
    },
}

impl ListenOn {
    /// `listen` on the host, or inside module `listen_via`'s network.
    pub fn new(listen: SocketAddr, listen_via: Option<&String>) -> ListenOn {
        match listen_via {
            Some(m) => ListenOn::Module {
                module: m.clone(),
                addr: listen,
            },
            None => ListenOn::Host(listen),
        }
    }

    /// The address listened on.
    pub fn addr(&self) -> SocketAddr {
        match self {
            ListenOn::Host(a) | ListenOn::Module { addr: a, .. } => *a,
        }
    }

    /// A failed bind as the config error an operator acts on: the
    /// document's `listen_via` when its module has no network to listen in,
    /// else its `listen`. Every listener maps its bind errors here.
    pub fn bind_error(&self, source: &str, e: &io::Error) -> crate::core::config::ConfigError {
        let key = match self {
            ListenOn::Module { .. } if e.kind() == io::ErrorKind::NotFound => "listen_via",
            _ => "listen",
        };
        crate::core::config::ConfigError::key(
            source,
            key,
            format!("cannot listen on {}: {e}", self.addr()),
        )
    }
}

/// Who an accepted connection is from and what it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The client (from a trusted load balancer's PROXY header, if any).
    pub src: SocketAddr,
    /// The address the client connected to, when a trusted load balancer's
    /// PROXY header named it; else [`Accepted::dst_of`] asks the socket
    /// (a system call most connections never need).
    pub dst: Option<SocketAddr>,
}

impl Accepted {
    /// The address the client connected to: the PROXY header's, else the
    /// accepted socket's own (for a TPROXY listener, the original
    /// destination); `None` where neither is known.
    pub fn dst_of(&self, client: &Stream) -> Option<SocketAddr> {
        self.dst.or_else(|| client.local_addr())
    }
}

/// Handles accepted streams for [`OnRamp::serve`].
#[async_trait]
pub trait StreamHandler: Send + Sync + 'static {
    /// Connections allowed at once; more are closed at accept and counted.
    fn max_connections(&self) -> usize;
    /// Load balancers whose connections start with a PROXY protocol header
    /// (v1 or v2) naming the real client: connections from these sources
    /// must send one; others are clients themselves. Default: none.
    fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        Vec::new()
    }
    /// Serves one accepted connection (usually a handshake, then
    /// [`OnRamp::connect`]).
    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted);
}

/// How long a trusted load balancer has to send its PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a trusted load balancer's connection had no valid PROXY header.
#[derive(Debug, thiserror::Error)]
enum ProxyHeaderError {
    /// The bytes are not a PROXY header.
    #[error(transparent)]
    Parse(proxy_protocol::Error),
    /// The connection closed first.
    #[error("closed before the PROXY header")]
    Closed,
    /// Reading failed.
    #[error(transparent)]
    Io(io::Error),
    /// Nothing complete arrived in time.
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
}

/// Reads a PROXY protocol header from `client`: the client it names (or
/// `None` for a LOCAL/UNKNOWN header) and the stream with what was read
/// past the header put back.
async fn read_proxy_header(
    mut client: Stream,
) -> Result<(Option<(SocketAddr, SocketAddr)>, Stream), ProxyHeaderError> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        match proxy_protocol::parse(&buf) {
            Ok(Some((h, n))) => {
                let rest = buf.split_off(n);
                return Ok((h.addrs, client.prepend(rest)));
            }
            Ok(None) if buf.len() < proxy_protocol::MAX_HEADER => {}
            Ok(None) => return Err(ProxyHeaderError::Parse(proxy_protocol::Error::TooLong)),
            Err(e) => return Err(ProxyHeaderError::Parse(e)),
        }
        let want = (proxy_protocol::MAX_HEADER - buf.len()).min(chunk.len());
        match client.read(&mut chunk[..want]).await {
            Ok(0) => return Err(ProxyHeaderError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(ProxyHeaderError::Io(e)),
        }
    }
}

/// One unit of an on-ramp's connection limit; released on drop.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bound listener and its accept loop.
pub struct RunningListener {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for RunningListener {
    /// A listener nobody holds stops accepting (its socket closes when the
    /// accept loop sees the cancellation).
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl RunningListener {
    /// A listener served by a task of its own (a datagram socket's session
    /// loop) that ends once `cancel` is cancelled.
    pub fn from_task(addr: SocketAddr, cancel: CancellationToken, task: JoinHandle<()>) -> Self {
        RunningListener { addr, cancel, task }
    }

    /// The address it accepts on (the port chosen, with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits until the socket is closed. Open
    /// connections are not touched.
    pub async fn close(mut self) {
        self.cancel.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

/// The listener of a door (SOCKS, HTTP proxy): served at start, bound anew
/// first when a reload moves it (if that fails, the old one serves on),
/// closed at drain.
#[derive(Default)]
pub struct DoorListener {
    slot: tokio::sync::Mutex<Option<RunningListener>>,
}

impl DoorListener {
    /// Binds `on` and serves it with `handler`, replacing what served
    /// before once the new bind succeeded. `source` names the document in
    /// the error (key `listen`, or `listen_via` when the module is missing).
    pub async fn serve(
        &self,
        onramp: &Arc<OnRamp>,
        on: ListenOn,
        handler: Arc<dyn StreamHandler>,
        source: &str,
    ) -> Result<(), crate::core::config::ConfigError> {
        let l = onramp
            .bind(&on)
            .await
            .map_err(|e| on.bind_error(source, &e))?;
        self.serve_bound(onramp, on, l, handler).await;
        Ok(())
    }

    /// As [`DoorListener::serve`], with a listener the module bound itself
    /// (e.g. a transparent socket).
    pub async fn serve_bound(
        &self,
        onramp: &Arc<OnRamp>,
        on: ListenOn,
        listener: Box<dyn StreamListener>,
        handler: Arc<dyn StreamHandler>,
    ) {
        self.replace(onramp.serve(on, listener, handler)).await;
    }

    /// Makes `running` the listener, closing what served before.
    pub async fn replace(&self, running: RunningListener) {
        if let Some(old) = self.slot.lock().await.replace(running) {
            old.close().await;
        }
    }

    /// Stops accepting (open connections go on).
    pub async fn close(&self) {
        if let Some(l) = self.slot.lock().await.take() {
            l.close().await;
        }
    }

    /// The address accepted on (the port chosen, with port 0).
    pub async fn local_addr(&self) -> Option<SocketAddr> {
        self.slot.lock().await.as_ref().map(|l| l.local_addr())
    }
}

impl OnRamp {
    /// Takes a connection slot, or counts a `max_connections` rejection.
    pub fn try_admit(&self, max: usize) -> Option<Slot> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.ctx.metrics.reject(
                self.tenant(),
                &self.ctx.instance,
                RejectReason::MaxConnections,
            );
            if let Some(suppressed) = logs::allow("onramp.max_connections") {
                tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, max, suppressed, "max_connections reached; connection refused");
            }
            return None;
        }
        Some(Slot(self.active.clone()))
    }

    /// The network module `module` of the tenant hosts.
    fn network(
        &self,
        module: &str,
    ) -> io::Result<Arc<dyn crate::core::net::listen::VirtualNetwork>> {
        self.ctx.find(module).and_then(|m| m.vnet()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "`{module}` is not a running module with a network in tenant `{}`",
                    self.tenant()
                ),
            )
        })
    }

    /// Binds a stream listener.
    pub async fn bind(&self, on: &ListenOn) -> io::Result<Box<dyn StreamListener>> {
        match on {
            ListenOn::Host(addr) => {
                let l = HostListener::new(bind_host_tcp(*addr)?);
                let registered = self.register_host(l.local_addr());
                Ok(Box::new(crate::core::net::listen::Registered::listener(
                    Box::new(l),
                    registered,
                )))
            }
            ListenOn::Module { module, addr } => self.network(module)?.listen_tcp(*addr).await,
        }
    }

    /// Records this tenant's host socket on `addr`, so other tenants' door
    /// users may not reach it directly.
    fn register_host(&self, addr: SocketAddr) -> crate::core::net::listen::Registered {
        self.ctx.listeners.register(
            crate::core::net::listen::Owner::Tenant(self.tenant().to_string()),
            addr,
        )
    }

    /// Binds a host UDP socket for a protocol stack that drives it itself
    /// (QUIC): the socket, and its record as this tenant's, to hold as long.
    pub fn bind_host_udp_std(
        &self,
        addr: SocketAddr,
    ) -> io::Result<(std::net::UdpSocket, crate::core::net::listen::Registered)> {
        let socket = std::net::UdpSocket::bind(addr)?;
        let registered = self.register_host(socket.local_addr()?);
        Ok((socket, registered))
    }

    /// Binds a UDP socket on the host or on a VPN address in a module's
    /// network (`listen_via`).
    pub async fn bind_udp(
        &self,
        on: &ListenOn,
    ) -> io::Result<Arc<dyn crate::core::net::datagram::DatagramSocket>> {
        match on {
            ListenOn::Host(addr) => {
                let socket = crate::core::net::datagram::bind_host_udp(*addr).await?;
                let registered = self.register_host(socket.local_addr()?);
                Ok(Arc::new(crate::core::net::listen::Registered::socket(
                    socket, registered,
                )))
            }
            ListenOn::Module { module, addr } => self.network(module)?.bind_udp(*addr).await,
        }
    }

    /// Serves `listener` (bound for `on`) with `handler` until closed.
    pub fn serve(
        self: &Arc<Self>,
        on: ListenOn,
        listener: Box<dyn StreamListener>,
        handler: Arc<dyn StreamHandler>,
    ) -> RunningListener {
        let cancel = CancellationToken::new();
        let addr = listener.local_addr();
        tracing::info!(tenant = %self.tenant(), instance = %self.ctx.instance, %addr, on = ?on, "listening");
        let task = tokio::spawn(
            self.clone()
                .accept_loop(on, listener, handler, cancel.clone()),
        );
        RunningListener { addr, cancel, task }
    }

    async fn accept_loop(
        self: Arc<Self>,
        on: ListenOn,
        mut listener: Box<dyn StreamListener>,
        handler: Arc<dyn StreamHandler>,
        cancel: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept_addressed() => r,
            };
            match accepted {
                Ok((client, src, dst)) => {
                    let Some(slot) = self.try_admit(handler.max_connections()) else {
                        continue;
                    };
                    let (me, h) = (self.clone(), handler.clone());
                    self.tracker.spawn(async move {
                        if let Some((client, conn)) =
                            me.unwrap_proxy_header(&*h, client, src, dst).await
                        {
                            h.handle(&me, client, conn).await;
                        }
                        drop(slot);
                    });
                }
                Err(e) if matches!(on, ListenOn::Module { .. }) => {
                    // The network under the listener went away (the
                    // interface restarted): bind again once it is back.
                    tracing::info!(tenant = %self.tenant(), instance = %self.ctx.instance, error = %e, on = ?on, "listener's network went away; binding again");
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(REBIND_EVERY) => {}
                        }
                        if let Ok(l) = self.bind(&on).await {
                            listener = l;
                            tracing::info!(tenant = %self.tenant(), instance = %self.ctx.instance, addr = %listener.local_addr(), "listening again");
                            break;
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors or a transient error: back off
                    // briefly instead of spinning.
                    tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The connection's real client: from its PROXY header when `src` is a
    /// trusted load balancer (a missing or bad header drops it, counted as
    /// `proxy_protocol`), else `src` itself.
    async fn unwrap_proxy_header(
        &self,
        handler: &dyn StreamHandler,
        client: Stream,
        src: SocketAddr,
        dst: Option<SocketAddr>,
    ) -> Option<(Stream, Accepted)> {
        let trusted = handler.trusted_proxies();
        let ip = src.ip().to_canonical();
        if !trusted.iter().any(|n| n.contains(&ip)) {
            return Some((client, Accepted { src, dst }));
        }
        let error =
            match tokio::time::timeout(PROXY_HEADER_TIMEOUT, read_proxy_header(client)).await {
                Ok(Ok((Some((real, to)), client))) => {
                    return Some((
                        client,
                        Accepted {
                            src: real,
                            dst: Some(to),
                        },
                    ))
                }
                Ok(Ok((None, client))) => return Some((client, Accepted { src, dst })),
                Ok(Err(e)) => e,
                Err(_) => ProxyHeaderError::Timeout(PROXY_HEADER_TIMEOUT),
            };
        self.ctx.metrics.reject(
            self.tenant(),
            &self.ctx.instance,
            RejectReason::ProxyProtocol,
        );
        if let Some(suppressed) = logs::allow("onramp.proxy_protocol") {
            tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, %src, error = %error, suppressed, "connection from a trusted proxy without a valid PROXY header: closed");
        }
        None
    }
}
