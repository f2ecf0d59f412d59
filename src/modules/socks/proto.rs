//! The SOCKS wire formats, sans I/O: SOCKS5 (RFC 1928) greeting, request,
//! reply and UDP header, username/password authentication (RFC 1929), and
//! SOCKS4/4a. Each parser takes the bytes received so far and returns
//! `Ok(None)` while a message is incomplete, `Ok(Some((message, length)))`
//! once it is whole, or an error for bytes that can never become one. None
//! of them panics on any input (`fuzz/fuzz_targets/socks.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// SOCKS5 methods.
pub const METHOD_NONE: u8 = 0x00;
/// Username/password (RFC 1929).
pub const METHOD_PASSWORD: u8 = 0x02;
/// No acceptable method.
pub const METHOD_UNACCEPTABLE: u8 = 0xff;

/// SOCKS5 commands.
pub const CMD_CONNECT: u8 = 0x01;
/// BIND (not supported: replied with [`REP_COMMAND_NOT_SUPPORTED`]).
pub const CMD_BIND: u8 = 0x02;
/// UDP ASSOCIATE.
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;

/// SOCKS5 reply codes (RFC 1928 section 6).
pub const REP_SUCCEEDED: u8 = 0x00;
/// General SOCKS server failure.
pub const REP_GENERAL_FAILURE: u8 = 0x01;
/// Connection not allowed by ruleset.
pub const REP_NOT_ALLOWED: u8 = 0x02;
/// Network unreachable.
pub const REP_NETWORK_UNREACHABLE: u8 = 0x03;
/// Host unreachable.
pub const REP_HOST_UNREACHABLE: u8 = 0x04;
/// Connection refused.
pub const REP_CONNECTION_REFUSED: u8 = 0x05;
/// TTL expired.
pub const REP_TTL_EXPIRED: u8 = 0x06;
/// Command not supported.
pub const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;
/// Address type not supported.
pub const REP_ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

const ATYP_V4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_V6: u8 = 0x04;

/// Why bytes cannot be a SOCKS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Not SOCKS 4 or 5 (or the wrong version for this step).
    #[error("not a SOCKS request (version byte {0:#04x})")]
    Version(u8),
    /// A SOCKS5 greeting offering no method.
    #[error("the greeting offers no authentication method")]
    NoMethods,
    /// An address type other than IPv4, domain, IPv6.
    #[error("address type {0:#04x} is not supported")]
    AddressType(u8),
    /// A domain name that is empty or not text.
    #[error("the domain name is empty or not valid text")]
    BadDomain,
    /// A user name that is not text.
    #[error("the user name is not valid text")]
    BadUser,
    /// A SOCKS4 user id or domain longer than 255 bytes.
    #[error("a SOCKS4 field is longer than 255 bytes")]
    TooLong,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A name (resolved where the route says) and port.
    Domain(String, u16),
}

impl Addr {
    /// `host:port` as the core routes it.
    pub fn host_port(&self) -> crate::core::addr::HostPort {
        match self {
            Addr::Ip(a) => crate::core::addr::HostPort {
                host: a.ip().to_string(),
                port: a.port(),
            },
            Addr::Domain(h, p) => crate::core::addr::HostPort {
                host: h.clone(),
                port: *p,
            },
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Ip(a) => write!(f, "{a}"),
            Addr::Domain(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// A parse result: the message and how many bytes it took.
pub type Parsed<T> = Result<Option<(T, usize)>, ProtoError>;

/// SOCKS5 greeting: `VER NMETHODS METHODS...`; returns the methods.
pub fn parse_greeting(b: &[u8]) -> Parsed<Vec<u8>> {
    let Some(&ver) = b.first() else {
        return Ok(None);
    };
    if ver != 5 {
        return Err(ProtoError::Version(ver));
    }
    let Some(&n) = b.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(ProtoError::NoMethods);
    }
    let end = 2 + n as usize;
    match b.get(2..end) {
        Some(m) => Ok(Some((m.to_vec(), end))),
        None => Ok(None),
    }
}

/// RFC 1929 credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name (may carry `@vnet`).
    pub user: String,
    /// The password, as sent.
    pub password: Vec<u8>,
}

/// RFC 1929: `VER(1) ULEN UNAME PLEN PASSWD`.
pub fn parse_credentials(b: &[u8]) -> Parsed<Credentials> {
    let Some(&ver) = b.first() else {
        return Ok(None);
    };
    if ver != 1 {
        return Err(ProtoError::Version(ver));
    }
    let Some(&ulen) = b.get(1) else {
        return Ok(None);
    };
    let u_end = 2 + ulen as usize;
    let Some(user) = b.get(2..u_end) else {
        return Ok(None);
    };
    let Some(&plen) = b.get(u_end) else {
        return Ok(None);
    };
    let p_end = u_end + 1 + plen as usize;
    let Some(password) = b.get(u_end + 1..p_end) else {
        return Ok(None);
    };
    let user = std::str::from_utf8(user).map_err(|_| ProtoError::BadUser)?;
    Ok(Some((
        Credentials {
            user: user.to_string(),
            password: password.to_vec(),
        },
        p_end,
    )))
}

/// An address in SOCKS5 form (`ATYP ADDR PORT`) at the start of `b`.
fn parse_addr(b: &[u8]) -> Parsed<Addr> {
    let Some(&atyp) = b.first() else {
        return Ok(None);
    };
    let (addr_len, start) = match atyp {
        ATYP_V4 => (4, 1),
        ATYP_V6 => (16, 1),
        ATYP_DOMAIN => match b.get(1) {
            Some(&0) => return Err(ProtoError::BadDomain),
            Some(&n) => (n as usize, 2),
            None => return Ok(None),
        },
        other => return Err(ProtoError::AddressType(other)),
    };
    let end = start + addr_len + 2;
    let Some(body) = b.get(start..end) else {
        return Ok(None);
    };
    let (raw, port) = body.split_at(addr_len);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let addr = match atyp {
        ATYP_V4 => Addr::Ip(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
            port,
        )),
        ATYP_V6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(raw);
            Addr::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => {
            let name = std::str::from_utf8(raw).map_err(|_| ProtoError::BadDomain)?;
            // A literal address sent as a name is an address.
            match name.parse::<IpAddr>() {
                Ok(ip) => Addr::Ip(SocketAddr::new(ip, port)),
                Err(_) => Addr::Domain(name.to_string(), port),
            }
        }
    };
    Ok(Some((addr, end)))
}

/// A SOCKS5 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command byte ([`CMD_CONNECT`], ...).
    pub cmd: u8,
    /// The destination (for UDP ASSOCIATE: where the client will send from).
    pub dst: Addr,
}

