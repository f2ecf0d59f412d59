//! The `kernel` engine: a TUN device in an unnamed user + network namespace
//! of its own, so the kernel's TCP terminates tunnelled connections (as
//! Cloudflare's Oxy does, seed `004`).
//!
//! # How it is built
//!
//! meshgate (root or not) runs its own executable again as a small helper
//! ([`helper`]), entering a new user namespace and a new network namespace
//! between fork and exec: the user namespace maps meshgate's user to root,
//! which gives the helper `CAP_NET_ADMIN` over the new network namespace
//! and nothing on the host. (As root where user namespaces are refused, a
//! network namespace alone is used.) The helper brings up loopback, makes
//! the TUN `mg0` with the vnet's MTU and addresses and a default route per
//! family through it, and passes the TUN's descriptor back over a
//! `SOCK_SEQPACKET` pair with `SCM_RIGHTS`. From then on it only creates
//! sockets on request: a socket stays in the namespace it was created in,
//! so meshgate binds listeners on the VPN addresses and dials from them
//! with ordinary tokio sockets, and two vnets with the same addresses never
//! meet. Nothing on the host's network changes, no name appears in
//! `ip netns`, and the helper exits when meshgate closes its end of the
//! pair, or when meshgate dies (the kernel closes it); the namespace goes
//! with the last descriptor.
//!
//! # Data path
//!
//! Decrypted packets for the node's addresses are written to the TUN
//! ([`IpEngine::inject`]); a task reads what the kernel sends out of the
//! TUN and hands it to the [`PacketSink`] (the WireGuard device encrypts
//! it for the peer whose allowed IPs hold the destination). The TUN takes
//! checksum and TCP segmentation offloads ([`offload`]): the kernel hands
//! over up to 64 KB of a TCP stream per read, cut here into packets of the
//! size it asked for; a batch of reads ends with [`PacketSink::flush`]. The
//! other way, consecutive decrypted segments of a flow are coalesced into
//! one super-packet per TUN write (GRO), written at [`IpEngine::flush`]. The tunnelled
//! sockets are plain kernel TCP sockets, so pipes join them with the
//! `splice(2)` fast path; they use the configured congestion control (BBR
//! by default where the kernel has it), keep-alive and `TCP_USER_TIMEOUT`.
//!
//! # Needs
//!
//! User namespaces (or root) and read-write access to `/dev/net/tun`: both
//! are checked at start, and a missing one is an error that says what is
//! missing and points at `engine: userspace`.

pub mod helper;
pub mod offload;
#[allow(unsafe_code)]
mod sys;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::{EngineConfig, EngineError, EngineKind, IpEngine, NetStackStats, PacketSink};
use crate::core::net::dial::DialError;
use crate::core::net::listen::{HostListener, StreamListener};
use crate::core::net::proxy::Stream;

pub use helper::run_if_helper;

/// The TUN's name inside the engine's namespace (each engine has its own
/// namespace, so one name for all).
const TUN_NAME: &str = "mg0";

/// What the helper sets up first.
#[derive(Debug, Serialize, Deserialize)]
struct Setup {
    addresses: Vec<IpNet>,
    mtu: usize,
}

/// A request to the helper.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Loopback, the TUN, its addresses and routes; the TUN comes back.
    Setup(Setup),
    /// A new socket in the namespace; it comes back.
    Socket { ipv6: bool, udp: bool },
}

/// The helper's answer; a descriptor comes with `Ok` where one was made.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Ok,
    Err(String),
}

/// How long meshgate waits for the helper's answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// A running kernel engine. Dropping it (or [`IpEngine::shutdown`]) ends
/// the helper; the namespace vanishes with the last socket in it.
pub struct KernelEngine {
    tun: Arc<AsyncFd<OwnedFd>>,
    /// The control socket to the helper (`None` once shut down).
    control: Arc<Mutex<Option<OwnedFd>>>,
    cfg: EngineConfig,
    /// The congestion control set on every socket, if any.
    congestion: Option<String>,
    /// Whether setting `congestion` failed once (warned, not retried).
    congestion_failed: AtomicBool,
    stop: CancellationToken,
    helper: Mutex<Option<tokio::process::Child>>,
    packets_in: AtomicU64,
    packets_out: Arc<AtomicU64>,
    dropped_in: AtomicU64,
    /// Decrypted TCP segments coalesced into super-packets for the TUN
    /// ([`offload::Coalescer`]), written at [`IpEngine::flush`].
    gro: Mutex<offload::Coalescer>,
}

