//! Tenant isolation with real clients: door users are held to the address
//! actually dialed (every spelling of a refused address is refused), the
//! host's loopback, link-local and admin addresses and other tenants'
//! listeners are off limits by default, `kind: policy` decides every
//! on-ramp and revokes open flows, and the audit trail validates against
//! its schema and cannot be forged.
//!
//! meshgate runs inside a network namespace whose loopback also holds an
//! "ordinary" address (10.1.0.7, 10.1.0.8, 10.1.0.9) and the cloud metadata
//! address (169.254.169.254), so every probe has a real listener behind it
//! and a positive control showing it would have been seen.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{can_netns, Netns, NsMeshgate};
use common::{have, wait_until};

/// Raw SOCKS5 and UDP probes, run inside the namespace.
const PROBE: &str = r#"
import socket, struct, sys, time
def socks(port, user=None, pw=None):
    c = socket.create_connection(('127.0.0.1', port), timeout=5)
    if user is None:
        c.sendall(b'\x05\x01\x00'); assert c.recv(2) == b'\x05\x00'
    else:
        c.sendall(b'\x05\x01\x02'); assert c.recv(2) == b'\x05\x02'
        u, p = user.encode('latin-1'), pw.encode()
        c.sendall(b'\x01' + bytes([len(u)]) + u + bytes([len(p)]) + p)
        if c.recv(2)[1:] != b'\x00':
            return None
    return c
cmd = sys.argv[1]
if cmd == 'connect':
    # connect SOCKSPORT DOMAIN PORT: the reply code for a domain request
    c = socks(int(sys.argv[2]))
    d = sys.argv[3].encode()
    c.sendall(b'\x05\x01\x00\x03' + bytes([len(d)]) + d + struct.pack('>H', int(sys.argv[4])))
    r = c.recv(10)
    print(r[1])
elif cmd == 'badauth':
    # badauth SOCKSPORT USER: a failed login with that user name
    print(socks(int(sys.argv[2]), sys.argv[3].encode().decode('unicode_escape'), 'nope'))
elif cmd == 'udp':
    # udp SOCKSPORT IP PORT [USER PASS]: one datagram through UDP ASSOCIATE; the answer or 'none'
    c = socks(int(sys.argv[2]), *sys.argv[5:7])
    c.sendall(b'\x05\x03\x00\x01' + bytes(4) + bytes(2))
    r = c.recv(10); assert r[1] == 0, r
    relay = (socket.inet_ntoa(r[4:8]), struct.unpack('>H', r[8:10])[0])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1.5)
    head = b'\x00\x00\x00\x01' + socket.inet_aton(sys.argv[3]) + struct.pack('>H', int(sys.argv[4]))
    got = 'none'
    for i in range(3):
        u.sendto(head + b'ping', relay)
        try:
            d, _ = u.recvfrom(2048); got = d[10:].decode(); break
        except socket.timeout:
            pass
    print(got)
elif cmd == 'udpmany':
    # udpmany SOCKSPORT IP FIRSTPORT N ECHOPORT: one association writes to N
    # destinations, then to the echo; the echo's answer or 'none'
    c = socks(int(sys.argv[2]))
    c.sendall(b'\x05\x03\x00\x01' + bytes(4) + bytes(2))
    r = c.recv(10); assert r[1] == 0, r
    relay = (socket.inet_ntoa(r[4:8]), struct.unpack('>H', r[8:10])[0])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
    ip = socket.inet_aton(sys.argv[3])
    for p in range(int(sys.argv[4]), int(sys.argv[4]) + int(sys.argv[5])):
        u.sendto(b'\x00\x00\x00\x01' + ip + struct.pack('>H', p) + b'x', relay)
        if p % 100 == 0:
            time.sleep(0.05)
    got = 'none'
    for i in range(3):
        u.sendto(b'\x00\x00\x00\x01' + ip + struct.pack('>H', int(sys.argv[6])) + b'ping', relay)
        try:
            d, _ = u.recvfrom(2048); got = d[10:].decode(); break
        except socket.timeout:
            pass
    print(got)
elif cmd == 'udpdirect':
    # udpdirect IP PORT: one datagram to a UDP socket; the answer or 'none'
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1.5)
    got = 'none'
    for i in range(3):
        u.sendto(b'ping', (sys.argv[2], int(sys.argv[3])))
        try:
            d, _ = u.recvfrom(2048); got = d.decode(); break
        except socket.timeout:
            pass
    print(got)
