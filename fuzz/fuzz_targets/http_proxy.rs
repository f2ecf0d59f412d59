//! The HTTP proxy's own parsing from arbitrary bytes: `Proxy-Authorization`
//! values never panic, and what parses has the user before the first colon.
//! (Request heads are hyper's, bounded by the door's limits.)

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::modules::http_proxy::parse_basic;

fuzz_target!(|data: &[u8]| {
    if let Some((user, _password)) = parse_basic(data) {
        assert!(!user.contains(':'));
    }
});
