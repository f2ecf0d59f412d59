//! Bidirectional proxy: joins a downstream (client) stream to an upstream
//! (server) stream and copies bytes both ways until the connection ends.
//!
//! This module owns the data path every L4 module shares:
//!
//! - **Half-close.** When one side sends EOF, the write half of the other side
//!   is shut down (TCP FIN) and the opposite direction keeps flowing until it
//!   ends too.
//! - **Accounting.** A [`Traffic`] hook hears about every successful write,
//!   so live metrics move during long transfers.
//! - **Idle timeout.** A coarse ticker (a quarter of the timeout) watches an
//!   activity counter; nothing is re-armed per chunk.
//! - **Back-pressure.** Each direction holds at most one buffer of data that
//!   has been read but not yet written.
//! - **Zero-copy on Linux.** When both sides are [`Stream::Tcp`] and
//!   [`ProxyOptions::splice`] is on, a direction's short reads go through a
//!   buffer (a `read` and a `write`: a connection that moves a few bytes
//!   makes no pipe), and its first read that fills that buffer moves it to
//!   `splice(2)` through a kernel pipe for good. Otherwise a plain
//!   `AsyncRead`/`AsyncWrite` copy is used.
//!
//! The raw system calls live in `super::sys`; this file has no `unsafe`.
//!
//! Note: `splice(2)` into a socket whose peer has gone away can raise
//! `SIGPIPE`. Rust binaries ignore `SIGPIPE` by default, which this relies on,
//! as tokio's own socket writes do.
#![forbid(unsafe_code)]

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

/// Byte accounting hook for one joined connection.
///
/// `Flow` implements it; tests use a recorder. Calls come from the task
/// running [`join`], once per successful write, so implementations should be
/// cheap (an atomic add).
pub trait Traffic: Send + Sync {
    /// `n` bytes were written to upstream (moved client to server).
    fn upstream(&self, n: u64);
    /// `n` bytes were written to downstream (moved server to client).
    fn downstream(&self, n: u64);
    /// Data arrived from either side (called after each read, before the
    /// bytes are written on). Does nothing by default.
    fn touch(&self) {}
}

/// Any byte stream the generic copy path can carry (TLS, in-memory, tunnels).
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

/// One side of a joined connection.
pub enum Stream {
    /// A plain TCP socket; two of these can use the `splice(2)` fast path.
    Tcp(TcpStream),
    /// Any other stream, copied through a user-space buffer.
    Io(Box<dyn AsyncStream>),
}

impl Stream {
    /// Wraps any [`AsyncStream`] as [`Stream::Io`].
    pub fn io<S: AsyncStream + 'static>(stream: S) -> Stream {
        Stream::Io(Box::new(stream))
    }

    /// The local address of a kernel socket (`None` for other streams).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Tcp(tcp) => tcp.local_addr().ok(),
            Stream::Io(_) => None,
        }
    }

    /// The stream as a boxed [`AsyncStream`] (for protocols spoken on it).
    pub fn into_io(self) -> Box<dyn AsyncStream> {
        match self {
            Stream::Tcp(tcp) => Box::new(tcp),
            Stream::Io(io) => io,
        }
    }
}

impl Stream {
    /// The stream with `bytes` read from it already put back in front
    /// (what a handshake parser read past its message). No bytes: the
    /// stream itself, fast path intact.
    pub fn prepend(self, bytes: Vec<u8>) -> Stream {
        if bytes.is_empty() {
            return self;
        }
        Stream::io(Prefixed {
            prefix: bytes,
            at: 0,
            inner: self,
        })
    }
}

/// A stream whose first bytes come from a buffer ([`Stream::prepend`]).
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: Stream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reading and writing a [`Stream`] directly (handshakes before the join).
impl AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_read(cx, buf),
            Stream::Io(io) => std::pin::Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_write(cx, data),
            Stream::Io(io) => std::pin::Pin::new(io).poll_write(cx, data),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_flush(cx),
            Stream::Io(io) => std::pin::Pin::new(io).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(t) => std::pin::Pin::new(t).poll_shutdown(cx),
            Stream::Io(io) => std::pin::Pin::new(io).poll_shutdown(cx),
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream::Tcp(tcp)
    }
}

impl From<Box<dyn AsyncStream>> for Stream {
    fn from(io: Box<dyn AsyncStream>) -> Stream {
        Stream::Io(io)
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stream::Tcp(tcp) => f.debug_tuple("Tcp").field(tcp).finish(),
            Stream::Io(_) => f.write_str("Io(..)"),
        }
    }
}

