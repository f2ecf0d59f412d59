//! Many WireGuard instances on one UDP port (`share_port: true`), of one
//! tenant or of many: one socket, one firewall rule, one NAT mapping.
//!
//! A datagram carries no tenant, so the port finds the instance it is for
//! from the protocol itself ([`Router`], no I/O):
//! - handshake responses, cookie replies and data (types 2-4) name a
//!   receiver index whose upper 24 bits are the session index of one of
//!   the instance's peers. Session indices are drawn port-wide (random,
//!   redrawn on collision, a freed one quarantined for ten minutes so a
//!   late datagram never reaches the index's next owner), so the index
//!   names the instance.
//! - initiations (type 1) carry MAC1, a keyed BLAKE2s of the message under
//!   the responder's public key: it cannot be looked up, only checked, one
//!   instance at a time. The instance the same source matched last is
//!   checked first (a hint: anyone who knows the public key can compute
//!   MAC1, so a spoofed hint only changes the order of the search); then
//!   every instance, each check spent from a port-wide budget
//!   ([`SCAN_RATE`] a second), each source starting at most
//!   [`SCANS_PER_SOURCE`] scans a second. No match, or no budget: dropped
//!   and counted.
//!
//! What a routed datagram meets then is its instance's own
//! [`Core`](super::core::Core): the
//! per-source handshake budget, cookies under load, peer keys, cryptokey
//! routing. Two instances with the same key cannot share a port (their
//! initiations would be indistinguishable): the second is refused.
//!
//! The port lives while an instance holds a [`Membership`]; an instance
//! leaves on shutdown, and its session indices go to quarantine.
//!
//! Counters, labelled by `port` (an unrouted datagram belongs to no
//! tenant): `meshgate_wg_port_unrouted_datagrams_total{reason}`
//! (`malformed`, `unknown_index`, `no_mac1_match`, `scan_budget`,
//! `scan_rate`, `instance_gone`), initiations, MAC1 checks, hint hits,
//! members.
//!
//! Not built: cookies at the port (an initiation's instance is known only
//! after its scan, so a flood from spoofed sources spends the scan budget
//! and un-hinted clients wait; hinted ones are not affected), and several
//! sockets per port with `SO_REUSEPORT` (one receive task serves every
//! instance on the port).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::device::{read_datagrams, Datagrams, Device};
use super::metrics::{PortLabels, PortReasonLabels, WgMetrics};
use crate::core::metrics::Metrics;

/// MAC1 checks a port may spend a second on initiations no hint routes
/// (about a quarter of a core at 0.5 µs a check, `bench/port.sh`).
pub const SCAN_RATE: f64 = 500_000.0;
/// Scans one source address may start a second, and its burst: one
/// source cannot take the port's budget from the others.
const SCANS_PER_SOURCE: f64 = 2.0;
const SCAN_BURST: f64 = 4.0;
/// A freed session index is not drawn again for this long (longer than a
/// session lives: REJECT_AFTER_TIME × 3).
const QUARANTINE: Duration = Duration::from_secs(600);
/// Sources whose last match is remembered; the table starts over when full.
const HINTS_MAX: usize = 65_536;

/// The length of a handshake initiation, and where its MAC1 lies.
const INITIATION_LEN: usize = 148;
const MAC1_AT: usize = 116;

/// The MAC1 key of a responder: `HASH("mac1----" || public key)`.
pub fn mac1_key(public: &[u8; 32]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, b"mac1----");
    Digest::update(&mut h, public);
    h.finalize().into()
}

/// MAC1 of the message before it, under a responder's MAC1 key.
fn mac1(key: &[u8; 32], initiation: &[u8]) -> [u8; 16] {
    let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(key).expect("a 32-byte key");
    Mac::update(&mut mac, &initiation[..MAC1_AT]);
    mac.finalize_fixed().into()
}

