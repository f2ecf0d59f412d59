//! TCP sequence numbers: 32-bit, compared modulo 2^32 (RFC 793 §3.3).

use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, Sub};

/// A sequence number. Ordering is circular: `a < b` when `b` is less than
/// 2^31 ahead of `a`, which holds for any two numbers inside one window.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Seq(pub u32);

impl Seq {
    /// The larger of two numbers (circularly).
    pub fn max(self, other: Seq) -> Seq {
        if self < other {
            other
        } else {
            self
        }
    }

    /// The smaller of two numbers (circularly).
    pub fn min(self, other: Seq) -> Seq {
        if self < other {
            self
        } else {
            other
        }
    }
}

impl PartialOrd for Seq {
    fn partial_cmp(&self, other: &Seq) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Seq {
    fn cmp(&self, other: &Seq) -> Ordering {
        (self.0.wrapping_sub(other.0) as i32).cmp(&0)
    }
}

impl Add<usize> for Seq {
    type Output = Seq;
    fn add(self, n: usize) -> Seq {
        Seq(self.0.wrapping_add(n as u32))
    }
}

impl Sub<usize> for Seq {
    type Output = Seq;
    fn sub(self, n: usize) -> Seq {
        Seq(self.0.wrapping_sub(n as u32))
    }
}

/// The distance `self - earlier`, which must not be negative.
impl Sub<Seq> for Seq {
    type Output = usize;
    fn sub(self, earlier: Seq) -> usize {
        let d = self.0.wrapping_sub(earlier.0) as i32;
        debug_assert!(
            d >= 0,
            "sequence distance is negative: {} - {}",
            self.0,
            earlier.0
        );
        d.max(0) as usize
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_wraps() {
        let a = Seq(u32::MAX - 10);
        let b = a + 20;
        assert_eq!(b.0, 9);
        assert!(a < b);
        assert_eq!(b - a, 20);
        assert_eq!(a.max(b), b);
        assert_eq!(a.min(b), a);
        assert_eq!(b - 20, a);
    }
}
