//! The admin API: one HTTP/1.1 listener for the whole node.
//!
//! Owns the admin listener (default `127.0.0.1:9000`, from `meshgate.yaml`),
//! served on a runtime and thread of its own, apart from the data plane.
//! Serves:
//!
//! | path | what |
//! |---|---|
//! | `/metrics` | Prometheus metrics (text exposition format) |
//! | `/healthz` | 200 while the process runs |
//! | `/readyz` | 200 once start-up is over (with a `refused TENANT/INSTANCE: why` line for each instance that could not start); 503 while starting, draining, or restarting an instance that failed (`faults` in `/api/v1/node`) |
//! | `/api/v1/node` | node name, version, uptime |
//! | `/api/v1/tenants` | tenants with their instance and flow counts |
//! | `/api/v1/modules` | every module instance with its state (`?tenant=` filters) |
//! | `/api/v1/flows` | live flows (`?tenant=` filters), with the verdict and the policy rule |
//! | `/api/v1/policy/test` | which policy rule decides a flow: `?tenant=T&from=ADDR&to=HOST:PORT[&user=NAME][&door=NAME][&protocol=tcp]` |
//! | `/api/v1/overview` | what the dashboard shows: the node, every tenant's counts and refusals, and (`?tenant=T`) that tenant's modules and newest flows |
//! | `/api/v1/events` | the overview as server-sent events, once a second (`?tenant=T`) |
//! | `/ui/` | the dashboard ([`ui`]): a page, its script and style, holding no data; `/ui/auth` says whether the request's token opens the API |
//!
//! Read-only: nothing here changes the node. With `admin_token` set, every
//! `/api/` path (and `/metrics` with `metrics_need_token`) asks for
//! `Authorization: Bearer TOKEN` and answers 401 without it; `/healthz`,
//! `/readyz` and the dashboard's static files never do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::core::config::Secret;
use crate::core::spine::registry::Registry;

mod ui;

/// The admin server's shared state.
pub struct Admin {
    registry: Arc<Registry>,
    node: String,
    started: Instant,
    token: Option<Secret>,
    metrics_need_token: bool,
    /// Live event streams open now (at most [`MAX_EVENT_STREAMS`]).
    streams: Arc<tokio::sync::Semaphore>,
    /// What the API turned away, by reason.
    refusals: Arc<AdminMetrics>,
    /// The newest overview frame per tenant filter, shared by every live
    /// stream: one computation per filter a second, however many watch
    /// (each stream computing its own, 32 streams of the 1,000-tenant
    /// overview took the admin thread's whole core and fell seven times
    /// behind).
    frames: tokio::sync::Mutex<
        std::collections::HashMap<Option<String>, (tokio::time::Instant, Bytes)>,
    >,
    /// Overview frames computed, for the tests.
    frames_computed: std::sync::atomic::AtomicU64,
}

/// How old a shared overview frame may be when a stream's tick takes it.
const FRAME_FRESH: std::time::Duration = std::time::Duration::from_millis(900);

/// Why the admin API turned a client away:
/// `meshgate_admin_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// All [`MAX_CONNECTIONS`] are in use: closed at accept.
    Busy,
    /// The client's address holds [`MAX_PER_SOURCE`] already: closed at
    /// accept.
    PerSource,
    /// No request head within [`HEADER_READ_TIMEOUT`] (a silent or slow
    /// client, an idle keep-alive connection): closed.
    HeaderTimeout,
    /// A guarded path without the admin token: 401.
    Unauthorized,
    /// [`MAX_EVENT_STREAMS`] live streams are open: 503.
    Streams,
}

impl AdminRefusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRefusal::Busy => "busy",
            AdminRefusal::PerSource => "per_source",
            AdminRefusal::HeaderTimeout => "header_timeout",
            AdminRefusal::Unauthorized => "unauthorized",
            AdminRefusal::Streams => "streams",
        }
    }
}

/// `reason`: why the admin API turned a client away.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// The admin API's own series (`meshgate_admin_...`).
pub struct AdminMetrics {
    refused: prometheus_client::metrics::family::Family<
        RefusalLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl crate::core::metrics::Subsystem for AdminMetrics {
    const PREFIX: &'static str = "admin";
    fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        AdminMetrics {
            refused: crate::core::metrics::registered(
                registry,
                "refused",
                "Admin API clients turned away, by reason (busy, per_source, header_timeout, unauthorized, streams)",
            ),
        }
    }
}

