//! The stream path: one call per connection ([`OnRamp::connect`], or
//! [`OnRamp::connect_answering`] for an on-ramp that owes its client a
//! reply) decides, opens the flow with its verdict, dials the candidates
//! in order, answers the client, joins the two streams and records the
//! typed end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::core::addr::HostPort;
use crate::core::logs;
use crate::core::net::dial::{DialFailure, DialMeta};
use crate::core::net::proxy::{self, ProxyOptions, Stream};
use crate::core::net::proxy_protocol;
use crate::core::spine::dest::ChosenBy;
use crate::core::spine::flow::{EndReason, FlowContext, Protocol, Trace, Verdict};

use super::decide::{Plan, Refusal, RouteVia};
use super::OnRamp;

/// Where the target is, as the on-ramp knows it.
#[derive(Debug, Clone)]
pub enum Target {
    /// `host:port`, routed in the vnet.
    Addr(HostPort),
    /// The on-ramp could not work out a target (e.g. an unknown peer name):
    /// the flow is refused as `no_route` with this explanation.
    Unknown {
        /// What the client asked for, for logs and the flow table.
        label: String,
        /// Why it cannot be reached.
        error: String,
    },
}

/// One connection for [`OnRamp::connect`].
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The client's address.
    pub src: SocketAddr,
    /// Where it wants to go.
    pub target: Target,
    /// Who it is, as the on-ramp authenticated it (SOCKS user, SSH key).
    pub identity: Option<String>,
    /// How the way out is chosen.
    pub via: RouteVia,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// End the flow after this long without traffic.
    pub idle_timeout: Option<Duration>,
    /// The address the client connected to, as it saw it (the listener's,
    /// a load balancer's from its PROXY header; the original destination
    /// of a captured connection).
    pub client_dst: Option<SocketAddr>,
    /// Send a PROXY protocol header of this version to the upstream first,
    /// so the backend sees `src` as the client.
    pub proxy_protocol: Option<proxy_protocol::Version>,
    /// Who chose `target`: a door's client is held to the safe defaults
    /// ([`crate::core::spine::dest`]); the operator's config is trusted.
    pub chosen_by: ChosenBy,
    /// The W3C trace context the client sent (`traceparent`, `baggage`),
    /// for the audit record.
    pub trace: Option<Arc<Trace>>,
}

/// The client side of a connection for [`OnRamp::connect_answering`]: it
/// learns the flow's fate once (after the dial, before any byte is
/// relayed) and hands over the stream to relay. An on-ramp with a handshake
/// answers here: a SOCKS reply, an HTTP status before the upgrade.
#[async_trait]
pub trait Answer: Send {
    /// `Ok(bound)`: the upstream is connected (`bound`: its local address,
    /// where known); return the client stream to relay, or `None` if the
    /// client is gone. `Err(reason)`: the flow ends here (denied, no route,
    /// dial failed); tell the client and return `None`.
    async fn answer(
        self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream>;

    /// Whether the answer uses the upstream's local address (a SOCKS reply
    /// does); if not, it is not asked of the socket. Default: yes.
    fn wants_bound(&self) -> bool {
        true
    }
}

/// A client that needs no answer: relayed as it is, dropped on failure.
struct Silent(Stream);

#[async_trait]
impl Answer for Silent {
    async fn answer(
        self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream> {
        outcome.ok().map(|_| self.0)
    }

    fn wants_bound(&self) -> bool {
        false
    }
}

impl OnRamp {
    /// The one path: route, flow (with the policy verdict), dial, join,
    /// typed end. Returns why the flow ended.
    pub async fn connect(&self, client: Stream, req: ConnectRequest) -> EndReason {
        self.connect_answering(req, Box::new(Silent(client))).await
    }

