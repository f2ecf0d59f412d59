//! `kind: ssh_link`: a gateway's SSH connection to another gateway's SSH
//! door (a russh client), kept up for good.
//!
//! The link is a **route connector**: a vnet route `via: <link>` (or a
//! pipe's `via:`) opens a `direct-tcpip` channel per connection, so the
//! other gateway dials the target, host names included (they are resolved
//! on its side, as `ssh -W` does). Its **reverse forwards** (`forwards:`,
//! what `ssh -R` asks for) publish services of this side on the other
//! gateway: each connection there comes back as a `forwarded-tcpip`
//! channel and takes the one path here ([`OnRamp::connect_answering`]:
//! flow with the link as identity, policy, route in `vnet:`, dial, join).
//!
//! The link reconnects after any loss
//! ([`keep_up`](crate::core::net::link::keep_up), its waits
//! [`Backoff`](crate::core::net::link::Backoff)): first after 1 s, then
//! doubling up to `backoff_max`, each wait jittered by ±20 % so a fleet
//! does not reconnect in step; a connection that stayed up starts again at
//! 1 s.
//! Every reconnect authenticates anew and registers the reverse forwards
//! again. Keep-alives (`keepalive`, 3 unanswered end the session) notice a
//! vanished peer. The other gateway is pinned by its host key (the public
//! key line, or its `SHA256:` fingerprint as `meshgatectl status` shows
//! it); our own key is made on first start (Ed25519, 0600) and its public
//! line is in the status, ready for the other side's `authorized_keys`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use russh::client::{Handle, Msg, Session};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::Channel;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::config::{idle_timeout, parse_document, positive, ConfigError, IdleTimeout};
use crate::core::net::dial::{DialError, Dialer};
use crate::core::net::link::{keep_up, Connect, Ended};
use crate::core::net::proxy::Stream;
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::spine::onramp::publish::Forward;
use crate::core::spine::onramp::{ConnectRequest, OnRamp, RouteVia, Target};
use crate::core::spine::router::Connector;

/// `kind: ssh_link`
///
/// ```yaml
/// kind: ssh_link
/// server: gw-east.example:2222   # the other gateway's SSH door (host:port)
/// server_via: wg0                # optional: reach it through this module's network
/// host_key: "ssh-ed25519 AAAA..."   # its host key, or its fingerprint "SHA256:..."
/// user: west                     # default: the tenant's name
/// key_file: /var/lib/meshgate/west-link-key   # made on first start (Ed25519, 0600)
/// forwards:                      # published on the other gateway, as `ssh -R` does
///   - remote_port: 8081          # 0: any port (the status shows which)
///     to: 127.0.0.1:8000         # where its connections go from here
/// vnet: corp                     # where forwarded connections route (default: the tenant's)
/// connect_timeout: 10s
/// keepalive: 15s
/// backoff_max: 30s
/// idle_timeout: 1h               # of forwarded connections, or `none`
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: HostPort,
    #[serde(default)]
    server_via: Option<String>,
    host_key: String,
    #[serde(default)]
    user: Option<String>,
    key_file: PathBuf,
    #[serde(default)]
    forwards: Vec<Forward>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    keepalive: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    backoff_max: Duration,
    #[serde(default)]
    idle_timeout: Option<IdleTimeout>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(15)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

/// How the other gateway's host key is pinned.
#[derive(Debug, Clone, PartialEq)]
pub enum HostKey {
    /// The key itself.
    Key(PublicKey),
    /// Its SHA-256 fingerprint (`SHA256:...`).
    Fingerprint(String),
}

impl HostKey {
    fn matches(&self, key: &russh::keys::ssh_key::public::KeyData) -> bool {
        match self {
            HostKey::Key(k) => k.key_data() == key,
            HostKey::Fingerprint(f) => key.fingerprint(HashAlg::Sha256).to_string() == *f,
        }
    }
}

