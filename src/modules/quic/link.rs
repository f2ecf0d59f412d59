//! `kind: quic_link`: a gateway's link to another node's `kind: quic`
//! door: one QUIC connection (TLS 1.3, the server checked against `ca`,
//! our certificate as our identity), one bidirectional stream per flow.
//!
//! A route connector as `h2_link` is: each flow sends `CONNECT host:port`
//! with `Forwarded: for=` and the client's trace, and the far node
//! resolves, checks and dials. QUIC keeps streams independent (a lost
//! packet stalls only its own stream) and the connection survives our
//! address changing. While the connection is down a dial fails at once
//! (`no_route`); the link reconnects every `backoff_max` (1 s ±20 %), and
//! at once when the door resets the connection after a restart (the
//! door's stateless-reset key comes from its TLS key). PINGs every
//! `keepalive` (1 s) and `keepalive_timeout` (4 s) notice a silent path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use configstore::Document;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::config::{parse_document, positive, ByteSize, ConfigError, IdleTimeout};
use crate::core::net::backoff::Backoff;
use crate::core::net::dial::{DialError, DialMeta, Dialer};
use crate::core::net::link_metrics::{LinkMetrics, LinkSeries};
use crate::core::net::proxy::Stream;
use crate::core::net::tls::{self, ClientFiles};
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::spine::onramp::http::{far_refusal, forwarded_for};

use super::{read_head, QuicLimits, ALPN};

/// `kind: quic_link`
///
/// ```yaml
/// kind: quic_link
/// server: gw-east.example:15009   # the other node's quic door (UDP)
/// server_name: gw-east.example    # its certificate's name (default: server's host)
/// ca: /etc/meshgate/ca.pem
/// tls_cert: /etc/meshgate/west.pem  # our identity there, and its key
/// tls_key: /etc/meshgate/west.key
/// connect_timeout: 10s
/// keepalive: 1s                   # PING when idle; keepalive_timeout (4s) of silence ends it
/// backoff_max: 1s
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: HostPort,
    #[serde(default)]
    server_name: Option<String>,
    ca: PathBuf,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default)]
    keepalive: Option<IdleTimeout>,
    #[serde(default, with = "humantime_serde")]
    keepalive_timeout: Option<Duration>,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    backoff_max: Duration,
    #[serde(default)]
    stream_window: Option<ByteSize>,
    #[serde(default)]
    connection_window: Option<ByteSize>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(1)
}

/// A checked `quic_link` config.
#[derive(Clone)]
pub struct QuicLinkConfig {
    /// The other node's quic door.
    pub server: HostPort,
    /// The name its certificate must have.
    pub server_name: String,
    /// quinn's client config (TLS and transport).
    client: quinn::ClientConfig,
    files: ClientFiles,
    /// Dial and handshake timeout.
    pub connect_timeout: Duration,
    /// The longest wait between reconnects.
    pub backoff_max: Duration,
    limits: QuicLimits,
}

impl QuicLinkConfig {
    /// Parses and validates a `kind: quic_link` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = doc.source.as_str();
        positive(src, "connect_timeout", raw.connect_timeout)?;
        if raw.backoff_max < Duration::from_secs(1) {
            return Err(ConfigError::key(src, "backoff_max", "at least 1s"));
        }
        let server_name = raw
            .server_name
            .clone()
            .unwrap_or_else(|| raw.server.host.clone());
        ServerName::try_from(server_name.clone()).map_err(|_| {
            ConfigError::key(
                src,
                if raw.server_name.is_some() {
                    "server_name"
                } else {
                    "server"
                },
                format!("`{server_name}` is not a DNS name or IP address a certificate can be for"),
            )
        })?;
        let identity = match (raw.tls_cert, raw.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::key(
                    src,
                    "tls_key",
                    "missing: `tls_cert` needs its key",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::key(
                    src,
                    "tls_cert",
                    "missing: `tls_key` needs its certificate",
                ))
            }
        };
        let files = ClientFiles {
            ca: raw.ca,
            identity,
        };
        let tls = tls::client_config(src, &files, &[ALPN])?;
        let limits = QuicLimits::read(
            src,
            QuicLimits::LINK,
            raw.stream_window,
            raw.connection_window,
            raw.keepalive,
            raw.keepalive_timeout,
        )?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| ConfigError::doc(src, format!("QUIC: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(
            limits
                .transport()
                .map_err(|e| ConfigError::key(src, "keepalive_timeout", e))?,
        ));
        Ok(QuicLinkConfig {
            server: raw.server,
            server_name,
            client,
            files,
            connect_timeout: raw.connect_timeout,
            backoff_max: raw.backoff_max,
            limits,
        })
    }

    fn reconnects(&self, new: &QuicLinkConfig) -> bool {
        self.server != new.server
            || self.server_name != new.server_name
            || self.files != new.files
            || self.limits != new.limits
    }
}

/// Builds QUIC links.
pub struct QuicLinkFactory;

