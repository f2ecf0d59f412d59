//! `kind: ssh`: an SSH door for stock OpenSSH clients (russh server).
//!
//! A user with a key in the door's `authorized_keys` joins the tenant's
//! network with the forwards OpenSSH already has: `ssh -L`, `ssh -W` (and
//! so `-J`/ProxyJump), and `ssh -D` (OpenSSH's own SOCKS, which it turns
//! into the same direct-tcpip channels). Each channel takes the one path
//! ([`OnRamp::connect_answering`]: flow with the key's identity, policy,
//! route in `vnet:`, dial, join, audit); the channel is confirmed only once
//! the dial succeeded, and refused (`connect failed`, or `administratively
//! prohibited` for a denial) otherwise, so `ssh -W` reports what happened.
//!
//! `ssh -R` publishes a service: a TCP port on `remote_forward_ip` (also as
//! `NAME.ssh.<tenant>` when the bind address is a name), or a Unix socket
//! in `streamlocal_dir`; connections to it come back as forwarded channels
//! of the session, and everything it published goes with the session.
//! Gateways link to each other with [`link`] (`kind: ssh_link`).
//!
//! Public keys only: passwords are refused (and counted). The options of
//! an `authorized_keys` line that meshgate honours are in [`keys`]; any
//! other is a config error. There is no shell: a session channel prints
//! the tenant, the identity and what the key may reach, then closes. The
//! host key is made on first start (Ed25519, mode 0600) and its fingerprint
//! shown in the status. Ed25519 and ECDSA user keys (RSA needs russh's
//! `rsa` feature, left out for RUSTSEC-2023-0071).

pub mod config;
pub mod keys;
pub mod link;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use configstore::Document;
use russh::keys::HashAlg;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::logs;
use crate::core::net::dial::DialFailure;
use crate::core::net::listen::StreamListener;
use crate::core::net::proxy::Stream;
use crate::core::spine::dest::ChosenBy;
use crate::core::spine::door::{Door, DoorFactory, DoorSettings, Live};
use crate::core::spine::flow::EndReason;
use crate::core::spine::onramp::{
    Accepted, Answer, ConnectRequest, ListenOn, OnRamp, PublishedConn, RouteVia, RunningListener,
    StreamHandler, Target,
};

use crate::core::spine::reject::RejectReason;
pub use config::SshConfig;
use keys::AuthorizedKey;

/// Builds ssh doors.
pub type SshFactory = DoorFactory<SshDoor>;

/// The SSH door's connections: the live config and russh's server config
/// (with the host key, made when the listener is bound).
pub struct SshDoor {
    live: Arc<Live<SshConfig>>,
    server: RwLock<Option<Arc<russh::server::Config>>>,
    /// Sessions not yet logged in.
    startups: Arc<crate::core::spine::startups::Startups>,
    /// Live sessions: what admitted each, and how to end it.
    sessions: Arc<Sessions>,
    /// Whether the `authorized_keys_file` watcher runs.
    watching: std::sync::atomic::AtomicBool,
}

/// How often the `authorized_keys_file` is looked at.
const KEYS_FILE_POLL: std::time::Duration = std::time::Duration::from_millis(300);

/// Follows the door's `authorized_keys_file`: when it changes (and has
/// settled), its keys replace the file's part of the live config and the
/// sessions of keys no longer there end. A file that does not parse keeps
/// the keys in force (logged).
async fn watch_keys_file(live: Arc<Live<SshConfig>>, sessions: Arc<Sessions>, onramp: Arc<OnRamp>) {
    let ctx = onramp.ctx();
    let stop = onramp.stopping().clone();
    // Each unreadable state is reported once.
    let mut reported = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(KEYS_FILE_POLL) => {}
        }
        let cfg = live.get();
        let Some(path) = cfg.authorized_keys_file.clone() else {
            continue;
        };
        let stamp = config::file_stamp(&path);
        if stamp == cfg.keys_file_stamp || (stamp.is_some() && stamp == reported) {
            continue;
        }
        // Let a writer finish (truncate, then write) before reading.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if config::file_stamp(&path) != stamp {
            continue;
        }
        match config::read_keys_file(&path) {
            Ok(file_keys) => {
                let new = cfg.with_file_keys(file_keys, stamp);
                let keys = new.keys.len();
                live.set(new, &live.source());
                let ended = sessions.revoke_missing(&live.get().keys);
                tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, path = %path.display(), keys, sessions_ended = ended, "authorized_keys_file changed: keys applied");
            }
            Err(e) => {
                reported = stamp;
                if let Some(suppressed) = logs::allow("ssh.keys_file") {
                    tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, error = %e, suppressed, "authorized_keys_file changed but cannot be read; the keys in force stay");
                }
            }
        }
    }
}

