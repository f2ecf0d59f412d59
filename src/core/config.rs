//! Typed config: turning store documents into config structs, and the node config.
//!
//! Every module config is a serde struct with `deny_unknown_fields`, parsed by
//! [`parse_document`], which turns serde's complaints into a [`ConfigError`]
//! that names the document's source, the key, and what was expected.

use std::fmt;
use std::time::Duration;

use configstore::Document;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::core::addr::ListenAddr;

/// A config problem an operator can act on: where, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The document's origin (a file path relative to the config directory).
    pub origin: String,
    /// Dotted path of the offending key (`peers[0].endpoint`), if known.
    pub key: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}: key `{}`: {}", self.origin, k, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl ConfigError {
    /// An error about one key of a document.
    pub fn key(source: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            origin: source.to_string(),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// An error about a whole document.
    pub fn doc(source: &str, message: impl Into<String>) -> Self {
        Self {
            origin: source.to_string(),
            key: None,
            message: message.into(),
        }
    }
}

/// Extracts the name inside the first pair of backticks of `msg`.
fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(&msg[start..start + len])
}

/// Deserializes `doc` into `T`, ignoring the top-level keys in `skip` (such as
/// `kind`, which the registry has already read).
pub fn parse_document<T: DeserializeOwned>(
    doc: &Document,
    skip: &[&str],
) -> Result<T, ConfigError> {
    let mut value = doc.value.clone();
    if let Some(map) = value.as_object_mut() {
        for k in skip {
            map.remove(*k);
        }
    }
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let parent = if path == "." { String::new() } else { path };
        let message = e.inner().to_string();
        let join = |leaf: &str| {
            // serde_path_to_error already ends the path with an unknown
            // field's name; a missing field's path is its parent's.
            if parent == leaf || parent.ends_with(&format!(".{leaf}")) {
                parent.clone()
            } else if parent.is_empty() {
                leaf.to_string()
            } else {
                format!("{parent}.{leaf}")
            }
        };
        // serde reports unknown and missing fields at the parent's path; name the field itself.
        let key = if message.starts_with("unknown field") || message.starts_with("missing field") {
            backticked(&message).map(join)
        } else if parent.is_empty() {
            None
        } else {
            Some(parent.clone())
        };
        ConfigError {
            origin: doc.source.clone(),
            key,
            message,
        }
    })
}

/// Reads the `kind` key every module document must have.
pub fn document_kind(doc: &Document) -> Result<String, ConfigError> {
    match doc.value.get("kind") {
        Some(serde_json::Value::String(k)) if !k.is_empty() => Ok(k.clone()),
        Some(other) => Err(ConfigError::key(
            &doc.source,
            "kind",
            format!(
                "expected the name of a module kind, found {}",
                configstore::format::kind_of(other)
            ),
        )),
        None => Err(ConfigError::key(
            &doc.source,
            "kind",
            "missing: every module document names its kind (e.g. `kind: pipe`)",
        )),
    }
}

/// Largest secret file read (a key, a password): enough for one line and
/// a comment, but a wrong path is refused rather than slurped.
const MAX_SECRET_FILE: u64 = 4096;

/// Reads a secret file: capped in size, and with a warning (as `wg` gives)
/// when other users may read it. The contents are never logged.
fn read_secret_file(
    source: &str,
    key: &str,
    path: &std::path::Path,
) -> Result<String, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |m: String| ConfigError::key(source, format!("{key}_file"), m);
    let meta =
        std::fs::metadata(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(err(format!("{} is not a file", path.display())));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(err(format!(
            "{} is {} bytes: a `{key}_file` holds one line (the {key})",
            path.display(),
            meta.len()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "secret file is readable by other users; chmod 600 it");
    }
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))
}

