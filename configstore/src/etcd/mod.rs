//! The etcd store (feature `etcd`): a fleet of nodes reads one config.
//!
//! `meshgate --store etcd://HOST:2379/PREFIX` (`etcds://` for TLS; several
//! endpoints as `HOST:2379,HOST2:2379`). Documents live under
//! `PREFIX/tenants/<tenant>/<instance>` and the node's under
//! `PREFIX/nodes/<node>`, as text in the directory store's formats (a key
//! may end in `.yaml`, `.yml`, `.json` or `.toml`; without one the text is
//! read as YAML, which JSON also is), with the same names and checks.
//!
//! The store keeps a copy of every key under the prefix, read whole at
//! start and then kept current by a watch, so the registry's reads never
//! wait for etcd. The watch resumes from the revision after the last one
//! applied, so a reconnect neither misses nor repeats a change; when that
//! revision was compacted meanwhile, everything is read again and only the
//! difference is announced. While etcd is unreachable the copy (the last
//! good config) keeps serving and the store reconnects with backoff
//! (100 ms doubling to 5 s, ±20 %).
//!
//! Each node writes what it applied to `PREFIX/status/<node>` (JSON: the
//! revision, the documents it refused and why, the tenants it holds),
//! held by the node's lease (`lease_ttl` in its document, 10 s by default)
//! that ends when the node stops renewing it: `meshgatectl fleet status`
//! reads them.
//!
//! Which tenants a node runs is [`placement`]'s: the store shows the
//! registry only those (a tenant that moves here or away is announced as
//! a [`StoreEvent::Tenant`]). A node that has had no answer to its lease's
//! keep-alives for nearly the lease's TTL stops running its `replicas`
//! tenants before etcd lets another node take them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchResponse,
};

pub mod placement;

use crate::format::{self, Format};
use crate::{
    check_name, ConfigStore, Document, InstanceKey, NodeReport, StoreError, StoreEvent, Watch,
};
use placement::{Action, Fleet, Placement, Planner};

/// Where an etcd store reads: endpoints and the key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `http://HOST:PORT` (or `https://` for `etcds://`), one per endpoint.
    pub endpoints: Vec<String>,
    /// The key prefix, `/` first, no `/` last (`/meshgate`).
    pub prefix: String,
}

impl EtcdUrl {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` (or `etcds://`).
    pub fn parse(url: &str) -> Result<EtcdUrl, String> {
        let (scheme, rest) = if let Some(r) = url.strip_prefix("etcd://") {
            ("http", r)
        } else if let Some(r) = url.strip_prefix("etcds://") {
            ("https", r)
        } else {
            return Err(format!(
                "`{url}`: expected etcd://HOST:PORT/PREFIX (or etcds:// for TLS)"
            ));
        };
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(format!(
                "`{url}`: name a key prefix (etcd://HOST:PORT/meshgate), so the fleet's keys do not mix with others'"
            ));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let ok = h
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("`{url}`: endpoint `{h}` is not HOST:PORT"));
            }
            endpoints.push(format!("{scheme}://{h}"));
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: format!("/{}", prefix.trim_start_matches('/')),
        })
    }
}

/// How to log in to etcd: user and password, TLS files (all optional).
#[derive(Debug, Clone, Default)]
pub struct EtcdAuth {
    /// `MESHGATE_ETCD_USER` and `MESHGATE_ETCD_PASSWORD`.
    pub user: Option<(String, String)>,
    /// The CA that issued etcd's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// Our client certificate and key (PEM), when etcd asks for one.
    pub cert_key: Option<(PathBuf, PathBuf)>,
}

impl EtcdAuth {
    /// From the environment: `MESHGATE_ETCD_USER`, `MESHGATE_ETCD_PASSWORD`,
    /// `MESHGATE_ETCD_CA`, `MESHGATE_ETCD_CERT`, `MESHGATE_ETCD_KEY`.
    pub fn from_env() -> EtcdAuth {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        EtcdAuth {
            user: var("MESHGATE_ETCD_USER")
                .map(|u| (u, var("MESHGATE_ETCD_PASSWORD").unwrap_or_default())),
            ca: var("MESHGATE_ETCD_CA").map(PathBuf::from),
            cert_key: var("MESHGATE_ETCD_CERT")
                .zip(var("MESHGATE_ETCD_KEY"))
                .map(|(c, k)| (c.into(), k.into())),
        }
    }

    fn options(&self) -> Result<ConnectOptions, String> {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((u, p)) = &self.user {
            o = o.with_user(u.clone(), p.clone());
        }
        if self.ca.is_some() || self.cert_key.is_some() {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            if let Some((c, k)) = &self.cert_key {
                tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
            }
            o = o.with_tls(tls);
        }
        Ok(o)
    }
}

/// What a key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyIs {
    Instance(InstanceKey, Format),
    Node(String, Format),
    Other,
}

/// `name[.ext]`: the name and its format.
fn name_format(s: &str) -> Option<(&str, Format)> {
    match s.rsplit_once('.') {
        Some((stem, ext)) => Format::from_extension(ext).map(|f| (stem, f)),
        None => Some((s, Format::Yaml)),
    }
}

fn classify(rel: &str) -> KeyIs {
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.as_slice() {
        ["tenants", tenant, file] => match name_format(file) {
            Some((instance, f)) => KeyIs::Instance(InstanceKey::new(*tenant, instance), f),
            None => KeyIs::Other,
        },
        ["nodes", file] => match name_format(file) {
            Some((node, f)) => KeyIs::Node(node.to_string(), f),
            None => KeyIs::Other,
        },
        _ => KeyIs::Other,
    }
}

