//! Module kinds. Each folder owns one kind: its config type, its logic, its tests.
//!
//! - [`pipe`]: named TCP/UDP proxies (`listen` → `remote`).
//! - [`netstack`]: the userspace TCP/IP stack of one virtual network (smoltcp).
//! - [`wireguard`]: userspace WireGuard interfaces, each with its own IP stack.
//! - [`vnet`]: a tenant's virtual networks: routes, hosts, the default.
//! - [`admin`]: the node's HTTP admin API (metrics, health, JSON); not a
//!   per-tenant kind, it is started by the server binary from `meshgate.yaml`.

use std::sync::Arc;

use crate::core::module::ModuleFactory;

pub mod admin;
pub mod netstack;
pub mod pipe;
pub mod vnet;
pub mod wireguard;

/// The factories of every built-in kind.
pub fn builtin_factories() -> Vec<Arc<dyn ModuleFactory>> {
    vec![
        Arc::new(pipe::PipeFactory),
        Arc::new(wireguard::WireGuardFactory),
        Arc::new(vnet::VnetFactory),
    ]
}
