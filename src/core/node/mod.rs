//! A node: its config directory, the registry over the module kinds it is
//! given, checking a config whole, and the admin API ([`admin`]).
//!
//! Both binaries use this: `meshgate --check DIR` and `meshgatectl check DIR`
//! give the same answer, and `meshgate` refuses to start on the same errors.
//! The module kinds come from the caller (the binaries pass
//! [`crate::modules::builtin_factories`]), so `core` names no kind.

pub mod admin;
pub mod run;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use configstore::{CloudGatewayStore, ConfigStore, DirStore, EnvOverlay};

use crate::core::config::NodeConfig;
use crate::core::metrics::Metrics;
use crate::core::spine::audit::AuditLog;
use crate::core::spine::flow::{FlowObserver, FlowTable};
use crate::core::spine::module::ModuleFactory;
use crate::core::spine::registry::Registry;

/// A config directory with `MESHGATE_` environment overrides applied. A
/// directory with Cloud-Gateway's `conf.yaml` (and no `tenants/`) is read
/// as a Cloud-Gateway node.
pub fn open_store(dir: &Path) -> Result<Arc<dyn ConfigStore>, String> {
    let dir_store = DirStore::open(dir).map_err(|e| format!("config directory: {e}"))?;
    if CloudGatewayStore::detect(dir) {
        let store =
            EnvOverlay::from_env(CloudGatewayStore::open(dir)).map_err(|e| e.to_string())?;
        return Ok(Arc::new(store));
    }
    let store = EnvOverlay::from_env(dir_store).map_err(|e| e.to_string())?;
    Ok(Arc::new(store))
}

/// The etcd store at `url` (`etcd://HOST:2379/PREFIX`) for the node
/// `node`, with `MESHGATE_` environment overrides applied; credentials and
/// TLS files from `MESHGATE_ETCD_*`. Fails when etcd does not answer
/// within 10 s (a node with no config yet has nothing to run). `check`:
/// only read, every tenant whatever its placement, without joining the
/// fleet.
#[cfg(feature = "etcd")]
pub async fn open_etcd(url: &str, node: &str, check: bool) -> Result<Arc<dyn ConfigStore>, String> {
    use configstore::etcd::{EtcdAuth, EtcdStore, EtcdUrl};
    let url = EtcdUrl::parse(url).map_err(|e| format!("--store: {e}"))?;
    let timeout = std::time::Duration::from_secs(10);
    let store = if check {
        EtcdStore::observe(url, EtcdAuth::from_env(), node, timeout).await
    } else {
        EtcdStore::connect(url, EtcdAuth::from_env(), node, timeout).await
    }
    .map_err(|e| format!("--store: {e}"))?;
    Ok(Arc::new(
        EnvOverlay::from_env(store).map_err(|e| e.to_string())?,
    ))
}

/// Without the `etcd` feature: says how to get it.
#[cfg(not(feature = "etcd"))]
pub async fn open_etcd(
    url: &str,
    _node: &str,
    _check: bool,
) -> Result<Arc<dyn ConfigStore>, String> {
    Err(format!(
        "--store {url}: this meshgate was built without the etcd store (cargo build --features etcd)"
    ))
}

/// This node's name in a shared store when none is given: the host name
/// (up to its first dot), if it is a valid name.
pub fn default_node_name() -> Result<String, String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let name = host.split('.').next().unwrap_or_default().to_string();
    configstore::check_name(&name)
        .map(|_| name)
        .map_err(|e| format!("no --node-name given and the host name will not do: {e}"))
}

/// Where `meshgate` looks for its config when neither `--config-dir` nor
/// `MESHGATE_CONFIG_DIR` names one, in order: meshgate's own directory, then
/// Cloud-Gateway's mount point (so a Cloud-Gateway container's volume works
/// unchanged).
pub const DEFAULT_CONFIG_DIRS: [&str; 2] = ["/etc/meshgate", "/etc/cloudgateway"];

/// The first of [`DEFAULT_CONFIG_DIRS`] that `is_dir` says exists, or an
/// error saying what was looked for and how to name a directory.
pub fn default_config_dir(is_dir: impl Fn(&Path) -> bool) -> Result<PathBuf, String> {
    DEFAULT_CONFIG_DIRS
        .iter()
        .map(Path::new)
        .find(|p| is_dir(p))
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            format!(
                "no config directory: pass --config-dir DIR or set MESHGATE_CONFIG_DIR (without either, meshgate reads {})",
                DEFAULT_CONFIG_DIRS.join(" or ")
            )
        })
}

/// Reads the node document.
pub async fn node_config(store: &dyn ConfigStore) -> Result<NodeConfig, String> {
    let doc = store.node().await.map_err(|e| e.to_string())?;
    NodeConfig::from_document(doc.as_ref()).map_err(|e| e.to_string())
}

/// A registry over `store` with the module kinds `factories` and the audit log.
pub fn registry(
    store: Arc<dyn ConfigStore>,
    factories: Vec<Arc<dyn ModuleFactory>>,
) -> Arc<Registry> {
    registry_with_hooks(store, factories, Vec::new())
}