/// How [`join`] copies.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// End the join when no bytes have moved in either direction for this
    /// long. Checked every quarter of the timeout, so the join ends between
    /// `t` and about `1.25 * t` after the last activity. Default: `None`
    /// (never).
    pub idle_timeout: Option<Duration>,
    /// Most bytes buffered per direction by the user-space copy (generic
    /// path, and the TCP path if a pipe cannot be created); a direction
    /// starts with 4 KiB and grows while its reads fill the buffer. The
    /// splice path buffers in its pipe instead (up to 1 MiB). `0` is treated
    /// as `1`. Default: 64 KiB.
    pub buffer_size: usize,
    /// Use `splice(2)` when both sides are TCP (Linux only; ignored
    /// elsewhere). Default: `true`.
    pub splice: bool,
}

/// Default [`ProxyOptions::buffer_size`].
pub const DEFAULT_BUFFER_SIZE: usize = 64 * 1024;

/// The generic path's first buffer per direction: held (idle) connections
/// keep only this; a direction whose reads fill it grows it fourfold at a
/// time up to [`ProxyOptions::buffer_size`].
const FIRST_BUFFER_SIZE: usize = 4 * 1024;
/// The TCP path's first read per direction goes into a buffer this size;
/// a read that fills it (a bulk transfer) moves the direction to a pipe.
const SMALL_READ: usize = 16 * 1024;
/// Size requested for each splice pipe; the kernel may grant less.
const PIPE_SIZE: usize = 1024 * 1024;

/// Shortest idle-check period, so a tiny timeout does not spin.
const MIN_IDLE_TICK: Duration = Duration::from_millis(1);

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            idle_timeout: None,
            buffer_size: DEFAULT_BUFFER_SIZE,
            splice: true,
        }
    }
}

/// Why a join ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinEnd {
    /// Both directions reached EOF and were shut down cleanly.
    Closed,
    /// No bytes moved for [`ProxyOptions::idle_timeout`].
    IdleTimeout,
    /// Reading from or writing to the downstream (client) side failed.
    DownstreamError,
    /// Reading from or writing to the upstream (server) side failed.
    UpstreamError,
}

impl JoinEnd {
    /// Stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinEnd::Closed => "closed",
            JoinEnd::IdleTimeout => "idle_timeout",
            JoinEnd::DownstreamError => "downstream_error",
            JoinEnd::UpstreamError => "upstream_error",
        }
    }
}

impl fmt::Display for JoinEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a finished join did.
#[derive(Debug, Clone, Copy)]
pub struct JoinOutcome {
    /// Bytes written to upstream (client to server).
    pub upstream_bytes: u64,
    /// Bytes written to downstream (server to client).
    pub downstream_bytes: u64,
    /// Why it ended.
    pub end: JoinEnd,
}

/// Copies between `downstream` (the client) and `upstream` (the server)
/// until both directions are done, either side fails, or the idle timeout
/// passes. Both streams are dropped (closed) before this returns; after an
/// error that may reset the other side, which is intended.
///
/// Never panics on I/O errors: they end the join with
/// [`JoinEnd::DownstreamError`] or [`JoinEnd::UpstreamError`] and are
/// logged at debug level.
pub async fn join(
    downstream: Stream,
    upstream: Stream,
    traffic: &dyn Traffic,
    opts: &ProxyOptions,
) -> JoinOutcome {
    let meter = Meter::new(traffic);
    let buffer_size = opts.buffer_size.max(1);
    let end = match (downstream, upstream) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        (Stream::Tcp(down), Stream::Tcp(up)) if opts.splice => {
            let ended = std::sync::atomic::AtomicBool::new(false);
            let copy = async {
                tokio::try_join!(
                    splice::copy(&down, &up, Direction::Upstream, buffer_size, &meter, &ended),
                    splice::copy(
                        &up,
                        &down,
                        Direction::Downstream,
                        buffer_size,
                        &meter,
                        &ended
                    ),
                )
            };
            supervise(copy, &meter, opts.idle_timeout).await
        }
        (down, up) => {
            let (down_read, down_write) = tokio::io::split(down.into_io());
            let (up_read, up_write) = tokio::io::split(up.into_io());
            let copy = async {
                tokio::try_join!(
                    copy_buffered(
                        down_read,
                        up_write,
                        Direction::Upstream,
                        buffer_size,
                        &meter
                    ),
                    copy_buffered(
                        up_read,
                        down_write,
                        Direction::Downstream,
                        buffer_size,
                        &meter
                    ),
                )
            };
            supervise(copy, &meter, opts.idle_timeout).await
        }
    };
    let outcome = JoinOutcome {
        upstream_bytes: meter.upstream.load(Ordering::Relaxed),
        downstream_bytes: meter.downstream.load(Ordering::Relaxed),
        end,
    };
    debug!(
        end = end.as_str(),
        upstream_bytes = outcome.upstream_bytes,
        downstream_bytes = outcome.downstream_bytes,
        "proxy join ended"
    );
    outcome
}

