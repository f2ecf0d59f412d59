//! Policy: a tenant's rules on who may reach what, decided for every flow
//! on the one path and again for open flows when the rules change.
//!
//! A tenant's `kind: policy` documents each give rules; the tenant holds
//! them all in one [`Policies`] ([`crate::core::spine::tenant::Tenant`]).
//! A rule matches the on-ramp (module name or kind), the identity, the
//! source CIDR, the destination (CIDR, host name, `*.suffix`), ports and
//! protocol, and says `allow` or `deny`. Evaluation is ztunnel's: a matching
//! deny wins, then a matching allow; with no allow rule (and no `default:
//! deny`) whatever is not denied is allowed. A `dry_run` rule is evaluated
//! as if enforced and only counted and logged when it would have changed the
//! decision.
//!
//! Rules are indexed by destination (prefix length → network, exact name,
//! name suffix), so a decision looks at the few rules that can match, not
//! every rule: the cost stays flat as rules grow. Sans-IO.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use serde::Serialize;

use crate::core::spine::flow::Protocol;

/// `allow` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Let matching flows through.
    Allow,
    /// Refuse matching flows.
    Deny,
}

/// What a rule's destination matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestMatch {
    /// Addresses in this network (the address dialed).
    Cidr(IpNet),
    /// Exactly this (requested) host name, lower-case.
    Host(String),
    /// Requested names ending in `.suffix` (and the suffix itself).
    Suffix(String),
}

impl fmt::Display for DestMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestMatch::Cidr(n) => n.fmt(f),
            DestMatch::Host(h) => f.write_str(h),
            DestMatch::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

/// The protocols a rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoMatch {
    /// TCP streams (and forwarded TCP).
    Tcp,
    /// UDP sessions (and forwarded UDP).
    Udp,
    /// ICMP (forwarded).
    Icmp,
    /// Any IP protocol.
    Ip,
}

impl ProtoMatch {
    fn matches(self, p: Protocol) -> bool {
        match self {
            ProtoMatch::Ip => true,
            ProtoMatch::Tcp => p == Protocol::Tcp,
            ProtoMatch::Udp => p == Protocol::Udp,
            ProtoMatch::Icmp => p == Protocol::Icmp,
        }
    }
}

/// One rule. Empty lists match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name (audit records and counters say it).
    pub name: String,
    /// What it does.
    pub action: Action,
    /// Evaluated and reported, not enforced.
    pub dry_run: bool,
    /// On-ramps, by module name or kind.
    pub doors: Vec<String>,
    /// Identities (SOCKS/HTTP user, SSH key or principal, WireGuard peer);
    /// `*` is any identified client.
    pub identities: Vec<String>,
    /// Source networks.
    pub sources: Vec<IpNet>,
    /// Destinations.
    pub destinations: Vec<DestMatch>,
    /// Destination port ranges, inclusive.
    pub ports: Vec<(u16, u16)>,
    /// Protocols.
    pub protocols: Vec<ProtoMatch>,
}

/// What a decision is made on: the flow as the path knows it once routed.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The on-ramp's instance name.
    pub door: &'a str,
    /// The on-ramp's kind.
    pub kind: &'a str,
    /// The client's identity, if authenticated.
    pub identity: Option<&'a str>,
    /// The client's address.
    pub src: IpAddr,
    /// The host name asked for, if a name.
    pub host: Option<&'a str>,
    /// The address dialed, where known here (a name a link resolves on
    /// the far side has none).
    pub ip: Option<IpAddr>,
    /// The destination port.
    pub port: u16,
    /// The transport.
    pub protocol: Protocol,
}

impl Rule {
    /// Whether everything but the destination matches (the index found it
    /// by destination).
    fn matches_rest(&self, f: &Facts<'_>) -> bool {
        (self.doors.is_empty() || self.doors.iter().any(|d| d == f.door || d == f.kind))
            && (self.identities.is_empty()
                || f.identity
                    .is_some_and(|id| self.identities.iter().any(|i| i == "*" || i == id)))
            && (self.sources.is_empty()
                || self
                    .sources
                    .iter()
                    .any(|n| n.contains(&crate::core::spine::dest::canonical(f.src))))
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&f.port)))
            && (self.protocols.is_empty() || self.protocols.iter().any(|p| p.matches(f.protocol)))
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PolicyDecision {
    /// Denied (by a rule, or by the default).
    pub deny: bool,
    /// The rule that decided (`None`: no rule, the default did).
    pub rule: Option<String>,
    /// A dry-run rule that would have changed the decision, and how.
    pub dry_run: Option<(String, Action)>,
}