impl KernelEngine {
    /// The helper's process id while it runs: `/proc/PID/ns/net` is the
    /// engine's network namespace (and `/proc/PID/ns/user` its user
    /// namespace), for a program to enter (`meshgate run`).
    pub fn helper_pid(&self) -> Option<u32> {
        self.helper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|c| c.id())
    }
}

/// Makes `cmd` run inside the network namespace of the engine whose helper
/// is `helper_pid` ([`KernelEngine::helper_pid`]), with `binds` (source,
/// target) mounted in a mount namespace of its own (a `resolv.conf`), as
/// this process's user and group with no capability over the namespace,
/// and no new privileges (set-uid programs and file capabilities do not
/// apply). Fails, naming the file, if the helper's namespaces cannot be
/// opened.
pub fn enter_namespace(
    cmd: &mut std::process::Command,
    helper_pid: u32,
    binds: &[(std::path::PathBuf, std::path::PathBuf)],
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let open = |what: &str| {
        let path = format!("/proc/{helper_pid}/ns/{what}");
        std::fs::File::open(&path)
            .map(OwnedFd::from)
            .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
    };
    let ino = |path: &str| std::fs::metadata(path).map(|m| m.ino());
    let theirs = format!("/proc/{helper_pid}/ns/user");
    let user = if ino(&theirs)? == ino("/proc/self/ns/user")? {
        None
    } else {
        Some(open("user")?)
    };
    let net = open("net")?;
    let cstr = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: a NUL in the path", p.display()),
            )
        })
    };
    let binds = binds
        .iter()
        .map(|(s, d)| Ok((cstr(s)?, cstr(d)?)))
        .collect::<io::Result<Vec<_>>>()?;
    let (uid, gid) = sys::ids();
    sys::enter_before_exec(
        cmd,
        sys::Entry {
            user,
            net,
            binds,
            uid_map: format!("{uid} 0 1").into_bytes(),
            gid_map: format!("{gid} 0 1").into_bytes(),
        },
    );
    Ok(())
}

/// Checks that this process can open `/dev/net/tun`./// Checks that this process can open `/dev/net/tun`.
fn check_tun_access() -> Result<(), EngineError> {
    let path = "/dev/net/tun";
    match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(EngineError::Kernel(format!(
            "there is no {path} on this machine (load the `tun` kernel module), or use `engine: userspace`, which needs no TUN"
        ))),
        Err(e) => {
            let uid = sys::ids().0;
            let mode = std::fs::metadata(path)
                .map(|m| {
                    format!(
                        "mode {:04o}, owner uid {}, group gid {}",
                        m.mode() & 0o7777,
                        m.uid(),
                        m.gid()
                    )
                })
                .unwrap_or_default();
            Err(EngineError::Kernel(format!(
                "cannot open {path} ({mode}) as uid {uid}: {e}. Run meshgate as root, give its user read-write access to {path} (a udev rule or an ACL), or use `engine: userspace`, which needs no privileges"
            )))
        }
    }
}

