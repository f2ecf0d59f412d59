//! IP flows: packets a node forwards (between WireGuard peers of a hub),
//! tracked as flows like any connection; and the router's duties on them
//! ([`hop`]: TTL / hop limit, ICMP time exceeded).
//!
//! Each packet is parsed (`etherparse`) into its 5-tuple; the first packet
//! of a 5-tuple (either direction) opens a [`crate::core::spine::flow::Flow`] with
//! the sender's identity, which passes the flow-start hooks: a denied flow's
//! packets are dropped until it expires. Bytes are counted upstream (from
//! the initiator) and downstream. A flow ends when idle (TCP 5 min, others
//! 60 s), shortly after a TCP RST or FINs both ways, or when the tracker is
//! cleared (the interface stops). Sans-IO: the caller passes each packet and
//! a clock tick; nothing here touches a socket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};

use crate::core::metrics::InstanceMetrics;
use crate::core::net::proxy::Traffic;
use crate::core::spine::flow::{EndReason, FlowContext, FlowGuard, FlowTable, Protocol, Verdict};

/// Idle time after which a TCP flow ends.
pub const TCP_IDLE: Duration = Duration::from_secs(300);
/// Idle time after which a UDP, ICMP or other flow ends.
pub const OTHER_IDLE: Duration = Duration::from_secs(60);
/// How long a TCP flow lingers after RST or FINs both ways (late packets).
pub const TCP_CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Most flows tracked per tracker; new 5-tuples beyond are dropped.
pub const MAX_FLOWS: usize = 65_536;

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Forward it.
    Forward,
    /// Drop it; the label is the drop counter's reason.
    Drop(&'static str),
}

/// A packet's flow key, the same for both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
}

/// What one packet says about its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    proto: u8,
    protocol: Protocol,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    fin: bool,
    rst: bool,
}

fn parse(packet: &[u8]) -> Option<Parsed> {
    let p = SlicedPacket::from_ip(packet).ok()?;
    let (src, dst, proto) = match p.net.as_ref()? {
        NetSlice::Ipv4(v4) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
            v4.payload().ip_number.0,
        ),
        NetSlice::Ipv6(v6) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
            v6.payload().ip_number.0,
        ),
        NetSlice::Arp(_) => return None,
    };
    let (protocol, sport, dport, fin, rst) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (
            Protocol::Tcp,
            t.source_port(),
            t.destination_port(),
            t.fin(),
            t.rst(),
        ),
        Some(TransportSlice::Udp(u)) => (
            Protocol::Udp,
            u.source_port(),
            u.destination_port(),
            false,
            false,
        ),
        // Echo request and reply share their identifier: use it as both
        // "ports" so the two directions meet.
        Some(TransportSlice::Icmpv4(i)) => {
            let id = match i.icmp_type() {
                Icmpv4Type::EchoRequest(e) | Icmpv4Type::EchoReply(e) => e.id,
                _ => 0,
            };
            (Protocol::Icmp, id, id, false, false)
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let id = match i.icmp_type() {
                Icmpv6Type::EchoRequest(e) | Icmpv6Type::EchoReply(e) => e.id,
                _ => 0,
            };
            (Protocol::Icmp, id, id, false, false)
        }
        _ => (Protocol::Other(proto), 0, 0, false, false),
    };
    Some(Parsed {
        proto,
        protocol,
        src: (src, sport),
        dst: (dst, dport),
        fin,
        rst,
    })
}

struct Entry {
    /// `None` once denied (a tombstone: packets drop until it expires).
    guard: Option<FlowGuard>,
    initiator: (IpAddr, u16),
    last: Instant,
    tcp: bool,
    fin_up: bool,
    fin_down: bool,
    closed_at: Option<Instant>,
}

/// The IP flows of one forwarding module instance.
pub struct IpFlows {
    tenant: String,
    instance: String,
    flows: Arc<FlowTable>,
    metrics: InstanceMetrics,
    live: Mutex<HashMap<FlowKey, Entry>>,
}

