//! Any text as a `kind: policy` document (a rule set or an error naming the
//! file and key, never a panic); what parses is compiled and asked a
//! decision derived from the same bytes. And any bytes as a destination
//! host: the normaliser gives an address or a name, never a panic, and an
//! address it gives is the address it prints as.
//!
//! The body is `meshgate::fuzzing::policy`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/policy/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::policy(data));
