//! One TCP connection as a sans-IO state machine: segments in
//! ([`Socket::handle`]), packets out ([`Socket::poll_transmit`]), the next
//! timer ([`Socket::poll_at`]), and the application's side (`recv`,
//! `send_slice`, `close`, `abort`, wakers). Time is always passed in, so a
//! simulated path drives it deterministically.
//!
//! Sending: new data and retransmissions are limited by the peer's window,
//! the congestion window (CUBIC) and the pacer; during loss recovery by
//! Proportional Rate Reduction (RFC 6937). Losses are found by RACK (time
//! based, SACK driven), tail losses by a probe after about two RTTs (TLP),
//! and anything else by the retransmission timeout (200 ms floor, doubling).
//! Receiving: any number of holes up to the buffer (SACK blocks report
//! them), an immediate ACK for out-of-order data, otherwise one ACK per
//! round of input (the stack polls after each batch).

use std::net::SocketAddr;
use std::task::Waker;
use std::time::{Duration, Instant};

use super::cc::{AckEvent, Algorithm, Controller, Pacer, Rtt, MAX_RTO};
use super::recv::{Inserted, RecvBuffer};
use super::send::SendQueue;
use super::seq::Seq;
use super::wire::{self, Header, Options, Segment, ACK, FIN, PSH, RST, SYN, TCP_HEADER};

/// RFC 793's states (LISTEN is the stack's business, not a socket's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    SynSent,
    SynReceived,
    Established,
    FinWait1,
    FinWait2,
    CloseWait,
    Closing,
    LastAck,
    TimeWait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// The peer closed and every byte before its FIN was read.
    Finished,
    /// Reset, timed out or aborted.
    InvalidState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Closed for sending (shut down, reset, not connected).
    InvalidState,
}

/// How a socket is built.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// IP MTU of the link: the MSS follows from it.
    pub mtu: usize,
    pub recv_buffer: usize,
    pub send_buffer: usize,
    pub keep_alive: Option<Duration>,
    pub congestion: Algorithm,
}

/// How long TIME-WAIT lasts (short: the stack's connections are owned and
/// ports are not reused at once).
const TIME_WAIT: Duration = Duration::from_secs(2);
/// SYN retransmissions before giving up (the connect timeout usually ends
/// it first).
const MAX_SYN_RETRIES: u32 = 6;
/// Retransmission timeouts in a row before the connection is dropped.
const MAX_RTO_RETRIES: u32 = 15;
/// Added to the probe timeout when one segment is in flight (the peer may
/// delay its ACK).
const DELAYED_ACK_ALLOWANCE: Duration = Duration::from_millis(40);
/// The MSS assumed when the peer sends none (RFC 9293).
const DEFAULT_MSS: usize = 536;
const TIMESTAMP_LEN: usize = 12;
/// The most RACK's reordering window widens (in quarters of the min RTT).
const REO_MULT_MAX: u32 = 16;
/// Buffers of a connection that went quiet are given back after this long.
const TRIM_AFTER: Duration = Duration::from_secs(1);
/// Bytes an application may always queue, whatever the window.
const MIN_SEND_LIMIT: usize = 256 * 1024;
/// Duplicate ACKs that mean a loss, from a peer without SACK (RFC 5681).
const DUP_THRESH: u32 = 3;
/// How long a lone segment's acknowledgement may wait for a second one
/// (Linux's minimum delayed-ACK time).
const DELAYED_ACK: Duration = Duration::from_millis(40);
/// Segments acknowledged at once at the start, and again after a delayed
/// ACK had to fire (the sender was waiting on it: Nagle, a small window),
/// as Linux's quick-ACK mode.
const QUICKACKS: u32 = 16;
/// The receive window of a connection opened under memory pressure.
pub const PRESSURE_WINDOW: usize = 64 * 1024;
/// Timestamp ticks (ms) a segment may lag the latest before PAWS drops it
/// (Linux's `TCP_PAWS_WINDOW`).
const PAWS_WINDOW: u32 = 1;

#[derive(Debug, Clone, Copy)]
struct Recovery {
    /// Recovery ends when this is acknowledged.
    point: Seq,
    prr_delivered: usize,
    prr_out: usize,
    recover_fs: usize,
    /// Bytes delivered by the latest ACK.
    last_delivered: usize,
}

pub struct Socket {
    state: State,
    local: SocketAddr,
    remote: SocketAddr,
    cfg: Config,
    epoch: Instant,
    iss: Seq,
    snd: SendQueue,
    /// The peer's window, in bytes, from `snd.una`.
    snd_wnd: usize,
    snd_wl1: Seq,
    snd_wl2: Seq,
    snd_shift: u8,
    rcv_shift: u8,
    /// Created when the peer's initial sequence number is known.
    rcv: Option<RecvBuffer>,
    /// The peer's FIN is in and consumed (it follows all its data).
    rcv_fin: bool,
    /// Where the peer's FIN sits, once seen (maybe ahead of a hole).
    rcv_fin_at: Option<Seq>,
    sack_ok: bool,
    ts_ok: bool,
    ts_recent: u32,
    /// Largest payload per segment (options subtracted).
    mss: usize,
    rtt: Rtt,
    cc: Controller,
    pacer: Pacer,
    recovery: Option<Recovery>,
    /// After a timeout, until this is acknowledged, losses do not shrink
    /// the window again.
    rto_point: Option<Seq>,
    backoff: u32,
    rto_at: Option<Instant>,
    tlp_at: Option<Instant>,
    tlp_done: bool,
    probe_due: bool,
    persist_due: bool,
    keepalive_due: bool,
    /// The peer offered window scaling (so our SYN-ACK may too).
    ws_ok: bool,
    rack_at: Option<Instant>,
    pace_at: Option<Instant>,
    persist_at: Option<Instant>,
    time_wait_until: Option<Instant>,
    /// The SYN (or SYN-ACK) must go out (again).
    syn_due: bool,
    syn_retries: u32,
    /// An ACK must go out now (out-of-order data, a hole filled, a FIN, a
    /// window update, a probe).
    ack_now: bool,
    /// Data arrived this round: acknowledge at the end of it.
    ack_pending: bool,
    /// In-order bytes received since the last ACK went out.
    rcv_unacked: usize,
    /// A lone segment's ACK goes out then, if nothing else carried it.
    delack_at: Option<Instant>,
    /// Segments still to be acknowledged at once (quick-ACK mode).
    quickacks: u32,
    /// The right edge of the window last advertised.
    adv_edge: Seq,
    /// Duplicate ACKs in a row (peers without SACK).
    dupacks: u32,
    rst_due: bool,
    /// RACK's reordering window multiplier, when it was last widened, and
    /// recoveries since.
    reo_mult: u32,
    reo_widened: Option<Instant>,
    reo_recoveries: u32,
    /// Receive-window autotuning: bytes that became readable since
    /// `drs_start`; each RTT, a sender that used half the window gets
    /// twice as much.
    drs_start: Instant,
    drs_bytes: usize,
    /// See [`Socket::set_memory_pressure`].
    memory_pressure: bool,
    last_heard: Instant,
    last_sent: Instant,
    timeout: Option<Duration>,
    timeout_fresh: bool,
    keepalive_sent: Option<Instant>,
    ip_id: u16,
    recv_waker: Option<Waker>,
    send_waker: Option<Waker>,
    stats: Stats,
}

