//! Rate-limited logging for what a flood can repeat: per-connection and
//! per-packet warnings. Each call site (a fixed key) may log a few lines per
//! second; the rest are counted, and the next line that gets through says
//! how many were suppressed, so a flood neither fills the disk nor goes
//! unnoticed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per call site per window.
const BURST: u32 = 10;
/// The window.
const WINDOW: Duration = Duration::from_secs(1);

struct Site {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

static SITES: Mutex<Option<HashMap<&'static str, Site>>> = Mutex::new(None);

/// Whether the call site `key` may log now. `Some(n)`: log, mentioning the
/// `n` lines suppressed since the last one that got through; `None`: skip.
pub fn allow(key: &'static str) -> Option<u64> {
    allow_at(key, Instant::now())
}

fn allow_at(key: &'static str, now: Instant) -> Option<u64> {
    let mut guard = SITES.lock().unwrap_or_else(|e| e.into_inner());
    let sites = guard.get_or_insert_with(HashMap::new);
    let site = sites.entry(key).or_insert(Site {
        window_start: now,
        in_window: 0,
        suppressed: 0,
    });
    if now.saturating_duration_since(site.window_start) >= WINDOW {
        site.window_start = now;
        site.in_window = 0;
    }
    if site.in_window < BURST {
        site.in_window += 1;
        Some(std::mem::take(&mut site.suppressed))
    } else {
        site.suppressed += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_counted_silence_then_the_count() {
        let t0 = Instant::now();
        let key = "test.flood";
        let passed = (0..100).filter(|_| allow_at(key, t0).is_some()).count();
        assert_eq!(passed, BURST as usize);
        assert_eq!(allow_at(key, t0 + WINDOW), Some(100 - u64::from(BURST)));
        assert_eq!(allow_at(key, t0 + WINDOW), Some(0));
        // Sites are independent.
        assert_eq!(allow_at("test.other", t0), Some(0));
    }
}
