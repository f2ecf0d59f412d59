//! The send side: bytes the application wrote and the scoreboard of sent
//! segments (RFC 6675's, as RACK-TLP uses it, RFC 8985).
//!
//! Every byte from `una` on is kept until acknowledged. Sent bytes are
//! split into the segments they went out as, each with its send time and
//! whether it was SACKed, is deemed lost, or was retransmitted. Loss is
//! decided by time (RACK): a segment sent before one that has been
//! delivered, and not delivered itself within the RTT plus a reordering
//! window, is lost. Bytes in flight ("pipe") are those sent and neither
//! SACKed nor deemed lost.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::cc::RateSample;
use super::seq::Seq;

#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub start: Seq,
    /// One past the last sequence number (FIN included).
    pub end: Seq,
    pub sent_at: Instant,
    pub retransmitted: bool,
    pub sacked: bool,
    pub lost: bool,
    pub fin: bool,
    /// Delivery-rate state when it was (last) sent.
    delivered: u64,
    delivered_at: Instant,
    first_sent_at: Instant,
    app_limited: bool,
}

impl Sent {
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn counted(&self) -> bool {
        !self.sacked && !self.lost
    }
}

/// What one acknowledgement did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Acked {
    /// Bytes newly acknowledged cumulatively (a FIN counts one).
    pub cumulative: usize,
    /// Bytes newly SACKed.
    pub sacked: usize,
    /// An RTT sample from a segment sent once (Karn's rule).
    pub rtt: Option<Duration>,
    /// Our FIN is acknowledged.
    pub fin_acked: bool,
    /// A delivery-rate sample, if this ACK delivered anything.
    pub rate: Option<RateSample>,
    /// Retransmitted segments whose original was delivered (the
    /// retransmission was spurious: the path reorders).
    pub spurious: usize,
    /// Bytes newly delivered: cumulative and SACKed, less what duplicate
    /// ACKs already counted (see [`SendQueue::dup_acked`]).
    pub delivered: usize,
}

/// The newest segment an ACK delivered, for the rate sample.
#[derive(Clone, Copy)]
struct Newest {
    delivered: u64,
    delivered_at: Instant,
    first_sent_at: Instant,
    sent_at: Instant,
    app_limited: bool,
}

pub struct SendQueue {
    data: VecDeque<u8>,
    capacity: usize,
    /// First unacknowledged sequence number: `data[0]`.
    pub una: Seq,
    /// Next new sequence number to send.
    pub nxt: Seq,
    /// The application closed: a FIN follows the data.
    pub fin_queued: bool,
    segs: VecDeque<Sent>,
    /// Bytes sent, not SACKed, not deemed lost.
    pub in_flight: usize,
    /// Segments deemed lost and not yet retransmitted.
    pub lost: usize,
    sacked: usize,
    /// RACK: send time and end of the most recently sent segment delivered.
    rack_xmit: Option<Instant>,
    rack_end: Seq,
    /// RACK: the RTT of that segment.
    pub rack_rtt: Duration,
    /// Bytes delivered (acknowledged or SACKed) so far, and when the count
    /// last grew.
    pub delivered: u64,
    delivered_at: Option<Instant>,
    first_sent_at: Option<Instant>,
    /// Samples are application-limited until `delivered` passes this
    /// (0: not limited).
    app_limited_until: u64,
    /// Without SACK: bytes that duplicate ACKs say have left the network
    /// (one segment each, as Linux counts a Reno peer's), not yet covered
    /// by a cumulative ACK.
    dup_out: usize,
}

impl SendQueue {
    pub fn new(capacity: usize, iss_plus_one: Seq) -> Self {
        SendQueue {
            data: VecDeque::new(),
            capacity: capacity.max(1),
            una: iss_plus_one,
            nxt: iss_plus_one,
            fin_queued: false,
            segs: VecDeque::new(),
            in_flight: 0,
            lost: 0,
            sacked: 0,
            rack_xmit: None,
            rack_end: iss_plus_one,
            rack_rtt: Duration::ZERO,
            delivered: 0,
            delivered_at: None,
            first_sent_at: None,
            app_limited_until: 0,
            dup_out: 0,
        }
    }