/// Whether `initiation`'s MAC1 was made for the responder whose MAC1 key
/// ([`mac1_key`]) is `key`.
pub fn mac1_matches(key: &[u8; 32], initiation: &[u8]) -> bool {
    mac1(key, initiation)[..] == initiation[MAC1_AT..MAC1_AT + 16]
}

/// Writes the MAC1 a sender to `public` puts in an initiation (148 bytes):
/// what routes it on a shared port (benchmarks and tests).
pub fn stamp_mac1(public: &[u8; 32], initiation: &mut [u8]) {
    let tag = mac1(&mac1_key(public), initiation);
    initiation[MAC1_AT..MAC1_AT + 16].copy_from_slice(&tag);
}

/// Where a datagram goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<T> {
    /// To this member.
    To(T),
    /// Nowhere, for this reason (a counter label).
    Unrouted(&'static str),
}

struct Member<T> {
    mac1_key: [u8; 32],
    public: [u8; 32],
    target: Option<T>,
    sessions: HashSet<u32>,
}

/// A member as a scan sees it: kept in one contiguous list, so a scan of
/// 100,000 costs its MAC1 checks and little more.
struct Scanned {
    id: u64,
    mac1_key: [u8; 32],
}

/// Who gets what arrives on one shared port: members, their session
/// indices, hints and the scan budget. No socket, no clock of its own.
pub struct Router<T> {
    members: HashMap<u64, Member<T>>,
    by_key: HashMap<[u8; 32], u64>,
    /// Members in the order a scan checks them.
    order: Vec<Scanned>,
    sessions: HashMap<u32, u64>,
    quarantine: HashMap<u32, Instant>,
    hints: HashMap<IpAddr, u64>,
    /// Each source's scans: tokens and when they were last counted.
    scanners: HashMap<IpAddr, (f64, Instant)>,
    tokens: f64,
    refilled: Instant,
    rate: f64,
    next_id: u64,
}

/// Why a member cannot join.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    /// Another member has the same public key.
    #[error("another instance on this shared port has the same key")]
    SameKey,
}

impl<T: Clone> Router<T> {
    /// An empty router spending at most `rate` MAC1 checks a second on
    /// scans.
    pub fn new(now: Instant, rate: f64) -> Router<T> {
        Router {
            members: HashMap::new(),
            by_key: HashMap::new(),
            order: Vec::new(),
            sessions: HashMap::new(),
            quarantine: HashMap::new(),
            hints: HashMap::new(),
            scanners: HashMap::new(),
            tokens: rate,
            refilled: now,
            rate,
            next_id: 1,
        }
    }

    /// Adds the member with this public key; its target follows
    /// ([`Router::attach`]): until then it is skipped.
    pub fn join(&mut self, public: &[u8; 32]) -> Result<u64, JoinError> {
        if self.by_key.contains_key(public) {
            return Err(JoinError::SameKey);
        }
        let id = self.next_id;
        self.next_id += 1;
        let key = mac1_key(public);
        self.members.insert(
            id,
            Member {
                mac1_key: key,
                public: *public,
                target: None,
                sessions: HashSet::new(),
            },
        );
        self.by_key.insert(*public, id);
        self.order.push(Scanned { id, mac1_key: key });
        Ok(id)
    }

    /// Where a member's datagrams go.
    pub fn attach(&mut self, id: u64, target: T) {
        if let Some(m) = self.members.get_mut(&id) {
            m.target = Some(target);
        }
    }

    /// Removes a member; its session indices go to quarantine.
    pub fn leave(&mut self, id: u64, now: Instant) {
        let Some(m) = self.members.remove(&id) else {
            return;
        };
        self.order.retain(|m| m.id != id);
        self.by_key.remove(&m.public);
        for s in m.sessions {
            self.sessions.remove(&s);
            self.quarantine.insert(s, now + QUARANTINE);
        }
    }

