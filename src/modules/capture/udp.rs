//! TPROXY for UDP: datagrams the rules deliver with their destination
//! intact. Each (client, original destination) pair is a session: the
//! first datagram opens it (admission here; routing, the socket through
//! the route's connector and a reply socket bound on the original
//! destination in the session's task, so the receive loop never waits),
//! and the remote's answers go back to the client *from* the address it
//! sent to, as if nothing stood between them. Sessions end after the idle
//! timeout or with the module.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::CaptureConfig;
use crate::core::addr::HostPort;
use crate::core::net::datagram::{bind_reply_udp, TproxyUdp};
use crate::core::spine::door::Live;
use crate::core::spine::flow::{FlowContext, Protocol};
use crate::core::spine::onramp::{OnRamp, RouteVia};
use crate::core::spine::reject::RejectReason;

/// Datagrams queued per session before new ones are dropped (and counted).
const SESSION_QUEUE: usize = 256;
/// A session ends after this long without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

type Sessions = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Vec<u8>>>>>;

/// Receives on `socket` until `cancel`.
pub(super) async fn serve(
    onramp: Arc<OnRamp>,
    state: Arc<Live<CaptureConfig>>,
    socket: TproxyUdp,
    cancel: CancellationToken,
) {
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; 65_535];
    let ctx = onramp.ctx().clone();
    let (tenant, instance) = (ctx.tenant.name.clone(), ctx.instance.clone());
    loop {
        let (n, src, orig) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(%tenant, %instance, error = %e, "tproxy udp recv failed");
                    continue;
                }
            },
        };
        let listen = state.get().door.listen.0;
        let Some(orig) = orig.filter(|o| !super::to_capture_port(listen, *o)) else {
            ctx.metrics
                .reject(&tenant, &instance, RejectReason::NotCaptured);
            continue;
        };
        let key = (src, orig);
        let existing = sessions.lock().expect("poisoned").get(&key).cloned();
        let tx = match existing {
            Some(tx) if !tx.is_closed() => tx,
            _ => {
                let Some(slot) = onramp.try_admit(state.get().door.max_connections) else {
                    continue;
                };
                let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                sessions.lock().expect("poisoned").insert(key, tx.clone());
                let (onramp2, state, sessions) = (onramp.clone(), state.clone(), sessions.clone());
                onramp.spawn(async move {
                    session(&onramp2, &state, src, orig, rx).await;
                    drop(slot);
                    let mut map = sessions.lock().expect("poisoned");
                    if map.get(&key).is_some_and(|t| t.is_closed()) {
                        map.remove(&key);
                    }
                });
                tx
            }
        };
        if tx.try_send(buf[..n].to_vec()).is_err() {
            ctx.metrics
                .reject(&tenant, &instance, RejectReason::UdpQueueFull);
        }
    }
}

/// One session: route the original destination, bind the reply socket on
/// it, relay.
async fn session(
    onramp: &Arc<OnRamp>,
    state: &Live<CaptureConfig>,
    src: SocketAddr,
    orig: SocketAddr,
    rx: mpsc::Receiver<Vec<u8>>,
) {
    let cfg = state.get();
    let ctx = onramp.ctx();
    let (tenant, instance) = (&ctx.tenant.name, &ctx.instance);
    let target = HostPort {
        host: orig.ip().to_canonical().to_string(),
        port: orig.port(),
    };
    let upstream = match onramp
        .open_datagrams(
            &RouteVia::Vnet(cfg.door.vnet.clone()),
            &target,
            crate::core::spine::dest::ChosenBy::Client,
            cfg.door.connect_timeout,
        )
        .await
    {
        Ok(d) => d,
        Err(e) => {
            ctx.metrics.dial_error(tenant, instance, e.reason());
            if let Some(suppressed) = crate::core::logs::allow("capture.udp_not_opened") {
                tracing::warn!(%tenant, %instance, %src, %orig, error = %e, suppressed, "captured udp session not opened");
            }
            return;
        }
    };
    let reply = match bind_reply_udp(orig) {
        Ok(r) => r,
        Err(e) => {
            ctx.metrics.dial_error(tenant, instance, "reply_bind");
            if let Some(suppressed) = crate::core::logs::allow("capture.udp_reply") {
                tracing::warn!(%tenant, %instance, %orig, error = %e, suppressed, "cannot answer from the original destination");
            }
            return;
        }
    };
    let flow = FlowContext {
        tenant: tenant.clone(),
        instance: instance.clone(),
        identity: None,
        src,
        dst: orig.to_string(),
        protocol: Protocol::Udp,
        kind: ctx.kind.clone(),
        dialed: Some(upstream.remote),
        trace: None,
    };
    onramp
        .relay_datagrams(flow, upstream, reply, src, rx, UDP_IDLE)
        .await;
}
