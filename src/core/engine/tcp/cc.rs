//! Round-trip time, congestion window and pacing for one connection.
//!
//! - [`Rtt`]: RFC 6298 smoothed RTT and variance, a windowed minimum (for
//!   RACK's reordering window), and the retransmission timeout with a
//!   200 ms floor (as Linux) instead of the RFC's 1 s.
//! - [`Cubic`]: RFC 9438 (slow start, the cubic window growth with its
//!   Reno-friendly region, fast convergence, β = 0.7), counted in bytes.
//! - [`Pacer`]: spreads a window over the round trip (2× the window per
//!   RTT in slow start, 1.2× after, as Linux paces), with bursts of a few
//!   milliseconds' worth so a coarse timer does not starve the path.

use std::time::{Duration, Instant};

/// Floor of the retransmission timeout.
pub const MIN_RTO: Duration = Duration::from_millis(200);
/// Ceiling of the retransmission timeout (and its backoff).
pub const MAX_RTO: Duration = Duration::from_secs(60);
/// Timeout before any RTT sample (RFC 6298 §2.1).
pub const INITIAL_RTO: Duration = Duration::from_secs(1);
/// The minimum RTT is forgotten after this long without a lower sample.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
    min: Option<(Duration, Instant)>,
    latest: Duration,
}

impl Default for Rtt {
    fn default() -> Self {
        Rtt {
            srtt: None,
            rttvar: Duration::ZERO,
            min: None,
            latest: Duration::ZERO,
        }
    }
}

