//! System calls of the kernel engine: passing descriptors over a Unix
//! socket (`SCM_RIGHTS`), and the `ioctl`s that make a TUN device and give
//! it addresses and routes inside the helper's namespace. Plain `ioctl`s
//! rather than netlink: a handful of fixed-size requests, no dependency.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use ipnet::IpNet;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets, both close-on-exec:
/// message boundaries kept, and end of file when the other side is gone.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message, with `pass` attached as `SCM_RIGHTS` if given.
pub fn send_msg(sock: BorrowedFd<'_>, data: &[u8], pass: Option<BorrowedFd<'_>>) -> io::Result<()> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = pass {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds exactly one header with one fd.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf`: its length (0 at end of file) and the
/// descriptor attached to it, if any (close-on-exec).
pub fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fd = None;
    // SAFETY: the kernel filled `control`; the CMSG macros walk it within
    // `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const RawFd);
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message longer than the buffer",
        ));
    }
    Ok((n, fd))
}

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{name}` is not a valid interface name"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }

    fn set_i16(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn get_i16(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_i32(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn get_i32(&self) -> i32 {
        i32::from_ne_bytes(self.data[..4].try_into().expect("4 bytes"))
    }

    fn set_sockaddr_in(&mut self, ip: Ipv4Addr) {
        // struct sockaddr_in: family, port, address.
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[2..4].fill(0);
        self.data[4..8].copy_from_slice(&ip.octets());
    }
}

/// # Safety
/// `arg` must point at the structure `request` expects.
unsafe fn ioctl<T>(fd: RawFd, request: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    cvt(libc::ioctl(fd, request as _, arg)).map(drop)
}

fn socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCSIFMTU: libc::c_ulong = 0x8922;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCADDRT: libc::c_ulong = 0x890b;

/// Opens `/dev/net/tun` as a layer-3 TUN named `name` without packet
/// information headers, each frame led by a `virtio_net_hdr`
/// ([`super::offload`]), with checksum and TCP segmentation offloads where
/// the kernel takes them.
pub fn open_tun(name: &str) -> io::Result<OwnedFd> {
    // SAFETY: a constant, NUL-terminated path.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: just opened, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name)?;
    req.set_i16((libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16);
    // SAFETY: TUNSETIFF takes a struct ifreq.
    unsafe { ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) }?;
    // SAFETY: TUNSETOFFLOAD takes the flags as its argument.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            TUNSETOFFLOAD,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
        )
    };
    if rc < 0 {
        // Frames still carry the header; the kernel just segments itself.
        tracing::debug!(error = %io::Error::last_os_error(), "TUN offloads refused");
    }
    Ok(fd)
}

/// Brings interface `name` up (or down) and, if given, sets its MTU.
pub fn set_up(name: &str, mtu: Option<usize>) -> io::Result<()> {
    let s = socket(libc::AF_INET)?;
    if let Some(mtu) = mtu {
        let mut req = IfReq::new(name)?;
        req.set_i32(mtu as i32);
        // SAFETY: SIOCSIFMTU takes a struct ifreq with ifr_mtu.
        unsafe { ioctl(s.as_raw_fd(), SIOCSIFMTU, &mut req) }?;
    }
    let mut req = IfReq::new(name)?;
    // SAFETY: SIOCGIFFLAGS fills ifr_flags.
    unsafe { ioctl(s.as_raw_fd(), SIOCGIFFLAGS, &mut req) }?;
    let flags = req.get_i16() | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    req.set_i16(flags);
    // SAFETY: SIOCSIFFLAGS takes ifr_flags.
    unsafe { ioctl(s.as_raw_fd(), SIOCSIFFLAGS, &mut req) }
}

fn ifindex(name: &str) -> io::Result<i32> {
    let s = socket(libc::AF_INET)?;
    let mut req = IfReq::new(name)?;
    // SAFETY: SIOCGIFINDEX fills ifr_ifindex.
    unsafe { ioctl(s.as_raw_fd(), SIOCGIFINDEX, &mut req) }?;
    Ok(req.get_i32())
}

/// `struct in6_ifreq`.
#[repr(C)]
struct In6IfReq {
    addr: [u8; 16],
    prefixlen: u32,
    ifindex: libc::c_int,
}

/// Adds `net` (address and prefix) to interface `name`. A second IPv4
/// address goes on the alias `name:N` (`n` counts the IPv4 addresses
/// already added).
pub fn add_address(name: &str, net: IpNet, n: usize) -> io::Result<()> {
    match (net.addr(), net) {
        (IpAddr::V4(ip), IpNet::V4(v4)) => {
            let label = if n == 0 {
                name.to_string()
            } else {
                format!("{name}:{n}")
            };
            let s = socket(libc::AF_INET)?;
            let mut req = IfReq::new(&label)?;
            req.set_sockaddr_in(ip);
            // SAFETY: SIOCSIFADDR takes a struct ifreq with a sockaddr_in.
            unsafe { ioctl(s.as_raw_fd(), SIOCSIFADDR, &mut req) }?;
            let mut req = IfReq::new(&label)?;
            req.set_sockaddr_in(v4.netmask());
            // SAFETY: as above, the netmask.
            unsafe { ioctl(s.as_raw_fd(), SIOCSIFNETMASK, &mut req) }
        }
        (IpAddr::V6(ip), _) => {
            let s = socket(libc::AF_INET6)?;
            let mut req = In6IfReq {
                addr: ip.octets(),
                prefixlen: u32::from(net.prefix_len()),
                ifindex: ifindex(name)?,
            };
            // SAFETY: SIOCSIFADDR on an AF_INET6 socket takes a struct in6_ifreq.
            unsafe { ioctl(s.as_raw_fd(), SIOCSIFADDR, &mut req) }
        }
        _ => unreachable!("IpNet's address has its family"),
    }
}

/// `struct in6_rtmsg`.
#[repr(C)]
struct In6RtMsg {
    dst: [u8; 16],
    src: [u8; 16],
    gateway: [u8; 16],
    rtype: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

const RTF_UP: u16 = 0x0001;

/// Routes `net` out of interface `name` (no gateway: a point-to-point TUN).
pub fn add_route(name: &str, net: IpNet) -> io::Result<()> {
    match net {
        IpNet::V4(v4) => {
            let s = socket(libc::AF_INET)?;
            let dev = std::ffi::CString::new(name).map_err(io::Error::other)?;
            let to_sockaddr = |ip: Ipv4Addr| {
                // SAFETY: sockaddr is plain data; sockaddr_in fits in it.
                let mut sa: libc::sockaddr = unsafe { zeroed() };
                sa.sa_family = libc::AF_INET as libc::sa_family_t;
                let bytes: [u8; 14] = {
                    let mut b = [0u8; 14];
                    b[2..6].copy_from_slice(&ip.octets());
                    b
                };
                for (d, s) in sa.sa_data.iter_mut().zip(bytes) {
                    *d = s as libc::c_char;
                }
                sa
            };
            // SAFETY: rtentry is plain data; zero is an empty route.
            let mut rt: libc::rtentry = unsafe { zeroed() };
            rt.rt_dst = to_sockaddr(v4.network());
            rt.rt_genmask = to_sockaddr(v4.netmask());
            rt.rt_flags = RTF_UP;
            rt.rt_metric = 1;
            rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
            // SAFETY: SIOCADDRT takes a struct rtentry; `dev` outlives the call.
            unsafe { ioctl(s.as_raw_fd(), SIOCADDRT, &mut rt) }
        }
        IpNet::V6(v6) => {
            let s = socket(libc::AF_INET6)?;
            let mut rt = In6RtMsg {
                dst: v6.network().octets(),
                src: Ipv6Addr::UNSPECIFIED.octets(),
                gateway: Ipv6Addr::UNSPECIFIED.octets(),
                rtype: 0,
                dst_len: u16::from(v6.prefix_len()),
                src_len: 0,
                metric: 1,
                info: 0,
                flags: u32::from(RTF_UP),
                ifindex: ifindex(name)?,
            };
            // SAFETY: SIOCADDRT on an AF_INET6 socket takes a struct in6_rtmsg.
            unsafe { ioctl(s.as_raw_fd(), SIOCADDRT, &mut rt) }
        }
    }
}

/// Writes `value` to a file under `/proc/sys` (a sysctl of the caller's
/// namespace).
pub fn sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/{path}"), value)
}

/// Writes `data` to `path` (a `/proc/self` file of a new user namespace);
/// an `optional` file that cannot be opened is no error. Only system calls,
/// no allocation: safe between fork and exec.
fn write_proc(path: &std::ffi::CStr, data: &[u8], optional: bool) -> io::Result<()> {
    // SAFETY: open, write and close on a NUL-terminated path and a buffer
    // we hold for the call.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            let e = io::Error::last_os_error();
            return if optional { Ok(()) } else { Err(e) };
        }
        let n = libc::write(fd, data.as_ptr() as *const libc::c_void, data.len());
        let e = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            Err(e)
        } else {
            Ok(())
        }
    }
}

/// Between fork and exec, in the child: the control socket onto
/// [`super::helper::CONTROL_FD`], then a new user and network namespace (the user
/// mapped to root inside). Only system calls, no allocation.
fn enter_namespaces(control: RawFd, uid_map: &[u8], gid_map: &[u8]) -> io::Result<()> {
    // SAFETY: plain system calls on descriptors and constant paths; this
    // runs in the single-threaded child between fork and exec.
    unsafe {
        if control == super::helper::CONTROL_FD {
            let flags = libc::fcntl(control, libc::F_GETFD);
            if flags < 0 || libc::fcntl(control, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
        } else if libc::dup2(control, super::helper::CONTROL_FD) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0 {
            write_proc(c"/proc/self/setgroups", b"deny", true)?;
            write_proc(c"/proc/self/uid_map", uid_map, false)?;
            write_proc(c"/proc/self/gid_map", gid_map, false)?;
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // Root where user namespaces are refused: a network namespace alone.
        if libc::geteuid() == 0 && libc::unshare(libc::CLONE_NEWNET) == 0 {
            return Ok(());
        }
        Err(e)
    }
}

/// Makes `cmd`'s child enter a new user and network namespace between fork
/// and exec ([`enter_namespaces`]), with `control` as its descriptor 3.
pub fn enter_namespaces_before_exec(
    cmd: &mut tokio::process::Command,
    control: RawFd,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
) {
    // SAFETY: the closure only makes system calls (see enter_namespaces)
    // and touches no lock or allocator.
    unsafe {
        cmd.pre_exec(move || enter_namespaces(control, &uid_map, &gid_map));
    }
}

/// What a program entering an engine's namespace needs, opened and
/// formatted before the fork ([`enter_for_command`]).
pub struct Entry {
    /// The helper's user namespace, when it is not ours.
    pub user: Option<OwnedFd>,
    /// The helper's network namespace.
    pub net: OwnedFd,
    /// Files bind-mounted over others in the program's own mount
    /// namespace: (source, target), NUL-terminated paths.
    pub binds: Vec<(std::ffi::CString, std::ffi::CString)>,
    /// `/proc/self/uid_map` and `gid_map` of the program's own user
    /// namespace: its user and group as they were outside.
    pub uid_map: Vec<u8>,
    /// See `uid_map`.
    pub gid_map: Vec<u8>,
}

/// Between fork and exec, in the child: into the helper's user namespace
/// (if not ours) and network namespace, a mount namespace of its own with
/// `binds` mounted, then (having entered a user namespace) a user namespace
/// of its own that maps its user and group back to what they were outside,
/// so the program runs as its user with no capability over the network
/// namespace; last, no new privileges. Only system calls, no allocation.
fn enter_for_command(e: &Entry) -> io::Result<()> {
    // SAFETY: plain system calls on descriptors and on paths and buffers
    // made before the fork; this runs in the single-threaded child between
    // fork and exec.
    unsafe {
        let last = || io::Error::last_os_error();
        if let Some(user) = &e.user {
            if libc::setns(user.as_raw_fd(), libc::CLONE_NEWUSER) != 0 {
                return Err(last());
            }
        }
        if libc::setns(e.net.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(last());
        }
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(last());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(last());
        }
        for (src, dst) in &e.binds {
            if libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(last());
            }
        }
        if e.user.is_some() {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(last());
            }
            // Optional: a namespace whose parent denies setgroups already
            // denies it.
            let _ = write_proc(c"/proc/self/setgroups", b"deny", true);
            write_proc(c"/proc/self/uid_map", &e.uid_map, false)?;
            write_proc(c"/proc/self/gid_map", &e.gid_map, false)?;
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(last());
        }
        Ok(())
    }
}

/// Makes `cmd`'s child enter an engine's namespace between fork and exec
/// ([`enter_for_command`]).
pub fn enter_before_exec(cmd: &mut std::process::Command, entry: Entry) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only makes system calls (see enter_for_command)
    // on what `entry` holds, and touches no lock or allocator.
    unsafe {
        cmd.pre_exec(move || enter_for_command(&entry));
    }
}

/// This process's effective user and group id./// This process's effective user and group id.
pub fn ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Receives on `sock` give up after `timeout` (`WouldBlock`).
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_RCVTIMEO takes a struct timeval.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Takes ownership of descriptor `fd`, which the process was started with.
///
/// # Panics
///
/// If `fd` is not open.
pub fn inherited(fd: RawFd) -> OwnedFd {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    assert!(
        unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0,
        "descriptor {fd} is not open"
    );
    // SAFETY: the descriptor is open, and the caller says nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Names this process (what `ps` and `top` show; at most 15 bytes).
pub fn set_process_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Registers a non-blocking descriptor with the runtime, for reading.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and the same for as long as it lives,
    // and the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Reads one packet from a non-blocking TUN descriptor.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes one frame (a `virtio_net_hdr` and its packet) to a TUN descriptor.
pub fn write(fd: RawFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: `frame` is valid for its length.
    let n = unsafe { libc::write(fd, frame.as_ptr() as *const libc::c_void, frame.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        send_msg(a.as_fd(), b"hello", Some(x.as_fd())).unwrap();
        let mut buf = [0u8; 64];
        let (n, fd) = recv_msg(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        // The received descriptor is the same socket: a message sent on it
        // arrives at `y`.
        let fd = fd.expect("a descriptor came along");
        send_msg(fd.as_fd(), b"through", None).unwrap();
        let (n, none) = recv_msg(y.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"through");
        assert!(none.is_none());
        // End of file once the other side is gone.
        drop(a);
        assert_eq!(recv_msg(b.as_fd(), &mut buf).unwrap().0, 0);
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(IfReq::new("mg0").is_ok());
        assert!(IfReq::new("").is_err());
        assert!(IfReq::new("a-name-far-too-long").is_err());
    }
}
