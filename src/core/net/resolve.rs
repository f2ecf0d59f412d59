//! The host's resolver, in one place: direct dials, a `direct` route's
//! names, datagram sessions and WireGuard endpoints all resolve here.
//! (Names inside a vnet go to its `dns:` server: [`super::dns`].)
//!
//! Answers are canonical ([`crate::core::addr::canonical`]: IPv4-mapped
//! IPv6 as IPv4), without duplicates, in the resolver's order, and come
//! within a deadline or not at all.

use std::net::IpAddr;
use std::time::Duration;

use crate::core::addr::canonical;

/// Why a name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The resolver said no (no such name, no server).
    #[error("cannot resolve {name}: {message}")]
    Failed {
        /// The name asked for.
        name: String,
        /// The resolver's reason.
        message: String,
    },
    /// The name exists but has no address.
    #[error("cannot resolve {name}: no addresses")]
    Empty {
        /// The name asked for.
        name: String,
    },
    /// No answer within the deadline.
    #[error("cannot resolve {name}: no answer within {timeout:?}")]
    Timeout {
        /// The name asked for.
        name: String,
        /// The deadline.
        timeout: Duration,
    },
}

/// The addresses of `name` (or of an IP literal: itself) by the host's
/// resolver, within `timeout`.
pub async fn on_host(name: &str, timeout: Duration) -> Result<Vec<IpAddr>, ResolveError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(vec![canonical(ip)]);
    }
    let answer = tokio::time::timeout(timeout, tokio::net::lookup_host((name, 0))).await;
    let addrs = match answer {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => {
            return Err(ResolveError::Failed {
                name: name.to_string(),
                message: e.to_string(),
            })
        }
        Err(_) => {
            return Err(ResolveError::Timeout {
                name: name.to_string(),
                timeout,
            })
        }
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for a in addrs {
        let ip = canonical(a.ip());
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(ResolveError::Empty {
            name: name.to_string(),
        });
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_names_and_failures() {
        let t = Duration::from_secs(5);
        assert_eq!(
            on_host("::ffff:10.1.2.3", t).await.unwrap(),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        let local = on_host("localhost", t).await.unwrap();
        assert!(local.iter().all(|ip| ip.is_loopback()), "{local:?}");
        let e = on_host("no-such-host.invalid", t).await.unwrap_err();
        assert!(
            matches!(&e, ResolveError::Failed { name, .. } if name == "no-such-host.invalid"),
            "{e}"
        );
        assert!(e
            .to_string()
            .starts_with("cannot resolve no-such-host.invalid: "));
    }
}
