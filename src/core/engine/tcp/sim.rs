//! A simulated path for the TCP tests: two sockets joined by links with a
//! delay, a bottleneck rate with a drop-tail queue, random loss and
//! optional reordering, driven by simulated time (deterministic: a seeded
//! generator, no clock, no sockets).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::cc::Algorithm;
use super::seq::Seq;
use super::socket::{Config, Socket, State};
use super::wire;

/// xorshift64*: deterministic, good enough for loss decisions.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PathSpec {
    pub delay: Duration,
    /// Bits per second at the bottleneck.
    pub rate: f64,
    /// Bytes the bottleneck queue holds.
    pub queue: usize,
    pub loss: f64,
    /// Extra random delay up to this much (reorders packets).
    pub jitter: Duration,
    /// Chance a packet is delivered twice.
    pub duplicate: f64,
}

impl PathSpec {
    pub fn new(delay_ms: u64, mbps: f64, loss: f64) -> Self {
        PathSpec {
            delay: Duration::from_millis(delay_ms),
            rate: mbps * 1e6,
            queue: 256 * 1024,
            loss,
            jitter: Duration::ZERO,
            duplicate: 0.0,
        }
    }
}

pub struct Link {
    spec: PathSpec,
    busy_until: Instant,
    queue: VecDeque<(Instant, Vec<u8>)>,
    pub sent: u64,
    pub dropped: u64,
}

impl Link {
    pub fn new(spec: PathSpec, now: Instant) -> Self {
        Link {
            spec,
            busy_until: now,
            queue: VecDeque::new(),
            sent: 0,
            dropped: 0,
        }
    }

    pub fn send(&mut self, now: Instant, packet: Vec<u8>, rng: &mut Rng) {
        self.sent += 1;
        let start = self.busy_until.max(now);
        let backlog = start.duration_since(now).as_secs_f64() * self.spec.rate / 8.0;
        if backlog > self.spec.queue as f64 || rng.unit() < self.spec.loss {
            self.dropped += 1;
            return;
        }
        let tx = Duration::from_secs_f64(packet.len() as f64 * 8.0 / self.spec.rate);
        self.busy_until = start + tx;
        let mut at = self.busy_until + self.spec.delay;
        if !self.spec.jitter.is_zero() {
            at += self.spec.jitter.mul_f64(rng.unit());
        }
        if rng.unit() < self.spec.duplicate {
            let later = at + self.spec.jitter.mul_f64(rng.unit()) + Duration::from_micros(10);
            let i = self.queue.partition_point(|(t, _)| *t <= later);
            self.queue.insert(i, (later, packet.clone()));
        }
        // Keep the queue sorted by delivery time (jitter reorders).
        let i = self.queue.partition_point(|(t, _)| *t <= at);
        self.queue.insert(i, (at, packet));
    }

    /// Changes the loss rate from now on (1.0: a blackout).
    pub fn set_loss(&mut self, loss: f64) {
        self.spec.loss = loss;
    }

    pub fn next_at(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    pub fn take_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        match self.queue.front() {
            Some((t, _)) if *t <= now => self.queue.pop_front().map(|(_, p)| p),
            _ => None,
        }
    }
}

/// Sends every packet `socket` has due at `now` into `link`.
fn transmit(socket: &mut Socket, now: Instant, link: &mut Link, rng: &mut Rng, buf: &mut Vec<u8>) {
    loop {
        buf.clear();
        if !socket.poll_transmit(now, buf) {
            break;
        }
        link.send(now, buf.clone(), rng);
    }
}

/// The simulation's next moment: the earliest of `due` (at most 10 ms
/// ahead), or 50 µs on when nothing is due later.
fn step(now: Instant, due: impl IntoIterator<Item = Option<Instant>>) -> Instant {
    match due.into_iter().flatten().min() {
        Some(t) if t > now => t.min(now + Duration::from_millis(10)),
        _ => now + Duration::from_micros(50),
    }
}

/// Feeds one raw IP packet to a socket (parsing it as the stack would).
pub fn deliver(socket: &mut Socket, now: Instant, packet: &[u8]) {
    let (src, dst, tcp) = split(packet);
    let seg = wire::parse(src, dst, tcp).expect("the simulated path does not corrupt");
    socket.handle(now, &seg);
}

pub fn split(packet: &[u8]) -> (std::net::IpAddr, std::net::IpAddr, &[u8]) {
    match packet[0] >> 4 {
        4 => (
            std::net::IpAddr::from([packet[12], packet[13], packet[14], packet[15]]),
            std::net::IpAddr::from([packet[16], packet[17], packet[18], packet[19]]),
            &packet[20..],
        ),
        _ => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&packet[8..24]);
            d.copy_from_slice(&packet[24..40]);
            (s.into(), d.into(), &packet[40..])
        }
    }
}

pub fn config(buffer: usize, congestion: Algorithm) -> Config {
    Config {
        mtu: 1420,
        recv_buffer: buffer,
        send_buffer: buffer,
        keep_alive: None,
        congestion,
    }
}

