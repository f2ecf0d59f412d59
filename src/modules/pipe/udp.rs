//! UDP pipes: one session per client address.
//!
//! The listening socket receives datagrams; the first one from a new client
//! address opens a session (a flow) with its own connected upstream socket,
//! in its own task (the receive loop never waits for a resolver).
//! Replies from the remote go back to that client from the listening socket.
//! A session ends after the idle timeout, on `stop`, or when the remote's
//! socket fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{IdleTimeout, PipeConfig, PipeProtocol, DEFAULT_UDP_IDLE};
use super::State;
use crate::core::addr::HostPort;
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
            _ => match open_session(&shared, &socket, &sessions, src) {
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

/// Opens a session for `src` without waiting: admission here (cheap), then
/// routing, name resolution, the upstream socket and the flow in the
/// session's own task, so a slow resolver never stalls the receive loop.
/// Datagrams that arrive meanwhile wait in the session's queue.
fn open_session(
    shared: &Arc<Shared>,
    listen: &Arc<UdpSocket>,
    sessions: &Sessions,
    src: SocketAddr,
) -> Option<mpsc::Sender<Vec<u8>>> {
    let cfg = shared.state.config();
    if cfg.protocol != PipeProtocol::Udp {
        return None; // reloaded to TCP: this listener is closing
    }
    // UDP pipes always have a remote: `peer` needs `via`, which UDP refuses.
    let remote_hp = cfg.remote.clone()?;
    let slot = shared.onramp.try_admit(cfg.max_connections)?;
    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
    sessions
        .lock()
        .expect("sessions poisoned")
        .insert(src, tx.clone());
    let (shared_task, listen, sessions) = (shared.clone(), listen.clone(), sessions.clone());
    shared.onramp.spawn(async move {
        if let Some(upstream) = connect_upstream(&shared_task, &cfg, &remote_hp, src).await {
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

/// Routes `remote` (direct only for UDP today), resolves it and connects a
/// socket to it; failures are counted and logged.
async fn connect_upstream(
    shared: &Arc<Shared>,
    cfg: &PipeConfig,
    remote_hp: &HostPort,
    src: SocketAddr,
) -> Option<UdpSocket> {
    let tenant = shared.tenant().to_string();
    let instance = shared.instance().to_string();
    let fail = |reason: &str, msg: String| {
        shared
            .onramp
            .ctx()
            .metrics
            .dial_error(&tenant, &instance, reason);
        if let Some(suppressed) = crate::core::logs::allow("udp.session_not_opened") {
            tracing::warn!(%tenant, %instance, %src, error = %msg, suppressed, "udp session not opened");
        }
    };
    match shared
        .onramp
        .ctx()
        .tenant
        .vnets
        .route(cfg.vnet.as_deref(), remote_hp)
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
    let lookup = tokio::net::lookup_host((remote_hp.host.as_str(), remote_hp.port));
    let remote = match tokio::time::timeout(cfg.connect_timeout, lookup).await {
        Ok(Ok(mut addrs)) => match addrs.next() {
            Some(a) => a,
            None => {
                fail("resolve", format!("{}: no addresses", remote_hp.host));
                return None;
            }
        },
        Ok(Err(e)) => {
            fail("resolve", e.to_string());
            return None;
        }
        Err(_) => {
            fail(
                "resolve",
                format!(
                    "{}: no answer within {:?}",
                    remote_hp.host, cfg.connect_timeout
                ),
            );
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
    Some(upstream)
}

async fn run_session(
    shared: Arc<Shared>,
    cfg: &PipeConfig,
    listen: Arc<UdpSocket>,
    upstream: UdpSocket,
    mut rx: mpsc::Receiver<Vec<u8>>,
    src: SocketAddr,
) {
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
    // The config the session opened with: a reload to TCP cannot take its
    // idle timeout away.
    let idle = match cfg.idle_timeout {
        Some(IdleTimeout::After(d)) => d,
        _ => DEFAULT_UDP_IDLE,
    };
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