    /// Bytes in the network: in flight less what duplicate ACKs reported
    /// delivered (RFC 6675's "pipe"; the same as `in_flight` with SACK).
    pub fn pipe(&self) -> usize {
        self.in_flight.saturating_sub(self.dup_out)
    }

    /// A duplicate ACK from a peer without SACK: one more segment left
    /// the network (PRR, RFC 6937 §3: one MSS per duplicate ACK). The
    /// cumulative ACK that covers it later does not count it again (but
    /// delivery-rate samples, which go by cumulative ACKs, do).
    /// Returns the bytes counted.
    pub fn dup_acked(&mut self, mss: usize) -> usize {
        let n = mss.min(self.in_flight.saturating_sub(self.dup_out));
        self.dup_out += n;
        n
    }

    /// The first unacknowledged segment was retransmitted before `t` and
    /// is still counted in flight.
    pub fn head_resent_before(&self, t: Instant) -> bool {
        self.segs
            .front()
            .is_some_and(|s| s.retransmitted && s.counted() && s.sent_at < t)
    }

    /// NewReno (RFC 6582, as Linux marks a Reno peer's losses): the first
    /// unacknowledged segment is lost, unless already so or SACKed.
    /// Returns the bytes newly deemed lost.
    pub fn mark_head_lost(&mut self) -> usize {
        let Some(s) = self.segs.front_mut() else {
            return 0;
        };
        if !s.counted() {
            return 0;
        }
        s.lost = true;
        let len = s.end - s.start;
        self.lost += 1;
        self.in_flight -= len;
        self.dup_out = self.dup_out.min(self.in_flight);
        len
    }

    /// The sender has nothing more to send while the window has room:
    /// rate samples until this flight is delivered understate the path.
    pub fn mark_app_limited(&mut self) {
        self.app_limited_until = (self.delivered + self.in_flight as u64).max(1);
    }

    /// Stamps a segment with the delivery-rate state at sending.
    fn stamp(&mut self, now: Instant) -> (u64, Instant, Instant, bool) {
        if self.segs.is_empty() || self.in_flight == 0 {
            // Nothing in flight: intervals start now.
            self.first_sent_at = Some(now);
            self.delivered_at = Some(now);
        }
        (
            self.delivered,
            self.delivered_at.unwrap_or(now),
            self.first_sent_at.unwrap_or(now),
            self.app_limited_until != 0,
        )
    }

    /// Room for more application bytes, with at most `limit` queued.
    pub fn room(&self, limit: usize) -> usize {
        self.capacity.min(limit).saturating_sub(self.data.len())
    }

    /// Queues what fits under `limit` (see [`room`](Self::room)).
    pub fn write(&mut self, bytes: &[u8], limit: usize) -> usize {
        let n = bytes.len().min(self.room(limit));
        if self.data.capacity() < self.data.len() + n {
            // Grow towards the configured size in steps, not all at once.
            let want = (self.data.len() + n)
                .max(self.data.capacity() * 2)
                .min(self.capacity);
            self.data.reserve_exact(want - self.data.len());
        }
        self.data.extend(&bytes[..n]);
        n
    }

    /// Bytes of memory the queue and the scoreboard hold.
    pub fn allocated(&self) -> usize {
        self.data.capacity() + self.segs.capacity() * std::mem::size_of::<Sent>()
    }

    /// Is there memory [`shrink`](Self::shrink) would give back?
    pub fn can_shrink(&self) -> bool {
        self.data.is_empty() && self.segs.is_empty() && self.allocated() > 0
    }

    /// Gives the memory back if nothing is queued or outstanding.
    pub fn shrink(&mut self) {
        if self.data.is_empty() && self.segs.is_empty() {
            self.data = VecDeque::new();
            self.segs = VecDeque::new();
        }
    }

    /// Bytes written and not acknowledged.
    pub fn queued(&self) -> usize {
        self.data.len()
    }

    /// Sequence number just past the last data byte (where a FIN goes).
    pub fn data_end(&self) -> Seq {
        self.una + self.data.len()
    }

    /// Bytes written and never sent.
    pub fn unsent(&self) -> usize {
        self.data_end() - self.nxt.min(self.data_end())
    }

    /// Nothing is sent and unacknowledged.
    pub fn idle(&self) -> bool {
        self.segs.is_empty()
    }

