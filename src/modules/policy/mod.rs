//! `kind: policy`: a tenant's rules on who may reach what.
//!
//! The document's rules go into the tenant's
//! [`crate::core::spine::policy::Policies`], where the one path decides
//! every flow of the tenant on them (TCP and UDP of every door and pipe,
//! forwarded IP flows). Start and reload publish the rules and decide every
//! open flow of the tenant again: a flow the new rules deny is closed at
//! once (`policy_revoked`). A reload with an error keeps the old rules;
//! stop withdraws them (and open flows are decided again without them).

pub mod config;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use configstore::Document;

use crate::core::config::ConfigError;
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::spine::policy::PolicyDoc;

/// Builds policies.
pub struct PolicyFactory;

impl ModuleFactory for PolicyFactory {
    fn kind(&self) -> &'static str {
        "policy"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        config::from_document(doc)?;
        Ok(ModulePlan::default())
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        Ok(Arc::new(PolicyModule {
            current: Mutex::new(config::from_document(doc)?),
            ctx,
        }))
    }
}

/// One policy document of a tenant.
pub struct PolicyModule {
    ctx: ModuleContext,
    current: Mutex<PolicyDoc>,
}

impl PolicyModule {
    /// Puts `doc` in force and decides the tenant's open flows again.
    fn publish(&self, doc: Option<PolicyDoc>) {
        let tenant = &self.ctx.tenant;
        let rules = doc.as_ref().map_or(0, |d| d.rules.len());
        match doc {
            Some(d) => tenant.policy.set(&self.ctx.instance, d),
            None => tenant.policy.remove(&self.ctx.instance),
        }
        let revoked = self.ctx.flows.revalidate(&tenant.name);
        tracing::info!(tenant = %tenant.name, instance = %self.ctx.instance, rules, revoked, "policy in force");
    }
}

#[async_trait]
impl Module for PolicyModule {
    async fn start(&self) -> Result<(), ModuleError> {
        let doc = self.current.lock().expect("poisoned").clone();
        self.publish(Some(doc));
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let new = config::from_document(doc)?;
        *self.current.lock().expect("poisoned") = new.clone();
        self.publish(Some(new));
        Ok(())
    }

    async fn drain(&self) {}

    async fn stop(&self) {
        self.publish(None);
    }

    fn status(&self) -> serde_json::Value {
        let doc = self.current.lock().expect("poisoned");
        let set = self.ctx.tenant.policy.current();
        serde_json::json!({
            "default": if doc.default_deny { "deny" } else { "allow" },
            "rules": doc.rules.iter().map(|r| serde_json::json!({
                "name": r.name,
                "action": r.action,
                "dry_run": r.dry_run,
            })).collect::<Vec<_>>(),
            "tenant_rules": set.len(),
        })
    }
}
