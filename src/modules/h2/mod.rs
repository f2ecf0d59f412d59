//! `kind: h2`: an HTTP/2 CONNECT door over TLS 1.3, as Istio's HBONE
//! carries TCP between nodes (port 15008). Each `CONNECT host:port` stream
//! is one flow on the one path ([`OnRamp::connect_answering`]): the client
//! certificate's identity (`identity_from`) for policy and audit, the
//! original source from `Forwarded: for=` when the certificate is one of
//! `trust_forwarded`, and the client's `traceparent` and `baggage` in the
//! audit record. Replies as ztunnel's:
//!
//! | outcome | status |
//! |---|---|
//! | tunnel open | `200` (then the stream is the tunnel) |
//! | not CONNECT, no `host:port` authority | `400` |
//! | a client certificate that names no identity | `401` |
//! | denied by policy, a `reject` route, no route, a forbidden address | `403` |
//! | dial failed (refused, unreachable, name unknown), door stopping | `503` |
//! | no answer within `connect_timeout` | `504` |
//!
//! Links publish ports here as `ssh -R` does
//! ([`publish`](crate::core::spine::onramp::publish)): an extended CONNECT
//! with `:protocol: meshgate-publish` parks until a connection arrives at
//! the published port, answered `200` with `forwarded: for=` its client.
//!
//! Refusals carry `x-meshgate-reason`. A failed or slow TLS handshake is
//! counted (`tls_handshake`, `handshake_timeout`); HTTP/2 protocol errors
//! (malformed frames, oversized headers, streams past `max_streams`) are
//! answered by the HTTP/2 stack (`h2`) with its own error codes. Drain
//! sends GOAWAY: open tunnels finish, new streams go elsewhere.

pub mod config;
pub mod link;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use configstore::Document;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::core::config::ConfigError;
use crate::core::net::guard::Share;
use crate::core::net::proxy::Stream;
use crate::core::spine::door::{Door, DoorFactory, DoorSettings, Live};
use crate::core::spine::flow::EndReason;
use crate::core::spine::onramp::http::{self, text, Body, Client, Handover, Tunneler};
use crate::core::spine::onramp::publish::{self, Held, Publications};
use crate::core::spine::onramp::{Accepted, OnRamp, StreamHandler, Target};
use crate::core::spine::reject::RejectReason;

pub use crate::core::spine::onramp::http::parse_forwarded;
pub use config::H2Config;

/// Builds h2 doors.
pub type H2Factory = DoorFactory<H2Door>;

/// The door's connections, reading the live config.
pub struct H2Door {
    live: Arc<Live<H2Config>>,
    /// Connections whose TLS handshake has not finished (`max_startups`).
    startups: Arc<crate::core::spine::startups::Startups>,
    /// Cancelled when the door drains: each connection sends GOAWAY.
    drain: Mutex<CancellationToken>,
    /// CONNECT streams open now.
    streams: Arc<AtomicUsize>,
    /// Ports links published here.
    publications: Arc<Publications>,
}

/// One TLS connection's requests.
struct Exchange {
    onramp: Arc<OnRamp>,
    cfg: Arc<H2Config>,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    /// The client certificate's identity.
    identity: Option<String>,
    /// Whether the client presented a certificate.
    certified: bool,
    streams: Arc<AtomicUsize>,
    publications: Arc<Publications>,
    /// The ports this connection published.
    held: Held,
    /// Cancelled when the door drains.
    drain: CancellationToken,
}

