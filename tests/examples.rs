//! The examples are documentation that runs: each script must succeed with
//! the binaries under test.

mod common;

use std::path::Path;
use std::process::Command;

fn run_example(script: &str) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_meshgate")).parent().unwrap();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .env("MESHGATE_BIN", bin_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo OK"), "{stdout}");
}

#[test]
fn pipe_demo_runs() {
    if !common::have("curl") || !common::have("python3") {
        return;
    }
    run_example("examples/pipe/run.sh");
}
