//! Virtual networks (vnets): a tenant's address spaces and their routes.
//!
//! A tenant has one or more vnets, one of them the default (an implicit one
//! named `default` when none is configured). A [`Vnet`] holds its **routes**
//! (`CIDR | host | *.suffix → connector`) and a static `hosts` map; modules
//! that carry a network (WireGuard instances) *attach* to a vnet, and their
//! peers' allowed IPs become routes of that vnet. [`Vnets::route`] answers
//! where a flow to a target goes: every on-ramp asks it, through
//! [`crate::core::spine::onramp`]. Two vnets (of one tenant or of two) may use the
//! same addresses: each has its own table, so their traffic never meets.
//!
//! Lookup order, longest match first; at equal length configured routes win
//! over learnt ones, which win over the implicit vnet's built-in `direct`
//! defaults. No match is [`RouteError::NoRoute`], never a silent direct dial.
//!
//! Listening (on the host or in a module's IP stack) is in
//! [`crate::core::net::listen`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use serde::Serialize;

use crate::core::addr::HostPort;
use crate::core::engine::EngineKind;
use crate::core::spine::router::{Connector, Match, Route, RouteError, Router};
use crate::core::spine::vnetstack::VnetStack;

/// The name of the implicit vnet of a tenant that configures none.
pub const IMPLICIT_VNET: &str = "default";

/// One configured vnet.
#[derive(Debug, Clone, Serialize)]
pub struct Vnet {
    /// Its name (the instance name of its `kind: vnet` document).
    pub name: String,
    /// Whether on-ramps that name no vnet use this one.
    pub default: bool,
    /// Its data plane (`None`: the node's default engine).
    pub engine: Option<EngineKind>,
    /// Configured routes.
    pub routes: Router,
    /// Static names: `name → address`, looked up before routing.
    pub hosts: BTreeMap<String, IpAddr>,
    /// A DNS server inside the vnet: names not in `hosts` are resolved
    /// there (over TCP, through the route to it), never on the host.
    pub dns: Option<std::net::SocketAddr>,
}

/// Where a flow goes, as [`Vnets::route`] decided it.
#[derive(Debug, Clone, Serialize)]
pub struct RouteDecision {
    /// The vnet that was asked.
    pub vnet: String,
    /// The target to dial: the requested one, or its `hosts` address.
    pub target: HostPort,
    /// The route that matched.
    pub route: Route,
    /// Whether the route is one the vnet's document names explicitly and
    /// more specifically than `*`, `0.0.0.0/0` or `::/0`: only such a route
    /// takes a door's user to the host's loopback or link-local addresses.
    pub explicit: bool,
    /// Whether the target was a name the vnet's `hosts:` maps (the
    /// operator wrote that address) or one meshgate published for a
    /// listener of this tenant (`ssh -R web:...`): trusted as a pipe's
    /// `remote` is.
    pub from_hosts: bool,
}

impl RouteDecision {
    /// `vnet: rule` for logs and the flow table.
    pub fn describe(&self) -> String {
        format!("{}: {}", self.vnet, self.route)
    }
}

/// What a module attached to a vnet contributes: routes to itself.
#[derive(Debug, Clone)]
struct Attachment {
    /// The vnet (`None`: the tenant's default).
    vnet: Option<String>,
    routes: Router,
}

#[derive(Debug, Default)]
struct VnetsState {
    configured: BTreeMap<String, Arc<Vnet>>,
    /// When each vnet that says `default: true` claimed it: the latest
    /// claim wins, so moving the default is one change to the new vnet.
    claims: BTreeMap<String, u64>,
    next_claim: u64,
    attached: BTreeMap<String, Attachment>,
    /// The engine of vnets that name none (the node's `engine:`).
    default_engine: EngineKind,
    /// The IP stacks of vnets that have `address:`.
    stacks: BTreeMap<String, Arc<VnetStack>>,
    /// Names published while a service is up (an `ssh -R` forward):
    /// `name → address`, in every vnet of the tenant, after `hosts`.
    published: BTreeMap<String, IpAddr>,
}

/// A tenant's vnets and what is attached to them. Changes apply to flows
/// that start afterwards; open flows keep the route they were given.
#[derive(Debug, Default)]
pub struct Vnets {
    state: RwLock<VnetsState>,
}

/// The implicit vnet's built-in routes: loopback and then everything
/// direct (loopback stays on the host even when a peer claims `0.0.0.0/0`;
/// these routes are not explicit, so a door's user does not reach it).
fn implicit_defaults() -> &'static Router {
    static DEFAULTS: std::sync::OnceLock<Router> = std::sync::OnceLock::new();
    DEFAULTS.get_or_init(|| {
        let mut routes = vec![
            Route {
                matches: Match::Cidr("127.0.0.0/8".parse().expect("literal")),
                connector: Connector::Direct,
            },
            Route {
                matches: Match::Cidr("::1/128".parse().expect("literal")),
                connector: Connector::Direct,
            },
        ];
        routes.extend(Router::direct().routes().iter().cloned());
        Router::new(routes)
    })
}

