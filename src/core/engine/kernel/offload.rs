//! The kernel engine's TUN offloads: the TUN is opened with
//! `IFF_VNET_HDR` and told (`TUNSETOFFLOAD`) that we take TCP super-packets
//! (TSO, up to 64 KB) and packets whose checksum is left to us, as a NIC
//! would. So the kernel's TCP hands over one 64 KB segment where it would
//! have written forty 1,400-byte packets, and we cut it here, before
//! encryption, into packets of the size it asked for (`gso_size`), each with
//! its own IP and TCP header and checksums. Every frame on the TUN starts
//! with a `virtio_net_hdr`; what we write carries an empty one.

/// `struct virtio_net_hdr`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset (little-endian on the hosts we run on).
pub const VNET_HDR_LEN: usize = 10;

/// The header of a frame we write: no offload asked for.
pub const EMPTY_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

const NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// Why a frame was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than its headers say.
    Truncated,
    /// An offload we did not ask for.
    Unsupported,
}

/// The ones'-complement sum of `data`, added to `sum`, not folded.
fn sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Hands each packet of a frame read from the TUN to `out`: the packet
/// itself, its checksum completed where the kernel left it to us, or the
/// segments of a TCP super-packet. `scratch` is reused for segments.
pub fn split(
    frame: &[u8],
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Result<(), FrameError> {
    if frame.len() < VNET_HDR_LEN {
        return Err(FrameError::Truncated);
    }
    let (hdr, packet) = frame.split_at(VNET_HDR_LEN);
    let flags = hdr[0];
    let gso_type = hdr[1] & !GSO_ECN;
    let gso_size = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
    let csum_start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let csum_offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    match gso_type {
        GSO_NONE if flags & NEEDS_CSUM == 0 => {
            out(packet);
            Ok(())
        }
        GSO_NONE => {
            let at = csum_start + csum_offset;
            if csum_start > packet.len() || at + 2 > packet.len() {
                return Err(FrameError::Truncated);
            }
            scratch.clear();
            scratch.extend_from_slice(packet);
            // The field holds the pseudo-header's sum: add the rest, store
            // the complement.
            let c = !fold(sum(&scratch[csum_start..], 0));
            scratch[at..at + 2].copy_from_slice(&c.to_be_bytes());
            out(scratch);
            Ok(())
        }
        GSO_TCPV4 | GSO_TCPV6 if gso_size > 0 => {
            segment(packet, gso_type == GSO_TCPV6, gso_size, scratch, out)
        }
        _ => Err(FrameError::Unsupported),
    }
}

/// Cuts a TCP super-packet into segments of `mss` payload bytes.
fn segment(
    packet: &[u8],
    v6: bool,
    mss: usize,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Result<(), FrameError> {
    let ip_len = if v6 {
        if packet.len() < 40 || packet[6] != 6 {
            return Err(FrameError::Unsupported); // extension headers: not offered by TCP
        }
        40
    } else {
        if packet.len() < 20 {
            return Err(FrameError::Truncated);
        }
        usize::from(packet[0] & 0x0f) * 4
    };
    if packet.len() < ip_len + 20 {
        return Err(FrameError::Truncated);
    }
    let tcp_len = usize::from(packet[ip_len + 12] >> 4) * 4;
    let hdr_len = ip_len + tcp_len;
    if tcp_len < 20 || packet.len() < hdr_len {
        return Err(FrameError::Truncated);
    }
    let payload = &packet[hdr_len..];
    let seq = u32::from_be_bytes(packet[ip_len + 4..ip_len + 8].try_into().expect("4 bytes"));
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let chunks = payload.chunks(mss).count().max(1);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        scratch.clear();
        scratch.extend_from_slice(&packet[..hdr_len]);
        scratch.extend_from_slice(chunk);
        let last = i + 1 == chunks;
        let seg_len = hdr_len + chunk.len();
        if v6 {
            let plen = (seg_len - 40) as u16;
            scratch[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            scratch[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
            scratch[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            scratch[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&scratch[..ip_len], 0));
            scratch[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ip_len;
        let s = seq.wrapping_add((i * mss) as u32);
        scratch[t + 4..t + 8].copy_from_slice(&s.to_be_bytes());
        // FIN and PSH only on the last segment, CWR only on the first.
        if !last {
            scratch[t + 13] &= !(0x01 | 0x08);
        }
        if i > 0 {
            scratch[t + 13] &= !0x80;
        }
        scratch[t + 16..t + 18].copy_from_slice(&[0, 0]);
        let tcp_bytes = (seg_len - ip_len) as u32;
        let pseudo = if v6 {
            sum(&scratch[8..40], 6 + tcp_bytes)
        } else {
            sum(&scratch[12..20], 6 + tcp_bytes)
        };
        let c = !fold(sum(&scratch[t..], pseudo));
        scratch[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        out(scratch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    fn hdr(flags: u8, gso: u8, gso_size: u16, start: u16, offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso];
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&gso_size.to_le_bytes());
        h.extend_from_slice(&start.to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        h
    }

    /// Each segment parses, its checksums verify, and the payloads join
    /// back into the original.
    fn check_segments(v6: bool) {
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
        let mut packet = Vec::new();
        let builder = if v6 {
            PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
        } else {
            PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        };
        builder
            .tcp(40000, 80, 1000, 65535)
            .ack(7)
            .psh()
            .fin()
            .write(&mut packet, &payload)
            .unwrap();
        let mut frame = hdr(
            NEEDS_CSUM,
            if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            1400,
            0,
            0,
        );
        frame.extend_from_slice(&packet);
        let mut segs = Vec::new();
        split(&frame, &mut Vec::new(), |p| segs.push(p.to_vec())).unwrap();
        assert_eq!(segs.len(), 3);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let sp = SlicedPacket::from_ip(s).unwrap();
            let Some(TransportSlice::Tcp(tcp)) = &sp.transport else {
                panic!("tcp")
            };
            let expected = match &sp.net {
                Some(NetSlice::Ipv4(ip)) => {
                    let h = ip.header().to_header();
                    assert_eq!(h.header_checksum, h.calc_header_checksum(), "ip checksum");
                    assert_eq!(usize::from(h.total_len), s.len());
                    tcp.to_header()
                        .calc_checksum_ipv4(&h, tcp.payload())
                        .unwrap()
                }
                Some(NetSlice::Ipv6(ip)) => {
                    let h = ip.header().to_header();
                    assert_eq!(usize::from(h.payload_length) + 40, s.len());
                    tcp.to_header()
                        .calc_checksum_ipv6(&h, tcp.payload())
                        .unwrap()
                }
                _ => panic!("ip"),
            };
            assert_eq!(tcp.checksum(), expected, "tcp checksum of segment {i}");
            assert_eq!(tcp.sequence_number(), 1000 + (i as u32) * 1400);
            let last = i == 2;
            assert_eq!(tcp.fin(), last);
            assert_eq!(tcp.psh(), last);
            assert!(tcp.ack());
            joined.extend_from_slice(tcp.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn tcp_super_packets_become_valid_segments() {
        check_segments(false);
        check_segments(true);
    }

    #[test]
    fn partial_checksums_are_completed_and_plain_frames_pass() {
        let mut packet = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1000, 53)
            .write(&mut packet, b"a query")
            .unwrap();
        let good = u16::from_be_bytes([packet[26], packet[27]]);
        // What the kernel leaves: the pseudo-header's sum in the field.
        let udp_len = (packet.len() - 20) as u32;
        let pseudo = fold(sum(&packet[12..20], 17 + udp_len));
        packet[26..28].copy_from_slice(&pseudo.to_be_bytes());
        let mut frame = hdr(NEEDS_CSUM, GSO_NONE, 0, 20, 6);
        frame.extend_from_slice(&packet);
        let mut got = Vec::new();
        split(&frame, &mut Vec::new(), |p| got.push(p.to_vec())).unwrap();
        assert_eq!(u16::from_be_bytes([got[0][26], got[0][27]]), good);
        // No flags: the packet as it is.
        let mut plain = EMPTY_VNET_HDR.to_vec();
        plain.extend_from_slice(b"\x45rest");
        let mut seen = Vec::new();
        split(&plain, &mut Vec::new(), |p| seen.push(p.to_vec())).unwrap();
        assert_eq!(seen, vec![b"\x45rest".to_vec()]);
        // Garbage is an error, never a panic.
        for bad in [
            &[][..],
            &[1, 1, 0, 0, 100, 0, 0, 0, 0, 0, 0x45][..],
            &[1, 0, 0, 0, 0, 0, 200, 0, 0, 0][..],
        ] {
            assert!(split(bad, &mut Vec::new(), |_| {}).is_err(), "{bad:?}");
        }
        assert_eq!(
            split(&hdr(0, 5, 100, 0, 0), &mut Vec::new(), |_| {}),
            Err(FrameError::Unsupported)
        );
    }
}