impl AdminMetrics {
    /// Counts one refusal.
    pub fn count(&self, why: AdminRefusal) {
        self.refused
            .get_or_create(&RefusalLabels {
                reason: why.as_str(),
            })
            .inc();
    }
}

/// Event streams (`/api/v1/events`) served at once; more get 503.
pub const MAX_EVENT_STREAMS: usize = 32;
/// Flows the overview lists (the newest), whatever the total.
pub const OVERVIEW_FLOWS: usize = 500;

#[derive(Serialize)]
struct TenantSummary {
    name: String,
    instances: usize,
    active_flows: usize,
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Resp {
    match serde_json::to_string_pretty(v) {
        Ok(s) => text(status, "application/json", s + "\n"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot encode: {e}\n"),
        ),
    }
}

fn error(status: StatusCode, message: &str) -> Resp {
    json(status, &serde_json::json!({ "error": message }))
}

/// The value of `name` in a query string, if present.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The user this process runs as (the owner of `/proc/self`).
fn self_uid() -> Option<u32> {
    std::fs::metadata("/proc/self")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
}

/// A query parameter, percent-decoded (`+` is a space).
fn query_text(query: Option<&str>, name: &str) -> Option<String> {
    let raw = query_param(query, name)?.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' if i + 2 < raw.len() => {
                let hex = std::str::from_utf8(&raw[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

impl Admin {
    /// Which policy rule decides a flow described by the query, and the
    /// route a literal address takes (names are not resolved here).
    async fn policy_test(&self, q: Option<&str>) -> Resp {
        use crate::core::spine::flow::{FlowContext, Protocol};
        let (Some(tenant), Some(from), Some(to)) = (
            query_text(q, "tenant"),
            query_text(q, "from"),
            query_text(q, "to"),
        ) else {
            return error(
                StatusCode::BAD_REQUEST,
                "expected ?tenant=T&from=ADDR&to=HOST:PORT[&user=NAME][&door=NAME][&protocol=tcp|udp|icmp]",
            );
        };
        let Some((t, kinds)) = self.registry.tenant(&tenant).await else {
            return error(StatusCode::NOT_FOUND, "no such tenant running here");
        };
        let src = match from
            .parse::<std::net::SocketAddr>()
            .or_else(|_| from.parse::<std::net::IpAddr>().map(|ip| (ip, 0).into()))
        {
            Ok(a) => a,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "`from`: expected an IP address or IP:PORT",
                )
            }
        };
        let target: crate::core::addr::HostPort = match to.parse() {
            Ok(t) => t,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("`to`: {e}")),
        };
        let protocol = match query_text(q, "protocol").as_deref() {
            None | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some("icmp") => Protocol::Icmp,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "`protocol`: expected tcp, udp or icmp",
                )
            }
        };
        let door = query_text(q, "door").unwrap_or_default();
        let kind = kinds.get(&door).cloned().unwrap_or_else(|| door.clone());
        let dialed = match crate::core::spine::dest::normalize_host(&target.host) {
            crate::core::spine::dest::Host::Ip(ip) => {
                Some(std::net::SocketAddr::new(ip, target.port))
            }
            crate::core::spine::dest::Host::Name(_) => None,
        };
        let ctx = FlowContext {
            tenant: tenant.clone(),
            instance: door.clone(),
            identity: query_text(q, "user"),
            src,
            dst: target.to_string(),
            protocol,
            kind: kind.clone(),
            dialed,
            trace: None,
        };
        let route = match t.vnets.route(None, &target) {
            Ok(d) => d.describe(),
            Err(e) => e.to_string(),
        };
        let d = self.registry.flows().explain(&ctx).unwrap_or_default();
        json(
            StatusCode::OK,
            &serde_json::json!({
                "tenant": tenant,
                "door": door,
                "kind": kind,
                "identity": ctx.identity,
                "from": src.to_string(),
                "to": ctx.dst,
                "protocol": protocol,
                "verdict": if d.deny { "deny" } else { "allow" },
                "rule": d.rule,
                "reason": if d.deny { d.reason() } else if d.rule.is_some() { format!("allowed by policy rule `{}`", d.rule.as_deref().unwrap_or_default()) } else { "no rule matches: allowed (the tenant has no allow rule and no `default: deny`)".into() },
                "dry_run": d.dry_run.map(|(rule, action)| serde_json::json!({"rule": rule, "would": action})),
                "policy_rules": t.policy.current().len(),
                "route": route,
            }),
        )
    }

    /// Admin state for `registry` on node `node`, open to anyone who
    /// reaches it.
    pub fn new(registry: Arc<Registry>, node: impl Into<String>) -> Arc<Self> {
        Self::with_token(registry, node, None, false)
    }

    /// Admin state whose `/api/` paths (and `/metrics` if
    /// `metrics_need_token`) ask for `token`, when there is one.
    pub fn with_token(
        registry: Arc<Registry>,
        node: impl Into<String>,
        token: Option<Secret>,
        metrics_need_token: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            refusals: registry.metrics().subsystem::<AdminMetrics>(),
            registry,
            node: node.into(),
            started: Instant::now(),
            token,
            metrics_need_token,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS)),
            frames: Default::default(),
            frames_computed: Default::default(),
        })
    }

    /// Whether `req` may have `path`: no token set, a path that needs none,
    /// or the right bearer token.
    fn authorized(&self, path: &str, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let guarded = path.starts_with("/api/") || (path == "/metrics" && self.metrics_need_token);
        if !guarded {
            return true;
        }
        req.headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|given| token.matches(given))
    }

    /// The node's summary: what `/api/v1/node` shows.
    fn node_summary(&self) -> serde_json::Value {
        serde_json::json!({
            "node": self.node,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "ready": self.registry.is_ready(),
            "faults": self.registry.faults().into_iter().map(|(who, why)| serde_json::json!({"instance": who, "reason": why})).collect::<Vec<_>>(),
            "refused": self.registry.refused().into_iter().map(|(who, why)| serde_json::json!({"instance": who, "reason": why})).collect::<Vec<_>>(),
            "store": self.registry.store().describe(),
            // The user meshgate runs as: capture rules exclude its own connections.
            "uid": self_uid(),
        })
    }

    /// What the dashboard shows: the node; each tenant's instance count,
    /// bytes moved, live flows and their bytes, refusals by reason; and for `tenant`, its
    /// modules with their details and its newest [`OVERVIEW_FLOWS`] flows.
    pub async fn overview(&self, tenant: Option<&str>) -> serde_json::Value {
        use std::collections::BTreeMap;
        #[derive(Default, Serialize)]
        struct T {
            instances: usize,
            active_flows: usize,
            bytes: u64,
            bytes_live: u64,
            refusals: BTreeMap<String, u64>,
            problems: usize,
        }
        let status = self.registry.status().await;
        let flows = self.registry.flows().snapshot();
        let mut tenants: BTreeMap<String, T> = BTreeMap::new();
        for s in &status {
            let t = tenants.entry(s.tenant.clone()).or_default();
            t.instances += 1;
            t.bytes += self.registry.metrics().bytes_moved(&s.tenant, &s.instance);
            if s.last_error.is_some()
                || !matches!(s.state, crate::core::spine::registry::ModuleState::Running)
            {
                t.problems += 1;
            }
        }
        for f in &flows {
            let t = tenants.entry(f.ctx.tenant.clone()).or_default();
            t.active_flows += 1;
            t.bytes_live += f.bytes_up + f.bytes_down;
        }
        let refusals = self.registry.metrics().refusals();
        for (labels, n) in &refusals {
            *tenants
                .entry(labels.tenant.clone())
                .or_default()
                .refusals
                .entry(labels.reason.clone())
                .or_default() += *n;
        }
        let mut out = serde_json::json!({
            "node": self.node_summary(),
            "tenants": tenants.iter().map(|(name, t)| {
                let mut v = serde_json::to_value(t).unwrap_or_default();
                v["name"] = name.clone().into();
                v
            }).collect::<Vec<_>>(),
            "flows_total": flows.len(),
        });
        if let Some(t) = tenant {
            let modules: Vec<_> = status.into_iter().filter(|s| s.tenant == t).collect();
            let mut mine: Vec<_> = flows.into_iter().filter(|f| f.ctx.tenant == t).collect();
            let total = mine.len();
            let newest = mine.split_off(total.saturating_sub(OVERVIEW_FLOWS));
            let refusals: Vec<_> = refusals
                .iter()
                .filter(|(l, _)| l.tenant == t)
                .map(|(l, n)| serde_json::json!({"instance": l.instance, "reason": l.reason, "count": n}))
                .collect();
            out["tenant"] = serde_json::json!({
                "name": t,
                "modules": modules,
                "flows": newest,
                "flows_total": total,
                "refusals": refusals,
            });
        }
        out
    }

    /// The overview for `tenant` as one server-sent event: the shared
    /// frame if it is younger than [`FRAME_FRESH`], else computed anew
    /// (streams that ask meanwhile wait for it rather than compute it
    /// again). Filters no stream asked for in 5 s are forgotten, and there
    /// are never more than [`MAX_EVENT_STREAMS`].
    async fn frame(&self, tenant: Option<&str>) -> Bytes {
        let mut frames = self.frames.lock().await;
        let key = tenant.map(str::to_string);
        if let Some((at, frame)) = frames.get(&key) {
            if at.elapsed() < FRAME_FRESH {
                return frame.clone();
            }
        }
        let v = self.overview(tenant).await;
        self.frames_computed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let frame = Bytes::from(format!("event: overview\ndata: {v}\n\n"));
        frames.retain(|_, (at, _)| at.elapsed() < std::time::Duration::from_secs(5));
        if frames.len() < MAX_EVENT_STREAMS || frames.contains_key(&key) {
            frames.insert(key, (tokio::time::Instant::now(), frame.clone()));
        }
        frame
    }

    /// `/api/v1/events`: the overview once a second as server-sent events
    /// (`event: overview`), until the client goes; at most
    /// [`MAX_EVENT_STREAMS`] at once.
    fn events(self: &Arc<Self>, tenant: Option<String>) -> Resp {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            self.refusals.count(AdminRefusal::Streams);
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many live streams open; try again later",
            );
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    // The client went (hyper dropped the body): let the slot go now.
                    _ = tx.closed() => return,
                }
                let frame = me.frame(tenant.as_deref()).await;
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(BoxBody::new(ui::EventBody(rx)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        r
    }

    /// Answers one request.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Resp {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here");
        }
        let path = req.uri().path();
        if !self.authorized(path, &req) {
            self.refusals.count(AdminRefusal::Unauthorized);
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "this path needs the admin token: Authorization: Bearer TOKEN",
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"meshgate\""),
            );
            return r;
        }
        if path == "/ui/auth" {
            // The page asks here first, so a missing or wrong token is an
            // answer rather than a failed request.
            return json(
                StatusCode::OK,
                &serde_json::json!({
                    "needs_token": self.token.is_some(),
                    "authorized": self.authorized("/api/v1/", &req),
                }),
            );
        }
        if let Some(r) = ui::asset(path) {
            return r;
        }
        let tenant = query_param(req.uri().query(), "tenant");
        match path {
            "/metrics" => {
                // Prometheus asks for OpenMetrics; everything else gets the classic format.
                let wants_openmetrics = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                if wants_openmetrics {
                    text(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        self.registry.metrics().encode(),
                    )
                } else {
                    text(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        self.registry.metrics().encode_prometheus(),
                    )
                }
            }
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                if self.registry.is_ready() {
                    // Ready, with the instances that could not start named:
                    // the rest of the node serves.
                    let mut body = String::from("ready\n");
                    for (who, why) in self.registry.refused() {
                        body.push_str(&format!("refused {who}: {}\n", why.escape_debug()));
                    }
                    text(StatusCode::OK, "text/plain", body)
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".into())
                }
            }
            "/api/v1/node" => json(StatusCode::OK, &self.node_summary()),
            "/api/v1/overview" => json(StatusCode::OK, &self.overview(tenant).await),
            "/api/v1/events" => self.events(query_text(req.uri().query(), "tenant")),
            "/api/v1/tenants" => {
                let status = self.registry.status().await;
                let mut out: Vec<TenantSummary> = Vec::new();
                for s in status {
                    match out.last_mut() {
                        Some(t) if t.name == s.tenant => t.instances += 1,
                        _ => out.push(TenantSummary {
                            active_flows: self.registry.flows().count(Some(&s.tenant), None),
                            name: s.tenant,
                            instances: 1,
                        }),
                    }
                }
                json(StatusCode::OK, &out)
            }
            "/api/v1/modules" => {
                let mut status = self.registry.status().await;
                if let Some(t) = tenant {
                    status.retain(|s| s.tenant == t);
                }
                json(StatusCode::OK, &status)
            }
            "/api/v1/flows" => {
                let mut flows = self.registry.flows().snapshot();
                if let Some(t) = tenant {
                    flows.retain(|f| f.ctx.tenant == t);
                }
                json(StatusCode::OK, &flows)
            }
            "/api/v1/policy/test" => self.policy_test(req.uri().query()).await,
            _ => error(StatusCode::NOT_FOUND, "no such path; see /ui/, /api/v1/node, /api/v1/tenants, /api/v1/modules, /api/v1/flows, /api/v1/overview, /api/v1/events, /api/v1/policy/test, /metrics, /healthz, /readyz"),
        }
    }
}

