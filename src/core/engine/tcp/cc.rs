//! Round-trip time, congestion window and pacing for one connection.
//!
//! - [`Rtt`]: RFC 6298 smoothed RTT and variance, a windowed minimum (for
//!   RACK's reordering window), and the retransmission timeout with a
//!   200 ms floor (as Linux) instead of the RFC's 1 s.
//! - [`Cubic`]: RFC 9438 (slow start, the cubic window growth with its
//!   Reno-friendly region, fast convergence, β = 0.7), counted in bytes.
//! - [`Bbr`]: a model-based controller after BBR v1 (Cardwell et al.):
//!   the bottleneck bandwidth (windowed maximum of delivery-rate samples)
//!   and the minimum RTT set the pacing rate and a window of twice the
//!   bandwidth-delay product. Random loss does not shrink it, which is
//!   what a tunnel across the internet needs.
//! - [`Controller`]: the one a connection uses (`bbr` by default, `cubic`).
//! - [`Pacer`]: spreads the window over the round trip (CUBIC: 2× the
//!   window per RTT in slow start, 1.2× after, as Linux paces; BBR: its
//!   own rate), with bursts of a few milliseconds' worth so a coarse timer
//!   does not starve the path.

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
    pub mss: usize,
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

/// One delivery-rate sample (draft-cheng-iccrg-delivery-rate-estimation).
#[derive(Debug, Clone, Copy)]
pub struct RateSample {
    /// Bytes per second delivered over the sample's interval.
    pub rate: f64,
    /// The connection's delivered count when the sampled segment was sent.
    pub prior_delivered: u64,
    /// The sender had nothing to send then: the rate is a lower bound.
    pub app_limited: bool,
}

/// What one acknowledgement tells the controller.
#[derive(Debug, Clone, Copy)]
pub struct AckEvent {
    pub now: Instant,
    /// Bytes newly delivered (cumulatively or selectively).
    pub delivered: usize,
    /// The connection's total delivered bytes, after this ACK.
    pub delivered_total: u64,
    /// Bytes in flight after this ACK.
    pub in_flight: usize,
    /// Bytes this ACK showed lost.
    pub lost: usize,
    pub rate: Option<RateSample>,
    /// The window was not the limit (CUBIC does not grow then).
    pub app_limited: bool,
    /// In fast recovery (PRR sets the pace for CUBIC).
    pub in_recovery: bool,
    /// Recovering from a retransmission timeout.
    pub after_rto: bool,
}

/// Which congestion controller a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    Bbr,
    Cubic,
}

impl Algorithm {
    /// `bbr` or `cubic`.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "bbr" => Some(Algorithm::Bbr),
            "cubic" => Some(Algorithm::Cubic),
            _ => None,
        }
    }
}

/// A connection's congestion controller.
#[derive(Debug, Clone)]
pub enum Controller {
    Cubic(Cubic),
    Bbr(Box<Bbr>),
}

impl Controller {
    pub fn new(algorithm: Algorithm, mss: usize, now: Instant) -> Controller {
        match algorithm {
            Algorithm::Cubic => Controller::Cubic(Cubic::new(mss)),
            Algorithm::Bbr => Controller::Bbr(Box::new(Bbr::new(mss, now))),
        }
    }

    pub fn cwnd(&self) -> usize {
        match self {
            Controller::Cubic(c) => c.cwnd,
            Controller::Bbr(b) => b.cwnd,
        }
    }

    /// The slow-start threshold PRR works towards (CUBIC only).
    pub fn ssthresh(&self) -> usize {
        match self {
            Controller::Cubic(c) => c.ssthresh,
            Controller::Bbr(b) => b.cwnd,
        }
    }

    /// Does fast recovery follow PRR (RFC 6937)? BBR keeps its own window.
    pub fn uses_prr(&self) -> bool {
        matches!(self, Controller::Cubic(_))
    }

    pub fn on_ack(&mut self, ev: &AckEvent, rtt: &Rtt) {
        match self {
            Controller::Cubic(c) => {
                if ev.in_recovery {
                    return;
                }
                if ev.after_rto {
                    // Slow start back up to ssthresh.
                    if c.in_slow_start() {
                        c.on_ack(ev.delivered, ev.now, rtt, false);
                    }
                    return;
                }
                c.on_ack(ev.delivered, ev.now, rtt, ev.app_limited);
            }
            Controller::Bbr(b) => b.on_ack(ev, rtt),
        }
    }

    /// Fast recovery starts (new losses found).
    pub fn on_recovery_start(&mut self, in_flight: usize) {
        match self {
            Controller::Cubic(c) => c.on_congestion(),
            Controller::Bbr(b) => b.on_recovery_start(in_flight),
        }
    }