/// Starts the helper in its namespaces; returns it and meshgate's end of
/// the control socket.
fn spawn_helper(label: &str) -> Result<(tokio::process::Child, OwnedFd), EngineError> {
    let (mine, theirs) = sys::seqpacket_pair()
        .map_err(|e| EngineError::Kernel(format!("cannot create the control socket: {e}")))?;
    let (uid, gid) = sys::ids();
    let uid_map = format!("0 {uid} 1").into_bytes();
    let gid_map = format!("0 {gid} 1").into_bytes();
    let raw = theirs.as_raw_fd();
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg0("meshgate-kernel-engine")
        .arg(helper::HELPER_ARG)
        .arg(label)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    sys::enter_namespaces_before_exec(&mut cmd, raw, uid_map, gid_map);
    let child = cmd.spawn().map_err(|e| {
        let namespaces = matches!(
            e.raw_os_error(),
            Some(libc::EPERM | libc::EACCES | libc::EINVAL | libc::ENOSPC | libc::EUSERS)
        );
        if namespaces {
            EngineError::Kernel(format!(
                "cannot create a user and network namespace as uid {uid}: {e}. Unprivileged user namespaces are off or limited here (see the sysctls user.max_user_namespaces, kernel.unprivileged_userns_clone and kernel.apparmor_restrict_unprivileged_userns, or a seccomp profile): allow them, run meshgate as root, or use `engine: userspace`"
            ))
        } else {
            EngineError::Kernel(format!("cannot start the helper process (/proc/self/exe {}): {e}", helper::HELPER_ARG))
        }
    })?;
    drop(theirs);
    // A helper that hangs must not hang meshgate.
    let _ = sys::set_recv_timeout(mine.as_fd(), HELPER_TIMEOUT);
    Ok((child, mine))
}

/// One request to the helper and its answer (blocking, at most
/// [`HELPER_TIMEOUT`]).
fn request(control: &OwnedFd, req: &Request) -> Result<Option<OwnedFd>, String> {
    let data = serde_json::to_vec(req).expect("requests serialize");
    sys::send_msg(control.as_fd(), &data, None).map_err(|e| format!("the helper is gone: {e}"))?;
    let mut buf = [0u8; 4096];
    let (n, fd) = sys::recv_msg(control.as_fd(), &mut buf).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            format!("no answer from the helper within {HELPER_TIMEOUT:?}")
        } else {
            format!("the helper is gone: {e}")
        }
    })?;
    if n == 0 {
        return Err(
            "the helper exited without answering (was meshgate started from its own executable?)"
                .into(),
        );
    }
    match serde_json::from_slice::<Reply>(&buf[..n]) {
        Ok(Reply::Ok) => Ok(fd),
        Ok(Reply::Err(e)) => Err(e),
        Err(e) => Err(format!("unreadable answer from the helper: {e}")),
    }
}

/// `bbr` where the kernel offers it, else the kernel's default.
fn default_congestion() -> Option<String> {
    let available =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").ok()?;
    available
        .split_whitespace()
        .any(|a| a == "bbr")
        .then(|| "bbr".to_string())
}

impl KernelEngine {
    /// Checks what the engine needs, starts the helper and sets up the
    /// namespace; every packet the kernel sends out goes to `sink`.
    pub async fn start(
        cfg: &EngineConfig,
        sink: Arc<dyn PacketSink>,
    ) -> Result<Arc<KernelEngine>, EngineError> {
        check_tun_access()?;
        let (child, control) = spawn_helper(&cfg.label)?;
        let setup = Request::Setup(Setup {
            addresses: cfg.addresses.clone(),
            mtu: cfg.mtu,
        });
        let (control, tun) = tokio::task::spawn_blocking(move || {
            let r = request(&control, &setup);
            (control, r)
        })
        .await
        .map_err(|e| EngineError::Kernel(format!("setup task: {e}")))?;
        let tun = tun
            .map_err(|e| EngineError::Kernel(format!("setting up the namespace failed: {e}")))?
            .ok_or_else(|| EngineError::Kernel("the helper sent no TUN descriptor".into()))?;
        let tun =
            Arc::new(sys::async_fd(tun).map_err(|e| EngineError::Kernel(format!("TUN: {e}")))?);
        let engine = Arc::new(KernelEngine {
            tun: tun.clone(),
            control: Arc::new(Mutex::new(Some(control))),
            congestion: cfg.congestion_control.clone().or_else(default_congestion),
            congestion_failed: AtomicBool::new(false),
            cfg: cfg.clone(),
            stop: CancellationToken::new(),
            helper: Mutex::new(Some(child)),
            packets_in: AtomicU64::new(0),
            packets_out: Arc::new(AtomicU64::new(0)),
            dropped_in: AtomicU64::new(0),
            gro: Mutex::new(offload::Coalescer::default()),
        });
        tokio::spawn(read_loop(
            tun,
            sink,
            engine.stop.clone(),
            engine.packets_out.clone(),
            cfg.label.clone(),
        ));
        tracing::info!(engine = %cfg.label, addresses = ?cfg.addresses, mtu = cfg.mtu, congestion_control = ?engine.congestion, "kernel engine up: a TUN in its own user and network namespace");
        Ok(engine)
    }

