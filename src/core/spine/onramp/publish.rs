//! Reverse publishing over tunnel connections: a gateway link (`h2_link`,
//! `quic_link`) asks the door at the other end (`kind: h2`, `kind: quic`)
//! to listen on a port for it, and each connection there comes back over
//! the link, as `ssh -R` does over SSH.
//!
//! HTTP/2 and QUIC streams are opened by the client only, so the link
//! keeps a few requests **parked** per port ([`SPARE`]): over HTTP/2 an
//! extended CONNECT (RFC 8441) with `:protocol: meshgate-publish` and
//! `:path: /publish/PORT`; over QUIC the same request in HTTP/1.1 form,
//! `GET /publish/PORT` with `upgrade: meshgate-publish`. The door binds
//! the port at the first request and answers one parked request per
//! connection accepted there, `200` (HTTP/2) or `101` (QUIC) with
//! `forwarded: for=` the client; the stream is then that connection, and
//! the link parks another. A connection that finds no parked request
//! within the door's `connect_timeout` is closed.
//!
//! Who may publish which ports is the door's `publish:` list, by identity
//! (a client certificate's); the ports listen on `publish_ip` (default
//! 127.0.0.1) or on a VPN address in `publish_via`'s network, at most
//! `max_published` per connection. A published port lives as long as the
//! connection that asked for it; the same identity on another connection
//! (a reconnect, a second pooled connection) shares it. Refusals are
//! counted with the reasons `ssh -R` has: `permitlisten`,
//! `max_remote_forwards`, `remote_forward_bind`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use hyper::StatusCode;
use serde::Deserialize;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::net::dial::DialFailure;
use crate::core::net::proxy::Stream;
use crate::core::spine::dest::ChosenBy;
use crate::core::spine::flow::EndReason;
use crate::core::spine::reject::RejectReason;

use super::http::Refused;
use super::{Accepted, ConnectRequest, ListenOn, OnRamp, PublishedConn, RouteVia};
use super::{RunningListener, StreamHandler, Target};

/// The `:protocol` (HTTP/2) and `upgrade` (QUIC) of a publish request.
pub const PROTOCOL: &str = "meshgate-publish";

/// Requests a link keeps parked per published port: connections arriving
/// together up to this many are handed over at once; more wait a round
/// trip for the next.
pub const SPARE: usize = 4;

/// The path of a publish request for `port`.
pub fn path_for(port: u16) -> String {
    format!("/publish/{port}")
}

/// The port a publish request's path names (`/publish/8081`).
pub fn port_of(path: &str) -> Option<u16> {
    let n = path.strip_prefix("/publish/")?;
    if n.is_empty() || n.len() > 5 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|p| *p != 0)
}

/// A port, or an inclusive range `"9000-9099"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawPorts {
    One(u16),
    Range(String),
}

/// One entry of a door's `publish:` list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPermit {
    identity: String,
    ports: Vec<RawPorts>,
}

/// The publish keys of a door's document (`kind: h2`, `kind: quic`).
#[derive(Debug, Default)]
pub struct PublishKeys {
    /// `publish`: who may publish which ports.
    pub publish: Vec<RawPermit>,
    /// `publish_ip`: where published ports listen.
    pub publish_ip: Option<IpAddr>,
    /// `publish_via`: a module whose network they listen in.
    pub publish_via: Option<String>,
    /// `max_published`: ports one connection may publish.
    pub max_published: Option<usize>,
}

/// Who may publish which ports, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishRules {
    permits: Vec<(String, Vec<(u16, u16)>)>,
    /// Where published ports listen.
    pub ip: Option<IpAddr>,
    /// The module whose network they listen in (`None`: the host's).
    pub via: Option<String>,
    /// Ports one connection may publish.
    pub max_published: usize,
}

