//! `kind: http_proxy`: an HTTP/1.1 front door (hyper): `CONNECT host:port`
//! tunnels and absolute-URI forward proxying (`GET http://host/...`).
//!
//! Every request takes the one path ([`OnRamp::connect_answering`]: flow
//! with the user as identity, policy, route in the user's vnet, dial, join,
//! typed end). For `CONNECT`, the client's side is the upgraded connection;
//! for a forwarded request it is one end of an in-memory pipe whose other
//! end carries the rewritten request (origin-form URI, hop-by-hop and proxy
//! headers removed) to the upstream, so both are relayed, counted and
//! audited like any flow. The status tells the client what happened:
//!
//! | flow outcome | status |
//! |---|---|
//! | tunnel open | `200` (then the tunnel) |
//! | no `Proxy-Authorization`, or a wrong one (with users) | `407` with `Proxy-Authenticate: Basic` |
//! | denied by a flow hook, `reject` route, no route | `403` |
//! | dial failed (refused, unreachable, name unknown) | `502` |
//! | no answer within `connect_timeout` | `504` |
//!
//! Refusals carry `X-Meshgate-Reason: <flow end>` and a one-line body.

pub mod config;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use configstore::Document;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::net::proxy::Stream;
use crate::core::spine::door::{Door, DoorFactory, DoorSettings, Live};
use crate::core::spine::flow::EndReason;
use crate::core::spine::onramp::http::{self, text, Body, Client, Handover};
use crate::core::spine::onramp::{
    Accepted, ConnectRequest, OnRamp, RouteVia, StreamHandler, Target,
};
use crate::core::spine::reject::RejectReason;

pub use config::HttpProxyConfig;

/// The largest request head (request line and headers) read.
const MAX_HEAD: usize = 64 * 1024;

/// Bytes buffered between a forwarded exchange and its flow, each way.
const FORWARD_BUFFER: usize = 64 * 1024;

/// Builds http_proxy doors.
pub type HttpProxyFactory = DoorFactory<HttpDoor>;

/// The proxy's connections, reading the live config.
pub struct HttpDoor {
    live: Arc<Live<HttpProxyConfig>>,
    /// Connections whose first request head has not arrived
    /// (`max_startups`).
    startups: Arc<crate::core::spine::startups::Startups>,
}

/// A `Proxy-Authorization: Basic` value: the user name and password, or
/// `None` if it is not well-formed Basic credentials. Never panics
/// (`fuzz/fuzz_targets/http_proxy.rs`).
pub fn parse_basic(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, b64) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let colon = decoded.iter().position(|&c| c == b':')?;
    let user = std::str::from_utf8(&decoded[..colon]).ok()?.to_string();
    Some((user, decoded[colon + 1..].to_vec()))
}

/// Who is asking: `Proxy-Authorization: Basic` checked against the users.
fn authenticate(
    cfg: &HttpProxyConfig,
    req: &Request<Incoming>,
) -> Result<(Option<String>, Option<String>), RejectReason> {
    if cfg.door.users.is_empty() {
        return Ok((None, cfg.door.vnet.clone()));
    }
    let header = req
        .headers()
        .get("proxy-authorization")
        .ok_or(RejectReason::AuthRequired)?;
    let (user, password) = parse_basic(header.as_bytes()).ok_or(RejectReason::AuthFailed)?;
    cfg.door
        .users
        .authenticate(&user, &password, cfg.door.vnet.as_deref())
        .map(|(who, vnet)| (Some(who), vnet))
        .map_err(|_| RejectReason::AuthFailed)
}

/// The status for a flow that ended before relaying (a failed dial: 502).
fn status_for(reason: EndReason) -> StatusCode {
    http::status_for(reason, StatusCode::BAD_GATEWAY)
}

/// Headers that concern one hop, not the end to end exchange.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

