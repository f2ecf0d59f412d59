//! The pipe's config document.

use std::time::Duration;

use configstore::Document;
use serde::{Deserialize, Serialize};

use crate::core::addr::{HostPort, ListenAddr};
use crate::core::config::{parse_document, ConfigError};

/// Which transport a pipe carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PipeProtocol {
    /// TCP streams (default).
    #[default]
    Tcp,
    /// UDP datagrams; one session per client address.
    Udp,
}

/// `kind: pipe`
///
/// ```yaml
/// kind: pipe
/// listen: 127.0.0.1:8080     # where clients connect (a bare port means 127.0.0.1)
/// remote: 127.0.0.1:80       # where connections go: IP or name, and port
/// protocol: tcp              # tcp (default) or udp
/// connect_timeout: 5s        # default 5s
/// idle_timeout: 10m          # default: 1h for tcp, 60s for udp; `none` lifts it (tcp only)
/// max_connections: 1024      # default 1024; more are refused and counted
/// vnet: sydney               # optional: route in this vnet of the tenant (default: the default vnet)
/// via: wg0                   # optional: dial through this module's network (a WireGuard instance)
/// peer: server               # optional, with via: remote defaults to <peer's own VPN address (first /32 or /128 of its allowed_ips)>:<listen port>
/// listen_via: wg0            # optional: accept on a VPN address inside this module's network
/// proxy_protocol: v2         # optional (tcp): send a PROXY protocol header (v1 or v2) to the remote
/// accept_proxy_protocol: [10.0.0.0/8]  # optional (tcp): load balancers whose connections start
///                            # with a PROXY header naming the real client
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipeConfig {
    /// Local address to accept on.
    pub listen: ListenAddr,
    /// Where to connect for each accepted connection (optional with `peer`).
    #[serde(default)]
    pub remote: Option<HostPort>,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub protocol: PipeProtocol,
    /// Dial timeout for `remote`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Close a connection (or UDP session) after this long without traffic.
    #[serde(default)]
    pub idle_timeout: Option<IdleTimeout>,
    /// Concurrent connections (or UDP sessions) allowed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Route in this vnet of the tenant instead of the default one.
    #[serde(default)]
    pub vnet: Option<String>,
    /// Dial through this module of the tenant (its dialer): a route pinned
    /// by the pipe instead of the vnet's table.
    #[serde(default)]
    pub via: Option<String>,
    /// With `via`: the peer whose VPN address `remote` defaults to.
    #[serde(default)]
    pub peer: Option<String>,
    /// Accept inside this module's virtual network instead of the host's.
    #[serde(default)]
    pub listen_via: Option<String>,
    /// Send a PROXY protocol header to the remote first.
    #[serde(default)]
    pub proxy_protocol: Option<crate::core::net::proxy_protocol::Version>,
    /// Sources (load balancers) that must start with a PROXY header.
    #[serde(default)]
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_connections() -> usize {
    1024
}

/// UDP sessions end after this long without a datagram unless configured.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// TCP connections end after this long without a byte either way unless
/// configured: a client that vanished without a FIN does not hold a
/// connection forever. `idle_timeout: none` lifts it.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(3600);

pub use crate::core::config::IdleTimeout;

impl PipeConfig {
    /// Parses and validates a `kind: pipe` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let c: PipeConfig = parse_document(doc, &["kind"])?;
        if c.remote.is_none() && c.peer.is_none() {
            return Err(ConfigError::key(
                &doc.source,
                "remote",
                "missing field `remote` (HOST:PORT; or name a `peer` with `via`)",
            ));
        }
        if c.peer.is_some() && c.via.is_none() {
            return Err(ConfigError::key(
                &doc.source,
                "peer",
                "needs `via`: the WireGuard instance the peer belongs to",
            ));
        }
        if c.via.is_some() && c.vnet.is_some() {
            return Err(ConfigError::key(
                &doc.source,
                "via",
                "`via` pins the way out and `vnet` routes in a vnet's table: give one of them",
            ));
        }
        if c.protocol == PipeProtocol::Udp
            && (c.proxy_protocol.is_some() || !c.accept_proxy_protocol.is_empty())
        {
            return Err(ConfigError::key(
                &doc.source,
                if c.proxy_protocol.is_some() {
                    "proxy_protocol"
                } else {
                    "accept_proxy_protocol"
                },
                "the PROXY protocol is for TCP pipes",
            ));
        }
        if c.max_connections == 0 {
            return Err(ConfigError::key(
                &doc.source,
                "max_connections",
                "must be at least 1",
            ));
        }
        if c.connect_timeout.is_zero() {
            return Err(ConfigError::key(
                &doc.source,
                "connect_timeout",
                "must be longer than 0s",
            ));
        }
        match c.idle_timeout {
            Some(IdleTimeout::After(d)) if d.is_zero() => {
                return Err(ConfigError::key(
                    &doc.source,
                    "idle_timeout",
                    "must be longer than 0s (`none` for no idle timeout)",
                ))
            }
            Some(IdleTimeout::Off) if c.protocol == PipeProtocol::Udp => {
                return Err(ConfigError::key(
                    &doc.source,
                    "idle_timeout",
                    "UDP sessions need an idle timeout: they end only by it",
                ))
            }
            _ => {}
        }
        Ok(c)
    }

    /// The instances this pipe needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .via
            .iter()
            .chain(self.listen_via.iter())
            .chain(self.vnet.iter())
            .cloned()
            .collect();
        d.dedup();
        d
    }

    /// The idle timeout in force, with the protocol's default.
    pub fn effective_idle_timeout(&self) -> Option<Duration> {
        match (self.idle_timeout, self.protocol) {
            (Some(IdleTimeout::After(d)), _) => Some(d),
            (Some(IdleTimeout::Off), PipeProtocol::Tcp) => None,
            (None, PipeProtocol::Tcp) => Some(DEFAULT_TCP_IDLE),
            (_, PipeProtocol::Udp) => Some(DEFAULT_UDP_IDLE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> Document {
        Document {
            source: "tenants/default/web.yaml".into(),
            value: v,
        }
    }

    #[test]
    fn defaults() {
        let c = PipeConfig::from_document(&doc(
            json!({"kind": "pipe", "listen": "127.0.0.1:8080", "remote": "127.0.0.1:80"}),
        ))
        .unwrap();
        assert_eq!(c.protocol, PipeProtocol::Tcp);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.effective_idle_timeout(), Some(DEFAULT_TCP_IDLE));
        let c = PipeConfig::from_document(&doc(
            json!({"listen": 53, "remote": "10.0.0.1:53", "protocol": "udp", "idle_timeout": "5s"}),
        ))
        .unwrap();
        assert_eq!(c.effective_idle_timeout(), Some(Duration::from_secs(5)));
        let c = PipeConfig::from_document(&doc(
            json!({"listen": 80, "remote": "10.0.0.1:80", "idle_timeout": "none"}),
        ))
        .unwrap();
        assert_eq!(c.effective_idle_timeout(), None);
        let e = PipeConfig::from_document(&doc(
            json!({"listen": 53, "remote": "10.0.0.1:53", "protocol": "udp", "idle_timeout": "off"}),
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("UDP sessions need an idle timeout"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_key() {
        let cases = [
            (
                json!({"listen": "127.0.0.1:8080", "remote": "127.0.0.1:80", "lisen": 1}),
                "lisen",
                "unknown field",
            ),
            (
                json!({"listen": "127.0.0.1:99999", "remote": "127.0.0.1:80"}),
                "listen",
                "0-65535",
            ),
            (
                json!({"listen": "127.0.0.1:1", "remote": "127.0.0.1:0"}),
                "remote",
                "1-65535",
            ),
            (json!({"listen": "127.0.0.1:1"}), "remote", "missing field"),
            (
                json!({"listen": "127.0.0.1:1", "peer": "server"}),
                "peer",
                "needs `via`",
            ),
            (
                json!({"listen": "127.0.0.1:1", "remote": "a:1", "max_connections": 0}),
                "max_connections",
                "at least 1",
            ),
            (
                json!({"listen": "127.0.0.1:1", "remote": "a:1", "connect_timeout": "soon"}),
                "connect_timeout",
                "",
            ),
            (
                json!({"listen": "127.0.0.1:1", "remote": "a:1", "protocol": "sctp"}),
                "protocol",
                "unknown variant",
            ),
        ];
        for (v, key, msg) in cases {
            let e = PipeConfig::from_document(&doc(v)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.message.contains(msg), "{e}");
            assert!(
                e.to_string().starts_with("tenants/default/web.yaml: key"),
                "{e}"
            );
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z0-9.:\\[\\]]{0,24}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("listen".to_string()),
                        Just("remote".to_string()),
                        Just("protocol".to_string()),
                        Just("idle_timeout".to_string()),
                        Just("max_connections".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any document tree is a config or an error naming the file; never a panic.
        #[test]
        fn documents_never_panic(v in value()) {
            let doc = Document { source: "tenants/t/p.yaml".into(), value: v };
            if let Err(e) = PipeConfig::from_document(&doc) {
                prop_assert!(e.to_string().starts_with("tenants/t/p.yaml: "));
            }
        }
    }
}
