//! `kind: quic`: the h2 door's tunnels over QUIC (quinn, `quic` feature):
//! one UDP port, TLS 1.3 with the same client certificates and
//! identities, one bidirectional stream per TCP flow. A connection
//! survives the client's address changing (QUIC migration), and loss on
//! one stream does not stall the others.
//!
//! Each stream starts with an HTTP/1.1-style head, `CONNECT host:port
//! HTTP/1.1` with `Forwarded`, `traceparent` and `baggage` headers as the
//! h2 door reads them ([`tunnel_request`]), and is answered `HTTP/1.1 200
//! OK` (then the stream is the tunnel) or the h2 door's refusal status
//! with `x-meshgate-reason`. ALPN is `meshgate-tunnel/1`; `kind:
//! quic_link` ([`link`]) is the client.
//!
//! Links publish ports here as over the h2 door
//! ([`publish`](crate::core::spine::onramp::publish)): `GET /publish/PORT`
//! with `upgrade: meshgate-publish` parks until a connection arrives
//! there, answered `101` with `forwarded: for=` its client.
//!
//! Budgets: `max_connections` QUIC connections, `max_streams` open
//! streams each (QUIC's own stream credit), `max_startups` and
//! `handshake_timeout` for handshakes, a request head of at most 16 KiB
//! within `handshake_timeout`, and flow-control windows bound what a
//! connection can make the door buffer.

pub mod link;
pub mod udp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use hyper::StatusCode;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::core::config::{positive, ByteSize, ConfigError, IdleTimeout};
use crate::core::net::guard::Share;
use crate::core::net::proxy::Stream;
use crate::core::net::tls::{ClientAuth, DoorTls, DoorTlsKeys, IdentityFrom};
use crate::core::spine::door::{DoorKeys, DoorSettings};
use crate::core::spine::flow::EndReason;
use crate::core::spine::flow::{FlowContext, Protocol};
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::spine::onramp::http::{
    forwarded_for, status_for, tunnel_request, Refused, Tunneler,
};
use crate::core::spine::onramp::publish::{
    self, Held, Publications, PublishKeys, PublishRules, RawPermit,
};
use crate::core::spine::onramp::DatagramError;
use crate::core::spine::onramp::{Answer, OnRamp};
use crate::core::spine::reject::RejectReason;

/// The ALPN of meshgate's tunnels over QUIC.
pub const ALPN: &[u8] = b"meshgate-tunnel/1";

/// The largest request or response head on a stream.
pub const MAX_HEAD: usize = 16 * 1024;

/// `kind: quic`
///
/// ```yaml
/// kind: quic
/// listen: 0.0.0.0:15009          # UDP
/// vnet: corp
/// tls_cert: /etc/meshgate/gw.pem # as for kind: h2, with client_ca,
/// tls_key: /etc/meshgate/gw.key  # client_auth, identity_from, trust_forwarded
/// client_ca: /etc/meshgate/ca.pem
/// max_streams: 200               # open streams (flows) per connection
/// stream_window: 4MiB
/// connection_window: 16MiB
/// keepalive: 10s                 # PING when idle; `none` for never
/// keepalive_timeout: 30s         # a connection silent this long is closed
/// publish:                       # links that may publish ports here, as for kind: h2
///   - identity: spiffe://example.org/ns/mesh/sa/west
///     ports: [8081]
/// publish_ip: 127.0.0.1          # with publish_via, max_published
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    tls_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    tls_key: Option<std::path::PathBuf>,
    #[serde(default)]
    client_ca: Option<std::path::PathBuf>,
    #[serde(default)]
    client_auth: Option<ClientAuth>,
    #[serde(default)]
    identity_from: Option<Vec<IdentityFrom>>,
    #[serde(default)]
    trust_forwarded: Vec<String>,
    #[serde(default)]
    max_streams: Option<u32>,
    #[serde(default)]
    stream_window: Option<ByteSize>,
    #[serde(default)]
    connection_window: Option<ByteSize>,
    #[serde(default)]
    keepalive: Option<IdleTimeout>,
    #[serde(default, with = "humantime_serde")]
    keepalive_timeout: Option<Duration>,
    #[serde(default)]
    publish: Vec<RawPermit>,
    #[serde(default)]
    publish_ip: Option<std::net::IpAddr>,
    #[serde(default)]
    publish_via: Option<String>,
    #[serde(default)]
    max_published: Option<usize>,
}