    /// A FIN is queued and not sent yet.
    pub fn fin_unsent(&self) -> bool {
        self.fin_after(0)
    }

    /// Does a FIN go with the next `len` new bytes (they end the data)?
    pub fn fin_after(&self, len: usize) -> bool {
        self.fin_queued && self.nxt + len == self.data_end()
    }

    /// The bytes `[start, start + len)` as up to two slices.
    pub fn bytes(&self, start: Seq, len: usize) -> [&[u8]; 2] {
        let off = start - self.una;
        let (a, b) = self.data.as_slices();
        if off >= a.len() {
            [&b[off - a.len()..off - a.len() + len], &[]]
        } else if off + len <= a.len() {
            [&a[off..off + len], &[]]
        } else {
            [&a[off..], &b[..off + len - a.len()]]
        }
    }

    /// Records a new segment `[nxt, nxt + len)` (plus a FIN) as sent.
    pub fn sent_new(&mut self, len: usize, fin: bool, now: Instant) {
        let start = self.nxt;
        let end = start + len + usize::from(fin);
        let (delivered, delivered_at, first_sent_at, app_limited) = self.stamp(now);
        self.segs.push_back(Sent {
            delivered,
            delivered_at,
            first_sent_at,
            app_limited,
            start,
            end,
            sent_at: now,
            retransmitted: false,
            sacked: false,
            lost: false,
            fin,
        });
        self.in_flight += end - start;
        self.nxt = end;
    }

    /// The first segment deemed lost, if any: (index, start, payload
    /// length, fin).
    pub fn first_lost(&self) -> Option<(usize, Seq, usize, bool)> {
        if self.lost == 0 {
            return None;
        }
        self.segs
            .iter()
            .enumerate()
            .find(|(_, s)| s.lost)
            .map(|(i, s)| (i, s.start, s.len() - usize::from(s.fin), s.fin))
    }

    /// The last segment not SACKed (a tail loss probe resends it).
    pub fn last_unsacked(&self) -> Option<(usize, Seq, usize, bool)> {
        self.segs
            .iter()
            .enumerate()
            .rev()
            .find(|(_, s)| !s.sacked)
            .map(|(i, s)| (i, s.start, s.len() - usize::from(s.fin), s.fin))
    }

    /// Segment `i` went out again.
    pub fn retransmitted(&mut self, i: usize, now: Instant) {
        let stamp = self.stamp(now);
        let s = &mut self.segs[i];
        (s.delivered, s.delivered_at, s.first_sent_at, s.app_limited) = stamp;
        if s.lost {
            s.lost = false;
            self.lost -= 1;
            self.in_flight += s.len();
        }
        s.retransmitted = true;
        s.sent_at = now;
    }