/// The door's live sessions, so a reload that takes a key away ends the
/// sessions it admitted (and with them their channels and `-R` listeners).
#[derive(Default)]
struct Sessions {
    next: std::sync::atomic::AtomicU64,
    live: std::sync::Mutex<std::collections::HashMap<u64, SessionEntry>>,
}

struct SessionEntry {
    /// The `authorized_keys` line that admitted it, once logged in.
    grant: Option<AuthorizedKey>,
    end: tokio_util::sync::CancellationToken,
}

/// A session's place in [`Sessions`]; removed when the session ends.
struct SessionSlot {
    sessions: Arc<Sessions>,
    id: u64,
}

impl SessionSlot {
    /// The session logged in with `grant`.
    fn granted(&self, grant: &AuthorizedKey) {
        let mut live = self.sessions.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = live.get_mut(&self.id) {
            e.grant = Some(grant.clone());
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.sessions
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Sessions {
    fn open(self: &Arc<Self>) -> (SessionSlot, tokio_util::sync::CancellationToken) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let end = tokio_util::sync::CancellationToken::new();
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            SessionEntry {
                grant: None,
                end: end.clone(),
            },
        );
        (
            SessionSlot {
                sessions: self.clone(),
                id,
            },
            end,
        )
    }

    /// Ends every session whose admitting line `keys` no longer has (the
    /// same key with the same options); returns how many.
    fn revoke_missing(&self, keys: &[AuthorizedKey]) -> usize {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for e in live.values() {
            if let Some(g) = &e.grant {
                if !keys.iter().any(|k| keys::same_grant(k, g)) && !e.end.is_cancelled() {
                    e.end.cancel();
                    n += 1;
                }
            }
        }
        n
    }
}

/// russh's default ciphers, with aes128-gcm (which OpenSSH clients offer
/// and AES-NI makes the fastest) beside aes256-gcm.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// russh's server settings around the host key.
fn server_config(host_key: russh::keys::PrivateKey) -> russh::server::Config {
    russh::server::Config {
        keys: vec![host_key],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: std::time::Duration::from_millis(300),
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(std::time::Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        preferred: preferred(),
        ..Default::default()
    }
}

/// The algorithms offered, server and link alike: russh's, with [`CIPHERS`].
fn preferred() -> russh::Preferred {
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(CIPHERS),
        ..russh::Preferred::DEFAULT
    }
}

/// One SSH connection's handler.
struct Conn {
    onramp: Arc<OnRamp>,
    cfg: Arc<SshConfig>,
    peer: SocketAddr,
    /// The key the client proved, once authenticated.
    key: Option<AuthorizedKey>,
    /// Its `ssh -R` listeners by port; they stop with the session.
    forwards: std::collections::HashMap<u32, Forward>,
    /// Its `ssh -R /path` sockets by the path asked for.
    unix_forwards: std::collections::HashMap<String, UnixForward>,
    /// Whether a refusal was counted on this session already.
    refused: std::cell::Cell<bool>,
    /// Counted among the sessions not yet logged in, until it logs in.
    startup: Option<crate::core::spine::startups::Startup>,
    /// Told when the client logged in (the login deadline stops).
    logged_in: tokio::sync::watch::Sender<bool>,
    /// Set when the login deadline passed (the session is dropped).
    timed_out: Arc<std::sync::atomic::AtomicBool>,
    /// Its place among the door's live sessions.
    slot: SessionSlot,
    /// Its channels open now (`max_channels`).
    channels: OpenChannels,
}

/// A session's open channels, shared with the answers of channels still
/// being dialed (a refused one is taken out there).
#[derive(Clone, Default)]
struct OpenChannels(Arc<std::sync::Mutex<std::collections::HashSet<ChannelId>>>);

impl OpenChannels {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<ChannelId>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A channel's place in its session's count, given back when its flow
/// ends. (russh tells the handler of a CLOSE only while the channel is in
/// its table: when our side closed first, the client's CLOSE that follows
/// is not reported, and the channel stayed counted until the session
/// ended. An `ssh_link` carrying one short flow after another hit
/// `max_channels` at its 257th.)
struct Release(Option<(OpenChannels, ChannelId)>);

impl Drop for Release {
    fn drop(&mut self) {
        if let Some((open, id)) = self.0.take() {
            open.lock().remove(&id);
        }
    }
}

/// A session that ends without authenticating and without a refusal counted
/// here was still refused: russh turns some attempts away itself (an expired
/// or badly signed certificate), and clients give up or just probe.
impl Drop for Conn {
    fn drop(&mut self) {
        if self.key.is_none() && !self.refused.get() {
            if self.timed_out.load(std::sync::atomic::Ordering::Acquire) {
                self.count(
                    RejectReason::HandshakeTimeout,
                    &format!(
                        "no login within {:?}: the session is closed",
                        self.cfg.door.handshake.timeout
                    ),
                );
            } else {
                self.count(
                    RejectReason::Unauthenticated,
                    "the session ended before authenticating",
                );
            }
        }
    }
}

/// One `ssh -R` forward: its listener, and the name it published (both
/// withdrawn when it is dropped: cancelled, or the session ended).
struct Forward {
    _listener: RunningListener,
    published: Option<(Arc<crate::core::spine::tenant::Tenant>, String)>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some((tenant, name)) = &self.published {
            tenant.vnets.unpublish(name);
        }
    }
}

/// One `ssh -R /path:...` forward: its accept loop and socket file, both
/// gone when it is dropped.
struct UnixForward {
    stop: tokio_util::sync::CancellationToken,
    path: std::path::PathBuf,
}

impl Drop for UnixForward {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The socket a client asks for, if it lies directly in `dir`: a plain
/// file name, or an absolute path whose parent is `dir`.
fn socket_in(dir: &std::path::Path, requested: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(requested);
    let name = p.file_name()?.to_str()?;
    let plain = !name.is_empty() && name != "." && name != ".." && !name.starts_with('.');
    let placed = match p.parent() {
        Some(parent) if parent.as_os_str().is_empty() => true,
        Some(parent) => parent == dir,
        None => false,
    };
    (plain && placed).then(|| dir.join(name))
}

/// The name `ssh -R NAME:port:...` publishes: `NAME.ssh.<tenant>`, when the
/// bind address is a DNS label (not an IP, `localhost`, `*` or empty).
fn published_name(address: &str, tenant: &str) -> Option<String> {
    let label = address.trim();
    let is_label = !label.is_empty()
        && label.len() <= 63
        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !label.starts_with('-')
        && !label.chars().all(|c| c.is_ascii_digit());
    (is_label && !label.eq_ignore_ascii_case("localhost"))
        .then(|| format!("{}.ssh.{tenant}", label.to_ascii_lowercase()))
}

impl Conn {
    /// Counts a login, or a channel of `kind` of the logged-in key.
    /// Takes a channel into the session's count, or counts a refusal.
    fn admit_channel(&self, id: ChannelId) -> bool {
        let mut open = self.channels.lock();
        if open.len() >= self.cfg.max_channels {
            drop(open);
            self.count(
                RejectReason::MaxChannels,
                &format!("{} channels open in one session", self.cfg.max_channels),
            );
            return false;
        }
        open.insert(id);
        true
    }

