//! `meshgatectl` against a running node and against `wg`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use common::*;

fn ctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn pipe_stdin(cmd: &mut Command, input: &str) -> String {
    let out = run_with_stdin(cmd, input.as_bytes());
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn keys_match_wg() {
    let (ok, private, _) = ctl(&["genkey"]);
    assert!(ok);
    let private = private.trim().to_string();
    assert_eq!(private.len(), 44);
    let ours = pipe_stdin(
        Command::new(env!("CARGO_BIN_EXE_meshgatectl")).arg("pubkey"),
        &private,
    );
    assert_eq!(ours.len(), 44);
    if have("wg") {
        let theirs = pipe_stdin(Command::new("wg").arg("pubkey"), &private);
        assert_eq!(ours, theirs);
        // And a key from `wg genkey` is accepted by us.
        let out = Command::new("wg").arg("genkey").output().unwrap();
        let wg_private = String::from_utf8(out.stdout).unwrap();
        let theirs = pipe_stdin(Command::new("wg").arg("pubkey"), &wg_private);
        let ours = pipe_stdin(
            Command::new(env!("CARGO_BIN_EXE_meshgatectl")).arg("pubkey"),
            &wg_private,
        );
        assert_eq!(ours, theirs);
    }
    let out = run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_meshgatectl")).arg("pubkey"),
        b"not a key",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid key"));
}

#[test]
fn status_and_flows_show_the_node() {
    let echo = echo_server();
    let cfg = ConfigDir::new();
    let port = free_port();
    cfg.pipe("acme", "web", port, echo);
    let socks_port = free_port();
    cfg.write(
        "tenants/acme/socks.yaml",
        &format!("kind: socks\nlisten: 127.0.0.1:{socks_port}\nusers:\n  - name: alice\n    password: pw\n"),
    );
    cfg.loopback_vnet("acme");
    let _mg = Meshgate::start(&cfg);
    let admin = format!("127.0.0.1:{}", cfg.admin_port);

    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(echo_roundtrip(&mut held, b"12345").unwrap(), b"12345");

    let (ok, out, err) = ctl(&["--admin", &admin, "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("node test"), "{out}");
    let row = out.lines().find(|l| l.contains(" web ")).expect(&out);
    for want in [
        "web",
        "pipe",
        "running",
        &format!("127.0.0.1:{port} -> {echo}"),
    ] {
        assert!(row.contains(want), "{row}");
    }

    // A flow through a SOCKS door carries its user.
    let mut socks = TcpStream::connect(("127.0.0.1", socks_port)).unwrap();
    socks.write_all(&[5, 1, 2]).unwrap();
    let mut m = [0u8; 2];
    socks.read_exact(&mut m).unwrap();
    socks.write_all(b"\x01\x05alice\x02pw").unwrap();
    socks.read_exact(&mut m).unwrap();
    let port_be = echo.port().to_be_bytes();
    socks
        .write_all(&[5, 1, 0, 1, 127, 0, 0, 1, port_be[0], port_be[1]])
        .unwrap();
    let mut rep = [0u8; 10];
    socks.read_exact(&mut rep).unwrap();
    assert_eq!(rep[1], 0);
    assert_eq!(echo_roundtrip(&mut socks, b"1234567").unwrap(), b"1234567");

    let socks_row = out.lines().find(|l| l.contains(" socks ")).expect(&out);
    assert!(
        socks_row.contains(&format!("127.0.0.1:{socks_port}")),
        "{out}"
    );
    let (ok, out, err) = ctl(&["--admin", &admin, "flows", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let header = out.lines().next().expect(&out);
    for col in ["DOOR", "IDENTITY", "DESTINATION", "ROUTE", "VERDICT"] {
        assert!(header.contains(col), "{header}");
    }
    let row = out.lines().find(|l| l.contains(" web ")).expect(&out);
    assert!(
        row.contains("acme") && row.contains(&echo.to_string()) && row.contains("5 B"),
        "{out}"
    );
    let row = out.lines().find(|l| l.contains(" socks ")).expect(&out);
    for want in ["alice", "default: ", "-> direct", "allow", "7 B"] {
        assert!(row.contains(want), "{want} in {out}");
    }
    let (_, out, _) = ctl(&["--admin", &admin, "flows", "--tenant", "other"]);
    assert_eq!(out.lines().count(), 1, "only the header: {out}");

    let (ok, _, err) = ctl(&["--admin", "127.0.0.1:1", "status"]);
    assert!(!ok);
    assert!(
        err.contains("cannot reach the admin API at 127.0.0.1:1"),
        "{err}"
    );
}

/// `capture rules` for local processes exclude the user meshgate runs as,
/// asked of the node when not given; capturing that user is refused, and
/// with no node to ask and no --exclude-uid nothing is printed.
#[test]
fn capture_rules_for_local_processes_exclude_meshgates_own_user() {
    let cfg = ConfigDir::new();
    cfg.pipe("acme", "web", free_port(), echo_server());
    let _mg = Meshgate::start(&cfg);
    let admin = format!("127.0.0.1:{}", cfg.admin_port);
    let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let other = if me == 0 { 1000 } else { 0 };
    let (ok, out, err) = ctl(&[
        "--admin",
        &admin,
        "capture",
        "rules",
        "--uid",
        &other.to_string(),
        "--port",
        "15001",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("runs as uid {me}")), "{out}");
    assert!(
        out.contains(&format!("-A MESHGATE -m owner --uid-owner {me} -j RETURN")),
        "{out}"
    );
    let (ok, _, err) = ctl(&[
        "--admin",
        &admin,
        "capture",
        "rules",
        "--uid",
        &me.to_string(),
        "--port",
        "15001",
    ]);
    assert!(!ok);
    assert!(err.contains("both captured and excluded"), "{err}");
    let (ok, out, err) = ctl(&[
        "--admin",
        "127.0.0.1:1",
        "capture",
        "rules",
        "--cgroup",
        "/app.slice",
        "--port",
        "15001",
    ]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("--exclude-uid"), "{err}");
}

/// `wg show TENANT` for a tenant without a WireGuard interface says so and
/// fails (it printed nothing and exited 0), naming the tenants that have
/// one; the same command for that tenant shows its interface.
#[test]
fn wg_show_names_a_tenant_without_an_interface() {
    let cfg = ConfigDir::new();
    let (ok, key, err) = ctl(&["genkey"]);
    assert!(ok, "{err}");
    let (_, peer_key, _) = ctl(&["genkey"]);
    let peer_pub = pipe_stdin(
        Command::new(env!("CARGO_BIN_EXE_meshgatectl")).arg("pubkey"),
        &peer_key,
    );
    cfg.write(
        "tenants/acme/wg0.yaml",
        &format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: {}\naddress: 10.192.0.1/24\nuapi: off\npeers:\n  - name: laptop\n    public_key: {peer_pub}\n    allowed_ips: [10.192.0.2/32]\n",
            key.trim(),
            free_port()
        ),
    );
    let _mg = Meshgate::start(&cfg);
    let admin = format!("127.0.0.1:{}", cfg.admin_port);
    let (ok, out, err) = ctl(&["--admin", &admin, "wg", "show", "acme"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("interface: acme/wg0") && out.contains("name: laptop"),
        "{out}"
    );
    let (ok, out, err) = ctl(&["--admin", &admin, "wg", "show", "nosuch"]);
    assert!(
        !ok,
        "exit status 0 for a tenant without an interface: {out}"
    );
    assert!(
        err.contains("tenant `nosuch` has no WireGuard interface") && err.contains("acme"),
        "{err}"
    );
}

/// A node with an admin token: meshgatectl says what is missing without
/// it, and works with it (from a file or the environment).
#[test]
fn status_sends_the_admin_token() {
    let token = "f00dfeedf00dfeedf00dfeed";
    let cfg = ConfigDir::new();
    cfg.write(
        "meshgate.yaml",
        &format!(
            "node: tok\nadmin: 127.0.0.1:{}\nadmin_token: {token}\n",
            cfg.admin_port
        ),
    );
    cfg.loopback_vnet("acme");
    let _mg = Meshgate::start(&cfg);
    let admin = format!("127.0.0.1:{}", cfg.admin_port);
    let (ok, _, err) = ctl(&["--admin", &admin, "status"]);
    assert!(!ok);
    assert!(
        err.contains("asks for its admin token") && err.contains("--admin-token-file"),
        "{err}"
    );
    let file = cfg.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let (ok, out, err) = ctl(&[
        "--admin",
        &admin,
        "--admin-token-file",
        file.to_str().unwrap(),
        "status",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("tok"), "{out}");
    let out = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
        .args(["--admin", &admin, "status"])
        .env("MESHGATE_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