/// A checked `ssh_link` config.
#[derive(Debug, Clone)]
pub struct SshLinkConfig {
    /// The other gateway's SSH door.
    pub server: HostPort,
    /// The module whose network reaches it (`None`: the host's).
    pub server_via: Option<String>,
    /// Its pinned host key.
    pub host_key: HostKey,
    /// The user name we log in as.
    pub user: String,
    /// Our key's file.
    pub key_file: PathBuf,
    /// Reverse forwards.
    pub forwards: Vec<Forward>,
    /// Where forwarded connections route.
    pub vnet: Option<String>,
    /// Dial and handshake timeout.
    pub connect_timeout: Duration,
    /// Keep-alive interval.
    pub keepalive: Duration,
    /// The longest wait between reconnects.
    pub backoff_max: Duration,
    /// Idle timeout of forwarded connections.
    pub idle_timeout: Option<Duration>,
}

impl SshLinkConfig {
    /// Parses and validates a `kind: ssh_link` document.
    pub fn from_document(doc: &Document, tenant: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = &doc.source;
        let text = raw.host_key.trim();
        let host_key = if let Some(fp) = text.strip_prefix("SHA256:") {
            HostKey::Fingerprint(format!("SHA256:{fp}"))
        } else {
            HostKey::Key(PublicKey::from_openssh(text).map_err(|e| {
                ConfigError::key(
                    src,
                    "host_key",
                    format!("expected the other gateway's public key line (`ssh-ed25519 AAAA...`) or its `SHA256:` fingerprint: {e}"),
                )
            })?)
        };
        if !raw.key_file.is_absolute() {
            return Err(ConfigError::key(
                src,
                "key_file",
                "expected an absolute path (the key is made there on first start)",
            ));
        }
        positive(src, "connect_timeout", raw.connect_timeout)?;
        positive(src, "keepalive", raw.keepalive)?;
        if raw.backoff_max < Duration::from_secs(1) {
            return Err(ConfigError::key(src, "backoff_max", "at least 1s"));
        }
        Ok(SshLinkConfig {
            server: raw.server,
            server_via: raw.server_via,
            host_key,
            user: raw.user.unwrap_or_else(|| tenant.to_string()),
            key_file: raw.key_file,
            forwards: raw.forwards,
            vnet: raw.vnet,
            connect_timeout: raw.connect_timeout,
            keepalive: raw.keepalive,
            backoff_max: raw.backoff_max,
            idle_timeout: idle_timeout(src, raw.idle_timeout, Duration::from_secs(3600))?,
        })
    }
}

/// Builds SSH links.
pub struct SshLinkFactory;

impl ModuleFactory for SshLinkFactory {
    fn kind(&self) -> &'static str {
        "ssh_link"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = SshLinkConfig::from_document(doc, "-")?;
        Ok(ModulePlan {
            depends_on: cfg.server_via.into_iter().chain(cfg.vnet).collect(),
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = SshLinkConfig::from_document(doc, &ctx.tenant.name)?;
        Ok(Arc::new(SshLink(Arc::new(Link {
            onramp: OnRamp::new(ctx),
            cfg: RwLock::new(Arc::new(cfg)),
            source: Mutex::new(doc.source.clone()),
            state: Arc::new(LinkState::default()),
            running: Mutex::new(None),
        }))))
    }
}

/// What the status shows, and the session when up.
#[derive(Default)]
struct LinkState {
    handle: RwLock<Option<Arc<Handle<Client>>>>,
    /// Connected, since when, reconnects, the last error.
    link: Mutex<crate::core::net::link::LinkStatus>,
    status: Mutex<LinkStatus>,
}

/// What the status shows beside the link's state.
#[derive(Default, Clone)]
struct LinkStatus {
    /// (asked, bound) ports of the reverse forwards of this session.
    forwards: Vec<(u16, u32)>,
    public_key: Option<String>,
}

impl LinkState {
    fn handle(&self) -> Option<Arc<Handle<Client>>> {
        self.handle
            .read()
            .expect("poisoned")
            .clone()
            .filter(|h| !h.is_closed())
    }

    fn status(&self) -> std::sync::MutexGuard<'_, LinkStatus> {
        self.status.lock().expect("poisoned")
    }
}

struct Link {
    onramp: Arc<OnRamp>,
    cfg: RwLock<Arc<SshLinkConfig>>,
    source: Mutex<String>,
    state: Arc<LinkState>,
    /// Stops the running connect loop.
    running: Mutex<Option<CancellationToken>>,
}

/// A running SSH link.
pub struct SshLink(Arc<Link>);

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot reach {0}")]
    Dial(#[from] DialError),
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
    #[error("no SSH handshake within {0:?}")]
    Timeout(Duration),
    #[error("the server refused our key as user `{user}`: add `{public}` to its authorized_keys")]
    Refused { user: String, public: String },
}

