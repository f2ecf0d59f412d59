//! The registry: builds, starts, reloads and stops every module instance.
//!
//! It reads documents from the [`ConfigStore`], hands each to the factory its
//! `kind:` names, starts instances per tenant in dependency order, and turns
//! store events into per-instance reloads. A change that fails (bad document,
//! unknown kind, a port in use) is logged and counted in
//! `meshgate_config_reloads_total{result="failed"}`, and the running instance
//! keeps its old config.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use configstore::{ConfigStore, Document, InstanceKey, StoreError, StoreEvent};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::core::config::{document_kind, ConfigError};
use crate::core::metrics::Metrics;
use crate::core::spine::flow::FlowTable;
use crate::core::spine::module::{
    Module, ModuleContext, ModuleDirectory, ModuleFactory, ModulePlan, Offer,
};
use crate::core::spine::tenant::Tenant;

/// A problem found while loading or starting instances.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A document is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An instance failed to start.
    #[error("{source_name}: cannot start {key}: {message}")]
    Start {
        /// The instance.
        key: InstanceKey,
        /// Its document's source.
        source_name: String,
        /// What failed.
        message: String,
    },
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleState {
    /// Serving.
    Running,
    /// Not accepting new work; open flows finishing.
    Draining,
    /// Stopped.
    Stopped,
    /// Never started: its start failed (a port in use, no file descriptor
    /// left), at boot or when its document appeared. The node runs the
    /// rest; the document is tried again when it changes.
    Refused,
}

/// An instance as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Tenant name.
    pub tenant: String,
    /// Instance name.
    pub instance: String,
    /// Module kind.
    pub kind: String,
    /// Its document's source.
    pub source: String,
    /// Life-cycle state.
    pub state: ModuleState,
    /// The last rejected change, if the newest document is not the one running.
    pub last_error: Option<String>,
    /// Live flows that came in through it.
    pub active_flows: usize,
    /// Module-specific details.
    pub details: serde_json::Value,
}

/// A checked document, ready to build.
struct Planned {
    key: InstanceKey,
    kind: String,
    doc: Document,
    plan: ModulePlan,
}

struct InstanceEntry {
    kind: String,
    doc: Document,
    module: Arc<dyn Module>,
    state: ModuleState,
    depends_on: Vec<String>,
    last_error: Option<String>,
}

/// An instance whose start failed (see [`ModuleState::Refused`]).
struct Refused {
    kind: String,
    source: String,
    why: String,
}

struct TenantEntry {
    tenant: Arc<Tenant>,
    instances: BTreeMap<String, InstanceEntry>,
}

