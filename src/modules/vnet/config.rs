//! The vnet's config document.

use std::collections::BTreeMap;
use std::net::IpAddr;

use configstore::Document;
use ipnet::IpNet;
use serde::Deserialize;

use crate::core::config::{parse_addresses, parse_document, positive, ConfigError};
use crate::core::engine::EngineKind;
use crate::core::engine::{DEFAULT_TCP_KEEPALIVE, DEFAULT_TCP_TIMEOUT};
use crate::core::spine::router::{Connector, Match, Route, Router};
use crate::core::spine::vnet::Vnet;

/// `kind: vnet` (the instance name is the vnet's name)
///
/// ```yaml
/// kind: vnet
/// default: true              # on-ramps that name no vnet use this one; the
///                            # latest vnet to claim it is the default
///                            # (a tenant's only vnet is its default anyway)
/// engine: userspace          # userspace | kernel; default: the node's `engine:`
///                            # (userspace unless meshgate.yaml says otherwise)
/// address: 10.60.0.1/16      # optional: the vnet's own address(es). The vnet then has
///                            # one IP stack, shared by every WireGuard instance that
///                            # attaches (`vnet: <name>`, no `address:` of its own): a
///                            # listener here (`listen_via: <name>`) serves the peers of
///                            # all of them, and their sites reach each other
/// mtu: 1420                  # with `address`: the stack's MTU
/// tcp_keepalive: 30s         # with `address`: as a WireGuard instance's
/// tcp_timeout: 90s
/// routes:
///   - to: 10.1.0.0/16        # CIDR, IP, host name, *.suffix, or * (everything)
///     via: wg-frankfurt      # direct | reject | a module of the tenant (a WireGuard instance)
///   - to: "*.corp.example"
///     via: direct
///   - to: 10.1.99.0/24
///     via: reject
/// hosts:                     # static names, looked up before routing
///   nginx: 10.1.0.10
/// dns: 10.1.0.53             # optional: a DNS server inside the vnet (port 53/TCP,
///                            # or IP:PORT); other names resolve there, over TCP,
///                            # through the route to it, never on the host
/// ```
///
/// WireGuard instances that attach (`vnet: <name>`) add their peers'
/// allowed IPs as routes; configured routes win at equal prefix length.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    default: bool,
    #[serde(default)]
    engine: Option<EngineKind>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    hosts: BTreeMap<String, IpAddr>,
    #[serde(default)]
    dns: Option<String>,
    #[serde(default)]
    address: serde_json::Value,
    #[serde(default)]
    mtu: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    tcp_keepalive: Option<std::time::Duration>,
    #[serde(default, with = "humantime_serde")]
    tcp_timeout: Option<std::time::Duration>,
    #[serde(default)]
    congestion_control: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    to: String,
    via: String,
}

/// A checked vnet config.
#[derive(Debug, Clone, PartialEq)]
pub struct VnetConfig {
    /// Whether this is the tenant's default vnet.
    pub default: bool,
    /// Its engine (`None`: the node's default).
    pub engine: Option<EngineKind>,
    /// Its routes, in document order.
    pub routes: Vec<Route>,
    /// Static names.
    pub hosts: BTreeMap<String, IpAddr>,
    /// The vnet's DNS server.
    pub dns: Option<std::net::SocketAddr>,
    /// The vnet's own IP stack, when it has `address:`.
    pub stack: Option<StackConfig>,
}

/// The vnet's own IP stack.
#[derive(Debug, Clone, PartialEq)]
pub struct StackConfig {
    /// Its addresses.
    pub addresses: Vec<IpNet>,
    /// Its MTU.
    pub mtu: usize,
    /// TCP keep-alive of its connections (`None`: off).
    pub tcp_keepalive: Option<std::time::Duration>,
    /// A silent peer's connections end after this.
    pub tcp_timeout: std::time::Duration,
    /// The kernel engine's congestion control.
    pub congestion_control: Option<String>,
}