const OWN_KEYS: [&str; 15] = [
    "tls_cert",
    "tls_key",
    "client_ca",
    "client_auth",
    "identity_from",
    "trust_forwarded",
    "max_streams",
    "stream_window",
    "connection_window",
    "keepalive",
    "keepalive_timeout",
    "publish",
    "publish_ip",
    "publish_via",
    "max_published",
];

const TAKES: DoorKeys = DoorKeys {
    handshake: Some(Duration::from_secs(10)),
    proxy_protocol: false,
    users: false,
};

/// QUIC transport settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicLimits {
    /// Open bidirectional streams per connection.
    pub max_streams: u32,
    /// Receive window per stream.
    pub stream_window: u32,
    /// Receive window per connection.
    pub connection_window: u32,
    /// PING interval when idle (`None`: never).
    pub keepalive: Option<Duration>,
    /// Close a connection silent this long.
    pub idle_timeout: Duration,
}

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_streams: 200,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            keepalive: Some(Duration::from_secs(10)),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl QuicLimits {
    /// A link's defaults: a PING every second and 4 s of silence end the
    /// connection, so a link group moves to its next link within 5 s of
    /// UDP being dropped, and a restarted door is noticed within a second.
    pub const LINK: QuicLimits = QuicLimits {
        max_streams: 200,
        stream_window: 4 << 20,
        connection_window: 16 << 20,
        keepalive: Some(Duration::from_secs(1)),
        idle_timeout: Duration::from_secs(4),
    };

    /// quinn's transport config for these limits.
    pub fn transport(&self) -> Result<quinn::TransportConfig, String> {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(self.max_streams.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(self.stream_window.into())
            .receive_window(self.connection_window.into())
            .keep_alive_interval(self.keepalive)
            .max_idle_timeout(Some(
                self.idle_timeout
                    .try_into()
                    .map_err(|_| format!("{:?} is too long", self.idle_timeout))?,
            ));
        Ok(t)
    }

    /// Reads the window and keep-alive keys (`stream_window`,
    /// `connection_window`, `keepalive`, `keepalive_timeout`).
    fn read(
        src: &str,
        d: QuicLimits,
        stream_window: Option<ByteSize>,
        connection_window: Option<ByteSize>,
        keepalive: Option<IdleTimeout>,
        keepalive_timeout: Option<Duration>,
    ) -> Result<QuicLimits, ConfigError> {
        let window = |key: &str, v: Option<ByteSize>, default: u32| -> Result<u32, ConfigError> {
            match v {
                None => Ok(default),
                Some(ByteSize(n)) if (1 << 14..=1 << 30).contains(&n) => Ok(n as u32),
                Some(b) => Err(ConfigError::key(
                    src,
                    key,
                    format!("{b} is outside 16KiB to 1GiB"),
                )),
            }
        };
        let l = QuicLimits {
            stream_window: window("stream_window", stream_window, d.stream_window)?,
            connection_window: window("connection_window", connection_window, d.connection_window)?,
            keepalive: match keepalive {
                None => d.keepalive,
                Some(IdleTimeout::Off) => None,
                Some(IdleTimeout::After(t)) => {
                    positive(src, "keepalive", t)?;
                    Some(t)
                }
            },
            idle_timeout: keepalive_timeout.unwrap_or(d.idle_timeout),
            ..d
        };
        positive(src, "keepalive_timeout", l.idle_timeout)?;
        if l.keepalive.is_some_and(|k| k >= l.idle_timeout) {
            return Err(ConfigError::key(
                src,
                "keepalive",
                "must be shorter than keepalive_timeout, or idle connections close between PINGs",
            ));
        }
        if l.connection_window < l.stream_window {
            return Err(ConfigError::key(
                src,
                "connection_window",
                "is smaller than stream_window: one stream could stall the connection",
            ));
        }
        Ok(l)
    }
}

/// A checked `kind: quic` config.
#[derive(Clone)]
pub struct QuicConfig {
    /// Where it listens (UDP), where flows route, timeouts, limits.
    pub door: DoorSettings,
    /// TLS and identities.
    pub tls: DoorTls,
    /// Transport settings.
    pub limits: QuicLimits,
    /// Who may publish which ports here.
    pub publish: PublishRules,
}

impl QuicConfig {
    /// Parses and validates a `kind: quic` document (reading its files).
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let src = doc.source.as_str();
        let (door, raw): (DoorSettings, RawConfig) =
            DoorSettings::parse_taking(doc, TAKES, &OWN_KEYS)?;
        if door.listen_via.is_some() {
            return Err(ConfigError::key(
                src,
                "listen_via",
                "a QUIC door listens on the host's UDP (a VPN address is not offered yet)",
            ));
        }
        let mut limits = QuicLimits::read(
            src,
            QuicLimits::default(),
            raw.stream_window,
            raw.connection_window,
            raw.keepalive,
            raw.keepalive_timeout,
        )?;
        if let Some(n) = raw.max_streams {
            crate::core::config::at_least_one(src, "max_streams", n as usize)?;
            limits.max_streams = n;
        }
        let tls = DoorTlsKeys {
            tls_cert: raw.tls_cert,
            tls_key: raw.tls_key,
            client_ca: raw.client_ca,
            client_auth: raw.client_auth,
            identity_from: raw.identity_from,
            trust_forwarded: raw.trust_forwarded,
        }
        .check(src, None, &[ALPN])?;
        limits
            .transport()
            .map_err(|e| ConfigError::key(src, "keepalive_timeout", e))?;
        let publish = PublishKeys {
            publish: raw.publish,
            publish_ip: raw.publish_ip,
            publish_via: raw.publish_via,
            max_published: raw.max_published,
        }
        .check(src)?;
        Ok(QuicConfig {
            door,
            tls,
            limits,
            publish,
        })
    }

    fn server_config(&self) -> Result<quinn::ServerConfig, String> {
        let mut tls = (**self.tls.server.as_ref().ok_or("no TLS")?).clone();
        // QUIC allows 0 or u32::MAX early data; no 0-RTT here.
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
            .map_err(|e| e.to_string())?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        sc.transport_config(Arc::new(self.limits.transport()?));
        Ok(sc)
    }
}

