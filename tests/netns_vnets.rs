//! Tenant vnets end to end, in network namespaces with wireguard-go peers.
//!
//! Seed 004's scenario: one tenant, two vnets (`frankfurt` the default and
//! `sydney`), both routing 10.1.0.0/16, each to its own WireGuard peer with
//! a backend at 10.1.0.10. Pipes choose a vnet; moving the default applies
//! to new connections only. Also: names from a vnet's `hosts`, refusals by
//! a `reject` route and by a missing route (counted), and a `listen_via`
//! pipe that accepts again after its interface restarts.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::netns::{can_netns, link, nginx_in, Netns, NsMeshgate, WgGo};
use common::{have, wait_until};
use meshgate::core::keys::PrivateKey;

/// A wireguard-go site: its namespace, interface and nginx at 10.1.0.10:80.
struct Site {
    ns: Netns,
    wg: WgGo,
    _nginx: tempfile::TempDir,
}

/// A site joined to `gw` by a veth (`10.231.{n}.1` on gw, `.2` at the site).
/// wireguard-go listens on 51820 and owns 10.1.0.10/16; meshgate's VPN
/// address in every site is 10.200.0.2.
fn site(gw: &Netns, n: u8, tag: &str, body: &str, mg_public: &str) -> Site {
    let mut ns = Netns::new(tag);
    link(
        gw,
        &format!("10.231.{n}.1/24"),
        &ns,
        &format!("10.231.{n}.2/24"),
    );
    let wg = WgGo::new(&ns, "10.1.0.10/16", Some(51820));
    wg.add_peer(&ns, mg_public, "allowed-ips 10.200.0.2/32");
    ns.sh(&format!("ip route add 10.200.0.2/32 dev {}", wg.iface));
    let nginx = nginx_in(&mut ns, "10.1.0.10:80", body);
    Site {
        ns,
        wg,
        _nginx: nginx,
    }
}

/// The gateway's config directory (node `gw`, admin on 127.0.0.1:9000)
/// and the directory of `tenant`'s documents in it.
fn gw_config(tenant: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("tenants").join(tenant);
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        d.path().join("meshgate.yaml"),
        "node: gw\nadmin: 127.0.0.1:9000\n",
    )
    .unwrap();
    (d, t)
}

fn wg_doc(key: &PrivateKey, vnet: &str, peer_public: &str, n: u8) -> String {
    format!(
        "kind: wireguard\nprivate_key: {}\naddress: 10.200.0.2/32\nvnet: {vnet}\npeers:\n  - name: {vnet}-site\n    public_key: {peer_public}\n    endpoint: 10.231.{n}.2:51820\n    allowed_ips: [10.1.0.0/16]\n    persistent_keepalive: 5\n",
        key.to_base64()
    )
}

