//! `meshgate run -- CMD` as an unprivileged user (nobody, with user
//! namespaces and a TUN it may open): CMD reaches nginx inside a tenant's
//! WireGuard site (a real wireguard-go peer in another namespace) by name,
//! runs as nobody with no capability, and reaches nothing the tenant's
//! vnet has no route for, although the host where meshgate runs reaches it.
//! Only that tenant's modules start, and the namespace goes with CMD.
//!
//! And a netns door in a serving node under a hostile program: refused
//! what it may not reach, held to its door's budget, counted, while
//! another tenant's traffic keeps flowing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::*;
use common::*;

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Helper processes of a namespace labelled `label` still running.
fn helpers(label: &str) -> usize {
    kernel_engine_helpers()
        .iter()
        .filter(|(_, cmdline)| cmdline.contains(label))
        .count()
}

#[test]
fn meshgate_run_reaches_a_wireguard_site_by_name_and_nothing_else() {
    if !need_root()
        || !can_netns()
        || !userns_allowed()
        || !have("wireguard-go")
        || !have("nginx")
        || !have("curl")
        || !have("setpriv")
    {
        skip("needs root, user namespaces, wireguard-go, nginx, curl, setpriv");
        return;
    }
    let mut site = Netns::new("rsite");
    let host = Netns::new("rhost");
    link(
        &host,
        "10.232.40.1/24,fd00:232::1/64",
        &site,
        "10.232.40.2/24,fd00:232::2/64",
    );
    let wg = WgGo::new(&site, "10.194.0.2/24", Some(51820));
    let _nginx = nginx_in(&mut site, "0.0.0.0:80", "inside the site\n");
    let _nginx6 = nginx_in(&mut site, "[::]:80", "inside the site\n");
    // A UDP echo in the site, for datagrams from inside.
    let mut echo = site.cmd("python3");
    echo.args([
        "-c",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 7007))\nwhile True:\n    d, a = s.recvfrom(2048)\n    s.sendto(d, a)\n",
    ]);
    site.spawn(echo);

    let key = meshgate::core::keys::PrivateKey::generate();
    let cfg = tempfile::tempdir().unwrap();
    let d = cfg.path();
    write(d, "meshgate.yaml", "admin: off\ndrain_timeout: 1s\n");
    write(
        d,
        "tenants/acme/corp.yaml",
        "kind: vnet\ndefault: true\nhosts:\n  nginx: 10.194.0.2\nroutes:\n  - to: fd00:232::/64\n    via: direct\n",
    );
    write(
        d,
        "tenants/acme/wg0.yaml",
        &format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.194.0.1/32\nvnet: corp\nuapi: off\npeers:\n  - name: site\n    public_key: {}\n    endpoint: 10.232.40.2:51820\n    allowed_ips: [10.194.0.0/24]\n    persistent_keepalive: 5\n",
            key.to_base64(),
            wg.public_key()
        ),
    );
    // Another tenant's pipe: `run --tenant acme` must not start it.
    write(
        d,
        "tenants/other/web.yaml",
        "kind: pipe\nlisten: 127.0.0.1:18181\nremote: 10.232.40.2:80\n",
    );
    wg.add_peer(
        &site,
        &key.public_key().to_string(),
        "allowed-ips 10.194.0.1/32",
    );
    open_to_all(d);
    // /dev/net/tun is 0600 root here: nobody gets its own open TUN node.
    let (_dev, wrapper) = tun_for_nobody();

    // The probe that must fail from inside first succeeds from the host
    // meshgate runs on.
    assert_eq!(
        host.curl("http://10.232.40.2/", 5),
        (200, "inside the site\n".to_string())
    );

    let inside = "\
        id -u; grep CapEff /proc/self/status; \
        for i in 1 2 3 4 5 6 7 8 9 10; do out=$(curl -s -m 3 http://nginx/) && break; sleep 1; done; \
        echo \"site: $out\"; \
        echo \"host: $(curl -s -m 5 -o /dev/null -w '%{http_code}' http://10.232.40.2/)\"; \
        echo \"v6: $(curl -g -s -m 5 'http://[fd00:232::2]/')\"; \
        python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.sendto(b'ping', ('nginx', 7007)); print('udp:', s.recvfrom(100)[0].decode())\"; \
        exit 7";
    let out = host
        .cmd("unshare")
        .args(["-m", "sh", "-c", &wrapper, "sh"])
        .arg(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--config-dir")
        .arg(d)
        .args(["run", "--tenant", "acme", "--", "sh", "-c", inside])
        .env("MESHGATE_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nlog:\n{log}");
    // CMD's status is meshgate's.
    assert_eq!(out.status.code(), Some(7), "{ctx}");
    let lines: Vec<&str> = stdout.lines().collect();
    // nobody, without a capability.
    assert_eq!(lines.first(), Some(&NOBODY), "{ctx}");
    assert_eq!(lines.get(1), Some(&"CapEff:\t0000000000000000"), "{ctx}");
    // By name, through the tenant's WireGuard site.
    assert!(stdout.contains("site: inside the site\n"), "{ctx}");
    assert!(
        log.contains("dst=\"nginx:80\"") && log.contains("dialed=Some(\"10.194.0.2:80\")"),
        "{ctx}"
    );
    // UDP too, by name, through the site's WireGuard, answered from the
    // address the program sent to (else the socket would not take it).
    assert!(stdout.contains("udp: ping\n"), "{ctx}");
    assert!(
        log.contains("protocol=udp") && log.contains("dst=\"nginx:7007\""),
        "{ctx}"
    );
    // IPv6 leaves the namespace too, where the vnet routes it (the site's
    // link address, `direct` from the host meshgate runs on).
    assert!(stdout.contains("v6: inside the site\n"), "{ctx}");
    assert!(log.contains("dst=\"[fd00:232::2]:80\""), "{ctx}");
    // The host's reach is not CMD's: no route in the vnet, refused.
    assert!(stdout.contains("host: 000\n"), "{ctx}");
    assert!(
        log.contains("dst=\"10.232.40.2:80\"") && log.contains("reason=no_route"),
        "{ctx}"
    );
    // Only acme started; the namespace went with CMD.
    assert!(
        log.contains("tenant=\"acme\" instance=meshgate-run kind=netns"),
        "{ctx}"
    );
    assert!(!log.contains("tenant=\"other\""), "{ctx}");
    assert_eq!(helpers("acme/meshgate-run"), 0);

    // What a user gets wrong is said: a tenant that is not there (naming
    // those that are), a command that is not there (127, as a shell says).
    let run = |tenant: &str, cmd: &str| {
        host.cmd("unshare")
            .args(["-m", "sh", "-c", &wrapper, "sh"])
            .arg(env!("CARGO_BIN_EXE_meshgate"))
            .arg("--config-dir")
            .arg(d)
            .args(["run", "--tenant", tenant, "--", cmd])
            .output()
            .unwrap()
    };
    let out = run("acmee", "true");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("has no tenant `acmee` (it has: acme, other)"),
        "{err}"
    );
    let out = run("acme", "/no/such/program");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{err}");
    assert!(err.contains("cannot run \"/no/such/program\""), "{err}");
    assert_eq!(helpers("acme/meshgate-run"), 0);
}