/// SOCKS5 request: `VER CMD RSV ATYP DST.ADDR DST.PORT`.
pub fn parse_request(b: &[u8]) -> Parsed<Request> {
    let Some(&ver) = b.first() else {
        return Ok(None);
    };
    if ver != 5 {
        return Err(ProtoError::Version(ver));
    }
    if b.len() < 3 {
        return Ok(None);
    }
    let cmd = b[1];
    Ok(parse_addr(&b[3..])?.map(|(dst, n)| (Request { cmd, dst }, 3 + n)))
}

/// `ATYP ADDR PORT` for `addr`.
fn encode_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                out.push(ATYP_V4);
                out.extend_from_slice(&v4.octets());
            }
            None => {
                out.push(ATYP_V6);
                out.extend_from_slice(&v6.octets());
            }
        },
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// A SOCKS5 reply with `code` and the bound address (`0.0.0.0:0` if none).
pub fn reply(code: u8, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![5, code, 0];
    encode_addr(
        &mut out,
        bound.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
    );
    out
}

/// A SOCKS4 or SOCKS4a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socks4Request {
    /// The command (1: CONNECT, 2: BIND).
    pub cmd: u8,
    /// The destination (a name with SOCKS4a).
    pub dst: Addr,
    /// The user id field.
    pub user: String,
}

/// SOCKS4: `VN(4) CD DSTPORT DSTIP USERID NUL`, and SOCKS4a's
/// `0.0.0.x` address followed by `DOMAIN NUL`.
pub fn parse_socks4(b: &[u8]) -> Parsed<Socks4Request> {
    let Some(&ver) = b.first() else {
        return Ok(None);
    };
    if ver != 4 {
        return Err(ProtoError::Version(ver));
    }
    if b.len() < 8 {
        return Ok(None);
    }
    let cmd = b[1];
    let port = u16::from_be_bytes([b[2], b[3]]);
    let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
    let nul = |from: usize| -> Result<Option<usize>, ProtoError> {
        match b[from..].iter().position(|&c| c == 0) {
            Some(i) if i > 255 => Err(ProtoError::TooLong),
            Some(i) => Ok(Some(from + i)),
            None if b.len() - from > 255 => Err(ProtoError::TooLong),
            None => Ok(None),
        }
    };
    let Some(user_end) = nul(8)? else {
        return Ok(None);
    };
    let user = std::str::from_utf8(&b[8..user_end])
        .map_err(|_| ProtoError::BadUser)?
        .to_string();
    let octets = ip.octets();
    let socks4a = octets[0] == 0 && octets[1] == 0 && octets[2] == 0 && octets[3] != 0;
    if !socks4a {
        return Ok(Some((
            Socks4Request {
                cmd,
                dst: Addr::Ip(SocketAddr::new(IpAddr::V4(ip), port)),
                user,
            },
            user_end + 1,
        )));
    }
    let Some(name_end) = nul(user_end + 1)? else {
        return Ok(None);
    };
    let name =
        std::str::from_utf8(&b[user_end + 1..name_end]).map_err(|_| ProtoError::BadDomain)?;
    if name.is_empty() {
        return Err(ProtoError::BadDomain);
    }
    let dst = match name.parse::<IpAddr>() {
        Ok(ip) => Addr::Ip(SocketAddr::new(ip, port)),
        Err(_) => Addr::Domain(name.to_string(), port),
    };
    Ok(Some((Socks4Request { cmd, dst, user }, name_end + 1)))
}

