//! WireGuard's cross-platform userspace API, so stock `wg` works against
//! meshgate's interfaces.
//!
//! The protocol wireguard-go and boringtun speak on
//! `/var/run/wireguard/<interface>.sock`: a request is `get=1` or `set=1`
//! followed by `key=value` lines and an empty line; the answer to `get` is
//! the interface's state in the same form; every answer ends with
//! `errno=N` and an empty line (`0` for success, a negative errno for a
//! refused `set`, which `wg` prints as the error). Keys are lowercase hex.
//!
//! This file holds the sans-IO part (parse a request, print a state, turn a
//! `set` into the instance's next config document, so it is applied exactly
//! as a reload of that document would be) and the socket server. The socket
//! is mode 0600: `get` carries the private key (`wg show` hides it, `wg
//! showconf` prints it).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use ipnet::IpNet;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Longest request line accepted (an `allowed_ip` or `endpoint` is far shorter).
const MAX_LINE: usize = 4096;
/// Most lines in one request (about 10,000 allowed IPs).
const MAX_LINES: usize = 20_000;

/// `EINVAL`, `EPROTO`: the errnos a refused request answers with.
const EINVAL: i32 = 22;
const EPROTO: i32 = 71;

/// A malformed or refused request, with the errno to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UapiError {
    /// The errno (positive); the answer carries it negated.
    pub errno: i32,
    /// What was wrong (logged, never sent: the protocol has no room for it).
    pub message: String,
}

fn invalid(message: impl Into<String>) -> UapiError {
    UapiError {
        errno: EINVAL,
        message: message.into(),
    }
}

/// One peer's live state for `get`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerState {
    /// Its public key.
    pub public_key: [u8; 32],
    /// Its preshared key, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Where it is now.
    pub endpoint: Option<SocketAddr>,
    /// When the latest handshake completed.
    pub last_handshake: Option<SystemTime>,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Keepalive interval in seconds (0: off).
    pub persistent_keepalive: u16,
    /// Its allowed IPs.
    pub allowed_ips: Vec<IpNet>,
}

/// The interface's live state for `get`.
#[derive(Debug, Clone, PartialEq)]
pub struct InterfaceState {
    /// The private key.
    pub private_key: [u8; 32],
    /// The UDP port it listens on.
    pub listen_port: u16,
    /// Its peers.
    pub peers: Vec<PeerState>,
}

/// A peer section of a `set`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChange {
    /// Which peer (`public_key=`).
    pub public_key: [u8; 32],
    /// `remove=true`.
    pub remove: bool,
    /// `update_only=true`: do not create the peer.
    pub update_only: bool,
    /// `preshared_key=`: `Some(None)` removes it (all zeros).
    pub preshared_key: Option<Option<[u8; 32]>>,
    /// `endpoint=`.
    pub endpoint: Option<SocketAddr>,
    /// `persistent_keepalive_interval=` (0: off).
    pub persistent_keepalive: Option<u16>,
    /// `replace_allowed_ips=true`.
    pub replace_allowed_ips: bool,
    /// `allowed_ip=` lines.
    pub allowed_ips: Vec<IpNet>,
}

