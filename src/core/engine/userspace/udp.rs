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

/// The bound UDP sockets of one stack.
#[derive(Default)]
pub(super) struct UdpTable {
    bound: Mutex<HashMap<(IpAddr, u16), mpsc::Sender<Datagram>>>,
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
            return false;
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
        if self.shared.stop.is_cancelled() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the virtual network's IP stack is shut down",
            ));
        }
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
        let builder = match (src, to.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!("the source has the destination's family"),
        }
        .udp(self.local.port(), to.port());
        let size = builder.size(data.len());
        if size > self.shared.limits.mtu {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte datagram does not fit the virtual network's MTU ({}); it is not fragmented",
                    data.len(),
                    self.shared.limits.mtu
                ),
            ));
        }
        let mut packet = Vec::with_capacity(size);
        builder
            .write(&mut packet, data)
            .map_err(|e| io::Error::other(e.to_string()))?;
        bump(&self.shared.counters.packets_out);
        self.sink.send(&packet);
        self.sink.flush();
        Ok(data.len())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut rx = self.rx.lock().await;
        let stop = self.shared.stop.clone();
        let (d, from) = tokio::select! {
            _ = stop.cancelled() => None,
            d = rx.recv() => d,
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the virtual network's IP stack is shut down",
            )
        })?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