/// Binds the admin listener. Fails with a message naming the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind the admin API to {addr}: {e}"),
        )
    })
}

/// Serves the admin API on `listener` until `shutdown` is cancelled.
/// Serves the admin API on a runtime of its own (one thread), so a busy
/// data plane never delays `/metrics`, `/readyz` or the API, and a slow
/// scrape never takes a data-plane worker. The listener is moved over.
pub fn spawn_on_own_runtime(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let std_listener = listener.into_std()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("meshgate-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(l) => serve(l, admin, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "admin API cannot serve"),
                }
            })
        })
}

/// Connections the admin API serves at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one client address may hold at once; more are closed at
/// accept, so one address cannot take all [`MAX_CONNECTIONS`] and keep the
/// operator out (a dashboard holds one stream and a few requests; a
/// scraper one connection).
pub const MAX_PER_SOURCE: usize = 64;
/// How long a client may take to send a request's headers (also how long an
/// idle keep-alive connection is kept).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connections each client address holds now, for [`MAX_PER_SOURCE`].
#[derive(Default)]
struct PerSource(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection of an address in [`PerSource`]; given back on drop.
struct SourceSlot(Arc<PerSource>, std::net::IpAddr);

impl PerSource {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= MAX_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), ip))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// Serves the admin API on `listener` until `shutdown`. Bounded: at most
/// [`MAX_CONNECTIONS`] at once and [`MAX_PER_SOURCE`] from one address,
/// headers within [`HEADER_READ_TIMEOUT`], no request bodies (the API only
/// reads), so slow or hostile clients cost a bounded amount and never the
/// data plane (which runs elsewhere). Every refusal is counted
/// ([`AdminRefusal`]).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let sources = Arc::new(PerSource::default());
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let taken = match sources.take(peer.ip().to_canonical()) {
            None => Err(AdminRefusal::PerSource),
            Some(source) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Ok((source, permit)),
                Err(_) => Err(AdminRefusal::Busy),
            },
        };
        let (source, permit) = match taken {
            Ok(held) => held,
            Err(why) => {
                admin.refusals.count(why);
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%peer, refused, reason = why.as_str(), max = MAX_CONNECTIONS, per_source = MAX_PER_SOURCE, "admin API connection closed at accept");
                }
                drop(stream);
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _held = (source, permit);
            let refusals = admin.refusals.clone();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let admin = admin.clone();
                    async move {
                        let has_body = req
                            .headers()
                            .get(hyper::header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.trim() != "0")
                            || req.headers().contains_key(hyper::header::TRANSFER_ENCODING);
                        if has_body {
                            return Ok::<_, Infallible>(text(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "text/plain",
                                "the admin API takes no request body\n".into(),
                            ));
                        }
                        Ok::<_, Infallible>(admin.handle(req).await)
                    }
                });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                if e.is_timeout() {
                    refusals.count(AdminRefusal::HeaderTimeout);
                }
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams watching the same tenant share one overview a second;
    /// another filter has its own; a stale one is computed again.
    #[tokio::test]
    async fn streams_share_one_overview_a_second() {
        use std::sync::atomic::Ordering;
        let registry = Arc::new(Registry::new(
            Arc::new(configstore::MemStore::new()),
            Vec::new(),
            Arc::new(crate::core::metrics::Metrics::new()),
            Arc::new(crate::core::spine::flow::FlowTable::new(Vec::new())),
        ));
        let admin = Admin::new(registry, "n");
        let first = admin.frame(Some("acme")).await;
        assert!(first.starts_with(b"event: overview\ndata: {"));
        for _ in 0..31 {
            assert_eq!(admin.frame(Some("acme")).await, first);
        }
        assert_eq!(admin.frames_computed.load(Ordering::Relaxed), 1);
        admin.frame(None).await;
        assert_eq!(admin.frames_computed.load(Ordering::Relaxed), 2);
        tokio::time::sleep(FRAME_FRESH).await;
        admin.frame(Some("acme")).await;
        assert_eq!(admin.frames_computed.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("tenant=a&x=1"), "tenant"), Some("a"));
        assert_eq!(query_param(Some("x=1"), "tenant"), None);
        assert_eq!(query_param(None, "tenant"), None);
    }
}
