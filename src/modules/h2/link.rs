//! `kind: h2_link`: a gateway's link to another gateway's `kind: h2` door:
//! a pool of TLS 1.3 connections, one HTTP/2 `CONNECT` stream per flow
//! (HBONE between two meshgate nodes, or to ztunnel).
//!
//! The link is a **route connector**: a vnet route `via: <link>` (or a
//! pipe's `via:`) sends `CONNECT host:port` for each flow, so the other
//! gateway resolves and checks the target (its vnet, its policy) and dials
//! it. Each request says who the flow's client is (`Forwarded: for=`,
//! believed by a door whose `trust_forwarded` lists this link's
//! certificate) and passes on the client's `traceparent` and `baggage`.
//!
//! The other gateway is checked by its certificate: issued by `ca`, for
//! `server_name`. Our certificate (`tls_cert`, `tls_key`) is our identity
//! there. One connection carries up to `max_streams_per_connection` flows;
//! past that another is opened, up to `max_connections`. The first
//! connection is kept up for good: PINGs (`keepalive`) notice a vanished
//! peer, and the link reconnects with
//! [`Backoff`](crate::core::net::link::Backoff) (every 1 s ±20 %,
//! `backoff_max`, so it is back within 2 s of its server listening). While no connection is up a dial fails at once
//! (`no_route`), so a route or a link group can move on.
//!
//! Its **reverse forwards** (`forwards:`) publish services of this side on
//! the other gateway, as `ssh_link`'s do: the link keeps requests parked
//! there ([`publish`](crate::core::spine::onramp::publish)), and each
//! connection to the published port comes back on one and takes the one
//! path here (a flow with the link as identity, policy, route in `vnet:`,
//! dial, join).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use configstore::Document;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
use crate::core::spine::onramp::http::{far_refusal, forwarded_for, h2_stream, parse_forwarded};
use crate::core::spine::onramp::publish::{
    self, check_forwards, forward_status, keep_parked, Forward, ForwardRoute, ForwardStates, Park,
    ParkError,
};
use crate::core::spine::onramp::OnRamp;
use crate::core::spine::router::Connector;

use super::config::{H2Limits, LimitKeys};

/// `kind: h2_link`
///
/// ```yaml
/// kind: h2_link
/// server: gw-east.example:15008   # the other gateway's h2 door
/// server_via: wg0                 # optional: reach it through this module's network
/// server_name: gw-east.example    # its certificate's name (default: server's host)
/// ca: /etc/meshgate/ca.pem        # the CA that issued it
/// tls_cert: /etc/meshgate/west.pem  # our certificate (our identity there) and key
/// tls_key: /etc/meshgate/west.key
/// connect_timeout: 10s
/// keepalive: 10s                  # PING; `keepalive_timeout` (20s) without an answer ends it
/// backoff_max: 1s                # retries at least this often while down (±20 %)
/// max_streams_per_connection: 100
/// max_connections: 8
/// stream_window: 4MiB             # and connection_window, max_frame_size, as the door
/// forwards:                       # published on the other gateway (its `publish:` list
///   - remote_port: 8081           #   must allow our identity), as `ssh -R` does
///     to: 127.0.0.1:8000          # where its connections go from here
/// vnet: corp                      # where forwarded connections route (default: the tenant's)
/// idle_timeout: 1h                # of forwarded connections, or `none`
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: HostPort,
    #[serde(default)]
    server_via: Option<String>,
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
    #[serde(default = "default_streams")]
    max_streams_per_connection: usize,
    #[serde(default = "default_connections")]
    max_connections: usize,
    #[serde(default)]
    stream_window: Option<ByteSize>,
    #[serde(default)]
    connection_window: Option<ByteSize>,
    #[serde(default)]
    max_frame_size: Option<ByteSize>,
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
/// Short by default: a link should be back within 2 s of its server
/// listening again, and a refused connect costs the server one SYN.
fn default_backoff_max() -> Duration {
    Duration::from_secs(1)
}
fn default_streams() -> usize {
    100
}
fn default_connections() -> usize {
    8
}

