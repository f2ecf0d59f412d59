//! UDP on the userspace engine, beside smoltcp: datagrams for a bound
//! (address, port) are taken out of the inbound path before smoltcp sees
//! them and queued for their socket; sending builds the IP and UDP headers
//! (checksums included) and hands the packet to the sink, as the stack's
//! own output. Datagrams for a port nobody bound go on to smoltcp, which
//! answers ICMP port unreachable. Decrypted WireGuard packets are
//! authenticated, so checksums are not verified on the way in.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tokio::sync::mpsc;

use super::stack::{bump, Shared};
use super::tcp::{is_local, source_for};
use super::PacketSink;
use crate::core::net::datagram::DatagramSocket;

/// Datagrams queued per socket before new ones are dropped.
const SOCKET_QUEUE: usize = 1024;

type Datagram = (Vec<u8>, SocketAddr);
/// A datagram taken transparently: payload, source, destination.
type Addressed = (Vec<u8>, SocketAddr, SocketAddr);

/// The bound UDP sockets of one stack.
#[derive(Default)]
pub(super) struct UdpTable {
    bound: Mutex<HashMap<(IpAddr, u16), mpsc::Sender<Datagram>>>,
    /// What no bound socket takes, to any address ([`transparent`]).
    transparent: Mutex<Option<mpsc::Sender<Addressed>>>,
}

impl UdpTable {
    /// Queues a UDP packet for the socket bound to its destination; false
    /// when it is not UDP or nobody bound that port.
    pub fn deliver(&self, packet: &[u8]) -> bool {
        // Every inbound packet passes here: TCP, the bulk, goes on to
        // smoltcp without being parsed twice.
        let tcp = match packet.first().map(|b| b >> 4) {
            Some(4) => packet.get(9) == Some(&6),
            Some(6) => packet.get(6) == Some(&6),
            _ => false,
        };
        if tcp {
            return false;
        }
        let Ok(p) = SlicedPacket::from_ip(packet) else {
            return false;
        };
        let Some(TransportSlice::Udp(udp)) = &p.transport else {
            return false;
        };
        let (src, dst): (IpAddr, IpAddr) = match &p.net {
            Some(NetSlice::Ipv4(v4)) => (
                v4.header().source_addr().into(),
                v4.header().destination_addr().into(),
            ),
            Some(NetSlice::Ipv6(v6)) => (
                v6.header().source_addr().into(),
                v6.header().destination_addr().into(),
            ),
            _ => return false,
        };
        let port = udp.destination_port();
        let any = if dst.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        };
        let map = self.bound.lock().expect("udp table poisoned");
        let Some(tx) = map.get(&(dst, port)).or_else(|| map.get(&(any, port))) else {
            drop(map);
            let transparent = self.transparent.lock().expect("udp table poisoned");
            let Some(tx) = transparent.as_ref() else {
                return false;
            };
            let _ = tx.try_send((
                udp.payload().to_vec(),
                SocketAddr::new(src, udp.source_port()),
                SocketAddr::new(dst, port),
            ));
            return true;
        };
        // A full queue drops the datagram, as a full socket buffer would.
        let _ = tx.try_send((
            udp.payload().to_vec(),
            SocketAddr::new(src, udp.source_port()),
        ));
        true
    }

    fn remove(&self, key: (IpAddr, u16)) {
        self.bound.lock().expect("udp table poisoned").remove(&key);
    }
}

/// A UDP socket on the stack's addresses.
pub struct NetUdpSocket {
    shared: Arc<Shared>,
    sink: Arc<dyn PacketSink>,
    local: SocketAddr,
    rx: tokio::sync::Mutex<mpsc::Receiver<Datagram>>,
}

impl Drop for NetUdpSocket {
    fn drop(&mut self) {
        self.shared.udp.remove((self.local.ip(), self.local.port()));
    }
}

/// Binds `local`: one of the stack's addresses or the unspecified address
/// of a family; port 0 picks a free port.
pub(super) fn bind(
    shared: &Arc<Shared>,
    sink: Arc<dyn PacketSink>,
    local: SocketAddr,
) -> io::Result<NetUdpSocket> {
    let ip = local.ip();
    if !is_local(&shared.addresses, ip) {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("{local} is not an address of this virtual network"),
        ));
    }
    let mut map = shared.udp.bound.lock().expect("udp table poisoned");
    let port = if local.port() != 0 {
        if map.contains_key(&(ip, local.port())) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{local} is already in use on this virtual network"),
            ));
        }
        local.port()
    } else {
        let start = 49152 + (rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 16384) as u16;
        (0..16384u16)
            .map(|i| 49152 + (start - 49152 + i) % 16384)
            .find(|p| !map.contains_key(&(ip, *p)))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("no free UDP port on {ip}"),
                )
            })?
    };
    let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
    map.insert((ip, port), tx);
    Ok(NetUdpSocket {
        shared: shared.clone(),
        sink,
        local: SocketAddr::new(ip, port),
        rx: tokio::sync::Mutex::new(rx),
    })
}

