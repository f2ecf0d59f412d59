//! `kind: pipe`: a named proxy from a local `listen` address to a `remote`.
//!
//! Owns one listener (TCP, or a UDP socket with one session per client
//! address) and the connections accepted on it. Every connection is a flow in
//! the node's flow table, dialed through the tenant's router
//! ([`ModuleContext::dial_tcp`]) and joined by the core proxy. Reload swaps
//! the config for new connections; a changed `listen` binds the new address
//! before the old listener closes, and open connections are never touched.
//! Offers no capability to other modules.

pub mod config;
mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::dial::DialError;
use crate::core::flow::{FlowContext, Protocol};
use crate::core::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::proxy::{self, ProxyOptions, Stream};
use crate::core::vnet::{bind_host_tcp, StreamListener};

pub use config::{PipeConfig, PipeProtocol};

/// Builds pipes.
pub struct PipeFactory;

impl ModuleFactory for PipeFactory {
    fn kind(&self) -> &'static str {
        "pipe"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = PipeConfig::from_document(doc)?;
        Ok(ModulePlan {
            depends_on: cfg.depends_on(),
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let config = PipeConfig::from_document(doc)?;
        Ok(Arc::new(Pipe {
            shared: Arc::new(Shared {
                ctx,
                source: RwLock::new(doc.source.clone()),
                config: RwLock::new(Arc::new(config)),
                active: AtomicUsize::new(0),
                conns_cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
            listener: Mutex::new(None),
        }))
    }
}

/// A running pipe.
pub struct Pipe {
    shared: Arc<Shared>,
    listener: Mutex<Option<RunningListener>>,
}

/// What the accept loop and connection tasks share.
struct Shared {
    ctx: ModuleContext,
    source: RwLock<String>,
    config: RwLock<Arc<PipeConfig>>,
    /// Connections (or UDP sessions) open now, for `max_connections`.
    active: AtomicUsize,
    /// Cancelled by `stop`: closes every open connection.
    conns_cancel: CancellationToken,
    tracker: TaskTracker,
}

/// A bound listener and its accept loop.
struct RunningListener {
    addr: SocketAddr,
    protocol: PipeProtocol,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// A bound but not yet serving socket.
enum Bound {
    Tcp(TcpListener),
    Vnet(Box<dyn StreamListener>),
    Udp(UdpSocket),
}

impl Shared {
    fn config(&self) -> Arc<PipeConfig> {
        self.config.read().expect("pipe config poisoned").clone()
    }

    fn tenant(&self) -> &str {
        &self.ctx.tenant.name
    }

    /// Takes a connection slot, or counts a rejection.
    fn try_admit(self: &Arc<Self>, max: usize) -> Option<ActiveSlot> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.ctx
                .metrics
                .reject(self.tenant(), &self.ctx.instance, "max_connections");
            tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, max, "max_connections reached; connection refused");
            return None;
        }
        Some(ActiveSlot(self.clone()))
    }

    fn flow_context(&self, src: SocketAddr, dst: String, protocol: Protocol) -> FlowContext {
        FlowContext {
            tenant: self.tenant().to_string(),
            instance: self.ctx.instance.clone(),
            identity: None,
            src,
            dst,
            protocol,
        }
    }

    /// Where connections go: `remote`, or the named peer's VPN address with
    /// the remote's (else the listen) port.
    fn target(&self, cfg: &PipeConfig) -> Result<HostPort, DialError> {
        let Some(peer) = &cfg.peer else {
            return Ok(cfg.remote.clone().expect("validated: remote or peer"));
        };
        let via = cfg.via.as_deref().expect("validated: peer needs via");
        let ip = self
            .ctx
            .find(via)
            .and_then(|m| m.vnet())
            .and_then(|v| v.peer_address(peer))
            .ok_or_else(|| DialError::NoRoute(format!("`{via}` has no peer named `{peer}`")))?;
        let port = cfg.remote.as_ref().map_or(cfg.listen.0.port(), |r| r.port);
        Ok(HostPort {
            host: ip.to_string(),
            port,
        })
    }

    async fn serve_tcp(self: Arc<Self>, client: Stream, src: SocketAddr) {
        let cfg = self.config();
        let Some(_slot) = self.try_admit(cfg.max_connections) else {
            return;
        };
        let target = self.target(&cfg);
        let dst = match &target {
            Ok(t) => t.to_string(),
            Err(_) => format!("peer {}", cfg.peer.as_deref().unwrap_or("-")),
        };
        let mut flow = self.ctx.flows.open(
            self.flow_context(src, dst, Protocol::Tcp),
            &self.ctx.instance_metrics,
        );
        let work = async {
            let dialed = match target {
                Ok(t) => {
                    self.ctx
                        .dial_tcp(cfg.via.as_deref(), &t, cfg.connect_timeout)
                        .await
                }
                Err(e) => Err(e),
            };
            let upstream = match dialed {
                Ok(s) => s,
                Err(e) => {
                    self.ctx
                        .metrics
                        .dial_error(self.tenant(), &self.ctx.instance, e.reason());
                    tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, %src, error = %e, "dial failed");
                    return format!("dial_{}", e.reason());
                }
            };
            let opts = ProxyOptions {
                idle_timeout: cfg.effective_idle_timeout(),
                ..ProxyOptions::default()
            };
            let out = proxy::join(client, upstream, flow.flow().as_ref(), &opts).await;
            out.end.as_str().to_string()
        };
        let reason = tokio::select! {
            r = work => r,
            _ = self.conns_cancel.cancelled() => "stopped".to_string(),
        };
        flow.set_end_reason(reason);
    }
}