elif cmd == 'http':
    # http IP PORT BODY: answers every request with BODY
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            b = sys.argv[4].encode()
            self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers(); self.wfile.write(b)
        def log_message(self, *a): pass
    http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), H).serve_forever()
elif cmd == 'slow':
    # slow IP PORT: a download that trickles for a minute
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header('Content-Length', str(600 * 1024)); self.end_headers()
            try:
                for i in range(600):
                    self.wfile.write(b'x' * 1024); self.wfile.flush(); time.sleep(0.1)
            except OSError:
                pass  # the client went away (a revoked flow)
        def log_message(self, *a): pass
    http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), H).serve_forever()
elif cmd == 'echo':
    # echo IP PORT: a UDP echo
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[2], int(sys.argv[3])))
    while True:
        d, a = s.recvfrom(2048); s.sendto(b'echo:' + d, a)
"#;

struct World {
    ns: Netns,
    dir: tempfile::TempDir,
    probe: PathBuf,
}

impl World {
    /// A namespace with 10.1.0.7-9 and 169.254.169.254 on its loopback,
    /// HTTP on each (port 8080, answering its own address) and a UDP echo
    /// on 10.1.0.7:5300 and 10.1.0.8:5300.
    fn new(tag: &str) -> World {
        Self::with_audit(tag, true)
    }

    /// As [`World::new`]; `audit_file`: audit records go to `audit.jsonl`
    /// (else to the log).
    fn with_audit(tag: &str, audit_file: bool) -> World {
        let mut ns = Netns::new(tag);
        for a in ["10.1.0.7", "10.1.0.8", "10.1.0.9", "169.254.169.254"] {
            ns.sh(&format!("ip addr add {a}/32 dev lo"));
        }
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join("probe.py");
        std::fs::write(&probe, PROBE).unwrap();
        for a in ["10.1.0.7", "10.1.0.8", "169.254.169.254", "127.0.0.1"] {
            let mut c = ns.cmd("python3");
            c.arg(&probe)
                .args(["http", a, "8080", &format!("hello from {a}")]);
            ns.spawn(c);
        }
        let mut c = ns.cmd("python3");
        c.arg(&probe).args(["slow", "10.1.0.9", "8080"]);
        ns.spawn(c);
        for a in ["10.1.0.7", "10.1.0.8"] {
            let mut c = ns.cmd("python3");
            c.arg(&probe).args(["echo", a, "5300"]);
            ns.spawn(c);
        }
        let audit = if audit_file {
            format!("audit: {}\n", dir.path().join("audit.jsonl").display())
        } else {
            String::new()
        };
        std::fs::write(
            dir.path().join("meshgate.yaml"),
            format!("node: iso\nadmin: 127.0.0.1:9000\n{audit}"),
        )
        .unwrap();
        let w = World { ns, dir, probe };
        assert!(
            wait_until(Duration::from_secs(10), || w
                .ns
                .curl("http://10.1.0.7:8080/", 1)
                .0
                == 200
                && w.ns.curl("http://169.254.169.254:8080/", 1).0 == 200
                && w.ns.curl("http://127.0.0.1:8080/", 1).0 == 200),
            "backends did not come up"
        );
        w
    }

