//! What every gateway link (`ssh_link`, `h2_link`, `quic_link`) shares:
//! its reconnect waits ([`Backoff`]: first 1 s, then doubling up to a
//! maximum, each wait jittered by ±20 % so a fleet does not reconnect in
//! step; after a connection that stayed up for [`Backoff::STABLE`] the
//! first attempt goes at once and the waits start again at 1 s), the state
//! its status shows ([`LinkStatus`]), and its `meshgate_link_*` series
//! ([`LinkMetrics`]: up, reconnects, RTT where the transport measures one,
//! flows; labels `tenant`, `instance`, `transport`).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::metrics::{registered, Subsystem};

/// A link's state as its status shows it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LinkStatus {
    /// Whether a connection is up.
    pub connected: bool,
    /// Unix time the current connection came up.
    pub up_since: Option<u64>,
    /// Connections made after the first.
    pub reconnects: u64,
    /// Why the last attempt failed or the last connection ended.
    pub last_error: Option<String>,
}

impl LinkStatus {
    /// A connection came up, the `made`-th before it (0: the first).
    pub fn up(&mut self, made: u64) {
        self.connected = true;
        self.up_since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        self.reconnects = made;
        self.last_error = None;
    }
}

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

/// How one connection of a link ended.
#[derive(Debug, Default)]
pub struct Ended {
    /// Why, for the status and the log (`None`: no reason given).
    pub error: Option<String>,
    /// The peer showed it is there (it reset our connection after its
    /// restart): the next attempt goes at once.
    pub peer_up: bool,
    /// Other connections of the link are still up (a pool): the link
    /// stays connected while this one comes back.
    pub others_up: bool,
}

/// A link's transport, as [`keep_up`] drives it.
#[async_trait]
pub trait Connect: Send + Sync {
    /// One connection.
    type Conn: Send + Sync;
    /// The link in logs (`h2 link`).
    fn what(&self) -> &'static str;
    /// The longest wait between attempts, as configured now.
    fn backoff_max(&self) -> Duration;
    /// One attempt to connect.
    async fn open(&self) -> Result<Self::Conn, String>;
    /// Runs while `conn` is up (offering it to dials, measuring it) and
    /// says how it ended.
    async fn hold(&self, conn: &Self::Conn) -> Ended;
    /// The link stops while `conn` is up: close it.
    async fn close(&self, conn: Self::Conn);
}

/// Keeps a link connected until `stop`: an attempt, then while it is up
/// [`Connect::hold`], and after a failure or an end the next attempt after
/// [`Backoff`]'s wait; the status and the `meshgate_link_*` series follow.
pub async fn keep_up<C: Connect>(
    link: &C,
    status: &Mutex<LinkStatus>,
    metrics: &LinkSeries,
    (tenant, instance): (&str, &str),
    stop: &CancellationToken,
) {
    let status = || status.lock().unwrap_or_else(|e| e.into_inner());
    let what = link.what();
    let mut backoff = Backoff::new(link.backoff_max());
    let mut made = 0u64;
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = link.open() => r,
        };
        match attempt {
            Ok(conn) => {
                let since = Instant::now();
                status().up(made);
                metrics.connected(made > 0);
                made += 1;
                tracing::info!(%tenant, %instance, "{what} up");
                let ended = tokio::select! {
                    _ = stop.cancelled() => None,
                    e = link.hold(&conn) => Some(e),
                };
                let Some(ended) = ended else {
                    status().connected = false;
                    metrics.down();
                    link.close(conn).await;
                    return;
                };
                {
                    let mut st = status();
                    st.connected = ended.others_up;
                    if ended.error.is_some() {
                        st.last_error = ended.error.clone();
                    }
                }
                if !ended.others_up {
                    metrics.down();
                }
                tracing::warn!(%tenant, %instance, up_for = ?since.elapsed(), reason = ?ended.error, "{what} connection ended; reconnecting");
                backoff.ended_after(since.elapsed());
                if ended.peer_up {
                    backoff.at_once();
                }
            }
            Err(e) => {
                tracing::warn!(%tenant, %instance, error = %e, "{what}: cannot connect");
                status().last_error = Some(e);
            }
        }
        let wait = backoff.next(link.backoff_max());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// `tenant`, `instance`, `transport`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// Tenant name.
    pub tenant: String,
    /// The link's instance name.
    pub instance: String,
    /// `ssh`, `h2` or `quic`.
    pub transport: String,
}

/// The link families of the node.
pub struct LinkMetrics {
    /// 1 while the link has a connection up.
    pub up: Family<LinkLabels, Gauge>,
    /// Connections made after the first.
    pub reconnects: Family<LinkLabels, Counter>,
    /// The last smoothed round-trip time, in microseconds (QUIC).
    pub rtt: Family<LinkLabels, Gauge>,
    /// Flows the link carried (streams or channels opened).
    pub flows: Family<LinkLabels, Counter>,
}

impl Subsystem for LinkMetrics {
    const PREFIX: &'static str = "link";

    fn register(registry: &mut Registry) -> Self {
        LinkMetrics {
            up: registered(registry, "up", "1 while the gateway link is connected"),
            reconnects: registered(
                registry,
                "reconnects",
                "Gateway link connections made after the first",
            ),
            rtt: registered(
                registry,
                "rtt_microseconds",
                "The gateway link's smoothed round-trip time (QUIC)",
            ),
            flows: registered(registry, "flows", "Flows a gateway link carried"),
        }
    }
}

/// One link's series, resolved once.
#[derive(Clone, Debug, Default)]
pub struct LinkSeries {
    up: Gauge,
    reconnects: Counter,
    rtt: Gauge,
    flows: Counter,
}

impl LinkMetrics {
    /// The series of `tenant`/`instance` over `transport`.
    pub fn series(&self, tenant: &str, instance: &str, transport: &str) -> LinkSeries {
        let l = LinkLabels {
            tenant: tenant.into(),
            instance: instance.into(),
            transport: transport.into(),
        };
        LinkSeries {
            up: self.up.get_or_create(&l).clone(),
            reconnects: self.reconnects.get_or_create(&l).clone(),
            rtt: self.rtt.get_or_create(&l).clone(),
            flows: self.flows.get_or_create(&l).clone(),
        }
    }
}

impl LinkSeries {
    /// A connection came up; `reconnect` if it is not the first.
    pub fn connected(&self, reconnect: bool) {
        self.up.set(1);
        if reconnect {
            self.reconnects.inc();
        }
    }

    /// The connection is down.
    pub fn down(&self) {
        self.up.set(0);
    }

    /// The round-trip time now.
    pub fn rtt(&self, rtt: std::time::Duration) {
        self.rtt.set(rtt.as_micros().min(i64::MAX as u128) as i64);
    }

    /// A flow went over the link.
    pub fn flow(&self) {
        self.flows.inc();
    }
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