    /// [`OnRamp::connect`] for an on-ramp that owes its client an answer
    /// (a SOCKS reply, an HTTP status): `client` learns the outcome after
    /// the dial and before the join, or the reason the flow ends, and hands
    /// over the stream to relay.
    pub async fn connect_answering(
        &self,
        req: ConnectRequest,
        client: Box<dyn Answer + '_>,
    ) -> EndReason {
        let ctx = &self.ctx;
        let (tenant, instance) = (self.tenant(), ctx.instance.as_str());
        let dst = match &req.target {
            Target::Addr(t) => t.to_string(),
            Target::Unknown { label, .. } => label.clone(),
        };
        // Decide the route first, on the address that will be dialed, so
        // the policy sees where the flow goes and the audit line says it. A
        // name is resolved where its route says (the vnet's `hosts:` or
        // `dns:`, the host's resolver for a `direct` route; a gateway link
        // resolves on its far side), and every address is checked.
        let mut flow_ctx = FlowContext {
            tenant: tenant.to_string(),
            instance: instance.to_string(),
            identity: req.identity.clone(),
            src: req.src,
            dst: dst.clone(),
            protocol: Protocol::Tcp,
            kind: ctx.kind.clone(),
            dialed: None,
            trace: req.trace.clone(),
        };
        let routed: Result<Plan, Refusal> = match &req.target {
            Target::Unknown { error, .. } => Err(Refusal::Unknown(error.clone())),
            Target::Addr(t) => self
                .plan(&req.via, t, req.chosen_by, req.connect_timeout)
                .await
                .map(|p| self.admitted_by_policy(p, &flow_ctx)),
        };
        let shown_route = match &routed {
            Ok(plan) => {
                flow_ctx.dialed = plan.dialed();
                plan.shown.clone()
            }
            Err(r) => r.to_string(),
        };
        let mut flow = ctx
            .flows
            .open_routed(flow_ctx, Some(shown_route), &ctx.instance_metrics);
        let work = async {
            // Phase one: the verdict, the route and the dial.
            let dialed: Result<Stream, EndReason> = async {
                if let Verdict::Deny(why) = flow.verdict() {
                    self.denied(&flow, &why);
                    return Err(EndReason::Denied);
                }
                let plan = match routed {
                    Ok(plan) => plan,
                    Err(refusal) => {
                        ctx.metrics.dial_error(tenant, instance, refusal.reason());
                        if let Some(suppressed) = logs::allow("onramp.refused") {
                            tracing::warn!(%tenant, %instance, src = %req.src, dst = ?dst, error = ?refusal.to_string(), suppressed, "refused");
                        }
                        return Err(refusal.end_reason());
                    }
                };
                // Every candidate passed the checks: the first that answers wins.
                let deadline = tokio::time::Instant::now() + req.connect_timeout;
                let meta = DialMeta {
                    src: Some(req.src),
                    trace: req.trace.clone(),
                };
                let mut last = None;
                for (connector, target) in &plan.candidates {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match ctx.dial(connector, target, left, &meta).await {
                        Ok(s) => return Ok(s),
                        Err(e) => {
                            if let Some(suppressed) = logs::allow("onramp.dial_failed") {
                                tracing::warn!(%tenant, %instance, src = %req.src, dst = ?dst, %target, via = %connector, error = %e, suppressed, "dial failed");
                            }
                            last = Some(e);
                        }
                    }
                }
                let failure = last.as_ref().map_or(DialFailure::Timeout, |e| e.failure());
                ctx.metrics.dial_error(tenant, instance, failure.as_str());
                Err(EndReason::DialFailed(failure))
            }
            .await;
            // Phase two: tell the client (where the on-ramp owes it an
            // answer), then relay.
            let upstream = match dialed {
                Ok(up) => up,
                Err(reason) => {
                    client.answer(Err(reason)).await;
                    return reason;
                }
            };
            let mut upstream = upstream;
            let bound = if client.wants_bound() {
                upstream.local_addr()
            } else {
                None
            };
            let Some(client) = client.answer(Ok(bound)).await else {
                return EndReason::DownstreamError;
            };
            if let Some(v) = req.proxy_protocol {
                use tokio::io::AsyncWriteExt;
                let to = req
                    .client_dst
                    .unwrap_or_else(|| SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
                let header = proxy_protocol::encode(v, req.src, to);
                if upstream.write_all(&header).await.is_err() {
                    return EndReason::UpstreamError;
                }
            }
            let opts = ProxyOptions {
                idle_timeout: req.idle_timeout,
                ..ProxyOptions::default()
            };
            proxy::join(client, upstream, flow.flow().as_ref(), &opts)
                .await
                .end
                .into()
        };
        let reason = tokio::select! {
            r = work => r,
            _ = self.stop.cancelled() => EndReason::Stopped,
            _ = flow.flow().revoked() => EndReason::PolicyRevoked,
        };
        if reason == EndReason::PolicyRevoked {
            self.count_revoked();
        }
        flow.set_end_reason(reason);
        reason
    }
}

/// A connection to a port a client published (`ssh -R`, a link's
/// `forwards:`), for [`OnRamp::carry_published`].
pub struct PublishedConn<'a> {
    /// The client that connected to the published port.
    pub src: SocketAddr,
    /// Who published it (the flow's identity).
    pub publisher: &'a str,
    /// What was published (`ssh -R host:port`, `published 127.0.0.1:8081`).
    pub dst: String,
    /// The way back, for the flow table (`the SSH session of ...`).
    pub route: String,
    /// End the flow after this long without traffic.
    pub idle_timeout: Option<Duration>,
}

impl OnRamp {
    /// Carries a connection to a published port back to its publisher: one
    /// flow with the publisher as identity, checked by the policy;
    /// `upstream` opens the way back (a channel, a parked tunnel stream);
    /// then the two are joined until either ends or a policy change
    /// revokes the flow. Returns why it ended.
    pub async fn carry_published<F>(
        &self,
        client: Stream,
        conn: PublishedConn<'_>,
        upstream: F,
    ) -> EndReason
    where
        F: std::future::Future<Output = Result<Stream, EndReason>>,
    {
        let ctx = &self.ctx;
        let mut flow = ctx.flows.open_routed(
            FlowContext {
                tenant: ctx.tenant.name.clone(),
                instance: ctx.instance.clone(),
                identity: Some(conn.publisher.to_string()),
                src: conn.src,
                dst: conn.dst,
                protocol: Protocol::Tcp,
                kind: ctx.kind.clone(),
                dialed: None,
                trace: None,
            },
            Some(conn.route),
            &ctx.instance_metrics,
        );
        if let Verdict::Deny(why) = flow.verdict() {
            self.denied(&flow, &why);
            flow.set_end_reason(EndReason::Denied);
            return EndReason::Denied;
        }
        let reason = match upstream.await {
            Ok(upstream) => {
                let opts = ProxyOptions {
                    idle_timeout: conn.idle_timeout,
                    ..Default::default()
                };
                let f = flow.flow().clone();
                tokio::select! {
                    j = proxy::join(client, upstream, f.as_ref(), &opts) => j.end.into(),
                    // A policy change that denies it ends it at once.
                    _ = f.revoked() => {
                        self.count_revoked();
                        EndReason::PolicyRevoked
                    }
                }
            }
            Err(reason) => reason,
        };
        flow.set_end_reason(reason);
        reason
    }
}
