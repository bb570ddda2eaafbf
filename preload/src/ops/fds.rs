//! fd bookkeeping: close, close_range, dup family, shutdown, and the socket calls that must
//! see the TCP connection behind a userspace-relayed fd (getpeername, getsockname,
//! getsockopt, setsockopt).

use std::os::fd::RawFd;
use std::sync::Arc;

use libc::{c_int, c_void, sockaddr, socklen_t};

use crate::fallback;
use crate::fd_table::{self, DataPath};
use crate::guard::Outcome;
use crate::sys::{ktls, net};

/// Could a call on `fd` change shim state (so that in a vfork child it must pass straight to
/// libc)? No syscall: the fd has a table entry, is one of ours, or the inbound pool holds
/// something (a listener's close ends its pending connections).
pub(crate) fn touches(fd: RawFd) -> bool {
    fd_table::contains(fd) || super::inbound::holds_fds() || is_ours(fd)
}

/// Is a dup-family call onto `new` one that [`check_dup_target`] may refuse? (The table is
/// checked after the call, by [`duplicated`], once the new number is known.)
pub(crate) fn dup_touches(new: Option<RawFd>) -> bool {
    new.is_some_and(is_ours)
}

/// One of tether's own fds (relay sockets, pending inbound handshakes, the reporter's broker
/// connection, the log file)?
fn is_ours(fd: RawFd) -> bool {
    fallback::is_internal(fd)
        || super::inbound::is_internal(fd)
        || crate::report::broker_fd() == Some(fd)
        || crate::tls::remote_key::connection_fd() == Some(fd)
        || crate::log::file_fd() == Some(fd)
        || super::lingering::is_kept(fd)
}

pub(crate) fn close(fd: RawFd) -> Outcome<c_int> {
    if is_ours(fd) {
        // One of the relay's own fds: the program never had it. Closing it would break a
        // protected connection, so refuse as the kernel would for a number it does not hold.
        return Outcome::Fail(-1, libc::EBADF);
    }
    if let Some(c) = fd_table::remove(fd) {
        super::ending::on_close(fd, &c);
        super::lingering::sweep();
    }
    super::inbound::listener_closed(fd);
    Outcome::PassThrough
}

pub(crate) fn close_range(first: u32, last: u32, flags: c_int) -> Outcome<c_int> {
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0 {
        // Nothing closes now; exec closes ours too, which is right.
        return Outcome::PassThrough;
    }
    let lo = first.min(i32::MAX as u32) as RawFd;
    let hi = last.min(i32::MAX as u32) as RawFd;
    for (fd, c) in fd_table::remove_range(lo, hi) {
        super::ending::on_close(fd, &c);
    }
    let mut ours: Vec<RawFd> = fallback::internal_fds();
    ours.extend(super::inbound::internal_fds());
    ours.extend(crate::report::broker_fd());
    ours.extend(crate::tls::remote_key::connection_fd());
    ours.extend(crate::log::file_fd());
    ours.extend(super::lingering::kept_fds());
    ours.retain(|fd| (lo..=hi).contains(fd));
    ours.sort_unstable();
    ours.dedup();
    if ours.is_empty() {
        return Outcome::PassThrough;
    }
    // Close the range around our fds.
    let mut start = first;
    for fd in ours {
        let fd = fd as u32;
        if fd > start {
            // SAFETY: closing a range the program asked to close.
            let rc = unsafe { crate::real::close_range(start, fd - 1, flags) };
            if rc != 0 {
                return Outcome::Fail(-1, crate::guard::errno());
            }
        }
        start = fd + 1;
    }
    if start <= last {
        // SAFETY: as above.
        let rc = unsafe { crate::real::close_range(start, last, flags) };
        if rc != 0 {
            return Outcome::Fail(-1, crate::guard::errno());
        }
    }
    Outcome::Done(0)
}

/// Before dup2/dup3 onto `new`: refuse to clobber our own fds.
pub(crate) fn check_dup_target(new: RawFd) -> Result<(), i32> {
    // A closed connection's kept copy is only waiting for its peer's end: give it up (as a
    // close would have) rather than refuse the program a number it believes is free.
    if super::lingering::give_up(new) {
        return Ok(());
    }
    if is_ours(new) {
        Err(libc::EBUSY)
    } else {
        Ok(())
    }
}

/// After a successful dup-family call that made `new` refer to `old`. Only a table that has
/// either number changes, and then not in a vfork child (one getpid, only then).
pub(crate) fn duplicated(old: RawFd, new: RawFd) {
    if old != new && (fd_table::contains(old) || fd_table::contains(new)) && !crate::fork::in_vfork_child() {
        fd_table::duplicate(old, new);
    }
}

