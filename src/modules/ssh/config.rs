//! The SSH door's config document.

use std::path::PathBuf;
use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use super::keys::{parse_authorized_keys, AuthorizedKey};
use crate::core::addr::ListenAddr;
use crate::core::config::{
    at_least_one, idle_timeout, parse_document, positive, ConfigError, IdleTimeout,
};

/// `kind: ssh`
///
/// ```yaml
/// kind: ssh
/// listen: 0.0.0.0:2222
/// listen_via: wg0                # optional: accept on a VPN address in this module's network
/// host_key_file: /var/lib/meshgate/acme-ssh-host-key   # made on first start (Ed25519, 0600)
/// authorized_keys_file: /etc/meshgate/acme.authorized_keys   # OpenSSH format
/// authorized_keys:               # and/or lines inline
///   - ssh-ed25519 AAAA... alice@laptop
/// vnet: corp                     # optional: where forwarded connections route
/// remote_forward_ip: 127.0.0.1   # where `ssh -R` listeners bind (default 127.0.0.1)
/// remote_forward_via: wg0        # optional: bind them on a VPN address in this module's network
/// streamlocal_dir: /run/meshgate/acme   # optional: `ssh -R /path/x.sock:...` may publish Unix
///                                # sockets here (mode 0600), and nowhere else
/// connect_timeout: 5s
/// idle_timeout: 1h               # or `none`
/// max_connections: 1024          # SSH connections
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: ListenAddr,
    #[serde(default)]
    listen_via: Option<String>,
    host_key_file: PathBuf,
    #[serde(default)]
    authorized_keys_file: Option<PathBuf>,
    #[serde(default)]
    authorized_keys: Vec<String>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default = "default_forward_ip")]
    remote_forward_ip: std::net::IpAddr,
    #[serde(default)]
    remote_forward_via: Option<String>,
    #[serde(default)]
    streamlocal_dir: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default)]
    idle_timeout: Option<IdleTimeout>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
}

fn default_forward_ip() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1])
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_connections() -> usize {
    1024
}

/// The largest authorized_keys file read.
const MAX_KEYS_FILE: u64 = 1 << 20;

/// A checked SSH door config.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Where SSH clients connect.
    pub listen: ListenAddr,
    /// The module whose network it listens in (`None`: the host).
    pub listen_via: Option<String>,
    /// The host key's file.
    pub host_key_file: PathBuf,
    /// Who may log in.
    pub keys: Vec<AuthorizedKey>,
    /// The vnet forwarded connections route in.
    pub vnet: Option<String>,
    /// Where `ssh -R` listeners bind.
    pub remote_forward_ip: std::net::IpAddr,
    /// The module whose network they bind in (`None`: the host).
    pub remote_forward_via: Option<String>,
    /// Where `ssh -R` may publish Unix sockets (`None`: nowhere).
    pub streamlocal_dir: Option<PathBuf>,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Idle timeout of forwarded channels.
    pub idle_timeout: Option<Duration>,
    /// Concurrent SSH connections.
    pub max_connections: usize,
}

impl SshConfig {
    /// Parses and validates a `kind: ssh` document, reading the keys file.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = &doc.source;
        if !raw.host_key_file.is_absolute() {
            return Err(ConfigError::key(
                src,
                "host_key_file",
                "expected an absolute path (the file is created on first start)",
            ));
        }
        let mut keys = Vec::new();
        if let Some(path) = &raw.authorized_keys_file {
            let meta = std::fs::metadata(path).map_err(|e| {
                ConfigError::key(
                    src,
                    "authorized_keys_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            if meta.len() > MAX_KEYS_FILE {
                return Err(ConfigError::key(
                    src,
                    "authorized_keys_file",
                    format!("{} is larger than 1 MiB", path.display()),
                ));
            }
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::key(
                    src,
                    "authorized_keys_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            keys.extend(parse_authorized_keys(&text).map_err(|e| {
                ConfigError::key(
                    src,
                    "authorized_keys_file",
                    format!("{}: {e}", path.display()),
                )
            })?);
        }
        for (i, line) in raw.authorized_keys.iter().enumerate() {
            keys.extend(
                parse_authorized_keys(line)
                    .map_err(|e| ConfigError::key(src, format!("authorized_keys[{i}]"), e))?,
            );
        }
        if keys.is_empty() {
            return Err(ConfigError::key(
                src,
                "authorized_keys",
                "no keys: give `authorized_keys_file` or `authorized_keys` lines (OpenSSH format); nobody could log in",
            ));
        }
        if let Some(v) = &raw.vnet {
            configstore::check_name(v).map_err(|m| ConfigError::key(src, "vnet", m))?;
        }
        positive(src, "connect_timeout", raw.connect_timeout)?;
        at_least_one(src, "max_connections", raw.max_connections)?;
        let idle_timeout = idle_timeout(src, raw.idle_timeout, Duration::from_secs(3600))?;
        if let Some(m) = &raw.listen_via {
            configstore::check_name(m).map_err(|e| ConfigError::key(src, "listen_via", e))?;
        }
        if raw
            .streamlocal_dir
            .as_ref()
            .is_some_and(|d| !d.is_absolute())
        {
            return Err(ConfigError::key(
                src,
                "streamlocal_dir",
                "expected an absolute directory (made on first use, mode 0700)",
            ));
        }
        Ok(SshConfig {
            listen: raw.listen,
            listen_via: raw.listen_via,
            host_key_file: raw.host_key_file,
            keys,
            vnet: raw.vnet,
            remote_forward_ip: raw.remote_forward_ip,
            remote_forward_via: raw.remote_forward_via,
            streamlocal_dir: raw.streamlocal_dir,
            connect_timeout: raw.connect_timeout,
            idle_timeout,
            max_connections: raw.max_connections,
        })
    }
}
