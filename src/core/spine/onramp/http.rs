//! What the HTTP doors (`http_proxy`'s HTTP/1.1, `h2`'s HTTP/2) share: a
//! CONNECT authority as a target, the one-line text replies with the
//! refusal's reason in `x-meshgate-reason`, the status for a flow that
//! ended before relaying, and [`Handover`], the [`Answer`] that tells the
//! request handler the outcome and then hands over the upgraded stream.

use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use crate::core::addr::HostPort;
use crate::core::net::dial::DialFailure;
use crate::core::net::proxy::Stream;
use crate::core::net::trace::Trace;
use crate::core::spine::door::DoorSettings;
use crate::core::spine::flow::EndReason;
use crate::core::spine::reject::RejectReason;

use super::{Answer, ConnectRequest, RouteVia, Target};

/// A reply body.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// An empty reply with `status`.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

/// A one-line `text/plain` reply, with `reason` (a refusal's or a flow
/// end's name) in `x-meshgate-reason`.
pub fn text(status: StatusCode, reason: Option<&str>, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body + "\n"))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    if let Some(reason) = reason.and_then(|r| HeaderValue::from_str(r).ok()) {
        r.headers_mut().insert("x-meshgate-reason", reason);
    }
    r
}

/// The status for a flow that ended before relaying: 403 for a refusal
/// (policy, route, forbidden address), 504 for a dial that timed out, and
/// `dial_failed` (502 for the HTTP/1.1 proxy, 503 as HBONE answers) for
/// any other failed dial or a stopping door.
pub fn status_for(reason: EndReason, dial_failed: StatusCode) -> StatusCode {
    match reason {
        EndReason::Denied
        | EndReason::Rejected
        | EndReason::NoRoute
        | EndReason::Forbidden(_)
        | EndReason::PolicyRevoked => StatusCode::FORBIDDEN,
        EndReason::DialFailed(DialFailure::Timeout) => StatusCode::GATEWAY_TIMEOUT,
        _ => dial_failed,
    }
}

/// The `host:port` of a CONNECT request's authority (IPv6 brackets
/// removed); `None` without a port.
pub fn connect_target(authority: Option<&hyper::http::uri::Authority>) -> Option<HostPort> {
    let a = authority?;
    Some(HostPort {
        host: a.host().trim_matches(['[', ']']).to_string(),
        port: a.port_u16()?,
    })
    .filter(|t| !t.host.is_empty())
}

/// Who sent a tunnel request (HTTP/2 or QUIC CONNECT), as TLS told.
pub struct Tunneler<'a> {
    /// The connection's peer (or its load balancer's client).
    pub peer: SocketAddr,
    /// The address it connected to.
    pub dst: Option<SocketAddr>,
    /// The client certificate's identity.
    pub identity: Option<String>,
    /// Whether it presented a certificate.
    pub certified: bool,
    /// Identities whose `Forwarded: for=` is believed.
    pub trust_forwarded: &'a [String],
}

/// A refused tunnel request: the reason counted, the status, a line.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// What is counted.
    pub reason: RejectReason,
    /// What the client is told.
    pub status: StatusCode,
    /// One line for the client.
    pub detail: String,
}