    fn doc(&self, tenant: &str, name: &str, text: &str) {
        let t = self.dir.path().join("tenants").join(tenant);
        std::fs::create_dir_all(&t).unwrap();
        let tmp = t.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, t.join(format!("{name}.yaml"))).unwrap();
    }

    fn start(&self) -> NsMeshgate {
        NsMeshgate::start(&self.ns, self.dir.path(), "127.0.0.1:9000")
    }

    fn probe(&self, args: &[&str]) -> String {
        let out = self
            .ns
            .cmd("python3")
            .arg(&self.probe)
            .args(args)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }

    /// curl inside the namespace: (exit code, HTTP status, stdout+headers, stderr).
    fn curl(&self, args: &[&str], url: &str) -> (i32, u16, String, String) {
        let out = self
            .ns
            .cmd("curl")
            .args(["-s", "-S", "-i", "--max-time", "5", "-w", "\n%{http_code}"])
            .args(args)
            .arg(url)
            .output()
            .unwrap();
        common::curl_result(&out)
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn ready() -> bool {
    can_netns() && have("curl") && have("python3")
}

#[test]
fn every_spelling_of_a_refused_address_is_refused_and_the_rest_works() {
    if !ready() {
        return;
    }
    let w = World::new("iso1");
    // The pattern users write: loopback and metadata rejected, the rest direct.
    w.doc(
        "acme",
        "lan",
        "kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: reject\n  - to: 169.254.0.0/16\n    via: reject\n  - to: \"*\"\n    via: direct\n",
    );
    w.doc("acme", "socks", "kind: socks\nlisten: 127.0.0.1:1080\n");
    w.doc("acme", "web", "kind: http_proxy\nlisten: 127.0.0.1:3128\n");
    let mg = w.start();

    // Positive controls: something answers at each refused address.
    assert_eq!(w.ns.curl("http://127.0.0.1:8080/", 2).0, 200);
    assert_eq!(w.ns.curl("http://127.0.0.1:9000/healthz", 2).0, 200);
    assert_eq!(w.ns.curl("http://169.254.169.254:8080/", 2).0, 200);
    // An allowed destination works through both doors in the same test.
    let (rc, status, body, err) = w.curl(
        &["--socks5-hostname", "127.0.0.1:1080"],
        "http://10.1.0.7:8080/",
    );
    assert_eq!((rc, status), (0, 200), "{err}\n{}", mg.log_text());
    assert!(body.contains("hello from 10.1.0.7"));
    let (rc, status, _, err) = w.curl(&["-x", "http://127.0.0.1:3128"], "http://10.1.0.7:8080/");
    assert_eq!((rc, status), (0, 200), "{err}");
    let (rc, status, _, err) = w.curl(
        &["-p", "-x", "http://127.0.0.1:3128"],
        "http://10.1.0.7:8080/",
    );
    assert_eq!((rc, status), (0, 200), "{err}");
    assert_eq!(w.probe(&["connect", "1080", "10.1.0.7", "8080"]), "0");

    // Every spelling of 127.0.0.1 (and the metadata address), as a SOCKS
    // domain the client sends verbatim: refused with 0x02 (not allowed).
    for host in [
        "localhost",
        "2130706433",
        "127.1",
        "0x7f.1",
        "0177.0.0.1",
        "127.0.0.1.",
        "::ffff:127.0.0.1",
        "::127.0.0.1",
        "LOCALHOST",
        "0.0.0.0",
        "::",
        "0",
        "169.254.169.254",
        "2852039166",
    ] {
        for port in ["8080", "9000"] {
            assert_eq!(
                w.probe(&["connect", "1080", host, port]),
                "2",
                "{host}:{port} was not refused\n{}",
                mg.log_text()
            );
        }
    }
    // curl's own ways of asking.
    for url in [
        "http://localhost:8080/",
        "http://127.1:8080/",
        "http://2130706433:8080/",
        "http://[::ffff:127.0.0.1]:8080/",
        "http://0.0.0.0:8080/",
        "http://169.254.169.254:8080/",
    ] {
        let (rc, _, _, err) = w.curl(&["--socks5-hostname", "127.0.0.1:1080"], url);
        assert_eq!(rc, 97, "{url}: {err}");
        assert!(err.contains("(2)"), "{url}: {err}");
        let (rc, status, head, err) = w.curl(&["-x", "http://127.0.0.1:3128"], url);
        assert_eq!((rc, status), (0, 403), "{url}: {head}{err}");
        let lower = head.to_lowercase();
        assert!(
            lower.contains("x-meshgate-reason: rejected")
                || lower.contains("x-meshgate-reason: forbidden"),
            "{url}: {head}"
        );
        let (rc, _, _, err) = w.curl(&["-p", "-x", "http://127.0.0.1:3128"], url);
        assert_ne!(rc, 0, "{url}");
        assert!(err.contains("403"), "{url}: {err}");
    }
    // Counted, with the reason.
    for reason in ["rejected", "unspecified"] {
        let series = format!(
            "meshgate_dial_errors_total{{tenant=\"acme\",instance=\"socks\",reason=\"{reason}\"}}"
        );
        assert!(mg.metric(&w.ns, &series) >= 1.0, "{series}");
    }
    // Audited: every refusal is a record that names what refused it.
    let audit = w.audit();
    assert!(
        audit.iter().any(|r| r["end"] == "forbidden"
            && r["forbidden"] == "unspecified"
            && r["onramp"]["kind"] == "socks"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|r| r["end"] == "rejected" && r["requested"] == "2130706433:9000"),
        "{audit:?}"
    );
}

#[test]
fn a_tenant_without_a_vnet_keeps_door_users_off_the_host() {
    if !ready() {
        return;
    }
    let w = World::new("iso2");
    // acme has no vnet at all; beta has a pipe on 127.0.0.1:7000 and a
    // SOCKS door with a route that names loopback.
    w.doc("acme", "socks", "kind: socks\nlisten: 127.0.0.1:1080\n");
    w.doc(
        "beta",
        "app",
        "kind: pipe\nlisten: 127.0.0.1:7000\nremote: 10.1.0.8:8080\n",
    );
    w.doc(
        "beta",
        "lan",
        "kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n  - to: \"*\"\n    via: direct\n",
    );
    w.doc("beta", "socks", "kind: socks\nlisten: 127.0.0.1:1081\n");
    let mg = w.start();
    let via =
        |socks: &str, url: &str| w.curl(&["--socks5-hostname", &format!("127.0.0.1:{socks}")], url);

    // An ordinary address: reached.
    let (rc, status, body, err) = via("1080", "http://10.1.0.7:8080/");
    assert_eq!((rc, status), (0, 200), "{err}\n{}", mg.log_text());
    assert!(body.contains("hello from 10.1.0.7"));

    // The admin API: there (positive control), not through acme's door,
    // nor through beta's, whose loopback route does not open it.
    assert_eq!(w.ns.curl("http://127.0.0.1:9000/api/v1/flows", 2).0, 200);
    for socks in ["1080", "1081"] {
        let (rc, _, _, err) = via(socks, "http://127.0.0.1:9000/api/v1/flows");
        assert_eq!(rc, 97, "{socks}: the admin API was reachable: {err}");
        let (rc, _, _, err) = via(socks, "http://localhost:9000/api/v1/flows");
        assert_eq!(rc, 97, "{socks}: {err}");
    }
    // beta's listener: beta's own door reaches it (the probe works), acme's does not.
    let (rc, status, body, err) = via("1081", "http://127.0.0.1:7000/");
    assert_eq!((rc, status), (0, 200), "{err}\n{}", mg.log_text());
    assert!(body.contains("hello from 10.1.0.8"));
    let (rc, _, _, err) = via("1080", "http://127.0.0.1:7000/");
    assert_eq!(rc, 97, "acme reached beta's listener: {err}");
    // Cloud metadata: there, but not for acme's users.
    assert_eq!(w.ns.curl("http://169.254.169.254:8080/", 2).0, 200);
    let (rc, _, _, err) = via("1080", "http://169.254.169.254:8080/");
    assert_eq!(rc, 97, "{err}");
    // And a plain loopback service (no meshgate listener): not for acme.
    let (rc, _, _, err) = via("1080", "http://127.0.0.1:8080/");
    assert_eq!(rc, 97, "{err}");
    let (rc, status, _, err) = via("1081", "http://127.0.0.1:8080/");
    assert_eq!((rc, status), (0, 200), "{err}");

    let m = |reason: &str| {
        mg.metric(
            &w.ns,
            &format!("meshgate_dial_errors_total{{tenant=\"acme\",instance=\"socks\",reason=\"{reason}\"}}"),
        )
    };
    assert!(m("loopback") >= 3.0, "{}", mg.log_text());
    assert!(m("link_local") >= 1.0);
    assert!(
        mg.metric(
            &w.ns,
            "meshgate_dial_errors_total{tenant=\"beta\",instance=\"socks\",reason=\"admin\"}"
        ) >= 2.0
    );
}

/// The configured SSH door's document, its key and a client key, or None
/// without OpenSSH.
fn ssh_setup(w: &World) -> Option<PathBuf> {
    if !have("ssh") || !have("ssh-keygen") {
        return None;
    }
    let (key, public) = common::ssh_keygen(w.dir.path(), "alice");
    w.doc(
        "acme",
        "door",
        &format!(
            "kind: ssh\nlisten: 127.0.0.1:2222\nhost_key_file: {}\nauthorized_keys:\n  - {public}\n",
            w.dir.path().join("host_key").display()
        ),
    );
    Some(key)
}

/// `ssh` inside the namespace with `key` to the door on 127.0.0.1:2222,
/// logging at `level` (DEBUG1 shows why a channel was refused).
fn ssh_in(w: &World, key: &Path, level: &str) -> Command {
    let mut c = w.ns.cmd("ssh");
    c.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        &format!("LogLevel={level}"),
        "-o",
        "ExitOnForwardFailure=yes",
        "-p",
        "2222",
        "-i",
    ])
    .arg(key);
    c
}

