//! `kind: forward`, a whole door in under 100 lines: every connection goes
//! to the one `to:` target, through the tenant's routes, policy, flow table
//! and audit like any other. A door is its config, its per-connection
//! handler and its status; `DoorFactory` and `DoorModule` do the rest (check,
//! bind, rebind on reload, live config, drain, stop, the connection limit).
//!
//! ```yaml
//! kind: forward
//! listen: 127.0.0.1:8080
//! to: nginx.internal:80     # routed in the door's vnet
//! ```
//!
//! Registered beside the built-in kinds:
//! `factories.push(Arc::new(DoorFactory::<Forward>::default()))`.
//! `tests/door_example.rs` runs it with curl and nginx.

use std::sync::Arc;

use async_trait::async_trait;
use configstore::Document;
use meshgate::core::addr::HostPort;
use meshgate::core::config::ConfigError;
use meshgate::core::net::proxy::Stream;
use meshgate::core::spine::dest::ChosenBy;
use meshgate::core::spine::door::{Door, DoorSettings, Live};
use meshgate::core::spine::onramp::{
    Accepted, ConnectRequest, OnRamp, RouteVia, StreamHandler, Target,
};
use serde::Deserialize;

/// A checked `kind: forward` document.
pub struct ForwardConfig {
    /// The keys every door has (listen, vnet, timeouts, limits, ...).
    door: DoorSettings,
    /// Where every connection goes.
    to: HostPort,
}

/// The keys only this door has.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Own {
    to: HostPort,
}

/// The door's connections, reading the live config.
pub struct Forward(Arc<Live<ForwardConfig>>);

#[async_trait]
impl StreamHandler for Forward {
    fn max_connections(&self) -> usize {
        self.0.get().door.max_connections
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let cfg = self.0.get();
        let req = ConnectRequest {
            src: conn.src,
            target: Target::Addr(cfg.to.clone()),
            identity: None,
            via: RouteVia::Vnet(cfg.door.vnet.clone()),
            connect_timeout: cfg.door.connect_timeout,
            idle_timeout: cfg.door.idle_timeout,
            client_dst: conn.dst,
            proxy_protocol: None,
            chosen_by: ChosenBy::Operator,
            trace: None,
        };
        onramp.connect(client, req).await;
    }
}

impl Door for Forward {
    const KIND: &'static str = "forward";
    type Config = ForwardConfig;

    fn parse(doc: &Document) -> Result<ForwardConfig, ConfigError> {
        let (door, own): (DoorSettings, Own) = DoorSettings::parse(doc, &["to"])?;
        Ok(ForwardConfig { door, to: own.to })
    }

    fn settings(cfg: &ForwardConfig) -> &DoorSettings {
        &cfg.door
    }

    fn new(live: Arc<Live<ForwardConfig>>) -> Self {
        Forward(live)
    }

    fn status(&self, cfg: &ForwardConfig, onramp: &OnRamp) -> serde_json::Value {
        let mut status = cfg.door.status(onramp);
        status.insert("to".into(), cfg.to.to_string().into());
        status.into()
    }
}