    /// How many members share the port.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no member is left.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A session index for a new peer of member `id`: drawn by `draw`
    /// (24 random bits) until one is free port-wide and out of quarantine.
    pub fn new_session(&mut self, id: u64, now: Instant, mut draw: impl FnMut() -> u32) -> u32 {
        loop {
            let candidate = draw() & 0x00ff_ffff;
            if self.sessions.contains_key(&candidate) {
                continue;
            }
            match self.quarantine.get(&candidate) {
                Some(until) if *until > now => continue,
                Some(_) => {
                    self.quarantine.remove(&candidate);
                }
                None => {}
            }
            self.sessions.insert(candidate, id);
            if let Some(m) = self.members.get_mut(&id) {
                m.sessions.insert(candidate);
            }
            return candidate;
        }
    }

    /// A member's peer no longer uses `session`.
    pub fn release_session(&mut self, id: u64, session: u32, now: Instant) {
        if self.sessions.get(&session) != Some(&id) {
            return;
        }
        self.sessions.remove(&session);
        if let Some(m) = self.members.get_mut(&id) {
            m.sessions.remove(&session);
        }
        if self.quarantine.len() >= HINTS_MAX {
            self.quarantine.retain(|_, until| *until > now);
        }
        self.quarantine.insert(session, now + QUARANTINE);
    }

    /// The member `datagram` from `src` is for, and how many MAC1 checks
    /// finding it took.
    pub fn route(&mut self, now: Instant, datagram: &[u8], src: SocketAddr) -> (Route<T>, u32) {
        let index_at = match (datagram.first(), datagram.len()) {
            (Some(1), INITIATION_LEN) => return self.route_initiation(now, datagram, src),
            (Some(2), 92) => 8,
            (Some(3), 64) => 4,
            (Some(4), n) if n >= 32 => 4,
            _ => return (Route::Unrouted("malformed"), 0),
        };
        let receiver = u32::from_le_bytes(
            datagram[index_at..index_at + 4]
                .try_into()
                .expect("four bytes"),
        );
        let route = match self.sessions.get(&(receiver >> 8)) {
            Some(id) => self.target(*id),
            None => Route::Unrouted("unknown_index"),
        };
        (route, 0)
    }

    fn target(&self, id: u64) -> Route<T> {
        match self.members.get(&id).and_then(|m| m.target.clone()) {
            Some(t) => Route::To(t),
            None => Route::Unrouted("instance_gone"),
        }
    }