fn ssh_w(w: &World, key: &Path, target: &str) -> (bool, String) {
    let out = ssh_in(w, key, "DEBUG1")
        .args(["-W", target, "alice@127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_policy_decides_every_on_ramp_revokes_open_flows_and_is_audited() {
    if !ready() {
        return;
    }
    let w = World::new("iso3");
    // acme: 10.1.0.7 is denied to everyone, 10.1.0.8 is allowed, a dry-run
    // rule would deny 10.1.0.8:8080 to SOCKS; downloads from 10.1.0.9 are
    // allowed by a rule we remove while one runs.
    let policy = |with_downloads: bool| {
        format!(
            "kind: policy\nrules:\n  - name: no-db\n    action: deny\n    to: [10.1.0.7/32]\n  - name: lan\n    action: allow\n    to: [10.1.0.8]\n    protocols: [tcp, udp]\n  - name: trial\n    action: deny\n    dry_run: true\n    doors: [socks]\n    to: [10.1.0.8/32]\n    ports: [8080]\n{}",
            if with_downloads {
                "  - name: downloads\n    action: allow\n    to: [10.1.0.9]\n    ports: [\"8000-8099\"]\n"
            } else {
                ""
            }
        )
    };
    w.doc("acme", "policy", &policy(true));
    w.doc(
        "acme",
        "socks",
        "kind: socks\nlisten: 127.0.0.1:1080\nusers:\n  - name: alice\n    password: pw\n",
    );
    w.doc("acme", "web", "kind: http_proxy\nlisten: 127.0.0.1:3128\n");
    w.doc(
        "acme",
        "udp7",
        "kind: pipe\nprotocol: udp\nlisten: 127.0.0.1:6007\nremote: 10.1.0.7:5300\n",
    );
    w.doc(
        "acme",
        "udp8",
        "kind: pipe\nprotocol: udp\nlisten: 127.0.0.1:6008\nremote: 10.1.0.8:5300\n",
    );
    // beta uses the same 10.1.0.0/16 and has no policy.
    w.doc("beta", "socks", "kind: socks\nlisten: 127.0.0.1:1081\n");
    let key = ssh_setup(&w);
    let mg = w.start();
    let socks = |port: &str, url: &str| {
        w.curl(
            &["--socks5-hostname", &format!("alice:pw@127.0.0.1:{port}")],
            url,
        )
    };

    // SOCKS TCP: denied (0x02) and allowed, side by side; beta's door
    // reaches the same address (different tenant, different verdict).
    let (rc, _, _, err) = socks("1080", "http://10.1.0.7:8080/");
    assert_eq!(rc, 97, "{err}\n{}", mg.log_text());
    assert!(err.contains("(2)"), "{err}");
    let (rc, status, _, err) = socks("1080", "http://10.1.0.8:8080/");
    assert_eq!((rc, status), (0, 200), "{err}\n{}", mg.log_text());
    let (rc, status, body, err) = socks("1081", "http://10.1.0.7:8080/");
    assert_eq!((rc, status), (0, 200), "beta: {err}");
    assert!(body.contains("hello from 10.1.0.7"));
    // SOCKS UDP: the denied destination gets no answer, the allowed one does.
    assert_eq!(w.probe(&["udpdirect", "10.1.0.7", "5300"]), "echo:ping");
    assert_eq!(w.probe(&["udp", "1081", "10.1.0.7", "5300"]), "echo:ping");
    assert_eq!(
        w.probe(&["udp", "1080", "10.1.0.8", "5300", "alice", "pw"]),
        "echo:ping"
    );
    assert_eq!(
        w.probe(&["udp", "1080", "10.1.0.7", "5300", "alice", "pw"]),
        "none"
    );
    // HTTP forward and CONNECT.
    let (rc, status, head, _) = w.curl(&["-x", "http://127.0.0.1:3128"], "http://10.1.0.7:8080/");
    assert_eq!((rc, status), (0, 403), "{head}");
    assert!(
        head.to_lowercase().contains("x-meshgate-reason: denied"),
        "{head}"
    );
    let (rc, _, _, err) = w.curl(
        &["-p", "-x", "http://127.0.0.1:3128"],
        "http://10.1.0.7:8080/",
    );
    assert_ne!(rc, 0);
    assert!(err.contains("403"), "{err}");
    let (rc, status, _, err) = w.curl(
        &["-p", "-x", "http://127.0.0.1:3128"],
        "http://10.1.0.8:8080/",
    );
    assert_eq!((rc, status), (0, 200), "{err}");
    // UDP pipes (operator-written remotes are still decided by policy).
    assert_eq!(w.probe(&["udpdirect", "127.0.0.1", "6008"]), "echo:ping");
    assert_eq!(w.probe(&["udpdirect", "127.0.0.1", "6007"]), "none");
    // SSH -W: OpenSSH says "administratively prohibited".
    if let Some(key) = &key {
        let (ok, err) = ssh_w(&w, key, "10.1.0.7:8080");
        assert!(!ok);
        assert!(err.contains("administratively prohibited"), "{err}");
    }
    let denied = |instance: &str| {
        mg.metric(
            &w.ns,
            &format!("meshgate_rejected_total{{tenant=\"acme\",instance=\"{instance}\",reason=\"denied\"}}"),
        )
    };
    for instance in ["socks", "web", "udp7"] {
        assert!(denied(instance) >= 1.0, "{instance}\n{}", mg.log_text());
    }
    if key.is_some() {
        assert!(denied("door") >= 1.0);
    }
    assert!(
        mg.metric(
            &w.ns,
            "meshgate_policy_decisions_total{tenant=\"acme\",instance=\"socks\",rule=\"no-db\",result=\"deny\"}"
        ) >= 1.0
    );
    // `meshgatectl policy test` says which rule decides, and exits 3 on deny.
    let ctl = |args: &[&str]| {
        let out =
            w.ns.cmd(env!("CARGO_BIN_EXE_meshgatectl"))
                .args(["--admin", "127.0.0.1:9000"])
                .args(args)
                .output()
                .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let test = |to: &str| {
        ctl(&[
            "policy",
            "test",
            "acme",
            "--from",
            "127.0.0.1",
            "--to",
            to,
            "--door",
            "socks",
            "--user",
            "alice",
        ])
    };
    let (code, out) = test("10.1.0.7:8080");
    assert_eq!(code, Some(3), "{out}");
    assert!(out.starts_with("deny: policy rule `no-db`"), "{out}");
    let (code, out) = test("10.1.0.8:8080");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("rule:  lan"), "{out}");
    assert!(out.contains("dry run: rule `trial` would deny"), "{out}");
    let (code, out) = test("192.0.2.1:80");
    assert_eq!(code, Some(3), "{out}");
    assert!(out.starts_with("deny: policy default deny"), "{out}");
    // Dry run: counted and logged, not enforced (10.1.0.8:8080 worked).
    assert!(
        mg.metric(
            &w.ns,
            "meshgate_policy_decisions_total{tenant=\"acme\",instance=\"socks\",rule=\"trial\",result=\"dry_run_deny\"}"
        ) >= 1.0,
        "{}",
        mg.log_text()
    );
    assert!(mg.log_text().contains("dry-run policy rule would change"));

    // Revocation: a live download loses its allow rule and ends within 1 s.
    let mut dl =
        w.ns.cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "60",
                "--socks5-hostname",
                "alice:pw@127.0.0.1:1080",
                "http://10.1.0.9:8080/",
            ])
            .spawn()
            .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            w.ns.curl("http://127.0.0.1:9000/api/v1/flows", 2)
                .1
                .contains("10.1.0.9:8080")
        }),
        "the download did not start\n{}",
        mg.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(dl.try_wait().unwrap().is_none(), "the download ended early");
    // `meshgatectl flows` shows the verdict and the rule that allowed it.
    let (_, out) = ctl(&["flows", "--tenant", "acme"]);
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.contains("VERDICT") && header.contains("RULE"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.contains("10.1.0.9:8080"))
        .expect(&out);
    assert!(
        row.contains("allow") && row.contains("downloads") && row.contains("alice"),
        "{row}"
    );
    let t0 = Instant::now();
    w.doc("acme", "policy", &policy(false));
    let ended = wait_until(Duration::from_secs(5), || dl.try_wait().unwrap().is_some());
    let took = t0.elapsed();
    let _ = dl.kill();
    assert!(ended, "the download outlived its rule\n{}", mg.log_text());
    eprintln!("download closed {took:?} after the policy file changed");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(
        mg.metric(
            &w.ns,
            "meshgate_rejected_total{tenant=\"acme\",instance=\"socks\",reason=\"policy_revoked\"}"
        ) >= 1.0
    );

    // The audit trail: every record validates against the schema, the
    // revoked flow and a denied one name their rule.
    assert!(wait_until(Duration::from_secs(3), || w
        .audit()
        .iter()
        .any(|r| r["end"] == "policy_revoked")));
    let audit = w.audit();
    let revoked = audit.iter().find(|r| r["end"] == "policy_revoked").unwrap();
    assert_eq!(revoked["identity"], "alice");
    assert_eq!(revoked["dialed"], "10.1.0.9:8080");
    assert!(audit
        .iter()
        .any(|r| r["end"] == "denied" && r["rule"] == "no-db" && r["onramp"]["kind"] == "pipe"));
    validate_schema(&w.dir.path().join("audit.jsonl"));
}

