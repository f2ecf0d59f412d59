//! Connection tests on the simulated path.

use std::time::Duration;

use super::cc::Algorithm::{self, Bbr, Cubic};
use super::sim::{config, transfer, Pair, PathSpec};
use super::socket::State;

fn run(spec: PathSpec, cc: Algorithm, bytes: usize, seed: u64) -> (f64, Pair) {
    let mut p = Pair::connect(spec, config(4 << 20, cc), seed);
    let mbps = transfer(&mut p, bytes, Duration::from_secs(300));
    eprintln!("{spec:?} {cc:?}: {mbps:.1} Mbit/s, {:?}", p.client.stats());
    (mbps, p)
}

#[test]
fn clean_path_fills_the_pipe() {
    for cc in [Cubic, Bbr] {
        let (mbps, _) = run(PathSpec::new(10, 200.0, 0.0), cc, 50 << 20, 1);
        assert!(mbps > 150.0, "{cc:?}: {mbps}");
    }
}

#[test]
fn half_percent_loss() {
    // Cubic's bound here (Mathis: 1.22·MSS/(RTT·√p)) is about 9.7 Mbit/s.
    let (cubic, _) = run(PathSpec::new(10, 200.0, 0.005), Cubic, 20 << 20, 2);
    assert!(cubic > 8.0, "{cubic}");
    // BBR does not take random loss for congestion.
    let (bbr, _) = run(PathSpec::new(10, 200.0, 0.005), Bbr, 50 << 20, 2);
    assert!(bbr > 100.0, "{bbr}");
}

#[test]
fn close_both_ways() {
    let mut p = Pair::connect(PathSpec::new(1, 100.0, 0.0), config(1 << 16, Bbr), 3);
    transfer(&mut p, 100_000, Duration::from_secs(10));
    p.client.close();
    assert!(p.run(Duration::from_secs(5), |p| p.server.state()
        == State::CloseWait));
    p.server.close();
    assert!(p.run(Duration::from_secs(5), |p| p.server.is_done()
        && p.client.state() == State::TimeWait));
}
