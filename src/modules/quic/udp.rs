//! UDP flows over QUIC: a `quic_link`'s datagram sockets and the `quic`
//! door's side of them, in the wire format of MASQUE (RFC 9298 over RFC
//! 9297), on a meshgate tunnel connection.
//!
//! Each remote a link's socket talks to is one request stream, `GET
//! /.well-known/masque/udp/HOST/PORT/ HTTP/1.1` with `upgrade:
//! connect-udp` and `capsule-protocol: ?1`, answered `101` (or a refusal
//! as for CONNECT). The door routes and checks it as a UDP flow of the
//! link's identity (vnet, policy, audit) and binds a socket through the
//! route. Datagrams then travel as QUIC DATAGRAM frames (RFC 9221) of
//! `quarter stream ID, context 0, payload`; one too large for the path's
//! datagram size goes as a DATAGRAM capsule on the request stream instead,
//! so nothing is dropped for size. The flow ends when either side closes
//! the stream, or after [`UDP_IDLE`] without a datagram.
//!
//! Budgets: a connection's UDP flows count among its streams
//! (`max_streams`), each queues at most [`QUEUE`] datagrams (more are
//! dropped and counted as `udp_queue_full`), a capsule is at most
//! [`MAX_CAPSULE`] bytes, and QUIC's own datagram buffer bounds the rest.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::addr::HostPort;
use crate::core::net::datagram::DatagramSocket;

/// The `upgrade` token of a UDP request (RFC 9298).
pub const PROTOCOL: &str = "connect-udp";

/// A UDP flow ends after this long without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// Datagrams queued per flow, each way.
pub const QUEUE: usize = 256;

/// The largest capsule read (a UDP payload is at most 65,527 bytes).
pub const MAX_CAPSULE: u64 = 65_536;

/// The request path for `target` (RFC 9298's default template; IPv6
/// colons percent-encoded).
pub fn path_for(target: SocketAddr) -> String {
    let host = target.ip().to_string().replace(':', "%3A");
    format!("/.well-known/masque/udp/{host}/{}/", target.port())
}

/// The target a UDP request's path names.
pub fn target_of(path: &str) -> Option<HostPort> {
    let rest = path.strip_prefix("/.well-known/masque/udp/")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.split_once('/')?;
    let host = host.replace("%3A", ":").replace("%3a", ":");
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty()
        || host.len() > 253
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
    {
        return None;
    }
    Some(HostPort { host, port })
}

/// Appends a QUIC variable-length integer (RFC 9000 §16).
fn put_varint(out: &mut BytesMut, v: u64) {
    match v {
        0..=63 => out.put_u8(v as u8),
        64..=16_383 => out.put_u16(0x4000 | v as u16),
        16_384..=1_073_741_823 => out.put_u32(0x8000_0000 | v as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// Reads a QUIC variable-length integer: its value and length.
fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    let bytes = b.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for x in &bytes[1..] {
        v = (v << 8) | u64::from(*x);
    }
    Some((v, len))
}

/// A DATAGRAM frame's payload: quarter stream ID, context 0, the UDP
/// payload.
pub fn datagram(quarter: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 9);
    put_varint(&mut b, quarter);
    put_varint(&mut b, 0);
    b.put_slice(payload);
    b.freeze()
}

/// The quarter stream ID and UDP payload of a DATAGRAM frame (`None`: not
/// one, or another context, which RFC 9298 says to drop).
pub fn parse_datagram(b: &[u8]) -> Option<(u64, &[u8])> {
    let (quarter, n) = get_varint(b)?;
    let (context, m) = get_varint(&b[n..])?;
    (context == 0).then(|| (quarter, &b[n + m..]))
}

/// A DATAGRAM capsule (type 0) carrying `payload` with context 0.
fn capsule(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    put_varint(&mut b, 0);
    put_varint(&mut b, payload.len() as u64 + 1);
    put_varint(&mut b, 0);
    b.put_slice(payload);
    b.freeze()
}

/// Reads capsules from a request stream, passing the UDP payload of each
/// DATAGRAM capsule to `deliver` (others are skipped, as RFC 9297 says).
/// Ends at the stream's end or an error; capsules over [`MAX_CAPSULE`] end
/// it too.
pub async fn read_capsules<R, F>(recv: &mut R, mut pending: Vec<u8>, mut deliver: F)
where
    R: tokio::io::AsyncRead + Unpin,
    F: FnMut(&[u8]),
{
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Whole capsules in what was read.
        while let Some((ty, a)) = get_varint(&pending) {
            let Some((len, b)) = get_varint(&pending[a..]) else {
                break;
            };
            if len > MAX_CAPSULE {
                return;
            }
            let end = a + b + len as usize;
            if pending.len() < end {
                break;
            }
            if ty == 0 {
                if let Some((0, c)) = get_varint(&pending[a + b..end]) {
                    deliver(&pending[a + b + c..end]);
                }
            }
            pending.drain(..end);
        }
        match recv.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends one UDP payload on a flow: as a DATAGRAM frame when it fits the
/// path, else as a capsule on the request stream.
async fn send_one(
    conn: &quinn::Connection,
    stream: &tokio::sync::Mutex<quinn::SendStream>,
    quarter: u64,
    payload: &[u8],
) -> io::Result<()> {
    let frame = datagram(quarter, payload);
    if conn
        .max_datagram_size()
        .is_some_and(|max| frame.len() <= max)
    {
        match conn.send_datagram(frame) {
            Ok(()) => return Ok(()),
            Err(quinn::SendDatagramError::TooLarge) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::NotConnected, e)),
        }
    }
    stream
        .lock()
        .await
        .write_all(&capsule(payload))
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))
}

