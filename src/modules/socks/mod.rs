//! `kind: socks`: a SOCKS5 front door (RFC 1928, RFC 1929), with SOCKS4/4a.
//!
//! A client that speaks SOCKS reaches whatever its tenant routes to, with
//! the proxy settings it already knows: `curl --socks5-hostname`, a
//! browser, `ssh -o ProxyCommand`. The door is its config, its handshake
//! ([`proto`], sans I/O) and one call into the core path per connection
//! ([`OnRamp::connect_answering`]: flow, policy, route in the user's vnet,
//! dial, join, typed end); the SOCKS reply is the [`Answer`] the core gives
//! once the dial's fate is known:
//!
//! | flow outcome | reply |
//! |---|---|
//! | connected | `0x00` succeeded, with the upstream's local address |
//! | denied by a flow hook, `reject` route | `0x02` not allowed by ruleset |
//! | no route, no such vnet | `0x03` network unreachable |
//! | name did not resolve, host unreachable | `0x04` host unreachable |
//! | connection refused | `0x05` connection refused |
//! | no answer within `connect_timeout` | `0x06` TTL expired |
//! | BIND, unknown command | `0x07` command not supported |
//! | unknown address type | `0x08` address type not supported |
//! | anything else | `0x01` general failure |
//!
//! Names (`ATYP` domain, SOCKS4a) are never resolved on the host unless the
//! route says `direct`: the core resolves them where the route goes (the
//! vnet's `hosts:`/`dns:`). With `auth: password`, the user name is the
//! flow's identity and may pick a vnet (`alice@sydney`) that the user is
//! allowed. Failed authentication, bad requests and handshake timeouts are
//! counted in `meshgate_rejected_total{reason}` and logged (rate-limited),
//! never with the password. UDP ASSOCIATE is in [`udp`].

pub mod config;
pub mod proto;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use configstore::Document;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::core::config::ConfigError;
use crate::core::logs;
use crate::core::net::dial::DialFailure;
use crate::core::net::proxy::Stream;
use crate::core::spine::door::{Door, DoorFactory, DoorSettings, Live};
use crate::core::spine::flow::EndReason;
use crate::core::spine::onramp::{
    Accepted, Answer, ConnectRequest, OnRamp, RouteVia, StreamHandler, Target,
};
use crate::core::spine::startups::Startups;

use crate::core::spine::reject::RejectReason;
use config::Auth;
pub use config::SocksConfig;
use proto::ProtoError;

/// Builds socks doors.
pub type SocksFactory = DoorFactory<SocksDoor>;

/// The SOCKS door's connections, reading the live config.
pub struct SocksDoor {
    live: Arc<Live<SocksConfig>>,
    /// Clients still in their handshake (`max_startups`).
    startups: Arc<Startups>,
}

/// What the handshake asked for.
enum Ask {
    /// CONNECT (SOCKS5 or 4).
    Connect {
        dst: proto::Addr,
        identity: Option<String>,
        vnet: Option<String>,
        socks4: bool,
    },
    /// UDP ASSOCIATE.
    Udp {
        identity: Option<String>,
        vnet: Option<String>,
        client_hint: proto::Addr,
    },
}

/// Why a handshake ended without a request: the metric reason, and what
/// to tell the client (already sent when `None`).
struct Refused {
    /// `None`: the client went away (not counted).
    reason: Option<RejectReason>,
    detail: String,
}

impl Refused {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Refused {
        Refused {
            reason: Some(reason),
            detail: detail.into(),
        }
    }

    /// The client closed or failed during the handshake.
    fn gone(detail: impl Into<String>) -> Refused {
        Refused {
            reason: None,
            detail: detail.into(),
        }
    }
}

