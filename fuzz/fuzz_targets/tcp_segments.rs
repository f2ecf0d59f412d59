//! Any bytes as TCP segments: the parser never panics, and a connection
//! (meshgate's own TCP) fed arbitrary segments, checksum or not, never
//! panics and keeps its invariants while it answers.
//!
//! The body is `meshgate::fuzzing::tcp_segments`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/tcp_segments/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::tcp_segments(data));
