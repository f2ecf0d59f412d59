//! Doors: the module kinds that accept connections on one listener and
//! hand them to the one path (pipes, and SOCKS, HTTP proxy and SSH, which
//! speak a handshake first).
//!
//! A door kind implements [`Door`]: its kind name, how its document is
//! read, where it listens, what it does per connection (it is the
//! listener's [`StreamHandler`]) and what its status shows.
//! [`DoorFactory`] is then its factory and [`DoorModule`] the whole
//! [`Module`] (`examples/door/forward.rs` is a door in under 100 lines): start binds, a reload that moves the listener binds
//! the new address first (the old one serves on if that fails) and every
//! reload swaps the config for new connections, drain closes the listener,
//! stop ends the connections. A door whose config asks for datagrams (a
//! UDP pipe) gets a UDP socket instead and serves it with a task of its
//! own ([`Door::serve_datagrams`]). [`Live`] holds the config the connections
//! read. [`DoorSettings`] are the keys every door's document has (where it
//! listens, where its connections route, timeouts, the connection limit),
//! read and checked in one place.

use std::marker::PhantomData;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::core::addr::ListenAddr;
use crate::core::config::{
    at_least_one, idle_timeout, parse_document, positive, ConfigError, IdleTimeout,
};
use crate::core::net::datagram::DatagramSocket;
use crate::core::net::listen::StreamListener;
use crate::core::spine::module::{
    Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan, Need,
};
use crate::core::spine::onramp::{DoorListener, ListenOn, OnRamp, RunningListener, StreamHandler};
use crate::core::spine::startups::StartupLimits;
use crate::core::users::{RawUser, Users};

/// A door's running config and the source of its document; reloads swap
/// both, connections read the config when they start.
pub struct Live<C> {
    config: RwLock<Arc<C>>,
    source: RwLock<String>,
}

impl<C> Live<C> {
    /// The config read from `source`.
    pub fn new(config: C, source: &str) -> Self {
        Live {
            config: RwLock::new(Arc::new(config)),
            source: RwLock::new(source.to_string()),
        }
    }

    /// The config now.
    pub fn get(&self) -> Arc<C> {
        self.config.read().expect("door config poisoned").clone()
    }

    /// Where it came from (for errors).
    pub fn source(&self) -> String {
        self.source.read().expect("door config poisoned").clone()
    }

    /// Replaces both.
    pub fn set(&self, config: C, source: &str) {
        *self.config.write().expect("door config poisoned") = Arc::new(config);
        *self.source.write().expect("door config poisoned") = source.to_string();
    }
}

/// The keys every door's document has beside its own, and the key groups
/// a door kind may take ([`DoorKeys`]): read and checked here, once.
///
/// ```yaml
/// listen: 127.0.0.1:1080   # a bare port means 127.0.0.1
/// listen_via: wg0          # optional: accept on a VPN address in this module's network
/// vnet: frankfurt          # optional: where connections route (default: the tenant's default)
/// connect_timeout: 5s      # dials
/// idle_timeout: 1h         # or `none`: connections end after this long without traffic
/// max_connections: 1024    # at once
/// # doors with a handshake (SOCKS, HTTP proxy, SSH):
/// handshake_timeout: 10s   # a client must be through its handshake within this
/// max_startups: 10:30:100  # clients still in it: refuse a rising share from 10, all at 100
/// per_source_max_startups: 10   # the same from one address
/// # doors behind load balancers (SOCKS, HTTP proxy):
/// accept_proxy_protocol: [10.0.0.0/8]   # these send a PROXY header (v1/v2) first
/// # doors with passwords (SOCKS, HTTP proxy):
/// users: [{name: alice, password_file: /etc/meshgate/alice.pw, vnets: [sydney]}]
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DoorSettings {
    /// Where clients connect.
    pub listen: ListenAddr,
    /// Accept inside this module's network instead of the host's.
    pub listen_via: Option<String>,
    /// Where connections route when nothing else (a user's vnet) says.
    pub vnet: Option<String>,
    /// Dial timeout.
    pub connect_timeout: Duration,
    /// Idle timeout of relayed connections (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Concurrent connections.
    pub max_connections: usize,
    /// The handshake's deadline and the caps on clients still in it (the
    /// defaults for a kind without [`DoorKeys::handshake`]).
    pub handshake: HandshakeLimits,
    /// Load balancers whose connections start with a PROXY header (empty
    /// for a kind without [`DoorKeys::proxy_protocol`]).
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
    /// Users and their passwords (empty for a kind without
    /// [`DoorKeys::users`]).
    pub users: Users,
}