impl PublishKeys {
    /// Checks the keys of document `src`; errors name the key.
    pub fn check(self, src: &str) -> Result<PublishRules, ConfigError> {
        let mut permits = Vec::new();
        for (i, p) in self.publish.into_iter().enumerate() {
            if p.identity.is_empty() {
                return Err(ConfigError::key(
                    src,
                    "publish",
                    format!("entry {}: `identity` is empty", i + 1),
                ));
            }
            let mut ranges = Vec::new();
            for r in p.ports {
                let range = match &r {
                    RawPorts::One(n) => Some((*n, *n)),
                    RawPorts::Range(s) => s.split_once('-').and_then(|(a, b)| {
                        Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                    }),
                };
                match range {
                    Some((lo, hi)) if lo >= 1 && lo <= hi => ranges.push((lo, hi)),
                    _ => {
                        return Err(ConfigError::key(
                            src,
                            "publish",
                            format!(
                                "entry {} ({}): ports are numbers 1-65535 or ranges \"LO-HI\", not {:?}",
                                i + 1,
                                p.identity,
                                match r {
                                    RawPorts::One(n) => n.to_string(),
                                    RawPorts::Range(s) => s,
                                }
                            ),
                        ))
                    }
                }
            }
            if ranges.is_empty() {
                return Err(ConfigError::key(
                    src,
                    "publish",
                    format!("entry {} ({}): `ports` is empty", i + 1, p.identity),
                ));
            }
            permits.push((p.identity, ranges));
        }
        let max_published = self.max_published.unwrap_or(32);
        crate::core::config::at_least_one(src, "max_published", max_published)?;
        Ok(PublishRules {
            permits,
            ip: self.publish_ip,
            via: self.publish_via,
            max_published,
        })
    }
}

impl PublishRules {
    /// Whether `identity` may publish `port`.
    pub fn may(&self, identity: &str, port: u16) -> bool {
        self.permits
            .iter()
            .any(|(who, r)| who == identity && r.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)))
    }

    /// Where `port` listens.
    fn listen_on(&self) -> (IpAddr, Option<&String>) {
        (
            self.ip.unwrap_or(IpAddr::from([127, 0, 0, 1])),
            self.via.as_ref(),
        )
    }
}

/// A connection to a published port, handed to a parked request.
pub struct Offer {
    /// The client that connected.
    pub src: SocketAddr,
    tunnel: oneshot::Sender<Stream>,
}

impl Offer {
    /// Hands over the parked request's stream, now answered: the
    /// connection is joined to it.
    pub fn hand(self, tunnel: Stream) {
        let _ = self.tunnel.send(tunnel);
    }
}

/// One published port: its listener and the requests parked for its
/// connections. Dropped (the listener closed) with the last connection
/// that holds it.
pub struct Port {
    addr: SocketAddr,
    parked: Mutex<VecDeque<oneshot::Sender<Offer>>>,
    arrived: Notify,
    _listener: Mutex<Option<RunningListener>>,
}

impl Port {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Parks a request: resolves with the next connection to the port.
    pub async fn next(&self) -> Offer {
        loop {
            let (tx, rx) = oneshot::channel();
            self.parked.lock().expect("poisoned").push_back(tx);
            self.arrived.notify_one();
            // An arrival that took this request and then gave up (the door
            // stopping) dropped it unanswered: park again.
            if let Ok(offer) = rx.await {
                return offer;
            }
        }
    }

