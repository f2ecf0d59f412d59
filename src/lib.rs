//! meshgate: a multi-tenant network gateway.
//!
//! meshgate connects applications that live in separate private networks.
//! One process serves many tenants; each tenant's module instances (pipes,
//! WireGuard interfaces, vnets; SOCKS, SSH and more to come) are configured by documents
//! in a config store and share the core's flow tracking, routing, proxying
//! and metrics.
//!
//! # Layout
//! - [`core`]: the spine (tenants, vnets, routes, flows, the one path, the
//!   module contract, the registry), the byte movers, the engines and the
//!   node (store, `--check`, admin API).
//! - [`modules`]: one folder per module kind (pipe, wireguard, vnet).
//! - `configstore` (a sibling crate): where documents come from.
//! - `cmd/`: the `meshgate` server and the `meshgatectl` CLI.
//! - `docs/ARCHITECTURE.md`: how it fits together and how to add a kind.

#![deny(unsafe_code)]

pub mod core;
#[doc(hidden)]
pub mod fuzzing;
pub mod modules;