/// The key groups a door kind takes beside the six every door has.
#[derive(Debug, Clone, Copy, Default)]
pub struct DoorKeys {
    /// `handshake_timeout` (with this default), `max_startups` and
    /// `per_source_max_startups`: for a door whose clients speak before
    /// they are served.
    pub handshake: Option<Duration>,
    /// `accept_proxy_protocol`.
    pub proxy_protocol: bool,
    /// `users` (names, passwords, vnets).
    pub users: bool,
}

impl DoorKeys {
    fn names(&self) -> impl Iterator<Item = &'static str> {
        let h: &[&str] = if self.handshake.is_some() {
            &HandshakeLimits::KEYS
        } else {
            &[]
        };
        let p: &[&str] = if self.proxy_protocol {
            &["accept_proxy_protocol"]
        } else {
            &[]
        };
        let u: &[&str] = if self.users { &["users"] } else { &[] };
        h.iter().chain(p).chain(u).copied()
    }
}

/// A door's handshake limits: its deadline, and the caps on clients still
/// in it (door-wide with early random refusal, and per source address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// `handshake_timeout`.
    pub timeout: Duration,
    /// `max_startups` and `per_source_max_startups`.
    pub startups: StartupLimits,
}

impl HandshakeLimits {
    /// Its keys.
    pub const KEYS: [&'static str; 3] = [
        "handshake_timeout",
        "max_startups",
        "per_source_max_startups",
    ];
    /// `handshake_timeout` of a kind that names none.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            timeout: Self::DEFAULT_TIMEOUT,
            startups: StartupLimits::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoorSettings {
    listen: ListenAddr,
    #[serde(default)]
    listen_via: Option<String>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default)]
    idle_timeout: Option<IdleTimeout>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default, with = "humantime_serde")]
    handshake_timeout: Option<Duration>,
    #[serde(default)]
    max_startups: Option<serde_json::Value>,
    #[serde(default)]
    per_source_max_startups: Option<usize>,
    #[serde(default)]
    accept_proxy_protocol: Vec<ipnet::IpNet>,
    #[serde(default)]
    users: Vec<RawUser>,
}

fn default_connect_timeout() -> Duration {
    DoorSettings::DEFAULT_CONNECT_TIMEOUT
}
fn default_max_connections() -> usize {
    DoorSettings::DEFAULT_MAX_CONNECTIONS
}

impl DoorSettings {
    /// The rules of the door's transparent UDP sessions: routed in its
    /// `vnet`, counted against `max_connections`, opened within
    /// `connect_timeout`.
    pub fn session_rules(&self) -> crate::core::spine::onramp::transparent::SessionRules {
        crate::core::spine::onramp::transparent::SessionRules {
            via: crate::core::spine::onramp::RouteVia::Vnet(self.vnet.clone()),
            max: self.max_connections,
            connect_timeout: self.connect_timeout,
        }
    }

    /// The keys read here.
    pub const KEYS: [&'static str; 6] = [
        "listen",
        "listen_via",
        "vnet",
        "connect_timeout",
        "idle_timeout",
        "max_connections",
    ];
    /// `connect_timeout` unless configured.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// `idle_timeout` unless configured.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    /// `max_connections` unless configured.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

    /// Reads a door's document: the six shared keys into [`DoorSettings`],
    /// the door's own keys (`own_keys`, the fields of `T`) into `T`. A key
    /// that is neither is refused with every key the kind accepts.
    pub fn parse<T: DeserializeOwned>(
        doc: &Document,
        own_keys: &[&str],
    ) -> Result<(DoorSettings, T), ConfigError> {
        Self::parse_taking(doc, DoorKeys::default(), own_keys)
    }

