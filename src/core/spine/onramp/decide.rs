//! Deciding where a flow goes: the route (a vnet's table, or a connector
//! the on-ramp pins), the name resolved where the route says (the vnet's
//! `hosts:` or `dns:`, the host's resolver for `direct`, the far side of a
//! gateway link), and every address checked against the safe defaults. The
//! result is a typed [`Plan`] or a typed [`Refusal`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::core::addr::HostPort;
use crate::core::net::dial::DialFailure;
use crate::core::net::dns;
use crate::core::net::resolve;
use crate::core::spine::dest::{self, ChosenBy, Forbidden, Host};
use crate::core::spine::flow::{EndReason, FlowContext};
use crate::core::spine::router::{Connector, RouteError};
use crate::core::spine::vnet::RouteDecision;

use super::OnRamp;

/// How the flow's way out is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteVia {
    /// The route table of this vnet (`None`: the tenant's default vnet).
    Vnet(Option<String>),
    /// A connector the on-ramp's config pins (a pipe's `via: wg0`).
    Pinned(Connector),
}

/// Where a flow is dialed, as the path decided it.
pub(super) struct Plan {
    /// In order: the connector and the target handed to it (an address;
    /// a name only for a connector that resolves on its far side).
    pub(super) candidates: Vec<(Connector, HostPort)>,
    /// The route as flows show it.
    pub(super) shown: String,
}

impl Plan {
    /// The first address the flow will be dialed to, if an address.
    pub(super) fn dialed(&self) -> Option<SocketAddr> {
        let (_, t) = self.candidates.first()?;
        t.ip().map(|ip| SocketAddr::new(ip, t.port))
    }
}

impl OnRamp {
    /// Decides where a flow to `target` is dialed: the normalised address,
    /// or the name resolved where its route says, every address routed and
    /// checked ([`dest::never`] always; for a door's client on a `direct`
    /// route, [`dest::protected`] unless the route names the prefix, the
    /// admin API and other tenants' listeners). Refused addresses are left
    /// out; none left is a refusal with the first reason.
    pub(super) async fn plan(
        &self,
        via: &RouteVia,
        target: &HostPort,
        chosen_by: ChosenBy,
        timeout: Duration,
    ) -> Result<Plan, Refusal> {
        let port = target.port;
        let host = dest::normalize_host(&target.host);
        let vnet = match via {
            RouteVia::Pinned(c) => {
                // The operator pinned the connector: only what no flow may
                // reach is refused here.
                let t = match &host {
                    Host::Ip(ip) => not_never(*ip, port)?,
                    Host::Name(_) => target.clone(),
                };
                return Ok(Plan {
                    shown: format!("pinned: {t} -> {c}"),
                    candidates: vec![(c.clone(), t)],
                });
            }
            RouteVia::Vnet(v) => v.as_deref(),
        };
        let vnets = &self.ctx.tenant.vnets;
        let mut chosen_by = chosen_by;
        let (ips, note) = match host {
            Host::Ip(ip) => (vec![ip], String::new()),
            Host::Name(name) => {
                let named = HostPort {
                    host: name.clone(),
                    port,
                };
                if let Some((vn, server)) = vnets.dns_for(vnet, &named) {
                    let ips = self
                        .resolve(&vn, server, &name, timeout)
                        .await
                        .map_err(|e| {
                            Refusal::Resolve(format!(
                                "cannot resolve {name} by the DNS server {server} of vnet `{vn}`: {e}"
                            ))
                        })?;
                    let note = format!(" ({name} = {} by dns {server})", list(&ips));
                    (ips, note)
                } else {
                    let d = vnets.route(vnet, &named).map_err(Refusal::Route)?;
                    match d.target.ip() {
                        Some(ip) => {
                            if d.from_hosts {
                                // The operator wrote this address.
                                chosen_by = ChosenBy::Operator;
                            }
                            (vec![ip], String::new())
                        }
                        None if d.route.connector == Connector::Direct => {
                            let ips = resolve_on_host(&name, timeout).await?;
                            let note = format!(" ({name} = {} by the host)", list(&ips));
                            (ips, note)
                        }
                        None => {
                            return Ok(Plan {
                                shown: d.describe(),
                                candidates: vec![(d.route.connector, d.target)],
                            })
                        }
                    }
                }
            }
        };
        let mut candidates = Vec::new();
        let mut shown = None;
        let mut refused = None;
        for ip in ips {
            match self.check_address(vnet, ip, port, chosen_by) {
                Ok(d) => {
                    shown.get_or_insert_with(|| format!("{}{note}", d.describe()));
                    candidates.push((d.route.connector, d.target));
                }
                Err(r) => {
                    refused.get_or_insert(r);
                }
            }
        }
        match shown {
            Some(shown) => Ok(Plan { candidates, shown }),
            None => {
                Err(refused.unwrap_or_else(|| Refusal::Resolve(format!("{target}: no addresses"))))
            }
        }
    }