/// Counters of one connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub retransmits: u64,
    pub timeouts: u64,
    pub probes: u64,
    pub recoveries: u64,
}

fn wscale_for(buffer: usize) -> u8 {
    let mut shift = 0;
    while shift < 14 && (buffer >> shift) > 65535 {
        shift += 1;
    }
    shift
}

impl Socket {
    fn new(cfg: Config, local: SocketAddr, remote: SocketAddr, iss: Seq, now: Instant) -> Socket {
        let mss = Self::own_mss(&cfg, local) as usize;
        Socket {
            state: State::Closed,
            local,
            remote,
            cfg,
            epoch: now,
            iss,
            snd: SendQueue::new(cfg.send_buffer, iss + 1),
            snd_wnd: 0,
            snd_wl1: Seq(0),
            snd_wl2: Seq(0),
            snd_shift: 0,
            rcv_shift: 0,
            rcv: None,
            rcv_fin: false,
            rcv_fin_at: None,
            sack_ok: false,
            ts_ok: false,
            ts_recent: 0,
            mss,
            rtt: Rtt::default(),
            cc: Controller::new(cfg.congestion, mss, now),
            pacer: Pacer::default(),
            recovery: None,
            rto_point: None,
            backoff: 0,
            rto_at: None,
            tlp_at: None,
            tlp_done: false,
            probe_due: false,
            persist_due: false,
            keepalive_due: false,
            ws_ok: false,
            rack_at: None,
            pace_at: None,
            persist_at: None,
            time_wait_until: None,
            syn_due: true,
            syn_retries: 0,
            ack_now: false,
            ack_pending: false,
            rcv_unacked: 0,
            delack_at: None,
            quickacks: QUICKACKS,
            adv_edge: Seq(0),
            dupacks: 0,
            rst_due: false,
            reo_mult: 1,
            reo_widened: None,
            reo_recoveries: 0,
            drs_start: now,
            drs_bytes: 0,
            memory_pressure: false,
            last_heard: now,
            last_sent: now,
            timeout: None,
            timeout_fresh: false,
            keepalive_sent: None,
            ip_id: iss.0 as u16,
            recv_waker: None,
            send_waker: None,
            stats: Stats::default(),
        }
    }

    fn own_mss(cfg: &Config, local: SocketAddr) -> u16 {
        let ip = wire::ip_header_len(local.ip());
        cfg.mtu.saturating_sub(ip + TCP_HEADER).clamp(64, 65535) as u16
    }

    /// An active open: the SYN goes out at the next poll.
    pub fn connect(
        cfg: Config,
        local: SocketAddr,
        remote: SocketAddr,
        iss: Seq,
        now: Instant,
    ) -> Socket {
        let mut s = Socket::new(cfg, local, remote, iss, now);
        s.state = State::SynSent;
        s.rto_at = Some(now + s.rtt.rto(0));
        s
    }

    /// A passive open from a SYN: the SYN-ACK goes out at the next poll.
    pub fn accept(cfg: Config, syn: &Segment<'_>, iss: Seq, now: Instant) -> Socket {
        let mut s = Socket::new(cfg, syn.dst, syn.src, iss, now);
        s.state = State::SynReceived;
        s.take_syn_options(syn, now);
        s.rcv = Some(RecvBuffer::new(cfg.recv_buffer, syn.seq + 1));
        s.snd_wnd = usize::from(syn.window);
        s.snd_wl1 = syn.seq;
        s.snd_wl2 = iss;
        s.rto_at = Some(now + s.rtt.rto(0));
        s
    }

