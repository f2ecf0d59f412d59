//! `kind: wireguard`: a userspace WireGuard interface with its own IP stack.
//!
//! Owns one UDP socket, one boringtun tunnel per peer ([`device`]) and the
//! engine that holds this node's VPN addresses: the vnet's (`engine:` of
//! the vnet it attaches to, else the node's), `userspace` by default (no
//! root, no TUN, no NET_ADMIN) or `kernel` (a TUN in an unnamed namespace,
//! [`crate::core::engine::kernel`]). The engine is this instance's network:
//! two tenants (or two instances) with the same addresses never share a
//! stack, a socket or a route.
//!
//! Capabilities offered to other modules of the tenant:
//! - [`Dialer`]: TCP connections from the node's VPN address to targets in
//!   the network (`via: wg0` in a pipe);
//! - [`VirtualNetwork`]: listening on the node's VPN addresses
//!   (`listen_via: wg0`) and the addresses of named peers (`peer: server`).
//!
//! Reload: a change of peers is applied in place (unchanged peers keep their
//! sessions); a change of key, port, address or MTU restarts the interface,
//! which closes connections carried inside it.
//!
//! Stock `wg` sees the instance as interface `interface:` (default
//! `<tenant>-<instance>`, or when longer than Linux's 15 characters its
//! first 10 and a hash of the whole) through WireGuard's UAPI
//! socket `<uapi dir>/<interface>.sock` ([`uapi`]): `wg show`, `wg
//! showconf`, and `wg set`/`wg syncconf`, which change the running document
//! and apply it exactly as a reload would (one path, `apply_locked`, under
//! one lock). Interface names are unique in the process (a registry of
//! taken names); a socket is claimed before the old one is let go, so a
//! refused change keeps both.

pub mod config;
pub mod core;
pub mod device;
pub mod metrics;
pub mod port;
mod replay;
#[cfg(test)]
mod sim;
pub mod uapi;
pub mod wgquick;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;

use crate::core::config::ConfigError;
use crate::core::engine::{EngineKind, EngineNetwork};
use crate::core::net::dial::Dialer;
use crate::core::net::listen::VirtualNetwork;
use crate::core::spine::module::{
    Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan, Offer,
};

use crate::core::spine::vnet::IMPLICIT_VNET;
pub use config::WireGuardConfig;
use device::{Device, NetChoice};

/// The wait before a device whose task panicked is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Initiation timestamps handed from a device to its successor.
type ReplayFloors = std::collections::HashMap<[u8; 32], replay::Tai64n>;
use uapi::{InterfaceState, SetRequest, UapiDir, UapiError, UapiServer, UapiTarget};

/// Builds WireGuard interfaces.
pub struct WireGuardFactory;

impl ModuleFactory for WireGuardFactory {
    fn kind(&self) -> &'static str {
        "wireguard"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = WireGuardConfig::from_document(doc)?;
        Ok(ModulePlan {
            depends_on: cfg.vnet.into_iter().collect(),
            // An explicit interface name is the node's; the default one
            // (`<tenant>-<instance>`) is checked when the instance starts.
            claims: cfg
                .interface
                .map(|n| format!("WireGuard interface name `{n}`"))
                .into_iter()
                .collect(),
            offers: cfg
                .peers
                .iter()
                .map(|p| Offer {
                    name: format!("peer {}", p.name),
                    unusable: p.address().is_none().then(|| p.no_address_reason()),
                })
                .collect(),
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = WireGuardConfig::from_document(doc)?;
        Ok(Arc::new(WireGuard(Arc::new(Inner {
            ctx,
            doc: Mutex::new(Kept::of(doc)),
            config: Mutex::new(cfg),
            device: Arc::new(Mutex::new(None)),
            uapi: Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
            stopped: tokio_util::sync::CancellationToken::new(),
        }))))
    }
}

/// Interface names in use in this process (name → `tenant/instance`): `wg`
/// shows one interface per name.
static INTERFACE_NAMES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// The interface name an instance holds, and its UAPI socket if served.
struct Claimed {
    name: String,
    /// The `uapi:` setting the socket was served for.
    setting: UapiDir,
    server: Option<UapiServer>,
}

/// A running WireGuard instance.
pub struct WireGuard(Arc<Inner>);

/// The running document, kept as compact JSON text: only `wg set` reads
/// it again, and as a parsed tree it took 7 KiB of an instance with ten
/// peers (100,000 instances: 700 MiB) beside the registry's own copy.
struct Kept {
    source: String,
    json: Box<str>,
}

impl Kept {
    fn of(doc: &Document) -> Kept {
        Kept {
            source: doc.source.clone(),
            json: doc.value.to_string().into_boxed_str(),
        }
    }

