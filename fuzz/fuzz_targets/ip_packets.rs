//! Any bytes as an IP packet: the userspace stack's door, the forwarded-flow
//! tracker, the router's TTL handling, the DNS answer parser and the kernel
//! engine's TUN frame splitter (offloads) never panic.
//!
//! The body is `meshgate::fuzzing::ip_packets`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/ip_packets/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::ip_packets(data));
