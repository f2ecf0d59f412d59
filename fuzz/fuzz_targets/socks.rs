//! SOCKS messages from arbitrary bytes: every parser returns a message, a
//! need for more bytes, or an error, never a panic; a whole message never
//! claims more bytes than it was given, and a message cut short is never
//! whole.
//!
//! The body is `meshgate::fuzzing::socks`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/socks/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::socks(data));