    /// A parked request still waiting, waiting up to `within` for one.
    async fn waiting(&self, within: Duration) -> Option<oneshot::Sender<Offer>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.arrived.notified();
            {
                let mut parked = self.parked.lock().expect("poisoned");
                while let Some(tx) = parked.pop_front() {
                    if !tx.is_closed() {
                        return Some(tx);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Requests parked now.
    pub fn parked(&self) -> usize {
        let mut parked = self.parked.lock().expect("poisoned");
        parked.retain(|tx| !tx.is_closed());
        parked.len()
    }
}

/// A door's published ports, by publisher and port.
#[derive(Default)]
pub struct Publications(tokio::sync::Mutex<HashMap<(String, u16), Weak<Port>>>);

/// The ports one tunnel connection published (closed with it, unless
/// another connection of the same identity holds them too).
#[derive(Default)]
pub struct Held(Mutex<HashMap<u16, Arc<Port>>>);

/// A publish request the door refuses: the status and reason it answers.
fn refuse(
    onramp: &OnRamp,
    src: SocketAddr,
    identity: Option<&str>,
    reason: RejectReason,
    status: StatusCode,
    detail: String,
) -> Refused {
    onramp.refused("publish.refused", src, identity, reason, &detail);
    Refused {
        status,
        reason,
        detail,
    }
}

impl Publications {
    /// A publish request for `port` from `identity` on a connection from
    /// `src` that holds `held`: the port (bound at its first request), or
    /// the refusal to answer.
    #[allow(clippy::too_many_arguments)]
    pub async fn request(
        &self,
        onramp: &Arc<OnRamp>,
        rules: &PublishRules,
        identity: Option<&str>,
        src: SocketAddr,
        held: &Held,
        port: u16,
        arrival: Arrival,
    ) -> Result<Arc<Port>, Refused> {
        let Some(who) = identity.filter(|who| rules.may(who, port)) else {
            return Err(refuse(
                onramp,
                src,
                identity,
                RejectReason::PermitListen,
                StatusCode::FORBIDDEN,
                format!(
                    "{} may not publish port {port} (the door's `publish` list)",
                    identity.unwrap_or("a client without an identity")
                ),
            ));
        };
        {
            let held = held.0.lock().expect("poisoned");
            if let Some(p) = held.get(&port) {
                return Ok(p.clone());
            }
            if held.len() >= rules.max_published {
                return Err(refuse(
                    onramp,
                    src,
                    identity,
                    RejectReason::MaxRemoteForwards,
                    StatusCode::FORBIDDEN,
                    format!("{} ports published on one connection", rules.max_published),
                ));
            }
        }
        let mut ports = self.0.lock().await;
        ports.retain(|_, p| p.strong_count() > 0);
        let key = (who.to_string(), port);
        let shared = ports.get(&key).and_then(Weak::upgrade);
        let p = match shared {
            Some(p) => p,
            None => {
                let (ip, via) = rules.listen_on();
                let on = ListenOn::new(SocketAddr::new(ip, port), via);
                let listener = onramp.bind(&on).await.map_err(|e| {
                    refuse(
                        onramp,
                        src,
                        identity,
                        RejectReason::RemoteForwardBind,
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot listen on {on:?}: {e}"),
                    )
                })?;
                let addr = listener.local_addr();
                let p = Arc::new(Port {
                    addr,
                    parked: Mutex::new(VecDeque::new()),
                    arrived: Notify::new(),
                    _listener: Mutex::new(None),
                });
                let handler = Arc::new(Arrivals {
                    port: Arc::downgrade(&p),
                    publisher: who.to_string(),
                    arrival,
                });
                *p._listener.lock().expect("poisoned") = Some(onramp.serve(on, listener, handler));
                let ctx = onramp.ctx();
                tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, identity = ?who, %addr, "port published");
                ports.insert(key, Arc::downgrade(&p));
                p
            }
        };
        held.0.lock().expect("poisoned").insert(port, p.clone());
        Ok(p)
    }

    /// The ports published now: publisher, port, address, parked
    /// requests (`Err` while a request is binding one).
    pub fn try_status(&self) -> Result<Vec<serde_json::Value>, tokio::sync::TryLockError> {
        let ports = self.0.try_lock()?;
        let mut out: Vec<_> = ports
            .iter()
            .filter_map(|((who, port), p)| {
                let p = p.upgrade()?;
                Some(serde_json::json!({
                    "identity": who,
                    "port": port,
                    "listen": p.addr.to_string(),
                    "parked": p.parked(),
                }))
            })
            .collect();
        out.sort_by_key(|v| v["port"].as_u64());
        Ok(out)
    }
}

/// How a door carries connections to a published port.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// How long a connection waits for a parked request (and for the
    /// request's answer to be sent).
    pub wait: Duration,
    /// End the flow after this long without traffic.
    pub idle_timeout: Option<Duration>,
    /// Connections to published ports at once (per door).
    pub max_connections: usize,
}

/// The connections to one published port: each is handed to a parked
/// request of its publisher.
struct Arrivals {
    port: Weak<Port>,
    publisher: String,
    arrival: Arrival,
}

#[async_trait]
impl StreamHandler for Arrivals {
    fn max_connections(&self) -> usize {
        self.arrival.max_connections
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let Some(port) = self.port.upgrade() else {
            return;
        };
        let wait = self.arrival.wait;
        let tunnel = async {
            let tx = port
                .waiting(wait)
                .await
                .ok_or(EndReason::DialFailed(DialFailure::Timeout))?;
            let (tunnel, rx) = oneshot::channel();
            tx.send(Offer {
                src: conn.src,
                tunnel,
            })
            .map_err(|_| EndReason::DialFailed(DialFailure::Refused))?;
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(_)) => Err(EndReason::DialFailed(DialFailure::Refused)),
                Err(_) => Err(EndReason::DialFailed(DialFailure::Timeout)),
            }
        };
        onramp
            .carry_published(
                client,
                PublishedConn {
                    src: conn.src,
                    publisher: &self.publisher,
                    dst: format!("published {}", port.addr),
                    route: format!("the tunnel of {}", self.publisher),
                    idle_timeout: self.arrival.idle_timeout,
                },
                tunnel,
            )
            .await;
    }
}

