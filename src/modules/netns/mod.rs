//! `kind: netns`: a network namespace whose only way out is the tenant's
//! vnet through meshgate, for programs that know nothing of proxies
//! (`meshgate run -- CMD`).
//!
//! # How it is built
//!
//! At bind the door starts a kernel engine ([`KernelEngine`]: a TUN `mg0`
//! in an unnamed user + network namespace, addresses 169.254.77.2/30 and
//! fd6d:6773::2/64 and the default routes through it; no privilege where
//! user namespaces are allowed, nothing changed on the host's network) and
//! joins the TUN back to back with a userspace stack ([`NetStack`],
//! 169.254.77.1 and fd6d:6773::1) on meshgate's side. The stack's transparent listener
//! ([`NetStack::listen_transparent`]) takes every TCP connection the
//! namespace makes, to any address, with its original destination, and
//! each takes the one path (route in `vnet:`, flow, policy, dial, proxy,
//! audit) as a captured connection does, held to the safe defaults of a
//! client's choice.
//!
//! Names: a DNS stub on 169.254.77.1:53 (UDP) answers each A query with
//! an address from a reserved range ([`names`]), and a connection to that
//! address is dialed by the name, so it resolves where the tenant's vnet
//! says (`hosts:`, its `dns:` server, the far side of a gateway link) and
//! policy sees the name. A name the vnet has no route for gets NXDOMAIN;
//! AAAA queries get no address (synthetic addresses are IPv4), so programs
//! dial names over IPv4; IPv6 addresses are dialed as they are. UDP to
//! anywhere else takes the one transparent UDP path
//! ([`OnRamp::serve_transparent_udp`]): a session per (source,
//! destination), answered from the address the program sent to.
//!
//! The helper's process id is in the status: `/proc/PID/ns/net` is the
//! namespace. Dropping the listener (drain, stop) ends the helper, and the
//! namespace goes with its last process.

pub mod config;
pub mod names;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use configstore::Document;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::engine::kernel::KernelEngine;
use crate::core::engine::userspace::{NetStack, NetStackConfig, NetTcpListener};
use crate::core::engine::{EngineConfig, IpEngine, PacketSink};
use crate::core::net::datagram::DatagramSocket;
use crate::core::net::dns;
use crate::core::net::listen::StreamListener;
use crate::core::net::proxy::Stream;
use crate::core::spine::door::{Door, DoorFactory, DoorSettings, Live};
use crate::core::spine::onramp::transparent::TransparentDatagrams;
use crate::core::spine::onramp::{
    Accepted, ConnectRequest, OnRamp, RouteVia, StreamHandler, Target,
};
use crate::core::spine::reject::RejectReason;

pub use config::{NetnsConfig, GATEWAY, GATEWAY6, INSIDE, INSIDE6};
use names::Names;

/// Builds netns doors.
pub type NetnsFactory = DoorFactory<Netns>;

/// The link's MTU. Both ends are ours and nothing crosses a real wire, so
/// it is near IP's limit: each packet carries up to 64 KB of a stream, and
/// the per-packet work of both TCPs falls (`bench/run.sh`: one stream at
/// 10.9 Gbit/s against 5.8 with 1500).
const MTU: usize = 65000;
/// How long the namespace's resolver may keep a synthetic answer.
const DNS_TTL: u32 = 5;

/// A netns door's connections and its namespace.
pub struct Netns {
    live: Arc<Live<NetnsConfig>>,
    names: Arc<Names>,
    /// The running namespace's helper process, for the status.
    pid: Mutex<Option<u32>>,
    dns_queries: Arc<AtomicU64>,
}

/// Hands what one side of the link sends to the other side.
#[derive(Default)]
struct Link(OnceLock<Arc<dyn IpEngine>>);

impl PacketSink for Link {
    fn send(&self, packet: &[u8]) {
        if let Some(e) = self.0.get() {
            e.inject(packet);
        }
    }
    fn flush(&self) {
        if let Some(e) = self.0.get() {
            e.flush();
        }
    }
}

/// The transparent listener, with what lives as long as it: the engines
/// and the DNS stub's task.
struct NamespaceListener {
    tcp: NetTcpListener,
    tcp6: NetTcpListener,
    kernel: Arc<KernelEngine>,
    stack: NetStack,
    _dns: tokio_util::sync::DropGuard,
}

