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
//! `keepalive` (1 s) and `keepalive_timeout` (4 s) notice a silent path;
//! a health datagram every `keepalive`, which the door answers, notices a
//! path that fails one way (our packets dropped while the door's still
//! arrive and keep QUIC's idle timer going): no answer for
//! `keepalive_timeout` ends the connection.
//!
//! Its **reverse forwards** (`forwards:`) publish services of this side on
//! the other node, as `ssh_link`'s and `h2_link`'s do: requests parked
//! there ([`publish`](crate::core::spine::onramp::publish)) come back with
//! each connection to the published port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::config::{
    idle_timeout, parse_document, positive, ByteSize, ConfigError, IdleTimeout,
};
use crate::core::net::dial::{within, DialError, DialMeta, Dialer};
use crate::core::net::guard::{Guarded, Share};
use crate::core::net::link::{keep_up, Connect, Ended, LinkMetrics, LinkSeries, LinkStatus};
use crate::core::net::proxy::Stream;
use crate::core::net::tls::{LinkTls, LinkTlsKeys};
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::spine::onramp::http::{far_refusal, forwarded_for, parse_forwarded};
use crate::core::spine::onramp::publish::{
    self, check_forwards, forward_status, keep_parked, Forward, ForwardRoute, ForwardStates, Park,
    ParkError,
};
use crate::core::spine::onramp::OnRamp;

use super::udp::{health_request, Carrier, Demux, LinkSocket};
use super::{read_head, QuicLimits, ALPN};
use crate::core::net::datagram::DatagramSocket;
use crate::core::spine::reject::RejectReason;

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
/// forwards:                       # published on the other node (its `publish:` list
///   - remote_port: 8081           #   must allow our identity)
///     to: 127.0.0.1:8000
/// vnet: corp                      # where forwarded connections route
/// idle_timeout: 1h                # of forwarded connections, or `none`
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
    #[serde(default)]
    forwards: Vec<Forward>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default)]
    idle_timeout: Option<IdleTimeout>,
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
    /// Our TLS client and the server's name.
    pub tls: LinkTls,
    /// quinn's client config (TLS and transport).
    client: quinn::ClientConfig,
    /// Dial and handshake timeout.
    pub connect_timeout: Duration,
    /// The longest wait between reconnects.
    pub backoff_max: Duration,
    limits: QuicLimits,
    /// Reverse forwards.
    pub forwards: Vec<Forward>,
    /// Where forwarded connections route.
    pub vnet: Option<String>,
    /// Idle timeout of forwarded connections.
    pub idle_timeout: Option<Duration>,
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
        let tls = LinkTlsKeys {
            server_name: raw.server_name,
            ca: raw.ca,
            tls_cert: raw.tls_cert,
            tls_key: raw.tls_key,
        }
        .check(src, &raw.server.host, &[ALPN])?;
        let limits = QuicLimits::read(
            src,
            QuicLimits::LINK,
            raw.stream_window,
            raw.connection_window,
            raw.keepalive,
            raw.keepalive_timeout,
        )?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.config.clone())
            .map_err(|e| ConfigError::doc(src, format!("QUIC: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(
            limits
                .transport()
                .map_err(|e| ConfigError::key(src, "keepalive_timeout", e))?,
        ));
        check_forwards(src, &raw.forwards)?;
        Ok(QuicLinkConfig {
            idle_timeout: idle_timeout(src, raw.idle_timeout, Duration::from_secs(3600))?,
            forwards: raw.forwards,
            vnet: raw.vnet,
            server: raw.server,
            tls,
            client,
            connect_timeout: raw.connect_timeout,
            backoff_max: raw.backoff_max,
            limits,
        })
    }

    fn reconnects(&self, new: &QuicLinkConfig) -> bool {
        self.server != new.server
            || self.tls.name != new.tls.name
            || self.tls.files != new.tls.files
            || self.limits != new.limits
            || self.forwards != new.forwards
            || self.vnet != new.vnet
    }
}

/// Builds QUIC links.
pub struct QuicLinkFactory;

impl ModuleFactory for QuicLinkFactory {
    fn kind(&self) -> &'static str {
        "quic_link"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = QuicLinkConfig::from_document(doc)?;
        Ok(ModulePlan {
            depends_on: cfg.vnet.into_iter().collect(),
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = QuicLinkConfig::from_document(doc)?;
        Ok(Arc::new(QuicLink(Arc::new(Link {
            onramp: OnRamp::new(ctx.clone()),
            forwards: Default::default(),
            ctx,
            cfg: RwLock::new(Arc::new(cfg)),
            conn: RwLock::new(None),
            status: Mutex::new(LinkStatus::default()),
            running: Mutex::new(None),
            streams: Default::default(),
            endpoint: Mutex::new(None),
            demux: Default::default(),
        }))))
    }
}

struct Link {
    ctx: ModuleContext,
    /// Where connections to our reverse forwards take the one path.
    onramp: Arc<OnRamp>,
    /// Each reverse forward's state.
    forwards: ForwardStates,
    cfg: RwLock<Arc<QuicLinkConfig>>,
    conn: RwLock<Option<quinn::Connection>>,
    status: Mutex<LinkStatus>,
    running: Mutex<Option<CancellationToken>>,
    streams: Arc<AtomicUsize>,
    /// Our UDP endpoint (one per address family in use).
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// The UDP flows of the connection up now.
    demux: RwLock<Arc<Demux>>,
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

