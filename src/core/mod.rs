//! The spine every module plugs into.
//!
//! - [`addr`]: `HOST:PORT` targets and listen addresses, with helpful errors.
//! - [`config`]: typed config documents, [`config::ConfigError`], the node config.
//! - [`tenant`]: tenants, the unit of isolation.
//! - [`module`]: the [`module::Module`] and [`module::ModuleFactory`] traits.
//! - [`registry`]: builds, starts, reloads and stops module instances.
//! - [`flow`]: flows (connections, UDP sessions), their table and observers.
//! - [`ipflow`]: forwarded IP packets tracked as flows by 5-tuple.
//! - [`router`]: route tables: longest match of a target to a connector.
//! - [`onramp`]: the one path every connection takes (flow, policy, route,
//!   dial, join, typed end) and the accept loop stream on-ramps share.
//! - [`dial`]: the [`dial::Dialer`] capability and the direct off-ramp.
//! - [`proxy`]: joining two streams (half-close, idle timeout, splice).
//! - [`keys`]: WireGuard-style X25519 keys (base64).
//! - [`node`]: opening a config directory and checking it whole.
//! - [`vnet`]: a tenant's virtual networks: routes, hosts, attachments.
//! - [`metrics`]: the node's Prometheus metrics.

pub mod addr;
pub mod config;
pub mod dial;
pub mod flow;
pub mod ipflow;
pub mod keys;
pub mod metrics;
pub mod module;
pub mod node;
pub mod onramp;
pub mod proxy;
pub mod registry;
pub mod router;
#[allow(unsafe_code)]
mod sys;
pub mod tenant;
pub mod vnet;
