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
    // (Before the reordering window adapted: 31,000 of the 15,000
    // segments. Now about 110, 0.7 %, most of them at the start.)
    let spurious = st.retransmits.saturating_sub(p.up.dropped);
    assert!(
        spurious < 150,
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
        let cc = if rng.next().is_multiple_of(2) {
            Bbr
        } else {
            Cubic
        };
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
    // The same fast transfer with and without pressure from the start:
    // the receive window grows from 1 MiB to many without; with, the
    // connection opens with a 64 KiB window and keeps it.
    for pressure in [false, true] {
        let mut p = Pair::connect(PathSpec::new(10, 1000.0, 0.0), config(16 << 20, Bbr), 13);
        p.server.set_memory_pressure(pressure);
        p.client.set_memory_pressure(pressure);
        transfer(&mut p, 40 << 20, Duration::from_secs(60));
        let limit = p.server.recv_limit();
        if pressure {
            assert_eq!(limit, super::socket::PRESSURE_WINDOW);
        } else {
            assert!(limit >= 4 * super::recv::INITIAL_LIMIT, "{limit}");
        }
    }
    // Pressure after the handshake: the window offered stays (TCP may not
    // take it back), it only stops growing.
    let mut p = Pair::connect(PathSpec::new(10, 1000.0, 0.0), config(16 << 20, Bbr), 13);
    assert!(p.established());
    p.server.set_memory_pressure(true);
    transfer(&mut p, 10 << 20, Duration::from_secs(60));
    assert_eq!(p.server.recv_limit(), super::recv::INITIAL_LIMIT);
}

#[test]
fn under_memory_pressure_out_of_order_data_goes_first() {
    // A lossy transfer; a quarter of the way in, the receiver comes under
    // pressure: it forgets what it held beyond holes (data it had SACKed)
    // and takes no more out-of-order data. The sender finds the reneged
    // data at its retransmission timeout and every byte still arrives.
    let mut p = Pair::connect(PathSpec::new(5, 50.0, 0.02), config(4 << 20, Bbr), 14);
    assert!(p.established());
    let total = 4 << 20;
    let mut stream = Stream::default();
    let mut held_holes = false;
    let ok = p.run(Duration::from_secs(120), |p| {
        if !held_holes && stream.read > total / 4 && p.server.has_out_of_order() {
            held_holes = true;
            p.server.set_memory_pressure(true);
            assert!(!p.server.has_out_of_order(), "dropped at once");
        }
        if held_holes {
            p.server.set_memory_pressure(true);
            assert!(!p.server.has_out_of_order(), "none taken under pressure");
        }
        stream.step(p, total)
    });
    assert!(held_holes, "the receiver never held out-of-order data");
    assert!(
        ok,
        "{} of {total} bytes: {:?}",
        stream.read,
        p.client.stats()
    );
}

#[test]
fn the_retransmission_timer_restarts_only_on_new_data() {
    // RFC 6298 §5.3. The server's 10-segment reply loses its tail while
    // the client keeps sending (every client segment acknowledges only
    // what arrived, so it is neither new data acknowledged nor a
    // duplicate ACK). Without SACK there is no tail loss probe: the
    // server's retransmission timeout must fire on time, not be pushed
    // back by each client segment.
    let mut p =
        Pair::connect_without_sack(PathSpec::new(20, 100.0, 0.0), config(1 << 20, Cubic), 15);
    assert!(p.established());
    let mss = p.server.mss();
    let data = super::sim::pattern(0, 10 * mss);
    assert_eq!(p.server.send_slice(&data).unwrap(), data.len());
    let mut buf = Vec::new();
    let now = p.now;
    let mut sent = 0;
    while p.server.poll_transmit(now, &mut buf) {
        sent += 1;
        let packet = std::mem::take(&mut buf);
        if sent < 10 {
            p.down.send(now, packet, &mut p.rng);
        }
    }
    assert_eq!(sent, 10);
    let t0 = p.now;
    let mut got = vec![0u8; data.len()];
    let mut read = 0;
    let mut upload = Stream::default();
    assert!(p.run(Duration::from_secs(10), |p| {
        read += p.client.recv_slice(&mut got[read..]).unwrap();
        upload.step(p, usize::MAX / 2);
        read == got.len()
    }));
    assert_eq!(got, data);
    let took = p.now.duration_since(t0);
    assert!(
        upload.read > 100_000,
        "the client kept sending: {}",
        upload.read
    );
    assert_eq!(p.server.stats().timeouts, 1, "{:?}", p.server.stats());
    assert!(took < Duration::from_millis(600), "repaired after {took:?}");
}

