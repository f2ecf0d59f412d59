//! The WireGuard module's metrics, registered under `meshgate_wg_` once per
//! node ([`crate::core::metrics::Metrics::subsystem`]): per peer handshakes, last handshake time,
//! UDP bytes and drops by reason, and the instance's IP stack counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::metrics::{registered, Subsystem};

/// `tenant`, `instance`, `peer`: a WireGuard peer's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// Tenant name.
    pub tenant: String,
    /// WireGuard instance name.
    pub instance: String,
    /// Peer name (`-` when a packet matched no peer).
    pub peer: String,
}

/// `tenant`, `instance`, `peer`, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerReasonLabels {
    /// Tenant name.
    pub tenant: String,
    /// WireGuard instance name.
    pub instance: String,
    /// Peer name (`-` when a packet matched no peer).
    pub peer: String,
    /// Why the packet was dropped.
    pub reason: String,
}

/// `port`: a shared UDP port's series (what arrives there belongs to no
/// tenant until it is routed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    /// The UDP port number.
    pub port: String,
}

/// `port`, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortReasonLabels {
    /// The UDP port number.
    pub port: String,
    /// Why the datagram went to no instance.
    pub reason: String,
}

/// One WireGuard peer's pre-resolved series.
#[derive(Clone, Debug, Default)]
pub struct PeerMetrics {
    /// Completed handshakes.
    pub handshakes: Counter,
    /// Unix time of the latest handshake (0: none yet).
    pub last_handshake: Gauge,
    /// UDP bytes received from the peer.
    pub rx_bytes: Counter,
    /// UDP bytes sent to the peer.
    pub tx_bytes: Counter,
}

/// The families of every WireGuard instance of the node.
pub struct WgMetrics {
    /// Handshakes completed, per peer.
    pub handshakes: Family<PeerLabels, Counter>,
    /// Unix time of each peer's latest handshake.
    pub last_handshake: Family<PeerLabels, Gauge>,
    /// UDP bytes received, per peer.
    pub rx_bytes: Family<PeerLabels, Counter>,
    /// UDP bytes sent, per peer.
    pub tx_bytes: Family<PeerLabels, Counter>,
    /// Packets dropped, per peer and reason.
    pub dropped: Family<PeerReasonLabels, Counter>,
    /// Drop label sets created so far, to delete them with their peer.
    drops_seen: std::sync::Mutex<std::collections::HashSet<PeerReasonLabels>>,
    /// Datagrams on a shared port that went to no instance, by reason.
    pub port_unrouted: Family<PortReasonLabels, Counter>,
    /// Handshake initiations that arrived on a shared port.
    pub port_initiations: Family<PortLabels, Counter>,
    /// MAC1 checks made to find the instance of those initiations.
    pub port_mac1_checks: Family<PortLabels, Counter>,
    /// Initiations whose instance the source's hint named.
    pub port_hint_hits: Family<PortLabels, Counter>,
    /// Instances sharing the port.
    pub port_members: Family<PortLabels, Gauge>,
}

impl Subsystem for WgMetrics {
    const PREFIX: &'static str = "wg";

    fn register(registry: &mut Registry) -> Self {
        WgMetrics {
            handshakes: registered(
                registry,
                "handshakes",
                "WireGuard handshakes completed, per peer",
            ),
            last_handshake: registered(
                registry,
                "last_handshake_timestamp_seconds",
                "Unix time of the peer's latest WireGuard handshake (0: none yet)",
            ),
            rx_bytes: registered(
                registry,
                "rx_bytes",
                "WireGuard UDP bytes received from the peer",
            ),
            tx_bytes: registered(registry, "tx_bytes", "WireGuard UDP bytes sent to the peer"),
            dropped: registered(
                registry,
                "dropped_packets",
                "WireGuard packets dropped, by peer and reason",
            ),
            drops_seen: Default::default(),
            port_unrouted: registered(
                registry,
                "port_unrouted_datagrams",
                "Datagrams on a shared WireGuard port that went to no instance, by reason",
            ),
            port_initiations: registered(
                registry,
                "port_initiations",
                "Handshake initiations on a shared WireGuard port",
            ),
            port_mac1_checks: registered(
                registry,
                "port_mac1_checks",
                "MAC1 checks made to find the instance an initiation on a shared port is for",
            ),
            port_hint_hits: registered(
                registry,
                "port_hint_hits",
                "Initiations on a shared port whose instance the source's last match named",
            ),
            port_members: registered(
                registry,
                "port_members",
                "WireGuard instances sharing the UDP port",
            ),
        }
    }
}

impl WgMetrics {
    /// One peer's series.
    pub fn peer(&self, tenant: &str, instance: &str, peer: &str) -> PeerMetrics {
        let l = PeerLabels {
            tenant: tenant.into(),
            instance: instance.into(),
            peer: peer.into(),
        };
        PeerMetrics {
            handshakes: self.handshakes.get_or_create_owned(&l),
            last_handshake: self.last_handshake.get_or_create_owned(&l),
            rx_bytes: self.rx_bytes.get_or_create_owned(&l),
            tx_bytes: self.tx_bytes.get_or_create_owned(&l),
        }
    }

    /// Counts a dropped packet.
    pub fn drop_packet(&self, tenant: &str, instance: &str, peer: &str, reason: &str) {
        let l = PeerReasonLabels {
            tenant: tenant.into(),
            instance: instance.into(),
            peer: peer.into(),
            reason: reason.into(),
        };
        self.dropped.get_or_create(&l).inc();
        self.drops_seen.lock().expect("poisoned").insert(l);
    }

    /// Deletes the series of one peer (`None`: every peer of the instance),
    /// so removed peers and instances do not linger in `/metrics`.
    pub fn forget(&self, tenant: &str, instance: &str, peer: Option<&str>) {
        let matches =
            |t: &str, i: &str, p: &str| t == tenant && i == instance && peer.is_none_or(|x| x == p);
        if let Some(p) = peer {
            let l = PeerLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                peer: p.into(),
            };
            self.handshakes.remove(&l);
            self.last_handshake.remove(&l);
            self.rx_bytes.remove(&l);
            self.tx_bytes.remove(&l);
        }
        let mut seen = self.drops_seen.lock().expect("poisoned");
        seen.retain(|l| {
            let mine = matches(&l.tenant, &l.instance, &l.peer);
            if mine {
                self.dropped.remove(l);
            }
            !mine
        });
    }
}