struct Exchange {
    onramp: Arc<OnRamp>,
    cfg: Arc<HttpProxyConfig>,
    src: SocketAddr,
    dst: Option<SocketAddr>,
}

impl Exchange {
    fn refuse(&self, reason: RejectReason, status: StatusCode, detail: String) -> Response<Body> {
        self.onramp
            .refused("http_proxy.refused", self.src, None, reason, &detail);
        text(status, Some(reason.as_str()), detail)
    }

    /// Runs the flow for `target` with `client` as its client side; the
    /// outcome before relaying.
    async fn open(
        &self,
        target: HostPort,
        identity: Option<String>,
        vnet: Option<String>,
        client: Client,
    ) -> Result<(), EndReason> {
        let (tx, rx) = oneshot::channel();
        let req = ConnectRequest {
            src: self.src,
            target: Target::Addr(target),
            identity,
            via: RouteVia::Vnet(vnet),
            connect_timeout: self.cfg.door.connect_timeout,
            idle_timeout: self.cfg.door.idle_timeout,
            client_dst: self.dst,
            proxy_protocol: None,
            chosen_by: crate::core::spine::dest::ChosenBy::Client,
            trace: None,
        };
        let onramp = self.onramp.clone();
        self.onramp.spawn(async move {
            onramp
                .connect_answering(
                    req,
                    Box::new(Handover {
                        outcome: tx,
                        client,
                    }),
                )
                .await;
        });
        rx.await.unwrap_or(Err(EndReason::Stopped))
    }

    async fn handle(self, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let (identity, vnet) = match authenticate(&self.cfg, &req) {
            Ok(who) => who,
            Err(reason) => {
                let mut r = self.refuse(
                    reason,
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                    "proxy authentication required".into(),
                );
                r.headers_mut().insert(
                    "proxy-authenticate",
                    HeaderValue::from_static("Basic realm=\"meshgate\""),
                );
                return Ok(r);
            }
        };
        if req.method() == Method::CONNECT {
            let Some(target) = http::connect_target(req.uri().authority()) else {
                return Ok(self.refuse(
                    RejectReason::BadRequest,
                    StatusCode::BAD_REQUEST,
                    format!("CONNECT needs host:port, not `{}`", req.uri()),
                ));
            };
            let upgrade = hyper::upgrade::on(&mut req);
            return Ok(
                match self
                    .open(target.clone(), identity, vnet, Client::Upgrade(upgrade))
                    .await
                {
                    Ok(()) => http::empty(StatusCode::OK),
                    Err(reason) => text(
                        status_for(reason),
                        Some(reason.as_str()),
                        format!("{target}: {}", reason.detail()),
                    ),
                },
            );
        }
        // Forward proxying: an absolute http:// URI.
        let uri = req.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Ok(self.refuse(
                RejectReason::BadRequest,
                StatusCode::BAD_REQUEST,
                "this is a proxy: send CONNECT host:port, or a request with an absolute http:// URI".into(),
            ));
        };
        if scheme != "http" {
            return Ok(self.refuse(
                RejectReason::BadRequest,
                StatusCode::BAD_REQUEST,
                format!("`{scheme}://` is not forwarded: use CONNECT for TLS"),
            ));
        }
        let target = HostPort {
            host: authority.host().trim_matches(['[', ']']).to_string(),
            port: authority.port_u16().unwrap_or(80),
        };
        let (near, far) = tokio::io::duplex(FORWARD_BUFFER);
        if let Err(reason) = self
            .open(target.clone(), identity, vnet, Client::Pipe(near))
            .await
        {
            return Ok(text(
                status_for(reason),
                Some(reason.as_str()),
                format!("{target}: {}", reason.detail()),
            ));
        }
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(far)).await {
                Ok(x) => x,
                Err(e) => {
                    return Ok(text(
                        StatusCode::BAD_GATEWAY,
                        Some("upstream_error"),
                        e.to_string(),
                    ))
                }
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // Origin-form, the end-to-end headers, a Host header.
        let origin = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = origin.parse().unwrap_or_default();
        for h in HOP_BY_HOP {
            req.headers_mut().remove(h);
        }
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(HOST, host);
        }
        match sender.send_request(req).await {
            Ok(resp) => Ok(resp.map(|b| b.boxed())),
            Err(e) => Ok(text(
                StatusCode::BAD_GATEWAY,
                Some("upstream_error"),
                e.to_string(),
            )),
        }
    }
}

