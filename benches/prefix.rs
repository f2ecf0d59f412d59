//! `PrefixTable` at scale: build time and lookup cost at 100,000 prefixes
//! (IPv4 and IPv6, lengths spread as real tables are), against the sorted
//! linear scan it replaced, measured in the same run. `bench/prefix.sh`
//! runs it; `cargo bench --bench prefix` does too.
//!
//! Settings: `BENCH_PREFIXES` (default 100000), `BENCH_LOOKUPS` (default
//! 1000000 for the table; the scan gets 1/1000 of them).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use meshgate::core::net::prefix::PrefixTable;

/// A deterministic generator (xorshift), so runs compare.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = env("BENCH_PREFIXES", 100_000);
    let lookups = env("BENCH_LOOKUPS", 1_000_000);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // 3/4 IPv4 with lengths 16..=32 (most /24 and /32), 1/4 IPv6 /48../128.
    let nets: Vec<IpNet> = (0..n)
        .map(|_| {
            let r = rng.next();
            if !r.is_multiple_of(4) {
                let len = [16, 20, 22, 24, 24, 24, 28, 32, 32, 32][(r >> 8) as usize % 10];
                let a = Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
                IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc())
            } else {
                let len = [48, 56, 64, 64, 128][(r >> 8) as usize % 5];
                let a = Ipv6Addr::from((0xfd00u128 << 112) | u128::from(rng.next()) << 32);
                IpNet::V6(Ipv6Net::new(a, len).unwrap().trunc())
            }
        })
        .collect();
    // Half the probes inside a stored prefix, half anywhere in 10/8 or fd00::/16.
    let probes: Vec<IpAddr> = (0..4096)
        .map(|i| {
            let r = rng.next();
            if i % 2 == 0 {
                let net = nets[(r as usize) % nets.len()];
                match net {
                    IpNet::V4(v) => IpAddr::V4(Ipv4Addr::from(
                        u32::from(v.network()) | (rng.next() as u32 & !u32::from(v.netmask())),
                    )),
                    IpNet::V6(v) => IpAddr::V6(v.network()),
                }
            } else if !r.is_multiple_of(4) {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (r as u32 & 0x00ff_ffff)))
            } else {
                IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | u128::from(r) << 32))
            }
        })
        .collect();

    let t = Instant::now();
    let table: PrefixTable<usize> = nets.iter().copied().zip(0..).collect();
    let build = t.elapsed();

    let t = Instant::now();
    let mut scan: Vec<(IpNet, usize)> = nets.iter().copied().zip(0..).collect();
    scan.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
    let scan_build = t.elapsed();

    let t = Instant::now();
    let mut hits = 0usize;
    for i in 0..lookups {
        hits += black_box(table.lookup(probes[i % probes.len()])).is_some() as usize;
    }
    let per_lookup = t.elapsed().as_nanos() as f64 / lookups as f64;

    let scan_lookups = (lookups / 1000).max(100);
    let t = Instant::now();
    let mut scan_hits = 0usize;
    for i in 0..scan_lookups {
        let ip = probes[i % probes.len()];
        scan_hits += black_box(scan.iter().find(|(n, _)| n.contains(&ip))).is_some() as usize;
    }
    let scan_per_lookup = t.elapsed().as_nanos() as f64 / scan_lookups as f64;

    // The two agree on every probe (the scan keeps the first of duplicates
    // as the table does).
    for ip in &probes[..256] {
        let a = table.lookup(*ip).map(|i| nets[*i].trunc());
        let b = scan
            .iter()
            .find(|(n, _)| n.contains(ip))
            .map(|(_, i)| nets[*i].trunc());
        assert_eq!(a.map(|n| n.prefix_len()), b.map(|n| n.prefix_len()), "{ip}");
    }

    println!("prefixes            {n} ({} distinct)", table.len());
    println!(
        "build               PrefixTable {:.1} ms   sorted scan {:.1} ms",
        build.as_secs_f64() * 1e3,
        scan_build.as_secs_f64() * 1e3
    );
    println!(
        "lookup              PrefixTable {per_lookup:.0} ns   sorted scan {scan_per_lookup:.0} ns   ratio {:.0}x",
        scan_per_lookup / per_lookup
    );
    println!(
        "hit rate            {:.0}% (scan sample {:.0}%)",
        100.0 * hits as f64 / lookups as f64,
        100.0 * scan_hits as f64 / scan_lookups as f64
    );
}
