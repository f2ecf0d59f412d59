//! Network namespaces for end-to-end tests: real topologies on this machine.
//!
//! Needs root. Without it the tests are skipped, unless
//! `MESHGATE_REQUIRE_TOOLS=1`, where they fail. Every namespace, veth and
//! wireguard-go interface gets a name unique to this process (the
//! `/var/run/wireguard/` socket directory is shared by all namespaces), and
//! everything is removed on drop.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::*;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `{prefix}{pid}{n}`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// True if we can build namespaces. Panics if required and impossible.
pub fn can_netns() -> bool {
    let root = unsafe_free_euid() == 0;
    let tools = have("ip");
    if !root {
        super::skip("network namespace tests need root");
    }
    root && tools
}

/// True if we run as root; otherwise the test is skipped (a failure under
/// `MESHGATE_REQUIRE_TOOLS=1`).
pub fn need_root() -> bool {
    let root = unsafe_free_euid() == 0;
    if !root {
        super::skip("needs root");
    }
    root
}

/// True if we run as root (no message, no panic).
pub fn can_netns_quiet() -> bool {
    unsafe_free_euid() == 0
}

fn unsafe_free_euid() -> u32 {
    // The effective uid from /proc, without libc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One network namespace.
pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(&format!("mg{tag}"));
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.sh("ip link set lo up");
        ns
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs a shell line inside the namespace; panics on failure.
    pub fn sh(&self, line: &str) -> String {
        let out = run(self.cmd("sh").args(["-c", line]));
        String::from_utf8_lossy(&out.stdout).into()
    }

    /// Runs a shell line inside the namespace; returns its output, success or not.
    pub fn try_sh(&self, line: &str) -> Output {
        self.cmd("sh").args(["-c", line]).output().unwrap()
    }

    /// Starts a long-running process inside the namespace (killed on drop).
    pub fn spawn(&mut self, mut cmd: Command) -> &mut Child {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        self.children.push(child);
        self.children.last_mut().unwrap()
    }

    /// `curl -s` inside the namespace: (status, body).
    pub fn curl(&self, url: &str, max_time: u32) -> (u16, String) {
        let out = self
            .cmd("curl")
            .args([
                "-s",
                "--max-time",
                &max_time.to_string(),
                "-w",
                "\n%{http_code}",
                url,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else still running inside (wireguard-go daemonizes).
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair and gives each end its addresses
/// (`a.b.c.d/nn`, or several separated by commas, IPv6 ones included:
/// `10.0.0.1/24,fd00::1/64`; IPv6 addresses skip duplicate detection so they
/// are usable at once). Returns the device names (in `a`, in `b`).
pub fn link(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> (String, String) {
    let (ea, eb) = (unique("va"), unique("vb"));
    run(Command::new("ip").args([
        "link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns", &b.name,
    ]));
    for (ns, dev, addrs) in [(a, &ea, a_addr), (b, &eb, b_addr)] {
        for addr in addrs.split(',') {
            let nodad = if addr.contains(':') { " nodad" } else { "" };
            ns.sh(&format!("ip addr add {addr} dev {dev}{nodad}"));
        }
        ns.sh(&format!("ip link set {dev} up"));
    }
    (ea, eb)
}

/// A wireguard-go interface inside `ns`, configured with `wg`.
pub struct WgGo {
    pub iface: String,
    pub private_key: meshgate::core::keys::PrivateKey,
}

impl WgGo {
    /// Creates the interface with `address` (e.g. `10.192.0.2/24`) and an
    /// optional listen port.
    pub fn new(ns: &Netns, address: &str, listen_port: Option<u16>) -> WgGo {
        let key = meshgate::core::keys::PrivateKey::generate();
        Self::with_key(ns, key, address, listen_port)
    }

    /// As [`WgGo::new`], with a given private key.
    pub fn with_key(
        ns: &Netns,
        private_key: meshgate::core::keys::PrivateKey,
        address: &str,
        listen_port: Option<u16>,
    ) -> WgGo {
        let iface = unique("wgt");
        let out = ns
            .cmd("wireguard-go")
            .arg(&iface)
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wireguard-go: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = tempfile::tempdir().unwrap();
        let keyfile = dir.path().join("key");
        std::fs::write(&keyfile, private_key.to_base64()).unwrap();
        let port = listen_port
            .map(|p| format!(" listen-port {p}"))
            .unwrap_or_default();
        ns.sh(&format!(
            "wg set {iface} private-key {}{port} && ip addr add {address} dev {iface} && ip link set {iface} up",
            keyfile.display()
        ));
        WgGo { iface, private_key }
    }

    pub fn public_key(&self) -> String {
        self.private_key.public_key().to_string()
    }

    /// `wg set IFACE peer KEY ...rest`.
    pub fn add_peer(&self, ns: &Netns, public_key: &str, rest: &str) {
        ns.sh(&format!("wg set {} peer {public_key} {rest}", self.iface));
    }
}

/// meshgate running inside a namespace.
pub struct NsMeshgate {
    pub child: Child,
    pub admin: String,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NsMeshgate {
    /// Starts meshgate on `cfg_dir` inside `ns` and waits for `/readyz`
    /// (the admin API listens on `admin` inside the namespace).
    pub fn start(ns: &Netns, cfg_dir: &Path, admin: &str) -> NsMeshgate {
        Self::start_wrapped(ns, &[], cfg_dir, admin)
    }

    /// As [`NsMeshgate::start`], with meshgate's command line appended to
    /// `wrapper` (e.g. `setpriv ...` to run it as another user).
    pub fn start_wrapped(ns: &Netns, wrapper: &[&str], cfg_dir: &Path, admin: &str) -> NsMeshgate {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("meshgate.log");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = ns.cmd(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_meshgate"));
                c
            }
            None => ns.cmd(env!("CARGO_BIN_EXE_meshgate")),
        };
        let child = cmd
            .arg("--config-dir")
            .arg(cfg_dir)
            .env("MESHGATE_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let m = NsMeshgate {
            child,
            admin: admin.to_string(),
            log,
            _dir: dir,
        };
        let url = format!("http://{admin}/readyz");
        let ok = wait_until(Duration::from_secs(10), || ns.curl(&url, 1).0 == 200);
        assert!(ok, "meshgate in {} not ready:\n{}", ns.name, m.log_text());
        m
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One metric sample's value (0 if absent), read inside the namespace.
    pub fn metric(&self, ns: &Netns, series: &str) -> f64 {
        let (_, body) = ns.curl(&format!("http://{}/metrics", self.admin), 3);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The sum of every sample whose line starts with `prefix`.
    pub fn metric_sum(&self, ns: &Netns, prefix: &str) -> f64 {
        let (_, body) = ns.curl(&format!("http://{}/metrics", self.admin), 3);
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NsMeshgate {
    fn drop(&mut self) {
        stop_gracefully(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- meshgate log ---\n{}", self.log_text());
        }
    }
}

/// nginx inside a namespace, listening on `listen` (e.g. `10.192.0.1:80`),
/// serving `body` at `/`.
pub fn nginx_in(ns: &mut Netns, listen: &str, body: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    std::fs::write(dir.path().join("www/index.html"), body).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n fastcgi_temp_path {d}/tmp;\n uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n\
             server {{ listen {listen}; root {d}/www; }}\n}}\n"
        ),
    )
    .unwrap();
    let mut cmd = ns.cmd("nginx");
    cmd.args([
        "-p",
        &d,
        "-e",
        &format!("{d}/error.log"),
        "-c",
        &format!("{d}/nginx.conf"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    ns.spawn(cmd);
    let ok = wait_until(Duration::from_secs(5), || {
        ns.try_sh(&format!("curl -sf http://{listen}/ >/dev/null"))
            .status
            .success()
    });
    assert!(
        ok,
        "nginx in {} on {listen} did not start: {}",
        ns.name,
        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
    );
    dir
}

/// The unprivileged user tests run meshgate as.
pub const NOBODY: &str = "65534";

/// Whether `nobody` may make a user + network namespace here.
pub fn userns_allowed() -> bool {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .args(["unshare", "-Urn", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes `p` (and everything in it) readable by every user.
pub fn open_to_all(p: &Path) {
    let ok = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(p)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// A TUN device node any user may open, in a directory of its own, and the
/// shell line that binds it over `/dev/net/tun` in a private mount
/// namespace and runs `"$@"` as [`NOBODY`] (for `unshare -m sh -c LINE sh
/// PROGRAM ARGS...`). `/dev/net/tun` is 0600 root on this machine; nothing
/// changes for the rest of it.
pub fn tun_for_nobody() -> (tempfile::TempDir, String) {
    let dev = tempfile::tempdir().unwrap();
    let node = dev.path().join("tun");
    let made = Command::new("mknod")
        .arg(&node)
        .args(["c", "10", "200"])
        .status()
        .unwrap()
        .success();
    assert!(made, "mknod failed");
    Command::new("chmod")
        .arg("666")
        .arg(&node)
        .status()
        .unwrap();
    open_to_all(dev.path());
    let line = format!(
        "mount --bind {} /dev/net/tun && exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups \"$@\"",
        node.display()
    );
    (dev, line)
}

/// Running kernel engine helpers (`meshgate-kernel-engine`): pid and
/// command line.
pub fn kernel_engine_helpers() -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&cmdline).to_string();
            c.contains("--kernel-engine-helper").then_some((pid, c))
        })
        .collect()
}