/// The copy of the prefix's keys: key (below the prefix) -> text.
#[derive(Default)]
struct Copy {
    docs: BTreeMap<String, String>,
    /// The revision the copy is current to.
    revision: i64,
}

struct Shared {
    url: EtcdUrl,
    auth: EtcdAuth,
    node: String,
    copy: RwLock<Copy>,
    watchers: crate::Watchers,
    /// The connected client, for status writes.
    client: Mutex<Option<Client>>,
    /// The lease the status key is held by.
    lease: Mutex<Option<i64>>,
    /// The last report, written again after a reconnect.
    report: Mutex<Option<NodeReport>>,
    /// Full reads after a compaction.
    rereads: std::sync::atomic::AtomicU64,
    /// The placement decisions and what they need to remember.
    place: Mutex<PlaceState>,
    /// The tenants this node runs (what the registry sees).
    visible: RwLock<BTreeSet<String>>,
    /// Wakes the placer (a change in the copy, a lease gained or lost).
    wake: tokio::sync::Notify,
    /// The lease keep-alive task (aborted on drop).
    keeper: Mutex<Option<tokio::task::AbortHandle>>,
    /// A lease given up for lost, revoked once etcd answers again (it may
    /// still hold slots).
    lost_lease: Mutex<Option<i64>>,
    /// Reads only (`meshgate --check`): every tenant visible, no lease,
    /// no status, no claims.
    observe: bool,
}

/// What placement keeps between rounds.
#[derive(Default)]
struct PlaceState {
    planner: Planner,
    /// Each tenant's last good placement (kept while its key is bad).
    good: BTreeMap<String, Placement>,
    /// Placement keys refused: tenant -> why.
    bad: BTreeMap<String, String>,
    /// Keys under the prefix that are none of meshgate's (reported once).
    unknown: BTreeSet<String>,
    /// etcd's revision went below the one applied: why it is refused.
    backwards: Option<String>,
}

/// Documents from etcd, kept current by a watch.
pub struct EtcdStore {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(k) = self.shared.keeper.lock().expect("poisoned").take() {
            k.abort();
        }
    }
}

/// How long a node's lease outlives it by default (`lease_ttl`).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

impl EtcdStore {
    /// Connects and reads everything under the prefix, giving up after
    /// `timeout`; then keeps the copy current in the background. `node` is
    /// this node's name (its document is `PREFIX/nodes/<node>`).
    pub async fn connect(
        url: EtcdUrl,
        auth: EtcdAuth,
        node: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, StoreError> {
        Self::open(url, auth, node, timeout, false).await
    }

    /// As [`EtcdStore::connect`], only reading: every tenant shows
    /// whatever its placement, and the node neither joins the fleet (no
    /// lease, no status key) nor claims anything (`meshgate --check`).
    pub async fn observe(
        url: EtcdUrl,
        auth: EtcdAuth,
        node: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, StoreError> {
        Self::open(url, auth, node, timeout, true).await
    }

    async fn open(
        url: EtcdUrl,
        auth: EtcdAuth,
        node: &str,
        timeout: Duration,
        observe: bool,
    ) -> Result<EtcdStore, StoreError> {
        check_name(node).map_err(|message| StoreError::Name {
            source_name: "the node's name".into(),
            message,
        })?;
        let shared = Arc::new(Shared {
            url,
            auth,
            node: node.to_string(),
            copy: RwLock::new(Copy::default()),
            watchers: Mutex::new(Vec::new()),
            client: Mutex::new(None),
            lease: Mutex::new(None),
            report: Mutex::new(None),
            rereads: Default::default(),
            place: Mutex::new(PlaceState::default()),
            visible: RwLock::new(BTreeSet::new()),
            wake: tokio::sync::Notify::new(),
            keeper: Mutex::new(None),
            lost_lease: Mutex::new(None),
            observe,
        });
        let first = async {
            let mut client = shared.connect().await?;
            shared.read_all(&mut client).await?;
            // Alive (the status key) and placed before the registry reads.
            shared.write_status(&mut client).await;
            shared.place(&mut client).await;
            Ok::<_, String>(client)
        };
        let client = tokio::time::timeout(timeout, first)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))
            .and_then(|r| r)
            .map_err(|message| shared.unreachable(message))?;
        *shared.client.lock().expect("poisoned") = Some(client);
        let mut tasks = vec![tokio::spawn(shared.clone().run())];
        if !observe {
            tasks.push(tokio::spawn(shared.clone().placer()));
        }
        Ok(EtcdStore { shared, tasks })
    }

    /// Stops talking to etcd as a crashed node would: no more watching,
    /// placing or lease renewals, nothing revoked (the lease expires and
    /// what this node held moves). For tests of failover in one process.
    pub fn crash(&self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(k) = self.shared.keeper.lock().expect("poisoned").take() {
            k.abort();
        }
    }

