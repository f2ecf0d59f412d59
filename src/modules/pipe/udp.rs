//! UDP pipes: one session per client address.
//!
//! The listening socket (on the host, or on a VPN address with
//! `listen_via`) receives datagrams; the first one from a new client
//! address opens a session (a flow) in its own task: the remote is routed
//! like a TCP pipe's (`via:` pinned, or the vnet's table with its `hosts:`
//! and `dns:`) and a socket is bound through the route's connector (the
//! host, or a WireGuard network's engine), so the receive loop never waits
//! for a resolver. Replies from the remote go back to that client from the
//! listening socket. A session ends after the idle timeout, on `stop`, or
//! when the remote's socket fails. A listener inside a network whose
//! interface restarts binds again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{PipeConfig, PipeProtocol, DEFAULT_UDP_IDLE};
use super::Pipe;
use crate::core::net::datagram::DatagramSocket;
use crate::core::spine::dest::ChosenBy;
use crate::core::spine::flow::{FlowContext, Protocol};
use crate::core::spine::onramp::{Datagrams, ListenOn, OnRamp, Target};
use crate::core::spine::reject::RejectReason;

/// Datagrams queued per session before new ones are dropped (and counted).
const SESSION_QUEUE: usize = 256;
/// Largest datagram handled.
const MAX_DATAGRAM: usize = 65_535;
/// How often a listener whose network went away tries to bind again.
const REBIND_EVERY: Duration = Duration::from_millis(100);

type Sessions = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

/// What the session tasks share.
struct Shared {
    onramp: Arc<OnRamp>,
    pipe: Arc<Pipe>,
}

impl Shared {
    fn tenant(&self) -> &str {
        &self.onramp.ctx().tenant.name
    }
    fn instance(&self) -> &str {
        &self.onramp.ctx().instance
    }
}

pub(super) async fn serve(
    onramp: Arc<OnRamp>,
    pipe: Arc<Pipe>,
    mut socket: Arc<dyn DatagramSocket>,
    on: ListenOn,
    cancel: CancellationToken,
) {
    let shared = Arc::new(Shared { onramp, pipe });
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, src) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) if matches!(on, ListenOn::Module { .. }) => {
                    // The network under the listener went away (its
                    // interface restarted): bind again once it is back.
                    tracing::info!(tenant = %shared.tenant(), instance = %shared.instance(), error = %e, "udp listener's network went away; binding again");
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(REBIND_EVERY) => {}
                        }
                        if let Ok(s) = shared.onramp.bind_udp(&on).await {
                            socket = s;
                            break;
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(tenant = %shared.tenant(), instance = %shared.instance(), error = %e, "udp recv failed");
                    continue;
                }
            },
        };
        let datagram = buf[..n].to_vec();
        let existing = sessions
            .lock()
            .expect("sessions poisoned")
            .get(&src)
            .cloned();
        let tx = match existing {
            Some(tx) if !tx.is_closed() => tx,
            _ => match open_session(&shared, &socket, &sessions, src) {
                Some(tx) => tx,
                None => continue,
            },
        };
        if tx.try_send(datagram).is_err() {
            shared.onramp.ctx().metrics.reject(
                shared.tenant(),
                shared.instance(),
                RejectReason::UdpQueueFull,
            );
        }
    }
}

/// Opens a session for `src` without waiting: admission here (cheap), then
/// routing, name resolution, the upstream socket and the flow in the
/// session's own task, so a slow resolver never stalls the receive loop.
/// Datagrams that arrive meanwhile wait in the session's queue.
fn open_session(
    shared: &Arc<Shared>,
    listen: &Arc<dyn DatagramSocket>,
    sessions: &Sessions,
    src: SocketAddr,
) -> Option<mpsc::Sender<Vec<u8>>> {
    let cfg = shared.pipe.config();
    if cfg.protocol != PipeProtocol::Udp {
        return None; // reloaded to TCP: this listener is closing
    }
    let slot = shared.onramp.try_admit(cfg.door.max_connections)?;
    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
    sessions
        .lock()
        .expect("sessions poisoned")
        .insert(src, tx.clone());
    let (shared_task, listen, sessions) = (shared.clone(), listen.clone(), sessions.clone());
    shared.onramp.spawn(async move {
        if let Some(upstream) = connect_upstream(&shared_task, &cfg, src).await {
            run_session(shared_task, &cfg, listen, upstream, rx, src).await;
        }
        drop(slot);
        let mut map = sessions.lock().expect("sessions poisoned");
        if map.get(&src).is_some_and(|t| t.is_closed()) {
            map.remove(&src);
        }
    });
    Some(tx)
}

/// Routes the pipe's remote and binds a socket through the route's
/// connector; failures are counted and logged.
async fn connect_upstream(
    shared: &Arc<Shared>,
    cfg: &PipeConfig,
    src: SocketAddr,
) -> Option<Datagrams> {
    let (tenant, instance) = (shared.tenant(), shared.instance());
    let fail = |reason: &str, msg: String| {
        shared
            .onramp
            .ctx()
            .metrics
            .dial_error(tenant, instance, reason);
        if let Some(suppressed) = crate::core::logs::allow("udp.session_not_opened") {
            tracing::warn!(%tenant, %instance, %src, error = %msg, suppressed, "udp session not opened");
        }
    };
    let target = match shared.pipe.target(shared.onramp.ctx(), cfg) {
        Target::Addr(t) => t,
        Target::Unknown { error, .. } => {
            fail("no_route", error);
            return None;
        }
    };
    let via = Pipe::route(cfg);
    match shared
        .onramp
        .open_datagrams(&via, &target, ChosenBy::Operator, cfg.door.connect_timeout)
        .await
    {
        Ok(d) => Some(d),
        Err(e) => {
            fail(e.reason(), e.to_string());
            None
        }
    }
}

async fn run_session(
    shared: Arc<Shared>,
    cfg: &PipeConfig,
    listen: Arc<dyn DatagramSocket>,
    upstream: Datagrams,
    rx: mpsc::Receiver<Vec<u8>>,
    src: SocketAddr,
) {
    let flow = FlowContext {
        tenant: shared.tenant().to_string(),
        instance: shared.instance().to_string(),
        identity: None,
        src,
        dst: cfg
            .remote
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| upstream.remote.to_string()),
        protocol: Protocol::Udp,
        kind: shared.onramp.ctx().kind.clone(),
        dialed: Some(upstream.remote),
        trace: None,
    };
    // The config the session opened with: a reload to TCP cannot take its
    // idle timeout away.
    let idle = cfg.idle_timeout.unwrap_or(DEFAULT_UDP_IDLE);
    shared
        .onramp
        .relay_datagrams(flow, upstream, listen, src, rx, idle)
        .await;
}
