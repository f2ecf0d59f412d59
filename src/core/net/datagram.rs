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

/// A transparent UDP listener for TPROXY rules: it receives datagrams
/// addressed to anyone, each with its original destination. Needs
/// CAP_NET_ADMIN (`IP_TRANSPARENT`).
pub struct TproxyUdp(tokio::net::UdpSocket);

impl TproxyUdp {
    /// Binds `addr` transparently (`PermissionDenied` without the capability).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        use std::os::fd::AsFd;
        let s = transparent_udp(addr)?;
        let v6 = addr.is_ipv6();
        super::sys::set_recv_orig_dst(s.as_fd(), v6)?;
        if v6 && addr.ip().is_unspecified() {
            // Dual-stack: IPv4 datagrams report their IPv4 original destination.
            let _ = super::sys::set_recv_orig_dst(s.as_fd(), false);
        }
        Ok(TproxyUdp(tokio::net::UdpSocket::from_std(s.into())?))
    }

    /// One datagram: its length, source and original destination (`None`
    /// when it was sent to this socket's own address, not steered here).
    pub async fn recv(
        &self,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
        use std::os::fd::AsFd;
        let r = self
            .0
            .async_io(tokio::io::Interest::READABLE, || {
                super::sys::recv_msg(self.0.as_fd(), buf)
            })
            .await?;
        Ok((r.len, r.from, r.orig_dst))
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// A UDP socket bound transparently on `addr` (which need not be local),
/// address reuse on: TPROXY answers leave from the address the client
/// sent to.
fn transparent_udp(addr: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_ip_transparent_v6(true)?;
        if addr.ip().is_unspecified() {
            s.set_only_v6(false)?;
        }
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// A socket that sends from `from` (a TPROXY'd datagram's original
/// destination) back to its client.
pub fn bind_reply_udp(from: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>> {
    let s = transparent_udp(from)?;
    Ok(Arc::new(tokio::net::UdpSocket::from_std(s.into())?))
}

/// Turns UDP GRO on for `socket`; false where the kernel has none.
pub fn enable_gro(socket: &tokio::net::UdpSocket) -> bool {
    use std::os::fd::AsFd;
    super::sys::set_udp_gro(socket.as_fd()).is_ok()
}

/// Receives what is waiting on `socket` without blocking (`WouldBlock`
/// when nothing is): the bytes, the source, and with GRO the size of each
/// datagram in them (the last may be shorter).
pub fn try_recv_batch(
    socket: &tokio::net::UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<usize>)> {
    use std::os::fd::AsFd;
    socket.try_io(tokio::io::Interest::READABLE, || {
        let r = super::sys::recv_msg(socket.as_fd(), buf)?;
        Ok((r.len, r.from, r.segment))
    })
}

/// Sends `buf` to `to` as datagrams of `segment` bytes (the last may be
/// shorter) in one call, with UDP GSO, without blocking.
pub fn try_send_segments(
    socket: &tokio::net::UdpSocket,
    buf: &[u8],
    segment: usize,
    to: SocketAddr,
) -> io::Result<usize> {
    use std::os::fd::AsFd;
    let segment = u16::try_from(segment)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment over 64 KiB"))?;
    let to = socket2::SockAddr::from(to);
    socket.try_io(tokio::io::Interest::WRITABLE, || {
        super::sys::send_gso(socket.as_fd(), buf, segment, &to)
    })
}
