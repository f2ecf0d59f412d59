//! TCP segments on the wire: parsing (with the checksum and the options
//! meshgate uses: MSS, window scale, SACK-permitted, SACK, timestamps) and
//! writing whole IPv4/IPv6 packets. Sans-IO; parsing never panics.

use std::net::{IpAddr, SocketAddr};

use super::seq::Seq;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_WSCALE: u8 = 3;
const OPT_SACK_PERM: u8 = 4;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;

/// At most this many SACK blocks are read from a segment.
pub const MAX_SACK_BLOCKS: usize = 4;
/// Bytes of IPv4 and IPv6 header written by [`emit`].
pub const IPV4_HEADER: usize = 20;
pub const IPV6_HEADER: usize = 40;
/// The fixed TCP header.
pub const TCP_HEADER: usize = 20;
/// The most option bytes a TCP header holds.
pub const MAX_OPTIONS: usize = 40;
const PROTO_TCP: u8 = 6;
const TTL: u8 = 64;

/// Why a segment was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its header says.
    Truncated,
    /// The checksum does not match.
    Checksum,
    /// A data offset below 5 words, or an option running past the header.
    BadHeader,
}

/// The TCP options meshgate reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    /// (TSval, TSecr).
    pub timestamp: Option<(u32, u32)>,
    /// SACK blocks: (left edge, right edge).
    pub sack: [(Seq, Seq); MAX_SACK_BLOCKS],
    pub sack_len: usize,
}

impl Options {
    pub fn sack_blocks(&self) -> &[(Seq, Seq)] {
        &self.sack[..self.sack_len]
    }

    /// Bytes these options take on the wire, padded to 4.
    pub fn wire_len(&self) -> usize {
        let mut n = 0;
        if self.mss.is_some() {
            n += 4;
        }
        if self.window_scale.is_some() {
            n += 4; // NOP + 3
        }
        if self.sack_permitted {
            n += 4; // NOP NOP + 2 (or shared with the timestamp)
        }
        if self.timestamp.is_some() {
            n += 12; // NOP NOP + 10
        }
        if self.sack_len > 0 {
            n += 4 + 8 * self.sack_len; // NOP NOP + 2 + 8 per block
        }
        n
    }
}

/// One parsed segment; `payload` borrows the packet.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: Seq,
    pub ack: Seq,
    pub flags: u8,
    pub window: u16,
    pub options: Options,
    pub payload: &'a [u8],
}

impl Segment<'_> {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Sequence space taken: payload, plus one each for SYN and FIN.
    pub fn seq_len(&self) -> usize {
        self.payload.len() + usize::from(self.has(SYN)) + usize::from(self.has(FIN))
    }
}

/// What [`emit`] writes (the payload is passed separately).
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: Seq,
    pub ack: Seq,
    pub flags: u8,
    pub window: u16,
    pub options: Options,
}

/// Parses the TCP segment `tcp` carried from `src` to `dst`, checking the
/// checksum over the pseudo-header.
pub fn parse(src: IpAddr, dst: IpAddr, tcp: &[u8]) -> Result<Segment<'_>, WireError> {
    if tcp.len() >= TCP_HEADER && checksum(pseudo_sum(src, dst, tcp.len()), tcp) != 0 {
        return Err(WireError::Checksum);
    }
    parse_unchecked(src, dst, tcp)
}

/// [`parse`] without the checksum check (for fuzzing the state machine
/// with segments a checksum would keep out).
pub fn parse_unchecked(src: IpAddr, dst: IpAddr, tcp: &[u8]) -> Result<Segment<'_>, WireError> {
    if tcp.len() < TCP_HEADER {
        return Err(WireError::Truncated);
    }
    let offset = usize::from(tcp[12] >> 4) * 4;
    if offset < TCP_HEADER {
        return Err(WireError::BadHeader);
    }
    if offset > tcp.len() {
        return Err(WireError::Truncated);
    }
    let be16 = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([tcp[i], tcp[i + 1], tcp[i + 2], tcp[i + 3]]);
    let options = parse_options(&tcp[TCP_HEADER..offset])?;
    Ok(Segment {
        src: SocketAddr::new(src, be16(0)),
        dst: SocketAddr::new(dst, be16(2)),
        seq: Seq(be32(4)),
        ack: Seq(be32(8)),
        flags: tcp[13] & 0x3f,
        window: be16(14),
        options,
        payload: &tcp[offset..],
    })
}