/// Runs both copy directions against the idle timer. Dropping `copy` drops
/// whatever the directions still hold (pipes, buffers, stream halves).
async fn supervise<F>(copy: F, meter: &Meter<'_>, idle_timeout: Option<Duration>) -> JoinEnd
where
    F: Future<Output = Result<((), ()), CopyError>>,
{
    let idle = async {
        match idle_timeout {
            Some(timeout) => meter.idle(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        done = copy => match done {
            Ok(((), ())) => JoinEnd::Closed,
            Err(err) => {
                debug!(error = %err, "proxy direction failed");
                err.reason()
            }
        },
        () = idle => JoinEnd::IdleTimeout,
    }
}

/// Which way bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Downstream to upstream (client to server).
    Upstream,
    /// Upstream to downstream (server to client).
    Downstream,
}

impl Direction {
    /// The side this direction reads from.
    fn source(self) -> Side {
        match self {
            Direction::Upstream => Side::Downstream,
            Direction::Downstream => Side::Upstream,
        }
    }

    /// The side this direction writes to.
    fn sink(self) -> Side {
        match self {
            Direction::Upstream => Side::Upstream,
            Direction::Downstream => Side::Downstream,
        }
    }

    fn read_failed(self, source: io::Error) -> CopyError {
        CopyError {
            side: self.source(),
            op: "read",
            source,
        }
    }

    fn write_failed(self, source: io::Error) -> CopyError {
        CopyError {
            side: self.sink(),
            op: "write",
            source,
        }
    }
}

/// A peer of the join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Downstream,
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        })
    }
}

/// An I/O failure on one side, which ends the join.
#[derive(Debug, thiserror::Error)]
#[error("{op} on {side} failed: {source}")]
struct CopyError {
    side: Side,
    op: &'static str,
    #[source]
    source: io::Error,
}

impl CopyError {
    fn reason(&self) -> JoinEnd {
        match self.side {
            Side::Downstream => JoinEnd::DownstreamError,
            Side::Upstream => JoinEnd::UpstreamError,
        }
    }
}

/// Byte counts and activity for one join, shared by both directions.
struct Meter<'a> {
    traffic: &'a dyn Traffic,
    upstream: AtomicU64,
    downstream: AtomicU64,
    /// Bumped on every read and write; the idle ticker compares snapshots.
    activity: AtomicU64,
}

impl<'a> Meter<'a> {
    fn new(traffic: &'a dyn Traffic) -> Self {
        Meter {
            traffic,
            upstream: AtomicU64::new(0),
            downstream: AtomicU64::new(0),
            activity: AtomicU64::new(0),
        }
    }

    /// Data was read and is about to be written on.
    fn received(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
        self.traffic.touch();
    }

    /// `n` bytes were written in `direction`.
    fn sent(&self, direction: Direction, n: usize) {
        let n = n as u64;
        self.activity.fetch_add(1, Ordering::Relaxed);
        match direction {
            Direction::Upstream => {
                self.upstream.fetch_add(n, Ordering::Relaxed);
                self.traffic.upstream(n);
            }
            Direction::Downstream => {
                self.downstream.fetch_add(n, Ordering::Relaxed);
                self.traffic.downstream(n);
            }
        }
    }

    /// Resolves once no activity has been seen for `timeout`.
    async fn idle(&self, timeout: Duration) {
        let period = (timeout / 4).max(MIN_IDLE_TICK);
        let mut last_active = Instant::now();
        let mut seen = self.activity.load(Ordering::Relaxed);
        let mut ticker = tokio::time::interval_at(last_active + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = Instant::now();
            let current = self.activity.load(Ordering::Relaxed);
            if current != seen {
                seen = current;
                last_active = now;
            } else if now.duration_since(last_active) >= timeout {
                return;
            }
        }
    }
}

/// One direction of the generic path: read a buffer, write all of it, flush,
/// repeat; on EOF shut down the destination's write half.
async fn copy_buffered<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction,
    buffer_size: usize,
    meter: &Meter<'_>,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer_size.min(FIRST_BUFFER_SIZE)];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(direction.read_failed(err)),
        };
        meter.received();
        let grow = n == buf.len() && buf.len() < buffer_size;
        let mut written = 0;
        while written < n {
            match to.write(&buf[written..n]).await {
                Ok(0) => return Err(direction.write_failed(io::ErrorKind::WriteZero.into())),
                Ok(m) => {
                    written += m;
                    meter.sent(direction, m);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(direction.write_failed(err)),
            }
        }
        to.flush()
            .await
            .map_err(|err| direction.write_failed(err))?;
        if grow {
            // A full read: the source has more than the buffer holds.
            buf.resize((buf.len() * 4).min(buffer_size), 0);
        }
    }
    if let Err(err) = to.shutdown().await {
        // The peer may already be gone; the other direction will notice.
        debug!(side = %direction.sink(), error = %err, "proxy half-close failed");
    }
    Ok(())
}

