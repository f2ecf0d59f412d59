//! The receive side's buffer: a ring that holds the bytes not yet read and,
//! past them, segments that arrived out of order, kept as a sorted list of
//! ranges (as many holes as the window has room for, up to
//! [`MAX_RANGES`]). It says which SACK blocks to report.
//!
//! The window offered starts at [`INITIAL_LIMIT`] and grows towards the
//! configured capacity when the sender fills it (the connection's owner
//! calls [`RecvBuffer::grow_limit`], as Linux's receive-buffer autotuning
//! does). Memory is taken only as bytes wait: the ring starts small and
//! doubles when a segment lands beyond its end, so a connection whose
//! reader keeps up holds a small ring whatever its window.

use super::seq::Seq;

/// Out-of-order ranges kept; a segment that would make one more is dropped
/// (the sender retransmits it).
pub const MAX_RANGES: usize = 256;

/// The ring's first allocation.
const INITIAL_RING: usize = 16 * 1024;
/// The first window offered (or the capacity, if smaller).
pub const INITIAL_LIMIT: usize = 1024 * 1024;

pub struct RecvBuffer {
    ring: Vec<u8>,
    /// The most bytes it may ever hold.
    capacity: usize,
    /// The most it holds now (the window when empty); grows, never shrinks.
    limit: usize,
    /// Ring index of the first unread byte.
    head: usize,
    /// Unread bytes, in order, from `head`.
    len: usize,
    /// Next byte expected: the first one after the unread bytes.
    pub nxt: Seq,
    /// Received ranges beyond `nxt`, sorted, disjoint, not touching.
    ooo: Vec<(Seq, Seq)>,
    /// The range the latest out-of-order segment went into (reported first).
    recent: Option<Seq>,
}

/// What one [`RecvBuffer::insert`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// Bytes that became readable (`nxt` moved this far).
    pub advanced: usize,
    /// The segment (or part of it) landed beyond a hole, or was a
    /// duplicate: the sender should hear about it at once.
    pub out_of_order: bool,
    /// The segment was dropped for lack of room or ranges.
    pub dropped: bool,
}