    pub fn on_recovery_end(&mut self) {
        match self {
            Controller::Cubic(c) => c.on_recovery_end(),
            Controller::Bbr(b) => b.on_recovery_end(),
        }
    }

    /// Everything outstanding at a retransmission timeout is delivered.
    pub fn on_rto_recovered(&mut self) {
        match self {
            // Slow start carries on from where it is.
            Controller::Cubic(_) => {}
            Controller::Bbr(b) => b.on_recovery_end(),
        }
    }

    /// The retransmission timer fired; `first`: not already recovering
    /// from one.
    pub fn on_timeout(&mut self, first: bool) {
        match self {
            Controller::Cubic(c) => {
                if first {
                    c.on_timeout();
                } else {
                    c.cwnd = c.mss;
                }
            }
            Controller::Bbr(b) => b.on_timeout(),
        }
    }

    /// A retransmission proved spurious (its original arrived): the losses
    /// that cut the window were reordering (BBR undoes its lower bounds,
    /// as Linux's BBRv3 does on undo).
    pub fn on_spurious(&mut self) {
        if let Controller::Bbr(b) = self {
            b.reset_lower_bounds();
            b.round_lost = 0;
        }
    }

    pub fn on_idle_restart(&mut self) {
        match self {
            Controller::Cubic(c) => c.on_idle_restart(),
            Controller::Bbr(b) => b.on_idle_restart(),
        }
    }

    /// Bytes per second to pace at (`None`: no pacing yet).
    pub fn pacing_rate(&self, rtt: &Rtt) -> Option<f64> {
        match self {
            Controller::Cubic(c) => Pacer::rate(c.cwnd, rtt.srtt(), c.in_slow_start()),
            Controller::Bbr(b) => b.pacing_rate(rtt),
        }
    }
}