/// An HTTP GET started on a pipe whose request is finished later: the
/// connection is open (and routed) before the caller changes the config.
fn start_request(gw: &Netns, port: u16) -> std::process::Child {
    gw.cmd("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET / HTTP/1.0\\r\\n' >&3; read -r go; printf '\\r\\n' >&3; cat <&3"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish_request(mut child: std::process::Child) -> String {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = child.wait();
    out
}

#[test]
fn two_vnets_route_the_same_range_to_different_sites() {
    if !can_netns()
        || !have("wireguard-go")
        || !have("wg")
        || !have("nginx")
        || !have("curl")
        || !have("dnsmasq")
    {
        return;
    }
    let gw = Netns::new("gw");
    let (fra_key, syd_key) = (PrivateKey::generate(), PrivateKey::generate());
    let fra = site(
        &gw,
        41,
        "fra",
        "frankfurt\n",
        &fra_key.public_key().to_string(),
    );
    let syd = site(
        &gw,
        42,
        "syd",
        "sydney\n",
        &syd_key.public_key().to_string(),
    );

    // Sydney's DNS server, at the site: it knows nginx.sydney.internal.
    let mut syd = syd;
    let mut dns = syd.ns.cmd("dnsmasq");
    dns.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=10.1.0.10",
        "--address=/nginx.sydney.internal/10.1.0.10",
        "--user=root",
        "--pid-file=",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    syd.ns.spawn(dns);
    // Its TCP port answers before meshgate asks (a query while dnsmasq
    // still starts is refused).
    assert!(
        wait_until(Duration::from_secs(5), || !syd
            .ns
            .sh("ss -Htln 'sport = :53'")
            .trim()
            .is_empty()),
        "dnsmasq did not listen on 10.1.0.10:53"
    );
    let (d, t) = gw_config("acme");
    let w = |name: &str, text: &str| std::fs::write(t.join(name), text).unwrap();
    w(
        "frankfurt.yaml",
        "kind: vnet\ndefault: true\nroutes:\n  - to: 10.1.99.0/24\n    via: reject\nhosts:\n  nginx: 10.1.0.10\n",
    );
    // Sydney's names are resolved by a DNS server at the sydney site.
    w(
        "sydney.yaml",
        "kind: vnet\ndns: 10.1.0.10\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n",
    );
    w(
        "wg-fra.yaml",
        &wg_doc(&fra_key, "frankfurt", &fra.wg.public_key(), 41),
    );
    w(
        "wg-syd.yaml",
        &wg_doc(&syd_key, "sydney", &syd.wg.public_key(), 42),
    );
    w(
        "web.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8081\nremote: 10.1.0.10:80\n",
    );
    w(
        "web-sydney.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8082\nremote: 10.1.0.10:80\nvnet: sydney\n",
    );
    w(
        "by-name.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8083\nremote: nginx:80\n",
    );
    w(
        "by-dns.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8086\nremote: nginx.sydney.internal:80\nvnet: sydney\n",
    );
    w(
        "rejected.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8084\nremote: 10.1.99.1:80\n",
    );
    w(
        "nowhere.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8085\nremote: 192.0.2.1:80\n",
    );
    // UDP pipes into sydney: DNS to the site's server, and a pipe on
    // meshgate's VPN address in sydney's network to an echo on gw.
    w(
        "dns-sydney.yaml",
        "kind: pipe\nprotocol: udp\nlisten: 127.0.0.1:5353\nremote: 10.1.0.10:53\nvnet: sydney\n",
    );
    w(
        "echo-in.yaml",
        "kind: pipe\nprotocol: udp\nlisten: 10.200.0.2:5300\nlisten_via: wg-syd\nremote: 127.0.0.1:5301\nvnet: sydney\n",
    );
    // A SOCKS door: alice routes in the default vnet, or in sydney as alice@sydney.
    w(
        "socks.yaml",
        "kind: socks\nlisten: 127.0.0.1:1080\nusers:\n  - name: alice\n    password: pw\n    vnets: [sydney]\n",
    );
    let mg = NsMeshgate::start(&gw, d.path(), "127.0.0.1:9000");

    // curl through the SOCKS door: names resolved in the vnet (frankfurt's
    // `hosts`; sydney's DNS server at the site), never by curl or the host.
    let socks = |user: &str, url: &str| {
        let out = gw.try_sh(&format!(
            "curl -sS --max-time 10 --socks5-hostname 127.0.0.1:1080 --proxy-user '{user}' {url}"
        ));
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(socks("alice:pw", "http://nginx/").0, "frankfurt\n");
    assert_eq!(
        socks("alice@sydney:pw", "http://nginx.sydney.internal/").0,
        "sydney\n"
    );
    assert_eq!(socks("alice@sydney:pw", "http://10.1.0.10/").0, "sydney\n");
    // A reject route: SOCKS reply 2 (not allowed by ruleset), as curl reports it.
    let (body, err) = socks("alice:pw", "http://10.1.99.1/");
    assert!(body.is_empty() && err.contains("(2)"), "{err}");
    let (_, err) = socks("alice:wrong", "http://nginx/");
    assert!(!err.is_empty(), "a wrong password must fail");

    // The default vnet is frankfurt; a pipe that names sydney goes there.
    assert_eq!(
        gw.curl("http://127.0.0.1:8081/", 10),
        (200, "frankfurt\n".into())
    );
    assert_eq!(
        gw.curl("http://127.0.0.1:8082/", 10),
        (200, "sydney\n".into())
    );
    // A name from frankfurt's `hosts`.
    assert_eq!(
        gw.curl("http://127.0.0.1:8083/", 10),
        (200, "frankfurt\n".into())
    );
    // A name resolved by sydney's DNS server on the site's side.
    assert_eq!(
        gw.curl("http://127.0.0.1:8086/", 10),
        (200, "sydney\n".into())
    );

    // A reject route and a missing route: refused, counted by reason.
    assert_eq!(gw.curl("http://127.0.0.1:8084/", 5).0, 0);
    assert_eq!(gw.curl("http://127.0.0.1:8085/", 5).0, 0);
    let rejected =
        "meshgate_dial_errors_total{tenant=\"acme\",instance=\"rejected\",reason=\"rejected\"}";
    let no_route =
        "meshgate_dial_errors_total{tenant=\"acme\",instance=\"nowhere\",reason=\"no_route\"}";
    assert!(wait_until(Duration::from_secs(3), || mg
        .metric(&gw, rejected)
        == 1.0));
    assert_eq!(mg.metric(&gw, no_route), 1.0);
    let log = mg.log_text();
    assert!(
        log.contains(
            "10.1.99.1:80 is refused by route `10.1.99.0/24 -> reject` in vnet `frankfurt`"
        ),
        "{log}"
    );
    assert!(
        log.contains("no route to 192.0.2.1:80 in vnet `frankfurt`"),
        "{log}"
    );

    // Routes and verdicts are visible on live flows.
    let open = start_request(&gw, 8081);
    let flows = wait_until(Duration::from_secs(5), || {
        gw.curl("http://127.0.0.1:9000/api/v1/flows?tenant=acme", 3)
            .1
            .contains("frankfurt: 10.1.0.0/16 -> wg-fra")
    });
    assert!(flows, "the open flow shows its route");

    // Move the default to sydney: new connections go there, the open one
    // keeps its route.
    w(
        "sydney.yaml",
        "kind: vnet\ndefault: true\ndns: 10.1.0.10\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n",
    );
    let moved = wait_until(Duration::from_secs(5), || {
        gw.curl("http://127.0.0.1:8081/", 5).1 == "sydney\n"
    });
    assert!(
        moved,
        "new connections use the new default:\n{}",
        mg.log_text()
    );
    let answer = finish_request(open);
    assert!(answer.ends_with("frankfurt\n"), "{answer}");

    // Datagrams through the tunnels. A DNS query through a UDP pipe into
    // sydney; the same through the SOCKS door's UDP ASSOCIATE as alice@sydney.
    let py = |ns: &Netns, script: &str, args: &str| {
        let out = ns.try_sh(&format!("python3 -c '{script}' {args}"));
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        py(&gw, DNS_QUERY, "127.0.0.1 5353 nginx.sydney.internal"),
        "10.1.0.10"
    );
    assert_eq!(
        py(&gw, SOCKS_UDP_DNS, "alice@sydney pw nginx.sydney.internal"),
        "10.1.0.10"
    );
    // Into meshgate's VPN address from the site: a UDP pipe with listen_via.
    let mut gw = gw;
    let mut echo = gw.cmd("python3");
    echo.args(["-c", UDP_ECHO, "127.0.0.1", "5301"]);
    gw.spawn(echo);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        py(&syd.ns, UDP_ASK, "10.200.0.2 5300 hello-through-wireguard"),
        "hello-through-wireguard"
    );
    drop((fra, syd));
}

#[test]
fn listen_via_pipe_accepts_again_after_its_interface_restarts() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("curl") {
        return;
    }
    let gw = Netns::new("gw");
    let key = PrivateKey::generate();
    let remote = site(&gw, 43, "rb", "unused\n", &key.public_key().to_string());
    let (d, t) = gw_config("default");
    let wg = |port: u16| {
        format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: {port}\naddress: 10.200.0.2/32\npeers:\n  - name: site\n    public_key: {}\n    endpoint: 10.231.43.2:51820\n    allowed_ips: [10.1.0.0/16]\n    persistent_keepalive: 5\n",
            key.to_base64(),
            remote.wg.public_key()
        )
    };
    std::fs::write(t.join("wg0.yaml"), wg(40001)).unwrap();
    // The gateway's admin API, published on its VPN address.
    std::fs::write(
        t.join("inbound.yaml"),
        "kind: pipe\nlisten: 10.200.0.2:8080\nlisten_via: wg0\nremote: 127.0.0.1:9000\n",
    )
    .unwrap();
    let mg = NsMeshgate::start(&gw, d.path(), "127.0.0.1:9000");
    let url = "http://10.200.0.2:8080/healthz";
    let reach = || remote.ns.curl(url, 2).0 == 200;
    assert!(
        wait_until(Duration::from_secs(10), reach),
        "{}",
        mg.log_text()
    );

    // Change the port: the interface restarts, its stack with it.
    std::fs::write(t.join("wg0.yaml"), wg(40002)).unwrap();
    let restarted = wait_until(Duration::from_secs(5), || {
        mg.log_text().matches("wireguard interface up").count() >= 2
    });
    assert!(restarted, "{}", mg.log_text());
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(2), || mg
            .log_text()
            .contains("listening again")),
        "the listener was not bound again within 2 s:\n{}",
        mg.log_text()
    );
    // The old listener went with the old stack first: the accept loop saw
    // its network gone, then bound in the new one.
    let log = mg.log_text();
    let gone = log.find("listener's network went away");
    let again = log.find("listening again");
    assert!(
        matches!((gone, again), (Some(g), Some(a)) if g < a),
        "the old listener was not seen gone before the new bind:\n{log}"
    );
    assert!(
        wait_until(Duration::from_secs(10), reach),
        "listen_via pipe did not come back:\n{}",
        mg.log_text()
    );
    // The peer learns the new port from meshgate's next handshake.
    eprintln!("reachable again after {:?}", t0.elapsed());
}

