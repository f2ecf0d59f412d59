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

pub mod config;
pub mod rules;
mod udp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use configstore::Document;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::net::listen::{bind_host_tcp, HostListener, StreamListener};
use crate::core::net::proxy::Stream;
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::spine::onramp::{
    Accepted, ConnectRequest, DoorListener, ListenOn, OnRamp, RouteVia, StreamHandler, Target,
};
use crate::core::spine::reject::RejectReason;

pub use config::{CaptureConfig, Mode};

/// Builds capture listeners.
pub struct CaptureFactory;

impl ModuleFactory for CaptureFactory {
    fn kind(&self) -> &'static str {
        "capture"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = CaptureConfig::from_document(doc)?;
        Ok(ModulePlan {
            depends_on: cfg.door.depends_on([]),
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = CaptureConfig::from_document(doc)?;
        Ok(Arc::new(Capture {
            onramp: OnRamp::new(ctx),
            state: Arc::new(State {
                config: RwLock::new(Arc::new(cfg)),
            }),
            source: RwLock::new(doc.source.clone()),
            listener: DoorListener::default(),
            udp: Mutex::new(None),
            problem: Mutex::new(None),
        }))
    }
}

/// A running capture listener.
pub struct Capture {
    onramp: Arc<OnRamp>,
    state: Arc<State>,
    source: RwLock<String>,
    listener: DoorListener,
    /// Stops the TPROXY UDP receive loop.
    udp: Mutex<Option<tokio_util::sync::CancellationToken>>,
    /// Why it is not capturing (a missing capability), for the status.
    problem: Mutex<Option<String>>,
}

struct State {
    config: RwLock<Arc<CaptureConfig>>,
}

impl State {
    fn config(&self) -> Arc<CaptureConfig> {
        self.config.read().expect("poisoned").clone()
    }
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
impl StreamHandler for State {
    fn max_connections(&self) -> usize {
        self.config().door.max_connections
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let cfg = self.config();
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
        };
        onramp.connect(client, req).await;
    }
}

impl Capture {
    /// Binds and serves `cfg`'s listener. A missing capability is reported
    /// and leaves the module idle (Ok); other failures are errors.
    async fn listen(&self, cfg: &CaptureConfig, source: &str) -> Result<(), ModuleError> {
        let addr = cfg.door.listen.0;
        let bound = match cfg.mode {
            Mode::Redirect => bind_host_tcp(addr).map_err(BindError::Other),
            Mode::Tproxy => bind_transparent(addr),
        };
        let ctx = self.onramp.ctx();
        // TPROXY takes UDP too, on the same port.
        let udp = match (&bound, cfg.mode) {
            (Ok(_), Mode::Tproxy) => match crate::core::net::datagram::TproxyUdp::bind(addr) {
                Ok(u) => Some(u),
                Err(e) => {
                    return Err(ConfigError::key(
                        source,
                        "listen",
                        format!("cannot take UDP on {addr} (TPROXY): {e}"),
                    )
                    .into())
                }
            },
            _ => None,
        };
        if let Some(old) = self.udp.lock().expect("poisoned").take() {
            old.cancel();
        }
        if let Some(u) = udp {
            let stop = tokio_util::sync::CancellationToken::new();
            *self.udp.lock().expect("poisoned") = Some(stop.clone());
            tokio::spawn(udp::serve(self.onramp.clone(), self.state.clone(), u, stop));
        }
        match bound {
            Ok(l) => {
                *self.problem.lock().expect("poisoned") = None;
                let l: Box<dyn StreamListener> = Box::new(HostListener::new(l));
                self.listener
                    .serve_bound(&self.onramp, ListenOn::Host(addr), l, self.state.clone())
                    .await;
                Ok(())
            }
            Err(BindError::Capability(m)) => {
                tracing::error!(tenant = %ctx.tenant.name, instance = %ctx.instance, source, error = %m, "capture is not running; the rest of meshgate is");
                *self.problem.lock().expect("poisoned") = Some(m);
                Ok(())
            }
            Err(BindError::Other(e)) => Err(ListenOn::Host(addr).bind_error(source, &e).into()),
        }
    }
}

#[async_trait]
impl Module for Capture {
    async fn start(&self) -> Result<(), ModuleError> {
        let source = self.source.read().expect("poisoned").clone();
        self.listen(&self.state.config(), &source).await
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let new = CaptureConfig::from_document(doc)?;
        let old = self.state.config();
        if new.door.listen != old.door.listen || new.mode != old.mode {
            self.listen(&new, &doc.source).await?;
        }
        *self.source.write().expect("poisoned") = doc.source.clone();
        *self.state.config.write().expect("poisoned") = Arc::new(new);
        Ok(())
    }

    async fn drain(&self) {
        self.listener.close().await;
        if let Some(stop) = self.udp.lock().expect("poisoned").take() {
            stop.cancel();
        }
    }

    async fn stop(&self) {
        self.drain().await;
        self.onramp.stop().await;
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.state.config();
        let problem = self.problem.lock().expect("poisoned").clone();
        let mut status = cfg.door.status(&self.onramp);
        status.insert("mode".into(), serde_json::json!(cfg.mode));
        status.insert("capturing".into(), problem.is_none().into());
        status.insert("problem".into(), serde_json::json!(problem));
        status.into()
    }
}