/// The TCP fast path: `splice(2)` through a kernel pipe per direction.
#[cfg(any(target_os = "linux", target_os = "android"))]
mod splice {
    use std::io;
    use std::net::Shutdown;
    use std::os::fd::AsFd;

    use socket2::SockRef;
    use tokio::io::Interest;
    use tokio::net::TcpStream;
    use tracing::debug;

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::{CopyError, Direction, Meter, PIPE_SIZE, SMALL_READ};
    use crate::core::net::sys::{self, Pipe};

    /// Where read-but-unwritten bytes wait: a short read's own buffer (every
    /// direction starts so: a connection that moves a few bytes costs a
    /// `read` and a `write`, no pipe), a pipe once a read fills that buffer
    /// (a bulk transfer: zero-copy from then on), or a user-space buffer if
    /// the pipe could not be created (for example out of descriptors).
    enum Carrier {
        Small(Vec<u8>),
        Pipe(Pipe),
        Buffer(Box<[u8]>),
    }

    impl Carrier {
        /// The carrier a bulk transfer moves to.
        fn bulk(direction: Direction, buffer_size: usize) -> Carrier {
            match Pipe::new(PIPE_SIZE) {
                Ok(pipe) => Carrier::Pipe(pipe),
                Err(err) => {
                    debug!(?direction, error = %err, "no splice pipe, copying through a buffer");
                    Carrier::Buffer(vec![0u8; buffer_size].into_boxed_slice())
                }
            }
        }

        /// Moves what is readable from `from` into the (empty) carrier.
        /// `Ok(0)` is EOF; `WouldBlock` means wait for readiness again.
        fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
            match self {
                Carrier::Small(buf) => {
                    buf.clear();
                    // A short read emptied the socket's queue: say so to
                    // the reactor (as `WouldBlock` would), so the next wait
                    // is for new data rather than a read that finds none.
                    // Data that arrived meanwhile raised a newer readiness
                    // event, which this does not clear.
                    let cap = buf.capacity();
                    let mut got = None;
                    let r = from.try_io(Interest::READABLE, || {
                        let n = sys::recv_into_spare(from.as_fd(), buf)?;
                        got = Some(n);
                        if n > 0 && n < cap {
                            return Err(io::ErrorKind::WouldBlock.into());
                        }
                        Ok(n)
                    });
                    got.map_or(r, Ok)
                }
                Carrier::Pipe(pipe) => from.try_io(Interest::READABLE, || {
                    sys::splice(from.as_fd(), pipe.write_end(), pipe.capacity())
                }),
                Carrier::Buffer(buf) => from.try_read(buf),
            }
        }

        /// Whether a read of `n` bytes filled the carrier: more is waiting.
        fn filled_by(&self, n: usize) -> bool {
            matches!(self, Carrier::Small(buf) if n == buf.capacity())
        }

        /// Writes the `n` bytes the carrier holds to `to`, counting each
        /// partial write. Returns only once the carrier is empty again.
        async fn drain(
            &self,
            to: &TcpStream,
            mut n: usize,
            direction: Direction,
            meter: &Meter<'_>,
        ) -> Result<(), CopyError> {
            let mut offset = 0;
            while n > 0 {
                to.writable()
                    .await
                    .map_err(|err| direction.write_failed(err))?;
                let result = match self {
                    Carrier::Small(buf) => to.try_write(&buf[offset..offset + n]),
                    Carrier::Pipe(pipe) => to.try_io(Interest::WRITABLE, || {
                        sys::splice(pipe.read_end(), to.as_fd(), n)
                    }),
                    Carrier::Buffer(buf) => to.try_write(&buf[offset..offset + n]),
                };
                match result {
                    // The carrier still holds `n` bytes, so 0 means the
                    // destination accepted nothing without saying why.
                    Ok(0) => return Err(direction.write_failed(io::ErrorKind::WriteZero.into())),
                    Ok(m) => {
                        n -= m;
                        offset += m;
                        meter.sent(direction, m);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(direction.write_failed(err)),
                }
            }
            Ok(())
        }
    }

