//! [`PrefixTable`]: longest-prefix match over IPv4 and IPv6 networks, the
//! one implementation behind the router's CIDR routes, a vnet stack's links
//! and WireGuard's allowed IPs (cryptokey routing).
//!
//! One hash map per prefix length that holds entries, searched from the
//! longest length present to the shortest: a lookup costs at most one probe
//! per distinct length (33 for IPv4, 129 for IPv6; a few in practice),
//! whatever the number of prefixes, and building is linear. `bench/prefix.sh`
//! measures both at 100,000 prefixes against the sorted linear scan it
//! replaced.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Networks mapped to values, looked up by the longest prefix holding an
/// address. A network is stored truncated (`10.1.2.3/16` is `10.1.0.0/16`).
#[derive(Clone)]
pub struct PrefixTable<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        PrefixTable {
            v4: Family::new(),
            v6: Family::new(),
        }
    }
}

impl<T> PrefixTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the value of `net`, returning the one it replaces.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// Sets the value of `net` unless it has one: the first of several
    /// entries for one network wins (configuration order). True if set.
    pub fn insert_first(&mut self, net: IpNet, value: T) -> bool {
        if self.get(net).is_some() {
            return false;
        }
        self.insert(net, value);
        true
    }

    /// Removes `net` (exactly this prefix), returning its value.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net {
            IpNet::V4(n) => self.v4.remove(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.addr()), n.prefix_len()),
        }
    }

    /// The value of exactly `net`.
    pub fn get(&self, net: IpNet) -> Option<&T> {
        match net {
            IpNet::V4(n) => self.v4.get(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => self.v6.get(u128::from(n.addr()), n.prefix_len()),
        }
    }

    /// The longest network holding `ip`, and its value.
    pub fn longest_match(&self, ip: IpAddr) -> Option<(IpNet, &T)> {
        match ip {
            IpAddr::V4(a) => self.v4.longest(u32::from(a)).map(|(k, len, v)| {
                let net = Ipv4Net::new(Ipv4Addr::from(k), len).expect("stored length is valid");
                (IpNet::V4(net), v)
            }),
            IpAddr::V6(a) => self.v6.longest(u128::from(a)).map(|(k, len, v)| {
                let net = Ipv6Net::new(Ipv6Addr::from(k), len).expect("stored length is valid");
                (IpNet::V6(net), v)
            }),
        }
    }

    /// The value of the longest network holding `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        self.longest_match(ip).map(|(_, v)| v)
    }

    /// Number of networks.
    pub fn len(&self) -> usize {
        self.v4.len + self.v6.len
    }

    /// True when no network is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every (network, value), longest prefixes first (IPv4 before IPv6);
    /// the order within one length is unspecified.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> + '_ {
        let v4 = self.v4.iter().map(|(k, len, v)| {
            let net = Ipv4Net::new(Ipv4Addr::from(k), len).expect("stored length is valid");
            (IpNet::V4(net), v)
        });
        let v6 = self.v6.iter().map(|(k, len, v)| {
            let net = Ipv6Net::new(Ipv6Addr::from(k), len).expect("stored length is valid");
            (IpNet::V6(net), v)
        });
        v4.chain(v6)
    }
}