    fn document(&self) -> Document {
        Document {
            source: self.source.clone(),
            value: serde_json::from_str(&self.json).expect("JSON this process wrote"),
        }
    }
}

struct Inner {
    ctx: ModuleContext,
    /// The document running now (the store's, or as `wg set` changed it).
    doc: Mutex<Kept>,
    config: Mutex<WireGuardConfig>,
    device: Arc<Mutex<Option<Arc<Device>>>>,
    /// The interface name this instance holds, and its UAPI socket.
    uapi: Mutex<Option<Claimed>>,
    /// Reloads from the store and `wg set` apply one at a time.
    changing: tokio::sync::Mutex<()>,
    /// The instance is stopping: a recovery in progress gives up.
    stopped: tokio_util::sync::CancellationToken,
}

impl Inner {
    fn owner(&self) -> String {
        format!("{}/{}", self.ctx.tenant.name, self.ctx.instance)
    }

    /// Publishes the peers' allowed IPs as routes to this instance in its vnet.
    fn attach(&self, cfg: &WireGuardConfig) {
        self.ctx
            .tenant
            .vnets
            .attach(&self.ctx.instance, cfg.vnet.as_deref(), &cfg.routed_nets());
    }

    fn device(&self) -> Option<Arc<Device>> {
        self.device.lock().expect("poisoned").clone()
    }

    /// An interface without `address:` is a link of its vnet's stack;
    /// one with addresses runs its own engine.
    fn net_choice(&self, cfg: &WireGuardConfig, source: &str) -> Result<NetChoice, ModuleError> {
        if !cfg.addresses.is_empty() {
            return Ok(NetChoice::Own(self.engine_kind(cfg)));
        }
        let vnet = cfg.vnet.as_deref().unwrap_or(IMPLICIT_VNET);
        match self.ctx.tenant.vnets.stack_for(cfg.vnet.as_deref()) {
            Some(stack) => Ok(NetChoice::Vnet(stack)),
            None => Err(ConfigError::key(
                source,
                "address",
                format!("missing, and vnet `{vnet}` has no `address:` of its own: give this interface an address, or the vnet one (its stack is then shared by the interfaces attached to it)"),
            )
            .into()),
        }
    }

    /// The engine this instance's vnet asks for.
    fn engine_kind(&self, cfg: &WireGuardConfig) -> EngineKind {
        self.ctx.tenant.vnets.engine_for(cfg.vnet.as_deref())
    }

    async fn start_device(
        &self,
        cfg: &WireGuardConfig,
        source: &str,
        replay_floors: ReplayFloors,
    ) -> Result<Arc<Device>, ModuleError> {
        let engine = self.engine_kind(cfg);
        let net = self.net_choice(cfg, source)?;
        let dev = Device::start(
            &self.ctx.tenant.name,
            &self.ctx.instance,
            cfg,
            net,
            self.ctx.metrics.clone(),
            self.ctx.flows.clone(),
            self.ctx.instance_metrics.clone(),
            replay_floors,
        )
        .await
        .map_err(|e| -> ModuleError {
            match e {
                device::StartError::Bind { .. } => {
                    ConfigError::key(source, "listen_port", e.to_string()).into()
                }
                device::StartError::SameKey { .. } => {
                    ConfigError::key(source, "private_key", e.to_string()).into()
                }
                device::StartError::Engine(e) => ModuleError::Runtime(e.to_string()),
            }
        })?;
        tracing::info!(
            tenant = %self.ctx.tenant.name,
            instance = %self.ctx.instance,
            public_key = %dev.core().public_key(),
            port = dev.listen_port(),
            %engine,
            addresses = ?cfg.addresses,
            peers = cfg.peers.len(),
            "wireguard interface up"
        );
        Ok(dev)
    }

