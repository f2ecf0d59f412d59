//! Connection tests on the simulated path.

use std::time::Duration;

use super::sim::{config, transfer, Pair, PathSpec};
use super::socket::State;

#[test]
fn clean_path_fills_the_pipe() {
    let mut p = Pair::connect(PathSpec::new(10, 200.0, 0.0), config(4 << 20), 1);
    let mbps = transfer(&mut p, 50 << 20, Duration::from_secs(60));
    eprintln!(
        "clean 10ms 200Mbps: {mbps:.1} Mbit/s, retransmits {:?}",
        p.client.stats()
    );
    assert!(mbps > 150.0, "{mbps}");
}

#[test]
fn half_percent_loss() {
    let mut p = Pair::connect(PathSpec::new(10, 200.0, 0.005), config(4 << 20), 2);
    let mbps = transfer(&mut p, 20 << 20, Duration::from_secs(120));
    eprintln!(
        "0.5% loss 10ms 200Mbps: {mbps:.1} Mbit/s, {:?}",
        p.client.stats()
    );
    // Cubic's bound here (Mathis: 1.22·MSS/(RTT·√p)) is about 9.7 Mbit/s.
    assert!(mbps > 8.0, "{mbps}");
}

#[test]
fn close_both_ways() {
    let mut p = Pair::connect(PathSpec::new(1, 100.0, 0.0), config(1 << 16), 3);
    transfer(&mut p, 100_000, Duration::from_secs(10));
    p.client.close();
    assert!(p.run(Duration::from_secs(5), |p| p.server.state()
        == State::CloseWait));
    p.server.close();
    assert!(p.run(Duration::from_secs(5), |p| p.server.is_done()
        && p.client.state() == State::TimeWait));
}