/// The flow an HBONE-style `CONNECT host:port` asks for (HTTP/2 over TLS,
/// or a QUIC stream): `400` for another method or no `host:port`, `401`
/// for a certificate that names no identity; the source from `Forwarded:
/// for=` if the client's identity is trusted to say it; the trace context
/// if well-formed. Routed in the door's vnet, chosen by the client.
pub fn tunnel_request(
    who: &Tunneler<'_>,
    method: &hyper::Method,
    authority: Option<&hyper::http::uri::Authority>,
    headers: &hyper::HeaderMap,
    door: &DoorSettings,
) -> Result<ConnectRequest, Refused> {
    if method != hyper::Method::CONNECT {
        return Err(Refused {
            reason: RejectReason::BadRequest,
            status: StatusCode::BAD_REQUEST,
            detail: format!("this door carries CONNECT host:port only, not {method}"),
        });
    }
    let Some(target) = connect_target(authority) else {
        return Err(Refused {
            reason: RejectReason::BadRequest,
            status: StatusCode::BAD_REQUEST,
            detail: "CONNECT needs an authority host:port".into(),
        });
    };
    if who.certified && who.identity.is_none() {
        return Err(Refused {
            reason: RejectReason::IdentityRequired,
            status: StatusCode::UNAUTHORIZED,
            detail: "the client certificate names no identity this door takes (identity_from)"
                .into(),
        });
    }
    // Another gateway's client: its certificate is trusted to say who.
    let src = match &who.identity {
        Some(id) if who.trust_forwarded.iter().any(|t| t == id) => headers
            .get("forwarded")
            .and_then(|v| parse_forwarded(v.as_bytes()))
            .unwrap_or(who.peer),
        _ => who.peer,
    };
    let trace = Trace::parse(
        headers.get_all("traceparent").iter().map(|v| v.as_bytes()),
        headers.get_all("baggage").iter().map(|v| v.as_bytes()),
    )
    .map(std::sync::Arc::new);
    Ok(ConnectRequest {
        src,
        target: Target::Addr(target),
        identity: who.identity.clone(),
        via: RouteVia::Vnet(door.vnet.clone()),
        connect_timeout: door.connect_timeout,
        idle_timeout: door.idle_timeout,
        client_dst: who.dst,
        proxy_protocol: None,
        chosen_by: crate::core::spine::dest::ChosenBy::Client,
        trace,
    })
}

/// The client address a `Forwarded` header (RFC 7239) gives: the `for=`
/// of its first element, as `1.2.3.4`, `1.2.3.4:5678` or `"[fd00::1]:5678"`
/// (port 0 when none is given). `None` for `unknown`, an obfuscated
/// identifier, or anything malformed. Never panics
/// (`fuzz/fuzz_targets/h2_request.rs`).
pub fn parse_forwarded(value: &[u8]) -> Option<SocketAddr> {
    let value = std::str::from_utf8(value).ok()?;
    let first = value.split(',').next()?;
    let v = first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let v = match v.strip_prefix('"') {
        Some(q) => q.strip_suffix('"')?,
        None => v,
    };
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Some(a);
    }
    let ip = match v.strip_prefix('[') {
        Some(b) => b
            .strip_suffix(']')?
            .parse::<std::net::Ipv6Addr>()
            .ok()?
            .into(),
        None => v.parse::<std::net::IpAddr>().ok()?,
    };
    Some(SocketAddr::new(ip, 0))
}

/// `Forwarded: for=` for `src` (RFC 7239: quoted with a port, IPv6 in
/// brackets), as gateway links send it.
pub fn forwarded_for(src: SocketAddr) -> String {
    format!("for=\"{src}\"")
}

/// The dial error for a tunnel the other gateway refused (`via` names the
/// link): its status and `x-meshgate-reason` mapped back, so the flow here
/// ends as it did there.
pub fn far_refusal(
    target: &HostPort,
    via: &str,
    status: StatusCode,
    reason: &str,
    timeout: std::time::Duration,
) -> crate::core::net::dial::DialError {
    use crate::core::net::dial::DialError;
    let far = format!("{target}: the other gateway ({via}) answered {status}");
    match (status.as_u16(), reason) {
        (504, _) | (_, "dial_timeout") => DialError::Timeout {
            target: target.to_string(),
            timeout,
        },
        (_, "dial_resolve") => DialError::Resolve {
            host: target.host.clone(),
            message: far,
        },
        (503, _) => DialError::Refused(format!("{far} ({reason})")),
        _ => DialError::NoRoute(format!("{far} ({reason})")),
    }
}

/// The client side of a proxied flow: reports the outcome to the request
/// handler, then hands over the stream to relay (the upgraded connection
/// or stream of a CONNECT, or the near end of a forwarded exchange's pipe).
pub struct Handover {
    /// Where the outcome goes (the request handler, which replies).
    pub outcome: oneshot::Sender<Result<(), EndReason>>,
    /// What to relay once the reply is sent.
    pub client: Client,
}