/// Builds QUIC doors.
pub struct QuicFactory;

impl ModuleFactory for QuicFactory {
    fn kind(&self) -> &'static str {
        "quic"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = QuicConfig::from_document(doc)?;
        Ok(ModulePlan {
            depends_on: cfg.door.depends_on(cfg.publish.via.as_ref()),
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = QuicConfig::from_document(doc)?;
        Ok(Arc::new(QuicDoor(Arc::new(Door {
            onramp: OnRamp::new(ctx),
            cfg: RwLock::new(Arc::new(cfg)),
            source: Mutex::new(doc.source.clone()),
            running: Mutex::new(None),
            startups: Default::default(),
            streams: Default::default(),
            publications: Default::default(),
        }))))
    }
}

struct Running {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    stop: CancellationToken,
    _registered: crate::core::net::listen::Registered,
}

struct Door {
    onramp: Arc<OnRamp>,
    cfg: RwLock<Arc<QuicConfig>>,
    source: Mutex<String>,
    running: Mutex<Option<Running>>,
    startups: Arc<crate::core::spine::startups::Startups>,
    streams: Arc<AtomicUsize>,
    /// Ports links published here.
    publications: Publications,
}

/// A running QUIC door.
pub struct QuicDoor(Arc<Door>);

impl QuicDoor {
    /// The UDP address it listens on (the port chosen, with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.0
            .running
            .lock()
            .expect("poisoned")
            .as_ref()
            .map(|r| r.addr)
    }
}

impl Door {
    fn cfg(&self) -> Arc<QuicConfig> {
        self.cfg.read().expect("poisoned").clone()
    }