/// `python3 -c DNS_QUERY SERVER PORT NAME`: the first A record, over UDP.
const DNS_QUERY: &str = r#"
import socket, struct, sys
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
for part in sys.argv[3].split("."):
    q += bytes([len(part)]) + part.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, (sys.argv[1], int(sys.argv[2])))
d = s.recv(4096)
print(socket.inet_ntoa(d[-4:]))
"#;

/// `python3 -c SOCKS_UDP_DNS USER PASSWORD NAME`: the same query through
/// the SOCKS door on 127.0.0.1:1080 (UDP ASSOCIATE) to 10.1.0.10:53.
const SOCKS_UDP_DNS: &str = r#"
import socket, struct, sys
t = socket.create_connection(("127.0.0.1", 1080), timeout=5)
t.sendall(b"\x05\x01\x02")
assert t.recv(2) == b"\x05\x02"
u, p = sys.argv[1].encode(), sys.argv[2].encode()
t.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
assert t.recv(2) == b"\x01\x00"
t.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
r = t.recv(10)
assert r[1] == 0, r
relay = (socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0])
q = struct.pack(">HHHHHH", 0x4321, 0x0100, 1, 0, 0, 0)
for part in sys.argv[3].split("."):
    q += bytes([len(part)]) + part.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"\x00\x00\x00\x01" + socket.inet_aton("10.1.0.10") + struct.pack(">H", 53) + q, relay)