impl PolicyDecision {
    /// Why, for logs and refusals: `rule \`x\`` or `default deny`.
    pub fn reason(&self) -> String {
        match &self.rule {
            Some(r) => format!("policy rule `{r}`"),
            None => "policy default deny".into(),
        }
    }
}

/// Rules indexed by destination.
#[derive(Debug, Default)]
struct Index {
    any_dest: Vec<u32>,
    v4: BTreeMap<u8, HashMap<u32, Vec<u32>>>,
    v6: BTreeMap<u8, HashMap<u128, Vec<u32>>>,
    hosts: HashMap<String, Vec<u32>>,
    suffixes: HashMap<String, Vec<u32>>,
}

fn mask4(ip: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        ip & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(ip: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        ip & (u128::MAX << (128 - u32::from(len)))
    }
}

impl Index {
    fn build(rules: &[Rule]) -> Self {
        let mut ix = Index::default();
        for (i, r) in rules.iter().enumerate() {
            let i = i as u32;
            if r.destinations.is_empty() {
                ix.any_dest.push(i);
            }
            for d in &r.destinations {
                match d {
                    DestMatch::Cidr(IpNet::V4(n)) => ix
                        .v4
                        .entry(n.prefix_len())
                        .or_default()
                        .entry(mask4(u32::from(n.addr()), n.prefix_len()))
                        .or_default()
                        .push(i),
                    DestMatch::Cidr(IpNet::V6(n)) => ix
                        .v6
                        .entry(n.prefix_len())
                        .or_default()
                        .entry(mask6(u128::from(n.addr()), n.prefix_len()))
                        .or_default()
                        .push(i),
                    DestMatch::Host(h) => ix.hosts.entry(h.clone()).or_default().push(i),
                    DestMatch::Suffix(s) => ix.suffixes.entry(s.clone()).or_default().push(i),
                }
            }
        }
        ix
    }

