//! `kind: wireguard`: a userspace WireGuard interface with its own IP stack.
//!
//! Owns one UDP socket, one boringtun tunnel per peer ([`device`]) and the
//! userspace IP stack that holds this node's VPN addresses (the `userspace`
//! engine: no root, no TUN, no NET_ADMIN). The stack is this instance's
//! virtual network: two tenants (or two instances) with the same addresses
//! never share a stack, a socket or a route.
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
//! `<tenant>-<instance>`) through WireGuard's UAPI socket ([`uapi`]): `wg
//! show`, `wg showconf`, and `wg set`/`wg syncconf`, which change the running
//! document and apply it exactly as a reload would.

pub mod config;
pub mod device;
pub mod metrics;
#[cfg(test)]
mod sim;
pub mod uapi;
pub mod wgquick;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use ipnet::IpNet;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::engine::userspace::{NetError, NetStack, NetTcpListener};
use crate::core::net::dial::{DialError, Dialer};
use crate::core::net::listen::{StreamListener, VirtualNetwork};
use crate::core::net::proxy::Stream;
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};

pub use config::WireGuardConfig;
use device::Device;
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
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = WireGuardConfig::from_document(doc)?;
        Ok(Arc::new(WireGuard(Arc::new(Inner {
            ctx,
            doc: Mutex::new(doc.clone()),
            config: Mutex::new(cfg),
            device: Arc::new(Mutex::new(None)),
            uapi: Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
        }))))
    }
}

/// Interface names in use in this process: `wg` shows one interface per name.
static INTERFACE_NAMES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// A running WireGuard instance.
pub struct WireGuard(Arc<Inner>);

struct Inner {
    ctx: ModuleContext,
    /// The document running now (the store's, or as `wg set` changed it).
    doc: Mutex<Document>,
    config: Mutex<WireGuardConfig>,
    device: Arc<Mutex<Option<Arc<Device>>>>,
    /// The interface name this instance holds, and its UAPI socket if served.
    uapi: Mutex<Option<(String, Option<UapiServer>)>>,
    /// Reloads from the store and `wg set` apply one at a time.
    changing: tokio::sync::Mutex<()>,
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

    fn start_device(
        &self,
        cfg: &WireGuardConfig,
        source: &str,
    ) -> Result<Arc<Device>, ModuleError> {
        let dev = Device::start(
            &self.ctx.tenant.name,
            &self.ctx.instance,
            cfg,
            self.ctx.metrics.clone(),
            self.ctx.flows.clone(),
            self.ctx.instance_metrics.clone(),
        )
        .map_err(|e| {
            ConfigError::key(
                source,
                "listen_port",
                format!("cannot bind UDP port {}: {e}", cfg.listen_port.unwrap_or(0)),
            )
        })?;
        tracing::info!(
            tenant = %self.ctx.tenant.name,
            instance = %self.ctx.instance,
            public_key = %dev.public_key(),
            port = dev.listen_port(),
            addresses = ?cfg.addresses,
            peers = cfg.peers.len(),
            "wireguard interface up"
        );
        Ok(dev)
    }