/// A checked `h2_link` config.
#[derive(Clone)]
pub struct H2LinkConfig {
    /// The other gateway's h2 door.
    pub server: HostPort,
    /// The module whose network reaches it (`None`: the host's).
    pub server_via: Option<String>,
    /// Our TLS client (its CA, our certificate) and the server's name.
    pub tls: LinkTls,
    /// Dial and handshake timeout.
    pub connect_timeout: Duration,
    /// The longest wait between reconnects.
    pub backoff_max: Duration,
    /// Flows per connection before another is opened.
    pub max_streams_per_connection: usize,
    /// Connections at most.
    pub max_connections: usize,
    /// HTTP/2 settings (windows, frames, PING).
    pub limits: H2Limits,
    /// Reverse forwards.
    pub forwards: Vec<Forward>,
    /// Where forwarded connections route.
    pub vnet: Option<String>,
    /// Idle timeout of forwarded connections.
    pub idle_timeout: Option<Duration>,
}

impl H2LinkConfig {
    /// Parses and validates a `kind: h2_link` document (reading its
    /// certificate files).
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = doc.source.as_str();
        positive(src, "connect_timeout", raw.connect_timeout)?;
        if raw.backoff_max < Duration::from_secs(1) {
            return Err(ConfigError::key(src, "backoff_max", "at least 1s"));
        }
        for (key, n) in [
            ("max_streams_per_connection", raw.max_streams_per_connection),
            ("max_connections", raw.max_connections),
        ] {
            crate::core::config::at_least_one(src, key, n)?;
        }
        let tls = LinkTlsKeys {
            server_name: raw.server_name,
            ca: raw.ca,
            tls_cert: raw.tls_cert,
            tls_key: raw.tls_key,
        }
        .check(src, &raw.server.host, &[b"h2"])?;
        let limits = H2Limits::read(
            src,
            LimitKeys {
                stream_window: raw.stream_window,
                connection_window: raw.connection_window,
                max_frame_size: raw.max_frame_size,
                keepalive: raw.keepalive,
                keepalive_timeout: raw.keepalive_timeout,
                ..LimitKeys::default()
            },
        )?;
        check_forwards(src, &raw.forwards)?;
        Ok(H2LinkConfig {
            idle_timeout: idle_timeout(src, raw.idle_timeout, Duration::from_secs(3600))?,
            forwards: raw.forwards,
            vnet: raw.vnet,
            server: raw.server,
            server_via: raw.server_via,
            tls,
            connect_timeout: raw.connect_timeout,
            backoff_max: raw.backoff_max,
            max_streams_per_connection: raw.max_streams_per_connection,
            max_connections: raw.max_connections,
            limits,
        })
    }

    /// Whether a reload from `self` to `new` must connect again.
    fn reconnects(&self, new: &H2LinkConfig) -> bool {
        self.server != new.server
            || self.server_via != new.server_via
            || self.tls.name != new.tls.name
            || self.tls.files != new.tls.files
            || self.limits != new.limits
            || self.forwards != new.forwards
            || self.vnet != new.vnet
    }
}

/// Builds h2 links.
pub struct H2LinkFactory;

impl ModuleFactory for H2LinkFactory {
    fn kind(&self) -> &'static str {
        "h2_link"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = H2LinkConfig::from_document(doc)?;
        Ok(ModulePlan {
            depends_on: cfg.server_via.into_iter().chain(cfg.vnet).collect(),
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = H2LinkConfig::from_document(doc)?;
        Ok(Arc::new(H2Link(Arc::new(Link {
            onramp: OnRamp::new(ctx.clone()),
            forwards: Default::default(),
            ctx,
            cfg: RwLock::new(Arc::new(cfg)),
            pool: Mutex::new(Vec::new()),
            status: Mutex::new(LinkStatus::default()),
            running: Mutex::new(None),
        }))))
    }
}

/// One HTTP/2 connection to the other gateway.
#[derive(Clone)]
struct Conn {
    send: SendRequest<Empty<Bytes>>,
    /// Flows open on it.
    streams: Arc<AtomicUsize>,
    /// Cancelled when the connection ends.
    ended: CancellationToken,
    /// Which connect loop made it (older ones are left to end).
    generation: u64,
}

impl Conn {
    fn live(&self) -> bool {
        !self.ended.is_cancelled() && !self.send.is_closed()
    }
}

struct Link {
    ctx: ModuleContext,
    /// Where connections to our reverse forwards take the one path.
    onramp: Arc<OnRamp>,
    /// Each reverse forward's state.
    forwards: ForwardStates,
    cfg: RwLock<Arc<H2LinkConfig>>,
    pool: Mutex<Vec<Conn>>,
    status: Mutex<LinkStatus>,
    /// Stops the running connect loop; its generation.
    running: Mutex<Option<(CancellationToken, u64)>>,
}

/// A running h2 link.
pub struct H2Link(Arc<Link>);

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot reach {0}")]
    Dial(#[from] DialError),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] hyper::Error),
    #[error("no TLS and HTTP/2 handshake within {0:?}")]
    Timeout(Duration),
}

impl Link {
    fn cfg(&self) -> Arc<H2LinkConfig> {
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
            "h2",
        )
    }

