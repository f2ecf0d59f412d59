//! `wanrelay`: a UDP relay that behaves like a path across the internet.
//!
//! This kernel has no `netem`, so tests and benchmarks put this relay
//! between two network namespaces instead. Datagrams sent to `--listen`
//! go to `--to` (from `--bind`), and answers come back to whoever sent
//! last; each direction gets, in this order:
//!
//! 1. random loss (`--loss 0.5%`), independent per datagram;
//! 2. a bottleneck: a link of `--rate` bits per second with a FIFO queue
//!    of `--queue` bytes in front of it (tail drop when full), as a
//!    router's interface would have;
//! 3. a fixed one-way `--delay`.
//!
//! ```text
//! wanrelay --listen 10.234.1.2:40001 --to 10.234.2.1:51820 --bind 10.234.2.2:0 \
//!          --delay 10ms --loss 0.5% --rate 200mbit --queue 256k [--seed 7] [--stats 5s] \
//!          [--pair 10.234.1.2:40002=10.234.2.1:51830 ...] [--stats-file FILE]
//! ```
//!
//! `--pair LISTEN=TO` (repeatable) relays one more listen → to pair; every
//! pair (the one `--listen`/`--to` give, if any, comes first) goes through
//! the same two directions, so flows of different pairs share one
//! bottleneck queue and rate per direction, as flows of different hosts
//! share a router's interface. Each pair has its own sockets: the one it
//! listens on, and one bound to `--bind` (port 0 unless there is a single
//! pair) that it sends to `TO` from.
//!
//! `--stats-file FILE` rewrites FILE (write to `FILE.tmp`, then rename:
//! readers never see half a line) every 200 ms with one line of
//! `key=value` pairs, counters since start:
//!
//! ```text
//! elapsed_ms=1200 forth_datagrams=.. forth_bytes=.. forth_lost=.. forth_queue_full=.. \
//!   forth_passed=.. forth_passed_bytes=.. back_datagrams=.. (the same for back) \
//!   pair0_forth_datagrams=.. (the same for each pair, numbered in order)
//! ```
//!
//! `forth` is listen → to, `back` to → listen. `datagrams`/`bytes`: what
//! arrived at the relay (UDP payload bytes); `lost`: random loss;
//! `queue_full`: dropped at the full bottleneck queue; `passed`/
//! `passed_bytes`: what was sent on after the delay.
//!
//! It prints `ready` on stdout once bound (and the stats file, if any, is
//! written). Standard library only, so it builds in seconds; each pair has
//! a receiving thread per direction, each direction one sending thread.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often `--stats-file` is rewritten.
const STATS_FILE_EVERY: Duration = Duration::from_millis(200);

/// What every datagram of one direction goes through.
#[derive(Clone, Copy, Debug)]
struct PathSpec {
    delay: Duration,
    /// Probability of loss, 0..=1.
    loss: f64,
    /// Bottleneck rate in bits per second (`None`: unlimited).
    rate: Option<f64>,
    /// Bottleneck queue in bytes.
    queue: usize,
}

/// One pair's counters in one direction.
#[derive(Default)]
struct Counters {
    arrived: AtomicU64,
    arrived_bytes: AtomicU64,
    lost: AtomicU64,
    overflowed: AtomicU64,
    passed: AtomicU64,
    passed_bytes: AtomicU64,
}

/// A snapshot of [`Counters`] (or their sum over pairs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    datagrams: u64,
    bytes: u64,
    lost: u64,
    queue_full: u64,
    passed: u64,
    passed_bytes: u64,
}

impl Counters {
    fn snapshot(&self) -> Counts {
        Counts {
            datagrams: self.arrived.load(Ordering::Relaxed),
            bytes: self.arrived_bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queue_full: self.overflowed.load(Ordering::Relaxed),
            passed: self.passed.load(Ordering::Relaxed),
            passed_bytes: self.passed_bytes.load(Ordering::Relaxed),
        }
    }
}

impl Counts {
    fn add(mut self, o: Counts) -> Counts {
        self.datagrams += o.datagrams;
        self.bytes += o.bytes;
        self.lost += o.lost;
        self.queue_full += o.queue_full;
        self.passed += o.passed;
        self.passed_bytes += o.passed_bytes;
        self
    }

    /// ` PREFIX_datagrams=N ...` for the stats file.
    fn write_kv(&self, prefix: &str, out: &mut String) {
        for (key, v) in [
            ("datagrams", self.datagrams),
            ("bytes", self.bytes),
            ("lost", self.lost),
            ("queue_full", self.queue_full),
            ("passed", self.passed),
            ("passed_bytes", self.passed_bytes),
        ] {
            let _ = write!(out, " {prefix}_{key}={v}");
        }
    }
}