// ---- the link's side ----

/// A reverse forward of a link: a port on the other gateway, and where
/// its connections go from here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// The port on the other gateway.
    pub remote_port: u16,
    /// The target here.
    pub to: HostPort,
}

/// Checks a link's `forwards:` (ports 1-65535, each once).
pub fn check_forwards(src: &str, forwards: &[Forward]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for f in forwards {
        if f.remote_port == 0 {
            return Err(ConfigError::key(
                src,
                "forwards",
                "remote_port 0 (any port) is not offered over h2 and QUIC links: name the port",
            ));
        }
        if !seen.insert(f.remote_port) {
            return Err(ConfigError::key(
                src,
                "forwards",
                format!("remote_port {} is listed twice", f.remote_port),
            ));
        }
    }
    Ok(())
}

/// Why a parked request ended without a connection.
#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    /// The other gateway refused to publish the port (its status and
    /// reason): asked again later.
    #[error("refused: {0}")]
    Refused(String),
    /// The connection is gone.
    #[error("{0}")]
    Lost(String),
}

/// A link transport's publish request.
#[async_trait]
pub trait Park: Send + Sync + 'static {
    /// Parks one request for `port`: resolves when a connection arrives
    /// there, with its client (from `forwarded: for=`) and the stream.
    async fn park(&self, port: u16) -> Result<(Option<SocketAddr>, Stream), ParkError>;
}

/// How a link routes the connections of its forwards.
#[derive(Debug, Clone)]
pub struct ForwardRoute {
    /// The link's identity in the flows (`h2-link:NAME`).
    pub identity: String,
    /// The vnet they route in (`None`: the tenant's).
    pub vnet: Option<String>,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Idle timeout of the flows.
    pub idle_timeout: Option<Duration>,
}

/// How long a refused forward waits before asking again.
const REFUSED_RETRY: Duration = Duration::from_secs(10);

/// The state of each forward, for a link's status: `published` or why not.
pub type ForwardStates = Arc<Mutex<HashMap<u16, String>>>;

/// A link's forwards for its status: port, target, and `parked` (asked,
/// no connection yet), `published` (a connection came through) or
/// `refused: ...` (the other side's answer; asked again every 10 s).
pub fn forward_status(forwards: &[Forward], states: &ForwardStates) -> Vec<serde_json::Value> {
    let states = states.lock().expect("poisoned");
    forwards
        .iter()
        .map(|f| {
            serde_json::json!({
                "remote_port": f.remote_port,
                "to": f.to.to_string(),
                "state": states.get(&f.remote_port).map_or("pending", String::as_str),
            })
        })
        .collect()
}

