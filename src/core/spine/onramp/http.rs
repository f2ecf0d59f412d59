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
use crate::core::spine::flow::EndReason;

use super::Answer;

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
                    Err(up) => Stream::io(TokioIo::new(up)),
                })
            }
            Client::Pipe(p) => Some(Stream::io(p)),
        }
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
