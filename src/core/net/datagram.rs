//! Datagrams: UDP sockets on the host or inside a vnet's engine, behind one
//! trait, so a UDP pipe or a SOCKS UDP association carries datagrams the
//! same way whatever the route's connector.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

/// A UDP socket: unconnected, one local address.
#[async_trait]
pub trait DatagramSocket: Send + Sync {
    /// Sends one datagram to `to`.
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize>;
    /// Receives one datagram: its length and source.
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    /// The local address (the port chosen, with port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

#[async_trait]
impl DatagramSocket for tokio::net::UdpSocket {
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::send_to(self, data, to).await
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::recv_from(self, buf).await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }
}

/// A host UDP socket bound on `local` (port 0: any).
pub async fn bind_host_udp(local: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>> {
    Ok(Arc::new(tokio::net::UdpSocket::bind(local).await?))
}

/// The unspecified address of `remote`'s family, port 0: where a socket
/// that talks to `remote` binds.
pub fn any_for(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    }
}