/// One direction: the queue of datagrams waiting to be delivered, shared
/// by every pair.
struct Lane {
    spec: PathSpec,
    state: Mutex<LaneState>,
    ready: Condvar,
    /// Per pair.
    counters: Vec<Counters>,
}

struct LaneState {
    /// (delivery time, pair, datagram), in delivery order.
    queue: VecDeque<(Instant, usize, Vec<u8>)>,
    /// When the bottleneck finishes sending what it holds.
    busy_until: Instant,
    rng: u64,
}

impl Lane {
    fn new(spec: PathSpec, seed: u64, pairs: usize) -> Lane {
        Lane {
            spec,
            state: Mutex::new(LaneState {
                queue: VecDeque::new(),
                busy_until: Instant::now(),
                rng: seed | 1,
            }),
            ready: Condvar::new(),
            counters: (0..pairs).map(|_| Counters::default()).collect(),
        }
    }

    /// Takes one datagram of `pair` that arrived now: lost, dropped at a
    /// full bottleneck queue, or queued for delivery.
    fn offer(&self, pair: usize, data: &[u8]) {
        let now = Instant::now();
        let c = &self.counters[pair];
        c.arrived.fetch_add(1, Ordering::Relaxed);
        c.arrived_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut st = self.state.lock().expect("lane poisoned");
        // xorshift64*: reproducible with --seed, good enough for loss.
        st.rng ^= st.rng >> 12;
        st.rng ^= st.rng << 25;
        st.rng ^= st.rng >> 27;
        let r = (st.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        if r < self.spec.loss {
            c.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let depart = match self.spec.rate {
            Some(rate) => {
                let start = st.busy_until.max(now);
                let backlog = start.duration_since(now).as_secs_f64() * rate / 8.0;
                if backlog + data.len() as f64 > self.spec.queue as f64 {
                    c.overflowed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let done = start + Duration::from_secs_f64(data.len() as f64 * 8.0 / rate);
                st.busy_until = done;
                done
            }
            None => now,
        };
        st.queue
            .push_back((depart + self.spec.delay, pair, data.to_vec()));
        drop(st);
        self.ready.notify_one();
    }

    /// Waits for the datagrams whose time has come and hands them, with
    /// their pair, to `send`.
    fn deliver(&self, mut send: impl FnMut(usize, &[u8])) -> ! {
        let mut due = Vec::new();
        loop {
            {
                let mut st = self.state.lock().expect("lane poisoned");
                loop {
                    let now = Instant::now();
                    match st.queue.front() {
                        None => st = self.ready.wait(st).expect("lane poisoned"),
                        Some((at, _, _)) if *at > now => {
                            let wait = *at - now;
                            st = self.ready.wait_timeout(st, wait).expect("lane poisoned").0;
                        }
                        Some(_) => break,
                    }
                }
                let now = Instant::now();
                while st.queue.front().is_some_and(|(at, _, _)| *at <= now) {
                    let (_, pair, d) = st.queue.pop_front().expect("front exists");
                    due.push((pair, d));
                }
            }
            for (pair, d) in due.drain(..) {
                let c = &self.counters[pair];
                c.passed.fetch_add(1, Ordering::Relaxed);
                c.passed_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                send(pair, &d);
            }
        }
    }

    fn pair(&self, pair: usize) -> Counts {
        self.counters[pair].snapshot()
    }

    fn total(&self) -> Counts {
        self.counters
            .iter()
            .fold(Counts::default(), |sum, c| sum.add(c.snapshot()))
    }

    fn stats(&self) -> String {
        let t = self.total();
        format!(
            "passed {} lost {} queue-full {}",
            t.passed, t.lost, t.queue_full
        )
    }
}

/// One `key=value` line: both directions' totals, then each pair's.
fn stats_line(elapsed: Duration, forth: &Lane, back: &Lane) -> String {
    let mut out = format!("elapsed_ms={}", elapsed.as_millis());
    forth.total().write_kv("forth", &mut out);
    back.total().write_kv("back", &mut out);
    for i in 0..forth.counters.len() {
        forth.pair(i).write_kv(&format!("pair{i}_forth"), &mut out);
        back.pair(i).write_kv(&format!("pair{i}_back"), &mut out);
    }
    out
}

/// Replaces `path` with `line` at once: write `path.tmp`, then rename.
fn write_atomically(path: &Path, line: &str) -> std::io::Result<()> {
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{line}\n"))?;
    std::fs::rename(&tmp, path)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pair {
    listen: SocketAddr,
    to: SocketAddr,
}

struct Args {
    pairs: Vec<Pair>,
    /// Where each pair's sending socket binds (`None`: any address of the
    /// family of its `to`, port 0).
    bind: Option<SocketAddr>,
    spec: PathSpec,
    seed: u64,
    stats: Option<Duration>,
    stats_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "ms"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 10ms)"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        _ => return Err(format!("`{s}`: unit must be us, ms or s")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_loss(s: &str) -> Result<f64, String> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.parse::<f64>().map(|p| p / 100.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| format!("`{s}` is not a loss rate (e.g. 0.5% or 0.005)"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("`{s}`: loss must be between 0 and 100%"))
    }
}

/// `200mbit`, `1gbit`, `500kbit`, or bits per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = lower.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = lower.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        (lower.as_str(), 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a rate (e.g. 200mbit)"))?;
    Ok(v * mult)
}

/// `256k`, `1m`, or bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix('m') {
        (n, 1 << 20)
    } else if let Some(n) = lower.strip_suffix('k') {
        (n, 1 << 10)
    } else {
        (lower.as_str(), 1)
    };
    let v: usize = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 256k)"))?;
    Ok(v * mult)
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut to, mut bind) = (None, None, None);
    let mut more = Vec::new();
    let mut spec = PathSpec {
        delay: Duration::ZERO,
        loss: 0.0,
        rate: None,
        queue: 1 << 20,
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let mut stats = None;
    let mut stats_file = None;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let addr = |v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("{flag}: `{v}` is not IP:PORT"))
        };
        match flag.as_str() {
            "--listen" => listen = Some(addr(&value()?)?),
            "--to" => to = Some(addr(&value()?)?),
            "--pair" => {
                let v = value()?;
                let (l, t) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--pair: `{v}` is not LISTEN=TO"))?;
                more.push(Pair {
                    listen: addr(l)?,
                    to: addr(t)?,
                });
            }
            "--bind" => bind = Some(addr(&value()?)?),
            "--delay" => spec.delay = parse_duration(&value()?)?,
            "--loss" => spec.loss = parse_loss(&value()?)?,
            "--rate" => spec.rate = Some(parse_rate(&value()?)?),
            "--queue" => spec.queue = parse_size(&value()?)?,
            "--seed" => seed = value()?.parse().map_err(|_| "--seed: not a number")?,
            "--stats" => stats = Some(parse_duration(&value()?)?),
            "--stats-file" => stats_file = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let mut pairs = Vec::new();
    match (listen, to) {
        (Some(listen), Some(to)) => pairs.push(Pair { listen, to }),
        (None, None) if !more.is_empty() => {}
        (None, _) => return Err("--listen IP:PORT is required (or --pair LISTEN=TO)".into()),
        (_, None) => return Err("--to IP:PORT is required".into()),
    }
    pairs.extend(more);
    if pairs.len() > 1 && bind.is_some_and(|b| b.port() != 0) {
        return Err("--bind: with more than one pair, the port must be 0".into());
    }
    Ok(Args {
        pairs,
        bind,
        spec,
        seed,
        stats,
        stats_file,
    })
}

