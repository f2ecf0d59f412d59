//! Any bytes as a DNS query to a `kind: netns` namespace's stub resolver:
//! never a panic, and what is read is answered with a reply that parses
//! back.
//!
//! The body is `meshgate::fuzzing::dns_query`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/dns_query/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::dns_query(data));