/// A secret given inline (`key`) or in a file (`key_file`), exactly one of
/// the two; `hint` says what it looks like, for the message when a
/// required one is missing.
pub fn secret_text(
    source: &str,
    key: &str,
    inline: Option<String>,
    file: Option<std::path::PathBuf>,
    required: bool,
    hint: &str,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::key(
            source,
            key,
            format!("give either `{key}` or `{key}_file`, not both"),
        )),
        (Some(k), None) => Ok(Some(k)),
        (None, Some(path)) => read_secret_file(source, key, &path).map(Some),
        (None, None) if required => Err(ConfigError::key(
            source,
            key,
            format!("missing: give `{key}` ({hint}) or `{key}_file`"),
        )),
        (None, None) => Ok(None),
    }
}

/// `idle_timeout`: a duration, or `none` (also `off`) for no idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleTimeout {
    /// No idle timeout.
    Off,
    /// End after this long without traffic.
    After(Duration),
}

impl<'de> Deserialize<'de> for IdleTimeout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.trim() {
            "none" | "off" => Ok(IdleTimeout::Off),
            t => humantime::parse_duration(t)
                .map(IdleTimeout::After)
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`{t}`: {e}; expected a duration such as 10m, or `none`"
                    ))
                }),
        }
    }
}

impl serde::Serialize for IdleTimeout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IdleTimeout::Off => s.serialize_str("none"),
            IdleTimeout::After(d) => s.collect_str(&humantime::format_duration(*d)),
        }
    }
}

/// `idle_timeout` as a door reads it: absent means `default`, `none` no
/// timeout, and `0s` is an error.
pub fn idle_timeout(
    src: &str,
    raw: Option<IdleTimeout>,
    default: Duration,
) -> Result<Option<Duration>, ConfigError> {
    match raw {
        None => Ok(Some(default)),
        Some(IdleTimeout::Off) => Ok(None),
        Some(IdleTimeout::After(d)) if d.is_zero() => Err(ConfigError::key(
            src,
            "idle_timeout",
            "must be longer than 0s (`none` for no idle timeout)",
        )),
        Some(IdleTimeout::After(d)) => Ok(Some(d)),
    }
}

/// `address`: one address or a list; `10.0.0.1/24`, or a bare IP meaning a
/// single host (`/32`, `/128`).
pub fn parse_addresses(
    source: &str,
    key: &str,
    v: &serde_json::Value,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let err = |m: String| ConfigError::key(source, key, m);
    if v.is_null() {
        return Err(err(
            "missing: this node's address(es) in the virtual network, e.g. 10.192.0.1/24".into(),
        ));
    }
    let items: Vec<&serde_json::Value> = match v {
        serde_json::Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    if items.is_empty() {
        return Err(err(
            "at least one address is needed, e.g. 10.192.0.1/24".into()
        ));
    }
    items
        .into_iter()
        .map(|i| {
            let s = i.as_str().ok_or_else(|| {
                err(format!(
                    "expected an address such as 10.192.0.1/24, found {i}"
                ))
            })?;
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    err(format!(
                        "`{s}` is not an address such as 10.192.0.1/24 or fd00::1/64"
                    ))
                })
        })
        .collect()
}

/// A size in bytes: a number, or a number with `KiB`, `MiB` or `GiB`
/// (`4MiB`, `64 KiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `4MiB`, `64 KiB`, `512`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("`{s}`: expected a size such as 4MiB, 64KiB or 16384"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            u => return Err(format!("`{s}`: unit `{u}` is not one of B, KiB, MiB, GiB")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => n.as_u64().map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!("{n}: expected a size in bytes, or 4MiB"))
            }),
            serde_json::Value::String(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
            v => Err(serde::de::Error::custom(format!(
                "{v}: expected a size such as 4MiB"
            ))),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        match n {
            _ if n >= 1 << 30 && n.is_multiple_of(1 << 30) => write!(f, "{}GiB", n >> 30),
            _ if n >= 1 << 20 && n.is_multiple_of(1 << 20) => write!(f, "{}MiB", n >> 20),
            _ if n >= 1 << 10 && n.is_multiple_of(1 << 10) => write!(f, "{}KiB", n >> 10),
            _ => write!(f, "{n}"),
        }
    }
}