/// What a [`Handover`] relays.
pub enum Client {
    /// The request's upgrade (HTTP/1.1: the connection; HTTP/2: the stream).
    Upgrade(hyper::upgrade::OnUpgrade),
    /// An in-memory pipe (a forwarded HTTP/1.1 exchange).
    Pipe(tokio::io::DuplexStream),
}

#[async_trait]
impl Answer for Handover {
    async fn answer(
        self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream> {
        let ok = outcome.is_ok();
        let _ = self.outcome.send(outcome.map(|_| ()));
        if !ok {
            return None;
        }
        match self.client {
            Client::Upgrade(up) => {
                let up = up.await.ok()?;
                // An HTTP/1.1 connection hyper served is our own stream:
                // take it back (with anything hyper read past the request),
                // so a kernel socket keeps the splice fast path. An HTTP/2
                // stream is hyper's own.
                Some(match up.downcast::<TokioIo<Stream>>() {
                    Ok(parts) => parts.io.into_inner().prepend(parts.read_buf.to_vec()),
                    Err(up) => h2_stream(up),
                })
            }
            Client::Pipe(p) => Some(Stream::io(p)),
        }
    }
}

/// An upgraded HTTP/2 stream (a tunnel) as a [`Stream`].
pub fn h2_stream(up: hyper::upgrade::Upgraded) -> Stream {
    Stream::io(CleanEof(TokioIo::new(up)))
}

/// An HTTP/2 tunnel's client side. A client that closes its TLS
/// connection without `close_notify` once its exchange is done (libcurl
/// does) ends the tunnel as a close, not as an error: the tunnel's own
/// protocol decides whether what came was whole.
struct CleanEof<S>(S);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CleanEof<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CleanEof<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_for_flow_ends() {
        let bad = StatusCode::BAD_GATEWAY;
        assert_eq!(status_for(EndReason::Denied, bad), StatusCode::FORBIDDEN);
        assert_eq!(status_for(EndReason::NoRoute, bad), StatusCode::FORBIDDEN);
        assert_eq!(
            status_for(EndReason::DialFailed(DialFailure::Timeout), bad),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status_for(EndReason::DialFailed(DialFailure::Refused), bad),
            bad
        );
        assert_eq!(
            status_for(
                EndReason::DialFailed(DialFailure::Refused),
                StatusCode::SERVICE_UNAVAILABLE
            ),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn forwarded_for_round_trips() {
        let f = |s: &str| parse_forwarded(s.as_bytes());
        assert_eq!(f("for=10.1.2.3"), Some("10.1.2.3:0".parse().unwrap()));
        assert_eq!(
            f("for=\"10.1.2.3:4567\";proto=https, for=9.9.9.9"),
            Some("10.1.2.3:4567".parse().unwrap())
        );
        assert_eq!(
            f("proto=http; For=\"[fd00::1]:80\""),
            Some("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(f("for=\"[fd00::1]\""), Some("[fd00::1]:0".parse().unwrap()));
        assert_eq!(f("for=unknown"), None);
        assert_eq!(f("for=_hidden"), None);
        assert_eq!(f("for=\"10.1.2.3"), None);
        assert_eq!(f("by=10.1.2.3"), None);
        assert_eq!(f("for=fd00::1"), Some("[fd00::1]:0".parse().unwrap()));
        assert_eq!(parse_forwarded(&[0xff, b'=']), None);
        for src in ["10.1.2.3:4567", "[fd00::1]:80"] {
            let src: SocketAddr = src.parse().unwrap();
            assert_eq!(parse_forwarded(forwarded_for(src).as_bytes()), Some(src));
        }
    }

    #[test]
    fn connect_targets() {
        let t = |s: &str| connect_target(s.parse::<hyper::http::uri::Authority>().ok().as_ref());
        assert_eq!(
            t("10.0.0.2:80"),
            Some(HostPort {
                host: "10.0.0.2".into(),
                port: 80
            })
        );
        assert_eq!(t("[fd00::2]:443").map(|t| t.host), Some("fd00::2".into()));
        assert_eq!(t("web.internal:8080").map(|t| t.port), Some(8080));
        assert_eq!(t("10.0.0.2"), None);
        assert_eq!(connect_target(None), None);
    }
}
