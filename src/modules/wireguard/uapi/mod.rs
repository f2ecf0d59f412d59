//! WireGuard's cross-platform userspace API (UAPI), so stock `wg` works
//! against meshgate's interfaces.
//!
//! The protocol wireguard-go and boringtun speak on
//! `/var/run/wireguard/<interface>.sock`: a request is `get=1` or `set=1`,
//! then `key=value` lines, then an empty line. The answer to `get` is the
//! interface's state in the same form; every answer ends with `errno=N` and
//! an empty line. Keys travel as lowercase hex.
//!
//! - `get`: `private_key`, `listen_port` (`fwmark` only when set: never,
//!   here), then per peer `public_key` (which starts the peer),
//!   `preshared_key` (zeros when none), `protocol_version=1`, `endpoint`,
//!   `last_handshake_time_sec`/`_nsec` (UNIX time, zero when none),
//!   `tx_bytes`, `rx_bytes`, `persistent_keepalive_interval` and one
//!   `allowed_ip` per network.
//! - `set`: interface keys (`private_key`, `listen_port`, `fwmark`,
//!   `replace_peers=true`) before the first `public_key`; after it, that
//!   peer's keys (`remove`, `update_only`, `preshared_key`, `endpoint`,
//!   `persistent_keepalive_interval`, `replace_allowed_ips`, `allowed_ip`,
//!   `-`-prefixed `allowed_ip` to remove one, `protocol_version`). An
//!   unknown key, bad hex or a peer key before any `public_key` refuses the
//!   whole request with `EINVAL`; nothing of it is applied.
//! - errno signs follow what `wg` parses (wireguard-tools' `ipc-uapi.h`):
//!   a `set` is answered `errno=-22`, a failed `get` `errno=19` (its parser
//!   reads the number unsigned).
//!
//! Layout: this file is the sans-IO part (parse a request, print a state,
//! turn a `set` into the instance's next config document so it is applied
//! exactly as a reload of that document would be); [`server`] is the socket
//! (mode 0600: `get` carries the private key, which `wg show` hides and `wg
//! showconf` prints). [`parse`] takes raw bytes and is what `fuzz/`'s
//! cargo-fuzz target drives.

pub mod server;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use base64::Engine;
use ipnet::IpNet;
use serde_json::{json, Value};

pub use server::{serve, UapiServer, UapiTarget};

/// Longest request line accepted (a key line is 76 bytes, an endpoint at
/// most about 60).
pub const MAX_LINE: usize = 4096;
/// Largest request accepted, in bytes (about 150,000 allowed IPs).
pub const MAX_REQUEST: usize = 4 << 20;
/// Most peer sections in one `set`.
pub const MAX_PEERS: usize = 10_000;

/// The errnos answers carry.
pub mod errno {
    /// No such device: the interface is down (restarting).
    pub const ENODEV: i32 = 19;
    /// Invalid argument: a bad key, value or change.
    pub const EINVAL: i32 = 22;
    /// Protocol error: not a request at all.
    pub const EPROTO: i32 = 71;
    /// Address in use: the new `listen_port` is taken.
    pub const EADDRINUSE: i32 = 98;
}
use errno::{EINVAL, EPROTO};

/// A malformed or refused request, with the errno to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UapiError {
    /// The errno (positive).
    pub errno: i32,
    /// What was wrong (logged, never sent: the protocol has no room for
    /// it). Never holds key material.
    pub message: String,
}

fn invalid(message: impl Into<String>) -> UapiError {
    UapiError {
        errno: EINVAL,
        message: message.into(),
    }
}

fn protocol(message: impl Into<String>) -> UapiError {
    UapiError {
        errno: EPROTO,
        message: message.into(),
    }
}

/// One peer's live state for `get`.
#[derive(Clone, PartialEq)]
pub struct PeerState {
    /// Its public key.
    pub public_key: [u8; 32],
    /// Its preshared key, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Where it is now.
    pub endpoint: Option<SocketAddr>,
    /// When the latest handshake completed (wall clock).
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

impl std::fmt::Debug for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerState")
            .field("public_key", &b64(&self.public_key))
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("last_handshake", &self.last_handshake)
            .field("tx_bytes", &self.tx_bytes)
            .field("rx_bytes", &self.rx_bytes)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("allowed_ips", &self.allowed_ips)
            .finish()
    }
}