    /// The tenants this node runs now.
    pub fn placed(&self) -> Vec<String> {
        self.shared
            .visible
            .read()
            .expect("poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// The revision the copy is current to.
    pub fn revision(&self) -> i64 {
        self.shared.copy.read().expect("poisoned").revision
    }

    /// How often everything was read again because the revisions to
    /// resume from were compacted.
    pub fn rereads(&self) -> u64 {
        self.shared
            .rereads
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A key's text as a document.
fn parse_doc(full: &str, text: &str, fmt: Format) -> Result<serde_json::Value, StoreError> {
    format::parse(text, fmt, &format!("etcd {full}"))
}

impl Shared {
    fn full(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url.prefix)
    }

    fn unreachable(&self, message: String) -> StoreError {
        StoreError::Io {
            path: format!("etcd {}", self.url.endpoints.join(",")),
            source: std::io::Error::other(message),
        }
    }

    async fn connect(&self) -> Result<Client, String> {
        let options = self.auth.options()?;
        Client::connect(&self.url.endpoints, Some(options))
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads every key under the prefix; replaces the copy and announces
    /// what differs.
    async fn read_all(&self, client: &mut Client) -> Result<(), String> {
        let resp = client
            .get(
                format!("{}/", self.url.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut docs = BTreeMap::new();
        let skip = format!("{}/", self.url.prefix);
        for kv in resp.kvs() {
            let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) else {
                continue;
            };
            if let Some(rel) = key.strip_prefix(&skip) {
                docs.insert(rel.to_string(), value.to_string());
            }
        }
        let changed: Vec<String> = {
            let mut copy = self.copy.write().expect("poisoned");
            let keys: BTreeSet<&String> = copy.docs.keys().chain(docs.keys()).collect();
            let changed = keys
                .into_iter()
                .filter(|k| copy.docs.get(*k) != docs.get(*k))
                .cloned()
                .collect();
            copy.docs = docs;
            copy.revision = revision;
            changed
        };
        self.announce(&changed);
        self.refresh();
        self.wake.notify_one();
        Ok(())
    }

    /// Tells every watcher about the keys (below the prefix) that changed.
    fn announce(&self, keys: &[String]) {
        let mut batch: Vec<StoreEvent> = Vec::new();
        for k in keys {
            let ev = match classify(k) {
                KeyIs::Instance(key, _) => StoreEvent::Instance(key),
                KeyIs::Node(n, _) if n == self.node => StoreEvent::Node,
                _ => continue,
            };
            if !batch.contains(&ev) {
                batch.push(ev);
            }
        }
        if batch.is_empty() {
            return;
        }
        self.watchers
            .lock()
            .expect("poisoned")
            .retain(|w| w.send(batch.clone()).is_ok());
    }

    /// Applies one watch response to the copy: the keys that changed.
    fn apply(&self, resp: &WatchResponse) -> Vec<String> {
        let skip = format!("{}/", self.url.prefix);
        let mut copy = self.copy.write().expect("poisoned");
        let mut changed = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Some(rel) = kv.key_str().ok().and_then(|k| k.strip_prefix(&skip)) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => {
                    let text = kv.value_str().unwrap_or_default().to_string();
                    copy.docs.insert(rel.to_string(), text);
                }
                EventType::Delete => {
                    copy.docs.remove(rel);
                }
            }
            copy.revision = copy.revision.max(kv.mod_revision());
            changed.push(rel.to_string());
        }
        if let Some(h) = resp.header() {
            copy.revision = copy.revision.max(h.revision());
        }
        changed
    }

    /// Keeps the copy current for good: watch from the revision after the
    /// copy's, re-read on compaction, reconnect with backoff.
    async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut client = self.client.lock().expect("poisoned").clone();
        loop {
            let c = match client.take() {
                Some(c) => Ok(c),
                None => self.connect().await,
            };
            let result = match c {
                Ok(mut c) => {
                    *self.client.lock().expect("poisoned") = Some(c.clone());
                    self.write_status(&mut c).await;
                    let r = self.watch(&mut c).await;
                    if r.is_ok() {
                        // Compacted: read again and watch on at once.
                        client = Some(c);
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                *self.client.lock().expect("poisoned") = None;
                tracing::warn!(etcd = %self.url.endpoints.join(","), error = %e, retry_in = ?backoff, "cannot follow etcd; the last config read keeps running");
            }
            let jitter = 0.8 + 0.4 * (std::process::id() as f64 * 0.618 % 1.0);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Watches from the copy's revision on until the watch fails
    /// (`Err`) or the revision was compacted (`Ok`, after reading
    /// everything again).
    async fn watch(self: &Arc<Self>, client: &mut Client) -> Result<(), String> {
        let from = self.copy.read().expect("poisoned").revision + 1;
        // A revision below the one applied: etcd restored from an older
        // backup, or another cluster. Its documents are refused (they
        // would roll the fleet back unasked); the last config runs on.
        let now = client
            .get(
                format!("{}/", self.url.prefix),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(|e| e.to_string())?
            .header()
            .map_or(0, |h| h.revision());
        if now < from - 1 {
            let why = format!(
                "etcd's revision {now} is below the {} this node applied (etcd restored from an older backup, or another cluster): its documents are refused and the last config keeps running; restart the node to take them as they are",
                from - 1
            );
            let first = self
                .place
                .lock()
                .expect("poisoned")
                .backwards
                .replace(why.clone())
                .is_none();
            if first {
                tracing::error!(etcd = %self.url.endpoints.join(","), "{why}");
                self.write_status(client).await;
            }
            return Err(why);
        }
        if self
            .place
            .lock()
            .expect("poisoned")
            .backwards
            .take()
            .is_some()
        {
            self.write_status(client).await;
        }
        let (_watcher, mut stream) = client
            .watch(
                format!("{}/", self.url.prefix),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from)
                        .with_progress_notify(),
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(etcd = %self.url.endpoints.join(","), prefix = %self.url.prefix, from, "watching etcd");
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err("the watch ended".into()),
                Err(e) => return Err(e.to_string()),
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    tracing::warn!(
                        from,
                        compacted = resp.compact_revision(),
                        "etcd compacted the revisions we had not seen; reading everything again"
                    );
                    self.read_all(client).await?;
                    self.rereads
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                return Err(format!("the watch was cancelled: {}", resp.cancel_reason()));
            }
            let changed = self.apply(&resp);
            self.announce(&changed);
            // The placer decides again (at once; changes that come faster
            // are decided together).
            self.wake.notify_one();
        }
    }

    /// Writes this node's status to `PREFIX/status/<node>` under its
    /// lease: the last report, refused placement keys, what it holds.
    async fn write_status(self: &Arc<Self>, client: &mut Client) {
        if self.observe {
            return;
        }
        let report = self
            .report
            .lock()
            .expect("poisoned")
            .clone()
            .unwrap_or_default();
        let lease = match self.lease(client).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot write this node's status to etcd");
                return;
            }
        };
        let (revision, holds, drained) = {
            let copy = self.copy.read().expect("poisoned");
            let holds: BTreeSet<&str> = copy
                .docs
                .iter()
                .filter(|(_, v)| **v == self.node)
                .filter_map(|(k, _)| k.strip_prefix("owners/")?.split_once('/'))
                .map(|(t, _)| t)
                .collect();
            let holds: Vec<String> = holds.into_iter().map(str::to_string).collect();
            let drained = copy.docs.contains_key(&format!("drain/{}", self.node));
            (copy.revision, holds, drained)
        };
        let mut rejected: Vec<serde_json::Value> = report
            .rejected
            .iter()
            .map(|(k, why)| {
                serde_json::json!({
                    "tenant": k.tenant, "instance": k.instance, "error": why,
                })
            })
            .collect();
        {
            let place = self.place.lock().expect("poisoned");
            for (t, why) in &place.bad {
                rejected.push(serde_json::json!({
                    "tenant": t, "instance": "placement", "error": why,
                }));
            }
            for k in &place.unknown {
                rejected.push(serde_json::json!({
                    "tenant": "-", "instance": k,
                    "error": "not a key meshgate reads (expected tenants/<tenant>/<instance>, nodes/<node>, placement/<tenant>)",
                }));
            }
            if let Some(why) = &place.backwards {
                rejected.push(serde_json::json!({
                    "tenant": "-", "instance": "revision", "error": why,
                }));
            }
        }
        let body = serde_json::json!({
            "node": self.node,
            "revision": revision,
            "rejected": rejected,
            "holds": holds,
            "drained": drained,
        });
        if let Err(e) = client
            .put(
                self.full(&format!("status/{}", self.node)),
                body.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot write this node's status to etcd");
        }
    }

    /// This node's `lease_ttl` (its document; default 10 s).
    fn lease_ttl(&self) -> Duration {
        let copy = self.copy.read().expect("poisoned");
        let doc = copy.docs.iter().find_map(|(k, v)| match classify(k) {
            KeyIs::Node(n, f) if n == self.node => parse_doc(&self.full(k), v, f).ok(),
            _ => None,
        });
        let ttl = match doc.as_ref().map(|d| &d["lease_ttl"]) {
            Some(serde_json::Value::String(t)) => humantime::parse_duration(t).ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64().map(Duration::from_secs),
            _ => None,
        };
        ttl.unwrap_or(DEFAULT_LEASE_TTL).max(Duration::from_secs(2))
    }

    /// The node's lease: granted once and kept alive by a task; a new one
    /// once that task ends. The task ends (and the node stops running its
    /// `replicas` tenants) when keep-alives go unanswered until shortly
    /// before etcd would let the lease expire.
    async fn lease(self: &Arc<Self>, client: &mut Client) -> Result<i64, String> {
        if let Some(id) = *self.lease.lock().expect("poisoned") {
            return Ok(id);
        }
        let lost = self.lost_lease.lock().expect("poisoned").take();
        if let Some(old) = lost {
            let _ = client.lease_revoke(old).await;
        }
        // `lease_ttl` bounds how long a dead node's tenants wait: the lease
        // is 1 s shorter, which leaves etcd's expiry check (every 0.5 s)
        // and the next node's claim that second.
        let ttl = self
            .lease_ttl()
            .saturating_sub(Duration::from_secs(1))
            .max(Duration::from_secs(2));
        let granted = tokio::time::Instant::now();
        let id = client
            .lease_grant(ttl.as_secs() as i64, None)
            .await
            .map_err(|e| e.to_string())?
            .id();
        let (mut keeper, mut answers) = client
            .lease_keep_alive(id)
            .await
            .map_err(|e| e.to_string())?;
        *self.lease.lock().expect("poisoned") = Some(id);
        let every = (ttl / 3).max(Duration::from_millis(500));
        let margin = (ttl / 4).min(Duration::from_secs(1));
        let me = Arc::downgrade(self);
        let node = self.node.clone();
        let task = tokio::spawn(async move {
            let mut answered = granted;
            loop {
                tokio::time::sleep(every).await;
                let sent = tokio::time::Instant::now();
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                let deadline = answered + ttl - margin;
                match tokio::time::timeout_at(deadline, answers.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => answered = sent,
                    _ => break,
                }
            }
            tracing::warn!(node = %node, lease = id, "this node's lease in etcd is lost or about to expire; it stops running the tenants it held until it has a new one");
            if let Some(shared) = me.upgrade() {
                let mut lease = shared.lease.lock().expect("poisoned");
                if *lease == Some(id) {
                    *lease = None;
                    *shared.lost_lease.lock().expect("poisoned") = Some(id);
                }
                drop(lease);
                shared.wake.notify_one();
            }
        });
        if let Some(old) = self
            .keeper
            .lock()
            .expect("poisoned")
            .replace(task.abort_handle())
        {
            old.abort();
        }
        self.wake.notify_one();
        Ok(id)
    }

    /// What the copy says about the fleet, for [`Planner::plan`].
    fn fleet(&self) -> Fleet {
        let copy = self.copy.read().expect("poisoned");
        let mut place = self.place.lock().expect("poisoned");
        let mut f = Fleet::default();
        let mut seen = BTreeSet::new();
        let mut seen_unknown = BTreeSet::new();
        for (k, v) in &copy.docs {
            match classify(k) {
                KeyIs::Instance(key, _) => {
                    if check_name(&key.tenant).is_ok() {
                        f.tenants.insert(key.tenant);
                    }
                    continue;
                }
                KeyIs::Node(n, fmt) => {
                    if let Ok(doc) = parse_doc(&self.full(k), v, fmt) {
                        let labels: BTreeMap<String, String> =
                            serde_json::from_value(doc["labels"].clone()).unwrap_or_default();
                        f.labels.insert(n, labels);
                    }
                    continue;
                }
                KeyIs::Other => {}
            }
            let parts: Vec<&str> = k.split('/').collect();
            match parts.as_slice() {
                ["status", n] => {
                    f.alive.insert(n.to_string());
                }
                ["drain", n] => {
                    f.drained.insert(n.to_string());
                }
                ["owners", t, slot] => {
                    if let Ok(slot) = slot.parse::<u32>() {
                        f.owners
                            .entry(t.to_string())
                            .or_default()
                            .insert(slot, v.clone());
                    }
                }
                ["placement", file] => {
                    let Some((t, fmt)) = name_format(file) else {
                        continue;
                    };
                    seen.insert(t.to_string());
                    let parsed = check_name(t)
                        .and_then(|_| parse_doc(&self.full(k), v, fmt).map_err(|e| e.to_string()))
                        .and_then(Placement::parse);
                    match parsed {
                        Ok(p) => {
                            place.bad.remove(t);
                            place.good.insert(t.to_string(), p);
                        }
                        Err(e) => {
                            if place.bad.get(t) != Some(&e) {
                                tracing::error!(key = %self.full(k), error = %e, "placement refused; the tenant stays where it runs");
                            }
                            place.bad.insert(t.to_string(), e);
                        }
                    }
                }
                ["status" | "drain" | "owners", ..] => {}
                _ => {
                    if place.unknown.insert(k.clone()) {
                        tracing::warn!(key = %self.full(k), "a key under the prefix that meshgate does not read (expected tenants/<tenant>/<instance>, nodes/<node>, placement/<tenant>)");
                    }
                    seen_unknown.insert(k.clone());
                }
            }
        }
        place.unknown.retain(|k| seen_unknown.contains(k));
        // A placement key deleted: the tenant runs everywhere again.
        place.good.retain(|t, _| seen.contains(t));
        place.bad.retain(|t, _| seen.contains(t));
        f.placements = place.good.clone();
        f.unplaced = place
            .bad
            .keys()
            .filter(|t| !place.good.contains_key(*t))
            .cloned()
            .collect();
        f
    }

    /// Decides what this node runs now; announces the tenants that came
    /// or went, and returns the claims and releases to make.
    fn refresh(&self) -> Vec<Action> {
        let fleet = self.fleet();
        if self.observe {
            *self.visible.write().expect("poisoned") = fleet.tenants;
            return Vec::new();
        }
        let leased = self.lease.lock().expect("poisoned").is_some();
        let plan = self.place.lock().expect("poisoned").planner.plan(
            &fleet,
            &self.node,
            leased,
            std::time::Instant::now(),
        );
        let changed: Vec<String> = {
            let mut visible = self.visible.write().expect("poisoned");
            let changed = visible
                .symmetric_difference(&plan.visible)
                .cloned()
                .collect();
            *visible = plan.visible;
            changed
        };
        if !changed.is_empty() {
            tracing::info!(node = %self.node, tenants = ?changed, "tenants placed here or moved away");
            let batch: Vec<StoreEvent> = changed.into_iter().map(StoreEvent::Tenant).collect();
            self.watchers
                .lock()
                .expect("poisoned")
                .retain(|w| w.send(batch.clone()).is_ok());
        }
        plan.actions
    }

    /// One placement round: decide, claim and release in etcd, decide
    /// again with the result.
    async fn place(self: &Arc<Self>, client: &mut Client) {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let actions = self.refresh();
        if actions.is_empty() {
            return;
        }
        let Some(lease) = *self.lease.lock().expect("poisoned") else {
            return;
        };
        let mut done = false;
        let mut txns = Vec::new();
        for a in actions {
            let (rel, txn) = match &a {
                Action::Claim(t, slot) => {
                    let rel = format!("owners/{t}/{slot}");
                    let key = self.full(&rel);
                    let txn = Txn::new()
                        .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key,
                            self.node.as_str(),
                            Some(PutOptions::new().with_lease(lease)),
                        )]);
                    (rel, txn)
                }
                Action::Release(t, slot) => {
                    let rel = format!("owners/{t}/{slot}");
                    let key = self.full(&rel);
                    let txn = Txn::new()
                        .when([Compare::value(
                            key.clone(),
                            CompareOp::Equal,
                            self.node.as_str(),
                        )])
                        .and_then([TxnOp::delete(key, None)]);
                    (rel, txn)
                }
            };
            txns.push((matches!(a, Action::Claim(..)), rel, txn));
        }
        // Many at once (a dead node's 1,000 tenants), each its own
        // election: up to 64 transactions in flight.
        let mut failed = false;
        while !txns.is_empty() && !failed {
            let rest = txns.split_off(txns.len().min(64));
            let mut set = tokio::task::JoinSet::new();
            for (claim, rel, txn) in std::mem::replace(&mut txns, rest) {
                let mut c = client.clone();
                set.spawn(async move { (claim, rel, c.txn(txn).await) });
            }
            while let Some(r) = set.join_next().await {
                let Ok((claim, rel, r)) = r else { continue };
                match r {
                    Ok(r) if r.succeeded() => {
                        let mut copy = self.copy.write().expect("poisoned");
                        if claim {
                            tracing::info!(node = %self.node, slot = %rel, "claimed");
                            copy.docs.insert(rel, self.node.clone());
                        } else {
                            tracing::info!(node = %self.node, slot = %rel, "released");
                            copy.docs.remove(&rel);
                        }
                        done = true;
                    }
                    Ok(_) => {} // another node was first (or it was not ours)
                    Err(e) => {
                        if !failed {
                            tracing::warn!(error = %e, "cannot claim or release a tenant in etcd");
                        }
                        failed = true;
                    }
                }
            }
        }
        if done {
            self.refresh();
            self.write_status(client).await;
        }
    }

