//! `kind: pipe`: a named proxy from a local `listen` address to a `remote`.
//!
//! A TCP pipe is its config plus one call into the core path: the shared
//! accept loop ([`OnRamp::serve`]: host or VPN address, connection limit,
//! drain, binding again after an interface restart) hands each connection
//! to [`OnRamp::connect`] (flow, policy, route in the pipe's `vnet`, dial,
//! join, typed end). `via:` pins the connector (a WireGuard instance) and
//! `peer:` names the target by the peer's VPN address: both are sugar for a
//! route. A UDP pipe has one session per client address (`udp`), routed
//! and carried the same way (datagrams through a WireGuard network too).
//!
//! Reload swaps the config for new connections; a changed `listen` binds the
//! new address before the old listener closes, and open connections are
//! never touched. Offers no capability to other modules.

pub mod config;
mod udp;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use configstore::Document;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::net::datagram::DatagramSocket;
use crate::core::net::proxy::Stream;
use crate::core::spine::module::{
    Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan, Need,
};
use crate::core::spine::onramp::{
    Accepted, ConnectRequest, ListenOn, OnRamp, RouteVia, RunningListener, StreamHandler, Target,
};
use crate::core::spine::router::Connector;

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
            needs: match (&cfg.peer, &cfg.via) {
                (Some(peer), Some(via)) => vec![Need {
                    instance: via.clone(),
                    name: format!("peer {peer}"),
                    key: "peer".into(),
                }],
                _ => Vec::new(),
            },
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let config = PipeConfig::from_document(doc)?;
        Ok(Arc::new(Pipe {
            onramp: OnRamp::new(ctx),
            state: Arc::new(State {
                source: RwLock::new(doc.source.clone()),
                config: RwLock::new(Arc::new(config)),
            }),
            listener: Mutex::new(None),
        }))
    }
}

/// A running pipe.
pub struct Pipe {
    onramp: Arc<OnRamp>,
    state: Arc<State>,
    listener: Mutex<Option<Running>>,
}

/// The pipe's config, shared with its connections.
struct State {
    source: RwLock<String>,
    config: RwLock<Arc<PipeConfig>>,
}

impl State {
    fn config(&self) -> Arc<PipeConfig> {
        self.config.read().expect("pipe config poisoned").clone()
    }

    /// Where connections go: `remote`, or the named peer's VPN address with
    /// the remote's (else the listen) port.
    fn target(&self, ctx: &ModuleContext, cfg: &PipeConfig) -> Target {
        let Some(peer) = &cfg.peer else {
            return Target::Addr(cfg.remote.clone().expect("validated: remote or peer"));
        };
        let via = cfg.via.as_deref().expect("validated: peer needs via");
        let port = cfg.remote.as_ref().map_or(cfg.listen.0.port(), |r| r.port);
        match ctx
            .find(via)
            .and_then(|m| m.vnet())
            .and_then(|v| v.peer_address(peer))
        {
            Some(ip) => Target::Addr(HostPort {
                host: ip.to_string(),
                port,
            }),
            None => Target::Unknown {
                label: format!("peer {peer}:{port}"),
                error: format!(
                    "`{via}` has no peer named `{peer}` with one VPN address to dial (a /32 or /128 in its allowed_ips)"
                ),
            },
        }
    }
}

#[async_trait]
impl StreamHandler for State {
    fn max_connections(&self) -> usize {
        self.config().max_connections
    }

    fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.config().accept_proxy_protocol.clone()
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let cfg = self.config();
        let via = match &cfg.via {
            Some(m) => RouteVia::Pinned(Connector::Module(m.clone())),
            None => RouteVia::Vnet(cfg.vnet.clone()),
        };
        let req = ConnectRequest {
            src: conn.src,
            target: self.target(onramp.ctx(), &cfg),
            identity: None,
            via,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.effective_idle_timeout(),
            // Only a PROXY header sent upstream names it.
            client_dst: match cfg.proxy_protocol {
                Some(_) => conn.dst_of(&client),
                None => None,
            },
            proxy_protocol: cfg.proxy_protocol,
            chosen_by: crate::core::spine::dest::ChosenBy::Operator,
        };
        onramp.connect(client, req).await;
    }
}

/// A serving listener: TCP through the on-ramp, or a UDP session loop.
enum Running {
    Tcp(RunningListener),
    Udp {
        addr: SocketAddr,
        cancel: CancellationToken,
        task: JoinHandle<()>,
    },
}

