//! Test harness: config directories, the real `meshgate` binary, real peers
//! (nginx, curl, promtool) and small in-process backends.
//!
//! Tools from Debian packages are required where a test uses them. When one
//! is missing the test is skipped with a message, unless
//! `MESHGATE_REQUIRE_TOOLS=1` (set by `.ci/run` and `scripts/test.sh`), in
//! which case it fails.

#![allow(dead_code)]

pub mod hbone;
pub mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True if `tool` is on PATH. If not: panics when tools are required, else
/// prints why the test is skipped and returns false.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        skip(&format!(
            "{tool} not installed (scripts/test.sh installs it)"
        ));
    }
    found
}

/// Skips the calling test for `why`: with `MESHGATE_REQUIRE_TOOLS=1` (as
/// `scripts/test.sh` sets) a skip is a failure; otherwise the test's name
/// and the reason are printed (`SKIPPED: name: why`), and the caller returns.
pub fn skip(why: &str) {
    let name = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    if std::env::var("MESHGATE_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{name} cannot run (MESHGATE_REQUIRE_TOOLS=1): {why}");
    }
    eprintln!("SKIPPED: {name}: {why}");
}

/// A port free on 127.0.0.1 (TCP and UDP) right now, below the kernel's
/// ephemeral range when there is room: a port the kernel hands out (port 0)
/// can be taken by any outgoing connection of a concurrent test before the
/// test's own listener binds it. A port is claimed for 10 minutes across
/// the whole run (a file in a shared directory), so neither this process
/// nor the next test binary gets it again while a process of an earlier
/// test may still hold it.
pub fn free_port() -> u16 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        let claims = std::env::temp_dir().join("meshgate-test-ports");
        let _ = std::fs::create_dir_all(&claims);
        let random = RandomState::new();
        for i in 0u32..4_000 {
            let port = 10_000 + (random.hash_one(i) % u64::from(low - 10_000)) as u16;
            if claim_port(&claims, port)
                && TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Claims `port` for this run: true if nobody claimed it in the last 10
/// minutes (an older claim is stale and taken over).
fn claim_port(dir: &Path, port: u16) -> bool {
    let path = dir.join(port.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .is_ok()
    };
    if create() {
        return true;
    }
    let stale = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(600));
    stale && std::fs::remove_file(&path).is_ok() && create()
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A config directory in a temp dir, with an admin port of its own.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
    pub admin_port: u16,
}

impl ConfigDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin_port = free_port();
        let c = Self { dir, admin_port };
        c.write(
            "meshgate.yaml",
            &format!("node: test\nadmin: 127.0.0.1:{admin_port}\ndrain_timeout: 20s\nlog: info\n"),
        );
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file relative to the config dir, atomically (write + rename),
    /// as editors and config management do.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_str().unwrap()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    /// A vnet for `tenant` whose door users (SOCKS, HTTP proxy, SSH) reach
    /// the loopback backends these tests run (named `default`, as the
    /// implicit vnet): a door's user reaches the
    /// host's loopback only through a route that names it (issue 18: the
    /// implicit vnet no longer takes door users there); the rest is
    /// direct, as in the implicit vnet.
    pub fn loopback_vnet(&self, tenant: &str) {
        self.write(
            &format!("tenants/{tenant}/default.yaml"),
            "kind: vnet\nroutes:\n  - to: 127.0.0.0/8\n    via: direct\n  - to: \"*\"\n    via: direct\n",
        );
    }

    /// Writes a TCP pipe document for `tenant/name`.
    pub fn pipe(&self, tenant: &str, name: &str, listen: u16, remote: SocketAddr) {
        self.write(
            &format!("tenants/{tenant}/{name}.yaml"),
            &format!("kind: pipe\nlisten: 127.0.0.1:{listen}\nremote: {remote}\n"),
        );
    }
}

/// Runs `cmd` with `input` on its stdin; returns its whole output.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// `meshgate --config-dir DIR --check`.
pub fn check(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("--config-dir")
        .arg(dir)
        .arg("--check")
        .env_remove("MESHGATE_LOG")
        .output()
        .unwrap()
}