    /// One direction: wait until `from` is readable, read into the carrier,
    /// drain it fully to `to`, repeat; on EOF, send FIN to `to`. Short
    /// reads go through a buffer held only while it has bytes in it (an
    /// idle or interactive connection keeps none); the first read that
    /// fills it moves the direction to a pipe for good.
    pub(super) async fn copy(
        from: &TcpStream,
        to: &TcpStream,
        direction: Direction,
        buffer_size: usize,
        meter: &Meter<'_>,
        ended: &AtomicBool,
    ) -> Result<(), CopyError> {
        let mut carrier: Option<Carrier> = None;
        loop {
            from.readable()
                .await
                .map_err(|err| direction.read_failed(err))?;
            let c = carrier.get_or_insert_with(|| {
                Carrier::Small(Vec::with_capacity(SMALL_READ.min(buffer_size)))
            });
            let n = match c.fill(from) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    // Readiness can be spurious (it is, right after
                    // accept): hold no buffer while waiting.
                    if matches!(c, Carrier::Small(_)) {
                        carrier = None;
                    }
                    continue;
                }
                Err(err) => return Err(direction.read_failed(err)),
            };
            meter.received();
            c.drain(to, n, direction, meter).await?;
            if c.filled_by(n) {
                *c = Carrier::bulk(direction, buffer_size);
            } else if matches!(c, Carrier::Small(_)) {
                carrier = None;
            }
        }
        if ended.swap(true, Ordering::AcqRel) {
            // The other direction ended first: both sockets are closed as
            // soon as this returns, and a close with nothing unread sends
            // the FIN a shutdown would (one system call less per
            // connection; on loopback each FIN is the peer's whole receive
            // path run inline).
            return Ok(());
        }
        if let Err(err) = SockRef::from(to).shutdown(Shutdown::Write) {
            // The peer may already be gone; the other direction will notice.
            debug!(side = %direction.sink(), error = %err, "proxy half-close failed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    /// Counts what [`join`] reports.
    #[derive(Default)]
    struct Recorder {
        upstream: AtomicU64,
        downstream: AtomicU64,
        upstream_calls: AtomicU64,
        downstream_calls: AtomicU64,
        touches: AtomicU64,
    }

    impl Traffic for Recorder {
        fn upstream(&self, n: u64) {
            self.upstream.fetch_add(n, Ordering::Relaxed);
            self.upstream_calls.fetch_add(1, Ordering::Relaxed);
        }
        fn downstream(&self, n: u64) {
            self.downstream.fetch_add(n, Ordering::Relaxed);
            self.downstream_calls.fetch_add(1, Ordering::Relaxed);
        }
        fn touch(&self) {
            self.touches.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Recorder {
        fn totals(&self) -> (u64, u64) {
            (
                self.upstream.load(Ordering::Relaxed),
                self.downstream.load(Ordering::Relaxed),
            )
        }
    }

    /// How the two sides of the join are built.
    #[derive(Debug, Clone, Copy)]
    enum Rig {
        /// TCP both sides, splice on.
        Splice,
        /// TCP both sides, splice off.
        TcpCopy,
        /// In-memory duplex both sides.
        Duplex,
        /// TCP client side, duplex server side (falls back to copying).
        Mixed,
    }

    const ALL_RIGS: [Rig; 4] = [Rig::Splice, Rig::TcpCopy, Rig::Duplex, Rig::Mixed];

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// A joined connection: the client and server ends, and the join task.
    struct Joined {
        client: Box<dyn AsyncStream>,
        server: Box<dyn AsyncStream>,
        recorder: Arc<Recorder>,
        join: tokio::task::JoinHandle<JoinOutcome>,
    }

    async fn start(rig: Rig, idle_timeout: Option<Duration>) -> Joined {
        let (client, downstream): (Box<dyn AsyncStream>, Stream) = match rig {
            Rig::Splice | Rig::TcpCopy | Rig::Mixed => {
                let (client, proxy) = tcp_pair().await;
                (Box::new(client), proxy.into())
            }
            Rig::Duplex => {
                let (client, proxy) = tokio::io::duplex(64 * 1024);
                (Box::new(client), Stream::io(proxy))
            }
        };
        let (server, upstream): (Box<dyn AsyncStream>, Stream) = match rig {
            Rig::Splice | Rig::TcpCopy => {
                let (proxy, server) = tcp_pair().await;
                (Box::new(server), proxy.into())
            }
            Rig::Duplex | Rig::Mixed => {
                let (proxy, server) = tokio::io::duplex(64 * 1024);
                (Box::new(server), Stream::io(proxy))
            }
        };
        let opts = ProxyOptions {
            idle_timeout,
            splice: matches!(rig, Rig::Splice),
            ..ProxyOptions::default()
        };
        let recorder = Arc::new(Recorder::default());
        let traffic = recorder.clone();
        let join = tokio::spawn(async move { join(downstream, upstream, &*traffic, &opts).await });
        Joined {
            client,
            server,
            recorder,
            join,
        }
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Echoes everything back, then half-closes.
    async fn echo(server: Box<dyn AsyncStream>) {
        let (mut read, mut write) = tokio::io::split(server);
        tokio::io::copy(&mut read, &mut write).await.unwrap();
        write.shutdown().await.unwrap();
    }

    /// Writes `data` then half-closes, while reading everything back.
    async fn round_trip(client: Box<dyn AsyncStream>, data: Arc<Vec<u8>>) -> Vec<u8> {
        let (mut read, mut write) = tokio::io::split(client);
        let sender = tokio::spawn(async move {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
            write
        });
        let mut back = Vec::new();
        read.read_to_end(&mut back).await.unwrap();
        drop(sender.await.unwrap());
        back
    }

    const MIB: usize = 1024 * 1024;

    /// Fails the test instead of hanging it when the proxy stalls.
    async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
        match tokio::time::timeout(Duration::from_secs(20), fut).await {
            Ok(out) => out,
            Err(_) => panic!("{what}: timed out"),
        }
    }

    async fn echo_8mib(rig: Rig) {
        bounded(&format!("{rig:?}"), echo_8mib_inner(rig)).await;
    }

    async fn echo_8mib_inner(rig: Rig) {
        let joined = start(rig, Some(Duration::from_secs(30))).await;
        let server = tokio::spawn(echo(joined.server));
        let data = Arc::new(noise(8 * MIB, 0x9e37_79b9_7f4a_7c15));
        let back = round_trip(joined.client, data.clone()).await;
        server.await.unwrap();
        let outcome = joined.join.await.unwrap();

        assert!(back == *data, "{rig:?}: echoed bytes differ");
        assert_eq!(outcome.end, JoinEnd::Closed, "{rig:?}");
        assert_eq!(outcome.upstream_bytes, 8 * MIB as u64, "{rig:?}");
        assert_eq!(outcome.downstream_bytes, 8 * MIB as u64, "{rig:?}");
        let rec = &joined.recorder;
        assert_eq!(rec.totals(), (8 * MIB as u64, 8 * MIB as u64), "{rig:?}");
        // Counted per write, not once at the end.
        assert!(rec.upstream_calls.load(Ordering::Relaxed) > 1, "{rig:?}");
        assert!(rec.downstream_calls.load(Ordering::Relaxed) > 1, "{rig:?}");
        assert!(rec.touches.load(Ordering::Relaxed) > 1, "{rig:?}");
    }

    /// The generic path starts each direction with a small buffer and grows
    /// it while reads fill it: 1 MiB in one go needs far fewer writes than
    /// 4 KiB buffers would (256).
    #[tokio::test]
    async fn generic_copy_buffer_grows_with_bulk_data() {
        let joined = start(Rig::Duplex, None).await;
        let mut server = joined.server;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        let mut client = joined.client;
        client.write_all(&noise(MIB, 7)).await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(bounded("reader", reader).await.unwrap(), MIB);
        let writes = joined.recorder.upstream_calls.load(Ordering::Relaxed);
        assert!(
            writes < 64,
            "{writes} writes for 1 MiB: the buffer did not grow"
        );
        drop(client);
        joined.join.abort();
    }

    #[tokio::test]
    async fn echo_8mib_through_splice() {
        echo_8mib(Rig::Splice).await;
    }

    #[tokio::test]
    async fn echo_8mib_through_tcp_copy() {
        echo_8mib(Rig::TcpCopy).await;
    }

    #[tokio::test]
    async fn echo_8mib_through_duplex() {
        echo_8mib(Rig::Duplex).await;
    }

    #[tokio::test]
    async fn echo_8mib_through_mixed() {
        echo_8mib(Rig::Mixed).await;
    }

    #[tokio::test]
    async fn half_close_lets_the_reply_through() {
        for rig in ALL_RIGS {
            bounded(&format!("{rig:?}"), half_close(rig)).await;
        }
    }

    async fn half_close(rig: Rig) {
        let mut joined = start(rig, None).await;
        let request = b"GET everything\n";
        joined.client.write_all(request).await.unwrap();
        joined.client.shutdown().await.unwrap();

        // The server sees EOF only because the proxy forwarded the FIN.
        let mut got = Vec::new();
        joined.server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request, "{rig:?}");

        // Its write half is still open: a large reply gets through.
        let reply = noise(MIB + 17, 7);
        let mut back = Vec::new();
        let (written, read) = tokio::join!(
            async {
                joined.server.write_all(&reply).await?;
                joined.server.shutdown().await
            },
            joined.client.read_to_end(&mut back)
        );
        written.unwrap();
        read.unwrap();
        assert!(back == reply, "{rig:?}: reply truncated or corrupted");

        let outcome = joined.join.await.unwrap();
        assert_eq!(outcome.end, JoinEnd::Closed, "{rig:?}");
        assert_eq!(outcome.upstream_bytes, request.len() as u64, "{rig:?}");
        assert_eq!(outcome.downstream_bytes, reply.len() as u64, "{rig:?}");
    }

    /// Reads until EOF or error; true if the stream ended within a second.
    async fn sees_close(stream: &mut Box<dyn AsyncStream>) -> bool {
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut sink))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn idle_timeout_ends_the_join_and_closes_both_peers() {
        for rig in ALL_RIGS {
            let mut joined = start(rig, Some(Duration::from_millis(200))).await;
            // Some traffic first, so the timeout counts from the last byte.
            joined.client.write_all(b"ping").await.unwrap();
            let mut ping = [0u8; 4];
            joined.server.read_exact(&mut ping).await.unwrap();
            let quiet_since = Instant::now();

            let outcome = tokio::time::timeout(Duration::from_secs(5), joined.join)
                .await
                .expect("idle join did not end")
                .unwrap();
            let idle = quiet_since.elapsed();
            assert_eq!(outcome.end, JoinEnd::IdleTimeout, "{rig:?}");
            assert!(
                idle >= Duration::from_millis(190),
                "{rig:?}: ended after {idle:?}"
            );
            assert!(
                idle < Duration::from_millis(1000),
                "{rig:?}: ended after {idle:?}"
            );
            assert!(sees_close(&mut joined.client).await, "{rig:?}: client");
            assert!(sees_close(&mut joined.server).await, "{rig:?}: server");
        }
    }

    #[tokio::test]
    async fn steady_trickle_is_not_idle() {
        for rig in [Rig::Splice, Rig::Duplex] {
            bounded(&format!("{rig:?}"), trickle(rig)).await;
        }
    }

    async fn trickle(rig: Rig) {
        let mut joined = start(rig, Some(Duration::from_millis(200))).await;
        let mut byte = [0u8; 1];
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            joined.client.write_all(b"x").await.unwrap();
            joined.server.read_exact(&mut byte).await.unwrap();
        }
        assert!(
            !joined.join.is_finished(),
            "{rig:?}: timed out while active"
        );
        joined.client.shutdown().await.unwrap();
        joined.server.shutdown().await.unwrap();
        let outcome = joined.join.await.unwrap();
        assert_eq!(outcome.end, JoinEnd::Closed, "{rig:?}");
        assert_eq!(outcome.upstream_bytes, 8, "{rig:?}");
    }

    /// Short reads meet a destination that takes no more (its peer reads
    /// nothing for a while): the bytes it could not take wait and go out
    /// later, in order, with none lost or repeated.
    #[tokio::test]
    async fn short_reads_wait_for_a_slow_reader() {
        let (mut client, down) = tcp_pair().await;
        let (up, mut server) = tcp_pair().await;
        // Small buffers between the proxy and the server fill after a
        // few kilobytes.
        socket2::SockRef::from(&up)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&server)
            .set_recv_buffer_size(4096)
            .unwrap();
        let recorder = Arc::new(Recorder::default());
        let traffic = recorder.clone();
        let join = tokio::spawn(async move {
            join(down.into(), up.into(), &*traffic, &ProxyOptions::default()).await
        });
        // 1,000-byte writes a millisecond apart: each read is short.
        let data = noise(100_000, 7);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(1000) {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client.shutdown().await.unwrap();
            client
        });
        // The server reads nothing until the proxy's writes must have
        // blocked (the two buffers hold far less than what is sent by then).
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut got = Vec::new();
        bounded(
            "reading through the slow reader",
            server.read_to_end(&mut got),
        )
        .await
        .unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes lost, repeated or reordered");
        let _client = writer.await.unwrap();
        server.shutdown().await.unwrap();
        let outcome = bounded("join end", join).await.unwrap();
        assert_eq!(outcome.end, JoinEnd::Closed);
        assert_eq!(outcome.upstream_bytes, data.len() as u64);
        assert_eq!(recorder.upstream.load(Ordering::Relaxed), data.len() as u64);
    }

    #[tokio::test]
    async fn upstream_reset_is_an_upstream_error() {
        for splice in [true, false] {
            let (client, proxy_down) = tcp_pair().await;
            let (proxy_up, server) = tcp_pair().await;
            let opts = ProxyOptions {
                splice,
                ..ProxyOptions::default()
            };
            let recorder = Recorder::default();
            let reset = async {
                // Linger 0 makes close send RST instead of FIN.
                socket2::SockRef::from(&server)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(server);
            };
            let (outcome, ()) = bounded("reset", async {
                tokio::join!(
                    join(proxy_down.into(), proxy_up.into(), &recorder, &opts),
                    reset
                )
            })
            .await;
            assert_eq!(outcome.end, JoinEnd::UpstreamError, "splice={splice}");
            let mut client: Box<dyn AsyncStream> = Box::new(client);
            assert!(sees_close(&mut client).await, "splice={splice}");
        }
    }

    #[tokio::test]
    async fn generic_path_reads_at_most_one_buffer_ahead() {
        // Client and server pipes hold 4 KiB each; the proxy holds one buffer.
        let (mut client, proxy_down) = tokio::io::duplex(4096);
        let (proxy_up, _server) = tokio::io::duplex(4096);
        let opts = ProxyOptions {
            buffer_size: 8192,
            ..ProxyOptions::default()
        };
        let recorder = Arc::new(Recorder::default());
        let traffic = recorder.clone();
        let _join = tokio::spawn(async move {
            join(
                Stream::io(proxy_down),
                Stream::io(proxy_up),
                &*traffic,
                &opts,
            )
            .await
        });
        // The server never reads: the client must stall after about
        // 4 KiB (its pipe) + 8 KiB (proxy buffer) + 4 KiB (server pipe).
        let chunk = [0u8; 1024];
        let mut sent = 0;
        while let Ok(written) =
            tokio::time::timeout(Duration::from_millis(200), client.write(&chunk)).await
        {
            sent += written.unwrap();
            assert!(sent <= 64 * 1024, "proxy keeps reading without writing");
        }
        assert!(sent <= 4096 + 8192 + 4096, "client got {sent} bytes in");
        assert_eq!(recorder.upstream.load(Ordering::Relaxed), 4096);
    }

    #[test]
    fn join_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let recorder = Recorder::default();
        let opts = ProxyOptions::default();
        let (a, b) = tokio::io::duplex(1);
        let fut = join(Stream::io(a), Stream::io(b), &recorder, &opts);
        assert_send(&fut);
    }

    #[test]
    fn end_reason_names() {
        let names: Vec<_> = [
            JoinEnd::Closed,
            JoinEnd::IdleTimeout,
            JoinEnd::DownstreamError,
            JoinEnd::UpstreamError,
        ]
        .iter()
        .map(|r| r.to_string())
        .collect();
        assert_eq!(
            names,
            [
                "closed",
                "idle_timeout",
                "downstream_error",
                "upstream_error"
            ]
        );
    }

    /// Set in the child process that runs the descriptor-leak probe alone.
    const FD_PROBE_ENV: &str = "MESHGATE_PROXY_FD_PROBE";

    fn open_fds() -> Vec<String> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .collect()
    }

    fn pipe_fds() -> usize {
        open_fds().iter().filter(|t| t.starts_with("pipe:")).count()
    }

    /// Descriptors are per process and tests run in parallel threads, so the
    /// count is taken in a child process that runs only this test.
    #[tokio::test]
    async fn no_fd_leak_through_splice() {
        if std::env::var_os(FD_PROBE_ENV).is_some() {
            bounded("fd probe", fd_probe()).await;
            return;
        }
        let path = concat!(module_path!(), "::no_fd_leak_through_splice");
        let name = path.split_once("::").map_or(path, |(_crate, rest)| rest);
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(FD_PROBE_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "fd probe failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }

    async fn fd_probe() {
        let before = open_fds().len();
        let pipes_before = pipe_fds();
        for i in 0..50 {
            let mut joined = start(Rig::Splice, None).await;
            if i == 0 {
                // No pipes while idle, none for a few bytes each way; one
                // for a direction once a bulk transfer moves through it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert_eq!(pipe_fds(), pipes_before, "pipes created before any data");
                joined.client.write_all(b"up").await.unwrap();
                let mut buf = [0u8; 2];
                joined.server.read_exact(&mut buf).await.unwrap();
                joined.server.write_all(b"dn").await.unwrap();
                joined.client.read_exact(&mut buf).await.unwrap();
                assert_eq!(pipe_fds(), pipes_before, "a pipe for two bytes");
                let bulk = noise(1 << 20, 7);
                let (mut c, mut sv) = (joined.client, joined.server);
                let (w, r) = tokio::join!(c.write_all(&bulk), async {
                    let mut got = vec![0u8; bulk.len()];
                    sv.read_exact(&mut got).await.map(|_| got)
                });
                w.unwrap();
                assert!(r.unwrap() == bulk, "bulk bytes changed on the way");
                assert_eq!(
                    pipe_fds(),
                    pipes_before + 2,
                    "splice path not taken for bulk"
                );
                joined.client = c;
                joined.server = sv;
            }
            let server = tokio::spawn(echo(joined.server));
            let back = round_trip(joined.client, Arc::new(noise(100_000, i + 1))).await;
            assert_eq!(back.len(), 100_000);
            server.await.unwrap();
            assert_eq!(joined.join.await.unwrap().end, JoinEnd::Closed);
        }
        // Everything above was awaited; allow the runtime a moment anyway.
        let mut after = open_fds().len();
        for _ in 0..20 {
            if after == before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            after = open_fds().len();
        }
        assert_eq!(after, before, "descriptors leaked: {:?}", open_fds());
    }
}
