//! The one path every connection takes, and the listener stream on-ramps share.
//!
//! An on-ramp kind (pipe, SOCKS, HTTP CONNECT, SSH channel) is its config,
//! its handshake, and one call to [`OnRamp::connect`] with the client stream,
//! its source, the target and the identity. That call:
//!
//! 1. routes the target in the chosen vnet ([`crate::core::spine::vnet::Vnets::route`]),
//!    or through the connector the on-ramp pins (a pipe's `via:`); a host
//!    name in a vnet with `dns:` is first resolved by that DNS server, over
//!    TCP through the route to it ([`crate::core::net::dns`]);
//! 2. opens the [`crate::core::spine::flow::Flow`] (tracked, counted) with that
//!    route, and asks the flow-start hooks for a [`Verdict`] (policy); a
//!    denial is counted (`meshgate_rejected_total{reason="denied"}`) and ends
//!    the flow;
//! 3. no route or a `reject` route is a counted refusal with its reason
//!    (`meshgate_dial_errors_total{reason="no_route|rejected|no_vnet"}`);
//! 4. dials through the connector ([`ModuleContext::dial`]);
//! 5. joins the two streams ([`crate::core::net::proxy::join`]);
//! 6. records a typed [`EndReason`] (audit line, metrics).
//!
//! [`OnRamp::serve`] is the accept loop every stream on-ramp shares: it
//! binds on the host or on a VPN address inside a module's network, admits
//! up to a connection limit, tracks every connection for drain and stop, and
//! binds again when the network under a VPN listener restarts.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::addr::HostPort;
use crate::core::logs;
use crate::core::net::dial::DialFailure;
use crate::core::net::dns;
use crate::core::net::listen::{bind_host_tcp, HostListener, StreamListener};
use crate::core::net::proxy::{self, ProxyOptions, Stream, Traffic};
use crate::core::net::proxy_protocol;
use crate::core::net::resolve;
use crate::core::spine::dest::{self, ChosenBy, Forbidden, Host};
use crate::core::spine::flow::{EndReason, FlowContext, Protocol, Verdict};
use crate::core::spine::module::ModuleContext;
use crate::core::spine::router::{Connector, RouteError};
use crate::core::spine::vnet::RouteDecision;

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

/// Where the target is, as the on-ramp knows it.
#[derive(Debug, Clone)]
pub enum Target {
    /// `host:port`, routed in the vnet.
    Addr(HostPort),
    /// The on-ramp could not work out a target (e.g. an unknown peer name):
    /// the flow is refused as `no_route` with this explanation.
    Unknown {
        /// What the client asked for, for logs and the flow table.
        label: String,
        /// Why it cannot be reached.
        error: String,
    },
}

/// How the flow's way out is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteVia {
    /// The route table of this vnet (`None`: the tenant's default vnet).
    Vnet(Option<String>),
    /// A connector the on-ramp's config pins (a pipe's `via: wg0`).
    Pinned(Connector),
}

/// One connection for [`OnRamp::connect`].
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The client's address.
    pub src: SocketAddr,
    /// Where it wants to go.
    pub target: Target,
    /// Who it is, as the on-ramp authenticated it (SOCKS user, SSH key).
    pub identity: Option<String>,
    /// How the way out is chosen.
    pub via: RouteVia,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// End the flow after this long without traffic.
    pub idle_timeout: Option<Duration>,
    /// The address the client connected to, as it saw it (the listener's,
    /// a load balancer's from its PROXY header; the original destination
    /// of a captured connection).
    pub client_dst: Option<SocketAddr>,
    /// Send a PROXY protocol header of this version to the upstream first,
    /// so the backend sees `src` as the client.
    pub proxy_protocol: Option<proxy_protocol::Version>,
    /// Who chose `target`: a door's client is held to the safe defaults
    /// ([`crate::core::spine::dest`]); the operator's config is trusted.
    pub chosen_by: ChosenBy,
}