    async fn connect(&self) -> Result<quinn::Connection, LinkError> {
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
                .connect_with(cfg.client.clone(), server, &cfg.tls.name)?
                .await?;
            Ok::<_, LinkError>(conn)
        };
        tokio::time::timeout(cfg.connect_timeout, attempt)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))?
    }

    fn start_loop(self: &Arc<Self>) {
        let stop = CancellationToken::new();
        if let Some(old) = self.running.lock().expect("poisoned").replace(stop.clone()) {
            old.cancel();
        }
        let link = self.clone();
        tokio::spawn(async move {
            let (tenant, instance) = (link.ctx.tenant.name.clone(), link.ctx.instance.clone());
            let metrics = link.series();
            keep_up(&*link, &link.status, &metrics, (&tenant, &instance), &stop).await;
        });
    }
}

/// The link's one connection, kept up by [`keep_up`].
#[async_trait]
impl Connect for Link {
    type Conn = quinn::Connection;

    fn what(&self) -> &'static str {
        "quic link"
    }

    fn backoff_max(&self) -> Duration {
        self.cfg().backoff_max
    }

    async fn open(&self) -> Result<quinn::Connection, String> {
        self.connect().await.map_err(|e| e.to_string())
    }

    async fn hold(&self, conn: &quinn::Connection) -> Ended {
        // UDP flows: the connection's datagrams to their sockets.
        let demux = Arc::new(Demux::default());
        *self.demux.write().expect("poisoned") = demux.clone();
        let (datagrams, ctx, reader) = (conn.clone(), self.ctx.clone(), demux.clone());
        tokio::spawn(async move {
            reader
                .run(&datagrams, || {
                    ctx.metrics
                        .reject(&ctx.tenant.name, &ctx.instance, RejectReason::UdpQueueFull)
                })
                .await
        });
        *self.conn.write().expect("poisoned") = Some(conn.clone());
        let cfg = self.cfg();
        let parked = CancellationToken::new();
        let _parked = parked.clone().drop_guard();
        keep_parked(
            &self.onramp,
            Arc::new(QuicPark {
                conn: conn.clone(),
                host: cfg.tls.name.clone(),
            }),
            &cfg.forwards,
            &ForwardRoute {
                identity: format!("quic-link:{}", self.ctx.instance),
                vnet: cfg.vnet.clone(),
                connect_timeout: cfg.connect_timeout,
                idle_timeout: cfg.idle_timeout,
            },
            &self.forwards,
            &parked,
        );
        let metrics = self.series();
        // With keep-alives on, a health datagram goes out every interval
        // and the door answers it while the path works both ways. QUIC's
        // idle timer alone is kept going by the other side's packets
        // (retransmissions, its PINGs) after ours stop arriving (UDP
        // dropped one way): no answer for `keepalive_timeout` ends the
        // connection too.
        let health = cfg
            .limits
            .keepalive
            .filter(|_| conn.max_datagram_size().is_some())
            .map(|every| (every, cfg.limits.idle_timeout));
        let since = tokio::time::Instant::now();
        let (mut asked, mut rtt_at) = (since, since);
        metrics.rtt(conn.rtt());
        let (peer_up, why) = loop {
            if let Some((every, _)) = health {
                if asked.elapsed() >= every || asked == since {
                    let _ = conn.send_datagram(health_request());
                    asked = tokio::time::Instant::now();
                }
            }
            tokio::select! {
                e = conn.closed() => break (matches!(e, quinn::ConnectionError::Reset), e.to_string()),
                _ = tokio::time::sleep(HEALTH_CHECK) => {}
            }
            if rtt_at.elapsed() >= RTT_EVERY {
                metrics.rtt(conn.rtt());
                rtt_at = tokio::time::Instant::now();
            }
            if let Some((_, deaf)) = health {
                let last = demux.answered().unwrap_or(since);
                if last.elapsed() >= deaf {
                    conn.close(0u32.into(), b"no health answer");
                    break (
                        false,
                        format!("the other side answered nothing for {deaf:?} (our packets do not reach it)"),
                    );
                }
            }
        };
        *self.conn.write().expect("poisoned") = None;
        Ended {
            // A stateless reset: the door is up again, without our
            // connection. Reconnect now.
            peer_up,
            error: Some(why),
            others_up: false,
        }
    }

    async fn close(&self, conn: quinn::Connection) {
        conn.close(0u32.into(), b"link stopped");
        *self.conn.write().expect("poisoned") = None;
    }
}

/// How often the RTT gauge is brought up to date.
const RTT_EVERY: Duration = Duration::from_secs(5);

