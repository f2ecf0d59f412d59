//! Route tables: which connector a destination leaves through.
//!
//! A route matches a destination by CIDR (for IP literals), exact host name,
//! or host suffix (`.corp.example`), and names a [`Connector`] (`direct`, a
//! module such as a WireGuard instance, or `reject`). The longest match
//! wins: the longest prefix for addresses; an exact name before any suffix,
//! and a longer suffix before a shorter one; across layered tables
//! ([`Router::route_layered`]) the earlier table wins a tie. A vnet
//! ([`crate::core::spine::vnet::Vnets`]) layers its tables and turns no
//! match into [`RouteError::NoRoute`], never a silent direct dial.
//!
//! Sans-IO: routing is a pure function of the tables and the target.

use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use crate::core::addr::HostPort;
use crate::core::net::prefix::PrefixTable;

/// Where a route sends flows: the connector that carries them out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum Connector {
    /// The host's own network stack (names resolved by the host).
    Direct,
    /// A module of the same tenant that offers a dialer (a WireGuard
    /// instance, a gateway link), by instance name.
    Module(String),
    /// Refused: the route exists to say no.
    Reject,
}

impl fmt::Display for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connector::Direct => f.write_str("direct"),
            Connector::Module(m) => f.write_str(m),
            Connector::Reject => f.write_str("reject"),
        }
    }
}

/// What a route matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// IP destinations inside this network.
    Cidr(IpNet),
    /// Exactly this host name.
    Host(String),
    /// Host names ending in this suffix (`.corp.example`); `""` matches every name.
    Suffix(String),
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Cidr(n) => n.fmt(f),
            Match::Host(h) => f.write_str(h),
            Match::Suffix(s) if s.is_empty() => f.write_str("*"),
            Match::Suffix(s) => write!(f, "*.{}", s.trim_start_matches('.')),
        }
    }
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// What it matches.
    pub matches: Match,
    /// Where matching flows go.
    pub connector: Connector,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.matches, self.connector)
    }
}

/// Why a destination could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No route matches.
    #[error("no route to {target} in vnet `{vnet}`")]
    NoRoute {
        /// The destination.
        target: String,
        /// The vnet that was asked.
        vnet: String,
    },
    /// The best route is `reject`.
    #[error("{target} is refused by route `{route}` in vnet `{vnet}`")]
    Rejected {
        /// The destination.
        target: String,
        /// The vnet that was asked.
        vnet: String,
        /// The rule that refused it.
        route: String,
    },
    /// The vnet asked for does not exist.
    #[error("no vnet `{0}` in this tenant")]
    NoVnet(String),
}

impl RouteError {
    /// A short fixed label for metrics: `no_route`, `rejected` or `no_vnet`.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::NoRoute { .. } => "no_route",
            RouteError::Rejected { .. } => "rejected",
            RouteError::NoVnet(_) => "no_vnet",
        }
    }
}

/// A route table: a pure function of its routes and the target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Router {
    routes: Vec<Route>,
    /// The CIDR routes: network → index into `routes` (the first route
    /// for a network wins).
    #[serde(skip)]
    cidrs: PrefixTable<usize>,
}

impl Router {
    /// A table with the given routes.
    pub fn new(routes: Vec<Route>) -> Self {
        let cidrs = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.matches {
                Match::Cidr(net) => Some((net, i)),
                _ => None,
            })
            .collect();
        Self { routes, cidrs }
    }

    /// Everything leaves directly.
    pub fn direct() -> Self {
        Self::new(vec![
            Route {
                matches: Match::Cidr("0.0.0.0/0".parse().expect("literal")),
                connector: Connector::Direct,
            },
            Route {
                matches: Match::Cidr("::/0".parse().expect("literal")),
                connector: Connector::Direct,
            },
            Route {
                matches: Match::Suffix(String::new()),
                connector: Connector::Direct,
            },
        ])
    }

    /// The routes, in configuration order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The best route for `target` in this table alone (longest match), or
    /// `None`.
    pub fn route(&self, target: &HostPort) -> Option<&Route> {
        Self::route_layered(&[self], target)
    }

    /// The best route for `target` over several tables: the longest match
    /// wins; at equal length the earlier table wins (configured routes before
    /// routes learnt from peers, before built-in defaults).
    pub fn route_layered<'a>(layers: &[&'a Router], target: &HostPort) -> Option<&'a Route> {
        if let Some(ip) = target.ip() {
            let mut best: Option<(u8, &'a Route)> = None;
            for table in layers {
                if let Some((net, &i)) = table.cidrs.longest_match(ip) {
                    if best.is_none_or(|(len, _)| net.prefix_len() > len) {
                        best = Some((net.prefix_len(), &table.routes[i]));
                    }
                }
            }
            return best.map(|(_, r)| r);
        }
        let host = target.host.to_ascii_lowercase();
        let mut best: Option<(usize, std::cmp::Reverse<usize>, &'a Route)> = None;
        for (layer, table) in layers.iter().enumerate() {
            for r in &table.routes {
                let score = match &r.matches {
                    Match::Host(h) if h.eq_ignore_ascii_case(&host) => usize::MAX,
                    Match::Suffix(s) if suffix_matches(&host, s) => {
                        let s = s.trim_start_matches('.');
                        if s.is_empty() {
                            0
                        } else {
                            s.len() + 1
                        }
                    }
                    _ => continue,
                };
                let key = (score, std::cmp::Reverse(layer));
                if best.as_ref().is_none_or(|(s, l, _)| key > (*s, *l)) {
                    best = Some((key.0, key.1, r));
                }
            }
        }
        best.map(|(_, _, r)| r)
    }
}

