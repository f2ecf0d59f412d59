//! The spine every module plugs into.
//!
//! - [`addr`]: `HOST:PORT` targets and listen addresses, with helpful errors.
//! - [`config`]: typed config documents, [`config::ConfigError`], the node config.
//! - [`tenant`]: tenants, the unit of isolation.
//! - [`module`]: the [`module::Module`] and [`module::ModuleFactory`] traits.
//! - [`registry`]: builds, starts, reloads and stops module instances.
//! - [`flow`]: flows (connections, UDP sessions), their table and observers.
//! - [`router`]: per-tenant longest-match routing to off-ramps.
//! - [`dial`]: the [`dial::Dialer`] capability and the direct off-ramp.
//! - [`proxy`]: joining two streams (half-close, idle timeout, splice).
//! - [`keys`]: WireGuard-style X25519 keys (base64).
//! - [`node`]: opening a config directory and checking it whole.
//! - [`vnet`]: the capability of modules hosting an IP stack (listen in it).
//! - [`metrics`]: the node's Prometheus metrics.

pub mod addr;
pub mod config;
pub mod dial;
pub mod flow;
pub mod keys;
pub mod metrics;
pub mod module;
pub mod node;
pub mod proxy;
pub mod registry;
pub mod router;
#[allow(unsafe_code)]
mod sys;
pub mod tenant;
pub mod vnet;
