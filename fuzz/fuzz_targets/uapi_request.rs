//! Any text on the `wg` socket: a request or an errno, never a panic; a
//! parsed `set` applies to a document or is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::modules::wireguard::uapi::{apply_set, parse_request, Request};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    if let Ok(Request::Set(req)) = parse_request(&lines) {
        let doc = serde_json::json!({"kind": "wireguard", "peers": [{"name": "a", "public_key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="}]});
        let _ = apply_set(&doc, &req);
    }
});
