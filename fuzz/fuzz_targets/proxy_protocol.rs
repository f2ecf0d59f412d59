//! PROXY protocol headers from arbitrary bytes: parsing never panics, a
//! whole header never claims more bytes than given (nor more than the
//! limit), and what we encode parses back to the same addresses.

#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use meshgate::core::net::proxy_protocol::{encode, parse, Version, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, n))) = parse(data) {
        assert!(n <= data.len() && n <= MAX_HEADER);
    }
    if data.len() >= 36 {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        a.copy_from_slice(&data[..16]);
        b.copy_from_slice(&data[16..32]);
        let src = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), u16::from_be_bytes([data[32], data[33]]));
        let dst = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), u16::from_be_bytes([data[34], data[35]]));
        for v in [Version::V1, Version::V2] {
            let h = encode(v, src, dst);
            let (got, n) = parse(&h).unwrap().unwrap();
            assert_eq!(n, h.len());
            let canon = |s: SocketAddr| (s.ip().to_canonical(), s.port());
            let (s, d) = got.addrs.unwrap();
            assert_eq!((canon(s), canon(d)), (canon(src), canon(dst)));
        }
    }
});