fn parse_options(mut b: &[u8]) -> Result<Options, WireError> {
    let mut o = Options::default();
    while let Some(&kind) = b.first() {
        match kind {
            OPT_END => break,
            OPT_NOP => {
                b = &b[1..];
                continue;
            }
            _ => {}
        }
        let len = usize::from(*b.get(1).ok_or(WireError::BadHeader)?);
        if len < 2 || len > b.len() {
            return Err(WireError::BadHeader);
        }
        let body = &b[2..len];
        match (kind, body.len()) {
            (OPT_MSS, 2) => o.mss = Some(u16::from_be_bytes([body[0], body[1]])),
            (OPT_WSCALE, 1) => o.window_scale = Some(body[0].min(14)),
            (OPT_SACK_PERM, 0) => o.sack_permitted = true,
            (OPT_TIMESTAMP, 8) => {
                let val = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let ecr = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                o.timestamp = Some((val, ecr));
            }
            (OPT_SACK, n) if n % 8 == 0 => {
                for block in body.chunks_exact(8).take(MAX_SACK_BLOCKS) {
                    let l = u32::from_be_bytes([block[0], block[1], block[2], block[3]]);
                    let r = u32::from_be_bytes([block[4], block[5], block[6], block[7]]);
                    o.sack[o.sack_len] = (Seq(l), Seq(r));
                    o.sack_len += 1;
                }
            }
            // Unknown options, or known ones with odd lengths, are skipped.
            _ => {}
        }
        b = &b[len..];
    }
    Ok(o)
}

/// The IP header length [`emit`] writes for this address family.
pub fn ip_header_len(addr: IpAddr) -> usize {
    match addr {
        IpAddr::V4(_) => IPV4_HEADER,
        IpAddr::V6(_) => IPV6_HEADER,
    }
}