impl Drop for NamespaceListener {
    fn drop(&mut self) {
        self.kernel.shutdown();
        self.stack.shutdown();
    }
}

#[async_trait]
impl StreamListener for NamespaceListener {
    async fn accept(&mut self) -> std::io::Result<(Stream, SocketAddr)> {
        let (s, src, _) = self.accept_addressed().await?;
        Ok((s, src))
    }
    async fn accept_addressed(
        &mut self,
    ) -> std::io::Result<(Stream, SocketAddr, Option<SocketAddr>)> {
        tokio::select! {
            r = self.tcp.accept_addressed() => r,
            r = self.tcp6.accept_addressed() => r,
        }
    }
    fn local_addr(&self) -> SocketAddr {
        SocketAddr::new(GATEWAY.into(), 0)
    }
}

/// Where a connection or datagram the namespace sent to `dst` goes: a
/// synthetic address as its name, another as itself; `None` for the
/// gateway's own addresses and for a synthetic address no name holds.
fn target_of(names: &Names, dst: SocketAddr) -> Option<HostPort> {
    let ip = dst.ip().to_canonical();
    if ip == IpAddr::V4(GATEWAY) || ip == IpAddr::V6(GATEWAY6) {
        return None;
    }
    let host = if names::is_synthetic(ip) {
        names.name_of(ip)?
    } else {
        ip.to_string()
    };
    Some(HostPort {
        host,
        port: dst.port(),
    })
}

/// The stack's transparent UDP as the one transparent UDP path takes it.
struct NamespaceUdp(crate::core::engine::userspace::NetUdpTransparent);

#[async_trait]
impl TransparentDatagrams for NamespaceUdp {
    async fn recv(
        &self,
        buf: &mut [u8],
    ) -> std::io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
        let (n, from, to) = self.0.recv(buf).await?;
        Ok((n, from, Some(to)))
    }
    fn reply_from(&self, orig: SocketAddr) -> std::io::Result<Arc<dyn DatagramSocket>> {
        Ok(self.0.reply_from(orig))
    }
}

#[async_trait]
impl StreamHandler for Netns {
    fn max_connections(&self) -> usize {
        self.live.get().door.max_connections
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let cfg = self.live.get();
        let ctx = onramp.ctx();
        let Some((dst, target)) = conn.dst.and_then(|d| Some((d, target_of(&self.names, d)?)))
        else {
            ctx.metrics
                .reject(&ctx.tenant.name, &ctx.instance, RejectReason::NotCaptured);
            if let Some(suppressed) = crate::core::logs::allow("netns.no_target") {
                tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, dst = ?conn.dst, suppressed, "a connection from the namespace to the gateway itself, or to a synthetic address no name holds: closed");
            }
            return;
        };
        let req = ConnectRequest {
            src: conn.src,
            target: Target::Addr(target),
            identity: None,
            via: RouteVia::Vnet(cfg.door.vnet.clone()),
            connect_timeout: cfg.door.connect_timeout,
            idle_timeout: cfg.door.idle_timeout,
            client_dst: Some(dst),
            proxy_protocol: None,
            chosen_by: crate::core::spine::dest::ChosenBy::Client,
            trace: None,
        };
        onramp.connect(client, req).await;
    }
}

/// The answer to one DNS message from the namespace (`None`: none, for a
/// message too short to have an id, or a response).
fn answer(msg: &[u8], names: &Names, routable: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    let q = match dns::parse_query(msg) {
        Ok(q) => q,
        Err(dns::DnsError::BadName(_)) => return dns::encode_error(msg, dns::RCODE_NXDOMAIN),
        Err(_) => return dns::encode_error(msg, dns::RCODE_FORMERR),
    };
    let reply = |addrs: &[IpAddr], rcode| Some(dns::encode_reply(&q, addrs, DNS_TTL, rcode));
    if q.qclass != dns::CLASS_IN {
        return reply(&[], dns::RCODE_NOTIMP);
    }
    if q.name.is_empty() {
        return reply(&[], dns::RCODE_REFUSED);
    }
    // RFC 6761: localhost is the namespace's own.
    if q.name == "localhost" || q.name.ends_with(".localhost") {
        return reply(
            &[
                Ipv4Addr::LOCALHOST.into(),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ],
            0,
        );
    }
    if !routable(&q.name) {
        return reply(&[], dns::RCODE_NXDOMAIN);
    }
    match q.qtype {
        dns::TYPE_A => reply(&[names.address_for(&q.name).into()], 0),
        // The name exists; it has no address of this type here.
        _ => reply(&[], 0),
    }
}

