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
