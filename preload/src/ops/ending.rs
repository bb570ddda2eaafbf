//! How a protected stream ends, both ways.
//!
//! - **Our end.** On kTLS the kernel sends no `close_notify` by itself, so the close hooks send
//!   one when the program closes the last fd referring to the connection: last in this
//!   process, and not still held by another process as far as we can tell (see
//!   [`close_notify_due`]). The userspace relay sends its own when the program's end of the
//!   socketpair closes in every process (the kernel tells it).
//! - **The peer's end.** A TCP EOF that no `close_notify` preceded is a truncation (an on-path
//!   attacker can send a FIN). The read family reports it as ECONNRESET, once, then EOF, as
//!   TCP does after a reset, unless the connection's rule sets `allow_truncation`.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use crate::fd_table::{self, Closing, DataPath};
use crate::guard;
use crate::log;
use crate::sys::ktls;

/// Should closing this fd send close_notify on a kTLS connection?
///
/// Only when no other holder can still be using the socket, because a close_notify ends the
/// stream for every holder. Another fd in this process: no. A fork while the connection was
/// open: the parent never sends (its child may be the one serving the connection, as in a
/// fork-per-connection server); the child sends unless its parent still holds the same open
/// socket at the same fd number (`kcmp`, or `/proc/PPID/fd` where the kernel has no kcmp; if
/// neither can be asked, it does not send). A socket
/// passed on without fork (`posix_spawn`, `SCM_RIGHTS`) is not seen: documented.
fn close_notify_due(fd: RawFd, c: &Closing) -> bool {
    // (A peer that already sent its close_notify only half-closed: ours is still due.)
    if !c.last_here || !matches!(c.conn.path, DataPath::Ktls) {
        return false;
    }
    // Another thread may be in the middle of a call on it (it holds a clone): not the last.
    if std::sync::Arc::strong_count(&c.conn) > 1 {
        return false;
    }
    match c.forked_by {
        None => true,
        // SAFETY: getpid has no preconditions.
        Some(pid) if pid == unsafe { libc::getpid() } => false,
        Some(parent) => !parent_holds(parent, fd),
    }
}

/// Does process `parent` still have, at fd number `fd`, the open file our `fd` names? Errors
/// count as "yes" (do not send), except that a parent which is gone, or has nothing at that
/// number, holds nothing.
fn parent_holds(parent: libc::pid_t, fd: RawFd) -> bool {
    // SAFETY: getppid/getpid have no preconditions.
    let (ppid, me) = unsafe { (libc::getppid(), libc::getpid()) };
    if ppid != parent {
        return false; // reparented: the forking parent is gone
    }
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp(2) with two pids and two fd numbers; it only compares kernel pointers.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, me, parent, KCMP_FILE, fd as libc::c_long, fd as libc::c_long) };
    match rc {
        0 => true,
        -1 if guard::errno() == libc::ENOSYS => parent_holds_by_proc(parent, fd),
        -1 => guard::errno() != libc::EBADF && guard::errno() != libc::ESRCH,
        _ => false, // a different file at that number
    }
}

/// The same question without kcmp (kernels built without CONFIG_KCMP, UML's among them): the
/// parent's `/proc/PID/fd/FD` link names `socket:[INODE]` of the socket it holds there.
fn parent_holds_by_proc(parent: libc::pid_t, fd: RawFd) -> bool {
    // SAFETY: all-zero is a valid stat buffer; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on our own fd into a local buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return true; // cannot tell: do not send
    }
    match std::fs::read_link(format!("/proc/{parent}/fd/{fd}")) {
        Ok(link) => link.to_str() == Some(&format!("socket:[{}]", st.st_ino)),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound, // gone: not held; else cannot tell
    }
}