/// What a program in a netns door's namespace tries, in one run: another
/// tenant's listener, an unknown synthetic address, 300 connections held
/// open against a door of 100, a flood of DNS names. It is printed as JSON.
const HOSTILE: &str = r#"
import json, random, socket, string, sys, time
echo = (sys.argv[1], int(sys.argv[2]))
beta = (sys.argv[3], int(sys.argv[4]))
names = int(sys.argv[5])
out = {}
def echo_ok(addr, timeout=3):
    try:
        s = socket.create_connection(addr, timeout=timeout)
        s.settimeout(timeout)
        s.sendall(b'x')
        ok = s.recv(1) == b'x'
        s.close()
        return ok
    except OSError:
        return False
def query(name, qid):
    labels = b''.join(bytes([len(p)]) + p.encode() for p in name.split('.'))
    return qid.to_bytes(2, 'big') + b'\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00' + labels + b'\x00\x00\x01\x00\x01'
def resolve(name):
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.settimeout(2)
    r.sendto(query(name, 4242), ('169.254.77.1', 53))
    a = r.recv(512)
    return '.'.join(str(b) for b in a[-4:]) if a[:2] == (4242).to_bytes(2, 'big') else None
out['before'] = echo_ok(echo)
out['other_tenant'] = echo_ok(beta)
# A synthetic address the stub gave works; one it never gave does not.
out['named'] = echo_ok((resolve('echo.flood.test'), echo[1]))
out['unknown_synthetic'] = echo_ok(('198.18.255.254', echo[1]))
held = []
for i in range(300):
    try:
        s = socket.create_connection(echo, timeout=3)
        s.settimeout(3)
        s.sendall(b'h')
        held.append(s)
    except OSError:
        pass