    /// Places again on every change and every second (a slot's grace
    /// runs out with no change to wake us).
    async fn placer(self: Arc<Self>) {
        let mut bad = 0;
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
            let client = self.client.lock().expect("poisoned").clone();
            match client {
                Some(mut c) => self.place(&mut c).await,
                None => {
                    self.refresh();
                }
            }
            // Refused placement keys show in the status key.
            let n = self.place.lock().expect("poisoned").bad.len();
            if n != bad {
                bad = n;
                let client = self.client.lock().expect("poisoned").clone();
                if let Some(mut c) = client {
                    self.write_status(&mut c).await;
                }
            }
        }
    }

    /// Revokes the lease: the status key and every slot held go at once.
    async fn resign(&self) {
        if let Some(k) = self.keeper.lock().expect("poisoned").take() {
            k.abort();
        }
        let lease = self.lease.lock().expect("poisoned").take();
        let client = self.client.lock().expect("poisoned").clone();
        if let (Some(id), Some(mut c)) = (lease, client) {
            match tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(id)).await {
                Ok(Ok(_)) => {
                    tracing::info!(node = %self.node, "left the fleet: what this node held moves now")
                }
                _ => {
                    tracing::warn!(node = %self.node, "could not revoke this node's lease; what it held moves when the lease expires")
                }
            }
        }
    }
}

