//! The HTTP proxy's own parsing from arbitrary bytes: `Proxy-Authorization`
//! values never panic, and what parses has the user before the first colon.
//! (Request heads are hyper's, bounded by the door's limits.)
//!
//! The body is `meshgate::fuzzing::http_proxy`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/http_proxy/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::http_proxy(data));
