//! Flows: one connection or UDP session, tracked from start to end.
//!
//! An on-ramp opens a flow with [`FlowTable::open`] when it accepts a
//! connection (normally through [`crate::core::spine::onramp`], which does the
//! rest of the path) and holds the returned [`FlowGuard`] for as long as the
//! flow lives. Start and end are events that [`FlowObserver`]s see: at start
//! each may deny the flow with a reason ([`Verdict`], the policy hook); at
//! end they get a typed [`EndReason`] (the audit log, metrics). Dropping the
//! guard ends the flow, so no path can leak one.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::core::metrics::InstanceMetrics;
use crate::core::net::dial::DialFailure;
use crate::core::net::proxy::{JoinEnd, Traffic};

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A TCP stream.
    Tcp,
    /// A UDP session (datagrams between one client address and one remote).
    Udp,
    /// ICMP echo (forwarded IP flows).
    Icmp,
    /// Another IP protocol, by number (forwarded IP flows).
    Other(u8),
}

/// Who a flow belongs to and where it came in.
#[derive(Debug, Clone, Serialize)]
pub struct FlowContext {
    /// Tenant name.
    pub tenant: String,
    /// The module instance it came in through (the on-ramp).
    pub instance: String,
    /// The identity of the peer as the on-ramp knows it (WireGuard key,
    /// SSH fingerprint, SOCKS user); `None` for plain TCP.
    pub identity: Option<String>,
    /// Source address of the client.
    pub src: SocketAddr,
    /// Destination as requested (`host:port`).
    pub dst: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The on-ramp's kind (`socks`, `pipe`, `wireguard`), as policies match it.
    pub kind: String,
    /// The address the flow is dialed to, once the path resolved it (a
    /// name a gateway link resolves on its far side has none).
    pub dialed: Option<SocketAddr>,
    /// The trace context the client sent, if any (HTTP/2 CONNECT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Arc<Trace>>,
}

pub use crate::core::net::trace::Trace;

impl FlowContext {
    /// The flow as a policy sees it: the requested name (if a name) and
    /// port from `dst`, the address from `dialed` (or `dst`'s literal).
    pub fn facts(&self) -> crate::core::spine::policy::Facts<'_> {
        use crate::core::spine::dest::{normalize_host, Host};
        let (host, port) = match self.dst.rsplit_once(':') {
            Some((h, p)) => (h.trim_matches(['[', ']']), p.parse().unwrap_or(0)),
            None => ("", 0),
        };
        let literal = match normalize_host(host) {
            Host::Ip(ip) => Some(ip),
            Host::Name(_) => None,
        };
        crate::core::spine::policy::Facts {
            door: &self.instance,
            kind: &self.kind,
            identity: self.identity.as_deref(),
            src: self.src.ip(),
            host: (literal.is_none() && !host.is_empty()).then_some(host),
            ip: self.dialed.map(|d| d.ip()).or(literal),
            port: self.dialed.map(|d| d.port()).unwrap_or(port),
            protocol: self.protocol,
        }
    }
}

/// A live flow.
#[derive(Debug)]
pub struct Flow {
    /// Unique within this process.
    pub id: u64,
    /// Who and where.
    pub ctx: FlowContext,
    /// Wall-clock start, for display.
    pub started: SystemTime,
    started_mono: Instant,
    up: AtomicU64,
    down: AtomicU64,
    metrics: InstanceMetrics,
    decision: Mutex<Decision>,
    /// Cancelled when a policy change denies the open flow.
    revoked: tokio_util::sync::CancellationToken,
    /// Whether it holds a share of its tenant's flow budget.
    budgeted: bool,
}

/// What the path decided for a flow: the policy verdict and the route.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Decision {
    /// Allowed, or denied with a reason (`verdict`, `reason` when flat).
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The vnet and rule that chose the connector (`frankfurt: 10.1.0.0/16 -> wg0`).
    pub route: Option<String>,
    /// The policy rule that decided (`None`: no rule did).
    pub rule: Option<String>,
}