    /// [`DoorSettings::parse`] for a kind that also takes the key groups
    /// `takes` names (a handshake's limits, PROXY headers, users).
    pub fn parse_taking<T: DeserializeOwned>(
        doc: &Document,
        takes: DoorKeys,
        own_keys: &[&str],
    ) -> Result<(DoorSettings, T), ConfigError> {
        let src = &doc.source;
        let shared: Vec<&str> = Self::KEYS.iter().copied().chain(takes.names()).collect();
        if let Some(map) = doc.value.as_object() {
            let known = |k: &str| k == "kind" || shared.contains(&k) || own_keys.contains(&k);
            if let Some(unknown) = map.keys().find(|k| !known(k)) {
                let mut all: Vec<&str> = shared.iter().chain(own_keys).copied().collect();
                all.sort_unstable();
                let all: Vec<String> = all.iter().map(|k| format!("`{k}`")).collect();
                return Err(ConfigError::key(
                    src,
                    unknown.as_str(),
                    format!(
                        "unknown field `{unknown}`, expected one of {}",
                        all.join(", ")
                    ),
                ));
            }
        }
        let skip_own: Vec<&str> = std::iter::once("kind")
            .chain(own_keys.iter().copied())
            .collect();
        let raw: RawDoorSettings = parse_document(doc, &skip_own)?;
        let skip_shared: Vec<&str> = std::iter::once("kind")
            .chain(shared.iter().copied())
            .collect();
        let own: T = parse_document(doc, &skip_shared)?;
        for (key, name) in [("listen_via", &raw.listen_via), ("vnet", &raw.vnet)] {
            if let Some(name) = name {
                configstore::check_name(name).map_err(|m| ConfigError::key(src, key, m))?;
            }
        }
        positive(src, "connect_timeout", raw.connect_timeout)?;
        at_least_one(src, "max_connections", raw.max_connections)?;
        let handshake = match takes.handshake {
            Some(default) => {
                let timeout = raw.handshake_timeout.unwrap_or(default);
                positive(src, "handshake_timeout", timeout)?;
                HandshakeLimits {
                    timeout,
                    startups: StartupLimits::from_raw(
                        src,
                        raw.max_startups.as_ref(),
                        raw.per_source_max_startups
                            .unwrap_or(StartupLimits::DEFAULT_PER_SOURCE),
                    )?,
                }
            }
            None => HandshakeLimits::default(),
        };
        let settings = DoorSettings {
            listen: raw.listen,
            listen_via: raw.listen_via,
            vnet: raw.vnet,
            connect_timeout: raw.connect_timeout,
            idle_timeout: idle_timeout(src, raw.idle_timeout, Self::DEFAULT_IDLE_TIMEOUT)?,
            max_connections: raw.max_connections,
            handshake,
            accept_proxy_protocol: raw.accept_proxy_protocol,
            users: Users::from_raw(src, raw.users)?,
        };
        Ok((settings, own))
    }

    /// Where the door listens.
    pub fn listen_on(&self) -> ListenOn {
        ListenOn::new(self.listen.0, self.listen_via.as_ref())
    }

    /// Whether anyone who reaches the host's network can reach the door:
    /// it listens on the host, not on loopback.
    pub fn exposed(&self) -> bool {
        self.listen_via.is_none() && !self.listen.0.ip().is_loopback()
    }

    /// The instances the door needs started first: its `listen_via` and
    /// `vnet`, and `more` (sorted, once each).
    pub fn depends_on<'a>(&'a self, more: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        let mut d: Vec<String> = self
            .listen_via
            .iter()
            .chain(self.vnet.iter())
            .chain(more)
            .cloned()
            .collect();
        d.sort();
        d.dedup();
        d
    }

    /// The admin API's fields for these settings.
    pub fn status(&self, onramp: &OnRamp) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        map.insert("listen".into(), self.listen.to_string().into());
        map.insert("listen_via".into(), self.listen_via.clone().into());
        map.insert("vnet".into(), self.vnet.clone().into());
        map.insert("active".into(), onramp.active().into());
        map.insert("max_connections".into(), self.max_connections.into());
        map
    }
}