/// Validates every line of `jsonl` against docs/audit.schema.json with
/// Python's `jsonschema` (Debian's python3-jsonschema).
fn validate_schema(jsonl: &Path) {
    let check = Command::new("python3")
        .args(["-c", "import jsonschema"])
        .status()
        .unwrap();
    if !check.success() {
        assert!(
            std::env::var("MESHGATE_REQUIRE_TOOLS").is_err(),
            "python3-jsonschema is required (MESHGATE_REQUIRE_TOOLS=1): run scripts/test.sh to install it"
        );
        return;
    }
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/audit.schema.json");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json,sys,jsonschema\nschema=json.load(open(sys.argv[1]))\nv=jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())\nn=0\nfor line in open(sys.argv[2]):\n    v.validate(json.loads(line)); n+=1\nprint(n)",
        ])
        .arg(&schema)
        .arg(jsonl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit records do not validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(n >= 5, "{n} records");
}

#[test]
fn client_strings_cannot_forge_log_lines() {
    if !ready() {
        return;
    }
    let w = World::with_audit("iso4", false);
    w.doc(
        "acme",
        "socks",
        "kind: socks\nlisten: 127.0.0.1:1080\nusers:\n  - name: alice\n    password: pw\n",
    );
    w.doc("acme", "open", "kind: socks\nlisten: 127.0.0.1:1081\n");
    let mg = w.start();
    let forged = "2026-12-02T00:00:00.000000Z  INFO meshgate::audit: flow ended tenant=acme identity=\"root\"";
    // A user name and a domain that carry CR/LF and a whole audit line.
    let user = format!("eve\\r\\n{forged}\\r\\n");
    assert_eq!(w.probe(&["badauth", "1080", &user]), "None");
    let domain = format!("x\r\n{forged}\n.example");
    let rep = w.probe(&["connect", "1081", &domain, "80"]);
    assert_ne!(rep, "0", "{rep}");
    // The probes were seen (positive control), on one line each.
    assert!(wait_until(Duration::from_secs(3), || {
        let log = mg.log_text();
        log.contains("auth_failed") || log.contains("SOCKS handshake refused")
    }));
    assert!(wait_until(Duration::from_secs(3), || mg
        .log_text()
        .contains("flow ended")));
    let log = mg.log_text();
    assert!(
        log.contains("2026-12-02T00:00:00.000000Z"),
        "the probe's text is logged, escaped:\n{log}"
    );
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-12-02T00:00:00"),
            "a client forged a log line: {line}\n{log}"
        );
        assert!(!line.contains('\r'), "a raw CR in the log: {line:?}");
    }
}

