//! The core every module plugs into, in four layers plus shared basics.
//!
//! - [`spine`]: tenants and their vnets, routes, flows and their hooks, the
//!   one path every connection takes ([`spine::onramp`]), the module
//!   contract and the registry.
//! - [`net`]: the byte movers: streams, listeners (host or in a module's
//!   IP stack), dialers, the proxy join with `splice(2)`.
//! - [`engine`]: the data planes of vnets (the userspace TCP/IP stack).
//! - [`node`]: wiring a node: its config store, the registry over given
//!   module kinds, `--check`, and the admin API.
//!
//! Shared basics: [`addr`] (`HOST:PORT`, listen addresses), [`logs`]
//! (rate-limited warnings), [`config`]
//! (typed documents, [`config::ConfigError`], the node config), [`keys`]
//! (X25519 keys in `wg`'s base64), [`metrics`] (the node's Prometheus
//! registry). No file in `core` names a module kind: kinds are given to the
//! registry by the binary ([`crate::modules::builtin_factories`]).

pub mod addr;
pub mod config;
pub mod engine;
pub mod keys;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod node;
pub mod spine;
pub mod users;
