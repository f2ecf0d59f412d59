//! The SOCKS front door's config document.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::addr::ListenAddr;
use crate::core::config::{parse_document, secret_text, ConfigError, IdleTimeout};

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
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default)]
    vnets: Vec<String>,
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

/// One user.
#[derive(Clone)]
pub struct User {
    /// The password (never logged; compared in constant time).
    pub password: Vec<u8>,
    /// The user's vnet (`None`: the door's).
    pub vnet: Option<String>,
    /// Further vnets the user may pick with `name@vnet`.
    pub vnets: Vec<String>,
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
    /// Users by name.
    pub users: BTreeMap<String, User>,
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
}

impl std::fmt::Debug for SocksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocksConfig")
            .field("listen", &self.listen)
            .field("listen_via", &self.listen_via)
            .field("auth", &self.auth)
            .field("users", &self.users.keys().collect::<Vec<_>>())
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
        let mut users = BTreeMap::new();
        for (i, u) in raw.users.into_iter().enumerate() {
            let key = |k: &str| format!("users[{i}].{k}");
            if u.name.is_empty() || u.name.len() > 255 || u.name.contains(char::is_control) {
                return Err(ConfigError::key(
                    src,
                    key("name"),
                    "expected 1-255 printable characters (SOCKS sends at most 255 bytes)",
                ));
            }
            let password = secret_text(
                src,
                &key("password"),
                u.password,
                u.password_file,
                true,
                "the user's password",
            )?
            .expect("required");
            if password.is_empty() || password.len() > 255 {
                return Err(ConfigError::key(
                    src,
                    key("password"),
                    "expected 1-255 bytes (SOCKS sends at most 255)",
                ));
            }
            if let Some(v) = &u.vnet {
                check_vnet(key("vnet"), v)?;
            }
            for (j, v) in u.vnets.iter().enumerate() {
                check_vnet(format!("users[{i}].vnets[{j}]"), v)?;
            }
            if users.contains_key(&u.name) {
                return Err(ConfigError::key(
                    src,
                    key("name"),
                    format!("user `{}` is listed twice", u.name),
                ));
            }
            users.insert(
                u.name,
                User {
                    password: password.into_bytes(),
                    vnet: u.vnet,
                    vnets: u.vnets,
                },
            );
        }
        let positive = |key: &str, d: Duration| {
            if d.is_zero() {
                Err(ConfigError::key(src, key, "must be longer than 0s"))
            } else {
                Ok(())
            }
        };
        positive("connect_timeout", raw.connect_timeout)?;
        positive("handshake_timeout", raw.handshake_timeout)?;
        let idle_timeout = match raw.idle_timeout {
            None => Some(DEFAULT_IDLE),
            Some(IdleTimeout::Off) => None,
            Some(IdleTimeout::After(d)) if d.is_zero() => {
                return Err(ConfigError::key(
                    src,
                    "idle_timeout",
                    "must be longer than 0s (`none` for no idle timeout)",
                ))
            }
            Some(IdleTimeout::After(d)) => Some(d),
        };
        if raw.max_connections == 0 {
            return Err(ConfigError::key(
                src,
                "max_connections",
                "must be at least 1",
            ));
        }
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
        })
    }

    /// The instances this door needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .listen_via
            .iter()
            .chain(self.vnet.iter())
            .chain(
                self.users
                    .values()
                    .flat_map(|u| u.vnet.iter().chain(u.vnets.iter())),
            )
            .cloned()
            .collect();
        d.sort();
        d.dedup();
        d
    }

    /// Checks a user's credentials. `user` may carry `@vnet`; an exact
    /// user name wins over that reading. Returns the identity and the vnet
    /// to route in, or why not (for the log: never the password).
    pub fn authenticate(
        &self,
        user: &str,
        password: &[u8],
    ) -> Result<(String, Option<String>), &'static str> {
        let (name, picked) = match self.users.get(user) {
            Some(_) => (user, None),
            None => match user.rsplit_once('@') {
                Some((n, v)) if self.users.contains_key(n) => (n, Some(v)),
                _ => return Err("unknown_user"),
            },
        };
        let u = &self.users[name];
        if !constant_time_eq(&u.password, password) {
            return Err("bad_password");
        }
        let vnet = match picked {
            None => u.vnet.clone().or_else(|| self.vnet.clone()),
            Some(v) if u.vnet.as_deref() == Some(v) || u.vnets.iter().any(|x| x == v) => {
                Some(v.to_string())
            }
            Some(_) => return Err("vnet_not_allowed"),
        };
        Ok((name.to_string(), vnet))
    }
}

/// Compares two secrets without an early exit on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
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