impl ModuleFactory for QuicLinkFactory {
    fn kind(&self) -> &'static str {
        "quic_link"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        QuicLinkConfig::from_document(doc)?;
        Ok(ModulePlan::default())
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = QuicLinkConfig::from_document(doc)?;
        Ok(Arc::new(QuicLink(Arc::new(Link {
            ctx,
            cfg: RwLock::new(Arc::new(cfg)),
            conn: RwLock::new(None),
            status: Mutex::new(LinkStatus::default()),
            running: Mutex::new(None),
            streams: Default::default(),
            endpoint: Mutex::new(None),
        }))))
    }
}

#[derive(Default, Clone, serde::Serialize)]
struct LinkStatus {
    connected: bool,
    up_since: Option<u64>,
    reconnects: u64,
    last_error: Option<String>,
}

struct Link {
    ctx: ModuleContext,
    cfg: RwLock<Arc<QuicLinkConfig>>,
    conn: RwLock<Option<quinn::Connection>>,
    status: Mutex<LinkStatus>,
    running: Mutex<Option<CancellationToken>>,
    streams: Arc<AtomicUsize>,
    /// Our UDP endpoint (one per address family in use).
    endpoint: Mutex<Option<quinn::Endpoint>>,
}

/// A running QUIC link.
pub struct QuicLink(Arc<Link>);

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("QUIC: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("no QUIC handshake within {0:?}")]
    Timeout(Duration),
}

impl Link {
    fn cfg(&self) -> Arc<QuicLinkConfig> {
        self.cfg.read().expect("poisoned").clone()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, LinkStatus> {
        self.status.lock().expect("poisoned")
    }

    /// This link's `meshgate_link_*` series.
    fn series(&self) -> LinkSeries {
        self.ctx.metrics.subsystem::<LinkMetrics>().series(
            &self.ctx.tenant.name,
            &self.ctx.instance,
            "quic",
        )
    }

    fn conn(&self) -> Option<quinn::Connection> {
        self.conn
            .read()
            .expect("poisoned")
            .clone()
            .filter(|c| c.close_reason().is_none())
    }

    /// Our endpoint for `server`'s address family (made once).
    fn endpoint(&self, server: SocketAddr) -> Result<quinn::Endpoint, LinkError> {
        let mut ep = self.endpoint.lock().expect("poisoned");
        if let Some(e) = ep.as_ref() {
            if e.local_addr()
                .is_ok_and(|a| a.is_ipv4() == server.is_ipv4())
            {
                return Ok(e.clone());
            }
        }
        let e = quinn::Endpoint::client(crate::core::net::datagram::any_for(server))
            .map_err(LinkError::Endpoint)?;
        *ep = Some(e.clone());
        Ok(e)
    }

    async fn open(&self) -> Result<quinn::Connection, LinkError> {
        let cfg = self.cfg();
        let attempt = async {
            let ips = crate::core::net::resolve::on_host(&cfg.server.host, cfg.connect_timeout)
                .await
                .map_err(|e| LinkError::Resolve(format!("{}: {e}", cfg.server.host)))?;
            let ip = *ips
                .first()
                .ok_or_else(|| LinkError::Resolve(cfg.server.host.clone()))?;
            let server = SocketAddr::new(ip, cfg.server.port);
            let ep = self.endpoint(server)?;
            let conn = ep
                .connect_with(cfg.client.clone(), server, &cfg.server_name)?
                .await?;
            Ok::<_, LinkError>(conn)
        };
        tokio::time::timeout(cfg.connect_timeout, attempt)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))?
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let (tenant, instance) = (self.ctx.tenant.name.clone(), self.ctx.instance.clone());
        let mut backoff = Backoff::new(self.cfg().backoff_max);
        let mut connections = 0u64;
        let metrics = self.series();
        loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.open() => r,
            };
            match attempt {
                Ok(conn) => {
                    let since = Instant::now();
                    {
                        let mut st = self.status();
                        st.connected = true;
                        st.up_since = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs());
                        st.reconnects = connections;
                        st.last_error = None;
                    }
                    metrics.connected(connections > 0);
                    connections += 1;
                    *self.conn.write().expect("poisoned") = Some(conn.clone());
                    tracing::info!(%tenant, %instance, server = %self.cfg().server, "quic link up");
                    let why = loop {
                        metrics.rtt(conn.rtt());
                        tokio::select! {
                            _ = stop.cancelled() => {
                                conn.close(0u32.into(), b"link stopped");
                                *self.conn.write().expect("poisoned") = None;
                                self.status().connected = false;
                                metrics.down();
                                return;
                            }
                            e = conn.closed() => break e,
                            _ = tokio::time::sleep(RTT_EVERY) => {}
                        }
                    };
                    metrics.down();
                    *self.conn.write().expect("poisoned") = None;
                    {
                        let mut st = self.status();
                        st.connected = false;
                        st.last_error = Some(why.to_string());
                    }
                    tracing::warn!(%tenant, %instance, up_for = ?since.elapsed(), reason = %why, "quic link down; reconnecting");
                    backoff.ended_after(since.elapsed());
                    if matches!(why, quinn::ConnectionError::Reset) {
                        // A stateless reset: the door is up again, without
                        // our connection. Reconnect now.
                        backoff.at_once();
                    }
                }
                Err(e) => {
                    tracing::warn!(%tenant, %instance, error = %e, "quic link: cannot connect");
                    self.status().last_error = Some(e.to_string());
                }
            }
            let wait = backoff.next(self.cfg().backoff_max);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn start_loop(self: &Arc<Self>) {
        let stop = CancellationToken::new();
        if let Some(old) = self.running.lock().expect("poisoned").replace(stop.clone()) {
            old.cancel();
        }
        tokio::spawn(self.clone().run(stop));
    }
}

