//! Connection tests on the simulated path.

use std::time::Duration;

use super::cc::Algorithm::{self, Bbr, Cubic};
use super::sim::{config, transfer, Pair, PathSpec, Stream};
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

#[test]
fn reordering_is_not_taken_for_loss() {
    // Up to 3 ms of random extra delay each way on a 10 ms path: packets
    // and ACKs overtake each other all the time. The first spurious
    // retransmissions widen RACK's reordering window, after which hardly
    // anything is sent twice that was not lost, and the path stays full.
    let mut spec = PathSpec::new(10, 100.0, 0.0);
    spec.jitter = Duration::from_millis(3);
    let (mbps, p) = run(spec, Bbr, 20 << 20, 4);
    let st = p.client.stats();
    assert!(mbps > 80.0, "{mbps}");
    assert_eq!(st.timeouts, 0, "{st:?}");
    let spurious = st.retransmits.saturating_sub(p.up.dropped);
    assert!(
        spurious < 100,
        "{spurious} spurious retransmissions: {st:?}, {} dropped",
        p.up.dropped
    );
}

#[test]
fn a_blackout_is_survived_by_timeouts_and_backoff() {
    let mut p = Pair::connect(PathSpec::new(5, 100.0, 0.0), config(1 << 20, Cubic), 5);
    assert!(p.established());
    let total = 4 << 20;
    let mut stream = Stream::default();
    let t0 = p.now;
    let mut blackout_done = false;
    let ok = p.run(Duration::from_secs(60), |p| {
        let elapsed = p.now.duration_since(t0);
        if !blackout_done && elapsed > Duration::from_millis(100) {
            let loss = if elapsed < Duration::from_millis(1600) {
                1.0
            } else {
                0.0
            };
            p.up.set_loss(loss);
            p.down.set_loss(loss);
            blackout_done = loss == 0.0;
        }
        stream.step(p, total)
    });
    assert!(ok, "{} of {total}", stream.read);
    let st = p.client.stats();
    assert!(
        st.timeouts >= 2,
        "1.5 s of blackout takes several timeouts: {st:?}"
    );
    assert_eq!(p.client.state(), State::Established);
}

#[test]
fn a_lost_tail_is_probed_before_the_timeout() {
    // A 10-segment reply whose last segment is lost: the tail loss probe
    // repairs it after about two RTTs, without a retransmission timeout.
    let mut p = Pair::connect(PathSpec::new(20, 100.0, 0.0), config(1 << 20, Bbr), 6);
    assert!(p.established());
    let mss = p.client.mss();
    let data = super::sim::pattern(0, 10 * mss);
    assert_eq!(p.client.send_slice(&data).unwrap(), data.len());
    // Let the first nine through, lose the tenth.
    let mut sent = 0;
    let mut buf = Vec::new();
    let now = p.now;
    while p.client.poll_transmit(now, &mut buf) {
        sent += 1;
        let packet = std::mem::take(&mut buf);
        if sent < 10 {
            p.up.send(now, packet, &mut p.rng);
        }
    }
    assert_eq!(sent, 10);
    let t0 = p.now;
    let mut got = vec![0u8; data.len()];
    let mut read = 0;
    assert!(p.run(Duration::from_secs(5), |p| {
        read += p.server.recv_slice(&mut got[read..]).unwrap();
        read == got.len()
    }));
    assert_eq!(got, data);
    let st = p.client.stats();
    assert_eq!((st.probes, st.timeouts), (1, 0), "{st:?}");
    let took = p.now.duration_since(t0);
    assert!(took < Duration::from_millis(200), "repaired after {took:?}");
}

#[test]
fn a_full_receiver_stalls_the_sender_until_it_reads() {
    let mut p = Pair::connect(PathSpec::new(2, 100.0, 0.0), config(64 * 1024, Cubic), 7);
    assert!(p.established());
    let data = super::sim::pattern(0, 1 << 20);
    let mut written = 0;
    // The receiver does not read: 64 KiB arrive, then the window is shut.
    p.run(Duration::from_secs(3), |p| {
        written += p.client.send_slice(&data[written..]).unwrap();
        false
    });
    assert!(p.server.can_recv());
    let mut first = vec![0u8; 1 << 20];
    let n = p.server.recv_slice(&mut first).unwrap();
    assert_eq!(n, 64 * 1024, "exactly the window arrived");
    // Reading opens the window; the rest follows.
    let mut read = n;
    assert!(p.run(Duration::from_secs(10), |p| {
        written += p.client.send_slice(&data[written..]).unwrap();
        read += p.server.recv_slice(&mut first[read..]).unwrap();
        read == data.len()
    }));
    assert_eq!(first, data);
}

#[test]
fn reset_refusal_and_lost_syns() {
    // An abort reaches the peer as a reset; its reads then fail, and it
    // has no timer left (its silence timeout does not keep firing).
    let mut p = Pair::connect(PathSpec::new(1, 100.0, 0.0), config(1 << 16, Bbr), 8);
    assert!(p.established());
    p.server.set_timeout(Some(Duration::from_secs(1)));
    p.client.abort();
    assert!(p.run(Duration::from_secs(1), |p| p.server.state()
        == State::Closed));
    let mut buf = [0u8; 8];
    assert!(p.server.recv_slice(&mut buf).is_err());
    assert!(p.client.is_done() && p.server.is_done());
    p.run(Duration::from_secs(3), |_| false);
    assert_eq!(p.server.poll_at(), None);
    assert_eq!(p.client.poll_at(), None);

    // The first two SYNs are lost: the handshake still completes.
    let mut p = Pair::connect(PathSpec::new(1, 100.0, 0.0), config(1 << 16, Bbr), 9);
    let start = p.now;
    p.up.set_loss(1.0);
    p.run(Duration::from_millis(2500), |_| false);
    p.up.set_loss(0.0);
    assert!(p.established());
    assert!(
        p.now.duration_since(start) >= Duration::from_secs(3),
        "after two timeouts (1 s, 2 s)"
    );
}