    fn reject(&self, src: SocketAddr, reason: RejectReason, detail: &str) {
        self.onramp
            .refused("quic.refused", src, None, reason, detail);
    }

    /// Binds the UDP port and starts accepting.
    fn listen(self: &Arc<Self>, cfg: &QuicConfig, source: &str) -> Result<(), ModuleError> {
        let addr = cfg.door.listen.0;
        let (socket, registered) = self.onramp.bind_host_udp_std(addr).map_err(|e| {
            ConfigError::key(
                source,
                "listen",
                format!("cannot listen on {addr} (UDP): {e}"),
            )
        })?;
        let server = cfg
            .server_config()
            .map_err(|e| ConfigError::doc(source, format!("QUIC: {e}")))?;
        // Stateless resets signed, and connection IDs made, with keys from
        // the door's own TLS key: after a restart, a client's next packet
        // on an old connection has an ID the door recognises as its own
        // and is answered with a reset the client believes, so it
        // reconnects at once instead of after its idle timeout.
        let endpoint_config = match cfg.tls.secret {
            Some(seed) => {
                let mut c = quinn::EndpointConfig::new(Arc::new(aws_lc_rs::hmac::Key::new(
                    aws_lc_rs::hmac::HMAC_SHA256,
                    &seed,
                )));
                let cid_key = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes"))
                    ^ u64::from_le_bytes(seed[24..].try_into().expect("8 bytes"));
                c.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                c
            }
            None => quinn::EndpointConfig::default(),
        };
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| ModuleError::Runtime(format!("QUIC endpoint on {addr}: {e}")))?;
        let bound = endpoint
            .local_addr()
            .map_err(|e| ModuleError::Runtime(e.to_string()))?;
        let ctx = self.onramp.ctx();
        tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, addr = %bound, "listening (quic)");
        let stop = CancellationToken::new();
        tokio::spawn(self.clone().accept(endpoint.clone(), stop.clone()));
        if let Some(old) = self.running.lock().expect("poisoned").replace(Running {
            endpoint,
            addr: bound,
            stop,
            _registered: registered,
        }) {
            old.stop.cancel();
            old.endpoint.set_server_config(None);
        }
        Ok(())
    }

    async fn accept(self: Arc<Self>, endpoint: quinn::Endpoint, stop: CancellationToken) {
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i { Some(i) => i, None => return },
                _ = stop.cancelled() => return,
                _ = self.onramp.stopping().cancelled() => return,
            };
            let src = incoming.remote_address();
            let cfg = self.cfg();
            let Some(slot) = self.onramp.try_admit(cfg.door.max_connections) else {
                incoming.refuse();
                continue;
            };
            let startup = match self
                .startups
                .try_start(src.ip(), &cfg.door.handshake.startups)
            {
                Ok(s) => s,
                Err(reason) => {
                    incoming.refuse();
                    self.reject(src, reason, "too many connections in their handshake");
                    continue;
                }
            };
            let door = self.clone();
            self.onramp.spawn(async move {
                let _slot = slot;
                let conn = match tokio::time::timeout(cfg.door.handshake.timeout, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        return door.reject(src, RejectReason::TlsHandshake, &e.to_string())
                    }
                    Err(_) => {
                        return door.reject(
                            src,
                            RejectReason::HandshakeTimeout,
                            "no QUIC handshake within handshake_timeout",
                        )
                    }
                };
                drop(startup);
                door.serve(conn, cfg).await;
            });
        }
    }

    /// One connection's streams until it closes or the door stops.
    async fn serve(self: &Arc<Self>, conn: quinn::Connection, cfg: Arc<QuicConfig>) {
        let certs = conn.peer_identity().and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        });
        let (identity, certified) = cfg.tls.identity(certs.as_deref().map(|v| v.as_slice()));
        let client = Arc::new(Client {
            identity,
            certified,
            held: Held::default(),
            conn: conn.clone(),
            demux: Default::default(),
        });
        // The connection's datagrams, to their UDP flows.
        let (demux, onramp, datagrams) = (client.demux.clone(), self.onramp.clone(), conn.clone());
        tokio::spawn(async move {
            let ctx = onramp.ctx();
            demux
                .run(&datagrams, || {
                    ctx.metrics
                        .reject(&ctx.tenant.name, &ctx.instance, RejectReason::UdpQueueFull)
                })
                .await
        });
        loop {
            let (send, recv) = tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(_) => return,
                },
                _ = self.onramp.stopping().cancelled() => {
                    conn.close(0u32.into(), b"stopping");
                    return;
                }
            };
            let door = self.clone();
            let (cfg, client) = (cfg.clone(), client.clone());
            // The peer's address now (it may have moved).
            let peer = conn.remote_address();
            let dst = conn
                .local_ip()
                .map(|ip| SocketAddr::new(ip, cfg.door.listen.0.port()));
            self.onramp
                .spawn(async move { door.stream(send, recv, cfg, peer, dst, client).await });
        }
    }

    async fn stream(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        cfg: Arc<QuicConfig>,
        peer: SocketAddr,
        dst: Option<SocketAddr>,
        client: Arc<Client>,
    ) {
        let head = tokio::time::timeout(cfg.door.handshake.timeout, read_head(&mut recv)).await;
        let (head, rest) = match head {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                self.reject(peer, RejectReason::BadRequest, &e);
                return reply(&mut send, StatusCode::BAD_REQUEST, "bad_request").await;
            }
            Err(_) => {
                self.reject(peer, RejectReason::HandshakeTimeout, "no request head");
                let _ = send.reset(0u32.into());
                return;
            }
        };
        let parsed = match parse_request(&head) {
            Ok(p) => p,
            Err(e) => {
                self.reject(peer, RejectReason::BadRequest, &e);
                return reply(&mut send, StatusCode::BAD_REQUEST, "bad_request").await;
            }
        };
        if parsed.publishes() {
            return self
                .publish(send, recv, rest, &cfg, peer, &client, &parsed)
                .await;
        }
        let who = Tunneler {
            peer,
            dst,
            identity: client.identity.clone(),
            certified: client.certified,
            trust_forwarded: &cfg.tls.trust_forwarded,
        };
        if parsed.upgrades_to(udp::PROTOCOL) {
            return self
                .udp(send, recv, rest, &cfg, &who, &client, &parsed)
                .await;
        }
        let flow = match tunnel_request(
            &who,
            &parsed.method,
            parsed.authority.as_ref(),
            &parsed.headers,
            &cfg.door,
        ) {
            Ok(f) => f,
            Err(r) => {
                self.reject(peer, r.reason, &r.detail);
                return reply(&mut send, r.status, r.reason.as_str()).await;
            }
        };
        let _open = Share::new(&self.streams);
        self.onramp
            .connect_answering(flow, Box::new(StreamAnswer { send, recv, rest }))
            .await;
    }
}