    /// A new socket inside the engine's namespace.
    async fn socket(&self, ipv6: bool, udp: bool) -> io::Result<socket2::Socket> {
        let control = self.control.clone();
        let fd = tokio::task::spawn_blocking(move || {
            let guard = control.lock().expect("control poisoned");
            let Some(c) = guard.as_ref() else {
                return Err("the engine is shut down".to_string());
            };
            request(c, &Request::Socket { ipv6, udp })
        })
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other("the helper sent no socket"))?;
        let s = socket2::Socket::from(fd);
        s.set_nonblocking(true)?;
        Ok(s)
    }

    /// Congestion control, keep-alive and the dead-peer timeout; accepted
    /// sockets inherit them from their listener.
    fn tune(&self, s: &socket2::Socket) {
        if let Some(cc) = &self.congestion {
            if !self.congestion_failed.load(Ordering::Relaxed) {
                if let Err(e) = s.set_tcp_congestion(cc.as_bytes()) {
                    self.congestion_failed.store(true, Ordering::Relaxed);
                    tracing::warn!(engine = %self.cfg.label, congestion_control = %cc, error = %e, "cannot use this congestion control; the kernel's default applies");
                }
            }
        }
        if let Some(ka) = self.cfg.keep_alive {
            let probes = (self.cfg.tcp_timeout.as_secs() / ka.as_secs().max(1)).clamp(1, 127);
            let k = socket2::TcpKeepalive::new()
                .with_time(ka)
                .with_interval(ka)
                .with_retries(probes as u32);
            let _ = s.set_tcp_keepalive(&k);
        }
        let _ = s.set_tcp_user_timeout(Some(self.cfg.tcp_timeout));
    }

    /// Packets written into the TUN, and those it refused.
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.packets_in.load(Ordering::Relaxed),
            self.packets_out.load(Ordering::Relaxed),
            self.dropped_in.load(Ordering::Relaxed),
        )
    }
}

/// Whether a packet the kernel sends is for nobody behind the tunnel:
/// multicast (IPv6 neighbour machinery, MLD) goes nowhere.
fn local_only(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.len() >= 20 && (packet[16] & 0xf0) == 0xe0,
        Some(6) => {
            packet.len() >= 40
                && (packet[24] == 0xff || (packet[24] == 0xfe && packet[25] & 0xc0 == 0x80))
        }
        _ => true,
    }
}

async fn read_loop(
    tun: Arc<AsyncFd<OwnedFd>>,
    sink: Arc<dyn PacketSink>,
    stop: CancellationToken,
    packets_out: Arc<AtomicU64>,
    label: String,
) {
    // A frame: the virtio_net_hdr and up to a 64 KB super-packet.
    let mut buf = vec![0u8; offload::VNET_HDR_LEN + 65_536];
    let mut scratch = Vec::new();
    loop {
        let mut guard = tokio::select! {
            _ = stop.cancelled() => return,
            g = tun.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(engine = %label, error = %e, "TUN unreadable; the kernel engine stops");
                    return;
                }
            },
        };
        // A batch per wake-up, then yield to the other tasks.
        for _ in 0..64 {
            match guard.try_io(|fd| sys::read(fd.as_raw_fd(), &mut buf)) {
                Ok(Ok(0)) => return,
                Ok(Ok(n)) => {
                    let split = offload::split(&buf[..n], &mut scratch, |packet| {
                        if !local_only(packet) {
                            packets_out.fetch_add(1, Ordering::Relaxed);
                            sink.send(packet);
                        }
                    });
                    if let Err(e) = split {
                        tracing::debug!(engine = %label, error = ?e, "TUN frame dropped");
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(engine = %label, error = %e, "TUN read failed; the kernel engine stops");
                    return;
                }
                Err(_would_block) => break,
            }
        }
        sink.flush();
        tokio::task::yield_now().await;
    }
}

