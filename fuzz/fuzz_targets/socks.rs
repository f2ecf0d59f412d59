//! SOCKS messages from arbitrary bytes: every parser returns a message, a
//! need for more bytes, or an error, never a panic; a whole message never
//! claims more bytes than it was given, and a message cut short is never
//! whole.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::modules::socks::proto;

fn check<T>(data: &[u8], parse: impl Fn(&[u8]) -> proto::Parsed<T>) {
    if let Ok(Some((_, n))) = parse(data) {
        assert!(n <= data.len() && n > 0);
        assert!(!matches!(parse(&data[..n - 1]), Ok(Some(_))));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, proto::parse_greeting);
    check(data, proto::parse_credentials);
    check(data, proto::parse_request);
    check(data, proto::parse_socks4);
    if let Ok(Some((_, at))) = proto::parse_udp(data) {
        assert!(at <= data.len());
    }
});
