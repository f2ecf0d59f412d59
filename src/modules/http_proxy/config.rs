//! The HTTP proxy's config document.

use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::addr::ListenAddr;
use crate::core::config::{
    at_least_one, idle_timeout, parse_document, positive, ConfigError, IdleTimeout,
};
use crate::core::users::{RawUser, Users};

/// `kind: http_proxy`
///
/// ```yaml
/// kind: http_proxy
/// listen: 127.0.0.1:3128        # a bare port means 127.0.0.1
/// listen_via: wg0               # optional: accept on a VPN address in this module's network
/// users:                        # optional: with users, Proxy-Authorization: Basic is required
///   - name: alice
///     password_file: /etc/meshgate/alice.pw
///     vnets: [sydney]           # alice@sydney routes in sydney
/// vnet: frankfurt               # optional: where users without one are routed
/// connect_timeout: 5s
/// handshake_timeout: 10s        # a request's header must arrive within this
/// idle_timeout: 1h              # or `none`
/// max_connections: 1024
/// accept_proxy_protocol: [10.0.0.0/8]   # load balancers that send a PROXY header (v1/v2)
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: ListenAddr,
    #[serde(default)]
    listen_via: Option<String>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    handshake_timeout: Duration,
    #[serde(default)]
    idle_timeout: Option<IdleTimeout>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    accept_proxy_protocol: Vec<ipnet::IpNet>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    1024
}

/// A checked HTTP proxy config (no `Debug`: it holds passwords).
#[derive(Clone)]
pub struct HttpProxyConfig {
    /// Where clients connect.
    pub listen: ListenAddr,
    /// Accept inside this module's network instead of the host's.
    pub listen_via: Option<String>,
    /// Users; none means no authentication.
    pub users: Users,
    /// The vnet of clients whose user names none.
    pub vnet: Option<String>,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Time allowed for a request's header.
    pub handshake_timeout: Duration,
    /// Idle timeout of tunnels and forwarded exchanges.
    pub idle_timeout: Option<Duration>,
    /// Concurrent connections.
    pub max_connections: usize,
    /// Load balancers whose connections start with a PROXY header.
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
}

impl HttpProxyConfig {
    /// Parses and validates a `kind: http_proxy` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = &doc.source;
        let users = Users::from_raw(src, raw.users)?;
        if let Some(v) = &raw.vnet {
            configstore::check_name(v).map_err(|m| ConfigError::key(src, "vnet", m))?;
        }
        if let Some(m) = &raw.listen_via {
            configstore::check_name(m).map_err(|e| ConfigError::key(src, "listen_via", e))?;
        }
        positive(src, "connect_timeout", raw.connect_timeout)?;
        positive(src, "handshake_timeout", raw.handshake_timeout)?;
        let idle_timeout = idle_timeout(src, raw.idle_timeout, Duration::from_secs(3600))?;
        at_least_one(src, "max_connections", raw.max_connections)?;
        if users.is_empty() && !raw.listen.0.ip().is_loopback() && raw.listen_via.is_none() {
            tracing::warn!(source = %src, listen = %raw.listen, "HTTP proxy without users on a non-loopback address: anyone who reaches it can use the tenant's routes");
        }
        Ok(HttpProxyConfig {
            listen: raw.listen,
            listen_via: raw.listen_via,
            users,
            vnet: raw.vnet,
            connect_timeout: raw.connect_timeout,
            handshake_timeout: raw.handshake_timeout,
            idle_timeout,
            max_connections: raw.max_connections,
            accept_proxy_protocol: raw.accept_proxy_protocol,
        })
    }

    /// The instances this proxy needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .listen_via
            .iter()
            .chain(self.vnet.iter())
            .chain(self.users.vnets())
            .cloned()
            .collect();
        d.sort();
        d.dedup();
        d
    }
}
