//! The userspace engine's metrics, under `meshgate_netstack_`: what each
//! stack took in and sent out, what it dropped and why, its open TCP
//! connections and how its TCP recovered from loss. Every userspace stack
//! started with an owner ([`crate::core::engine::StackOwner`]: a WireGuard
//! instance's own, a `kind: vnet`'s) is tracked here and read at each
//! scrape ([`Refresh`]), so nothing runs between scrapes and no stack goes
//! unreported.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::NetStackStats;
use crate::core::engine::IpEngine;
use crate::core::metrics::{registered, InstanceLabels, Refresh, Subsystem};

/// `tenant`, `instance`, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// Tenant name.
    pub tenant: String,
    /// The instance owning the stack.
    pub instance: String,
    /// `queue_full`, `malformed`, `no_listener`, `no_connection`, `backlog`,
    /// `bad_segment`.
    pub reason: String,
}

/// `tenant`, `instance`, `event`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpEventLabels {
    /// Tenant name.
    pub tenant: String,
    /// The instance owning the stack.
    pub instance: String,
    /// `retransmit`, `timeout`, `loss_probe`, `recovery`.
    pub event: String,
}

/// The families of every userspace stack of the node.
pub struct NetStackMetrics {
    packets_in: Family<InstanceLabels, Counter>,
    packets_out: Family<InstanceLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
    tcp_connections: Family<InstanceLabels, Gauge>,
    tcp_buffer_bytes: Family<InstanceLabels, Gauge>,
    tcp_events: Family<TcpEventLabels, Counter>,
    /// The stacks reported at each scrape, by tenant and instance (a map:
    /// starting 100,000 instances must not scan the ones before).
    stacks: Mutex<HashMap<(String, String), Tracked>>,
}

/// A stack and what was last reported of it.
struct Tracked {
    engine: Weak<dyn IpEngine>,
    last: NetStackStats,
}

/// The drop reasons [`NetStackMetrics::observe`] reports.
const DROP_REASONS: [&str; 6] = [
    "queue_full",
    "malformed",
    "no_listener",
    "no_connection",
    "backlog",
    "bad_segment",
];

/// The TCP events [`NetStackMetrics::observe`] reports.
const TCP_EVENTS: [&str; 4] = ["retransmit", "timeout", "loss_probe", "recovery"];

impl Subsystem for NetStackMetrics {
    const PREFIX: &'static str = "netstack";

    fn register(registry: &mut Registry) -> Self {
        NetStackMetrics {
            packets_in: registered(
                registry,
                "packets_in",
                "IP packets the userspace stack accepted",
            ),
            packets_out: registered(
                registry,
                "packets_out",
                "IP packets the userspace stack sent",
            ),
            dropped: registered(
                registry,
                "dropped_packets",
                "IP packets the userspace stack dropped, by reason",
            ),
            tcp_connections: registered(
                registry,
                "tcp_connections",
                "TCP connections open in the userspace stack",
            ),
            tcp_buffer_bytes: registered(
                registry,
                "tcp_buffer_bytes",
                "Buffer memory the userspace stack's TCP connections hold (see tcp_memory)",
            ),
            tcp_events: registered(
                registry,
                "tcp_events",
                "Loss handling by the userspace stack's TCP: segments retransmitted, retransmission timeouts, tail loss probes, fast recoveries entered",
            ),
            stacks: Mutex::new(HashMap::new()),
        }
    }
}

impl Refresh for NetStackMetrics {
    fn refresh(&self) {
        let mut stacks = self.stacks.lock().expect("poisoned");
        stacks.retain(
            |(tenant, instance), t| match t.engine.upgrade().and_then(|e| e.stats()) {
                Some(now) => {
                    self.observe(tenant, instance, &now, &mut t.last);
                    true
                }
                None => false,
            },
        );
    }
}

impl NetStackMetrics {
    /// Reports `engine` (when it keeps counters) under `tenant`/`instance`
    /// from now on, replacing the stack it replaces: counters go on rising
    /// from where the old one left them.
    pub fn track(&self, tenant: &str, instance: &str, engine: &Arc<dyn IpEngine>) {
        if engine.stats().is_none() {
            return;
        }
        self.stacks.lock().expect("poisoned").insert(
            (tenant.into(), instance.into()),
            Tracked {
                engine: Arc::downgrade(engine),
                last: NetStackStats::default(),
            },
        );
    }