/// A SOCKS4 reply: granted (0x5a) or rejected (0x5b).
pub fn socks4_reply(granted: bool) -> [u8; 8] {
    [0, if granted { 0x5a } else { 0x5b }, 0, 0, 0, 0, 0, 0]
}

/// The header of a SOCKS5 UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpHeader {
    /// The fragment number (only 0, unfragmented, is relayed).
    pub frag: u8,
    /// Where the payload goes.
    pub dst: Addr,
}

/// `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`: the header and where the
/// payload starts; `None` if the datagram is too short to hold a header.
pub fn parse_udp(b: &[u8]) -> Result<Option<(UdpHeader, usize)>, ProtoError> {
    if b.len() < 4 {
        return Ok(None);
    }
    Ok(parse_addr(&b[3..])?.map(|(dst, n)| (UdpHeader { frag: b[2], dst }, 3 + n)))
}

/// The header for a datagram relayed back to the client from `src`.
pub fn udp_header(src: SocketAddr) -> Vec<u8> {
    let mut out = vec![0, 0, 0];
    encode_addr(&mut out, src);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_and_credentials() {
        assert_eq!(parse_greeting(&[5]).unwrap(), None);
        assert_eq!(parse_greeting(&[5, 2, 0]).unwrap(), None);
        assert_eq!(
            parse_greeting(&[5, 2, 0, 2, 9]).unwrap(),
            Some((vec![0, 2], 4))
        );
        assert_eq!(parse_greeting(&[4, 1]).unwrap_err(), ProtoError::Version(4));
        assert_eq!(parse_greeting(&[5, 0]).unwrap_err(), ProtoError::NoMethods);
        let c = [1, 5, b'a', b'l', b'i', b'c', b'e', 2, b'p', b'w'];
        let (cred, n) = parse_credentials(&c).unwrap().unwrap();
        assert_eq!(
            (cred.user.as_str(), cred.password.as_slice(), n),
            ("alice", &b"pw"[..], 10)
        );
        for cut in 0..c.len() {
            assert_eq!(parse_credentials(&c[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn requests_of_every_address_type() {
        let v4 = [5, 1, 0, 1, 10, 1, 0, 10, 0, 80];
        let (r, n) = parse_request(&v4).unwrap().unwrap();
        assert_eq!(
            (r.cmd, r.dst.to_string(), n),
            (1, "10.1.0.10:80".into(), 10)
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[1, 187]);
        let (r, _) = parse_request(&v6).unwrap().unwrap();
        assert_eq!(r.dst.to_string(), "[fd00::1]:443");
        let mut dom = vec![5, 1, 0, 3, 5];
        dom.extend_from_slice(b"nginx");
        dom.extend_from_slice(&[0, 80]);
        let (r, n) = parse_request(&dom).unwrap().unwrap();
        assert_eq!((r.dst, n), (Addr::Domain("nginx".into(), 80), dom.len()));
        for cut in 0..dom.len() {
            assert_eq!(parse_request(&dom[..cut]).unwrap(), None);
        }
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0]).unwrap_err(),
            ProtoError::AddressType(9)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]).unwrap_err(),
            ProtoError::BadDomain
        );
    }

    #[test]
    fn replies_encode_the_bound_address() {
        assert_eq!(reply(0, None), vec![5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            reply(5, Some("10.0.0.1:1080".parse().unwrap())),
            vec![5, 5, 0, 1, 10, 0, 0, 1, 4, 56]
        );
        let r = reply(0, Some("[::ffff:10.0.0.1]:1".parse().unwrap()));
        assert_eq!(r[3], 1, "a mapped address is sent as IPv4");
    }

    #[test]
    fn socks4_and_4a() {
        let mut r = vec![4, 1, 0, 80, 10, 1, 0, 10];
        r.extend_from_slice(b"bob\0");
        let (q, n) = parse_socks4(&r).unwrap().unwrap();
        assert_eq!(
            (q.dst.to_string(), q.user.as_str(), n),
            ("10.1.0.10:80".into(), "bob", r.len())
        );
        let mut a = vec![4, 1, 0, 80, 0, 0, 0, 1, 0];
        a.extend_from_slice(b"nginx\0");
        let (q, _) = parse_socks4(&a).unwrap().unwrap();
        assert_eq!(q.dst, Addr::Domain("nginx".into(), 80));
        assert_eq!(parse_socks4(&a[..10]).unwrap(), None);
        let long = [vec![4, 1, 0, 80, 1, 2, 3, 4], vec![b'x'; 300]].concat();
        assert_eq!(parse_socks4(&long).unwrap_err(), ProtoError::TooLong);
    }

    #[test]
    fn udp_headers_round_trip() {
        let src: SocketAddr = "10.1.0.53:53".parse().unwrap();
        let mut d = udp_header(src);
        d.extend_from_slice(b"payload");
        let (h, at) = parse_udp(&d).unwrap().unwrap();
        assert_eq!(
            (h.frag, h.dst, &d[at..]),
            (0, Addr::Ip(src), &b"payload"[..])
        );
        assert_eq!(parse_udp(&[0, 0]).unwrap(), None);
    }
}
