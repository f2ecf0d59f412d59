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

pub mod config;
pub mod device;
pub mod wgquick;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use ipnet::IpNet;

use crate::core::addr::HostPort;
use crate::core::config::ConfigError;
use crate::core::dial::{DialError, Dialer};
use crate::core::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};
use crate::core::proxy::Stream;
use crate::core::vnet::{StreamListener, VirtualNetwork};
use crate::modules::netstack::{NetError, NetStack, NetTcpListener};

pub use config::WireGuardConfig;
use device::Device;

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
        Ok(Arc::new(WireGuard {
            ctx,
            source: Mutex::new(doc.source.clone()),
            config: Mutex::new(cfg),
            device: Arc::new(Mutex::new(None)),
        }))
    }
}

/// A running WireGuard instance.
pub struct WireGuard {
    ctx: ModuleContext,
    source: Mutex<String>,
    config: Mutex<WireGuardConfig>,
    device: Arc<Mutex<Option<Arc<Device>>>>,
}

impl WireGuard {
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
}

#[async_trait]
impl Module for WireGuard {
    async fn start(&self) -> Result<(), ModuleError> {
        let cfg = self.config.lock().expect("poisoned").clone();
        let source = self.source.lock().expect("poisoned").clone();
        let dev = self.start_device(&cfg, &source)?;
        *self.device.lock().expect("poisoned") = Some(dev);
        self.attach(&cfg);
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let new = WireGuardConfig::from_document(doc)?;
        let old = self.config.lock().expect("poisoned").clone();
        let same_interface = new.private_key.as_bytes() == old.private_key.as_bytes()
            && new.listen_port == old.listen_port
            && new.addresses == old.addresses
            && new.mtu == old.mtu;
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
                        let back =
                            self.start_device(&old, &self.source.lock().expect("poisoned").clone());
                        *self.device.lock().expect("poisoned") = back.ok();
                        return Err(e);
                    }
                }
            }
        }
        self.attach(&new);
        *self.config.lock().expect("poisoned") = new;
        *self.source.lock().expect("poisoned") = doc.source.clone();
        Ok(())
    }

    async fn drain(&self) {
        // Tunnelled flows belong to the modules that accepted them; the
        // interface keeps running until stop so they can finish.
    }

    async fn stop(&self) {
        self.ctx.tenant.vnets.detach(&self.ctx.instance);
        if let Some(d) = self.device.lock().expect("poisoned").take() {
            d.shutdown();
        }
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.config.lock().expect("poisoned");
        match self.device() {
            Some(d) => serde_json::json!({
                "public_key": d.public_key(),
                "listen_port": d.listen_port(),
                "addresses": cfg.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "peers": d.peer_status(),
            }),
            None => serde_json::json!({ "state": "down" }),
        }
    }

    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        Some(Arc::new(VnetHandle(self.device.clone())))
    }

    fn vnet(&self) -> Option<Arc<dyn VirtualNetwork>> {
        Some(Arc::new(VnetHandle(self.device.clone())))
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
            .map(|d| d.stack().clone())
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
