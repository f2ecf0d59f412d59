//! `kind: vnet`: one virtual network of a tenant, its routes and names.
//!
//! The instance name is the vnet's name. The document sets whether it is the
//! tenant's default, its engine, its routes (`CIDR | host | *.suffix | *` →
//! `direct | reject | <module>`) and a static `hosts` map. The state lives
//! in the tenant ([`crate::core::spine::vnet::Vnets`]), where every on-ramp's
//! routing reads it; start publishes it, reload replaces it (new flows see
//! the change, open ones keep their route), stop withdraws it. WireGuard
//! instances attach with `vnet: <name>` and add their peers' allowed IPs.
//! Offers no capability to other modules.

pub mod config;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use configstore::Document;

use crate::core::config::ConfigError;
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};

pub use config::VnetConfig;

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
        }))
    }
}

/// A published vnet.
pub struct VnetModule {
    ctx: ModuleContext,
    current: Mutex<VnetConfig>,
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
}

#[async_trait]
impl Module for VnetModule {
    async fn start(&self) -> Result<(), ModuleError> {
        let cfg = self.current.lock().expect("poisoned").clone();
        self.publish(&cfg);
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let cfg = VnetConfig::from_document(doc)?;
        self.publish(&cfg);
        *self.current.lock().expect("poisoned") = cfg;
        Ok(())
    }

    async fn drain(&self) {}

    async fn stop(&self) {
        self.ctx.tenant.vnets.remove(&self.ctx.instance);
    }

    fn status(&self) -> serde_json::Value {
        let vnet = self
            .current
            .lock()
            .expect("poisoned")
            .to_vnet(&self.ctx.instance);
        serde_json::json!({
            "default": vnet.default,
            "engine": vnet.engine,
            "routes": vnet.routes.routes().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "hosts": vnet.hosts,
        })
    }
}