/// `to:`: what a route matches. `*` is everything (IPv4, IPv6 and names).
fn parse_to(to: &str) -> Result<Vec<Match>, String> {
    let to = to.trim();
    if to == "*" {
        return Ok(vec![
            Match::Cidr("0.0.0.0/0".parse().expect("literal")),
            Match::Cidr("::/0".parse().expect("literal")),
            Match::Suffix(String::new()),
        ]);
    }
    if let Ok(net) = to.parse::<IpNet>() {
        return Ok(vec![Match::Cidr(net.trunc())]);
    }
    if let Ok(ip) = to.parse::<IpAddr>() {
        return Ok(vec![Match::Cidr(IpNet::from(ip))]);
    }
    let (suffix, name) = match to.strip_prefix("*.").or_else(|| to.strip_prefix('.')) {
        Some(rest) => (true, rest),
        None => (false, to),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(format!(
            "`{to}` is not a route destination: expected a CIDR (10.1.0.0/16), an IP, a host name, `*.suffix` or `*`"
        ));
    }
    let name = name.to_ascii_lowercase();
    Ok(vec![if suffix {
        Match::Suffix(name)
    } else {
        Match::Host(name)
    }])
}

fn parse_via(via: &str) -> Result<Connector, String> {
    match via.trim() {
        "direct" => Ok(Connector::Direct),
        "reject" => Ok(Connector::Reject),
        m if !m.is_empty()
            && m.len() <= 63
            && m.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            Ok(Connector::Module(m.to_string()))
        }
        other => Err(format!(
            "`{other}` is not a connector: expected `direct`, `reject` or the name of a module of this tenant (a WireGuard instance)"
        )),
    }
}