impl Vnets {
    /// Adds or replaces a configured vnet. A vnet that newly says
    /// `default: true` becomes the default, even if another still says so
    /// (the latest claim wins; the other is warned about).
    pub fn set(&self, vnet: Vnet) {
        let mut st = self.state.write().expect("vnets poisoned");
        if vnet.default {
            if !st.claims.contains_key(&vnet.name) {
                st.next_claim += 1;
                let n = st.next_claim;
                st.claims.insert(vnet.name.clone(), n);
            }
        } else {
            st.claims.remove(&vnet.name);
        }
        let name = vnet.name.clone();
        st.configured.insert(name.clone(), Arc::new(vnet));
        if st.claims.len() > 1 {
            let current = Self::default_of(&st).unwrap_or_default();
            let others: Vec<&String> = st.claims.keys().filter(|n| **n != current).collect();
            tracing::warn!(default = %current, also_claiming = ?others, "several vnets say `default: true`; the latest to claim it is the default");
        }
    }

    /// The engine that carries `vnet` (`None`: the default vnet): its own
    /// `engine:`, else the node's default.
    pub fn engine_for(&self, vnet: Option<&str>) -> EngineKind {
        let st = self.state.read().expect("vnets poisoned");
        let name = match vnet {
            Some(v) => Some(v.to_string()),
            None => Self::default_of(&st).ok(),
        };
        name.and_then(|n| st.configured.get(&n).and_then(|v| v.engine))
            .unwrap_or(st.default_engine)
    }

    /// The engine of vnets that name none (the node's `engine:`).
    pub fn default_engine(&self) -> EngineKind {
        self.state.read().expect("vnets poisoned").default_engine
    }

    /// Sets the engine of vnets that name none.
    pub fn set_default_engine(&self, engine: EngineKind) {
        self.state.write().expect("vnets poisoned").default_engine = engine;
    }

    /// Sets (or with `None` removes) the IP stack of vnet `name`.
    pub fn set_stack(&self, name: &str, stack: Option<Arc<VnetStack>>) {
        let mut st = self.state.write().expect("vnets poisoned");
        match stack {
            Some(s) => st.stacks.insert(name.to_string(), s),
            None => st.stacks.remove(name),
        };
    }

    /// The IP stack of `vnet` (`None`: the default vnet), if it has one.
    pub fn stack_for(&self, vnet: Option<&str>) -> Option<Arc<VnetStack>> {
        let st = self.state.read().expect("vnets poisoned");
        let name = match vnet {
            Some(v) => v.to_string(),
            None => Self::default_of(&st).ok()?,
        };
        st.stacks.get(&name).cloned()
    }

    /// Publishes `name` (lower-cased) as `ip` in every vnet of the tenant.
    /// Fails if another service holds the name, or a vnet's `hosts` has it.
    pub fn publish(&self, name: &str, ip: IpAddr) -> Result<(), String> {
        let name = name.to_ascii_lowercase();
        let mut st = self.state.write().expect("vnets poisoned");
        if st.published.contains_key(&name) {
            return Err(format!("`{name}` is already published"));
        }
        if let Some(v) = st.configured.values().find(|v| v.hosts.contains_key(&name)) {
            return Err(format!("`{name}` is in vnet `{}`'s hosts", v.name));
        }
        st.published.insert(name, ip);
        Ok(())
    }

    /// Withdraws a published name.
    pub fn unpublish(&self, name: &str) {
        self.state
            .write()
            .expect("vnets poisoned")
            .published
            .remove(&name.to_ascii_lowercase());
    }

    /// Removes a configured vnet.
    pub fn remove(&self, name: &str) {
        let mut st = self.state.write().expect("vnets poisoned");
        st.configured.remove(name);
        st.claims.remove(name);
    }

    /// Attaches module `instance` to `vnet` (`None`: the default), routing
    /// `nets` to it. Replaces what the instance attached before.
    pub fn attach(&self, instance: &str, vnet: Option<&str>, nets: &[IpNet]) {
        let routes = Router::new(
            nets.iter()
                .map(|n| Route {
                    matches: Match::Cidr(n.trunc()),
                    connector: Connector::Module(instance.to_string()),
                })
                .collect(),
        );
        self.state.write().expect("vnets poisoned").attached.insert(
            instance.to_string(),
            Attachment {
                vnet: vnet.map(str::to_string),
                routes,
            },
        );
    }

    /// Removes what `instance` attached.
    pub fn detach(&self, instance: &str) {
        self.state
            .write()
            .expect("vnets poisoned")
            .attached
            .remove(instance);
    }

