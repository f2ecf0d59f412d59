//! Any text as a `kind: policy` document (a rule set or an error naming the
//! file and key, never a panic); what parses is compiled and asked a
//! decision derived from the same bytes. And any bytes as a destination
//! host: the normaliser gives an address or a name, never a panic, and an
//! address it gives is the address it prints as.
#![no_main]

use configstore::format::{parse, Format};
use configstore::Document;
use libfuzzer_sys::fuzz_target;
use meshgate::core::spine::dest::{self, Host};
use meshgate::core::spine::flow::Protocol;
use meshgate::core::spine::policy::{Facts, PolicySet};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The destination normaliser.
    let host = text.lines().next().unwrap_or_default();
    match dest::normalize_host(host) {
        Host::Ip(ip) => {
            assert_eq!(dest::normalize_host(&ip.to_string()), Host::Ip(ip));
            let _ = (dest::never(ip), dest::protected(ip));
        }
        Host::Name(n) => assert!(!n.ends_with('.')),
    }
    // Policy documents.
    for format in [Format::Yaml, Format::Json] {
        let Ok(value) = parse(&text, format, "fuzz.yaml") else {
            continue;
        };
        let doc = Document {
            source: "fuzz.yaml".into(),
            value,
        };
        if let Ok(p) = meshgate::modules::policy::config::from_document(&doc) {
            let set = PolicySet::new(p.rules, p.default_deny);
            let b = |i: usize| data.get(i).copied().unwrap_or(0);
            let facts = Facts {
                door: "socks",
                kind: "socks",
                identity: Some(host),
                src: std::net::IpAddr::from([10, b(0), b(1), b(2)]),
                host: Some(host),
                ip: Some(std::net::IpAddr::from([b(3), b(4), b(5), b(6)])),
                port: u16::from_be_bytes([b(7), b(8)]),
                protocol: Protocol::Tcp,
            };
            let d = set.decide(&facts);
            // Without rules or `default: deny` nothing is denied.
            assert!(!set.is_empty() || !d.deny);
        }
    }
});