    /// Takes the interface name and serves the UAPI socket for it, as `cfg`
    /// says. Keeps what it holds when name and directory are unchanged.
    fn claim_interface(
        self: &Arc<Self>,
        cfg: &WireGuardConfig,
        old: Option<&WireGuardConfig>,
        source: &str,
    ) -> Result<(), ModuleError> {
        let name = cfg.interface_name(&self.ctx.tenant.name, &self.ctx.instance);
        let mut held = self.uapi.lock().expect("poisoned");
        let unchanged = held.as_ref().is_some_and(|(n, _)| *n == name)
            && old.is_some_and(|o| o.uapi == cfg.uapi);
        if unchanged {
            return Ok(());
        }
        {
            let mut names = INTERFACE_NAMES.lock().expect("poisoned");
            if let Some(other) = names.get(&name).filter(|o| **o != self.owner()) {
                return Err(ConfigError::key(
                    source,
                    "interface",
                    format!("interface name `{name}` is already used by {other}; give this instance another `interface:`"),
                )
                .into());
            }
            if let Some((prev, _)) = held.as_ref() {
                if *prev != name {
                    names.remove(prev);
                }
            }
            names.insert(name.clone(), self.owner());
        }
        // Drop the old socket before binding the new one (same path when
        // only the directory setting changed).
        *held = Some((name.clone(), None));
        let target: Arc<dyn UapiTarget> = Arc::new(UapiHandle(Arc::downgrade(self)));
        let (dir, explicit) = match &cfg.uapi {
            UapiDir::Off => return Ok(()),
            UapiDir::Auto => (PathBuf::from(uapi::DEFAULT_DIR), false),
            UapiDir::Dir(d) => (d.clone(), true),
        };
        match uapi::serve(&dir, &name, target) {
            Ok(server) => {
                tracing::info!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, interface = %name, socket = %server.path().display(), "wg can inspect and change this interface");
                *held = Some((name, Some(server)));
                Ok(())
            }
            Err(e) if explicit => Err(ConfigError::key(
                source,
                "uapi",
                format!("cannot serve {}/{name}.sock: {e}", dir.display()),
            )
            .into()),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::info!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, interface = %name, dir = %dir.display(), "no UAPI socket (directory not writable): `wg` will not see this interface; set `uapi: <dir>` to choose one");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, interface = %name, error = %e, "no UAPI socket: `wg` will not see this interface; set `interface:` to another name or `uapi: off`");
                Ok(())
            }
        }
    }

    fn release_interface(&self) {
        if let Some((name, server)) = self.uapi.lock().expect("poisoned").take() {
            drop(server);
            let mut names = INTERFACE_NAMES.lock().expect("poisoned");
            if names.get(&name).is_some_and(|o| *o == self.owner()) {
                names.remove(&name);
            }
        }
    }

    async fn start(self: &Arc<Self>) -> Result<(), ModuleError> {
        let cfg = self.config.lock().expect("poisoned").clone();
        let source = self.doc.lock().expect("poisoned").source.clone();
        self.claim_interface(&cfg, None, &source)?;
        match self.start_device(&cfg, &source) {
            Ok(dev) => *self.device.lock().expect("poisoned") = Some(dev),
            Err(e) => {
                self.release_interface();
                return Err(e);
            }
        }
        self.attach(&cfg);
        Ok(())
    }

    /// Applies a new document: peers in place, or a restart of the
    /// interface; on error the old config keeps running.
    async fn apply(self: &Arc<Self>, doc: &Document) -> Result<(), ModuleError> {
        let _one_at_a_time = self.changing.lock().await;
        let new = WireGuardConfig::from_document(doc)?;
        let old = self.config.lock().expect("poisoned").clone();
        self.claim_interface(&new, Some(&old), &doc.source)?;
        let same_interface = new.private_key.as_bytes() == old.private_key.as_bytes()
            && new.listen_port == old.listen_port
            && new.addresses == old.addresses
            && new.mtu == old.mtu
            && new.forward == old.forward;
        match (same_interface, self.device()) {
            (true, Some(dev)) => dev.set_peers(&new.peers),
            (_, old_dev) => {
                // The new interface may need the old one's port: release it first,
                // and bring the old one back if the new one cannot start.
                if let Some(d) = &old_dev {
                    d.shutdown();
                }
                *self.device.lock().expect("poisoned") = None;
                // Give the runtime a moment to drop the old socket.
                tokio::time::sleep(Duration::from_millis(20)).await;
                match self.start_device(&new, &doc.source) {
                    Ok(dev) => *self.device.lock().expect("poisoned") = Some(dev),
                    Err(e) => {
                        let source = self.doc.lock().expect("poisoned").source.clone();
                        let back = self.start_device(&old, &source);
                        *self.device.lock().expect("poisoned") = back.ok();
                        let _ = self.claim_interface(&old, Some(&new), &source);
                        return Err(e);
                    }
                }
            }
        }
        self.attach(&new);
        *self.config.lock().expect("poisoned") = new;
        *self.doc.lock().expect("poisoned") = doc.clone();
        Ok(())
    }

    /// The live state for `wg show`.
    fn uapi_state(&self) -> Option<InterfaceState> {
        let dev = self.device()?;
        let cfg = self.config.lock().expect("poisoned").clone();
        Some(InterfaceState {
            private_key: *cfg.private_key.as_bytes(),
            listen_port: dev.listen_port(),
            peers: dev.uapi_peers(),
        })
    }

    /// `wg set`: the running document with the change, applied as a reload.
    async fn uapi_set(self: &Arc<Self>, req: SetRequest) -> Result<(), UapiError> {
        if req.fwmark.is_some_and(|m| m != 0) {
            tracing::warn!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, "fwmark ignored: meshgate's userspace WireGuard sets no routing marks");
        }
        let current = self.doc.lock().expect("poisoned").clone();
        let value = uapi::apply_set(&current.value, &req)?;
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
        match self.apply(&doc).await {
            Ok(()) => {
                tracing::info!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, peers = req.peers.len(), "configuration changed with `wg` over the UAPI socket, applied as a reload; the config store's document replaces it when that document changes");
                self.ctx
                    .metrics
                    .reload(&self.ctx.tenant.name, &self.ctx.instance, true);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(tenant = %self.ctx.tenant.name, instance = %self.ctx.instance, error = %e, "`wg set` refused; the old config keeps running");
                self.ctx
                    .metrics
                    .reload(&self.ctx.tenant.name, &self.ctx.instance, false);
                Err(UapiError {
                    errno: 22,
                    message: e.to_string(),
                })
            }
        }
    }
}