/// Keeps [`SPARE`] requests parked for each forward over one connection
/// (until `ended`), and routes each connection that comes back to the
/// forward's `to` on the one path ([`OnRamp::connect`]: a flow with the
/// link as identity, policy, route, dial, join).
pub fn keep_parked(
    onramp: &Arc<OnRamp>,
    parking: Arc<dyn Park>,
    forwards: &[Forward],
    route: &ForwardRoute,
    states: &ForwardStates,
    ended: &CancellationToken,
) {
    for f in forwards {
        for _ in 0..SPARE {
            let (onramp, parking, f, route, states, ended) = (
                onramp.clone(),
                parking.clone(),
                f.clone(),
                route.clone(),
                states.clone(),
                ended.clone(),
            );
            tokio::spawn(async move {
                states
                    .lock()
                    .expect("poisoned")
                    .entry(f.remote_port)
                    .or_insert_with(|| "parked".into());
                loop {
                    let parked = tokio::select! {
                        r = parking.park(f.remote_port) => r,
                        _ = ended.cancelled() => return,
                    };
                    match parked {
                        Ok((src, stream)) => {
                            states
                                .lock()
                                .expect("poisoned")
                                .insert(f.remote_port, "published".into());
                            let req = ConnectRequest {
                                src: src.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                                target: Target::Addr(f.to.clone()),
                                identity: Some(route.identity.clone()),
                                via: RouteVia::Vnet(route.vnet.clone()),
                                connect_timeout: route.connect_timeout,
                                idle_timeout: route.idle_timeout,
                                client_dst: None,
                                proxy_protocol: None,
                                // The link's own forward (`to:`), from the
                                // operator's file.
                                chosen_by: ChosenBy::Operator,
                                trace: None,
                            };
                            let o = onramp.clone();
                            onramp.spawn(async move {
                                o.connect(stream, req).await;
                            });
                        }
                        Err(ParkError::Refused(why)) => {
                            let ctx = onramp.ctx();
                            if let Some(suppressed) = crate::core::logs::allow("link.publish") {
                                tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, remote_port = f.remote_port, reason = ?why, suppressed, "link: the other gateway refused to publish a port; asking again in 10s");
                            }
                            states
                                .lock()
                                .expect("poisoned")
                                .insert(f.remote_port, format!("refused: {why}"));
                            tokio::select! {
                                _ = tokio::time::sleep(REFUSED_RETRY) => {}
                                _ = ended.cancelled() => return,
                            }
                        }
                        Err(ParkError::Lost(_)) => return,
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_rules() {
        assert_eq!(port_of(&path_for(8081)), Some(8081));
        for bad in [
            "/publish/",
            "/publish/0",
            "/publish/65536",
            "/publish/+1",
            "/x/1",
        ] {
            assert_eq!(port_of(bad), None, "{bad}");
        }
        let keys = |v: serde_json::Value| PublishKeys {
            publish: serde_json::from_value(v).unwrap(),
            ..PublishKeys::default()
        };
        let rules =
            keys(serde_json::json!([{"identity": "dns:west", "ports": [8081, "9000-9009"]}]))
                .check("d.yaml")
                .unwrap();
        assert!(rules.may("dns:west", 8081));
        assert!(rules.may("dns:west", 9009));
        assert!(!rules.may("dns:west", 9010));
        assert!(!rules.may("dns:east", 8081));
        let e = keys(serde_json::json!([{"identity": "dns:west", "ports": ["9-1"]}]))
            .check("d.yaml")
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("publish"), "{e}");
        assert!(e.message.contains("\"9-1\""), "{e}");
        let e = keys(serde_json::json!([{"identity": "dns:west", "ports": [0]}]))
            .check("d.yaml")
            .unwrap_err();
        assert!(e.message.contains("1-65535"), "{e}");
    }
}