impl Link {
    fn cfg(&self) -> Arc<SshLinkConfig> {
        self.cfg.read().expect("poisoned").clone()
    }

    fn labels(&self) -> (String, String) {
        let ctx = self.onramp.ctx();
        (ctx.tenant.name.clone(), ctx.instance.clone())
    }

    /// Dials, authenticates and registers the reverse forwards.
    /// Returns the session's handle and a token cancelled when the session
    /// ends (its callbacks are dropped with it).
    async fn connect(
        self: &Arc<Self>,
        key: &Arc<PrivateKey>,
    ) -> Result<(Handle<Client>, CancellationToken), LinkError> {
        let cfg = self.cfg();
        let connector = match &cfg.server_via {
            Some(m) => Connector::Module(m.clone()),
            None => Connector::Direct,
        };
        let stream = self
            .onramp
            .ctx()
            .dial(
                &connector,
                &cfg.server,
                cfg.connect_timeout,
                &crate::core::net::dial::DialMeta::default(),
            )
            .await?;
        let config = Arc::new(russh::client::Config {
            keepalive_interval: Some(cfg.keepalive),
            keepalive_max: 3,
            nodelay: true,
            preferred: super::preferred(),
            ..Default::default()
        });
        let ended = CancellationToken::new();
        let client = Client {
            link: Arc::downgrade(self),
            host_key: cfg.host_key.clone(),
            ended: ended.clone(),
        };
        let handshake = async {
            let mut handle = russh::client::connect_stream(config, stream, client).await?;
            let auth = handle
                .authenticate_publickey(&cfg.user, PrivateKeyWithHashAlg::new(key.clone(), None))
                .await?;
            if !auth.success() {
                return Err(LinkError::Refused {
                    user: cfg.user.clone(),
                    public: public_line(key),
                });
            }
            Ok::<_, LinkError>(handle)
        };
        let handle = tokio::time::timeout(cfg.connect_timeout, handshake)
            .await
            .map_err(|_| LinkError::Timeout(cfg.connect_timeout))??;
        let (tenant, instance) = self.labels();
        // Each forward is known as soon as it is bound: its first
        // connection may come before the next is registered.
        self.state.status().forwards.clear();
        for f in &cfg.forwards {
            match handle
                .tcpip_forward("0.0.0.0", u32::from(f.remote_port))
                .await
            {
                Ok(port) => {
                    let port = if port == 0 {
                        u32::from(f.remote_port)
                    } else {
                        port
                    };
                    tracing::info!(%tenant, %instance, remote_port = port, to = %f.to, "ssh link: reverse forward registered");
                    self.state.status().forwards.push((f.remote_port, port));
                }
                Err(e) => {
                    tracing::warn!(%tenant, %instance, remote_port = f.remote_port, error = %e, "ssh link: the server refused a reverse forward");
                }
            }
        }
        Ok((handle, ended))
    }

    fn start_loop(self: &Arc<Self>, source: &str) -> Result<(), ModuleError> {
        let cfg = self.cfg();
        let key = super::keys::load_or_create_key(&cfg.key_file, "SSH link key")
            .map_err(|m| ConfigError::key(source, "key_file", m))?;
        self.state.status().public_key = Some(public_line(&key));
        let stop = CancellationToken::new();
        if let Some(old) = self.running.lock().expect("poisoned").replace(stop.clone()) {
            old.cancel();
        }
        let link = self.clone();
        tokio::spawn(async move {
            let (tenant, instance) = link.labels();
            let metrics = link
                .onramp
                .ctx()
                .metrics
                .subsystem::<crate::core::net::link::LinkMetrics>()
                .series(&tenant, &instance, "ssh");
            let keeper = Keeper {
                link: &link,
                key: Arc::new(key),
            };
            keep_up(
                &keeper,
                &link.state.link,
                &metrics,
                (&tenant, &instance),
                &stop,
            )
            .await;
        });
        Ok(())
    }

