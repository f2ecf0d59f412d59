//! `kind: vnet`: one virtual network of a tenant, its routes and names.
//!
//! The instance name is the vnet's name. The document sets whether it is the
//! tenant's default, its engine, its routes (`CIDR | host | *.suffix | *` →
//! `direct | reject | <module>`) and a static `hosts` map. The state lives
//! in the tenant ([`crate::core::spine::vnet::Vnets`]), where every on-ramp's
//! routing reads it; start publishes it, reload replaces it (new flows see
//! the change, open ones keep their route), stop withdraws it. WireGuard
//! instances attach with `vnet: <name>` and add their peers' allowed IPs.
//!
//! With `address:`, the vnet owns one IP stack
//! ([`crate::core::spine::vnetstack`]) on its engine, shared by the
//! WireGuard instances that attach without an address of their own; it
//! offers that network to other modules (`listen_via: <vnet>`, routes
//! `via: <vnet>`). A reload that changes the address, MTU or engine
//! restarts the stack (its connections end, listeners bind again).

pub mod config;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use configstore::Document;

use crate::core::config::ConfigError;
use crate::core::engine::userspace::metrics::NetStackMetrics;
use crate::core::engine::{EngineConfig, EngineError, EngineKind, EngineNetwork, StackOwner};
use crate::core::net::dial::Dialer;
use crate::core::net::listen::VirtualNetwork;
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::spine::vnetstack::VnetStack;

pub use config::{StackConfig, VnetConfig};

/// Builds vnets.
pub struct VnetFactory;

impl ModuleFactory for VnetFactory {
    fn kind(&self) -> &'static str {
        "vnet"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        VnetConfig::from_document(doc)?;
        Ok(ModulePlan::default())
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = VnetConfig::from_document(doc)?;
        Ok(Arc::new(VnetModule {
            ctx,
            current: Mutex::new(cfg),
            source: Mutex::new(doc.source.clone()),
            stack: Arc::new(Mutex::new(None)),
        }))
    }
}

/// A published vnet.
pub struct VnetModule {
    ctx: ModuleContext,
    current: Mutex<VnetConfig>,
    /// Where `current` came from.
    source: Mutex<String>,
    /// The vnet's own IP stack, with `address:`.
    stack: Arc<Mutex<Option<Arc<VnetStack>>>>,
}

impl VnetModule {
    fn publish(&self, cfg: &VnetConfig) {
        self.ctx.tenant.vnets.set(cfg.to_vnet(&self.ctx.instance));
        tracing::info!(
            tenant = %self.ctx.tenant.name,
            vnet = %self.ctx.instance,
            default = cfg.default,
            routes = cfg.routes.len(),
            hosts = cfg.hosts.len(),
            "vnet configured"
        );
    }

