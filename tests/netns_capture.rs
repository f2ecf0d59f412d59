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
