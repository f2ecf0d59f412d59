//! Prometheus metrics for the whole node.
//!
//! One [`Metrics`] per process, shared by every module. It holds the core's
//! families (connections, bytes, dial errors, refusals, reloads); each
//! subsystem (a module kind, an engine) owns its own families and registers
//! them under its prefix through [`Metrics::subsystem`]. Series carry
//! `tenant` and `instance` labels; label sets are resolved once per instance
//! ([`Metrics::instance`]) so the data path only touches atomics.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::core::spine::reject::RejectReason;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// `tenant` and `instance`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// Tenant name.
    pub tenant: String,
    /// Module instance name.
    pub instance: String,
}

/// Which way bytes moved (variant names are the label values).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// From the connecting client towards the remote.
    upstream,
    /// From the remote back to the client.
    downstream,
}

/// `tenant`, `instance`, `direction`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    /// Tenant name.
    pub tenant: String,
    /// Module instance name.
    pub instance: String,
    /// `upstream` or `downstream`.
    pub direction: Direction,
}

/// `tenant`, `instance`, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Tenant name.
    pub tenant: String,
    /// Module instance name.
    pub instance: String,
    /// A short, fixed reason such as `refused` or `timeout`.
    pub reason: String,
}

/// `tenant`, `instance`, `rule`, `result`: one policy decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// Tenant name.
    pub tenant: String,
    /// The on-ramp's instance name.
    pub instance: String,
    /// The rule that decided (`default` when none did).
    pub rule: String,
    /// `allow`, `deny`, `dry_run_allow`, `dry_run_deny` or `revoked`.
    pub result: String,
}

/// `tenant`, `instance`, `result` (`ok` or `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// Tenant name.
    pub tenant: String,
    /// Module instance name.
    pub instance: String,
    /// `ok` or `failed`.
    pub result: String,
}

/// The node's metric families, and those its subsystems registered.
pub struct Metrics {
    registry: Mutex<Registry>,
    subsystems: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    /// Subsystems that bring their series up to date at each scrape.
    refreshers: Mutex<HashMap<TypeId, Arc<dyn Refresh>>>,
    /// Connections (and UDP sessions) accepted.
    pub connections: Family<InstanceLabels, Counter>,
    /// Connections (and UDP sessions) open now.
    pub connections_active: Family<InstanceLabels, Gauge>,
    /// Payload bytes moved.
    pub bytes: Family<ByteLabels, Counter>,
    /// Failed dials to a remote, by reason.
    pub dial_errors: Family<ReasonLabels, Counter>,
    /// Connections refused before dialing (e.g. `max_connections`), by reason.
    pub rejected: Family<ReasonLabels, Counter>,
    /// Config reloads of an instance, by result.
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// Restarts of an instance after one of its tasks failed (a panic).
    pub restarts: Family<InstanceLabels, Counter>,
    /// Policy decisions, by rule and result.
    pub policy: Family<PolicyLabels, Counter>,
    /// 1 for each instance whose start failed and that is not running.
    pub refused: Family<InstanceLabels, Gauge>,
    /// Reason label sets created so far, so an instance's series can be
    /// deleted with it.
    reasons_seen: Mutex<std::collections::HashSet<ReasonLabels>>,
}

/// Creates a metric (or family), registers it under `name` and returns a
/// handle to it: one line per family in a [`Subsystem::register`].
pub fn registered<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let m = M::default();
    registry.register(name, help, m.clone());
    m
}

/// A subsystem's own metric families (a module kind's, an engine's),
/// registered once per node under the subsystem's prefix
/// (`meshgate_<prefix>_...`) by [`Metrics::subsystem`].
pub trait Subsystem: Send + Sync + 'static {
    /// The name prefix under `meshgate_`, e.g. `wg`.
    const PREFIX: &'static str;
    /// Creates the families and registers them in `registry`.
    fn register(registry: &mut Registry) -> Self;
}

/// A subsystem whose series are read from their owners when scraped (an
/// engine's counters), so nothing runs between scrapes.
pub trait Refresh: Send + Sync + 'static {
    /// Brings the series up to date.
    fn refresh(&self);
}