impl RecvBuffer {
    pub fn new(capacity: usize, nxt: Seq) -> Self {
        RecvBuffer {
            ring: Vec::new(),
            capacity: capacity.max(1),
            limit: capacity.clamp(1, INITIAL_LIMIT),
            head: 0,
            len: 0,
            nxt,
            ooo: Vec::new(),
            recent: None,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of memory the ring holds now.
    pub fn allocated(&self) -> usize {
        self.ring.len()
    }

    /// Bytes ready to read.
    pub fn readable(&self) -> usize {
        self.len
    }

    /// Room from `nxt` on: the window to advertise.
    pub fn window(&self) -> usize {
        self.limit - self.len
    }

    /// The window when empty, now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Offers up to `limit` bytes from now on (never less than before,
    /// never more than the capacity).
    pub fn grow_limit(&mut self, limit: usize) {
        self.limit = self.limit.max(limit.min(self.capacity));
    }

    /// Lowers the window offered when empty. Only for a window not yet
    /// offered (a window once offered may not shrink).
    pub fn lower_unoffered_limit(&mut self, limit: usize) {
        self.limit = self.limit.min(limit.max(1));
    }

    /// Forgets the data received beyond a hole (SACKed data reneged, RFC
    /// 2018 §8: the sender keeps it until acknowledged cumulatively);
    /// with nothing left to read the ring's memory goes too.
    pub fn drop_out_of_order(&mut self) {
        self.ooo.clear();
        self.recent = None;
        if self.len == 0 {
            self.ring = Vec::new();
            self.head = 0;
        }
    }

    /// Are there holes (data beyond `nxt`)?
    pub fn has_holes(&self) -> bool {
        !self.ooo.is_empty()
    }

    /// Stores `data` that starts at `seq`; what lies outside
    /// `[nxt, nxt + window)` is cut off.
    pub fn insert(&mut self, seq: Seq, data: &[u8]) -> Inserted {
        let mut out = Inserted::default();
        let end = seq + data.len();
        let limit = self.nxt + self.window();
        if end <= self.nxt {
            // An old duplicate: acknowledge again at once.
            out.out_of_order = !data.is_empty();
            return out;
        }
        let (mut seq, mut data) = (seq, data);
        if seq < self.nxt {
            let skip = self.nxt - seq;
            data = &data[skip..];
            seq = self.nxt;
        }
        if seq >= limit {
            out.dropped = true;
            return out;
        }
        if seq + data.len() > limit {
            data = &data[..limit - seq];
        }
        let end = seq + data.len();
        if seq > self.nxt {
            out.out_of_order = true;
            if !self.add_range(seq, end) {
                out.dropped = true;
                return out;
            }
            self.write_at(seq, data);
            self.recent = Some(seq);
            return out;
        }
        self.write_at(seq, data);
        let mut new_nxt = end;
        // Ranges now reached are readable too.
        let mut merged = 0;
        for &(l, r) in &self.ooo {
            if l > new_nxt {
                break;
            }
            new_nxt = new_nxt.max(r);
            merged += 1;
        }
        if merged > 0 {
            self.ooo.drain(..merged);
            // Filling a hole is news for the sender.
            out.out_of_order = true;
        }
        out.advanced = new_nxt - self.nxt;
        self.len += out.advanced;
        self.nxt = new_nxt;
        out
    }

    /// Records `[l, r)` in the sorted range list; false if that would need
    /// more than [`MAX_RANGES`] ranges.
    fn add_range(&mut self, l: Seq, r: Seq) -> bool {
        let i = self.ooo.partition_point(|&(_, re)| re < l);
        let mut j = i;
        let (mut nl, mut nr) = (l, r);
        while j < self.ooo.len() && self.ooo[j].0 <= r {
            nl = nl.min(self.ooo[j].0);
            nr = nr.max(self.ooo[j].1);
            j += 1;
        }
        if i == j && self.ooo.len() >= MAX_RANGES {
            return false;
        }
        self.ooo.splice(i..j, std::iter::once((nl, nr)));
        true
    }

    fn write_at(&mut self, seq: Seq, data: &[u8]) {
        let need = self.len + (seq - self.nxt) + data.len();
        if need > self.ring.len() {
            self.grow(need);
        }
        let cap = self.ring.len();
        let at = (self.head + self.len + (seq - self.nxt)) % cap;
        let first = data.len().min(cap - at);
        self.ring[at..at + first].copy_from_slice(&data[..first]);
        self.ring[..data.len() - first].copy_from_slice(&data[first..]);
    }

    /// Makes the ring at least `need` bytes (doubling, up to the
    /// capacity), its contents moved to start at index 0.
    fn grow(&mut self, need: usize) {
        let size = need
            .max(INITIAL_RING)
            .max(self.ring.len() * 2)
            .min(self.capacity);
        let mut ring = vec![0u8; size];
        let old = self.ring.len();
        if old > 0 {
            ring[..old - self.head].copy_from_slice(&self.ring[self.head..]);
            ring[old - self.head..old].copy_from_slice(&self.ring[..self.head]);
        }
        self.ring = ring;
        self.head = 0;
    }

    /// Gives the ring's memory back if nothing waits in it; true if it
    /// held any.
    pub fn shrink(&mut self) -> bool {
        if self.len > 0 || !self.ooo.is_empty() || self.ring.is_empty() {
            return false;
        }
        self.ring = Vec::new();
        self.ooo = Vec::new();
        self.head = 0;
        true
    }

    /// Is there memory [`shrink`](Self::shrink) would give back?
    pub fn can_shrink(&self) -> bool {
        self.len == 0 && self.ooo.is_empty() && !self.ring.is_empty()
    }

    /// Copies readable bytes into `buf`; returns how many.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() && self.len > 0 {
            let chunk = self.peek();
            let n = chunk.len().min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&chunk[..n]);
            self.consume(n);
            done += n;
        }
        done
    }

    /// The readable bytes up to the end of the ring (call again after
    /// [`consume`](Self::consume) for the rest).
    pub fn peek(&self) -> &[u8] {
        let n = self.len.min(self.ring.len() - self.head);
        &self.ring[self.head..self.head + n]
    }

    /// Marks `n` readable bytes as read.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        if n == 0 {
            return;
        }
        self.head = (self.head + n) % self.ring.len();
        self.len -= n;
        if self.len == 0 && self.ooo.is_empty() {
            self.head = 0;
        }
    }

    /// SACK blocks to send, at most `max`: the range holding the latest
    /// out-of-order segment first (RFC 2018), then the others from the
    /// highest down (the ones a sender learns least about otherwise).
    pub fn sack_blocks(&self, max: usize, out: &mut [(Seq, Seq)]) -> usize {
        let mut n = 0;
        let first = self
            .recent
            .and_then(|s| self.ooo.iter().position(|&(l, r)| l <= s && s < r));
        if let Some(i) = first {
            if n < max {
                out[n] = self.ooo[i];
                n += 1;
            }
        }
        for (i, &range) in self.ooo.iter().enumerate().rev() {
            if n >= max {
                break;
            }
            if Some(i) != first {
                out[n] = range;
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(b: &mut RecvBuffer) -> Vec<u8> {
        let mut out = vec![0u8; b.readable()];
        let n = b.read(&mut out);
        out.truncate(n);
        out
    }

    #[test]
    fn in_order_and_wrapping() {
        let mut b = RecvBuffer::new(10, Seq(u32::MAX - 2));
        assert_eq!(b.insert(Seq(u32::MAX - 2), b"abcdef").advanced, 6);
        assert_eq!(b.window(), 4);
        assert_eq!(read_all(&mut b), b"abcdef");
        // Wraps around the ring's end and the sequence space.
        assert_eq!(b.insert(Seq(3), b"ghijklmn").advanced, 8);
        assert_eq!(read_all(&mut b), b"ghijklmn");
        assert_eq!(b.nxt, Seq(11));
    }

    #[test]
    fn holes_fill_in_any_order() {
        let data: Vec<u8> = (0..200u8).collect();
        let mut b = RecvBuffer::new(256, Seq(1000));
        // Every other 10-byte piece first, then the rest backwards.
        for i in (1..20).step_by(2) {
            let r = b.insert(Seq(1000 + i * 10), &data[i as usize * 10..][..10]);
            assert!(r.out_of_order && r.advanced == 0);
        }
        let mut blocks = [(Seq(0), Seq(0)); 4];
        assert_eq!(b.sack_blocks(4, &mut blocks), 4);
        assert_eq!(blocks[0], (Seq(1190), Seq(1200)), "the latest first");
        for i in (0..20).step_by(2).rev() {
            b.insert(Seq(1000 + i * 10), &data[i as usize * 10..][..10]);
        }
        assert!(!b.has_holes());
        assert_eq!(read_all(&mut b), data);
    }

    #[test]
    fn overlaps_duplicates_and_window_edges() {
        let mut b = RecvBuffer::new(16, Seq(0));
        b.insert(Seq(4), b"efgh");
        b.insert(Seq(2), b"cdefgh"); // overlaps the range
        assert!(b.insert(Seq(0), b"").advanced == 0);
        let r = b.insert(Seq(0), b"abcd");
        assert_eq!(r.advanced, 8);
        assert!(
            b.insert(Seq(0), b"ab").out_of_order,
            "a duplicate is acknowledged at once"
        );
        // Beyond the window: cut.
        let r = b.insert(Seq(8), b"0123456789ABCDEFGH");
        assert_eq!(r.advanced, 8);
        assert_eq!(b.window(), 0);
        assert!(b.insert(Seq(16), b"x").dropped);
        assert_eq!(read_all(&mut b), b"abcdefgh01234567");
    }

    #[test]
    fn memory_grows_with_what_waits_not_with_the_window() {
        let cap = 1 << 20;
        let mut b = RecvBuffer::new(cap, Seq(0));
        assert_eq!(b.window(), cap.min(INITIAL_LIMIT));
        assert_eq!(b.allocated(), 0);
        // A reader that keeps up: the ring stays at its first size.
        let chunk = vec![7u8; 1400];
        let mut seq = Seq(0);
        let mut out = vec![0u8; 1 << 16];
        for _ in 0..10_000 {
            b.insert(seq, &chunk);
            seq = seq + chunk.len();
            assert_eq!(b.read(&mut out), chunk.len());
        }
        assert_eq!(b.allocated(), INITIAL_RING);
        // A hole far ahead grows it; data wrapped in the old ring survives.
        b.insert(seq, b"abc");
        let far = seq + 100_000;
        b.insert(far, b"xyz");
        assert!(b.allocated() >= 100_003 && b.allocated() <= cap);
        let filler = vec![1u8; 100_000 - 3];
        b.insert(seq + 3, &filler);
        let mut all = vec![0u8; 100_003];
        assert_eq!(b.read(&mut all), 100_003);
        assert_eq!(&all[..3], b"abc");
        assert_eq!(&all[100_000..], b"xyz");
    }

    #[test]
    fn the_window_starts_at_the_initial_limit_and_grows_to_the_capacity() {
        let mut b = RecvBuffer::new(8 * INITIAL_LIMIT, Seq(0));
        assert_eq!(b.window(), INITIAL_LIMIT);
        assert!(
            b.insert(Seq(INITIAL_LIMIT as u32), b"x").dropped,
            "beyond the window"
        );
        b.grow_limit(2 * INITIAL_LIMIT);
        assert_eq!(b.window(), 2 * INITIAL_LIMIT);
        b.grow_limit(INITIAL_LIMIT);
        assert_eq!(b.limit(), 2 * INITIAL_LIMIT, "never shrinks");
        b.grow_limit(usize::MAX);
        assert_eq!(b.limit(), 8 * INITIAL_LIMIT, "never past the capacity");
        assert!(!b.insert(Seq(INITIAL_LIMIT as u32), b"x").dropped);
    }

    #[test]
    fn range_limit_drops_instead_of_growing() {
        let mut b = RecvBuffer::new(1 << 16, Seq(0));
        for i in 0..MAX_RANGES {
            assert!(!b.insert(Seq(2 + 4 * i as u32), b"x").dropped);
        }
        assert!(b.insert(Seq(2 + 4 * MAX_RANGES as u32), b"x").dropped);
        // Extending an existing range is still fine.
        assert!(!b.insert(Seq(3), b"x").dropped);
    }
}