/// A duration key that must be longer than zero.
pub fn positive(src: &str, key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::key(src, key, "must be longer than 0s"));
    }
    Ok(())
}

/// A count key that must be at least one.
pub fn at_least_one(src: &str, key: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 {
        return Err(ConfigError::key(src, key, "must be at least 1"));
    }
    Ok(())
}

/// A secret string: its `Debug` never shows it (a node config logged
/// whole keeps its token to itself).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is the secret, in time that does not depend on where
    /// they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != given.len() {
            return false;
        }
        mine.iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The shortest admin token accepted.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// Where the admin API listens, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAddr {
    /// Serve the admin API (metrics, health, JSON) here.
    On(ListenAddr),
    /// No admin API.
    Off,
}

impl<'de> Deserialize<'de> for AdminAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match &v {
            serde_json::Value::String(s) if s == "off" => Ok(AdminAddr::Off),
            serde_json::Value::Bool(false) => Ok(AdminAddr::Off),
            _ => ListenAddr::deserialize(v)
                .map(AdminAddr::On)
                .map_err(|e| serde::de::Error::custom(format!("{e} (or `off`)"))),
        }
    }
}

/// The node document, `meshgate.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name, used in logs and metrics. Default: the host name.
    #[serde(default = "default_node_name")]
    pub node: String,
    /// Admin API address (metrics, health, JSON API). Default `127.0.0.1:9000`;
    /// `off` disables it. Bind it beyond loopback only behind a firewall.
    #[serde(default = "default_admin")]
    pub admin: AdminAddr,
    /// The bearer token `/api/v1`, the dashboard's data and its live stream
    /// ask for (`Authorization: Bearer TOKEN`); at least 16 characters.
    /// Required when `admin` is beyond loopback. `admin_token_file` reads
    /// it from a file instead (its first line); after parsing, this holds
    /// the token either way.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// A file holding the admin token.
    #[serde(default)]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Whether `/metrics` asks for the token too. Default `false`
    /// (`/healthz` and `/readyz` never do: probes carry no token).
    #[serde(default)]
    pub metrics_need_token: bool,
    /// Log filter in `tracing` syntax (`info`, `meshgate=debug,info`). Default `info`;
    /// the `MESHGATE_LOG` variable wins when set.
    #[serde(default = "default_log")]
    pub log: String,
    /// `text` (default) or `json` log lines.
    #[serde(default)]
    pub log_format: LogFormat,
    /// How long SIGTERM waits for open connections before closing them. Default 30s.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The engine of vnets that name none (and of Cloud-Gateway's
    /// network): `userspace` (default: no privileges) or `kernel` (a TUN
    /// in an unnamed user + network namespace; the kernel's TCP).
    #[serde(default)]
    pub engine: crate::core::engine::EngineKind,
    /// Where audit records go: `log` (default: target `meshgate::audit`),
    /// `off`, or an absolute path for JSON lines (`docs/audit.schema.json`),
    /// reopened on SIGHUP.
    #[serde(default)]
    pub audit: crate::core::spine::audit::AuditTarget,
    /// The most flows (connections, UDP sessions, forwarded IP flows) one
    /// tenant may hold at once; past it its new flows are denied. Default
    /// 65536; 0: no limit.
    #[serde(default = "default_tenant_max_flows")]
    pub tenant_max_flows: u64,
    /// This node's labels in a fleet (`{region: eu}`): a tenant's
    /// placement may ask for them (the etcd store reads them).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// In a fleet: how long this node's lease in etcd outlives it (its
    /// status key, and the tenants it holds with `replicas`, which another
    /// node takes over once it expires). Default 10 s; at least 2 s.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_tenant_max_flows() -> u64 {
    65_536
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "meshgate".into())
}
fn default_admin() -> AdminAddr {
    AdminAddr::On(ListenAddr("127.0.0.1:9000".parse().expect("literal")))
}
fn default_log() -> String {
    "info".into()
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}

