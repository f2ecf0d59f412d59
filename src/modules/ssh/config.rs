//! The SSH door's config document.

use std::path::PathBuf;

use configstore::Document;
use serde::Deserialize;

use super::keys::{parse_authorized_keys, AuthorizedKey};
use crate::core::config::ConfigError;
use crate::core::spine::door::DoorSettings;

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
    host_key_file: PathBuf,
    #[serde(default)]
    authorized_keys_file: Option<PathBuf>,
    #[serde(default)]
    authorized_keys: Vec<String>,
    #[serde(default = "default_forward_ip")]
    remote_forward_ip: std::net::IpAddr,
    #[serde(default)]
    remote_forward_via: Option<String>,
    #[serde(default)]
    streamlocal_dir: Option<PathBuf>,
}

/// The keys `kind: ssh` has beside [`DoorSettings`]: the fields of
/// `RawConfig`.
const OWN_KEYS: [&str; 6] = [
    "host_key_file",
    "authorized_keys_file",
    "authorized_keys",
    "remote_forward_ip",
    "remote_forward_via",
    "streamlocal_dir",
];

fn default_forward_ip() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1])
}

/// The largest authorized_keys file read.
const MAX_KEYS_FILE: u64 = 1 << 20;

/// A checked SSH door config.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Where SSH clients connect, where forwarded connections route,
    /// timeouts (`idle_timeout`: of forwarded channels), the limit (SSH
    /// connections).
    pub door: DoorSettings,
    /// The host key's file.
    pub host_key_file: PathBuf,
    /// Who may log in.
    pub keys: Vec<AuthorizedKey>,
    /// Where `ssh -R` listeners bind.
    pub remote_forward_ip: std::net::IpAddr,
    /// The module whose network they bind in (`None`: the host).
    pub remote_forward_via: Option<String>,
    /// Where `ssh -R` may publish Unix sockets (`None`: nowhere).
    pub streamlocal_dir: Option<PathBuf>,
}

impl SshConfig {
    /// Parses and validates a `kind: ssh` document, reading the keys file.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let (door, raw): (DoorSettings, RawConfig) = DoorSettings::parse(doc, &OWN_KEYS)?;
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
        if let Some(m) = &raw.remote_forward_via {
            configstore::check_name(m)
                .map_err(|e| ConfigError::key(src, "remote_forward_via", e))?;
        }
        Ok(SshConfig {
            door,
            host_key_file: raw.host_key_file,
            keys,
            remote_forward_ip: raw.remote_forward_ip,
            remote_forward_via: raw.remote_forward_via,
            streamlocal_dir: raw.streamlocal_dir,
        })
    }
}