/// The quarter stream ID of the link's health datagrams (no stream has
/// it: stream IDs are below 2^62). A request (first byte 0) is echoed by
/// the door as an answer (first byte 1): an answer received proves the
/// path works both ways, which QUIC's idle timer alone does not (packets
/// from the other side keep it going while ours are dropped).
pub const HEALTH: u64 = (1 << 62) - 1;

/// A health request (see [`HEALTH`]).
pub fn health_request() -> Bytes {
    datagram(HEALTH, &[0])
}

/// The flows of one connection, by quarter stream ID: where their
/// datagrams go; and when a health answer last came.
#[derive(Default)]
pub struct Demux {
    flows: Mutex<HashMap<u64, mpsc::Sender<Vec<u8>>>>,
    answered: Mutex<Option<tokio::time::Instant>>,
}

impl Demux {
    fn insert(&self, quarter: u64, tx: mpsc::Sender<Vec<u8>>) {
        self.flows.lock().expect("poisoned").insert(quarter, tx);
    }

    fn remove(&self, quarter: u64) {
        self.flows.lock().expect("poisoned").remove(&quarter);
    }

    /// When the last health answer came (`None`: none yet).
    pub fn answered(&self) -> Option<tokio::time::Instant> {
        *self.answered.lock().expect("poisoned")
    }

    /// Reads the connection's datagrams until it closes, handing each to
    /// its flow (health requests are answered); `full` is called for one
    /// dropped because its flow's queue is full.
    pub async fn run(&self, conn: &quinn::Connection, full: impl Fn()) {
        while let Ok(d) = conn.read_datagram().await {
            let Some((quarter, payload)) = parse_datagram(&d) else {
                continue;
            };
            if quarter == HEALTH {
                match payload.first() {
                    Some(0) => {
                        let _ = conn.send_datagram(datagram(HEALTH, &[1]));
                    }
                    Some(1) => {
                        *self.answered.lock().expect("poisoned") = Some(tokio::time::Instant::now())
                    }
                    _ => {}
                }
                continue;
            }
            let tx = self.flows.lock().expect("poisoned").get(&quarter).cloned();
            if let Some(tx) = tx {
                if tx.try_send(payload.to_vec()).is_err() {
                    full();
                }
            }
        }
    }
}

// ---- the door's side ----

/// The door's end of a UDP flow, as the socket that answers the client
/// ([`OnRamp::relay_datagrams`](crate::core::spine::onramp::OnRamp::relay_datagrams)'s
/// `reply`): every answer goes back on the flow.
pub struct Reply {
    conn: quinn::Connection,
    stream: tokio::sync::Mutex<quinn::SendStream>,
    quarter: u64,
}