#[test]
fn a_peer_without_sack_recovers_by_duplicate_acks() {
    // 1 % loss, no SACK: the third duplicate ACK starts a recovery, each
    // partial ACK repairs the next hole (NewReno), and a duplicate ACK a
    // round trip after a retransmission shows it lost. Before, every loss
    // waited for a timeout.
    let mut p =
        Pair::connect_without_sack(PathSpec::new(10, 50.0, 0.01), config(4 << 20, Cubic), 16);
    let mbps = transfer(&mut p, 8 << 20, Duration::from_secs(300));
    let st = p.client.stats();
    eprintln!("no SACK, 1 % loss, Cubic: {mbps:.1} Mbit/s, {st:?}");
    assert!(p.up.dropped >= 30, "{} dropped", p.up.dropped);
    assert!(st.recoveries >= 30, "{st:?}");
    assert_eq!(st.timeouts, 0, "{st:?}");
    // BBR keeps twice the path's BDP in flight: when the queue overflows,
    // more holes open than NewReno (one per round trip) repairs before
    // the timeout. Most losses are still repaired without one.
    let mut p = Pair::connect_without_sack(PathSpec::new(10, 50.0, 0.01), config(4 << 20, Bbr), 16);
    let mbps = transfer(&mut p, 8 << 20, Duration::from_secs(300));
    let st = p.client.stats();
    eprintln!("no SACK, 1 % loss, Bbr: {mbps:.1} Mbit/s, {st:?}");
    assert!(st.recoveries >= 10, "{st:?}");
    assert!(st.timeouts * 2 <= st.recoveries, "{st:?}");
}

#[test]
fn acknowledgements_every_second_segment_and_once_per_batch() {
    use super::sim::deliver;
    // A bulk transfer on a path that delivers segments one by one: about
    // one ACK per two segments (it was one per segment).
    let mut p = Pair::connect(PathSpec::new(10, 100.0, 0.0), config(4 << 20, Bbr), 17);
    let total = 20 << 20;
    transfer(&mut p, total, Duration::from_secs(60));
    let segments = total / p.client.mss();
    let acks = p.down.sent as usize;
    eprintln!("{acks} ACKs for {segments} segments");
    assert!(
        acks < segments * 6 / 10,
        "{acks} ACKs for {segments} segments"
    );
    assert!(
        acks > segments * 4 / 10,
        "{acks} ACKs for {segments} segments"
    );

    // Segments arriving together are acknowledged once; a lone segment's
    // ACK waits for a second segment, or 40 ms.
    let mut p = Pair::connect(PathSpec::new(1, 100.0, 0.0), config(4 << 20, Bbr), 18);
    assert!(p.established());
    let mss = p.client.mss();
    let now = p.now;
    // Sends `n` segments, delivers them to the server together, returns
    // how many ACKs it answered with (handed back to the client).
    let flight = |p: &mut Pair, n: usize, at| {
        let data = super::sim::pattern(0, n * mss);
        assert_eq!(p.client.send_slice(&data).unwrap(), data.len());
        let mut buf = Vec::new();
        let mut segments = Vec::new();
        while p.client.poll_transmit(at, &mut buf) {
            segments.push(std::mem::take(&mut buf));
        }
        assert_eq!(segments.len(), n, "the window let all {n} go");
        for s in &segments {
            deliver(&mut p.server, at, s);
        }
        let mut acks = 0;
        while p.server.poll_transmit(at, &mut buf) {
            deliver(&mut p.client, at, &buf);
            buf.clear();
            acks += 1;
        }
        acks
    };
    // The first 16 segments are quick-ACK mode's: one ACK per round still.
    // (Ten milliseconds apart, so the pacer lets each flight go at once.)
    let t = |k: u64| now + Duration::from_millis(10 * k);
    assert_eq!(
        flight(&mut p, 8, t(1)),
        1,
        "a batch of 8 is acknowledged once"
    );
    assert_eq!(
        flight(&mut p, 8, t(2)),
        1,
        "a batch of 8 is acknowledged once"
    );
    assert_eq!(flight(&mut p, 1, t(3)), 0, "a lone segment waits");
    assert_eq!(flight(&mut p, 1, t(3)), 1, "the second is acknowledged");
    assert_eq!(flight(&mut p, 1, t(4)), 0);
    let at = p.server.poll_at().expect("a delayed ACK is due");
    assert_eq!(at.duration_since(t(4)), Duration::from_millis(40));
    let mut buf = Vec::new();
    assert!(p.server.poll_transmit(at, &mut buf), "the delayed ACK");
}

