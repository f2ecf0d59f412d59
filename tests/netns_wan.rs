//! Transfers across a lossy, delayed path (root): meshgate client and server
//! in two namespaces whose WireGuard datagrams cross `bench/wanrelay` (10 ms
//! each way, 0.5 % random loss, a 1 Gbit/s bottleneck) in a third. A
//! stream goes through a pipe pair and must arrive whole: byte count and
//! sha256 checked on the far side, with each engine.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::netns::*;
use common::*;

/// Builds the relay (a std-only crate beside the benchmarks) once.
fn relay_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let manifest = root.join("bench/wanrelay/Cargo.toml");
    let target = root.join("bench/wanrelay/target");
    // Its own target directory, whatever CARGO_TARGET_DIR says.
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .status()
        .unwrap()
        .success();
    assert!(ok, "building bench/wanrelay failed");
    let bin = target.join("release/wanrelay");
    assert!(bin.exists(), "no relay at {}", bin.display());
    bin
}

/// A meshgate node's config: WireGuard plus one pipe.
fn node(engine: &str, wg: &str, pipe: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("meshgate.yaml"),
        format!("admin: 127.0.0.1:9000\ndrain_timeout: 1s\nengine: {engine}\n"),
    )
    .unwrap();
    std::fs::create_dir_all(d.path().join("tenants/default")).unwrap();
    std::fs::write(d.path().join("tenants/default/wg0.yaml"), wg).unwrap();
    std::fs::write(d.path().join("tenants/default/pipe.yaml"), pipe).unwrap();
    d
}

/// `python3 -c RECEIVER HOST PORT`: prints "ready", then the byte count
/// and sha256 of one connection's stream.
const RECEIVER: &str = r#"
import hashlib, socket, sys
socket.setdefaulttimeout(120)  # a stall fails the test instead of hanging it
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(1)
print("ready", flush=True)
c, _ = l.accept()
h = hashlib.sha256()
n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d)
    n += len(d)
c.close()
print(n, h.hexdigest(), flush=True)
"#;

/// `python3 -c SENDER BYTES HOST PORT`: sends BYTES, prints the count and
/// sha256 once the peer has closed.
const SENDER: &str = r#"
import hashlib, os, socket, sys
socket.setdefaulttimeout(120)  # a stall fails the test instead of hanging it
total = int(sys.argv[1])
s = socket.create_connection((sys.argv[2], int(sys.argv[3])))
h = hashlib.sha256()
block = bytearray(os.urandom(1 << 20))
sent = 0
i = 0
while sent < total:
    block[:8] = i.to_bytes(8, "little")
    chunk = bytes(block[: min(len(block), total - sent)])
    s.sendall(chunk)
    h.update(chunk)
    sent += len(chunk)
    i += 1
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(sent, h.hexdigest(), flush=True)
"#;

/// Three namespaces: A and B, and R between them running the relay
/// (10 ms each way, 0.5 % loss, 1 Gbit/s): A reaches B's WireGuard port
/// 51830 at 10.234.1.2:40000.
fn lossy_path() -> (Netns, Netns, Netns) {
    let relay = relay_binary();
    let a = Netns::new("wa");
    let b = Netns::new("wb");
    let mut r = Netns::new("wr");
    link(&a, "10.234.1.1/24", &r, "10.234.1.2/24");
    link(&r, "10.234.2.2/24", &b, "10.234.2.1/24");
    let mut relay_cmd = r.cmd(&relay);
    relay_cmd
        .args(["--listen", "10.234.1.2:40000", "--to", "10.234.2.1:51830"])
        .args([
            "--delay", "10ms", "--loss", "0.5%", "--rate", "1gbit", "--queue", "1m",
        ])
        .stdout(Stdio::piped());
    let relay_proc = r.spawn(relay_cmd);
    let mut ready = String::new();
    BufReader::new(relay_proc.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready", "the relay did not start");
    (a, b, r)
}

/// Sends `bytes` from namespace `from` to `host:port`, where a receiver in
/// `to` listens on `listen`; returns what the sender and the receiver saw,
/// and the seconds it took.
fn stream(
    from: &Netns,
    host: &str,
    port: u16,
    to: &mut Netns,
    listen: (&str, u16),
    bytes: u64,
) -> (String, String, f64) {
    let mut recv = to.cmd("python3");
    recv.args(["-c", RECEIVER, listen.0, &listen.1.to_string()])
        .stdout(Stdio::piped());
    let receiver = to.spawn(recv);
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let start = Instant::now();
    let sent = from
        .cmd("python3")
        .args(["-c", SENDER, &bytes.to_string(), host, &port.to_string()])
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        sent.status.success(),
        "sender: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    (
        String::from_utf8_lossy(&sent.stdout).trim().to_string(),
        line.trim().to_string(),
        secs,
    )
}

