//! Destinations as they will be dialed: the numeric forms a resolver
//! accepts, normalised; and the addresses no flow may reach, or no door's
//! user may reach by default.
//!
//! A door's user (SOCKS, HTTP proxy, SSH channel) chooses its destination;
//! an operator's file (a pipe's `remote`, a link's endpoint) is trusted.
//! Every destination is normalised first ([`normalize_host`]): `2130706433`,
//! `127.1`, `0x7f.1` and `::ffff:127.0.0.1` are all `127.0.0.1`, exactly as
//! the system resolver would dial them, so a route or rule written for the
//! address holds for every spelling of it. Then [`never`] refuses what no
//! flow may reach (the unspecified address, multicast, broadcast), and
//! [`protected`] names what a door's user reaches only through a route that
//! names the prefix explicitly (the host's loopback, link-local and cloud
//! metadata addresses). Sans-IO: pure functions of the address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

/// Who chose a flow's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChosenBy {
    /// The operator's config (a pipe's `remote`, a link's forward): trusted.
    Operator,
    /// The door's client (a SOCKS request, an HTTP CONNECT, an SSH
    /// channel): held to the safe defaults.
    Client,
}

/// Why a destination is refused whatever the routes say, or refused to a
/// door's user unless a route names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Forbidden {
    /// `0.0.0.0/8` or `::`: "this host" to the kernel.
    Unspecified,
    /// A multicast group.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// The host's loopback (`127.0.0.0/8`, `::1`).
    Loopback,
    /// Link-local (`169.254.0.0/16`, `fe80::/10`): cloud metadata lives here.
    LinkLocal,
    /// A cloud metadata address outside link-local (`fd00:ec2::254`).
    Metadata,
    /// The node's own admin API.
    Admin,
    /// A listener of another tenant on this host.
    OtherTenant,
}

impl Forbidden {
    /// Stable label for metrics, audit records and refusal headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Forbidden::Unspecified => "unspecified",
            Forbidden::Multicast => "multicast",
            Forbidden::Broadcast => "broadcast",
            Forbidden::Loopback => "loopback",
            Forbidden::LinkLocal => "link_local",
            Forbidden::Metadata => "metadata",
            Forbidden::Admin => "admin",
            Forbidden::OtherTenant => "other_tenant",
        }
    }

    /// What it is, for a person.
    pub fn describe(self) -> &'static str {
        match self {
            Forbidden::Unspecified => "the unspecified address (never dialed)",
            Forbidden::Multicast => "a multicast address (never dialed)",
            Forbidden::Broadcast => "the broadcast address (never dialed)",
            Forbidden::Loopback => {
                "the host's loopback (a door's user needs a route that names it)"
            }
            Forbidden::LinkLocal => {
                "a link-local or metadata address (a door's user needs a route that names it)"
            }
            Forbidden::Metadata => {
                "a cloud metadata address (a door's user needs a route that names it)"
            }
            Forbidden::Admin => "the node's admin API",
            Forbidden::OtherTenant => "a listener of another tenant",
        }
    }
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A destination host after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An address (IPv4-mapped and -compatible IPv6 made IPv4).
    Ip(IpAddr),
    /// A name, lower-cased, without a trailing dot.
    Name(String),
}

pub use crate::core::addr::canonical;

/// One part of a numeric IPv4 form: decimal, octal (leading `0`) or hex
/// (`0x`), as `inet_aton(3)` reads it.
fn aton_part(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() {
        // `0x` alone is 0 to inet_aton.
        return (radix == 16).then_some(0);
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// The numeric IPv4 forms the system resolver accepts (`inet_aton`): `a`,
/// `a.b`, `a.b.c`, `a.b.c.d`, each part decimal, octal or hex, the last
/// part filling the remaining bytes.
pub fn parse_inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts.iter().map(|p| aton_part(p)).collect::<Option<_>>()?;
    let (head, last) = nums.split_at(nums.len() - 1);
    if head.iter().any(|&n| n > 255) {
        return None;
    }
    let last_bits = 32 - 8 * head.len() as u32;
    if last[0] >= 1u64 << last_bits {
        return None;
    }
    let mut v: u32 = 0;
    for (i, &n) in head.iter().enumerate() {
        v |= (n as u32) << (24 - 8 * i as u32);
    }
    v |= last[0] as u32;
    Some(Ipv4Addr::from(v))
}

/// A destination host as it will be dialed: an IP literal (any numeric
/// form, brackets and IPv6 zone-less), or a name.
pub fn normalize_host(host: &str) -> Host {
    let h = host.trim_matches(['[', ']']);
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Host::Ip(canonical(ip));
    }
    if let Ok(v6) = h.parse::<Ipv6Addr>() {
        return Host::Ip(canonical(IpAddr::V6(v6)));
    }
    if let Some(v4) = parse_inet_aton(h) {
        return Host::Ip(IpAddr::V4(v4));
    }
    let name = h.trim_end_matches('.').to_ascii_lowercase();
    // `127.0.0.1.` is a name to the resolver, but its numeric part is an
    // address to anyone reading it: treat it as the address.
    if let Some(v4) = parse_inet_aton(&name) {
        return Host::Ip(IpAddr::V4(v4));
    }
    Host::Name(name)
}