echoing = 0
for s in held:
    try:
        if s.recv(1) == b'h':
            echoing += 1
    except OSError:
        pass
out['opened'], out['echoing'] = len(held), echoing
out['while_full'] = echo_ok(echo)
for s in held:
    s.close()
q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
q.setblocking(False)
sent = answered = 0
def drain():
    global answered
    try:
        while True:
            q.recv(512)
            answered += 1
    except BlockingIOError:
        pass
for i in range(names):
    name = ''.join(random.choices(string.ascii_lowercase, k=12)) + '.flood.test'
    try:
        q.sendto(query(name, i & 0xffff), ('169.254.77.1', 53))
        sent += 1
    except BlockingIOError:
        time.sleep(0.001)
    drain()
end = time.time() + 1
while time.time() < end:
    drain()
    time.sleep(0.01)
out['dns_sent'], out['dns_answered'] = sent, answered
# Afterwards the door is the tenant's again: the held slots are free, and
# a name resolves to a synthetic address at once.
out['after'] = any(echo_ok(echo) or time.sleep(0.25) for _ in range(20))
out['legit_name'] = resolve('legit.flood.test')
print(json.dumps(out))
"#;

/// Another tenant's client: round trips through its pipe (a new
/// connection every 20) until the file `argv[2]` exists; prints its count,
/// failures and slowest round trip as JSON.
const VICTIM: &str = r#"
import json, os, socket, sys, time
port, stop = int(sys.argv[1]), sys.argv[2]
trips = failures = 0
worst = 0.0
while not os.path.exists(stop):
    try:
        s = socket.create_connection(('127.0.0.1', port), timeout=5)
        s.settimeout(5)
        for _ in range(20):
            t = time.time()
            s.sendall(b'v' * 64)
            got = b''
            while len(got) < 64:
                d = s.recv(64 - len(got))
                if not d:
                    raise OSError('closed')
                got += d
            worst = max(worst, time.time() - t)
            trips += 1
        s.close()
    except OSError:
        failures += 1
print(json.dumps({'trips': trips, 'failures': failures, 'worst_ms': worst * 1000}))
"#;

/// A threaded TCP echo server on 0.0.0.0:`argv[1]` (holds many
/// connections; a backlog of 1,024, not socketserver's 5, so a burst of
/// connections is not met with dropped SYNs and their 1 s retransmission).
const ECHO: &str = r#"
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(4096)
            if not d:
                return
            self.request.sendall(d)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer.request_queue_size = 1024
socketserver.ThreadingTCPServer(('0.0.0.0', int(sys.argv[1])), Echo).serve_forever()
"#;

