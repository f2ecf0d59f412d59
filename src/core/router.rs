//! Per-tenant routing: which off-ramp a destination leaves through.
//!
//! A route matches a destination by CIDR (for IP literals), exact host name,
//! or host suffix (`.corp.example`), and names an [`OffRamp`]. The longest
//! match wins: the longest prefix for addresses; an exact name before any
//! suffix, and a longer suffix before a shorter one. No match is a
//! [`RouteError::NoRoute`], never a silent direct dial.
//!
//! Sans-IO: routing is a pure function of the table and the target.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::core::addr::HostPort;

/// Where a flow leaves the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum OffRamp {
    /// The host's own network stack.
    Direct,
    /// A module of the same tenant that offers a dialer (a WireGuard
    /// instance, a mesh transport), by instance name.
    Module(String),
}

impl fmt::Display for OffRamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffRamp::Direct => f.write_str("direct"),
            OffRamp::Module(m) => write!(f, "module {m}"),
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

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// What it matches.
    pub matches: Match,
    /// Where matching flows go.
    pub off_ramp: OffRamp,
}

/// Why a destination could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No route matches.
    #[error("no route to {0} in this tenant")]
    NoRoute(String),
}

/// A tenant's route table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// A table with the given routes.
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    /// Everything leaves directly: the default for a tenant with no routes configured.
    pub fn direct() -> Self {
        Self::new(vec![
            Route {
                matches: Match::Cidr("0.0.0.0/0".parse().expect("literal")),
                off_ramp: OffRamp::Direct,
            },
            Route {
                matches: Match::Cidr("::/0".parse().expect("literal")),
                off_ramp: OffRamp::Direct,
            },
            Route {
                matches: Match::Suffix(String::new()),
                off_ramp: OffRamp::Direct,
            },
        ])
    }

    /// The routes, in configuration order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The off-ramp for `target`, by longest match.
    pub fn route(&self, target: &HostPort) -> Result<&OffRamp, RouteError> {
        let best = match target.ip() {
            Some(ip) => self.best_for_ip(ip),
            None => self.best_for_name(&target.host.to_ascii_lowercase()),
        };
        best.ok_or_else(|| RouteError::NoRoute(target.to_string()))
    }

    fn best_for_ip(&self, ip: IpAddr) -> Option<&OffRamp> {
        self.routes
            .iter()
            .filter_map(|r| match &r.matches {
                Match::Cidr(net) if net.contains(&ip) => Some((net.prefix_len(), &r.off_ramp)),
                _ => None,
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, o)| o)
    }

    fn best_for_name(&self, host: &str) -> Option<&OffRamp> {
        // Score: exact names beat every suffix; longer suffixes beat shorter.
        self.routes
            .iter()
            .filter_map(|r| match &r.matches {
                Match::Host(h) if h.eq_ignore_ascii_case(host) => Some((usize::MAX, &r.off_ramp)),
                Match::Suffix(s) if suffix_matches(host, s) => Some((s.len(), &r.off_ramp)),
                _ => None,
            })
            .max_by_key(|(score, _)| *score)
            .map(|(_, o)| o)
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

    fn r(m: Match, o: OffRamp) -> Route {
        Route {
            matches: m,
            off_ramp: o,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let t = Router::new(vec![
            r(Match::Cidr("10.0.0.0/8".parse().unwrap()), OffRamp::Direct),
            r(
                Match::Cidr("10.1.0.0/16".parse().unwrap()),
                OffRamp::Module("wg0".into()),
            ),
        ]);
        assert_eq!(
            t.route(&hp("10.1.2.3:80")).unwrap(),
            &OffRamp::Module("wg0".into())
        );
        assert_eq!(t.route(&hp("10.2.2.3:80")).unwrap(), &OffRamp::Direct);
        assert_eq!(
            t.route(&hp("192.168.1.1:80")),
            Err(RouteError::NoRoute("192.168.1.1:80".into()))
        );
        assert!(t.route(&hp("[::1]:80")).is_err());
        // A name never matches a CIDR route.
        assert!(t.route(&hp("example.com:80")).is_err());
    }

    #[test]
    fn names_exact_then_longest_suffix() {
        let t = Router::new(vec![
            r(Match::Suffix(String::new()), OffRamp::Direct),
            r(
                Match::Suffix(".corp.example".into()),
                OffRamp::Module("ssh".into()),
            ),
            r(
                Match::Suffix("db.corp.example".into()),
                OffRamp::Module("wg0".into()),
            ),
            r(Match::Host("special.corp.example".into()), OffRamp::Direct),
        ]);
        assert_eq!(
            t.route(&hp("a.corp.example:1")).unwrap(),
            &OffRamp::Module("ssh".into())
        );
        assert_eq!(
            t.route(&hp("corp.example:1")).unwrap(),
            &OffRamp::Module("ssh".into())
        );
        assert_eq!(
            t.route(&hp("x.db.corp.example:1")).unwrap(),
            &OffRamp::Module("wg0".into())
        );
        assert_eq!(
            t.route(&hp("SPECIAL.corp.example:1")).unwrap(),
            &OffRamp::Direct
        );
        assert_eq!(t.route(&hp("notcorp.example:1")).unwrap(), &OffRamp::Direct);
        // Suffix matching is per label.
        assert!(!suffix_matches("xcorp.example", "corp.example"));
    }

    #[test]
    fn default_table_is_direct() {
        let t = Router::direct();
        for target in ["127.0.0.1:80", "[::1]:80", "example.com:443"] {
            assert_eq!(t.route(&hp(target)).unwrap(), &OffRamp::Direct, "{target}");
        }
    }
}
