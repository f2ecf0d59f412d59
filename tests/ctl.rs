//! `meshgatectl` against a running node and against `wg`.

mod common;

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
    let _mg = Meshgate::start(&cfg);
    let admin = format!("127.0.0.1:{}", cfg.admin_port);

    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(echo_roundtrip(&mut held, b"12345").unwrap(), b"12345");

    let (ok, out, err) = ctl(&["--admin", &admin, "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("node test"), "{out}");
    let row = out.lines().find(|l| l.starts_with("acme")).expect(&out);
    for want in [
        "web",
        "pipe",
        "running",
        &format!("127.0.0.1:{port} -> {echo}"),
    ] {
        assert!(row.contains(want), "{row}");
    }

    let (ok, out, err) = ctl(&["--admin", &admin, "flows", "--tenant", "acme"]);
    assert!(ok, "{err}");
    let row = out.lines().nth(1).expect(&out);
    assert!(
        row.contains("acme") && row.contains(&echo.to_string()) && row.contains("5 B"),
        "{out}"
    );
    let (_, out, _) = ctl(&["--admin", &admin, "flows", "--tenant", "other"]);
    assert_eq!(out.lines().count(), 1, "only the header: {out}");

    let (ok, _, err) = ctl(&["--admin", "127.0.0.1:1", "status"]);
    assert!(!ok);
    assert!(
        err.contains("cannot reach the admin API at 127.0.0.1:1"),
        "{err}"
    );
}