    /// Whether the session may publish one more `ssh -R` listener.
    fn admit_forward(&self) -> bool {
        if self.forwards.len() + self.unix_forwards.len() >= self.cfg.max_remote_forwards {
            self.count(
                RejectReason::MaxRemoteForwards,
                &format!(
                    "{} `ssh -R` listeners in one session",
                    self.cfg.max_remote_forwards
                ),
            );
            return false;
        }
        true
    }

    fn tally(&self, kind: Option<&str>) {
        let ctx = self.onramp.ctx();
        let m = ctx.metrics.subsystem::<metrics::SshMetrics>();
        let identity = self.key.as_ref().map_or("-", |k| k.identity.as_str());
        match kind {
            None => m.session(&ctx.tenant.name, &ctx.instance, identity),
            Some(k) => m.channel(&ctx.tenant.name, &ctx.instance, identity, k),
        }
    }

    fn count(&self, reason: RejectReason, detail: &str) {
        self.refused.set(true);
        let ctx = self.onramp.ctx();
        ctx.metrics.reject(&ctx.tenant.name, &ctx.instance, reason);
        if let Some(suppressed) = logs::allow("ssh.refused") {
            tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, peer = %self.peer, %reason, detail, suppressed, "SSH refused");
        }
    }

    fn find(&self, key: &russh::keys::PublicKey) -> Option<&AuthorizedKey> {
        self.cfg
            .keys
            .iter()
            .find(|k| !k.cert_authority && k.key.key_data() == key.key_data())
    }