impl Door {
    /// A link's publish request: parks until a connection arrives at the
    /// port (bound at the first request), then answers `101` with the
    /// client in `forwarded: for=`, and the stream carries it.
    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        rest: Vec<u8>,
        cfg: &QuicConfig,
        peer: SocketAddr,
        client: &Client,
        head: &RequestHead,
    ) {
        let port = match publish::port_of(&head.target) {
            Some(p) if head.method == hyper::Method::GET => p,
            _ => {
                let detail = format!(
                    "a publish request is GET /publish/PORT, not {} {:?}",
                    head.method, head.target
                );
                self.onramp.refused(
                    "quic.refused",
                    peer,
                    client.identity.as_deref(),
                    RejectReason::BadRequest,
                    &detail,
                );
                return reply(&mut send, StatusCode::BAD_REQUEST, "bad_request").await;
            }
        };
        let arrival = publish::Arrival {
            wait: cfg.door.connect_timeout,
            idle_timeout: cfg.door.idle_timeout,
            max_connections: cfg.door.max_connections,
        };
        let port = match self
            .publications
            .request(
                &self.onramp,
                &cfg.publish,
                client.identity.as_deref(),
                peer,
                &client.held,
                port,
                arrival,
            )
            .await
        {
            Ok(p) => p,
            Err(r) => return reply(&mut send, r.status, r.reason.as_str()).await,
        };
        let mut probe = [0u8; 1];
        let offer = tokio::select! {
            o = port.next() => o,
            // The link gave the request up (reset, or sent what it must
            // not): the parked request ends.
            _ = recv.read(&mut probe) => return,
            _ = self.onramp.stopping().cancelled() => {
                return reply(&mut send, StatusCode::SERVICE_UNAVAILABLE, EndReason::Stopped.as_str()).await;
            }
        };
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {}\r\nforwarded: {}\r\n\r\n",
            publish::PROTOCOL,
            forwarded_for(offer.src)
        );
        if send.write_all(answer.as_bytes()).await.is_ok() {
            offer.hand(Stream::io(tokio::io::join(recv, send)).prepend(rest));
        }
    }
}