    fn generation(&self) -> u64 {
        self.running
            .lock()
            .expect("poisoned")
            .as_ref()
            .map_or(0, |r| r.1)
    }

    /// Dials, TLS, HTTP/2 handshake: a new connection in the pool.
    async fn open(&self) -> Result<Conn, LinkError> {
        let cfg = self.cfg();
        let connector = match &cfg.server_via {
            Some(m) => Connector::Module(m.clone()),
            None => Connector::Direct,
        };
        let handshake = async {
            let stream = self
                .ctx
                .dial(
                    &connector,
                    &cfg.server,
                    cfg.connect_timeout,
                    &DialMeta::default(),
                )
                .await?;
            let tls = tokio_rustls::TlsConnector::from(cfg.tls.config.clone())
                .connect(cfg.tls.server_name.clone(), stream)
                .await
                .map_err(LinkError::Tls)?;
            let l = cfg.limits;
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(l.stream_window)
                .initial_connection_window_size(l.connection_window)
                .max_frame_size(l.max_frame_size)
                .keep_alive_interval(l.keepalive)
                .keep_alive_timeout(l.keepalive_timeout)
                .keep_alive_while_idle(true)
                .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
                .await?;
            Ok::<_, LinkError>((send, conn))
        };
        let (send, conn) = tokio::time::timeout(cfg.connect_timeout, handshake)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
        let ended = CancellationToken::new();
        let on_end = ended.clone();
        let (tenant, instance) = (self.ctx.tenant.name.clone(), self.ctx.instance.clone());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%tenant, %instance, error = %e, "h2 link connection ended with an error");
            }
            on_end.cancel();
        });
        let c = Conn {
            send,
            streams: Default::default(),
            ended,
            generation: self.generation(),
        };
        let mut pool = self.pool.lock().expect("poisoned");
        pool.retain(Conn::live);
        pool.push(c.clone());
        Ok(c)
    }

    /// A connection with room for one more flow: a pooled one, or a new one
    /// while the pool has room. `NoRoute` while the link is down.
    async fn pick(&self) -> Result<Conn, DialError> {
        let cfg = self.cfg();
        let generation = self.generation();
        let full = {
            let mut pool = self.pool.lock().expect("poisoned");
            pool.retain(|c| c.live() && c.generation == generation);
            if let Some(c) = pool
                .iter()
                .find(|c| c.streams.load(Ordering::Relaxed) < cfg.max_streams_per_connection)
            {
                return Ok(c.clone());
            }
            pool.len()
        };
        if full == 0 {
            return Err(DialError::Down(format!(
                "h2 link `{}` to {} is down (reconnecting)",
                self.ctx.instance, cfg.server
            )));
        }
        if full < cfg.max_connections {
            match self.open().await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, error = %e, "h2 link: cannot open another connection; sharing a full one")
                }
            }
        }
        // Every connection is full: the least loaded one queues the stream
        // (HTTP/2 flow control and the server's stream limit hold it).
        self.pool
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|c| c.live())
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))
            .cloned()
            .ok_or_else(|| DialError::Down(format!("h2 link `{}` is down", self.ctx.instance)))
    }

    fn start_loop(self: &Arc<Self>) {
        let stop = CancellationToken::new();
        let generation = {
            let mut running = self.running.lock().expect("poisoned");
            let generation = running.as_ref().map_or(1, |r| r.1 + 1);
            if let Some((old, _)) = running.replace((stop.clone(), generation)) {
                old.cancel();
            }
            generation
        };
        // Connections of an older config end with their last flow.
        self.pool
            .lock()
            .expect("poisoned")
            .retain(|c| c.generation == generation);
        let link = self.clone();
        tokio::spawn(async move {
            let (tenant, instance) = (link.ctx.tenant.name.clone(), link.ctx.instance.clone());
            let metrics = link.series();
            let keeper = Keeper {
                link: &link,
                generation,
            };
            keep_up(&keeper, &link.status, &metrics, (&tenant, &instance), &stop).await;
        });
    }
}

