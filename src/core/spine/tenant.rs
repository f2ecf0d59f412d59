//! Tenants: the unit of isolation.
//!
//! Everything that carries traffic is keyed by tenant. A tenant owns its
//! virtual networks ([`Vnets`]: routes, hosts, what is attached to each);
//! two tenants never share a listener, a flow or a route.

use serde::Serialize;

use crate::core::spine::vnet::Vnets;

/// One tenant.
#[derive(Debug, Serialize)]
pub struct Tenant {
    /// Its name (the directory under `tenants/`).
    pub name: String,
    /// Its virtual networks; where its flows go.
    #[serde(skip)]
    pub vnets: Vnets,
    /// Its policy documents (`kind: policy`), decided for every flow.
    #[serde(skip)]
    pub policy: std::sync::Arc<crate::core::spine::policy::Policies>,
}

impl Tenant {
    /// A tenant with only the implicit default vnet (everything direct).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            vnets: Vnets::default(),
            policy: Default::default(),
        }
    }
}