/// Appends one whole IP packet to `out`: IP header, TCP header with
/// options, the payload (given in up to two pieces, as a ring buffer holds
/// it), checksums filled in. `ip_id` is the IPv4 identification.
pub fn emit(out: &mut Vec<u8>, h: &Header, payload: [&[u8]; 2], ip_id: u16) {
    let start = out.len();
    let opt_len = h.options.wire_len();
    debug_assert!(opt_len <= MAX_OPTIONS, "{opt_len} bytes of TCP options");
    let tcp_len = TCP_HEADER + opt_len + payload[0].len() + payload[1].len();
    match (h.src.ip(), h.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (IPV4_HEADER + tcp_len) as u16;
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&ip_id.to_be_bytes());
            out.extend_from_slice(&[0x40, 0, TTL, PROTO_TCP, 0, 0]); // DF
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let sum = checksum(0, &out[start..start + IPV4_HEADER]);
            out[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            out.extend_from_slice(&[PROTO_TCP, TTL]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        // A connection's two ends are always of one family.
        _ => unreachable!("mixed address families in one TCP connection"),
    }
    let tcp_start = out.len();
    out.extend_from_slice(&h.src.port().to_be_bytes());
    out.extend_from_slice(&h.dst.port().to_be_bytes());
    out.extend_from_slice(&h.seq.0.to_be_bytes());
    out.extend_from_slice(&h.ack.0.to_be_bytes());
    out.push((((TCP_HEADER + opt_len) / 4) as u8) << 4);
    out.push(h.flags);
    out.extend_from_slice(&h.window.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    write_options(out, &h.options);
    out.extend_from_slice(payload[0]);
    out.extend_from_slice(payload[1]);
    let sum = checksum(
        pseudo_sum(h.src.ip(), h.dst.ip(), tcp_len),
        &out[tcp_start..],
    );
    out[tcp_start + 16..tcp_start + 18].copy_from_slice(&sum.to_be_bytes());
}

fn write_options(out: &mut Vec<u8>, o: &Options) {
    if let Some(mss) = o.mss {
        out.extend_from_slice(&[OPT_MSS, 4]);
        out.extend_from_slice(&mss.to_be_bytes());
    }
    if let Some(shift) = o.window_scale {
        out.extend_from_slice(&[OPT_NOP, OPT_WSCALE, 3, shift]);
    }
    if o.sack_permitted {
        out.extend_from_slice(&[OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2]);
    }
    if let Some((val, ecr)) = o.timestamp {
        out.extend_from_slice(&[OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10]);
        out.extend_from_slice(&val.to_be_bytes());
        out.extend_from_slice(&ecr.to_be_bytes());
    }
    if o.sack_len > 0 {
        out.extend_from_slice(&[OPT_NOP, OPT_NOP, OPT_SACK, (2 + 8 * o.sack_len) as u8]);
        for &(l, r) in o.sack_blocks() {
            out.extend_from_slice(&l.0.to_be_bytes());
            out.extend_from_slice(&r.0.to_be_bytes());
        }
    }
}

/// The one's-complement sum of the pseudo-header, unfolded.
fn pseudo_sum(src: IpAddr, dst: IpAddr, tcp_len: usize) -> u64 {
    let mut sum = u64::from(PROTO_TCP) + tcp_len as u64;
    let mut add = |b: &[u8]| {
        for w in b.chunks_exact(2) {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        _ => {}
    }
    sum
}

/// The Internet checksum of `data` with `initial` added: 0 when `data`
/// holds a correct checksum. Sums 32-bit words, then folds.
pub fn checksum(initial: u64, data: &[u8]) -> u16 {
    let mut sum = initial;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum += u64::from(u32::from_be_bytes(tail));
    // Fold 64 -> 16 bits; a 32-bit word is two 16-bit words.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(src: &str, dst: &str) -> Header {
        Header {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq: Seq(1000),
            ack: Seq(u32::MAX - 3),
            flags: ACK | PSH,
            window: 4321,
            options: Options::default(),
        }
    }

    fn tcp_part(packet: &[u8]) -> &[u8] {
        match packet[0] >> 4 {
            4 => &packet[IPV4_HEADER..],
            _ => &packet[IPV6_HEADER..],
        }
    }

    #[test]
    fn round_trip_with_every_option_both_families() {
        for (src, dst) in [
            ("10.0.0.1:1234", "10.0.0.2:80"),
            ("[fd00::1]:1234", "[fd00::2]:80"),
        ] {
            // A SYN's options, then a data segment's (40 bytes at most).
            let mut syn = header(src, dst);
            syn.options.mss = Some(1380);
            syn.options.window_scale = Some(7);
            syn.options.sack_permitted = true;
            syn.options.timestamp = Some((7, 9));
            let mut data = header(src, dst);
            data.options.timestamp = Some((u32::MAX, 1));
            data.options.sack[0] = (Seq(5), Seq(10));
            data.options.sack[1] = (Seq(20), Seq(30));
            data.options.sack[2] = (Seq(40), Seq(50));
            data.options.sack_len = 3;
            for h in [syn, data] {
                let mut out = Vec::new();
                emit(&mut out, &h, [b"hello ", b"world!"], 7);
                let seg = parse(h.src.ip(), h.dst.ip(), tcp_part(&out)).unwrap();
                assert_eq!(seg.src, h.src);
                assert_eq!(seg.dst, h.dst);
                assert_eq!(seg.seq, h.seq);
                assert_eq!(seg.ack, h.ack);
                assert_eq!(seg.flags, h.flags);
                assert_eq!(seg.window, h.window);
                assert_eq!(seg.options, h.options);
                assert_eq!(seg.payload, b"hello world!");
                if out[0] >> 4 == 4 {
                    assert_eq!(checksum(0, &out[..IPV4_HEADER]), 0, "IPv4 header checksum");
                }
            }
        }
    }

    #[test]
    fn odd_payload_length_checksums() {
        let h = header("10.0.0.1:1", "10.0.0.2:2");
        let mut out = Vec::new();
        emit(&mut out, &h, [b"abc", b""], 1);
        assert!(parse(h.src.ip(), h.dst.ip(), tcp_part(&out)).is_ok());
    }

    #[test]
    fn corrupt_and_truncated_segments_are_refused() {
        let h = header("10.0.0.1:1", "10.0.0.2:2");
        let mut out = Vec::new();
        emit(&mut out, &h, [b"payload", b""], 1);
        let (s, d) = (h.src.ip(), h.dst.ip());
        let mut bad = out.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            parse(s, d, tcp_part(&bad)).unwrap_err(),
            WireError::Checksum
        );
        assert_eq!(
            parse(s, d, &tcp_part(&out)[..10]).unwrap_err(),
            WireError::Truncated
        );
        // Any prefix, any garbage: an error or a segment, never a panic.
        for n in 0..tcp_part(&out).len() {
            let _ = parse(s, d, &tcp_part(&out)[..n]);
        }
        let mut opts = out.clone();
        let t = IPV4_HEADER;
        opts[t + 12] = 0x60; // 24-byte header: one option word
        opts[t + 20..t + 24].copy_from_slice(&[OPT_MSS, 9, 0, 0]);
        assert!(parse(s, d, tcp_part(&opts)).is_err());
    }
}