impl KernelEngine {
    /// Writes a frame to the TUN; a refusal is counted.
    fn write_frame(&self, frame: &[u8]) {
        if sys::write(self.tun.get_ref().as_raw_fd(), frame).is_err() {
            self.dropped_in.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl IpEngine for KernelEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Kernel
    }

    fn inject(&self, packet: &[u8]) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        self.packets_in.fetch_add(1, Ordering::Relaxed);
        let mut gro = self.gro.lock().expect("poisoned");
        gro.push(packet, &mut |frame| self.write_frame(frame));
        true
    }

    fn flush(&self) {
        let mut gro = self.gro.lock().expect("poisoned");
        gro.flush(&mut |frame| self.write_frame(frame));
    }

    fn addresses(&self) -> Vec<IpNet> {
        self.cfg.addresses.clone()
    }

    async fn listen_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn StreamListener>> {
        let s = self.socket(addr.is_ipv6(), false).await?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        self.tune(&s);
        s.bind(&addr.into())?;
        s.listen(1024)?;
        let l = tokio::net::TcpListener::from_std(s.into())?;
        Ok(Box::new(KernelListener {
            inner: HostListener::new(l),
            stop: self.stop.clone(),
        }))
    }

    async fn connect_tcp(&self, dst: SocketAddr, timeout: Duration) -> Result<Stream, DialError> {
        let s = self
            .socket(dst.is_ipv6(), false)
            .await
            .map_err(|e| DialError::Io {
                target: dst.to_string(),
                source: e,
            })?;
        self.tune(&s);
        let _ = s.set_tcp_nodelay(true);
        match tokio::time::timeout(timeout, crate::core::net::dial::connect_socket(s, dst)).await {
            Ok(Ok(s)) => Ok(Stream::Tcp(s)),
            Ok(Err(e)) => Err(DialError::from_io(&dst, e)),
            Err(_) => Err(DialError::Timeout {
                target: dst.to_string(),
                timeout,
            }),
        }
    }

    async fn bind_udp(
        &self,
        local: SocketAddr,
    ) -> io::Result<Arc<dyn crate::core::net::datagram::DatagramSocket>> {
        let s = self.socket(local.is_ipv6(), true).await?;
        if local.is_ipv6() && local.ip().is_unspecified() {
            s.set_only_v6(false)?;
        }
        s.bind(&local.into())?;
        let std: std::net::UdpSocket = s.into();
        Ok(Arc::new(tokio::net::UdpSocket::from_std(std)?))
    }

    fn stats(&self) -> Option<NetStackStats> {
        None
    }

    fn shutdown(&self) {
        self.stop.cancel();
        // Closing our end ends the helper; kill_on_drop makes sure of it
        // and tokio reaps it.
        self.control.lock().expect("control poisoned").take();
        self.helper.lock().expect("helper poisoned").take();
    }
}

/// A listener in the engine's namespace. It fails once the engine stops
/// (an interface restart), as the userspace stack's do, so its on-ramp
/// binds again on the new engine instead of waiting on a dead namespace.
struct KernelListener {
    inner: HostListener,
    stop: CancellationToken,
}

#[async_trait]
impl StreamListener for KernelListener {
    async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)> {
        tokio::select! {
            _ = self.stop.cancelled() => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the kernel engine stopped (its interface restarted or went away)",
            )),
            r = self.inner.accept() => r,
        }
    }
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }
}

impl Drop for KernelEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multicast_stays_local() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[224, 0, 0, 22]);
        assert!(local_only(&v4));
        v4[16..20].copy_from_slice(&[10, 1, 0, 10]);
        assert!(!local_only(&v4));
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[24] = 0xff;
        assert!(local_only(&v6));
        v6[24] = 0xfd;
        assert!(!local_only(&v6));
        assert!(local_only(&[]));
    }

    #[test]
    fn protocol_round_trips() {
        let r = Request::Setup(Setup {
            addresses: vec!["10.192.0.2/24".parse().unwrap()],
            mtu: 1420,
        });
        let back: Request = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(matches!(back, Request::Setup(s) if s.mtu == 1420));
    }
}
