//! The PROXY protocol (HAProxy's, versions 1 and 2): the first bytes of a
//! TCP connection saying who the real client is, for a backend behind a
//! proxy (nginx's `proxy_protocol`, HAProxy's `accept-proxy`), and from a
//! load balancer in front of meshgate.
//!
//! Sans I/O: [`encode`] builds a header, [`parse`] reads one from the bytes
//! received so far (`Ok(None)` while incomplete). Parsing never panics
//! (`fuzz/fuzz_targets/proxy_protocol.rs`) and never reads more than
//! [`MAX_HEADER`] bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Which version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The text form: `PROXY TCP4 1.2.3.4 5.6.7.8 1234 80\r\n`.
    V1,
    /// The binary form.
    V2,
}

/// The longest header accepted: v1's 107 bytes, or v2's 16-byte preamble
/// and up to 512 bytes of addresses and TLVs (more is refused).
pub const MAX_HEADER: usize = 16 + 512;

const V2_SIG: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The real client, and the address it connected to; `None` for a v2
    /// LOCAL header (a health check) or v1 `UNKNOWN`.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Neither signature.
    #[error("no PROXY protocol header")]
    NoHeader,
    /// A v1 line that does not parse.
    #[error("malformed PROXY v1 header")]
    BadV1,
    /// A v2 header with a bad version, command, family or length.
    #[error("malformed PROXY v2 header")]
    BadV2,
    /// Longer than [`MAX_HEADER`].
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
}