    /// Routes one address in `vnet` and checks it.
    fn check_address(
        &self,
        vnet: Option<&str>,
        ip: std::net::IpAddr,
        port: u16,
        chosen_by: ChosenBy,
    ) -> Result<RouteDecision, Refusal> {
        let ip = dest::canonical(ip);
        let target = not_never(ip, port)?;
        let d = self
            .ctx
            .tenant
            .vnets
            .route(vnet, &target)
            .map_err(Refusal::Route)?;
        if d.route.connector == Connector::Direct && chosen_by == ChosenBy::Client {
            use crate::core::net::listen::Owner;
            let what = dest::protected(ip).filter(|_| !d.explicit).or_else(|| {
                match self
                    .ctx
                    .listeners
                    .foreign_owner(self.tenant(), SocketAddr::new(ip, port))
                {
                    Some(Owner::Node) => Some(Forbidden::Admin),
                    Some(Owner::Tenant(_)) => Some(Forbidden::OtherTenant),
                    None => None,
                }
            });
            if let Some(what) = what {
                return Err(Refusal::Forbidden {
                    target: target.to_string(),
                    what,
                    route: Some(d.describe()),
                });
            }
        }
        Ok(d)
    }

    /// Leaves out the candidates the tenant's policy denies, so a name
    /// with several addresses never falls through to a denied one; when
    /// every one is denied the first stays, for the flow to be denied on.
    pub(super) fn admitted_by_policy(&self, mut plan: Plan, flow: &FlowContext) -> Plan {
        if plan.candidates.len() < 2 {
            return plan;
        }
        let denied = |t: &HostPort| {
            let mut f = flow.clone();
            f.dialed = t.ip().map(|ip| SocketAddr::new(ip, t.port));
            self.ctx.flows.would_deny(&f)
        };
        if let Some(first_allowed) = plan.candidates.iter().position(|(_, t)| !denied(t)) {
            let kept: Vec<_> = plan
                .candidates
                .drain(first_allowed..)
                .filter(|(_, t)| !denied(t))
                .collect();
            plan.candidates = kept;
        } else {
            plan.candidates.truncate(1);
        }
        plan
    }

    async fn resolve(
        &self,
        vnet: &str,
        server: SocketAddr,
        host: &str,
        timeout: Duration,
    ) -> Result<Vec<std::net::IpAddr>, LookupError> {
        let at = HostPort {
            host: server.ip().to_string(),
            port: server.port(),
        };
        let d = self
            .ctx
            .tenant
            .vnets
            .route(Some(vnet), &at)
            .map_err(LookupError::NoRoute)?;
        let stream = self
            .ctx
            .dial(
                &d.route.connector,
                &d.target,
                timeout,
                &crate::core::net::dial::DialMeta::default(),
            )
            .await
            .map_err(LookupError::Dial)?;
        let addrs = dns::resolve_over(stream, host, timeout)
            .await
            .map_err(LookupError::Dns)?;
        if addrs.is_empty() {
            return Err(LookupError::Dns(dns::DnsError::NoAddress));
        }
        Ok(addrs)
    }
}

/// `ip:port` as a target, unless `ip` is one no flow may reach.
fn not_never(ip: std::net::IpAddr, port: u16) -> Result<HostPort, Refusal> {
    let target = HostPort {
        host: ip.to_string(),
        port,
    };
    match dest::never(ip) {
        Some(what) => Err(Refusal::Forbidden {
            target: target.to_string(),
            what,
            route: None,
        }),
        None => Ok(target),
    }
}

/// `a, b, c` for the route shown.
fn list(ips: &[std::net::IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `name` by the host's resolver (a `direct` route's names).
async fn resolve_on_host(name: &str, timeout: Duration) -> Result<Vec<std::net::IpAddr>, Refusal> {
    resolve::on_host(name, timeout)
        .await
        .map_err(|e| Refusal::Resolve(e.to_string()))
}

/// Why a vnet's DNS server gave no address for a name.
#[derive(Debug, thiserror::Error)]
pub(super) enum LookupError {
    /// The vnet has no route to its DNS server.
    #[error("no way to the DNS server: {0}")]
    NoRoute(RouteError),
    /// The DNS server could not be reached.
    #[error(transparent)]
    Dial(crate::core::net::dial::DialError),
    /// It answered with no address, or not at all.
    #[error(transparent)]
    Dns(dns::DnsError),
}

/// Why a flow has nowhere to go.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The vnet's table said no.
    #[error(transparent)]
    Route(RouteError),
    /// The vnet's DNS server did not give an address.
    #[error("{0}")]
    Resolve(String),
    /// The on-ramp could not name a target.
    #[error("{0}")]
    Unknown(String),
    /// The address is one no flow, or no door's client, may reach.
    #[error("{target} is refused: {}{}", what.describe(), route.as_ref().map(|r| format!(" (route `{r}`)")).unwrap_or_default())]
    Forbidden {
        /// The address.
        target: String,
        /// What it is.
        what: Forbidden,
        /// The route it matched, if routed.
        route: Option<String>,
    },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Route(e) => e.reason(),
            Refusal::Resolve(_) => "resolve",
            Refusal::Unknown(_) => "no_route",
            Refusal::Forbidden { what, .. } => what.as_str(),
        }
    }

    pub fn end_reason(&self) -> EndReason {
        match self {
            Refusal::Route(RouteError::Rejected { .. }) => EndReason::Rejected,
            Refusal::Resolve(_) => EndReason::DialFailed(DialFailure::Resolve),
            Refusal::Forbidden { what, .. } => EndReason::Forbidden(*what),
            _ => EndReason::NoRoute,
        }
    }
}