/// As [`registry`], with flow hooks (policy, observers) after the audit log.
pub fn registry_with_hooks(
    store: Arc<dyn ConfigStore>,
    factories: Vec<Arc<dyn ModuleFactory>>,
    hooks: Vec<Arc<dyn FlowObserver>>,
) -> Arc<Registry> {
    let metrics = Arc::new(Metrics::new());
    let audit = Arc::new(AuditLog::default());
    let mut observers: Vec<Arc<dyn FlowObserver>> = vec![audit.clone()];
    observers.extend(hooks);
    let flows = Arc::new(FlowTable::new(observers));
    let registry = Registry::new(store, factories, metrics, flows);
    registry.set_audit(audit);
    Arc::new(registry)
}

/// A running node: the registry over a store, and the watcher that turns
/// the store's changes into reloads. The binary runs one; tests run them in
/// process (with a [`configstore::MemStore`]) to exercise start, reconcile,
/// reload and shutdown without spawning anything.
pub struct Node {
    registry: Arc<Registry>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// A node over `store` that knows the kinds `factories` and runs `hooks`
    /// on every flow. Nothing is started yet.
    pub fn new(
        store: Arc<dyn ConfigStore>,
        factories: Vec<Arc<dyn ModuleFactory>>,
        hooks: Vec<Arc<dyn FlowObserver>>,
    ) -> Node {
        Node {
            registry: registry_with_hooks(store, factories, hooks),
            watcher: None,
        }
    }

    /// The registry (status, lookups, metrics, flows).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Starts every instance in dependency order, then follows the store's
    /// changes. `Err` holds every problem, one line each; nothing runs then.
    pub async fn start(&mut self) -> Result<(), Vec<String>> {
        // The watch is set up before the store is read, so an edit made
        // while the instances start is an event, applied once they are up
        // (reading everything again instead cost 100,000 tenants as much
        // as their start).
        let watch = match self.registry.store().watch() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "config changes will not be picked up until restart");
                None
            }
        };
        if let Err(errors) = self.registry.start().await {
            return Err(errors.iter().map(ToString::to_string).collect());
        }
        if let Some(mut watch) = watch {
            let reg = self.registry.clone();
            self.watcher = Some(tokio::spawn(async move {
                let _guard = watch.guard;
                while let Some(batch) = watch.events.recv().await {
                    tracing::debug!(?batch, "config change");
                    reg.apply(&batch).await;
                }
            }));
        }
        Ok(())
    }

    /// Stops following the store, drains (listeners close, open flows may
    /// finish for `drain`), then stops every instance.
    pub async fn shutdown(mut self, drain: std::time::Duration) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        self.registry.shutdown(drain).await;
        self.registry.store().close().await;
    }
}

/// What a successful check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSummary {
    /// Tenants with at least one instance.
    pub tenants: usize,
    /// Module instances.
    pub instances: usize,
}

/// Validates a config directory without binding anything. `Err` holds every
/// problem found, one line each, naming file and key.
pub async fn check_dir(
    dir: &Path,
    factories: Vec<Arc<dyn ModuleFactory>>,
) -> Result<CheckSummary, Vec<String>> {
    let store = open_store(dir).map_err(|e| vec![e])?;
    check_store(store, factories).await
}

/// Logs what the store holds and meshgate does not read
/// ([`ConfigStore::unread`]): at start and in `--check`.
pub fn warn_unread(store: &dyn ConfigStore) {
    for what in store.unread() {
        tracing::warn!(store = %store.describe(), entry = ?what, "not read");
    }
}

/// As [`check_dir`], for any store (an etcd prefix).
pub async fn check_store(
    store: Arc<dyn ConfigStore>,
    factories: Vec<Arc<dyn ModuleFactory>>,
) -> Result<CheckSummary, Vec<String>> {
    warn_unread(store.as_ref());
    let mut errors = Vec::new();
    if let Err(e) = node_config(store.as_ref()).await {
        errors.push(e);
    }
    let reg = registry(store.clone(), factories);
    errors.extend(reg.check().await.into_iter().map(|e| e.to_string()));
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut summary = CheckSummary {
        tenants: 0,
        instances: 0,
    };
    for t in store.tenants().await.map_err(|e| vec![e.to_string()])? {
        let n = store
            .instances(&t)
            .await
            .map_err(|e| vec![e.to_string()])?
            .len();
        if n > 0 {
            summary.tenants += 1;
            summary.instances += n;
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_prefers_meshgate_then_cloud_gateway() {
        let d = default_config_dir(|p| p == Path::new("/etc/cloudgateway")).unwrap();
        assert_eq!(d, Path::new("/etc/cloudgateway"));
        let d = default_config_dir(|_| true).unwrap();
        assert_eq!(d, Path::new("/etc/meshgate"));
        let e = default_config_dir(|_| false).unwrap_err();
        assert!(e.contains("--config-dir"), "{e}");
        assert!(e.contains("/etc/meshgate or /etc/cloudgateway"), "{e}");
    }
}