/// One QUIC connection's client, as its certificate says.
struct Client {
    identity: Option<String>,
    certified: bool,
    /// The ports it published.
    held: Held,
    conn: quinn::Connection,
    /// Its UDP flows.
    demux: Arc<udp::Demux>,
}

impl Door {
    /// A UDP request (`GET /.well-known/masque/udp/HOST/PORT/`, `upgrade:
    /// connect-udp`): routed and checked as a UDP flow of the client's
    /// identity, answered `101` (or the refusal's status), then relayed
    /// until either side ends it or [`udp::UDP_IDLE`] passes idle.
    #[allow(clippy::too_many_arguments)]
    async fn udp(
        &self,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        rest: Vec<u8>,
        cfg: &QuicConfig,
        who: &Tunneler<'_>,
        client: &Client,
        head: &RequestHead,
    ) {
        let peer = who.peer;
        let refuse = async |send: &mut quinn::SendStream, r: Refused| {
            self.onramp.refused(
                "quic.refused",
                peer,
                client.identity.as_deref(),
                r.reason,
                &r.detail,
            );
            reply(send, r.status, r.reason.as_str()).await;
        };
        let target = match udp::target_of(&head.target) {
            Some(t) if head.method == hyper::Method::GET => t,
            _ => {
                let detail = format!(
                    "a UDP request is GET /.well-known/masque/udp/HOST/PORT/, not {} {:?}",
                    head.method, head.target
                );
                return refuse(
                    &mut send,
                    Refused {
                        reason: RejectReason::BadRequest,
                        status: StatusCode::BAD_REQUEST,
                        detail,
                    },
                )
                .await;
            }
        };
        // The identity, source and trace, as for a CONNECT to the target.
        let authority = hyper::http::uri::Authority::try_from(target.to_string()).ok();
        let req = match tunnel_request(
            who,
            &hyper::Method::CONNECT,
            authority.as_ref(),
            &head.headers,
            &cfg.door,
        ) {
            Ok(r) => r,
            Err(r) => return refuse(&mut send, r).await,
        };
        let upstream = match self
            .onramp
            .open_datagrams(&req.via, &target, req.chosen_by, req.connect_timeout)
            .await
        {
            Ok(u) => u,
            Err(e) => {
                let ctx = self.onramp.ctx();
                ctx.metrics
                    .dial_error(&ctx.tenant.name, &ctx.instance, e.reason());
                let (status, reason) = match &e {
                    DatagramError::Refused(r) => {
                        let end = r.end_reason();
                        (
                            status_for(end, StatusCode::SERVICE_UNAVAILABLE),
                            end.as_str(),
                        )
                    }
                    _ => (StatusCode::SERVICE_UNAVAILABLE, e.reason()),
                };
                return reply(&mut send, status, reason).await;
            }
        };
        let ctx = self.onramp.ctx();
        let flow = FlowContext {
            tenant: ctx.tenant.name.clone(),
            instance: ctx.instance.clone(),
            identity: req.identity.clone(),
            src: req.src,
            dst: target.to_string(),
            protocol: Protocol::Udp,
            kind: ctx.kind.clone(),
            dialed: Some(upstream.remote),
            trace: req.trace.clone(),
        };
        let admitted = match self.onramp.admit_datagrams(flow, upstream) {
            Ok(a) => a,
            Err(end) => {
                return reply(
                    &mut send,
                    status_for(end, StatusCode::FORBIDDEN),
                    end.as_str(),
                )
                .await
            }
        };
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {}\r\ncapsule-protocol: ?1\r\n\r\n",
            udp::PROTOCOL
        );
        // Registered for its datagrams before the link hears `101` and
        // sends the first.
        let (reply_socket, rx, _demux) =
            udp::door_flow(&client.conn, &client.demux, send, recv, rest);
        if reply_socket.answer(answer.as_bytes()).await.is_err() {
            return;
        }
        let _open = Share::new(&self.streams);
        self.onramp
            .relay(admitted, reply_socket.clone(), req.src, rx, udp::UDP_IDLE)
            .await;
        reply_socket.finish().await;
    }
}

