//! A vnet's own IP stack, shared by every link attached to the vnet.
//!
//! A vnet with `address:` owns one engine ([`crate::core::engine`]) that
//! holds those addresses. The modules that carry the vnet's packets (the
//! WireGuard instances attached with `vnet:`, e.g. one listening port per
//! site) are its **links**: each hands the stack what its peers send to
//! the vnet's addresses ([`VnetStack::inject`]), and the stack sends each
//! packet it emits to the link whose routes (its peers' allowed IPs) hold
//! the destination, longest prefix first ([`Link::send_ip`]). So a service
//! listening in the vnet (`listen_via: <vnet>`) is reachable from the peers
//! of every link, a dial reaches any site, and a link forwards what is for
//! another link's peers to it ([`VnetStack::forward`]): sites reach each
//! other through the vnet.
//!
//! The engine may be replaced (the vnet's address, MTU or engine changed):
//! links keep their place and use the new engine for the next packet;
//! connections of the old one end, and listeners in it bind again.

use std::net::IpAddr;
use std::sync::{Arc, RwLock, Weak};

use ipnet::IpNet;

use crate::core::engine::{self, EngineConfig, EngineError, EngineKind, IpEngine, PacketSink};
use crate::core::net::prefix::PrefixTable;

/// A module that carries a vnet's packets to and from its peers.
pub trait Link: Send + Sync + 'static {
    /// Encrypts and sends one IP packet to the peer whose allowed IPs hold
    /// its destination; drops (and counts) it if none does. It may be held
    /// back until [`Link::flush`].
    fn send_ip(&self, packet: &[u8]);
    /// Sends what [`Link::send_ip`] held back.
    fn flush(&self) {}
    /// The vnet's engine restarted with other addresses: a link that
    /// answers from them (ICMP errors) or decides by them (forwarding
    /// between its peers when the vnet has a subnet) takes the new ones.
    fn addresses_changed(&self, _addresses: &[IpNet]) {}
}

struct Attached {
    instance: String,
    link: Weak<dyn Link>,
}

#[derive(Default)]
struct Links {
    attached: Vec<Attached>,
    /// Network → index into `attached` (the first link to claim one wins).
    routes: PrefixTable<usize>,
    /// Each link's networks, by instance.
    nets: Vec<Vec<IpNet>>,
}

impl Links {
    fn rebuild(&mut self) {
        self.routes = self
            .nets
            .iter()
            .enumerate()
            .flat_map(|(i, nets)| nets.iter().map(move |n| (*n, i)))
            .collect();
    }

    fn route(&self, dst: IpAddr) -> Option<(&str, Arc<dyn Link>)> {
        let i = self.routes.lookup(dst)?;
        let a = &self.attached[*i];
        Some((a.instance.as_str(), a.link.upgrade()?))
    }
}

/// The running engine and the addresses it holds.
struct Running {
    engine: Arc<dyn IpEngine>,
    local: Vec<IpAddr>,
}

/// One vnet's IP stack and its links.
pub struct VnetStack {
    /// `tenant/vnet`, for logs.
    label: String,
    running: RwLock<Option<Running>>,
    links: RwLock<Links>,
}

impl std::fmt::Debug for VnetStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VnetStack")
            .field("vnet", &self.label)
            .field("links", &self.linked())
            .finish()
    }
}

/// Hands what the engine emits to the stack's links.
struct Sink(Weak<VnetStack>);

impl PacketSink for Sink {
    fn send(&self, packet: &[u8]) {
        if let Some(stack) = self.0.upgrade() {
            stack.dispatch(packet);
        }
    }

    fn flush(&self) {
        if let Some(stack) = self.0.upgrade() {
            // Under the read lock (a flush never changes the links): no
            // list built per batch.
            let links = stack.links.read().expect("vnet stack poisoned");
            for l in links.attached.iter().filter_map(|a| a.link.upgrade()) {
                l.flush();
            }
        }
    }
}

impl VnetStack {
    /// Starts the vnet's engine of `kind` for `cfg`.
    pub async fn start(kind: EngineKind, cfg: &EngineConfig) -> Result<Arc<Self>, EngineError> {
        let stack = Arc::new(VnetStack {
            label: cfg.label.clone(),
            running: RwLock::new(None),
            links: RwLock::new(Links::default()),
        });
        stack.restart(kind, cfg).await?;
        Ok(stack)
    }