/// A `set` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `private_key=`.
    pub private_key: Option<[u8; 32]>,
    /// `listen_port=` (0: ephemeral).
    pub listen_port: Option<u16>,
    /// `fwmark=` (meshgate has no routing policy to mark for: ignored).
    pub fwmark: Option<u32>,
    /// `replace_peers=true`.
    pub replace_peers: bool,
    /// The peer sections, in order.
    pub peers: Vec<PeerChange>,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`.
    Get,
    /// `set=1` and its lines.
    Set(SetRequest),
}

fn hex_key(value: &str) -> Result<[u8; 32], UapiError> {
    let v = value.as_bytes();
    if v.len() != 64 {
        return Err(invalid(format!(
            "a key is 64 hex digits, got {} characters",
            v.len()
        )));
    }
    let mut out = [0u8; 32];
    for (i, pair) in v.chunks(2).enumerate() {
        let digit = |c: u8| {
            (c as char)
                .to_digit(16)
                .ok_or_else(|| invalid("a key is hex digits"))
        };
        out[i] = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
    }
    Ok(out)
}

fn to_hex(key: &[u8; 32]) -> String {
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn boolean(key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(format!("{key}: expected true or false"))),
    }
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    value
        .parse()
        .map_err(|_| invalid(format!("{key}: `{value}` is not a valid number")))
}

/// Parses a request: its first line and the `key=value` lines after it
/// (without the closing empty line).
pub fn parse_request(lines: &[&str]) -> Result<Request, UapiError> {
    let proto = |m: String| UapiError {
        errno: EPROTO,
        message: m,
    };
    let (first, rest) = lines
        .split_first()
        .ok_or_else(|| proto("empty request".into()))?;
    match *first {
        "get=1" if rest.is_empty() => return Ok(Request::Get),
        "get=1" => return Err(proto("get=1 takes no arguments".into())),
        "set=1" => {}
        other => return Err(proto(format!("unknown operation `{other}`"))),
    }
    let mut req = SetRequest::default();
    for line in rest {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| proto(format!("line without `=`: `{line}`")))?;
        if key == "public_key" {
            req.peers.push(PeerChange {
                public_key: hex_key(value)?,
                ..PeerChange::default()
            });
            continue;
        }
        match req.peers.last_mut() {
            None => match key {
                "private_key" => req.private_key = Some(hex_key(value)?),
                "listen_port" => req.listen_port = Some(number(key, value)?),
                "fwmark" => req.fwmark = Some(number(key, value)?),
                "replace_peers" => req.replace_peers = boolean(key, value)?,
                _ => return Err(invalid(format!("unknown interface key `{key}`"))),
            },
            Some(p) => match key {
                "remove" => p.remove = boolean(key, value)?,
                "update_only" => p.update_only = boolean(key, value)?,
                "preshared_key" => {
                    let k = hex_key(value)?;
                    p.preshared_key = Some((k != [0u8; 32]).then_some(k));
                }
                "endpoint" => {
                    p.endpoint = Some(value.parse().map_err(|_| {
                        invalid(format!(
                            "endpoint `{value}`: expected IP:PORT or [IPv6]:PORT"
                        ))
                    })?)
                }
                "persistent_keepalive_interval" => {
                    p.persistent_keepalive = Some(number(key, value)?)
                }
                "replace_allowed_ips" => p.replace_allowed_ips = boolean(key, value)?,
                "allowed_ip" => p.allowed_ips.push(
                    value
                        .parse::<IpNet>()
                        .map_err(|_| invalid(format!("allowed_ip `{value}`: expected a CIDR")))?,
                ),
                "protocol_version" if value == "1" => {}
                "protocol_version" => {
                    return Err(invalid(format!(
                        "protocol_version {value}: only 1 is known"
                    )))
                }
                _ => return Err(invalid(format!("unknown peer key `{key}`"))),
            },
        }
    }
    Ok(Request::Set(req))
}

/// The answer to `get`, `errno=0` and the closing empty line included.
pub fn format_get(state: &InterfaceState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "private_key={}", to_hex(&state.private_key));
    let _ = writeln!(out, "listen_port={}", state.listen_port);
    for p in &state.peers {
        let _ = writeln!(out, "public_key={}", to_hex(&p.public_key));
        let _ = writeln!(
            out,
            "preshared_key={}",
            to_hex(&p.preshared_key.unwrap_or([0; 32]))
        );
        let _ = writeln!(out, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(out, "endpoint={ep}");
        }
        let since = p
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// The answer that closes a request: `errno=0`, or the negated errno `wg`
/// turns into its message.
pub fn format_errno(result: &Result<(), UapiError>) -> String {
    match result {
        Ok(()) => "errno=0\n\n".into(),
        Err(e) => format!("errno=-{}\n\n", e.errno),
    }
}

fn b64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn same_key(peer: &Value, key: &[u8; 32]) -> bool {
    peer.get("public_key")
        .and_then(Value::as_str)
        .and_then(|s| crate::core::keys::PublicKey::from_base64(s).ok())
        .is_some_and(|k| &k.0 == key)
}

/// A name for a peer added over the API: `key-` and the first eight letters
/// and digits of its base64 key, made unique among `taken`.
fn derived_name(key: &[u8; 32], taken: &HashSet<String>) -> String {
    let short: String = b64(key)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let base = format!("key-{short}");
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// The instance's next document: `current` (its config document) with the
/// `set` applied. The result goes through the same checks and reload as a
/// changed file would.
pub fn apply_set(current: &Value, req: &SetRequest) -> Result<Value, UapiError> {
    let mut doc = current.clone();
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| invalid("the current document is not a map"))?;
    if let Some(k) = req.private_key {
        if k == [0u8; 32] {
            return Err(invalid(
                "an interface needs a private key; it cannot be removed",
            ));
        }
        obj.remove("private_key_file");
        obj.insert("private_key".into(), json!(b64(&k)));
    }
    match req.listen_port {
        Some(0) => {
            obj.remove("listen_port");
        }
        Some(p) => {
            obj.insert("listen_port".into(), json!(p));
        }
        None => {}
    }
    let mut peers: Vec<Value> = if req.replace_peers {
        Vec::new()
    } else {
        obj.get("peers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    for change in &req.peers {
        let at = peers.iter().position(|p| same_key(p, &change.public_key));
        if change.remove {
            if let Some(i) = at {
                peers.remove(i);
            }
            continue;
        }
        let i = match at {
            Some(i) => i,
            None if change.update_only => continue,
            None => {
                let taken: HashSet<String> = peers
                    .iter()
                    .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect();
                peers.push(json!({
                    "name": derived_name(&change.public_key, &taken),
                    "public_key": b64(&change.public_key),
                }));
                peers.len() - 1
            }
        };
        let p = peers[i]
            .as_object_mut()
            .ok_or_else(|| invalid("a peer is not a map"))?;
        match change.preshared_key {
            Some(Some(k)) => {
                p.remove("preshared_key_file");
                p.insert("preshared_key".into(), json!(b64(&k)));
            }
            Some(None) => {
                p.remove("preshared_key_file");
                p.remove("preshared_key");
            }
            None => {}
        }
        if let Some(ep) = change.endpoint {
            p.insert("endpoint".into(), json!(ep.to_string()));
        }
        match change.persistent_keepalive {
            Some(0) => {
                p.remove("persistent_keepalive");
            }
            Some(n) => {
                p.insert("persistent_keepalive".into(), json!(n));
            }
            None => {}
        }
        if change.replace_allowed_ips {
            p.insert("allowed_ips".into(), json!([]));
        }
        if !change.allowed_ips.is_empty() {
            let list = p
                .entry("allowed_ips")
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .ok_or_else(|| invalid("allowed_ips is not a list"))?;
            for net in &change.allowed_ips {
                let s = json!(net.to_string());
                if !list.contains(&s) {
                    list.push(s);
                }
            }
        }
    }
    obj.insert("peers".into(), Value::Array(peers));
    Ok(doc)
}

/// What the server asks of the instance it serves.
#[async_trait::async_trait]
pub trait UapiTarget: Send + Sync + 'static {
    /// The live state, or `None` while the interface is down.
    fn state(&self) -> Option<InterfaceState>;
    /// Applies a `set`, as a reload would; `Err` keeps the old config.
    async fn set(&self, req: SetRequest) -> Result<(), UapiError>;
}

/// Where an instance's socket goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UapiDir {
    /// `/var/run/wireguard` if it can be used, else off.
    Auto,
    /// Off.
    Off,
    /// This directory (must be usable).
    Dir(PathBuf),
}

/// The default directory, shared with wireguard-go and `wg`.
pub const DEFAULT_DIR: &str = "/var/run/wireguard";

/// A serving socket; removed when dropped.
pub struct UapiServer {
    path: PathBuf,
    cancel: CancellationToken,
}

impl UapiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `dir/<name>.sock` (mode 0600) and serves `target` on it. A socket
/// file that still answers belongs to a live process: that is an error. A
/// stale one is replaced.
pub fn serve(dir: &Path, name: &str, target: Arc<dyn UapiTarget>) -> io::Result<UapiServer> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.sock"));
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another live process (an interface named `{name}` exists already)", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    // Bind under a private umask-independent mode: create, then restrict
    // before anyone can have connected (the directory is ours to write).
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let cancel = CancellationToken::new();
    tokio::spawn(accept_loop(
        listener,
        target,
        cancel.clone(),
        name.to_string(),
    ));
    Ok(UapiServer { path, cancel })
}

async fn accept_loop(
    listener: UnixListener,
    target: Arc<dyn UapiTarget>,
    cancel: CancellationToken,
    name: String,
) {
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let (t, n) = (target.clone(), name.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(stream, t).await {
                        tracing::debug!(interface = %n, error = %e, "uapi connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(interface = %name, error = %e, "uapi accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves requests on one connection until it closes.
async fn serve_conn(stream: tokio::net::UnixStream, target: Arc<dyn UapiTarget>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut lines: Vec<String> = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(()); // closed (between requests, or mid-request)
            }
            if line.last() != Some(&b'\n') {
                w.write_all(format_errno(&Err(invalid("line too long"))).as_bytes())
                    .await?;
                return Ok(());
            }
            line.pop();
            if line.is_empty() {
                break;
            }
            if lines.len() >= MAX_LINES {
                w.write_all(format_errno(&Err(invalid("request too long"))).as_bytes())
                    .await?;
                return Ok(());
            }
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let answer = match parse_request(&refs) {
            Ok(Request::Get) => match target.state() {
                Some(s) => format_get(&s),
                None => format_errno(&Err(UapiError {
                    errno: 19, // ENODEV: the interface is down
                    message: "the interface is down".into(),
                })),
            },
            Ok(Request::Set(req)) => format_errno(&target.set(req).await),
            Err(e) => {
                tracing::info!(error = %e, "uapi request refused");
                format_errno(&Err(e))
            }
        };
        w.write_all(answer.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const B: &str = "0202020202020202020202020202020202020202020202020202020202020202";

    #[test]
    fn parses_what_wg_set_sends() {
        let lines = [
            "set=1",
            &format!("private_key={A}"),
            "listen_port=51820",
            "replace_peers=true",
            &format!("public_key={B}"),
            &format!("preshared_key={}", "0".repeat(64)),
            "endpoint=[fd00::1]:8765",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.192.0.9/32",
            "allowed_ip=fd00::9/128",
        ];
        let Request::Set(r) = parse_request(&lines).unwrap() else {
            panic!()
        };
        assert_eq!(r.private_key, Some([1; 32]));
        assert_eq!(r.listen_port, Some(51820));
        assert!(r.replace_peers);
        let p = &r.peers[0];
        assert_eq!(p.public_key, [2; 32]);
        assert_eq!(p.preshared_key, Some(None));
        assert_eq!(p.endpoint, Some("[fd00::1]:8765".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(parse_request(&["get=1"]).unwrap(), Request::Get);
    }

    #[test]
    fn malformed_requests_get_an_errno_never_a_panic() {
        let cases: &[&[&str]] = &[
            &[],
            &["hello=1"],
            &["get=1", "x=y"],
            &["set=1", "private_key=zz"],
            &["set=1", &format!("private_key={}", &A[..62])],
            &["set=1", "remove=true"],
            &["set=1", "listen_port=70000"],
            &["set=1", &format!("public_key={B}"), "endpoint=nowhere"],
            &[
                "set=1",
                &format!("public_key={B}"),
                "allowed_ip=10.0.0.0/33",
            ],
            &["set=1", &format!("public_key={B}"), "protocol_version=2"],
            &["set=1", &format!("public_key={B}"), "remove=maybe"],
            &["set=1", "no equals sign"],
            &["set=1", "private_key=ééééééééééééééééééééééééééééééééé"],
        ];
        for c in cases {
            let e = parse_request(c).unwrap_err();
            assert!(e.errno == EINVAL || e.errno == EPROTO, "{c:?}: {e:?}");
            assert!(format_errno(&Err(e)).starts_with("errno=-"));
        }
    }

    #[test]
    fn get_prints_what_wg_reads() {
        let state = InterfaceState {
            private_key: [1; 32],
            listen_port: 8765,
            peers: vec![PeerState {
                public_key: [2; 32],
                preshared_key: None,
                endpoint: Some("172.24.0.2:55748".parse().unwrap()),
                last_handshake: Some(
                    SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5),
                ),
                tx_bytes: 860,
                rx_bytes: 948,
                persistent_keepalive: 0,
                allowed_ips: vec!["10.192.0.245/32".parse().unwrap()],
            }],
        };
        let text = format_get(&state);
        assert_eq!(
            text,
            format!(
                "private_key={A}\nlisten_port=8765\npublic_key={B}\npreshared_key={}\nprotocol_version=1\nendpoint=172.24.0.2:55748\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=860\nrx_bytes=948\npersistent_keepalive_interval=0\nallowed_ip=10.192.0.245/32\nerrno=0\n\n",
                "0".repeat(64)
            )
        );
    }

    #[test]
    fn set_becomes_the_next_document() {
        let b_b64 = b64(&[2; 32]);
        let current = json!({
            "kind": "wireguard",
            "private_key_file": "/etc/meshgate/wg0.key",
            "listen_port": 8765,
            "address": "10.192.0.1/24",
            "peers": [{"name": "client", "public_key": b_b64, "allowed_ips": ["10.192.0.2/32"], "persistent_keepalive": 25}],
        });
        // Add a peer, change one, leave the key file alone.
        let req = SetRequest {
            peers: vec![
                PeerChange {
                    public_key: [3; 32],
                    endpoint: Some("127.0.0.1:51820".parse().unwrap()),
                    allowed_ips: vec!["10.192.0.9/32".parse().unwrap()],
                    ..Default::default()
                },
                PeerChange {
                    public_key: [2; 32],
                    persistent_keepalive: Some(0),
                    allowed_ips: vec!["10.192.0.3/32".parse().unwrap()],
                    ..Default::default()
                },
                PeerChange {
                    public_key: [4; 32],
                    update_only: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let next = apply_set(&current, &req).unwrap();
        assert_eq!(next["private_key_file"], "/etc/meshgate/wg0.key");
        assert_eq!(next["listen_port"], 8765);
        let peers = next["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{next}");
        assert_eq!(
            peers[0]["allowed_ips"],
            json!(["10.192.0.2/32", "10.192.0.3/32"])
        );
        assert!(peers[0].get("persistent_keepalive").is_none());
        assert_eq!(peers[1]["name"], "key-AwMDAwMD");
        assert_eq!(peers[1]["endpoint"], "127.0.0.1:51820");
        // Replace everything, new key: the key file gives way.
        let req = SetRequest {
            private_key: Some([1; 32]),
            listen_port: Some(0),
            replace_peers: true,
            ..Default::default()
        };
        let next = apply_set(&current, &req).unwrap();
        assert!(next.get("private_key_file").is_none());
        assert_eq!(next["private_key"], b64(&[1; 32]));
        assert!(next.get("listen_port").is_none());
        assert_eq!(next["peers"], json!([]));
        // Remove.
        let req = SetRequest {
            peers: vec![PeerChange {
                public_key: [2; 32],
                remove: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(apply_set(&current, &req).unwrap()["peers"], json!([]));
        // A zero private key is refused.
        let req = SetRequest {
            private_key: Some([0; 32]),
            ..Default::default()
        };
        assert_eq!(apply_set(&current, &req).unwrap_err().errno, EINVAL);
    }

    #[test]
    fn derived_names_are_unique() {
        let mut taken = HashSet::new();
        let a = derived_name(&[3; 32], &taken);
        taken.insert(a.clone());
        let b = derived_name(&[3; 32], &taken);
        assert_eq!(a, "key-AwMDAwMD");
        assert_eq!(b, "key-AwMDAwMD-2");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Arbitrary lines: a request or an errno, never a panic; a parsed
        /// `set` applies to a document or is refused with an errno.
        #[test]
        fn requests_never_panic(
            op in prop_oneof![Just("set=1".to_string()), Just("get=1".to_string()), ".{0,8}"],
            lines in proptest::collection::vec(
                "(public_key|private_key|preshared_key|endpoint|allowed_ip|listen_port|remove|update_only|replace_peers|replace_allowed_ips|persistent_keepalive_interval|protocol_version|x)=[0-9a-f:.\\[\\]/]{0,70}",
                0..12,
            ),
        ) {
            let mut all = vec![op.as_str()];
            all.extend(lines.iter().map(String::as_str));
            if let Ok(Request::Set(req)) = parse_request(&all) {
                let doc = json!({"kind": "wireguard", "peers": [{"name": "a", "public_key": b64(&[2; 32])}]});
                match apply_set(&doc, &req) {
                    Ok(v) => prop_assert!(v["peers"].is_array()),
                    Err(e) => prop_assert_eq!(e.errno, EINVAL),
                }
            }
        }
    }
}
