//! Sends that start a TCP connection: `MSG_FASTOPEN` (TCP Fast Open) on `sendto`, `sendmsg`
//! and `sendmmsg` connects and sends without a `connect()` call.
//!
//! The exports call here only when `MSG_FASTOPEN` is set (one branch on the hot path). The
//! destination goes through the same decision as `connect`: unprotected → the real call,
//! untouched; protected → a normal protected connect (real connect, handshake, kTLS or relay),
//! then the program's data is sent through the protected fd without `MSG_FASTOPEN` and without
//! an address. So the data never rides in the SYN: Fast Open's saved round trip is given up for
//! the handshake. A failed connect returns its errno, exactly as `connect` would.
//! (`TCP_FASTOPEN_CONNECT` needs nothing here: its first `connect` is the hooked one, and the
//! handshake's first write is what the kernel sends with the SYN.)

use std::os::fd::RawFd;

use libc::{c_int, c_uint, c_void, mmsghdr, msghdr, size_t, sockaddr, socklen_t, ssize_t};

use crate::guard::{self, Outcome};

/// The kernel's limit on messages per sendmmsg (UIO_MAXIOV): it sends at most that many.
const MAX_MMSG: usize = 1024;

/// Connect `fd` to (`addr`, `len`) the way the connect hook would. `Some(outcome)` to return
/// at once (pass through, or failed); `None` when the socket is now protected and connected.
///
/// # Safety
/// `addr` points at `len` readable bytes, or is null.
unsafe fn connect_first(fd: RawFd, addr: *const sockaddr, len: socklen_t) -> Option<Outcome<ssize_t>> {
    if addr.is_null() {
        // Fast Open with no address is the deferred connect of TCP_FASTOPEN_CONNECT, or an
        // error for the kernel to report: either way, the hooked connect already ran.
        return Some(Outcome::PassThrough);
    }
    // SAFETY: forwarded from the caller.
    match unsafe { super::connect::connect(fd, addr, len) } {
        Outcome::PassThrough => Some(Outcome::PassThrough),
        Outcome::Fail(_, e) => Some(Outcome::Fail(-1, e)),
        Outcome::Done(_) => None,
    }
}

fn sent(r: ssize_t) -> Outcome<ssize_t> {
    if r < 0 {
        Outcome::Fail(-1, guard::errno())
    } else {
        Outcome::Done(r)
    }
}

/// sendto(2) with `MSG_FASTOPEN`.
///
/// # Safety
/// Arguments as passed to sendto(2).
pub(crate) unsafe fn sendto(
    fd: RawFd,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> Outcome<ssize_t> {
    // SAFETY: forwarded from the caller.
    if let Some(o) = unsafe { connect_first(fd, addr, len) } {
        return o;
    }
    // SAFETY: the caller's buffer; the fd is now a protected, connected socket.
    sent(unsafe { crate::real::sendto(fd, buf, n, flags & !libc::MSG_FASTOPEN, std::ptr::null(), 0) })
}

/// sendmsg(2) with `MSG_FASTOPEN`.
///
/// # Safety
/// Arguments as passed to sendmsg(2).
pub(crate) unsafe fn sendmsg(fd: RawFd, msg: *const msghdr, flags: c_int) -> Outcome<ssize_t> {
    if msg.is_null() {
        return Outcome::PassThrough;
    }
    // SAFETY: the caller's msghdr is readable (sendmsg's contract).
    let mut copy = unsafe { std::ptr::read(msg) };
    // SAFETY: msg_name/msg_namelen as the caller gave them.
    if let Some(o) = unsafe { connect_first(fd, copy.msg_name.cast_const().cast(), copy.msg_namelen) } {
        return o;
    }
    copy.msg_name = std::ptr::null_mut();
    copy.msg_namelen = 0;
    // SAFETY: the caller's iovecs and control data, on the now-protected fd.
    sent(unsafe { crate::real::sendmsg(fd, &copy, flags & !libc::MSG_FASTOPEN) })
}

/// sendmmsg(2) with `MSG_FASTOPEN`: the first message's address decides, as in the kernel
/// (the first message's connect is the one that counts; later addresses are ignored on a
/// connected TCP socket).
///
/// # Safety
/// Arguments as passed to sendmmsg(2).
pub(crate) unsafe fn sendmmsg(fd: RawFd, msgs: *mut mmsghdr, vlen: c_uint, flags: c_int) -> Outcome<c_int> {
    if msgs.is_null() || vlen == 0 {
        return Outcome::PassThrough;
    }
    let count = (vlen as usize).min(MAX_MMSG);
    // SAFETY: the caller's array holds `vlen` >= `count` entries (sendmmsg's contract).
    let mut copy: Vec<mmsghdr> = unsafe { std::slice::from_raw_parts(msgs, count) }.to_vec();
    let first = copy[0].msg_hdr;
    // SAFETY: the first message's address, as the caller gave it.
    match unsafe { connect_first(fd, first.msg_name.cast_const().cast(), first.msg_namelen) } {
        None => {}
        Some(Outcome::PassThrough) => return Outcome::PassThrough,
        Some(Outcome::Fail(_, e)) => return Outcome::Fail(-1, e),
        Some(Outcome::Done(_)) => return Outcome::Fail(-1, libc::EIO),
    }
    for m in &mut copy {
        m.msg_hdr.msg_name = std::ptr::null_mut();
        m.msg_hdr.msg_namelen = 0;
        m.msg_len = 0;
    }
    // SAFETY: our copy of the caller's headers (pointing at the caller's buffers).
    let r = unsafe { crate::real::sendmmsg(fd, copy.as_mut_ptr(), count as c_uint, flags & !libc::MSG_FASTOPEN) };
    if r < 0 {
        return Outcome::Fail(-1, guard::errno());
    }
    for (i, m) in copy.iter().enumerate().take(r as usize) {
        // SAFETY: index < count <= vlen: inside the caller's array.
        unsafe { (*msgs.add(i)).msg_len = m.msg_len };
    }
    Outcome::Done(r)
}