    /// Takes a scan token of `ip` ([`SCANS_PER_SOURCE`]).
    fn may_scan(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self.scanners.len() >= HINTS_MAX && !self.scanners.contains_key(&ip) {
            // Forget sources whose bucket has refilled: they lose nothing.
            let full = SCAN_BURST / SCANS_PER_SOURCE;
            self.scanners
                .retain(|_, (_, last)| now.saturating_duration_since(*last).as_secs_f64() < full);
            if self.scanners.len() >= HINTS_MAX {
                return false;
            }
        }
        let (tokens, last) = self.scanners.entry(ip).or_insert((SCAN_BURST, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * SCANS_PER_SOURCE)
            .min(SCAN_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn route_initiation(
        &mut self,
        now: Instant,
        datagram: &[u8],
        src: SocketAddr,
    ) -> (Route<T>, u32) {
        let mut checks = 0;
        let hinted = self.hints.get(&src.ip()).copied();
        if let Some(id) = hinted {
            if let Some(m) = self.members.get(&id) {
                checks += 1;
                if mac1_matches(&m.mac1_key, datagram) {
                    return (self.target(id), checks);
                }
            }
        }
        if !self.may_scan(now, src.ip()) {
            return (Route::Unrouted("scan_rate"), checks);
        }
        self.tokens = (self.tokens
            + now.saturating_duration_since(self.refilled).as_secs_f64() * self.rate)
            .min(self.rate);
        self.refilled = now;
        let mut found = None;
        for m in &self.order {
            if Some(m.id) == hinted {
                continue;
            }
            if self.tokens < 1.0 {
                return (Route::Unrouted("scan_budget"), checks);
            }
            self.tokens -= 1.0;
            checks += 1;
            if mac1_matches(&m.mac1_key, datagram) {
                found = Some(m.id);
                break;
            }
        }
        let Some(id) = found else {
            return (Route::Unrouted("no_mac1_match"), checks);
        };
        if self.hints.len() >= HINTS_MAX {
            self.hints.clear();
        }
        self.hints.insert(src.ip(), id);
        (self.target(id), checks)
    }
}

/// Ports shared in this process.
static PORTS: Mutex<Option<HashMap<u16, Weak<SharedPort>>>> = Mutex::new(None);

/// A UDP port shared by several instances.
pub struct SharedPort {
    port: u16,
    socket: Arc<UdpSocket>,
    dual_stack: bool,
    router: Mutex<Router<Weak<Device>>>,
    cancel: CancellationToken,
    metrics: PortMetrics,
}

/// The port's pre-resolved series.
struct PortMetrics {
    wg: Arc<WgMetrics>,
    label: PortLabels,
    initiations: Counter,
    mac1_checks: Counter,
    hint_hits: Counter,
    members: Gauge,
}

impl PortMetrics {
    fn unrouted(&self, reason: &str) {
        self.wg
            .port_unrouted
            .get_or_create(&PortReasonLabels {
                port: self.label.port.clone(),
                reason: reason.into(),
            })
            .inc();
    }
}

impl Drop for SharedPort {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.metrics.wg.port_members.remove(&self.metrics.label);
    }
}

/// One instance's place on a shared port; leaving (or dropping it) frees
/// its session indices.
pub struct Membership {
    port: Arc<SharedPort>,
    id: u64,
    left: AtomicBool,
}

/// Why an instance cannot share a port.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The port cannot be bound.
    #[error(transparent)]
    Bind(#[from] std::io::Error),
    /// Another instance on it has the same key.
    #[error(transparent)]
    Join(#[from] JoinError),
}

/// Joins the shared port `port` as the instance with public key `public`,
/// binding it if no instance holds it yet.
pub fn join(port: u16, public: &[u8; 32], metrics: &Metrics) -> Result<Membership, ShareError> {
    let mut ports = PORTS.lock().expect("poisoned");
    let ports = ports.get_or_insert_with(HashMap::new);
    let shared = match ports.get(&port).and_then(Weak::upgrade) {
        Some(p) => p,
        None => {
            let p = SharedPort::bind(port, metrics)?;
            ports.insert(port, Arc::downgrade(&p));
            p
        }
    };
    let id = {
        let mut router = shared.router.lock().expect("poisoned");
        let id = router.join(public)?;
        shared.metrics.members.set(router.len() as i64);
        id
    };
    ports.retain(|_, p| p.strong_count() > 0);
    Ok(Membership {
        port: shared,
        id,
        left: AtomicBool::new(false),
    })
}

impl SharedPort {
    fn bind(port: u16, metrics: &Metrics) -> std::io::Result<Arc<SharedPort>> {
        let (socket, dual_stack) = super::device::bind_udp(port)?;
        let socket = Arc::new(socket);
        let wg = metrics.subsystem::<WgMetrics>();
        let label = PortLabels {
            port: port.to_string(),
        };
        let shared = Arc::new(SharedPort {
            port,
            socket: socket.clone(),
            dual_stack,
            router: Mutex::new(Router::new(Instant::now(), SCAN_RATE)),
            cancel: CancellationToken::new(),
            metrics: PortMetrics {
                initiations: wg.port_initiations.get_or_create_owned(&label),
                mac1_checks: wg.port_mac1_checks.get_or_create_owned(&label),
                hint_hits: wg.port_hint_hits.get_or_create_owned(&label),
                members: wg.port_members.get_or_create_owned(&label),
                wg,
                label,
            },
        });
        tokio::spawn(receive(
            Arc::downgrade(&shared),
            socket,
            shared.cancel.clone(),
        ));
        tracing::info!(port, "shared WireGuard port bound");
        Ok(shared)
    }

    /// Routes one datagram to its instance.
    fn route(&self, now: Instant, datagram: &[u8], src: SocketAddr) -> Option<Arc<Device>> {
        let (route, checks) = self
            .router
            .lock()
            .expect("poisoned")
            .route(now, datagram, src);
        if datagram.first() == Some(&1) && datagram.len() == INITIATION_LEN {
            self.metrics.initiations.inc();
            self.metrics.mac1_checks.inc_by(checks.into());
            if checks == 1 && matches!(route, Route::To(_)) {
                self.metrics.hint_hits.inc();
            }
        }
        match route {
            Route::To(dev) => match dev.upgrade() {
                Some(dev) => Some(dev),
                None => {
                    self.metrics.unrouted("instance_gone");
                    None
                }
            },
            Route::Unrouted(reason) => {
                tracing::trace!(port = self.port, reason, "datagram routed to no instance");
                self.metrics.unrouted(reason);
                None
            }
        }
    }
}

impl Membership {
    /// The shared socket.
    pub fn socket(&self) -> Arc<UdpSocket> {
        self.port.socket.clone()
    }

    /// Whether the socket is dual-stack (IPv4 as mapped IPv6).
    pub fn dual_stack(&self) -> bool {
        self.port.dual_stack
    }

    /// From now on the instance's datagrams go to `dev`.
    pub fn attach(&self, dev: Weak<Device>) {
        self.port
            .router
            .lock()
            .expect("poisoned")
            .attach(self.id, dev);
    }

    /// A session index free on the whole port.
    pub fn new_session(&self) -> u32 {
        self.port
            .router
            .lock()
            .expect("poisoned")
            .new_session(self.id, Instant::now(), || {
                rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> 8
            })
    }

    /// A peer's session index is free again (after quarantine).
    pub fn release_session(&self, session: u32) {
        self.port.router.lock().expect("poisoned").release_session(
            self.id,
            session,
            Instant::now(),
        );
    }

    /// Leaves the port (once; dropping the membership does too).
    pub fn leave(&self) {
        if self.left.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut router = self.port.router.lock().expect("poisoned");
        router.leave(self.id, Instant::now());
        self.port.metrics.members.set(router.len() as i64);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The port's receive task: reads datagrams (GRO batches split), routes
/// each to its instance, which processes it as its own socket's.
async fn receive(port: Weak<SharedPort>, socket: Arc<UdpSocket>, cancel: CancellationToken) {
    /// The port while it lives, and the instances a batch reached.
    struct Routing {
        port: Weak<SharedPort>,
        touched: Vec<Arc<Device>>,
    }
    impl Datagrams for Routing {
        fn datagram(&mut self, now: Instant, d: &[u8], src: SocketAddr, out: &mut [u8]) -> bool {
            let Some(shared) = self.port.upgrade() else {
                return false;
            };
            let Some(dev) = shared.route(now, d, src) else {
                return true;
            };
            // A bug in one instance fails that instance (its module
            // restarts it), not the port and its other instances.
            let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dev.receive(now, d, src, out)
            }));
            if let Err(panic) = handled {
                dev.fail(super::device::panic_message(panic));
                return true;
            }
            if !self.touched.iter().any(|t| Arc::ptr_eq(t, &dev)) {
                self.touched.push(dev);
            }
            true
        }
        fn batch_end(&mut self) {
            // What each engine held back of this batch.
            for dev in self.touched.drain(..) {
                dev.flush_delivered();
            }
        }
    }
    let mut routing = Routing {
        port,
        touched: Vec::new(),
    };
    read_datagrams(&socket, &cancel, &mut routing).await
}

#[cfg(test)]
#[path = "port_tests.rs"]
mod tests;
