//! The kernel engine's TUN offloads: the TUN is opened with
//! `IFF_VNET_HDR` and told (`TUNSETOFFLOAD`) that we take TCP super-packets
//! (TSO, up to 64 KB) and packets whose checksum is left to us, as a NIC
//! would. So the kernel's TCP hands over one 64 KB segment where it would
//! have written forty 1,400-byte packets, and we cut it here, before
//! encryption, into packets of the size it asked for (`gso_size`), each with
//! its own IP and TCP header and checksums. The other way, consecutive
//! decrypted segments of one TCP flow are coalesced ([`Coalescer`]) into
//! one super-packet per write. Every frame on the TUN starts with a
//! `virtio_net_hdr`.

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

/// What must match for two TCP packets to be one stream of segments: the
/// addresses and ports (by the header bytes that hold them).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FlowKey {
    v6: bool,
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// Coalesces consecutive TCP segments of one flow into a super-packet
/// written to the TUN at once (GRO, as a NIC driver does), so the kernel's
/// TCP takes one 64 KB segment where it would take forty. Anything else
/// passes through as it is, in order.
#[derive(Default)]
pub struct Coalescer {
    /// The frame being built: header room, then the first packet's headers
    /// and the payloads so far.
    frame: Vec<u8>,
    key: Option<FlowKey>,
    ip_len: usize,
    tcp_len: usize,
    next_seq: u32,
    mss: usize,
    count: usize,
    /// A shorter segment, or PSH, ended the train.
    closed: bool,
    /// A packet passed through, with its header.
    passed: Vec<u8>,
}

/// Segments of one super-packet at most (the kernel's own GRO limit is 64).
const MAX_COALESCED: usize = 64;
/// And bytes (an IP packet is at most 64 KB).
const MAX_COALESCED_BYTES: usize = 65_000;