    /// Replaces the engine by a new one of `kind` for `cfg` (the old one's
    /// connections end); on error the old one keeps running.
    pub async fn restart(
        self: &Arc<Self>,
        kind: EngineKind,
        cfg: &EngineConfig,
    ) -> Result<(), EngineError> {
        let sink: Arc<dyn PacketSink> = Arc::new(Sink(Arc::downgrade(self)));
        let engine = engine::start(kind, cfg, sink).await?;
        let addresses = engine.addresses();
        let local = addresses.iter().map(|n| n.addr()).collect();
        let old = self
            .running
            .write()
            .expect("vnet stack poisoned")
            .replace(Running { engine, local });
        if let Some(old) = old {
            let changed = old.engine.addresses() != addresses;
            old.engine.shutdown();
            if changed {
                let links: Vec<Arc<dyn Link>> = {
                    let links = self.links.read().expect("vnet stack poisoned");
                    links
                        .attached
                        .iter()
                        .filter_map(|a| a.link.upgrade())
                        .collect()
                };
                for link in links {
                    link.addresses_changed(&addresses);
                }
            }
        }
        Ok(())
    }

    /// The running engine.
    pub fn engine(&self) -> Option<Arc<dyn IpEngine>> {
        self.running
            .read()
            .expect("vnet stack poisoned")
            .as_ref()
            .map(|r| r.engine.clone())
    }

    /// The vnet's addresses (with their prefixes).
    pub fn addresses(&self) -> Vec<IpNet> {
        self.engine().map(|e| e.addresses()).unwrap_or_default()
    }

    /// Whether `ip` is one of the vnet's own addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.running
            .read()
            .expect("vnet stack poisoned")
            .as_ref()
            .is_some_and(|r| r.local.contains(&ip))
    }

    /// Hands a packet for one of the vnet's addresses to its engine.
    pub fn inject(&self, packet: &[u8]) -> bool {
        let running = self.running.read().expect("vnet stack poisoned");
        running.as_ref().is_some_and(|r| r.engine.inject(packet))
    }

    /// Passes on what the engine holds back (the end of a link's batch).
    pub fn flush(&self) {
        let running = self.running.read().expect("vnet stack poisoned");
        if let Some(r) = running.as_ref() {
            r.engine.flush();
        }
    }

    /// Makes `link` (module `instance`) a link of the vnet, carrying `nets`;
    /// replaces what `instance` attached before.
    pub fn link(&self, instance: &str, nets: Vec<IpNet>, link: Weak<dyn Link>) {
        let mut links = self.links.write().expect("vnet stack poisoned");
        match links.attached.iter().position(|a| a.instance == instance) {
            Some(i) => {
                links.attached[i].link = link;
                links.nets[i] = nets;
            }
            None => {
                links.attached.push(Attached {
                    instance: instance.to_string(),
                    link,
                });
                links.nets.push(nets);
            }
        }
        links.rebuild();
        tracing::debug!(vnet = %self.label, %instance, "link attached");
    }

    /// Sets the networks `instance` carries (its peers changed).
    pub fn set_nets(&self, instance: &str, nets: Vec<IpNet>) {
        let mut links = self.links.write().expect("vnet stack poisoned");
        if let Some(i) = links.attached.iter().position(|a| a.instance == instance) {
            links.nets[i] = nets;
            links.rebuild();
        }
    }

    /// Removes `instance`'s link, if it is still `link` (a successor may
    /// have taken its place).
    pub fn unlink(&self, instance: &str, link: &Weak<dyn Link>) {
        let mut links = self.links.write().expect("vnet stack poisoned");
        if let Some(i) = links
            .attached
            .iter()
            .position(|a| a.instance == instance && Weak::ptr_eq(&a.link, link))
        {
            links.attached.remove(i);
            links.nets.remove(i);
            links.rebuild();
        }
    }

    /// The instances linked now.
    pub fn linked(&self) -> Vec<String> {
        let links = self.links.read().expect("vnet stack poisoned");
        links.attached.iter().map(|a| a.instance.clone()).collect()
    }

    /// A packet from the engine: to the link that routes its destination.
    fn dispatch(&self, packet: &[u8]) {
        let Some(dst) = boringtun::noise::Tunn::dst_address(packet) else {
            return;
        };
        let link = self
            .links
            .read()
            .expect("vnet stack poisoned")
            .route(dst)
            .map(|(_, l)| l);
        if let Some(l) = link {
            l.send_ip(packet);
        }
    }

    /// A packet link `from` received for a destination outside its own
    /// peers: to the link that routes it. False when none other does.
    pub fn forward(&self, from: &str, packet: &[u8]) -> bool {
        let Some(dst) = boringtun::noise::Tunn::dst_address(packet) else {
            return false;
        };
        let link = {
            let links = self.links.read().expect("vnet stack poisoned");
            match links.route(dst) {
                Some((instance, l)) if instance != from => Some(l),
                _ => None,
            }
        };
        match link {
            Some(l) => {
                l.send_ip(packet);
                l.flush();
                true
            }
            None => false,
        }
    }

    /// Stops the engine; links stay until they go.
    pub fn shutdown(&self) {
        if let Some(r) = self.running.write().expect("vnet stack poisoned").take() {
            r.engine.shutdown();
        }
    }
}

