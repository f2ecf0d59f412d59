//! The directory store: one file per module instance.
//!
//! ```text
//! DIR/meshgate.yaml                      the node document
//! DIR/tenants/<tenant>/<instance>.yaml   one module instance (.yml, .json, .toml too)
//! ```
//!
//! Hidden files (`.name`), editor leftovers (`name~`, `.swp`) and files with
//! other extensions are ignored, so an editor saving in place does not
//! produce phantom instances. Two files with the same stem (`web.yaml` and
//! `web.json`) are an error. The watcher uses inotify on the root, `tenants`
//! and each tenant's directory (not openings and reads: see `MASK`),
//! debounces bursts for [`DEBOUNCE`] and maps every path to the narrowest
//! [`StoreEvent`]; a queue overflow reads everything again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;

use crate::format::{self, Format};
use crate::{check_name, ConfigStore, Document, InstanceKey, StoreError, StoreEvent, Watch};

/// How long the watcher waits for a burst of file events to settle.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Names tried for the node document, in order.
const NODE_FILES: [&str; 4] = [
    "meshgate.yaml",
    "meshgate.yml",
    "meshgate.json",
    "meshgate.toml",
];

/// A config directory.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store rooted at `root`. The directory must exist.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let meta = std::fs::metadata(&root).map_err(|source| StoreError::Io {
            path: root.display().to_string(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(StoreError::Io {
                path: root.display().to_string(),
                source: std::io::Error::other("not a directory"),
            });
        }
        Ok(Self { root })
    }

    /// The directory this store reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.root)
            .unwrap_or(p)
            .display()
            .to_string()
    }

    fn tenants_dir(&self) -> PathBuf {
        self.root.join("tenants")
    }

    fn io_err(&self, p: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.rel(p),
            source,
        }
    }

    /// The config files of one tenant, by instance name.
    fn instance_files(&self, tenant: &str) -> Result<BTreeMap<String, PathBuf>, StoreError> {
        let dir = self.tenants_dir().join(tenant);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.io_err(&dir, e)),
        };
        let mut out: BTreeMap<String, PathBuf> = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io_err(&dir, e))?;
            let path = entry.path();
            let Some((stem, _)) = config_file_name(&path) else {
                continue;
            };
            check_name(&stem).map_err(|message| StoreError::Name {
                source_name: self.rel(&path),
                message,
            })?;
            if let Some(prev) = out.insert(stem.clone(), path.clone()) {
                return Err(StoreError::Name {
                    source_name: self.rel(&path),
                    message: format!(
                        "instance `{stem}` is also defined by {}: keep one file per instance",
                        self.rel(&prev)
                    ),
                });
            }
        }
        Ok(out)
    }

    fn read(&self, path: &Path) -> Result<Document, StoreError> {
        let source = self.rel(path);
        let bytes = std::fs::read(path).map_err(|e| self.io_err(path, e))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            self.io_err(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
            )
        })?;
        let fmt = config_file_name(path)
            .map(|(_, f)| f)
            .unwrap_or(Format::Yaml);
        let value = format::parse(&text, fmt, &source)?;
        Ok(Document { source, value })
    }

    /// Maps a changed path to the event that covers it.
    fn event_for(&self, path: &Path) -> Option<StoreEvent> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
        match parts.as_slice() {
            [] => Some(StoreEvent::Everything),
            [file] if NODE_FILES.contains(file) => Some(StoreEvent::Node),
            ["tenants"] => Some(StoreEvent::Everything),
            ["tenants", tenant] => Some(StoreEvent::Tenant(tenant.to_string())),
            ["tenants", tenant, _file] => {
                let (stem, _) = config_file_name(path)?;
                Some(StoreEvent::Instance(InstanceKey::new(*tenant, stem)))
            }
            _ => None,
        }
    }
}

/// `(stem, format)` if `path` names a config file we read, else `None`.
fn config_file_name(path: &Path) -> Option<(String, Format)> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') || name.ends_with('~') {
        return None;
    }
    let (stem, ext) = name.rsplit_once('.')?;
    let fmt = Format::from_extension(ext)?;
    Some((stem.to_string(), fmt))
}