#[async_trait]
impl ConfigStore for EtcdStore {
    fn describe(&self) -> String {
        format!(
            "etcd {} prefix {} (node {})",
            self.shared.url.endpoints.join(","),
            self.shared.url.prefix,
            self.shared.node
        )
    }

    async fn node(&self) -> Result<Option<Document>, StoreError> {
        let copy = self.shared.copy.read().expect("poisoned");
        let found: Vec<(&String, &String, Format)> = under(&copy.docs, "nodes/")
            .filter_map(|(k, v)| match classify(k) {
                KeyIs::Node(n, f) if n == self.shared.node => Some((k, v, f)),
                _ => None,
            })
            .collect();
        one(&self.shared, found)
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let visible = self.shared.visible.read().expect("poisoned");
        let copy = self.shared.copy.read().expect("poisoned");
        let t: BTreeSet<String> = copy
            .docs
            .keys()
            .filter_map(|k| match classify(k) {
                KeyIs::Instance(key, _)
                    if check_name(&key.tenant).is_ok() && visible.contains(&key.tenant) =>
                {
                    Some(key.tenant)
                }
                _ => None,
            })
            .collect();
        Ok(t.into_iter().collect())
    }

    async fn instances(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        if !self
            .shared
            .visible
            .read()
            .expect("poisoned")
            .contains(tenant)
        {
            return Ok(Vec::new());
        }
        let copy = self.shared.copy.read().expect("poisoned");
        let mut names = BTreeSet::new();
        for (k, _) in under(&copy.docs, &format!("tenants/{tenant}/")) {
            if let KeyIs::Instance(key, _) = classify(k) {
                if key.tenant != tenant {
                    continue;
                }
                check_name(&key.instance).map_err(|message| StoreError::Name {
                    source_name: format!("etcd {}", self.shared.full(k)),
                    message,
                })?;
                names.insert(key.instance);
            }
        }
        Ok(names.into_iter().collect())
    }

