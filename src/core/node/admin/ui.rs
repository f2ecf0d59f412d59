//! The dashboard's files, embedded in the binary (no CDN: it works with no
//! internet), and the body of the live event stream.
//!
//! The page is plain HTML, CSS and JavaScript (no library). It holds no
//! data: everything it shows comes from `/api/v1/overview` and
//! `/api/v1/events` with the token the page asks for once (kept in the
//! tab's `sessionStorage`). Every string from the node (tenant, user, host
//! and peer names) reaches the page as a text node, never as markup, and
//! the Content-Security-Policy allows only the page's own script.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::Resp;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// What the page may load: its own files and the node's API, nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's file at `path`, if it is one.
pub(super) fn asset(path: &str) -> Option<Resp> {
    let (body, kind) = match path {
        "/ui" | "/ui/" | "/ui/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/ui/app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/ui/style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    if path == "/ui" {
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
        r.headers_mut()
            .insert(hyper::header::LOCATION, HeaderValue::from_static("/ui/"));
        return Some(r);
    }
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}

/// The size of the embedded files, bytes.
#[cfg(test)]
fn assets_size() -> usize {
    INDEX.len() + SCRIPT.len() + STYLE.len()
}

/// A response body fed by a channel: each message one chunk of the event
/// stream; it ends when the sender does.
pub(super) struct EventBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_small_and_never_build_markup_from_data() {
        // A few hundred KiB at most (issue: small, readable).
        assert!(assets_size() < 100 * 1024, "{}", assets_size());
        // Data reaches the page as text: no innerHTML, outerHTML,
        // insertAdjacentHTML, document.write or eval in the script.
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(bad), "app.js uses {bad}");
        }
        // The page loads only its own files.
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        let r = asset("/ui/").unwrap();
        assert_eq!(
            r.headers()["content-security-policy"].to_str().unwrap(),
            CSP
        );
        assert!(asset("/ui/other").is_none());
    }
}
