//! The HTTP proxy's config document.

use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::config::ConfigError;
use crate::core::spine::door::{DoorKeys, DoorSettings};

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
/// max_startups: 10:30:100        # connections whose first request head has not arrived: from
///                                # 10, refuse 30 % of new ones, rising to all at 100; or `N`
/// per_source_max_startups: 10    # the same from one address
/// idle_timeout: 1h              # or `none`
/// max_connections: 1024
/// accept_proxy_protocol: [10.0.0.0/8]   # load balancers that send a PROXY header (v1/v2)
/// ```
/// `kind: http_proxy` has no keys of its own beside [`DoorSettings`].
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {}

/// The shared key groups `kind: http_proxy` takes: a handshake (the first
/// request head within 10 s), PROXY headers from load balancers, users.
const TAKES: DoorKeys = DoorKeys {
    handshake: Some(Duration::from_secs(10)),
    proxy_protocol: true,
    users: true,
};

/// A checked HTTP proxy config (its users' `Debug` shows names only).
#[derive(Debug, Clone)]
pub struct HttpProxyConfig {
    /// Where it listens, where connections route, timeouts, the limit, the
    /// handshake's limits (the first request head), trusted load
    /// balancers, users (none: no authentication).
    pub door: DoorSettings,
}

impl HttpProxyConfig {
    /// Parses and validates a `kind: http_proxy` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let (door, _): (DoorSettings, RawConfig) = DoorSettings::parse_taking(doc, TAKES, &[])?;
        if door.users.is_empty() && door.exposed() {
            tracing::warn!(source = %doc.source, listen = %door.listen, "HTTP proxy without users on a non-loopback address: anyone who reaches it can use the tenant's routes");
        }
        Ok(HttpProxyConfig { door })
    }

    /// The instances this proxy needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        self.door.depends_on(self.door.users.vnets())
    }
}