/// Reads a head ending in an empty line: the head, and what came after it.
/// At most [`MAX_HEAD`] bytes.
pub async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = find_end(&buf) {
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() >= MAX_HEAD {
            return Err(format!("no end of the head in its first {MAX_HEAD} bytes"));
        }
        let n = r
            .read(&mut chunk[..(MAX_HEAD - buf.len()).min(2048)])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the stream ended before its head did".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A request head as the door reads it.
#[derive(Debug)]
pub struct RequestHead {
    /// `CONNECT` (a tunnel), `GET` (a publish request).
    pub method: hyper::Method,
    /// The request target as sent (`10.0.0.2:80`, `/publish/8081`).
    pub target: String,
    /// The target as an authority, when it is one.
    pub authority: Option<hyper::http::uri::Authority>,
    /// Its headers.
    pub headers: hyper::HeaderMap,
}

impl RequestHead {
    /// Whether it asks to upgrade to `protocol` (`upgrade:`).
    pub fn upgrades_to(&self, protocol: &str) -> bool {
        self.headers
            .get(hyper::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(protocol.as_bytes()))
    }

    /// Whether it asks to publish a port (`upgrade: meshgate-publish`).
    pub fn publishes(&self) -> bool {
        self.upgrades_to(publish::PROTOCOL)
    }
}

/// Reads a request head. Never panics (`fuzz/fuzz_targets/h2_request.rs`
/// runs it too).
pub fn parse_request(head: &[u8]) -> Result<RequestHead, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("an incomplete request head".into()),
        Err(e) => return Err(format!("a malformed request head: {e}")),
    }
    let method = hyper::Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|e| e.to_string())?;
    let target = req.path.unwrap_or_default().to_string();
    let authority = hyper::http::uri::Authority::try_from(target.as_str()).ok();
    let mut map = hyper::HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(h.name.as_bytes()),
            hyper::header::HeaderValue::from_bytes(h.value),
        ) else {
            return Err("a malformed header".into());
        };
        map.append(name, value);
    }
    Ok(RequestHead {
        method,
        target,
        authority,
        headers: map,
    })
}

/// Writes a refusal and ends the stream.
async fn reply(send: &mut quinn::SendStream, status: StatusCode, reason: &str) {
    let _ = send
        .write_all(status_line(status, Some(reason)).as_bytes())
        .await;
    let _ = send.finish();
}

fn status_line(status: StatusCode, reason: Option<&str>) -> String {
    let mut s = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if let Some(r) = reason {
        s.push_str(&format!("x-meshgate-reason: {r}\r\n"));
    }
    s.push_str("\r\n");
    s
}

/// The client side of a QUIC tunnel: the status first, then the stream.
struct StreamAnswer {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes that came after the head.
    rest: Vec<u8>,
}