impl VnetConfig {
    /// Parses and validates a `kind: vnet` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let mut routes = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let matches = parse_to(&r.to)
                .map_err(|m| ConfigError::key(&doc.source, format!("routes[{i}].to"), m))?;
            let connector = parse_via(&r.via)
                .map_err(|m| ConfigError::key(&doc.source, format!("routes[{i}].via"), m))?;
            routes.extend(matches.into_iter().map(|matches| Route {
                matches,
                connector: connector.clone(),
            }));
        }
        let hosts = raw
            .hosts
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let dns = match raw.dns.as_deref().map(str::trim) {
            None => None,
            Some(d) => Some(
                d.parse::<std::net::SocketAddr>()
                    .or_else(|_| d.parse::<IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        ConfigError::key(
                            &doc.source,
                            "dns",
                            format!("`{d}`: expected the DNS server's IP (port 53) or IP:PORT, e.g. 10.1.0.53"),
                        )
                    })?,
            ),
        };
        let stack = if raw.address.is_null() {
            for (set, key) in [
                (raw.mtu.is_some(), "mtu"),
                (raw.tcp_keepalive.is_some(), "tcp_keepalive"),
                (raw.tcp_timeout.is_some(), "tcp_timeout"),
                (raw.congestion_control.is_some(), "congestion_control"),
            ] {
                if set {
                    return Err(ConfigError::key(
                        &doc.source,
                        key,
                        "applies to the vnet's own IP stack: set `address:` too",
                    ));
                }
            }
            None
        } else {
            let addresses = parse_addresses(&doc.source, "address", &raw.address)?;
            let mtu = raw.mtu.unwrap_or(1420);
            if !(576..=65535).contains(&mtu) {
                return Err(ConfigError::key(
                    &doc.source,
                    "mtu",
                    format!("{mtu}: expected 576..=65535"),
                ));
            }
            let tcp_keepalive = match raw.tcp_keepalive {
                None => Some(DEFAULT_TCP_KEEPALIVE),
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
            };
            let tcp_timeout = raw.tcp_timeout.unwrap_or(DEFAULT_TCP_TIMEOUT);
            positive(&doc.source, "tcp_timeout", tcp_timeout)?;
            Some(StackConfig {
                addresses,
                mtu,
                tcp_keepalive,
                tcp_timeout,
                congestion_control: raw.congestion_control,
            })
        };
        Ok(VnetConfig {
            default: raw.default,
            engine: raw.engine,
            routes,
            hosts,
            dns,
            stack,
        })
    }

    /// The vnet named `name` this config describes.
    pub fn to_vnet(&self, name: &str) -> Vnet {
        Vnet {
            name: name.to_string(),
            default: self.default,
            engine: self.engine,
            routes: Router::new(self.routes.clone()),
            hosts: self.hosts.clone(),
            dns: self.dns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> Document {
        Document {
            source: "tenants/acme/sydney.yaml".into(),
            value: v,
        }
    }

    #[test]
    fn routes_hosts_and_default() {
        let c = VnetConfig::from_document(&doc(json!({
            "kind": "vnet",
            "default": true,
            "routes": [
                {"to": "10.1.0.0/16", "via": "wg-syd"},
                {"to": "10.1.2.3", "via": "reject"},
                {"to": "*.Corp.example", "via": "direct"},
                {"to": "db.internal", "via": "wg-syd"},
                {"to": "*", "via": "reject"},
            ],
            "hosts": {"NGINX": "10.1.0.10"},
            "dns": "10.1.0.53",
        })))
        .unwrap();
        assert_eq!(c.dns, Some("10.1.0.53:53".parse().unwrap()));
        assert!(c.default);
        let shown: Vec<String> = c.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.1.0.0/16 -> wg-syd",
                "10.1.2.3/32 -> reject",
                "*.corp.example -> direct",
                "db.internal -> wg-syd",
                "0.0.0.0/0 -> reject",
                "::/0 -> reject",
                "* -> reject"
            ]
        );
        assert_eq!(c.hosts["nginx"], "10.1.0.10".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn errors_name_the_route() {
        let cases = [
            (
                json!({"routes": [{"to": "10.1.0.0/33", "via": "direct"}]}),
                "routes[0].to",
                "not a route destination",
            ),
            (
                json!({"routes": [{"to": "a..b", "via": "direct"}]}),
                "routes[0].to",
                "not a route destination",
            ),
            (
                json!({"routes": [{"to": "x", "via": "wg 0"}]}),
                "routes[0].via",
                "not a connector",
            ),
            (json!({"routes": [{"to": "x"}]}), "routes[0]", "via"),
            (json!({"engine": "tun"}), "engine", "userspace"),
            (json!({"hosts": {"a": "not-an-ip"}}), "hosts", ""),
            (json!({"rotes": []}), "rotes", "unknown field"),
            (
                json!({"dns": "resolver.local"}),
                "dns",
                "expected the DNS server's IP",
            ),
        ];
        for (v, key, msg) in cases {
            let e = VnetConfig::from_document(&doc(v.clone())).unwrap_err();
            let k = e.key.clone().unwrap_or_default();
            assert!(k.starts_with(key), "{v}: key {k:?} in {e}");
            assert!(e.to_string().contains(msg), "{v}: {e}");
            assert!(e.to_string().starts_with("tenants/acme/sydney.yaml"), "{e}");
        }
    }

    #[test]
    fn an_address_gives_the_vnet_a_stack() {
        let c = VnetConfig::from_document(&doc(
            json!({"address": ["10.60.0.1/16", "fd60::1/64"], "mtu": 1380, "tcp_keepalive": "0s"}),
        ))
        .unwrap();
        let s = c.stack.unwrap();
        assert_eq!(s.addresses.len(), 2);
        assert_eq!((s.mtu, s.tcp_keepalive), (1380, None));
        assert_eq!(s.tcp_timeout, DEFAULT_TCP_TIMEOUT);
        let none = VnetConfig::from_document(&doc(json!({}))).unwrap();
        assert!(none.stack.is_none());
        for (v, key, what) in [
            (json!({"mtu": 1400}), "mtu", "set `address:` too"),
            (
                json!({"address": "10.60.0.1/16", "mtu": 100}),
                "mtu",
                "576..=65535",
            ),
            (json!({"address": "nope"}), "address", "not an address"),
            (
                json!({"address": "10.60.0.1/16", "tcp_timeout": "0s"}),
                "tcp_timeout",
                "",
            ),
        ] {
            let e = VnetConfig::from_document(&doc(v)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
    }
}
