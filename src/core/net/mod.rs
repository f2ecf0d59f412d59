//! The byte movers: streams, listening, dialing, joining.
//!
//! - [`proxy`]: [`proxy::Stream`] and [`proxy::join`] (half-close, idle
//!   timeout, byte accounting, `splice(2)` between kernel sockets).
//! - [`listen`]: listeners on the host or inside a module's IP stack.
//! - [`datagram`]: UDP sockets on the host or in a vnet, behind one trait.
//! - [`dial`]: the [`dial::Dialer`] capability and the direct connector.
//! - [`resolve`]: the host's resolver (direct dials, routes, endpoints).
//! - [`dns`]: resolving names over TCP through any connector (a vnet's `dns:`).
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers (sans I/O).
//! - [`prefix`]: [`prefix::PrefixTable`], longest-prefix match (routes, links, allowed IPs).
//! - `sys`: the raw system calls behind splice (the one `unsafe` module).

pub mod datagram;
pub mod dial;
pub mod dns;
pub mod guard;
pub mod link;
pub mod listen;
pub mod prefix;
pub mod proxy;
pub mod proxy_protocol;
pub mod resolve;
#[allow(unsafe_code)]
mod sys;
pub mod tls;
pub mod trace;
