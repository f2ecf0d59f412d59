//! `kind: capture`: transparent capture of TCP connections that were never
//! configured to use a proxy, steered here by nftables/iptables rules
//! (`meshgatectl capture rules` prints them).
//!
//! - `mode: redirect`: `REDIRECT` (NAT) rules send connections to the
//!   listener; the original destination comes from `SO_ORIGINAL_DST` /
//!   `IP6T_SO_ORIGINAL_DST`. The listener needs no privilege (installing
//!   the rules does).
//! - `mode: tproxy`: `TPROXY` rules deliver connections with their
//!   destination intact to a transparent listener (`IP_TRANSPARENT`), which
//!   needs CAP_NET_ADMIN. Without it the module reports the missing
//!   capability (log, status) and the rest of meshgate keeps running.
//!   UDP too ([`udp`]): a transparent UDP socket on the same port takes
//!   what the rules steer, and answers leave from the original destination.
//!
//! Each captured connection takes the one path with its original
//! destination as the target (routed in `vnet:`), so the flow table and
//! the audit line show where the client meant to go. A connection made to
//! the capture port itself (not captured) is refused and counted
//! (`not_captured`): dialing it would loop.
//!
//! Capture is a [`Door`]: [`crate::core::spine::door::DoorModule`] binds, rebinds, drains and stops
//! it; the kind overrides only [`Door::bind`] (a transparent socket, the
//! TPROXY UDP socket beside it, and a listener that stays idle while the
//! capability is missing).

pub mod config;
pub mod rules;
mod udp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use configstore::Document;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::net::listen::{bind_host_tcp, HostListener, StreamListener};
use crate::core::net::proxy::Stream;
use crate::core::spine::door::{Door, DoorFactory, DoorSettings, Live};
use crate::core::spine::onramp::{
    Accepted, ConnectRequest, ListenOn, OnRamp, RouteVia, StreamHandler, Target,
};
use crate::core::spine::reject::RejectReason;

pub use config::{CaptureConfig, Mode};

/// Builds capture listeners.
pub type CaptureFactory = DoorFactory<Capture>;

/// A capture listener's connections.
pub struct Capture {
    live: Arc<Live<CaptureConfig>>,
    /// Why it is not capturing (a missing capability), for the status.
    problem: Mutex<Option<String>>,
}

/// Why the listener could not be bound.
enum BindError {
    /// The process lacks CAP_NET_ADMIN (TPROXY's `IP_TRANSPARENT`).
    Capability(String),
    /// Anything else (the port is taken, ...).
    Other(std::io::Error),
}

/// A transparent listener: it accepts connections addressed to anyone
/// that TPROXY rules deliver to its port.
fn bind_transparent(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(BindError::Other)?;
    let transparent = if addr.is_ipv4() {
        s.set_ip_transparent_v4(true)
    } else {
        s.set_ip_transparent_v6(true)
    };
    if let Err(e) = transparent {
        return Err(BindError::Capability(format!(
            "`mode: tproxy` needs CAP_NET_ADMIN (to set IP_TRANSPARENT on {addr}): {e}. Run meshgate with that capability (e.g. systemd AmbientCapabilities=CAP_NET_ADMIN), or use `mode: redirect`, whose listener needs none"
        )));
    }
    let bound = (|| {
        s.set_reuse_address(true)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            s.set_only_v6(false)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        tokio::net::TcpListener::from_std(s.into())
    })();
    bound.map_err(BindError::Other)
}

/// Whether `dst` is the capture listener itself (`listen`): traffic sent
/// there was not steered by a rule, and dialing it would loop.
fn to_capture_port(listen: SocketAddr, dst: SocketAddr) -> bool {
    dst.port() == listen.port()
        && (listen.ip().is_unspecified() || dst.ip().to_canonical() == listen.ip().to_canonical())
}

/// Where a redirected connection was going (`SO_ORIGINAL_DST`).
fn original_dst(tcp: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let s = socket2::SockRef::from(tcp);
    let local = tcp.local_addr().ok()?;
    let a = if local.ip().to_canonical().is_ipv4() {
        s.original_dst_v4()
    } else {
        s.original_dst_v6()
    };
    a.ok()?.as_socket()
}