impl Rtt {
    pub fn sample(&mut self, rtt: Duration, now: Instant) {
        self.latest = rtt;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        match self.min {
            Some((m, at)) if rtt > m && now.duration_since(at) < MIN_RTT_WINDOW => {}
            _ => self.min = Some((rtt, now)),
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The smallest recent sample (the smoothed RTT before any).
    pub fn min(&self) -> Duration {
        self.min.map(|(m, _)| m).or(self.srtt).unwrap_or_default()
    }

    pub fn latest(&self) -> Duration {
        self.latest
    }

    /// RTO = SRTT + max(G, 4·RTTVAR), clamped; `backoff` doublings.
    pub fn rto(&self, backoff: u32) -> Duration {
        let base = match self.srtt {
            None => INITIAL_RTO,
            Some(srtt) => (srtt + (self.rttvar * 4).max(Duration::from_millis(1))).max(MIN_RTO),
        };
        base.saturating_mul(1 << backoff.min(16)).min(MAX_RTO)
    }
}

/// CUBIC's multiplicative decrease.
const BETA: f64 = 0.7;
/// CUBIC's scaling constant (segments per second³).
const C: f64 = 0.4;

#[derive(Debug, Clone)]
pub struct Cubic {
    mss: usize,
    /// Congestion window, bytes.
    pub cwnd: usize,
    pub ssthresh: usize,
    /// Window before the last reduction, segments.
    w_max: f64,
    /// Start of the current avoidance epoch.
    epoch: Option<Instant>,
    k: f64,
    /// The Reno-friendly estimate, segments.
    w_est: f64,
    /// Bytes acknowledged in avoidance not yet turned into window.
    acked_carry: f64,
}

impl Cubic {
    pub fn new(mss: usize) -> Self {
        Cubic {
            mss,
            cwnd: initial_window(mss),
            ssthresh: usize::MAX,
            w_max: 0.0,
            epoch: None,
            k: 0.0,
            w_est: 0.0,
            acked_carry: 0.0,
        }
    }

    pub fn in_slow_start(&self) -> bool {
        self.cwnd < self.ssthresh
    }

    /// `acked` bytes newly delivered (cumulatively or selectively), outside
    /// recovery. `app_limited`: the window was not the limit, so it does
    /// not grow.
    pub fn on_ack(&mut self, acked: usize, now: Instant, rtt: &Rtt, app_limited: bool) {
        if app_limited || acked == 0 {
            return;
        }
        if self.in_slow_start() {
            self.cwnd = (self.cwnd + acked).min(self.ssthresh.max(self.cwnd));
            return;
        }
        let mss = self.mss as f64;
        let cwnd = self.cwnd as f64 / mss;
        let epoch = *self.epoch.get_or_insert_with(|| {
            if cwnd < self.w_max {
                self.k = ((self.w_max - cwnd) / C).cbrt();
            } else {
                self.k = 0.0;
                self.w_max = cwnd;
            }
            self.w_est = cwnd;
            now
        });
        let rtt_s = rtt.srtt().unwrap_or_default().as_secs_f64();
        let t = now.duration_since(epoch).as_secs_f64() + rtt_s;
        let target = (C * (t - self.k).powi(3) + self.w_max).clamp(cwnd, cwnd * 1.5);
        let segs = acked as f64 / mss;
        // Reno-friendly region (RFC 9438 §4.3).
        let alpha = 3.0 * (1.0 - BETA) / (1.0 + BETA);
        self.w_est += alpha * segs / cwnd;
        let grow = if self.w_est > target {
            (self.w_est - cwnd).max(0.0)
        } else {
            (target - cwnd) * segs / cwnd
        };
        self.acked_carry += grow * mss;
        let whole = self.acked_carry.floor();
        self.acked_carry -= whole;
        self.cwnd += whole as usize;
    }

    /// A loss (or ECN) event: the window shrinks once per round trip; the
    /// caller calls this once per recovery episode.
    pub fn on_congestion(&mut self) {
        let cwnd = self.cwnd as f64 / self.mss as f64;
        // Fast convergence (RFC 9438 §4.7).
        self.w_max = if cwnd < self.w_max {
            cwnd * (1.0 + BETA) / 2.0
        } else {
            cwnd
        };
        self.ssthresh = ((self.cwnd as f64 * BETA) as usize).max(2 * self.mss);
        self.epoch = None;
        self.acked_carry = 0.0;
    }

    /// Recovery ended: continue from the reduced window.
    pub fn on_recovery_end(&mut self) {
        self.cwnd = self.ssthresh.max(2 * self.mss);
    }

    /// The retransmission timer fired: back to one segment, slow start.
    pub fn on_timeout(&mut self) {
        self.on_congestion();
        self.cwnd = self.mss;
    }

    /// The connection sat idle longer than an RTO: restart from the
    /// initial window (RFC 5681 §4.1), keeping ssthresh.
    pub fn on_idle_restart(&mut self) {
        self.cwnd = self.cwnd.min(initial_window(self.mss));
        self.epoch = None;
    }
}

/// RFC 6928's initial window: 10 segments (capped at 14,600 bytes… for
/// large MSS, at least 2 segments).
pub fn initial_window(mss: usize) -> usize {
    (10 * mss).min((2 * mss).max(14_600)).max(2 * mss)
}

/// Bursts allowed ahead of the pace: this long at the pacing rate...
const BURST_TIME: Duration = Duration::from_millis(2);
/// ...but at least this many segments.
const MIN_BURST_SEGMENTS: usize = 10;

#[derive(Debug, Clone)]
pub struct Pacer {
    /// Bytes that may go now.
    tokens: f64,
    last: Option<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            tokens: f64::MAX,
            last: None,
        }
    }
}

impl Pacer {
    /// Bytes per second for this window and RTT; `None` paces nothing
    /// (no RTT sample yet).
    pub fn rate(cwnd: usize, srtt: Option<Duration>, slow_start: bool) -> Option<f64> {
        let srtt = srtt?.as_secs_f64().max(1e-5);
        let gain = if slow_start { 2.0 } else { 1.2 };
        Some(gain * cwnd as f64 / srtt)
    }

    /// May `len` bytes go at `now`? If not, when. Tokens refill at `rate`
    /// up to a burst's worth.
    pub fn check(
        &mut self,
        now: Instant,
        len: usize,
        rate: Option<f64>,
        mss: usize,
    ) -> Result<(), Instant> {
        let Some(rate) = rate else {
            return Ok(());
        };
        let burst = (rate * BURST_TIME.as_secs_f64()).max((MIN_BURST_SEGMENTS * mss) as f64);
        let elapsed = self
            .last
            .map_or(0.0, |l| now.saturating_duration_since(l).as_secs_f64());
        self.tokens = (self.tokens.min(burst) + elapsed * rate).min(burst);
        self.last = Some(now);
        if self.tokens >= len as f64 {
            return Ok(());
        }
        let wait = (len as f64 - self.tokens) / rate;
        Err(now + Duration::from_secs_f64(wait))
    }

