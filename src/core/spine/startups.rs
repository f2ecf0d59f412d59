//! Clients a door has accepted and not yet trusted: sshd's `MaxStartups`
//! and `PerSourceMaxStartups`, for every door. A session counts from
//! accept until it is past its handshake (SSH: logged in; SOCKS: its
//! request read; HTTP: its first request head read) or ends, door-wide
//! and per source address; past the caps a new one is refused at once
//! (counted as `max_startups` or `per_source_max_startups`), so silent or
//! slow clients cannot hold the door while it waits on them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::core::config::ConfigError;
use crate::core::spine::reject::RejectReason;

/// sshd's `MaxStartups start:rate:full`: with `start` sessions not yet
/// past their handshake, a new one is refused with probability `rate` %,
/// rising linearly to 100 % at `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStartups {
    /// Where early refusal starts.
    pub start: usize,
    /// Its probability there, in percent.
    pub rate: u32,
    /// Where every new session is refused.
    pub full: usize,
}

impl Default for MaxStartups {
    fn default() -> Self {
        MaxStartups {
            start: 10,
            rate: 30,
            full: 100,
        }
    }
}

impl MaxStartups {
    /// `10:30:100`, or `N` (refuse at N, no early refusal).
    pub fn parse(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected START:RATE:FULL (e.g. 10:30:100, as sshd) or a number";
        let parts: Vec<&str> = s.trim().split(':').collect();
        let num = |p: &str| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}`: {EXPECTED}"))
        };
        let m = match parts.as_slice() {
            [n] => {
                let n = num(n)?;
                MaxStartups {
                    start: n,
                    rate: 100,
                    full: n,
                }
            }
            [a, r, f] => MaxStartups {
                start: num(a)?,
                rate: num(r)? as u32,
                full: num(f)?,
            },
            _ => return Err(format!("`{s}`: {EXPECTED}")),
        };
        if m.start == 0 || m.full < m.start || m.rate > 100 {
            return Err(format!(
                "`{s}`: START must be at least 1, FULL at least START and RATE at most 100"
            ));
        }
        Ok(m)
    }

    /// Whether a new session is refused with `pending` not yet trusted;
    /// `roll` is uniform in 0..100.
    pub fn refuses(&self, pending: usize, roll: u32) -> bool {
        if pending >= self.full {
            return true;
        }
        if pending < self.start {
            return false;
        }
        // From `rate` % at `start` to 100 % at `full`.
        let span = (self.full - self.start).max(1) as u64;
        let p = u64::from(self.rate)
            + (100 - u64::from(self.rate)) * (pending - self.start) as u64 / span;
        u64::from(roll) < p
    }
}

/// A door's `max_startups` and `per_source_max_startups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupLimits {
    pub max: MaxStartups,
    pub per_source: usize,
}

impl Default for StartupLimits {
    fn default() -> Self {
        StartupLimits {
            max: MaxStartups::default(),
            per_source: Self::DEFAULT_PER_SOURCE,
        }
    }
}

impl StartupLimits {
    /// The config keys.
    pub const KEYS: [&'static str; 2] = ["max_startups", "per_source_max_startups"];
    /// sshd's `PerSourceMaxStartups` as meshgate sets it by default.
    pub const DEFAULT_PER_SOURCE: usize = 10;

    /// From the raw keys of document `src`: `max_startups` as a string
    /// (`10:30:100`) or a number, `per_source_max_startups` at least 1.
    pub fn from_raw(
        src: &str,
        max: Option<&serde_json::Value>,
        per_source: usize,
    ) -> Result<Self, ConfigError> {
        let max = match max {
            None => MaxStartups::default(),
            Some(serde_json::Value::String(s)) => {
                MaxStartups::parse(s).map_err(|m| ConfigError::key(src, "max_startups", m))?
            }
            Some(serde_json::Value::Number(n)) => MaxStartups::parse(&n.to_string())
                .map_err(|m| ConfigError::key(src, "max_startups", m))?,
            Some(other) => {
                return Err(ConfigError::key(
                    src,
                    "max_startups",
                    format!("`{other}`: expected START:RATE:FULL (e.g. 10:30:100) or a number"),
                ))
            }
        };
        if per_source == 0 {
            return Err(ConfigError::key(
                src,
                "per_source_max_startups",
                "expected at least 1",
            ));
        }
        Ok(StartupLimits { max, per_source })
    }
}

/// The serde default of `per_source_max_startups`.
pub fn default_per_source() -> usize {
    StartupLimits::DEFAULT_PER_SOURCE
}

/// A door's sessions not yet past their handshake: door-wide and per
/// source address.
#[derive(Default)]
pub struct Startups(Mutex<(usize, HashMap<IpAddr, usize>)>);

/// One session not yet past its handshake; counted until dropped.
pub struct Startup {
    table: Arc<Startups>,
    ip: IpAddr,
}

impl Drop for Startup {
    fn drop(&mut self) {
        let mut g = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

impl Startups {
    /// Admits a new session from `ip`, or says which cap refused it (the
    /// reason to count: `per_source_max_startups` or `max_startups`).
    pub fn try_start(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &StartupLimits,
    ) -> Result<Startup, RejectReason> {
        let ip = crate::core::spine::dest::canonical(ip);
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *g;
        if per.get(&ip).copied().unwrap_or(0) >= limits.per_source {
            return Err(RejectReason::PerSourceMaxStartups);
        }
        let roll = rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 100;
        if limits.max.refuses(*total, roll) {
            return Err(RejectReason::MaxStartups);
        }
        *total += 1;
        *per.entry(ip).or_default() += 1;
        Ok(Startup {
            table: self.clone(),
            ip,
        })
    }

    /// Sessions not yet past their handshake now.
    pub fn pending(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_startups_as_sshd() {
        let m = MaxStartups::parse("10:30:100").unwrap();
        assert_eq!(m, MaxStartups::default());
        // Below start: never; at full: always; between: rate rising to 100 %.
        assert!(!(0..100).any(|roll| m.refuses(9, roll)));
        assert_eq!((0..100).filter(|&roll| m.refuses(10, roll)).count(), 30);
        assert_eq!((0..100).filter(|&roll| m.refuses(55, roll)).count(), 65);
        assert!((0..100).all(|roll| m.refuses(100, roll)));
        let n = MaxStartups::parse("5").unwrap();
        assert!(!n.refuses(4, 0) && n.refuses(5, 99));
        for bad in ["0", "10:30", "10:130:100", "20:30:10", "a:b:c", ""] {
            assert!(MaxStartups::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn per_source_and_door_wide_caps_release_on_drop() {
        let t = Arc::new(Startups::default());
        let limits = StartupLimits {
            max: MaxStartups::parse("3").unwrap(),
            per_source: 2,
        };
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        let a1 = t.try_start(a, &limits).unwrap();
        let _a2 = t.try_start(a, &limits).unwrap();
        assert_eq!(
            t.try_start(a, &limits).err(),
            Some(RejectReason::PerSourceMaxStartups)
        );
        let _b1 = t.try_start(b, &limits).unwrap();
        assert_eq!(
            t.try_start(b, &limits).err(),
            Some(RejectReason::MaxStartups)
        );
        drop(a1);
        assert_eq!(t.pending(), 2);
        assert!(t.try_start("192.0.2.2".parse().unwrap(), &limits).is_ok());
    }
}