    /// Starts the device right after one that held port `released` was shut
    /// down: its socket closes once its tasks notice, so binding that port
    /// again is retried for up to a second.
    async fn start_device_after(
        &self,
        cfg: &WireGuardConfig,
        source: &str,
        released: Option<u16>,
        replay_floors: &ReplayFloors,
    ) -> Result<Arc<Device>, ModuleError> {
        let same_port = cfg.listen_port.is_some() && cfg.listen_port == released;
        let mut tries = if same_port { 50 } else { 1 };
        loop {
            tries -= 1;
            match self.start_device(cfg, source, replay_floors.clone()).await {
                Err(ModuleError::Config(_)) if tries > 0 => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                r => return r,
            }
        }
    }

    /// Takes the interface name and serves the UAPI socket for it, as `cfg`
    /// says. Keeps what it holds when name and setting are unchanged, and
    /// the socket itself when only the setting changed. On error nothing
    /// changes: the old name and socket stay.
    fn claim_interface(
        self: &Arc<Self>,
        cfg: &WireGuardConfig,
        source: &str,
    ) -> Result<(), ModuleError> {
        let owner = self.owner();
        let mut held = self.uapi.lock().expect("poisoned");
        let candidates = cfg.interface_names(&self.ctx.tenant.name, &self.ctx.instance);
        // The first candidate free or ours (the one held stays while it is
        // still a candidate); if all are taken, the first, which fails below.
        let name = {
            let names = INTERFACE_NAMES.lock().expect("poisoned");
            let free = |n: &&String| names.get(*n).is_none_or(|o| *o == owner);
            held.as_ref()
                .map(|c| &c.name)
                .filter(|n| candidates.contains(n))
                .or_else(|| candidates.iter().find(free))
                .unwrap_or(&candidates[0])
                .clone()
        };
        if held
            .as_ref()
            .is_some_and(|c| c.name == name && c.setting == cfg.uapi)
        {
            return Ok(());
        }
        let renamed = held.as_ref().is_none_or(|c| c.name != name);
        if renamed {
            let mut names = INTERFACE_NAMES.lock().expect("poisoned");
            if let Some(other) = names.get(&name).filter(|o| **o != owner) {
                return Err(ConfigError::key(
                    source,
                    "interface",
                    format!("interface name `{name}` is already used by {other} (tenant/instance); give one of them another `interface:`"),
                )
                .into());
            }
            names.insert(name.clone(), owner.clone());
        }
        let unreserve = || {
            if renamed {
                INTERFACE_NAMES.lock().expect("poisoned").remove(&name);
            }
        };
        let (tenant, instance) = (&self.ctx.tenant.name, &self.ctx.instance);
        let server = match uapi_dir(&cfg.uapi) {
            None => None,
            Some((dir, explicit)) => {
                let path = dir.join(format!("{name}.sock"));
                let same_socket = held
                    .as_ref()
                    .and_then(|c| c.server.as_ref())
                    .is_some_and(|s| s.path() == path);
                if same_socket {
                    held.as_mut().and_then(|c| c.server.take())
                } else {
                    let target: Arc<dyn UapiTarget> = Arc::new(UapiHandle(Arc::downgrade(self)));
                    match uapi::serve(&dir, &name, target) {
                        Ok(server) => {
                            tracing::info!(%tenant, %instance, interface = %name, socket = %server.path().display(), "`wg` can inspect and change this interface");
                            Some(server)
                        }
                        Err(e) if explicit => {
                            unreserve();
                            return Err(ConfigError::key(
                                source,
                                "uapi",
                                format!("cannot serve the UAPI socket: {e}"),
                            )
                            .into());
                        }
                        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                            tracing::warn!(%tenant, %instance, interface = %name, error = %e, "no UAPI socket: `wg` will not see this interface; give it another `interface:`, or set `uapi: off`");
                            None
                        }
                        Err(e) => {
                            tracing::info!(%tenant, %instance, interface = %name, error = %e, "no UAPI socket (`uapi: auto` and the directory is not usable): `wg` will not see this interface; set `uapi:` to a writable directory to serve one");
                            None
                        }
                    }
                }
            }
        };
        if let Some(old) = held.take() {
            if old.name != name {
                let mut names = INTERFACE_NAMES.lock().expect("poisoned");
                if names.get(&old.name) == Some(&owner) {
                    names.remove(&old.name);
                }
            }
        }
        *held = Some(Claimed {
            name,
            setting: cfg.uapi.clone(),
            server,
        });
        Ok(())
    }