/// BBR's startup gain, 2/ln(2).
const BBR_HIGH_GAIN: f64 = 2.885;
/// ProbeBW's phases (BBRv3's, REFILL folded into the start of UP).
const BBR_UP: usize = 0;
const BBR_DOWN: usize = 1;
const BBR_CRUISE: usize = 2;
/// Their pacing gains.
const BBR_CYCLE: [f64; 3] = [1.25, 0.9, 1.0];
/// A round losing more than this share of what it sent had too much in
/// flight (BBRv3's `LossThresh`).
const BBR_LOSS_THRESH: f64 = 0.02;
/// How far the lower bounds and `inflight_hi` come down on loss (BBRv3's β).
const BBR_BETA: f64 = 0.7;
/// In CRUISE, the window stays this far below `inflight_hi`, leaving room
/// for other flows (BBRv3's `Headroom`).
const BBR_HEADROOM: f64 = 0.15;
/// Round trips spent cruising between probes (at most
/// [`BBR_PROBE_WAIT`]): long enough for loss-based flows sharing the
/// bottleneck to grow back (BBRv3 waits min(63 rounds, 2-3 s); 20 keeps
/// the share against CUBIC at a one-BDP queue near half, and probes often
/// enough to find bandwidth that frees up).
const BBR_CRUISE_ROUNDS: u32 = 20;
/// The longest cruise.
const BBR_PROBE_WAIT: Duration = Duration::from_secs(2);
/// Rounds the bandwidth filter covers.
const BBR_BW_ROUNDS: u64 = 10;
/// The min RTT is probed again after this long without a lower sample.
const BBR_MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// How long ProbeRTT holds the window at its minimum.
const BBR_PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// The shortest RTT a window is sized for (see `Bbr::bdp`).
const BBR_MIN_BDP_RTT: Duration = Duration::from_millis(1);
/// The smallest window, segments.
const BBR_MIN_CWND_SEGMENTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BbrMode {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

#[derive(Debug, Clone)]
pub struct Bbr {
    mss: usize,
    pub cwnd: usize,
    pub mode: BbrMode,
    /// (round, bandwidth) samples, decreasing bandwidth: a windowed max.
    bw: std::collections::VecDeque<(u64, f64)>,
    round: u64,
    next_round_delivered: u64,
    min_rtt: Option<Duration>,
    min_rtt_at: Instant,
    pacing_gain: f64,
    cwnd_gain: f64,
    full_bw: f64,
    full_bw_rounds: u32,
    filled_pipe: bool,
    cycle: usize,
    cycle_at: Instant,
    probe_rtt_until: Option<Instant>,
    probe_rtt_round: Option<u64>,
    prior_cwnd: usize,
    /// Packet conservation for the first round of a recovery.
    conserve_until_round: Option<u64>,
    /// BBRv3's bounds from loss: the short-term lower bounds (cut by β
    /// in each round with loss outside probing, reset when probing
    /// starts) and the long-term upper bound on what may be in flight.
    bw_lo: f64,
    inflight_lo: usize,
    inflight_hi: usize,
    /// This round's losses, deliveries, largest in-flight and best rate.
    round_lost: usize,
    round_delivered: usize,
    round_inflight: usize,
    bw_latest: f64,
    /// Rounds spent probing up (`inflight_hi` grows faster each).
    up_rounds: u32,
    /// The rounds at which the last two probes up started.
    probe_starts: (u64, u64),
    cruise_until: Instant,
}

impl Bbr {
    pub fn new(mss: usize, now: Instant) -> Bbr {
        Bbr {
            mss,
            cwnd: initial_window(mss),
            mode: BbrMode::Startup,
            bw: std::collections::VecDeque::new(),
            round: 0,
            next_round_delivered: 0,
            min_rtt: None,
            min_rtt_at: now,
            pacing_gain: BBR_HIGH_GAIN,
            cwnd_gain: BBR_HIGH_GAIN,
            full_bw: 0.0,
            full_bw_rounds: 0,
            filled_pipe: false,
            cycle: 0,
            cycle_at: now,
            probe_rtt_until: None,
            probe_rtt_round: None,
            prior_cwnd: 0,
            conserve_until_round: None,
            bw_lo: f64::INFINITY,
            inflight_lo: usize::MAX,
            inflight_hi: usize::MAX,
            round_lost: 0,
            round_delivered: 0,
            round_inflight: 0,
            bw_latest: 0.0,
            up_rounds: 0,
            probe_starts: (0, 0),
            cruise_until: now,
        }
    }

    /// The bottleneck bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> f64 {
        self.bw.front().map_or(0.0, |&(_, b)| b)
    }

    /// The bandwidth the model works with: the estimate, held down by
    /// the lower bound loss set.
    fn bw(&self) -> f64 {
        self.bandwidth().min(self.bw_lo)
    }

    fn bdp(&self, gain: f64) -> Option<usize> {
        // The caller's timers tick in milliseconds and ACKs come a batch
        // at a time, so the window covers at least that much at the
        // estimated rate (on a sub-millisecond path, the bare BDP would
        // idle the link between ticks).
        let rtt = self.min_rtt?.max(BBR_MIN_BDP_RTT);
        let bw = self.bw();
        (bw > 0.0).then_some((gain * bw * rtt.as_secs_f64()) as usize)
    }

    fn min_cwnd(&self) -> usize {
        BBR_MIN_CWND_SEGMENTS * self.mss
    }

    pub fn pacing_rate(&self, rtt: &Rtt) -> Option<f64> {
        let bw = self.bw();
        if bw > 0.0 {
            return Some(self.pacing_gain * bw);
        }
        // No sample yet: the initial window over the handshake's RTT.
        let srtt = rtt.srtt()?.as_secs_f64().max(1e-5);
        Some(BBR_HIGH_GAIN * self.cwnd as f64 / srtt)
    }

    fn on_ack(&mut self, ev: &AckEvent, rtt: &Rtt) {
        let now = ev.now;
        // Rounds: one per window of data delivered.
        let mut round_start = false;
        if let Some(rs) = ev.rate {
            if rs.prior_delivered >= self.next_round_delivered {
                self.next_round_delivered = ev.delivered_total;
                self.round += 1;
                round_start = true;
            }
            if !rs.app_limited || rs.rate >= self.bandwidth() {
                self.add_bw(rs.rate);
            }
            self.bw_latest = self.bw_latest.max(rs.rate);
        }
        self.round_lost += ev.lost;
        self.round_delivered += ev.delivered;
        self.round_inflight = self.round_inflight.max(ev.in_flight + ev.delivered);
        if round_start {
            self.end_round(now);
        }
        if round_start && self.conserve_until_round.is_some_and(|r| self.round > r) {
            self.conserve_until_round = None;
        }
        // Minimum RTT, and ProbeRTT when it has not been seen for a while.
        let sample = rtt.latest();
        let expired = now.saturating_duration_since(self.min_rtt_at) > BBR_MIN_RTT_WINDOW;
        if ev.delivered > 0
            && !sample.is_zero()
            && (self.min_rtt.is_none_or(|m| sample <= m) || expired)
        {
            self.min_rtt = Some(sample);
            self.min_rtt_at = now;
        }
        if expired && self.mode != BbrMode::ProbeRtt {
            self.mode = BbrMode::ProbeRtt;
            self.pacing_gain = 1.0;
            self.cwnd_gain = 1.0;
            self.prior_cwnd = self.prior_cwnd.max(self.cwnd);
            self.probe_rtt_until = None;
            self.probe_rtt_round = None;
        }
        // Startup ends when the bandwidth stops growing by a quarter for
        // three rounds.
        if round_start && !self.filled_pipe && !ev.rate.is_some_and(|r| r.app_limited) {
            let bw = self.bandwidth();
            if bw >= self.full_bw * 1.25 {
                self.full_bw = bw;
                self.full_bw_rounds = 0;
            } else {
                self.full_bw_rounds += 1;
                if self.full_bw_rounds >= 3 {
                    self.filled_pipe = true;
                }
            }
        }
        match self.mode {
            BbrMode::Startup if self.filled_pipe => {
                self.mode = BbrMode::Drain;
                self.pacing_gain = 1.0 / BBR_HIGH_GAIN;
                self.cwnd_gain = BBR_HIGH_GAIN;
            }
            BbrMode::Drain => {
                if self.bdp(1.0).is_some_and(|b| ev.in_flight <= b) {
                    self.enter_probe_bw(now);
                }
            }
            BbrMode::ProbeBw => {
                let phase =
                    now.saturating_duration_since(self.cycle_at) > self.min_rtt.unwrap_or_default();
                match self.cycle {
                    BBR_UP => {
                        if round_start && self.inflight_hi != usize::MAX {
                            // Probe for room: 1, 2, 4... segments more each round.
                            self.inflight_hi = self
                                .inflight_hi
                                .saturating_add(self.mss << self.up_rounds.min(20));
                            self.up_rounds += 1;
                        }
                        if phase && self.bdp(1.25).is_none_or(|b| ev.in_flight >= b) {
                            self.set_phase(BBR_DOWN, now);
                        }
                    }
                    BBR_DOWN => {
                        if phase || self.bdp(1.0).is_some_and(|b| ev.in_flight <= b) {
                            self.set_phase(BBR_CRUISE, now);
                        }
                    }
                    _ => {
                        if now >= self.cruise_until {
                            // Probing starts afresh: no short-term bounds.
                            self.reset_lower_bounds();
                            self.up_rounds = 0;
                            self.probe_starts = (self.probe_starts.1, self.round);
                            self.set_phase(BBR_UP, now);
                        }
                    }
                }
            }
            BbrMode::ProbeRtt => {
                if self.probe_rtt_until.is_none() && ev.in_flight <= self.min_cwnd() {
                    self.probe_rtt_until = Some(now + BBR_PROBE_RTT_TIME);
                    self.probe_rtt_round = Some(self.round);
                }
                let done_time = self.probe_rtt_until.is_some_and(|t| now >= t);
                let done_round = self.probe_rtt_round.is_some_and(|r| self.round > r);
                if done_time && done_round {
                    self.min_rtt_at = now;
                    self.cwnd = self.cwnd.max(self.prior_cwnd);
                    self.prior_cwnd = 0;
                    if self.filled_pipe {
                        self.enter_probe_bw(now);
                    } else {
                        self.mode = BbrMode::Startup;
                        self.pacing_gain = BBR_HIGH_GAIN;
                        self.cwnd_gain = BBR_HIGH_GAIN;
                    }
                }
            }
            BbrMode::Startup => {}
        }
        self.set_cwnd(ev);
    }

    fn reset_lower_bounds(&mut self) {
        self.bw_lo = f64::INFINITY;
        self.inflight_lo = usize::MAX;
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        self.mode = BbrMode::ProbeBw;
        // What Startup measured counts as the first probe.
        let first = self.round.saturating_sub(BBR_BW_ROUNDS);
        self.probe_starts = (first, first);
        self.cwnd_gain = 2.0;
        self.set_phase(BBR_DOWN, now);
    }

    fn set_phase(&mut self, phase: usize, now: Instant) {
        self.cycle = phase;
        self.cycle_at = now;
        self.pacing_gain = BBR_CYCLE[phase];
        if phase == BBR_CRUISE {
            // 20-22 round trips (spread by the round count so flows do not
            // probe in step), at most 2 s.
            let rtt = self.min_rtt.unwrap_or(BBR_MIN_BDP_RTT).max(BBR_MIN_BDP_RTT);
            let rounds = BBR_CRUISE_ROUNDS + (self.round.wrapping_mul(2_654_435_761) % 3) as u32;
            self.cruise_until = now + (rtt * rounds).min(BBR_PROBE_WAIT);
        }
    }

    /// A round ended: BBRv3's response to its losses. Too many (over 2 %)
    /// mean too much was in flight: `inflight_hi` comes down to what was,
    /// and probing stops. Any loss outside probing cuts the short-term
    /// bounds by β, no lower than what the round delivered.
    fn end_round(&mut self, now: Instant) {
        let (lost, delivered) = (self.round_lost, self.round_delivered);
        // Against what was in flight (BBRv3 compares a sample's losses
        // with its `tx_in_flight`): a short round's few deliveries would
        // make random loss look like a lot.
        let sent = (lost + delivered).max(self.round_inflight);
        let too_high = lost as f64 > BBR_LOSS_THRESH * sent as f64;
        if self.filled_pipe && self.mode == BbrMode::ProbeBw && too_high {
            let probing = self.cycle == BBR_UP;
            let floor = self.bdp(BBR_BETA).unwrap_or(0);
            self.inflight_hi = self.round_inflight.max(floor).max(self.min_cwnd());
            if probing {
                self.set_phase(BBR_DOWN, now);
            }
            if !probing {
                if self.bw_lo.is_infinite() {
                    self.bw_lo = self.bandwidth();
                }
                if self.inflight_lo == usize::MAX {
                    self.inflight_lo = self.cwnd;
                }
                self.bw_lo = self.bw_latest.max(BBR_BETA * self.bw_lo);
                self.inflight_lo = delivered
                    .max((BBR_BETA * self.inflight_lo as f64) as usize)
                    .max(self.min_cwnd());
            }
        }
        self.round_lost = 0;
        self.round_delivered = 0;
        self.round_inflight = 0;
        self.bw_latest = 0.0;
    }

    fn add_bw(&mut self, rate: f64) {
        let round = self.round;
        while self.bw.back().is_some_and(|&(_, b)| b <= rate) {
            self.bw.pop_back();
        }
        self.bw.push_back((round, rate));
        // In ProbeBW the filter spans the last two probing cycles (as
        // BBRv3's), so the rate measured while probing is remembered
        // through the seconds of cruising between probes; before, 10
        // rounds.
        let oldest = if self.mode == BbrMode::ProbeBw {
            self.probe_starts.0
        } else {
            round.saturating_sub(BBR_BW_ROUNDS)
        };
        while self.bw.front().is_some_and(|&(r, _)| r < oldest) {
            self.bw.pop_front();
        }
    }

    fn set_cwnd(&mut self, ev: &AckEvent) {
        let target = self
            .bdp(self.cwnd_gain)
            .map(|b| b + 3 * self.mss)
            .unwrap_or(self.cwnd);
        // Losses come out of the window while recovering (as Linux's BBR
        // does): what was lost is not sent again on top of the window.
        if ev.lost > 0 && ev.in_recovery {
            self.cwnd = self.cwnd.saturating_sub(ev.lost).max(self.mss);
        }
        if self.conserve_until_round.is_some() {
            self.cwnd = self.cwnd.max(ev.in_flight + ev.delivered);
        } else if self.filled_pipe {
            self.cwnd = (self.cwnd + ev.delivered).min(target);
        } else if self.cwnd < target || ev.delivered_total < initial_window(self.mss) as u64 {
            self.cwnd += ev.delivered;
        }
        if self.mode == BbrMode::ProbeBw {
            let hi = if self.cycle == BBR_CRUISE {
                (self.inflight_hi as f64 * (1.0 - BBR_HEADROOM)) as usize
            } else {
                self.inflight_hi
            };
            self.cwnd = self.cwnd.min(hi).min(self.inflight_lo);
        }
        self.cwnd = self.cwnd.max(self.min_cwnd());
        if self.mode == BbrMode::ProbeRtt {
            self.cwnd = self.cwnd.min(self.min_cwnd());
        }
    }

    fn on_recovery_start(&mut self, in_flight: usize) {
        self.prior_cwnd = self.prior_cwnd.max(self.cwnd);
        self.cwnd = (in_flight + self.mss).max(self.min_cwnd());
        self.conserve_until_round = Some(self.round);
    }

    fn on_recovery_end(&mut self) {
        self.conserve_until_round = None;
        self.cwnd = self.cwnd.max(self.prior_cwnd);
        self.prior_cwnd = 0;
    }

    fn on_timeout(&mut self) {
        self.prior_cwnd = self.prior_cwnd.max(self.cwnd);
        self.conserve_until_round = None;
        self.cwnd = self.mss;
    }

    fn on_idle_restart(&mut self) {
        // The model stays valid; pacing at the estimated rate restarts
        // without a burst.
    }
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