#[async_trait]
impl StreamHandler for HttpDoor {
    fn max_connections(&self) -> usize {
        self.live.get().door.max_connections
    }

    fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.live.get().door.accept_proxy_protocol.clone()
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let src = conn.src;
        let cfg = self.live.get();
        // Counted among the connections whose first request head has not
        // arrived, until it does: past the caps a new one is refused.
        let startup = match self
            .startups
            .try_start(src.ip(), &cfg.door.handshake.startups)
        {
            Ok(s) => s,
            Err(reason) => {
                return onramp.refused(
                    "http_proxy.startups",
                    src,
                    None,
                    reason,
                    "too many connections without a request yet",
                );
            }
        };
        let startup = std::sync::Mutex::new(Some(startup));
        let stop = onramp.stopping().clone();
        let onramp = onramp.clone();
        let timeout = cfg.door.handshake.timeout;
        let svc = hyper::service::service_fn(move |req| {
            // A request head arrived: past the handshake.
            startup.lock().unwrap_or_else(|e| e.into_inner()).take();
            Exchange {
                onramp: onramp.clone(),
                cfg: cfg.clone(),
                src,
                dst: conn.dst,
            }
            .handle(req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(timeout)
            // A request head larger than this is refused (431), not buffered.
            .max_buf_size(MAX_HEAD)
            .max_header_size(MAX_HEAD)
            .max_headers(100)
            .serve_connection(TokioIo::new(client), svc)
            .with_upgrades();
        // A stopping door waits on no client (an idle keep-alive included).
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(%src, error = %e, "HTTP proxy connection ended with an error");
            },
            _ = stop.cancelled() => {}
        }
    }
}

impl Door for HttpDoor {
    const KIND: &'static str = "http_proxy";
    type Config = HttpProxyConfig;

    fn new(live: Arc<Live<HttpProxyConfig>>) -> Self {
        HttpDoor {
            live,
            startups: Default::default(),
        }
    }

    fn depends_on(cfg: &HttpProxyConfig) -> Vec<String> {
        cfg.depends_on()
    }

    fn parse(doc: &Document) -> Result<HttpProxyConfig, ConfigError> {
        HttpProxyConfig::from_document(doc)
    }

    fn settings(cfg: &HttpProxyConfig) -> &DoorSettings {
        &cfg.door
    }

    fn status(&self, cfg: &HttpProxyConfig, onramp: &OnRamp) -> serde_json::Value {
        let mut status = cfg.door.status(onramp);
        status.insert("users".into(), serde_json::json!(cfg.door.users.names()));
        status.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice@sydney:pa:ss");
        assert_eq!(
            parse_basic(format!("Basic {b64}").as_bytes()),
            Some(("alice@sydney".into(), b"pa:ss".to_vec()))
        );
        assert_eq!(
            parse_basic(format!("basic  {b64} ").as_bytes()).map(|c| c.0),
            Some("alice@sydney".into())
        );
        assert_eq!(parse_basic(b"Bearer abc"), None);
        assert_eq!(parse_basic(b"Basic !!!"), None);
        assert_eq!(parse_basic(b"Basic"), None);
        assert_eq!(parse_basic(&[0xff, 0xfe]), None);
        let no_colon = base64::engine::general_purpose::STANDARD.encode("alice");
        assert_eq!(parse_basic(format!("Basic {no_colon}").as_bytes()), None);
    }
}