#[async_trait]
impl DatagramSocket for NetUdpSocket {
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let src = if self.local.ip().is_unspecified() {
            source_for(&self.shared.addresses, to.ip())
        } else {
            Some(self.local.ip()).filter(|s| s.is_ipv4() == to.is_ipv4())
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("no address of {to}'s family to send from"),
            )
        })?;
        send_from(
            &self.shared,
            &*self.sink,
            SocketAddr::new(src, self.local.port()),
            to,
            data,
        )
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (d, from) = next(&self.rx, &self.shared).await?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The next queued datagram, or `ConnectionAborted` once the stack stops.
async fn next<T>(rx: &tokio::sync::Mutex<mpsc::Receiver<T>>, shared: &Shared) -> io::Result<T> {
    let mut rx = rx.lock().await;
    tokio::select! {
        _ = shared.stop.cancelled() => None,
        d = rx.recv() => d,
    }
    .ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the virtual network's IP stack is shut down",
        )
    })
}

/// Builds one UDP packet from `src` to `to` and hands it to the sink.
fn send_from(
    shared: &Shared,
    sink: &dyn PacketSink,
    src: SocketAddr,
    to: SocketAddr,
    data: &[u8],
) -> io::Result<usize> {
    if shared.stop.is_cancelled() {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the virtual network's IP stack is shut down",
        ));
    }
    let builder = match (src.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("cannot send from {src} to {to}: not one IP family"),
            ))
        }
    }
    .udp(src.port(), to.port());
    let size = builder.size(data.len());
    if size > shared.limits.mtu {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte datagram does not fit the virtual network's MTU ({}); it is not fragmented",
                data.len(),
                shared.limits.mtu
            ),
        ));
    }
    let mut packet = Vec::with_capacity(size);
    builder
        .write(&mut packet, data)
        .map_err(|e| io::Error::other(e.to_string()))?;
    bump(&shared.counters.packets_out);
    sink.send(&packet);
    sink.flush();
    Ok(data.len())
}

/// Takes every datagram no bound socket takes, to any address: what a
/// TPROXY socket gives a kernel socket, for a stack that is a namespace's
/// only way out. One per stack; dropping it stops taking them.
pub struct NetUdpTransparent {
    shared: Arc<Shared>,
    sink: Arc<dyn PacketSink>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Addressed>>,
}

/// See [`NetStack::transparent_udp`](super::NetStack::transparent_udp).
pub(super) fn transparent(
    shared: &Arc<Shared>,
    sink: Arc<dyn PacketSink>,
) -> io::Result<NetUdpTransparent> {
    let mut slot = shared.udp.transparent.lock().expect("udp table poisoned");
    if slot.as_ref().is_some_and(|tx| !tx.is_closed()) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "this virtual network already takes UDP transparently",
        ));
    }
    let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
    *slot = Some(tx);
    Ok(NetUdpTransparent {
        shared: shared.clone(),
        sink,
        rx: tokio::sync::Mutex::new(rx),
    })
}

impl Drop for NetUdpTransparent {
    fn drop(&mut self) {
        *self
            .shared
            .udp
            .transparent
            .lock()
            .expect("udp table poisoned") = None;
    }
}

impl NetUdpTransparent {
    /// One datagram: its length, source and destination.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
        let (d, from, to) = next(&self.rx, &self.shared).await?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from, to))
    }

    /// A socket that sends from `from` (any address: the destination a
    /// client sent to), for answers.
    pub fn reply_from(&self, from: SocketAddr) -> Arc<dyn DatagramSocket> {
        Arc::new(NetUdpReply {
            shared: self.shared.clone(),
            sink: self.sink.clone(),
            from,
        })
    }
}

/// Sends from one address; receives nothing (answers only).
struct NetUdpReply {
    shared: Arc<Shared>,
    sink: Arc<dyn PacketSink>,
    from: SocketAddr,
}

#[async_trait]
impl DatagramSocket for NetUdpReply {
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        send_from(&self.shared, &*self.sink, self.from, to, data)
    }
    async fn recv_from(&self, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        std::future::pending().await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.from)
    }
}