    /// The default vnet's name.
    pub fn default_name(&self) -> Result<String, RouteError> {
        let st = self.state.read().expect("vnets poisoned");
        Self::default_of(&st)
    }

    fn default_of(st: &VnetsState) -> Result<String, RouteError> {
        if st.configured.is_empty() {
            return Ok(IMPLICIT_VNET.to_string());
        }
        if let Some((name, _)) = st.claims.iter().max_by_key(|(_, n)| **n) {
            return Ok(name.clone());
        }
        if st.configured.len() == 1 {
            return Ok(st.configured.keys().next().expect("one").clone());
        }
        Err(RouteError::NoVnet(format!(
            "(none is the default: mark one of {} with `default: true`)",
            st.configured.keys().cloned().collect::<Vec<_>>().join(", ")
        )))
    }

    /// The DNS server that resolves `target` in `vnet` (`None`: the
    /// default), with the vnet's name: only for a host name that the vnet's
    /// `hosts` does not know, in a vnet that has `dns:`.
    pub fn dns_for(
        &self,
        vnet: Option<&str>,
        target: &HostPort,
    ) -> Option<(String, std::net::SocketAddr)> {
        if target.ip().is_some() {
            return None;
        }
        let st = self.state.read().expect("vnets poisoned");
        let name = match vnet {
            Some(v) => v.to_string(),
            None => Self::default_of(&st).ok()?,
        };
        let v = st.configured.get(&name)?;
        let host = target.host.to_ascii_lowercase();
        if v.hosts.contains_key(&host) || st.published.contains_key(&host) {
            return None;
        }
        v.dns.map(|d| (name, d))
    }