    async fn get(&self, key: &InstanceKey) -> Result<Option<Document>, StoreError> {
        if !self
            .shared
            .visible
            .read()
            .expect("poisoned")
            .contains(&key.tenant)
        {
            return Ok(None);
        }
        let copy = self.shared.copy.read().expect("poisoned");
        let prefix = format!("tenants/{}/{}", key.tenant, key.instance);
        let found: Vec<(&String, &String, Format)> = under(&copy.docs, &prefix)
            .filter_map(|(k, v)| match classify(k) {
                KeyIs::Instance(ik, f) if ik == *key => Some((k, v, f)),
                _ => None,
            })
            .collect();
        one(&self.shared, found)
    }

    fn watch(&self) -> Result<Option<Watch>, StoreError> {
        Ok(Some(Watch::subscribe(&self.shared.watchers)))
    }

    async fn report(&self, report: &NodeReport) {
        *self.shared.report.lock().expect("poisoned") = Some(report.clone());
        let client = self.shared.client.lock().expect("poisoned").clone();
        if let Some(mut c) = client {
            self.shared.write_status(&mut c).await;
        }
    }

    async fn close(&self) {
        self.shared.resign().await;
    }
}

/// The keys of `docs` that start with `prefix` (a range, not a scan).
fn under<'a>(
    docs: &'a BTreeMap<String, String>,
    prefix: &str,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    let p = prefix.to_string();
    docs.range(p.clone()..)
        .take_while(move |(k, _)| k.starts_with(&p))
}