#[async_trait]
impl Answer for StreamAnswer {
    async fn answer(
        mut self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream> {
        match outcome {
            Ok(_) => {
                self.send
                    .write_all(status_line(StatusCode::OK, None).as_bytes())
                    .await
                    .ok()?;
                let StreamAnswer { send, recv, rest } = *self;
                Some(Stream::io(tokio::io::join(recv, send)).prepend(rest))
            }
            Err(reason) => {
                let status = status_for(reason, StatusCode::SERVICE_UNAVAILABLE);
                reply(&mut self.send, status, reason.as_str()).await;
                None
            }
        }
    }
}

#[async_trait]
impl Module for QuicDoor {
    async fn start(&self) -> Result<(), ModuleError> {
        let source = self.0.source.lock().expect("poisoned").clone();
        self.0.listen(&self.0.cfg(), &source)
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let door = &self.0;
        let new = QuicConfig::from_document(doc)?;
        let rebind = new.door.listen != door.cfg().door.listen;
        if rebind {
            door.listen(&new, &doc.source)?;
        } else if let Some(r) = door.running.lock().expect("poisoned").as_ref() {
            // New certificates and limits for new connections.
            let server = new
                .server_config()
                .map_err(|e| ConfigError::doc(&doc.source, format!("QUIC: {e}")))?;
            r.endpoint.set_server_config(Some(server));
        }
        *door.cfg.write().expect("poisoned") = Arc::new(new);
        *door.source.lock().expect("poisoned") = doc.source.clone();
        Ok(())
    }

    async fn drain(&self) {
        // No new connections; open ones run until stop.
        if let Some(r) = self.0.running.lock().expect("poisoned").as_ref() {
            r.endpoint.set_server_config(None);
        }
    }

    async fn stop(&self) {
        let running = self.0.running.lock().expect("poisoned").take();
        self.0.onramp.stop().await;
        if let Some(r) = running {
            r.stop.cancel();
            r.endpoint.close(0u32.into(), b"stopped");
            let _ = tokio::time::timeout(Duration::from_secs(1), r.endpoint.wait_idle()).await;
        }
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.0.cfg();
        let mut status = cfg.door.status(&self.0.onramp);
        status.insert(
            "listen".into(),
            self.local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| cfg.door.listen.to_string())
                .into(),
        );
        status.insert("transport".into(), "quic".into());
        status.insert("client_auth".into(), cfg.tls.client_auth_name().into());
        status.insert(
            "streams".into(),
            self.0.streams.load(Ordering::Relaxed).into(),
        );
        status.insert("max_streams".into(), cfg.limits.max_streams.into());
        if let Ok(ports) = self.0.publications.try_status() {
            status.insert("published".into(), ports.into());
        }
        status.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let h = parse_request(
            b"CONNECT 10.0.0.2:80 HTTP/1.1\r\nForwarded: for=\"10.1.2.3:4\"\r\ntraceparent: x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.method, hyper::Method::CONNECT);
        assert_eq!(h.authority.as_ref().unwrap().as_str(), "10.0.0.2:80");
        assert_eq!(h.headers.get("forwarded").unwrap(), "for=\"10.1.2.3:4\"");
        assert!(!h.publishes());
        assert!(parse_request(b"CONNECT 10.0.0.2:80 HTTP/1.1\r\n").is_err());
        assert!(parse_request(b"\x00\x01\r\n\r\n").is_err());
        let h = parse_request(b"CONNECT / HTTP/1.1\r\n\r\n").unwrap();
        assert!(h.authority.is_none());
        let h = parse_request(b"GET /publish/8081 HTTP/1.1\r\nUpgrade: Meshgate-Publish\r\n\r\n")
            .unwrap();
        assert!(h.publishes());
        assert_eq!(publish::port_of(&h.target), Some(8081));
    }

    #[tokio::test]
    async fn heads_are_bounded() {
        let mut r: &[u8] = b"CONNECT a:1 HTTP/1.1\r\n\r\nextra";
        let (head, rest) = read_head(&mut r).await.unwrap();
        assert!(head.ends_with(b"\r\n\r\n"));
        assert_eq!(rest, b"extra");
        let big = vec![b'a'; MAX_HEAD + 10];
        let mut r: &[u8] = &big;
        assert!(read_head(&mut r).await.unwrap_err().contains("16384"));
        let mut r: &[u8] = b"CONNECT a:1";
        assert!(read_head(&mut r).await.is_err());
    }
}