    fn check_key(&mut self, key: &russh::keys::PublicKey) -> Result<AuthorizedKey, RejectReason> {
        let found = self.find(key).ok_or(RejectReason::UnknownKey)?;
        if !found.allowed_from(self.peer.ip()) {
            return Err(RejectReason::FromNotAllowed);
        }
        Ok(found.clone())
    }

    /// What a session channel prints.
    fn banner(&self) -> String {
        let ctx = self.onramp.ctx();
        let key = self.key.as_ref();
        let reach = match key {
            Some(k) if !k.port_forwarding => "nothing: forwarding is off for this key".to_string(),
            Some(k) if !k.permit_open.is_empty() => k
                .permit_open
                .iter()
                .map(|p| match p.port {
                    Some(port) => format!("{}:{port}", p.host),
                    None => format!("{}:*", p.host),
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => format!(
                "what vnet `{}` routes to",
                self.cfg.door.vnet.as_deref().unwrap_or("(the default)")
            ),
        };
        format!(
            "meshgate: tenant {}, identity {}\nno shell here; use ssh -L, -W, -J or -D. This key may reach: {reach}\n",
            ctx.tenant.name,
            key.map(|k| k.identity.as_str()).unwrap_or("-"),
        )
    }

    fn end_session_channel(
        &self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        session.channel_success(channel)?;
        session.data(channel, self.banner())?;
        session.exit_status_request(channel, 0)?;
        session.eof(channel)?;
        session.close(channel)
    }
}

/// The channel's answer: confirmed once the dial succeeded, refused else.
/// For the door's channels and a link's forwarded ones alike.
struct ChannelAnswer<M: From<(ChannelId, russh::ChannelMsg)> + Send> {
    channel: Channel<M>,
    reply: russh::ChannelOpenHandleInner<M>,
    /// The session's count this channel is in; a refused channel leaves it.
    release: Option<(OpenChannels, ChannelId)>,
}

#[async_trait]
impl<M> Answer for ChannelAnswer<M>
where
    M: From<(ChannelId, russh::ChannelMsg)> + Send + Sync + 'static,
{
    async fn answer(
        self: Box<Self>,
        outcome: Result<Option<SocketAddr>, EndReason>,
    ) -> Option<Stream> {
        if outcome.is_err() {
            if let Some((open, id)) = &self.release {
                open.lock().remove(id);
            }
        }
        let ChannelAnswer {
            channel,
            reply,
            release,
        } = *self;
        match outcome {
            Ok(_) => {
                reply.accept().await;
                Some(Stream::io(crate::core::net::guard::Guarded::new(
                    channel.into_stream(),
                    Release(release),
                )))
            }
            Err(
                EndReason::Denied
                | EndReason::Rejected
                | EndReason::Forbidden(_)
                | EndReason::PolicyRevoked,
            ) => {
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                None
            }
            Err(_) => {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                None
            }
        }
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.count(
            RejectReason::Password,
            &format!("user `{user}`: passwords are not accepted"),
        );
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // A certificate is offered as its embedded key, indistinguishable
        // here: with cert-authority lines, let the client sign, and decide
        // in auth_publickey / auth_openssh_certificate.
        if self.cfg.keys.iter().any(|k| k.cert_authority) {
            return Ok(Auth::Accept);
        }
        match self.check_key(offer.public_key) {
            Ok(_) => Ok(Auth::Accept),
            Err(reason) => {
                let fp = offer.public_key.fingerprint(HashAlg::Sha256);
                self.count(reason, &format!("user `{user}`, key {fp}"));
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.check_key(key.public_key) {
            Ok(k) => {
                let ctx = self.onramp.ctx();
                tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, peer = %self.peer, %user, identity = %k.identity, "SSH login");
                self.slot.granted(&k);
                self.key = Some(k);
                self.startup = None;
                let _ = self.logged_in.send(true);
                self.tally(None);
                Ok(Auth::Accept)
            }
            Err(reason) => {
                self.count(reason, &format!("user `{user}`"));
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match keys::check_certificate(&self.cfg.keys, certificate, user, self.peer.ip(), now) {
            Ok(k) => {
                let ctx = self.onramp.ctx();
                tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, peer = %self.peer, %user, identity = %k.identity, key_id = %certificate.key_id(), "SSH login with a certificate");
                self.slot.granted(&k);
                self.key = Some(k);
                self.startup = None;
                let _ = self.logged_in.send(true);
                self.tally(None);
                Ok(Auth::Accept)
            }
            Err(reason) => {
                self.count(
                    reason,
                    &format!("user `{user}`, certificate `{}`", certificate.key_id()),
                );
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.admit_channel(channel.id()) {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.tally(Some("session"));
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.end_session_channel(channel, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.end_session_channel(channel, session)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.lock().remove(&channel);
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(key) = self.key.clone() else {
            return Ok(false);
        };
        if !self.admit_forward() {
            return Ok(false);
        }
        let Ok(requested) = u16::try_from(*port) else {
            return Ok(false);
        };
        if !key.may_listen(requested) {
            let reason = if key.port_forwarding {
                RejectReason::PermitListen
            } else {
                RejectReason::ForwardingDisabled
            };
            self.count(
                reason,
                &format!("{} may not listen on port {requested}", key.identity),
            );
            return Ok(false);
        }
        let on = ListenOn::new(
            SocketAddr::new(self.cfg.remote_forward_ip, requested),
            self.cfg.remote_forward_via.as_ref(),
        );
        let listener = match self.onramp.bind(&on).await {
            Ok(l) => l,
            Err(e) => {
                self.count(RejectReason::RemoteForwardBind, &format!("{on:?}: {e}"));
                return Ok(false);
            }
        };
        let bound = listener.local_addr();
        // `ssh -R web:0:...` publishes `web.ssh.<tenant>` for pipes and
        // SOCKS users of the tenant.
        let ctx = self.onramp.ctx().clone();
        let published = match published_name(address, &ctx.tenant.name) {
            None => None,
            Some(name) => {
                let ip = match bound.ip() {
                    ip if ip.is_unspecified() && ip.is_ipv4() => {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    }
                    ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
                    ip => ip,
                };
                if let Err(e) = ctx.tenant.vnets.publish(&name, ip) {
                    self.count(RejectReason::NameTaken, &format!("{}: {e}", key.identity));
                    return Ok(false);
                }
                tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, identity = %key.identity, %name, %bound, "ssh -R: name published");
                Some((ctx.tenant.clone(), name))
            }
        };
        *port = u32::from(bound.port());
        let handler = Arc::new(Reverse {
            session: session.handle(),
            published: Published::Tcp {
                address: address.to_string(),
                port: *port,
            },
            identity: key.identity.clone(),
            idle_timeout: self.cfg.door.idle_timeout,
        });
        let running = self.onramp.serve(on, listener, handler);
        self.tally(Some("tcpip-forward"));
        tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, identity = %key.identity, %bound, "ssh -R: published");
        self.forwards.insert(
            *port,
            Forward {
                _listener: running,
                published,
            },
        );
        Ok(true)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(key) = self.key.clone() else {
            return Ok(false);
        };
        if !self.admit_forward() {
            return Ok(false);
        }
        if !key.port_forwarding {
            self.count(
                RejectReason::ForwardingDisabled,
                &format!("{} may not publish {socket_path}", key.identity),
            );
            return Ok(false);
        }
        let Some(dir) = self.cfg.streamlocal_dir.clone() else {
            self.count(
                RejectReason::StreamlocalDisabled,
                &format!("{}: no `streamlocal_dir` for {socket_path}", key.identity),
            );
            return Ok(false);
        };
        let Some(path) = socket_in(&dir, socket_path) else {
            self.count(
                RejectReason::StreamlocalPath,
                &format!(
                    "{}: {socket_path} is not a socket name in {}",
                    key.identity,
                    dir.display()
                ),
            );
            return Ok(false);
        };
        let listener = (|| {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let l = tokio::net::UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            Ok::<_, std::io::Error>(l)
        })();
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                self.count(
                    RejectReason::RemoteForwardBind,
                    &format!("{}: {e}", path.display()),
                );
                return Ok(false);
            }
        };
        let handler = Arc::new(Reverse {
            session: session.handle(),
            published: Published::Unix {
                path: socket_path.to_string(),
            },
            identity: key.identity.clone(),
            idle_timeout: self.cfg.door.idle_timeout,
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let (onramp, until) = (self.onramp.clone(), stop.clone());
        let max = self.cfg.door.max_connections;
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = until.cancelled() => return,
                    _ = onramp.stopping().cancelled() => return,
                    a = listener.accept() => a,
                };
                let unix = match accepted {
                    Ok((unix, _)) => unix,
                    Err(e) => {
                        // Out of file descriptors: back off, do not spin.
                        tracing::warn!(error = %e, "ssh -R: Unix socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = onramp.try_admit(max) else {
                    continue;
                };
                let (on, h) = (onramp.clone(), handler.clone());
                onramp.spawn(async move {
                    let conn = Accepted {
                        src: SocketAddr::from(([0, 0, 0, 0], 0)),
                        dst: None,
                    };
                    h.handle(&on, Stream::io(unix), conn).await;
                    drop(slot);
                });
            }
        });
        self.tally(Some("streamlocal-forward"));
        let ctx = self.onramp.ctx();
        tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, identity = %key.identity, path = %path.display(), "ssh -R: Unix socket published");
        self.unix_forwards
            .insert(socket_path.to_string(), UnixForward { stop, path });
        Ok(true)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.unix_forwards.remove(socket_path).is_some())
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.forwards.remove(&port).is_some())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(key) = self.key.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let host = host_to_connect.trim_matches(['[', ']']).to_string();
        if !key.may_open(&host, port) {
            let reason = if key.port_forwarding {
                RejectReason::PermitOpen
            } else {
                RejectReason::ForwardingDisabled
            };
            self.count(
                reason,
                &format!("{} may not open {host}:{port}", key.identity),
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        if !self.admit_channel(channel.id()) {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.tally(Some("direct-tcpip"));
        let release = Some((self.channels.clone(), channel.id()));
        let req = ConnectRequest {
            src: self.peer,
            target: Target::Addr(HostPort { host, port }),
            identity: Some(key.identity.clone()),
            via: RouteVia::Vnet(self.cfg.door.vnet.clone()),
            connect_timeout: self.cfg.door.connect_timeout,
            idle_timeout: self.cfg.door.idle_timeout,
            client_dst: None,
            proxy_protocol: None,
            chosen_by: ChosenBy::Client,
            trace: None,
        };
        connect_channel(&self.onramp, req, channel, reply, release);
        Ok(())
    }
}

/// Takes a channel that asks for a connection through the one path, on its
/// own task (a dial must not hold up the session's other channels); the
/// channel is confirmed once the dial succeeded, refused else.
fn connect_channel<M>(
    onramp: &Arc<OnRamp>,
    req: ConnectRequest,
    channel: Channel<M>,
    reply: russh::ChannelOpenHandleInner<M>,
    release: Option<(OpenChannels, ChannelId)>,
) where
    M: From<(ChannelId, russh::ChannelMsg)> + Send + Sync + 'static,
{
    let on = onramp.clone();
    onramp.spawn(async move {
        on.connect_answering(
            req,
            Box::new(ChannelAnswer {
                channel,
                reply,
                release,
            }),
        )
        .await;
    });
}

/// The connections to one `ssh -R` listener: each becomes a
/// forwarded-tcpip (or forwarded-streamlocal) channel back to the session
/// that published it.
struct Reverse {
    session: russh::server::Handle,
    published: Published,
    identity: String,
    idle_timeout: Option<std::time::Duration>,
}

/// What an `ssh -R` published.
enum Published {
    /// A TCP port (the address the client asked for, the port bound).
    Tcp { address: String, port: u32 },
    /// A Unix socket (the path the client asked for).
    Unix { path: String },
}

impl std::fmt::Display for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Published::Tcp { address, port } => write!(f, "ssh -R {address}:{port}"),
            Published::Unix { path } => write!(f, "ssh -R {path}"),
        }
    }
}

#[async_trait]
impl StreamHandler for Reverse {
    fn max_connections(&self) -> usize {
        1024
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let ctx = onramp.ctx();
        let kind = match self.published {
            Published::Tcp { .. } => "forwarded-tcpip",
            Published::Unix { .. } => "forwarded-streamlocal",
        };
        let channel = async {
            ctx.metrics.subsystem::<metrics::SshMetrics>().channel(
                &ctx.tenant.name,
                &ctx.instance,
                &self.identity,
                kind,
            );
            let channel = match &self.published {
                Published::Tcp { address, port } => {
                    self.session
                        .channel_open_forwarded_tcpip(
                            address.clone(),
                            *port,
                            conn.src.ip().to_string(),
                            u32::from(conn.src.port()),
                        )
                        .await
                }
                Published::Unix { path } => {
                    self.session
                        .channel_open_forwarded_streamlocal(path.clone())
                        .await
                }
            };
            channel
                .map(|ch| Stream::io(ch.into_stream()))
                .map_err(|_| EndReason::DialFailed(DialFailure::Refused))
        };
        onramp
            .carry_published(
                client,
                PublishedConn {
                    src: conn.src,
                    publisher: &self.identity,
                    dst: self.published.to_string(),
                    route: format!("the SSH session of {}", self.identity),
                    idle_timeout: self.idle_timeout,
                },
                channel,
            )
            .await;
    }
}

#[async_trait]
impl StreamHandler for SshDoor {
    fn max_connections(&self) -> usize {
        self.live.get().door.max_connections
    }