impl IpFlows {
    /// A tracker that opens flows in `flows` for `tenant`/`instance`.
    pub fn new(
        tenant: &str,
        instance: &str,
        flows: Arc<FlowTable>,
        metrics: InstanceMetrics,
    ) -> Self {
        Self {
            tenant: tenant.to_string(),
            instance: instance.to_string(),
            flows,
            metrics,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Tracks one packet sent by `identity` at `now`; says whether to forward it.
    pub fn packet(&self, packet: &[u8], identity: &str, now: Instant) -> Admit {
        let Some(p) = parse(packet) else {
            return Admit::Drop("malformed");
        };
        let (lo, hi) = if p.src <= p.dst {
            (p.src, p.dst)
        } else {
            (p.dst, p.src)
        };
        let key = FlowKey {
            proto: p.proto,
            lo,
            hi,
        };
        let mut live = self.live.lock().expect("ip flows poisoned");
        if !live.contains_key(&key) {
            if live.len() >= MAX_FLOWS {
                return Admit::Drop("flow_table_full");
            }
            let guard = self.flows.open(
                FlowContext {
                    tenant: self.tenant.clone(),
                    instance: self.instance.clone(),
                    identity: Some(identity.to_string()),
                    src: SocketAddr::new(p.src.0, p.src.1),
                    dst: SocketAddr::new(p.dst.0, p.dst.1).to_string(),
                    protocol: p.protocol,
                    kind: "wireguard".into(),
                    dialed: Some(SocketAddr::new(p.dst.0, p.dst.1)),
                    trace: None,
                },
                &self.metrics,
            );
            guard
                .flow()
                .set_route(format!("forwarded by {}", self.instance));
            let denied = matches!(guard.verdict(), Verdict::Deny(_));
            let guard = if denied {
                if let (Verdict::Deny(why), Some(suppressed)) =
                    (guard.verdict(), crate::core::logs::allow("ipflow.denied"))
                {
                    tracing::info!(suppressed,tenant = %self.tenant, instance = %self.instance, %identity, src = %SocketAddr::new(p.src.0, p.src.1), dst = %SocketAddr::new(p.dst.0, p.dst.1), reason = %why, "forwarded flow denied");
                }
                let mut g = guard;
                g.set_end_reason(EndReason::Denied);
                drop(g);
                None
            } else {
                Some(guard)
            };
            live.insert(
                key,
                Entry {
                    guard,
                    initiator: p.src,
                    last: now,
                    tcp: p.protocol == Protocol::Tcp,
                    fin_up: false,
                    fin_down: false,
                    closed_at: None,
                },
            );
        }
        let e = live.get_mut(&key).expect("inserted");
        e.last = now;
        if e.guard.as_ref().is_some_and(|g| g.flow().is_revoked()) {
            // A policy change denied the open flow: it ends, and its
            // packets are dropped until it expires.
            if let Some(mut g) = e.guard.take() {
                g.set_end_reason(EndReason::PolicyRevoked);
            }
        }
        let Some(guard) = &e.guard else {
            return Admit::Drop("denied");
        };
        let up = p.src == e.initiator;
        let n = packet.len() as u64;
        if up {
            guard.flow().upstream(n);
            e.fin_up |= p.fin;
        } else {
            guard.flow().downstream(n);
            e.fin_down |= p.fin;
        }
        if e.closed_at.is_none() && (p.rst || (e.fin_up && e.fin_down)) {
            e.closed_at = Some(now);
        }
        Admit::Forward
    }

    /// Ends flows that are idle (or closed and lingered) at `now`.
    pub fn expire(&self, now: Instant) {
        let mut live = self.live.lock().expect("ip flows poisoned");
        live.retain(|_, e| {
            let idle = if e.tcp { TCP_IDLE } else { OTHER_IDLE };
            let end = match e.closed_at {
                Some(t) if now.saturating_duration_since(t) >= TCP_CLOSE_LINGER => {
                    Some(EndReason::Closed)
                }
                _ if now.saturating_duration_since(e.last) >= idle => Some(EndReason::IdleTimeout),
                _ => None,
            };
            match (end, e.guard.as_mut()) {
                (Some(r), Some(g)) => {
                    g.set_end_reason(r);
                    false
                }
                (Some(_), None) => false,
                (None, _) => true,
            }
        });
    }

    /// Ends every flow (`stopped`).
    pub fn clear(&self) {
        let mut live = self.live.lock().expect("ip flows poisoned");
        for (_, mut e) in live.drain() {
            if let Some(g) = e.guard.as_mut() {
                g.set_end_reason(EndReason::Stopped);
            }
        }
    }

    /// Flows tracked now (denied tombstones included).
    pub fn len(&self) -> usize {
        self.live.lock().expect("ip flows poisoned").len()
    }

    /// True when no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What forwarding does to a packet's TTL (IPv4) or hop limit (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Decremented (the IPv4 header checksum updated): forward it.
    Forward,
    /// It would reach 0 here: drop it and answer with ICMP time exceeded.
    Expired,
    /// Not an IP packet this can read: drop it.
    Malformed,
}

/// Decrements the TTL or hop limit of `packet` in place, as a router does.
pub fn hop(packet: &mut [u8]) -> Hop {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return Hop::Malformed;
            }
            if packet[8] <= 1 {
                return Hop::Expired;
            }
            packet[8] -= 1;
            packet[10] = 0;
            packet[11] = 0;
            let mut sum: u32 = packet[..ihl]
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let csum = !(sum as u16);
            packet[10..12].copy_from_slice(&csum.to_be_bytes());
            Hop::Forward
        }
        Some(6) if packet.len() >= 40 => {
            if packet[7] <= 1 {
                return Hop::Expired;
            }
            packet[7] -= 1;
            Hop::Forward
        }
        _ => Hop::Malformed,
    }
}