    /// The rules whose destination matches, in rule order, each once.
    fn candidates(&self, f: &Facts<'_>) -> Vec<u32> {
        let mut out = self.any_dest.clone();
        match f.ip.map(crate::core::spine::dest::canonical) {
            Some(IpAddr::V4(a)) => {
                let a = u32::from(a);
                for (len, nets) in &self.v4 {
                    if let Some(v) = nets.get(&mask4(a, *len)) {
                        out.extend(v);
                    }
                }
            }
            Some(IpAddr::V6(a)) => {
                let a = u128::from(a);
                for (len, nets) in &self.v6 {
                    if let Some(v) = nets.get(&mask6(a, *len)) {
                        out.extend(v);
                    }
                }
            }
            None => {}
        }
        if let Some(host) = f.host {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            if let Some(v) = self.hosts.get(&host) {
                out.extend(v);
            }
            let mut rest = host.as_str();
            loop {
                if let Some(v) = self.suffixes.get(rest) {
                    out.extend(v);
                }
                match rest.split_once('.') {
                    Some((_, r)) => rest = r,
                    None => break,
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// A tenant's rules, compiled.
#[derive(Debug, Default)]
pub struct PolicySet {
    rules: Vec<Rule>,
    index: Index,
    /// Deny what no allow rule matches (enforced rules).
    default_deny: bool,
    /// The same with dry-run rules counted in.
    shadow_default_deny: bool,
    has_dry_run: bool,
}

impl PolicySet {
    /// Compiles `rules`; `default_deny`: some document says `default: deny`.
    pub fn new(rules: Vec<Rule>, default_deny: bool) -> Self {
        let enforced_allow = rules
            .iter()
            .any(|r| !r.dry_run && r.action == Action::Allow);
        let any_allow = rules.iter().any(|r| r.action == Action::Allow);
        Self {
            index: Index::build(&rules),
            default_deny: default_deny || enforced_allow,
            shadow_default_deny: default_deny || any_allow,
            has_dry_run: rules.iter().any(|r| r.dry_run),
            rules,
        }
    }

    /// Whether there is nothing to decide (every flow allowed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && !self.default_deny
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The decision for a flow, with the dry-run rules' opinion.
    pub fn decide(&self, f: &Facts<'_>) -> PolicyDecision {
        if self.is_empty() {
            return PolicyDecision::default();
        }
        let matched: Vec<&Rule> = self
            .index
            .candidates(f)
            .into_iter()
            .map(|i| &self.rules[i as usize])
            .filter(|r| r.matches_rest(f))
            .collect();
        let pick = |with_dry_run: bool, default_deny: bool| -> (bool, Option<&Rule>) {
            let live = || matched.iter().filter(|r| with_dry_run || !r.dry_run);
            if let Some(r) = live().find(|r| r.action == Action::Deny) {
                return (true, Some(r));
            }
            if let Some(r) = live().find(|r| r.action == Action::Allow) {
                return (false, Some(r));
            }
            (default_deny, None)
        };
        let (deny, rule) = pick(false, self.default_deny);
        let mut d = PolicyDecision {
            deny,
            rule: rule.map(|r| r.name.clone()),
            dry_run: None,
        };
        if self.has_dry_run {
            let (shadow_deny, shadow_rule) = pick(true, self.shadow_default_deny);
            if shadow_deny != deny {
                let name = shadow_rule
                    .filter(|r| r.dry_run)
                    .map(|r| r.name.clone())
                    .unwrap_or_else(|| "default".into());
                d.dry_run = Some((
                    name,
                    if shadow_deny {
                        Action::Deny
                    } else {
                        Action::Allow
                    },
                ));
            }
        }
        d
    }
}

/// One `kind: policy` document's contribution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDoc {
    /// `default: deny`.
    pub default_deny: bool,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
    /// `limits: max_flows`: the most flows the tenant may hold at once
    /// (overrides the node's `tenant_max_flows`).
    pub max_flows: Option<u64>,
}

/// A tenant's policy documents and the set compiled from all of them.
#[derive(Debug, Default)]
pub struct Policies {
    docs: RwLock<BTreeMap<String, PolicyDoc>>,
    compiled: RwLock<Arc<PolicySet>>,
    /// The smallest `limits: max_flows` of the documents (0: none set).
    max_flows: std::sync::atomic::AtomicU64,
}

impl Policies {
    fn recompile(&self, docs: &BTreeMap<String, PolicyDoc>) {
        let rules: Vec<Rule> = docs.values().flat_map(|d| d.rules.clone()).collect();
        let default_deny = docs.values().any(|d| d.default_deny);
        *self.compiled.write().expect("policy poisoned") =
            Arc::new(PolicySet::new(rules, default_deny));
        let max = docs.values().filter_map(|d| d.max_flows).min().unwrap_or(0);
        self.max_flows
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// The tenant's own flow budget, if a document sets one (the smallest
    /// when several do).
    pub fn max_flows(&self) -> Option<u64> {
        match self.max_flows.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Sets document `instance`'s rules.
    pub fn set(&self, instance: &str, doc: PolicyDoc) {
        let mut docs = self.docs.write().expect("policy poisoned");
        docs.insert(instance.to_string(), doc);
        self.recompile(&docs);
    }

    /// Removes document `instance`'s rules.
    pub fn remove(&self, instance: &str) {
        let mut docs = self.docs.write().expect("policy poisoned");
        docs.remove(instance);
        self.recompile(&docs);
    }

    /// The compiled set now in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.compiled.read().expect("policy poisoned").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, action: Action, dest: &[&str]) -> Rule {
        Rule {
            name: name.into(),
            action,
            dry_run: false,
            doors: vec![],
            identities: vec![],
            sources: vec![],
            destinations: dest
                .iter()
                .map(|d| {
                    if let Some(s) = d.strip_prefix("*.") {
                        DestMatch::Suffix(s.into())
                    } else if let Ok(n) = d.parse() {
                        DestMatch::Cidr(n)
                    } else {
                        DestMatch::Host((*d).into())
                    }
                })
                .collect(),
            ports: vec![],
            protocols: vec![],
        }
    }

    fn facts<'a>(ip: &str, host: Option<&'a str>, port: u16) -> Facts<'a> {
        Facts {
            door: "socks1",
            kind: "socks",
            identity: Some("alice"),
            src: "10.0.0.5".parse().unwrap(),
            host,
            ip: ip.parse().ok(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn deny_wins_then_allow_then_default() {
        let set = PolicySet::new(
            vec![
                rule("corp", Action::Allow, &["10.1.0.0/16"]),
                rule("db-off", Action::Deny, &["10.1.2.0/24"]),
                rule("names", Action::Allow, &["*.corp.example"]),
            ],
            false,
        );
        let d = set.decide(&facts("10.1.2.3", None, 80));
        assert!(d.deny);
        assert_eq!(d.rule.as_deref(), Some("db-off"));
        let d = set.decide(&facts("10.1.3.3", None, 80));
        assert!(!d.deny);
        assert_eq!(d.rule.as_deref(), Some("corp"));
        // Allow rules exist: the rest is denied by default.
        let d = set.decide(&facts("192.0.2.1", None, 80));
        assert!(d.deny);
        assert_eq!(d.rule, None);
        let d = set.decide(&facts("192.0.2.1", Some("git.corp.example"), 80));
        assert_eq!(d.rule.as_deref(), Some("names"));
        assert!(!d.deny);
        // No allow rules: not denied is allowed.
        let set = PolicySet::new(vec![rule("meta", Action::Deny, &["169.254.0.0/16"])], false);
        assert!(!set.decide(&facts("192.0.2.1", None, 80)).deny);
        assert!(set.decide(&facts("169.254.169.254", None, 80)).deny);
        // default: deny with no rules.
        let set = PolicySet::new(vec![], true);
        assert!(set.decide(&facts("192.0.2.1", None, 80)).deny);
    }

    #[test]
    fn the_rest_of_a_rule_must_match() {
        let mut r = rule("alice-pg", Action::Deny, &["10.1.0.0/16"]);
        r.identities = vec!["alice".into()];
        r.ports = vec![(5432, 5432), (8000, 8100)];
        r.protocols = vec![ProtoMatch::Tcp];
        r.doors = vec!["socks".into()];
        r.sources = vec!["10.0.0.0/8".parse().unwrap()];
        let set = PolicySet::new(vec![r], false);
        assert!(set.decide(&facts("10.1.0.9", None, 5432)).deny);
        assert!(set.decide(&facts("10.1.0.9", None, 8050)).deny);
        assert!(!set.decide(&facts("10.1.0.9", None, 22)).deny);
        let mut f = facts("10.1.0.9", None, 5432);
        f.identity = Some("bob");
        assert!(!set.decide(&f).deny);
        f.identity = None;
        assert!(!set.decide(&f).deny);
        let mut f = facts("10.1.0.9", None, 5432);
        f.protocol = Protocol::Udp;
        assert!(!set.decide(&f).deny);
        let mut f = facts("10.1.0.9", None, 5432);
        f.kind = "http_proxy";
        f.door = "web";
        assert!(!set.decide(&f).deny);
        let mut f = facts("10.1.0.9", None, 5432);
        f.src = "192.0.2.7".parse().unwrap();
        assert!(!set.decide(&f).deny);
    }

    #[test]
    fn dry_run_reports_and_does_not_enforce() {
        let mut r = rule("trial", Action::Deny, &["10.9.0.0/16"]);
        r.dry_run = true;
        let set = PolicySet::new(vec![r], false);
        let d = set.decide(&facts("10.9.0.1", None, 80));
        assert!(!d.deny);
        assert_eq!(d.dry_run, Some(("trial".into(), Action::Deny)));
        let d = set.decide(&facts("10.8.0.1", None, 80));
        assert_eq!(d.dry_run, None);
    }

    #[test]
    fn ten_thousand_rules_look_at_few() {
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                rule(&format!("r{i}"), Action::Deny, &[&format!("{ip}/32")])
            })
            .collect();
        let set = PolicySet::new(rules, false);
        let f = facts("10.0.39.15", None, 80);
        assert_eq!(set.index.candidates(&f).len(), 1);
        assert_eq!(set.decide(&f).rule.as_deref(), Some("r9999"));
        assert!(!set.decide(&facts("10.1.0.0", None, 80)).deny);
    }
}
