//! The datagram path: UDP sessions routed and checked as streams are
//! ([`OnRamp::open_datagrams`], [`OnRamp::route_datagrams`]) and relayed as
//! flows ([`OnRamp::relay_datagrams`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::core::addr::HostPort;
use crate::core::spine::dest::ChosenBy;
use crate::core::spine::flow::{EndReason, FlowContext, Verdict};
use crate::core::spine::router::Connector;

use super::decide::{Refusal, RouteVia};
use crate::core::net::proxy::Traffic;

use super::OnRamp;

/// Why datagrams to a target have nowhere to go.
#[derive(Debug, thiserror::Error)]
pub enum DatagramError {
    /// Routing or the checks refused the target.
    #[error(transparent)]
    Refused(Refusal),
    /// The route leads through a connector that cannot take a name, and
    /// nothing resolved it on this side.
    #[error(
        "{target}: names are not resolved inside `{connector}`; give the vnet `hosts:` or `dns:`"
    )]
    Unresolved {
        /// The target as named.
        target: HostPort,
        /// The connector its route leads through.
        connector: Connector,
    },
    /// No socket could be bound through the route's connector.
    #[error(transparent)]
    Bind(crate::core::net::dial::DialError),
}

impl DatagramError {
    /// The reason counted in `meshgate_dial_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            DatagramError::Refused(r) => r.reason(),
            DatagramError::Unresolved { .. } => "resolve",
            DatagramError::Bind(e) => e.reason(),
        }
    }
}

/// A UDP session whose flow is open and allowed ([`OnRamp::admit_datagrams`]).
pub struct Admitted {
    flow: crate::core::spine::flow::FlowGuard,
    upstream: Datagrams,
}

/// Where datagrams to one target go ([`OnRamp::open_datagrams`]).
pub struct Datagrams {
    /// The socket to send from and receive answers on.
    pub socket: Arc<dyn crate::core::net::datagram::DatagramSocket>,
    /// The target's address.
    pub remote: SocketAddr,
    /// The route, as flows show it.
    pub route: String,
}

impl OnRamp {
    /// Relays one UDP session as a flow until `idle` passes without a
    /// datagram either way, the on-ramp stops, or a socket fails: what
    /// arrives on `rx` (the client's datagrams) goes to the remote of
    /// `upstream`; the remote's answers go to `client` from `reply` (the
    /// listening socket, or a TPROXY reply socket). `flow` names the
    /// session; bytes are counted both ways.
    pub async fn relay_datagrams(
        &self,
        flow: FlowContext,
        upstream: Datagrams,
        reply: Arc<dyn crate::core::net::datagram::DatagramSocket>,
        client: SocketAddr,
        mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        idle: Duration,
    ) {
        match self.admit_datagrams(flow, upstream) {
            Ok(admitted) => self.relay(admitted, reply, client, rx, idle).await,
            Err(_) => rx.close(),
        }
    }

    /// Opens the flow of a UDP session and asks the policy: the admitted
    /// session, or `Denied` (counted and logged) for an on-ramp that tells
    /// its client before relaying.
    pub fn admit_datagrams(
        &self,
        flow: FlowContext,
        upstream: Datagrams,
    ) -> Result<Admitted, EndReason> {
        let ctx = &self.ctx;
        let mut flow =
            ctx.flows
                .open_routed(flow, Some(upstream.route.clone()), &ctx.instance_metrics);
        if let Verdict::Deny(why) = flow.verdict() {
            self.denied(&flow, &why);
            flow.set_end_reason(EndReason::Denied);
            return Err(EndReason::Denied);
        }
        Ok(Admitted { flow, upstream })
    }

    /// Relays an admitted UDP session, as [`OnRamp::relay_datagrams`].
    pub async fn relay(
        &self,
        admitted: Admitted,
        reply: Arc<dyn crate::core::net::datagram::DatagramSocket>,
        client: SocketAddr,
        mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        idle: Duration,
    ) {
        let Admitted { mut flow, upstream } = admitted;
        let (socket, remote) = (upstream.socket, upstream.remote);
        let mut buf = vec![0u8; 65_535];
        let revoked = flow.flow().clone();
        let reason = loop {
            tokio::select! {
                _ = self.stop.cancelled() => break EndReason::Stopped,
                _ = revoked.revoked() => {
                    self.count_revoked();
                    break EndReason::PolicyRevoked;
                }
                _ = tokio::time::sleep(idle) => break EndReason::IdleTimeout,
                d = rx.recv() => match d {
                    Some(d) => match socket.send_to(&d, remote).await {
                        Ok(n) => flow.flow().upstream(n as u64),
                        Err(e) => {
                            tracing::debug!(%client, error = %e, "udp send to remote failed");
                            break EndReason::UpstreamError;
                        }
                    },
                    None => break EndReason::Closed,
                },
                r = socket.recv_from(&mut buf) => match r {
                    // Only the remote's answers: the socket is the session's own.
                    Ok((n, from)) if from.ip().to_canonical() == remote.ip() && from.port() == remote.port() => {
                        match reply.send_to(&buf[..n], client).await {
                            Ok(n) => flow.flow().downstream(n as u64),
                            Err(e) => tracing::debug!(%client, error = %e, "udp send to client failed"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(%client, error = %e, "udp recv from remote failed");
                        break EndReason::UpstreamError;
                    }
                },
            }
        };
        rx.close();
        flow.set_end_reason(reason);
    }

    /// Datagrams to `target`: routed and checked as a stream would be
    /// (`via`: the vnet's table with its `hosts:`/`dns:`, or a pinned
    /// connector; the name resolved where the route says), and a socket
    /// bound through the route's connector. Returns the socket, the remote
    /// to send to and the route as flows show it; or the counted reason
    /// and a message.
    pub async fn open_datagrams(
        &self,
        via: &RouteVia,
        target: &HostPort,
        chosen_by: ChosenBy,
        timeout: Duration,
    ) -> Result<Datagrams, DatagramError> {
        let (connector, remote, route) = self
            .route_datagrams(via, target, chosen_by, timeout)
            .await?;
        let socket = self
            .ctx
            .bind_udp(&connector, remote)
            .await
            .map_err(DatagramError::Bind)?;
        Ok(Datagrams {
            socket,
            remote,
            route,
        })
    }

    /// As [`OnRamp::open_datagrams`] without the socket: the connector the
    /// datagrams leave through, the remote and the route as flows show it
    /// (a SOCKS association sends to many remotes from one socket per
    /// connector).
    pub async fn route_datagrams(
        &self,
        via: &RouteVia,
        target: &HostPort,
        chosen_by: ChosenBy,
        timeout: Duration,
    ) -> Result<(Connector, SocketAddr, String), DatagramError> {
        let plan = self
            .plan(via, target, chosen_by, timeout)
            .await
            .map_err(DatagramError::Refused)?;
        let Some((connector, remote)) = plan
            .candidates
            .iter()
            .find_map(|(c, t)| t.ip().map(|ip| (c.clone(), SocketAddr::new(ip, t.port))))
        else {
            let (c, t) = &plan.candidates[0];
            return Err(DatagramError::Unresolved {
                target: t.clone(),
                connector: c.clone(),
            });
        };
        Ok((connector, remote, plan.shown))
    }
}
