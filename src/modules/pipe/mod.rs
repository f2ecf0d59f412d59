//! `kind: pipe`: a named proxy from a local `listen` address to a `remote`.
//!
//! A pipe is a [`Door`]: [`DoorModule`] binds, serves, reloads and drains
//! it as it does every door. A TCP pipe is its config plus one call into
//! the core path: the shared accept loop ([`OnRamp::serve`]: host or VPN
//! address, connection limit, drain, binding again after an interface
//! restart) hands each connection to [`OnRamp::connect`] (flow, policy,
//! route in the pipe's `vnet`, dial, join, typed end). `via:` pins the connector (a WireGuard instance) and
//! `peer:` names the target by the peer's VPN address: both are sugar for a
//! route. A UDP pipe has one session per client address (`udp`), routed
//! and carried the same way (datagrams through a WireGuard network too).
//!
//! Reload swaps the config for new connections; a changed `listen` (or
//! protocol) binds the new socket before the old listener closes, and open
//! connections are never touched. Offers no capability to other modules.

pub mod config;
mod udp;

use std::sync::Arc;

use async_trait::async_trait;
use configstore::Document;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::net::datagram::DatagramSocket;
use crate::core::net::proxy::Stream;
use crate::core::spine::door::{Door, DoorFactory, DoorModule, DoorSettings, Live};
use crate::core::spine::module::{ModuleContext, Need};
use crate::core::spine::onramp::{
    Accepted, ConnectRequest, ListenOn, OnRamp, RouteVia, StreamHandler, Target,
};
use crate::core::spine::router::Connector;

pub use config::{PipeConfig, PipeProtocol};

/// Builds pipes.
pub type PipeFactory = DoorFactory<Pipe>;

/// A running pipe (the module is a [`DoorModule`]).
pub type PipeModule = DoorModule<Pipe>;

/// A pipe's connections: its config, read when each starts.
pub struct Pipe {
    live: Arc<Live<PipeConfig>>,
}

impl Pipe {
    fn config(&self) -> Arc<PipeConfig> {
        self.live.get()
    }

    /// Where connections go: `remote`, or the named peer's VPN address with
    /// the remote's (else the listen) port.
    fn target(&self, ctx: &ModuleContext, cfg: &PipeConfig) -> Target {
        let Some(peer) = &cfg.peer else {
            return Target::Addr(cfg.remote.clone().expect("validated: remote or peer"));
        };
        let via = cfg.via.as_deref().expect("validated: peer needs via");
        let port = cfg
            .remote
            .as_ref()
            .map_or(cfg.door.listen.0.port(), |r| r.port);
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

    /// The route: pinned to `via`, or the vnet's table.
    fn route(cfg: &PipeConfig) -> RouteVia {
        match &cfg.via {
            Some(m) => RouteVia::Pinned(Connector::Module(m.clone())),
            None => RouteVia::Vnet(cfg.door.vnet.clone()),
        }
    }
}

#[async_trait]
impl Door for Pipe {
    const KIND: &'static str = "pipe";
    type Config = PipeConfig;

    fn parse(doc: &Document) -> Result<PipeConfig, ConfigError> {
        PipeConfig::from_document(doc)
    }

    fn settings(config: &PipeConfig) -> &DoorSettings {
        &config.door
    }

    fn new(live: Arc<Live<PipeConfig>>) -> Self {
        Pipe { live }
    }

    fn depends_on(config: &PipeConfig) -> Vec<String> {
        config.depends_on()
    }

    fn needs(config: &PipeConfig) -> Vec<Need> {
        match (&config.peer, &config.via) {
            (Some(peer), Some(via)) => vec![Need {
                instance: via.clone(),
                name: format!("peer {peer}"),
                key: "peer".into(),
            }],
            _ => Vec::new(),
        }
    }

    fn datagrams(config: &PipeConfig) -> bool {
        config.protocol == PipeProtocol::Udp
    }

    async fn serve_datagrams(
        self: Arc<Self>,
        onramp: Arc<OnRamp>,
        socket: Arc<dyn DatagramSocket>,
        on: ListenOn,
        cancel: CancellationToken,
    ) {
        udp::serve(onramp, self, socket, on, cancel).await
    }

    fn status(&self, cfg: &PipeConfig, onramp: &OnRamp) -> serde_json::Value {
        let mut map = cfg.door.status(onramp);
        map.insert(
            "remote".into(),
            match (&cfg.remote, &cfg.peer) {
                (Some(r), _) => r.to_string(),
                (None, Some(p)) => format!("peer {p}"),
                (None, None) => String::new(),
            }
            .into(),
        );
        map.insert("via".into(), cfg.via.clone().into());
        map.insert(
            "protocol".into(),
            serde_json::to_value(cfg.protocol).unwrap_or_default(),
        );
        serde_json::Value::Object(map)
    }
}

#[async_trait]
impl StreamHandler for Pipe {
    fn max_connections(&self) -> usize {
        self.config().door.max_connections
    }

    fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.config().door.accept_proxy_protocol.clone()
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let cfg = self.config();
        let req = ConnectRequest {
            src: conn.src,
            target: self.target(onramp.ctx(), &cfg),
            identity: None,
            via: Self::route(&cfg),
            connect_timeout: cfg.door.connect_timeout,
            idle_timeout: cfg.effective_idle_timeout(),
            // Only a PROXY header sent upstream names it.
            client_dst: match cfg.proxy_protocol {
                Some(_) => conn.dst_of(&client),
                None => None,
            },
            proxy_protocol: cfg.proxy_protocol,
            chosen_by: crate::core::spine::dest::ChosenBy::Operator,
            trace: None,
        };
        onramp.connect(client, req).await;
    }
}