/// Serves the namespace's DNS queries until `stop`.
async fn serve_dns(
    sock: crate::core::engine::userspace::NetUdpSocket,
    names: Arc<Names>,
    onramp: Arc<OnRamp>,
    live: Arc<Live<NetnsConfig>>,
    queries: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 1500];
    loop {
        let (n, from) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        queries.fetch_add(1, Ordering::Relaxed);
        let vnet = live.get().door.vnet.clone();
        let vnets = &onramp.ctx().tenant.vnets;
        let routable = |name: &str| {
            let hp = HostPort {
                host: name.to_string(),
                port: 0,
            };
            vnets.dns_for(vnet.as_deref(), &hp).is_some()
                || vnets.route(vnet.as_deref(), &hp).is_ok()
        };
        if let Some(reply) = answer(&buf[..n], &names, routable) {
            let _ = sock.send_to(&reply, from).await;
        }
    }
}

#[async_trait]
impl Door for Netns {
    const KIND: &'static str = "netns";
    type Config = NetnsConfig;

    fn parse(doc: &Document) -> Result<NetnsConfig, ConfigError> {
        NetnsConfig::from_document(doc)
    }

    fn settings(config: &NetnsConfig) -> &DoorSettings {
        &config.door
    }

    fn new(live: Arc<Live<NetnsConfig>>) -> Self {
        Netns {
            live,
            names: Arc::new(Names::new()),
            pid: Mutex::new(None),
            dns_queries: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Makes the namespace (the kernel engine), the stack on meshgate's
    /// side of its link, the transparent listener and the DNS stub.
    async fn bind(
        &self,
        onramp: &Arc<OnRamp>,
        _cfg: &NetnsConfig,
        source: &str,
    ) -> Result<Box<dyn StreamListener>, ConfigError> {
        let ctx = onramp.ctx();
        let to_stack = Arc::new(Link::default());
        let engine_cfg = EngineConfig {
            addresses: vec![
                ipnet::IpNet::new(INSIDE.into(), 30).expect("a /30"),
                ipnet::IpNet::new(INSIDE6.into(), 64).expect("a /64"),
            ],
            mtu: MTU,
            keep_alive: None,
            tcp_timeout: crate::core::engine::DEFAULT_TCP_TIMEOUT,
            congestion_control: None,
            label: format!("{}/{}", ctx.tenant.name, ctx.instance),
            owner: None,
        };
        let kernel = KernelEngine::start(&engine_cfg, to_stack.clone())
            .await
            .map_err(|e| {
                ConfigError::key(source, "kind", format!("cannot make the namespace: {e}"))
            })?;
        let mut stack_cfg = NetStackConfig::new(vec![
            ipnet::IpNet::new(GATEWAY.into(), 30).expect("a /30"),
            ipnet::IpNet::new(GATEWAY6.into(), 64).expect("a /64"),
        ]);
        stack_cfg.mtu = MTU;
        let to_kernel = Arc::new(Link::default());
        let _ = to_kernel.0.set(kernel.clone() as Arc<dyn IpEngine>);
        let stack = NetStack::spawn(stack_cfg, to_kernel);
        let engine: Arc<dyn IpEngine> = Arc::new(stack.clone());
        let _ = to_stack.0.set(engine.clone());
        ctx.metrics
            .refreshed_subsystem::<crate::core::engine::userspace::metrics::NetStackMetrics>()
            .track(&ctx.tenant.name, &ctx.instance, &engine);
        let listen = |ipv6| {
            stack.listen_transparent(ipv6).map_err(|e| {
                ConfigError::key(
                    source,
                    "kind",
                    format!("cannot listen in the namespace: {e}"),
                )
            })
        };
        let (tcp, tcp6) = (listen(false)?, listen(true)?);
        let udp = stack
            .bind_udp(SocketAddr::new(GATEWAY.into(), 53))
            .map_err(|e| {
                ConfigError::key(
                    source,
                    "kind",
                    format!("cannot serve DNS in the namespace: {e}"),
                )
            })?;
        let any_udp = stack.transparent_udp().map_err(|e| {
            ConfigError::key(
                source,
                "kind",
                format!("cannot take UDP in the namespace: {e}"),
            )
        })?;
        let stop = CancellationToken::new();
        let names = self.names.clone();
        let live = self.live.clone();
        tokio::spawn(onramp.clone().serve_transparent_udp(
            Arc::new(NamespaceUdp(any_udp)),
            move |dst| target_of(&names, dst),
            move || live.get().door.session_rules(),
            stop.clone(),
        ));
        tokio::spawn(serve_dns(
            udp,
            self.names.clone(),
            onramp.clone(),
            self.live.clone(),
            self.dns_queries.clone(),
            stop.clone(),
        ));
        let pid = kernel.helper_pid();
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = pid;
        tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, pid = ?pid, "namespace ready: its only way out is this door");
        Ok(Box::new(NamespaceListener {
            tcp,
            tcp6,
            kernel,
            stack,
            _dns: stop.drop_guard(),
        }))
    }

    fn must_rebind(_old: &NetnsConfig, _new: &NetnsConfig) -> bool {
        // The namespace stays; a new `vnet:` applies to new connections.
        false
    }

    fn status(&self, cfg: &NetnsConfig, onramp: &OnRamp) -> serde_json::Value {
        let mut status = cfg.door.status(onramp);
        status.remove("listen");
        status.remove("listen_via");
        let pid = *self.pid.lock().unwrap_or_else(|e| e.into_inner());
        status.insert("pid".into(), serde_json::json!(pid));
        status.insert(
            "addresses".into(),
            serde_json::json!([INSIDE.to_string(), INSIDE6.to_string()]),
        );
        status.insert("dns".into(), GATEWAY.to_string().into());
        status.insert("names".into(), self.names.len().into());
        status.insert(
            "dns_queries".into(),
            self.dns_queries.load(Ordering::Relaxed).into(),
        );
        status.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        dns::encode_query(0x4242, name, qtype).unwrap()
    }

    #[test]
    fn the_stub_gives_routable_names_synthetic_addresses() {
        let names = Names::new();
        let routable = |n: &str| n != "nowhere.example";
        let a = answer(&query("nginx", dns::TYPE_A), &names, routable).unwrap();
        let got = dns::parse_response(&a, 0x4242, dns::TYPE_A).unwrap();
        assert_eq!(got.len(), 1);
        assert!(names::is_synthetic(got[0]));
        assert_eq!(names.name_of(got[0]).as_deref(), Some("nginx"));
        // The same name, the same address; AAAA: none, not an error.
        let again = answer(&query("NGINX.", dns::TYPE_A), &names, routable).unwrap();
        assert_eq!(
            dns::parse_response(&again, 0x4242, dns::TYPE_A).unwrap(),
            got
        );
        let six = answer(&query("nginx", dns::TYPE_AAAA), &names, routable).unwrap();
        assert_eq!(
            dns::parse_response(&six, 0x4242, dns::TYPE_AAAA).unwrap(),
            Vec::<IpAddr>::new()
        );
        // Unroutable: NXDOMAIN, and no address given out.
        let no = answer(&query("nowhere.example", dns::TYPE_A), &names, routable).unwrap();
        assert_eq!(
            dns::parse_response(&no, 0x4242, dns::TYPE_A),
            Err(dns::DnsError::Rcode(dns::RCODE_NXDOMAIN))
        );
        assert_eq!(names.len(), 1);
        // localhost is the namespace's own.
        let lo = answer(&query("localhost", dns::TYPE_A), &names, routable).unwrap();
        assert_eq!(
            dns::parse_response(&lo, 0x4242, dns::TYPE_A).unwrap(),
            vec![IpAddr::from(Ipv4Addr::LOCALHOST)]
        );
        // Garbage: a header-only error, or nothing.
        let mut bad = query("x", dns::TYPE_A);
        bad[5] = 3;
        let e = answer(&bad, &names, routable).unwrap();
        assert_eq!(
            dns::parse_response(&e, 0x4242, dns::TYPE_A),
            Err(dns::DnsError::Rcode(dns::RCODE_FORMERR))
        );
        assert_eq!(answer(&[1, 2, 3], &names, routable), None);
    }
}