impl NodeConfig {
    /// Parses the node document; no document means all defaults.
    pub fn from_document(doc: Option<&Document>) -> Result<Self, ConfigError> {
        let blank = Document {
            source: "meshgate.yaml".into(),
            value: serde_json::json!({}),
        };
        let doc = doc.unwrap_or(&blank);
        let mut c: NodeConfig = parse_document(doc, &[])?;
        let src = &doc.source;
        if let Some(path) = &c.admin_token_file {
            if c.admin_token.is_some() {
                return Err(ConfigError::key(
                    src,
                    "admin_token_file",
                    "give `admin_token` or `admin_token_file`, not both",
                ));
            }
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::key(
                    src,
                    "admin_token_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            c.admin_token = Some(Secret(text.lines().next().unwrap_or("").trim().to_string()));
        }
        let key = if c.admin_token_file.is_some() {
            "admin_token_file"
        } else {
            "admin_token"
        };
        if let Some(t) = &c.admin_token {
            if t.0.chars().count() < MIN_ADMIN_TOKEN || t.0.chars().any(char::is_whitespace) {
                return Err(ConfigError::key(
                    src,
                    key,
                    format!("the admin token must be at least {MIN_ADMIN_TOKEN} characters with no spaces (e.g. `openssl rand -hex 32`)"),
                ));
            }
        }
        if let AdminAddr::On(addr) = c.admin {
            if !addr.0.ip().is_loopback() && c.admin_token.is_none() {
                return Err(ConfigError::key(
                    src,
                    "admin",
                    format!("the admin API on {} is reachable beyond this host, and it shows every tenant's flows: set `admin_token` or `admin_token_file`, or listen on 127.0.0.1", addr.0),
                ));
            }
        }
        if c.lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::key(
                &doc.source,
                "lease_ttl",
                "must be at least 2s (etcd's shortest lease)",
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("4MiB"), Ok(ByteSize(4 << 20)));
        assert_eq!(ByteSize::parse(" 64 KiB"), Ok(ByteSize(64 << 10)));
        assert_eq!(ByteSize::parse("16384"), Ok(ByteSize(16384)));
        assert!(ByteSize::parse("4MB").unwrap_err().contains("unit `MB`"));
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999999GiB").is_err());
        assert_eq!(ByteSize(16 << 20).to_string(), "16MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        let v: ByteSize = serde_json::from_value(serde_json::json!(65536)).unwrap();
        assert_eq!(v, ByteSize(65536));
    }
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: ListenAddr,
        inner: Option<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    fn doc(v: serde_json::Value) -> Document {
        Document {
            source: "tenants/t/x.yaml".into(),
            value: v,
        }
    }

    #[test]
    fn admin_token_rules() {
        let node = |v: serde_json::Value| {
            NodeConfig::from_document(Some(&Document {
                source: "meshgate.yaml".into(),
                value: v,
            }))
        };
        // Beyond loopback without a token: refused, saying why.
        let e = node(json!({"admin": "0.0.0.0:9000"})).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("admin"));
        assert!(e.to_string().contains("admin_token"), "{e}");
        // With one: accepted, and the token never shows in Debug.
        let token = "0123456789abcdef0123";
        let c = node(json!({"admin": "0.0.0.0:9000", "admin_token": token})).unwrap();
        assert_eq!(c.admin_token.as_ref().map(Secret::expose), Some(token));
        assert!(!format!("{c:?}").contains(token));
        assert!(c.admin_token.as_ref().unwrap().matches(token.as_bytes()));
        assert!(!c
            .admin_token
            .as_ref()
            .unwrap()
            .matches(b"0123456789abcdef0124"));
        assert!(!c.admin_token.as_ref().unwrap().matches(b"0123"));
        // Loopback needs none; a short token or both keys are refused.
        assert!(node(json!({"admin": "127.0.0.1:9000"}))
            .unwrap()
            .admin_token
            .is_none());
        let e = node(json!({"admin_token": "short"})).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("admin_token"));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("token");
        std::fs::write(&f, format!("{token}\n")).unwrap();
        let c = node(json!({"admin": "[::]:9000", "admin_token_file": f})).unwrap();
        assert_eq!(c.admin_token.as_ref().map(Secret::expose), Some(token));
        let e = node(json!({"admin_token": token, "admin_token_file": f})).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("admin_token_file"));
        let e = node(json!({"admin_token_file": d.path().join("none")})).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn node_lease_ttl_and_labels() {
        let d = Document {
            source: "etcd /mg/nodes/a".into(),
            value: json!({"lease_ttl": "1s"}),
        };
        let e = NodeConfig::from_document(Some(&d)).unwrap_err();
        assert!(
            e.to_string().contains("`lease_ttl`: must be at least 2s"),
            "{e}"
        );
        let d = Document {
            source: "etcd /mg/nodes/a".into(),
            value: json!({"lease_ttl": "3s", "labels": {"region": "eu"}}),
        };
        let c = NodeConfig::from_document(Some(&d)).unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.labels["region"], "eu");
        assert_eq!(
            NodeConfig::from_document(None).unwrap().lease_ttl,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e =
            parse_document::<Sample>(&doc(json!({"kind":"x","lisen":"1"})), &["kind"]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("lisen"));
        assert!(e
            .to_string()
            .starts_with("tenants/t/x.yaml: key `lisen`: unknown field"));
        assert!(e.message.contains("expected `listen`"), "{e}");
    }