/// A flow-start hook's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "reason")]
pub enum Verdict {
    /// Let it through.
    #[default]
    Allow,
    /// Refuse it; the reason is logged, audited and shown.
    Deny(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow => f.write_str("allow"),
            Verdict::Deny(r) => write!(f, "deny ({r})"),
        }
    }
}

impl Flow {
    /// The verdict and route so far.
    pub fn decision(&self) -> Decision {
        self.decision.lock().expect("flow poisoned").clone()
    }

    /// Records the route the flow was given.
    pub fn set_route(&self, route: String) {
        self.decision.lock().expect("flow poisoned").route = Some(route);
    }

    /// Resolves when a policy change denied the open flow: the path ends it
    /// as [`EndReason::PolicyRevoked`].
    pub async fn revoked(&self) {
        self.revoked.cancelled().await
    }

    /// Whether a policy change denied the open flow.
    pub fn is_revoked(&self) -> bool {
        self.revoked.is_cancelled()
    }

    /// Bytes moved client → remote so far.
    pub fn bytes_up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }
    /// Bytes moved remote → client so far.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
    /// Time since the flow started.
    pub fn age(&self) -> Duration {
        self.started_mono.elapsed()
    }
}

impl Traffic for Flow {
    fn upstream(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
        self.metrics.bytes_up.inc_by(n);
    }
    fn downstream(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
        self.metrics.bytes_down.inc_by(n);
    }
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "&'static str")]
pub enum EndReason {
    /// Both sides finished cleanly.
    Closed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The client's side failed.
    DownstreamError,
    /// The remote's side failed.
    UpstreamError,
    /// A flow-start hook denied it.
    Denied,
    /// No route matched, or the vnet does not exist.
    NoRoute,
    /// The route is `reject`.
    Rejected,
    /// Dialing the remote failed.
    DialFailed(crate::core::net::dial::DialFailure),
    /// The destination is one no flow (or no door's user) may reach.
    Forbidden(crate::core::spine::dest::Forbidden),
    /// A policy change denied the open flow.
    PolicyRevoked,
    /// The module stopped (config removed, shutdown).
    Stopped,
    /// The on-ramp dropped the flow without saying why.
    Dropped,
}

impl EndReason {
    /// Stable snake_case label for logs and metrics (`dial_refused`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::DownstreamError => "downstream_error",
            EndReason::UpstreamError => "upstream_error",
            EndReason::Denied => "denied",
            EndReason::NoRoute => "no_route",
            EndReason::Rejected => "rejected",
            EndReason::DialFailed(f) => match f {
                DialFailure::Resolve => "dial_resolve",
                DialFailure::Refused => "dial_refused",
                DialFailure::Timeout => "dial_timeout",
                DialFailure::Unreachable => "dial_unreachable",
                DialFailure::NoRoute => "dial_no_route",
                DialFailure::Io => "dial_io",
            },
            EndReason::Forbidden(_) => "forbidden",
            EndReason::PolicyRevoked => "policy_revoked",
            EndReason::Stopped => "stopped",
            EndReason::Dropped => "dropped",
        }
    }

    /// The label with what refused it, for a person (an HTTP refusal's
    /// body): `forbidden (loopback: the host's loopback ...)`.
    pub fn detail(self) -> String {
        match self {
            EndReason::Forbidden(w) => format!("forbidden ({w}: {})", w.describe()),
            r => r.as_str().to_string(),
        }
    }
}