/// What no flow may reach, whoever chose it.
pub fn never(ip: IpAddr) -> Option<Forbidden> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            if v4.octets()[0] == 0 {
                Some(Forbidden::Unspecified)
            } else if v4.is_multicast() {
                Some(Forbidden::Multicast)
            } else if v4.is_broadcast() {
                Some(Forbidden::Broadcast)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some(Forbidden::Unspecified)
            } else if v6.is_multicast() {
                Some(Forbidden::Multicast)
            } else {
                None
            }
        }
    }
}

/// The AWS IPv6 metadata address.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// What a door's user reaches on the host only through a route that names
/// the prefix explicitly.
pub fn protected(ip: IpAddr) -> Option<Forbidden> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(Forbidden::Loopback)
            } else if v4.is_link_local() {
                Some(Forbidden::LinkLocal)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some(Forbidden::Loopback)
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some(Forbidden::LinkLocal)
            } else if v6 == METADATA_V6 {
                Some(Forbidden::Metadata)
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }

    #[test]
    fn every_numeric_form_is_the_address_it_is() {
        for form in [
            "127.0.0.1",
            "2130706433",
            "127.1",
            "127.0.1",
            "0x7f.1",
            "0x7f000001",
            "0177.0.0.1",
            "017700000001",
            "::ffff:127.0.0.1",
            "[::ffff:127.0.0.1]",
            "::ffff:7f00:1",
            "::127.0.0.1",
            "127.0.0.1.",
        ] {
            assert_eq!(normalize_host(form), ip("127.0.0.1"), "{form}");
        }
        assert_eq!(normalize_host("169.254.169.254"), ip("169.254.169.254"));
        assert_eq!(normalize_host("0xa9fea9fe"), ip("169.254.169.254"));
        assert_eq!(normalize_host("::1"), ip("::1"));
        assert_eq!(normalize_host("::"), ip("::"));
        assert_eq!(normalize_host("0"), ip("0.0.0.0"));
    }

    #[test]
    fn names_stay_names() {
        for (s, n) in [
            ("localhost", "localhost"),
            ("Example.COM.", "example.com"),
            ("1.2.3.4.5", "1.2.3.4.5"),
            ("256.1.1.1", "256.1.1.1"),
            ("08.1.1.1", "08.1.1.1"),
            ("1e2", "1e2"),
            ("0x", "0x"),
        ] {
            // `0x` alone is 0 to inet_aton: an address.
            if s == "0x" {
                assert_eq!(normalize_host(s), ip("0.0.0.0"));
                continue;
            }
            assert_eq!(normalize_host(s), Host::Name(n.into()), "{s}");
        }
        assert_eq!(parse_inet_aton("1.2.65536"), None);
        assert_eq!(
            parse_inet_aton("1.2.65535"),
            Some("1.2.255.255".parse().unwrap())
        );
        assert_eq!(parse_inet_aton("4294967296"), None);
    }

    #[test]
    fn never_and_protected() {
        for (s, f) in [
            ("0.0.0.0", Forbidden::Unspecified),
            ("0.1.2.3", Forbidden::Unspecified),
            ("::", Forbidden::Unspecified),
            ("224.0.0.1", Forbidden::Multicast),
            ("ff02::1", Forbidden::Multicast),
            ("255.255.255.255", Forbidden::Broadcast),
        ] {
            assert_eq!(never(s.parse().unwrap()), Some(f), "{s}");
        }
        for (s, f) in [
            ("127.0.0.1", Forbidden::Loopback),
            ("127.255.0.9", Forbidden::Loopback),
            ("::1", Forbidden::Loopback),
            ("::ffff:127.0.0.1", Forbidden::Loopback),
            ("169.254.169.254", Forbidden::LinkLocal),
            ("fe80::1", Forbidden::LinkLocal),
            ("febf::1", Forbidden::LinkLocal),
            ("fd00:ec2::254", Forbidden::Metadata),
        ] {
            assert_eq!(protected(s.parse().unwrap()), Some(f), "{s}");
            assert_eq!(never(s.parse().unwrap()), None, "{s}");
        }
        for s in ["10.1.2.3", "192.0.2.1", "2001:db8::1", "fec0::1"] {
            assert_eq!(protected(s.parse().unwrap()), None, "{s}");
            assert_eq!(never(s.parse().unwrap()), None, "{s}");
        }
    }
}
