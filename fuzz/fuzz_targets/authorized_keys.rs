//! `authorized_keys` text from arbitrary bytes: parsing returns keys or a
//! message naming the line, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::modules::ssh::keys::parse_authorized_keys;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match parse_authorized_keys(text) {
            Ok(keys) => assert!(keys.iter().all(|k| !k.identity.is_empty())),
            Err(e) => assert!(e.starts_with("line ")),
        }
    }
});
