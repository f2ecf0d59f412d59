//! Raw Linux system calls behind small safe functions.
//!
//! This is the only place in `core` that uses `unsafe`. It offers what the
//! proxy's zero-copy path needs: a non-blocking [`Pipe`] (pipe2 + fcntl) and
//! [`splice`]. Every descriptor is an [`OwnedFd`], so it is closed on drop.
#![cfg(any(target_os = "linux", target_os = "android"))]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Pipe size used when the kernel reports none (the Linux default, 16 pages).
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// A kernel pipe used as the in-kernel buffer between two sockets.
///
/// Both ends are `O_NONBLOCK | O_CLOEXEC` and closed on drop.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// Creates a pipe and tries to grow it to `want` bytes.
    ///
    /// Growing can fail (for example above `/proc/sys/fs/pipe-max-size` or
    /// past the per-user pipe quota); that is not an error, the pipe keeps
    /// the size the kernel gave it, which [`Pipe::capacity`] reports.
    pub(crate) fn new(want: usize) -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a writable array of two c_ints, which is exactly
        // what pipe2(2) writes to; the flags are valid constants.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both entries are freshly opened
        // descriptors owned by nobody else; each is wrapped exactly once.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let capacity = set_pipe_size(write.as_fd(), want)
            .or_else(|_| pipe_size(write.as_fd()))
            .unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// How many bytes the pipe holds when full.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The end data is spliced out of.
    pub(crate) fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The end data is spliced into.
    pub(crate) fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }
}

/// fcntl(F_SETPIPE_SZ); returns the size the kernel actually set.
fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<usize> {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is a live descriptor borrowed for this call; F_SETPIPE_SZ
    // takes an int argument and touches no caller memory.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    non_negative(rc)
}

/// fcntl(F_GETPIPE_SZ).
fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    // SAFETY: `fd` is a live descriptor borrowed for this call; F_GETPIPE_SZ
    // takes no argument and touches no caller memory.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    non_negative(rc)
}

fn non_negative(rc: libc::c_int) -> io::Result<usize> {
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// Moves up to `len` bytes from `from` to `to` without copying through user
/// space; one of the two must be a pipe.
///
/// Non-blocking (`SPLICE_F_NONBLOCK`): returns `WouldBlock` when nothing can
/// move yet. `Ok(0)` means end of input when reading from a socket. `EINTR`
/// is retried here, so callers never see `Interrupted`.
pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both descriptors are live for the duration of the call
        // (borrowed), the offset pointers are null (required for pipes and
        // sockets, meaning "use the file position"), and splice writes no
        // caller memory.
        let rc = unsafe {
            libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        match usize::try_from(rc) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// Reads from a stream socket into `buf`'s spare capacity (after its
/// length), without zeroing it first, and extends `buf` by what was read.
/// Non-blocking (`MSG_DONTWAIT`): `WouldBlock` when nothing is queued; `Ok(0)`
/// is end of input. `EINTR` is retried here.
pub(crate) fn recv_into_spare(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    loop {
        // SAFETY: `fd` is live for the call (borrowed); the kernel writes at
        // most `spare.len()` bytes into `spare`, memory `buf` owns.
        let rc = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(rc) {
            Ok(n) => {
                // SAFETY: recv initialised the first `n` bytes of the spare
                // capacity, so the first `len + n` elements are initialised.
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// Asks the kernel to report each datagram's original destination
/// (`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`), as TPROXY keeps it.
pub(crate) fn set_recv_orig_dst(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)
    } else {
        (libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
    };
    set_int_option(fd, level, name, 1)
}

/// `setsockopt` of an `int` option.
fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the descriptor is live (borrowed); the option value is a
    // c_int on the stack whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One datagram as [`recv_msg`] received it.
pub(crate) struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// Its source.
    pub from: std::net::SocketAddr,
    /// Its original destination, when asked for ([`set_recv_orig_dst`])
    /// and a TPROXY rule kept one.
    pub orig_dst: Option<std::net::SocketAddr>,
    /// With UDP GRO on ([`set_udp_gro`]): the buffer holds several
    /// datagrams of this size (the last may be shorter).
    pub segment: Option<usize>,
}

/// Receives one datagram, or a GRO batch of them (non-blocking), with what
/// the kernel says about it in control messages.
pub(crate) fn recv_msg(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: zeroed sockaddr_storage and cmsg space are valid initial
    // values; `msg` points at them and at `buf` for the duration of the
    // call only; the kernel writes at most the lengths given, and the
    // control messages are read within `msg_controllen`.
    unsafe {
        let mut src: libc::sockaddr_storage = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 16]; // 128 bytes, aligned for cmsghdr
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut src as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = loop {
            let rc = libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
            if rc >= 0 {
                break rc as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        let from = sockaddr_to_std(&src)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown source family"))?;
        let mut out = Received {
            len: n,
            from,
            orig_dst: None,
            segment: None,
        };
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data_len = (c.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            let is_orig = (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_ORIGDSTADDR)
                || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_ORIGDSTADDR);
            if is_orig {
                let mut ss: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
                    data_len.min(std::mem::size_of::<libc::sockaddr_storage>()),
                );
                out.orig_dst = sockaddr_to_std(&ss);
            } else if c.cmsg_level == libc::SOL_UDP && c.cmsg_type == libc::UDP_GRO {
                let mut seg: libc::c_int = 0;
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    (&mut seg as *mut libc::c_int).cast::<u8>(),
                    data_len.min(std::mem::size_of::<libc::c_int>()),
                );
                out.segment = usize::try_from(seg).ok().filter(|s| *s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok(out)
    }
}

/// Turns UDP GRO on: the kernel may hand several datagrams of one flow
/// over in one receive ([`Received::segment`]).
pub(crate) fn set_udp_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(fd, libc::SOL_UDP, libc::UDP_GRO, 1)
}

/// Sends `buf` to `to` as datagrams of `segment` bytes each (the last may
/// be shorter) in one call, with UDP GSO (non-blocking).
pub(crate) fn send_gso(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    segment: u16,
    to: &socket2::SockAddr,
) -> io::Result<usize> {
    // SAFETY: `msg` points at `buf`, `to` and a control buffer sized and
    // aligned for one cmsghdr with a u16, all live for the call; the kernel
    // only reads them.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut control = [0u64; 4]; // 32 bytes, aligned for cmsghdr
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::copy_nonoverlapping(
            (&segment as *const u16).cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            std::mem::size_of::<u16>(),
        );
        loop {
            let rc = libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT);
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// A `sockaddr_storage` holding IPv4 or IPv6, as a `SocketAddr`.
fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in,
            // which is smaller than sockaddr_storage and suitably aligned.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(std::net::SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
