//! Dialing: opening a stream to a target through a connector.
//!
//! [`Dialer`] is the capability a module offers when flows can leave through
//! it (a WireGuard instance, a mesh transport). [`DirectDialer`] is the
//! `direct` connector: the host's own TCP stack.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::TcpStream;

use crate::core::addr::HostPort;
use crate::core::net::datagram::DatagramSocket;
use crate::core::net::proxy::Stream;
use crate::core::net::resolve;

/// Why a dial failed. [`DialError::reason`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {message}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        message: String,
    },
    /// The remote refused the connection.
    #[error("connection refused by {0}")]
    Refused(String),
    /// No answer within the connect timeout.
    #[error("no answer from {target} within {timeout:?}")]
    Timeout {
        /// The target.
        target: String,
        /// The connect timeout.
        timeout: Duration,
    },
    /// The network or host is unreachable.
    #[error("{target} is unreachable: {source}")]
    Unreachable {
        /// The target.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No route, or the connector the route names is not running.
    #[error("{0}")]
    NoRoute(String),
    /// The connector (a gateway link) is down right now: another may
    /// carry the flow (a `link_group` moves on at once).
    #[error("{0}")]
    Down(String),
    /// Any other I/O failure.
    #[error("dial {target}: {source}")]
    Io {
        /// The target.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What kind of dial failure ended a flow: [`DialError`] without its
/// details, for flow ends, metrics and the doors' replies (a SOCKS reply
/// code, an HTTP status), which match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialFailure {
    /// The host name did not resolve.
    Resolve,
    /// The remote refused the connection.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// The network or host is unreachable.
    Unreachable,
    /// No route, or the route's connector is not running.
    NoRoute,
    /// Any other I/O failure.
    Io,
}

impl DialFailure {
    /// A short fixed label for metrics: `resolve`, `refused`, `timeout`,
    /// `unreachable`, `no_route` or `io`.
    pub fn as_str(self) -> &'static str {
        match self {
            DialFailure::Resolve => "resolve",
            DialFailure::Refused => "refused",
            DialFailure::Timeout => "timeout",
            DialFailure::Unreachable => "unreachable",
            DialFailure::NoRoute => "no_route",
            DialFailure::Io => "io",
        }
    }
}

impl DialError {
    /// The kind of failure.
    pub fn failure(&self) -> DialFailure {
        match self {
            DialError::Resolve { .. } => DialFailure::Resolve,
            DialError::Refused(_) => DialFailure::Refused,
            DialError::Timeout { .. } => DialFailure::Timeout,
            DialError::Unreachable { .. } => DialFailure::Unreachable,
            DialError::NoRoute(_) | DialError::Down(_) => DialFailure::NoRoute,
            DialError::Io { .. } => DialFailure::Io,
        }
    }

    /// The metric label of [`DialError::failure`].
    pub fn reason(&self) -> &'static str {
        self.failure().as_str()
    }

    /// Classifies an OS error from connecting to `target`.
    pub(crate) fn from_io(target: &impl std::fmt::Display, e: io::Error) -> Self {
        let target = target.to_string();
        match e.kind() {
            io::ErrorKind::ConnectionRefused => DialError::Refused(target),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                DialError::Unreachable { target, source: e }
            }
            _ => DialError::Io { target, source: e },
        }
    }
}

/// What a dial knows of the flow it is for: a gateway link passes it on,
/// so the far side audits the original client (`Forwarded: for=`) and the
/// trace continues. Empty for the node's own dials (a vnet's DNS server).
#[derive(Debug, Clone, Default)]
pub struct DialMeta {
    /// The flow's client.
    pub src: Option<std::net::SocketAddr>,
    /// The client's trace context, as it sent it.
    pub trace: Option<std::sync::Arc<crate::core::net::trace::Trace>>,
}

/// Connects `socket`, a fresh non-blocking TCP socket, to `dst`. The
/// kernel reports the handshake's end as writability: with neither an
/// error nor a hang-up that is a connection, so unlike tokio's own
/// connect no `getsockopt(SO_ERROR)` follows (one system call less per
/// dial); a failure reads the kernel's reason. The caller bounds the wait.
pub async fn connect_socket(socket: socket2::Socket, dst: SocketAddr) -> io::Result<TcpStream> {
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(tokio::io::Interest::WRITABLE).await?;
    if ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "closed while connecting")
        }));
    }
    Ok(stream)
}

