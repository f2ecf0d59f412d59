//! The SOCKS front door's config document.

use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::config::ConfigError;
use crate::core::spine::door::{DoorKeys, DoorSettings};
use crate::core::spine::reject::RejectReason;

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
/// max_startups: 10:30:100        # clients not yet past the handshake: from 10, refuse 30 % of new
///                                # ones, rising to all at 100 (sshd's MaxStartups); or `N`
/// per_source_max_startups: 10    # not yet past the handshake from one address
/// idle_timeout: 1h              # or `none`
/// max_connections: 1024
/// accept_proxy_protocol: [10.0.0.0/8]   # load balancers that send a PROXY header (v1/v2)
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    auth: Option<Auth>,
    #[serde(default = "yes")]
    udp: bool,
    #[serde(default = "yes")]
    socks4: bool,
}

/// The keys `kind: socks` has beside [`DoorSettings`]: the fields of `RawConfig`.
const OWN_KEYS: [&str; 3] = ["auth", "udp", "socks4"];

/// The shared key groups `kind: socks` takes: a handshake (10 s), PROXY
/// headers from load balancers, users.
const TAKES: DoorKeys = DoorKeys {
    handshake: Some(Duration::from_secs(10)),
    proxy_protocol: true,
    users: true,
};

fn yes() -> bool {
    true
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

/// A checked SOCKS config. Holds passwords (in `door.users`, whose
/// `Debug` shows names only).
#[derive(Debug, Clone)]
pub struct SocksConfig {
    /// Where it listens, where connections route, timeouts, the limit, the
    /// handshake's limits, trusted load balancers, users.
    pub door: DoorSettings,
    /// How clients authenticate.
    pub auth: Auth,
    /// Whether UDP ASSOCIATE is served.
    pub udp: bool,
    /// Whether SOCKS4/4a is served.
    pub socks4: bool,
}

impl SocksConfig {
    /// Parses and validates a `kind: socks` document (reads password files).
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let (door, raw): (DoorSettings, RawConfig) =
            DoorSettings::parse_taking(doc, TAKES, &OWN_KEYS)?;
        let src = &doc.source;
        let auth = raw.auth.unwrap_or(if door.users.is_empty() {
            Auth::None
        } else {
            Auth::Password
        });
        if auth == Auth::Password && door.users.is_empty() {
            return Err(ConfigError::key(
                src,
                "users",
                "`auth: password` needs at least one user (name and password or password_file)",
            ));
        }
        if auth == Auth::None && !door.users.is_empty() {
            return Err(ConfigError::key(
                src,
                "auth",
                "`auth: none` with users: the users would never be asked; drop them or use `auth: password`",
            ));
        }
        if auth == Auth::None && door.exposed() {
            tracing::warn!(source = %src, listen = %door.listen, "SOCKS without authentication on a non-loopback address: anyone who reaches it can use the tenant's routes");
        }
        Ok(SocksConfig {
            door,
            auth,
            udp: raw.udp,
            socks4: raw.socks4 && auth == Auth::None,
        })
    }

    /// The instances this door needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        self.door.depends_on(self.door.users.vnets())
    }

    /// Checks credentials in this door's users; see [`crate::core::users::Users::authenticate`].
    pub fn authenticate(
        &self,
        user: &str,
        password: &[u8],
    ) -> Result<(String, Option<String>), RejectReason> {
        self.door
            .users
            .authenticate(user, password, self.door.vnet.as_deref())
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
            Err(RejectReason::VnetNotAllowed)
        );
        assert_eq!(
            c.authenticate("alice", b"s3creT"),
            Err(RejectReason::BadPassword)
        );
        assert_eq!(c.authenticate("alice", b""), Err(RejectReason::BadPassword));
        assert_eq!(
            c.authenticate("mallory", b"x"),
            Err(RejectReason::UnknownUser)
        );
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
        assert_eq!(
            c.door.idle_timeout,
            Some(DoorSettings::DEFAULT_IDLE_TIMEOUT)
        );
    }
}