impl Exchange {
    fn refuse(&self, reason: RejectReason, status: StatusCode, detail: String) -> Response<Body> {
        self.onramp.refused(
            "h2.refused",
            self.src,
            self.identity.as_deref(),
            reason,
            &detail,
        );
        text(status, Some(reason.as_str()), detail)
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        if let Some(protocol) = req.extensions().get::<hyper::ext::Protocol>() {
            if protocol.as_str() == publish::PROTOCOL {
                return Ok(self.publish(req).await);
            }
            let detail = format!("unknown :protocol {:?}", protocol.as_str());
            return Ok(self.refuse(RejectReason::BadRequest, StatusCode::BAD_REQUEST, detail));
        }
        let who = Tunneler {
            peer: self.src,
            dst: self.dst,
            identity: self.identity.clone(),
            certified: self.certified,
            trust_forwarded: &self.cfg.tls.trust_forwarded,
        };
        let flow = match http::tunnel_request(
            &who,
            req.method(),
            req.uri().authority(),
            req.headers(),
            &self.cfg.door,
        ) {
            Ok(f) => f,
            Err(r) => return Ok(self.refuse(r.reason, r.status, r.detail)),
        };
        let target = match &flow.target {
            Target::Addr(t) => t.to_string(),
            Target::Unknown { label, .. } => label.clone(),
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let (tx, rx) = oneshot::channel();
        let onramp = self.onramp.clone();
        let open = Share::new(&self.streams);
        self.onramp.spawn(async move {
            let _open = open;
            onramp
                .connect_answering(
                    flow,
                    Box::new(Handover {
                        outcome: tx,
                        client: Client::Upgrade(upgrade),
                    }),
                )
                .await;
        });
        Ok(match rx.await.unwrap_or(Err(EndReason::Stopped)) {
            Ok(()) => http::empty(StatusCode::OK),
            Err(reason) => text(
                http::status_for(reason, StatusCode::SERVICE_UNAVAILABLE),
                Some(reason.as_str()),
                format!("{target}: {}", reason.detail()),
            ),
        })
    }
}

impl Exchange {
    /// A link's publish request: parks until a connection arrives at the
    /// port (bound at the first request), then answers `200` with the
    /// client in `forwarded: for=`, and the stream carries it.
    async fn publish(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let Some(port) = publish::port_of(req.uri().path()) else {
            let detail = format!(
                "a publish request's path is /publish/PORT, not {:?}",
                req.uri().path()
            );
            return self.refuse(RejectReason::BadRequest, StatusCode::BAD_REQUEST, detail);
        };
        let door = &self.cfg.door;
        let arrival = publish::Arrival {
            wait: door.connect_timeout,
            idle_timeout: door.idle_timeout,
            max_connections: door.max_connections,
        };
        let port = match self
            .publications
            .request(
                &self.onramp,
                &self.cfg.publish,
                self.identity.as_deref(),
                self.src,
                &self.held,
                port,
                arrival,
            )
            .await
        {
            Ok(p) => p,
            Err(r) => return text(r.status, Some(r.reason.as_str()), r.detail),
        };
        let offer = tokio::select! {
            o = port.next() => o,
            // A drained door's parked requests end, so the link parks them
            // on another connection.
            _ = self.drain.cancelled() => {
                return text(StatusCode::SERVICE_UNAVAILABLE, Some(EndReason::Stopped.as_str()), "the door is draining".into());
            }
            _ = self.onramp.stopping().cancelled() => {
                return text(StatusCode::SERVICE_UNAVAILABLE, Some(EndReason::Stopped.as_str()), "the door is stopping".into());
            }
        };
        let src = offer.src;
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            // Not upgraded (the stream reset): the offer is dropped and the
            // arrival ends as refused.
            if let Ok(up) = upgrade.await {
                offer.hand(http::h2_stream(up));
            }
        });
        let mut resp = http::empty(StatusCode::OK);
        if let Ok(v) = hyper::header::HeaderValue::from_str(&http::forwarded_for(src)) {
            resp.headers_mut().insert("forwarded", v);
        }
        resp
    }
}