    /// Where a flow to `target` in `vnet` (`None`: the default) goes.
    pub fn route(
        &self,
        vnet: Option<&str>,
        target: &HostPort,
    ) -> Result<RouteDecision, RouteError> {
        let st = self.state.read().expect("vnets poisoned");
        let default = Self::default_of(&st);
        let name = match vnet {
            Some(v) => v.to_string(),
            None => default.clone()?,
        };
        let configured = st.configured.get(&name);
        if configured.is_none() && !(st.configured.is_empty() && name == IMPLICIT_VNET) {
            return Err(RouteError::NoVnet(name));
        }
        let is_default = default.as_deref() == Ok(name.as_str());
        // A static name maps to its address first, then a published one.
        let mut target = target.clone();
        let host = target.host.to_ascii_lowercase();
        let mapped = configured
            .and_then(|v| v.hosts.get(&host))
            .or_else(|| st.published.get(&host));
        if let Some(ip) = mapped {
            target.host = ip.to_string();
        }
        let from_hosts = mapped.is_some();
        let mut layers: Vec<&Router> = Vec::new();
        if let Some(v) = configured {
            layers.push(&v.routes);
        }
        layers.extend(
            st.attached
                .values()
                .filter(|a| match &a.vnet {
                    Some(v) => *v == name,
                    None => is_default,
                })
                .map(|a| &a.routes),
        );
        if configured.is_none() {
            layers.push(implicit_defaults());
        }
        let found = Router::route_layered(&layers, &target).ok_or_else(|| RouteError::NoRoute {
            target: target.to_string(),
            vnet: name.clone(),
        })?;
        let explicit = configured
            .is_some_and(|v| v.routes.routes().iter().any(|r| std::ptr::eq(r, found)))
            && match &found.matches {
                Match::Cidr(n) => n.prefix_len() > 0,
                Match::Host(_) => true,
                Match::Suffix(s) => !s.trim_start_matches('.').is_empty(),
            };
        let route = found.clone();
        if route.connector == Connector::Reject {
            return Err(RouteError::Rejected {
                target: target.to_string(),
                vnet: name,
                route: route.to_string(),
            });
        }
        Ok(RouteDecision {
            vnet: name,
            target,
            route,
            explicit,
            from_hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HostPort {
        s.parse().unwrap()
    }

    fn vnet(name: &str, default: bool, routes: &[(&str, Connector)]) -> Vnet {
        Vnet {
            name: name.into(),
            default,
            engine: None,
            routes: Router::new(
                routes
                    .iter()
                    .map(|(m, c)| Route {
                        matches: Match::Cidr(m.parse().unwrap()),
                        connector: c.clone(),
                    })
                    .collect(),
            ),
            hosts: BTreeMap::new(),
            dns: None,
        }
    }

    fn via(d: Result<RouteDecision, RouteError>) -> String {
        match d {
            Ok(d) => format!("{} {} {}", d.vnet, d.target, d.route.connector),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn implicit_vnet_is_direct_and_learns_peer_routes() {
        let v = Vnets::default();
        assert_eq!(
            via(v.route(None, &hp("10.1.0.10:80"))),
            "default 10.1.0.10:80 direct"
        );
        v.attach(
            "wg0",
            None,
            &["10.1.0.0/16".parse().unwrap(), "0.0.0.0/0".parse().unwrap()],
        );
        assert_eq!(
            via(v.route(None, &hp("10.1.0.10:80"))),
            "default 10.1.0.10:80 wg0"
        );
        // A peer's 0.0.0.0/0 wins over the built-in direct default, loopback stays local.
        assert_eq!(
            via(v.route(None, &hp("8.8.8.8:53"))),
            "default 8.8.8.8:53 wg0"
        );
        assert_eq!(
            via(v.route(None, &hp("127.0.0.1:80"))),
            "default 127.0.0.1:80 direct"
        );
        v.detach("wg0");
        assert_eq!(
            via(v.route(None, &hp("10.1.0.10:80"))),
            "default 10.1.0.10:80 direct"
        );
        assert_eq!(
            via(v.route(Some("sydney"), &hp("10.1.0.10:80"))),
            "no vnet `sydney` in this tenant"
        );
    }

    #[test]
    fn two_vnets_route_the_same_range_apart() {
        let v = Vnets::default();
        v.set(vnet("frankfurt", true, &[]));
        v.set(vnet("sydney", false, &[]));
        v.attach(
            "wg-fra",
            Some("frankfurt"),
            &["10.1.0.0/16".parse().unwrap()],
        );
        v.attach("wg-syd", Some("sydney"), &["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(
            via(v.route(None, &hp("10.1.0.10:80"))),
            "frankfurt 10.1.0.10:80 wg-fra"
        );
        assert_eq!(
            via(v.route(Some("sydney"), &hp("10.1.0.10:80"))),
            "sydney 10.1.0.10:80 wg-syd"
        );
        // Configured vnets have no implicit direct route.
        assert_eq!(
            via(v.route(None, &hp("8.8.8.8:53"))),
            "no route to 8.8.8.8:53 in vnet `frankfurt`"
        );
        // Moving the default is one change: the latest claim wins, and a
        // later reload of the old default (still saying so) does not take it back.
        v.set(vnet("sydney", true, &[]));
        assert_eq!(v.default_name().unwrap(), "sydney");
        v.set(vnet("frankfurt", true, &[]));
        assert_eq!(v.default_name().unwrap(), "sydney");
        v.set(vnet("frankfurt", false, &[]));
        assert_eq!(v.default_name().unwrap(), "sydney");
        // Without any claim, two vnets have no default.
        v.set(vnet("sydney", false, &[]));
        let e = via(v.route(None, &hp("10.1.0.10:80")));
        assert!(e.contains("none is the default"), "{e}");
        v.remove("frankfurt");
        assert_eq!(v.default_name().unwrap(), "sydney");
        assert_eq!(
            via(v.route(None, &hp("10.1.0.10:80"))),
            "sydney 10.1.0.10:80 wg-syd"
        );
    }

    #[test]
    fn configured_routes_reject_and_hosts() {
        let v = Vnets::default();
        let mut n = vnet(
            "corp",
            false,
            &[
                ("10.0.0.0/8", Connector::Module("wg0".into())),
                ("10.9.0.0/16", Connector::Reject),
            ],
        );
        n.hosts.insert("nginx".into(), "10.1.0.10".parse().unwrap());
        v.set(n);
        // The only vnet is the default.
        assert_eq!(via(v.route(None, &hp("nginx:80"))), "corp 10.1.0.10:80 wg0");
        assert_eq!(
            via(v.route(None, &hp("10.9.1.1:80"))),
            "10.9.1.1:80 is refused by route `10.9.0.0/16 -> reject` in vnet `corp`"
        );
        assert_eq!(
            via(v.route(None, &hp("other.example:80"))),
            "no route to other.example:80 in vnet `corp`"
        );
        v.set(vnet("second", false, &[]));
        let e = via(v.route(None, &hp("10.1.1.1:80")));
        assert!(e.contains("none is the default"), "{e}");
    }

    #[test]
    fn published_names_resolve_in_every_vnet_until_withdrawn() {
        let v = Vnets::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        v.publish("Web.ssh.acme", ip).unwrap();
        assert_eq!(
            via(v.route(None, &hp("web.ssh.acme:8081"))),
            "default 127.0.0.1:8081 direct"
        );
        assert!(v
            .publish("web.ssh.acme", ip)
            .unwrap_err()
            .contains("already published"));
        v.unpublish("web.ssh.acme");
        assert_eq!(
            via(v.route(None, &hp("web.ssh.acme:8081"))),
            "default web.ssh.acme:8081 direct"
        );
        let mut n = vnet("corp", true, &[("127.0.0.0/8", Connector::Direct)]);
        n.hosts.insert("db".into(), ip);
        v.set(n);
        assert!(v.publish("db", ip).unwrap_err().contains("hosts"));
    }
}
