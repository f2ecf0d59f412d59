//! Transparent capture end to end (root): processes in application
//! namespaces with no proxy settings curl nginx in another namespace; the
//! gateway namespace's rules (printed and applied by `meshgatectl capture
//! rules`) steer them through meshgate, by REDIRECT and by TPROXY, and the
//! flows show the original destination. Without CAP_NET_ADMIN a TPROXY
//! capture says so while the rest of meshgate runs.

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::*;
use common::*;

/// An application namespace behind the gateway: its default route goes
/// through `gw`, on subnet 10.240.`n`.0/24. Returns it and the gateway's
/// interface towards it.
fn app(gw: &Netns, n: u8) -> (Netns, String) {
    let a = Netns::new(&format!("app{n}"));
    let (gw_if, _) = link(
        gw,
        &format!("10.240.{n}.1/24"),
        &a,
        &format!("10.240.{n}.2/24"),
    );
    a.sh(&format!("ip route add default via 10.240.{n}.1"));
    (a, gw_if)
}

fn ctl_rules(gw: &Netns, args: &str) -> String {
    gw.sh(&format!(
        "{} capture rules {args} --apply",
        env!("CARGO_BIN_EXE_meshgatectl")
    ))
}

#[test]
fn redirect_and_tproxy_steer_unconfigured_clients_through_meshgate() {
    if !need_root() || !can_netns() || !have("iptables") || !have("nginx") || !have("curl") {
        skip("needs root, iptables, nginx, curl");
        return;
    }
    let gw = Netns::new("cgw");
    let mut legacy = Netns::new("clg");
    link(&gw, "10.240.9.1/24", &legacy, "10.240.9.2/24");
    let _nginx = nginx_in(&mut legacy, "10.240.9.2:80", "legacy nginx\n");
    let (app1, if1) = app(&gw, 1);
    let (app2, if2) = app(&gw, 2);

    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("tenants/corp");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        d.path().join("meshgate.yaml"),
        "admin: 127.0.0.1:9000\ndrain_timeout: 1s\n",
    )
    .unwrap();
    std::fs::write(
        t.join("redirect.yaml"),
        "kind: capture\nlisten: 0.0.0.0:15001\n",
    )
    .unwrap();
    std::fs::write(
        t.join("tproxy.yaml"),
        "kind: capture\nlisten: 0.0.0.0:15002\nmode: tproxy\n",
    )
    .unwrap();
    let mg = NsMeshgate::start(&gw, d.path(), "127.0.0.1:9000");

    // Before any rule, app1 cannot reach the legacy network (gw does not forward).
    assert_eq!(app1.curl("http://10.240.9.2/", 2).0, 0);
    let printed = ctl_rules(&gw, &format!("--iface {if1} --port 15001"));
    assert!(printed.contains("REDIRECT --to-ports 15001"), "{printed}");
    ctl_rules(&gw, &format!("--iface {if2} --port 15002 --mode tproxy"));

    assert_eq!(
        app1.curl("http://10.240.9.2/", 10),
        (200, "legacy nginx\n".into()),
        "{}",
        mg.log_text()
    );
    assert_eq!(
        app2.curl("http://10.240.9.2/", 10),
        (200, "legacy nginx\n".into()),
        "{}",
        mg.log_text()
    );

    // The flows name the client and its original destination.
    let audit = |instance: &str, src: &str| {
        mg.log_text().lines().any(|l| {
            l.contains("meshgate::audit")
                && l.contains(instance)
                && l.contains(src)
                && l.contains("10.240.9.2:80")
        })
    };
    assert!(
        wait_until(Duration::from_secs(3), || audit("redirect", "10.240.1.2")
            && audit("tproxy", "10.240.2.2")),
        "{}",
        mg.log_text()
    );

    // TPROXY takes UDP too: app2 talks to a UDP echo in the legacy network
    // with a connected socket (it accepts answers only from 10.240.9.2:7007),
    // 100 datagrams each way, none lost; the flow shows the destination.
    let mut legacy = legacy;
    let mut echo = legacy.cmd("python3");
    echo.args([
        "-c",
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('10.240.9.2',7007))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(b'echo:'+d,a)",
    ]);
    legacy.spawn(echo);
    std::thread::sleep(Duration::from_millis(300));
    let udp = app2.try_sh(
        "python3 -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.connect(('10.240.9.2',7007))\nok=0\nfor i in range(100):\n s.send(b'%d'%i)\n ok+=s.recv(100)==b'echo:%d'%i\nprint(ok)\"",
    );
    assert_eq!(
        String::from_utf8_lossy(&udp.stdout).trim(),
        "100",
        "{}{}",
        String::from_utf8_lossy(&udp.stderr),
        mg.log_text()
    );
    // The session is a live flow (until its idle timeout) to the original
    // destination.
    let flows = gw.sh("curl -s http://127.0.0.1:9000/api/v1/flows");
    assert!(
        flows.contains("10.240.9.2:7007") && flows.contains("\"udp\""),
        "{flows}"
    );

    // Connecting to the capture port itself is not a capture: refused, counted.
    let (code, _) = gw.curl("http://127.0.0.1:15001/", 3);
    assert_eq!(code, 0);
    assert!(wait_until(Duration::from_secs(2), || mg.metric(
        &gw,
        "meshgate_rejected_total{tenant=\"corp\",instance=\"redirect\",reason=\"not_captured\"}"
    ) == 1.0));

    // A policy decides captured flows too: TCP (REDIRECT) and UDP
    // (TPROXY) to the legacy host are denied, counted and answered by
    // nothing; the same probes passed above.
    std::fs::write(
        t.join("policy.yaml"),
        "kind: policy\nrules:\n  - name: no-legacy\n    action: deny\n    doors: [capture]\n    to: [10.240.9.2/32]\n",
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || app1
            .curl("http://10.240.9.2/", 2)
            .0
            == 0),
        "a captured connection passed a deny rule\n{}",
        mg.log_text()
    );
    let udp = app2.try_sh(
        "python3 -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\ns.connect(('10.240.9.2',7007))\ns.send(b'x')\ntry:\n print(s.recv(100))\nexcept OSError:\n print('none')\"",
    );
    assert_eq!(String::from_utf8_lossy(&udp.stdout).trim(), "none");
    for instance in ["redirect", "tproxy"] {
        assert!(
            mg.metric(
                &gw,
                &format!("meshgate_rejected_total{{tenant=\"corp\",instance=\"{instance}\",reason=\"denied\"}}")
            ) >= 1.0,
            "{instance}\n{}",
            mg.log_text()
        );
    }
    std::fs::remove_file(t.join("policy.yaml")).unwrap();

    // --remove takes the rules away again.
    gw.sh(&format!(
        "{} capture rules --iface {if1} --port 15001 --remove --apply",
        env!("CARGO_BIN_EXE_meshgatectl")
    ));
    assert!(!gw.sh("iptables -t nat -S").contains("MESHGATE"));
    assert_eq!(app1.curl("http://10.240.9.2/", 2).0, 0);

    // The TPROXY door's UDP socket goes with its listener: held while it
    // listens on 15002, free once a reload moves it to 15003. Whether a
    // port is held is read with `ss` (binding it to find out would take
    // the port the reload is about to bind).
    let udp_held = |port: u16| {
        !gw.sh(&format!("ss -Huln 'sport = :{port}'"))
            .trim()
            .is_empty()
    };
    assert!(
        udp_held(15002) && !udp_held(15003),
        "the door holds UDP 15002"
    );
    std::fs::write(
        t.join("tproxy.yaml"),
        "kind: capture\nlisten: 0.0.0.0:15003\nmode: tproxy\n",
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || udp_held(15003)),
        "moved to 15003\n{}",
        mg.log_text()
    );
    assert!(!udp_held(15002), "UDP 15002 let go");
    let bound = gw.sh(
        "python3 -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',15002))\nprint('bound')\"",
    );
    assert_eq!(bound.trim(), "bound", "UDP 15002 can be bound again");
}