/// A header saying `src` connected to `dst` (both of one family; an IPv4
/// address mapped into IPv6 counts as IPv4).
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (canon(src), canon(dst));
    // Mixed families: say both as IPv6.
    let (src, dst) = if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
            IpAddr::V6(_) => a,
        };
        (v6(src), v6(dst))
    };
    match version {
        Version::V1 => {
            let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = V2_SIG.to_vec();
            out.push(0x21); // version 2, PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // TCP over IPv4
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V6(v6) => v6,
                        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    };
                    out.push(0x21); // TCP over IPv6
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// A header at the start of `b`, and its length.
pub fn parse(b: &[u8]) -> Result<Option<(Header, usize)>, Error> {
    if b.is_empty() {
        return Ok(None);
    }
    let n = b.len().min(V2_SIG.len());
    if b[..n] == V2_SIG[..n] {
        return if b.len() < 16 { Ok(None) } else { parse_v2(b) };
    }
    let n = b.len().min(6);
    if b[..n] == b"PROXY "[..n] {
        return parse_v1(b);
    }
    Err(Error::NoHeader)
}

fn parse_v1(b: &[u8]) -> Result<Option<(Header, usize)>, Error> {
    let Some(end) = b.windows(2).take(107).position(|w| w == b"\r\n") else {
        return if b.len() >= 107 {
            Err(Error::BadV1)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&b[..end]).map_err(|_| Error::BadV1)?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header { addrs: None },
        ["PROXY", fam @ ("TCP4" | "TCP6"), s, d, sp, dp] => {
            let ip = |t: &str| -> Result<IpAddr, Error> {
                let ip: IpAddr = t.parse().map_err(|_| Error::BadV1)?;
                if ip.is_ipv4() != (*fam == "TCP4") {
                    return Err(Error::BadV1);
                }
                Ok(ip)
            };
            let port = |t: &str| -> Result<u16, Error> {
                if t.is_empty() || t.len() > 5 || (t.len() > 1 && t.starts_with('0')) {
                    return Err(Error::BadV1);
                }
                t.parse().map_err(|_| Error::BadV1)
            };
            Header {
                addrs: Some((
                    SocketAddr::new(ip(s)?, port(sp)?),
                    SocketAddr::new(ip(d)?, port(dp)?),
                )),
            }
        }
        _ => return Err(Error::BadV1),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(b: &[u8]) -> Result<Option<(Header, usize)>, Error> {
    let ver_cmd = b[12];
    let fam = b[13];
    let len = u16::from_be_bytes([b[14], b[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(Error::BadV2);
    }
    if len > MAX_HEADER - 16 {
        return Err(Error::TooLong);
    }
    let total = 16 + len;
    if b.len() < total {
        return Ok(None);
    }
    let body = &b[16..total];
    let header = match ver_cmd & 0x0f {
        0 => Header { addrs: None }, // LOCAL: the proxy's own connection
        1 => match fam {
            0x11 | 0x12 if len >= 12 => {
                let s = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let d = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
                let sp = u16::from_be_bytes([body[8], body[9]]);
                let dp = u16::from_be_bytes([body[10], body[11]]);
                Header {
                    addrs: Some((
                        SocketAddr::new(IpAddr::V4(s), sp),
                        SocketAddr::new(IpAddr::V4(d), dp),
                    )),
                }
            }
            0x21 | 0x22 if len >= 36 => {
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s.copy_from_slice(&body[..16]);
                d.copy_from_slice(&body[16..32]);
                let sp = u16::from_be_bytes([body[32], body[33]]);
                let dp = u16::from_be_bytes([body[34], body[35]]);
                Header {
                    addrs: Some((
                        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(s)), sp),
                        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(d)), dp),
                    )),
                }
            }
            // UNSPEC or a Unix socket: nothing to take from it.
            0x00 | 0x31 | 0x32 => Header { addrs: None },
            _ => return Err(Error::BadV2),
        },
        _ => return Err(Error::BadV2),
    };
    Ok(Some((header, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn both_versions_round_trip() {
        for v in [Version::V1, Version::V2] {
            for (s, d) in [
                ("192.0.2.7:51000", "10.0.0.1:80"),
                ("[2001:db8::7]:51000", "[fd00::1]:443"),
            ] {
                let mut h = encode(v, sa(s), sa(d));
                let n = h.len();
                h.extend_from_slice(b"GET / HTTP/1.1\r\n");
                let (got, used) = parse(&h).unwrap().unwrap();
                assert_eq!(used, n);
                assert_eq!(got.addrs, Some((sa(s), sa(d))), "{v:?}");
                for cut in 0..n {
                    assert_eq!(parse(&h[..cut]).unwrap(), None, "{v:?} cut at {cut}");
                }
            }
        }
        assert_eq!(
            encode(Version::V1, sa("192.0.2.7:1"), sa("10.0.0.1:80")),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 80\r\n"
        );
        // A mapped IPv4 client is IPv4; mixed families are said as IPv6.
        let h = encode(Version::V1, sa("[::ffff:192.0.2.7]:1"), sa("10.0.0.1:80"));
        assert!(h.starts_with(b"PROXY TCP4 "));
        let h = encode(Version::V1, sa("192.0.2.7:1"), sa("[fd00::1]:80"));
        assert!(h.starts_with(b"PROXY TCP6 ::ffff:192.0.2.7 "));
    }

    #[test]
    fn bad_headers_are_errors() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n").unwrap_err(), Error::NoHeader);
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n").unwrap_err(),
            Error::BadV1
        );
        assert_eq!(
            parse(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n").unwrap_err(),
            Error::BadV1
        );
        assert_eq!(parse(&[b'P'; 200][..]).unwrap_err(), Error::NoHeader);
        let long = [&b"PROXY "[..], &[b'x'; 200][..]].concat();
        assert_eq!(parse(&long).unwrap_err(), Error::BadV1);
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().0.addrs, None);
        let mut v2 = V2_SIG.to_vec();
        v2.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&v2).unwrap().unwrap(), (Header { addrs: None }, 16));
        let mut big = V2_SIG.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&big).unwrap_err(), Error::TooLong);
        let mut bad = V2_SIG.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert_eq!(parse(&bad).unwrap_err(), Error::BadV2);
    }
}
