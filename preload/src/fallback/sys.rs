//! Thin wrappers over the libc calls the userspace relay makes. All of this module's FFI.
//!
//! Calls go through the `libc` crate, so inside the .so they land on our own hooks for the
//! hooked names; the relay thread is marked internal and `adopt` runs inside a hook, so the
//! hooks pass straight through. The one exception is [`close_raw`]: it is used from `Drop`
//! and from the fork-child handler, where the guard may not be set and where our own locks may
//! be held, so it issues the syscall directly and can never re-enter the close hook.

use std::io;
use std::os::fd::RawFd;

/// `-1` → the current errno as an `io::Error`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Close `fd` with the raw syscall (see the module doc). Errors are ignored: after close(2)
/// the descriptor is gone whatever it returns.
pub(super) fn close_raw(fd: RawFd) {
    if fd < 0 {
        return;
    }
    // SAFETY: closing a descriptor number has no memory-safety preconditions; callers own `fd`.
    unsafe {
        libc::syscall(libc::SYS_close, libc::c_long::from(fd));
    }
}

/// Close every fd in `first..=last` with the raw syscall (the keeper's clean-up). Errors
/// (an empty range) are ignored.
pub(super) fn close_range_raw(first: RawFd, last: RawFd) {
    if first < 0 || last < first {
        return;
    }
    // SAFETY: closes descriptor numbers only; no memory is involved.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_long::from(first),
            libc::c_long::from(last),
            0 as libc::c_long,
        );
    }
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, 3)`.
pub(super) fn dup_cloexec(fd: RawFd) -> io::Result<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and touches no memory.
    cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })
}

/// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`, both ends `O_NONBLOCK` if `nonblocking`
/// (one syscall instead of a get and a set of the flags per end).
pub(super) fn stream_pair(nonblocking: bool) -> io::Result<(RawFd, RawFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: `fds` is a valid, writable array of two ints, as socketpair requires.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) })?;
    Ok((fds[0], fds[1]))
}

/// File status flags (`F_GETFL`).
pub(super) fn status_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL takes no argument and touches no memory.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// Is `FD_CLOEXEC` set on `fd` (`F_GETFD`)?
pub(super) fn is_cloexec(fd: RawFd) -> io::Result<bool> {
    // SAFETY: F_GETFD takes no argument and touches no memory.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// `dup3(old, new, O_CLOEXEC or 0)`: atomically make `new` refer to `old`'s file.
pub(super) fn dup3(old: RawFd, new: RawFd, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 takes plain integers and touches no memory.
    cvt(unsafe { libc::dup3(old, new, flags) }).map(drop)
}

/// Best-effort `setsockopt(SOL_SOCKET, opt, value)` for an int option.
pub(super) fn set_int_sockopt(fd: RawFd, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: `value` lives for the call and its size is passed exactly.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// `shutdown(fd, how)`; errors (ENOTCONN after the peer left) are ignored: this is a signal.
pub(super) fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown takes plain integers and touches no memory.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// `recv(fd, buf, MSG_DONTWAIT)`: never blocks, whatever `fd`'s `O_NONBLOCK` (the relay's
/// fds keep the program's).
pub(super) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) })
}

/// `send(fd, buf, MSG_NOSIGNAL | MSG_DONTWAIT)`: a vanished peer is EPIPE, never SIGPIPE.
pub(super) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
    cvt_size(unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// `sendmsg` with an iovec array, `MSG_NOSIGNAL | MSG_DONTWAIT`.
pub(super) fn send_vectored(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // IoSlice is guaranteed ABI-compatible with `struct iovec` on Unix.
    let iovlen = bufs.len().min(libc::UIO_MAXIOV as usize);
    // SAFETY: an all-zero msghdr is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr().cast_mut().cast();
    msg.msg_iovlen = iovlen;
    // SAFETY: `msg` points at `iovlen` valid iovecs that outlive the call; sendmsg only reads them.
    cvt_size(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
}

/// `epoll_create1(EPOLL_CLOEXEC)`.
pub(super) fn epoll_create() -> io::Result<RawFd> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

/// `epoll_ctl(ADD)` with `events` and `token`.
pub(super) fn epoll_add(epfd: RawFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    cvt(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}

/// `epoll_ctl(DEL)`; errors ignored (the fd may already be gone from the set).
pub(super) fn epoll_del(epfd: RawFd, fd: RawFd) {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: `ev` is valid (kernels before 2.6.9 required a non-null pointer for DEL).
    unsafe {
        libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, &mut ev);
    }
}

/// `epoll_wait` into `events` (`timeout` in ms, -1 = forever); EINTR is returned to the caller.
pub(super) fn epoll_wait(
    epfd: RawFd,
    events: &mut [libc::epoll_event],
    timeout: libc::c_int,
) -> io::Result<usize> {
    let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `events` is valid for writes of `max` entries for the whole call.
    let n = cvt(unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), max, timeout) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
pub(super) fn eventfd() -> io::Result<RawFd> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Add one to an eventfd counter (wakes the epoll waiter). A full counter (EAGAIN) is as good.
pub(super) fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: `one` is 8 readable bytes that live for the call.
    unsafe {
        libc::write(fd, std::ptr::from_ref(&one).cast(), std::mem::size_of::<u64>());
    }
}

/// Reset an eventfd counter to zero (non-blocking read; EAGAIN means it already was).
pub(super) fn eventfd_drain(fd: RawFd) {
    let mut value: u64 = 0;
    // SAFETY: `value` is 8 writable bytes that live for the call.
    unsafe {
        libc::read(fd, std::ptr::from_mut(&mut value).cast(), std::mem::size_of::<u64>());
    }
}

/// An `io::Write` over a non-blocking socket, with vectored writes, for `rustls::write_tls`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SocketWriter(pub(super) RawFd);

impl io::Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(self.0, buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        send_vectored(self.0, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `poll` `fds` up to `timeout` ms. EINTR and errors count as a timeout (every `revents` is
/// left 0): the caller re-checks its own deadline.
pub(super) fn poll(fds: &mut [libc::pollfd], timeout: libc::c_int) {
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is valid for reads and writes of `n` pollfds for the whole call.
    if unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) } <= 0 {
        for pfd in fds {
            pfd.revents = 0;
        }
    }
}