    async fn handle(&self, onramp: &Arc<OnRamp>, client: Stream, conn: Accepted) {
        let Some(server) = self.server.read().expect("poisoned").clone() else {
            return;
        };
        let cfg = self.live.get();
        let ctx = onramp.ctx();
        // Deadlines before trust: a cap on sessions not yet logged in (per
        // door, per source, with early random refusal), and a login deadline.
        let startup = match self
            .startups
            .try_start(conn.src.ip(), &cfg.door.handshake.startups)
        {
            Ok(s) => s,
            Err(reason) => {
                ctx.metrics.reject(&ctx.tenant.name, &ctx.instance, reason);
                if let Some(suppressed) = logs::allow("ssh.startups") {
                    tracing::warn!(tenant = %ctx.tenant.name, instance = %ctx.instance, peer = %conn.src, %reason, suppressed, "too many SSH sessions not logged in yet: connection closed");
                }
                return;
            }
        };
        let (slot, revoked) = self.sessions.open();
        let (logged_in, mut login) = tokio::sync::watch::channel(false);
        let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let grace = cfg.door.handshake.timeout;
        let handler = Conn {
            onramp: onramp.clone(),
            cfg,
            peer: conn.src,
            key: None,
            forwards: Default::default(),
            unix_forwards: Default::default(),
            refused: Default::default(),
            startup: Some(startup),
            logged_in,
            timed_out: timed_out.clone(),
            slot,
            channels: Default::default(),
        };
        let stop = onramp.stopping().clone();
        let deadline = async {
            if tokio::time::timeout(grace, login.wait_for(|v| *v))
                .await
                .is_ok()
            {
                // Logged in (or the session is over): no deadline.
                std::future::pending::<()>().await;
            }
            // Marked before the session is closed: its handler counts why.
            timed_out.store(true, std::sync::atomic::Ordering::Release);
        };
        // What ends a session from our side: the door stops, no login in
        // time, or the key that admitted it was taken away.
        let mut end = std::pin::pin!(async {
            tokio::select! {
                _ = stop.cancelled() => "the door stopped",
                _ = deadline => "no login in time",
                _ = revoked.cancelled() => {
                    ctx.metrics.reject(&ctx.tenant.name, &ctx.instance, RejectReason::KeyRevoked);
                    tracing::info!(tenant = %ctx.tenant.name, instance = %ctx.instance, peer = %conn.src, "SSH session ended: its key is no longer authorized");
                    "your key is no longer authorized"
                }
            }
        });
        // The handshake: dropping it closes the connection.
        let running = tokio::select! {
            r = russh::server::run_stream(server, client, handler) => match r {
                Ok(running) => running,
                Err(e) => {
                    tracing::debug!(peer = %conn.src, error = %e, "SSH handshake failed");
                    return;
                }
            },
            _ = &mut end => return,
        };
        // The session runs on its own task: it is told to disconnect, which
        // ends its channels and `-R` listeners with it.
        let handle = running.handle();
        tokio::select! {
            r = running => if let Err(e) = r {
                tracing::debug!(peer = %conn.src, error = %e, "SSH session ended with an error");
            },
            why = &mut end => {
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, why.into(), "en".into())
                    .await;
            }
        }
    }
}

#[async_trait]
impl Door for SshDoor {
    const KIND: &'static str = "ssh";
    type Config = SshConfig;

