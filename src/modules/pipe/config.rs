//! The pipe's config document.

use std::time::Duration;

use configstore::Document;
use serde::{Deserialize, Serialize};

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::spine::door::{DoorKeys, DoorSettings};

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
///
/// `listen`, `listen_via`, `vnet`, `connect_timeout`, `idle_timeout`,
/// `max_connections` and `accept_proxy_protocol` are every door's
/// ([`DoorSettings`]); the rest are the pipe's own.
#[derive(Debug, Clone, PartialEq)]
pub struct PipeConfig {
    /// The keys every door has.
    pub door: DoorSettings,
    /// Where to connect for each accepted connection (optional with `peer`).
    pub remote: Option<HostPort>,
    /// `tcp` or `udp`.
    pub protocol: PipeProtocol,
    /// Dial through this module of the tenant (its dialer): a route pinned
    /// by the pipe instead of the vnet's table.
    pub via: Option<String>,
    /// With `via`: the peer whose VPN address `remote` defaults to.
    pub peer: Option<String>,
    /// Send a PROXY protocol header to the remote first.
    pub proxy_protocol: Option<crate::core::net::proxy_protocol::Version>,
    /// The idle timeout the connections (or UDP sessions) have: `None`
    /// for none (TCP only).
    pub idle_timeout: Option<Duration>,
}

/// The pipe's own keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Own {
    #[serde(default)]
    remote: Option<HostPort>,
    #[serde(default)]
    protocol: PipeProtocol,
    #[serde(default)]
    via: Option<String>,
    #[serde(default)]
    peer: Option<String>,
    #[serde(default)]
    proxy_protocol: Option<crate::core::net::proxy_protocol::Version>,
}

const OWN_KEYS: [&str; 5] = ["remote", "protocol", "via", "peer", "proxy_protocol"];

/// UDP sessions end after this long without a datagram unless configured.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// TCP connections end after this long without a byte either way unless
/// configured: a client that vanished without a FIN does not hold a
/// connection forever. `idle_timeout: none` lifts it.
pub const DEFAULT_TCP_IDLE: Duration = DoorSettings::DEFAULT_IDLE_TIMEOUT;

impl PipeConfig {
    /// Parses and validates a `kind: pipe` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let src = &doc.source;
        let (door, own): (DoorSettings, Own) = DoorSettings::parse_taking(
            doc,
            DoorKeys {
                proxy_protocol: true,
                ..DoorKeys::default()
            },
            &OWN_KEYS,
        )?;
        if own.remote.is_none() && own.peer.is_none() {
            return Err(ConfigError::key(
                src,
                "remote",
                "missing field `remote` (HOST:PORT; or name a `peer` with `via`)",
            ));
        }
        if own.peer.is_some() && own.via.is_none() {
            return Err(ConfigError::key(
                src,
                "peer",
                "needs `via`: the WireGuard instance the peer belongs to",
            ));
        }
        if own.via.is_some() && door.vnet.is_some() {
            return Err(ConfigError::key(
                src,
                "via",
                "`via` pins the way out and `vnet` routes in a vnet's table: give one of them",
            ));
        }
        if let Some(via) = &own.via {
            configstore::check_name(via).map_err(|m| ConfigError::key(src, "via", m))?;
        }
        let idle_given = doc
            .value
            .as_object()
            .is_some_and(|m| m.contains_key("idle_timeout"));
        let idle_timeout = match own.protocol {
            PipeProtocol::Tcp => door.idle_timeout,
            PipeProtocol::Udp => {
                if own.proxy_protocol.is_some() || !door.accept_proxy_protocol.is_empty() {
                    return Err(ConfigError::key(
                        src,
                        if own.proxy_protocol.is_some() {
                            "proxy_protocol"
                        } else {
                            "accept_proxy_protocol"
                        },
                        "the PROXY protocol is for TCP pipes",
                    ));
                }
                match (idle_given, door.idle_timeout) {
                    (false, _) => Some(DEFAULT_UDP_IDLE),
                    (true, Some(d)) => Some(d),
                    (true, None) => {
                        return Err(ConfigError::key(
                            src,
                            "idle_timeout",
                            "UDP sessions need an idle timeout: they end only by it",
                        ))
                    }
                }
            }
        };
        Ok(PipeConfig {
            door,
            remote: own.remote,
            protocol: own.protocol,
            via: own.via,
            peer: own.peer,
            proxy_protocol: own.proxy_protocol,
            idle_timeout,
        })
    }

    /// The instances this pipe needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        self.door.depends_on(self.via.iter())
    }

    /// The idle timeout in force, with the protocol's default.
    pub fn effective_idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
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
        assert_eq!(c.door.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.door.max_connections, 1024);
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
