//! The SSH door's config document.

use std::path::PathBuf;

use configstore::Document;
use serde::Deserialize;

use super::keys::{parse_authorized_keys, AuthorizedKey};
use crate::core::config::ConfigError;
use crate::core::spine::door::{DoorKeys, DoorSettings};

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
/// handshake_timeout: 30s         # a client must log in within this (sshd's LoginGraceTime)
/// max_startups: 10:30:100        # sessions not yet logged in: from 10, refuse 30 % of new
///                                # ones, rising to all at 100 (sshd's MaxStartups); or `N`
/// per_source_max_startups: 10    # not yet logged in from one address (sshd's PerSourceMaxStartups)
/// max_channels: 256              # channels open at once in one session (-L, -W, -D, sessions)
/// max_remote_forwards: 32        # `ssh -R` listeners of one session
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
    #[serde(default = "default_max_channels")]
    max_channels: usize,
    #[serde(default = "default_max_remote_forwards")]
    max_remote_forwards: usize,
}

fn default_max_channels() -> usize {
    256
}

fn default_max_remote_forwards() -> usize {
    32
}

/// The shared key groups `kind: ssh` takes: a handshake (log in within
/// 30 s, as sshd's `LoginGraceTime`).
const TAKES: DoorKeys = DoorKeys {
    handshake: Some(std::time::Duration::from_secs(30)),
    proxy_protocol: false,
    users: false,
};

/// The keys `kind: ssh` has beside [`DoorSettings`]: the fields of
/// `RawConfig`.
const OWN_KEYS: [&str; 8] = [
    "max_channels",
    "max_remote_forwards",
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

/// What tells a changed file: modification time, length, inode.
pub type FileStamp = (std::time::SystemTime, u64, u64);

/// `path`'s [`FileStamp`], if it can be read.
pub fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The keys of an `authorized_keys` file (at most 1 MiB), or why not.
pub fn read_keys_file(path: &std::path::Path) -> Result<Vec<AuthorizedKey>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_KEYS_FILE {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_authorized_keys(&text).map_err(|e| format!("{}: {e}", path.display()))
}

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
    /// The `authorized_keys_file`, watched while the door runs.
    pub authorized_keys_file: Option<PathBuf>,
    /// The inline `authorized_keys` lines, parsed.
    pub inline_keys: Vec<AuthorizedKey>,
    /// The file as it was when its keys were read ([`file_stamp`]).
    pub keys_file_stamp: Option<FileStamp>,
    /// Where `ssh -R` listeners bind.
    pub remote_forward_ip: std::net::IpAddr,
    /// The module whose network they bind in (`None`: the host).
    pub remote_forward_via: Option<String>,
    /// Where `ssh -R` may publish Unix sockets (`None`: nowhere).
    pub streamlocal_dir: Option<PathBuf>,
    /// Channels open at once in one session.
    pub max_channels: usize,
    /// `ssh -R` listeners of one session.
    pub max_remote_forwards: usize,
}

impl SshConfig {
    /// The same config with `file_keys` as the `authorized_keys_file`'s
    /// keys, read when it was as `stamp` says (the inline lines stay).
    pub fn with_file_keys(&self, file_keys: Vec<AuthorizedKey>, stamp: Option<FileStamp>) -> Self {
        let mut new = self.clone();
        new.keys = file_keys;
        new.keys.extend(new.inline_keys.iter().cloned());
        new.keys_file_stamp = stamp;
        new
    }

    /// Parses and validates a `kind: ssh` document, reading the keys file.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let (door, raw): (DoorSettings, RawConfig) =
            DoorSettings::parse_taking(doc, TAKES, &OWN_KEYS)?;
        let src = &doc.source;
        if !raw.host_key_file.is_absolute() {
            return Err(ConfigError::key(
                src,
                "host_key_file",
                "expected an absolute path (the file is created on first start)",
            ));
        }
        let mut keys = Vec::new();
        let keys_file_stamp = raw.authorized_keys_file.as_deref().and_then(file_stamp);
        if let Some(path) = &raw.authorized_keys_file {
            keys.extend(
                read_keys_file(path)
                    .map_err(|m| ConfigError::key(src, "authorized_keys_file", m))?,
            );
        }
        let file_keys = keys.len();
        for (i, line) in raw.authorized_keys.iter().enumerate() {
            keys.extend(
                parse_authorized_keys(line)
                    .map_err(|e| ConfigError::key(src, format!("authorized_keys[{i}]"), e))?,
            );
        }
        let inline_keys = keys[file_keys..].to_vec();
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
        for (key, v) in [
            ("max_channels", raw.max_channels),
            ("max_remote_forwards", raw.max_remote_forwards),
        ] {
            if v == 0 {
                return Err(ConfigError::key(src, key, "expected at least 1"));
            }
        }
        if let Some(m) = &raw.remote_forward_via {
            configstore::check_name(m)
                .map_err(|e| ConfigError::key(src, "remote_forward_via", e))?;
        }
        Ok(SshConfig {
            door,
            host_key_file: raw.host_key_file,
            keys,
            authorized_keys_file: raw.authorized_keys_file,
            inline_keys,
            keys_file_stamp,
            remote_forward_ip: raw.remote_forward_ip,
            remote_forward_via: raw.remote_forward_via,
            streamlocal_dir: raw.streamlocal_dir,
            max_channels: raw.max_channels,
            max_remote_forwards: raw.max_remote_forwards,
        })
    }
}