/// One instance's pre-resolved series: cloning them is cheap and updates are atomic adds.
#[derive(Clone, Debug, Default)]
pub struct InstanceMetrics {
    /// `meshgate_connections_total` for this instance.
    pub connections: Counter,
    /// `meshgate_connections_active` for this instance.
    pub active: Gauge,
    /// `meshgate_bytes_total{direction="upstream"}`.
    pub bytes_up: Counter,
    /// `meshgate_bytes_total{direction="downstream"}`.
    pub bytes_down: Counter,
    /// `meshgate_policy_decisions_total` (the node's family).
    pub policy: Family<PolicyLabels, Counter>,
}

impl InstanceMetrics {
    /// Counts a policy decision on one of this instance's flows.
    pub fn policy_decision(&self, tenant: &str, instance: &str, rule: &str, result: &str) {
        self.policy
            .get_or_create(&PolicyLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                rule: rule.into(),
                result: result.into(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshgate");
        let m = Metrics {
            connections: Family::default(),
            connections_active: Family::default(),
            bytes: Family::default(),
            dial_errors: Family::default(),
            rejected: Family::default(),
            config_reloads: Family::default(),
            restarts: Family::default(),
            policy: Family::default(),
            refused: Family::default(),
            reasons_seen: Mutex::new(std::collections::HashSet::new()),
            registry: Mutex::new(Registry::default()),
            subsystems: Mutex::new(HashMap::new()),
            refreshers: Mutex::new(HashMap::new()),
        };
        registry.register(
            "build",
            "meshgate build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "connections",
            "Connections and UDP sessions accepted",
            m.connections.clone(),
        );
        registry.register(
            "connections_active",
            "Connections and UDP sessions open now",
            m.connections_active.clone(),
        );
        registry.register("bytes", "Payload bytes moved", m.bytes.clone());
        registry.register(
            "dial_errors",
            "Failed dials to a remote, by reason",
            m.dial_errors.clone(),
        );
        registry.register(
            "rejected",
            "Connections refused before dialing, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads of a module instance, by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "module_restarts",
            "Restarts of a module instance after one of its tasks failed",
            m.restarts.clone(),
        );
        registry.register(
            "instances_refused",
            "1 for each module instance whose start failed (a port in use, no file descriptor left); the rest of the node runs",
            m.refused.clone(),
        );
        registry.register(
            "policy_decisions",
            "Policy decisions on flows, by rule and result (dry-run rules count what they would have done)",
            m.policy.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            ..m
        }
    }

    /// The series of one instance.
    pub fn instance(&self, tenant: &str, instance: &str) -> InstanceMetrics {
        let l = InstanceLabels {
            tenant: tenant.into(),
            instance: instance.into(),
        };
        let bytes = |direction| ByteLabels {
            tenant: tenant.into(),
            instance: instance.into(),
            direction,
        };
        InstanceMetrics {
            connections: self.connections.get_or_create_owned(&l),
            active: self.connections_active.get_or_create_owned(&l),
            policy: self.policy.clone(),
            bytes_up: self.bytes.get_or_create_owned(&bytes(Direction::upstream)),
            bytes_down: self
                .bytes
                .get_or_create_owned(&bytes(Direction::downstream)),
        }
    }

    /// The families of subsystem `T`, registered on first use.
    pub fn subsystem<T: Subsystem>(&self) -> Arc<T> {
        let mut subs = self.subsystems.lock().expect("metrics poisoned");
        let entry = subs.entry(TypeId::of::<T>()).or_insert_with(|| {
            let mut registry = self.registry.lock().expect("metrics poisoned");
            let sub = registry.sub_registry_with_prefix(T::PREFIX);
            Arc::new(T::register(sub)) as Arc<dyn Any + Send + Sync>
        });
        entry.clone().downcast::<T>().expect("one type per TypeId")
    }

    /// The families of subsystem `T`, refreshed at every scrape
    /// ([`Refresh`]).
    pub fn refreshed_subsystem<T: Subsystem + Refresh>(&self) -> Arc<T> {
        let sub = self.subsystem::<T>();
        self.refreshers
            .lock()
            .expect("metrics poisoned")
            .entry(TypeId::of::<T>())
            .or_insert_with(|| sub.clone() as Arc<dyn Refresh>);
        sub
    }

    fn reason(tenant: &str, instance: &str, reason: &str) -> ReasonLabels {
        ReasonLabels {
            tenant: tenant.into(),
            instance: instance.into(),
            reason: reason.into(),
        }
    }

    /// Counts a failed dial.
    pub fn dial_error(&self, tenant: &str, instance: &str, reason: &str) {
        let l = self.seen(tenant, instance, reason);
        self.dial_errors.get_or_create(&l).inc();
    }

    /// Counts a connection refused before dialing.
    pub fn reject(&self, tenant: &str, instance: &str, reason: RejectReason) {
        let l = self.seen(tenant, instance, reason.as_str());
        self.rejected.get_or_create(&l).inc();
    }

    /// Payload bytes moved through one instance so far, both directions.
    pub fn bytes_moved(&self, tenant: &str, instance: &str) -> u64 {
        [Direction::upstream, Direction::downstream]
            .into_iter()
            .map(|direction| {
                let l = ByteLabels {
                    tenant: tenant.into(),
                    instance: instance.into(),
                    direction,
                };
                self.bytes.get(&l).map(|c| c.get()).unwrap_or(0)
            })
            .sum()
    }

    /// Every refusal and failed dial counted so far, by tenant, instance
    /// and reason (both families share their reasons), sorted.
    pub fn refusals(&self) -> Vec<(ReasonLabels, u64)> {
        let seen: Vec<ReasonLabels> = self
            .reasons_seen
            .lock()
            .expect("metrics poisoned")
            .iter()
            .cloned()
            .collect();
        let mut out: Vec<(ReasonLabels, u64)> = seen
            .into_iter()
            .filter_map(|l| {
                let n = self.rejected.get(&l).map(|c| c.get()).unwrap_or(0)
                    + self.dial_errors.get(&l).map(|c| c.get()).unwrap_or(0);
                (n > 0).then_some((l, n))
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.0.tenant, &a.0.instance, &a.0.reason).cmp(&(
                &b.0.tenant,
                &b.0.instance,
                &b.0.reason,
            ))
        });
        out
    }

    fn seen(&self, tenant: &str, instance: &str, reason: &str) -> ReasonLabels {
        let l = Self::reason(tenant, instance, reason);
        self.reasons_seen
            .lock()
            .expect("metrics poisoned")
            .insert(l.clone());
        l
    }

    /// Deletes every core series of an instance that is gone (its
    /// subsystems delete their own), so removed tenants and instances do not
    /// linger in `/metrics`.
    pub fn forget_instance(&self, tenant: &str, instance: &str) {
        let l = InstanceLabels {
            tenant: tenant.into(),
            instance: instance.into(),
        };
        self.connections.remove(&l);
        self.connections_active.remove(&l);
        self.restarts.remove(&l);
        for direction in [Direction::upstream, Direction::downstream] {
            self.bytes.remove(&ByteLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                direction,
            });
        }
        for result in ["ok", "failed"] {
            self.config_reloads.remove(&ReloadLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                result: result.into(),
            });
        }
        let mut seen = self.reasons_seen.lock().expect("metrics poisoned");
        seen.retain(|r| {
            let mine = r.tenant == tenant && r.instance == instance;
            if mine {
                self.dial_errors.remove(r);
                self.rejected.remove(r);
            }
            !mine
        });
    }

    /// Marks an instance refused at start (1) or clears it.
    pub fn set_refused(&self, tenant: &str, instance: &str, refused: bool) {
        let l = InstanceLabels {
            tenant: tenant.into(),
            instance: instance.into(),
        };
        if refused {
            self.refused.get_or_create(&l).set(1);
        } else {
            self.refused.remove(&l);
        }
    }

    /// Counts a restart after a failure.
    pub fn restart(&self, tenant: &str, instance: &str) {
        self.restarts
            .get_or_create(&InstanceLabels {
                tenant: tenant.into(),
                instance: instance.into(),
            })
            .inc();
    }

    /// Counts a reload attempt.
    pub fn reload(&self, tenant: &str, instance: &str, ok: bool) {
        self.config_reloads
            .get_or_create(&ReloadLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
    }

    /// Renders the OpenMetrics text format (`application/openmetrics-text`).
    pub fn encode(&self) -> String {
        let refreshers: Vec<Arc<dyn Refresh>> = self
            .refreshers
            .lock()
            .expect("metrics poisoned")
            .values()
            .cloned()
            .collect();
        for r in refreshers {
            r.refresh();
        }
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics poisoned");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Renders the classic Prometheus text format (`text/plain; version=0.0.4`),
    /// which `promtool check metrics` and older scrapers read: counter
    /// families are named with their `_total` suffix, info metrics become
    /// gauges, and there is no `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        let om = self.encode();
        let mut renamed: HashMap<&str, (String, &str)> = HashMap::new();
        for line in om.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = rest.split_once(' ') {
                    match kind {
                        "counter" => renamed.insert(name, (format!("{name}_total"), "counter")),
                        "info" => renamed.insert(name, (format!("{name}_info"), "gauge")),
                        _ => None,
                    };
                }
            }
        }
        let mut out = String::with_capacity(om.len());
        for line in om.lines() {
            if line == "# EOF" {
                continue;
            }
            let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                let (new_name, new_kind) = renamed.get(name)?;
                Some(if *prefix == "# TYPE " {
                    format!("{prefix}{new_name} {new_kind}")
                } else {
                    format!("{prefix}{new_name} {tail}")
                })
            });
            out.push_str(rewritten.as_deref().unwrap_or(line));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let m = Metrics::new();
        m.instance("t", "i").connections.inc();
        let text = m.encode_prometheus();
        assert!(
            text.contains("# TYPE meshgate_connections_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP meshgate_connections_total Connections"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE meshgate_build_info gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE meshgate_connections_active gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }

    struct Demo {
        hits: Counter,
    }

    impl Subsystem for Demo {
        const PREFIX: &'static str = "demo";
        fn register(registry: &mut Registry) -> Self {
            let hits = Counter::default();
            registry.register("hits", "Demo hits", hits.clone());
            Demo { hits }
        }
    }

    #[test]
    fn subsystems_register_once_under_their_prefix() {
        let m = Metrics::new();
        m.subsystem::<Demo>().hits.inc();
        m.subsystem::<Demo>().hits.inc();
        let text = m.encode();
        assert!(text.contains("meshgate_demo_hits_total 2"), "{text}");
        assert_eq!(
            text.matches("# TYPE meshgate_demo_hits counter").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn a_forgotten_instance_leaves_no_series() {
        let m = Metrics::new();
        m.instance("t", "gone").connections.inc();
        m.instance("t", "kept").connections.inc();
        m.dial_error("t", "gone", "refused");
        m.reject("t", "gone", RejectReason::Denied);
        m.reload("t", "gone", true);
        m.forget_instance("t", "gone");
        let text = m.encode();
        assert!(!text.contains("instance=\"gone\""), "{text}");
        assert!(text.contains("instance=\"kept\""), "{text}");
    }

    #[test]
    fn renders_labelled_series() {
        let m = Metrics::new();
        let i = m.instance("t1", "web");
        i.connections.inc();
        i.active.inc();
        i.bytes_up.inc_by(10);
        m.dial_error("t1", "web", "refused");
        m.reload("t1", "web", false);
        let text = m.encode();
        assert!(
            text.contains(r#"meshgate_connections_total{tenant="t1",instance="web"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meshgate_connections_active{tenant="t1",instance="web"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"meshgate_bytes_total{tenant="t1",instance="web",direction="upstream"} 10"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"meshgate_dial_errors_total{tenant="t1",instance="web",reason="refused"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"meshgate_config_reloads_total{tenant="t1",instance="web",result="failed"} 1"#
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