/// The first connection of a link's pool, kept up by [`keep_up`].
struct Keeper<'a> {
    link: &'a Arc<Link>,
    generation: u64,
}

#[async_trait]
impl Connect for Keeper<'_> {
    type Conn = Conn;

    fn what(&self) -> &'static str {
        "h2 link"
    }

    fn backoff_max(&self) -> Duration {
        self.link.cfg().backoff_max
    }

    async fn open(&self) -> Result<Conn, String> {
        self.link.open().await.map_err(|e| e.to_string())
    }

    async fn hold(&self, conn: &Conn) -> Ended {
        let link = self.link;
        let cfg = link.cfg();
        // Reverse forwards are parked on the first connection while it is
        // held (their requests keep it open; past a reload or a stop they
        // are withdrawn).
        let parked = conn.ended.child_token();
        let _parked = parked.clone().drop_guard();
        keep_parked(
            &link.onramp,
            Arc::new(H2Park {
                send: conn.send.clone(),
                authority: cfg.tls.name.clone(),
            }),
            &cfg.forwards,
            &ForwardRoute {
                identity: format!("h2-link:{}", link.ctx.instance),
                vnet: cfg.vnet.clone(),
                connect_timeout: cfg.connect_timeout,
                idle_timeout: cfg.idle_timeout,
            },
            &link.forwards,
            &parked,
        );
        conn.ended.cancelled().await;
        // Others in the pool may still be up; new flows take them until
        // this one is back.
        let others_up = self
            .link
            .pool
            .lock()
            .expect("poisoned")
            .iter()
            .any(|c| c.live() && c.generation == self.generation);
        Ended {
            others_up,
            ..Ended::default()
        }
    }

    async fn close(&self, _conn: Conn) {}
}

/// A publish request on one connection: an extended CONNECT
/// (`:protocol: meshgate-publish`) that the door answers when a connection
/// arrives at the port.
struct H2Park {
    send: SendRequest<Empty<Bytes>>,
    authority: String,
}

/// How long a publish request is retried while the server has not yet
/// said it takes extended CONNECT (its SETTINGS arrive after our
/// handshake).
const SETTINGS_WAIT: Duration = Duration::from_secs(5);

#[async_trait]
impl Park for H2Park {
    async fn park(&self, port: u16) -> Result<(Option<SocketAddr>, Stream), ParkError> {
        let deadline = tokio::time::Instant::now() + SETTINGS_WAIT;
        let resp = loop {
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(format!(
                    "https://{}{}",
                    self.authority,
                    publish::path_for(port)
                ))
                .body(Empty::new())
                .map_err(|e| ParkError::Refused(e.to_string()))?;
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from_static(publish::PROTOCOL));
            let mut send = self.send.clone();
            let sent = match send.ready().await {
                Ok(()) => send.send_request(req).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(resp) => break resp,
                Err(e) if send.is_closed() => return Err(ParkError::Lost(e.to_string())),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(ParkError::Refused(format!(
                        "cannot send a publish request: {e}"
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if resp.status() != StatusCode::OK {
            let reason = resp
                .headers()
                .get("x-meshgate-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return Err(ParkError::Refused(format!(
                "{} {reason}",
                resp.status().as_u16()
            )));
        }
        let src = resp
            .headers()
            .get("forwarded")
            .and_then(|v| parse_forwarded(v.as_bytes()));
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ParkError::Lost(e.to_string()))?;
        Ok((src, h2_stream(up)))
    }
}

/// Sends one `CONNECT` per dial: the other gateway dials the target.
struct LinkDialer(Arc<Link>);

#[async_trait]
impl Dialer for LinkDialer {
    async fn dial_tcp(
        &self,
        target: &HostPort,
        timeout: Duration,
        meta: &DialMeta,
    ) -> Result<Stream, DialError> {
        let link = &self.0;
        let instance = &link.ctx.instance;
        let attempt = async {
            let conn = link.pick().await?;
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string());
            if let Some(src) = meta.src {
                req = req.header("forwarded", forwarded_for(src));
            }
            if let Some(t) = &meta.trace {
                if let Some(tp) = &t.traceparent {
                    req = req.header("traceparent", tp.as_str());
                }
                if let Some(b) = &t.baggage {
                    req = req.header("baggage", b.as_str());
                }
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| DialError::NoRoute(format!("{target}: {e}")))?;
            let down = |e: hyper::Error| {
                DialError::Down(format!(
                    "{target}: h2 link `{instance}` lost its connection: {e}"
                ))
            };
            // Counted on its connection from the request on.
            let share = Share::new(&conn.streams);
            let mut send = conn.send.clone();
            send.ready().await.map_err(down)?;
            let resp = send.send_request(req).await.map_err(down)?;
            let status = resp.status();
            let reason = resp
                .headers()
                .get("x-meshgate-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if status != StatusCode::OK {
                return Err(far_refusal(
                    target,
                    &format!("h2 link `{instance}`"),
                    status,
                    &reason,
                    timeout,
                ));
            }
            let up = hyper::upgrade::on(resp).await.map_err(down)?;
            link.series().flow();
            Ok(Stream::io(Guarded::new(TokioIo::new(up), share)))
        };
        within(target, timeout, attempt).await
    }
}

