//! Resolving names inside a vnet: a small DNS client over TCP (RFC 1035,
//! RFC 7766), so a query can travel any stream a connector dials (a
//! WireGuard peer's network, later a gateway link) and the name is resolved
//! by the DNS server on the far side, never by the host's resolver.
//!
//! [`encode_query`] and [`parse_response`] are sans-IO and never panic on
//! bad input; [`resolve_over`] runs one A query (then AAAA if there is no
//! IPv4 answer) on a connected stream.
//!
//! The server side, for a stub that answers a namespace's programs (`kind:
//! netns`): [`parse_query`] reads one question, [`encode_reply`] answers it
//! and [`encode_error`] answers what cannot be read; sans-IO, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::core::net::proxy::{AsyncStream, Stream};

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;

/// Why a name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name cannot be put in a query.
    #[error("`{0}` is not a host name that DNS can carry")]
    BadName(String),
    /// The server's answer is not a valid DNS message for our query.
    #[error("malformed DNS answer: {0}")]
    Malformed(&'static str),
    /// The server answered with an error code (3: no such name).
    #[error("the DNS server answered rcode {0}{note}", note = if *.0 == 3 { " (no such name)" } else { "" })]
    Rcode(u8),
    /// No address in the answer.
    #[error("no address for the name")]
    NoAddress,
    /// The connection failed or timed out.
    #[error("DNS over TCP: {0}")]
    Io(String),
}

/// A query for `name` of type `qtype` with id `id`, without the TCP length prefix.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, DnsError> {
    let name = name.trim_end_matches('.');
    let bad = || DnsError::BadName(name.to_string());
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // recursion desired
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 || !label.is_ascii() {
            return Err(bad());
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // class IN
    Ok(q)
}

/// Skips a (possibly compressed) name starting at `at`; returns the offset after it.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize, DnsError> {
    for _ in 0..128 {
        let len = *msg
            .get(at)
            .ok_or(DnsError::Malformed("name past the end"))?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => {
                msg.get(at + 1)
                    .ok_or(DnsError::Malformed("pointer past the end"))?;
                return Ok(at + 2);
            }
            l if l & 0xc0 == 0 => at += 1 + l as usize,
            _ => return Err(DnsError::Malformed("reserved label type")),
        }
    }
    Err(DnsError::Malformed("name too long"))
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    msg.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DnsError::Malformed("truncated"))
}

/// The addresses of type `qtype` in a response to query `id`.
pub fn parse_response(msg: &[u8], id: u16, qtype: u16) -> Result<Vec<IpAddr>, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Malformed("shorter than a header"));
    }
    if u16_at(msg, 0)? != id {
        return Err(DnsError::Malformed("answer to another query"));
    }
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Malformed("not a response"));
    }
    let rcode = (flags & 0x000f) as u8;
    if rcode != 0 {
        return Err(DnsError::Rcode(rcode));
    }
    let (qd, an) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(msg, at)?;
        let rtype = u16_at(msg, at)?;
        let rdlen = u16_at(msg, at + 8)? as usize;
        let data = msg
            .get(at + 10..at + 10 + rdlen)
            .ok_or(DnsError::Malformed("record past the end"))?;
        match (rtype, rdlen) {
            (TYPE_A, 4) if qtype == TYPE_A => out.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            ))),
            (TYPE_AAAA, 16) if qtype == TYPE_AAAA => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                out.push(IpAddr::V6(Ipv6Addr::from(b)));
            }
            _ => {} // CNAMEs and the like: the server follows them for us
        }
        at += 10 + rdlen;
    }
    Ok(out)
}

/// Record class IN.
pub const CLASS_IN: u16 = 1;
/// Response code: the query cannot be read.
pub const RCODE_FORMERR: u8 = 1;
/// Response code: the server failed.
pub const RCODE_SERVFAIL: u8 = 2;
/// Response code: no such name.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Response code: this kind of query is not implemented.
pub const RCODE_NOTIMP: u8 = 4;
/// Response code: refused by policy.
pub const RCODE_REFUSED: u8 = 5;

/// One question a DNS client asked ([`parse_query`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The query's id, which the answer repeats.
    pub id: u16,
    /// Recursion desired, which the answer repeats.
    pub recursion_desired: bool,
    /// The name asked for: lower case, without the final dot, labels of
    /// letters, digits, `-` and `_` only.
    pub name: String,
    /// Record type asked for ([`TYPE_A`], [`TYPE_AAAA`], ...).
    pub qtype: u16,
    /// Record class asked for ([`CLASS_IN`]).
    pub qclass: u16,
}

