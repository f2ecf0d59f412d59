//! Addresses as operators write them: `HOST:PORT` targets and listen addresses.
//!
//! Both parse with messages that say what was expected, so a config error
//! reads `key listen: invalid port 99999: expected 1-65535` rather than a bare
//! "invalid socket address syntax".

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A dial target: an IP address or a host name, and a port.
/// Names are resolved at dial time (and re-resolved on every dial).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// IP literal (without brackets) or DNS name.
    pub host: String,
    /// 1-65535.
    pub port: u16,
}

impl HostPort {
    /// The IP address, if the host is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("invalid port {p}: expected 1-65535")),
        Err(_) => Err(format!("invalid port `{s}`: expected a number 1-65535")),
    }
}

/// Splits `host:port` / `[v6]:port` into its parts.
fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    const EXPECTED: &str = "expected HOST:PORT, e.g. 127.0.0.1:80, [::1]:80 or backend.local:80";
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}`: missing `]`: {EXPECTED}"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("`{s}`: missing port: {EXPECTED}"))?;
        return Ok((host, port));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}`: missing port: {EXPECTED}"))?;
    if host.contains(':') {
        return Err(format!("`{s}`: IPv6 addresses need brackets: {EXPECTED}"));
    }
    Ok((host, port))
}

fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = split_host_port(s.trim())?;
        let port = parse_port(port)?;
        if !valid_host(host) {
            return Err(format!(
                "invalid host `{host}`: expected an IP address or a DNS name"
            ));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A local address to listen on: an IP literal and a port (0 = ephemeral).
/// A bare port (`8080`) means `127.0.0.1:8080`: nothing is exposed to other
/// hosts unless an address says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(p) = s.parse::<u32>() {
            if p > 65535 {
                return Err(format!("invalid port {p}: expected 0-65535"));
            }
            return Ok(ListenAddr(SocketAddr::from(([127, 0, 0, 1], p as u16))));
        }
        let (host, port) = split_host_port(s)?;
        let port = match port.parse::<u32>() {
            Ok(p) if p <= 65535 => p as u16,
            Ok(p) => return Err(format!("invalid port {p}: expected 0-65535")),
            Err(_) => return Err(format!("invalid port `{port}`: expected a number 0-65535")),
        };
        let ip: IpAddr = host.parse().map_err(|_| {
            format!("invalid listen address `{host}`: expected an IP address such as 127.0.0.1, 0.0.0.0 or ::")
        })?;
        Ok(ListenAddr(SocketAddr::new(ip, port)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Port(p) => p.to_string().parse().map_err(serde::de::Error::custom),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`, not
/// `::` or `::1`) IPv6 addresses as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
                return IpAddr::V4(std::net::Ipv4Addr::from(
                    (u32::from(s[6]) << 16) | u32::from(s[7]),
                ));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        let h: HostPort = "127.0.0.1:80".parse().unwrap();
        assert_eq!(h.port, 80);
        assert_eq!(h.ip(), Some(IpAddr::from([127, 0, 0, 1])));
        let h: HostPort = "[::1]:443".parse().unwrap();
        assert_eq!(h.host, "::1");
        assert_eq!(h.to_string(), "[::1]:443");
        let h: HostPort = "backend.local:8080".parse().unwrap();
        assert_eq!(h.ip(), None);
        assert!("127.0.0.1:99999"
            .parse::<HostPort>()
            .unwrap_err()
            .contains("invalid port 99999"));
        assert!("127.0.0.1:0".parse::<HostPort>().is_err());
        assert!("127.0.0.1"
            .parse::<HostPort>()
            .unwrap_err()
            .contains("missing port"));
        assert!("::1:80"
            .parse::<HostPort>()
            .unwrap_err()
            .contains("brackets"));
        assert!("bad host:80"
            .parse::<HostPort>()
            .unwrap_err()
            .contains("invalid host"));
    }

    #[test]
    fn listen_addr() {
        let l: ListenAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(l.0.port(), 8080);
        let l: ListenAddr = "9000".parse().unwrap();
        assert_eq!(l.0, "127.0.0.1:9000".parse().unwrap());
        let l: ListenAddr = "[::]:0".parse().unwrap();
        assert!(l.0.is_ipv6());
        assert!("localhost:80".parse::<ListenAddr>().is_err());
        assert!("1.2.3.4:70000"
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("0-65535"));
        let l: ListenAddr = serde_json::from_value(serde_json::json!(8080)).unwrap();
        assert_eq!(l.0.port(), 8080);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = s.parse::<HostPort>();
            let _ = s.parse::<ListenAddr>();
        }

        #[test]
        fn host_port_roundtrips(ip in any::<IpAddr>(), port in 1u16..) {
            let hp = HostPort { host: ip.to_string(), port };
            prop_assert_eq!(hp.to_string().parse::<HostPort>().unwrap(), hp);
        }

        #[test]
        fn listen_addr_roundtrips(addr in any::<SocketAddr>()) {
            // Scope ids and flow info are not part of the text form.
            let addr = SocketAddr::new(addr.ip(), addr.port());
            prop_assert_eq!(addr.to_string().parse::<ListenAddr>().unwrap().0, addr);
        }
    }
}
