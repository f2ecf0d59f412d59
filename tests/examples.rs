//! The examples are documentation that runs: each script must succeed with
//! the binaries under test. The namespace demos need root; the loopback
//! demo is run as an unprivileged user when the tests run as root, to show
//! that the userspace engine needs no privileges.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_meshgate"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn example(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(script)
}

fn check_run(script: &str, mut cmd: Command) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo OK"), "{stdout}");
}

fn run_example(script: &str) {
    let mut cmd = Command::new("bash");
    cmd.arg(example(script)).env("MESHGATE_BIN_DIR", bin_dir());
    check_run(script, cmd);
}

#[test]
fn pipe_demo_runs() {
    if !common::have("curl") || !common::have("python3") {
        return;
    }
    run_example("examples/pipe/run.sh");
}

/// Copies `src` (a directory) into `dst`, world-readable.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

#[test]
fn loopback_wireguard_demo_runs_without_privileges() {
    if !common::have("curl") || !common::have("python3") {
        return;
    }
    let root = common::netns::can_netns_quiet();
    if !root {
        // Already unprivileged.
        return run_example("examples/loopback/run.sh");
    }
    // As root: run it as `nobody`, from copies that user can read.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for b in ["meshgate", "meshgatectl"] {
        std::fs::copy(bin_dir().join(b), bin.join(b)).unwrap();
    }
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ex = tmp.path().join("examples/loopback");
    copy_tree(&example("examples/loopback"), &ex);
    copy_tree(&example("examples/lib"), &tmp.path().join("examples/lib"));
    std::fs::set_permissions(
        tmp.path().join("examples"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "nobody", "--", "env", "HOME=/tmp"])
        .arg(format!("MESHGATE_BIN_DIR={}", bin.display()))
        .arg("bash")
        .arg(ex.join("run.sh"));
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loopback demo as nobody failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo OK"), "{stdout}");
    assert!(stdout.contains("running as uid 65534"), "{stdout}");
}

#[test]
fn cloud_gateway_minimal_demo_runs() {
    if !common::netns::can_netns() || !common::have("nginx") || !common::have("curl") {
        return;
    }
    run_example("examples/minimal/run.sh");
}

#[test]
fn cloud_gateway_reverse_demo_runs() {
    if !common::netns::can_netns() || !common::have("nginx") || !common::have("curl") {
        return;
    }
    run_example("examples/reverse/run.sh");
}