    fn release_interface(&self) {
        if let Some(old) = self.uapi.lock().expect("poisoned").take() {
            let mut names = INTERFACE_NAMES.lock().expect("poisoned");
            if names.get(&old.name).is_some_and(|o| *o == self.owner()) {
                names.remove(&old.name);
            }
        }
    }

    async fn start(self: &Arc<Self>) -> Result<(), ModuleError> {
        let cfg = self.config.lock().expect("poisoned").clone();
        let source = self.doc.lock().expect("poisoned").source.clone();
        self.claim_interface(&cfg, &source)?;
        match self.start_device(&cfg, &source, ReplayFloors::new()).await {
            Ok(dev) => self.install(Some(dev)),
            Err(e) => {
                self.release_interface();
                return Err(e);
            }
        }
        self.attach(&cfg);
        Ok(())
    }

    /// Applies a new document: peers in place, or a restart of the
    /// interface; on error the old config keeps running. The one path for
    /// a reload from the store and a `wg set`; the caller holds `changing`.
    async fn apply_locked(
        self: &Arc<Self>,
        _one_at_a_time: &tokio::sync::MutexGuard<'_, ()>,
        doc: &Document,
    ) -> Result<(), ModuleError> {
        let new = WireGuardConfig::from_document(doc)?;
        let old = self.config.lock().expect("poisoned").clone();
        let old_source = self.doc.lock().expect("poisoned").source.clone();
        self.claim_interface(&new, &doc.source)?;
        let same_interface = new.private_key.as_bytes() == old.private_key.as_bytes()
            && new.listen_port == old.listen_port
            && new.share_port == old.share_port
            && new.addresses == old.addresses
            && new.mtu == old.mtu
            && new.forward == old.forward
            && new.tcp_keepalive == old.tcp_keepalive
            && new.tcp_timeout == old.tcp_timeout
            && new.congestion_control == old.congestion_control
            && new.vnet == old.vnet
            && self.device().and_then(|d| d.engine().map(|e| e.kind()))
                == Some(self.engine_kind(&new));
        match (same_interface, self.device()) {
            (true, Some(dev)) => dev.core().set_peers(&new.peers),
            (_, old_dev) => {
                // The new interface may need the old one's port: release it first,
                // and bring the old one back if the new one cannot start.
                let released = old_dev.as_ref().map(|d| d.listen_port());
                // Old initiations stay refused by the new peers.
                let floors = old_dev
                    .as_ref()
                    .map(|d| d.core().replay_floors())
                    .unwrap_or_default();
                if let Some(d) = old_dev {
                    d.shutdown();
                    // Its socket closes with the last reference: this one,
                    // the slot's, and its tasks' once they see the shutdown.
                    drop(d);
                }
                *self.device.lock().expect("poisoned") = None;
                match self
                    .start_device_after(&new, &doc.source, released, &floors)
                    .await
                {
                    Ok(dev) => self.install(Some(dev)),
                    Err(e) => {
                        let back = self
                            .start_device_after(&old, &old_source, released, &floors)
                            .await;
                        if let Err(b) = &back {
                            tracing::error!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, error = %b, "the old interface cannot come back either: down until the next change");
                        }
                        self.install(back.ok());
                        let _ = self.claim_interface(&old, &old_source);
                        return Err(e);
                    }
                }
            }
        }
        self.attach(&new);
        *self.config.lock().expect("poisoned") = new;
        *self.doc.lock().expect("poisoned") = Kept::of(doc);
        Ok(())
    }

    /// Makes `dev` the running device, and watches it: if one of its tasks
    /// panics, [`Inner::recover`] replaces it.
    fn install(self: &Arc<Self>, dev: Option<Arc<Device>>) {
        if let Some(d) = &dev {
            #[cfg(test)]
            tests::INSTALLED.lock().unwrap().push(Arc::downgrade(d));
            let failed = d.failed();
            let (inner, dead) = (Arc::downgrade(self), Arc::downgrade(d));
            tokio::spawn(async move {
                let Some(why) = failed.await else { return };
                if let Some(inner) = inner.upgrade() {
                    inner.recover(dead, why).await;
                }
            });
        }
        *self.device.lock().expect("poisoned") = dev;
    }

    /// A task of the running device panicked: its locks may be poisoned and
    /// its state half-changed, so the node reports the fault (`/readyz` says
    /// 503) and a new device starts from the running config, after 1 s,
    /// then again with a doubling delay (at most a minute) while it fails.
    async fn recover(self: Arc<Self>, dead: Weak<Device>, why: String) {
        self.ctx
            .failed(&format!("a WireGuard data plane task panicked: {why}"));
        let guard = self.changing.lock().await;
        let current = self.device();
        if !current
            .as_ref()
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), dead.as_ptr()))
        {
            // Replaced by a reload meanwhile, or stopped.
            self.ctx.recovered(false);
            return;
        }
        let old = current.expect("checked above");
        let released = Some(old.listen_port());
        // What it still holds may sit behind a poisoned lock.
        let floors = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let floors = old.core().replay_floors();
            old.shutdown();
            floors
        }))
        .unwrap_or_default();
        *self.device.lock().expect("poisoned") = None;
        drop(old);
        let cfg = self.config.lock().expect("poisoned").clone();
        let source = self.doc.lock().expect("poisoned").source.clone();
        let mut delay = RESTART_DELAY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stopped.cancelled() => {
                    self.ctx.recovered(false);
                    return;
                }
            }
            match self
                .start_device_after(&cfg, &source, released, &floors)
                .await
            {
                Ok(dev) if self.stopped.is_cancelled() => {
                    dev.shutdown();
                    self.ctx.recovered(false);
                    return;
                }
                Ok(dev) => {
                    self.install(Some(dev));
                    self.ctx.recovered(true);
                    drop(guard);
                    return;
                }
                Err(e) => {
                    tracing::error!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, error = %e, retry_in = ?delay * 2, "the WireGuard interface cannot restart");
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// A reload from the config store.
    async fn reload(self: &Arc<Self>, doc: &Document) -> Result<(), ModuleError> {
        let guard = self.changing.lock().await;
        self.apply_locked(&guard, doc).await
    }

    /// The live state for `wg show`.
    fn uapi_state(&self) -> Result<InterfaceState, UapiError> {
        let dev = self.device().ok_or_else(|| UapiError {
            errno: uapi::errno::ENODEV,
            message: "the interface is down".into(),
        })?;
        let private_key = *self.config.lock().expect("poisoned").private_key.as_bytes();
        Ok(InterfaceState {
            private_key,
            listen_port: dev.listen_port(),
            peers: dev.core().uapi_peers(),
        })
    }

    /// `wg set`: the running document with the change, applied as a reload.
    async fn uapi_set(self: &Arc<Self>, mut req: SetRequest) -> Result<(), UapiError> {
        let (tenant, instance) = (&self.ctx.tenant.name, &self.ctx.instance);
        // From reading the running document to applying the next one, no
        // other change (a reload, another `wg set`) may come between.
        let guard = self.changing.lock().await;
        let current = self.doc.lock().expect("poisoned").document();
        let cfg = self.config.lock().expect("poisoned").clone();
        if req.fwmark.is_some_and(|m| m != 0) {
            tracing::warn!(%tenant, %instance, "fwmark ignored: meshgate's userspace WireGuard sets no routing marks");
        }
        // What `wg showconf` printed, given back (`wg syncconf`), is no
        // change: the same key, the port the interface has now (even when
        // the document leaves it ephemeral).
        if req.private_key.as_ref() == Some(cfg.private_key.as_bytes()) {
            req.private_key = None;
        }
        if req.listen_port.is_some() && req.listen_port == self.device().map(|d| d.listen_port()) {
            req.listen_port = None;
        }
        let value = uapi::apply_set(&current.value, &req, &cfg.public_key.0)?;
        if value == current.value {
            tracing::debug!(%tenant, %instance, "`wg set` changes nothing");
            return Ok(());
        }
        let base = current
            .source
            .split(" + wg set")
            .next()
            .unwrap_or(&current.source)
            .to_string();
        let doc = Document {
            source: format!("{base} + wg set"),
            value,
        };
        let restart = req.private_key.is_some() || req.listen_port.is_some();
        match self.apply_locked(&guard, &doc).await {
            Ok(()) => {
                tracing::info!(%tenant, %instance, peer_sections = req.peers.len(), replace_peers = req.replace_peers, restart, "configuration changed with `wg` over the UAPI socket, applied as a reload; the config store's document replaces it when that document changes");
                self.ctx.metrics.reload(tenant, instance, true);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(%tenant, %instance, error = %e, "`wg set` refused; the old config keeps running");
                self.ctx.metrics.reload(tenant, instance, false);
                let errno = match &e {
                    ModuleError::Config(c) if c.key.as_deref() == Some("listen_port") => {
                        uapi::errno::EADDRINUSE
                    }
                    _ => uapi::errno::EINVAL,
                };
                Err(UapiError {
                    errno,
                    message: e.to_string(),
                })
            }
        }
    }
}