/// The one document among `found`, parsed; an error naming both when two
/// keys are the same document (`web` and `web.json`).
fn one(
    shared: &Shared,
    found: Vec<(&String, &String, Format)>,
) -> Result<Option<Document>, StoreError> {
    match found.as_slice() {
        [] => Ok(None),
        [(k, text, f)] => {
            let full = shared.full(k);
            Ok(Some(Document {
                value: parse_doc(&full, text, *f)?,
                source: format!("etcd {full}"),
            }))
        }
        [(a, ..), (b, ..), ..] => Err(StoreError::Name {
            source_name: format!("etcd {}", shared.full(a)),
            message: format!(
                "{} is the same document: keep one of the two keys",
                shared.full(b)
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = EtcdUrl::parse("etcd://127.0.0.1:2379/meshgate").unwrap();
        assert_eq!(u.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(u.prefix, "/meshgate");
        let u = EtcdUrl::parse("etcds://a:2379,b:2379/fleet/eu/").unwrap();
        assert_eq!(u.endpoints, ["https://a:2379", "https://b:2379"]);
        assert_eq!(u.prefix, "/fleet/eu");
        for bad in [
            "http://a:2379/x",
            "etcd://a:2379",
            "etcd://a:2379/",
            "etcd://a/x",
            "etcd://:2379/x",
        ] {
            assert!(EtcdUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys() {
        assert_eq!(
            classify("tenants/acme/web"),
            KeyIs::Instance(InstanceKey::new("acme", "web"), Format::Yaml)
        );
        assert_eq!(
            classify("tenants/acme/web.toml"),
            KeyIs::Instance(InstanceKey::new("acme", "web"), Format::Toml)
        );
        assert_eq!(
            classify("nodes/a.json"),
            KeyIs::Node("a".into(), Format::Json)
        );
        assert_eq!(classify("status/a"), KeyIs::Other);
        assert_eq!(classify("tenants/acme/web.txt"), KeyIs::Other);
        assert_eq!(classify("tenants/acme/x/y"), KeyIs::Other);
    }
}

/// One node of a fleet as its status key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetNode {
    /// Its name.
    pub node: String,
    /// Whether its status key is held (its lease renewed): the node runs
    /// and reaches etcd.
    pub alive: bool,
    /// The revision it had applied at its last report.
    pub revision: Option<i64>,
    /// Documents it refused: `tenant/instance` and why.
    pub rejected: Vec<(String, String)>,
    /// Whether it is drained (`meshgatectl drain`).
    pub drained: bool,
    /// The `replicas` tenants it holds.
    pub holds: Vec<String>,
}

/// The fleet under `url`'s prefix: every node with a status key or a node
/// document, and etcd's current revision.
pub async fn fleet_status(url: &EtcdUrl, auth: &EtcdAuth) -> Result<(i64, Vec<FleetNode>), String> {
    let mut client = Client::connect(&url.endpoints, Some(auth.options()?))
        .await
        .map_err(|e| format!("etcd {}: {e}", url.endpoints.join(",")))?;
    let resp = client
        .get(
            format!("{}/", url.prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| format!("etcd {}: {e}", url.endpoints.join(",")))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let skip = format!("{}/", url.prefix);
    let mut nodes: BTreeMap<String, FleetNode> = BTreeMap::new();
    let blank = |node: &str| FleetNode {
        node: node.to_string(),
        alive: false,
        revision: None,
        rejected: Vec::new(),
        drained: false,
        holds: Vec::new(),
    };
    for kv in resp.kvs() {
        let Some(rel) = kv.key_str().ok().and_then(|k| k.strip_prefix(&skip)) else {
            continue;
        };
        if let KeyIs::Node(n, _) = classify(rel) {
            nodes.entry(n.clone()).or_insert_with(|| blank(&n));
        } else if let Some(n) = rel.strip_prefix("drain/") {
            nodes
                .entry(n.to_string())
                .or_insert_with(|| blank(n))
                .drained = true;
        } else if let Some((t, _)) = rel.strip_prefix("owners/").and_then(|r| r.split_once('/')) {
            let n = String::from_utf8_lossy(kv.value()).into_owned();
            let e = nodes.entry(n.clone()).or_insert_with(|| blank(&n));
            if !e.holds.iter().any(|h| h == t) {
                e.holds.push(t.to_string());
            }
        } else if let Some(n) = rel.strip_prefix("status/") {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap_or_default();
            let e = nodes.entry(n.to_string()).or_insert_with(|| blank(n));
            e.alive = true;
            e.revision = v["revision"].as_i64();
            e.rejected = v["rejected"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            (
                                format!(
                                    "{}/{}",
                                    r["tenant"].as_str().unwrap_or("?"),
                                    r["instance"].as_str().unwrap_or("?")
                                ),
                                r["error"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    Ok((revision, nodes.into_values().collect()))
}

/// Drains `node` (puts `PREFIX/drain/<node>`: it gives up its
/// `replicas` tenants, which move, and runs nothing from `tenants/`), or
/// undoes it (`on` false). Returns whether anything changed.
pub async fn drain(url: &EtcdUrl, auth: &EtcdAuth, node: &str, on: bool) -> Result<bool, String> {
    check_name(node).map_err(|e| format!("node `{node}`: {e}"))?;
    let at = url.endpoints.join(",");
    let mut client = Client::connect(&url.endpoints, Some(auth.options()?))
        .await
        .map_err(|e| format!("etcd {at}: {e}"))?;
    let key = format!("{}/drain/{node}", url.prefix);
    if on {
        let resp = client
            .put(
                key,
                "drained by meshgatectl",
                Some(PutOptions::new().with_prev_key()),
            )
            .await
            .map_err(|e| format!("etcd {at}: {e}"))?;
        Ok(resp.prev_key().is_none())
    } else {
        let resp = client
            .delete(key, None)
            .await
            .map_err(|e| format!("etcd {at}: {e}"))?;
        Ok(resp.deleted() > 0)
    }
}

/// What `apply_dir` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Keys written (new or changed), below the prefix.
    pub put: Vec<String>,
    /// Keys deleted (gone from the directory), below the prefix.
    pub deleted: Vec<String>,
    /// The revision after the transaction (the one before, if nothing changed).
    pub revision: i64,
}

/// The documents of a config directory as etcd keys below the prefix:
/// `tenants/<t>/<i>` (`.toml` kept for TOML) and `nodes/<n>` from
/// `DIR/nodes/<n>.yaml` (a fleet's node documents) and `placement/<t>` from
/// `DIR/placement/<t>.yaml` (where a tenant runs), with their text.
pub fn dir_documents(dir: &std::path::Path) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let read_dir = |p: &std::path::Path| -> Result<Vec<std::path::PathBuf>, String> {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut add =
        |group: &str, owner: Option<&str>, file: &std::path::Path| -> Result<(), String> {
            let (Some(stem), Some(ext)) = (
                file.file_stem().and_then(|s| s.to_str()),
                file.extension().and_then(|s| s.to_str()),
            ) else {
                return Ok(());
            };
            let Some(fmt) = Format::from_extension(ext) else {
                return Ok(());
            };
            check_name(stem).map_err(|e| format!("{}: {e}", file.display()))?;
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let name = if fmt == Format::Toml {
                format!("{stem}.toml")
            } else {
                stem.to_string()
            };
            let key = match owner {
                Some(o) => format!("{group}/{o}/{name}"),
                None => format!("{group}/{name}"),
            };
            if out.insert(key.clone(), text).is_some() {
                return Err(format!(
                    "{}: two files for `{key}` (one document per name)",
                    file.display()
                ));
            }
            Ok(())
        };
    let tenants = dir.join("tenants");
    if tenants.is_dir() {
        for t in read_dir(&tenants)? {
            if !t.is_dir() {
                continue;
            }
            let Some(tenant) = t.file_name().and_then(|s| s.to_str()).map(str::to_string) else {
                continue;
            };
            check_name(&tenant).map_err(|e| format!("{}: {e}", t.display()))?;
            for f in read_dir(&t)? {
                add("tenants", Some(&tenant), &f)?;
            }
        }
    }
    for group in ["nodes", "placement"] {
        let d = dir.join(group);
        if d.is_dir() {
            for f in read_dir(&d)? {
                add(group, None, &f)?;
            }
        }
    }
    // Placements are checked as the nodes will read them.
    for (k, text) in &out {
        if let Some(file) = k.strip_prefix("placement/") {
            let (_, fmt) = name_format(file).unwrap_or((file, Format::Yaml));
            parse_doc(k, text, fmt)
                .map_err(|e| e.to_string())
                .and_then(Placement::parse)
                .map_err(|e| format!("{}: {e}", dir.join(k).display()))?;
        }
    }
    Ok(out)
}

/// Writes `docs` (from [`dir_documents`]) under the prefix in one
/// transaction, deleting the `tenants/`, `nodes/` and `placement/` keys they no longer
/// have: all or nothing. Only what differs is written; the transaction
/// holds only if none of those keys changed since they were read (another
/// writer), else nothing is written and the error says to run again.
/// `dry_run`: what would change, nothing written.
pub async fn apply(
    url: &EtcdUrl,
    auth: &EtcdAuth,
    docs: &BTreeMap<String, String>,
    dry_run: bool,
) -> Result<Applied, String> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let at = url.endpoints.join(",");
    let mut client = Client::connect(&url.endpoints, Some(auth.options()?))
        .await
        .map_err(|e| format!("etcd {at}: {e}"))?;
    let skip = format!("{}/", url.prefix);
    let mut current: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut revision = 0;
    for group in ["tenants/", "nodes/", "placement/"] {
        let resp = client
            .get(
                format!("{skip}{group}"),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| format!("etcd {at}: {e}"))?;
        revision = resp.header().map_or(revision, |h| h.revision());
        for kv in resp.kvs() {
            if let Some(rel) = kv.key_str().ok().and_then(|k| k.strip_prefix(&skip)) {
                let text = String::from_utf8_lossy(kv.value()).into_owned();
                current.insert(rel.to_string(), (text, kv.mod_revision()));
            }
        }
    }
    let mut applied = Applied {
        revision,
        ..Applied::default()
    };
    let (mut guards, mut ops) = (Vec::new(), Vec::new());
    for (k, text) in docs {
        match current.get(k) {
            Some((old, _)) if old == text => continue,
            Some((_, rev)) => guards.push(Compare::mod_revision(
                format!("{skip}{k}"),
                CompareOp::Equal,
                *rev,
            )),
            None => guards.push(Compare::version(format!("{skip}{k}"), CompareOp::Equal, 0)),
        }
        ops.push(TxnOp::put(format!("{skip}{k}"), text.as_str(), None));
        applied.put.push(k.clone());
    }
    for (k, (_, rev)) in &current {
        if !docs.contains_key(k) {
            guards.push(Compare::mod_revision(
                format!("{skip}{k}"),
                CompareOp::Equal,
                *rev,
            ));
            ops.push(TxnOp::delete(format!("{skip}{k}"), None));
            applied.deleted.push(k.clone());
        }
    }
    if ops.is_empty() || dry_run {
        return Ok(applied);
    }
    let resp = client
        .txn(Txn::new().when(guards).and_then(ops))
        .await
        .map_err(|e| {
            let e = e.to_string();
            if e.contains("too many operations") {
                format!("etcd {at}: {e}: {} changes are more than etcd takes in one transaction (its --max-txn-ops, 128 by default); raise it", applied.put.len() + applied.deleted.len())
            } else {
                format!("etcd {at}: {e}")
            }
        })?;
    if !resp.succeeded() {
        return Err(format!(
            "etcd {at}: documents under {} changed while they were being applied; nothing was written: run again",
            url.prefix
        ));
    }
    applied.revision = resp.header().map_or(revision, |h| h.revision());
    Ok(applied)
}