    /// The vnet's stack as a capability (follows restarts).
    fn network(&self) -> EngineNetwork {
        let slot = self.stack.clone();
        EngineNetwork::new(
            Arc::new(move || {
                slot.lock()
                    .expect("poisoned")
                    .as_ref()
                    .and_then(|s| s.engine())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "the vnet's stack is down",
                        )
                    })
            }),
            None,
        )
    }

    fn stack(&self) -> Option<Arc<VnetStack>> {
        self.stack.lock().expect("poisoned").clone()
    }

    fn engine_config(&self, s: &StackConfig) -> EngineConfig {
        EngineConfig {
            addresses: s.addresses.clone(),
            mtu: s.mtu,
            keep_alive: s.tcp_keepalive,
            tcp_timeout: s.tcp_timeout,
            congestion_control: s.congestion_control.clone(),
            label: format!("{}/{}", self.ctx.tenant.name, self.ctx.instance),
            owner: Some(StackOwner {
                metrics: self.ctx.metrics.clone(),
                tenant: self.ctx.tenant.name.clone(),
                instance: self.ctx.instance.clone(),
            }),
        }
    }

    /// Brings the stack to what `new` says (from `old`): started, restarted
    /// or stopped. On error nothing changed.
    async fn apply_stack(
        &self,
        old: Option<(&StackConfig, EngineKind)>,
        new: &VnetConfig,
        source: &str,
    ) -> Result<(), ModuleError> {
        let kind = new
            .engine
            .unwrap_or_else(|| self.ctx.tenant.vnets.default_engine());
        let failed = |e: EngineError| -> ModuleError {
            ConfigError::key(source, "engine", e.to_string()).into()
        };
        match (&new.stack, self.stack()) {
            (None, None) => {}
            (None, Some(stack)) => {
                let links = stack.linked();
                if !links.is_empty() {
                    return Err(ConfigError::key(
                        source,
                        "address",
                        format!(
                            "cannot be removed while {} use the vnet's stack; give them an `address:` first",
                            links.join(", ")
                        ),
                    )
                    .into());
                }
                stack.shutdown();
                self.ctx.tenant.vnets.set_stack(&self.ctx.instance, None);
                *self.stack.lock().expect("poisoned") = None;
            }
            (Some(s), None) => {
                let stack = VnetStack::start(kind, &self.engine_config(s))
                    .await
                    .map_err(failed)?;
                self.ctx
                    .tenant
                    .vnets
                    .set_stack(&self.ctx.instance, Some(stack.clone()));
                *self.stack.lock().expect("poisoned") = Some(stack);
                tracing::info!(tenant = %self.ctx.tenant.name, vnet = %self.ctx.instance, addresses = ?s.addresses, engine = %kind, "vnet stack up");
            }
            (Some(s), Some(stack)) => {
                if old != Some((s, kind)) {
                    stack
                        .restart(kind, &self.engine_config(s))
                        .await
                        .map_err(failed)?;
                    tracing::info!(tenant = %self.ctx.tenant.name, vnet = %self.ctx.instance, addresses = ?s.addresses, engine = %kind, "vnet stack restarted");
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Module for VnetModule {
    async fn start(&self) -> Result<(), ModuleError> {
        let cfg = self.current.lock().expect("poisoned").clone();
        self.publish(&cfg);
        let source = self.source.lock().expect("poisoned").clone();
        if let Err(e) = self.apply_stack(None, &cfg, &source).await {
            self.ctx.tenant.vnets.remove(&self.ctx.instance);
            return Err(e);
        }
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let cfg = VnetConfig::from_document(doc)?;
        let old = self.current.lock().expect("poisoned").clone();
        let old_kind = self.stack().and_then(|s| s.engine()).map(|e| e.kind());
        let old_stack = old.stack.as_ref().zip(old_kind);
        self.apply_stack(old_stack.as_ref().map(|(s, k)| (*s, *k)), &cfg, &doc.source)
            .await?;
        self.publish(&cfg);
        *self.current.lock().expect("poisoned") = cfg;
        *self.source.lock().expect("poisoned") = doc.source.clone();
        Ok(())
    }

    async fn drain(&self) {}

    async fn stop(&self) {
        self.ctx.tenant.vnets.remove(&self.ctx.instance);
        self.ctx.tenant.vnets.set_stack(&self.ctx.instance, None);
        if let Some(stack) = self.stack.lock().expect("poisoned").take() {
            stack.shutdown();
        }
        self.ctx
            .metrics
            .subsystem::<NetStackMetrics>()
            .forget(&self.ctx.tenant.name, &self.ctx.instance);
    }

    fn vnet(&self) -> Option<Arc<dyn VirtualNetwork>> {
        self.stack()
            .is_some()
            .then(|| Arc::new(self.network()) as Arc<dyn VirtualNetwork>)
    }

    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        self.stack()
            .is_some()
            .then(|| Arc::new(self.network()) as Arc<dyn Dialer>)
    }

    fn status(&self) -> serde_json::Value {
        let vnet = self
            .current
            .lock()
            .expect("poisoned")
            .to_vnet(&self.ctx.instance);
        let stack = self.stack();
        serde_json::json!({
            "default": vnet.default,
            "engine": vnet.engine,
            "stack": stack.map(|s| serde_json::json!({
                "addresses": s.addresses().iter().map(ToString::to_string).collect::<Vec<_>>(),
                "engine": s.engine().map(|e| e.kind()),
                "links": s.linked(),
            })),
            "routes": vnet.routes.routes().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "hosts": vnet.hosts,
        })
    }
}