#[async_trait]
impl StreamHandler for Capture {
    fn max_connections(&self) -> usize {
        self.live.get().door.max_connections
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let cfg = self.live.get();
        let ctx = onramp.ctx();
        let orig = match (cfg.mode, &client) {
            (Mode::Redirect, Stream::Tcp(t)) => original_dst(t),
            (Mode::Tproxy, _) => conn.dst_of(&client),
            _ => None,
        };
        let captured = orig.filter(|o| !to_capture_port(cfg.door.listen.0, *o));
        let Some(orig) = captured else {
            ctx.metrics
                .reject(&ctx.tenant.name, &ctx.instance, RejectReason::NotCaptured);
            if let Some(suppressed) = crate::core::logs::allow("capture.not_captured") {
                tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, src = %conn.src, suppressed, "a connection to the capture port that no rule steered here: closed (it would loop)");
            }
            return;
        };
        let target = HostPort {
            host: orig.ip().to_canonical().to_string(),
            port: orig.port(),
        };
        let req = ConnectRequest {
            src: conn.src,
            target: Target::Addr(target),
            identity: None,
            via: RouteVia::Vnet(cfg.door.vnet.clone()),
            connect_timeout: cfg.door.connect_timeout,
            idle_timeout: cfg.door.idle_timeout,
            client_dst: Some(orig),
            proxy_protocol: None,
            chosen_by: crate::core::spine::dest::ChosenBy::Client,
            trace: None,
        };
        onramp.connect(client, req).await;
    }
}

/// A listener that accepts nothing: what capture serves while it lacks
/// the capability TPROXY needs (its status says why).
struct Idle(SocketAddr);

#[async_trait]
impl StreamListener for Idle {
    async fn accept(&mut self) -> std::io::Result<(Stream, SocketAddr)> {
        std::future::pending().await
    }
    fn local_addr(&self) -> SocketAddr {
        self.0
    }
}

/// A TPROXY listener with its UDP socket's receive loop, which ends when
/// the listener is dropped (closed at drain, replaced by a reload).
struct WithUdp {
    tcp: HostListener,
    _udp: tokio_util::sync::DropGuard,
}

#[async_trait]
impl StreamListener for WithUdp {
    async fn accept(&mut self) -> std::io::Result<(Stream, SocketAddr)> {
        self.tcp.accept().await
    }
    fn local_addr(&self) -> SocketAddr {
        self.tcp.local_addr()
    }
}

#[async_trait]
impl Door for Capture {
    const KIND: &'static str = "capture";
    type Config = CaptureConfig;

    fn parse(doc: &Document) -> Result<CaptureConfig, ConfigError> {
        CaptureConfig::from_document(doc)
    }

    fn settings(config: &CaptureConfig) -> &DoorSettings {
        &config.door
    }

    fn new(live: Arc<Live<CaptureConfig>>) -> Self {
        Capture {
            live,
            problem: Mutex::new(None),
        }
    }

    /// REDIRECT: a plain listener. TPROXY: a transparent one and the UDP
    /// socket on the same port; without CAP_NET_ADMIN the problem is
    /// reported (log, status) and the module stays up, idle.
    async fn bind(
        &self,
        onramp: &Arc<OnRamp>,
        cfg: &CaptureConfig,
        source: &str,
    ) -> Result<Box<dyn StreamListener>, ConfigError> {
        let addr = cfg.door.listen.0;
        let ctx = onramp.ctx();
        let tcp = match cfg.mode {
            Mode::Redirect => bind_host_tcp(addr).map_err(BindError::Other),
            Mode::Tproxy => bind_transparent(addr),
        };
        let tcp = match tcp {
            Ok(l) => HostListener::new(l),
            Err(BindError::Capability(m)) => {
                tracing::error!(tenant = %ctx.tenant.name, instance = %ctx.instance, source, error = %m, "capture is not running; the rest of meshgate is");
                *self.problem.lock().expect("poisoned") = Some(m);
                return Ok(Box::new(Idle(addr)));
            }
            Err(BindError::Other(e)) => return Err(ListenOn::Host(addr).bind_error(source, &e)),
        };
        *self.problem.lock().expect("poisoned") = None;
        if cfg.mode == Mode::Redirect {
            return Ok(Box::new(tcp));
        }
        let udp = crate::core::net::datagram::TproxyUdp::bind(addr).map_err(|e| {
            ConfigError::key(
                source,
                "listen",
                format!("cannot take UDP on {addr} (TPROXY): {e}"),
            )
        })?;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(udp::serve(
            onramp.clone(),
            self.live.clone(),
            udp,
            stop.clone(),
        ));
        Ok(Box::new(WithUdp {
            tcp,
            _udp: stop.drop_guard(),
        }))
    }

    fn must_rebind(old: &CaptureConfig, new: &CaptureConfig) -> bool {
        old.door.listen != new.door.listen || old.mode != new.mode
    }

    fn status(&self, cfg: &CaptureConfig, onramp: &OnRamp) -> serde_json::Value {
        let problem = self.problem.lock().expect("poisoned").clone();
        let mut status = cfg.door.status(onramp);
        status.insert("mode".into(), serde_json::json!(cfg.mode));
        status.insert("capturing".into(), problem.is_none().into());
        status.insert("problem".into(), serde_json::json!(problem));
        status.into()
    }
}