    /// Processes a cumulative ACK and SACK blocks. `min_rtt`: the path's
    /// minimum RTT, below which the delivery of a retransmitted segment is
    /// taken for its original's (RFC 8985 §6.2: no RACK update then).
    pub fn ack(&mut self, ack: Seq, sack: &[(Seq, Seq)], now: Instant, min_rtt: Duration) -> Acked {
        let mut out = Acked::default();
        let mut newest: Option<Newest> = None;
        if ack > self.una && ack <= self.nxt {
            while let Some(s) = self.segs.front_mut() {
                if s.end <= ack {
                    let s = self.segs.pop_front().unwrap_or_else(|| unreachable!());
                    self.forget(&s);
                    out.fin_acked |= s.fin;
                    if s.sacked {
                        // Delivered (and sampled) when it was SACKed.
                        continue;
                    }
                    out.cumulative += s.len();
                    self.delivered_one(&s, now, min_rtt, &mut out, &mut newest);
                } else {
                    if s.start < ack {
                        // Partly acknowledged (a peer cut our segment).
                        let cut = ack - s.start;
                        if s.counted() {
                            self.in_flight -= cut;
                        }
                        if !s.sacked {
                            out.cumulative += cut;
                        }
                        s.start = ack;
                    }
                    break;
                }
            }
            let data_acked = (ack - self.una).min(self.data.len());
            self.data.drain(..data_acked);
            self.una = ack;
        }
        for &(l, r) in sack {
            // Only blocks inside what is outstanding count.
            if l >= r || l < self.una || r > self.nxt {
                continue;
            }
            let from = self.segs.partition_point(|s| s.end <= l);
            for i in from..self.segs.len() {
                let s = self.segs[i];
                if s.start >= r {
                    break;
                }
                if s.sacked || s.start < l || s.end > r {
                    continue;
                }
                if s.lost {
                    self.lost -= 1;
                } else {
                    self.in_flight -= s.len();
                }
                self.segs[i].lost = false;
                self.segs[i].sacked = true;
                self.sacked += 1;
                out.sacked += s.len();
                self.delivered_one(&s, now, min_rtt, &mut out, &mut newest);
            }
        }
        // What duplicate ACKs counted already is not delivered twice.
        let counted = self.dup_out.min(out.cumulative);
        self.dup_out = (self.dup_out - counted).min(self.in_flight);
        let delivered = out.cumulative + out.sacked;
        out.delivered = delivered - counted;
        if delivered > 0 {
            self.delivered += delivered as u64;
            self.delivered_at = Some(now);
            if self.app_limited_until != 0 && self.delivered > self.app_limited_until {
                self.app_limited_until = 0;
            }
        }
        if let Some(n) = newest {
            self.first_sent_at = Some(n.sent_at);
            let send_elapsed = n.sent_at.saturating_duration_since(n.first_sent_at);
            let ack_elapsed = now.saturating_duration_since(n.delivered_at);
            let interval = send_elapsed.max(ack_elapsed);
            // Shorter than a round trip: ACK compression, or reordering
            // that delivered the sample early; it would overstate the rate.
            if !interval.is_zero() && interval >= min_rtt {
                out.rate = Some(RateSample {
                    rate: (self.delivered - n.delivered) as f64 / interval.as_secs_f64(),
                    prior_delivered: n.delivered,
                    app_limited: n.app_limited,
                });
            }
        }
        out
    }

    fn forget(&mut self, s: &Sent) {
        if s.sacked {
            self.sacked -= 1;
        } else if s.lost {
            self.lost -= 1;
        } else {
            self.in_flight -= s.len();
        }
    }

    /// A segment was delivered (acknowledged or SACKed) for the first
    /// time: an RTT sample if it went once (Karn), RACK's update (RFC 8985
    /// §6.2 step 2), and the newest delivery for the rate sample.
    fn delivered_one(
        &mut self,
        s: &Sent,
        now: Instant,
        min_rtt: Duration,
        out: &mut Acked,
        newest: &mut Option<Newest>,
    ) {
        let rtt = now.saturating_duration_since(s.sent_at);
        if !s.retransmitted {
            out.rtt = Some(out.rtt.map_or(rtt, |r| r.min(rtt)));
        }
        // Sooner than any round trip after its retransmission: it is the
        // original that arrived (a spurious retransmission), and the send
        // time that counts is not the retransmission's.
        let spurious = s.retransmitted && rtt < min_rtt;
        out.spurious += usize::from(spurious);
        let newer = !spurious
            && match self.rack_xmit {
                None => true,
                Some(x) => s.sent_at > x || (s.sent_at == x && s.end > self.rack_end),
            };
        if newer {
            self.rack_xmit = Some(s.sent_at);
            self.rack_end = s.end;
            self.rack_rtt = rtt;
        }
        if newest.is_none_or(|n| s.delivered > n.delivered || s.sent_at > n.sent_at) {
            *newest = Some(Newest {
                delivered: s.delivered,
                delivered_at: s.delivered_at,
                first_sent_at: s.first_sent_at,
                sent_at: s.sent_at,
                app_limited: s.app_limited,
            });
        }
    }

    /// Marks as lost the segments sent before the latest delivered one and
    /// overdue by `reo_wnd` (RACK). Returns the bytes newly deemed lost and
    /// when the next segment would become overdue.
    pub fn detect_loss(&mut self, now: Instant, reo_wnd: Duration) -> (usize, Option<Instant>) {
        let Some(xmit) = self.rack_xmit else {
            return (0, None);
        };
        let (mut lost, mut timer) = (0, None::<Instant>);
        for s in self.segs.iter_mut() {
            // Segments go out in sequence order and a retransmission only
            // later, so past the first segment sent once after `xmit`,
            // every segment was sent after it.
            if !s.retransmitted && s.sent_at > xmit {
                break;
            }
            if !s.counted() {
                continue;
            }
            let before = s.sent_at < xmit || (s.sent_at == xmit && s.end < self.rack_end);
            if !before {
                continue;
            }
            let due = s.sent_at + self.rack_rtt + reo_wnd;
            if due <= now {
                s.lost = true;
                self.lost += 1;
                self.in_flight -= s.len();
                lost += s.len();
            } else {
                timer = Some(timer.map_or(due, |t| t.min(due)));
            }
        }
        (lost, timer)
    }