/// A client and a server socket across two links (one per direction).
pub struct Pair {
    pub now: Instant,
    pub client: Socket,
    pub server: Socket,
    pub up: Link,
    pub down: Link,
    pub rng: Rng,
}

impl Pair {
    /// Connects a client to a server (the SYN is accepted as a stack would).
    pub fn connect(spec: PathSpec, cfg: Config, seed: u64) -> Pair {
        Self::connect_between(spec, cfg, seed, "10.0.0.1:40000", "10.0.0.2:80")
    }

    pub fn connect_between(spec: PathSpec, cfg: Config, seed: u64, a: &str, b: &str) -> Pair {
        Self::connect_with(spec, cfg, seed, a, b, true)
    }

    /// As [`connect`](Self::connect), with a server that does not offer
    /// SACK (so neither side uses it), as some stacks and middleboxes do.
    pub fn connect_without_sack(spec: PathSpec, cfg: Config, seed: u64) -> Pair {
        Self::connect_with(spec, cfg, seed, "10.0.0.1:40000", "10.0.0.2:80", false)
    }

    fn connect_with(spec: PathSpec, cfg: Config, seed: u64, a: &str, b: &str, sack: bool) -> Pair {
        let start = Instant::now();
        let a: SocketAddr = a.parse().unwrap();
        let b: SocketAddr = b.parse().unwrap();
        let mut rng = Rng::new(seed);
        let mut client = Socket::connect(cfg, a, b, Seq(rng.next() as u32), start);
        let mut syn = Vec::new();
        assert!(client.poll_transmit(start, &mut syn));
        let (s, d, tcp) = split(&syn);
        let mut seg = wire::parse(s, d, tcp).unwrap();
        seg.options.sack_permitted &= sack;
        let server = Socket::accept(cfg, &seg, Seq(rng.next() as u32), start);
        Pair {
            now: start,
            client,
            server,
            up: Link::new(spec, start),
            down: Link::new(spec, start),
            rng,
        }
    }

    /// Runs until `done` holds or `limit` of simulated time passes; `app`
    /// runs at every step (it reads and writes through the sockets).
    pub fn run(&mut self, limit: Duration, mut app: impl FnMut(&mut Pair) -> bool) -> bool {
        let end = self.now + limit;
        let mut buf = Vec::with_capacity(2048);
        while self.now < end {
            if app(self) {
                return true;
            }
            transmit(
                &mut self.client,
                self.now,
                &mut self.up,
                &mut self.rng,
                &mut buf,
            );
            transmit(
                &mut self.server,
                self.now,
                &mut self.down,
                &mut self.rng,
                &mut buf,
            );
            while let Some(p) = self.up.take_due(self.now) {
                deliver(&mut self.server, self.now, &p);
            }
            while let Some(p) = self.down.take_due(self.now) {
                deliver(&mut self.client, self.now, &p);
            }
            let next = [
                self.up.next_at(),
                self.down.next_at(),
                self.client.poll_at(),
                self.server.poll_at(),
            ];
            self.now = step(self.now, next);
        }
        false
    }

    pub fn established(&mut self) -> bool {
        self.run(Duration::from_secs(30), |p| {
            p.client.state() == State::Established && p.server.state() == State::Established
        })
    }
}

/// Bytes of a deterministic pattern.
pub fn pattern(offset: usize, len: usize) -> Vec<u8> {
    let block = pattern_block();
    (offset..offset + len)
        .map(|i| block[i % PATTERN_PERIOD])
        .collect()
}

/// The pattern repeats after this many bytes (a prime, so a misplaced
/// segment never lines up with the same bytes).
const PATTERN_PERIOD: usize = 1_048_573;

fn pattern_block() -> &'static [u8] {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut rng = Rng::new(0x5eed);
        (0..PATTERN_PERIOD).map(|_| rng.next() as u8).collect()
    })
}

/// Whether `data` is the pattern at `offset`, without building it.
pub fn is_pattern(offset: usize, data: &[u8]) -> bool {
    let block = pattern_block();
    let mut at = offset % PATTERN_PERIOD;
    let mut rest = data;
    while !rest.is_empty() {
        let n = rest.len().min(PATTERN_PERIOD - at);
        if rest[..n] != block[at..at + n] {
            return false;
        }
        rest = &rest[n..];
        at = 0;
    }
    true
}

/// A client → server stream of [`pattern`] bytes, checked on arrival.
#[derive(Default)]
pub struct Stream {
    pub written: usize,
    pub read: usize,
}

