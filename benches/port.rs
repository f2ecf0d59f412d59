//! A shared WireGuard port at scale ([`meshgate::modules::wireguard::port`]):
//! with 100,000 instances on one port, what joining them costs, and what
//! routing one datagram costs: data by session index, an initiation whose
//! source has a hint (one MAC1 check), and the worst case, an initiation
//! for the last instance with no hint (a scan of every MAC1). The baseline
//! measured in the same run is one MAC1 check; a scan should cost the
//! number of instances times it. `bench/port.sh` runs it.
//!
//! Settings: `BENCH_MEMBERS` (default 100000), `BENCH_ROUTES` (default
//! 1000000 data routes; initiations get 1/10, scans 1/10,000 of them).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshgate::modules::wireguard::port::{
    mac1_key, mac1_matches, stamp_mac1, Route, Router, SCAN_RATE,
};

/// A deterministic generator (xorshift), so runs compare.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn key(&mut self) -> [u8; 32] {
        let mut k = [0u8; 32];
        for c in k.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        k
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn per(d: Duration, n: usize) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn main() {
    let members = env("BENCH_MEMBERS", 100_000).max(2);
    let routes = env("BENCH_ROUTES", 1_000_000).max(10_000);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t0 = Instant::now();
    // A budget that never runs out here: the scan itself is measured.
    let mut router: Router<usize> = Router::new(t0, f64::MAX);
    let keys: Vec<[u8; 32]> = (0..members).map(|_| rng.key()).collect();

    let start = Instant::now();
    let mut sessions = Vec::with_capacity(members);
    for (i, k) in keys.iter().enumerate() {
        let id = router.join(k).expect("distinct keys");
        router.attach(id, i);
        sessions.push(router.new_session(id, t0, || rng.next() as u32));
    }
    let joined = start.elapsed();

    let src: SocketAddr = "198.51.100.1:40000".parse().unwrap();
    let data: Vec<Vec<u8>> = sessions
        .iter()
        .take(1024)
        .map(|s| {
            let mut d = vec![4u8; 48];
            d[4..8].copy_from_slice(&(s << 8 | 1).to_le_bytes());
            d
        })
        .collect();
    let start = Instant::now();
    for i in 0..routes {
        black_box(router.route(t0, &data[i % data.len()], src));
    }
    let by_index = start.elapsed();

    // An initiation for the last member (the end of the scan order).
    let mut init = vec![0u8; 148];
    init[0] = 1;
    for b in &mut init[4..116] {
        *b = rng.next() as u8;
    }
    stamp_mac1(&keys[members - 1], &mut init);
    let scans = (routes / 10_000).max(3);
    let start = Instant::now();
    for i in 0..scans {
        // A new source each time: no hint.
        let from = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1));
        let (route, checks) = router.route(t0, &init, from);
        assert_eq!(route, Route::To(members - 1));
        assert_eq!(checks as usize, members);
    }
    let scanned = start.elapsed();

    let hinted_n = routes / 10;
    let start = Instant::now();
    for _ in 0..hinted_n {
        let (route, checks) = router.route(t0, &init, SocketAddr::from(([10, 0, 0, 0], 1)));
        debug_assert!(checks == 1 && route == Route::To(members - 1));
        black_box(route);
    }
    let hinted = start.elapsed();

    // The baseline: one MAC1 check alone.
    let key = mac1_key(&rng.key());
    let start = Instant::now();
    for _ in 0..hinted_n {
        black_box(mac1_matches(black_box(&key), black_box(&init)));
    }
    let mac1_ns = per(start.elapsed(), hinted_n);

    let scan_ns = per(scanned, scans);
    println!("shared port, {members} instances");
    println!(
        "  join + one session each:  {:>10.1} ms ({:.2} µs each)",
        joined.as_secs_f64() * 1e3,
        per(joined, members) / 1e3
    );
    println!(
        "  data by session index:    {:>10.0} ns",
        per(by_index, routes)
    );
    println!(
        "  initiation, hinted:       {:>10.0} ns",
        per(hinted, hinted_n)
    );
    println!("  initiation, full scan:    {:>10.2} ms", scan_ns / 1e6);
    println!("  one MAC1 check (baseline):{:>10.0} ns", mac1_ns);
    println!(
        "  scan / (instances x MAC1): {:>9.2}x  (1.00 = the scan costs its checks, nothing more)",
        scan_ns / (members as f64 * mac1_ns)
    );
    println!(
        "  scans a second at the default budget ({} checks/s): {:.1}",
        SCAN_RATE,
        SCAN_RATE / members as f64
    );
}