/// The client side of a connection for [`OnRamp::connect_answering`]: it
/// learns the flow's fate once (after the dial, before any byte is
/// relayed) and hands over the stream to relay. An on-ramp with a handshake
/// answers here: a SOCKS reply, an HTTP status before the upgrade.
#[async_trait]
pub trait Answer: Send {
    /// `Ok(bound)`: the upstream is connected (`bound`: its local address,
    /// where known); return the client stream to relay, or `None` if the
    /// client is gone. `Err(reason)`: the flow ends here (denied, no route,
    /// dial failed); tell the client and return `None`.
    async fn answer(
        self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream>;
}

/// A client that needs no answer: relayed as it is, dropped on failure.
struct Silent(Stream);

#[async_trait]
impl Answer for Silent {
    async fn answer(
        self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream> {
        outcome.ok().map(|_| self.0)
    }
}

/// Who an accepted connection is from and what it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The client (from a trusted load balancer's PROXY header, if any).
    pub src: SocketAddr,
    /// The address the client connected to, where known.
    pub dst: Option<SocketAddr>,
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

/// Reads a PROXY protocol header from `client`: the client it names (or
/// `None` for a LOCAL/UNKNOWN header) and the stream with what was read
/// past the header put back.
async fn read_proxy_header(
    mut client: Stream,
) -> Result<(Option<(SocketAddr, SocketAddr)>, Stream), String> {
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
            Ok(None) => return Err(proxy_protocol::Error::TooLong.to_string()),
            Err(e) => return Err(e.to_string()),
        }
        let want = (proxy_protocol::MAX_HEADER - buf.len()).min(chunk.len());
        match client.read(&mut chunk[..want]).await {
            Ok(0) => return Err("closed before the PROXY header".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
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
        let running = onramp.serve(on, listener, handler);
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

/// What a stream on-ramp instance shares between its listener and its
/// connections: its module context, connection count, tracker and stop.
pub struct OnRamp {
    ctx: ModuleContext,
    active: Arc<AtomicUsize>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl OnRamp {
    /// An on-ramp for the module `ctx` belongs to.
    pub fn new(ctx: ModuleContext) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            active: Arc::new(AtomicUsize::new(0)),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// The module's context.
    pub fn ctx(&self) -> &ModuleContext {
        &self.ctx
    }

    fn tenant(&self) -> &str {
        &self.ctx.tenant.name
    }

    /// Connections (or sessions) open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Cancelled when the on-ramp stops: every connection ends.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop
    }

    /// Takes a connection slot, or counts a `max_connections` rejection.
    pub fn try_admit(&self, max: usize) -> Option<Slot> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.ctx
                .metrics
                .reject(self.tenant(), &self.ctx.instance, "max_connections");
            if let Some(suppressed) = logs::allow("onramp.max_connections") {
                tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, max, suppressed, "max_connections reached; connection refused");
            }
            return None;
        }
        Some(Slot(self.active.clone()))
    }

    /// Runs `work` as one of this on-ramp's connections: [`OnRamp::stop`]
    /// waits for it.
    pub fn spawn<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work);
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

