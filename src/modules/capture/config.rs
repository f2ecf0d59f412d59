//! The capture module's config document.

use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::addr::ListenAddr;
use crate::core::config::{
    at_least_one, idle_timeout, parse_document, positive, ConfigError, IdleTimeout,
};

/// How captured connections reach the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// nftables/iptables `REDIRECT` (NAT): the original destination comes
    /// from `SO_ORIGINAL_DST`. The listener needs no privilege.
    Redirect,
    /// `TPROXY`: the connection keeps its destination, which the
    /// listener (`IP_TRANSPARENT`, needs CAP_NET_ADMIN) accepts as its own.
    Tproxy,
}

/// `kind: capture`
///
/// ```yaml
/// kind: capture
/// listen: 0.0.0.0:15001         # the port the rules send captured connections to
/// mode: redirect                # redirect (default) | tproxy (needs CAP_NET_ADMIN)
/// vnet: corp                    # optional: route captured connections in this vnet
/// connect_timeout: 5s
/// idle_timeout: 1h              # or `none`
/// max_connections: 1024
/// ```
///
/// `meshgatectl capture rules` prints (and with `--apply` installs) the
/// rules that steer an interface, a user or a cgroup here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: ListenAddr,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default)]
    idle_timeout: Option<IdleTimeout>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
}

fn default_mode() -> Mode {
    Mode::Redirect
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_connections() -> usize {
    1024
}

/// A checked capture config.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureConfig {
    /// Where the rules send captured connections.
    pub listen: ListenAddr,
    /// REDIRECT or TPROXY.
    pub mode: Mode,
    /// The vnet captured connections route in.
    pub vnet: Option<String>,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Idle timeout of relayed connections.
    pub idle_timeout: Option<Duration>,
    /// Concurrent connections.
    pub max_connections: usize,
}

impl CaptureConfig {
    /// Parses and validates a `kind: capture` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = &doc.source;
        if let Some(v) = &raw.vnet {
            configstore::check_name(v).map_err(|m| ConfigError::key(src, "vnet", m))?;
        }
        positive(src, "connect_timeout", raw.connect_timeout)?;
        at_least_one(src, "max_connections", raw.max_connections)?;
        if raw.listen.0.port() == 0 {
            return Err(ConfigError::key(
                src,
                "listen",
                "needs a fixed port: the capture rules name it",
            ));
        }
        let idle_timeout = idle_timeout(src, raw.idle_timeout, Duration::from_secs(3600))?;
        Ok(CaptureConfig {
            listen: raw.listen,
            mode: raw.mode,
            vnet: raw.vnet,
            connect_timeout: raw.connect_timeout,
            idle_timeout,
            max_connections: raw.max_connections,
        })
    }
}