/// A TCP packet that may be coalesced: (key, ip header length, tcp header
/// length, payload length, seq).
fn candidate(p: &[u8]) -> Option<(FlowKey, usize, usize, usize, u32)> {
    let (v6, ip_len) = match p.first()? >> 4 {
        4 => {
            // No IP options, not a fragment, TCP, the length exact.
            let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]);
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if p[0] & 0x0f != 5 || frag & 0x3fff != 0 || p[9] != 6 || total != p.len() {
                return None;
            }
            (false, 20)
        }
        6 => {
            let plen = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            if p.get(6)? != &6 || plen + 40 != p.len() {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let tcp_len = usize::from(*p.get(ip_len + 12)? >> 4) * 4;
    if tcp_len < 20 || p.len() < ip_len + tcp_len {
        return None;
    }
    // Only ACK, or ACK with PSH (which ends the train).
    let flags = p[ip_len + 13];
    if flags & !0x08 != 0x10 {
        return None;
    }
    let payload = p.len() - ip_len - tcp_len;
    if payload == 0 {
        return None;
    }
    let mut addrs = [0u8; 32];
    let mut ports = [0u8; 4];
    if v6 {
        addrs.copy_from_slice(&p[8..40]);
    } else {
        addrs[..8].copy_from_slice(&p[12..20]);
    }
    ports.copy_from_slice(&p[ip_len..ip_len + 4]);
    let seq = u32::from_be_bytes(p[ip_len + 4..ip_len + 8].try_into().ok()?);
    Some((FlowKey { v6, addrs, ports }, ip_len, tcp_len, payload, seq))
}

impl Coalescer {
    /// Takes one packet for the TUN; whole frames go to `out`.
    pub fn push(&mut self, packet: &[u8], out: &mut impl FnMut(&[u8])) {
        let Some((key, ip_len, tcp_len, payload, seq)) = candidate(packet) else {
            self.flush(out);
            self.passed.clear();
            self.passed.extend_from_slice(&EMPTY_VNET_HDR);
            self.passed.extend_from_slice(packet);
            return out(&self.passed);
        };
        let h = VNET_HDR_LEN;
        let follows = self.key.as_ref() == Some(&key)
            && !self.closed
            && seq == self.next_seq
            && tcp_len == self.tcp_len
            && payload <= self.mss
            && self.count < MAX_COALESCED
            && self.frame.len() - h + payload <= MAX_COALESCED_BYTES
            // Same ACK number, window and options (timestamps): one stream
            // of segments as the sender cut it.
            && packet[ip_len + 8..ip_len + 12] == self.frame[h + ip_len + 8..h + ip_len + 12]
            && packet[ip_len + 14..ip_len + 16] == self.frame[h + ip_len + 14..h + ip_len + 16]
            && packet[ip_len + 20..ip_len + tcp_len]
                == self.frame[h + ip_len + 20..h + ip_len + tcp_len];
        if follows {
            self.frame.extend_from_slice(&packet[ip_len + tcp_len..]);
            self.count += 1;
            // The train's header carries the last segment's PSH.
            self.frame[h + ip_len + 13] |= packet[ip_len + 13] & 0x08;
        } else {
            self.flush(out);
            self.frame.clear();
            self.frame.extend_from_slice(&EMPTY_VNET_HDR);
            self.frame.extend_from_slice(packet);
            self.key = Some(key);
            self.ip_len = ip_len;
            self.tcp_len = tcp_len;
            self.mss = payload;
            self.count = 1;
            self.closed = false;
        }
        self.next_seq = seq.wrapping_add(payload as u32);
        // A shorter segment or PSH is the last of its train.
        let psh = packet[ip_len + 13] & 0x08 != 0;
        if payload < self.mss || psh {
            self.closed = true;
        }
    }

    /// Writes what is being built.
    pub fn flush(&mut self, out: &mut impl FnMut(&[u8])) {
        let Some(key) = self.key.take() else { return };
        let h = VNET_HDR_LEN;
        if self.count > 1 {
            let (ip, t) = (h, h + self.ip_len);
            let len = self.frame.len() - h;
            if key.v6 {
                let plen = (len - 40) as u16;
                self.frame[ip + 4..ip + 6].copy_from_slice(&plen.to_be_bytes());
            } else {
                self.frame[ip + 2..ip + 4].copy_from_slice(&(len as u16).to_be_bytes());
                self.frame[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
                let c = !fold(sum(&self.frame[ip..ip + 20], 0));
                self.frame[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
            }
            // The kernel completes the TCP checksum (NEEDS_CSUM): the field
            // holds the pseudo-header's sum.
            let tcp_bytes = (len - self.ip_len) as u32;
            let pseudo = if key.v6 {
                sum(&self.frame[ip + 8..ip + 40], 6 + tcp_bytes)
            } else {
                sum(&self.frame[ip + 12..ip + 20], 6 + tcp_bytes)
            };
            self.frame[t + 16..t + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
            let hdr_len = (self.ip_len + self.tcp_len) as u16;
            let mut vh = [0u8; VNET_HDR_LEN];
            vh[0] = NEEDS_CSUM;
            vh[1] = if key.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            vh[2..4].copy_from_slice(&hdr_len.to_le_bytes());
            vh[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
            vh[6..8].copy_from_slice(&(self.ip_len as u16).to_le_bytes());
            vh[8..10].copy_from_slice(&16u16.to_le_bytes());
            self.frame[..h].copy_from_slice(&vh);
        }
        out(&self.frame);
        self.frame.clear();
        self.count = 0;
    }
}

#[cfg(test)]
mod gro_tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn seg(seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let b = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 80, seq, 1000)
            .ack(5);
        let b = if psh { b.psh() } else { b };
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn consecutive_segments_become_one_frame_that_splits_back() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut frames = Vec::new();
        let mut c = Coalescer::default();
        let mut packets = Vec::new();
        for (i, chunk) in data.chunks(1400).enumerate() {
            let last = (i + 1) * 1400 >= data.len();
            packets.push(seg(100 + (i * 1400) as u32, chunk, last));
        }
        for p in &packets {
            c.push(p, &mut |f: &[u8]| frames.push(f.to_vec()));
        }
        c.flush(&mut |f: &[u8]| frames.push(f.to_vec()));
        assert_eq!(frames.len(), 1, "one super-packet");
        assert_eq!(frames[0][1], GSO_TCPV4);
        // Cut again as the kernel would: the same packets (but for the IP
        // ids, which count up, and so the IP checksums), checksums valid.
        let mut back = Vec::new();
        split(&frames[0], &mut Vec::new(), |p| back.push(p.to_vec())).unwrap();
        assert_eq!(back.len(), packets.len());
        for (i, (b, p)) in back.iter().zip(&packets).enumerate() {
            assert!(
                b[12..] == p[12..] && b[..4] == p[..4],
                "segment {i} differs"
            );
            assert_eq!(u16::from_be_bytes([b[4], b[5]]), i as u16);
        }
    }

    #[test]
    fn gaps_other_flows_and_non_data_break_the_train_in_order() {
        let a = seg(100, &[1; 1000], false);
        let gap = seg(5000, &[2; 1000], false);
        let mut other = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 3], [10, 0, 0, 1], 64)
            .tcp(40000, 80, 1100, 1000)
            .ack(5)
            .write(&mut other, &[3; 1000])
            .unwrap();
        let mut ping = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, b"x")
            .unwrap();
        let mut frames = Vec::new();
        let mut c = Coalescer::default();
        for p in [&a, &gap, &other, &ping] {
            c.push(p, &mut |f: &[u8]| frames.push(f.to_vec()));
        }
        c.flush(&mut |f: &[u8]| frames.push(f.to_vec()));
        let bodies: Vec<&[u8]> = frames.iter().map(|f| &f[VNET_HDR_LEN..]).collect();
        assert_eq!(bodies, vec![&a[..], &gap[..], &other[..], &ping[..]]);
        assert!(frames.iter().all(|f| f[..VNET_HDR_LEN] == EMPTY_VNET_HDR));
    }
}
