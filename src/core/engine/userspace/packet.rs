//! Looks at raw IP packets before smoltcp does: a cheap sanity check for
//! [`NetStack::inject`](super::NetStack::inject) and the TCP header peek the
//! accept logic needs (addresses, ports, flags). Sans-IO; never panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::super::tcp::wire::{ACK, FIN, RST, SYN};

const PROTO_TCP: u8 = 6;
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_DEST_OPTS: u8 = 60;
/// IPv6 extension headers looked through before giving up.
const MAX_EXTENSION_HEADERS: usize = 4;

/// Why a packet was refused at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Invalid {
    /// Not IPv4 or IPv6.
    NotIp,
    /// Shorter than its headers say.
    Truncated,
    /// A source no peer can have: unspecified, multicast, broadcast.
    BadSource,
}

/// Checks the IP version, the lengths and the source address.
pub(super) fn check(packet: &[u8]) -> Result<(), Invalid> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            if packet.len() < 20 {
                return Err(Invalid::Truncated);
            }
            let header = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if header < 20 || total < header || total > packet.len() {
                return Err(Invalid::Truncated);
            }
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            if src.is_unspecified() || src.is_multicast() || src.is_broadcast() {
                return Err(Invalid::BadSource);
            }
            Ok(())
        }
        Some(6) => {
            if packet.len() < 40 {
                return Err(Invalid::Truncated);
            }
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if 40 + payload > packet.len() {
                return Err(Invalid::Truncated);
            }
            let src = Ipv6Addr::from(octets16(&packet[8..24]));
            if src.is_unspecified() || src.is_multicast() {
                return Err(Invalid::BadSource);
            }
            Ok(())
        }
        _ => Err(Invalid::NotIp),
    }
}

fn octets16(b: &[u8]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    o
}

/// The parts of a TCP segment the accept logic looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TcpPeek {
    /// Sender's address and port.
    pub src: SocketAddr,
    /// Receiver's (our) address and port.
    pub dst: SocketAddr,
    /// Where the TCP header starts and the segment ends in the packet.
    pub offset: usize,
    pub end: usize,
    flags: u8,
}

impl TcpPeek {
    /// A connection request: SYN without ACK, RST or FIN.
    pub fn is_syn(&self) -> bool {
        self.flags & (SYN | ACK | RST | FIN) == SYN
    }
}

/// Reads addresses, ports and flags if `packet` is an unfragmented TCP
/// segment with a complete fixed header (after at most a few IPv6
/// hop-by-hop, routing or destination options headers). Checksums are left
/// to the TCP parser.
pub(super) fn peek_tcp(packet: &[u8]) -> Option<TcpPeek> {
    let (src, dst, offset, end) = match packet.first()? >> 4 {
        4 => {
            if packet.len() < 20 || packet[9] != PROTO_TCP {
                return None;
            }
            // Fragment offset must be 0 and "more fragments" clear.
            if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
                return None;
            }
            let header = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            let src = IpAddr::from([packet[12], packet[13], packet[14], packet[15]]);
            let dst = IpAddr::from([packet[16], packet[17], packet[18], packet[19]]);
            (src, dst, header, total.min(packet.len()))
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            // Skip hop-by-hop, routing and destination options headers;
            // a fragment header (or anything else) ends the search.
            let (mut next, mut at) = (packet[6], 40);
            for _ in 0..MAX_EXTENSION_HEADERS {
                if next != EXT_HOP_BY_HOP && next != EXT_ROUTING && next != EXT_DEST_OPTS {
                    break;
                }
                let ext = packet.get(at..at + 2)?;
                next = ext[0];
                at += (usize::from(ext[1]) + 1) * 8;
            }
            if next != PROTO_TCP {
                return None;
            }
            let src = IpAddr::from(octets16(&packet[8..24]));
            let dst = IpAddr::from(octets16(&packet[24..40]));
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            (src, dst, at, (40 + payload).min(packet.len()))
        }
        _ => return None,
    };
    let tcp = packet.get(offset..end)?;
    if tcp.len() < 20 {
        return None;
    }
    Some(TcpPeek {
        src: SocketAddr::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        offset,
        end,
        flags: tcp[13],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    fn tcp_v4(syn: bool, ack: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64).tcp(40000, 80, 1, 1000);
        if syn {
            b = b.syn();
        }
        if ack {
            b = b.ack(5);
        }
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    }

    #[test]
    fn peeks_syn_v4() {
        let p = tcp_v4(true, false);
        assert_eq!(check(&p), Ok(()));
        let t = peek_tcp(&p).unwrap();
        assert!(t.is_syn());
        assert_eq!(t.src, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(t.dst, "10.0.0.1:80".parse().unwrap());
        assert!(!peek_tcp(&tcp_v4(true, true)).unwrap().is_syn());
        assert!(!peek_tcp(&tcp_v4(false, true)).unwrap().is_syn());
    }

    #[test]
    fn peeks_syn_v6() {
        let src: Ipv6Addr = "fd00::2".parse().unwrap();
        let dst: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut p = Vec::new();
        PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            .tcp(1234, 443, 9, 1000)
            .syn()
            .write(&mut p, b"x")
            .unwrap();
        assert_eq!(check(&p), Ok(()));
        let t = peek_tcp(&p).unwrap();
        assert!(t.is_syn());
        assert_eq!(t.dst, SocketAddr::new(dst.into(), 443));
        assert_eq!(t.src, SocketAddr::new(src.into(), 1234));
    }

    #[test]
    fn peeks_past_ipv6_extension_headers() {
        let src: Ipv6Addr = "fd00::2".parse().unwrap();
        let dst: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut plain = Vec::new();
        PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            .tcp(1234, 443, 9, 1000)
            .syn()
            .write(&mut plain, &[])
            .unwrap();
        // Insert a destination options header (8 bytes of padding) before TCP.
        let mut p = plain[..40].to_vec();
        p[6] = EXT_DEST_OPTS;
        let payload_len = u16::from_be_bytes([p[4], p[5]]) + 8;
        p[4..6].copy_from_slice(&payload_len.to_be_bytes());
        p.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&plain[40..]);
        assert_eq!(check(&p), Ok(()));
        let t = peek_tcp(&p).unwrap();
        assert!(t.is_syn());
        assert_eq!(t.dst, SocketAddr::new(dst.into(), 443));
        // Truncated inside the extension header.
        assert_eq!(peek_tcp(&p[..41]), None);
    }

    #[test]
    fn refuses_bad_packets() {
        assert_eq!(check(&[]), Err(Invalid::NotIp));
        assert_eq!(check(&[0x50; 40]), Err(Invalid::NotIp));
        assert_eq!(check(&[0x45; 10]), Err(Invalid::Truncated));
        let mut p = tcp_v4(true, false);
        p.truncate(p.len() - 1);
        assert_eq!(check(&p), Err(Invalid::Truncated));
        let mut p = tcp_v4(true, false);
        p[12..16].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(check(&p), Err(Invalid::BadSource));
        p[12..16].copy_from_slice(&[224, 0, 0, 1]);
        assert_eq!(check(&p), Err(Invalid::BadSource));
        // A fragment is not peeked.
        let mut p = tcp_v4(true, false);
        p[6] = 0x20;
        assert_eq!(peek_tcp(&p), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = check(&bytes);
            let _ = peek_tcp(&bytes);
        }
    }
}
