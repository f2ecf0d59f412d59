//! SOCKS5 UDP ASSOCIATE (RFC 1928 section 7).
//!
//! The door binds a relay socket on the address the client reached it on
//! and replies with it. Datagrams from the client's address (and port, when
//! the request named one) carry a SOCKS header; each destination is routed
//! in the client's vnet and opens a UDP flow (identity, policy verdict,
//! bytes) on its first datagram. Answers from a destination the client has
//! written to come back with a header naming their source; anything else
//! is dropped (as a NAT with address filtering does). Fragments (`FRAG` not
//! 0) are dropped and counted, as the RFC allows an implementation without
//! reassembly. The association ends with its TCP control connection, after
//! `idle_timeout` without a datagram, or when the door stops.
//!
//! Destinations route like any flow; for now datagrams leave only through
//! `direct` routes (a host socket; names resolved by the host, as the route
//! says). A route through a module (a WireGuard network) drops them with
//! the counted reason `udp_route_unsupported`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

use super::config::SocksConfig;
use super::proto;
use crate::core::logs;
use crate::core::net::proxy::{Stream, Traffic};
use crate::core::spine::flow::{EndReason, FlowContext, FlowGuard, Protocol, Verdict};
use crate::core::spine::onramp::OnRamp;
use crate::core::spine::router::Connector;

/// Destinations one association may open flows to.
const MAX_DESTINATIONS: usize = 1024;
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// An association without a datagram either way for this long ends
/// (unless `idle_timeout` is shorter).
const UDP_IDLE: Duration = Duration::from_secs(300);

/// Receives on `s` if it exists; pends forever otherwise.
async fn recv_opt(s: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// The per-association state.
struct Assoc<'a> {
    onramp: &'a Arc<OnRamp>,
    src: SocketAddr,
    identity: Option<String>,
    vnet: Option<String>,
    flows: HashMap<SocketAddr, FlowGuard>,
    names: HashMap<(String, u16), Option<SocketAddr>>,
    out4: Option<UdpSocket>,
    out6: Option<UdpSocket>,
}

impl Assoc<'_> {
    fn drop_counted(&self, reason: &'static str, detail: &str) {
        let ctx = self.onramp.ctx();
        ctx.metrics.reject(&ctx.tenant.name, &ctx.instance, reason);
        if let Some(suppressed) = logs::allow("socks.udp_drop") {
            tracing::debug!(tenant = %ctx.tenant.name, instance = %ctx.instance, src = %self.src, reason, detail, suppressed, "SOCKS UDP datagram dropped");
        }
    }

    /// Routes, resolves and admits one destination; the address to send to.
    async fn destination(&mut self, dst: &proto::Addr) -> Option<SocketAddr> {
        let ctx = self.onramp.ctx();
        let hp = dst.host_port();
        let decision = match ctx.tenant.vnets.route(self.vnet.as_deref(), &hp) {
            Ok(d) => d,
            Err(e) => {
                self.drop_counted(e.reason(), &e.to_string());
                return None;
            }
        };
        if decision.route.connector != Connector::Direct {
            self.drop_counted(
                "udp_route_unsupported",
                &format!(
                    "{hp} routes through `{}`: SOCKS UDP leaves only through direct routes for now",
                    decision.route.connector
                ),
            );
            return None;
        }
        let addr = match decision.target.ip() {
            Some(ip) => SocketAddr::new(ip, decision.target.port),
            None => {
                let key = (decision.target.host.clone(), decision.target.port);
                if !self.names.contains_key(&key) {
                    let found = tokio::net::lookup_host((key.0.as_str(), key.1))
                        .await
                        .ok()
                        .and_then(|mut a| a.next());
                    self.names.insert(key.clone(), found);
                }
                match self.names[&key] {
                    Some(a) => a,
                    None => {
                        self.drop_counted("resolve", &format!("cannot resolve {hp}"));
                        return None;
                    }
                }
            }
        };
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if let Some(f) = self.flows.get(&addr) {
            return (f.verdict() == Verdict::Allow).then_some(addr);
        }
        if self.flows.len() >= MAX_DESTINATIONS {
            self.drop_counted("udp_too_many_destinations", &addr.to_string());
            return None;
        }
        let flow = ctx.flows.open_routed(
            FlowContext {
                tenant: ctx.tenant.name.clone(),
                instance: ctx.instance.clone(),
                identity: self.identity.clone(),
                src: self.src,
                dst: hp.to_string(),
                protocol: Protocol::Udp,
            },
            Some(decision.describe()),
            &ctx.instance_metrics,
        );
        let allowed = flow.verdict() == Verdict::Allow;
        let mut flow = flow;
        if !allowed {
            flow.set_end_reason(EndReason::Denied);
            self.drop_counted("denied", &hp.to_string());
        }
        self.flows.insert(addr, flow);
        allowed.then_some(addr)
    }

    /// The host socket for `dst`'s family, bound on first use.
    async fn socket_for(&mut self, dst: SocketAddr) -> std::io::Result<&UdpSocket> {
        let slot = if dst.is_ipv4() {
            &mut self.out4
        } else {
            &mut self.out6
        };
        if slot.is_none() {
            let any: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            *slot = Some(UdpSocket::bind(any).await?);
        }
        Ok(slot.as_ref().expect("just set"))
    }
}