/// The UAPI server's view of the instance (weak: the instance owns the server).
struct UapiHandle(Weak<Inner>);

#[async_trait]
impl UapiTarget for UapiHandle {
    fn state(&self) -> Option<InterfaceState> {
        self.0.upgrade()?.uapi_state()
    }

    async fn set(&self, req: SetRequest) -> Result<(), UapiError> {
        match self.0.upgrade() {
            Some(inner) => inner.uapi_set(req).await,
            None => Err(UapiError {
                errno: 19,
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
        self.0.apply(doc).await
    }

    async fn drain(&self) {
        // Tunnelled flows belong to the modules that accepted them; the
        // interface keeps running until stop so they can finish.
    }

    async fn stop(&self) {
        let inner = &self.0;
        inner.ctx.tenant.vnets.detach(&inner.ctx.instance);
        inner.release_interface();
        if let Some(d) = inner.device.lock().expect("poisoned").take() {
            d.shutdown();
        }
    }

    fn status(&self) -> serde_json::Value {
        let inner = &self.0;
        let cfg = inner.config.lock().expect("poisoned").clone();
        let interface = inner.uapi.lock().expect("poisoned").as_ref().map(|(n, s)| {
            serde_json::json!({
                "name": n,
                "uapi_socket": s.as_ref().map(|s| s.path().display().to_string()),
            })
        });
        match inner.device() {
            Some(d) => serde_json::json!({
                "public_key": d.public_key(),
                "listen_port": d.listen_port(),
                "addresses": cfg.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "interface": interface,
                "peers": d.peer_status(),
            }),
            None => serde_json::json!({ "state": "down" }),
        }
    }

    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        Some(Arc::new(VnetHandle(self.0.device.clone())))
    }

    fn vnet(&self) -> Option<Arc<dyn VirtualNetwork>> {
        Some(Arc::new(VnetHandle(self.0.device.clone())))
    }
}

/// The instance's network as a capability; follows interface restarts.
struct VnetHandle(Arc<Mutex<Option<Arc<Device>>>>);

impl VnetHandle {
    fn stack(&self) -> io::Result<NetStack> {
        self.0
            .lock()
            .expect("poisoned")
            .as_ref()
            .and_then(|d| d.stack().cloned())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the WireGuard interface is down",
                )
            })
    }
}

struct VnetListener(NetTcpListener);

#[async_trait]
impl StreamListener for VnetListener {
    async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)> {
        let (s, peer) = self.0.accept().await.map_err(io::Error::other)?;
        Ok((Stream::io(s), peer))
    }
    fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }
}

#[async_trait]
impl VirtualNetwork for VnetHandle {
    async fn listen_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn StreamListener>> {
        let l = self.stack()?.listen_tcp(addr).await.map_err(|e| match e {
            NetError::AddrInUse(_) => io::Error::new(io::ErrorKind::AddrInUse, e.to_string()),
            other => io::Error::new(io::ErrorKind::AddrNotAvailable, other.to_string()),
        })?;
        Ok(Box::new(VnetListener(l)))
    }

    fn addresses(&self) -> Vec<IpNet> {
        self.stack()
            .map(|s| s.addresses().to_vec())
            .unwrap_or_default()
    }

    fn peer_address(&self, peer: &str) -> Option<IpAddr> {
        self.0
            .lock()
            .expect("poisoned")
            .as_ref()?
            .peer_address(peer)
    }
}

#[async_trait]
impl Dialer for VnetHandle {
    async fn dial_tcp(&self, target: &HostPort, timeout: Duration) -> Result<Stream, DialError> {
        let ip = target.ip().ok_or_else(|| {
            DialError::NoRoute(format!(
                "{target}: names are not resolved inside a WireGuard network; use the peer's VPN address"
            ))
        })?;
        let stack = self
            .stack()
            .map_err(|e| DialError::NoRoute(e.to_string()))?;
        let dst = SocketAddr::new(ip, target.port);
        match stack.connect_tcp(dst, timeout).await {
            Ok(s) => Ok(Stream::io(s)),
            Err(NetError::Refused(_)) => Err(DialError::Refused(target.to_string())),
            Err(NetError::Timeout(_)) => Err(DialError::Timeout {
                target: target.to_string(),
                timeout,
            }),
            Err(e) => Err(DialError::Io {
                target: target.to_string(),
                source: io::Error::other(e.to_string()),
            }),
        }
    }
}
