//! TCP for callers: [`NetTcpListener`] and [`NetTcpStream`].
//!
//! Streams copy straight between the caller's buffer and the smoltcp
//! socket's buffer under the stack's lock, register a smoltcp waker when
//! they would block, and poke the stack's task after every transfer so
//! windows and data go out at once.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::super::tcp::socket::{self as tcp};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::stack::Shared;
use super::NetError;

/// See [`NetStack::listen_tcp`](super::NetStack::listen_tcp).
pub(super) fn listen(shared: &Arc<Shared>, addr: SocketAddr) -> Result<NetTcpListener, NetError> {
    if !is_local(&shared.addresses, addr.ip()) {
        return Err(NetError::NotLocal(addr));
    }
    let (id, local, accept) = shared.lock().add_listener(addr, shared.limits.backlog)?;
    Ok(NetTcpListener {
        shared: shared.clone(),
        id,
        local,
        accept,
    })
}

/// See [`NetStack::listen_transparent`](super::NetStack::listen_transparent).
pub(super) fn listen_transparent(
    shared: &Arc<Shared>,
    ipv6: bool,
) -> Result<NetTcpListener, NetError> {
    let (id, local, accept) = shared
        .lock()
        .add_transparent_listener(ipv6, shared.limits.backlog)?;
    Ok(NetTcpListener {
        shared: shared.clone(),
        id,
        local,
        accept,
    })
}

/// Whether a socket may be bound on `ip`: one of the stack's addresses,
/// or the unspecified address of a family the stack has.
pub(super) fn is_local(addresses: &[IpNet], ip: IpAddr) -> bool {
    if ip.is_unspecified() {
        addresses.iter().any(|n| n.addr().is_ipv4() == ip.is_ipv4())
    } else {
        addresses.iter().any(|n| n.addr() == ip)
    }
}

/// The stack's address to dial `dst` from: same family, preferring one
/// whose prefix contains `dst`.
pub(super) fn source_for(addresses: &[IpNet], dst: IpAddr) -> Option<IpAddr> {
    let family = || {
        addresses
            .iter()
            .filter(|n| n.addr().is_ipv4() == dst.is_ipv4())
    };
    family()
        .find(|n| n.contains(&dst))
        .or_else(|| family().next())
        .map(|n| n.addr())
}

fn dialable(dst: SocketAddr) -> bool {
    let ip = dst.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    dst.port() != 0 && !ip.is_unspecified() && !ip.is_multicast() && !broadcast
}

/// See [`NetStack::connect_tcp`](super::NetStack::connect_tcp).
pub(super) async fn connect(
    shared: &Arc<Shared>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<NetTcpStream, NetError> {
    if !dialable(dst) {
        return Err(NetError::InvalidAddress(dst));
    }
    let src = source_for(&shared.addresses, dst.ip()).ok_or(NetError::NoSourceAddress(dst))?;
    let stream = {
        let mut st = shared.lock();
        let (slot, id, local) = st.start_connect(shared, src, dst)?;
        NetTcpStream::attach(shared.clone(), slot, id, local, dst)
    };
    shared.wake.notify_one();
    match tokio::time::timeout(timeout, stream.established()).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(e)) => Err(e),
        // Dropping the stream closes the socket.
        Err(_) => Err(NetError::Timeout(dst)),
    }
}

/// Accepts TCP connections on one address of the stack.
///
/// Connections are queued once their handshake completes (up to
/// [`NetStackConfig::listen_backlog`](super::NetStackConfig::listen_backlog)).
/// Dropping the listener stops listening: half-open connections are reset,
/// queued ones closed like dropped streams.
pub struct NetTcpListener {
    shared: Arc<Shared>,
    id: u64,
    local: SocketAddr,
    accept: mpsc::Receiver<NetTcpStream>,
}

impl NetTcpListener {
    /// Waits for the next established connection; returns it with the
    /// peer's address. Fails with [`NetError::Closed`] once the stack is
    /// shut down.
    pub async fn accept(&mut self) -> Result<(NetTcpStream, SocketAddr), NetError> {
        match self.accept.recv().await {
            Some(stream) => {
                let peer = stream.peer;
                Ok((stream, peer))
            }
            None => Err(NetError::Closed),
        }
    }