    /// Deletes the series of a stack that is gone.
    pub fn forget(&self, tenant: &str, instance: &str) {
        self.stacks
            .lock()
            .expect("poisoned")
            .remove(&(tenant.to_string(), instance.to_string()));
        let l = InstanceLabels {
            tenant: tenant.into(),
            instance: instance.into(),
        };
        self.packets_in.remove(&l);
        self.packets_out.remove(&l);
        self.tcp_connections.remove(&l);
        self.tcp_buffer_bytes.remove(&l);
        for reason in DROP_REASONS {
            self.dropped.remove(&DropLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                reason: reason.into(),
            });
        }
        for event in TCP_EVENTS {
            self.tcp_events.remove(&TcpEventLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                event: event.into(),
            });
        }
    }

    /// Adds what changed since `last` (the previous report of the same
    /// stack) and remembers `now` as the new `last`.
    pub fn observe(
        &self,
        tenant: &str,
        instance: &str,
        now: &NetStackStats,
        last: &mut NetStackStats,
    ) {
        let l = InstanceLabels {
            tenant: tenant.into(),
            instance: instance.into(),
        };
        let delta = |a: u64, b: u64| a.saturating_sub(b);
        self.packets_in
            .get_or_create(&l)
            .inc_by(delta(now.packets_in, last.packets_in));
        self.packets_out
            .get_or_create(&l)
            .inc_by(delta(now.packets_out, last.packets_out));
        for (reason, n, p) in [
            (
                "queue_full",
                now.dropped_queue_full,
                last.dropped_queue_full,
            ),
            ("malformed", now.dropped_malformed, last.dropped_malformed),
            (
                "no_listener",
                now.dropped_no_listener,
                last.dropped_no_listener,
            ),
            (
                "no_connection",
                now.dropped_no_connection,
                last.dropped_no_connection,
            ),
            ("backlog", now.dropped_backlog, last.dropped_backlog),
            (
                "bad_segment",
                now.dropped_bad_segment,
                last.dropped_bad_segment,
            ),
        ] {
            let d = delta(n, p);
            if d > 0 {
                self.dropped
                    .get_or_create(&DropLabels {
                        tenant: tenant.into(),
                        instance: instance.into(),
                        reason: reason.into(),
                    })
                    .inc_by(d);
            }
        }
        for (event, n, p) in [
            ("retransmit", now.tcp_retransmits, last.tcp_retransmits),
            ("timeout", now.tcp_timeouts, last.tcp_timeouts),
            ("loss_probe", now.tcp_loss_probes, last.tcp_loss_probes),
            ("recovery", now.tcp_recoveries, last.tcp_recoveries),
        ] {
            let d = delta(n, p);
            if d > 0 {
                self.tcp_events
                    .get_or_create(&TcpEventLabels {
                        tenant: tenant.into(),
                        instance: instance.into(),
                        event: event.into(),
                    })
                    .inc_by(d);
            }
        }
        self.tcp_connections
            .get_or_create(&l)
            .set(now.tcp_connections as i64);
        self.tcp_buffer_bytes
            .get_or_create(&l)
            .set(now.tcp_buffer_bytes as i64);
        *last = *now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metrics::Metrics;

    #[test]
    fn reports_add_deltas() {
        let m = Metrics::new();
        let s = m.subsystem::<NetStackMetrics>();
        let mut last = NetStackStats::default();
        let mut now = NetStackStats {
            packets_in: 10,
            dropped_no_listener: 2,
            tcp_connections: 3,
            ..Default::default()
        };
        s.observe("t", "wg0", &now, &mut last);
        now.packets_in = 15;
        s.observe("t", "wg0", &now, &mut last);
        let text = m.encode();
        assert!(
            text.contains(r#"meshgate_netstack_packets_in_total{tenant="t",instance="wg0"} 15"#),
            "{text}"
        );
        assert!(text.contains(r#"meshgate_netstack_dropped_packets_total{tenant="t",instance="wg0",reason="no_listener"} 2"#), "{text}");
        assert!(
            text.contains(r#"meshgate_netstack_tcp_connections{tenant="t",instance="wg0"} 3"#),
            "{text}"
        );
    }
}