impl From<EndReason> for &'static str {
    fn from(r: EndReason) -> Self {
        r.as_str()
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<JoinEnd> for EndReason {
    fn from(e: JoinEnd) -> Self {
        match e {
            JoinEnd::Closed => EndReason::Closed,
            JoinEnd::IdleTimeout => EndReason::IdleTimeout,
            JoinEnd::DownstreamError => EndReason::DownstreamError,
            JoinEnd::UpstreamError => EndReason::UpstreamError,
        }
    }
}

/// How a flow ended.
#[derive(Debug, Clone, Serialize)]
pub struct FlowEnd {
    /// Why.
    pub reason: EndReason,
    /// Duration of the flow.
    pub duration: Duration,
    /// Bytes client → remote.
    pub bytes_up: u64,
    /// Bytes remote → client.
    pub bytes_down: u64,
}

/// Sees flows start and end. Implementations must be quick: they run inline.
pub trait FlowObserver: Send + Sync {
    /// A flow was accepted. Return [`Verdict::Deny`] to refuse it (the
    /// policy hook); the first denial wins and later hooks still see the flow.
    fn on_start(&self, _flow: &Flow) -> Verdict {
        Verdict::Allow
    }
    /// A flow ended.
    fn on_end(&self, _flow: &Flow, _end: &FlowEnd) {}
}

/// A flow as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FlowInfo {
    /// Flow id.
    pub id: u64,
    /// Context.
    #[serde(flatten)]
    pub ctx: FlowContext,
    /// Start, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Age in seconds.
    pub age_secs: f64,
    /// Bytes client → remote.
    pub bytes_up: u64,
    /// Bytes remote → client.
    pub bytes_down: u64,
    /// Policy verdict and route.
    #[serde(flatten)]
    pub decision: Decision,
}

/// All live flows of the node.
pub struct FlowTable {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Flow>>>,
    observers: Vec<Arc<dyn FlowObserver>>,
    /// Each tenant's policy, decided for every flow it opens.
    policies: std::sync::RwLock<HashMap<String, Arc<crate::core::spine::policy::Policies>>>,
    /// Live flows per tenant, and the most a tenant may hold (0: no limit).
    per_tenant: Mutex<HashMap<String, usize>>,
    tenant_max_flows: AtomicU64,
}

impl FlowTable {
    /// A table that notifies `observers` of every start and end.
    pub fn new(observers: Vec<Arc<dyn FlowObserver>>) -> Self {
        Self {
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            observers,
            policies: Default::default(),
            per_tenant: Mutex::new(HashMap::new()),
            tenant_max_flows: AtomicU64::new(0),
        }
    }

    /// The most flows one tenant may hold at once (`tenant_max_flows` in
    /// `meshgate.yaml`; 0: no limit): past it a tenant's new flows are
    /// denied, so one tenant cannot take what the others need.
    pub fn set_tenant_max_flows(&self, max: u64) {
        self.tenant_max_flows.store(max, Ordering::Relaxed);
    }

    /// The most flows `tenant` may hold: its policy's `limits:
    /// max_flows`, else the node's `tenant_max_flows` (0: no limit).
    fn budget_of(&self, tenant: &str) -> u64 {
        let own = {
            let p = self.policies.read().expect("flow table poisoned");
            p.get(tenant).and_then(|p| p.max_flows())
        };
        own.unwrap_or_else(|| self.tenant_max_flows.load(Ordering::Relaxed))
    }

    /// Takes one of `tenant`'s flow budget; when it is spent, says what
    /// the budget is.
    fn take_budget(&self, tenant: &str) -> Result<(), u64> {
        let max = self.budget_of(tenant);
        let mut per = self.per_tenant.lock().expect("flow table poisoned");
        let n = per.entry(tenant.to_string()).or_default();
        if max > 0 && *n as u64 >= max {
            return Err(max);
        }
        *n += 1;
        Ok(())
    }