/// Reads a standard query with one question (RFC 1035 4.1; an EDNS record
/// in the additional section is ignored). Names with bytes other than
/// letters, digits, `-` and `_`, compressed names and other opcodes are
/// errors; [`encode_error`] answers them.
pub fn parse_query(msg: &[u8]) -> Result<Question, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Malformed("shorter than a header"));
    }
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 != 0 {
        return Err(DnsError::Malformed("a response, not a query"));
    }
    if (flags >> 11) & 0xf != 0 {
        return Err(DnsError::Malformed("not a standard query"));
    }
    if u16_at(msg, 4)? != 1 {
        return Err(DnsError::Malformed("not exactly one question"));
    }
    if u16_at(msg, 6)? != 0 || u16_at(msg, 8)? != 0 {
        return Err(DnsError::Malformed("a query with answers"));
    }
    let mut at = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(
            *msg.get(at)
                .ok_or(DnsError::Malformed("name past the end"))?,
        );
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return Err(DnsError::Malformed(
                "compressed or overlong label in a question",
            ));
        }
        let label = msg
            .get(at..at + len)
            .ok_or(DnsError::Malformed("label past the end"))?;
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return Err(DnsError::BadName(
                String::from_utf8_lossy(label).escape_default().to_string(),
            ));
        }
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        if name.len() > 253 {
            return Err(DnsError::Malformed("name longer than 253 bytes"));
        }
        at += len;
    }
    let qtype = u16_at(msg, at)?;
    let qclass = u16_at(msg, at + 2)?;
    Ok(Question {
        id,
        recursion_desired: flags & 0x0100 != 0,
        name,
        qtype,
        qclass,
    })
}

/// The answer to `q`: `rcode`, and one record per address of the type
/// asked (others are left out), each with `ttl` seconds.
pub fn encode_reply(q: &Question, addrs: &[IpAddr], ttl: u32, rcode: u8) -> Vec<u8> {
    let records: Vec<&IpAddr> = addrs
        .iter()
        .filter(|a| match q.qtype {
            TYPE_A => a.is_ipv4(),
            TYPE_AAAA => a.is_ipv6(),
            _ => false,
        })
        .collect();
    let mut r = Vec::with_capacity(32 + q.name.len() + records.len() * 28);
    r.extend_from_slice(&q.id.to_be_bytes());
    // QR, RD as asked, RA, the code.
    let flags = 0x8080 | if q.recursion_desired { 0x0100 } else { 0 } | u16::from(rcode & 0xf);
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(records.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    if q.name.is_empty() {
        r.push(0);
    } else {
        for label in q.name.split('.') {
            r.push(label.len() as u8);
            r.extend_from_slice(label.as_bytes());
        }
        r.push(0);
    }
    r.extend_from_slice(&q.qtype.to_be_bytes());
    r.extend_from_slice(&q.qclass.to_be_bytes());
    for a in records {
        // The name: a pointer to the question's.
        r.extend_from_slice(&[0xc0, 12]);
        let (rtype, data): (u16, Vec<u8>) = match a {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
    }
    r
}

/// An answer with code `rcode` and no question to a message
/// [`parse_query`] refused; `None` for one too short to have an id, or a
/// response (never answer an answer).
pub fn encode_error(msg: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None;
    }
    let mut r = vec![0u8; 12];
    r[..2].copy_from_slice(&msg[..2]);
    // QR, the opcode and RD as asked, RA, the code.
    r[2] = 0x80 | (msg[2] & 0x79);
    r[3] = 0x80 | (rcode & 0xf);
    Some(r)
}

async fn exchange(
    stream: &mut Box<dyn AsyncStream>,
    id: u16,
    name: &str,
    qtype: u16,
) -> Result<Vec<IpAddr>, DnsError> {
    let io = |e: std::io::Error| DnsError::Io(e.to_string());
    let q = encode_query(id, name, qtype)?;
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    stream.write_all(&framed).await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut msg).await.map_err(io)?;
    parse_response(&msg, id, qtype)
}