#[test]
fn hostile_programs_in_a_namespace_take_nothing_from_another_tenant() {
    if !need_root() || !can_netns() || !have("nsenter") || !have("python3") || !have("curl") {
        skip("needs root, network namespaces, nsenter, python3, curl");
        return;
    }
    // meshgate runs in a namespace of its own, with a site on a link:
    // echo servers at 10.232.50.2:7007 (for acme) and :7008 (for beta).
    let mgns = Netns::new("hm");
    let mut site = Netns::new("hs");
    link(&mgns, "10.232.50.1/24", &site, "10.232.50.2/24");
    // One echo server for acme's namespace, one of its own for beta.
    for port in ["7007", "7008"] {
        let mut echo = site.cmd("python3");
        echo.args(["-c", ECHO, port]);
        site.spawn(echo);
        assert!(
            wait_until(Duration::from_secs(5), || site
                .try_sh(&format!("ss -Hltn 'sport = :{port}' | grep -q LISTEN"))
                .status
                .success()),
            "the echo server on {port} did not start"
        );
    }

    let cfg = tempfile::tempdir().unwrap();
    let d = cfg.path();
    let admin = "127.0.0.1:9000";
    write(
        d,
        "meshgate.yaml",
        &format!("node: test\nadmin: {admin}\ndrain_timeout: 1s\n"),
    );
    // acme's namespace reaches the site and names under flood.test; its
    // door takes 100 connections.
    write(
        d,
        "tenants/acme/corp.yaml",
        "kind: vnet\ndefault: true\nhosts:\n  echo.flood.test: 10.232.50.2\nroutes:\n  - to: 10.232.50.0/24\n    via: direct\n  - to: \"*.flood.test\"\n    via: direct\n",
    );
    write(
        d,
        "tenants/acme/ns.yaml",
        "kind: netns\nmax_connections: 100\n",
    );
    // beta's pipe listens on every address of meshgate's namespace,
    // 10.232.50.1 included.
    let beta = 18282;
    write(
        d,
        "tenants/beta/web.yaml",
        &format!("kind: pipe\nlisten: 0.0.0.0:{beta}\nremote: 10.232.50.2:7008\n"),
    );
    let mg = NsMeshgate::start(&mgns, d, admin);
    // beta's listener answers on the link address (the probe acme's
    // namespace is refused later).
    let probe = format!(
        "import socket; s = socket.create_connection(('10.232.50.1', {beta}), timeout=3); s.settimeout(3); s.sendall(b'p'); print(s.recv(1).decode())"
    );
    assert_eq!(site.sh(&format!("python3 -c \"{probe}\"")).trim(), "p");
    let pid = {
        let mut pid = None;
        let found = wait_until(Duration::from_secs(10), || {
            let (_, body) = mgns.curl(&format!("http://{admin}/api/v1/modules?tenant=acme"), 3);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            pid = v
                .as_array()
                .and_then(|a| a.iter().find_map(|m| m["details"]["pid"].as_u64()));
            pid.is_some()
        });
        assert!(found, "no namespace pid in the status:\n{}", mg.log_text());
        pid.unwrap()
    };

    // beta's client keeps going through its pipe the whole time.
    let stop = cfg.path().join("stop-victim");
    let victim = mgns
        .cmd("python3")
        .args(["-c", VICTIM, &beta.to_string()])
        .arg(&stop)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "python3", "-c", HOSTILE])
        .args([
            "10.232.50.2",
            "7007",
            "10.232.50.1",
            &beta.to_string(),
            "20000",
        ])
        .output()
        .unwrap();
    std::fs::write(&stop, "").unwrap();
    let victim = victim.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "stdout: {stdout}\nstderr: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        mg.log_text()
    );
    assert!(out.status.success(), "{ctx}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the script's JSON");
    // The probe that is refused later first works.
    assert_eq!(r["before"], true, "{ctx}");
    // Another tenant's listener is not reachable from inside, although
    // the site answered on that address and the site's own address is
    // reached; a synthetic address the stub never gave is refused, one it
    // gave reaches the echo.
    assert_eq!(r["other_tenant"], false, "{ctx}");
    assert_eq!(r["named"], true, "{ctx}");
    assert_eq!(r["unknown_synthetic"], false, "{ctx}");
    // The namespace holds at most its door's 100 connections; the rest
    // are refused as they come (the handshake is the userspace stack's,
    // so they open and close), and one more finds the door full.
    let echoing = r["echoing"].as_u64().unwrap();
    assert!((90..=100).contains(&echoing), "{ctx}");
    assert_eq!(r["while_full"], false, "{ctx}");
    // The DNS flood was answered, and the stub and the door serve the
    // tenant again once the flood and the held connections are gone.
    assert!(r["dns_answered"].as_u64().unwrap() >= 1000, "{ctx}");
    assert_eq!(r["after"], true, "{ctx}");
    let legit = r["legit_name"].as_str().unwrap_or_default();
    assert!(
        legit.starts_with("198.18.") || legit.starts_with("198.19."),
        "{ctx}"
    );
    // Every refusal is counted, on acme's door only.
    let (_, metrics) = mgns.curl(&format!("http://{admin}/metrics"), 3);
    let sample = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let rejected = |reason: &str| {
        sample(&format!(
            "meshgate_rejected_total{{tenant=\"acme\",instance=\"ns\",reason=\"{reason}\"}}"
        ))
    };
    assert!(rejected("max_connections") >= 190.0, "{metrics}");
    assert!(rejected("not_captured") >= 1.0, "{metrics}");
    assert!(
        sample(
            "meshgate_dial_errors_total{tenant=\"acme\",instance=\"ns\",reason=\"other_tenant\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("tenant=\"beta\"") && l.starts_with("meshgate_rejected_total")),
        "{metrics}"
    );
    // beta never noticed.
    let v: serde_json::Value = serde_json::from_slice(&victim.stdout).expect("the victim's JSON");
    assert!(v["trips"].as_u64().unwrap() >= 100, "{v}");
    assert_eq!(v["failures"], 0, "{v}");
    assert!(v["worst_ms"].as_f64().unwrap() < 1000.0, "{v}");
    println!("beta: {v}; acme: {stdout}");
}