/// A running `meshgate` process; killed on drop.
pub struct Meshgate {
    pub child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Meshgate {
    /// Starts meshgate on `cfg` and waits for `/readyz`.
    pub fn start(cfg: &ConfigDir) -> Self {
        Self::start_in(cfg, None)
    }

    /// As [`Meshgate::start`], run from the config directory's parent with
    /// `--config-dir` given relative to it, as a user in a shell would.
    pub fn start_relative(cfg: &ConfigDir) -> Self {
        Self::start_in(cfg, cfg.path().parent())
    }

    fn start_in(cfg: &ConfigDir, cwd: Option<&Path>) -> Self {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("meshgate.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshgate"));
        match cwd {
            Some(dir) => {
                let name = cfg.path().file_name().unwrap();
                cmd.current_dir(dir)
                    .arg("--config-dir")
                    .arg(Path::new(".").join(name));
            }
            None => {
                cmd.arg("--config-dir").arg(cfg.path());
            }
        }
        let child = cmd
            .env("MESHGATE_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Meshgate {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], cfg.admin_port)),
            log,
            _logdir: logdir,
        };
        let ready = wait_until(Duration::from_secs(10), || {
            if let Ok(Some(_)) = m.child.try_wait() {
                return true;
            }
            m.http_get("/readyz").is_some_and(|(s, _)| s == 200)
        });
        if let Ok(Some(status)) = m.child.try_wait() {
            panic!("meshgate exited early ({status}):\n{}", m.log_text());
        }
        assert!(ready, "meshgate not ready in 10 s:\n{}", m.log_text());
        m
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs (not exited, not a zombie).
    pub fn child_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// A minimal HTTP/1.0 GET against the admin API: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let (head, body) = buf.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    }

    pub fn metrics(&self) -> String {
        self.http_get("/metrics").expect("metrics").1
    }

    /// The value of one sample line, e.g.
    /// `meshgate_connections_active{tenant="t",instance="web"}`; 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.http_get(path).expect("admin API answers");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

/// Stops a meshgate child as an operator would (SIGTERM: listeners close,
/// sockets such as the `wg` UAPI ones are removed), and SIGKILLs it if it
/// has not exited within two seconds.
pub fn stop_gracefully(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let gone = wait_until(Duration::from_secs(2), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !gone {
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for Meshgate {
    fn drop(&mut self) {
        stop_gracefully(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- meshgate log ---\n{}", self.log_text());
        }
    }
}

/// nginx serving a directory on 127.0.0.1, as a real upstream. Runs without
/// a master process so it needs no other user and reads the temp dir as is.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start() -> Option<Self> {
        Self::start_with("", |root| format!("root {};", root.display()))
    }

    /// nginx whose server listens on 127.0.0.1 with `listen_options` (e.g.
    /// ` proxy_protocol`) and has the directives `server` gives for its
    /// document root.
    pub fn start_with(
        listen_options: &str,
        server: impl FnOnce(&std::path::Path) -> String,
    ) -> Option<Self> {
        if !have("nginx") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(
            root.join("index.html"),
            "<h1>hello from nginx behind meshgate</h1>\n",
        )
        .unwrap();
        let port = free_port();
        let directives = server(&root);
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n fastcgi_temp_path {d}/tmp;\n uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n\
             server {{ listen 127.0.0.1:{port}{listen_options}; {directives} }}\n}}\n"
        );
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_until(Duration::from_secs(5), || TcpStream::connect(addr).is_ok()),
            "nginx did not start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        Some(Nginx {
            child,
            addr,
            root,
            _dir: dir,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl -s URL` → (HTTP status, body) with a 10 s limit.
pub fn curl(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `curl -sS --max-time 10 ARGS URL` → (exit code, HTTP status, output
/// before the status, stderr): for clients going through a proxy (`-x`).
pub fn curl_with(args: &[&str], url: &str) -> (i32, u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    curl_result(&out)
}

/// What `curl -sS -w '\n%{http_code}' ...` said: (exit code, HTTP status,
/// output before the status, stderr).
pub fn curl_result(out: &Output) -> (i32, u16, String, String) {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A TCP echo server on 127.0.0.1 (threads; for tests only).
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Sends `msg` on `s` and reads back as many bytes.
pub fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

/// An Ed25519 key pair made by OpenSSH's `ssh-keygen` in `dir` (no
/// passphrase, comment `name`): the private key's path and the public
/// key's `authorized_keys` line.
pub fn ssh_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen failed");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}