#[test]
fn paws_drops_an_old_duplicate() {
    use super::wire::{Segment, ACK};
    // RFC 7323 §5: a segment in the window whose timestamp is older than
    // the latest one is a duplicate from before the sequence numbers
    // wrapped. The same segment with a current timestamp is taken.
    let mut p = Pair::connect(PathSpec::new(5, 100.0, 0.0), config(1 << 20, Cubic), 19);
    transfer(&mut p, 100_000, Duration::from_secs(10));
    let old_ts = p.client.timestamp_at(p.now) - 5000;
    p.run(Duration::from_millis(100), |_| false);
    let (seq, ack) = p.server.expected();
    let probe = |ts: u32| {
        let options = super::wire::Options {
            timestamp: Some((ts, 0)),
            ..Default::default()
        };
        Segment {
            src: p.client.local(),
            dst: p.client.remote(),
            seq,
            ack,
            flags: ACK,
            window: 65535,
            options,
            payload: b"late",
        }
    };
    let now = p.now;
    p.server.handle(now, &probe(old_ts));
    assert!(!p.server.can_recv(), "the old duplicate was taken");
    let mut buf = Vec::new();
    assert!(
        p.server.poll_transmit(now, &mut buf),
        "answered with an ACK"
    );
    let fresh = p.client.timestamp_at(now);
    p.server.handle(now, &probe(fresh));
    assert!(p.server.can_recv(), "the current segment was not taken");
}

#[test]
fn fairness_at_a_shared_bottleneck() {
    use super::sim::{jain, Bottleneck};
    // 50 Mbit/s, 20 ms round trip, a queue of one BDP (125 KB): flows
    // start together and send for 30 s; the first 5 s are not counted.
    let mut spec = PathSpec::new(10, 50.0, 0.0);
    spec.queue = 125_000;
    let time = Duration::from_secs(30);
    let warmup = Duration::from_secs(5);
    let cfg = |cc| config(4 << 20, cc);
    let mut b = Bottleneck::new(spec, &[cfg(Bbr), cfg(Cubic)], 21);
    let r = b.compete(time, warmup);
    let share = r[0] / (r[0] + r[1]);
    eprintln!(
        "BBR {:.1} vs CUBIC {:.1} Mbit/s: BBR's share {share:.2}, Jain {:.2}",
        r[0],
        r[1],
        jain(&r)
    );
    let mut b = Bottleneck::new(spec, &[cfg(Bbr), cfg(Bbr)], 22);
    let r2 = b.compete(time, warmup);
    eprintln!(
        "BBR {:.1} vs BBR {:.1} Mbit/s: Jain {:.2}",
        r2[0],
        r2[1],
        jain(&r2)
    );
    assert!(r.iter().sum::<f64>() > 40.0, "the link is used: {r:?}");
    assert!(
        share <= 2.0 / 3.0,
        "BBR's share against CUBIC: {share:.2} ({r:?})"
    );
    assert!(jain(&r) >= 0.8, "{r:?}");
    assert!(jain(&r2) >= 0.95, "{r2:?}");
}