/// The directory a setting serves its socket in, and whether it was given
/// explicitly (then failing to serve is an error, not a log line).
fn uapi_dir(setting: &UapiDir) -> Option<(PathBuf, bool)> {
    match setting {
        UapiDir::Off => None,
        UapiDir::Auto => Some((PathBuf::from(uapi::DEFAULT_DIR), false)),
        UapiDir::Dir(d) => Some((d.clone(), true)),
    }
}

/// The UAPI server's view of the instance (weak: the instance owns the server).
struct UapiHandle(Weak<Inner>);

#[async_trait]
impl UapiTarget for UapiHandle {
    fn state(&self) -> Result<InterfaceState, UapiError> {
        match self.0.upgrade() {
            Some(inner) => inner.uapi_state(),
            None => Err(UapiError {
                errno: uapi::errno::ENODEV,
                message: "the interface is gone".into(),
            }),
        }
    }

    async fn set(&self, req: SetRequest) -> Result<(), UapiError> {
        match self.0.upgrade() {
            Some(inner) => inner.uapi_set(req).await,
            None => Err(UapiError {
                errno: uapi::errno::ENODEV,
                message: "the interface is gone".into(),
            }),
        }
    }
}

#[async_trait]
impl Module for WireGuard {
    async fn start(&self) -> Result<(), ModuleError> {
        self.0.start().await
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        self.0.reload(doc).await
    }

