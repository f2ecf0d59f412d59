//! Module kinds, and only kinds. Each folder owns one kind: its config type,
//! its logic, its tests. A module reaches another only through the registry,
//! by name and capability.
//!
//! - [`pipe`]: named TCP/UDP proxies (`listen` → `remote`).
//! - [`wireguard`]: userspace WireGuard interfaces, each with its own IP stack.
//! - [`vnet`]: a tenant's virtual networks: routes, hosts, the default.
//! - [`socks`]: a SOCKS5 (and SOCKS4/4a) front door with UDP ASSOCIATE.
//! - [`http_proxy`]: an HTTP/1.1 CONNECT and forward proxy front door.
//! - `quic` (feature `quic`): the h2 door's tunnels over QUIC, and `quic_link`.
//! - [`h2`]: an HTTP/2 CONNECT door over TLS 1.3 (HBONE), client certificates as
//!   identities, and `h2_link`, a gateway link to another node's door.
//! - [`capture`]: transparent capture (REDIRECT, TPROXY) of unconfigured clients.
//! - [`netns`]: a network namespace whose only way out is the tenant's vnet
//!   (`meshgate run -- CMD`).
//! - [`ssh`]: an SSH door for stock OpenSSH clients (`-L`, `-W`, `-J`, `-D`).
//! - [`link_group`]: fallback and failover over several gateway links.
//! - [`policy`]: a tenant's allow/deny rules on every flow, with live revocation.

use std::sync::Arc;

use crate::core::spine::module::ModuleFactory;

pub mod capture;
pub mod h2;
pub mod http_proxy;
pub mod link_group;
pub mod netns;
pub mod pipe;
pub mod policy;
#[cfg(feature = "quic")]
pub mod quic;
pub mod socks;
pub mod ssh;
pub mod vnet;
pub mod wireguard;

/// The factories of every built-in kind.
pub fn builtin_factories() -> Vec<Arc<dyn ModuleFactory>> {
    vec![
        Arc::new(pipe::PipeFactory::default()),
        Arc::new(socks::SocksFactory::default()),
        Arc::new(http_proxy::HttpProxyFactory::default()),
        Arc::new(h2::H2Factory::default()),
        Arc::new(h2::link::H2LinkFactory),
        Arc::new(link_group::LinkGroupFactory),
        Arc::new(capture::CaptureFactory::default()),
        Arc::new(netns::NetnsFactory::default()),
        Arc::new(ssh::SshFactory::default()),
        Arc::new(ssh::link::SshLinkFactory),
        Arc::new(wireguard::WireGuardFactory),
        Arc::new(vnet::VnetFactory),
        Arc::new(policy::PolicyFactory),
        #[cfg(feature = "quic")]
        Arc::new(quic::QuicFactory),
        #[cfg(feature = "quic")]
        Arc::new(quic::link::QuicLinkFactory),
    ]
}