/// `ssh -R`: connections to a published listener are flows of the SSH
/// user's identity; a policy added while one is open closes it, and new
/// ones are refused, while the same probe passed before the rule.
#[test]
fn a_policy_decides_ssh_remote_forwards() {
    if !ready() || !have("ssh") || !have("ssh-keygen") {
        return;
    }
    let w = World::new("iso5");
    let key = ssh_setup(&w).unwrap();
    let mg = w.start();
    let mut fwd = ssh_in(&w, &key, "ERROR")
        .args([
            "-N",
            "-R",
            "127.0.0.1:7100:10.1.0.9:8080",
            "alice@127.0.0.1",
        ])
        .spawn()
        .unwrap();
    // A slow download through the -R listener: allowed for now.
    let start_download = || {
        w.ns.cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "60",
                "http://127.0.0.1:7100/",
            ])
            .spawn()
            .unwrap()
    };
    assert!(
        // The slow backend answers 200 at once, then trickles: a transfer
        // cut off after 1 s still shows its status.
        wait_until(Duration::from_secs(10), || w
            .ns
            .curl("http://127.0.0.1:7100/", 1)
            .0
            == 200),
        "the -R listener does not forward\n{}",
        mg.log_text()
    );
    let mut dl = start_download();
    assert!(wait_until(Duration::from_secs(5), || w
        .ns
        .curl("http://127.0.0.1:9000/api/v1/flows", 2)
        .1
        .contains("ssh -R 127.0.0.1:7100")));
    assert!(dl.try_wait().unwrap().is_none());
    let t0 = Instant::now();
    w.doc(
        "acme",
        "policy",
        "kind: policy\nrules:\n  - name: no-reverse\n    action: deny\n    doors: [ssh]\n    identities: [alice]\n    ports: [7100]\n",
    );
    assert!(
        wait_until(Duration::from_secs(5), || dl.try_wait().unwrap().is_some()),
        "the -R connection outlived the rule\n{}",
        mg.log_text()
    );
    eprintln!(
        "-R download closed {:?} after the policy file changed",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_millis(1500));
    // New connections are refused: the listener accepts and closes them.
    assert_eq!(w.ns.curl("http://127.0.0.1:7100/", 2).0, 0);
    assert!(
        mg.metric(
            &w.ns,
            "meshgate_rejected_total{tenant=\"acme\",instance=\"door\",reason=\"denied\"}"
        ) >= 1.0,
        "{}",
        mg.log_text()
    );
    let _ = fwd.kill();
    let _ = fwd.wait();
}