/// `.corp.example` (or `corp.example`) matches `a.corp.example`; the bare
/// suffix also matches the name itself.
fn suffix_matches(host: &str, suffix: &str) -> bool {
    let suffix = suffix.trim_start_matches('.').to_ascii_lowercase();
    if suffix.is_empty() {
        return true;
    }
    host == suffix || host.ends_with(&format!(".{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HostPort {
        s.parse().unwrap()
    }

    fn r(m: Match, o: Connector) -> Route {
        Route {
            matches: m,
            connector: o,
        }
    }

    fn to(t: &Router, target: &str) -> Option<Connector> {
        t.route(&hp(target)).map(|r| r.connector.clone())
    }

    #[test]
    fn longest_prefix_wins() {
        let t = Router::new(vec![
            r(
                Match::Cidr("10.0.0.0/8".parse().unwrap()),
                Connector::Direct,
            ),
            r(
                Match::Cidr("10.1.0.0/16".parse().unwrap()),
                Connector::Module("wg0".into()),
            ),
        ]);
        assert_eq!(to(&t, "10.1.2.3:80"), Some(Connector::Module("wg0".into())));
        assert_eq!(to(&t, "10.2.2.3:80"), Some(Connector::Direct));
        assert_eq!(to(&t, "192.168.1.1:80"), None);
        assert_eq!(to(&t, "[::1]:80"), None);
        // A name never matches a CIDR route.
        assert_eq!(to(&t, "example.com:80"), None);
    }

    #[test]
    fn names_exact_then_longest_suffix() {
        let t = Router::new(vec![
            r(Match::Suffix(String::new()), Connector::Direct),
            r(
                Match::Suffix(".corp.example".into()),
                Connector::Module("ssh".into()),
            ),
            r(
                Match::Suffix("db.corp.example".into()),
                Connector::Module("wg0".into()),
            ),
            r(
                Match::Host("special.corp.example".into()),
                Connector::Reject,
            ),
        ]);
        let ssh = Some(Connector::Module("ssh".into()));
        assert_eq!(to(&t, "a.corp.example:1"), ssh);
        assert_eq!(to(&t, "corp.example:1"), ssh);
        assert_eq!(
            to(&t, "x.db.corp.example:1"),
            Some(Connector::Module("wg0".into()))
        );
        assert_eq!(to(&t, "SPECIAL.corp.example:1"), Some(Connector::Reject));
        assert_eq!(to(&t, "notcorp.example:1"), Some(Connector::Direct));
        // Suffix matching is per label.
        assert!(!suffix_matches("xcorp.example", "corp.example"));
    }

    #[test]
    fn earlier_layers_win_ties_and_longer_prefixes_win_across_layers() {
        let configured = Router::new(vec![r(
            Match::Cidr("10.1.0.0/16".parse().unwrap()),
            Connector::Module("sydney".into()),
        )]);
        let learnt = Router::new(vec![
            r(
                Match::Cidr("10.1.0.0/16".parse().unwrap()),
                Connector::Module("wg0".into()),
            ),
            r(
                Match::Cidr("10.1.2.0/24".parse().unwrap()),
                Connector::Module("wg1".into()),
            ),
        ]);
        let defaults = Router::direct();
        let layers = [&configured, &learnt, &defaults];
        let at = |t: &str| Router::route_layered(&layers, &hp(t)).map(|r| r.connector.clone());
        assert_eq!(at("10.1.9.9:1"), Some(Connector::Module("sydney".into())));
        assert_eq!(at("10.1.2.9:1"), Some(Connector::Module("wg1".into())));
        assert_eq!(at("8.8.8.8:53"), Some(Connector::Direct));
        assert_eq!(at("example.com:443"), Some(Connector::Direct));
    }

    #[test]
    fn routes_display_as_configured() {
        let route = r(Match::Suffix(".corp".into()), Connector::Reject);
        assert_eq!(route.to_string(), "*.corp -> reject");
        let route = r(
            Match::Cidr("10.0.0.0/8".parse().unwrap()),
            Connector::Module("wg0".into()),
        );
        assert_eq!(route.to_string(), "10.0.0.0/8 -> wg0");
    }

    #[test]
    fn default_table_is_direct() {
        let t = Router::direct();
        for target in ["127.0.0.1:80", "[::1]:80", "example.com:443"] {
            assert_eq!(to(&t, target), Some(Connector::Direct), "{target}");
        }
    }
}
