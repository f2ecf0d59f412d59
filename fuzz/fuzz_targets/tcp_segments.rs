//! Any bytes as TCP segments: the parser never panics, and a connection
//! (meshgate's own TCP) fed arbitrary segments, checksum or not, never
//! panics and keeps its invariants while it answers.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshgate::core::engine::tcp::cc::Algorithm;
use meshgate::core::engine::tcp::seq::Seq;
use meshgate::core::engine::tcp::socket::{Config, Socket};
use meshgate::core::engine::tcp::wire::{self, Header, Options, SYN};

fuzz_target!(|data: &[u8]| {
    let a: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
    let _ = wire::parse(a.ip(), b.ip(), data);
    let cfg = Config {
        mtu: 1420,
        recv_buffer: 1 << 16,
        send_buffer: 1 << 16,
        keep_alive: Some(Duration::from_secs(1)),
        congestion: if data.first().is_some_and(|b| b & 1 == 1) {
            Algorithm::Cubic
        } else {
            Algorithm::Bbr
        },
    };
    let now = Instant::now();
    // A passive open from a well-formed SYN, then the fuzzer's segments.
    let mut syn = Vec::new();
    let mut options = Options::default();
    options.mss = Some(1380);
    options.window_scale = Some(7);
    options.sack_permitted = true;
    options.timestamp = Some((1, 0));
    let header = Header { src: a, dst: b, seq: Seq(1000), ack: Seq(0), flags: SYN, window: 65535, options };
    wire::emit(&mut syn, &header, [&[], &[]], 1);
    let parsed = wire::parse(a.ip(), b.ip(), &syn[20..]).unwrap();
    let mut socket = Socket::accept(cfg, &parsed, Seq(5000), now);
    let _ = socket.send_slice(&[7u8; 30_000]);
    let mut out = Vec::new();
    let mut t = now;
    for (i, chunk) in data.chunks(64).enumerate() {
        t += Duration::from_millis(u64::from(chunk[0] % 50));
        if let Ok(seg) = wire::parse_unchecked(a.ip(), b.ip(), chunk) {
            socket.handle(t, &seg);
        }
        for _ in 0..100 {
            out.clear();
            if !socket.poll_transmit(t, &mut out) {
                break;
            }
            assert!(out.len() <= 1420, "a packet over the MTU");
        }
        let mut buf = [0u8; 4096];
        let _ = socket.recv_slice(&mut buf);
        if i % 7 == 3 {
            let _ = socket.send_slice(chunk);
        }
        if let Some(at) = socket.poll_at() {
            t = t.max(at.min(t + Duration::from_secs(2)));
        }
    }
});