/// One SOCKS5 UDP ASSOCIATE writing to 1,000 destinations under
/// `ulimit -n 1024`: one socket per association (not per destination), so
/// the association still gets its answers and another tenant's door keeps
/// accepting.
#[test]
fn a_udp_associate_to_a_thousand_destinations_takes_one_socket() {
    if !ready() {
        return;
    }
    let w = World::new("iso6");
    w.doc("acme", "socks", "kind: socks\nlisten: 127.0.0.1:1080\n");
    w.doc("beta", "socks", "kind: socks\nlisten: 127.0.0.1:1081\n");
    let mg = NsMeshgate::start_wrapped(
        &w.ns,
        &["sh", "-c", "ulimit -n 1024 && exec \"$0\" \"$@\""],
        w.dir.path(),
        "127.0.0.1:9000",
    );
    assert!(mg.log_text().contains("hard=1024"), "{}", mg.log_text());
    assert_eq!(
        w.probe(&["udpmany", "1080", "10.1.0.7", "20000", "1000", "5300"]),
        "echo:ping",
        "{}",
        mg.log_text()
    );
    // Another tenant's door still accepts and dials.
    let (rc, status, _, err) = w.curl(
        &["--socks5-hostname", "127.0.0.1:1081"],
        "http://10.1.0.8:8080/",
    );
    assert_eq!((rc, status), (0, 200), "{err}\n{}", mg.log_text());
    assert!(
        !mg.log_text().contains("Too many open files"),
        "{}",
        mg.log_text()
    );
    // The 1,001 destinations were flows of the one association.
    let flows = mg.metric(
        &w.ns,
        "meshgate_connections_total{tenant=\"acme\",instance=\"socks\"}",
    );
    assert!(flows >= 1001.0, "{flows} flows");
}