/// The interface's live state for `get`.
#[derive(Clone, PartialEq)]
pub struct InterfaceState {
    /// The private key.
    pub private_key: [u8; 32],
    /// The UDP port it listens on (0: none, as in a simulation).
    pub listen_port: u16,
    /// Its peers.
    pub peers: Vec<PeerState>,
}

impl std::fmt::Debug for InterfaceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterfaceState")
            .field("private_key", &"<redacted>")
            .field("listen_port", &self.listen_port)
            .field("peers", &self.peers)
            .finish()
    }
}

/// One `allowed_ip=` line of a peer section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedIpChange {
    /// `allowed_ip=10.0.0.0/24`.
    Add(IpNet),
    /// `allowed_ip=-10.0.0.0/24` (wireguard-tools 1.0.20250521 and later).
    Remove(IpNet),
}

/// A peer section of a `set`.
#[derive(Clone, Default, PartialEq, Eq)]
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
    /// `replace_allowed_ips=true`: the `allowed_ip` lines replace the list.
    pub replace_allowed_ips: bool,
    /// `allowed_ip=` lines, in order.
    pub allowed_ips: Vec<AllowedIpChange>,
}

impl std::fmt::Debug for PeerChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerChange")
            .field("public_key", &b64(&self.public_key))
            .field("remove", &self.remove)
            .field("update_only", &self.update_only)
            .field(
                "preshared_key",
                &self.preshared_key.map(|k| k.map(|_| "<redacted>")),
            )
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("replace_allowed_ips", &self.replace_allowed_ips)
            .field("allowed_ips", &self.allowed_ips)
            .finish()
    }
}

/// A `set` request.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `private_key=`.
    pub private_key: Option<[u8; 32]>,
    /// `listen_port=` (0: ephemeral).
    pub listen_port: Option<u16>,
    /// `fwmark=` (meshgate's userspace sockets take no routing mark: a
    /// nonzero one is logged and ignored).
    pub fwmark: Option<u32>,
    /// `replace_peers=true`.
    pub replace_peers: bool,
    /// The peer sections, in order.
    pub peers: Vec<PeerChange>,
}