/// Collects with [`PrefixTable::insert_first`]: the first value given for
/// a network wins.
impl<T> FromIterator<(IpNet, T)> for PrefixTable<T> {
    fn from_iter<I: IntoIterator<Item = (IpNet, T)>>(iter: I) -> Self {
        let mut t = PrefixTable::new();
        for (net, v) in iter {
            t.insert_first(net, v);
        }
        t
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for PrefixTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// An address family's integer form.
trait Bits: Copy + Eq + std::hash::Hash {
    /// The address with only its first `len` bits kept.
    fn masked(self, len: u8) -> Self;
}

impl Bits for u32 {
    fn masked(self, len: u8) -> Self {
        match len {
            0 => 0,
            l => self & (u32::MAX << (32 - u32::from(l))),
        }
    }
}

impl Bits for u128 {
    fn masked(self, len: u8) -> Self {
        match len {
            0 => 0,
            l => self & (u128::MAX << (128 - u32::from(l))),
        }
    }
}

/// One family's maps, by prefix length: only the lengths that hold
/// entries, longest first (an empty table allocates nothing; 100,000
/// WireGuard instances each hold two).
#[derive(Clone)]
struct Family<K, T> {
    by_len: Vec<(u8, HashMap<K, T, AddrHash>)>,
    len: usize,
}

impl<K: Bits, T> Family<K, T> {
    fn new() -> Self {
        Family {
            by_len: Vec::new(),
            len: 0,
        }
    }

    /// Where the map of `len` is, or would go.
    fn find(&self, len: u8) -> Result<usize, usize> {
        self.by_len.binary_search_by(|(l, _)| len.cmp(l))
    }

    fn insert(&mut self, addr: K, len: u8, value: T) -> Option<T> {
        let at = match self.find(len) {
            Ok(at) => at,
            Err(at) => {
                self.by_len.insert(at, (len, HashMap::default()));
                at
            }
        };
        let old = self.by_len[at].1.insert(addr.masked(len), value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    fn remove(&mut self, addr: K, len: u8) -> Option<T> {
        let at = self.find(len).ok()?;
        let old = self.by_len[at].1.remove(&addr.masked(len));
        if old.is_some() {
            self.len -= 1;
            if self.by_len[at].1.is_empty() {
                self.by_len.remove(at);
            }
        }
        old
    }

    fn get(&self, addr: K, len: u8) -> Option<&T> {
        let at = self.find(len).ok()?;
        self.by_len[at].1.get(&addr.masked(len))
    }

    fn longest(&self, addr: K) -> Option<(K, u8, &T)> {
        self.by_len.iter().find_map(|(len, map)| {
            let k = addr.masked(*len);
            map.get(&k).map(|v| (k, *len, v))
        })
    }

    fn iter(&self) -> impl Iterator<Item = (K, u8, &T)> + '_ {
        self.by_len
            .iter()
            .flat_map(|(len, map)| map.iter().map(move |(k, v)| (*k, *len, v)))
    }
}

/// Keys are masked addresses from the operator's config (lookups insert
/// nothing), so a fast multiplicative hash serves; no one outside the
/// config chooses what collides.
type AddrHash = BuildHasherDefault<MulHasher>;

#[derive(Default)]
struct MulHasher(u64);

impl Hasher for MulHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let t: PrefixTable<&str> = [
            (net("0.0.0.0/0"), "default"),
            (net("10.0.0.0/8"), "ten"),
            (net("10.1.0.0/16"), "ten-one"),
            (net("10.1.2.3/32"), "host"),
            (net("::/0"), "v6-default"),
            (net("fd00::/8"), "ula"),
            (net("fd00:1::/32"), "ula-1"),
        ]
        .into_iter()
        .collect();
        assert_eq!(t.len(), 7);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&"host"));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(&"ten-one"));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&"ten"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default"));
        assert_eq!(
            t.longest_match(ip("10.1.9.9")),
            Some((net("10.1.0.0/16"), &"ten-one"))
        );
        assert_eq!(t.lookup(ip("fd00:1::5")), Some(&"ula-1"));
        assert_eq!(t.lookup(ip("fd00:2::5")), Some(&"ula"));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(&"v6-default"));
        // An IPv4-mapped IPv6 address is IPv6: the families never mix.
        assert_eq!(t.lookup(ip("::ffff:10.1.2.3")), Some(&"v6-default"));
    }

    #[test]
    fn first_wins_truncates_and_removes() {
        let mut t: PrefixTable<u32> = [(net("10.1.2.3/16"), 1), (net("10.1.0.0/16"), 2)]
            .into_iter()
            .collect();
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(net("10.1.0.0/16")), Some(&1));
        assert_eq!(t.insert(net("10.1.0.0/16"), 3), Some(1));
        assert_eq!(t.lookup(ip("10.1.200.1")), Some(&3));
        assert!(t.lookup(ip("10.2.0.1")).is_none());
        assert_eq!(t.remove(net("10.1.0.0/16")), Some(3));
        assert!(t.is_empty());
        assert!(t.lookup(ip("10.1.200.1")).is_none());
        assert_eq!(t.remove(net("10.1.0.0/16")), None);
    }

    /// The sorted linear scan every user had before, as the oracle.
    fn linear(nets: &[(IpNet, usize)], ip: IpAddr) -> Option<usize> {
        let mut sorted: Vec<(IpNet, usize)> = Vec::new();
        for (n, v) in nets {
            if !sorted.iter().any(|(m, _)| *m == n.trunc()) {
                sorted.push((n.trunc(), *v));
            }
        }
        sorted.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        sorted
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, v)| *v)
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(a & 0xff0f_00ff), l).unwrap()
            )),
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(a & (0xfd00u128 << 112 | 0xff)), l).unwrap()
            )),
        ]
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a & 0xff0f_00ff))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a & (0xfd00u128 << 112 | 0xff)))),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_the_linear_scan(
            nets in proptest::collection::vec(arb_net(), 0..40),
            ips in proptest::collection::vec(arb_ip(), 1..40),
        ) {
            let indexed: Vec<(IpNet, usize)> = nets.iter().copied().zip(0..).collect();
            let t: PrefixTable<usize> = indexed.iter().copied().collect();
            for ip in ips {
                prop_assert_eq!(t.lookup(ip).copied(), linear(&indexed, ip), "{}", ip);
            }
        }
    }
}
