//! The helper process of the kernel engine: it lives in the engine's own
//! unnamed user + network namespace, makes the TUN there and creates
//! sockets on request (a socket belongs to the namespace it was created
//! in, wherever its descriptor goes afterwards).
//!
//! meshgate starts it by running its own executable again with
//! [`HELPER_ARG`]; the namespaces are entered between fork and exec (see
//! `super::spawn_helper`). It talks over descriptor 3, a `SOCK_SEQPACKET`
//! socket: one JSON [`Request`] per message, one [`Reply`] back, with a
//! descriptor attached where one was made. It exits when meshgate closes
//! its end (shutdown, or meshgate killed: the kernel closes the socket), so
//! no process and no namespace outlive meshgate.

use std::os::fd::{AsFd, OwnedFd};

use super::sys;
use super::{Reply, Request, Setup, TUN_NAME};

/// The first argument that turns the executable into the helper.
pub const HELPER_ARG: &str = "--kernel-engine-helper";

/// The descriptor the helper finds its control socket on.
pub const CONTROL_FD: i32 = 3;

/// If this process was started as the helper, runs it and exits; otherwise
/// returns at once. The server calls this first thing in `main`, before any
/// thread or runtime exists.
pub fn run_if_helper() {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(HELPER_ARG)) {
        std::process::exit(run());
    }
}

fn run() -> i32 {
    sys::set_process_name(c"meshgate-netns");
    // meshgate placed the control socket here before exec.
    let ctl = sys::inherited(CONTROL_FD);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match sys::recv_msg(ctl.as_fd(), &mut buf) {
            Ok((0, _)) => return 0, // meshgate is gone or done with us
            Ok((n, _)) => n,
            Err(e) => {
                eprintln!("meshgate kernel engine helper: control socket: {e}");
                return 1;
            }
        };
        let (reply, fd) = match serde_json::from_slice::<Request>(&buf[..n]) {
            Ok(Request::Setup(s)) => match setup(&s) {
                Ok(tun) => (Reply::Ok, Some(tun)),
                Err(e) => (Reply::Err(e), None),
            },
            Ok(Request::Socket { ipv6, udp }) => match new_socket(ipv6, udp) {
                Ok(s) => (Reply::Ok, Some(s)),
                Err(e) => (Reply::Err(format!("socket: {e}")), None),
            },
            Err(e) => (Reply::Err(format!("bad request: {e}")), None),
        };
        let data = serde_json::to_vec(&reply).expect("replies serialize");
        if sys::send_msg(ctl.as_fd(), &data, fd.as_ref().map(|f| f.as_fd())).is_err() {
            return 1;
        }
    }
}

/// Loopback up, the TUN with its MTU, addresses and default routes.
fn setup(s: &Setup) -> Result<OwnedFd, String> {
    sys::set_up("lo", None).map_err(|e| format!("bring up loopback: {e}"))?;
    let tun = sys::open_tun(TUN_NAME).map_err(|e| {
        format!("open /dev/net/tun and create `{TUN_NAME}` in the engine's namespace: {e}")
    })?;
    // IPv6 on a point-to-point TUN: no duplicate address detection (the
    // address is usable at once), no router solicitations.
    for (key, value) in [("accept_dad", "0"), ("router_solicitations", "0")] {
        let _ = sys::sysctl(&format!("net/ipv6/conf/{TUN_NAME}/{key}"), value);
    }
    sys::set_up(TUN_NAME, Some(s.mtu)).map_err(|e| format!("bring up `{TUN_NAME}`: {e}"))?;
    let mut v4 = 0;
    for net in &s.addresses {
        sys::add_address(TUN_NAME, *net, v4).map_err(|e| format!("add address {net}: {e}"))?;
        if net.addr().is_ipv4() {
            v4 += 1;
        }
    }
    // Everything that is not local leaves through the TUN: meshgate's
    // routing (the vnet's routes, the peers' allowed IPs) decides from there.
    let v4_default: ipnet::IpNet = "0.0.0.0/0".parse().expect("literal");
    let v6_default: ipnet::IpNet = "::/0".parse().expect("literal");
    if s.addresses.iter().any(|n| n.addr().is_ipv4()) {
        sys::add_route(TUN_NAME, v4_default).map_err(|e| format!("add IPv4 default route: {e}"))?;
    }
    if s.addresses.iter().any(|n| n.addr().is_ipv6()) {
        sys::add_route(TUN_NAME, v6_default).map_err(|e| format!("add IPv6 default route: {e}"))?;
    }
    Ok(tun)
}

fn new_socket(ipv6: bool, udp: bool) -> std::io::Result<OwnedFd> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = if udp {
        Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?
    } else {
        Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?
    };
    Ok(s.into())
}