/// A running relay: its threads own the sockets.
struct Relay {
    /// Where each pair listens (with the port the system chose for port 0).
    listens: Vec<SocketAddr>,
    forth: Arc<Lane>,
    back: Arc<Lane>,
}

/// Binds every pair's sockets and starts the threads.
fn start(args: &Args) -> std::io::Result<Relay> {
    let mut fronts = Vec::new();
    let mut backs = Vec::new();
    for p in &args.pairs {
        let front = UdpSocket::bind(p.listen)?;
        let bind = args.bind.unwrap_or_else(|| match p.to {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
        });
        let back = UdpSocket::bind(bind)?;
        back.connect(p.to)?;
        fronts.push(Arc::new(front));
        backs.push(Arc::new(back));
    }
    let listens = fronts
        .iter()
        .map(|s| s.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let n = args.pairs.len();
    let forth = Arc::new(Lane::new(args.spec, args.seed, n));
    let back_lane = Arc::new(Lane::new(args.spec, args.seed.rotate_left(17), n));
    // Each pair's client: whoever sent to its listening socket last.
    let clients: Arc<Vec<Mutex<Option<SocketAddr>>>> =
        Arc::new((0..n).map(|_| Mutex::new(None)).collect());

    for i in 0..n {
        // Client → server.
        let (front, lane, clients) = (fronts[i].clone(), forth.clone(), clients.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((len, from)) = front.recv_from(&mut buf) else {
                    continue;
                };
                *clients[i].lock().expect("poisoned") = Some(from);
                lane.offer(i, &buf[..len]);
            }
        });
        // Server → client.
        let (back, lane) = (backs[i].clone(), back_lane.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                // A refused send shows up here as an error: keep going.
                if let Ok(len) = back.recv(&mut buf) {
                    lane.offer(i, &buf[..len]);
                }
            }
        });
    }
    {
        let lane = forth.clone();
        std::thread::spawn(move || {
            lane.deliver(|i, d| {
                let _ = backs[i].send(d);
            })
        });
    }
    {
        let (lane, fronts) = (back_lane.clone(), fronts.clone());
        std::thread::spawn(move || {
            lane.deliver(|i, d| {
                let to = *clients[i].lock().expect("poisoned");
                if let Some(to) = to {
                    let _ = fronts[i].send_to(d, to);
                }
            })
        });
    }
    Ok(Relay {
        listens,
        forth,
        back: back_lane,
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wanrelay: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let relay = match start(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wanrelay: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = args.stats_file.clone() {
        let line = stats_line(started.elapsed(), &relay.forth, &relay.back);
        if let Err(e) = write_atomically(&path, &line) {
            eprintln!("wanrelay: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        let (forth, back) = (relay.forth.clone(), relay.back.clone());
        std::thread::spawn(move || {
            let mut complained = false;
            loop {
                std::thread::sleep(STATS_FILE_EVERY);
                let line = stats_line(started.elapsed(), &forth, &back);
                if let Err(e) = write_atomically(&path, &line) {
                    if !complained {
                        eprintln!("wanrelay: cannot write {}: {e}", path.display());
                        complained = true;
                    }
                }
            }
        });
    }
    println!("ready");
    let name = relay
        .listens
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    loop {
        match args.stats {
            Some(every) => {
                std::thread::sleep(every);
                eprintln!(
                    "wanrelay {name}: forth {} | back {}",
                    relay.forth.stats(),
                    relay.back.stats()
                );
            }
            None => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 Mbit/s bottleneck with a 10 KB queue, no loss or delay, for
    /// `pairs` pairs.
    fn narrow_lane(pairs: usize) -> Lane {
        Lane::new(
            PathSpec {
                delay: Duration::ZERO,
                loss: 0.0,
                rate: Some(1e6),
                queue: 10_000,
            },
            1,
            pairs,
        )
    }

    fn args(v: &[&str]) -> Result<Args, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_millis(2));
        assert_eq!(parse_loss("0.5%").unwrap(), 0.005);
        assert!(parse_loss("150%").is_err());
        assert_eq!(parse_rate("200mbit").unwrap(), 200e6);
        assert_eq!(parse_size("256k").unwrap(), 256 << 10);
    }

    #[test]
    fn parses_pairs() {
        let one = args(&["--listen", "127.0.0.1:1", "--to", "127.0.0.1:2"]).unwrap();
        assert_eq!(one.pairs.len(), 1);
        let three = args(&[
            "--pair",
            "127.0.0.1:3=127.0.0.1:4",
            "--listen",
            "127.0.0.1:1",
            "--to",
            "127.0.0.1:2",
            "--pair",
            "127.0.0.1:5=127.0.0.1:6",
            "--stats-file",
            "/tmp/x",
        ])
        .unwrap();
        let ports: Vec<_> = three
            .pairs
            .iter()
            .map(|p| (p.listen.port(), p.to.port()))
            .collect();
        assert_eq!(ports, [(1, 2), (3, 4), (5, 6)]);
        assert_eq!(three.stats_file.as_deref(), Some(Path::new("/tmp/x")));
        let only = args(&["--pair", "127.0.0.1:3=127.0.0.1:4"]).unwrap();
        assert_eq!(only.pairs.len(), 1);
        assert!(args(&[]).is_err());
        assert!(args(&["--listen", "127.0.0.1:1"]).is_err());
        assert!(args(&["--pair", "127.0.0.1:3"]).is_err());
        assert!(args(&[
            "--pair",
            "127.0.0.1:3=127.0.0.1:4",
            "--pair",
            "127.0.0.1:5=127.0.0.1:6",
            "--bind",
            "127.0.0.1:7"
        ])
        .is_err());
    }

    #[test]
    fn loss_rate_and_queue_behave() {
        let lane = Lane::new(
            PathSpec {
                delay: Duration::ZERO,
                loss: 0.1,
                rate: None,
                queue: 1 << 20,
            },
            42,
            1,
        );
        for _ in 0..100_000 {
            lane.offer(0, &[0u8; 100]);
        }
        let lost = lane.total().lost as f64 / 100_000.0;
        assert!((0.09..0.11).contains(&lost), "{lost}");
        assert_eq!(lane.total().datagrams, 100_000);
        assert_eq!(lane.total().bytes, 10_000_000);
        // A 1 Mbit/s bottleneck with a 10 KB queue takes ~10 KB at once.
        let lane = narrow_lane(1);
        for _ in 0..100 {
            lane.offer(0, &[0u8; 1000]);
        }
        let queued = lane.state.lock().unwrap().queue.len();
        assert!((9..=11).contains(&queued), "{queued}");
        assert_eq!(lane.total().queue_full as usize, 100 - queued);
    }

    #[test]
    fn pairs_share_one_queue_and_rate() {
        // 1 Mbit/s, a 10 KB queue: two pairs offering 1,000-byte datagrams
        // in turn get ~10 queued between them, not ~10 each, and the
        // bottleneck sends them one after another (8 ms each), whoever's.
        let lane = narrow_lane(2);
        let t0 = Instant::now();
        for _ in 0..50 {
            lane.offer(0, &[0u8; 1000]);
            lane.offer(1, &[1u8; 1000]);
        }
        let st = lane.state.lock().unwrap();
        let queued = st.queue.len();
        assert!((9..=11).contains(&queued), "{queued}");
        let of = |p: usize| st.queue.iter().filter(|(_, q, _)| *q == p).count();
        assert!(of(0) >= 4 && of(1) >= 4, "{} {}", of(0), of(1));
        let last = st.queue.back().unwrap().0 - t0;
        let want = Duration::from_millis(8 * queued as u64);
        assert!(
            last >= want && last < want + Duration::from_millis(50),
            "{last:?}"
        );
        drop(st);
        for p in 0..2 {
            let c = lane.pair(p);
            assert_eq!(c.datagrams, 50);
            assert_eq!(c.bytes, 50_000);
            assert_eq!(c.queue_full as usize, 50 - of_pair(&lane, p));
        }
        assert_eq!(lane.total().queue_full as usize, 100 - queued);
    }

    fn of_pair(lane: &Lane, p: usize) -> usize {
        let st = lane.state.lock().unwrap();
        st.queue.iter().filter(|(_, q, _)| *q == p).count()
    }

    #[test]
    fn relays_each_pair_to_its_own_server_and_back() {
        let servers: Vec<UdpSocket> = (0..2)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let spec = PathSpec {
            delay: Duration::from_millis(5),
            loss: 0.0,
            rate: Some(100e6),
            queue: 1 << 20,
        };
        let args = Args {
            pairs: servers
                .iter()
                .map(|s| Pair {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    to: s.local_addr().unwrap(),
                })
                .collect(),
            bind: None,
            spec,
            seed: 7,
            stats: None,
            stats_file: None,
        };
        let relay = start(&args).unwrap();
        let timeout = Some(Duration::from_secs(5));
        for (i, server) in servers.iter().enumerate() {
            server.set_read_timeout(timeout).unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            client.set_read_timeout(timeout).unwrap();
            client.send_to(&[i as u8; 100], relay.listens[i]).unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i as u8; 100][..]);
            server.send_to(&[i as u8 + 10; 40], from).unwrap();
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, relay.listens[i]);
            assert_eq!(&buf[..n], &[i as u8 + 10; 40][..]);
        }
        for i in 0..2 {
            let (f, b) = (relay.forth.pair(i), relay.back.pair(i));
            assert_eq!(
                (f.datagrams, f.bytes, f.passed, f.passed_bytes),
                (1, 100, 1, 100)
            );
            assert_eq!(
                (b.datagrams, b.bytes, b.passed, b.passed_bytes),
                (1, 40, 1, 40)
            );
        }
        let line = stats_line(Duration::from_millis(1500), &relay.forth, &relay.back);
        assert!(
            line.starts_with("elapsed_ms=1500 forth_datagrams=2 forth_bytes=200 "),
            "{line}"
        );
        assert!(line.contains(" back_datagrams=2 back_bytes=80 "), "{line}");
        assert!(line.contains(" pair1_back_passed_bytes=40"), "{line}");
        let dir = std::env::temp_dir().join(format!("wanrelay-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("stats");
        write_atomically(&file, &line).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{line}\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