/// The program closes `fd` (close or close_range): end the connection the TLS way if this is
/// its last holder. Runs before the real close.
pub(crate) fn on_close(fd: RawFd, c: &Closing) {
    if close_notify_due(fd, c) {
        ktls::send_close_notify(fd);
        // What is queued now or arrives later (typically the server's session tickets, never
        // read by a program that only writes) would make the real close answer with a reset,
        // which throws away what is not sent yet and makes the peer's kernel drop what its
        // program has not read. So the FIN goes now and a copy of the socket stays open, read
        // and dropped, until the peer's end (`lingering`).
        super::lingering::keep(fd);
    }
}

/// At exit (the ELF destructor, after the relay's flush): every kTLS connection this process
/// alone holds (the same fork rule as a close) gets its close_notify and FIN, then what arrives
/// is read and dropped until the peer's end, for at most `TETHER_EXIT_FLUSH_MS`. Without this
/// the kernel closes the socket at exit with bytes still queued (a TLS 1.3 server's session
/// tickets, which arrive after the program's last read) and answers with a reset, which makes
/// the peer's kernel drop what its program has not read yet, and the peer sees no close_notify
/// (in UML 7.2, 44 of 51 write-then-exit rounds lost data or ended in ECONNRESET:
/// `exit_flush.rs`).
pub(crate) fn at_exit() {
    let bound = crate::settings::get().exit_flush;
    if bound.is_zero() || crate::fork::in_vfork_child() {
        return;
    }
    // Connections the program closed while their peer still sent: FIN and close_notify gone.
    let kept = super::lingering::take_all();
    if fd_table::is_empty() && kept.is_empty() {
        return;
    }
    let deadline = std::time::Instant::now() + bound;
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let mut fds: Vec<libc::pollfd> = fd_table::ktls_connections()
        .into_iter()
        .filter(|&(fd, forked_by)| match forked_by {
            None => true,
            Some(pid) if pid == me => false,
            Some(parent) => !parent_holds(parent, fd),
        })
        .map(|(fd, _)| {
            ktls::send_close_notify(fd);
            // SAFETY: shutdown on our own fd.
            unsafe { crate::real::shutdown(fd, libc::SHUT_WR) };
            libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 }
        })
        .chain(kept.into_iter().map(|fd| libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 }))
        .collect();
    while !fds.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: a live array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 && guard::errno() != libc::EINTR {
            return;
        }
        fds.retain_mut(|p| {
            let ready = p.revents != 0;
            p.revents = 0;
            !ready || ktls::discard_incoming(p.fd)
        });
    }
}

/// A read-family call on `fd` returned 0. Returns what the program gets: 0 (EOF), or -1 with
/// errno ECONNRESET when the peer's stream ended without close_notify.
pub(crate) fn after_eof(fd: RawFd) -> isize {
    let Some(p) = fd_table::get(fd) else {
        return 0;
    };
    let truncated = match &p.path {
        DataPath::Ktls => !p.peer_closed.load(Ordering::Relaxed),
        DataPath::Userspace(link) => link.ended_without_close_notify(),
        DataPath::Plaintext => false,
    };
    if !truncated
        || p.allow_truncation.load(Ordering::Relaxed)
        || p.local_shut_rd.load(Ordering::Relaxed)
        || !at_eof(fd)
    {
        return 0;
    }
    if p.truncation_reported.swap(true, Ordering::Relaxed) {
        return 0;
    }
    let peer = p.peer.as_ref().map(|v| v.id().to_string()).unwrap_or_default();
    log::Line::new("read")
        .kv("fd", fd)
        .kv("peer_id", peer)
        .kv("peer", p.remote)
        .kv("errno", "ECONNRESET")
        .kv("reason", "the peer's stream ended without close_notify (truncated); allow_truncation is off")
        .emit();
    guard::set_errno(libc::ECONNRESET);
    -1
}

/// Is the stream really at its end (a zero-length read also returns 0)? One peek.
fn at_eof(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: one-byte buffer.
    let n = unsafe { crate::real::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n == 0
}