/// The module kinds the node knows, by name: what reads and checks a
/// document (shared with the tasks that read tenants in parallel).
#[derive(Clone)]
struct Kinds(Arc<BTreeMap<&'static str, Arc<dyn ModuleFactory>>>);

impl Kinds {
    fn get(&self, kind: &str) -> Option<&Arc<dyn ModuleFactory>> {
        self.0.get(kind)
    }

    fn factory_for(
        &self,
        doc: &Document,
    ) -> Result<(String, &Arc<dyn ModuleFactory>), ConfigError> {
        let kind = document_kind(doc)?;
        match self.0.get(kind.as_str()) {
            Some(f) => Ok((kind, f)),
            None => {
                let known: Vec<&str> = self.0.keys().copied().collect();
                Err(ConfigError::key(
                    &doc.source,
                    "kind",
                    format!(
                        "unknown kind `{kind}`: expected one of {}",
                        known.join(", ")
                    ),
                ))
            }
        }
    }

    /// Reads and checks one document.
    fn plan(&self, key: &InstanceKey, doc: Document) -> Result<Planned, ConfigError> {
        let (kind, factory) = self.factory_for(&doc)?;
        let plan = factory.check(&doc)?;
        Ok(Planned {
            key: key.clone(),
            kind,
            doc,
            plan,
        })
    }

    /// Reads and checks the documents of one tenant: those that pass,
    /// and the errors of the rest.
    async fn read_tenant(
        &self,
        store: &dyn ConfigStore,
        tenant: &str,
    ) -> (Vec<Planned>, Vec<RegistryError>) {
        let (mut planned, mut errors) = (Vec::new(), Vec::new());
        let names = match store.instances(tenant).await {
            Ok(n) => n,
            Err(e) => return (planned, vec![e.into()]),
        };
        for name in names {
            let key = InstanceKey::new(tenant, name);
            match store.get(&key).await {
                Ok(Some(doc)) => match self.plan(&key, doc) {
                    Ok(p) => planned.push(p),
                    Err(e) => errors.push(e.into()),
                },
                Ok(None) => {}
                Err(e) => errors.push(e.into()),
            }
        }
        (planned, errors)
    }
}

/// Holds every module instance of the node.
pub struct Registry {
    factories: Kinds,
    store: Arc<dyn ConfigStore>,
    metrics: Arc<Metrics>,
    flows: Arc<FlowTable>,
    directory: ModuleDirectory,
    tenants: Mutex<BTreeMap<String, TenantEntry>>,
    /// Instances whose start failed, by key.
    refused: std::sync::Mutex<BTreeMap<InstanceKey, Refused>>,
    /// Documents whose change was rejected (the running config kept), and why.
    rejected: std::sync::Mutex<BTreeMap<InstanceKey, String>>,
    ready: AtomicBool,
    /// The engine of vnets that name none.
    default_engine: std::sync::Mutex<crate::core::engine::EngineKind>,
    /// The audit trail, where the node's `audit:` sends it.
    audit: std::sync::Mutex<Option<Arc<crate::core::spine::audit::AuditLog>>>,
}

impl Registry {
    /// A registry reading `store`, knowing the given kinds.
    pub fn new(
        store: Arc<dyn ConfigStore>,
        factories: Vec<Arc<dyn ModuleFactory>>,
        metrics: Arc<Metrics>,
        flows: Arc<FlowTable>,
    ) -> Self {
        Self {
            factories: Kinds(Arc::new(
                factories.into_iter().map(|f| (f.kind(), f)).collect(),
            )),
            store,
            metrics,
            flows,
            directory: ModuleDirectory::default(),
            tenants: Mutex::new(BTreeMap::new()),
            refused: std::sync::Mutex::new(BTreeMap::new()),
            rejected: std::sync::Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            default_engine: std::sync::Mutex::new(Default::default()),
            audit: std::sync::Mutex::new(None),
        }
    }

    /// Records the audit log among the flow observers, so the node's
    /// `audit:` can direct it and SIGHUP reopen its file.
    pub fn set_audit(&self, audit: Arc<crate::core::spine::audit::AuditLog>) {
        *self.audit.lock().expect("poisoned") = Some(audit);
    }

    /// The audit log, if the registry has one.
    pub fn audit(&self) -> Option<Arc<crate::core::spine::audit::AuditLog>> {
        self.audit.lock().expect("poisoned").clone()
    }

    /// Sets the engine of vnets that name none (the node's `engine:`), for
    /// instances started from now on.
    pub fn set_default_engine(&self, engine: crate::core::engine::EngineKind) {
        *self.default_engine.lock().expect("poisoned") = engine;
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The node's flows.
    pub fn flows(&self) -> &Arc<FlowTable> {
        &self.flows
    }

    /// The store documents come from.
    pub fn store(&self) -> &Arc<dyn ConfigStore> {
        &self.store
    }

    /// True once every instance started, until shutdown begins, and while
    /// no instance is failed and restarting ([`Registry::faults`]).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.directory.faults().list().is_empty()
    }

    /// Instances failed while running and restarting: `(tenant/instance, why)`.
    pub fn faults(&self) -> Vec<(String, String)> {
        self.directory.faults().list()
    }

    /// Instances whose start failed and that are not running:
    /// `(tenant/instance, why)`. The rest of the node runs.
    pub fn refused(&self) -> Vec<(String, String)> {
        self.refused
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(k, r)| (format!("{}/{}", k.tenant, k.instance), r.why.clone()))
            .collect()
    }

    /// Records that `key` could not start: logged, counted, shown.
    fn refuse(&self, key: &InstanceKey, kind: &str, source: &str, error: &RegistryError) {
        let why = error.to_string();
        tracing::error!(tenant = %key.tenant, instance = %key.instance, kind, source, error = %why, "module refused: it could not start; the rest of the node runs");
        self.metrics.set_refused(&key.tenant, &key.instance, true);
        self.refused.lock().expect("poisoned").insert(
            key.clone(),
            Refused {
                kind: kind.to_string(),
                source: source.to_string(),
                why,
            },
        );
    }

    /// Forgets that `key` was refused (it started, or its document went).
    fn unrefuse(&self, key: &InstanceKey) {
        if self.refused.lock().expect("poisoned").remove(key).is_some() {
            self.metrics.set_refused(&key.tenant, &key.instance, false);
        }
    }

    /// The node's listening sockets on the host, by owner (the admin API
    /// registers its own, so doors' users cannot reach it).
    pub fn host_listeners(&self) -> &crate::core::net::listen::HostListeners {
        self.directory.listeners()
    }

    /// Finds a module by tenant and instance name.
    pub fn find(&self, tenant: &str, instance: &str) -> Option<Arc<dyn Module>> {
        self.directory.get(tenant, instance)
    }

    fn factory_for(
        &self,
        doc: &Document,
    ) -> Result<(String, &Arc<dyn ModuleFactory>), ConfigError> {
        self.factories.factory_for(doc)
    }

    /// Reads and checks one document.
    fn plan(&self, key: &InstanceKey, doc: Document) -> Result<Planned, ConfigError> {
        self.factories.plan(key, doc)
    }

    /// Reads and checks every document of the store, collecting all errors.
    async fn read_all(&self) -> (BTreeMap<String, Vec<Planned>>, Vec<RegistryError>) {
        let mut out: BTreeMap<String, Vec<Planned>> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut claimed: BTreeMap<String, String> = BTreeMap::new();
        let tenants = match self.store.tenants().await {
            Ok(t) => t,
            Err(e) => return (out, vec![e.into()]),
        };
        // Tenants are read and checked apart from each other, so they are
        // read on every core (100,000 tenants: half the start was this);
        // the results are taken in the tenants' order.
        let (store, kinds) = (self.store.clone(), self.factories.clone());
        let read = on_every_core(tenants, move |tenant| {
            let (store, kinds) = (store.clone(), kinds.clone());
            async move {
                let r = kinds.read_tenant(store.as_ref(), &tenant).await;
                (tenant, r)
            }
        })
        .await;
        for (tenant, (planned, errs)) in read {
            errors.extend(errs);
            for p in &planned {
                for c in &p.plan.claims {
                    match claimed.get(c) {
                            Some(first) => errors.push(
                                ConfigError::doc(
                                    &p.doc.source,
                                    format!("{c} is already claimed by {first}; each must be unique in the node"),
                                )
                                .into(),
                            ),
                            None => {
                                claimed.insert(c.clone(), p.doc.source.clone());
                            }
                        }
                }
            }
            match start_order(&planned) {
                Ok(order) => {
                    let mut by_name: BTreeMap<String, Planned> = planned
                        .into_iter()
                        .map(|p| (p.key.instance.clone(), p))
                        .collect();
                    let ordered = order.iter().filter_map(|n| by_name.remove(n)).collect();
                    out.insert(tenant, ordered);
                }
                Err(e) => errors.push(e.into()),
            }
        }
        (out, errors)
    }

    /// Validates the whole config without binding anything: every error found.
    pub async fn check(&self) -> Vec<RegistryError> {
        self.read_all().await.1
    }

    /// Builds and starts every instance. Config errors are returned all at
    /// once and nothing starts. An instance whose start fails (a port in
    /// use, no file descriptor left) is refused and reported
    /// ([`Registry::refused`]) while every other one runs, as a failed
    /// reload is; only when nothing at all could start are the failures
    /// returned.
    pub async fn start(self: &Arc<Self>) -> Result<(), Vec<RegistryError>> {
        let (plans, errors) = self.read_all().await;
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut tenants = self.tenants.lock().await;
        // Tenants start apart from each other (nothing of one depends on
        // another's), so they start on every core, each one's instances in
        // dependency order; what they share (a shared UDP port, interface
        // names, metrics) is taken under its own lock. The results are
        // taken in the tenants' order.
        let me = self.clone();
        let done = on_every_core(plans.into_iter().collect(), move |(tenant, planned)| {
            let me = me.clone();
            async move { me.start_tenant(&tenant, planned).await }
        })
        .await;
        let (mut started, mut failures) = (0usize, Vec::new());
        for (entry, n, failed) in done {
            started += n;
            failures.extend(failed);
            if let Some((tenant, entry)) = entry {
                tenants.insert(tenant, entry);
            }
        }
        drop(tenants);
        if started == 0 && !failures.is_empty() {
            self.stop_all().await;
            return Err(failures);
        }
        self.ready.store(true, Ordering::Release);
        self.store.report(&self.report()).await;
        Ok(())
    }

    /// Starts one tenant's planned instances in order: the tenant's entry
    /// (none if it had no instance), how many started, and why the others
    /// could not (each refused and reported).
    async fn start_tenant(
        &self,
        tenant: &str,
        planned: Vec<Planned>,
    ) -> (Option<(String, TenantEntry)>, usize, Vec<RegistryError>) {
        if planned.is_empty() {
            return (None, 0, Vec::new());
        }
        let mut entry = self.new_tenant(tenant);
        let (mut started, mut failures) = (0usize, Vec::new());
        for p in planned {
            let (key, kind, source) = (p.key.clone(), p.kind.clone(), p.doc.source.clone());
            match self.launch_in(&mut entry, tenant, p).await {
                Ok(()) => started += 1,
                Err(e) => {
                    self.refuse(&key, &kind, &source, &e);
                    failures.push(e);
                }
            }
        }
        (Some((tenant.to_string(), entry)), started, failures)
    }

    /// A tenant's entry, before its first instance starts.
    fn new_tenant(&self, tenant: &str) -> TenantEntry {
        let t = Tenant::new(tenant);
        t.vnets
            .set_default_engine(*self.default_engine.lock().expect("poisoned"));
        self.flows.set_policies(tenant, t.policy.clone());
        TenantEntry {
            tenant: Arc::new(t),
            instances: BTreeMap::new(),
        }
    }

    /// Builds, starts and records one instance.
    async fn launch(
        &self,
        tenants: &mut BTreeMap<String, TenantEntry>,
        tenant: &str,
        p: Planned,
    ) -> Result<(), RegistryError> {
        let entry = tenants
            .entry(tenant.to_string())
            .or_insert_with(|| self.new_tenant(tenant));
        self.launch_in(entry, tenant, p).await
    }

    /// Builds, starts and records one instance in `entry`.
    async fn launch_in(
        &self,
        entry: &mut TenantEntry,
        tenant: &str,
        p: Planned,
    ) -> Result<(), RegistryError> {
        for dep in &p.plan.depends_on {
            if !entry.instances.contains_key(dep) {
                return Err(ConfigError::doc(
                    &p.doc.source,
                    format!("depends on `{dep}`, which is not running in tenant `{tenant}`"),
                )
                .into());
            }
        }
        let factory = self
            .factories
            .get(p.kind.as_str())
            .expect("planned kinds have factories");
        let ctx = ModuleContext::new(
            entry.tenant.clone(),
            &p.key.instance,
            self.metrics.clone(),
            self.flows.clone(),
            &self.directory,
        )
        .with_kind(p.kind.as_str());
        let module = factory.build(ctx, &p.doc)?;
        module.start().await.map_err(|e| RegistryError::Start {
            key: p.key.clone(),
            source_name: p.doc.source.clone(),
            message: e.to_string(),
        })?;
        self.directory.insert(p.key.clone(), module.clone());
        tracing::info!(tenant, instance = %p.key.instance, kind = %p.kind, source = %p.doc.source, "module started");
        entry.instances.insert(
            p.key.instance.clone(),
            InstanceEntry {
                kind: p.kind,
                doc: p.doc,
                module,
                state: ModuleState::Running,
                depends_on: p.plan.depends_on,
                last_error: None,
            },
        );
        Ok(())
    }

    /// Applies a batch of store events: each affected instance is re-read and
    /// reloaded, started or stopped.
    pub async fn apply(&self, events: &[StoreEvent]) {
        let mut tenants = self.tenants.lock().await;
        let mut scope: BTreeSet<String> = BTreeSet::new();
        let mut single: BTreeSet<InstanceKey> = BTreeSet::new();
        for ev in events {
            match ev {
                StoreEvent::Node => tracing::warn!(
                    "the node document changed; node settings (admin address, log) take effect at restart"
                ),
                StoreEvent::Instance(k) => {
                    single.insert(k.clone());
                }
                StoreEvent::Tenant(t) => {
                    scope.insert(t.clone());
                }
                StoreEvent::Everything => {
                    scope.extend(tenants.keys().cloned());
                    match self.store.tenants().await {
                        Ok(t) => scope.extend(t),
                        Err(e) => tracing::error!(error = %e, "cannot list tenants; keeping the running config"),
                    }
                }
            }
        }
        for tenant in &scope {
            self.reconcile_tenant(&mut tenants, tenant).await;
        }
        for key in single.iter().filter(|k| !scope.contains(&k.tenant)) {
            self.reconcile_instance(&mut tenants, key).await;
        }
        drop(tenants);
        self.store.report(&self.report()).await;
    }

    /// What this node refused of its documents: changes rejected (the
    /// running config kept) and instances that could not start.
    pub fn report(&self) -> configstore::NodeReport {
        let mut rejected: BTreeMap<InstanceKey, String> =
            self.rejected.lock().expect("poisoned").clone();
        for (k, r) in self.refused.lock().expect("poisoned").iter() {
            rejected.entry(k.clone()).or_insert_with(|| r.why.clone());
        }
        configstore::NodeReport {
            rejected: rejected.into_iter().collect(),
        }
    }

    async fn reconcile_tenant(&self, tenants: &mut BTreeMap<String, TenantEntry>, tenant: &str) {
        let mut names: BTreeSet<String> = match self.store.instances(tenant).await {
            Ok(n) => n.into_iter().collect(),
            Err(e) => {
                tracing::error!(tenant, error = %e, "cannot list instances; keeping the running config");
                return;
            }
        };
        if let Some(t) = tenants.get(tenant) {
            names.extend(t.instances.keys().cloned());
        }
        // Removals first (they free ports), then the rest: instances that
        // others depend on are visited before their dependents.
        let mut keys: Vec<InstanceKey> = names
            .into_iter()
            .map(|n| InstanceKey::new(tenant, n))
            .collect();
        let mut present = Vec::new();
        for key in keys.drain(..) {
            match self.store.get(&key).await {
                Ok(None) => self.reconcile_instance(tenants, &key).await,
                Ok(Some(doc)) => present.push((key, doc)),
                Err(e) => self.reject(tenants, &key, &e.to_string()),
            }
        }
        let deps: BTreeMap<String, Vec<String>> = present
            .iter()
            .map(|(k, doc)| {
                let d = self
                    .factory_for(doc)
                    .and_then(|(_, f)| f.check(doc))
                    .map(|p| p.depends_on)
                    .unwrap_or_default();
                (k.instance.clone(), d)
            })
            .collect();
        let order = topo_order(&deps).unwrap_or_else(|_| deps.keys().cloned().collect());
        for name in order {
            self.reconcile_instance(tenants, &InstanceKey::new(tenant, name))
                .await;
        }
    }

    /// Counts and logs a rejected change; the running instance stays as it is.
    fn reject(&self, tenants: &mut BTreeMap<String, TenantEntry>, key: &InstanceKey, error: &str) {
        self.metrics.reload(&key.tenant, &key.instance, false);
        self.rejected
            .lock()
            .expect("poisoned")
            .insert(key.clone(), error.to_string());
        tracing::error!(tenant = %key.tenant, instance = %key.instance, error, "config change rejected; keeping the running config");
        if let Some(e) = tenants
            .get_mut(&key.tenant)
            .and_then(|t| t.instances.get_mut(&key.instance))
        {
            e.last_error = Some(error.to_string());
        }
    }

    async fn reconcile_instance(
        &self,
        tenants: &mut BTreeMap<String, TenantEntry>,
        key: &InstanceKey,
    ) {
        // Judged again on the document there is now.
        self.rejected.lock().expect("poisoned").remove(key);
        let doc = match self.store.get(key).await {
            Ok(d) => d,
            Err(e) => return self.reject(tenants, key, &e.to_string()),
        };
        let Some(doc) = doc else {
            // A removal is not counted as a reload: it would bring back the
            // series of an instance that is gone, for good.
            self.unrefuse(key);
            self.remove_instance(tenants, key).await;
            return;
        };
        let running = tenants
            .get(&key.tenant)
            .and_then(|t| t.instances.get(&key.instance))
            .map(|r| (r.kind.clone(), r.module.clone(), r.doc == doc));
        if running.as_ref().is_some_and(|(_, _, same)| *same) {
            return;
        }
        let planned = match self.plan(key, doc) {
            Ok(p) => p,
            Err(e) => return self.reject(tenants, key, &e.to_string()),
        };
        match running {
            Some((kind, module, _)) if kind == planned.kind => {
                match module.reload(&planned.doc).await {
                    Ok(()) => {
                        if let Some(entry) = tenants
                            .get_mut(&key.tenant)
                            .and_then(|t| t.instances.get_mut(&key.instance))
                        {
                            entry.doc = planned.doc;
                            entry.depends_on = planned.plan.depends_on;
                            entry.last_error = None;
                        }
                        self.metrics.reload(&key.tenant, &key.instance, true);
                        tracing::info!(tenant = %key.tenant, instance = %key.instance, "module reloaded");
                    }
                    Err(e) => self.reject(tenants, key, &e.to_string()),
                }
            }
            other => {
                if other.is_some() {
                    // A change of kind replaces the instance.
                    self.remove_instance(tenants, key).await;
                }
                let (kind, source) = (planned.kind.clone(), planned.doc.source.clone());
                match self.launch(tenants, &key.tenant, planned).await {
                    Ok(()) => {
                        self.unrefuse(key);
                        self.metrics.reload(&key.tenant, &key.instance, true)
                    }
                    Err(e) => {
                        self.metrics.reload(&key.tenant, &key.instance, false);
                        self.refuse(key, &kind, &source, &e);
                    }
                }
            }
        }
    }

    /// Drains and stops one instance; true if it was running.
    async fn remove_instance(
        &self,
        tenants: &mut BTreeMap<String, TenantEntry>,
        key: &InstanceKey,
    ) -> bool {
        let Some(t) = tenants.get_mut(&key.tenant) else {
            return false;
        };
        let Some(entry) = t.instances.remove(&key.instance) else {
            return false;
        };
        if t.instances.is_empty() {
            tenants.remove(&key.tenant);
            self.flows.remove_policies(&key.tenant);
        }
        self.directory.remove(key);
        entry.module.drain().await;
        entry.module.stop().await;
        self.metrics.forget_instance(&key.tenant, &key.instance);
        self.directory
            .faults()
            .clear(&format!("{}/{}", key.tenant, key.instance));
        tracing::info!(tenant = %key.tenant, instance = %key.instance, kind = %entry.kind, "module stopped");
        true
    }

    /// Graceful shutdown: stop accepting everywhere, wait up to `timeout` for
    /// open flows to finish, then stop everything.
    pub async fn shutdown(&self, timeout: Duration) {
        self.ready.store(false, Ordering::Release);
        {
            let mut tenants = self.tenants.lock().await;
            for t in tenants.values_mut() {
                for e in t.instances.values_mut().rev() {
                    e.module.drain().await;
                    e.state = ModuleState::Draining;
                }
            }
        }
        // A huge drain_timeout means "wait as long as it takes", not a panic.
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        loop {
            let open = self.flows.count(None, None);
            if open == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(open, "drain timeout: closing open flows");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop_all().await;
    }

    async fn stop_all(&self) {
        let mut tenants = self.tenants.lock().await;
        for (name, t) in tenants.iter_mut() {
            // Reverse start order: dependents before what they depend on.
            let order = topo_order(
                &t.instances
                    .iter()
                    .map(|(n, e)| (n.clone(), e.depends_on.clone()))
                    .collect(),
            )
            .unwrap_or_else(|_| t.instances.keys().cloned().collect());
            for inst in order.iter().rev() {
                if let Some(e) = t.instances.get_mut(inst) {
                    e.module.stop().await;
                    e.state = ModuleState::Stopped;
                    self.directory
                        .remove(&InstanceKey::new(name.clone(), inst.clone()));
                }
            }
        }
        tenants.clear();
    }

    /// Every instance with its state, by tenant and name; refused ones
    /// with why.
    pub async fn status(&self) -> Vec<InstanceStatus> {
        let tenants = self.tenants.lock().await;
        let refused: Vec<InstanceStatus> = self
            .refused
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(k, _)| {
                tenants
                    .get(&k.tenant)
                    .is_none_or(|t| !t.instances.contains_key(&k.instance))
            })
            .map(|(k, r)| InstanceStatus {
                tenant: k.tenant.clone(),
                instance: k.instance.clone(),
                kind: r.kind.clone(),
                source: r.source.clone(),
                state: ModuleState::Refused,
                last_error: Some(r.why.clone()),
                active_flows: 0,
                details: serde_json::Value::Null,
            })
            .collect();
        let mut out: Vec<InstanceStatus> = tenants
            .iter()
            .flat_map(|(tname, t)| {
                t.instances.iter().map(move |(iname, e)| InstanceStatus {
                    tenant: tname.clone(),
                    instance: iname.clone(),
                    kind: e.kind.clone(),
                    source: e.doc.source.clone(),
                    state: e.state,
                    last_error: e.last_error.clone(),
                    active_flows: self.flows.count(Some(tname), Some(iname)),
                    details: e.module.status(),
                })
            })
            .collect();
        out.extend(refused);
        out.sort_by(|a, b| (&a.tenant, &a.instance).cmp(&(&b.tenant, &b.instance)));
        out
    }

    /// Tenant names with running instances.
    pub async fn tenant_names(&self) -> Vec<String> {
        self.tenants.lock().await.keys().cloned().collect()
    }

    /// A running tenant and the kinds of its instances (`instance → kind`).
    pub async fn tenant(&self, name: &str) -> Option<(Arc<Tenant>, BTreeMap<String, String>)> {
        let tenants = self.tenants.lock().await;
        let t = tenants.get(name)?;
        Some((
            t.tenant.clone(),
            t.instances
                .iter()
                .map(|(i, e)| (i.clone(), e.kind.clone()))
                .collect(),
        ))
    }
}