    /// Relays one UDP session as a flow until `idle` passes without a
    /// datagram either way, the on-ramp stops, or a socket fails: what
    /// arrives on `rx` (the client's datagrams) goes to the remote of
    /// `upstream`; the remote's answers go to `client` from `reply` (the
    /// listening socket, or a TPROXY reply socket). `flow` names the
    /// session; bytes are counted both ways.
    pub async fn relay_datagrams(
        &self,
        flow: FlowContext,
        upstream: Datagrams,
        reply: Arc<dyn crate::core::net::datagram::DatagramSocket>,
        client: SocketAddr,
        mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        idle: Duration,
    ) {
        let ctx = &self.ctx;
        let mut flow =
            ctx.flows
                .open_routed(flow, Some(upstream.route.clone()), &ctx.instance_metrics);
        let (socket, remote) = (upstream.socket, upstream.remote);
        if let Verdict::Deny(why) = flow.verdict() {
            self.denied(&flow, &why);
            rx.close();
            flow.set_end_reason(EndReason::Denied);
            return;
        }
        let mut buf = vec![0u8; 65_535];
        let revoked = flow.flow().clone();
        let reason = loop {
            tokio::select! {
                _ = self.stop.cancelled() => break EndReason::Stopped,
                _ = revoked.revoked() => {
                    self.count_revoked();
                    break EndReason::PolicyRevoked;
                }
                _ = tokio::time::sleep(idle) => break EndReason::IdleTimeout,
                d = rx.recv() => match d {
                    Some(d) => match socket.send_to(&d, remote).await {
                        Ok(n) => flow.flow().upstream(n as u64),
                        Err(e) => {
                            tracing::debug!(%client, error = %e, "udp send to remote failed");
                            break EndReason::UpstreamError;
                        }
                    },
                    None => break EndReason::Closed,
                },
                r = socket.recv_from(&mut buf) => match r {
                    // Only the remote's answers: the socket is the session's own.
                    Ok((n, from)) if from.ip().to_canonical() == remote.ip() && from.port() == remote.port() => {
                        match reply.send_to(&buf[..n], client).await {
                            Ok(n) => flow.flow().downstream(n as u64),
                            Err(e) => tracing::debug!(%client, error = %e, "udp send to client failed"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(%client, error = %e, "udp recv from remote failed");
                        break EndReason::UpstreamError;
                    }
                },
            }
        };
        rx.close();
        flow.set_end_reason(reason);
    }

    /// Datagrams to `target`: routed and checked as a stream would be
    /// (`via`: the vnet's table with its `hosts:`/`dns:`, or a pinned
    /// connector; the name resolved where the route says), and a socket
    /// bound through the route's connector. Returns the socket, the remote
    /// to send to and the route as flows show it; or the counted reason
    /// and a message.
    pub async fn open_datagrams(
        &self,
        via: &RouteVia,
        target: &HostPort,
        chosen_by: ChosenBy,
        timeout: Duration,
    ) -> Result<Datagrams, (&'static str, String)> {
        let (connector, remote, route) = self
            .route_datagrams(via, target, chosen_by, timeout)
            .await?;
        let socket = self
            .ctx
            .bind_udp(&connector, remote)
            .await
            .map_err(|e| (e.reason(), e.to_string()))?;
        Ok(Datagrams {
            socket,
            remote,
            route,
        })
    }

    /// As [`OnRamp::open_datagrams`] without the socket: the connector the
    /// datagrams leave through, the remote and the route as flows show it
    /// (a SOCKS association sends to many remotes from one socket per
    /// connector).
    pub async fn route_datagrams(
        &self,
        via: &RouteVia,
        target: &HostPort,
        chosen_by: ChosenBy,
        timeout: Duration,
    ) -> Result<(Connector, SocketAddr, String), (&'static str, String)> {
        let plan = self
            .plan(via, target, chosen_by, timeout)
            .await
            .map_err(|r| (r.reason(), r.to_string()))?;
        let Some((connector, remote)) = plan
            .candidates
            .iter()
            .find_map(|(c, t)| t.ip().map(|ip| (c.clone(), SocketAddr::new(ip, t.port))))
        else {
            let (c, t) = &plan.candidates[0];
            return Err((
                "resolve",
                format!(
                    "{t}: names are not resolved inside `{c}`; give the vnet `hosts:` or `dns:`"
                ),
            ));
        };
        Ok((connector, remote, plan.shown))
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
                r = listener.accept() => r,
            };
            match accepted {
                Ok((client, src)) => {
                    let Some(slot) = self.try_admit(handler.max_connections()) else {
                        continue;
                    };
                    let (me, h) = (self.clone(), handler.clone());
                    let dst = client.local_addr();
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
                Err(_) => format!("no PROXY header within {PROXY_HEADER_TIMEOUT:?}"),
            };
        self.ctx
            .metrics
            .reject(self.tenant(), &self.ctx.instance, "proxy_protocol");
        if let Some(suppressed) = logs::allow("onramp.proxy_protocol") {
            tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, %src, error = %error, suppressed, "connection from a trusted proxy without a valid PROXY header: closed");
        }
        None
    }

    /// Counts a flow a policy change ended.
    pub(crate) fn count_revoked(&self) {
        self.ctx
            .metrics
            .reject(self.tenant(), &self.ctx.instance, "policy_revoked");
    }

    /// Counts and logs a flow the policy (or a flow-start hook) denied.
    pub(crate) fn denied(&self, flow: &crate::core::spine::flow::FlowGuard, why: &str) {
        self.ctx
            .metrics
            .reject(self.tenant(), &self.ctx.instance, "denied");
        if let Some(suppressed) = logs::allow("onramp.denied") {
            let f = &flow.flow().ctx;
            tracing::info!(tenant = %self.tenant(), instance = %self.ctx.instance, src = %f.src, dst = ?f.dst, identity = ?f.identity, protocol = ?f.protocol, reason = ?why, suppressed, "flow denied");
        }
    }

    /// Closes every connection and waits until they are gone.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// The one path: route, flow (with the policy verdict), dial, join,
    /// typed end. Returns why the flow ended.
    pub async fn connect(&self, client: Stream, req: ConnectRequest) -> EndReason {
        self.connect_answering(req, Box::new(Silent(client))).await
    }

    /// [`OnRamp::connect`] for an on-ramp that owes its client an answer
    /// (a SOCKS reply, an HTTP status): `client` learns the outcome after
    /// the dial and before the join, or the reason the flow ends, and hands
    /// over the stream to relay.
    pub async fn connect_answering(
        &self,
        req: ConnectRequest,
        client: Box<dyn Answer + '_>,
    ) -> EndReason {
        let ctx = &self.ctx;
        let (tenant, instance) = (self.tenant(), ctx.instance.as_str());
        let dst = match &req.target {
            Target::Addr(t) => t.to_string(),
            Target::Unknown { label, .. } => label.clone(),
        };
        // Decide the route first, on the address that will be dialed, so
        // the policy sees where the flow goes and the audit line says it. A
        // name is resolved where its route says (the vnet's `hosts:` or
        // `dns:`, the host's resolver for a `direct` route; a gateway link
        // resolves on its far side), and every address is checked.
        let mut flow_ctx = FlowContext {
            tenant: tenant.to_string(),
            instance: instance.to_string(),
            identity: req.identity.clone(),
            src: req.src,
            dst: dst.clone(),
            protocol: Protocol::Tcp,
            kind: ctx.kind.clone(),
            dialed: None,
        };
        let routed: Result<Plan, Refusal> = match &req.target {
            Target::Unknown { error, .. } => Err(Refusal::Unknown(error.clone())),
            Target::Addr(t) => self
                .plan(&req.via, t, req.chosen_by, req.connect_timeout)
                .await
                .map(|p| self.admitted_by_policy(p, &flow_ctx)),
        };
        let shown_route = match &routed {
            Ok(plan) => {
                flow_ctx.dialed = plan.dialed();
                plan.shown.clone()
            }
            Err(r) => r.to_string(),
        };
        let mut flow = ctx
            .flows
            .open_routed(flow_ctx, Some(shown_route), &ctx.instance_metrics);
        let work = async {
            // Phase one: the verdict, the route and the dial.
            let dialed: Result<Stream, EndReason> = async {
                if let Verdict::Deny(why) = flow.verdict() {
                    self.denied(&flow, &why);
                    return Err(EndReason::Denied);
                }
                let plan = match routed {
                    Ok(plan) => plan,
                    Err(refusal) => {
                        ctx.metrics.dial_error(tenant, instance, refusal.reason());
                        if let Some(suppressed) = logs::allow("onramp.refused") {
                            tracing::warn!(%tenant, %instance, src = %req.src, dst = ?dst, error = ?refusal.to_string(), suppressed, "refused");
                        }
                        return Err(refusal.end_reason());
                    }
                };
                // Every candidate passed the checks: the first that answers wins.
                let deadline = tokio::time::Instant::now() + req.connect_timeout;
                let mut last = None;
                for (connector, target) in &plan.candidates {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match ctx.dial(connector, target, left).await {
                        Ok(s) => return Ok(s),
                        Err(e) => {
                            if let Some(suppressed) = logs::allow("onramp.dial_failed") {
                                tracing::warn!(%tenant, %instance, src = %req.src, dst = ?dst, %target, via = %connector, error = %e, suppressed, "dial failed");
                            }
                            last = Some(e);
                        }
                    }
                }
                let failure = last.as_ref().map_or(DialFailure::Timeout, |e| e.failure());
                ctx.metrics.dial_error(tenant, instance, failure.as_str());
                Err(EndReason::DialFailed(failure))
            }
            .await;
            // Phase two: tell the client (where the on-ramp owes it an
            // answer), then relay.
            let upstream = match dialed {
                Ok(up) => up,
                Err(reason) => {
                    client.answer(Err(reason)).await;
                    return reason;
                }
            };
            let mut upstream = upstream;
            let Some(client) = client.answer(Ok(upstream.local_addr())).await else {
                return EndReason::DownstreamError;
            };
            if let Some(v) = req.proxy_protocol {
                use tokio::io::AsyncWriteExt;
                let to = req
                    .client_dst
                    .unwrap_or_else(|| SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
                let header = proxy_protocol::encode(v, req.src, to);
                if upstream.write_all(&header).await.is_err() {
                    return EndReason::UpstreamError;
                }
            }
            let opts = ProxyOptions {
                idle_timeout: req.idle_timeout,
                ..ProxyOptions::default()
            };
            proxy::join(client, upstream, flow.flow().as_ref(), &opts)
                .await
                .end
                .into()
        };
        let reason = tokio::select! {
            r = work => r,
            _ = self.stop.cancelled() => EndReason::Stopped,
            _ = flow.flow().revoked() => EndReason::PolicyRevoked,
        };
        if reason == EndReason::PolicyRevoked {
            self.count_revoked();
        }
        flow.set_end_reason(reason);
        reason
    }
}

/// Where a flow is dialed, as the path decided it.
struct Plan {
    /// In order: the connector and the target handed to it (an address;
    /// a name only for a connector that resolves on its far side).
    candidates: Vec<(Connector, HostPort)>,
    /// The route as flows show it.
    shown: String,
}

impl Plan {
    /// The first address the flow will be dialed to, if an address.
    fn dialed(&self) -> Option<SocketAddr> {
        let (_, t) = self.candidates.first()?;
        t.ip().map(|ip| SocketAddr::new(ip, t.port))
    }
}

impl OnRamp {
    /// Decides where a flow to `target` is dialed: the normalised address,
    /// or the name resolved where its route says, every address routed and
    /// checked ([`dest::never`] always; for a door's client on a `direct`
    /// route, [`dest::protected`] unless the route names the prefix, the
    /// admin API and other tenants' listeners). Refused addresses are left
    /// out; none left is a refusal with the first reason.
    async fn plan(
        &self,
        via: &RouteVia,
        target: &HostPort,
        chosen_by: ChosenBy,
        timeout: Duration,
    ) -> Result<Plan, Refusal> {
        let port = target.port;
        let host = dest::normalize_host(&target.host);
        let vnet = match via {
            RouteVia::Pinned(c) => {
                // The operator pinned the connector: only what no flow may
                // reach is refused here.
                let t = match &host {
                    Host::Ip(ip) => not_never(*ip, port)?,
                    Host::Name(_) => target.clone(),
                };
                return Ok(Plan {
                    shown: format!("pinned: {t} -> {c}"),
                    candidates: vec![(c.clone(), t)],
                });
            }
            RouteVia::Vnet(v) => v.as_deref(),
        };
        let vnets = &self.ctx.tenant.vnets;
        let mut chosen_by = chosen_by;
        let (ips, note) = match host {
            Host::Ip(ip) => (vec![ip], String::new()),
            Host::Name(name) => {
                let named = HostPort {
                    host: name.clone(),
                    port,
                };
                if let Some((vn, server)) = vnets.dns_for(vnet, &named) {
                    let ips = self
                        .resolve(&vn, server, &name, timeout)
                        .await
                        .map_err(|e| {
                            Refusal::Resolve(format!(
                                "cannot resolve {name} by the DNS server {server} of vnet `{vn}`: {e}"
                            ))
                        })?;
                    let note = format!(" ({name} = {} by dns {server})", list(&ips));
                    (ips, note)
                } else {
                    let d = vnets.route(vnet, &named).map_err(Refusal::Route)?;
                    match d.target.ip() {
                        Some(ip) => {
                            if d.from_hosts {
                                // The operator wrote this address.
                                chosen_by = ChosenBy::Operator;
                            }
                            (vec![ip], String::new())
                        }
                        None if d.route.connector == Connector::Direct => {
                            let ips = resolve_on_host(&name, timeout).await?;
                            let note = format!(" ({name} = {} by the host)", list(&ips));
                            (ips, note)
                        }
                        None => {
                            return Ok(Plan {
                                shown: d.describe(),
                                candidates: vec![(d.route.connector, d.target)],
                            })
                        }
                    }
                }
            }
        };
        let mut candidates = Vec::new();
        let mut shown = None;
        let mut refused = None;
        for ip in ips {
            match self.check_address(vnet, ip, port, chosen_by) {
                Ok(d) => {
                    shown.get_or_insert_with(|| format!("{}{note}", d.describe()));
                    candidates.push((d.route.connector, d.target));
                }
                Err(r) => {
                    refused.get_or_insert(r);
                }
            }
        }
        match shown {
            Some(shown) => Ok(Plan { candidates, shown }),
            None => {
                Err(refused.unwrap_or_else(|| Refusal::Resolve(format!("{target}: no addresses"))))
            }
        }
    }

    /// Routes one address in `vnet` and checks it.
    fn check_address(
        &self,
        vnet: Option<&str>,
        ip: std::net::IpAddr,
        port: u16,
        chosen_by: ChosenBy,
    ) -> Result<RouteDecision, Refusal> {
        let ip = dest::canonical(ip);
        let target = not_never(ip, port)?;
        let d = self
            .ctx
            .tenant
            .vnets
            .route(vnet, &target)
            .map_err(Refusal::Route)?;
        if d.route.connector == Connector::Direct && chosen_by == ChosenBy::Client {
            use crate::core::net::listen::Owner;
            let what = dest::protected(ip).filter(|_| !d.explicit).or_else(|| {
                match self
                    .ctx
                    .listeners
                    .foreign_owner(self.tenant(), SocketAddr::new(ip, port))
                {
                    Some(Owner::Node) => Some(Forbidden::Admin),
                    Some(Owner::Tenant(_)) => Some(Forbidden::OtherTenant),
                    None => None,
                }
            });
            if let Some(what) = what {
                return Err(Refusal::Forbidden {
                    target: target.to_string(),
                    what,
                    route: Some(d.describe()),
                });
            }
        }
        Ok(d)
    }

    /// Leaves out the candidates the tenant's policy denies, so a name
    /// with several addresses never falls through to a denied one; when
    /// every one is denied the first stays, for the flow to be denied on.
    fn admitted_by_policy(&self, mut plan: Plan, flow: &FlowContext) -> Plan {
        if plan.candidates.len() < 2 {
            return plan;
        }
        let denied = |t: &HostPort| {
            let mut f = flow.clone();
            f.dialed = t.ip().map(|ip| SocketAddr::new(ip, t.port));
            self.ctx.flows.would_deny(&f)
        };
        if let Some(first_allowed) = plan.candidates.iter().position(|(_, t)| !denied(t)) {
            let kept: Vec<_> = plan
                .candidates
                .drain(first_allowed..)
                .filter(|(_, t)| !denied(t))
                .collect();
            plan.candidates = kept;
        } else {
            plan.candidates.truncate(1);
        }
        plan
    }

    async fn resolve(
        &self,
        vnet: &str,
        server: SocketAddr,
        host: &str,
        timeout: Duration,
    ) -> Result<Vec<std::net::IpAddr>, String> {
        let at = HostPort {
            host: server.ip().to_string(),
            port: server.port(),
        };
        let d = self
            .ctx
            .tenant
            .vnets
            .route(Some(vnet), &at)
            .map_err(|e| format!("no way to the DNS server: {e}"))?;
        let stream = self
            .ctx
            .dial(&d.route.connector, &d.target, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let addrs = dns::resolve_over(stream, host, timeout)
            .await
            .map_err(|e| e.to_string())?;
        if addrs.is_empty() {
            return Err("no address".into());
        }
        Ok(addrs)
    }
}

/// `ip:port` as a target, unless `ip` is one no flow may reach.
fn not_never(ip: std::net::IpAddr, port: u16) -> Result<HostPort, Refusal> {
    let target = HostPort {
        host: ip.to_string(),
        port,
    };
    match dest::never(ip) {
        Some(what) => Err(Refusal::Forbidden {
            target: target.to_string(),
            what,
            route: None,
        }),
        None => Ok(target),
    }
}

/// `a, b, c` for the route shown.
fn list(ips: &[std::net::IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `name` by the host's resolver (a `direct` route's names).
async fn resolve_on_host(name: &str, timeout: Duration) -> Result<Vec<std::net::IpAddr>, Refusal> {
    resolve::on_host(name, timeout)
        .await
        .map_err(|e| Refusal::Resolve(e.to_string()))
}

/// Where datagrams to one target go ([`OnRamp::open_datagrams`]).
pub struct Datagrams {
    /// The socket to send from and receive answers on.
    pub socket: Arc<dyn crate::core::net::datagram::DatagramSocket>,
    /// The target's address.
    pub remote: SocketAddr,
    /// The route, as flows show it.
    pub route: String,
}

/// Why a flow has nowhere to go.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// The vnet's table said no.
    #[error(transparent)]
    Route(RouteError),
    /// The vnet's DNS server did not give an address.
    #[error("{0}")]
    Resolve(String),
    /// The on-ramp could not name a target.
    #[error("{0}")]
    Unknown(String),
    /// The address is one no flow, or no door's client, may reach.
    #[error("{target} is refused: {}{}", what.describe(), route.as_ref().map(|r| format!(" (route `{r}`)")).unwrap_or_default())]
    Forbidden {
        /// The address.
        target: String,
        /// What it is.
        what: Forbidden,
        /// The route it matched, if routed.
        route: Option<String>,
    },
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Route(e) => e.reason(),
            Refusal::Resolve(_) => "resolve",
            Refusal::Unknown(_) => "no_route",
            Refusal::Forbidden { what, .. } => what.as_str(),
        }
    }

    fn end_reason(&self) -> EndReason {
        match self {
            Refusal::Route(RouteError::Rejected { .. }) => EndReason::Rejected,
            Refusal::Resolve(_) => EndReason::DialFailed(DialFailure::Resolve),
            Refusal::Forbidden { what, .. } => EndReason::Forbidden(*what),
            _ => EndReason::NoRoute,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metrics::Metrics;
    use crate::core::spine::audit::AuditLog;
    use crate::core::spine::flow::{Flow, FlowEnd, FlowObserver, FlowTable};
    use crate::core::spine::module::ModuleDirectory;
    use crate::core::spine::tenant::Tenant;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Denies one identity, and records every flow's end.
    #[derive(Default)]
    struct Policy(Mutex<Vec<String>>);

    impl FlowObserver for Policy {
        fn on_start(&self, flow: &Flow) -> Verdict {
            match flow.ctx.identity.as_deref() {
                Some("mallory") => Verdict::Deny("mallory may not leave".into()),
                _ => Verdict::Allow,
            }
        }
        fn on_end(&self, flow: &Flow, end: &FlowEnd) {
            let d = flow.decision();
            self.0.lock().unwrap().push(format!(
                "{} {} {} {}",
                flow.ctx.identity.as_deref().unwrap_or("-"),
                d.verdict,
                d.route.unwrap_or_default(),
                end.reason
            ));
        }
    }

    /// A `Write` that appends to a shared buffer (the captured log).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A client stream accepted from a local socket pair.
    async fn client_pair() -> (tokio::net::TcpStream, Stream, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, src) = l.accept().await.unwrap();
        (c, Stream::Tcp(s), src)
    }

    #[tokio::test]
    async fn a_hook_denies_by_identity_counted_and_audited_with_the_route() {
        let log = Captured::default();
        let w = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let policy = Arc::new(Policy::default());
        let flows = Arc::new(FlowTable::new(vec![
            policy.clone(),
            Arc::new(AuditLog::default()),
        ]));
        let metrics = Arc::new(Metrics::new());
        let dir = ModuleDirectory::default();
        let ctx = ModuleContext::new(
            Arc::new(Tenant::new("acme")),
            "door",
            metrics.clone(),
            flows,
            &dir,
        );
        let onramp = OnRamp::new(ctx);
        // An echo backend.
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: HostPort = backend.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let req = |identity: &str| ConnectRequest {
            src: "127.0.0.1:1".parse().unwrap(),
            target: Target::Addr(target.clone()),
            identity: Some(identity.into()),
            via: RouteVia::Vnet(None),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: None,
            client_dst: None,
            proxy_protocol: None,
            chosen_by: ChosenBy::Operator,
        };

        let (_c, client, _) = client_pair().await;
        assert_eq!(
            onramp.connect(client, req("mallory")).await,
            EndReason::Denied
        );

        let (mut c, client, _) = client_pair().await;
        let allowed = tokio::spawn({
            let onramp = onramp.clone();
            let r = req("alice");
            async move { onramp.connect(client, r).await }
        });
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        c.shutdown().await.unwrap();
        drop(c);
        assert_eq!(allowed.await.unwrap(), EndReason::Closed);

        let route = "default: 127.0.0.0/8 -> direct";
        assert_eq!(
            *policy.0.lock().unwrap(),
            vec![
                format!("mallory deny (mallory may not leave) {route} denied"),
                format!("alice allow {route} closed"),
            ]
        );
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"meshgate_rejected_total{tenant="acme",instance="door",reason="denied"} 1"#
            ),
            "{text}"
        );
        let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let audit: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("meshgate::audit"))
            .collect();
        assert_eq!(audit.len(), 2, "{log}");
        assert!(audit[0].contains("identity=\"mallory\""), "{}", audit[0]);
        assert!(
            audit[0].contains("verdict=deny (mallory may not leave)"),
            "{}",
            audit[0]
        );
        assert!(
            audit[0].contains(&format!("route=\"{route}\"")),
            "{}",
            audit[0]
        );
        assert!(audit[0].contains("reason=denied"), "{}", audit[0]);
    }

    #[tokio::test]
    async fn refusals_end_typed_and_are_counted() {
        let metrics = Arc::new(Metrics::new());
        let tenant = Arc::new(Tenant::new("acme"));
        tenant.vnets.set(crate::core::spine::vnet::Vnet {
            name: "corp".into(),
            default: true,
            engine: Default::default(),
            routes: crate::core::spine::router::Router::new(vec![
                crate::core::spine::router::Route {
                    matches: crate::core::spine::router::Match::Cidr(
                        "10.9.0.0/16".parse().unwrap(),
                    ),
                    connector: Connector::Reject,
                },
            ]),
            hosts: Default::default(),
            dns: None,
        });
        let ctx = ModuleContext::new(
            tenant,
            "door",
            metrics.clone(),
            Arc::new(FlowTable::new(vec![])),
            &ModuleDirectory::default(),
        );
        let onramp = OnRamp::new(ctx);
        for (target, end) in [
            ("10.9.1.1:80", EndReason::Rejected),
            ("192.0.2.1:80", EndReason::NoRoute),
        ] {
            let (_c, client, src) = client_pair().await;
            let req = ConnectRequest {
                src,
                target: Target::Addr(target.parse().unwrap()),
                identity: None,
                via: RouteVia::Vnet(None),
                connect_timeout: Duration::from_secs(1),
                idle_timeout: None,
                client_dst: None,
                proxy_protocol: None,
                chosen_by: ChosenBy::Client,
            };
            assert_eq!(onramp.connect(client, req).await, end, "{target}");
        }
        let (_c, client, src) = client_pair().await;
        let req = ConnectRequest {
            src,
            target: Target::Addr("10.1.1.1:80".parse().unwrap()),
            identity: None,
            via: RouteVia::Vnet(Some("nope".into())),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: None,
            client_dst: None,
            proxy_protocol: None,
            chosen_by: ChosenBy::Client,
        };
        assert_eq!(onramp.connect(client, req).await, EndReason::NoRoute);
        let text = metrics.encode();
        for reason in ["rejected", "no_route", "no_vnet"] {
            let series = format!(
                r#"meshgate_dial_errors_total{{tenant="acme",instance="door",reason="{reason}"}} 1"#
            );
            assert!(text.contains(&series), "{series}\n{text}");
        }
    }

    /// A DNS server on loopback (TCP) that answers every A query with 127.0.0.1.
    async fn dns_server() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        if s.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        let name_known = q.windows(7).any(|w| w == b"backend");
                        let mut r = q.clone();
                        r[2] = 0x81;
                        r[3] = if name_known { 0x80 } else { 0x83 };
                        let is_a = q[q.len() - 3] == 1;
                        if name_known && is_a {
                            r[7] = 1;
                            r.extend_from_slice(&[
                                0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1,
                            ]);
                        }
                        let mut out = (r.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&r);
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn names_resolve_by_the_vnets_dns_server_never_the_host() {
        let dns = dns_server().await;
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = backend.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                let _ = s.write_all(b"hi").await;
            }
        });
        let tenant = Arc::new(Tenant::new("acme"));
        tenant.vnets.set(crate::core::spine::vnet::Vnet {
            name: "lab".into(),
            default: true,
            engine: Default::default(),
            routes: crate::core::spine::router::Router::new(vec![
                crate::core::spine::router::Route {
                    matches: crate::core::spine::router::Match::Cidr(
                        "127.0.0.0/8".parse().unwrap(),
                    ),
                    connector: Connector::Direct,
                },
            ]),
            hosts: Default::default(),
            dns: Some(dns),
        });
        let policy = Arc::new(Policy::default());
        let metrics = Arc::new(Metrics::new());
        let ctx = ModuleContext::new(
            tenant,
            "door",
            metrics.clone(),
            Arc::new(FlowTable::new(vec![policy.clone()])),
            &ModuleDirectory::default(),
        );
        let onramp = OnRamp::new(ctx);
        let req = |host: &str| ConnectRequest {
            src: "127.0.0.1:1".parse().unwrap(),
            target: Target::Addr(HostPort {
                host: host.into(),
                port,
            }),
            identity: Some("alice".into()),
            via: RouteVia::Vnet(None),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: None,
            client_dst: None,
            proxy_protocol: None,
            chosen_by: ChosenBy::Client,
        };
        let (mut c, client, _) = client_pair().await;
        let run = tokio::spawn({
            let o = onramp.clone();
            let r = req("backend.lab");
            async move { o.connect(client, r).await }
        });
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        drop(c);
        run.await.unwrap();
        // A name the server does not know: refused as a resolve failure,
        // even though the host's resolver knows `localhost`.
        let (_c, client, _) = client_pair().await;
        assert_eq!(
            onramp.connect(client, req("localhost")).await,
            EndReason::DialFailed(DialFailure::Resolve)
        );
        let ends = policy.0.lock().unwrap().clone();
        assert!(
            ends[0].contains("lab: 127.0.0.0/8 -> direct (backend.lab = 127.0.0.1 by dns"),
            "{ends:?}"
        );
        assert!(
            ends[1].contains("cannot resolve localhost by the DNS server"),
            "{ends:?}"
        );
        assert!(ends[1].contains("no such name"), "{ends:?}");
        assert!(metrics.encode().contains(
            r#"meshgate_dial_errors_total{tenant="acme",instance="door",reason="resolve"} 1"#
        ));
    }
}