    fn release_budget(&self, tenant: &str) {
        let mut per = self.per_tenant.lock().expect("flow table poisoned");
        if let Some(n) = per.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(tenant);
            }
        }
    }

    /// Decides the flows of `tenant` by `policies` from now on.
    pub fn set_policies(&self, tenant: &str, policies: Arc<crate::core::spine::policy::Policies>) {
        self.policies
            .write()
            .expect("flow table poisoned")
            .insert(tenant.to_string(), policies);
    }

    /// `tenant` is gone: its policy with it.
    pub fn remove_policies(&self, tenant: &str) {
        self.policies
            .write()
            .expect("flow table poisoned")
            .remove(tenant);
    }

    fn policy_of(&self, tenant: &str) -> Option<Arc<crate::core::spine::policy::PolicySet>> {
        let p = self.policies.read().expect("flow table poisoned");
        let set = p.get(tenant)?.current();
        (!set.is_empty()).then_some(set)
    }

    /// What the policy of the flow's tenant decides for it (`None`: the
    /// tenant has no policy), nothing counted or opened: `meshgatectl
    /// policy test`.
    pub fn explain(&self, ctx: &FlowContext) -> Option<crate::core::spine::policy::PolicyDecision> {
        self.policy_of(&ctx.tenant)
            .map(|set| set.decide(&ctx.facts()))
    }

    /// Whether the policy of the flow's tenant would deny it (nothing is
    /// counted or opened).
    pub fn would_deny(&self, ctx: &FlowContext) -> bool {
        self.explain(ctx).is_some_and(|d| d.deny)
    }

    /// Decides every open flow of `tenant` again under its policy now in
    /// force: a flow it denies is revoked (its path ends it as
    /// [`EndReason::PolicyRevoked`] at once). Returns how many.
    pub fn revalidate(&self, tenant: &str) -> usize {
        let Some(set) = self.policy_of(tenant) else {
            return 0;
        };
        let live: Vec<Arc<Flow>> = self
            .live
            .lock()
            .expect("flow table poisoned")
            .values()
            .filter(|f| f.ctx.tenant == tenant)
            .cloned()
            .collect();
        let mut revoked = 0;
        for f in live {
            let d = set.decide(&f.ctx.facts());
            if !d.deny || f.revoked.is_cancelled() {
                continue;
            }
            {
                let mut dec = f.decision.lock().expect("flow poisoned");
                if dec.verdict != Verdict::Allow {
                    continue;
                }
                dec.verdict = Verdict::Deny(format!("{} (revoked)", d.reason()));
                dec.rule = d.rule.clone();
            }
            f.metrics.policy_decision(
                tenant,
                &f.ctx.instance,
                d.rule.as_deref().unwrap_or("default"),
                "revoked",
            );
            f.revoked.cancel();
            revoked += 1;
        }
        revoked
    }

    /// Starts tracking a flow; it ends when the guard is dropped or ended.
    pub fn open(self: &Arc<Self>, ctx: FlowContext, metrics: &InstanceMetrics) -> FlowGuard {
        self.open_routed(ctx, None, metrics)
    }

    /// As [`FlowTable::open`], for a flow whose route is already decided:
    /// the flow-start hooks see it (a policy may judge by destination).
    pub fn open_routed(
        self: &Arc<Self>,
        ctx: FlowContext,
        route: Option<String>,
        metrics: &InstanceMetrics,
    ) -> FlowGuard {
        let mut decision = Decision {
            verdict: Verdict::Allow,
            route,
            rule: None,
        };
        if let Some(set) = self.policy_of(&ctx.tenant) {
            let d = set.decide(&ctx.facts());
            let rule = d.rule.as_deref().unwrap_or("default");
            metrics.policy_decision(
                &ctx.tenant,
                &ctx.instance,
                rule,
                if d.deny { "deny" } else { "allow" },
            );
            if let Some((shadow, action)) = &d.dry_run {
                let result = match action {
                    crate::core::spine::policy::Action::Deny => "dry_run_deny",
                    crate::core::spine::policy::Action::Allow => "dry_run_allow",
                };
                metrics.policy_decision(&ctx.tenant, &ctx.instance, shadow, result);
                if let Some(suppressed) = crate::core::logs::allow("policy.dry_run") {
                    tracing::info!(tenant = %ctx.tenant, instance = %ctx.instance, identity = ?ctx.identity, src = %ctx.src, dst = ?ctx.dst, rule = ?shadow, would = result, suppressed, "dry-run policy rule would change this flow's verdict");
                }
            }
            if d.deny {
                decision.verdict = Verdict::Deny(d.reason());
            }
            decision.rule = d.rule;
        }
        // Then the tenant's budget: a flow past it is denied whatever the
        // policy said (and holds no share of it while it ends).
        let budget = self.take_budget(&ctx.tenant);
        let budgeted = budget.is_ok();
        if let Err(max) = budget {
            decision.verdict = Verdict::Deny(format!("the tenant's flow budget ({max}) is spent"));
            decision.rule = None;
            metrics.policy_decision(&ctx.tenant, &ctx.instance, "tenant_max_flows", "deny");
        }
        let flow = Arc::new(Flow {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            ctx,
            started: SystemTime::now(),
            started_mono: Instant::now(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            metrics: metrics.clone(),
            decision: Mutex::new(decision),
            revoked: tokio_util::sync::CancellationToken::new(),
            budgeted,
        });
        metrics.connections.inc();
        metrics.active.inc();
        self.live
            .lock()
            .expect("flow table poisoned")
            .insert(flow.id, flow.clone());
        for o in &self.observers {
            if let Verdict::Deny(reason) = o.on_start(&flow) {
                let mut d = flow.decision.lock().expect("flow poisoned");
                if d.verdict == Verdict::Allow {
                    d.verdict = Verdict::Deny(reason);
                }
            }
        }
        FlowGuard {
            flow,
            table: self.clone(),
            reason: None,
        }
    }

    /// Number of live flows, optionally only those of one tenant (and instance).
    pub fn count(&self, tenant: Option<&str>, instance: Option<&str>) -> usize {
        let live = self.live.lock().expect("flow table poisoned");
        live.values()
            .filter(|f| tenant.is_none_or(|t| f.ctx.tenant == t))
            .filter(|f| instance.is_none_or(|i| f.ctx.instance == i))
            .count()
    }

    /// A snapshot of live flows, oldest first.
    pub fn snapshot(&self) -> Vec<FlowInfo> {
        let live = self.live.lock().expect("flow table poisoned");
        let mut out: Vec<FlowInfo> = live
            .values()
            .map(|f| FlowInfo {
                id: f.id,
                ctx: f.ctx.clone(),
                started_unix: f
                    .started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                age_secs: f.age().as_secs_f64(),
                bytes_up: f.bytes_up(),
                bytes_down: f.bytes_down(),
                decision: f.decision(),
            })
            .collect();
        out.sort_by_key(|f| f.id);
        out
    }

    fn close(&self, flow: &Flow, reason: EndReason) {
        self.live
            .lock()
            .expect("flow table poisoned")
            .remove(&flow.id);
        if flow.budgeted {
            self.release_budget(&flow.ctx.tenant);
        }
        flow.metrics.active.dec();
        let end = FlowEnd {
            reason,
            duration: flow.age(),
            bytes_up: flow.bytes_up(),
            bytes_down: flow.bytes_down(),
        };
        for o in &self.observers {
            o.on_end(flow, &end);
        }
    }
}

