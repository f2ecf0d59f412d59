//! UDP pipes: one session per client address.
//!
//! The listening socket receives datagrams; the first one from a new client
//! address opens a session (a flow) with its own connected upstream socket.
//! Replies from the remote go back to that client from the listening socket.
//! A session ends after the idle timeout, on `stop`, or when the remote's
//! socket fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::State;
use crate::core::net::proxy::Traffic;
use crate::core::spine::flow::{EndReason, FlowContext, Protocol};
use crate::core::spine::onramp::OnRamp;
use crate::core::spine::router::Connector;

/// Datagrams queued per session before new ones are dropped (and counted).
const SESSION_QUEUE: usize = 256;
/// Largest datagram handled.
const MAX_DATAGRAM: usize = 65_535;

type Sessions = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

/// What the session tasks share.
struct Shared {
    onramp: Arc<OnRamp>,
    state: Arc<State>,
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
    state: Arc<State>,
    socket: UdpSocket,
    cancel: CancellationToken,
) {
    let shared = Arc::new(Shared { onramp, state });
    let socket = Arc::new(socket);
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, src) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
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
            _ => match open_session(&shared, &socket, &sessions, src).await {
                Some(tx) => tx,
                None => continue,
            },
        };
        if tx.try_send(datagram).is_err() {
            shared.onramp.ctx().metrics.reject(
                shared.tenant(),
                shared.instance(),
                "udp_queue_full",
            );
        }
    }
}

/// Opens a session for `src`: admission, routing, the upstream socket, the flow.
async fn open_session(
    shared: &Arc<Shared>,
    listen: &Arc<UdpSocket>,
    sessions: &Sessions,
    src: SocketAddr,
) -> Option<mpsc::Sender<Vec<u8>>> {
    let cfg = shared.state.config();
    // UDP pipes always have a remote: `peer` needs `via`, which UDP refuses.
    let remote_hp = cfg.remote.clone()?;
    let slot = shared.onramp.try_admit(cfg.max_connections)?;
    let tenant = shared.tenant().to_string();
    let instance = shared.instance().to_string();
    let fail = |reason: &str, msg: String| {
        shared
            .onramp
            .ctx()
            .metrics
            .dial_error(&tenant, &instance, reason);
        tracing::warn!(%tenant, %instance, %src, error = %msg, "udp session not opened");
    };
    match shared
        .onramp
        .ctx()
        .tenant
        .vnets
        .route(cfg.vnet.as_deref(), &remote_hp)
    {
        Ok(d) if d.route.connector == Connector::Direct => {}
        Ok(d) => {
            fail(
                "no_route",
                format!(
                    "UDP through {} is not supported yet (route {})",
                    d.route.connector,
                    d.describe()
                ),
            );
            return None;
        }
        Err(e) => {
            fail(e.reason(), e.to_string());
            return None;
        }
    }
    let remote = match tokio::net::lookup_host((remote_hp.host.as_str(), remote_hp.port)).await {
        Ok(mut addrs) => addrs.next()?,
        Err(e) => {
            fail("resolve", e.to_string());
            return None;
        }
    };
    let bind: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let upstream = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            fail("io", e.to_string());
            return None;
        }
    };
    if let Err(e) = upstream.connect(remote).await {
        fail("unreachable", e.to_string());
        return None;
    }
    let shared_task = shared.clone();
    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
    sessions
        .lock()
        .expect("sessions poisoned")
        .insert(src, tx.clone());
    let listen = listen.clone();
    let sessions = sessions.clone();
    shared.onramp.spawn(async move {
        run_session(shared_task, listen, upstream, rx, src).await;
        drop(slot);
        let mut map = sessions.lock().expect("sessions poisoned");
        if map.get(&src).is_some_and(|t| t.is_closed()) {
            map.remove(&src);
        }
    });
    Some(tx)
}

async fn run_session(
    shared: Arc<Shared>,
    listen: Arc<UdpSocket>,
    upstream: UdpSocket,
    mut rx: mpsc::Receiver<Vec<u8>>,
    src: SocketAddr,
) {
    let cfg = shared.state.config();
    let ctx = shared.onramp.ctx();
    let mut flow = ctx.flows.open(
        FlowContext {
            tenant: shared.tenant().to_string(),
            instance: shared.instance().to_string(),
            identity: None,
            src,
            dst: cfg
                .remote
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            protocol: Protocol::Udp,
        },
        &ctx.instance_metrics,
    );
    let idle = cfg
        .effective_idle_timeout()
        .expect("udp always has an idle timeout");
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let reason = loop {
        tokio::select! {
            _ = shared.onramp.stopping().cancelled() => break EndReason::Stopped,
            _ = tokio::time::sleep(idle) => break EndReason::IdleTimeout,
            d = rx.recv() => match d {
                Some(d) => match upstream.send(&d).await {
                    Ok(n) => flow.flow().upstream(n as u64),
                    Err(e) => {
                        tracing::debug!(%src, error = %e, "udp send to remote failed");
                        break EndReason::UpstreamError;
                    }
                },
                None => break EndReason::Closed,
            },
            r = upstream.recv(&mut buf) => match r {
                Ok(n) => match listen.send_to(&buf[..n], src).await {
                    Ok(n) => flow.flow().downstream(n as u64),
                    Err(e) => tracing::debug!(%src, error = %e, "udp send to client failed"),
                },
                Err(e) => {
                    tracing::debug!(%src, error = %e, "udp recv from remote failed");
                    break EndReason::UpstreamError;
                }
            },
        }
    };
    rx.close();
    flow.set_end_reason(reason);
}