/// Reads until `parse` has a whole message; what it read past the message
/// stays in `buf`.
async fn read_msg<T>(
    client: &mut Stream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> proto::Parsed<T>,
) -> Result<T, Refused> {
    loop {
        match parse(buf) {
            Ok(Some((msg, n))) => {
                buf.drain(..n);
                return Ok(msg);
            }
            Ok(None) => {}
            Err(e) => return Err(Refused::new(proto_reason(&e), e.to_string())),
        }
        if buf.len() > 4096 {
            return Err(Refused::new(
                RejectReason::BadRequest,
                "handshake message too long",
            ));
        }
        let mut chunk = [0u8; 512];
        match client.read(&mut chunk).await {
            Ok(0) => return Err(Refused::gone("client closed during the handshake")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(Refused::gone(e.to_string())),
        }
    }
}

fn proto_reason(e: &ProtoError) -> RejectReason {
    match e {
        ProtoError::AddressType(_) => RejectReason::AddressTypeNotSupported,
        _ => RejectReason::BadRequest,
    }
}

/// The SOCKS5 reply code for how a flow ended before relaying.
fn reply_code(reason: EndReason) -> u8 {
    match reason {
        EndReason::Denied
        | EndReason::Rejected
        | EndReason::Forbidden(_)
        | EndReason::PolicyRevoked => proto::REP_NOT_ALLOWED,
        EndReason::NoRoute | EndReason::DialFailed(DialFailure::NoRoute) => {
            proto::REP_NETWORK_UNREACHABLE
        }
        EndReason::DialFailed(DialFailure::Resolve | DialFailure::Unreachable) => {
            proto::REP_HOST_UNREACHABLE
        }
        EndReason::DialFailed(DialFailure::Refused) => proto::REP_CONNECTION_REFUSED,
        EndReason::DialFailed(DialFailure::Timeout) => proto::REP_TTL_EXPIRED,
        _ => proto::REP_GENERAL_FAILURE,
    }
}

/// Runs the handshake: greeting, authentication, request. Replies to
/// errors it finds itself (no method, bad password, bad command).
async fn handshake(
    cfg: &SocksConfig,
    client: &mut Stream,
    buf: &mut Vec<u8>,
) -> Result<Ask, Refused> {
    let mut first = [0u8; 1];
    if buf.is_empty() {
        match client.read(&mut first).await {
            Ok(1) => buf.push(first[0]),
            _ => return Err(Refused::gone("client closed before the greeting")),
        }
    }
    if buf[0] == 4 {
        if !cfg.socks4 {
            let _ = client.write_all(&proto::socks4_reply(false)).await;
            return Err(Refused::new(
                RejectReason::Socks4Refused,
                "SOCKS4 is off here (it carries no password; `auth: password` needs SOCKS5)",
            ));
        }
        let req = read_msg(client, buf, proto::parse_socks4).await?;
        if req.cmd != proto::CMD_CONNECT {
            let _ = client.write_all(&proto::socks4_reply(false)).await;
            return Err(Refused::new(
                RejectReason::CommandNotSupported,
                "SOCKS4 BIND",
            ));
        }
        return Ok(Ask::Connect {
            dst: req.dst,
            identity: None,
            vnet: cfg.door.vnet.clone(),
            socks4: true,
        });
    }
    let methods = read_msg(client, buf, proto::parse_greeting).await?;
    let want = match cfg.auth {
        Auth::None => proto::METHOD_NONE,
        Auth::Password => proto::METHOD_PASSWORD,
    };
    if !methods.contains(&want) {
        let _ = client.write_all(&[5, proto::METHOD_UNACCEPTABLE]).await;
        return Err(Refused::new(
            RejectReason::NoAcceptableMethod,
            format!("client offers methods {methods:?}; this door needs {want:#04x}"),
        ));
    }
    client
        .write_all(&[5, want])
        .await
        .map_err(|e| Refused::gone(e.to_string()))?;
    let (identity, vnet) = match cfg.auth {
        Auth::None => (None, cfg.door.vnet.clone()),
        Auth::Password => {
            let cred = read_msg(client, buf, proto::parse_credentials).await?;
            match cfg.authenticate(&cred.user, &cred.password) {
                Ok((who, vnet)) => {
                    client
                        .write_all(&[1, 0])
                        .await
                        .map_err(|e| Refused::gone(e.to_string()))?;
                    (Some(who), vnet)
                }
                Err(why) => {
                    let _ = client.write_all(&[1, 1]).await;
                    return Err(Refused::new(
                        RejectReason::AuthFailed,
                        format!("user `{}`: {why}", cred.user),
                    ));
                }
            }
        }
    };
    let req = match read_msg(client, buf, proto::parse_request).await {
        Ok(r) => r,
        Err(r) => {
            let code = if r.reason == Some(RejectReason::AddressTypeNotSupported) {
                proto::REP_ADDRESS_TYPE_NOT_SUPPORTED
            } else {
                proto::REP_GENERAL_FAILURE
            };
            let _ = client.write_all(&proto::reply(code, None)).await;
            return Err(r);
        }
    };
    match req.cmd {
        proto::CMD_CONNECT => Ok(Ask::Connect {
            dst: req.dst,
            identity,
            vnet,
            socks4: false,
        }),
        proto::CMD_UDP_ASSOCIATE if cfg.udp => Ok(Ask::Udp {
            identity,
            vnet,
            client_hint: req.dst,
        }),
        other => {
            let _ = client
                .write_all(&proto::reply(proto::REP_COMMAND_NOT_SUPPORTED, None))
                .await;
            Err(Refused::new(
                RejectReason::CommandNotSupported,
                match other {
                    proto::CMD_BIND => "BIND".to_string(),
                    proto::CMD_UDP_ASSOCIATE => "UDP ASSOCIATE (`udp: false`)".to_string(),
                    c => format!("command {c:#04x}"),
                },
            ))
        }
    }
}

/// The SOCKS reply, sent when the core knows the flow's fate.
struct SocksAnswer {
    client: Stream,
    socks4: bool,
}

#[async_trait]
impl Answer for SocksAnswer {
    async fn answer(
        mut self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream> {
        let bytes = match (self.socks4, &outcome) {
            (true, o) => proto::socks4_reply(o.is_ok()).to_vec(),
            (false, Ok(bound)) => proto::reply(proto::REP_SUCCEEDED, *bound),
            (false, Err(reason)) => proto::reply(reply_code(*reason), None),
        };
        let sent = self.client.write_all(&bytes).await.is_ok() && self.client.flush().await.is_ok();
        (sent && outcome.is_ok()).then_some(self.client)
    }
}

#[async_trait]
impl StreamHandler for SocksDoor {
    fn max_connections(&self) -> usize {
        self.live.get().door.max_connections
    }

    fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.live.get().door.accept_proxy_protocol.clone()
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, mut client: Stream, conn: Accepted) {
        let src = conn.src;
        let cfg = self.live.get();
        let ctx = onramp.ctx();
        let mut buf = Vec::new();
        // Counted among the clients not yet past their handshake until it
        // is done: past the caps a new one is refused at once.
        let startup = match self
            .startups
            .try_start(src.ip(), &cfg.door.handshake.startups)
        {
            Ok(s) => s,
            Err(reason) => {
                ctx.metrics.reject(&ctx.tenant.name, &ctx.instance, reason);
                if let Some(suppressed) = logs::allow("socks.startups") {
                    tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, %src, %reason, suppressed, "SOCKS client refused: too many clients still in their handshake");
                }
                return;
            }
        };
        // A stopping door waits on no client still in its handshake.
        let handshake = tokio::select! {
            r = tokio::time::timeout(cfg.door.handshake.timeout, handshake(&cfg, &mut client, &mut buf)) => r,
            _ = onramp.stopping().cancelled() => return,
        };
        let ask = match handshake {
            Ok(Ok(a)) => a,
            Ok(Err(r)) => {
                if let Some(reason) = r.reason {
                    ctx.metrics.reject(&ctx.tenant.name, &ctx.instance, reason);
                    if let Some(suppressed) = logs::allow("socks.refused") {
                        tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, %src, %reason, detail = %r.detail, suppressed, "SOCKS handshake refused");
                    }
                }
                return;
            }
            Err(_) => {
                ctx.metrics.reject(
                    &ctx.tenant.name,
                    &ctx.instance,
                    RejectReason::HandshakeTimeout,
                );
                if let Some(suppressed) = logs::allow("socks.timeout") {
                    tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, %src, timeout = ?cfg.door.handshake.timeout, suppressed, "SOCKS handshake timed out");
                }
                return;
            }
        };
        drop(startup);
        match ask {
            Ask::Connect {
                dst,
                identity,
                vnet,
                socks4,
            } => {
                let req = ConnectRequest {
                    src,
                    target: Target::Addr(dst.host_port()),
                    identity,
                    via: RouteVia::Vnet(vnet),
                    connect_timeout: cfg.door.connect_timeout,
                    idle_timeout: cfg.door.idle_timeout,
                    client_dst: conn.dst,
                    proxy_protocol: None,
                    chosen_by: crate::core::spine::dest::ChosenBy::Client,
                    trace: None,
                };
                // Bytes the client sent right after its request (optimistic
                // data) go upstream first.
                let client = client.prepend(std::mem::take(&mut buf));
                onramp
                    .connect_answering(req, Box::new(SocksAnswer { client, socks4 }))
                    .await;
            }
            Ask::Udp {
                identity,
                vnet,
                client_hint,
            } => {
                udp::associate(onramp, &cfg, client, src, identity, vnet, client_hint).await;
            }
        }
    }
}

impl Door for SocksDoor {
    const KIND: &'static str = "socks";
    type Config = SocksConfig;

    fn new(live: Arc<Live<SocksConfig>>) -> Self {
        SocksDoor {
            live,
            startups: Default::default(),
        }
    }

    fn depends_on(cfg: &SocksConfig) -> Vec<String> {
        cfg.depends_on()
    }

    fn parse(doc: &Document) -> Result<SocksConfig, ConfigError> {
        SocksConfig::from_document(doc)
    }

    fn settings(cfg: &SocksConfig) -> &DoorSettings {
        &cfg.door
    }

    fn status(&self, cfg: &SocksConfig, onramp: &OnRamp) -> serde_json::Value {
        let mut status = cfg.door.status(onramp);
        status.extend([
            (
                "auth".into(),
                match cfg.auth {
                    Auth::None => "none",
                    Auth::Password => "password",
                }
                .into(),
            ),
            ("users".into(), serde_json::json!(cfg.door.users.names())),
            ("udp".into(), cfg.udp.into()),
            ("socks4".into(), cfg.socks4.into()),
        ]);
        status.into()
    }
}
