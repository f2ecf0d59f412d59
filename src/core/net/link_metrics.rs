//! Gateway links' metrics (`ssh_link`, `h2_link`, `quic_link`), registered
//! under `meshgate_link_` once per node: whether each link is up, how often
//! it reconnected, its round-trip time where the transport measures one
//! (QUIC), and the flows it carried. Labels: `tenant`, `instance`,
//! `transport`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::metrics::{registered, Subsystem};

/// `tenant`, `instance`, `transport`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// Tenant name.
    pub tenant: String,
    /// The link's instance name.
    pub instance: String,
    /// `ssh`, `h2` or `quic`.
    pub transport: String,
}

/// The link families of the node.
pub struct LinkMetrics {
    /// 1 while the link has a connection up.
    pub up: Family<LinkLabels, Gauge>,
    /// Connections made after the first.
    pub reconnects: Family<LinkLabels, Counter>,
    /// The last smoothed round-trip time, in microseconds (QUIC).
    pub rtt: Family<LinkLabels, Gauge>,
    /// Flows the link carried (streams or channels opened).
    pub flows: Family<LinkLabels, Counter>,
}

impl Subsystem for LinkMetrics {
    const PREFIX: &'static str = "link";

    fn register(registry: &mut Registry) -> Self {
        LinkMetrics {
            up: registered(registry, "up", "1 while the gateway link is connected"),
            reconnects: registered(
                registry,
                "reconnects",
                "Gateway link connections made after the first",
            ),
            rtt: registered(
                registry,
                "rtt_microseconds",
                "The gateway link's smoothed round-trip time (QUIC)",
            ),
            flows: registered(registry, "flows", "Flows a gateway link carried"),
        }
    }
}

/// One link's series, resolved once.
#[derive(Clone, Debug, Default)]
pub struct LinkSeries {
    up: Gauge,
    reconnects: Counter,
    rtt: Gauge,
    flows: Counter,
}

impl LinkMetrics {
    /// The series of `tenant`/`instance` over `transport`.
    pub fn series(&self, tenant: &str, instance: &str, transport: &str) -> LinkSeries {
        let l = LinkLabels {
            tenant: tenant.into(),
            instance: instance.into(),
            transport: transport.into(),
        };
        LinkSeries {
            up: self.up.get_or_create(&l).clone(),
            reconnects: self.reconnects.get_or_create(&l).clone(),
            rtt: self.rtt.get_or_create(&l).clone(),
            flows: self.flows.get_or_create(&l).clone(),
        }
    }
}

impl LinkSeries {
    /// A connection came up; `reconnect` if it is not the first.
    pub fn connected(&self, reconnect: bool) {
        self.up.set(1);
        if reconnect {
            self.reconnects.inc();
        }
    }

    /// The connection is down.
    pub fn down(&self) {
        self.up.set(0);
    }

    /// The round-trip time now.
    pub fn rtt(&self, rtt: std::time::Duration) {
        self.rtt.set(rtt.as_micros().min(i64::MAX as u128) as i64);
    }

    /// A flow went over the link.
    pub fn flow(&self) {
        self.flows.inc();
    }
}
