//! The h2 door's own reading of a CONNECT request from arbitrary bytes:
//! the authority, `Forwarded: for=`, `traceparent` and `baggage` never
//! panic, and what is kept is within its limits. (HTTP/2 frames and HPACK
//! are the `h2` crate's, bounded by the door's limits.)
//!
//! The body is `meshgate::fuzzing::h2_request`; `tests/fuzz_seeds.rs` runs it
//! on stable over `fuzz/seeds/h2_request/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::h2_request(data));