/// A non-blocking TCP socket for `dst`'s family with `TCP_NODELAY` (a
/// relayed write goes out as it comes), for [`connect_socket`].
fn host_socket(dst: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// `attempt`, or [`DialError::Timeout`] for `target` once `timeout` passed.
pub async fn within<T>(
    target: &HostPort,
    timeout: Duration,
    attempt: impl std::future::Future<Output = Result<T, DialError>>,
) -> Result<T, DialError> {
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(DialError::Timeout {
                target: target.to_string(),
                timeout,
            })
        })
}

/// Opens streams to targets. Offered by modules that are connectors.
#[async_trait]
pub trait Dialer: Send + Sync {
    /// Opens a TCP stream to `target` for the flow `meta` describes (a
    /// gateway link passes it on), giving up after `timeout`.
    async fn dial_tcp(
        &self,
        target: &HostPort,
        timeout: Duration,
        meta: &DialMeta,
    ) -> Result<Stream, DialError>;
    /// A UDP socket to talk to `remote` through this connector (bound on
    /// the connector's side, any port). Default: datagrams not carried.
    async fn bind_udp(
        &self,
        remote: std::net::SocketAddr,
    ) -> Result<std::sync::Arc<dyn DatagramSocket>, DialError> {
        Err(DialError::NoRoute(format!(
            "{remote}: this connector carries no datagrams"
        )))
    }
}

/// The `direct` connector: the host network, names resolved by the system resolver.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectDialer;

#[async_trait]
impl Dialer for DirectDialer {
    async fn dial_tcp(
        &self,
        target: &HostPort,
        timeout: Duration,
        _meta: &DialMeta,
    ) -> Result<Stream, DialError> {
        let attempt = async {
            let ips =
                resolve::on_host(&target.host, timeout)
                    .await
                    .map_err(|e| DialError::Resolve {
                        host: target.host.clone(),
                        message: e.to_string(),
                    })?;
            let mut last = None;
            for ip in ips {
                let dst = SocketAddr::new(ip, target.port);
                match async { connect_socket(host_socket(dst)?, dst).await }.await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(DialError::from_io(target, e)),
                }
            }
            Err(last.unwrap_or_else(|| DialError::Resolve {
                host: target.host.clone(),
                message: "no addresses".into(),
            }))
        };
        within(target, timeout, attempt).await.map(Stream::Tcp)
    }

    async fn bind_udp(
        &self,
        remote: std::net::SocketAddr,
    ) -> Result<std::sync::Arc<dyn DatagramSocket>, DialError> {
        crate::core::net::datagram::bind_host_udp(crate::core::net::datagram::any_for(remote))
            .await
            .map_err(|e| DialError::from_io(&remote, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn direct_dial_and_errors() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let t: HostPort = format!("127.0.0.1:{port}").parse().unwrap();
        let s = DirectDialer
            .dial_tcp(&t, Duration::from_secs(2), &DialMeta::default())
            .await
            .unwrap();
        assert!(matches!(s, Stream::Tcp(_)));
        drop(l);
        let e = DirectDialer
            .dial_tcp(&t, Duration::from_secs(2), &DialMeta::default())
            .await
            .err()
            .unwrap();
        assert_eq!(e.reason(), "refused", "{e}");
        let bad: HostPort = "no-such-host.invalid:80".parse().unwrap();
        let e = DirectDialer
            .dial_tcp(&bad, Duration::from_secs(5), &DialMeta::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(e.reason(), "resolve" | "timeout"), "{e}");
    }

    /// A connection made without `SO_ERROR` is a real one (it carries
    /// bytes both ways, with `TCP_NODELAY`); a refusal and an IPv6 peer
    /// are told apart by the readiness alone.
    #[tokio::test]
    async fn connect_socket_connects_and_reports_refusal() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for at in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = tokio::net::TcpListener::bind(at).await else {
                continue; // no IPv6 here
            };
            let dst = l.local_addr().unwrap();
            let (s, accepted) =
                tokio::join!(connect_socket(host_socket(dst).unwrap(), dst), l.accept());
            let (mut s, (mut peer, _)) = (s.unwrap(), accepted.unwrap());
            assert!(s.nodelay().unwrap());
            assert_eq!(s.peer_addr().unwrap(), dst);
            s.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            peer.write_all(b"pong").await.unwrap();
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            drop(l);
            let e = connect_socket(host_socket(dst).unwrap(), dst)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        }
    }
}