impl Drop for VnetStack {
    fn drop(&mut self) {
        if let Ok(mut r) = self.running.write() {
            if let Some(r) = r.take() {
                r.engine.shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<u8>>>, Mutex<Vec<Vec<IpNet>>>);
    impl Link for Recorder {
        fn send_ip(&self, packet: &[u8]) {
            self.0.lock().unwrap().push(packet.to_vec());
        }
        fn addresses_changed(&self, addresses: &[IpNet]) {
            self.1.lock().unwrap().push(addresses.to_vec());
        }
    }

    fn udp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64)
            .udp(1000, 2000)
            .write(&mut out, b"hi")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn packets_go_to_the_link_of_the_longest_prefix_and_never_back() {
        let cfg = EngineConfig {
            addresses: vec!["10.60.0.1/16".parse().unwrap()],
            mtu: 1420,
            keep_alive: None,
            tcp_timeout: std::time::Duration::from_secs(90),
            congestion_control: None,
            label: "t/sites".into(),
            owner: None,
        };
        let stack = VnetStack::start(EngineKind::Userspace, &cfg).await.unwrap();
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let (wa, wb): (Weak<dyn Link>, Weak<dyn Link>) = (
            Arc::downgrade(&a) as Weak<dyn Link>,
            Arc::downgrade(&b) as Weak<dyn Link>,
        );
        stack.link("wg-a", vec!["10.60.0.0/16".parse().unwrap()], wa.clone());
        stack.link("wg-b", vec!["10.60.2.0/24".parse().unwrap()], wb.clone());
        assert!(stack.is_local("10.60.0.1".parse().unwrap()));
        assert!(!stack.is_local("10.60.0.2".parse().unwrap()));

        stack.dispatch(&udp([10, 60, 0, 1], [10, 60, 2, 2]));
        stack.dispatch(&udp([10, 60, 0, 1], [10, 60, 1, 2]));
        assert_eq!(b.0.lock().unwrap().len(), 1, "the /24 wins");
        assert_eq!(a.0.lock().unwrap().len(), 1);
        // Forwarding between links: to the other one, never back.
        assert!(stack.forward("wg-a", &udp([10, 60, 1, 2], [10, 60, 2, 2])));
        assert_eq!(b.0.lock().unwrap().len(), 2);
        assert!(!stack.forward("wg-a", &udp([10, 60, 2, 2], [10, 60, 1, 9])));
        assert_eq!(a.0.lock().unwrap().len(), 1);
        // Peers change: the nets follow; an old link cannot remove a new one.
        stack.set_nets("wg-b", vec![]);
        stack.dispatch(&udp([10, 60, 0, 1], [10, 60, 2, 2]));
        assert_eq!(a.0.lock().unwrap().len(), 2, "now under wg-a's /16");
        let newer = Arc::new(Recorder::default());
        stack.link(
            "wg-a",
            vec!["10.60.1.0/24".parse().unwrap()],
            Arc::downgrade(&newer) as Weak<dyn Link>,
        );
        stack.unlink("wg-a", &wa);
        assert_eq!(stack.linked(), vec!["wg-a", "wg-b"]);
        stack.dispatch(&udp([10, 60, 0, 1], [10, 60, 1, 2]));
        assert_eq!(newer.0.lock().unwrap().len(), 1);
        // A restart keeps the links and takes new addresses.
        let mut moved = cfg.clone();
        moved.addresses = vec!["10.61.0.1/16".parse().unwrap()];
        stack.restart(EngineKind::Userspace, &moved).await.unwrap();
        assert!(stack.is_local("10.61.0.1".parse().unwrap()));
        assert!(!stack.is_local("10.60.0.1".parse().unwrap()));
        assert_eq!(stack.linked().len(), 2);
        // Every live link hears of the new addresses, once.
        let told = newer.1.lock().unwrap().clone();
        assert_eq!(told, vec![moved.addresses.clone()]);
        assert_eq!(*b.1.lock().unwrap(), vec![moved.addresses.clone()]);
        // The same addresses again: nothing to tell.
        stack.restart(EngineKind::Userspace, &moved).await.unwrap();
        assert_eq!(newer.1.lock().unwrap().len(), 1);
        stack.shutdown();
    }
}
