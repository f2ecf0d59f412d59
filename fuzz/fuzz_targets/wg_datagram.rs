//! Any datagram into a WireGuard hub's socket-free core: dropped and
//! counted, never a panic. The first byte picks the mode: a raw datagram
//! from an address it picks, or bytes an authenticated peer (fixed keys,
//! its handshake done) encrypts, as its IP packet or as a UDP body to the
//! hub or to the hub's other peer.
//!
//! The body is `meshgate::fuzzing::wg_datagram`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/wg_datagram/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::wg_datagram(data));