#[async_trait]
impl DatagramSocket for Reply {
    async fn send_to(&self, data: &[u8], _to: SocketAddr) -> io::Result<usize> {
        send_one(&self.conn, &self.stream, self.quarter, data).await?;
        Ok(data.len())
    }
    async fn recv_from(&self, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        std::future::pending().await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// The door's end of an accepted UDP request: the reply socket, and the
/// client's datagrams (frames through `demux`, capsules from the stream)
/// until either ends. Dropping the returned guard withdraws it from `demux`.
pub fn door_flow(
    conn: &quinn::Connection,
    demux: &Arc<Demux>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    rest: Vec<u8>,
) -> (Arc<Reply>, mpsc::Receiver<Vec<u8>>, DemuxGuard) {
    let quarter = u64::from(send.id()) >> 2;
    let (tx, rx) = mpsc::channel(QUEUE);
    demux.insert(quarter, tx.clone());
    let stop = CancellationToken::new();
    let (until, capsules, flows) = (stop.clone(), tx, demux.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = read_capsules(&mut recv, rest, |p| { let _ = capsules.try_send(p.to_vec()); }) => {}
            _ = until.cancelled() => return,
        }
        // The link closed the stream (or the connection went): the flow's
        // queue closes, so the relay ends.
        flows.remove(quarter);
    });
    let reply = Arc::new(Reply {
        conn: conn.clone(),
        stream: tokio::sync::Mutex::new(send),
        quarter,
    });
    (
        reply,
        rx,
        DemuxGuard {
            demux: demux.clone(),
            quarter,
            _stop: stop.drop_guard(),
        },
    )
}

/// Withdraws a flow from its connection's [`Demux`] when dropped.
pub struct DemuxGuard {
    demux: Arc<Demux>,
    quarter: u64,
    _stop: tokio_util::sync::DropGuard,
}

impl Drop for DemuxGuard {
    fn drop(&mut self) {
        self.demux.remove(self.quarter);
    }
}

impl Reply {
    /// Writes the answer head on the flow's stream.
    pub async fn answer(&self, head: &[u8]) -> io::Result<()> {
        self.stream
            .lock()
            .await
            .write_all(head)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))
    }

    /// Ends the flow's stream (the link then opens another for its next
    /// datagram).
    pub async fn finish(&self) {
        let _ = self.stream.lock().await.finish();
    }
}

// ---- the link's side ----

/// One remote of a link's socket: its request stream and quarter ID.
struct Tunnel {
    conn: quinn::Connection,
    stream: tokio::sync::Mutex<quinn::SendStream>,
    quarter: u64,
    /// Cancelled when the flow ends (either side).
    ended: CancellationToken,
}

/// What a link offers its sockets: the connection now, its demux, and how
/// long opening a flow may take.
pub trait Carrier: Send + Sync + 'static {
    /// The connection up now, and its demux.
    fn carrier(&self) -> Option<(quinn::Connection, Arc<Demux>)>;
    /// How long the far side has to answer a UDP request.
    fn open_timeout(&self) -> Duration;
    /// The host name sent in requests.
    fn authority(&self) -> String;
}

/// A `quic_link`'s datagram socket: one UDP flow on the far node per remote
/// it sends to, answers tagged with their remote.
pub struct LinkSocket {
    carrier: Arc<dyn Carrier>,
    tunnels: tokio::sync::Mutex<HashMap<SocketAddr, Arc<Tunnel>>>,
    answers_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    answers: tokio::sync::Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
    closed: CancellationToken,
}

impl LinkSocket {
    /// A socket over `carrier`'s connections.
    pub fn new(carrier: Arc<dyn Carrier>) -> Arc<LinkSocket> {
        let (answers_tx, answers) = mpsc::channel(QUEUE);
        Arc::new(LinkSocket {
            carrier,
            tunnels: Default::default(),
            answers_tx,
            answers: tokio::sync::Mutex::new(answers),
            closed: CancellationToken::new(),
        })
    }