#[test]
fn tproxy_without_cap_net_admin_is_reported_and_the_rest_runs() {
    if !need_root() || !have("setpriv") || !have("curl") {
        skip("needs root (to run meshgate as another user)");
        return;
    }
    let cfg = ConfigDir::new();
    let (cap_port, pipe_port) = (free_port(), free_port());
    let echo = echo_server();
    cfg.write(
        "tenants/t/cap.yaml",
        &format!("kind: capture\nlisten: 127.0.0.1:{cap_port}\nmode: tproxy\n"),
    );
    cfg.pipe("t", "echo", pipe_port, echo);
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(cfg.path())
        .status()
        .unwrap();
    let mut child = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--config-dir")
        .arg(cfg.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let admin = format!("http://127.0.0.1:{}/api/v1/modules", cfg.admin_port);
    let ready = wait_until(Duration::from_secs(10), || curl(&admin).0 == 200);
    let status = curl(&admin).1;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pipe_port));
    let echoed = s
        .as_mut()
        .ok()
        .map(|s| echo_roundtrip(s, b"still here").unwrap_or_default());
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "meshgate did not come up:\n{log}");
    assert_eq!(echoed.as_deref(), Some(&b"still here"[..]), "the pipe runs");
    assert!(
        status.contains("CAP_NET_ADMIN") && status.contains("\"capturing\": false"),
        "{status}"
    );
    assert!(log.contains("CAP_NET_ADMIN"), "{log}");
}