/// How often the RTT gauge is brought up to date.
const RTT_EVERY: Duration = Duration::from_secs(5);

/// A tunnel stream, counted while open.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The status of a response head (`HTTP/1.1 200 OK`), and its reason header.
fn parse_response(head: &[u8]) -> Option<(u16, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let reason = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("x-meshgate-reason"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .unwrap_or("")
        .to_string();
    Some((resp.code?, reason))
}

struct LinkDialer(Arc<Link>);

#[async_trait]
impl Dialer for LinkDialer {
    async fn dial_tcp(&self, target: &HostPort, timeout: Duration) -> Result<Stream, DialError> {
        self.dial_tcp_for(target, timeout, &DialMeta::default())
            .await
    }

    async fn dial_tcp_for(
        &self,
        target: &HostPort,
        timeout: Duration,
        meta: &DialMeta,
    ) -> Result<Stream, DialError> {
        let link = &self.0;
        let via = format!("quic link `{}`", link.ctx.instance);
        let conn = link.conn().ok_or_else(|| {
            DialError::Down(format!(
                "{via} to {} is down (reconnecting)",
                link.cfg().server
            ))
        })?;
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n");
        if let Some(src) = meta.src {
            head.push_str(&format!("forwarded: {}\r\n", forwarded_for(src)));
        }
        if let Some(t) = &meta.trace {
            if let Some(tp) = &t.traceparent {
                head.push_str(&format!("traceparent: {tp}\r\n"));
            }
            if let Some(b) = &t.baggage {
                head.push_str(&format!("baggage: {b}\r\n"));
            }
        }
        head.push_str("\r\n");
        let lost = |e: String| DialError::Down(format!("{target}: {via}: {e}"));
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
            link.streams.fetch_add(1, Ordering::Relaxed);
            let counted = Counted(link.streams.clone());
            send.write_all(head.as_bytes())
                .await
                .map_err(|e| lost(e.to_string()))?;
            let (resp, rest) = read_head(&mut recv).await.map_err(lost)?;
            let (code, reason) = parse_response(&resp)
                .ok_or_else(|| lost("the other gateway's answer is not a status line".into()))?;
            if code != 200 {
                let status =
                    hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
                return Err(far_refusal(target, &via, status, &reason, timeout));
            }
            link.series().flow();
            Ok(Stream::io(Tunnel {
                io: tokio::io::join(recv, send),
                _counted: counted,
            })
            .prepend(rest))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout {
                target: target.to_string(),
                timeout,
            }),
        }
    }
}

/// A QUIC stream as a flow's upstream.
struct Tunnel {
    io: tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
    _counted: Counted,
}

impl tokio::io::AsyncRead for Tunnel {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tunnel {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[async_trait]
impl Module for QuicLink {
    async fn start(&self) -> Result<(), ModuleError> {
        self.0.start_loop();
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let link = &self.0;
        let cfg = QuicLinkConfig::from_document(doc)?;
        let reconnect = link.cfg().reconnects(&cfg);
        *link.cfg.write().expect("poisoned") = Arc::new(cfg);
        if reconnect {
            link.start_loop();
        }
        Ok(())
    }

    async fn drain(&self) {}

    async fn stop(&self) {
        if let Some(stop) = self.0.running.lock().expect("poisoned").take() {
            stop.cancel();
        }
        if let Some(c) = self.0.conn.write().expect("poisoned").take() {
            c.close(0u32.into(), b"link stopped");
        }
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.0.cfg();
        let st = self.0.status().clone();
        let conn = self.0.conn();
        serde_json::json!({
            "transport": "quic",
            "server": cfg.server.to_string(),
            "connected": st.connected,
            "up_since": st.up_since,
            "reconnects": st.reconnects,
            "last_error": st.last_error,
            "rtt_ms": conn.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
            "remote": conn.as_ref().map(|c| c.remote_address().to_string()),
            "streams": self.0.streams.load(Ordering::Relaxed),
        })
    }

    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        Some(Arc::new(LinkDialer(self.0.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n"),
            Some((200, String::new()))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 403 Forbidden\r\nx-meshgate-reason: denied\r\n\r\n"),
            Some((403, "denied".into()))
        );
        assert_eq!(parse_response(b"garbage\r\n\r\n"), None);
    }
}