/// Serves one UDP ASSOCIATE until its control connection ends.
pub(super) async fn associate(
    onramp: &Arc<OnRamp>,
    cfg: &SocksConfig,
    mut control: Stream,
    src: SocketAddr,
    identity: Option<String>,
    vnet: Option<String>,
    client_hint: proto::Addr,
) {
    let ctx = onramp.ctx();
    let Some(local) = control.local_addr() else {
        let _ = control
            .write_all(&proto::reply(proto::REP_COMMAND_NOT_SUPPORTED, None))
            .await;
        ctx.metrics
            .reject(&ctx.tenant.name, &ctx.instance, "command_not_supported");
        tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, %src, "UDP ASSOCIATE refused: a door inside a virtual network relays TCP only for now");
        return;
    };
    let relay = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => s,
        Err(e) => {
            let _ = control
                .write_all(&proto::reply(proto::REP_GENERAL_FAILURE, None))
                .await;
            tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, %src, error = %e, "UDP ASSOCIATE: cannot bind the relay socket");
            return;
        }
    };
    let relay_addr = relay.local_addr().ok();
    if control
        .write_all(&proto::reply(proto::REP_SUCCEEDED, relay_addr))
        .await
        .is_err()
    {
        return;
    }
    let client_ip = src.ip().to_canonical();
    let hint_port = match &client_hint {
        proto::Addr::Ip(a) if a.port() != 0 => Some(a.port()),
        _ => None,
    };
    let mut assoc = Assoc {
        onramp,
        src,
        identity,
        vnet,
        flows: HashMap::new(),
        names: HashMap::new(),
        out4: None,
        out6: None,
    };
    let idle = cfg.idle_timeout.unwrap_or(UDP_IDLE).min(UDP_IDLE);
    let mut client_addr: Option<SocketAddr> = None;
    let (mut b_in, mut b4, mut b6) = (
        vec![0u8; MAX_DATAGRAM],
        vec![0u8; MAX_DATAGRAM],
        vec![0u8; MAX_DATAGRAM],
    );
    let mut ctl = [0u8; 64];
    let mut last = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(idle / 4);
    let end = loop {
        let (answer, from) = tokio::select! {
            _ = onramp.stopping().cancelled() => break EndReason::Stopped,
            r = control.read(&mut ctl) => match r {
                // The client sends nothing more on the control connection;
                // its end is the association's.
                Ok(0) | Err(_) => break EndReason::Closed,
                Ok(_) => continue,
            },
            _ = tick.tick() => {
                if last.elapsed() >= idle {
                    break EndReason::IdleTimeout;
                }
                continue;
            }
            r = relay.recv_from(&mut b_in) => match r {
                Ok((n, from)) => (false, (n, from)),
                Err(_) => continue,
            },
            r = recv_opt(&assoc.out4, &mut b4) => match r {
                Ok((n, from)) => (true, (n, from)),
                Err(_) => continue,
            },
            r = recv_opt(&assoc.out6, &mut b6) => match r {
                Ok((n, from)) => (true, (n, from)),
                Err(_) => continue,
            },
        };
        let (n, from) = from;
        if !answer {
            // From the client: check the sender, parse, route, send on.
            if from.ip().to_canonical() != client_ip || hint_port.is_some_and(|p| p != from.port())
            {
                assoc.drop_counted("udp_foreign_source", &from.to_string());
                continue;
            }
            client_addr = Some(from);
            last = tokio::time::Instant::now();
            let (header, at) = match proto::parse_udp(&b_in[..n]) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    assoc.drop_counted("bad_request", "datagram shorter than its header");
                    continue;
                }
                Err(e) => {
                    assoc.drop_counted("bad_request", &e.to_string());
                    continue;
                }
            };
            if header.frag != 0 {
                assoc.drop_counted("udp_fragment", "fragmented SOCKS datagram");
                continue;
            }
            let Some(dst) = assoc.destination(&header.dst).await else {
                continue;
            };
            let payload = b_in[at..n].to_vec();
            match assoc.socket_for(dst).await {
                Ok(s) => {
                    if s.send_to(&payload, dst).await.is_ok() {
                        if let Some(f) = assoc.flows.get(&dst) {
                            f.flow().upstream(payload.len() as u64);
                        }
                    }
                }
                Err(e) => assoc.drop_counted("udp_socket", &e.to_string()),
            }
        } else {
            // An answer: only from a destination the client wrote to.
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            let Some(to) = client_addr else { continue };
            let Some(flow) = assoc
                .flows
                .get(&from)
                .filter(|f| f.verdict() == Verdict::Allow)
            else {
                continue;
            };
            last = tokio::time::Instant::now();
            let payload = if from.is_ipv4() { &b4[..n] } else { &b6[..n] };
            let mut d = proto::udp_header(from);
            d.extend_from_slice(payload);
            if relay.send_to(&d, to).await.is_ok() {
                flow.flow().downstream(n as u64);
            }
        }
    };
    for f in assoc.flows.values_mut() {
        if f.verdict() == Verdict::Allow {
            f.set_end_reason(end);
        }
    }
}