    /// A `forwarded-tcpip` channel: a connection to one of our reverse
    /// forwards on the other gateway.
    fn forwarded(
        &self,
        channel: Channel<Msg>,
        port: u32,
        originator: SocketAddr,
        reply: russh::client::ChannelOpenHandle,
    ) {
        let cfg = self.cfg();
        let bound = self.state.status().forwards.clone();
        let target = bound
            .iter()
            .find(|(_, b)| *b == port)
            .and_then(|(asked, _)| cfg.forwards.iter().find(|f| f.remote_port == *asked));
        let Some(f) = target else {
            let (tenant, instance) = self.labels();
            tracing::warn!(%tenant, %instance, port, "ssh link: a forwarded channel for a port we did not ask for; refused");
            return; // dropping `reply` refuses it
        };
        let req = ConnectRequest {
            src: originator,
            target: Target::Addr(f.to.clone()),
            identity: Some(format!("ssh-link:{}", self.onramp.ctx().instance)),
            via: RouteVia::Vnet(cfg.vnet.clone()),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            client_dst: None,
            proxy_protocol: None,
            // The link's own forward (`to:`), from the operator's file.
            chosen_by: crate::core::spine::dest::ChosenBy::Operator,
            trace: None,
        };
        super::connect_channel(&self.onramp, req, channel, reply, None);
    }
}

/// The link's SSH session, kept up by [`keep_up`].
struct Keeper<'a> {
    link: &'a Arc<Link>,
    key: Arc<PrivateKey>,
}

#[async_trait]
impl Connect for Keeper<'_> {
    type Conn = (Arc<Handle<Client>>, CancellationToken);

    fn what(&self) -> &'static str {
        "ssh link"
    }

    fn backoff_max(&self) -> Duration {
        self.link.cfg().backoff_max
    }

    async fn open(&self) -> Result<Self::Conn, String> {
        let (handle, ended) = self
            .link
            .connect(&self.key)
            .await
            .map_err(|e| e.to_string())?;
        Ok((Arc::new(handle), ended))
    }

    async fn hold(&self, (handle, ended): &Self::Conn) -> Ended {
        *self.link.state.handle.write().expect("poisoned") = Some(handle.clone());
        // The session runs on its own task; its end drops the callbacks,
        // which cancels `ended`. A slow check of the handle backs that up.
        loop {
            tokio::select! {
                _ = ended.cancelled() => break,
                _ = tokio::time::sleep(SESSION_CHECK) => {}
            }
            if handle.is_closed() {
                break;
            }
        }
        *self.link.state.handle.write().expect("poisoned") = None;
        Ended::default()
    }

    async fn close(&self, (handle, _): Self::Conn) {
        *self.link.state.handle.write().expect("poisoned") = None;
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "link stopped", "")
            .await;
    }
}

/// `ssh-ed25519 AAAA... meshgate-link`: the line for the other side's
/// authorized_keys, with that one comment (a key made by `ssh-keygen`
/// carries its own, which would make two).
fn public_line(key: &PrivateKey) -> String {
    let mut public = key.public_key().clone();
    public.set_comment("meshgate-link");
    public.to_openssh().unwrap_or_default()
}

/// How often a running link also asks its handle whether the session is
/// still open (its end is normally seen at once, through `Client`'s drop).
const SESSION_CHECK: Duration = Duration::from_secs(5);

/// The russh client's callbacks, owned by the session's task.
struct Client {
    link: std::sync::Weak<Link>,
    host_key: HostKey,
    /// Cancelled when the session ends (this is dropped with it).
    ended: CancellationToken,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data(),
            russh::keys::PublicKeyOrCertificate::Certificate(c) => c.public_key(),
        };
        let ok = self.host_key.matches(key);
        if !ok {
            tracing::error!(
                offered = %key.fingerprint(HashAlg::Sha256),
                "ssh link: the server's host key is not the one configured (`host_key`); not connecting"
            );
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let originator = originator_address
            .parse()
            .map(|ip| SocketAddr::new(ip, u16::try_from(originator_port).unwrap_or(0)))
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        if let Some(link) = self.link.upgrade() {
            link.forwarded(channel, connected_port, originator, reply);
        }
        Ok(())
    }
}

/// Opens a `direct-tcpip` channel per dial: the other gateway connects.
struct LinkDialer(Arc<Link>);

