//! meshgate's config stores.
//!
//! A [`ConfigStore`] hands out one [`Document`] per module instance, keyed by
//! `(tenant, instance)` ([`InstanceKey`]), plus the node document, and tells
//! its watchers when something may have changed. Callers never see where a
//! document came from except through [`Document::source`], which every error
//! message quotes so an operator knows which file (or key) to fix.
//!
//! # Layout
//! - [`dir`]: the directory store (`DIR/meshgate.yaml`,
//!   `DIR/tenants/<tenant>/<instance>.yaml|.yml|.json|.toml`) and its inotify
//!   watcher.
//! - [`mod@env`]: environment overrides (`MESHGATE_NODE__<KEY>`,
//!   `MESHGATE_TENANT__<TENANT>__<INSTANCE>__<KEY>`) layered over any store.
//! - [`cloudgateway`]: Cloud-Gateway's `conf.yaml`, read as it is.
//! - [`mod@format`]: parsing YAML, JSON and TOML text into one value tree.
//! - [`mem`]: an in-memory store (tests, embedding).
//!
//! - [`etcd`] (feature `etcd`): documents in etcd, kept current by a
//!   watch, shared by a fleet of nodes.
//!
//! The registry only ever calls the trait.

#![forbid(unsafe_code)]

pub mod cloudgateway;
pub mod dir;
pub mod env;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod format;
pub mod mem;

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::mpsc;

pub use cloudgateway::CloudGatewayStore;
pub use dir::DirStore;
pub use env::EnvOverlay;
pub use mem::MemStore;

/// Which module instance a document configures.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    /// Tenant name (a directory under `tenants/` for the directory store).
    pub tenant: String,
    /// Instance name, unique within the tenant (the file stem).
    pub instance: String,
}

impl InstanceKey {
    /// Builds a key from its two names.
    pub fn new(tenant: impl Into<String>, instance: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            instance: instance.into(),
        }
    }
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.instance)
    }
}

/// One config document: a tree of values (a map at the top) and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Human-readable origin, quoted in every error: a path such as
    /// `tenants/default/web.yaml`, with `+ env MESHGATE_...` when overridden.
    pub source: String,
    /// The parsed content. Always a JSON-like object at the top level.
    pub value: Value,
}

/// A change a watcher noticed. The receiver re-reads the named scope and
/// compares with what it runs, so spurious events are harmless.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoreEvent {
    /// The node document may have changed.
    Node,
    /// One instance's document may have been created, changed or removed.
    Instance(InstanceKey),
    /// A tenant may have been created or removed, or many of its files changed.
    Tenant(String),
    /// Anything may have changed (the watcher lost track, e.g. queue overflow).
    Everything,
}

/// What went wrong reading a store. Every variant names the source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The path that failed, relative to the store's root where possible.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML/JSON/TOML, or not a map at the top.
    #[error("{source_name}: {message}")]
    Parse {
        /// The document's source.
        source_name: String,
        /// What the parser said, with line and column where known.
        message: String,
    },
    /// A name (tenant, instance, env var) is not acceptable.
    #[error("{source_name}: {message}")]
    Name {
        /// Where the bad name was found.
        source_name: String,
        /// What is wrong with it and what is expected.
        message: String,
    },
    /// The watcher could not be set up.
    #[error("cannot watch {path}: {message}")]
    Watch {
        /// The watched root.
        path: PathBuf,
        /// The watcher's error.
        message: String,
    },
}

/// A receiver of [`StoreEvent`]s; dropped to stop watching.
pub struct Watch {
    /// Batches of events, debounced by the store.
    pub events: mpsc::Receiver<Vec<StoreEvent>>,
    /// Keeps the underlying watcher alive.
    pub guard: Box<dyn Send + Sync>,
}

/// The senders a store announces changes on (the memory and etcd stores).
pub type Watchers = std::sync::Mutex<Vec<mpsc::UnboundedSender<Vec<StoreEvent>>>>;

impl Watch {
    /// A new watcher on `watchers`: what is sent there arrives on the
    /// watch's bounded receiver (a task forwards it).
    pub fn subscribe(watchers: &Watchers) -> Watch {
        let (tx, mut rx) = mpsc::unbounded_channel();
        watchers.lock().expect("watchers poisoned").push(tx);
        let (btx, brx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                if btx.send(batch).await.is_err() {
                    return;
                }
            }
        });
        Watch {
            events: brx,
            guard: Box::new(()),
        }
    }
}

/// A source of config documents.
///
/// Implementations must be cheap to call repeatedly: the registry re-reads a
/// scope after every [`StoreEvent`].
#[async_trait]
pub trait ConfigStore: Send + Sync + 'static {
    /// A one-line description for logs (`directory /etc/meshgate`).
    fn describe(&self) -> String;
    /// The node document (`meshgate.yaml`), if there is one.
    async fn node(&self) -> Result<Option<Document>, StoreError>;
    /// All tenant names, sorted.
    async fn tenants(&self) -> Result<Vec<String>, StoreError>;
    /// The instance names of one tenant, sorted. A tenant that does not exist has none.
    async fn instances(&self, tenant: &str) -> Result<Vec<String>, StoreError>;
    /// One instance's document; `None` if it does not exist (any more).
    async fn get(&self, key: &InstanceKey) -> Result<Option<Document>, StoreError>;
    /// Starts watching; `None` for a store that never changes.
    fn watch(&self) -> Result<Option<Watch>, StoreError>;
    /// What the node made of the documents, after each change it applied:
    /// a shared store shows it to the fleet (the etcd store writes it to
    /// the node's status key). Default: nothing.
    async fn report(&self, _report: &NodeReport) {}

    /// Entries of the store that meshgate does not read although they look
    /// like config (a misspelt `tenant/` folder, a document that only
    /// another store reads), each said as where it is, why it is not read
    /// and what is expected. The node logs them at start and `--check`
    /// prints them. Default: none.
    fn unread(&self) -> Vec<String> {
        Vec::new()
    }

    /// The node stops: a shared store gives up what this node holds at
    /// once (the etcd store revokes its lease, so the tenants it ran move
    /// without waiting for the lease to expire). Default: nothing.
    async fn close(&self) {}
}

/// What a node made of its documents: the ones it refused, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    /// Documents refused (the running config kept), with the error.
    pub rejected: Vec<(InstanceKey, String)>,
}

/// Checks a tenant or instance name: 1-63 characters of `a-z A-Z 0-9 _ -`,
/// starting with a letter or digit. Names become metric labels, env var parts
/// and URL path segments, so they are kept plain.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_len = !name.is_empty() && name.len() <= 63;
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "invalid name `{name}`: expected 1-63 characters of letters, digits, `_` and `-`, starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("default").is_ok());
        assert!(check_name("team-a_2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("a.b").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
    }
}