/// Whether `dir` holds a config file (`.yaml`, `.yml`, `.json`, `.toml`)
/// within `depth` levels: a folder of certificates is not config, a
/// misspelt `tenant/acme/web.yaml` is.
fn holds_config(dir: &Path, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if hidden(&p) {
            false
        } else if p.is_dir() {
            depth > 0 && holds_config(&p, depth - 1)
        } else {
            config_file_name(&p).is_some()
        }
    })
}

fn hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'))
}

#[async_trait]
impl ConfigStore for DirStore {
    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }

    /// What [`ConfigStore::unread`] says of a directory: config files and
    /// folders of config files where meshgate reads none (at the root
    /// besides the node document and `tenants/`, directly in `tenants/`,
    /// in a folder inside a tenant's).
    fn unread(&self) -> Vec<String> {
        let mut out = Vec::new();
        let listed = |dir: &Path| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|es| {
                    es.flatten()
                        .map(|e| e.path())
                        .filter(|p| !hidden(p))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        for p in listed(&self.root) {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_dir() {
                if name == "tenants" || !holds_config(&p, 2) {
                    continue;
                }
                out.push(match name {
                    "placement" | "nodes" => format!(
                        "{name}/: not read: placement and node documents are read from an etcd store only (--store etcd://...)"
                    ),
                    _ => format!(
                        "{name}/: not read: a tenant's documents go in tenants/<tenant>/<instance>.yaml"
                    ),
                });
            } else if config_file_name(&p).is_some() && !NODE_FILES.contains(&name) {
                out.push(format!(
                    "{name}: not read: the node document is meshgate.yaml, a module instance goes in tenants/<tenant>/<instance>.yaml"
                ));
            }
        }
        for p in listed(&self.tenants_dir()) {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_dir() {
                for inner in listed(&p) {
                    if inner.is_dir() && holds_config(&inner, 1) {
                        out.push(format!(
                            "{}/: not read: a folder inside a tenant's; a module instance is a file, tenants/{name}/<instance>.yaml",
                            self.rel(&inner)
                        ));
                    }
                }
            } else if config_file_name(&p).is_some() {
                out.push(format!(
                    "tenants/{name}: not read: a module instance goes in its tenant's folder, tenants/<tenant>/{name}"
                ));
            }
        }
        out
    }

    async fn node(&self) -> Result<Option<Document>, StoreError> {
        let mut found: Option<Document> = None;
        for name in NODE_FILES {
            let p = self.root.join(name);
            if !p.exists() {
                continue;
            }
            if let Some(prev) = &found {
                return Err(StoreError::Name {
                    source_name: name.to_string(),
                    message: format!("the node is also configured by {}: keep one", prev.source),
                });
            }
            found = Some(self.read(&p)?);
        }
        Ok(found)
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.tenants_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io_err(&dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io_err(&dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            check_name(&name).map_err(|message| StoreError::Name {
                source_name: self.rel(&entry.path()),
                message,
            })?;
            out.push(name);
        }
        out.sort();
        Ok(out)
    }

    async fn instances(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.instance_files(tenant)?.into_keys().collect())
    }

    async fn get(&self, key: &InstanceKey) -> Result<Option<Document>, StoreError> {
        match self.instance_files(&key.tenant)?.get(&key.instance) {
            Some(path) => self.read(path).map(Some),
            None => Ok(None),
        }
    }

    fn watch(&self) -> Result<Option<Watch>, StoreError> {
        let watch_err = |e: std::io::Error| StoreError::Watch {
            path: self.root.clone(),
            message: e.to_string(),
        };
        let inotify = Inotify::init().map_err(watch_err)?;
        let mut dirs = DirWatches {
            store: self.clone(),
            watches: inotify.watches(),
            dirs: HashMap::new(),
        };
        dirs.add_all().map_err(watch_err)?;
        let mut stream = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .map_err(watch_err)?;
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(first) = stream.next().await {
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + DEBOUNCE;
                while let Ok(Some(more)) = tokio::time::timeout_at(deadline, stream.next()).await {
                    batch.push(more);
                }
                let mut seen = HashSet::new();
                let mut events = Vec::new();
                for ev in batch {
                    for e in dirs.event(ev) {
                        if seen.insert(e.clone()) {
                            events.push(e);
                        }
                    }
                }
                if !events.is_empty() && tx.send(events).await.is_err() {
                    break;
                }
            }
        });
        Ok(Some(Watch {
            events: rx,
            guard: Box::new(AbortOnDrop(task)),
        }))
    }
}