/// The far node in B: WireGuard on port 51830 (10.192.0.1/24) with one
/// peer at 10.192.0.2, and a pipe from 10.192.0.1:5201 in the tunnel to a
/// receiver on B's 127.0.0.1:5202.
fn server_node(
    engine: &str,
    key: &meshgate::core::keys::PrivateKey,
    peer: &str,
) -> tempfile::TempDir {
    node(
        engine,
        &format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: 51830\naddress: 10.192.0.1/24\nuapi: off\n\
             peers:\n  - name: peer\n    public_key: {peer}\n    allowed_ips: [10.192.0.2/32]\n",
            key.to_base64(),
        ),
        "kind: pipe\nlisten: 10.192.0.1:5201\nlisten_via: wg0\nremote: 127.0.0.1:5202\n",
    )
}

/// Sends `bytes` through meshgate with `engine` across the lossy path;
/// returns what the sender and the receiver saw, and the seconds it took.
fn transfer(engine: &str, bytes: u64) -> (String, String, f64) {
    let (a, mut b, _r) = lossy_path();
    let ks = meshgate::core::keys::PrivateKey::generate();
    let kc = meshgate::core::keys::PrivateKey::generate();
    let server = server_node(engine, &ks, &kc.public_key().to_string());
    let client = node(
        engine,
        &format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.192.0.2/32\nuapi: off\n\
             peers:\n  - name: server\n    public_key: {}\n    endpoint: 10.234.1.2:40000\n    persistent_keepalive: 5\n    allowed_ips: [10.192.0.0/24]\n",
            kc.to_base64(),
            ks.public_key()
        ),
        "kind: pipe\nlisten: 127.0.0.1:5201\nvia: wg0\nremote: 10.192.0.1:5201\n",
    );
    let _ms = NsMeshgate::start(&b, server.path(), "127.0.0.1:9000");
    let _mc = NsMeshgate::start(&a, client.path(), "127.0.0.1:9000");
    stream(&a, "127.0.0.1", 5201, &mut b, ("127.0.0.1", 5202), bytes)
}

fn ready() -> bool {
    can_netns() && have("python3")
}

/// Bytes to send: 1 GB (`MESHGATE_WAN_BYTES` changes it).
fn wan_bytes() -> u64 {
    std::env::var("MESHGATE_WAN_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000_000)
}

/// Sends a gigabyte through `engine` and checks it arrived intact.
fn a_gigabyte_crosses(engine: &str) {
    let bytes = wan_bytes();
    let (sent, received, secs) = transfer(engine, bytes);
    assert!(sent.starts_with(&format!("{bytes} ")), "{sent}");
    assert_eq!(sent, received, "the far side got other bytes");
    eprintln!(
        "{engine} engine: {bytes} bytes in {secs:.1} s ({:.0} Mbit/s) over 10 ms / 0.5 % loss",
        bytes as f64 * 8.0 / secs / 1e6
    );
}

#[test]
fn a_gigabyte_crosses_a_lossy_path_intact_with_the_kernel_engine() {
    if !ready() || !std::path::Path::new("/dev/net/tun").exists() {
        skip("needs root, python3 and /dev/net/tun");
        return;
    }
    a_gigabyte_crosses("kernel");
}

#[test]
fn a_gigabyte_crosses_a_lossy_path_intact_with_the_userspace_engine() {
    if !ready() {
        skip("needs root and python3");
        return;
    }
    a_gigabyte_crosses("userspace");
}

#[test]
fn linux_tcp_and_meshgate_tcp_interoperate_across_loss() {
    // A real Linux TCP (through wireguard-go) and meshgate's own TCP at
    // the two ends of the lossy path, each way: Linux sending to meshgate
    // (meshgate's receiver and SACK blocks), then meshgate sending to Linux
    // (meshgate's recovery from Linux's SACK blocks).
    if !ready() || !have("wireguard-go") || !have("wg") {
        skip("needs root, python3, wireguard-go and wg");
        return;
    }
    let (mut a, mut b, _r) = lossy_path();
    let ks = meshgate::core::keys::PrivateKey::generate();
    let wg = WgGo::new(&a, "10.192.0.2/24", None);
    wg.add_peer(
        &a,
        &ks.public_key().to_string(),
        "endpoint 10.234.1.2:40000 allowed-ips 10.192.0.0/24 persistent-keepalive 5",
    );
    let server = server_node("userspace", &ks, &wg.public_key());
    std::fs::write(
        server.path().join("tenants/default/back.yaml"),
        "kind: pipe\nlisten: 127.0.0.1:5203\nvia: wg0\nremote: 10.192.0.2:5204\n",
    )
    .unwrap();
    let _ms = NsMeshgate::start(&b, server.path(), "127.0.0.1:9000");
    let bytes = 100_000_000;
    for (what, (sent, received, secs)) in [
        (
            "Linux to meshgate",
            stream(&a, "10.192.0.1", 5201, &mut b, ("127.0.0.1", 5202), bytes),
        ),
        (
            "meshgate to Linux",
            stream(&b, "127.0.0.1", 5203, &mut a, ("10.192.0.2", 5204), bytes),
        ),
    ] {
        assert!(sent.starts_with(&format!("{bytes} ")), "{what}: {sent}");
        assert_eq!(sent, received, "{what}: the far side got other bytes");
        eprintln!(
            "{what}: {bytes} bytes in {secs:.1} s ({:.0} Mbit/s) over 10 ms / 0.5 % loss",
            bytes as f64 * 8.0 / secs / 1e6
        );
    }
}