/// Ownership of a live flow. Dropping it ends the flow (reason `dropped`
/// unless [`FlowGuard::set_end_reason`] said otherwise).
pub struct FlowGuard {
    flow: Arc<Flow>,
    table: Arc<FlowTable>,
    reason: Option<EndReason>,
}

impl FlowGuard {
    /// The flow, e.g. as the proxy's [`Traffic`] sink.
    pub fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }

    /// Records why the flow is ending; reported when the guard drops.
    pub fn set_end_reason(&mut self, reason: EndReason) {
        self.reason = Some(reason);
    }

    /// The policy verdict the flow-start hooks gave.
    pub fn verdict(&self) -> Verdict {
        self.flow.decision().verdict
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or(EndReason::Dropped);
        self.table.close(&self.flow, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::metrics::Metrics;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);
    impl FlowObserver for Recorder {
        fn on_start(&self, f: &Flow) -> Verdict {
            self.0.lock().unwrap().push(format!("start {}", f.ctx.dst));
            if f.ctx.identity.as_deref() == Some("mallory") {
                return Verdict::Deny("mallory is banned".into());
            }
            Verdict::Allow
        }
        fn on_end(&self, f: &Flow, e: &FlowEnd) {
            self.0.lock().unwrap().push(format!(
                "end {} {} {}/{}",
                f.ctx.dst, e.reason, e.bytes_up, e.bytes_down
            ));
        }
    }

    fn ctx(tenant: &str, dst: &str) -> FlowContext {
        FlowContext {
            tenant: tenant.into(),
            instance: "web".into(),
            identity: None,
            src: "127.0.0.1:5000".parse().unwrap(),
            dst: dst.into(),
            protocol: Protocol::Tcp,
            kind: "pipe".into(),
            dialed: None,
            trace: None,
        }
    }

    #[test]
    fn lifecycle_and_counts() {
        let rec = Arc::new(Recorder::default());
        let table = Arc::new(FlowTable::new(vec![rec.clone()]));
        let m = Metrics::new();
        let im = m.instance("a", "web");
        let mut g1 = table.open(ctx("a", "x:1"), &im);
        let g2 = table.open(ctx("b", "y:2"), &im);
        g1.flow().upstream(5);
        g1.flow().downstream(7);
        assert_eq!(table.count(None, None), 2);
        assert_eq!(table.count(Some("a"), None), 1);
        assert_eq!(table.count(Some("a"), Some("nope")), 0);
        assert_eq!(im.active.get(), 2);
        assert_eq!(im.bytes_up.get(), 5);
        let snap = table.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].bytes_down, 7);
        g1.set_end_reason(EndReason::Closed);
        drop(g1);
        drop(g2);
        assert_eq!(table.count(None, None), 0);
        assert_eq!(im.active.get(), 0);
        assert_eq!(im.connections.get(), 2);
        let log = rec.0.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![
                "start x:1",
                "start y:2",
                "end x:1 closed 5/7",
                "end y:2 dropped 0/0"
            ]
        );
    }

    #[test]
    fn hooks_deny_by_identity_and_the_first_denial_wins() {
        struct DenyAll;
        impl FlowObserver for DenyAll {
            fn on_start(&self, _f: &Flow) -> Verdict {
                Verdict::Deny("second hook".into())
            }
        }
        let rec = Arc::new(Recorder::default());
        let table = Arc::new(FlowTable::new(vec![rec.clone(), Arc::new(DenyAll)]));
        let m = Metrics::new();
        let im = m.instance("a", "web");
        let mut c = ctx("a", "x:1");
        c.identity = Some("mallory".into());
        let g = table.open(c, &im);
        assert_eq!(g.verdict(), Verdict::Deny("mallory is banned".into()));
        g.flow().set_route("default: * -> direct".into());
        let snap = serde_json::to_value(table.snapshot()).unwrap();
        assert_eq!(snap[0]["verdict"], "deny");
        assert_eq!(snap[0]["reason"], "mallory is banned");
        assert_eq!(snap[0]["route"], "default: * -> direct");
        let g2 = table.open(ctx("a", "y:1"), &im);
        assert_eq!(g2.verdict(), Verdict::Deny("second hook".into()));
    }

    #[test]
    fn end_reasons_have_stable_labels() {
        assert_eq!(
            EndReason::DialFailed(DialFailure::Refused).as_str(),
            "dial_refused"
        );
        assert_eq!(
            EndReason::from(JoinEnd::IdleTimeout).as_str(),
            "idle_timeout"
        );
        assert_eq!(
            serde_json::to_value(EndReason::Rejected).unwrap(),
            "rejected"
        );
    }
}
