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
//!          --delay 10ms --loss 0.5% --rate 200mbit --queue 256k [--seed 7] [--stats 5s]
//! ```
//!
//! It prints `ready` on stdout once bound. Standard library only, so it
//! builds in seconds; each direction has a receiving and a sending thread.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// One direction: the queue of datagrams waiting to be delivered.
struct Lane {
    spec: PathSpec,
    state: Mutex<LaneState>,
    ready: Condvar,
    passed: AtomicU64,
    lost: AtomicU64,
    overflowed: AtomicU64,
}

struct LaneState {
    /// (delivery time, datagram), in delivery order.
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// When the bottleneck finishes sending what it holds.
    busy_until: Instant,
    rng: u64,
}

impl Lane {
    fn new(spec: PathSpec, seed: u64) -> Lane {
        Lane {
            spec,
            state: Mutex::new(LaneState {
                queue: VecDeque::new(),
                busy_until: Instant::now(),
                rng: seed | 1,
            }),
            ready: Condvar::new(),
            passed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
        }
    }

    /// Takes one datagram that arrived now: lost, dropped at a full
    /// bottleneck queue, or queued for delivery.
    fn offer(&self, data: &[u8]) {
        let now = Instant::now();
        let mut st = self.state.lock().expect("lane poisoned");
        // xorshift64*: reproducible with --seed, good enough for loss.
        st.rng ^= st.rng >> 12;
        st.rng ^= st.rng << 25;
        st.rng ^= st.rng >> 27;
        let r = (st.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        if r < self.spec.loss {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let depart = match self.spec.rate {
            Some(rate) => {
                let start = st.busy_until.max(now);
                let backlog = start.duration_since(now).as_secs_f64() * rate / 8.0;
                if backlog + data.len() as f64 > self.spec.queue as f64 {
                    self.overflowed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let done = start + Duration::from_secs_f64(data.len() as f64 * 8.0 / rate);
                st.busy_until = done;
                done
            }
            None => now,
        };
        st.queue.push_back((depart + self.spec.delay, data.to_vec()));
        drop(st);
        self.ready.notify_one();
    }

    /// Waits for the datagrams whose time has come and hands them to `send`.
    fn deliver(&self, mut send: impl FnMut(&[u8])) -> ! {
        let mut due = Vec::new();
        loop {
            {
                let mut st = self.state.lock().expect("lane poisoned");
                loop {
                    let now = Instant::now();
                    match st.queue.front() {
                        None => st = self.ready.wait(st).expect("lane poisoned"),
                        Some((at, _)) if *at > now => {
                            let wait = *at - now;
                            st = self.ready.wait_timeout(st, wait).expect("lane poisoned").0;
                        }
                        Some(_) => break,
                    }
                }
                let now = Instant::now();
                while st.queue.front().is_some_and(|(at, _)| *at <= now) {
                    due.push(st.queue.pop_front().expect("front exists").1);
                }
            }
            for d in due.drain(..) {
                self.passed.fetch_add(1, Ordering::Relaxed);
                send(&d);
            }
        }
    }

    fn stats(&self) -> String {
        format!(
            "passed {} lost {} queue-full {}",
            self.passed.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.overflowed.load(Ordering::Relaxed)
        )
    }
}

struct Args {
    listen: SocketAddr,
    to: SocketAddr,
    bind: SocketAddr,
    spec: PathSpec,
    seed: u64,
    stats: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "ms"));
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (e.g. 10ms)"))?;
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
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a rate (e.g. 200mbit)"))?;
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
    let v: usize = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 256k)"))?;
    Ok(v * mult)
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut to, mut bind) = (None, None, None);
    let mut spec = PathSpec {
        delay: Duration::ZERO,
        loss: 0.0,
        rate: None,
        queue: 1 << 20,
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let mut stats = None;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let addr = |v: String| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("{flag}: `{v}` is not IP:PORT"))
        };
        match flag.as_str() {
            "--listen" => listen = Some(addr(value()?)?),
            "--to" => to = Some(addr(value()?)?),
            "--bind" => bind = Some(addr(value()?)?),
            "--delay" => spec.delay = parse_duration(&value()?)?,
            "--loss" => spec.loss = parse_loss(&value()?)?,
            "--rate" => spec.rate = Some(parse_rate(&value()?)?),
            "--queue" => spec.queue = parse_size(&value()?)?,
            "--seed" => seed = value()?.parse().map_err(|_| "--seed: not a number")?,
            "--stats" => stats = Some(parse_duration(&value()?)?),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let listen = listen.ok_or("--listen IP:PORT is required")?;
    let to = to.ok_or("--to IP:PORT is required")?;
    let bind = bind.unwrap_or_else(|| match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    });
    Ok(Args {
        listen,
        to,
        bind,
        spec,
        seed,
        stats,
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
    let bound = UdpSocket::bind(args.listen).and_then(|front| {
        let back = UdpSocket::bind(args.bind)?;
        back.connect(args.to)?;
        Ok((front, back))
    });
    let (front, back) = match bound {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wanrelay: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (front, back) = (Arc::new(front), Arc::new(back));
    let forth = Arc::new(Lane::new(args.spec, args.seed));
    let back_lane = Arc::new(Lane::new(args.spec, args.seed.rotate_left(17)));
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));

    // Client → server.
    {
        let (front, lane, client) = (front.clone(), forth.clone(), client.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf) else {
                    continue;
                };
                *client.lock().expect("poisoned") = Some(from);
                lane.offer(&buf[..n]);
            }
        });
        let (back, lane) = (back.clone(), forth.clone());
        std::thread::spawn(move || {
            lane.deliver(|d| {
                let _ = back.send(d);
            })
        });
    }
    // Server → client.
    {
        let (back, lane) = (back.clone(), back_lane.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                // A refused send shows up here as an error: keep going.
                if let Ok(n) = back.recv(&mut buf) {
                    lane.offer(&buf[..n]);
                }
            }
        });
        let (front, lane, client) = (front.clone(), back_lane.clone(), client.clone());
        std::thread::spawn(move || {
            lane.deliver(|d| {
                let to = *client.lock().expect("poisoned");
                if let Some(to) = to {
                    let _ = front.send_to(d, to);
                }
            })
        });
    }
    println!("ready");
    loop {
        match args.stats {
            Some(every) => {
                std::thread::sleep(every);
                eprintln!(
                    "wanrelay {}: forth {} | back {}",
                    args.listen,
                    forth.stats(),
                    back_lane.stats()
                );
            }
            None => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn loss_rate_and_queue_behave() {
        let lane = Lane::new(
            PathSpec {
                delay: Duration::ZERO,
                loss: 0.1,
                rate: None,
                queue: 1 << 20,
            },
            42,
        );
        for _ in 0..100_000 {
            lane.offer(&[0u8; 100]);
        }
        let lost = lane.lost.load(Ordering::Relaxed) as f64 / 100_000.0;
        assert!((0.09..0.11).contains(&lost), "{lost}");
        // A 1 Mbit/s bottleneck with a 10 KB queue takes ~10 KB at once.
        let lane = Lane::new(
            PathSpec {
                delay: Duration::ZERO,
                loss: 0.0,
                rate: Some(1e6),
                queue: 10_000,
            },
            1,
        );
        for _ in 0..100 {
            lane.offer(&[0u8; 1000]);
        }
        let queued = lane.state.lock().unwrap().queue.len();
        assert!((9..=11).contains(&queued), "{queued}");
        assert_eq!(lane.overflowed.load(Ordering::Relaxed) as usize, 100 - queued);
    }
}
