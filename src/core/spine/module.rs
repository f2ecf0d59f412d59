//! The module contract: what every kind implements and what it is given.
//!
//! A *kind* (`pipe`, `wireguard`, ...) registers one [`ModuleFactory`]. The
//! registry hands the factory each document whose `kind:` names it; the
//! factory checks it ([`ModuleFactory::check`], no side effects, used by
//! `--check`) and builds a [`Module`] from it. The module then lives through
//! start → (reload)* → drain → stop.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};

use async_trait::async_trait;
use configstore::{Document, InstanceKey};

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::metrics::{InstanceMetrics, Metrics};
use crate::core::net::dial::{DialError, Dialer, DirectDialer};
use crate::core::net::proxy::Stream;
use crate::core::spine::flow::FlowTable;
use crate::core::spine::router::Connector;
use crate::core::spine::tenant::Tenant;

/// What a module can fail with at start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The config is wrong (names file and key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something outside the config failed (a port in use, a missing capability).
    #[error("{0}")]
    Runtime(String),
}

/// What [`ModuleFactory::check`] learns from a document without acting on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModulePlan {
    /// Instances of the same tenant that must be started first.
    pub depends_on: Vec<String>,
    /// Names this instance needs for itself across the whole node (e.g.
    /// `wireguard interface wg0`); two documents claiming one are a config
    /// error naming both, found by `--check` as well as at start.
    pub claims: Vec<String>,
    /// Names this instance answers for other instances of its tenant (a
    /// WireGuard instance: `peer <name>` for each peer), so a reference to
    /// one is checked by `--check` as well as at start.
    pub offers: Vec<Offer>,
    /// Names of other instances' [`ModulePlan::offers`] this one uses.
    pub needs: Vec<Need>,
}

/// A name an instance answers for (see [`ModulePlan::offers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// What is offered, e.g. `peer client-a`.
    pub name: String,
    /// Why the name exists but cannot serve a reference (e.g. a peer with
    /// no single address to dial); `None` when it can.
    pub unusable: Option<String>,
}

/// A reference to another instance's [`Offer`] (see [`ModulePlan::needs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The instance of the same tenant that must offer it.
    pub instance: String,
    /// The offer's name, e.g. `peer server`.
    pub name: String,
    /// The key of this document that makes the reference.
    pub key: String,
}

/// Builds modules of one kind.
pub trait ModuleFactory: Send + Sync {
    /// The kind name documents use in `kind:`.
    fn kind(&self) -> &'static str;
    /// Validates a document; no sockets, no files beyond the document.
    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError>;
    /// Builds a module (not started yet) from a checked document.
    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError>;
}

/// A running module instance.
#[async_trait]
pub trait Module: Send + Sync + 'static {
    /// Starts serving (binds listeners, spawns tasks).
    async fn start(&self) -> Result<(), ModuleError>;
    /// Applies a new document of the same kind without dropping unaffected
    /// traffic. On error, the module keeps running its old config.
    async fn reload(&self, doc: &Document) -> Result<(), ModuleError>;
    /// Stops accepting new work; open flows continue.
    async fn drain(&self);
    /// Closes everything, open flows included, and waits until they are gone.
    async fn stop(&self);
    /// Details for the admin API (listen address, peers, ...).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The dialer capability, if flows can leave through this module.
    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        None
    }
    /// The virtual network this module hosts, if any (listen in it).
    fn vnet(&self) -> Option<Arc<dyn crate::core::net::listen::VirtualNetwork>> {
        None
    }
}

/// Finds other modules by name. Held by modules; never keeps the registry alive.
#[derive(Clone, Default)]
pub struct ModuleDirectory {
    inner: Arc<RwLock<HashMap<InstanceKey, Arc<dyn Module>>>>,
    faults: Faults,
    listeners: crate::core::net::listen::HostListeners,
}