/// The ICMP "time exceeded in transit" a router at `from` sends back to the
/// source of `packet` (which carries as much of the original as RFC 792 /
/// RFC 4443 ask: the IPv4 header and 8 bytes; for IPv6 up to 1232 bytes).
/// `None` when `from` and the packet are not of one family.
pub fn time_exceeded(packet: &[u8], from: IpAddr) -> Option<Vec<u8>> {
    use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type, PacketBuilder};
    let mut out = Vec::new();
    match (packet.first().map(|b| b >> 4), from) {
        (Some(4), IpAddr::V4(me)) if packet.len() >= 20 => {
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let quote = &packet[..packet.len().min(ihl + 8)];
            PacketBuilder::ipv4(me.octets(), src, 64)
                .icmpv4(Icmpv4Type::TimeExceeded(
                    icmpv4::TimeExceededCode::TtlExceededInTransit,
                ))
                .write(&mut out, quote)
                .ok()?;
        }
        (Some(6), IpAddr::V6(me)) if packet.len() >= 40 => {
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let quote = &packet[..packet.len().min(1232)];
            PacketBuilder::ipv6(me.octets(), src, 64)
                .icmpv6(Icmpv6Type::TimeExceeded(
                    icmpv6::TimeExceededCode::HopLimitExceeded,
                ))
                .write(&mut out, quote)
                .ok()?;
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metrics::Metrics;
    use crate::core::spine::flow::{Flow, FlowEnd, FlowObserver};
    use etherparse::PacketBuilder;

    #[derive(Default)]
    struct Rec(Mutex<Vec<String>>);
    impl FlowObserver for Rec {
        fn on_start(&self, f: &Flow) -> Verdict {
            if f.ctx.identity.as_deref() == Some("mallory") {
                return Verdict::Deny("no forwarding for mallory".into());
            }
            Verdict::Allow
        }
        fn on_end(&self, f: &Flow, e: &FlowEnd) {
            self.0.lock().unwrap().push(format!(
                "{:?} {} -> {} by {} {} up {} down {}",
                f.ctx.protocol,
                f.ctx.src,
                f.ctx.dst,
                f.ctx.identity.as_deref().unwrap_or("-"),
                e.reason,
                e.bytes_up,
                e.bytes_down
            ));
        }
    }

    fn tcp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, fin: bool, rst: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, 1, 1000);
        if fin {
            b = b.fin();
        }
        if rst {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, b"data").unwrap();
        out
    }

    fn ping(src: [u8; 4], dst: [u8; 4], reply: bool) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64);
        let b = if reply {
            b.icmpv4_echo_reply(7, 1)
        } else {
            b.icmpv4_echo_request(7, 1)
        };
        let mut out = Vec::new();
        b.write(&mut out, b"ping").unwrap();
        out
    }

    fn tracker() -> (Arc<Rec>, Arc<FlowTable>, IpFlows) {
        let rec = Arc::new(Rec::default());
        let table = Arc::new(FlowTable::new(vec![rec.clone()]));
        let m = Metrics::new();
        let flows = IpFlows::new("acme", "wg0", table.clone(), m.instance("acme", "wg0"));
        (rec, table, flows)
    }

    #[test]
    fn both_directions_are_one_flow_with_bytes_each_way() {
        let (rec, table, f) = tracker();
        let t0 = Instant::now();
        let a = [10, 192, 0, 2];
        let b = [10, 192, 0, 3];
        let req = ping(a, b, false);
        assert_eq!(f.packet(&req, "one", t0), Admit::Forward);
        assert_eq!(f.packet(&ping(b, a, true), "two", t0), Admit::Forward);
        assert_eq!(table.count(Some("acme"), Some("wg0")), 1);
        let snap = table.snapshot();
        assert_eq!(snap[0].ctx.src.to_string(), "10.192.0.2:7");
        assert_eq!(snap[0].ctx.identity.as_deref(), Some("one"));
        assert_eq!(snap[0].bytes_up, req.len() as u64);
        assert!(snap[0].bytes_down > 0);
        // Idle expiry.
        f.expire(t0 + OTHER_IDLE - Duration::from_secs(1));
        assert_eq!(f.len(), 1);
        f.expire(t0 + OTHER_IDLE);
        assert!(f.is_empty());
        let log = rec.0.lock().unwrap().clone();
        assert_eq!(log.len(), 1);
        assert!(
            log[0].starts_with("Icmp 10.192.0.2:7 -> 10.192.0.3:7 by one idle_timeout"),
            "{log:?}"
        );
    }

    #[test]
    fn tcp_ends_after_fins_both_ways_or_rst() {
        let (rec, _table, f) = tracker();
        let t0 = Instant::now();
        let (a, b) = ([10, 0, 0, 2], [10, 0, 0, 3]);
        f.packet(&tcp(a, 4000, b, 80, false, false), "one", t0);
        f.packet(&tcp(b, 80, a, 4000, true, false), "two", t0);
        f.expire(t0 + TCP_CLOSE_LINGER);
        assert_eq!(f.len(), 1, "one FIN is not a close");
        f.packet(&tcp(a, 4000, b, 80, true, false), "one", t0);
        f.expire(t0 + TCP_CLOSE_LINGER);
        assert!(f.is_empty());
        f.packet(&tcp(a, 4001, b, 80, false, false), "one", t0);
        f.packet(&tcp(b, 80, a, 4001, false, true), "two", t0);
        f.expire(t0 + TCP_CLOSE_LINGER);
        assert!(f.is_empty());
        let log = rec.0.lock().unwrap().clone();
        assert!(log.iter().all(|l| l.contains(" closed ")), "{log:?}");
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn a_denied_flow_drops_until_it_expires() {
        let (rec, table, f) = tracker();
        let t0 = Instant::now();
        let p = ping([10, 0, 0, 9], [10, 0, 0, 3], false);
        assert_eq!(f.packet(&p, "mallory", t0), Admit::Drop("denied"));
        assert_eq!(f.packet(&p, "mallory", t0), Admit::Drop("denied"));
        assert_eq!(table.count(None, None), 0, "a denied flow ends at once");
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        assert!(rec.0.lock().unwrap()[0].contains("denied"));
        f.expire(t0 + OTHER_IDLE);
        assert!(f.is_empty());
    }

    #[test]
    fn garbage_is_dropped_and_clear_stops_everything() {
        let (rec, _table, f) = tracker();
        let t0 = Instant::now();
        assert_eq!(f.packet(&[0x45, 0, 0], "one", t0), Admit::Drop("malformed"));
        assert_eq!(f.packet(&[], "one", t0), Admit::Drop("malformed"));
        f.packet(&ping([10, 0, 0, 2], [10, 0, 0, 3], false), "one", t0);
        f.clear();
        assert!(f.is_empty());
        assert!(rec.0.lock().unwrap()[0].contains("stopped"));
    }

    #[test]
    fn hops_decrement_and_expire_with_valid_checksums() {
        let mut p = ping([10, 0, 0, 2], [10, 0, 0, 3], false);
        let ttl = p[8];
        assert_eq!(hop(&mut p), Hop::Forward);
        assert_eq!(p[8], ttl - 1);
        // etherparse re-reads it with a valid header checksum.
        let h = etherparse::Ipv4HeaderSlice::from_slice(&p)
            .unwrap()
            .to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        p[8] = 1;
        assert_eq!(hop(&mut p), Hop::Expired);
        let icmp = time_exceeded(&p, "10.0.0.1".parse().unwrap()).unwrap();
        let s = SlicedPacket::from_ip(&icmp).unwrap();
        match s.transport {
            Some(TransportSlice::Icmpv4(i)) => {
                assert!(matches!(i.icmp_type(), Icmpv4Type::TimeExceeded(_)));
            }
            other => panic!("{other:?}"),
        }
        let Some(NetSlice::Ipv4(v4)) = s.net else {
            panic!()
        };
        assert_eq!(
            v4.header().destination_addr(),
            std::net::Ipv4Addr::new(10, 0, 0, 2)
        );
        assert!(time_exceeded(&p, "fd00::1".parse().unwrap()).is_none());
        assert_eq!(hop(&mut [0x45, 0, 0]), Hop::Malformed);
        let mut v6 = Vec::new();
        etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 1)
            .udp(1, 2)
            .write(&mut v6, b"x")
            .unwrap();
        assert_eq!(hop(&mut v6), Hop::Expired);
        assert!(time_exceeded(&v6, "fd00::1".parse().unwrap()).is_some());
    }
}