#[test]
fn ipv6_and_keepalive() {
    let mut cfg = config(1 << 16, Cubic);
    cfg.keep_alive = Some(Duration::from_secs(1));
    let mut p = Pair::connect_between(
        PathSpec::new(1, 100.0, 0.0),
        cfg,
        10,
        "[fd00::1]:40000",
        "[fd00::2]:80",
    );
    transfer(&mut p, 200_000, Duration::from_secs(10));
    // Idle for 5 s: keep-alive probes go both ways and are answered.
    let before = p.up.sent;
    p.run(Duration::from_secs(5), |_| false);
    assert!(p.up.sent >= before + 4, "{} probes", p.up.sent - before);
    assert_eq!(p.client.state(), State::Established);
    // The peer vanishes: with a timeout armed the connection is aborted.
    p.client.set_timeout(Some(Duration::from_secs(3)));
    p.down.set_loss(1.0);
    assert!(p.run(Duration::from_secs(10), |p| p.client.state()
        == State::Closed));
}

#[test]
fn a_quiet_connection_gives_its_buffers_back() {
    // The server's reader lags for a moment, so its ring grows; the
    // client's queue grows with the window. A second after the transfer
    // both are given back, and the next transfer takes them again.
    let mut p = Pair::connect(PathSpec::new(5, 200.0, 0.0), config(4 << 20, Bbr), 12);
    assert!(p.established());
    let total = 8 << 20;
    let mut stream = Stream::default();
    let t0 = p.now;
    assert!(p.run(Duration::from_secs(30), |p| {
        // No reading for the first 50 ms.
        if p.now.duration_since(t0) < Duration::from_millis(50) {
            p.client
                .send_slice(&super::sim::pattern(stream.written, 16384))
                .map(|n| stream.written += n)
                .unwrap();
            return false;
        }
        stream.step(p, total)
    }));
    let (c, s) = (p.client.allocated(), p.server.allocated());
    assert!(c > 100_000 && s > 100_000, "client {c}, server {s}");
    p.run(Duration::from_secs(2), |_| false);
    assert_eq!((p.client.allocated(), p.server.allocated()), (0, 0));
    let mbps = transfer(&mut p, 1 << 20, Duration::from_secs(10));
    assert!(mbps > 10.0, "{mbps}");
}

#[test]
fn any_path_delivers_every_byte_in_order() {
    // Forty random paths: 0-10 % loss, up to 5 ms of jitter, duplicates,
    // 1-20 ms of delay, 1-100 Mbit/s, queues from 8 KiB, buffers from
    // 8 KiB, either controller. Every byte arrives, in order, once, and
    // both ends close cleanly.
    let mut rng = super::sim::Rng::new(2026);
    for case in 0..40 {
        let mut spec = PathSpec::new(
            1 + rng.next() % 20,
            1.0 + rng.unit() * 99.0,
            rng.unit() * 0.1,
        );
        spec.jitter = Duration::from_micros(rng.next() % 5000);
        spec.duplicate = rng.unit() * 0.05;
        spec.queue = 8192 + (rng.next() % (256 * 1024)) as usize;
        let buffer = 8192 + (rng.next() % (1 << 20)) as usize;
        let cc = if rng.next() % 2 == 0 { Bbr } else { Cubic };
        let total = 50_000 + (rng.next() % 500_000) as usize;
        let mut p = Pair::connect(spec, config(buffer, cc), rng.next());
        let what = format!("case {case}: {spec:?}, buffer {buffer}, {cc:?}, {total} bytes");
        assert!(p.established(), "{what}: handshake");
        let mut stream = Stream::default();
        assert!(
            p.run(Duration::from_secs(600), |p| stream.step(p, total)),
            "{what}: {} bytes arrived",
            stream.read
        );
        p.client.close();
        assert!(
            p.run(Duration::from_secs(120), |p| p.server.state()
                == State::CloseWait),
            "{what}: the FIN did not arrive"
        );
        let mut rest = [0u8; 16];
        assert_eq!(
            p.server.recv_slice(&mut rest),
            Err(super::socket::RecvError::Finished)
        );
        p.server.close();
        assert!(
            p.run(Duration::from_secs(120), |p| p.server.is_done()),
            "{what}: the server did not finish closing ({:?})",
            p.server.state()
        );
    }
}

#[test]
fn under_memory_pressure_windows_stop_growing() {
    // The same fast transfer with and without pressure: the receive window
    // grows from 1 MiB to many without, and stays at 1 MiB with.
    for pressure in [false, true] {
        let mut p = Pair::connect(PathSpec::new(10, 1000.0, 0.0), config(16 << 20, Bbr), 13);
        p.server.set_memory_pressure(pressure);
        p.client.set_memory_pressure(pressure);
        transfer(&mut p, 40 << 20, Duration::from_secs(60));
        let limit = p.server.recv_limit();
        if pressure {
            assert_eq!(limit, super::recv::INITIAL_LIMIT);
        } else {
            assert!(limit >= 4 * super::recv::INITIAL_LIMIT, "{limit}");
        }
    }
}