d = s.recv(4096)
assert d[3] == 1 and d[4:8] == socket.inet_aton("10.1.0.10"), d[:10]
print(socket.inet_ntoa(d[-4:]))
"#;

/// `python3 -c UDP_ECHO ADDR PORT`: echoes datagrams.
const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
"#;

/// `python3 -c UDP_ASK ADDR PORT TEXT`: sends TEXT, prints the answer.
const UDP_ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
print(s.recv(4096).decode())
"#;

/// A vnet with its own address has one IP stack, shared by two WireGuard
/// instances (one port per site): a listener in it serves both sites, a
/// dial reaches either, and the sites reach each other through it.
#[test]
fn one_vnet_stack_serves_two_sites_and_joins_them() {
    if !can_netns() || !have("wireguard-go") || !have("wg") || !have("nginx") || !have("curl") {
        return;
    }
    let gw = Netns::new("gw");
    let (key_a, key_b) = (PrivateKey::generate(), PrivateKey::generate());
    // Site n: a veth to gw, wireguard-go at 10.60.n.2/16 whose only peer
    // (meshgate) carries the whole vnet, nginx on its address.
    let site = |n: u8, tag: &str, mg: &PrivateKey| {
        let mut ns = Netns::new(tag);
        link(
            &gw,
            &format!("10.231.{}.1/24", 43 + n),
            &ns,
            &format!("10.231.{}.2/24", 43 + n),
        );
        let wg = WgGo::new(&ns, &format!("10.60.{n}.2/16"), Some(51820));
        wg.add_peer(
            &ns,
            &mg.public_key().to_string(),
            "allowed-ips 10.60.0.0/16",
        );
        let nginx = nginx_in(&mut ns, &format!("10.60.{n}.2:80"), &format!("site {n}\n"));
        Site {
            ns,
            wg,
            _nginx: nginx,
        }
    };
    let a = site(1, "sa", &key_a);
    let b = site(2, "sb", &key_b);
    let (d, t) = gw_config("acme");
    let w = |name: &str, text: &str| std::fs::write(t.join(name), text).unwrap();
    w(
        "sites.yaml",
        "kind: vnet\naddress: 10.60.0.1/16\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n",
    );
    let wg_doc = |key: &PrivateKey, port: u16, site: &Site, n: u8| {
        format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: {port}\nvnet: sites\npeers:\n  - name: site-{n}\n    public_key: {}\n    endpoint: 10.231.{}.2:51820\n    allowed_ips: [10.60.{n}.0/24]\n    persistent_keepalive: 5\n",
            key.to_base64(),
            site.wg.public_key(),
            43 + n
        )
    };
    w("wg-a.yaml", &wg_doc(&key_a, 51821, &a, 1));
    w("wg-b.yaml", &wg_doc(&key_b, 51822, &b, 2));
    // One listener in the vnet (on its address, not an interface's).
    w(
        "health.yaml",
        "kind: pipe\nlisten: 10.60.0.1:8080\nlisten_via: sites\nremote: 127.0.0.1:9000\n",
    );
    w(
        "to-a.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8081\nremote: 10.60.1.2:80\n",
    );
    w(
        "to-b.yaml",
        "kind: pipe\nlisten: 127.0.0.1:8082\nremote: 10.60.2.2:80\n",
    );
    // A SOCKS door in the vnet, with UDP ASSOCIATE: its relay socket is
    // on the vnet's address too.
    w(
        "socks.yaml",
        "kind: socks\nlisten: 10.60.0.1:1080\nlisten_via: sites\n",
    );
    let mut gw = gw;
    let mut echo = gw.cmd("python3");
    echo.args([
        "-c",
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('127.0.0.1',5301))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(b'echo:'+d,a)",
    ]);
    gw.spawn(echo);
    let mg = NsMeshgate::start(&gw, d.path(), "127.0.0.1:9000");

    // Both sites reach the one listener at the vnet's address.
    for s in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(15), || s
                .ns
                .curl("http://10.60.0.1:8080/healthz", 2)
                .0
                == 200),
            "a site cannot reach the vnet's listener:\n{}",
            mg.log_text()
        );
    }
    // Dials from the stack reach each site through its own instance.
    assert_eq!(
        gw.curl("http://127.0.0.1:8081/", 5),
        (200, "site 1\n".into())
    );
    assert_eq!(
        gw.curl("http://127.0.0.1:8082/", 5),
        (200, "site 2\n".into())
    );
    // Site 1 reaches site 2 through the vnet (wg-a → the stack's links → wg-b).
    assert_eq!(a.ns.curl("http://10.60.2.2/", 5), (200, "site 2\n".into()));
    assert_eq!(b.ns.curl("http://10.60.1.2/", 5), (200, "site 1\n".into()));
    // SOCKS5 UDP from site 2 through the door inside the vnet: 50
    // datagrams to the echo on gw's loopback, each answered.
    let socks_udp = r#"