/// A door kind: its config, its listener, its connections.
#[async_trait]
pub trait Door: StreamHandler + Sized {
    /// The kind name documents use in `kind:`.
    const KIND: &'static str;
    /// The checked config.
    type Config: Send + Sync + 'static;
    /// Reads and checks a document.
    fn parse(doc: &Document) -> Result<Self::Config, ConfigError>;
    /// The shared settings in a config.
    fn settings(config: &Self::Config) -> &DoorSettings;
    /// The connections' handler, reading the live config.
    fn new(live: Arc<Live<Self::Config>>) -> Self;
    /// The instances of the tenant to start first (default: the
    /// settings' `listen_via` and `vnet`).
    fn depends_on(config: &Self::Config) -> Vec<String> {
        Self::settings(config).depends_on([])
    }
    /// Where the door listens.
    fn listen_on(config: &Self::Config) -> ListenOn {
        Self::settings(config).listen_on()
    }
    /// Binds the listener for `config` (default: [`OnRamp::bind`]); a door
    /// that needs more at bind time (a host key) does it here. An error
    /// names the document's key.
    async fn bind(
        &self,
        onramp: &Arc<OnRamp>,
        config: &Self::Config,
        source: &str,
    ) -> Result<Box<dyn StreamListener>, ConfigError> {
        let on = Self::listen_on(config);
        onramp
            .bind(&on)
            .await
            .map_err(|e| on.bind_error(source, &e))
    }
    /// Whether `config` listens for datagrams (a UDP socket served by
    /// [`Door::serve_datagrams`]) rather than connections. Default: no.
    fn datagrams(_config: &Self::Config) -> bool {
        false
    }
    /// Serves a bound UDP socket until `cancel` ([`Door::datagrams`]).
    async fn serve_datagrams(
        self: Arc<Self>,
        _onramp: Arc<OnRamp>,
        _socket: Arc<dyn DatagramSocket>,
        _on: ListenOn,
        _cancel: CancellationToken,
    ) {
    }
    /// What must exist in the instances it depends on, checked before it
    /// starts (a pipe's `peer:` in its `via:`). Default: nothing.
    fn needs(_config: &Self::Config) -> Vec<Need> {
        Vec::new()
    }
    /// Whether a reload from `old` to `new` must bind again (default: the
    /// listen address or the transport changed).
    fn must_rebind(old: &Self::Config, new: &Self::Config) -> bool {
        Self::listen_on(old) != Self::listen_on(new) || Self::datagrams(old) != Self::datagrams(new)
    }
    /// Details for the admin API.
    fn status(&self, config: &Self::Config, onramp: &OnRamp) -> serde_json::Value;
    /// A reload put `config` in force: end what it no longer admits (an
    /// SSH key taken out of `authorized_keys`). Default: nothing.
    fn reloaded(&self, _config: &Self::Config) {}
    /// The door is draining: its listener is closed; tell open connections
    /// that can hear it to finish (HTTP/2 GOAWAY). Default: nothing (they
    /// run until they end, or until stop).
    fn draining(&self) {}
}

/// A door as a module: `D` handles the connections, this does the rest.
pub struct DoorModule<D: Door> {
    onramp: Arc<OnRamp>,
    listener: DoorListener,
    door: Arc<D>,
    live: Arc<Live<D::Config>>,
}

/// The [`ModuleFactory`] of every door kind: checks with [`Door::parse`]
/// and [`Door::depends_on`], builds a [`DoorModule`].
pub struct DoorFactory<D>(PhantomData<fn() -> D>);

impl<D> Default for DoorFactory<D> {
    fn default() -> Self {
        DoorFactory(PhantomData)
    }
}