impl std::fmt::Debug for SetRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetRequest")
            .field("private_key", &self.private_key.map(|_| "<redacted>"))
            .field("listen_port", &self.listen_port)
            .field("fwmark", &self.fwmark)
            .field("replace_peers", &self.replace_peers)
            .field("peers", &self.peers)
            .finish()
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`.
    Get,
    /// `set=1` and its lines.
    Set(SetRequest),
}

fn hex_key(what: &str, value: &str) -> Result<[u8; 32], UapiError> {
    let v = value.as_bytes();
    if v.len() != 64 {
        return Err(invalid(format!(
            "{what}: a key is 64 hex digits, got {} characters",
            v.len()
        )));
    }
    let digit = |c: u8| {
        (c as char)
            .to_digit(16)
            .ok_or_else(|| invalid(format!("{what}: a key is hex digits")))
    };
    let mut out = [0u8; 32];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        out[i] = ((digit(pair[0])? << 4) | digit(pair[1])?) as u8;
    }
    Ok(out)
}

fn to_hex(key: &[u8; 32]) -> String {
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `true` (wireguard-go accepts nothing else for these flags).
fn flag(key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        _ => Err(invalid(format!("{key}: expected true"))),
    }
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("{key}: expected a decimal number")));
    }
    value
        .parse()
        .map_err(|_| invalid(format!("{key}: `{value}` is out of range")))
}

/// An unknown key as an error message may show it: short ones quoted,
/// long ones (which could be key material sent by mistake) by length only.
fn shown(key: &str) -> String {
    if key.len() <= 32 {
        format!("`{}`", key.escape_default())
    } else {
        format!("a key name of {} bytes", key.len())
    }
}

/// Parses one request from its bytes: the lines up to the empty line that
/// ends it (anything after it is ignored; a missing end is tolerated). The
/// entry point for fuzzing: any input gives a request or an error, never a
/// panic.
pub fn parse(bytes: &[u8]) -> Result<Request, UapiError> {
    if bytes.len() > MAX_REQUEST {
        return Err(invalid("request too long"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| protocol("request is not UTF-8"))?;
    let lines: Vec<&str> = text.split('\n').take_while(|l| !l.is_empty()).collect();
    if lines.iter().any(|l| l.len() > MAX_LINE) {
        return Err(invalid("line too long"));
    }
    parse_request(&lines)
}

/// Parses a request: its first line and the `key=value` lines after it
/// (without the closing empty line).
pub fn parse_request(lines: &[&str]) -> Result<Request, UapiError> {
    let (first, rest) = lines
        .split_first()
        .ok_or_else(|| protocol("empty request"))?;
    match *first {
        "get=1" if rest.is_empty() => return Ok(Request::Get),
        "get=1" => return Err(invalid("get=1 takes no arguments")),
        "set=1" => {}
        _ => return Err(protocol("unknown operation: expected get=1 or set=1")),
    }
    let mut req = SetRequest::default();
    for line in rest {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| protocol("a line without `=`"))?;
        if key == "public_key" {
            if req.peers.len() >= MAX_PEERS {
                return Err(invalid(format!(
                    "more than {MAX_PEERS} peers in one request"
                )));
            }
            req.peers.push(PeerChange {
                public_key: hex_key(key, value)?,
                ..PeerChange::default()
            });
            continue;
        }
        match req.peers.last_mut() {
            None => match key {
                "private_key" => req.private_key = Some(hex_key(key, value)?),
                "listen_port" => req.listen_port = Some(number(key, value)?),
                "fwmark" => req.fwmark = Some(number(key, value)?),
                "replace_peers" => req.replace_peers = flag(key, value)?,
                _ => {
                    return Err(invalid(format!(
                        "{} is not an interface key (or comes before public_key)",
                        shown(key)
                    )))
                }
            },
            Some(p) => match key {
                "remove" => p.remove = flag(key, value)?,
                "update_only" => p.update_only = flag(key, value)?,
                "preshared_key" => {
                    let k = hex_key(key, value)?;
                    p.preshared_key = Some((k != [0u8; 32]).then_some(k));
                }
                "endpoint" => {
                    p.endpoint = Some(
                        value
                            .parse()
                            .map_err(|_| invalid("endpoint: expected IP:PORT or [IPv6]:PORT"))?,
                    )
                }
                "persistent_keepalive_interval" => {
                    p.persistent_keepalive = Some(number(key, value)?)
                }
                "replace_allowed_ips" => p.replace_allowed_ips = flag(key, value)?,
                "allowed_ip" => {
                    let (remove, cidr) = match value.strip_prefix('-') {
                        Some(rest) => (true, rest),
                        None => (false, value),
                    };
                    let net = cidr
                        .parse::<IpNet>()
                        .map_err(|_| invalid("allowed_ip: expected a CIDR such as 10.0.0.0/24"))?;
                    p.allowed_ips.push(if remove {
                        AllowedIpChange::Remove(net)
                    } else {
                        AllowedIpChange::Add(net)
                    });
                }
                "protocol_version" if value == "1" => {}
                "protocol_version" => {
                    return Err(invalid("protocol_version: only 1 is known"));
                }
                _ => return Err(invalid(format!("{} is not a peer key", shown(key)))),
            },
        }
    }
    Ok(Request::Set(req))
}

/// The answer to `get`, `errno=0` and the closing empty line included.
pub fn format_get(state: &InterfaceState) -> String {
    let mut out = String::new();
    if state.private_key != [0; 32] {
        let _ = writeln!(out, "private_key={}", to_hex(&state.private_key));
    }
    if state.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", state.listen_port);
    }
    for p in &state.peers {
        let _ = writeln!(out, "public_key={}", to_hex(&p.public_key));
        let _ = writeln!(
            out,
            "preshared_key={}",
            to_hex(&p.preshared_key.unwrap_or([0; 32]))
        );
        out.push_str("protocol_version=1\n");
        if let Some(ep) = p.endpoint {
            // IPv4-mapped addresses as `wg` prints them: plain IPv4.
            let ep = SocketAddr::new(ep.ip().to_canonical(), ep.port());
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

/// The answer to a `set` (or to something that is not a request):
/// `errno=0`, or the negated errno, which `wg` turns into its message.
pub fn format_set_result(result: &Result<(), UapiError>) -> String {
    match result {
        Ok(()) => "errno=0\n\n".into(),
        Err(e) => format!("errno=-{}\n\n", e.errno),
    }
}

/// The answer to a `get` that failed: the errno unsigned, the only form
/// `wg`'s `get` parser reads.
pub fn format_get_error(e: &UapiError) -> String {
    format!("errno={}\n\n", e.errno)
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

fn peer_name(p: &Value) -> Option<String> {
    p.get("name").and_then(Value::as_str).map(str::to_string)
}

/// The networks of a document's `allowed_ips` list, as they compare.
fn net_of(v: &Value) -> Option<IpNet> {
    v.as_str()?.parse::<IpNet>().ok().map(|n| n.trunc())
}

/// The instance's next document: `current` (its running config document,
/// whose own public key is `own_public`) with the `set` applied. The result
/// goes through the same checks and reload as a changed file would; like
/// wireguard-go, a section naming the interface's own key is ignored.
pub fn apply_set(
    current: &Value,
    req: &SetRequest,
    own_public: &[u8; 32],
) -> Result<Value, UapiError> {
    let mut doc = current.clone();
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| invalid("the current document is not a map"))?;
    let mut own_public = *own_public;
    if let Some(k) = req.private_key {
        if k == [0u8; 32] {
            return Err(invalid(
                "an interface needs a private key; it cannot be removed",
            ));
        }
        own_public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(k)).to_bytes();
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
    let old_peers: Vec<Value> = obj
        .get("peers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut peers = if req.replace_peers {
        Vec::new()
    } else {
        old_peers.clone()
    };
    for change in &req.peers {
        if change.public_key == own_public {
            continue;
        }
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
                let taken: HashSet<String> = peers.iter().filter_map(peer_name).collect();
                // A peer that `replace_peers` removed and this request adds
                // back keeps its name (metrics and pipes refer to it).
                let name = old_peers
                    .iter()
                    .find(|p| same_key(p, &change.public_key))
                    .and_then(peer_name)
                    .filter(|n| !taken.contains(n))
                    .unwrap_or_else(|| derived_name(&change.public_key, &taken));
                peers.push(json!({
                    "name": name,
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
            for c in &change.allowed_ips {
                match *c {
                    AllowedIpChange::Add(net) => {
                        if !list.iter().any(|v| net_of(v) == Some(net.trunc())) {
                            list.push(json!(net.to_string()));
                        }
                    }
                    AllowedIpChange::Remove(net) => {
                        list.retain(|v| net_of(v) != Some(net.trunc()));
                    }
                }
            }
        }
    }
    obj.insert("peers".into(), Value::Array(peers));
    Ok(doc)
}

/// Where an instance's socket goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UapiDir {
    /// [`DEFAULT_DIR`] if it can be used, else off (logged at info).
    Auto,
    /// Off.
    Off,
    /// This directory (must be usable: start fails otherwise).
    Dir(PathBuf),
}

/// The default directory, shared with wireguard-go and `wg`.
pub const DEFAULT_DIR: &str = "/var/run/wireguard";

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const B: &str = "0202020202020202020202020202020202020202020202020202020202020202";
    const OWN: [u8; 32] = [9; 32];

    #[test]
    fn parses_what_wg_set_sends() {
        let text = format!(
            "set=1\nprivate_key={A}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n\
             public_key={B}\npreshared_key={}\nendpoint=[fd00::1]:8765\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.192.0.9/32\nallowed_ip=fd00::9/128\nallowed_ip=-10.9.0.0/16\n\n",
            "0".repeat(64)
        );
        let Request::Set(r) = parse(text.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(r.private_key, Some([1; 32]));
        assert_eq!(r.listen_port, Some(51820));
        assert_eq!(r.fwmark, Some(0));
        assert!(r.replace_peers);
        let p = &r.peers[0];
        assert_eq!(p.public_key, [2; 32]);
        assert_eq!(p.preshared_key, Some(None));
        assert_eq!(p.endpoint, Some("[fd00::1]:8765".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(
            p.allowed_ips,
            vec![
                AllowedIpChange::Add("10.192.0.9/32".parse().unwrap()),
                AllowedIpChange::Add("fd00::9/128".parse().unwrap()),
                AllowedIpChange::Remove("10.9.0.0/16".parse().unwrap()),
            ]
        );
        assert_eq!(parse(b"get=1\n\n").unwrap(), Request::Get);
        // Anything after the empty line is the next request's.
        assert_eq!(parse(b"get=1\n\nset=1\nx=y\n\n").unwrap(), Request::Get);
    }

    #[test]
    fn malformed_requests_get_an_errno_never_a_panic() {
        let b = format!("public_key={B}");
        let cases: &[(&[&str], i32)] = &[
            (&[], EPROTO),
            (&["hello=1"], EPROTO),
            (&["get=1", "x=y"], EINVAL),
            (&["set=1", "private_key=zz"], EINVAL),
            (&["set=1", &format!("private_key={}", &A[..62])], EINVAL),
            (&["set=1", &format!("private_key={}g", &A[..63])], EINVAL),
            // A peer key before any public_key.
            (&["set=1", "remove=true"], EINVAL),
            (&["set=1", "endpoint=127.0.0.1:1"], EINVAL),
            (&["set=1", "allowed_ip=10.0.0.0/8"], EINVAL),
            (&["set=1", "listen_port=70000"], EINVAL),
            (&["set=1", "listen_port=-1"], EINVAL),
            (&["set=1", "listen_port=+1"], EINVAL),
            (&["set=1", "fwmark=0x10"], EINVAL),
            (&["set=1", "replace_peers=false"], EINVAL),
            (&["set=1", "unknown=1"], EINVAL),
            (&["set=1", &b, "endpoint=nowhere"], EINVAL),
            (&["set=1", &b, "endpoint=example.com:51820"], EINVAL),
            (&["set=1", &b, "allowed_ip=10.0.0.0/33"], EINVAL),
            (&["set=1", &b, "allowed_ip=-"], EINVAL),
            (&["set=1", &b, "protocol_version=2"], EINVAL),
            (&["set=1", &b, "remove=maybe"], EINVAL),
            (&["set=1", &b, "listen_port=1"], EINVAL),
            (
                &["set=1", &b, "persistent_keepalive_interval=65536"],
                EINVAL,
            ),
            (&["set=1", "no equals sign"], EPROTO),
            (
                &["set=1", "private_key=ééééééééééééééééééééééééééééééééé"],
                EINVAL,
            ),
        ];
        for (c, want) in cases {
            let e = parse_request(c).unwrap_err();
            assert_eq!(e.errno, *want, "{c:?}: {e:?}");
            assert!(format_set_result(&Err(e)).starts_with("errno=-"));
        }
        for bytes in [
            &b"set=1\n\xff\xfe\n\n"[..],
            b"",
            b"\n",
            b"=\n\n",
            b"set=1\npublic_key=\n\n",
        ] {
            assert!(parse(bytes).is_err(), "{bytes:?}");
        }
        let long = format!("set=1\nendpoint={}\n\n", "1".repeat(MAX_LINE));
        assert_eq!(parse(long.as_bytes()).unwrap_err().message, "line too long");
        let many = format!("set=1\n{}\n", format!("{b}\n").repeat(MAX_PEERS + 1));
        assert_eq!(parse(many.as_bytes()).unwrap_err().errno, EINVAL);
    }

    #[test]
    fn errors_never_echo_keys() {
        let secret = "s3cr3t".repeat(10);
        for line in [
            format!("private_key={secret}"),
            secret.clone(),
            format!("{secret}=1"),
        ] {
            let e = parse_request(&["set=1", &line]).unwrap_err();
            assert!(!e.message.contains(&secret), "{e}");
        }
        let req = SetRequest {
            private_key: Some([7; 32]),
            peers: vec![PeerChange {
                preshared_key: Some(Some([8; 32])),
                ..Default::default()
            }],
            ..Default::default()
        };
        let debug = format!("{req:?}");
        assert!(!debug.contains(&b64(&[7; 32])) && !debug.contains(&b64(&[8; 32])));
    }

    #[test]
    fn get_prints_what_wg_reads() {
        let state = InterfaceState {
            private_key: [1; 32],
            listen_port: 8765,
            peers: vec![
                PeerState {
                    public_key: [2; 32],
                    preshared_key: None,
                    endpoint: Some("[::ffff:172.24.0.2]:55748".parse().unwrap()),
                    last_handshake: Some(
                        SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5),
                    ),
                    tx_bytes: 860,
                    rx_bytes: 948,
                    persistent_keepalive: 0,
                    allowed_ips: vec!["10.192.0.245/32".parse().unwrap()],
                },
                PeerState {
                    public_key: [1; 32],
                    preshared_key: Some([2; 32]),
                    endpoint: Some("[fd00::2]:1".parse().unwrap()),
                    last_handshake: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    persistent_keepalive: 25,
                    allowed_ips: vec![],
                },
            ],
        };
        let text = format_get(&state);
        assert_eq!(
            text,
            format!(
                "private_key={A}\nlisten_port=8765\n\
                 public_key={B}\npreshared_key={zero}\nprotocol_version=1\nendpoint=172.24.0.2:55748\n\
                 last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=860\nrx_bytes=948\n\
                 persistent_keepalive_interval=0\nallowed_ip=10.192.0.245/32\n\
                 public_key={A}\npreshared_key={B}\nprotocol_version=1\nendpoint=[fd00::2]:1\n\
                 last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
                 persistent_keepalive_interval=25\nerrno=0\n\n",
                zero = "0".repeat(64)
            )
        );
        assert_eq!(format_get_error(&invalid("x")), "errno=22\n\n");
        assert_eq!(format_set_result(&Err(invalid("x"))), "errno=-22\n\n");
        assert_eq!(format_set_result(&Ok(())), "errno=0\n\n");
    }

    fn set(peers: Vec<PeerChange>) -> SetRequest {
        SetRequest {
            peers,
            ..Default::default()
        }
    }

    fn current() -> Value {
        json!({
            "kind": "wireguard",
            "private_key_file": "/etc/meshgate/wg0.key",
            "listen_port": 8765,
            "address": "10.192.0.1/24",
            "peers": [{"name": "client", "public_key": b64(&[2; 32]), "allowed_ips": ["10.192.0.2/32"], "persistent_keepalive": 25, "endpoint": "client.example:51820"}],
        })
    }

    #[test]
    fn set_becomes_the_next_document() {
        let current = current();
        // Add a peer, change one, leave the key file alone.
        let req = set(vec![
            PeerChange {
                public_key: [3; 32],
                endpoint: Some("127.0.0.1:51820".parse().unwrap()),
                allowed_ips: vec![AllowedIpChange::Add("10.192.0.9/32".parse().unwrap())],
                ..Default::default()
            },
            PeerChange {
                public_key: [2; 32],
                persistent_keepalive: Some(0),
                allowed_ips: vec![
                    AllowedIpChange::Add("10.192.0.3/32".parse().unwrap()),
                    AllowedIpChange::Add("10.192.0.2/32".parse().unwrap()),
                ],
                ..Default::default()
            },
            PeerChange {
                public_key: [4; 32],
                update_only: true,
                ..Default::default()
            },
        ]);
        let next = apply_set(&current, &req, &OWN).unwrap();
        assert_eq!(next["private_key_file"], "/etc/meshgate/wg0.key");
        assert_eq!(next["listen_port"], 8765);
        let peers = next["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{next}");
        assert_eq!(
            peers[0]["allowed_ips"],
            json!(["10.192.0.2/32", "10.192.0.3/32"])
        );
        assert!(peers[0].get("persistent_keepalive").is_none());
        assert_eq!(peers[0]["endpoint"], "client.example:51820", "untouched");
        assert_eq!(peers[1]["name"], "key-AwMDAwMD");
        assert_eq!(peers[1]["endpoint"], "127.0.0.1:51820");

        // Replace everything, new key: the key file gives way.
        let req = SetRequest {
            private_key: Some([1; 32]),
            listen_port: Some(0),
            replace_peers: true,
            ..Default::default()
        };
        let next = apply_set(&current, &req, &OWN).unwrap();
        assert!(next.get("private_key_file").is_none());
        assert_eq!(next["private_key"], b64(&[1; 32]));
        assert!(next.get("listen_port").is_none());
        assert_eq!(next["peers"], json!([]));

        // Remove.
        let req = set(vec![PeerChange {
            public_key: [2; 32],
            remove: true,
            ..Default::default()
        }]);
        assert_eq!(apply_set(&current, &req, &OWN).unwrap()["peers"], json!([]));

        // A zero private key is refused.
        let req = SetRequest {
            private_key: Some([0; 32]),
            ..Default::default()
        };
        assert_eq!(apply_set(&current, &req, &OWN).unwrap_err().errno, EINVAL);
    }

    #[test]
    fn set_follows_wireguard_go_semantics() {
        let current = current();
        // `replace_peers` then the same key again (`wg setconf`): the peer
        // keeps its name, takes only what the request gives.
        let req = SetRequest {
            replace_peers: true,
            peers: vec![PeerChange {
                public_key: [2; 32],
                replace_allowed_ips: true,
                allowed_ips: vec![AllowedIpChange::Add("10.192.0.2/32".parse().unwrap())],
                ..Default::default()
            }],
            ..Default::default()
        };
        let next = apply_set(&current, &req, &OWN).unwrap();
        assert_eq!(
            next["peers"],
            json!([{"name": "client", "public_key": b64(&[2; 32]), "allowed_ips": ["10.192.0.2/32"]}])
        );
        // The interface's own key is ignored, as wireguard-go ignores it.
        let req = set(vec![PeerChange {
            public_key: OWN,
            allowed_ips: vec![AllowedIpChange::Add("10.192.0.7/32".parse().unwrap())],
            ..Default::default()
        }]);
        assert_eq!(apply_set(&current, &req, &OWN).unwrap(), current);
        // Removing one allowed IP (`wg set ... allowed-ips -10.192.0.2/32`),
        // written as the document has it or not.
        let req = set(vec![PeerChange {
            public_key: [2; 32],
            allowed_ips: vec![
                AllowedIpChange::Add("10.5.0.1/16".parse().unwrap()),
                AllowedIpChange::Remove("10.192.0.2/32".parse().unwrap()),
            ],
            ..Default::default()
        }]);
        let next = apply_set(&current, &req, &OWN).unwrap();
        assert_eq!(next["peers"][0]["allowed_ips"], json!(["10.5.0.1/16"]));
        let req = set(vec![PeerChange {
            public_key: [2; 32],
            allowed_ips: vec![AllowedIpChange::Remove("10.5.0.0/16".parse().unwrap())],
            ..Default::default()
        }]);
        assert_eq!(
            apply_set(&next, &req, &OWN).unwrap()["peers"][0]["allowed_ips"],
            json!([])
        );
        // A preshared key given, then cleared with zeros.
        let req = set(vec![PeerChange {
            public_key: [2; 32],
            preshared_key: Some(Some([5; 32])),
            ..Default::default()
        }]);
        let next = apply_set(&current, &req, &OWN).unwrap();
        assert_eq!(next["peers"][0]["preshared_key"], b64(&[5; 32]));
        let req = set(vec![PeerChange {
            public_key: [2; 32],
            preshared_key: Some(None),
            ..Default::default()
        }]);
        assert!(apply_set(&next, &req, &OWN).unwrap()["peers"][0]
            .get("preshared_key")
            .is_none());
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
        /// `set` applies to a document or is refused with EINVAL.
        #[test]
        fn requests_never_panic(
            op in prop_oneof![Just("set=1".to_string()), Just("get=1".to_string()), ".{0,8}"],
            lines in proptest::collection::vec(
                "(public_key|private_key|preshared_key|endpoint|allowed_ip|listen_port|fwmark|remove|update_only|replace_peers|replace_allowed_ips|persistent_keepalive_interval|protocol_version|x)=-?[0-9a-f:.\\[\\]/]{0,70}",
                0..12,
            ),
        ) {
            let text = format!("{op}\n{}\n\n", lines.join("\n"));
            if let Ok(Request::Set(req)) = parse(text.as_bytes()) {
                let doc = json!({"kind": "wireguard", "peers": [{"name": "a", "public_key": b64(&[2; 32])}]});
                match apply_set(&doc, &req, &[9; 32]) {
                    Ok(v) => prop_assert!(v["peers"].is_array()),
                    Err(e) => prop_assert_eq!(e.errno, EINVAL),
                }
            }
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }
    }
}