/// Pod egress as seed 002 wants it, without NET_ADMIN for the application:
/// a "pod" namespace where an init step (root, the only one with
/// NET_ADMIN) runs `meshgatectl capture rules --uid 1000 --exclude-uid
/// 1337 --apply` and exits; meshgate runs as uid 1337 with no capability
/// (userspace engine, a WireGuard instance to a wireguard-go site with
/// nginx, a REDIRECT capture); the application runs as uid 1000 with no
/// capability and no proxy settings. Its curl reaches the site's nginx,
/// which the pod has no route to; a root process in the same pod, not
/// captured, does not; the application cannot change the rules; and the
/// application's own server stays reachable from outside (the seed's
/// "local access" problem does not arise: only connections the
/// application opens are steered). deploy/pod-egress/deployment.yaml is
/// the same recipe as Kubernetes manifests (tests/deploy.rs checks they
/// agree).
#[test]
fn pod_egress_the_app_without_net_admin_goes_out_through_meshgate() {
    if !need_root()
        || !can_netns()
        || !have("iptables")
        || !have("setpriv")
        || !have("wireguard-go")
        || !have("wg")
        || !have("nginx")
        || !have("curl")
    {
        skip("needs root, iptables, setpriv, wireguard-go, wg, nginx, curl");
        return;
    }
    let pod = Netns::new("pod");
    let mut site = Netns::new("site");
    link(&pod, "10.231.7.1/24", &site, "10.231.7.2/24");
    // The pod's default route leads to the pod network's gateway (here an
    // address nobody answers for); the site's addresses are not on it.
    pod.sh("ip route add default via 10.231.7.99");
    let wg = WgGo::new(&site, "10.192.0.1/24", Some(51820));
    let _nginx = nginx_in(&mut site, "10.192.0.1:80", "site nginx\n");
    let key = meshgate::core::keys::PrivateKey::generate();
    wg.add_peer(
        &site,
        &key.public_key().to_string(),
        "allowed-ips 10.192.0.2/32",
    );

    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("tenants/egress");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        d.path().join("meshgate.yaml"),
        "admin: 127.0.0.1:9000\ndrain_timeout: 1s\n",
    )
    .unwrap();
    std::fs::write(
        t.join("wg0.yaml"),
        format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.192.0.2/32\npeers:\n  - name: site\n    public_key: {}\n    endpoint: 10.231.7.2:51820\n    allowed_ips: [10.192.0.0/24]\n    persistent_keepalive: 25\n",
            key.to_base64(),
            wg.public_key()
        ),
    )
    .unwrap();
    std::fs::write(
        t.join("net.yaml"),
        "kind: vnet\nroutes:\n  - to: 10.192.0.0/24\n    via: wg0\n  - to: \"*\"\n    via: reject\n",
    )
    .unwrap();
    std::fs::write(
        t.join("out.yaml"),
        "kind: capture\nlisten: 127.0.0.1:15001\n",
    )
    .unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(d.path())
        .status()
        .unwrap();
    let as_user = |uid: &str| -> Vec<String> {
        [
            "setpriv",
            "--reuid",
            uid,
            "--regid",
            uid,
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let app = |line: &str| -> std::process::Output {
        pod.cmd("setpriv")
            .args(&as_user("1000")[1..])
            .args(["sh", "-c", line])
            .output()
            .unwrap()
    };
    let app_curl = || {
        let out = app("curl -s --max-time 3 -w '\\n%{http_code}' http://10.192.0.1/");
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    // The init step: root with NET_ADMIN, before meshgate and the app run.
    assert!(app_curl().ends_with("\n000"), "no route yet");
    let init = pod.sh(&format!(
        "{} capture rules --uid 1000 --exclude-uid 1337 --port 15001 --apply",
        env!("CARGO_BIN_EXE_meshgatectl")
    ));
    assert!(init.contains("--uid-owner 1000"), "{init}");

    // meshgate as uid 1337 with no capability.
    let wrapper = as_user("1337");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mg = NsMeshgate::start_wrapped(&pod, &wrapper, d.path(), "127.0.0.1:9000");
    let node = pod.sh("curl -s http://127.0.0.1:9000/api/v1/node");
    assert!(
        node.contains("\"uid\": 1337") || node.contains("\"uid\":1337"),
        "{node}"
    );
    let caps = pod.sh(&format!("grep CapEff /proc/{}/status", mg.child.id()));
    assert!(caps.trim().ends_with("0000000000000000"), "{caps}");

    // The app (uid 1000, no capability) reaches the site through meshgate.
    assert!(
        wait_until(Duration::from_secs(10), || app_curl()
            == "site nginx\n\n200"),
        "{}\n{}",
        app_curl(),
        mg.log_text()
    );
    let app_caps = app("grep CapEff /proc/self/status");
    assert!(String::from_utf8_lossy(&app_caps.stdout)
        .trim()
        .ends_with("0000000000000000"));
    // It cannot undo the steering.
    let undo = app("iptables -t nat -F MESHGATE");
    assert!(!undo.status.success());
    assert!(pod.sh("iptables -t nat -S").contains("--uid-owner 1000"));
    // A root process in the pod is not steered (the rules are the app's):
    // the same probe fails.
    assert_eq!(pod.curl("http://10.192.0.1/", 3).0, 0);
    // The flow shows the app's original destination.
    assert!(
        wait_until(Duration::from_secs(3), || mg.log_text().lines().any(|l| l
            .contains("meshgate::audit")
            && l.contains("10.192.0.1:80"))),
        "{}",
        mg.log_text()
    );
    // The app's own server answers from outside the pod.
    let mut server = pod.cmd("setpriv");
    // (A bare server: http.server looks its address up in DNS first.)
    server.args(&as_user("1000")[1..]).args([
        "/usr/bin/python3",
        "-c",
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('10.231.7.1',8080))\ns.listen()\nwhile True:\n c,_=s.accept()\n c.recv(4096)\n c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 4\\r\\n\\r\\napp\\n')\n c.close()",
    ]);
    let mut server = server
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reached = wait_until(Duration::from_secs(5), || {
        site.curl("http://10.231.7.1:8080/", 2).0 == 200
    });
    let _ = server.kill();
    let out = server.wait_with_output().unwrap();
    assert!(
        reached,
        "the app's server was not reachable from outside: {} {:?}",
        String::from_utf8_lossy(&out.stderr),
        site.curl("http://10.231.7.1:8080/", 2)
    );
}