/// Instances that failed while running (one of their tasks panicked) and
/// are recovering, with why: the node is not ready while any is listed.
#[derive(Clone, Default)]
pub struct Faults(Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>);

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, String>> {
        // A panic elsewhere must not take the list with it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `tenant/instance` failed.
    pub fn set(&self, who: &str, why: &str) {
        self.lock().insert(who.to_string(), why.to_string());
    }

    /// `tenant/instance` works again (or is gone).
    pub fn clear(&self, who: &str) {
        self.lock().remove(who);
    }

    /// `(tenant/instance, why)` of every failed instance.
    pub fn list(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl ModuleDirectory {
    pub(crate) fn insert(&self, key: InstanceKey, m: Arc<dyn Module>) {
        self.inner
            .write()
            .expect("directory poisoned")
            .insert(key, m);
    }
    pub(crate) fn remove(&self, key: &InstanceKey) {
        self.inner.write().expect("directory poisoned").remove(key);
    }
    /// The module `name` of `tenant`, if it exists.
    pub fn get(&self, tenant: &str, name: &str) -> Option<Arc<dyn Module>> {
        self.inner
            .read()
            .expect("directory poisoned")
            .get(&InstanceKey::new(tenant, name))
            .cloned()
    }
    fn downgrade(&self) -> Weak<RwLock<HashMap<InstanceKey, Arc<dyn Module>>>> {
        Arc::downgrade(&self.inner)
    }
    /// The instances failed and recovering.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }
    /// The node's listening sockets on the host, by owner.
    pub fn listeners(&self) -> &crate::core::net::listen::HostListeners {
        &self.listeners
    }
}

/// Everything a module is given when it is built.
#[derive(Clone)]
pub struct ModuleContext {
    /// Its tenant.
    pub tenant: Arc<Tenant>,
    /// Its instance name.
    pub instance: String,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Pre-resolved series for this instance.
    pub instance_metrics: InstanceMetrics,
    /// The node's flow table.
    pub flows: Arc<FlowTable>,
    directory: Weak<RwLock<HashMap<InstanceKey, Arc<dyn Module>>>>,
    faults: Faults,
    /// The node's listening sockets on the host, by owner.
    pub listeners: crate::core::net::listen::HostListeners,
    /// Its kind (`socks`, `pipe`, ...), as policies match on-ramps.
    pub kind: String,
}

impl ModuleContext {
    /// Builds a context for one instance.
    pub fn new(
        tenant: Arc<Tenant>,
        instance: &str,
        metrics: Arc<Metrics>,
        flows: Arc<FlowTable>,
        directory: &ModuleDirectory,
    ) -> Self {
        Self {
            instance_metrics: metrics.instance(&tenant.name, instance),
            tenant,
            instance: instance.to_string(),
            metrics,
            flows,
            directory: directory.downgrade(),
            faults: directory.faults.clone(),
            listeners: directory.listeners.clone(),
            kind: String::new(),
        }
    }

    /// The same context, for an instance of `kind`.
    pub fn with_kind(mut self, kind: &str) -> Self {
        self.kind = kind.to_string();
        self
    }

    /// Reports that this instance failed while running (one of its tasks
    /// panicked) and is being restarted: the node is not ready until
    /// [`ModuleContext::recovered`].
    pub fn failed(&self, why: &str) {
        tracing::error!(tenant = %self.tenant.name, instance = %self.instance, reason = why, "module instance failed; restarting it");
        self.faults
            .set(&format!("{}/{}", self.tenant.name, self.instance), why);
    }

    /// This instance runs again after [`ModuleContext::failed`] (counted as
    /// a restart), or was stopped.
    pub fn recovered(&self, restarted: bool) {
        if restarted {
            self.metrics.restart(&self.tenant.name, &self.instance);
            tracing::info!(tenant = %self.tenant.name, instance = %self.instance, "module instance restarted");
        }
        self.faults
            .clear(&format!("{}/{}", self.tenant.name, self.instance));
    }

    /// Dials `target` through `connector`: the host network, or the dialer
    /// of the module it names. Routing happens before, in
    /// [`crate::core::spine::onramp::OnRamp::connect`]. `meta` (the flow's
    /// client and trace) goes to a module's dialer.
    pub async fn dial(
        &self,
        connector: &Connector,
        target: &HostPort,
        timeout: std::time::Duration,
        meta: &crate::core::net::dial::DialMeta,
    ) -> Result<Stream, DialError> {
        match connector {
            Connector::Direct => DirectDialer.dial_tcp(target, timeout, meta).await,
            Connector::Module(name) => {
                let dialer = self.find(name).and_then(|m| m.dialer()).ok_or_else(|| {
                    DialError::NoRoute(format!(
                        "the route to {target} names `{name}`, which is not a running module with a dialer in tenant `{}`",
                        self.tenant.name
                    ))
                })?;
                dialer.dial_tcp(target, timeout, meta).await
            }
            Connector::Reject => Err(DialError::NoRoute(format!(
                "{target}: the route is `reject`"
            ))),
        }
    }

    /// A UDP socket for datagrams to `remote` through `connector` (bound
    /// on the connector's side). Routing happens before.
    pub async fn bind_udp(
        &self,
        connector: &Connector,
        remote: std::net::SocketAddr,
    ) -> Result<Arc<dyn crate::core::net::datagram::DatagramSocket>, DialError> {
        match connector {
            Connector::Direct => DirectDialer.bind_udp(remote).await,
            Connector::Module(name) => {
                let dialer = self.find(name).and_then(|m| m.dialer()).ok_or_else(|| {
                    DialError::NoRoute(format!(
                        "the route to {remote} names `{name}`, which is not a running module with a dialer in tenant `{}`",
                        self.tenant.name
                    ))
                })?;
                dialer.bind_udp(remote).await
            }
            Connector::Reject => Err(DialError::NoRoute(format!(
                "{remote}: the route is `reject`"
            ))),
        }
    }

    /// Another module of the same tenant, by instance name.
    pub fn find(&self, name: &str) -> Option<Arc<dyn Module>> {
        let dir = self.directory.upgrade()?;
        let map = dir.read().expect("directory poisoned");
        map.get(&InstanceKey::new(self.tenant.name.clone(), name))
            .cloned()
    }
}
