//! Resolving names inside a vnet: a small DNS client over TCP (RFC 1035,
//! RFC 7766), so a query can travel any stream a connector dials (a
//! WireGuard peer's network, later a gateway link) and the name is resolved
//! by the DNS server on the far side, never by the host's resolver.
//!
//! [`encode_query`] and [`parse_response`] are sans-IO and never panic on
//! bad input; [`resolve_over`] runs one A query (then AAAA if there is no
//! IPv4 answer) on a connected stream.

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
