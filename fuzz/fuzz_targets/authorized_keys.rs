//! `authorized_keys` text from arbitrary bytes: parsing returns keys or a
//! message naming the line, never a panic.
//!
//! The body is `meshgate::fuzzing::authorized_keys`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/authorized_keys/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::authorized_keys(data));
