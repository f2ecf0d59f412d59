//! Listening: on the host network, or on a VPN address inside the IP stack
//! a module hosts (a WireGuard instance's [`VirtualNetwork`]). Both give a
//! [`StreamListener`], which the shared accept loop
//! ([`crate::core::spine::onramp::OnRamp::serve`]) serves.

use std::io;
use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use ipnet::IpNet;

use crate::core::net::proxy::Stream;

/// Accepts streams (from the host network or a virtual one).
#[async_trait]
pub trait StreamListener: Send {
    /// The next connection and its source address.
    async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)>;
    /// The next connection, its source address, and the address the client
    /// connected to where the listener knows it without a system call (a
    /// userspace stack's transparent listener: the original destination).
    /// Default: [`StreamListener::accept`] and `None`.
    async fn accept_addressed(&mut self) -> io::Result<(Stream, SocketAddr, Option<SocketAddr>)> {
        let (s, src) = self.accept().await?;
        Ok((s, src, None))
    }
    /// The address it accepts on.
    fn local_addr(&self) -> SocketAddr;
}

/// An IP network hosted by a module.
#[async_trait]
pub trait VirtualNetwork: Send + Sync {
    /// Listens for TCP on one of the network's addresses.
    async fn listen_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn StreamListener>>;
    /// Binds a UDP socket on one of the network's addresses.
    async fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> io::Result<std::sync::Arc<dyn crate::core::net::datagram::DatagramSocket>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{addr}: this network carries no datagrams"),
        ))
    }
    /// The node's addresses in this network.
    fn addresses(&self) -> Vec<IpNet>;
    /// The address of a named peer, if the network has such a peer.
    fn peer_address(&self, peer: &str) -> Option<IpAddr>;
}

/// A kernel TCP listener (on the host, or in the kernel engine's
/// namespace) as a [`StreamListener`]: accepted streams are
/// [`Stream::Tcp`], so joins use the `splice(2)` fast path.
pub struct HostListener(tokio::net::TcpListener);

impl HostListener {
    /// Wraps a bound, listening socket. `TCP_NODELAY` is set on the
    /// listener once: Linux copies it to every socket it accepts, so no
    /// accepted connection needs a `setsockopt` of its own (a relayed
    /// write is sent as it comes, as each door expects).
    pub fn new(l: tokio::net::TcpListener) -> Self {
        if let Err(e) = socket2::SockRef::from(&l).set_tcp_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on a listener refused");
        }
        HostListener(l)
    }
}

#[async_trait]
impl StreamListener for HostListener {
    async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)> {
        let (s, src) = self.0.accept().await?;
        Ok((Stream::Tcp(s), src))
    }
    fn local_addr(&self) -> SocketAddr {
        self.0.local_addr().expect("bound socket has an address")
    }
}

/// Who owns a listening socket on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The node itself (the admin API).
    Node,
    /// A tenant's module.
    Tenant(String),
}

/// The node's listening sockets on the host, by owner: a door's user may
/// not reach the admin API or another tenant's listener through a
/// `direct` route (`127.0.0.1:9000` and the host's other addresses alike).
#[derive(Debug, Clone, Default)]
pub struct HostListeners(std::sync::Arc<std::sync::Mutex<Vec<(u64, Owner, SocketAddr)>>>);

/// A registration in [`HostListeners`]; removed when dropped.
#[derive(Debug)]
pub struct Registered {
    table: HostListeners,
    id: u64,
}

impl Registered {
    /// `inner`, registered as long as it lives.
    pub fn listener(inner: Box<dyn StreamListener>, registered: Registered) -> RegisteredListener {
        RegisteredListener {
            inner,
            _registered: registered,
        }
    }
}

/// A UDP socket registered in [`HostListeners`] while it lives.
pub struct RegisteredSocket {
    inner: std::sync::Arc<dyn crate::core::net::datagram::DatagramSocket>,
    _registered: Registered,
}

