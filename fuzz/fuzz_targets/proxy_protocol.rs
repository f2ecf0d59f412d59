//! PROXY protocol headers from arbitrary bytes: parsing never panics, a
//! whole header never claims more bytes than given (nor more than the
//! limit), and what we encode parses back to the same addresses.
//!
//! The body is `meshgate::fuzzing::proxy_protocol`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/proxy_protocol/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::proxy_protocol(data));
