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
//! Destinations route like any flow (the vnet's routes, `hosts:` and
//! `dns:`): through `direct` routes on a host socket, into a WireGuard
//! network through its engine. An association has one socket per
//! connector (and address family), as dante does, whatever the number of
//! destinations: answers are told apart by their source. At most
//! [`MAX_DESTINATIONS`] destinations per association (more are dropped
//! and counted, `udp_too_many_destinations`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::SocksConfig;
use super::proto;
use crate::core::logs;
use crate::core::net::dial::DialFailure;
use crate::core::net::proxy::{Stream, Traffic};
use crate::core::spine::flow::{EndReason, FlowContext, FlowGuard, Protocol, Verdict};
use crate::core::spine::onramp::{ListenOn, OnRamp, RouteVia};
use crate::core::spine::reject::RejectReason;
use crate::core::spine::router::Connector;

type Socket = Arc<dyn crate::core::net::datagram::DatagramSocket>;

/// Destinations one association may open flows to.
pub const MAX_DESTINATIONS: usize = 1024;
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// An association without a datagram either way for this long ends
/// (unless `idle_timeout` is shorter).
const UDP_IDLE: Duration = Duration::from_secs(300);

/// One destination of an association: its flow and socket.
struct Dest {
    flow: FlowGuard,
    /// The socket and the destination's address (`None`: denied or
    /// unroutable, its datagrams dropped).
    socket: Option<(Socket, SocketAddr)>,
}

/// The per-association state.
struct Assoc<'a> {
    onramp: &'a Arc<OnRamp>,
    src: SocketAddr,
    identity: Option<String>,
    vnet: Option<String>,
    timeout: Duration,
    /// By the destination as the client names it.
    dests: HashMap<String, Dest>,
    /// The destinations written to, by address: whose answers come back.
    by_remote: HashMap<SocketAddr, String>,
    /// One socket per connector and address family (IPv6 or not).
    sockets: HashMap<(Connector, bool), Socket>,
    /// Answers from every destination's socket: (from, payload).
    answers: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    stop: CancellationToken,
}

