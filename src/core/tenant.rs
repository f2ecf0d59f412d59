//! Tenants: the unit of isolation.
//!
//! Everything that carries traffic is keyed by tenant. A tenant has a route
//! table today; its virtual networks (address ranges, an IP stack per vnet,
//! peers) arrive with the WireGuard module. Two tenants never share a
//! listener, a flow or a route.

use serde::Serialize;

use crate::core::router::Router;

/// One tenant.
#[derive(Debug, Serialize)]
pub struct Tenant {
    /// Its name (the directory under `tenants/`).
    pub name: String,
    /// Where its flows leave.
    pub router: Router,
}

impl Tenant {
    /// A tenant whose flows leave directly.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            router: Router::direct(),
        }
    }
}
