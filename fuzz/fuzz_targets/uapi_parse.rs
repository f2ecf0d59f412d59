//! WireGuard UAPI requests from arbitrary bytes: parsing never panics, and
//! a parsed `set` turns into the next config document or an EINVAL, never
//! a panic.
//!
//! The body is `meshgate::fuzzing::uapi_parse`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/uapi_parse/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::uapi_parse(data));