    #[test]
    fn missing_and_nested_keys_are_named() {
        let e = parse_document::<Sample>(&doc(json!({})), &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("listen"));
        let e = parse_document::<Sample>(
            &doc(json!({"listen": "127.0.0.1:1", "inner": {"port": 70000}})),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("inner.port"), "{e}");
        let e = parse_document::<Sample>(
            &doc(json!({"listen": "127.0.0.1:1", "inner": {"prt": 1}})),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("inner.prt"), "{e}");
        let e =
            parse_document::<Sample>(&doc(json!({"listen": "127.0.0.1:99999"})), &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("listen"));
        assert!(e.message.contains("0-65535"), "{e}");
    }

    #[test]
    fn kind_is_required() {
        assert_eq!(document_kind(&doc(json!({"kind":"pipe"}))).unwrap(), "pipe");
        let e = document_kind(&doc(json!({}))).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("kind"));
        assert!(document_kind(&doc(json!({"kind": 3}))).is_err());
    }

    #[test]
    fn node_defaults_and_admin_off() {
        let n = NodeConfig::from_document(None).unwrap();
        assert_eq!(n.admin, default_admin());
        assert_eq!(n.drain_timeout, Duration::from_secs(30));
        let n =
            NodeConfig::from_document(Some(&doc(json!({"admin": "off", "drain_timeout": "2s"}))))
                .unwrap();
        assert_eq!(n.admin, AdminAddr::Off);
        assert_eq!(n.drain_timeout, Duration::from_secs(2));
        let e = NodeConfig::from_document(Some(&doc(json!({"admin": "nowhere"})))).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("admin"));
        assert_eq!(n.engine, crate::core::engine::EngineKind::Userspace);
        let n = NodeConfig::from_document(Some(&doc(json!({"engine": "kernel"})))).unwrap();
        assert_eq!(n.engine, crate::core::engine::EngineKind::Kernel);
        let e = NodeConfig::from_document(Some(&doc(json!({"engine": "tun"})))).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("engine"));
        assert!(e.message.contains("userspace"), "{e}");
    }
}