    /// The flow to `to`: the open one, or a new request.
    async fn tunnel(&self, to: SocketAddr) -> io::Result<Arc<Tunnel>> {
        let mut tunnels = self.tunnels.lock().await;
        if let Some(t) = tunnels.get(&to) {
            if !t.ended.is_cancelled() {
                return Ok(t.clone());
            }
        }
        tunnels.retain(|_, t| !t.ended.is_cancelled());
        let (conn, demux) = self
            .carrier
            .carrier()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the quic link is down"))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e))?;
        let head = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nconnection: upgrade\r\nupgrade: {PROTOCOL}\r\ncapsule-protocol: ?1\r\n\r\n",
            path_for(to),
            self.carrier.authority()
        );
        let answer = async {
            send.write_all(head.as_bytes())
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
            super::read_head(&mut recv)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionAborted, e))
        };
        let (resp, rest) = tokio::time::timeout(self.carrier.open_timeout(), answer)
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "no answer to the UDP request")
            })??;
        let resp = super::link::parse_response(&resp).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the answer is not a status line",
            )
        })?;
        if resp.code != 101 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "{to}: the other node answered {} {}",
                    resp.code, resp.reason
                ),
            ));
        }
        let quarter = u64::from(send.id()) >> 2;
        let ended = self.closed.child_token();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        demux.insert(quarter, tx.clone());
        let t = Arc::new(Tunnel {
            conn: conn.clone(),
            stream: tokio::sync::Mutex::new(send),
            quarter,
            ended: ended.clone(),
        });
        let answers = self.answers_tx.clone();
        tokio::spawn(async move {
            let reader = read_capsules(&mut recv, rest, |p| {
                let _ = tx.try_send(p.to_vec());
            });
            let forward = async {
                while let Some(p) = rx.recv().await {
                    if answers.send((to, p)).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = reader => {}
                _ = forward => {}
                _ = ended.cancelled() => {}
                _ = conn.closed() => {}
            }
            demux.remove(quarter);
            ended.cancel();
        });
        tunnels.insert(to, t.clone());
        Ok(t)
    }
}

impl Drop for LinkSocket {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

#[async_trait]
impl DatagramSocket for LinkSocket {
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let t = self.tunnel(to).await?;
        send_one(&t.conn, &t.stream, t.quarter, data).await?;
        Ok(data.len())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (from, d) = tokio::select! {
            a = async { self.answers.lock().await.recv().await } => a.ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket closed"))?,
            _ = self.closed.cancelled() => return Err(io::Error::new(io::ErrorKind::NotConnected, "socket closed")),
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        let (conn, _) = self
            .carrier
            .carrier()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the quic link is down"))?;
        Ok(SocketAddr::new(
            conn.local_ip()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            0,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_frames() {
        for v in [0u64, 63, 64, 16_383, 16_384, 1_073_741_823, 1_073_741_824] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(get_varint(&b), Some((v, b.len())), "{v}");
        }
        let d = datagram(70, b"hello");
        assert_eq!(parse_datagram(&d), Some((70, &b"hello"[..])));
        // Another context is not ours.
        let mut b = BytesMut::new();
        put_varint(&mut b, 1);
        put_varint(&mut b, 2);
        assert_eq!(parse_datagram(&b), None);
        assert_eq!(parse_datagram(&[]), None);
        assert_eq!(parse_datagram(&[0x40]), None);
    }

    #[test]
    fn paths() {
        let v4: SocketAddr = "10.1.2.3:53".parse().unwrap();
        assert_eq!(path_for(v4), "/.well-known/masque/udp/10.1.2.3/53/");
        assert_eq!(target_of(&path_for(v4)).unwrap().to_string(), "10.1.2.3:53");
        let v6: SocketAddr = "[fd00::1]:5353".parse().unwrap();
        let t = target_of(&path_for(v6)).unwrap();
        assert_eq!(t.host, "fd00::1");
        assert_eq!(t.port, 5353);
        assert_eq!(
            target_of("/.well-known/masque/udp/dns.corp/53/")
                .unwrap()
                .host,
            "dns.corp"
        );
        for bad in [
            "/.well-known/masque/udp/10.1.2.3/0/",
            "/.well-known/masque/udp//53/",
            "/.well-known/masque/udp/a b/53/",
            "/publish/1",
        ] {
            assert!(target_of(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn capsules_round_trip_in_pieces() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&capsule(b"one"));
        // An unknown capsule type is skipped.
        wire.extend_from_slice(&[0x21, 0x02, 0xaa, 0xbb]);
        wire.extend_from_slice(&capsule(&vec![7u8; 3000]));
        let (mut w, mut r) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in wire.chunks(5) {
                w.write_all(piece).await.unwrap();
            }
        });
        let mut got = Vec::new();
        read_capsules(&mut r, Vec::new(), |p| got.push(p.to_vec())).await;
        writer.await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], b"one");
        assert_eq!(got[1], vec![7u8; 3000]);
    }
}