#[async_trait]
impl Dialer for LinkDialer {
    async fn dial_tcp(
        &self,
        target: &HostPort,
        timeout: Duration,
        _meta: &crate::core::net::dial::DialMeta,
    ) -> Result<Stream, DialError> {
        let link = &self.0;
        let handle = link.state.handle().ok_or_else(|| {
            DialError::Down(format!(
                "ssh link `{}` to {} is down (reconnecting)",
                link.onramp.ctx().instance,
                link.cfg().server
            ))
        })?;
        let open = handle.channel_open_direct_tcpip(
            target.host.clone(),
            u32::from(target.port),
            "127.0.0.1",
            0,
        );
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(channel)) => Ok(Stream::io(channel.into_stream())),
            Ok(Err(russh::Error::ChannelOpenFailure(
                russh::ChannelOpenFailure::AdministrativelyProhibited,
            ))) => Err(DialError::NoRoute(format!(
                "{target}: refused by the other gateway's policy"
            ))),
            Ok(Err(_)) => Err(DialError::Refused(format!(
                "{target} (through ssh link `{}`)",
                link.onramp.ctx().instance
            ))),
            Err(_) => Err(DialError::Timeout {
                target: target.to_string(),
                timeout,
            }),
        }
    }
}

#[async_trait]
impl Module for SshLink {
    async fn start(&self) -> Result<(), ModuleError> {
        let source = self.0.source.lock().expect("poisoned").clone();
        self.0.start_loop(&source)
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let link = &self.0;
        let cfg = SshLinkConfig::from_document(doc, &link.onramp.ctx().tenant.name)?;
        let old = link.cfg();
        let reconnect = cfg.server != old.server
            || cfg.server_via != old.server_via
            || cfg.host_key != old.host_key
            || cfg.user != old.user
            || cfg.key_file != old.key_file
            || cfg.forwards != old.forwards
            || cfg.keepalive != old.keepalive;
        *link.cfg.write().expect("poisoned") = Arc::new(cfg);
        *link.source.lock().expect("poisoned") = doc.source.clone();
        if reconnect {
            link.start_loop(&doc.source)?;
        }
        Ok(())
    }

    async fn drain(&self) {}

    async fn stop(&self) {
        if let Some(stop) = self.0.running.lock().expect("poisoned").take() {
            stop.cancel();
        }
        self.0.onramp.stop().await;
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.0.cfg();
        let st = self.0.state.status().clone();
        let link = self.0.state.link.lock().expect("poisoned").clone();
        serde_json::json!({
            "server": cfg.server.to_string(),
            "server_via": cfg.server_via,
            "user": cfg.user,
            "connected": link.connected,
            "up_since": link.up_since,
            "reconnects": link.reconnects,
            "last_error": link.last_error,
            "forwards": st.forwards.iter().map(|(asked, bound)| serde_json::json!({"asked": asked, "bound": bound})).collect::<Vec<_>>(),
            "public_key": st.public_key,
        })
    }

    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        Some(Arc::new(LinkDialer(self.0.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> Document {
        Document {
            source: "tenants/acme/east.yaml".into(),
            value: v,
        }
    }

    #[test]
    fn config_checks() {
        let c = SshLinkConfig::from_document(
            &doc(json!({
                "server": "gw-east:2222",
                "host_key": "SHA256:abc",
                "key_file": "/tmp/k",
                "forwards": [{"remote_port": 8081, "to": "127.0.0.1:8000"}],
            })),
            "acme",
        )
        .unwrap();
        assert_eq!(c.user, "acme");
        assert_eq!(c.host_key, HostKey::Fingerprint("SHA256:abc".into()));
        assert_eq!(c.forwards[0].to.port, 8000);
        for (v, key) in [
            (
                json!({"server": "x:1", "host_key": "nonsense", "key_file": "/k"}),
                "host_key",
            ),
            (
                json!({"server": "x:1", "host_key": "SHA256:a", "key_file": "k"}),
                "key_file",
            ),
            (
                json!({"server": "x:1", "host_key": "SHA256:a", "key_file": "/k", "backoff_max": "10ms"}),
                "backoff_max",
            ),
        ] {
            let e = SshLinkConfig::from_document(&doc(v), "t").unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
        }
    }

    #[test]
    fn the_public_line_has_one_comment_whatever_the_key_carried() {
        let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]);
        let mut key = PrivateKey::from(pair);
        key.set_comment("alice@laptop");
        let line = public_line(&key);
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "{line}");
        assert_eq!((fields[0], fields[2]), ("ssh-ed25519", "meshgate-link"));
    }
}
