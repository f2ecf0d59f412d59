//! The SOCKS front door's config document.

use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::addr::ListenAddr;
use crate::core::config::{
    at_least_one, idle_timeout, parse_document, positive, ConfigError, IdleTimeout,
};
use crate::core::users::{RawUser, Users};

/// `kind: socks`
///
/// ```yaml
/// kind: socks
/// listen: 127.0.0.1:1080        # a bare port means 127.0.0.1
/// listen_via: wg0               # optional: accept on a VPN address in this module's network
/// auth: password                # none | password (default: password when users are given)
/// users:
///   - name: alice
///     password_file: /etc/meshgate/alice.pw   # or password: ...
///     vnet: sydney              # optional: alice's vnet (default: the door's `vnet`)
///     vnets: [frankfurt]        # optional: more vnets alice may pick as `alice@frankfurt`
/// vnet: frankfurt               # optional: where users without one are routed (default: the tenant's default)
/// udp: true                     # UDP ASSOCIATE (default true)
/// socks4: true                  # SOCKS4/4a CONNECT, only with `auth: none` (default true)
/// connect_timeout: 5s
/// handshake_timeout: 10s        # the greeting, authentication and request must arrive within this
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
    auth: Option<Auth>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default = "yes")]
    udp: bool,
    #[serde(default = "yes")]
    socks4: bool,
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

fn yes() -> bool {
    true
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

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    /// No authentication: anyone who reaches the listener.
    None,
    /// Username/password (RFC 1929).
    Password,
}

/// A checked SOCKS config. Holds passwords: its `Debug` leaves them out.
#[derive(Clone)]
pub struct SocksConfig {
    /// Where clients connect.
    pub listen: ListenAddr,
    /// Accept inside this module's network instead of the host's.
    pub listen_via: Option<String>,
    /// How clients authenticate.
    pub auth: Auth,
    /// Users and what they may reach.
    pub users: Users,
    /// The vnet of clients whose user names none.
    pub vnet: Option<String>,
    /// Whether UDP ASSOCIATE is served.
    pub udp: bool,
    /// Whether SOCKS4/4a is served.
    pub socks4: bool,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Time allowed for greeting, authentication and request.
    pub handshake_timeout: Duration,
    /// Idle timeout of relayed connections (and UDP associations' flows).
    pub idle_timeout: Option<Duration>,
    /// Concurrent connections.
    pub max_connections: usize,
    /// Load balancers whose connections start with a PROXY header.
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for SocksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocksConfig")
            .field("listen", &self.listen)
            .field("listen_via", &self.listen_via)
            .field("auth", &self.auth)
            .field("users", &self.users.names())
            .field("vnet", &self.vnet)
            .finish_non_exhaustive()
    }
}

/// TCP connections end after this long without traffic unless configured.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);