    /// The retransmission timer fired: every segment not SACKed is lost.
    /// If the first unacknowledged segment was SACKed, the receiver has
    /// dropped data it had SACKed (reneging, RFC 2018 §8, as a receiver
    /// short of memory may): no SACK is trusted then, everything is lost.
    pub fn all_lost(&mut self) {
        let reneged = self.segs.front().is_some_and(|s| s.sacked);
        for s in self.segs.iter_mut() {
            if reneged && s.sacked {
                s.sacked = false;
                self.sacked -= 1;
            }
            if s.counted() {
                s.lost = true;
                self.lost += 1;
            }
        }
        self.in_flight = 0;
        self.dup_out = 0;
    }

    /// Are any segments SACKed (is there a hole)?
    pub fn has_sacked(&self) -> bool {
        self.sacked > 0
    }

    pub fn segments(&self) -> usize {
        self.segs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue_with(n: usize, seg: usize, now: Instant) -> SendQueue {
        let mut q = SendQueue::new(1 << 20, Seq(1000));
        let data: Vec<u8> = (0..n * seg).map(|i| i as u8).collect();
        assert_eq!(q.write(&data, usize::MAX), data.len());
        for _ in 0..n {
            q.sent_new(seg, false, now);
        }
        q
    }

    #[test]
    fn cumulative_ack_frees_bytes_and_samples_rtt() {
        let t0 = Instant::now();
        let mut q = queue_with(4, 100, t0);
        assert_eq!(q.in_flight, 400);
        let a = q.ack(
            Seq(1250),
            &[],
            t0 + Duration::from_millis(30),
            Duration::ZERO,
        );
        assert_eq!(a.cumulative, 250);
        assert_eq!(a.rtt, Some(Duration::from_millis(30)));
        assert_eq!(q.in_flight, 150);
        assert_eq!(q.queued(), 150);
        assert_eq!(
            q.bytes(Seq(1250), 10)[0],
            &[250_u8, 251, 252, 253, 254, 255, 0, 1, 2, 3][..]
        );
        // An ACK beyond what was sent is ignored.
        assert_eq!(q.ack(Seq(9999), &[], t0, Duration::ZERO).cumulative, 0);
    }

    #[test]
    fn rack_marks_holes_lost_after_the_reordering_window() {
        let t0 = Instant::now();
        let mut q = queue_with(10, 100, t0);
        // Segment 2 (1200..1300) is missing; 3..9 arrive.
        let t1 = t0 + Duration::from_millis(20);
        let a = q.ack(Seq(1200), &[(Seq(1300), Seq(2000))], t1, Duration::ZERO);
        assert_eq!((a.cumulative, a.sacked), (200, 700));
        assert_eq!(q.in_flight, 100);
        // Sent at the same time as delivered ones: overdue after reo_wnd.
        let reo = Duration::from_millis(5);
        let (lost, timer) = q.detect_loss(t1, reo);
        assert_eq!(lost, 0);
        assert_eq!(timer, Some(t0 + Duration::from_millis(20) + reo));
        let (lost, _) = q.detect_loss(t1 + reo, reo);
        assert_eq!(lost, 100);
        assert_eq!(q.in_flight, 0);
        let (i, start, len, fin) = q.first_lost().unwrap();
        assert_eq!((start, len, fin), (Seq(1200), 100, false));
        q.retransmitted(i, t1 + reo);
        assert_eq!(q.in_flight, 100);
        assert!(q.first_lost().is_none());
        let a = q.ack(
            Seq(2000),
            &[],
            t1 + Duration::from_millis(50),
            Duration::ZERO,
        );
        assert_eq!(a.cumulative, 100, "SACKed bytes are not counted twice");
        assert_eq!(a.rtt, None, "no sample from a retransmission");
        assert!(q.idle());
        assert_eq!((q.in_flight, q.lost), (0, 0));
    }

    #[test]
    fn a_retransmission_above_the_latest_delivery_can_be_lost_again() {
        // Segments 0-3 go out; 2 is retransmitted at t1, then 0 at t2
        // (later). 0's retransmission is delivered: it is the newest
        // delivery (RACK) though it sits below 2 in sequence space. 2's
        // retransmission, sent before it and not delivered, is lost once
        // overdue.
        let t0 = Instant::now();
        let mut q = queue_with(4, 100, t0);
        let ms = Duration::from_millis;
        q.ack(Seq(1000), &[(Seq(1300), Seq(1400))], t0 + ms(10), ms(10));
        q.detect_loss(t0 + ms(20), Duration::ZERO);
        assert_eq!(q.lost, 3);
        let (i, start, _, _) = q.first_lost().unwrap();
        assert_eq!(start, Seq(1000));
        // Retransmit 2 first (t1), then 0 and 1 (t2).
        let idx =
            |q: &SendQueue, seq: u32| q.segs.iter().position(|s| s.start == Seq(seq)).unwrap();
        let i2 = idx(&q, 1200);
        q.retransmitted(i2, t0 + ms(21));
        q.retransmitted(i, t0 + ms(22));
        let i1 = idx(&q, 1100);
        q.retransmitted(i1, t0 + ms(22));
        let a = q.ack(Seq(1200), &[(Seq(1300), Seq(1400))], t0 + ms(32), ms(10));
        assert_eq!(a.cumulative, 200);
        let (lost, timer) = q.detect_loss(t0 + ms(32), ms(2));
        assert_eq!(lost, 0);
        assert!(timer.is_some(), "segment 2 is watched");
        let (lost, _) = q.detect_loss(t0 + ms(40), ms(2));
        assert_eq!(lost, 100, "segment 2's retransmission is lost");
    }

    #[test]
    fn the_original_of_a_spurious_retransmission_does_not_move_rack() {
        // Segment 0 is retransmitted at 25 ms though its original was only
        // delayed; the original's ACK comes 1 ms after the retransmission,
        // far below the 20 ms path RTT. Taking that as the retransmission's
        // delivery would make RACK think everything sent before 25 ms is
        // overdue by now and declare the whole window lost.
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = queue_with(10, 100, t0);
        q.ack(Seq(1000), &[(Seq(1100), Seq(1200))], t0 + ms(21), ms(20));
        q.detect_loss(t0 + ms(30), ms(5));
        let (i, start, _, _) = q.first_lost().unwrap();
        assert_eq!(start, Seq(1000));
        q.retransmitted(i, t0 + ms(30));
        let a = q.ack(Seq(1100), &[(Seq(1100), Seq(1200))], t0 + ms(31), ms(20));
        assert_eq!(a.cumulative, 100);
        assert_eq!(a.spurious, 1);
        let (lost, _) = q.detect_loss(t0 + ms(31), ms(5));
        assert_eq!(lost, 0, "segments 2-9, sent at 0 ms, are not overdue");
    }

    #[test]
    fn timeout_marks_everything_unsacked_lost() {
        let t0 = Instant::now();
        let mut q = queue_with(5, 100, t0);
        q.ack(Seq(1000), &[(Seq(1200), Seq(1300))], t0, Duration::ZERO);
        q.all_lost();
        assert_eq!((q.in_flight, q.lost), (0, 4));
        let mut order = Vec::new();
        while let Some((i, start, _, _)) = q.first_lost() {
            order.push(start.0);
            q.retransmitted(i, t0);
        }
        assert_eq!(order, [1000, 1100, 1300, 1400]);
        assert_eq!(q.in_flight, 400);
    }

    #[test]
    fn fin_takes_one_sequence_number() {
        let t0 = Instant::now();
        let mut q = SendQueue::new(100, Seq(0));
        q.write(b"abc", usize::MAX);
        q.fin_queued = true;
        q.sent_new(3, true, t0);
        assert_eq!(q.nxt, Seq(4));
        let a = q.ack(Seq(4), &[], t0, Duration::ZERO);
        assert!(a.fin_acked);
        assert_eq!(a.cumulative, 4);
        assert_eq!(q.queued(), 0);
    }
}
