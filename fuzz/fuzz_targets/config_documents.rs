//! Any YAML text as a module document of every kind, and as a Cloud-Gateway
//! `conf.yaml`: a config or an error naming the source, never a panic.
//!
//! The body is `meshgate::fuzzing::config_documents`; `tests/fuzz_seeds.rs` runs it on
//! stable over `fuzz/seeds/config_documents/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzzing::config_documents(data));