/// Every reference a document makes to another instance's offer (a pipe's
/// `peer:` to a WireGuard peer) names one that exists and can serve it.
fn check_needs(planned: &[Planned]) -> Result<(), ConfigError> {
    for p in planned {
        for need in &p.plan.needs {
            let Some(other) = planned.iter().find(|o| o.key.instance == need.instance) else {
                return Err(ConfigError::key(
                    &p.doc.source,
                    need.key.as_str(),
                    format!(
                        "`{}` is not defined in tenant `{}`",
                        need.instance, p.key.tenant
                    ),
                ));
            };
            match other.plan.offers.iter().find(|o| o.name == need.name) {
                Some(Offer { unusable: None, .. }) => {}
                Some(Offer {
                    unusable: Some(why),
                    ..
                }) => {
                    return Err(ConfigError::key(
                        &p.doc.source,
                        need.key.as_str(),
                        format!("`{}` has {}, but {why}", need.instance, need.name),
                    ))
                }
                None => {
                    let offered: Vec<&str> =
                        other.plan.offers.iter().map(|o| o.name.as_str()).collect();
                    return Err(ConfigError::key(
                        &p.doc.source,
                        need.key.as_str(),
                        format!(
                            "`{}` ({}) has no {}; it has: {}",
                            need.instance,
                            other.kind,
                            need.name,
                            if offered.is_empty() {
                                "nothing of the kind".to_string()
                            } else {
                                offered.join(", ")
                            }
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs `each` over `items` on every core of the runtime: the items in a
/// few chunks, each chunk in order on a task of its own. The results come
/// in the items' order; a panic in one goes on in the caller.
async fn on_every_core<I, R, F, Fut>(items: Vec<I>, each: F) -> Vec<R>
where
    I: Send + 'static,
    R: Send + 'static,
    F: Fn(I) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = R> + Send,
{
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_task = items.len().div_ceil(cores * 4).max(1);
    let mut items = items.into_iter();
    let mut tasks = Vec::new();
    loop {
        let chunk: Vec<I> = items.by_ref().take(per_task).collect();
        if chunk.is_empty() {
            break;
        }
        let each = each.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::with_capacity(chunk.len());
            for item in chunk {
                done.push(each(item).await);
            }
            done
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        match task.await {
            Ok(done) => out.extend(done),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

/// Start order of one tenant's checked documents; missing or circular
/// dependencies are errors naming the document.
fn start_order(planned: &[Planned]) -> Result<Vec<String>, ConfigError> {
    let names: BTreeSet<&str> = planned.iter().map(|p| p.key.instance.as_str()).collect();
    for p in planned {
        for dep in &p.plan.depends_on {
            if !names.contains(dep.as_str()) {
                return Err(ConfigError::doc(
                    &p.doc.source,
                    format!(
                        "depends on `{dep}`, which is not defined in tenant `{}`",
                        p.key.tenant
                    ),
                ));
            }
        }
    }
    check_needs(planned)?;
    let deps = planned
        .iter()
        .map(|p| (p.key.instance.clone(), p.plan.depends_on.clone()))
        .collect();
    topo_order(&deps).map_err(|cycle| {
        let src = planned
            .iter()
            .find(|p| p.key.instance == cycle[0])
            .map(|p| p.doc.source.clone())
            .unwrap_or_default();
        ConfigError::doc(
            &src,
            format!("circular dependency between {}", cycle.join(", ")),
        )
    })
}

/// Kahn's algorithm, alphabetical among equals. Dependencies outside the map
/// are ignored. `Err` holds the names left in a cycle.
fn topo_order(deps: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, Vec<String>> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::new();
    while order.len() < deps.len() {
        let next = deps.iter().find(|(name, ds)| {
            !done.contains(name.as_str())
                && ds
                    .iter()
                    .all(|d| done.contains(d.as_str()) || !deps.contains_key(d))
        });
        match next {
            Some((name, _)) => {
                done.insert(name);
                order.push(name.clone());
            }
            None => {
                return Err(deps
                    .keys()
                    .filter(|n| !done.contains(n.as_str()))
                    .cloned()
                    .collect())
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spine::module::ModuleError;

    fn deps(v: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        v.iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn topo_orders_dependencies_first() {
        let o = topo_order(&deps(&[("a", &["wg"]), ("wg", &[]), ("b", &["a"])])).unwrap();
        assert_eq!(o, vec!["wg", "a", "b"]);
        let e = topo_order(&deps(&[("a", &["b"]), ("b", &["a"]), ("c", &[])])).unwrap_err();
        assert_eq!(e, vec!["a", "b"]);
    }

    /// A kind that touches nothing: it records its life in a shared log.
    /// `{"kind": "noop", "value": N, "needs": [..], "fail_reload": bool}`.
    struct Noop(Arc<std::sync::Mutex<Vec<String>>>);

    struct NoopModule {
        name: String,
        log: Arc<std::sync::Mutex<Vec<String>>>,
        fail_start: bool,
    }

    fn value(doc: &Document) -> Result<i64, ConfigError> {
        doc.value["value"]
            .as_i64()
            .filter(|v| *v >= 0)
            .ok_or_else(|| ConfigError::key(&doc.source, "value", "expected a number >= 0"))
    }

    impl ModuleFactory for Noop {
        fn kind(&self) -> &'static str {
            "noop"
        }
        fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
            value(doc)?;
            let needs = doc.value["needs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let claims = doc.value["claim"]
                .as_str()
                .map(|c| vec![c.to_string()])
                .unwrap_or_default();
            Ok(ModulePlan {
                depends_on: needs,
                claims,
                ..ModulePlan::default()
            })
        }
        fn build(
            &self,
            ctx: ModuleContext,
            doc: &Document,
        ) -> Result<Arc<dyn Module>, ConfigError> {
            self.0.lock().unwrap().push(format!(
                "build {}/{} {}",
                ctx.tenant.name,
                ctx.instance,
                value(doc)?
            ));
            Ok(Arc::new(NoopModule {
                name: format!("{}/{}", ctx.tenant.name, ctx.instance),
                log: self.0.clone(),
                fail_start: doc.value["fail_start"] == true,
            }))
        }
    }

    #[async_trait::async_trait]
    impl Module for NoopModule {
        async fn start(&self) -> Result<(), ModuleError> {
            if self.fail_start {
                return Err(ModuleError::Runtime("cannot start, on purpose".into()));
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("start {}", self.name));
            Ok(())
        }
        async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
            if doc.value["fail_reload"] == true {
                return Err(ModuleError::Runtime("refused on purpose".into()));
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("reload {} {}", self.name, value(doc)?));
            Ok(())
        }
        async fn drain(&self) {}
        async fn stop(&self) {
            self.log.lock().unwrap().push(format!("stop {}", self.name));
        }
    }

    fn noop(v: i64, needs: &[&str]) -> serde_json::Value {
        serde_json::json!({"kind": "noop", "value": v, "needs": needs})
    }

    async fn registry() -> (
        Arc<configstore::MemStore>,
        Arc<Registry>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let store = Arc::new(configstore::MemStore::new());
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reg = Arc::new(Registry::new(
            store.clone(),
            vec![Arc::new(Noop(log.clone()))],
            Arc::new(Metrics::new()),
            Arc::new(FlowTable::new(vec![])),
        ));
        (store, reg, log)
    }

    /// The last rejected change of `tenant/instance` ("" if none).
    async fn last_error(reg: &Registry, tenant: &str, instance: &str) -> String {
        reg.status()
            .await
            .into_iter()
            .find(|s| s.tenant == tenant && s.instance == instance)
            .and_then(|s| s.last_error)
            .unwrap_or_default()
    }

    fn take(log: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[tokio::test]
    async fn two_documents_claiming_one_name_are_an_error_naming_both() {
        let (store, reg, _log) = registry().await;
        store.set(
            "t",
            "a",
            serde_json::json!({"kind": "noop", "value": 1, "claim": "interface wg0"}),
        );
        store.set(
            "u",
            "b",
            serde_json::json!({"kind": "noop", "value": 1, "claim": "interface wg0"}),
        );
        let errors: Vec<String> = reg.check().await.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("memory u/b: interface wg0 is already claimed by memory t/a"),
            "{errors:?}"
        );
    }

    /// Tenants start on every core: each one's instances still in
    /// dependency order, one tenant's failure refused and reported alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tenants_start_in_parallel_each_in_dependency_order() {
        let (store, reg, log) = registry().await;
        for t in 0..40 {
            let t = format!("t{t}");
            store.set(&t, "b", noop(1, &["a"]));
            let mut a = noop(1, &[]);
            if t == "t7" {
                a["fail_start"] = true.into();
            }
            store.set(&t, "a", a);
        }
        reg.start().await.unwrap();
        assert!(reg.is_ready());
        let l = take(&log);
        let pos = |s: &str| l.iter().position(|x| x == s);
        for t in (0..40).filter(|t| *t != 7) {
            let (a, b) = (pos(&format!("start t{t}/a")), pos(&format!("start t{t}/b")));
            assert!(a.is_some() && a < b, "t{t}: {l:?}");
        }
        assert_eq!(l.iter().filter(|x| x.starts_with("start ")).count(), 78);
        let refused = reg.refused();
        assert_eq!(
            refused.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["t7/a", "t7/b"]
        );
        assert!(refused[0].1.contains("on purpose"), "{refused:?}");
        assert!(refused[1].1.contains("depends on `a`"), "{refused:?}");
        assert_eq!(reg.tenant_names().await.len(), 40);
    }

    #[tokio::test]
    async fn starts_in_dependency_order_and_reconciles_without_sockets() {
        let (store, reg, log) = registry().await;
        store.set("t", "b", noop(1, &["a"]));
        store.set("t", "a", noop(1, &[]));
        store.set("u", "a", noop(1, &[]));
        reg.start().await.unwrap();
        assert!(reg.is_ready());
        let l = take(&log);
        let pos = |s: &str| l.iter().position(|x| x == s).unwrap();
        assert!(pos("start t/a") < pos("build t/b 1"), "{l:?}");
        assert!(l.contains(&"start u/a".to_string()));

        // A changed document reloads in place; an unchanged one does nothing.
        store.set("t", "a", noop(2, &[]));
        store.set("u", "a", noop(1, &[]));
        reg.apply(&[
            StoreEvent::Instance(InstanceKey::new("t", "a")),
            StoreEvent::Instance(InstanceKey::new("u", "a")),
        ])
        .await;
        assert_eq!(take(&log), ["reload t/a 2"]);

        // A bad document is rejected by check, named, and the old one runs on.
        store.set("t", "a", serde_json::json!({"kind": "noop", "value": -1}));
        reg.apply(&[StoreEvent::Instance(InstanceKey::new("t", "a"))])
            .await;
        assert!(take(&log).is_empty());
        let err = last_error(&reg, "t", "a").await;
        assert!(err.contains("key `value`"), "{err}");
        // A failing reload is rejected too.
        store.set(
            "t",
            "a",
            serde_json::json!({"kind": "noop", "value": 3, "fail_reload": true}),
        );
        reg.apply(&[StoreEvent::Instance(InstanceKey::new("t", "a"))])
            .await;
        let err = last_error(&reg, "t", "a").await;
        assert!(err.contains("refused on purpose"), "{err}");

        // A removed document stops its instance; an unknown kind is refused.
        store.remove("u", "a");
        store.set("u", "z", serde_json::json!({"kind": "nope"}));
        reg.apply(&[StoreEvent::Tenant("u".into())]).await;
        assert_eq!(take(&log), ["stop u/a"]);
        let st = reg.status().await;
        assert!(!st.iter().any(|s| s.tenant == "u" && s.instance == "a"));

        // No flows are open: even an endless drain timeout returns at once.
        reg.shutdown(Duration::MAX).await;
        let l = take(&log);
        assert!(
            l.contains(&"stop t/a".to_string()) && l.contains(&"stop t/b".to_string()),
            "{l:?}"
        );
    }
}