pub(crate) fn shutdown(fd: RawFd, how: c_int) -> Outcome<c_int> {
    if let Some(p) = fd_table::get(fd) {
        if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
            // Its own EOF from now on, not a truncation by the peer.
            p.local_shut_rd.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if (how == libc::SHUT_WR || how == libc::SHUT_RDWR) && matches!(p.path, DataPath::Ktls) {
            // The program is done writing: tell the peer the TLS way first.
            ktls::send_close_notify(fd);
        }
    }
    Outcome::PassThrough
}

/// getpeername/getsockname on a relayed fd report the TCP connection, not the socketpair.
///
/// # Safety
/// Arguments as passed to getpeername(2).
pub(crate) unsafe fn name(fd: RawFd, addr: *mut sockaddr, len: *mut socklen_t, peer: bool) -> Outcome<c_int> {
    let Some(p) = relayed(fd) else {
        return Outcome::PassThrough;
    };
    if addr.is_null() || len.is_null() {
        return Outcome::Fail(-1, libc::EFAULT);
    }
    // SAFETY: forwarded from the caller.
    unsafe { net::to_raw(if peer { p.remote } else { p.local }, addr, len) };
    Outcome::Done(0)
}

/// `fd`'s connection if it is a relayed one (the only kind whose names and options the hooks
/// answer themselves). The entry's kind is looked at first without a syscall, so a call on a
/// kTLS or unknown fd passes straight through; only a relayed entry gets [`fd_table::get`]'s
/// cookie check. (A number whose entry is not a relayed one cannot name a relayed socket: `adopt`
/// enters every relayed fd under its own number.)
fn relayed(fd: RawFd) -> Option<Arc<fd_table::Protected>> {
    let is_relayed = |p: &fd_table::Protected| matches!(p.path, DataPath::Userspace(_));
    if !fd_table::peek(fd, is_relayed) {
        return None;
    }
    fd_table::get(fd).filter(|p| is_relayed(p))
}

/// Which socket a relayed fd's option belongs to: the TCP connection, or the local pair.
fn option_target(fd: RawFd, level: c_int, name: c_int) -> Option<RawFd> {
    let p = relayed(fd)?;
    let DataPath::Userspace(link) = &p.path else {
        return None;
    };
    let tcp_level = level != libc::SOL_SOCKET;
    let tcp_sol = matches!(
        name,
        libc::SO_KEEPALIVE | libc::SO_LINGER | libc::SO_PRIORITY | libc::SO_MARK | libc::SO_BINDTODEVICE
    );
    (tcp_level || tcp_sol).then(|| link.tcp_fd())
}

/// # Safety
/// Arguments as passed to getsockopt(2).
pub(crate) unsafe fn getsockopt(
    fd: RawFd,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> Outcome<c_int> {
    if fd_table::is_empty() {
        return Outcome::PassThrough;
    }
    if level == libc::SOL_SOCKET && (name == libc::SO_DOMAIN || name == libc::SO_PROTOCOL) {
        if let Some(p) = relayed(fd) {
            let v: c_int = if name == libc::SO_PROTOCOL {
                libc::IPPROTO_TCP
            } else if p.remote.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            if val.is_null() || len.is_null() {
                return Outcome::Fail(-1, libc::EFAULT);
            }
            // SAFETY: caller's buffer of *len bytes; we write at most an int.
            unsafe {
                let n = (*len as usize).min(size_of::<c_int>());
                std::ptr::copy_nonoverlapping((&v as *const c_int).cast::<u8>(), val.cast::<u8>(), n);
                *len = n as socklen_t;
            }
            return Outcome::Done(0);
        }
    }
    match option_target(fd, level, name) {
        // SAFETY: forwarded from the caller, onto the TCP socket behind the relay.
        Some(tcp) => match unsafe { crate::real::getsockopt(tcp, level, name, val, len) } {
            0 => Outcome::Done(0),
            _ => Outcome::Fail(-1, crate::guard::errno()),
        },
        None => Outcome::PassThrough,
    }
}

/// # Safety
/// Arguments as passed to setsockopt(2).
pub(crate) unsafe fn setsockopt(
    fd: RawFd,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> Outcome<c_int> {
    if fd_table::is_empty() {
        return Outcome::PassThrough;
    }
    match option_target(fd, level, name) {
        // SAFETY: forwarded from the caller, onto the TCP socket behind the relay.
        Some(tcp) => match unsafe { crate::real::setsockopt(tcp, level, name, val, len) } {
            0 => Outcome::Done(0),
            _ => Outcome::Fail(-1, crate::guard::errno()),
        },
        None => Outcome::PassThrough,
    }
}