/// Resolves `name` on a stream connected to a DNS server (port 53/TCP):
/// its A records, else its AAAA records.
pub async fn resolve_over(
    stream: Stream,
    name: &str,
    timeout: Duration,
) -> Result<Vec<IpAddr>, DnsError> {
    let mut stream = stream.into_io();
    let id = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        & 0xffff) as u16;
    let work = async {
        let v4 = exchange(&mut stream, id, name, TYPE_A).await?;
        if !v4.is_empty() {
            return Ok(v4);
        }
        let v6 = exchange(&mut stream, id.wrapping_add(1), name, TYPE_AAAA).await?;
        if v6.is_empty() {
            Err(DnsError::NoAddress)
        } else {
            Ok(v6)
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DnsError::Io(format!("no answer within {timeout:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_read_and_answered_parses_back() {
        let q = encode_query(0x1234, "NGINX.corp.", TYPE_A).unwrap();
        let question = parse_query(&q).unwrap();
        assert_eq!(
            question,
            Question {
                id: 0x1234,
                recursion_desired: true,
                name: "nginx.corp".into(),
                qtype: TYPE_A,
                qclass: CLASS_IN,
            }
        );
        let addrs: Vec<IpAddr> = vec!["198.18.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let r = encode_reply(&question, &addrs, 5, 0);
        assert_eq!(parse_response(&r, 0x1234, TYPE_A).unwrap(), vec![addrs[0]]);
        // AAAA: only the IPv6 address; none is an empty answer, not an error.
        let q6 = Question {
            qtype: TYPE_AAAA,
            ..question.clone()
        };
        let r = encode_reply(&q6, &addrs, 5, 0);
        assert_eq!(
            parse_response(&r, 0x1234, TYPE_AAAA).unwrap(),
            vec![addrs[1]]
        );
        let r = encode_reply(&q6, &addrs[..1], 5, 0);
        assert_eq!(
            parse_response(&r, 0x1234, TYPE_AAAA).unwrap(),
            Vec::<IpAddr>::new()
        );
        let r = encode_reply(&question, &[], 5, RCODE_NXDOMAIN);
        assert_eq!(parse_response(&r, 0x1234, TYPE_A), Err(DnsError::Rcode(3)));
    }

    #[test]
    fn bad_queries_are_errors_and_get_a_header_back() {
        let q = encode_query(7, "a.b", TYPE_A).unwrap();
        let mut response = q.clone();
        response[2] |= 0x80;
        let mut two = q.clone();
        two[5] = 2;
        let mut pointer = q.clone();
        pointer[12] = 0xc0;
        let mut odd = q.clone();
        odd[13] = b'<';
        let mut opcode = q.clone();
        opcode[2] |= 0x10;
        for (what, m) in [
            ("short", &q[..11]),
            ("response", &response[..]),
            ("two questions", &two[..]),
            ("pointer", &pointer[..]),
            ("odd byte", &odd[..]),
            ("opcode", &opcode[..]),
            ("truncated", &q[..q.len() - 1]),
        ] {
            assert!(parse_query(m).is_err(), "{what}");
        }
        assert_eq!(encode_error(&q[..11], RCODE_FORMERR), None);
        assert_eq!(encode_error(&response, RCODE_FORMERR), None);
        let e = encode_error(&opcode, RCODE_NOTIMP).unwrap();
        assert_eq!(e.len(), 12);
        assert_eq!(
            parse_response(&e, 7, TYPE_A),
            Err(DnsError::Rcode(RCODE_NOTIMP))
        );
    }

    /// A response to `query` with the given A records (name compressed).
    fn answer(query: &[u8], addrs: &[[u8; 4]], rcode: u8) -> Vec<u8> {
        let mut r = query.to_vec();
        r[2] = 0x81;
        r[3] = 0x80 | rcode;
        r[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
        for a in addrs {
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(a);
        }
        r
    }

    #[test]
    fn query_and_answer_round_trip() {
        let q = encode_query(0x1234, "nginx.sydney.internal", TYPE_A).unwrap();
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(q[12], 5);
        assert_eq!(&q[13..18], b"nginx");
        let r = answer(&q, &[[10, 1, 0, 10], [10, 1, 0, 11]], 0);
        assert_eq!(
            parse_response(&r, 0x1234, TYPE_A).unwrap(),
            vec![IpAddr::from([10, 1, 0, 10]), IpAddr::from([10, 1, 0, 11])]
        );
        assert_eq!(
            parse_response(&r, 0x1235, TYPE_A),
            Err(DnsError::Malformed("answer to another query"))
        );
        let nx = answer(&q, &[], 3);
        assert_eq!(parse_response(&nx, 0x1234, TYPE_A), Err(DnsError::Rcode(3)));
        assert!(DnsError::Rcode(3).to_string().contains("no such name"));
    }

    #[test]
    fn bad_names_and_garbage_never_panic() {
        assert!(encode_query(1, "", TYPE_A).is_err());
        assert!(encode_query(1, "a..b", TYPE_A).is_err());
        assert!(encode_query(1, &"x".repeat(64), TYPE_A).is_err());
        let q = encode_query(7, "a.b", TYPE_A).unwrap();
        let r = answer(&q, &[[1, 2, 3, 4]], 0);
        for cut in 0..r.len() {
            let _ = parse_response(&r[..cut], 7, TYPE_A);
        }
        // A pointer loop is bounded.
        let mut evil = r.clone();
        evil.truncate(12);
        evil[4..6].copy_from_slice(&[0, 1]);
        evil.extend_from_slice(&[0xc0, 12]);
        let _ = parse_response(&evil, 7, TYPE_A);
        for i in 0..200u8 {
            let mut junk = r.clone();
            let n = junk.len();
            junk[(i as usize * 7) % n] ^= i;
            let _ = parse_response(&junk, 7, TYPE_A);
        }
    }
}