#[async_trait]
impl Module for H2Link {
    async fn start(&self) -> Result<(), ModuleError> {
        self.0.start_loop();
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let link = &self.0;
        let cfg = H2LinkConfig::from_document(doc)?;
        let reconnect = link.cfg().reconnects(&cfg);
        *link.cfg.write().expect("poisoned") = Arc::new(cfg);
        if reconnect {
            link.start_loop();
        }
        Ok(())
    }

    async fn drain(&self) {}

    async fn stop(&self) {
        if let Some((stop, _)) = self.0.running.lock().expect("poisoned").take() {
            stop.cancel();
        }
        self.0.pool.lock().expect("poisoned").clear();
        self.0.onramp.stop().await;
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.0.cfg();
        let st = self.0.status().clone();
        let pool = self.0.pool.lock().expect("poisoned");
        let live: Vec<&Conn> = pool.iter().filter(|c| c.live()).collect();
        serde_json::json!({
            "transport": "h2",
            "server": cfg.server.to_string(),
            "server_via": cfg.server_via,
            "connected": st.connected,
            "up_since": st.up_since,
            "reconnects": st.reconnects,
            "last_error": st.last_error,
            "connections": live.len(),
            "streams": live.iter().map(|c| c.streams.load(Ordering::Relaxed)).sum::<usize>(),
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
    use rustls::pki_types::ServerName;
    use serde_json::json;

    #[test]
    fn config_checks_name_the_key() {
        let doc = |v: serde_json::Value| Document {
            source: "tenants/west/east.yaml".into(),
            value: v,
        };
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let ca = ca.display().to_string();
        for (v, key) in [
            (json!({"kind": "h2_link", "server": "x:1"}), "ca"),
            (
                json!({"kind": "h2_link", "server": "x:1", "ca": "/nonexistent.pem"}),
                "ca",
            ),
            (
                json!({"kind": "h2_link", "server": "x:1", "ca": ca, "tls_cert": "/c.pem"}),
                "tls_key",
            ),
            (
                json!({"kind": "h2_link", "server": "x:1", "ca": ca, "backoff_max": "10ms"}),
                "backoff_max",
            ),
            (
                json!({"kind": "h2_link", "server": "x:1", "ca": ca, "max_connections": 0}),
                "max_connections",
            ),
            (
                json!({"kind": "h2_link", "server": "x:1", "ca": ca, "server_name": "not a name"}),
                "server_name",
            ),
        ] {
            let e = H2LinkConfig::from_document(&doc(v)).err().unwrap();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
        }
        let ok = H2LinkConfig::from_document(&doc(
            json!({"kind": "h2_link", "server": "10.0.0.1:15008", "ca": ca}),
        ))
        .unwrap();
        assert_eq!(
            ok.tls.server_name,
            ServerName::try_from("10.0.0.1").unwrap()
        );
        assert_eq!(ok.max_streams_per_connection, 100);
    }
}