import socket, struct
c = socket.create_connection(('10.60.0.1', 1080), timeout=5)
c.sendall(b'\x05\x01\x00'); assert c.recv(2) == b'\x05\x00'
c.sendall(b'\x05\x03\x00\x01' + bytes(4) + bytes(2))
r = c.recv(10); assert r[1] == 0, r
relay = (socket.inet_ntoa(r[4:8]), struct.unpack('>H', r[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
head = b'\x00\x00\x00\x01' + socket.inet_aton('127.0.0.1') + struct.pack('>H', 5301)
ok = 0
for i in range(50):
    u.sendto(head + b'%d' % i, relay)
    d, _ = u.recvfrom(2048)
    ok += d[10:] == b'echo:%d' % i
print(relay[0], ok)
"#;
    let script = d.path().join("socks_udp.py");
    std::fs::write(&script, socks_udp).unwrap();
    let out = b.ns.try_sh(&format!("python3 {}", script.display()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.60.0.1 50",
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        mg.log_text()
    );
    let ping = a.ns.try_sh("ping -c 2 -W 2 10.60.2.2");
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // The forwarded flow is tracked by the instance that received it.
    let flows = gw.sh("curl -s http://127.0.0.1:9000/api/v1/flows");
    assert!(flows.contains("10.60.2.2"), "{flows}");
    let modules: serde_json::Value =
        serde_json::from_str(&gw.sh("curl -s http://127.0.0.1:9000/api/v1/modules")).unwrap();
    let sites = modules
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["instance"] == "sites")
        .unwrap();
    assert_eq!(
        sites["details"]["stack"]["links"],
        serde_json::json!(["wg-a", "wg-b"])
    );
}
