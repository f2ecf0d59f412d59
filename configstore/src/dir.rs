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
//! `web.json`) are an error. The watcher uses inotify (through `notify`),
//! debounces bursts for [`DEBOUNCE`] and maps every path to the narrowest
//! [`StoreEvent`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
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

#[async_trait]
impl ConfigStore for DirStore {
    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
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
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(move |ev| {
            let _ = raw_tx.send(ev);
        })
        .map_err(|e| StoreError::Watch {
            path: self.root.clone(),
            message: e.to_string(),
        })?;
        watcher
            .watch(&self.root, RecursiveMode::Recursive)
            .map_err(|e| StoreError::Watch {
                path: self.root.clone(),
                message: e.to_string(),
            })?;
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(first) = raw_rx.recv().await {
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + DEBOUNCE;
                while let Ok(Some(more)) = tokio::time::timeout_at(deadline, raw_rx.recv()).await {
                    batch.push(more);
                }
                let mut seen = HashSet::new();
                let mut events = Vec::new();
                for ev in batch {
                    let paths = match ev {
                        Ok(ev) if ev.need_rescan() => {
                            vec![me.root.clone()]
                        }
                        // Reading a file is no change: without this, the
                        // store's own reads (a reload reads every file)
                        // would feed the watcher forever.
                        Ok(ev) if is_read_only(&ev.kind) => continue,
                        Ok(ev) => ev.paths,
                        Err(e) => {
                            tracing::warn!(error = %e, root = %me.root.display(), "config watcher error; rescanning");
                            vec![me.root.clone()]
                        }
                    };
                    for p in paths {
                        if let Some(e) = me.event_for(&p) {
                            if seen.insert(e.clone()) {
                                events.push(e);
                            }
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
            guard: Box::new(watcher),
        }))
    }
}

/// Events that say a file was opened or read, not changed.
fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        EventKind::Access(_) => true,
        _ => false,
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
    async fn reading_the_config_is_not_a_change() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\n");
        let s = DirStore::open(d.path()).unwrap();
        let mut w = s.watch().unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..20 {
            let _ = std::fs::read(d.path().join("tenants/a/web.yaml")).unwrap();
            let _ = s.get(&InstanceKey::new("a", "web")).await.unwrap();
        }
        let quiet = tokio::time::timeout(Duration::from_millis(800), w.events.recv()).await;
        assert!(quiet.is_err(), "reads were reported as changes: {quiet:?}");
        // A write still is.
        write(d.path(), "tenants/a/web.yaml", "kind: pipe\nlisten: 1\n");
        let ev = tokio::time::timeout(Duration::from_secs(5), w.events.recv()).await;
        assert!(matches!(ev, Ok(Some(_))), "{ev:?}");
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
}