    fn new(live: Arc<Live<SshConfig>>) -> Self {
        SshDoor {
            live,
            server: RwLock::new(None),
            startups: Default::default(),
            sessions: Default::default(),
            watching: Default::default(),
        }
    }

    fn depends_on(cfg: &SshConfig) -> Vec<String> {
        cfg.door.depends_on(cfg.remote_forward_via.iter())
    }

    fn parse(doc: &Document) -> Result<SshConfig, ConfigError> {
        SshConfig::from_document(doc)
    }

    fn settings(cfg: &SshConfig) -> &DoorSettings {
        &cfg.door
    }

    /// The host key (made on first start), then the listener.
    async fn bind(
        &self,
        onramp: &Arc<OnRamp>,
        cfg: &SshConfig,
        source: &str,
    ) -> Result<Box<dyn StreamListener>, ConfigError> {
        let key = keys::load_or_create_key(&cfg.host_key_file, "SSH host key")
            .map_err(|m| ConfigError::key(source, "host_key_file", m))?;
        let on = Self::listen_on(cfg);
        let l = onramp
            .bind(&on)
            .await
            .map_err(|e| on.bind_error(source, &e))?;
        *self.server.write().expect("poisoned") = Some(Arc::new(server_config(key)));
        if !self
            .watching
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            onramp.spawn(watch_keys_file(
                self.live.clone(),
                self.sessions.clone(),
                onramp.clone(),
            ));
        }
        Ok(l)
    }