/// Holds one unit of `Shared::active`; released on drop.
struct ActiveSlot(Arc<Shared>);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pipe {
    fn listen_error(&self, cfg: &PipeConfig, e: std::io::Error) -> ModuleError {
        let source = self.shared.source.read().expect("poisoned").clone();
        ModuleError::Config(ConfigError::key(
            &source,
            "listen",
            format!("cannot listen on {} ({:?}): {e}", cfg.listen, cfg.protocol),
        ))
    }

    async fn bind(&self, cfg: &PipeConfig) -> Result<Bound, ModuleError> {
        let addr = cfg.listen.0;
        if let Some(via) = &cfg.listen_via {
            let vnet = self
                .shared
                .ctx
                .find(via)
                .and_then(|m| m.vnet())
                .ok_or_else(|| {
                    ModuleError::Config(ConfigError::key(
                        &self.shared.source.read().expect("poisoned"),
                        "listen_via",
                        format!(
                            "`{via}` is not a running module with a virtual network in this tenant"
                        ),
                    ))
                })?;
            return vnet
                .listen_tcp(addr)
                .await
                .map(Bound::Vnet)
                .map_err(|e| self.listen_error(cfg, e));
        }
        match cfg.protocol {
            PipeProtocol::Tcp => bind_host_tcp(addr)
                .map(Bound::Tcp)
                .map_err(|e| self.listen_error(cfg, e)),
            PipeProtocol::Udp => UdpSocket::bind(addr)
                .await
                .map(Bound::Udp)
                .map_err(|e| self.listen_error(cfg, e)),
        }
    }

    fn serve(&self, bound: Bound, protocol: PipeProtocol) -> RunningListener {
        let cancel = CancellationToken::new();
        let shared = self.shared.clone();
        let (addr, task) = match bound {
            Bound::Tcp(l) => {
                let addr = l.local_addr().expect("bound socket has an address");
                let c = cancel.clone();
                (
                    addr,
                    tokio::spawn(accept_loop(shared, Box::new(HostListener(l)), c)),
                )
            }
            Bound::Vnet(l) => {
                let addr = l.local_addr();
                let c = cancel.clone();
                (addr, tokio::spawn(accept_loop(shared, l, c)))
            }
            Bound::Udp(s) => {
                let addr = s.local_addr().expect("bound socket has an address");
                let c = cancel.clone();
                (addr, tokio::spawn(udp::serve(shared, s, c)))
            }
        };
        tracing::info!(tenant = %self.shared.tenant(), instance = %self.shared.ctx.instance, %addr, ?protocol, "pipe listening");
        RunningListener {
            addr,
            protocol,
            cancel,
            task,
        }
    }

    /// The address the pipe accepts on (useful with port 0).
    pub async fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.lock().await.as_ref().map(|l| l.addr)
    }
}

async fn close_listener(l: RunningListener) {
    l.cancel.cancel();
    let _ = l.task.await;
}

/// The host network's TCP listener as a [`StreamListener`].
struct HostListener(TcpListener);

#[async_trait]
impl StreamListener for HostListener {
    async fn accept(&mut self) -> std::io::Result<(Stream, SocketAddr)> {
        let (s, src) = self.0.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((Stream::Tcp(s), src))
    }
    fn local_addr(&self) -> SocketAddr {
        self.0.local_addr().expect("bound socket has an address")
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    mut listener: Box<dyn StreamListener>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, src)) => {
                let s = shared.clone();
                shared.tracker.spawn(s.serve_tcp(sock, src));
            }
            Err(e) => {
                // Out of file descriptors or a transient error: back off briefly
                // instead of spinning.
                tracing::warn!(tenant = %shared.tenant(), instance = %shared.ctx.instance, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[async_trait]
impl Module for Pipe {
    async fn start(&self) -> Result<(), ModuleError> {
        let cfg = self.shared.config();
        let bound = self.bind(&cfg).await?;
        *self.listener.lock().await = Some(self.serve(bound, cfg.protocol));
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let new = PipeConfig::from_document(doc)?;
        let old = self.shared.config();
        let mut listener = self.listener.lock().await;
        let rebind = listener
            .as_ref()
            .is_some_and(|l| new.listen != old.listen || new.protocol != l.protocol);
        *self.shared.source.write().expect("poisoned") = doc.source.clone();
        if rebind {
            // Bind first: if the new address is taken, the old listener keeps
            // serving. (TCP and UDP ports are separate, so a protocol change on
            // the same port binds too.)
            let bound = self.bind(&new).await?;
            *self.shared.config.write().expect("poisoned") = Arc::new(new.clone());
            if let Some(old_l) = listener.take() {
                close_listener(old_l).await;
            }
            *listener = Some(self.serve(bound, new.protocol));
        } else {
            *self.shared.config.write().expect("poisoned") = Arc::new(new);
        }
        Ok(())
    }

    async fn drain(&self) {
        if let Some(l) = self.listener.lock().await.take() {
            close_listener(l).await;
        }
    }

    async fn stop(&self) {
        self.drain().await;
        self.shared.conns_cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.shared.config();
        serde_json::json!({
            "listen": cfg.listen.to_string(),
            "remote": match (&cfg.remote, &cfg.peer) {
                (Some(r), _) => r.to_string(),
                (None, Some(p)) => format!("peer {p}"),
                (None, None) => String::new(),
            },
            "via": cfg.via,
            "listen_via": cfg.listen_via,
            "protocol": cfg.protocol,
            "active": self.shared.active.load(Ordering::Relaxed),
            "max_connections": cfg.max_connections,
        })
    }
}