/// Ends the watcher's task when the [`Watch`] is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What inotify reports of a config directory: files and directories
/// created, written, moved, deleted, or with new metadata. Not opened or
/// read: the store's own reads would be events, and starting 100,000
/// instances would overflow the kernel's queue (a rescan, which reads
/// everything again, and so on). `notify` watches openings; this does not.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO);

/// The directories watched, three levels of them: the root (node
/// documents, `tenants`), `tenants` (tenant directories) and each
/// tenant's directory (instance files).
struct DirWatches {
    store: DirStore,
    watches: Watches,
    /// The directory of each watch.
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl DirWatches {
    /// Watches the root, and `tenants` and every tenant's directory if
    /// they exist.
    fn add_all(&mut self) -> std::io::Result<()> {
        let root = self.store.root.clone();
        self.add(&root)?;
        self.add_tenants();
        Ok(())
    }

    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        let wd = self.watches.add(dir, MASK)?;
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// Watches `tenants` and each tenant's directory (again: adding a
    /// watch twice is harmless). A directory that vanished meanwhile is
    /// skipped; one that cannot be watched (the kernel's limit on
    /// watches) is logged.
    fn add_tenants(&mut self) {
        let tenants = self.store.tenants_dir();
        if let Err(e) = self.add(&tenants) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %tenants.display(), error = %e, "cannot watch; changes there are not seen until restart");
            }
            return;
        }
        let Ok(entries) = std::fs::read_dir(&tenants) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                self.add_tenant(&entry.path());
            }
        }
    }

    fn add_tenant(&mut self, dir: &Path) {
        if let Err(e) = self.add(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch; changes there are not seen until restart (fs.inotify.max_user_watches?)");
            }
        }
    }

    /// The store's events for one inotify event, watching directories
    /// that appeared. A new directory is watched before its event goes
    /// out, so what is written into it later is seen, and what was
    /// written before is read when its event is applied.
    fn event(&mut self, ev: std::io::Result<inotify::EventOwned>) -> Vec<StoreEvent> {
        let root = self.store.root.clone();
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, root = %root.display(), "config watcher error; reading everything again");
                return vec![StoreEvent::Everything];
            }
        };
        if ev.mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!(root = %root.display(), "config watcher queue overflowed; reading everything again");
            self.add_tenants();
            return vec![StoreEvent::Everything];
        }
        if ev.mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&ev.wd);
            return Vec::new();
        }
        let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), ev.name.as_ref()) else {
            return Vec::new();
        };
        let path = dir.join(name);
        // A directory, or a link to one (followed, as inotify does).
        let appeared = ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) && path.is_dir();
        if appeared {
            if path == self.store.tenants_dir() {
                self.add_tenants();
            } else if path.parent() == Some(&self.store.tenants_dir()) {
                self.add_tenant(&path);
            }
        }
        self.store.event_for(&path).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// Config that meshgate would not read is named, with what is
    /// expected; what is not config (certificates, notes, hidden folders)
    /// and what is read are not.
    #[test]
    fn names_what_it_does_not_read() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "meshgate.yaml", "node: gw1\n");
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        write(d.path(), "tenants/a/README.md", "notes");
        write(d.path(), "certs/server.pem", "-----BEGIN");
        write(d.path(), "README.md", "notes");
        write(d.path(), ".git/config.yaml", "x: 1\n");
        let s = DirStore::open(d.path()).unwrap();
        assert!(s.unread().is_empty(), "{:?}", s.unread());
        write(d.path(), "tenant/acme/web.yaml", "kind: pipe\n");
        write(d.path(), "placement/acme.yaml", "replicas: 1\n");
        write(d.path(), "web.yaml", "kind: pipe\n");
        write(d.path(), "tenants/db.yaml", "kind: pipe\n");
        write(d.path(), "tenants/a/more/x.yaml", "kind: pipe\n");
        assert_eq!(
            s.unread(),
            vec![
                "placement/: not read: placement and node documents are read from an etcd store only (--store etcd://...)",
                "tenant/: not read: a tenant's documents go in tenants/<tenant>/<instance>.yaml",
                "web.yaml: not read: the node document is meshgate.yaml, a module instance goes in tenants/<tenant>/<instance>.yaml",
                "tenants/a/more/: not read: a folder inside a tenant's; a module instance is a file, tenants/a/<instance>.yaml",
                "tenants/db.yaml: not read: a module instance goes in its tenant's folder, tenants/<tenant>/db.yaml",
            ]
        );
    }

    #[tokio::test]
    async fn lists_and_reads() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "meshgate.yaml", "node: gw1\n");
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        write(d.path(), "tenants/a/db.toml", "kind = \"pipe\"\n");
        write(d.path(), "tenants/a/.hidden.yaml", "x: [\n");
        write(d.path(), "tenants/a/web.yaml~", "x: [\n");
        write(d.path(), "tenants/a/README.md", "hello");
        write(d.path(), "tenants/b/x.json", "{\"kind\":\"pipe\"}");
        let s = DirStore::open(d.path()).unwrap();
        assert_eq!(s.tenants().await.unwrap(), vec!["a", "b"]);
        assert_eq!(s.instances("a").await.unwrap(), vec!["db", "web"]);
        assert!(s.instances("nope").await.unwrap().is_empty());
        let doc = s.get(&InstanceKey::new("a", "web")).await.unwrap().unwrap();
        assert_eq!(doc.source, "tenants/a/web.yaml");
        assert_eq!(doc.value["kind"], "pipe");
        assert!(s.get(&InstanceKey::new("a", "zz")).await.unwrap().is_none());
        let node = s.node().await.unwrap().unwrap();
        assert_eq!(node.value["node"], "gw1");
    }

    #[tokio::test]
    async fn errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        write(d.path(), "tenants/a/web.json", "{}");
        let s = DirStore::open(d.path()).unwrap();
        let e = s.instances("a").await.unwrap_err().to_string();
        assert!(e.contains("tenants/a/web."), "{e}");
        assert!(e.contains("also defined"), "{e}");

        write(d.path(), "tenants/b/bad name.yaml", "kind: pipe\n");
        let e = s.instances("b").await.unwrap_err().to_string();
        assert!(e.contains("tenants/b/bad name.yaml"), "{e}");

        write(d.path(), "tenants/c/bin.yaml", "");
        std::fs::write(d.path().join("tenants/c/bin.yaml"), [0xff, 0xfe, 0x00]).unwrap();
        let e = s
            .get(&InstanceKey::new("c", "bin"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("tenants/c/bin.yaml: cannot read"), "{e}");

        // A dangling symlink is unreadable even for root.
        std::os::unix::fs::symlink("/nonexistent/x", d.path().join("tenants/c/gone.yaml")).unwrap();
        let e = s
            .get(&InstanceKey::new("c", "gone"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("tenants/c/gone.yaml: cannot read"), "{e}");
    }

    #[test]
    fn open_requires_a_directory() {
        let d = tempfile::tempdir().unwrap();
        assert!(DirStore::open(d.path().join("missing")).is_err());
        write(d.path(), "f", "");
        assert!(DirStore::open(d.path().join("f")).is_err());
    }

    #[test]
    fn paths_map_to_narrowest_event() {
        let s = DirStore {
            root: PathBuf::from("/c"),
        };
        assert_eq!(
            s.event_for(Path::new("/c/meshgate.yaml")),
            Some(StoreEvent::Node)
        );
        assert_eq!(
            s.event_for(Path::new("/c/tenants/a")),
            Some(StoreEvent::Tenant("a".into()))
        );
        assert_eq!(
            s.event_for(Path::new("/c/tenants/a/web.yaml")),
            Some(StoreEvent::Instance(InstanceKey::new("a", "web")))
        );
        assert_eq!(s.event_for(Path::new("/c/tenants/a/.web.yaml.swp")), None);
        assert_eq!(s.event_for(Path::new("/c/other.txt")), None);
        assert_eq!(s.event_for(Path::new("/elsewhere")), None);
    }

    #[tokio::test]
    async fn watcher_reports_changes() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        let s = DirStore::open(d.path()).unwrap();
        let mut w = s.watch().unwrap().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\nlisten: x\n");
        let want = StoreEvent::Instance(InstanceKey::new("a", "web"));
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let batch = w.events.recv().await.unwrap();
                if batch.contains(&want) {
                    return batch;
                }
            }
        })
        .await
        .expect("no event within 5 s");
        assert!(got.contains(&want));
    }

    async fn next(w: &mut Watch, within: Duration) -> Option<Vec<StoreEvent>> {
        tokio::time::timeout(within, w.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// The store's own reads, and anyone else's, are no change (inotify
    /// would report each opening: 100,000 of them overflow its queue).
    #[tokio::test]
    async fn reading_the_config_is_not_a_change() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: socks\n");
        let s = DirStore::open(d.path()).unwrap();
        let mut w = s.watch().unwrap().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        let key = InstanceKey::new("a", "web");
        assert_eq!(
            next(&mut w, Duration::from_secs(5)).await,
            Some(vec![StoreEvent::Instance(key.clone())]),
            "written"
        );
        for _ in 0..20 {
            let _ = std::fs::read(d.path().join("tenants/a/web.yaml")).unwrap();
            assert_eq!(s.tenants().await.unwrap(), vec!["a".to_string()]);
            assert_eq!(s.instances("a").await.unwrap(), vec!["web".to_string()]);
            assert_eq!(s.get(&key).await.unwrap().unwrap().value["kind"], "pipe");
        }
        assert_eq!(next(&mut w, Duration::from_secs(1)).await, None, "read");
    }

    /// A tenant directory made after the watch started is watched too.
    #[tokio::test]
    async fn a_new_tenants_files_are_watched() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        let s = DirStore::open(d.path()).unwrap();
        let mut w = s.watch().unwrap().unwrap();
        write(d.path(), "tenants/b/db.yaml", "kind: pipe\n");
        let first = next(&mut w, Duration::from_secs(5)).await.unwrap();
        assert!(first.contains(&StoreEvent::Tenant("b".into())), "{first:?}");
        tokio::time::sleep(DEBOUNCE * 2).await;
        while next(&mut w, Duration::from_millis(10)).await.is_some() {}
        write(d.path(), "tenants/b/db.yaml", "kind: socks\n");
        assert_eq!(
            next(&mut w, Duration::from_secs(5)).await,
            Some(vec![StoreEvent::Instance(InstanceKey::new("b", "db"))])
        );
        std::fs::remove_file(d.path().join("tenants/b/db.yaml")).unwrap();
        assert_eq!(
            next(&mut w, Duration::from_secs(5)).await,
            Some(vec![StoreEvent::Instance(InstanceKey::new("b", "db"))])
        );
    }

    /// A tenant directory that is a link (to a directory elsewhere) is
    /// watched through the link, as it is read.
    #[tokio::test]
    async fn a_linked_tenant_directory_is_watched() {
        let d = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        write(elsewhere.path(), "db.yaml", "kind: pipe\n");
        let s = DirStore::open(d.path()).unwrap();
        let mut w = s.watch().unwrap().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), d.path().join("tenants/c")).unwrap();
        let first = next(&mut w, Duration::from_secs(5)).await.unwrap();
        assert!(first.contains(&StoreEvent::Tenant("c".into())), "{first:?}");
        assert_eq!(s.instances("c").await.unwrap(), vec!["db".to_string()]);
        write(elsewhere.path(), "db.yaml", "kind: socks\n");
        assert_eq!(
            next(&mut w, Duration::from_secs(5)).await,
            Some(vec![StoreEvent::Instance(InstanceKey::new("c", "db"))])
        );
    }
}