    /// The address and port listened on (the port chosen if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

#[async_trait::async_trait]
impl crate::core::net::listen::StreamListener for NetTcpListener {
    async fn accept(&mut self) -> io::Result<(crate::core::net::proxy::Stream, SocketAddr)> {
        let (s, peer) = NetTcpListener::accept(self)
            .await
            .map_err(io::Error::other)?;
        Ok((crate::core::net::proxy::Stream::io(s), peer))
    }
    async fn accept_addressed(
        &mut self,
    ) -> io::Result<(
        crate::core::net::proxy::Stream,
        SocketAddr,
        Option<SocketAddr>,
    )> {
        let (s, peer) = NetTcpListener::accept(self)
            .await
            .map_err(io::Error::other)?;
        let dst = s.local_addr();
        Ok((crate::core::net::proxy::Stream::io(s), peer, Some(dst)))
    }
    fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for NetTcpListener {
    fn drop(&mut self) {
        self.shared.lock().remove_listener(self.local, self.id);
        self.shared.wake.notify_one();
        // Queued streams are dropped with `accept`, after the lock is
        // released: each one closes its own connection.
    }
}

impl std::fmt::Debug for NetTcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetTcpListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// One TCP connection through a [`NetStack`](super::NetStack): tokio
/// `AsyncRead` + `AsyncWrite`.
///
/// `poll_shutdown` sends a FIN (half-close: reading goes on). Dropping the
/// stream closes the connection gracefully (FIN after the queued data), or
/// with a reset if received data was left unread; the stack reaps the
/// socket once the close completes or times out. Errors: a reset from the
/// peer (or a dead-peer timeout) is `ConnectionReset`, writing after
/// shutdown is `BrokenPipe`, anything after the stack stopped is
/// `ConnectionAborted`.
pub struct NetTcpStream {
    shared: Arc<Shared>,
    /// The connection's slot in the stack and its unique id.
    slot: usize,
    id: u64,
    local: SocketAddr,
    peer: SocketAddr,
    /// Owns the socket (false only for streams the stack never handed out).
    attached: bool,
}

fn stack_stopped() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the virtual network's IP stack is shut down",
    )
}

fn reset(peer: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("connection with {peer} reset or timed out"),
    )
}

impl NetTcpStream {
    pub(super) fn attach(
        shared: Arc<Shared>,
        slot: usize,
        id: u64,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Self {
        NetTcpStream {
            shared,
            slot,
            id,
            local,
            peer,
            attached: true,
        }
    }

    /// Forgets the socket without touching the state (the caller holds the
    /// lock and disposes of the socket itself).
    pub(super) fn detach(mut self) {
        self.attached = false;
    }

    /// The remote address and port.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The stack's address and port of this connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Waits for the active open to finish.
    async fn established(&self) -> Result<(), NetError> {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.closed {
                return Poll::Ready(Err(NetError::Closed));
            }
            let Some(s) = st.socket(self.slot, self.id) else {
                return Poll::Ready(Err(NetError::Closed));
            };
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed | tcp::State::TimeWait => {
                    Poll::Ready(Err(NetError::Refused(self.peer)))
                }
                _ => Poll::Ready(Ok(())),
            }
        })
        .await
    }
}

impl AsyncRead for NetTcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut st = this.shared.lock();
        if st.closed {
            return Poll::Ready(Err(stack_stopped()));
        }
        let Some(s) = st.socket(this.slot, this.id) else {
            return Poll::Ready(Err(stack_stopped()));
        };
        let mut total = 0;
        // Twice at most: the ring buffer may wrap.
        let outcome = loop {
            let got = s.recv(|data| {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data[..n]);
                n
            });
            match got {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    total += n;
                    if buf.remaining() == 0 {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if total > 0 {
            st.mark(this.slot, this.id);
            drop(st);
            // The window opened: let the stack advertise it.
            this.shared.wake.notify_one();
            return Poll::Ready(Ok(()));
        }
        match outcome {
            Ok(()) => {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            }
            // EOF: the peer's FIN arrived and everything before it was read.
            Err(tcp::RecvError::Finished) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(reset(this.peer))),
        }
    }
}

impl AsyncWrite for NetTcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let timeout = this.shared.limits.tcp_timeout;
        let mut st = this.shared.lock();
        if st.closed {
            return Poll::Ready(Err(stack_stopped()));
        }
        let Some(s) = st.socket(this.slot, this.id) else {
            return Poll::Ready(Err(stack_stopped()));
        };
        match s.send_slice(data) {
            Ok(0) => {
                s.register_send_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                // Unacknowledged data: a silent peer is now a dead one.
                if s.timeout().is_none() {
                    s.set_timeout(Some(timeout));
                }
                st.mark(this.slot, this.id);
                drop(st);
                this.shared.wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(tcp::SendError::InvalidState) => {
                if s.state() == tcp::State::Closed {
                    Poll::Ready(Err(reset(this.peer)))
                } else {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "write after shutdown",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.shared.lock();
        if st.closed {
            return Poll::Ready(Err(stack_stopped()));
        }
        if let Some(s) = st.socket(this.slot, this.id) {
            s.close();
        }
        st.mark(this.slot, this.id);
        drop(st);
        this.shared.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for NetTcpStream {
    fn drop(&mut self) {
        if !self.attached {
            return;
        }
        self.shared
            .lock()
            .release(self.slot, self.id, self.shared.limits.tcp_timeout);
        self.shared.wake.notify_one();
    }
}

impl std::fmt::Debug for NetTcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetTcpStream")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}
