//! The one path every connection takes, and the listener stream on-ramps share.
//!
//! An on-ramp kind (pipe, SOCKS, HTTP CONNECT, SSH channel) is its config,
//! its handshake, and one call to [`OnRamp::connect`] with the client stream,
//! its source, the target and the identity. That call:
//!
//! 1. routes the target in the chosen vnet ([`crate::core::spine::vnet::Vnets::route`]),
//!    or through the connector the on-ramp pins (a pipe's `via:`); a host
//!    name in a vnet with `dns:` is first resolved by that DNS server, over
//!    TCP through the route to it ([`crate::core::net::dns`]);
//! 2. opens the [`crate::core::spine::flow::Flow`] (tracked, counted) with that
//!    route, and asks the flow-start hooks for a [`Verdict`] (policy); a
//!    denial is counted (`meshgate_rejected_total{reason="denied"}`) and ends
//!    the flow;
//! 3. no route or a `reject` route is a counted refusal with its reason
//!    (`meshgate_dial_errors_total{reason="no_route|rejected|no_vnet"}`);
//! 4. dials through the connector ([`ModuleContext::dial`]);
//! 5. joins the two streams ([`crate::core::net::proxy::join`]);
//! 6. records a typed [`EndReason`] (audit line, metrics).
//!
//! [`OnRamp::serve`] is the accept loop every stream on-ramp shares: it
//! binds on the host or on a VPN address inside a module's network, admits
//! up to a connection limit, tracks every connection for drain and stop, and
//! binds again when the network under a VPN listener restarts.
//!
//! The folder holds one concern per file: [`listen`] (accepting),
//! [`stream`] (the stream path), [`datagram`] (the datagram path) and
//! [`decide`] (routing and resolution, with a typed result); [`http`] holds
//! what the HTTP doors share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::logs;
use crate::core::spine::module::ModuleContext;
use crate::core::spine::reject::RejectReason;

mod datagram;
mod decide;
pub mod http;
mod listen;
pub mod publish;
mod stream;
pub mod transparent;

pub use datagram::{Admitted, DatagramError, Datagrams};
pub use decide::{Refusal, RouteVia};
pub use listen::{Accepted, DoorListener, ListenOn, RunningListener, Slot, StreamHandler};
pub use stream::{Answer, ConnectRequest, PublishedConn, Target};

/// What a stream on-ramp instance shares between its listener and its
/// connections: its module context, connection count, tracker and stop.
pub struct OnRamp {
    ctx: ModuleContext,
    active: Arc<AtomicUsize>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl OnRamp {
    /// An on-ramp for the module `ctx` belongs to.
    pub fn new(ctx: ModuleContext) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            active: Arc::new(AtomicUsize::new(0)),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// The module's context.
    pub fn ctx(&self) -> &ModuleContext {
        &self.ctx
    }

    fn tenant(&self) -> &str {
        &self.ctx.tenant.name
    }

    /// Connections (or sessions) open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Cancelled when the on-ramp stops: every connection ends.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop
    }

    /// Runs `work` as one of this on-ramp's connections: [`OnRamp::stop`]
    /// waits for it.
    pub fn spawn<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work);
    }

    /// Counts a flow a policy change ended.
    pub(crate) fn count_revoked(&self) {
        self.ctx.metrics.reject(
            self.tenant(),
            &self.ctx.instance,
            RejectReason::PolicyRevoked,
        );
    }

    /// Counts and logs a flow the policy (or a flow-start hook) denied.
    pub(crate) fn denied(&self, flow: &crate::core::spine::flow::FlowGuard, why: &str) {
        self.ctx
            .metrics
            .reject(self.tenant(), &self.ctx.instance, RejectReason::Denied);
        if let Some(suppressed) = logs::allow("onramp.denied") {
            let f = &flow.flow().ctx;
            tracing::info!(tenant = %self.tenant(), instance = %self.ctx.instance, src = %f.src, dst = ?f.dst, identity = ?f.identity, protocol = ?f.protocol, reason = ?why, suppressed, "flow denied");
        }
    }

    /// Counts and logs a client (or one of its requests) refused before
    /// anything was dialed: `meshgate_rejected_total{reason}`, and a
    /// warning rate-limited under `log_key` with the client's address, its
    /// identity if known, and what it was told.
    pub fn refused(
        &self,
        log_key: &'static str,
        src: std::net::SocketAddr,
        identity: Option<&str>,
        reason: RejectReason,
        detail: &str,
    ) {
        self.ctx
            .metrics
            .reject(self.tenant(), &self.ctx.instance, reason);
        if let Some(suppressed) = logs::allow(log_key) {
            tracing::warn!(tenant = %self.tenant(), instance = %self.ctx.instance, kind = %self.ctx.kind, %src, ?identity, %reason, detail = ?detail, suppressed, "client refused");
        }
    }

    /// Closes every connection and waits until they are gone.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests;