impl<D: Door> ModuleFactory for DoorFactory<D> {
    fn kind(&self) -> &'static str {
        D::KIND
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = D::parse(doc)?;
        Ok(ModulePlan {
            depends_on: D::depends_on(&cfg),
            needs: D::needs(&cfg),
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        Ok(Arc::new(DoorModule::<D>::new(ctx, doc)?))
    }
}

impl<D: Door> DoorModule<D> {
    /// A door for `ctx` from a checked document.
    pub fn new(ctx: ModuleContext, doc: &Document) -> Result<Self, ConfigError> {
        let live = Arc::new(Live::new(D::parse(doc)?, &doc.source));
        Ok(DoorModule {
            onramp: OnRamp::new(ctx),
            listener: DoorListener::default(),
            door: Arc::new(D::new(live.clone())),
            live,
        })
    }

    /// The address the door accepts on (the port chosen, with port 0).
    pub async fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().await
    }

    async fn listen(&self, config: &D::Config, source: &str) -> Result<(), ModuleError> {
        let on = D::listen_on(config);
        if D::datagrams(config) {
            let socket = self
                .onramp
                .bind_udp(&on)
                .await
                .map_err(|e| on.bind_error(source, &e))?;
            let addr = socket
                .local_addr()
                .map_err(|e| ModuleError::Runtime(format!("a bound UDP socket: {e}")))?;
            let ctx = self.onramp.ctx();
            tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, %addr, "listening (udp)");
            let cancel = CancellationToken::new();
            let task = tokio::spawn(self.door.clone().serve_datagrams(
                self.onramp.clone(),
                socket,
                on,
                cancel.clone(),
            ));
            self.listener
                .replace(RunningListener::from_task(addr, cancel, task))
                .await;
            return Ok(());
        }
        let l = self.door.bind(&self.onramp, config, source).await?;
        self.listener
            .serve_bound(&self.onramp, on, l, self.door.clone())
            .await;
        Ok(())
    }
}

#[async_trait]
impl<D: Door> Module for DoorModule<D> {
    async fn start(&self) -> Result<(), ModuleError> {
        self.listen(&self.live.get(), &self.live.source()).await
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let new = D::parse(doc)?;
        if D::must_rebind(&self.live.get(), &new) {
            self.listen(&new, &doc.source).await?;
        }
        self.live.set(new, &doc.source);
        self.door.reloaded(&self.live.get());
        Ok(())
    }

    async fn drain(&self) {
        self.listener.close().await;
        self.door.draining();
    }

    async fn stop(&self) {
        self.drain().await;
        self.onramp.stop().await;
    }