/// How often the health of the connection is looked at.
const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// A response head as the link reads it.
#[derive(Debug, PartialEq)]
pub(super) struct ResponseHead {
    pub code: u16,
    /// `x-meshgate-reason`.
    pub reason: String,
    /// `forwarded: for=` (a publish request's answer).
    pub forwarded: Option<SocketAddr>,
}

/// The status of a response head (`HTTP/1.1 200 OK`) and what the link
/// reads of its headers.
pub(super) fn parse_response(head: &[u8]) -> Option<ResponseHead> {
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
    let forwarded = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("forwarded"))
        .and_then(|h| parse_forwarded(h.value));
    Some(ResponseHead {
        code: resp.code?,
        reason,
        forwarded,
    })
}

/// A publish request on the link's connection: `GET /publish/PORT` with
/// `upgrade: meshgate-publish`, answered `101` when a connection arrives.
struct QuicPark {
    conn: quinn::Connection,
    host: String,
}

#[async_trait]
impl Park for QuicPark {
    async fn park(&self, port: u16) -> Result<(Option<SocketAddr>, Stream), ParkError> {
        let conn = &self.conn;
        // An error on a live connection is the door's refusal of this
        // stream; on a closed one, the connection is gone.
        let failed = |e: String| match conn.close_reason() {
            Some(why) => ParkError::Lost(why.to_string()),
            None => ParkError::Refused(e),
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
        let head = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nconnection: upgrade\r\nupgrade: {}\r\n\r\n",
            publish::path_for(port),
            self.host,
            publish::PROTOCOL
        );
        send.write_all(head.as_bytes())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (resp, rest) = read_head(&mut recv).await.map_err(failed)?;
        let resp = parse_response(&resp)
            .ok_or_else(|| failed("the answer is not a status line".into()))?;
        if resp.code != 101 {
            return Err(ParkError::Refused(format!("{} {}", resp.code, resp.reason)));
        }
        Ok((
            resp.forwarded,
            Stream::io(tokio::io::join(recv, send)).prepend(rest),
        ))
    }
}

struct LinkDialer(Arc<Link>);

impl Carrier for Link {
    fn carrier(&self) -> Option<(quinn::Connection, Arc<Demux>)> {
        let demux = self.demux.read().expect("poisoned").clone();
        Some((self.conn()?, demux))
    }

    fn open_timeout(&self) -> Duration {
        self.cfg().connect_timeout
    }

    fn authority(&self) -> String {
        self.cfg().tls.name.clone()
    }
}

#[async_trait]
impl Dialer for LinkDialer {
    async fn dial_tcp(
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
            let counted = Share::new(&link.streams);
            send.write_all(head.as_bytes())
                .await
                .map_err(|e| lost(e.to_string()))?;
            let (resp, rest) = read_head(&mut recv).await.map_err(lost)?;
            let resp = parse_response(&resp)
                .ok_or_else(|| lost("the other gateway's answer is not a status line".into()))?;
            if resp.code != 200 {
                let status = hyper::StatusCode::from_u16(resp.code)
                    .unwrap_or(hyper::StatusCode::BAD_GATEWAY);
                return Err(far_refusal(target, &via, status, &resp.reason, timeout));
            }
            link.series().flow();
            Ok(Stream::io(Guarded::new(tokio::io::join(recv, send), counted)).prepend(rest))
        };
        within(target, timeout, attempt).await
    }

    /// UDP flows on the far node, one per remote the socket sends to
    /// (QUIC datagrams; see [`super::udp`]). Fails at once while the link
    /// is down.
    async fn bind_udp(&self, remote: SocketAddr) -> Result<Arc<dyn DatagramSocket>, DialError> {
        let link = &self.0;
        if link.conn().is_none() {
            return Err(DialError::Down(format!(
                "{remote}: quic link `{}` to {} is down (reconnecting)",
                link.ctx.instance,
                link.cfg().server
            )));
        }
        Ok(LinkSocket::new(link.clone()))
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
        self.0.onramp.stop().await;
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
            // QUIC DATAGRAM frames of this connection (UDP flows).
            "datagrams_sent": conn.as_ref().map(|c| c.stats().frame_tx.datagram),
            "datagrams_received": conn.as_ref().map(|c| c.stats().frame_rx.datagram),
            "streams": self.0.streams.load(Ordering::Relaxed),
            "forwards": forward_status(&cfg.forwards, &self.0.forwards),
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
            Some(ResponseHead {
                code: 200,
                reason: String::new(),
                forwarded: None
            })
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 403 Forbidden\r\nx-meshgate-reason: denied\r\n\r\n"),
            Some(ResponseHead {
                code: 403,
                reason: "denied".into(),
                forwarded: None
            })
        );
        let r = parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nforwarded: for=\"10.0.0.9:4000\"\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.forwarded, Some("10.0.0.9:4000".parse().unwrap()));
        assert_eq!(parse_response(b"garbage\r\n\r\n"), None);
    }
}