impl H2Door {
    /// Serves HTTP/2 on `io` until it ends, the door stops, or (after a
    /// GOAWAY at drain) its last stream ends.
    async fn serve<I>(&self, onramp: &Arc<OnRamp>, io: I, exchange: Arc<Exchange>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let l = exchange.cfg.limits;
        let src = exchange.src;
        let drain = exchange.drain.clone();
        let svc = hyper::service::service_fn(move |req| exchange.clone().handle(req));
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(l.stream_window)
            .initial_connection_window_size(l.connection_window)
            .max_frame_size(l.max_frame_size)
            .max_header_list_size(l.max_header_list)
            .max_concurrent_streams(l.max_streams)
            .keep_alive_interval(l.keepalive)
            .keep_alive_timeout(l.keepalive_timeout)
            .enable_connect_protocol()
            .serve_connection(TokioIo::new(io), svc);
        let mut conn = std::pin::pin!(conn);
        let stop = onramp.stopping().clone();
        let ended = tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.cancelled() => {
                // GOAWAY: no new streams; the open ones finish.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stop.cancelled() => Ok(()),
                }
            }
            _ = stop.cancelled() => Ok(()),
        };
        if let Err(e) = ended {
            tracing::debug!(%src, error = %e, "HTTP/2 connection ended with an error");
        }
    }

    fn reject(&self, onramp: &OnRamp, src: SocketAddr, reason: RejectReason, detail: &str) {
        onramp.refused("h2.handshake", src, None, reason, detail);
    }
}

#[async_trait]
impl StreamHandler for H2Door {
    fn max_connections(&self) -> usize {
        self.live.get().door.max_connections
    }

    fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.live.get().door.accept_proxy_protocol.clone()
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let src = conn.src;
        let cfg = self.live.get();
        // Counted among the connections whose TLS handshake has not
        // finished, until it has: past the caps a new one is refused.
        let startup = match self
            .startups
            .try_start(src.ip(), &cfg.door.handshake.startups)
        {
            Ok(s) => s,
            Err(reason) => {
                return self.reject(
                    onramp,
                    src,
                    reason,
                    "too many connections in their handshake",
                )
            }
        };
        let exchange = |identity, certified| {
            Arc::new(Exchange {
                onramp: onramp.clone(),
                cfg: cfg.clone(),
                src,
                dst: conn.dst,
                identity,
                certified,
                streams: self.streams.clone(),
                publications: self.publications.clone(),
                held: Held::default(),
                drain: self.drain.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            })
        };
        let Some(server) = cfg.tls.server.clone() else {
            drop(startup);
            return self.serve(onramp, client, exchange(None, false)).await;
        };
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(client);
        let tls = tokio::select! {
            r = tokio::time::timeout(cfg.door.handshake.timeout, accept) => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return self.reject(onramp, src, RejectReason::TlsHandshake, &e.to_string()),
                Err(_) => return self.reject(onramp, src, RejectReason::HandshakeTimeout, "no TLS handshake within handshake_timeout"),
            },
            _ = onramp.stopping().cancelled() => return,
        };
        drop(startup);
        let (identity, certified) = cfg.tls.identity(tls.get_ref().1.peer_certificates());
        self.serve(onramp, tls, exchange(identity, certified)).await;
    }
}

impl Door for H2Door {
    const KIND: &'static str = "h2";
    type Config = H2Config;

    fn new(live: Arc<Live<H2Config>>) -> Self {
        H2Door {
            live,
            startups: Default::default(),
            drain: Mutex::new(CancellationToken::new()),
            streams: Default::default(),
            publications: Default::default(),
        }
    }

    fn depends_on(cfg: &H2Config) -> Vec<String> {
        cfg.depends_on()
    }

    fn parse(doc: &Document) -> Result<H2Config, ConfigError> {
        H2Config::from_document(doc)
    }

    fn settings(cfg: &H2Config) -> &DoorSettings {
        &cfg.door
    }

    fn status(&self, cfg: &H2Config, onramp: &OnRamp) -> serde_json::Value {
        let mut status = cfg.door.status(onramp);
        status.insert(
            "tls".into(),
            serde_json::json!(if cfg.tls.server.is_some() {
                "1.3"
            } else {
                "none (h2c)"
            }),
        );
        status.insert(
            "client_auth".into(),
            serde_json::json!(cfg.tls.client_auth_name()),
        );
        status.insert(
            "streams".into(),
            self.streams.load(Ordering::Relaxed).into(),
        );
        status.insert("max_streams".into(), cfg.limits.max_streams.into());
        if let Ok(ports) = self.publications.try_status() {
            status.insert("published".into(), ports.into());
        }
        status.into()
    }

    fn draining(&self) {
        // Connections hold the token they started with; later ones (the
        // door started again) get a fresh one.
        let mut d = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        d.cancel();
        *d = CancellationToken::new();
    }
}