impl Running {
    fn addr(&self) -> SocketAddr {
        match self {
            Running::Tcp(l) => l.local_addr(),
            Running::Udp { addr, .. } => *addr,
        }
    }

    fn protocol(&self) -> PipeProtocol {
        match self {
            Running::Tcp(_) => PipeProtocol::Tcp,
            Running::Udp { .. } => PipeProtocol::Udp,
        }
    }

    async fn close(self) {
        match self {
            Running::Tcp(l) => l.close().await,
            Running::Udp { cancel, task, .. } => {
                cancel.cancel();
                let _ = task.await;
            }
        }
    }
}

/// Bound but not yet serving.
enum Bound {
    Stream(ListenOn, Box<dyn crate::core::net::listen::StreamListener>),
    Udp(ListenOn, Arc<dyn DatagramSocket>),
}

impl Pipe {
    fn listen_error(&self, on: &ListenOn, e: std::io::Error) -> ModuleError {
        let source = self.state.source.read().expect("poisoned").clone();
        ModuleError::Config(on.bind_error(&source, &e))
    }

    async fn bind(&self, cfg: &PipeConfig) -> Result<Bound, ModuleError> {
        let on = ListenOn::new(cfg.listen.0, cfg.listen_via.as_ref());
        if cfg.protocol == PipeProtocol::Udp {
            return self
                .onramp
                .bind_udp(&on)
                .await
                .map_err(|e| self.listen_error(&on, e))
                .map(|s| Bound::Udp(on, s));
        }
        self.onramp
            .bind(&on)
            .await
            .map_err(|e| self.listen_error(&on, e))
            .map(|l| Bound::Stream(on, l))
    }

    fn serve(&self, bound: Bound) -> Running {
        match bound {
            Bound::Stream(on, l) => Running::Tcp(self.onramp.serve(on, l, self.state.clone())),
            Bound::Udp(on, s) => {
                let addr = s.local_addr().expect("bound socket has an address");
                let cancel = CancellationToken::new();
                let ctx = self.onramp.ctx();
                tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, %addr, "listening (udp)");
                let task = tokio::spawn(udp::serve(
                    self.onramp.clone(),
                    self.state.clone(),
                    s,
                    on,
                    cancel.clone(),
                ));
                Running::Udp { addr, cancel, task }
            }
        }
    }

    /// The address the pipe accepts on (useful with port 0).
    pub async fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.lock().await.as_ref().map(Running::addr)
    }
}

#[async_trait]
impl Module for Pipe {
    async fn start(&self) -> Result<(), ModuleError> {
        let cfg = self.state.config();
        let bound = self.bind(&cfg).await?;
        *self.listener.lock().await = Some(self.serve(bound));
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let new = PipeConfig::from_document(doc)?;
        let old = self.state.config();
        let mut listener = self.listener.lock().await;
        let rebind = listener.as_ref().is_some_and(|l| {
            new.listen != old.listen
                || new.protocol != l.protocol()
                || new.listen_via != old.listen_via
        });
        *self.state.source.write().expect("poisoned") = doc.source.clone();
        if rebind {
            // Bind first: if the new address is taken, the old listener keeps
            // serving. (TCP and UDP ports are separate, so a protocol change on
            // the same port binds too.)
            let bound = self.bind(&new).await?;
            *self.state.config.write().expect("poisoned") = Arc::new(new);
            if let Some(old_l) = listener.take() {
                old_l.close().await;
            }
            *listener = Some(self.serve(bound));
        } else {
            *self.state.config.write().expect("poisoned") = Arc::new(new);
        }
        Ok(())
    }

    async fn drain(&self) {
        if let Some(l) = self.listener.lock().await.take() {
            l.close().await;
        }
    }

    async fn stop(&self) {
        self.drain().await;
        self.onramp.stop().await;
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.state.config();
        serde_json::json!({
            "listen": cfg.listen.to_string(),
            "remote": match (&cfg.remote, &cfg.peer) {
                (Some(r), _) => r.to_string(),
                (None, Some(p)) => format!("peer {p}"),
                (None, None) => String::new(),
            },
            "via": cfg.via,
            "vnet": cfg.vnet,
            "listen_via": cfg.listen_via,
            "protocol": cfg.protocol,
            "active": self.onramp.active(),
            "max_connections": cfg.max_connections,
        })
    }
}
