//! Names the namespace's programs looked up, each given an address from
//! a reserved range (198.18.0.0/15, RFC 2544's, as "fake-IP" resolvers
//! use) by the DNS stub; a connection to that address is dialed by the
//! name, so the tenant's vnet resolves it where its route says (`hosts:`,
//! its `dns:` server, the far side of a gateway link) and policy sees the
//! name. Bounded: the oldest name gives its address up when the range is
//! used up.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

/// The first address of the range.
const FIRST: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// The range's size (a /15).
const SIZE: u32 = 1 << 17;

/// Whether `ip` is in the range names are given addresses from.
pub fn is_synthetic(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).wrapping_sub(FIRST) < SIZE,
        IpAddr::V6(_) => false,
    }
}

/// The table of names and their addresses.
pub struct Names {
    inner: Mutex<Table>,
    capacity: u32,
}

struct Table {
    by_name: HashMap<String, u32>,
    by_index: HashMap<u32, String>,
    next: u32,
}

impl Names {
    /// An empty table over the whole range.
    pub fn new() -> Self {
        Self::with_capacity(SIZE - 2)
    }

    /// An empty table giving out at most `capacity` addresses (at least 1)
    /// before it reuses the oldest.
    pub fn with_capacity(capacity: u32) -> Self {
        Names {
            inner: Mutex::new(Table {
                by_name: HashMap::new(),
                by_index: HashMap::new(),
                next: 0,
            }),
            capacity: capacity.clamp(1, SIZE - 2),
        }
    }

    /// The address of `name`: the one it has, else the next one (taken
    /// from the oldest name once all are given out).
    pub fn address_for(&self, name: &str) -> Ipv4Addr {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = t.by_name.get(name) {
            return Self::ip(*i);
        }
        let i = t.next;
        t.next = (t.next + 1) % self.capacity;
        if let Some(old) = t.by_index.remove(&i) {
            t.by_name.remove(&old);
        }
        t.by_name.insert(name.to_string(), i);
        t.by_index.insert(i, name.to_string());
        Self::ip(i)
    }

    /// The name `ip` was given to, if it still is.
    pub fn name_of(&self, ip: IpAddr) -> Option<String> {
        if !is_synthetic(ip) {
            return None;
        }
        let IpAddr::V4(v4) = ip else { return None };
        let i = u32::from(v4) - FIRST;
        let index = i.checked_sub(1)?;
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        t.by_index.get(&index).cloned()
    }

    /// How many names hold an address.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_name
            .len()
    }

    /// Whether no name holds an address.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index `i` as an address: 198.18.0.1 is the first (.0.0 is the
    /// range's network address).
    fn ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(FIRST + 1 + i)
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_address_and_map_back() {
        let n = Names::new();
        let a = n.address_for("nginx");
        let b = n.address_for("db.corp");
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
        assert_ne!(a, b);
        assert_eq!(n.address_for("nginx"), a);
        assert_eq!(n.name_of(a.into()).as_deref(), Some("nginx"));
        assert_eq!(n.name_of(b.into()).as_deref(), Some("db.corp"));
        assert_eq!(n.name_of(Ipv4Addr::new(198, 18, 0, 9).into()), None);
        assert_eq!(n.name_of(Ipv4Addr::new(198, 18, 0, 0).into()), None);
        assert_eq!(n.name_of(Ipv4Addr::new(10, 0, 0, 1).into()), None);
        assert!(is_synthetic(Ipv4Addr::new(198, 19, 255, 255).into()));
        assert!(!is_synthetic(Ipv4Addr::new(198, 20, 0, 0).into()));
        assert!(!is_synthetic(Ipv4Addr::new(198, 17, 255, 255).into()));
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn the_oldest_name_gives_its_address_up_when_all_are_taken() {
        let n = Names::with_capacity(2);
        let a = n.address_for("a");
        let b = n.address_for("b");
        let c = n.address_for("c");
        assert_eq!(c, a, "c takes a's address");
        assert_eq!(n.name_of(a.into()).as_deref(), Some("c"));
        assert_eq!(n.name_of(b.into()).as_deref(), Some("b"));
        assert_eq!(n.len(), 2);
        // a asks again: a new address (b's, the oldest now).
        assert_eq!(n.address_for("a"), b);
    }
}