    fn must_rebind(old: &SshConfig, new: &SshConfig) -> bool {
        Self::listen_on(old) != Self::listen_on(new) || old.host_key_file != new.host_key_file
    }

    fn reloaded(&self, cfg: &SshConfig) {
        let n = self.sessions.revoke_missing(&cfg.keys);
        if n > 0 {
            tracing::info!(
                sessions = n,
                "SSH sessions of keys no longer authorized are ending"
            );
        }
    }

    fn status(&self, cfg: &SshConfig, onramp: &OnRamp) -> serde_json::Value {
        let fingerprint = self
            .server
            .read()
            .expect("poisoned")
            .as_ref()
            .and_then(|s| {
                s.keys
                    .first()
                    .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
            });
        let mut status = cfg.door.status(onramp);
        status.insert("host_key_fingerprint".into(), fingerprint.into());
        status.insert(
            "keys".into(),
            serde_json::json!(cfg.keys.iter().map(|k| &k.identity).collect::<Vec<_>>()),
        );
        status.into()
    }
}

#[cfg(test)]
mod tests {
    use super::published_name;

    #[test]
    fn unix_sockets_stay_in_their_directory() {
        use super::socket_in;
        let dir = std::path::Path::new("/run/mg/acme");
        assert_eq!(socket_in(dir, "web.sock").unwrap(), dir.join("web.sock"));
        assert_eq!(
            socket_in(dir, "/run/mg/acme/web.sock").unwrap(),
            dir.join("web.sock")
        );
        for bad in [
            "/tmp/x.sock",
            "../x.sock",
            "/run/mg/acme/../x",
            "a/b.sock",
            ".hidden",
            "",
            "/run/mg/acme/sub/x.sock",
        ] {
            assert_eq!(socket_in(dir, bad), None, "{bad}");
        }
    }

    #[test]
    fn bind_labels_become_tenant_names() {
        assert_eq!(
            published_name("web", "acme").as_deref(),
            Some("web.ssh.acme")
        );
        assert_eq!(
            published_name("Web-2", "acme").as_deref(),
            Some("web-2.ssh.acme")
        );
        for no in [
            "",
            "localhost",
            "127.0.0.1",
            "::1",
            "*",
            "0.0.0.0",
            "a.b",
            "-x",
            "8080",
        ] {
            assert_eq!(published_name(no, "acme"), None, "{no}");
        }
    }
}
