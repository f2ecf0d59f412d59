//! The spine: what every connection and every module goes through.
//!
//! - [`tenant`]: tenants, the unit of isolation, and their vnets.
//! - [`vnet`]: a tenant's virtual networks: routes, hosts, attachments, the default.
//! - [`vnetstack`]: a vnet's own IP stack, shared by the links (WireGuard instances) attached to it.
//! - [`router`]: route tables: longest match of a target to a connector.
//! - [`flow`]: flows (connections, UDP sessions), their table, hooks (verdicts), typed ends.
//! - [`ipflow`]: forwarded IP packets tracked as flows by 5-tuple.
//! - [`onramp`]: the one path every connection takes (route, flow, policy,
//!   dial, join, end) and the accept loop stream on-ramps share.
//! - [`door`]: door kinds (SOCKS, HTTP proxy, SSH) as modules: one listener, a handshake.
//! - [`module`]: the [`module::Module`] and [`module::ModuleFactory`] traits.
//! - [`registry`]: builds, starts, reloads and stops module instances.
//! - [`reject`]: the closed list of reasons a client is refused ([`reject::RejectReason`]).

pub mod audit;
pub mod dest;
pub mod door;
pub mod flow;
pub mod ipflow;
pub mod module;
pub mod onramp;
pub mod policy;
pub mod registry;
pub mod reject;
pub mod router;
pub mod startups;
pub mod tenant;
pub mod vnet;
pub mod vnetstack;