    pub fn spend(&mut self, len: usize) {
        self.tokens -= len as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rto_follows_rfc6298_with_a_200ms_floor() {
        let now = Instant::now();
        let mut rtt = Rtt::default();
        assert_eq!(rtt.rto(0), INITIAL_RTO);
        rtt.sample(Duration::from_millis(20), now);
        // 20 + 4 * 10 = 60 ms, floored.
        assert_eq!(rtt.rto(0), MIN_RTO);
        assert_eq!(rtt.rto(2), MIN_RTO * 4);
        for _ in 0..50 {
            rtt.sample(Duration::from_millis(300), now);
        }
        let rto = rtt.rto(0);
        assert!(
            rto >= Duration::from_millis(300) && rto < Duration::from_millis(400),
            "{rto:?}"
        );
        assert_eq!(rtt.rto(30), MAX_RTO);
        assert_eq!(rtt.min(), Duration::from_millis(20));
    }

    #[test]
    fn cubic_grows_shrinks_and_regrows() {
        let mss = 1000;
        let start = Instant::now();
        // A long RTT, so the cubic curve (not the Reno-friendly line) rules.
        let mut rtt = Rtt::default();
        rtt.sample(Duration::from_millis(200), start);
        let mut cc = Cubic::new(mss);
        assert_eq!(cc.cwnd, 10 * mss);
        cc.on_ack(5 * mss, start, &rtt, false);
        assert_eq!(cc.cwnd, 15 * mss, "slow start adds what was acknowledged");
        cc.on_ack(5 * mss, start, &rtt, true);
        assert_eq!(cc.cwnd, 15 * mss, "no growth while application-limited");
        // Grow to 100 segments, then lose.
        cc.cwnd = 100 * mss;
        cc.on_congestion();
        cc.on_recovery_end();
        assert_eq!(cc.cwnd, 70 * mss);
        assert!(!cc.in_slow_start());
        // A window's worth of ACKs per RTT: back near w_max after K.
        let mut now = start;
        let k = ((100.0 - 70.0) / C).cbrt();
        while now.duration_since(start).as_secs_f64() < k {
            now += Duration::from_millis(200);
            let w = cc.cwnd;
            cc.on_ack(w, now, &rtt, false);
        }
        let w = cc.cwnd / mss;
        assert!(
            (90..=110).contains(&w),
            "after K the window is back near w_max: {w}"
        );
        // On a short RTT the Reno-friendly estimate takes over (0.53
        // segments per RTT): after 200 RTTs it is well past w_max.
        let mut short = Rtt::default();
        short.sample(Duration::from_millis(20), start);
        let mut cc2 = Cubic::new(mss);
        cc2.cwnd = 100 * mss;
        cc2.on_congestion();
        cc2.on_recovery_end();
        for i in 1..=200 {
            let w = cc2.cwnd;
            cc2.on_ack(w, start + Duration::from_millis(20 * i), &short, false);
        }
        assert!(cc2.cwnd / mss > 150, "{}", cc2.cwnd / mss);
        cc.on_timeout();
        assert_eq!(cc.cwnd, mss);
    }

    #[test]
    fn pacer_spreads_and_allows_bursts() {
        let now = Instant::now();
        let mut p = Pacer::default();
        // 1 MB/s, MSS 1000: bursts of 10 segments (10 KB > 2 ms' 2 KB).
        let rate = Some(1e6);
        for _ in 0..10 {
            assert!(p.check(now, 1000, rate, 1000).is_ok());
            p.spend(1000);
        }
        let next = p.check(now, 1000, rate, 1000).unwrap_err();
        assert_eq!(next.duration_since(now), Duration::from_millis(1));
        assert!(p.check(next, 1000, rate, 1000).is_ok());
        assert!(Pacer::default().check(now, 1 << 20, None, 1000).is_ok());
    }
}