    async fn drain(&self) {
        // Tunnelled flows belong to the modules that accepted them; the
        // interface keeps running until stop so they can finish.
    }

    async fn stop(&self) {
        let inner = &self.0;
        inner.stopped.cancel();
        inner.ctx.tenant.vnets.detach(&inner.ctx.instance);
        inner.release_interface();
        if let Some(d) = inner.device.lock().expect("poisoned").take() {
            d.shutdown();
            d.core().forget_metrics();
        }
    }

    fn status(&self) -> serde_json::Value {
        let inner = &self.0;
        let cfg = inner.config.lock().expect("poisoned").clone();
        let interface = inner.uapi.lock().expect("poisoned").as_ref().map(|c| {
            serde_json::json!({
                "name": c.name,
                "uapi_socket": c.server.as_ref().map(|s| s.path().display().to_string()),
            })
        });
        match inner.device() {
            Some(d) => serde_json::json!({
                "engine": d.engine().map(|e| e.kind()),
                "public_key": d.core().public_key(),
                "listen_port": d.listen_port(),
                "addresses": cfg.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "interface": interface,
                "peers": d.core().peer_status(),
            }),
            None => serde_json::json!({ "state": "down" }),
        }
    }

    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        Some(Arc::new(network(&self.0.device)))
    }

    fn vnet(&self) -> Option<Arc<dyn VirtualNetwork>> {
        Some(Arc::new(network(&self.0.device)))
    }
}

