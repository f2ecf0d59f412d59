//! UDP taken transparently (TPROXY, or a `kind: netns` namespace's only
//! way out): each (client, original destination) pair is a session. The
//! first datagram opens it (admission here; routing, the socket through the
//! route's connector and the reply socket in the session's task, so the
//! receive loop never waits), and the remote's answers go back to the
//! client *from* the address it sent to, as if nothing stood between them.
//! Sessions end after [`UDP_IDLE`] without a datagram, or with the module.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::net::datagram::DatagramSocket;
use crate::core::spine::dest::ChosenBy;
use crate::core::spine::flow::{FlowContext, Protocol};
use crate::core::spine::reject::RejectReason;

use super::{OnRamp, RouteVia};

/// Datagrams queued per session before new ones are dropped (and counted).
const SESSION_QUEUE: usize = 256;
/// A session ends after this long without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// Where transparently taken datagrams arrive.
#[async_trait]
pub trait TransparentDatagrams: Send + Sync + 'static {
    /// One datagram: its length, source and original destination (`None`
    /// when it was not steered here).
    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)>;
    /// A socket that answers clients from `orig`.
    fn reply_from(&self, orig: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>>;
}

/// What a door decides for each session, read when it opens.
pub struct SessionRules {
    /// Where sessions route.
    pub via: RouteVia,
    /// Sessions (with the door's connections) at once.
    pub max: usize,
    /// How long opening the upstream socket may take.
    pub connect_timeout: Duration,
}

type Sessions = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Vec<u8>>>>>;

impl OnRamp {
    /// Receives on `socket` until `cancel`: `target_of` names where a
    /// session to an original destination goes (`None`: refused and
    /// counted as `not_captured`); `rules` are read as each session opens.
    pub async fn serve_transparent_udp<T, R>(
        self: Arc<Self>,
        socket: Arc<dyn TransparentDatagrams>,
        target_of: T,
        rules: R,
        cancel: CancellationToken,
    ) where
        T: Fn(SocketAddr) -> Option<HostPort> + Send + Sync + 'static,
        R: Fn() -> SessionRules + Send + Sync + 'static,
    {
        let sessions: Sessions = Arc::default();
        let mut buf = vec![0u8; 65_535];
        let (tenant, instance) = (self.ctx.tenant.name.clone(), self.ctx.instance.clone());
        let rules = Arc::new(rules);
        loop {
            let (n, src, orig) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = socket.recv(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => return,
                    Err(e) => {
                        tracing::debug!(%tenant, %instance, error = %e, "transparent udp recv failed");
                        continue;
                    }
                },
            };
            let Some((orig, target)) = orig.and_then(|o| Some((o, target_of(o)?))) else {
                self.ctx
                    .metrics
                    .reject(&tenant, &instance, RejectReason::NotCaptured);
                continue;
            };
            let key = (src, orig);
            let existing = sessions.lock().expect("poisoned").get(&key).cloned();
            let tx = match existing {
                Some(tx) if !tx.is_closed() => tx,
                _ => {
                    let r = rules();
                    let Some(slot) = self.try_admit(r.max) else {
                        continue;
                    };
                    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                    sessions.lock().expect("poisoned").insert(key, tx.clone());
                    let (me, socket, sessions) = (self.clone(), socket.clone(), sessions.clone());
                    self.spawn(async move {
                        me.transparent_session(&*socket, r, src, orig, target, rx)
                            .await;
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
                self.ctx
                    .metrics
                    .reject(&tenant, &instance, RejectReason::UdpQueueFull);
            }
        }
    }

    /// One session: route the target, open the reply socket on the
    /// original destination, relay.
    async fn transparent_session(
        self: &Arc<Self>,
        socket: &dyn TransparentDatagrams,
        rules: SessionRules,
        src: SocketAddr,
        orig: SocketAddr,
        target: HostPort,
        rx: mpsc::Receiver<Vec<u8>>,
    ) {
        let ctx = &self.ctx;
        let (tenant, instance) = (&ctx.tenant.name, &ctx.instance);
        let upstream = match self
            .open_datagrams(&rules.via, &target, ChosenBy::Client, rules.connect_timeout)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                ctx.metrics.dial_error(tenant, instance, e.reason());
                if let Some(suppressed) = crate::core::logs::allow("transparent.udp_not_opened") {
                    tracing::warn!(%tenant, %instance, %src, %orig, error = %e, suppressed, "transparent udp session not opened");
                }
                return;
            }
        };
        let reply = match socket.reply_from(orig) {
            Ok(r) => r,
            Err(e) => {
                ctx.metrics.dial_error(tenant, instance, "reply_bind");
                if let Some(suppressed) = crate::core::logs::allow("transparent.udp_reply") {
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
            dst: target.to_string(),
            protocol: Protocol::Udp,
            kind: ctx.kind.clone(),
            dialed: Some(upstream.remote),
            trace: None,
        };
        self.relay_datagrams(flow, upstream, reply, src, rx, UDP_IDLE)
            .await;
    }
}