impl Assoc<'_> {
    fn drop_counted(&self, reason: RejectReason, detail: &str) {
        let ctx = self.onramp.ctx();
        ctx.metrics.reject(&ctx.tenant.name, &ctx.instance, reason);
        if let Some(suppressed) = logs::allow("socks.udp_drop") {
            tracing::debug!(tenant = %ctx.tenant.name, instance = %ctx.instance, src = %self.src, %reason, detail, suppressed, "SOCKS UDP datagram dropped");
        }
    }

    /// A destination with no route or no socket: counted as the stream
    /// path counts it (`meshgate_dial_errors_total`), the datagram dropped.
    fn dial_failed(&self, reason: &'static str, detail: &str) {
        let ctx = self.onramp.ctx();
        ctx.metrics
            .dial_error(&ctx.tenant.name, &ctx.instance, reason);
        if let Some(suppressed) = logs::allow("socks.udp_drop") {
            tracing::debug!(tenant = %ctx.tenant.name, instance = %ctx.instance, src = %self.src, reason, detail, suppressed, "SOCKS UDP destination not opened");
        }
    }

    /// Sends `payload` to `dst`, opening its flow and socket on first use.
    async fn send(&mut self, dst: &proto::Addr, payload: &[u8]) {
        let key = dst.to_string();
        if !self.dests.contains_key(&key) {
            if self.dests.len() >= MAX_DESTINATIONS {
                return self.drop_counted(RejectReason::UdpTooManyDestinations, &key);
            }
            let dest = self.open(dst).await;
            self.dests.insert(key.clone(), dest);
        }
        let d = &self.dests[&key];
        let Some((socket, to)) = &d.socket else {
            return; // denied or unroutable: counted when it was opened
        };
        if d.flow.flow().is_revoked() {
            // A policy change denied it: counted when it was revoked.
            return;
        }
        if socket.send_to(payload, *to).await.is_ok() {
            d.flow.flow().upstream(payload.len() as u64);
        }
    }

    /// Routes `dst`, opens its flow (policy) and binds its socket through
    /// the route's connector; answers go to the association's channel.
    async fn open(&mut self, dst: &proto::Addr) -> Dest {
        let ctx = self.onramp.ctx();
        let hp = dst.host_port();
        let via = RouteVia::Vnet(self.vnet.clone());
        let routed = self
            .onramp
            .route_datagrams(
                &via,
                &hp,
                crate::core::spine::dest::ChosenBy::Client,
                self.timeout,
            )
            .await;
        let (route, dialed) = match &routed {
            Ok((_, remote, route)) => (Some(route.clone()), Some(*remote)),
            Err(e) => (Some(e.to_string()), None),
        };
        let mut flow = ctx.flows.open_routed(
            FlowContext {
                tenant: ctx.tenant.name.clone(),
                instance: ctx.instance.clone(),
                identity: self.identity.clone(),
                src: self.src,
                dst: hp.to_string(),
                protocol: Protocol::Udp,
                kind: ctx.kind.clone(),
                dialed,
                trace: None,
            },
            route,
            &ctx.instance_metrics,
        );
        let (connector, remote) = match routed {
            Ok((c, r, _)) => (c, r),
            Err(e) => {
                flow.set_end_reason(EndReason::NoRoute);
                self.dial_failed(e.reason(), &e.to_string());
                return Dest { flow, socket: None };
            }
        };
        if flow.verdict() != Verdict::Allow {
            flow.set_end_reason(EndReason::Denied);
            self.drop_counted(RejectReason::Denied, &hp.to_string());
            return Dest { flow, socket: None };
        }
        let socket = match self.socket_for(&connector, remote).await {
            Ok(s) => s,
            Err((failure, m)) => {
                flow.set_end_reason(EndReason::DialFailed(failure));
                self.dial_failed(failure.as_str(), &m);
                return Dest { flow, socket: None };
            }
        };
        self.by_remote.insert(remote, dst.to_string());
        Dest {
            flow,
            socket: Some((socket, remote)),
        }
    }

    /// The association's socket through `connector` for `remote`'s address
    /// family, bound on first use; its answers go to the association's
    /// channel, tagged with their source.
    async fn socket_for(
        &mut self,
        connector: &Connector,
        remote: SocketAddr,
    ) -> Result<Socket, (DialFailure, String)> {
        let key = (connector.clone(), remote.is_ipv6());
        if let Some(s) = self.sockets.get(&key) {
            return Ok(s.clone());
        }
        let socket = self
            .onramp
            .ctx()
            .bind_udp(connector, remote)
            .await
            .map_err(|e| (e.failure(), e.to_string()))?;
        let (answers, stop, rx) = (self.answers.clone(), self.stop.clone(), socket.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let r = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.recv_from(&mut buf) => r,
                };
                match r {
                    Ok((n, from)) => {
                        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                        if answers.send((from, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        self.sockets.insert(key, socket.clone());
        Ok(socket)
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
    // The relay goes where the client reached the door: its address on the
    // host, or in the network of `listen_via` (a VPN address).
    let local = control
        .local_addr()
        .or_else(|| Some(cfg.door.listen.0).filter(|a| !a.ip().is_unspecified()));
    let Some(local) = local else {
        let _ = control
            .write_all(&proto::reply(proto::REP_GENERAL_FAILURE, None))
            .await;
        ctx.metrics.reject(
            &ctx.tenant.name,
            &ctx.instance,
            RejectReason::UdpNoRelayAddress,
        );
        tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, %src, "UDP ASSOCIATE refused: the door listens on an unspecified address inside a virtual network; give `listen` its VPN address");
        return;
    };
    let on = ListenOn::new(SocketAddr::new(local.ip(), 0), cfg.door.listen_via.as_ref());
    let relay = match onramp.bind_udp(&on).await {
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
    let (answers_tx, mut answers) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let mut assoc = Assoc {
        onramp,
        src,
        identity,
        vnet,
        timeout: cfg.door.connect_timeout,
        dests: HashMap::new(),
        by_remote: HashMap::new(),
        sockets: HashMap::new(),
        answers: answers_tx,
        stop,
    };
    let idle = cfg.door.idle_timeout.unwrap_or(UDP_IDLE).min(UDP_IDLE);
    let mut client_addr: Option<SocketAddr> = None;
    let mut b_in = vec![0u8; MAX_DATAGRAM];
    let mut ctl = [0u8; 64];
    let mut last = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(idle / 4);
    let end = loop {
        tokio::select! {
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
            }
            r = relay.recv_from(&mut b_in) => {
                let Ok((n, from)) = r else { continue };
                // From the client: check the sender, parse, route, send on.
                if from.ip().to_canonical() != client_ip || hint_port.is_some_and(|p| p != from.port()) {
                    assoc.drop_counted(RejectReason::UdpForeignSource, &from.to_string());
                    continue;
                }
                client_addr = Some(from);
                last = tokio::time::Instant::now();
                let (header, at) = match proto::parse_udp(&b_in[..n]) {
                    Ok(Some(h)) => h,
                    Ok(None) => {
                        assoc.drop_counted(RejectReason::BadRequest, "datagram shorter than its header");
                        continue;
                    }
                    Err(e) => {
                        assoc.drop_counted(RejectReason::BadRequest, &e.to_string());
                        continue;
                    }
                };
                if header.frag != 0 {
                    assoc.drop_counted(RejectReason::UdpFragment, "fragmented SOCKS datagram");
                    continue;
                }
                let payload = b_in[at..n].to_vec();
                assoc.send(&header.dst, &payload).await;
            }
            Some((from, payload)) = answers.recv() => {
                // Only answers from a destination the client wrote to (and
                // whose flow stands) go back, as through a NAT with address
                // filtering.
                let Some(to) = client_addr else { continue };
                let Some(dest) = assoc.by_remote.get(&from).and_then(|k| assoc.dests.get(k)) else {
                    assoc.drop_counted(RejectReason::UdpForeignSource, &from.to_string());
                    continue;
                };
                if dest.flow.flow().is_revoked() {
                    continue;
                }
                last = tokio::time::Instant::now();
                let mut d = proto::udp_header(from);
                d.extend_from_slice(&payload);
                if relay.send_to(&d, to).await.is_ok() {
                    dest.flow.flow().downstream(payload.len() as u64);
                }
            }
        }
    };
    for d in assoc.dests.values_mut() {
        if d.socket.is_some() {
            d.flow.set_end_reason(end);
        }
    }
}
