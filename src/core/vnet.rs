//! Virtual networks: the capability of modules that host an IP stack.
//!
//! A WireGuard instance owns a userspace IP stack with the node's VPN
//! addresses. Through [`VirtualNetwork`] other modules of the same tenant can
//! listen on those addresses (a pipe accepting on `10.192.0.1:8080`) and
//! learn where named peers are; dialing goes through the module's
//! [`crate::core::dial::Dialer`].

use std::io;
use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use ipnet::IpNet;

use crate::core::proxy::Stream;

/// Accepts streams (from the host network or a virtual one).
#[async_trait]
pub trait StreamListener: Send {
    /// The next connection and its source address.
    async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)>;
    /// The address it accepts on.
    fn local_addr(&self) -> SocketAddr;
}

/// An IP network hosted by a module.
#[async_trait]
pub trait VirtualNetwork: Send + Sync {
    /// Listens for TCP on one of the network's addresses.
    async fn listen_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn StreamListener>>;
    /// The node's addresses in this network.
    fn addresses(&self) -> Vec<IpNet>;
    /// The address of a named peer, if the network has such a peer.
    fn peer_address(&self, peer: &str) -> Option<IpAddr>;
}
