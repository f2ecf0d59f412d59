//! WireGuard UAPI requests from arbitrary bytes: parsing never panics, and
//! a parsed `set` turns into the next config document or an EINVAL, never
//! a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::modules::wireguard::uapi::{apply_set, errno, parse, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(Request::Set(req)) = parse(data) {
        let doc = serde_json::json!({
            "kind": "wireguard",
            "private_key_file": "/etc/meshgate/wg0.key",
            "address": "10.192.0.1/24",
            "peers": [
                {"name": "a", "public_key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=", "allowed_ips": ["10.192.0.2/32"]},
            ],
        });
        match apply_set(&doc, &req, &[9; 32]) {
            Ok(next) => assert!(next["peers"].is_array()),
            Err(e) => assert_eq!(e.errno, errno::EINVAL),
        }
    }
});
