//! Doors: the module kinds that accept connections on one listener and
//! speak a handshake before the one path (SOCKS, HTTP proxy, SSH).
//!
//! A door kind implements [`Door`]: how its document is read, where it
//! listens, what it does per connection (it is the listener's
//! [`StreamHandler`]) and what its status shows. [`DoorModule`] is then the
//! whole [`Module`]: start binds, a reload that moves the listener binds
//! the new address first (the old one serves on if that fails) and every
//! reload swaps the config for new connections, drain closes the listener,
//! stop ends the connections. [`Live`] holds the config the connections
//! read.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use configstore::Document;

use crate::core::config::ConfigError;
use crate::core::net::listen::StreamListener;
use crate::core::spine::module::{Module, ModuleContext, ModuleError};
use crate::core::spine::onramp::{DoorListener, ListenOn, OnRamp, StreamHandler};

/// A door's running config and the source of its document; reloads swap
/// both, connections read the config when they start.
pub struct Live<C> {
    config: RwLock<Arc<C>>,
    source: RwLock<String>,
}

impl<C> Live<C> {
    /// The config read from `source`.
    pub fn new(config: C, source: &str) -> Self {
        Live {
            config: RwLock::new(Arc::new(config)),
            source: RwLock::new(source.to_string()),
        }
    }

    /// The config now.
    pub fn get(&self) -> Arc<C> {
        self.config.read().expect("door config poisoned").clone()
    }

    /// Where it came from (for errors).
    pub fn source(&self) -> String {
        self.source.read().expect("door config poisoned").clone()
    }

    /// Replaces both.
    pub fn set(&self, config: C, source: &str) {
        *self.config.write().expect("door config poisoned") = Arc::new(config);
        *self.source.write().expect("door config poisoned") = source.to_string();
    }
}

/// A door kind: its config, its listener, its connections.
#[async_trait]
pub trait Door: StreamHandler + Sized {
    /// The checked config.
    type Config: Send + Sync + 'static;
    /// Reads and checks a document.
    fn parse(doc: &Document) -> Result<Self::Config, ConfigError>;
    /// Where the door listens.
    fn listen_on(config: &Self::Config) -> ListenOn;
    /// Binds the listener for `config` (default: [`OnRamp::bind`]); a door
    /// that needs more at bind time (a host key) does it here. An error
    /// names the document's key.
    async fn bind(
        &self,
        onramp: &Arc<OnRamp>,
        config: &Self::Config,
        source: &str,
    ) -> Result<Box<dyn StreamListener>, ConfigError> {
        let on = Self::listen_on(config);
        onramp.bind(&on).await.map_err(|e| {
            let (key, addr) = match &on {
                ListenOn::Module { addr, .. } if e.kind() == std::io::ErrorKind::NotFound => {
                    ("listen_via", *addr)
                }
                ListenOn::Module { addr, .. } | ListenOn::Host(addr) => ("listen", *addr),
            };
            ConfigError::key(source, key, format!("cannot listen on {addr}: {e}"))
        })
    }
    /// Whether a reload from `old` to `new` must bind again (default: the
    /// listen address moved).
    fn must_rebind(old: &Self::Config, new: &Self::Config) -> bool {
        Self::listen_on(old) != Self::listen_on(new)
    }
    /// Details for the admin API.
    fn status(&self, config: &Self::Config, onramp: &OnRamp) -> serde_json::Value;
}

/// A door as a module: `D` handles the connections, this does the rest.
pub struct DoorModule<D: Door> {
    onramp: Arc<OnRamp>,
    listener: DoorListener,
    door: Arc<D>,
    live: Arc<Live<D::Config>>,
}

impl<D: Door> DoorModule<D> {
    /// A door for `ctx`; `make` builds the handler around the live config.
    pub fn new(
        ctx: ModuleContext,
        doc: &Document,
        make: impl FnOnce(Arc<Live<D::Config>>) -> D,
    ) -> Result<Self, ConfigError> {
        let live = Arc::new(Live::new(D::parse(doc)?, &doc.source));
        Ok(DoorModule {
            onramp: OnRamp::new(ctx),
            listener: DoorListener::default(),
            door: Arc::new(make(live.clone())),
            live,
        })
    }

    /// The address the door accepts on (the port chosen, with port 0).
    pub async fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().await
    }

    async fn listen(&self, config: &D::Config, source: &str) -> Result<(), ModuleError> {
        let l = self.door.bind(&self.onramp, config, source).await?;
        self.listener
            .serve_bound(&self.onramp, D::listen_on(config), l, self.door.clone())
            .await;
        Ok(())
    }
}

#[async_trait]
impl<D: Door> Module for DoorModule<D> {
    async fn start(&self) -> Result<(), ModuleError> {
        self.listen(&self.live.get(), &self.live.source()).await
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let new = D::parse(doc)?;
        if D::must_rebind(&self.live.get(), &new) {
            self.listen(&new, &doc.source).await?;
        }
        self.live.set(new, &doc.source);
        Ok(())
    }

    async fn drain(&self) {
        self.listener.close().await;
    }

    async fn stop(&self) {
        self.drain().await;
        self.onramp.stop().await;
    }

    fn status(&self) -> serde_json::Value {
        self.door.status(&self.live.get(), &self.onramp)
    }
}