impl SocksConfig {
    /// Parses and validates a `kind: socks` document (reads password files).
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = &doc.source;
        let auth = raw.auth.unwrap_or(if raw.users.is_empty() {
            Auth::None
        } else {
            Auth::Password
        });
        if auth == Auth::Password && raw.users.is_empty() {
            return Err(ConfigError::key(
                src,
                "users",
                "`auth: password` needs at least one user (name and password or password_file)",
            ));
        }
        if auth == Auth::None && !raw.users.is_empty() {
            return Err(ConfigError::key(
                src,
                "auth",
                "`auth: none` with users: the users would never be asked; drop them or use `auth: password`",
            ));
        }
        let check_vnet = |key: String, v: &str| {
            configstore::check_name(v).map_err(|m| ConfigError::key(src, key, m))
        };
        if let Some(v) = &raw.vnet {
            check_vnet("vnet".into(), v)?;
        }
        let users = Users::from_raw(src, raw.users)?;
        positive(src, "connect_timeout", raw.connect_timeout)?;
        positive(src, "handshake_timeout", raw.handshake_timeout)?;
        let idle_timeout = idle_timeout(src, raw.idle_timeout, DEFAULT_IDLE)?;
        at_least_one(src, "max_connections", raw.max_connections)?;
        if let Some(m) = &raw.listen_via {
            configstore::check_name(m).map_err(|e| ConfigError::key(src, "listen_via", e))?;
        }
        if auth == Auth::None && !raw.listen.0.ip().is_loopback() && raw.listen_via.is_none() {
            tracing::warn!(source = %src, listen = %raw.listen, "SOCKS without authentication on a non-loopback address: anyone who reaches it can use the tenant's routes");
        }
        Ok(SocksConfig {
            listen: raw.listen,
            listen_via: raw.listen_via,
            auth,
            users,
            vnet: raw.vnet,
            udp: raw.udp,
            socks4: raw.socks4 && auth == Auth::None,
            connect_timeout: raw.connect_timeout,
            handshake_timeout: raw.handshake_timeout,
            idle_timeout,
            max_connections: raw.max_connections,
            accept_proxy_protocol: raw.accept_proxy_protocol,
        })
    }

    /// The instances this door needs started first.
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

    /// Checks credentials in this door's users; see [`Users::authenticate`].
    pub fn authenticate(
        &self,
        user: &str,
        password: &[u8],
    ) -> Result<(String, Option<String>), &'static str> {
        self.users
            .authenticate(user, password, self.vnet.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> Document {
        Document {
            source: "tenants/acme/socks.yaml".into(),
            value: v,
        }
    }

    #[test]
    fn users_vnets_and_passwords() {
        let c = SocksConfig::from_document(&doc(json!({
            "kind": "socks", "listen": 1080, "vnet": "frankfurt",
            "users": [
                {"name": "alice", "password": "s3cret", "vnets": ["sydney"]},
                {"name": "bob@corp", "password": "x"},
            ],
        })))
        .unwrap();
        assert_eq!(c.auth, Auth::Password);
        assert!(!c.socks4, "SOCKS4 has no passwords");
        assert_eq!(
            c.authenticate("alice", b"s3cret"),
            Ok(("alice".into(), Some("frankfurt".into())))
        );
        assert_eq!(
            c.authenticate("alice@sydney", b"s3cret"),
            Ok(("alice".into(), Some("sydney".into())))
        );
        assert_eq!(
            c.authenticate("alice@tokyo", b"s3cret"),
            Err("vnet_not_allowed")
        );
        assert_eq!(c.authenticate("alice", b"s3creT"), Err("bad_password"));
        assert_eq!(c.authenticate("alice", b""), Err("bad_password"));
        assert_eq!(c.authenticate("mallory", b"x"), Err("unknown_user"));
        // A name with @ that is itself a user is that user.
        assert_eq!(
            c.authenticate("bob@corp", b"x"),
            Ok(("bob@corp".into(), Some("frankfurt".into())))
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            c.depends_on(),
            vec!["frankfurt".to_string(), "sydney".to_string()]
        );
    }

    #[test]
    fn bad_documents_name_the_key() {
        let cases = [
            (
                json!({"listen": 1080, "auth": "password"}),
                "users",
                "at least one user",
            ),
            (
                json!({"listen": 1080, "auth": "none", "users": [{"name": "a", "password": "b"}]}),
                "auth",
                "never be asked",
            ),
            (
                json!({"listen": 1080, "users": [{"name": "a"}]}),
                "users[0].password",
                "missing",
            ),
            (
                json!({"listen": 1080, "users": [{"name": "a", "password": "b"}, {"name": "a", "password": "c"}]}),
                "users[1].name",
                "twice",
            ),
            (json!({"listen": 1080, "auth": "kerberos"}), "auth", "none"),
            (
                json!({"listen": 1080, "handshake_timeout": "0s"}),
                "handshake_timeout",
                "longer",
            ),
            (
                json!({"listen": 1080, "lisen": 1}),
                "lisen",
                "unknown field",
            ),
        ];
        for (v, key, msg) in cases {
            let e = SocksConfig::from_document(&doc(v.clone())).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{v}: {e}");
            assert!(e.to_string().contains(msg), "{v}: {e}");
        }
        let c = SocksConfig::from_document(&doc(json!({"listen": 1080}))).unwrap();
        assert_eq!((c.auth, c.socks4, c.udp), (Auth::None, true, true));
        assert_eq!(c.idle_timeout, Some(DEFAULT_IDLE));
    }
}
