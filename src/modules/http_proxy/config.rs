//! The HTTP proxy's config document.

use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::config::{positive, ConfigError};
use crate::core::spine::door::DoorSettings;
use crate::core::spine::startups::StartupLimits;
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
/// max_startups: 10:30:100        # connections whose first request head has not arrived: from
///                                # 10, refuse 30 % of new ones, rising to all at 100; or `N`
/// per_source_max_startups: 10    # the same from one address
/// idle_timeout: 1h              # or `none`
/// max_connections: 1024
/// accept_proxy_protocol: [10.0.0.0/8]   # load balancers that send a PROXY header (v1/v2)
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    handshake_timeout: Duration,
    #[serde(default)]
    max_startups: Option<serde_json::Value>,
    #[serde(default = "crate::core::spine::startups::default_per_source")]
    per_source_max_startups: usize,
    #[serde(default)]
    accept_proxy_protocol: Vec<ipnet::IpNet>,
}

/// The keys `kind: http_proxy` has beside [`DoorSettings`]: the fields of
/// `RawConfig`.
const OWN_KEYS: [&str; 5] = [
    "users",
    "handshake_timeout",
    "max_startups",
    "per_source_max_startups",
    "accept_proxy_protocol",
];

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A checked HTTP proxy config (no `Debug`: it holds passwords).
#[derive(Clone)]
pub struct HttpProxyConfig {
    /// Where it listens, where connections route, timeouts, the limit.
    pub door: DoorSettings,
    /// Users; none means no authentication.
    pub users: Users,
    /// Time allowed for a request's header.
    pub handshake_timeout: Duration,
    /// Connections whose first request head has not arrived, door-wide
    /// and per address.
    pub startups: StartupLimits,
    /// Load balancers whose connections start with a PROXY header.
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
}

impl HttpProxyConfig {
    /// Parses and validates a `kind: http_proxy` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let (door, raw): (DoorSettings, RawConfig) = DoorSettings::parse(doc, &OWN_KEYS)?;
        let src = &doc.source;
        let users = Users::from_raw(src, raw.users)?;
        positive(src, "handshake_timeout", raw.handshake_timeout)?;
        if users.is_empty() && door.exposed() {
            tracing::warn!(source = %src, listen = %door.listen, "HTTP proxy without users on a non-loopback address: anyone who reaches it can use the tenant's routes");
        }
        Ok(HttpProxyConfig {
            door,
            users,
            handshake_timeout: raw.handshake_timeout,
            startups: StartupLimits::from_raw(
                src,
                raw.max_startups.as_ref(),
                raw.per_source_max_startups,
            )?,
            accept_proxy_protocol: raw.accept_proxy_protocol,
        })
    }

    /// The instances this proxy needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        self.door.depends_on(self.users.vnets())
    }
}