    /// Reads the options of the peer's SYN: MSS, scaling, SACK, timestamps.
    fn take_syn_options(&mut self, syn: &Segment<'_>, now: Instant) {
        let o = &syn.options;
        let peer_mss = o.mss.map_or(DEFAULT_MSS, usize::from);
        self.mss = self.mss.min(peer_mss).max(64);
        self.ws_ok = o.window_scale.is_some();
        match o.window_scale {
            Some(shift) => {
                self.snd_shift = shift;
                self.rcv_shift = wscale_for(self.cfg.recv_buffer);
            }
            None => {
                self.snd_shift = 0;
                self.rcv_shift = 0;
            }
        }
        self.sack_ok = o.sack_permitted;
        if let Some((val, _)) = o.timestamp {
            self.ts_ok = true;
            self.ts_recent = val;
            self.mss -= TIMESTAMP_LEN;
        }
        self.cc = Controller::new(self.cfg.congestion, self.mss, now);
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn local(&self) -> SocketAddr {
        self.local
    }

    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Payload bytes per segment.
    pub fn mss(&self) -> usize {
        self.mss
    }

    pub fn cwnd(&self) -> usize {
        self.cc.cwnd()
    }

    /// Nothing left to do: closed with any reset sent, or in TIME-WAIT.
    pub fn is_done(&self) -> bool {
        match self.state {
            State::Closed => !self.rst_due,
            State::TimeWait => true,
            _ => false,
        }
    }

    /// Is the connection open (not closed, not in TIME-WAIT)?
    pub fn is_active(&self) -> bool {
        !matches!(self.state, State::Closed | State::TimeWait)
    }

    /// Unread received bytes are waiting.
    pub fn can_recv(&self) -> bool {
        self.rcv.as_ref().is_some_and(|r| r.readable() > 0)
    }

    /// Bytes of buffer memory the connection holds now.
    pub fn allocated(&self) -> usize {
        self.snd.allocated() + self.rcv.as_ref().map_or(0, |r| r.allocated())
    }

    /// A quiet connection's buffers can be given back (both drained).
    fn trimmable(&self) -> bool {
        self.snd.can_shrink() || self.rcv.as_ref().is_some_and(|r| r.can_shrink())
    }

    fn quiet_since(&self) -> Instant {
        self.last_heard.max(self.last_sent)
    }

    /// Data received beyond a hole is held.
    pub fn has_out_of_order(&self) -> bool {
        self.rcv.as_ref().is_some_and(|r| r.has_holes())
    }

    /// The timestamp this socket would send at `now`.
    #[cfg(test)]
    pub fn timestamp_at(&self, now: Instant) -> u32 {
        self.ts_now(now)
    }

    /// The sequence number expected next, and our next one (what a
    /// segment from the peer carries now).
    #[cfg(test)]
    pub fn expected(&self) -> (Seq, Seq) {
        (self.rcv_nxt(), self.snd.nxt)
    }

    /// Bytes written and not yet acknowledged.
    pub fn send_queue(&self) -> usize {
        self.snd.queued()
    }

    /// The abort-after-silence timeout (see the engine's `tcp_timeout`).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        if timeout.is_some() && self.timeout.is_none() {
            self.timeout_fresh = true;
        }
        self.timeout = timeout;
    }

    pub fn register_recv_waker(&mut self, waker: &Waker) {
        if !self.recv_waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.recv_waker = Some(waker.clone());
        }
    }

    pub fn register_send_waker(&mut self, waker: &Waker) {
        if !self.send_waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.send_waker = Some(waker.clone());
        }
    }

    fn wake_recv(&mut self) {
        if let Some(w) = self.recv_waker.take() {
            w.wake();
        }
    }

    fn wake_send(&mut self) {
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    fn wake_all(&mut self) {
        self.wake_recv();
        self.wake_send();
    }

    /// Hands readable bytes to `f`, which returns how many it took; call
    /// again for bytes past the ring's end.
    pub fn recv(&mut self, f: impl FnOnce(&[u8]) -> usize) -> Result<usize, RecvError> {
        let Some(rcv) = self.rcv.as_mut() else {
            return match self.state {
                State::SynSent | State::SynReceived => Ok(0),
                _ => Err(RecvError::InvalidState),
            };
        };
        if rcv.readable() > 0 {
            let chunk = rcv.peek();
            let n = f(chunk).min(chunk.len());
            rcv.consume(n);
            // Tell the peer about the room at once if what it may still
            // send had shrunk to half the window or less and has now at
            // least doubled (Linux's rule; a reader that keeps up never
            // needs an update of its own).
            let left = if self.adv_edge > rcv.nxt {
                self.adv_edge - rcv.nxt
            } else {
                0
            };
            if 2 * left <= rcv.limit() && rcv.window() >= (2 * left).max(self.mss) {
                self.ack_now = true;
            }
            return Ok(n);
        }
        if self.rcv_fin {
            return Err(RecvError::Finished);
        }
        match self.state {
            State::Closed => Err(RecvError::InvalidState),
            _ => Ok(0),
        }
    }

    /// Copies into `buf`; see [`recv`](Self::recv).
    pub fn recv_slice(&mut self, buf: &mut [u8]) -> Result<usize, RecvError> {
        let mut done = 0;
        loop {
            let n = self.recv(|chunk| {
                let n = chunk.len().min(buf.len() - done);
                buf[done..done + n].copy_from_slice(&chunk[..n]);
                n
            })?;
            done += n;
            if n == 0 || done == buf.len() {
                return Ok(done);
            }
        }
    }

    /// Queues bytes to send; `Ok(0)` means the buffer is full.
    pub fn send_slice(&mut self, data: &[u8]) -> Result<usize, SendError> {
        match self.state {
            State::SynSent | State::SynReceived | State::Established | State::CloseWait
                if !self.snd.fin_queued =>
            {
                Ok(self.snd.write(data, self.send_limit()))
            }
            _ => Err(SendError::InvalidState),
        }
    }

    /// Room left in the send buffer.
    pub fn send_room(&self) -> usize {
        self.snd.room(self.send_limit())
    }

    /// The most bytes queued for sending: twice the congestion window (as
    /// Linux sizes a send buffer), so queued data waits in the network's
    /// pace rather than in memory, within the configured buffer.
    fn send_limit(&self) -> usize {
        if self.memory_pressure {
            return MIN_SEND_LIMIT;
        }
        (2 * self.cc.cwnd()).max(MIN_SEND_LIMIT)
    }

    /// The stack's connections together hold more buffer memory than its
    /// budget: the receive window stops growing and writers may queue only
    /// [`MIN_SEND_LIMIT`] until it eases (windows already offered stay, as
    /// TCP requires).
    ///
    /// Under pressure a connection still in its handshake (whose SYN
    /// offered at most 64 KiB) starts with a [`PRESSURE_WINDOW`] window
    /// instead of 1 MiB, and out-of-order data is dropped, received or
    /// held (the sender repairs it; SACK allows a receiver to renege).
    pub fn set_memory_pressure(&mut self, on: bool) {
        self.memory_pressure = on;
        if !on {
            return;
        }
        let handshake = matches!(self.state, State::SynSent | State::SynReceived);
        if let Some(rcv) = self.rcv.as_mut() {
            if handshake {
                rcv.lower_unoffered_limit(PRESSURE_WINDOW);
            }
            if rcv.has_holes() {
                rcv.drop_out_of_order();
            }
        }
    }

    /// The receive window offered when empty, bytes.
    pub fn recv_limit(&self) -> usize {
        self.rcv.as_ref().map_or(0, |r| r.limit())
    }

    /// Shuts down the sending side: a FIN follows the queued data.
    pub fn close(&mut self) {
        match self.state {
            State::SynSent => self.state = State::Closed,
            State::SynReceived | State::Established => {
                self.snd.fin_queued = true;
                self.state = State::FinWait1;
            }
            State::CloseWait => {
                self.snd.fin_queued = true;
                self.state = State::LastAck;
            }
            _ => {}
        }
    }

    /// Resets the connection.
    pub fn abort(&mut self) {
        if !matches!(self.state, State::Closed | State::SynSent | State::TimeWait) {
            self.rst_due = true;
        }
        self.state = State::Closed;
        self.wake_all();
    }

    fn rcv_nxt(&self) -> Seq {
        self.rcv
            .as_ref()
            .map_or(Seq(0), |r| r.nxt + usize::from(self.rcv_fin))
    }

    fn rcv_wnd(&self) -> usize {
        self.rcv.as_ref().map_or(0, |r| r.window())
    }

    fn ts_now(&self, now: Instant) -> u32 {
        (now.saturating_duration_since(self.epoch).as_millis() as u32).wrapping_add(self.iss.0)
    }

    // ------------------------------------------------------------ input --

    /// Processes one segment addressed to this connection.
    pub fn handle(&mut self, now: Instant, seg: &Segment<'_>) {
        match self.state {
            State::Closed => {}
            State::SynSent => self.handle_syn_sent(now, seg),
            _ => self.handle_synchronized(now, seg),
        }
    }

    fn handle_syn_sent(&mut self, now: Instant, seg: &Segment<'_>) {
        let ack_ok = seg.has(ACK) && seg.ack == self.iss + 1;
        if seg.has(RST) {
            if ack_ok {
                self.state = State::Closed;
                self.wake_all();
            }
            return;
        }
        if !seg.has(SYN) || !ack_ok {
            return;
        }
        self.take_syn_options(seg, now);
        let mut rcv = RecvBuffer::new(self.cfg.recv_buffer, seg.seq + 1);
        if self.memory_pressure {
            rcv.lower_unoffered_limit(PRESSURE_WINDOW);
        }
        self.rcv = Some(rcv);
        self.snd.una = seg.ack;
        self.snd_wnd = usize::from(seg.window) << self.snd_shift;
        self.snd_wl1 = seg.seq;
        self.snd_wl2 = seg.ack;
        self.established(now);
        self.ack_now = true;
    }

    fn established(&mut self, now: Instant) {
        self.state = State::Established;
        self.syn_due = false;
        self.rto_at = None;
        self.backoff = 0;
        if self.syn_retries == 0 {
            // The handshake's RTT (Karn: only without retransmissions).
            self.rtt
                .sample(now.saturating_duration_since(self.last_sent), now);
        }
        self.last_heard = now;
        self.wake_all();
    }

    fn handle_synchronized(&mut self, now: Instant, seg: &Segment<'_>) {
        let rcv_nxt = self.rcv_nxt();
        let wnd = self.rcv_wnd().max(1);
        // Acceptability (RFC 9293 §3.10.7.4), leniently: any overlap with
        // the window, or a zero-length segment at its edge.
        let end = seg.seq + seg.seq_len().max(1);
        let acceptable =
            seg.seq < rcv_nxt + wnd && end > rcv_nxt || (seg.seq_len() == 0 && seg.seq == rcv_nxt);
        if seg.has(RST) {
            if acceptable || seg.seq == rcv_nxt {
                self.state = State::Closed;
                self.rst_due = false;
                self.wake_all();
            }
            return;
        }
        if self.paws_rejects(seg) {
            // An old duplicate from before the sequence numbers wrapped
            // (RFC 7323 §5): say where we are, take nothing from it.
            self.ack_now = true;
            return;
        }
        if seg.has(SYN) {
            if self.state == State::SynReceived && seg.seq + 1 == rcv_nxt {
                // The peer did not see our SYN-ACK.
                self.syn_due = true;
            } else {
                // RFC 5961: a challenge ACK, never a reset.
                self.ack_now = true;
            }
            return;
        }
        if !acceptable {
            // Old duplicate or beyond the window: say where we are.
            self.ack_now = true;
            return;
        }
        self.last_heard = now;
        self.keepalive_sent = None;
        if !seg.has(ACK) {
            return;
        }
        if let (true, Some((val, _))) = (self.ts_ok, seg.options.timestamp) {
            if seg.seq <= rcv_nxt && ts_newer_or_same(val, self.ts_recent) {
                self.ts_recent = val;
            }
        }
        if self.state == State::SynReceived {
            if seg.ack == self.iss + 1 {
                self.snd_wnd = usize::from(seg.window) << self.snd_shift;
                self.snd_wl1 = seg.seq;
                self.snd_wl2 = seg.ack;
                self.established(now);
            } else {
                self.rst_due = false;
                self.ack_now = true;
                return;
            }
        }
        if seg.ack > self.snd.nxt {
            // Acknowledges what we never sent.
            self.ack_now = true;
            return;
        }
        self.process_ack(now, seg);
        self.process_data(now, seg);
    }

    /// PAWS (RFC 7323 §5.3): a segment whose timestamp is older than the
    /// latest in-order one (by more than [`PAWS_WINDOW`]) is an old
    /// duplicate. Resets are exempt.
    fn paws_rejects(&self, seg: &Segment<'_>) -> bool {
        match (self.ts_ok, seg.options.timestamp) {
            (true, Some((val, _))) if !seg.has(RST) => {
                self.ts_recent.wrapping_sub(val) as i32 > PAWS_WINDOW as i32
            }
            _ => false,
        }
    }

    fn process_ack(&mut self, now: Instant, seg: &Segment<'_>) {
        // A duplicate ACK (RFC 5681 §2): nothing new acknowledged, no
        // data, no window change, while data is outstanding.
        let dupack = seg.ack == self.snd.una
            && seg.payload.is_empty()
            && !seg.has(FIN)
            && !self.snd.idle()
            && usize::from(seg.window) << self.snd_shift == self.snd_wnd;
        // Window update (RFC 9293's WL1/WL2 rule).
        if self.snd_wl1 < seg.seq || (self.snd_wl1 == seg.seq && self.snd_wl2 <= seg.ack) {
            self.snd_wnd = usize::from(seg.window) << self.snd_shift;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = seg.ack;
            if self.snd_wnd > 0 {
                self.persist_at = None;
            }
        }
        let in_flight_before = self.snd.pipe();
        let sack = if self.sack_ok {
            seg.options.sack_blocks()
        } else {
            &[]
        };
        let acked = self.snd.ack(seg.ack, sack, now, self.rtt.min());
        let mut delivered = acked.delivered;
        if !self.sack_ok {
            // A peer without SACK: duplicate ACKs are all there is to go by.
            if acked.cumulative > 0 {
                self.dupacks = 0;
            } else if dupack && self.rto_point.is_none() {
                // (After a timeout everything is sent again: duplicate
                // ACKs then answer duplicates, not new arrivals.)
                self.dupacks += 1;
                delivered = self.snd.dup_acked(self.mss);
            }
        }
        if let Some(rtt) = acked.rtt {
            self.rtt.sample(rtt, now);
        }
        if acked.cumulative > 0 {
            self.backoff = 0;
            self.tlp_done = false;
            self.wake_send();
        }
        if acked.cumulative + acked.sacked > 0 {
            self.tlp_at = None;
        }
        // Loss detection (RACK), then the window.
        if acked.spurious > 0 {
            self.on_spurious(now);
            self.cc.on_spurious();
        }
        let lost = if self.sack_ok {
            let reo_wnd = if self.recovery.is_some() || self.snd.has_sacked() {
                self.reo_wnd()
            } else {
                Duration::ZERO
            };
            let (lost, rack_timer) = self.snd.detect_loss(now, reo_wnd);
            self.rack_at = rack_timer;
            lost
        } else {
            // NewReno (RFC 6582), as Linux does for a peer without SACK
            // (RACK has nothing to go on): the third duplicate ACK marks
            // the first segment lost; in recovery, so does each partial ACK.
            let partial = self
                .recovery
                .is_some_and(|r| acked.cumulative > 0 && self.snd.una < r.point);
            let third =
                self.recovery.is_none() && self.rto_point.is_none() && self.dupacks >= DUP_THRESH;
            // A duplicate ACK a round trip after the first segment went
            // out again comes from a segment sent after it: that
            // retransmission is lost too (RACK's reasoning, on duplicate
            // ACKs; Linux waits for the timeout).
            let wait = self.rtt.srtt().unwrap_or_default().max(self.rtt.latest()) + self.reo_wnd();
            let again = self.recovery.is_some()
                && dupack
                && now
                    .checked_sub(wait)
                    .is_some_and(|t| self.snd.head_resent_before(t));
            if partial || third || again {
                self.snd.mark_head_lost()
            } else {
                0
            }
        };
        if lost > 0 {
            self.on_loss(in_flight_before);
        }
        let in_recovery = self.recovery.is_some();
        if let Some(r) = self.recovery.as_mut() {
            r.prr_delivered += delivered;
            r.last_delivered = delivered;
            if self.snd.una >= r.point {
                self.recovery = None;
                self.cc.on_recovery_end();
            }
        }
        if delivered > 0 {
            let cwnd = self.cc.cwnd();
            let ev = AckEvent {
                now,
                delivered,
                delivered_total: self.snd.delivered,
                in_flight: self.snd.pipe(),
                lost,
                // Without SACK, a cumulative ACK after a repaired hole
                // delivers in one go what arrived over several round
                // trips: no rate sample from it.
                rate: acked
                    .rate
                    .filter(|_| self.sack_ok || !(in_recovery || self.rto_point.is_some())),
                app_limited: in_flight_before + self.mss < cwnd / 2 && self.snd.unsent() == 0,
                in_recovery,
                after_rto: self.rto_point.is_some(),
            };
            self.cc.on_ack(&ev, &self.rtt);
        }
        if self.rto_point.is_some_and(|p| self.snd.una >= p) {
            self.rto_point = None;
            self.cc.on_rto_recovered();
        }
        if acked.fin_acked {
            match self.state {
                State::FinWait1 => self.state = State::FinWait2,
                State::Closing => self.enter_time_wait(now),
                State::LastAck => {
                    self.state = State::Closed;
                    self.wake_all();
                }
                _ => {}
            }
        }
        // RFC 6298 §5.3: the timer restarts only when new data is
        // acknowledged, so a peer that keeps sending does not postpone it.
        self.arm_retransmit(now, acked.cumulative > 0);
    }

    /// RACK's reordering window (RFC 8985 §6.2 step 4): a quarter of the
    /// minimum RTT, times how often retransmissions proved spurious lately,
    /// at most the smoothed RTT.
    fn reo_wnd(&self) -> Duration {
        let base = self.rtt.min() / 4 * self.reo_mult;
        self.rtt.srtt().map_or(base, |srtt| base.min(srtt))
    }

    /// A retransmission was spurious (its original arrived): the path
    /// reorders more than the window allows. Widen it, once per round trip.
    fn on_spurious(&mut self, now: Instant) {
        let rtt = self.rtt.srtt().unwrap_or_default();
        if self
            .reo_widened
            .is_some_and(|t| now.saturating_duration_since(t) < rtt)
        {
            return;
        }
        self.reo_widened = Some(now);
        self.reo_mult = (self.reo_mult + 1).min(REO_MULT_MAX);
        self.reo_recoveries = 0;
    }

    /// New losses were found.
    fn on_loss(&mut self, in_flight_before: usize) {
        if self.recovery.is_some() || self.rto_point.is_some() {
            return;
        }
        self.stats.recoveries += 1;
        // Sixteen recoveries without a spurious retransmission: back to
        // the narrow window.
        self.reo_recoveries += 1;
        if self.reo_recoveries >= 16 {
            self.reo_recoveries = 0;
            self.reo_mult = 1;
        }
        self.cc.on_recovery_start(self.snd.pipe());
        self.recovery = Some(Recovery {
            point: self.snd.nxt,
            prr_delivered: 0,
            prr_out: 0,
            recover_fs: in_flight_before.max(1),
            last_delivered: 0,
        });
    }

    fn process_data(&mut self, now: Instant, seg: &Segment<'_>) {
        let receiving = matches!(
            self.state,
            State::Established | State::FinWait1 | State::FinWait2
        );
        if seg.has(FIN) {
            self.rcv_fin_at = Some(seg.seq + seg.payload.len());
        }
        let Some(rcv) = self.rcv.as_mut() else {
            return;
        };
        if receiving && !seg.payload.is_empty() && !self.rcv_fin {
            let ahead = seg.seq > rcv.nxt;
            let r = if ahead && self.memory_pressure {
                // Short of memory, out-of-order data is the first to go.
                Inserted {
                    dropped: true,
                    ..Inserted::default()
                }
            } else {
                rcv.insert(seg.seq, seg.payload)
            };
            // At once: data beyond a hole, a duplicate, a drop, or a
            // hole (partly) filled (RFC 5681 §4.2).
            if r.out_of_order || r.dropped {
                self.ack_now = true;
            }
            if r.advanced > 0 {
                self.rcv_unacked += r.advanced;
                // Every second full-sized segment, or every one in
                // quick-ACK mode, is acknowledged at the end of this round
                // (so a batch of segments is acknowledged once); a lone
                // one waits for a second up to the delayed-ACK time.
                if self.quickacks > 0 {
                    self.quickacks -= 1;
                    self.ack_pending = true;
                } else if self.rcv_unacked >= 2 * self.mss {
                    self.ack_pending = true;
                } else if self.delack_at.is_none() {
                    self.delack_at = Some(now + DELAYED_ACK);
                }
                self.wake_recv();
                self.autotune(now, r.advanced);
            }
        } else if !seg.payload.is_empty() {
            self.ack_now = true;
        }
        let rcv = self.rcv.as_ref().map_or(Seq(0), |r| r.nxt);
        if !self.rcv_fin && self.rcv_fin_at == Some(rcv) {
            self.rcv_fin = true;
            self.ack_now = true;
            self.wake_recv();
            match self.state {
                State::Established => self.state = State::CloseWait,
                State::FinWait1 => self.state = State::Closing,
                State::FinWait2 => self.enter_time_wait(now),
                _ => {}
            }
        }
    }

    /// Grows the receive window when the sender fills half of it within a
    /// round trip (the window, not the path, is then the limit).
    fn autotune(&mut self, now: Instant, advanced: usize) {
        self.drs_bytes += advanced;
        let rtt = self.rtt.srtt().unwrap_or(Duration::from_millis(100));
        if now.saturating_duration_since(self.drs_start) < rtt.max(Duration::from_millis(1)) {
            return;
        }
        if let Some(rcv) = self.rcv.as_mut() {
            if 2 * self.drs_bytes >= rcv.limit() && !self.memory_pressure {
                rcv.grow_limit(2 * rcv.limit());
            }
        }
        self.drs_start = now;
        self.drs_bytes = 0;
    }

    fn enter_time_wait(&mut self, now: Instant) {
        self.state = State::TimeWait;
        self.time_wait_until = Some(now + TIME_WAIT);
        self.rto_at = None;
        self.tlp_at = None;
        self.wake_all();
    }

    /// Arms the probe timeout and the retransmission timeout if they are
    /// not running; `restart`: new data was acknowledged, so the
    /// retransmission timeout starts again (RFC 6298 §5.3).
    fn arm_retransmit(&mut self, now: Instant, restart: bool) {
        if self.snd.idle() {
            self.rto_at = None;
            self.tlp_at = None;
            return;
        }
        if self.rto_at.is_none() || restart {
            self.rto_at = Some(now + self.rtt.rto(self.backoff));
        }
        let probe = self.sack_ok
            && self.recovery.is_none()
            && self.rto_point.is_none()
            && !self.tlp_done
            && self.tlp_at.is_none();
        if let (true, Some(srtt)) = (probe, self.rtt.srtt()) {
            let mut pto = (srtt * 2).max(Duration::from_millis(10));
            if self.snd.segments() == 1 {
                pto += DELAYED_ACK_ALLOWANCE;
            }
            let at = now + pto;
            if self.rto_at.is_none_or(|r| at < r) {
                self.tlp_at = Some(at);
            }
        }
    }

    // ----------------------------------------------------------- timers --

    /// The earliest time something is due, if any. A closed connection
    /// has nothing due but the reset it may still owe.
    pub fn poll_at(&self) -> Option<Instant> {
        if self.rst_due {
            return Some(self.last_sent);
        }
        if self.state == State::Closed {
            return None;
        }
        [
            self.rto_at,
            self.tlp_at,
            self.rack_at,
            self.delack_at,
            self.pace_at,
            self.persist_at,
            self.time_wait_until,
            self.trim_at(),
            (!self.timeout_fresh).then(|| self.timeout_at()).flatten(),
            self.keepalive_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When a quiet connection gives its buffers back, if it has any.
    fn trim_at(&self) -> Option<Instant> {
        self.trimmable().then(|| self.quiet_since() + TRIM_AFTER)
    }

    /// When a silent peer makes an open connection abort.
    fn timeout_at(&self) -> Option<Instant> {
        let t = self.timeout?;
        self.is_active().then(|| self.last_heard + t)
    }

    /// When the next keep-alive probe is due.
    fn keepalive_at(&self) -> Option<Instant> {
        let k = self.cfg.keep_alive?;
        if !matches!(self.state, State::Established | State::CloseWait) {
            return None;
        }
        let from = self
            .keepalive_sent
            .unwrap_or(self.last_heard)
            .max(self.last_heard);
        Some(from + k)
    }

    fn on_timers(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.timeout_fresh {
            self.timeout_fresh = false;
            self.last_heard = self.last_heard.max(now);
        }
        if self.timeout_at().is_some_and(|t| now >= t) {
            self.abort();
            return;
        }
        if self.trim_at().is_some_and(|t| now >= t) {
            self.snd.shrink();
            if let Some(r) = self.rcv.as_mut() {
                r.shrink();
            }
        }
        if self.time_wait_until.is_some_and(|t| now >= t) {
            self.time_wait_until = None;
            self.state = State::Closed;
            return;
        }
        if self.rack_at.is_some_and(|t| now >= t) {
            self.rack_at = None;
            let reo_wnd = self.reo_wnd();
            let before = self.snd.pipe();
            let (lost, timer) = self.snd.detect_loss(now, reo_wnd);
            self.rack_at = timer;
            if lost > 0 {
                self.on_loss(before);
            }
        }
        if self.delack_at.is_some_and(|t| now >= t) {
            // The sender waited for this ACK: acknowledge at once for a
            // while.
            self.delack_at = None;
            self.ack_now = true;
            self.quickacks = QUICKACKS;
        }
        if self.tlp_at.is_some_and(|t| now >= t) {
            self.tlp_at = None;
            self.tlp_done = true;
            self.probe_due = true;
            self.stats.probes += 1;
        }
        if self.rto_at.is_some_and(|t| now >= t) {
            self.rto_at = None;
            self.on_rto(now);
        }
        if self.persist_at.is_some_and(|t| now >= t) {
            self.persist_at = None;
            self.persist_due = true;
        }
        if self.pace_at.is_some_and(|t| now >= t) {
            self.pace_at = None;
        }
        if self.keepalive_at().is_some_and(|t| now >= t) {
            self.keepalive_sent = Some(now);
            self.keepalive_due = true;
        }
    }

    fn on_rto(&mut self, now: Instant) {
        match self.state {
            State::SynSent | State::SynReceived => {
                self.syn_retries += 1;
                if self.syn_retries > MAX_SYN_RETRIES {
                    self.abort();
                    return;
                }
                self.syn_due = true;
                self.rto_at = Some(now + self.rtt.rto(self.syn_retries));
            }
            _ if !self.snd.idle() => {
                self.stats.timeouts += 1;
                self.backoff += 1;
                if self.backoff > MAX_RTO_RETRIES {
                    self.abort();
                    return;
                }
                self.cc.on_timeout(self.rto_point.is_none());
                self.recovery = None;
                self.rto_point = Some(self.snd.nxt);
                self.snd.all_lost();
                self.rto_at = Some(now + self.rtt.rto(self.backoff).min(MAX_RTO));
            }
            _ => {}
        }
    }
}

impl Socket {
    // ----------------------------------------------------------- output --

    /// Writes the next packet due (a whole IP packet) to `out`; false when
    /// nothing is due now. Call until false, and again at [`poll_at`](Self::poll_at).
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        self.on_timers(now);
        if self.rst_due {
            self.rst_due = false;
            let seq = self.snd.nxt;
            self.emit(out, now, seq, RST | ACK, false);
            return true;
        }
        match self.state {
            State::Closed => false,
            State::SynSent | State::SynReceived => {
                if !self.syn_due {
                    return false;
                }
                self.syn_due = false;
                let flags = if self.state == State::SynSent {
                    SYN
                } else {
                    SYN | ACK
                };
                self.emit(out, now, self.iss, flags, true);
                true
            }
            State::TimeWait => self.maybe_ack(out, now),
            _ => {
                if self.keepalive_due {
                    self.keepalive_due = false;
                    let seq = self.snd.una - 1;
                    self.emit(out, now, seq, ACK, false);
                    return true;
                }
                self.send_segment(out, now) || self.maybe_ack(out, now)
            }
        }
    }

    fn maybe_ack(&mut self, out: &mut Vec<u8>, now: Instant) -> bool {
        if !(self.ack_now || self.ack_pending) {
            return false;
        }
        let seq = self.snd.nxt;
        self.emit(out, now, seq, ACK, false);
        true
    }

    /// May `len` more bytes go out under the congestion window (or PRR's
    /// budget during recovery)?
    fn cwnd_allows(&self, len: usize) -> bool {
        let pipe = self.snd.pipe();
        match &self.recovery {
            Some(r) if self.cc.uses_prr() => {
                let ssthresh = self.cc.ssthresh();
                let limit = if pipe > ssthresh {
                    (r.prr_delivered * ssthresh)
                        .div_ceil(r.recover_fs)
                        .saturating_sub(r.prr_out)
                } else {
                    (ssthresh - pipe).min(
                        r.prr_delivered
                            .saturating_sub(r.prr_out)
                            .max(r.last_delivered)
                            + self.mss,
                    )
                };
                limit > 0
            }
            _ => pipe + len <= self.cc.cwnd().max(self.mss),
        }
    }

    fn pace(&mut self, now: Instant, len: usize) -> bool {
        let rate = self.cc.pacing_rate(&self.rtt);
        match self.pacer.check(now, len, rate, self.mss) {
            Ok(()) => true,
            Err(at) => {
                self.pace_at = Some(at);
                false
            }
        }
    }

    fn sent(&mut self, now: Instant, len: usize) {
        self.pacer.spend(len);
        self.last_sent = now;
        if let Some(r) = self.recovery.as_mut() {
            r.prr_out += len;
        }
        if self.rto_at.is_none() || self.tlp_at.is_none() {
            self.arm_retransmit(now, false);
        }
    }

    /// Sends one data segment (a probe, a retransmission or new data) if
    /// one may go now.
    fn send_segment(&mut self, out: &mut Vec<u8>, now: Instant) -> bool {
        if self.probe_due {
            self.probe_due = false;
            let len = self
                .snd
                .unsent()
                .min(self.data_room())
                .min(self.window_room());
            if len > 0 {
                self.send_new(out, now, len);
                return true;
            }
            if let Some((i, start, len, fin)) = self.snd.last_unsacked() {
                self.resend(out, now, i, start, len, fin);
                return true;
            }
        }
        if self.persist_due {
            self.persist_due = false;
            if self.snd.unsent() > 0 {
                self.send_new(out, now, 1);
                return true;
            }
        }
        if let Some((i, start, len, fin)) = self.snd.first_lost() {
            let seg = len + usize::from(fin);
            if !self.cwnd_allows(seg) || !self.pace(now, seg) {
                return false;
            }
            self.resend(out, now, i, start, len, fin);
            return true;
        }
        if !matches!(
            self.state,
            State::Established | State::CloseWait | State::FinWait1 | State::LastAck
        ) {
            return false;
        }
        let unsent = self.snd.unsent();
        if unsent == 0 && !self.snd.fin_unsent() {
            if self.snd.pipe() < self.cc.cwnd() {
                self.snd.mark_app_limited();
            }
            return false;
        }
        let len = unsent.min(self.data_room()).min(self.window_room());
        if len == 0 && unsent > 0 {
            if self.snd.idle() && self.persist_at.is_none() {
                self.persist_at = Some(now + self.rtt.rto(self.backoff));
            }
            return false;
        }
        if self.snd.idle() && now.saturating_duration_since(self.last_sent) > self.rtt.rto(0) {
            self.cc.on_idle_restart();
        }
        let seg = len + usize::from(self.snd.fin_after(len));
        if !self.cwnd_allows(seg) || !self.pace(now, seg) {
            return false;
        }
        self.send_new(out, now, len);
        true
    }

    /// New bytes the peer's window has room for.
    fn window_room(&self) -> usize {
        (self.snd.una + self.snd_wnd).max(self.snd.nxt) - self.snd.nxt
    }

    fn send_new(&mut self, out: &mut Vec<u8>, now: Instant, len: usize) {
        let start = self.snd.nxt;
        let fin = self.snd.fin_after(len);
        let mut flags = ACK;
        if fin {
            flags |= FIN;
        }
        if len > 0 && start + len == self.snd.data_end() {
            flags |= PSH;
        }
        self.emit_data(out, now, start, len, flags);
        self.snd.sent_new(len, fin, now);
        self.sent(now, len + usize::from(fin));
    }

    fn resend(
        &mut self,
        out: &mut Vec<u8>,
        now: Instant,
        i: usize,
        start: Seq,
        len: usize,
        fin: bool,
    ) {
        self.stats.retransmits += 1;
        let flags = if fin { ACK | FIN } else { ACK };
        self.emit_data(out, now, start, len, flags);
        self.snd.retransmitted(i, now);
        self.sent(now, len + usize::from(fin));
    }

    /// A segment without data (SYN, ACK, RST, probe).
    fn emit(&mut self, out: &mut Vec<u8>, now: Instant, seq: Seq, flags: u8, syn: bool) {
        let (header, adv) = self.header(now, seq, flags, syn, 0);
        wire::emit(out, &header, [&[], &[]], self.ip_id);
        self.after_emit(now, adv);
    }

    /// A segment carrying `[start, start + len)` from the send queue.
    fn emit_data(&mut self, out: &mut Vec<u8>, now: Instant, start: Seq, len: usize, flags: u8) {
        let (header, adv) = self.header(now, start, flags, false, len);
        wire::emit(out, &header, self.snd.bytes(start, len), self.ip_id);
        self.after_emit(now, adv);
    }

    fn after_emit(&mut self, now: Instant, adv_wnd: usize) {
        self.adv_edge = self.rcv_nxt() + adv_wnd;
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ack_now = false;
        self.ack_pending = false;
        self.rcv_unacked = 0;
        self.delack_at = None;
        if self.state == State::SynSent || self.state == State::SynReceived {
            self.last_sent = now;
        }
    }

    /// SACK blocks a segment may carry (3 beside a timestamp).
    fn max_sack_blocks(&self) -> usize {
        if self.ts_ok {
            3
        } else {
            4
        }
    }

    /// The bytes the SACK option of the next segment takes (NOP NOP, kind,
    /// length, 8 per block), 0 without holes to report.
    fn sack_bytes(&self) -> usize {
        match (self.sack_ok, self.rcv.as_ref()) {
            (true, Some(rcv)) if rcv.has_holes() => {
                let mut scratch = [(Seq(0), Seq(0)); wire::MAX_SACK_BLOCKS];
                match rcv.sack_blocks(self.max_sack_blocks(), &mut scratch) {
                    0 => 0,
                    n => 4 + 8 * n,
                }
            }
            _ => 0,
        }
    }

    /// Payload room in a new data segment: the MSS less the SACK blocks it
    /// carries, so header and payload stay within the MTU (as Linux's
    /// `tcp_current_mss`).
    fn data_room(&self) -> usize {
        self.mss.saturating_sub(self.sack_bytes()).max(1)
    }

    /// The header of a segment carrying `payload` bytes, and the window it
    /// advertises (bytes). SACK blocks go in as far as they fit beside the
    /// payload within the MSS (a retransmission keeps its original size
    /// and carries fewer blocks).
    fn header(
        &self,
        now: Instant,
        seq: Seq,
        flags: u8,
        syn: bool,
        payload: usize,
    ) -> (Header, usize) {
        let mut options = Options::default();
        if syn {
            options.mss = Some(Self::own_mss(&self.cfg, self.local));
            let active = self.state == State::SynSent;
            if active || self.ws_ok {
                options.window_scale = Some(wscale_for(self.cfg.recv_buffer));
            }
            options.sack_permitted = active || self.sack_ok;
            if active {
                options.timestamp = Some((self.ts_now(now), 0));
            } else if self.ts_ok {
                options.timestamp = Some((self.ts_now(now), self.ts_recent));
            }
        } else {
            if self.ts_ok {
                options.timestamp = Some((self.ts_now(now), self.ts_recent));
            }
            if let (true, Some(rcv)) = (self.sack_ok, self.rcv.as_ref()) {
                let fit = self.mss.saturating_sub(payload + 4) / 8;
                let max = self.max_sack_blocks().min(fit);
                if rcv.has_holes() && max > 0 {
                    options.sack_len = rcv.sack_blocks(max, &mut options.sack);
                }
            }
        }
        // A SYN's window is never scaled.
        let shift = if syn { 0 } else { self.rcv_shift };
        let wnd = (self.rcv_wnd() >> shift).min(65535);
        let ack = if flags & ACK != 0 {
            self.rcv_nxt()
        } else {
            Seq(0)
        };
        let header = Header {
            src: self.local,
            dst: self.remote,
            seq,
            ack,
            flags,
            window: wnd as u16,
            options,
        };
        (header, wnd << shift)
    }
}

/// Is timestamp `a` the same as or later than `b` (modulo 2³²)?
fn ts_newer_or_same(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) as i32 >= 0
}
