//! Reconnect waits for gateway links: first 1 s, then doubling up to a
//! maximum, each wait jittered by ±20 % so a fleet does not reconnect in
//! step; after a connection that stayed up for [`Backoff::STABLE`] the
//! first attempt goes at once and the waits start again at 1 s.

use std::time::Duration;

/// The next wait between reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    delay: Duration,
    max: Duration,
    /// The next attempt goes at once (a stable connection just ended).
    now: bool,
}

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_secs(1);
    /// A connection up this long resets the waits.
    pub const STABLE: Duration = Duration::from_secs(10);

    /// Waits from [`Backoff::FIRST`] up to `max`.
    pub fn new(max: Duration) -> Self {
        Backoff {
            delay: Self::FIRST,
            max: max.max(Self::FIRST),
            now: false,
        }
    }

    /// The wait before the next attempt (jittered); doubles the one after.
    pub fn next(&mut self, max: Duration) -> Duration {
        self.max = max.max(Self::FIRST);
        if std::mem::take(&mut self.now) {
            return Duration::ZERO;
        }
        let d = jittered(self.delay.min(self.max));
        self.delay = (self.delay * 2).min(self.max);
        d
    }

    /// The next attempt goes at once: the peer just showed it is there
    /// (it reset our connection after its restart).
    pub fn at_once(&mut self) {
        self.now = true;
    }

    /// A connection ended after being up for `up`: if that was long
    /// enough, the next attempt goes at once and the waits after it start
    /// again from the first.
    pub fn ended_after(&mut self, up: Duration) {
        if up > Self::STABLE {
            self.delay = Self::FIRST;
            self.now = true;
        }
    }
}

/// `d` ± 20 %.
pub fn jittered(d: Duration) -> Duration {
    let r = rand_core::RngCore::next_u32(&mut rand_core::OsRng) as f64 / u32::MAX as f64;
    d.mul_f64(0.8 + 0.4 * r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }

    #[test]
    fn waits_double_up_to_the_maximum_and_reset_after_a_stable_connection() {
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(max);
        let waits: Vec<Duration> = (0..5).map(|_| b.next(max)).collect();
        let nominal = [1, 2, 4, 5, 5];
        for (w, n) in waits.iter().zip(nominal) {
            let n = Duration::from_secs(n);
            assert!(*w >= n.mul_f64(0.8) && *w <= n.mul_f64(1.2), "{waits:?}");
        }
        b.ended_after(Duration::from_secs(3));
        assert!(b.next(max) >= Duration::from_secs(4));
        b.ended_after(Duration::from_secs(11));
        assert_eq!(b.next(max), Duration::ZERO);
        assert!(b.next(max) <= Duration::from_millis(1200));
    }
}