impl Registered {
    /// `inner`, registered as long as it lives.
    pub fn socket(
        inner: std::sync::Arc<dyn crate::core::net::datagram::DatagramSocket>,
        registered: Registered,
    ) -> RegisteredSocket {
        RegisteredSocket {
            inner,
            _registered: registered,
        }
    }
}

#[async_trait]
impl crate::core::net::datagram::DatagramSocket for RegisteredSocket {
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.inner.send_to(data, to).await
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.inner.recv_from(buf).await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A listener registered in [`HostListeners`] while it lives.
pub struct RegisteredListener {
    inner: Box<dyn StreamListener>,
    _registered: Registered,
}

#[async_trait]
impl StreamListener for RegisteredListener {
    async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)> {
        self.inner.accept().await
    }
    async fn accept_addressed(&mut self) -> io::Result<(Stream, SocketAddr, Option<SocketAddr>)> {
        self.inner.accept_addressed().await
    }
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.lock().retain(|(id, _, _)| *id != self.id);
    }
}

impl HostListeners {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Owner, SocketAddr)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `owner` listens on `addr` until the guard drops.
    pub fn register(&self, owner: Owner, addr: SocketAddr) -> Registered {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().push((id, owner, addr));
        Registered {
            table: self.clone(),
            id,
        }
    }

    /// The owner of a listener that a connection to `dst` would reach,
    /// other than `tenant`: one bound to `dst` itself, or to the
    /// unspecified address when `dst` is one of the host's addresses.
    pub fn foreign_owner(&self, tenant: &str, dst: SocketAddr) -> Option<Owner> {
        let ip = crate::core::addr::canonical(dst.ip());
        let candidates: Vec<(Owner, SocketAddr)> = self
            .lock()
            .iter()
            .filter(|(_, o, a)| a.port() == dst.port() && *o != Owner::Tenant(tenant.to_string()))
            .map(|(_, o, a)| (o.clone(), *a))
            .collect();
        for (owner, a) in candidates {
            let bound = crate::core::addr::canonical(a.ip());
            if bound == ip || (bound.is_unspecified() && is_local_address(ip)) {
                return Some(owner);
            }
        }
        None
    }
}

/// Whether `ip` is one of this host's addresses (binding to it works).
fn is_local_address(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Binds a TCP listener on the host network. `[::]` means every address,
/// IPv4 and IPv6 (dual-stack, whatever `net.ipv6.bindv6only` says), and
/// falls back to `0.0.0.0` on hosts without IPv6.
pub fn bind_host_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let any_v6 = matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified());
    let socket = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) if any_v6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            tracing::debug!(%addr, "no IPv6 on this host: listening on IPv4 only");
            return bind_host_tcp(SocketAddr::from(([0, 0, 0, 0], addr.port())));
        }
        Err(e) => return Err(e),
    };
    if any_v6 {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted sockets carry `TCP_NODELAY` from the listener, with no
    /// `setsockopt` of their own.
    #[tokio::test]
    async fn accepted_streams_have_nodelay() {
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        let mut l = HostListener::new(plain);
        let (_c, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        match accepted.unwrap().0 {
            Stream::Tcp(s) => assert!(s.nodelay().unwrap()),
            other => panic!("not a TCP stream: {other:?}"),
        }
        // The same probe on a listener left alone finds it off.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        let (_c, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), plain.accept());
        assert!(!accepted.unwrap().0.nodelay().unwrap());
    }

    #[tokio::test]
    async fn unspecified_v6_accepts_ipv4_and_ipv6() {
        let l = bind_host_tcp("[::]:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        let v4 = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        assert!(v4.is_ok(), "IPv4 client refused: {v4:?}");
        let (_, from) = l.accept().await.unwrap();
        assert!(from.ip().to_canonical().is_ipv4(), "{from}");
        if l.local_addr().unwrap().is_ipv6() {
            if let Ok(v6) = tokio::net::TcpStream::connect(("::1", port)).await {
                let (_, from) = l.accept().await.unwrap();
                assert_eq!(from.ip(), v6.local_addr().unwrap().ip());
            }
        }
    }
}