impl Stream {
    /// Writes what fits (up to `total`), reads and checks what arrived;
    /// true once all `total` bytes are read.
    pub fn step(&mut self, p: &mut Pair, total: usize) -> bool {
        while self.written < total {
            let data = pattern(self.written, (total - self.written).min(16 * 1024));
            let n = p.client.send_slice(&data).unwrap();
            self.written += n;
            if n < data.len() {
                break;
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = p.server.recv_slice(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            assert!(
                is_pattern(self.read, &chunk[..n]),
                "data corrupted at {}",
                self.read
            );
            self.read += n;
        }
        self.read == total
    }
}

/// Sends `total` bytes client → server, checks every byte, returns the
/// goodput in Mbit/s of simulated time.
pub fn transfer(p: &mut Pair, total: usize, limit: Duration) -> f64 {
    assert!(p.established(), "handshake");
    let t0 = p.now;
    let mut stream = Stream::default();
    let ok = p.run(limit, |p| stream.step(p, total));
    assert!(
        ok,
        "transfer incomplete: {} of {total} bytes in {limit:?}",
        stream.read
    );
    total as f64 * 8.0 / p.now.duration_since(t0).as_secs_f64() / 1e6
}

/// Several connections whose data crosses one bottleneck (and whose ACKs
/// share the way back): for fairness between flows and controllers.
pub struct Bottleneck {
    pub now: Instant,
    /// (client, server) of each flow.
    pub flows: Vec<(Socket, Socket)>,
    pub up: Link,
    pub down: Link,
    pub rng: Rng,
}

impl Bottleneck {
    /// One flow per config, all established.
    pub fn new(spec: PathSpec, cfgs: &[Config], seed: u64) -> Bottleneck {
        let start = Instant::now();
        let mut rng = Rng::new(seed);
        let mut flows = Vec::new();
        for (i, cfg) in cfgs.iter().enumerate() {
            let a: SocketAddr = format!("10.0.0.1:{}", 40000 + i).parse().unwrap();
            let b: SocketAddr = format!("10.0.0.2:{}", 8000 + i).parse().unwrap();
            let mut client = Socket::connect(*cfg, a, b, Seq(rng.next() as u32), start);
            let mut syn = Vec::new();
            assert!(client.poll_transmit(start, &mut syn));
            let (s, d, tcp) = split(&syn);
            let seg = wire::parse(s, d, tcp).unwrap();
            let server = Socket::accept(*cfg, &seg, Seq(rng.next() as u32), start);
            flows.push((client, server));
        }
        Bottleneck {
            now: start,
            flows,
            up: Link::new(spec, start),
            down: Link::new(spec, start),
            rng,
        }
    }

    fn flow_of(&self, packet: &[u8], to_server: bool) -> usize {
        let (s, d, tcp) = split(packet);
        let seg = wire::parse(s, d, tcp).expect("the simulated path does not corrupt");
        self.flows
            .iter()
            .position(|(c, v)| {
                if to_server {
                    v.local() == seg.dst
                } else {
                    c.local() == seg.dst
                }
            })
            .expect("a packet of a known flow")
    }

    /// As [`Pair::run`], for every flow.
    pub fn run(&mut self, limit: Duration, mut app: impl FnMut(&mut Bottleneck) -> bool) -> bool {
        let end = self.now + limit;
        let mut buf = Vec::with_capacity(2048);
        while self.now < end {
            if app(self) {
                return true;
            }
            for (client, server) in self.flows.iter_mut() {
                transmit(client, self.now, &mut self.up, &mut self.rng, &mut buf);
                transmit(server, self.now, &mut self.down, &mut self.rng, &mut buf);
            }
            while let Some(p) = self.up.take_due(self.now) {
                let i = self.flow_of(&p, true);
                deliver(&mut self.flows[i].1, self.now, &p);
            }
            while let Some(p) = self.down.take_due(self.now) {
                let i = self.flow_of(&p, false);
                deliver(&mut self.flows[i].0, self.now, &p);
            }
            let next = self
                .flows
                .iter()
                .flat_map(|(c, s)| [c.poll_at(), s.poll_at()])
                .chain([self.up.next_at(), self.down.next_at()]);
            self.now = step(self.now, next);
        }
        false
    }

    /// Every flow sends as fast as it can for `time`; returns each one's
    /// goodput (Mbit/s) over the part after `warmup`.
    pub fn compete(&mut self, time: Duration, warmup: Duration) -> Vec<f64> {
        let n = self.flows.len();
        let junk = vec![0u8; 64 * 1024];
        let mut sink = vec![0u8; 64 * 1024];
        let t0 = self.now;
        let mut counted = vec![0usize; n];
        self.run(time, |b| {
            let late = b.now.duration_since(t0) >= warmup;
            for (i, (c, s)) in b.flows.iter_mut().enumerate() {
                while c.send_slice(&junk).unwrap_or(0) > 0 {}
                loop {
                    let got = s.recv_slice(&mut sink).unwrap_or(0);
                    if got == 0 {
                        break;
                    }
                    if late {
                        counted[i] += got;
                    }
                }
            }
            false
        });
        let secs = (time - warmup).as_secs_f64();
        counted
            .iter()
            .map(|&b| b as f64 * 8.0 / secs / 1e6)
            .collect()
    }
}

/// Jain's fairness index of the rates: 1 when equal, 1/n at worst.
pub fn jain(rates: &[f64]) -> f64 {
    let sum: f64 = rates.iter().sum();
    let sq: f64 = rates.iter().map(|r| r * r).sum();
    sum * sum / (rates.len() as f64 * sq)
}