/// The instance's network as a capability: its engine (or its vnet's
/// stack) as running now, so interface restarts are followed.
fn network(slot: &Arc<Mutex<Option<Arc<Device>>>>) -> EngineNetwork {
    let (engines, peers) = (slot.clone(), slot.clone());
    EngineNetwork::new(
        Arc::new(move || {
            engines
                .lock()
                .expect("poisoned")
                .as_ref()
                .and_then(|d| d.engine())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the WireGuard interface is down",
                    )
                })
        }),
        Some(Arc::new(move |name: &str| {
            peers
                .lock()
                .expect("poisoned")
                .as_ref()?
                .core()
                .peer_address(name)
        })),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::core::keys::PrivateKey;
    use crate::core::metrics::Metrics;
    use crate::core::spine::flow::FlowTable;
    use crate::core::spine::registry::Registry;

    async fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicked_data_plane_restarts_and_readiness_says_so_meanwhile() {
        let store = Arc::new(configstore::MemStore::new());
        let peer = PrivateKey::generate().public_key().to_string();
        let key = PrivateKey::generate();
        let public = key.public_key().to_string();
        store.set(
            "t",
            "wg0",
            serde_json::json!({
                "kind": "wireguard",
                "private_key": key.to_base64(),
                "address": "10.192.0.1/24",
                "uapi": "off",
                "peers": [{"name": "p", "public_key": peer, "allowed_ips": ["10.192.0.2/32"]}],
            }),
        );
        let metrics = Arc::new(Metrics::new());
        let reg = Arc::new(Registry::new(
            store,
            vec![Arc::new(super::WireGuardFactory)],
            metrics.clone(),
            Arc::new(FlowTable::new(vec![])),
        ));
        reg.start().await.unwrap();
        assert!(reg.is_ready());
        let module = reg.find("t", "wg0").unwrap();
        let device = || {
            let status = module.status();
            (
                status["listen_port"].as_u64(),
                status["peers"].as_array().map(Vec::len),
            )
        };
        let before = device();
        assert_eq!(before.1, Some(1));
        let wg = installed(&public);
        wg.core().poison_a_peer();
        // The timer task meets the poisoned lock within a tick: the node
        // says it is not ready, and why.
        assert!(until(Duration::from_secs(2), || !reg.is_ready()).await);
        let faults = reg.faults();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].0, "t/wg0");
        assert!(faults[0].1.contains("panicked"), "{faults:?}");
        // A fresh device from the running config, a second later.
        assert!(until(Duration::from_secs(5), || reg.is_ready()).await);
        let after = installed(&public);
        assert!(!Arc::ptr_eq(&wg, &after), "the same device");
        assert_eq!(device().1, Some(1), "the peers came back");
        assert!(metrics
            .encode()
            .contains(r#"meshgate_module_restarts_total{tenant="t",instance="wg0"} 1"#));
        reg.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn an_interface_without_address_needs_a_vnet_with_one() {
        let store = Arc::new(configstore::MemStore::new());
        store.set("t", "plain", serde_json::json!({"kind": "vnet"}));
        store.set(
            "t",
            "wg0",
            serde_json::json!({
                "kind": "wireguard",
                "private_key": PrivateKey::generate().to_base64(),
                "vnet": "plain",
                "uapi": "off",
            }),
        );
        let reg = Arc::new(Registry::new(
            store.clone(),
            vec![
                Arc::new(super::WireGuardFactory),
                Arc::new(crate::modules::vnet::VnetFactory),
            ],
            Arc::new(Metrics::new()),
            Arc::new(FlowTable::new(vec![])),
        ));
        // The vnet starts; the interface is refused, saying why.
        reg.start().await.unwrap();
        let errors: Vec<String> = reg
            .refused()
            .into_iter()
            .map(|(who, why)| format!("{who}: {why}"))
            .collect();
        assert!(
            errors.iter().any(|e| e.starts_with("t/wg0: ")
                && e.contains("key `address`")
                && e.contains("vnet `plain` has no `address:`")),
            "{errors:?}"
        );
        assert!(reg.find("t", "plain").is_some() && reg.find("t", "wg0").is_none());
        reg.shutdown(Duration::from_secs(1)).await;
        // Given one, the interface links to the vnet's stack.
        store.set(
            "t",
            "plain",
            serde_json::json!({"kind": "vnet", "address": "10.70.0.1/24"}),
        );
        let reg = Arc::new(Registry::new(
            store,
            vec![
                Arc::new(super::WireGuardFactory),
                Arc::new(crate::modules::vnet::VnetFactory),
            ],
            Arc::new(Metrics::new()),
            Arc::new(FlowTable::new(vec![])),
        ));
        reg.start().await.unwrap();
        let status = reg.find("t", "plain").unwrap().status();
        assert_eq!(status["stack"]["links"], serde_json::json!(["wg0"]));
        reg.shutdown(Duration::from_secs(1)).await;
    }

    /// Devices as they were installed (tests run side by side: each finds
    /// its own by public key).
    pub(super) static INSTALLED: std::sync::Mutex<Vec<std::sync::Weak<super::Device>>> =
        std::sync::Mutex::new(Vec::new());

    /// The latest device installed with this public key, if alive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_port_takes_the_instances_that_opt_in_and_one_key_once() {
        use super::device::{Device, NetChoice, StartError};
        let port = std::net::UdpSocket::bind("[::]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = |key: &PrivateKey, share: bool| {
            super::WireGuardConfig::from_document(&configstore::Document {
                source: "tenants/t/wg0.yaml".into(),
                value: serde_json::json!({
                    "kind": "wireguard", "private_key": key.to_base64(),
                    "listen_port": port, "share_port": share, "address": "10.192.0.1/24",
                }),
            })
            .unwrap()
        };
        let metrics = Arc::new(Metrics::new());
        let start = |tenant: &'static str, cfg: super::WireGuardConfig| {
            let metrics = metrics.clone();
            async move {
                Device::start(
                    tenant,
                    "wg0",
                    &cfg,
                    NetChoice::Own(crate::core::engine::EngineKind::Userspace),
                    metrics.clone(),
                    Arc::new(FlowTable::new(vec![])),
                    metrics.instance(tenant, "wg0"),
                    Default::default(),
                )
                .await
            }
        };
        let members = || {
            let gauge = format!("meshgate_wg_port_members{{port=\"{port}\"}} ");
            metrics
                .encode()
                .lines()
                .find_map(|l| l.strip_prefix(&gauge)?.parse::<f64>().ok())
        };
        let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
        let a = start("t1", cfg(&k1, true)).await.unwrap();
        let b = start("t2", cfg(&k2, true)).await.unwrap();
        assert_eq!((a.listen_port(), b.listen_port()), (port, port));
        assert_eq!(members(), Some(2.0));
        // The same key twice: its initiations could not be told apart.
        match start("t3", cfg(&k1, true)).await {
            Err(e @ StartError::SameKey { .. }) => {
                assert!(e.to_string().contains("same private key"), "{e}")
            }
            other => panic!("a second instance with k1 on the port: {:?}", other.err()),
        }
        // An instance that does not opt in finds the port taken.
        let k3 = PrivateKey::generate();
        assert!(matches!(
            start("t4", cfg(&k3, false)).await,
            Err(StartError::Bind { .. })
        ));
        assert_eq!(members(), Some(2.0));
        // Members leave on shutdown; with the last one the port is free.
        a.shutdown();
        assert_eq!(members(), Some(1.0));
        b.shutdown();
        drop((a, b));
        assert!(
            until(Duration::from_secs(2), || std::net::UdpSocket::bind((
                "::", port
            ))
            .is_ok())
            .await,
            "the port was let go"
        );
        assert_eq!(members(), None, "the port's series went with it");
    }

    fn installed(public: &str) -> Arc<super::Device> {
        INSTALLED
            .lock()
            .unwrap()
            .iter()
            .rev()
            .filter_map(std::sync::Weak::upgrade)
            .find(|d| d.core().public_key() == public)
            .expect("a running device")
    }
}