    fn status(&self) -> serde_json::Value {
        self.door.status(&self.live.get(), &self.onramp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Own {
        #[serde(default)]
        colour: Option<String>,
        #[serde(default)]
        size: u32,
    }
    const OWN: [&str; 2] = ["colour", "size"];

    fn parse(v: serde_json::Value) -> Result<(DoorSettings, Own), ConfigError> {
        DoorSettings::parse(
            &Document {
                source: "tenants/acme/door.yaml".into(),
                value: v,
            },
            &OWN,
        )
    }

    #[test]
    fn shared_and_own_keys_each_land_in_their_struct_with_defaults() {
        let (door, own) = parse(json!({
            "kind": "x", "listen": 1080, "vnet": "sydney", "colour": "red", "size": 3,
        }))
        .unwrap();
        assert_eq!(door.listen.to_string(), "127.0.0.1:1080");
        assert_eq!(door.vnet.as_deref(), Some("sydney"));
        assert_eq!(door.connect_timeout, DoorSettings::DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(door.idle_timeout, Some(DoorSettings::DEFAULT_IDLE_TIMEOUT));
        assert_eq!(door.max_connections, DoorSettings::DEFAULT_MAX_CONNECTIONS);
        assert_eq!((own.colour.as_deref(), own.size), (Some("red"), 3));
        assert!(!door.exposed(), "loopback");
        assert_eq!(
            door.depends_on([&"wg0".to_string(), &"sydney".to_string()]),
            vec!["sydney".to_string(), "wg0".to_string()]
        );
        let (door, _) = parse(json!({"listen": "0.0.0.0:1080", "idle_timeout": "none"})).unwrap();
        assert!(door.exposed());
        assert_eq!(door.idle_timeout, None);
    }

    #[test]
    fn bad_documents_name_the_key_in_either_struct() {
        let cases = [
            (json!({"listen": 1, "colur": "red"}), "colur", "`colour`"),
            (
                json!({"listen": 1, "colur": "red"}),
                "colur",
                "`max_connections`",
            ),
            (json!({"colour": "red"}), "listen", "missing"),
            (json!({"listen": 1, "size": "big"}), "size", "u32"),
            (json!({"listen": 1, "vnet": "no such/name"}), "vnet", ""),
            (json!({"listen": 1, "listen_via": ""}), "listen_via", ""),
            (
                json!({"listen": 1, "connect_timeout": "0s"}),
                "connect_timeout",
                "longer",
            ),
            (
                json!({"listen": 1, "max_connections": 0}),
                "max_connections",
                "at least 1",
            ),
        ];
        for (v, key, msg) in cases {
            let e = parse(v.clone()).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{v}: {e}");
            assert!(e.to_string().contains(msg), "{v}: {e}");
            assert!(e.to_string().contains("tenants/acme/door.yaml"), "{v}: {e}");
        }
    }

    #[test]
    fn key_groups_are_read_for_the_kinds_that_take_them_and_refused_elsewhere() {
        let doc = |v: serde_json::Value| Document {
            source: "tenants/acme/door.yaml".into(),
            value: v,
        };
        let takes = DoorKeys {
            handshake: Some(Duration::from_secs(30)),
            proxy_protocol: true,
            users: true,
        };
        let full = json!({
            "listen": 1, "handshake_timeout": "5s", "max_startups": "3:50:9",
            "per_source_max_startups": 2, "accept_proxy_protocol": ["10.0.0.0/8"],
            "users": [{"name": "alice", "password": "pw", "vnets": ["sydney"]}],
        });
        let (door, _): (DoorSettings, Own) =
            DoorSettings::parse_taking(&doc(full.clone()), takes, &OWN).unwrap();
        assert_eq!(door.handshake.timeout, Duration::from_secs(5));
        assert_eq!(door.handshake.startups.per_source, 2);
        assert_eq!(door.accept_proxy_protocol.len(), 1);
        assert_eq!(door.users.names(), vec!["alice"]);
        assert_eq!(
            format!("{:?}", door.users),
            r#"["alice"]"#,
            "no password in Debug"
        );
        // The kind's own default, and the startups defaults.
        let (door, _): (DoorSettings, Own) =
            DoorSettings::parse_taking(&doc(json!({"listen": 1})), takes, &OWN).unwrap();
        assert_eq!(door.handshake.timeout, Duration::from_secs(30));
        assert_eq!(door.handshake.startups, StartupLimits::default());
        assert!(door.users.is_empty() && door.accept_proxy_protocol.is_empty());
        // Checked where they are read.
        for (v, key) in [
            (
                json!({"listen": 1, "handshake_timeout": "0s"}),
                "handshake_timeout",
            ),
            (
                json!({"listen": 1, "per_source_max_startups": 0}),
                "per_source_max_startups",
            ),
            (json!({"listen": 1, "max_startups": "x"}), "max_startups"),
            (
                json!({"listen": 1, "users": [{"name": "a"}]}),
                "users[0].password",
            ),
        ] {
            let e = DoorSettings::parse_taking::<Own>(&doc(v.clone()), takes, &OWN).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{v}: {e}");
        }
        // A kind that takes none refuses each group's keys, naming its own.
        for key in [
            "handshake_timeout",
            "max_startups",
            "accept_proxy_protocol",
            "users",
        ] {
            let e = parse(json!({"listen": 1, key: full[key].clone()})).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key));
            let text = e.to_string();
            let listed = text.split("expected one of").nth(1).unwrap_or_default();
            assert!(listed.contains("`max_connections`"), "{e}");
            assert!(!listed.contains(&format!("`{key}`")), "{e}");
        }
    }
}
