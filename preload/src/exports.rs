//! The exported symbols: the only `#[no_mangle]` functions in the library.
//!
//! Each one only guards (re-entrancy, panics, errno) and delegates: the decision is made in
//! [`crate::ops`], and the real work is done by [`crate::real`]. The read family is the
//! exception to the guard-first rule: it calls the real function first and takes the guarded
//! slow path only when that failed with EIO, so the common case costs one branch.

use libc::{c_char, c_int, c_uint, c_void, iovec, mmsghdr, msghdr, off64_t, off_t, size_t, sockaddr, socklen_t, ssize_t};

use crate::guard::{self, hook, hook_if, Outcome};
use crate::{fd_table, ops, real};

/// A panic while handling a call that may involve a protected connection fails closed.
fn closed() -> (c_int, c_int) {
    (-1, libc::ECONNABORTED)
}

/// A panic in a call that may have connected `fd` (connect, a Fast Open send): the real
/// connect may already have happened, so the socket is shut down both ways before failing.
/// Nothing can flow on it afterwards, so a retry that sees EISCONN cannot write plaintext.
/// (Shutting down a socket that never connected fails with ENOTCONN and changes nothing.)
fn aborted<T: From<i8>>(fd: c_int) -> (T, c_int) {
    // SAFETY: shutdown on any fd is harmless; the result is ignored on purpose.
    unsafe { real::shutdown(fd, libc::SHUT_RDWR) };
    (T::from(-1), libc::ECONNABORTED)
}

// ---- connection setup -------------------------------------------------------------------

/// In a vfork child a TCP connection could only be made in plaintext: a connect to an inet
/// address there is refused ([`refuse`]). The address's family is a memory read, so it is
/// checked first and only an inet connect pays the getpid.
///
/// # Safety
/// `addr` points to `len` readable bytes, or is null.
unsafe fn vfork_refused_connect(addr: *const sockaddr, len: socklen_t) -> bool {
    // SAFETY: per the contract.
    unsafe { ops::vfork::family_of(addr, len) }.is_some_and(crate::fork::vfork_refuses_family) && crate::fork::in_vfork_child()
}

/// accept in a vfork child. Here the getpid comes first (the family is a syscall: the
/// listener's getsockname). `Some(true)`: refuse it (an inet listener: the connection could
/// only be plaintext); `Some(false)`: pass it straight to libc (any other listener; nothing of
/// ours may change there, not even `ensure_init`); `None`: not a vfork child, so the hook needs
/// no second check (one getpid per accept, not two).
fn vfork_accept(fd: c_int) -> Option<bool> {
    crate::fork::in_vfork_child().then(|| ops::vfork::listener_family(fd).is_some_and(crate::fork::vfork_refuses_family))
}

/// The vfork refusal: `EACCES`, and the reason on stderr in one `write` of a constant (no
/// allocation, no lock: the child shares its parent's memory).
fn refuse<T: From<i8>>() -> T {
    crate::log::raw_const(b"tether: refused a TCP connect/accept in a vfork child: no handshake can run there (it shares its parent's memory), so it could not be protected\n");
    guard::set_errno(libc::EACCES);
    T::from(-1)
}

/// A call that could start or accept a TCP connection, made while tether's own code runs on
/// this thread: a signal handler that interrupted one of our hooks, or a program handler run on
/// one of our threads before its signals were blocked. The hook cannot be run (its locks may be
/// held by the code it interrupted) and the real call would be plaintext: refused. tether's
/// own code never makes inet connects, accepts or Fast Open sends through the hooked
/// functions (it calls `real::`), so nothing of ours lands here. The message is one `write`
/// of a constant: async-signal-safe.
fn reentered<T: From<i8>>(errno: c_int) -> T {
    crate::log::raw_const(b"tether: refused a TCP connect/accept made inside one of tether's hooks (from a signal handler): it could not be protected\n");
    guard::set_errno(errno);
    T::from(-1)
}

/// Is this an inet connect, accept or Fast Open send made inside one of our hooks?
fn reentered_inet(family: impl FnOnce() -> Option<c_int>) -> bool {
    guard::inside() && family().is_some_and(crate::fork::vfork_refuses_family)
}

#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's address of `len` bytes; only the family is read.
    if unsafe { vfork_refused_connect(addr, len) } {
        return refuse();
    }
    // SAFETY: as above.
    if reentered_inet(|| unsafe { ops::vfork::family_of(addr, len) }) {
        return reentered(libc::EACCES);
    }
    crate::ensure_init();
    // No second vfork check: an inet connect was checked above, and the logic passes any other
    // address straight through without touching state.
    // SAFETY: arguments forwarded unchanged from the caller of connect(2).
    hook_if(|| false, || unsafe { ops::connect::connect(fd, addr, len) }, || unsafe { real::connect(fd, addr, len) }, || aborted(fd))
}

// ---- the write family: kTLS TX rekeys are done by the program's own next write ----------
// The hot path is one relaxed atomic load (no connection owes a TX rekey) and the real call.
// See `ops::txkey` for why the rekey waits for the writer.

/// A connection may owe a TX rekey: if `fd`'s does, send our KeyUpdate and move TX now, before
/// the program's data. `false`: the program's call returns -1 with errno set.
fn tx_rekey_first(fd: c_int, dontwait: bool) -> bool {
    hook(
        || match ops::txkey::before_write(fd, dontwait) {
            Ok(()) => Outcome::Done(true),
            Err(e) => Outcome::Fail(false, e),
        },
        || true,
        || (false, libc::ECONNRESET),
    )
}

macro_rules! write_export {
    ($name:ident ( $fd:ident : $fdty:ty $(, $arg:ident : $ty:ty)* ) -> $ret:ty, $dontwait:expr) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name($fd: $fdty $(, $arg: $ty)*) -> $ret {
            if ops::txkey::any_owed() && !tx_rekey_first($fd, $dontwait) {
                return -1;
            }
            // SAFETY: forwarded unchanged to the real function of the same name.
            unsafe { real::$name($fd $(, $arg)*) }
        }
    };
}

write_export!(write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t, false);
write_export!(writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t, false);
write_export!(send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t, flags & libc::MSG_DONTWAIT != 0);

// ---- sends that can connect: TCP Fast Open ------------------------------------------------
// The hot path is one branch: without MSG_FASTOPEN these are the real calls, untouched (after
// the write family's owed-rekey check).

#[no_mangle]
pub unsafe extern "C" fn sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t {
    if flags & libc::MSG_FASTOPEN == 0 {
        if ops::txkey::any_owed() && !tx_rekey_first(fd, flags & libc::MSG_DONTWAIT != 0) {
            return -1;
        }
        // SAFETY: forwarded, sendto(2).
        return unsafe { real::sendto(fd, buf, n, flags, addr, len) };
    }
    // A Fast Open send connects: in a vfork child, or inside one of our hooks, that could
    // only be plaintext.
    if crate::fork::in_vfork_child() {
        return refuse();
    }
    if guard::inside() {
        return reentered(libc::EACCES);
    }
    crate::ensure_init();
    // SAFETY: forwarded, sendto(2) with MSG_FASTOPEN. (Checked for vfork just above.)
    hook_if(
        || false,
        || unsafe { ops::send::sendto(fd, buf, n, flags, addr, len) },
        || unsafe { real::sendto(fd, buf, n, flags, addr, len) },
        || aborted(fd),
    )
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if flags & libc::MSG_FASTOPEN == 0 {
        if ops::txkey::any_owed() && !tx_rekey_first(fd, flags & libc::MSG_DONTWAIT != 0) {
            return -1;
        }
        // SAFETY: forwarded, sendmsg(2).
        return unsafe { real::sendmsg(fd, msg, flags) };
    }
    // A Fast Open send connects: in a vfork child, or inside one of our hooks, that could
    // only be plaintext.
    if crate::fork::in_vfork_child() {
        return refuse();
    }
    if guard::inside() {
        return reentered(libc::EACCES);
    }
    crate::ensure_init();
    // SAFETY: forwarded, sendmsg(2) with MSG_FASTOPEN.
    hook_if(|| false, || unsafe { ops::send::sendmsg(fd, msg, flags) }, || unsafe { real::sendmsg(fd, msg, flags) }, || aborted(fd))
}

#[no_mangle]
pub unsafe extern "C" fn sendmmsg(fd: c_int, msgs: *mut mmsghdr, vlen: c_uint, flags: c_int) -> c_int {
    if flags & libc::MSG_FASTOPEN == 0 {
        if ops::txkey::any_owed() && !tx_rekey_first(fd, flags & libc::MSG_DONTWAIT != 0) {
            return -1;
        }
        // SAFETY: forwarded, sendmmsg(2).
        return unsafe { real::sendmmsg(fd, msgs, vlen, flags) };
    }
    // A Fast Open send connects: in a vfork child, or inside one of our hooks, that could
    // only be plaintext.
    if crate::fork::in_vfork_child() {
        return refuse();
    }
    if guard::inside() {
        return reentered(libc::EACCES);
    }
    crate::ensure_init();
    // SAFETY: forwarded, sendmmsg(2) with MSG_FASTOPEN. (Checked for vfork just above.)
    hook_if(
        || false,
        || unsafe { ops::send::sendmmsg(fd, msgs, vlen, flags) },
        || unsafe { real::sendmmsg(fd, msgs, vlen, flags) },
        || aborted(fd),
    )
}

#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match vfork_accept(fd) {
        Some(true) => return refuse(),
        // SAFETY: forwarded, accept(2).
        Some(false) => return unsafe { real::accept(fd, addr, len) },
        None => {}
    }
    if reentered_inet(|| ops::vfork::listener_family(fd)) {
        return reentered(libc::ECONNABORTED);
    }
    crate::ensure_init();
    // SAFETY: as above, accept(2). (Not a vfork child: checked above.)
    hook_if(|| false, || unsafe { ops::accept::accept(fd, addr, len, None) }, || unsafe { real::accept(fd, addr, len) }, closed)
}

#[no_mangle]
pub unsafe extern "C" fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    match vfork_accept(fd) {
        Some(true) => return refuse(),
        // SAFETY: forwarded, accept4(2).
        Some(false) => return unsafe { real::accept4(fd, addr, len, flags) },
        None => {}
    }
    if reentered_inet(|| ops::vfork::listener_family(fd)) {
        return reentered(libc::ECONNABORTED);
    }
    crate::ensure_init();
    // SAFETY: as above, accept4(2). (Not a vfork child: checked above.)
    hook_if(
        || false,
        || unsafe { ops::accept::accept(fd, addr, len, Some(flags)) },
        || unsafe { real::accept4(fd, addr, len, flags) },
        closed,
    )
}

// ---- zero-copy send ---------------------------------------------------------------------
// Interposed so that every path data can take out of a protected fd is ours to see; on both
// data paths the kernel already does the right thing (kTLS encrypts sendfile pages itself; a
// relayed fd is an AF_UNIX socket that sendfile feeds directly), so these pass through.

#[no_mangle]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut off_t, count: size_t) -> ssize_t {
    if ops::txkey::any_owed() && !tx_rekey_first(out, false) {
        return -1;
    }
    // SAFETY: forwarded, sendfile(2).
    unsafe { real::sendfile(out, inp, off, count) }
}

#[no_mangle]
pub unsafe extern "C" fn sendfile64(out: c_int, inp: c_int, off: *mut off64_t, count: size_t) -> ssize_t {
    if ops::txkey::any_owed() && !tx_rekey_first(out, false) {
        return -1;
    }
    // SAFETY: forwarded, sendfile64.
    unsafe { real::sendfile64(out, inp, off, count) }
}

// ---- fd bookkeeping ---------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // SAFETY: forwarded, close(2).
    hook_if(|| ops::fds::touches(fd), || ops::fds::close(fd), || unsafe { real::close(fd) }, || (unsafe { real::close(fd) }, guard::errno()))
}

#[no_mangle]
pub unsafe extern "C" fn close_range(first: u32, last: u32, flags: c_int) -> c_int {
    // SAFETY: forwarded, close_range(2).
    hook(
        || ops::fds::close_range(first, last, flags),
        || unsafe { real::close_range(first, last, flags) },
        || (-1, libc::EIO),
    )
}

/// glibc's `closefrom` closes with an internal close_range syscall that no hook sees: it would
/// close the relay's own fds and leave stale table entries. Routed through the close_range
/// logic instead, which spares tether's fds.
#[no_mangle]
pub unsafe extern "C" fn closefrom(low: c_int) {
    let first = low.max(0) as u32;
    hook(
        || match ops::fds::close_range(first, u32::MAX, 0) {
            Outcome::PassThrough => Outcome::PassThrough,
            Outcome::Done(_) => Outcome::Done(()),
            Outcome::Fail(_, e) => Outcome::Fail((), e),
        },
        // SAFETY: forwarded, closefrom(3).
        || unsafe { real::closefrom(low) },
        || ((), libc::EIO),
    )
}

#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: forwarded, shutdown(2).
    hook_if(
        || fd_table::contains(fd),
        || ops::fds::shutdown(fd, how),
        || unsafe { real::shutdown(fd, how) },
        || (unsafe { real::shutdown(fd, how) }, guard::errno()),
    )
}

/// Run a dup-family call and mirror its effect in the fd table. Re-entrant calls (our own
/// code) go straight to `call` through the guard, like every other hook. The vfork check is
/// made only where state could change: onto one of our fds here, on the table in
/// `ops::fds::duplicated`.
fn dup_like(old: c_int, new: Option<c_int>, call: impl Fn() -> c_int) -> c_int {
    hook_if(
        || ops::fds::dup_touches(new),
        || {
            if let Some(n) = new {
                if let Err(e) = ops::fds::check_dup_target(n) {
                    return Outcome::Fail(-1, e);
                }
            }
            let r = call();
            if r < 0 {
                return Outcome::Fail(-1, guard::errno());
            }
            ops::fds::duplicated(old, r);
            Outcome::Done(r)
        },
        &call,
        || (-1, libc::EBADF),
    )
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: forwarded, dup(2).
    dup_like(fd, None, || unsafe { real::dup(fd) })
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: forwarded, dup2(2).
    dup_like(old, Some(new), || unsafe { real::dup2(old, new) })
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarded, dup3(2).
    dup_like(old, Some(new), || unsafe { real::dup3(old, new, flags) })
}

fn is_dupfd(cmd: c_int) -> bool {
    cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC
}

/// fcntl(2) is variadic in C. On the x86-64 and AArch64 Linux ABIs the one optional argument
/// travels in the same register as a fixed third argument would, so it is declared as one
/// machine word and forwarded unchanged.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    if !is_dupfd(cmd) {
        // SAFETY: forwarded, fcntl(2).
        return unsafe { real::fcntl(fd, cmd, arg) };
    }
    // SAFETY: forwarded, fcntl(2) F_DUPFD*.
    dup_like(fd, None, || unsafe { real::fcntl(fd, cmd, arg) })
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    if !is_dupfd(cmd) {
        // SAFETY: forwarded, fcntl64.
        return unsafe { real::fcntl64(fd, cmd, arg) };
    }
    // SAFETY: forwarded, fcntl64 F_DUPFD*.
    dup_like(fd, None, || unsafe { real::fcntl64(fd, cmd, arg) })
}

// ---- socket identity of relayed fds -----------------------------------------------------
// Their logic only reads the table (`fd_table::get` leaves a stale entry alone in a vfork
// child), so they make no vfork check: no getpid on a program's per-connection setsockopt.

#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if fd_table::is_empty() {
        // SAFETY: forwarded, getpeername(2).
        return unsafe { real::getpeername(fd, addr, len) };
    }
    // SAFETY: forwarded, getpeername(2).
    hook_if(|| false, || unsafe { ops::fds::name(fd, addr, len, true) }, || unsafe { real::getpeername(fd, addr, len) }, || (-1, libc::EBADF))
}

#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if fd_table::is_empty() {
        // SAFETY: forwarded, getsockname(2).
        return unsafe { real::getsockname(fd, addr, len) };
    }
    // SAFETY: forwarded, getsockname(2).
    hook_if(|| false, || unsafe { ops::fds::name(fd, addr, len, false) }, || unsafe { real::getsockname(fd, addr, len) }, || (-1, libc::EBADF))
}

#[no_mangle]
pub unsafe extern "C" fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int {
    if fd_table::is_empty() {
        // SAFETY: forwarded, getsockopt(2).
        return unsafe { real::getsockopt(fd, level, name, val, len) };
    }
    // SAFETY: forwarded, getsockopt(2).
    hook_if(
        || false,
        || unsafe { ops::fds::getsockopt(fd, level, name, val, len) },
        || unsafe { real::getsockopt(fd, level, name, val, len) },
        || (-1, libc::EBADF),
    )
}

#[no_mangle]
pub unsafe extern "C" fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int {
    if fd_table::is_empty() {
        // SAFETY: forwarded, setsockopt(2).
        return unsafe { real::setsockopt(fd, level, name, val, len) };
    }
    // SAFETY: forwarded, setsockopt(2).
    hook_if(
        || false,
        || unsafe { ops::fds::setsockopt(fd, level, name, val, len) },
        || unsafe { real::setsockopt(fd, level, name, val, len) },
        || (-1, libc::EBADF),
    )
}

// ---- exec: the relay thread does not survive it -----------------------------------------
// Userspace-relayed connections are handed to a keeper process first, so fds inherited across
// exec keep working (kTLS connections need nothing: the kernel holds their state). The
// variadic execl* family cannot be defined in stable Rust; glibc implements them on execve
// internally, so a program that uses them with live relayed fds loses those connections
// (documented in README, Limits).

macro_rules! exec_export {
    ($name:ident ( $($arg:ident : $ty:ty),* )) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> c_int {
            // A vfork child's exec leaves the parent (and its relay) running: nothing to hand off,
            // and the parent's registry must not be touched.
            if !guard::inside() && !crate::fork::in_vfork_child() {
                guard::internal(|| {
                    let _ = std::panic::catch_unwind(crate::fallback::before_exec);
                });
            }
            // SAFETY: forwarded unchanged to the real function of the same name.
            unsafe { real::$name($($arg),*) }
        }
    };
}

exec_export!(execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char));
exec_export!(execv(path: *const c_char, argv: *const *const c_char));
exec_export!(execvp(file: *const c_char, argv: *const *const c_char));
exec_export!(execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char));
exec_export!(fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char));

// ---- the read family: kTLS control records ----------------------------------------------

/// A read-family call returned 0: EOF, or a truncation the program must see as ECONNRESET.
fn read_eof(fd: c_int) -> ssize_t {
    hook(
        || match ops::ending::after_eof(fd) {
            0 => Outcome::Done(0),
            r => Outcome::Fail(r, guard::errno()),
        },
        || 0,
        || (-1, libc::ECONNRESET),
    )
}

/// The guarded slow path shared by every read-family export.
fn read_slow(fd: c_int, first: ssize_t, again: &mut dyn FnMut() -> ssize_t) -> ssize_t {
    hook(
        || {
            let r = ops::io::after_read_error(fd, first, again);
            if r < 0 {
                Outcome::Fail(r, guard::errno())
            } else {
                Outcome::Done(r)
            }
        },
        || first,
        || (-1, libc::ECONNRESET),
    )
}

/// A short read on a kTLS socket, on a kernel that rekeys: look for a KeyUpdate the kernel
/// decrypted ahead of the data it returned (`ops::io::after_short_read`). The look (one peek
/// that changes nothing: `ops::io::handshake_record_queued`) comes before the guard, whose
/// vfork check would cost a getpid on every short read; it is panic- and errno-safe itself.
fn short_read(fd: c_int) {
    if guard::inside() {
        return;
    }
    let saved = guard::errno();
    let queued = std::panic::catch_unwind(|| ops::io::handshake_record_queued(fd)).unwrap_or(false);
    guard::set_errno(saved);
    if !queued {
        return;
    }
    hook(
        || {
            ops::io::after_short_read(fd);
            Outcome::Done(())
        },
        || (),
        || ((), 0),
    )
}

/// Bytes a program's iovecs can hold.
///
/// # Safety
/// `iov` points at `cnt` iovecs (the caller's readv/recvmsg contract), or `cnt` is 0.
unsafe fn iov_room(iov: *const iovec, cnt: usize) -> usize {
    if iov.is_null() {
        return 0;
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(iov, cnt) }.iter().map(|v| v.iov_len).sum()
}

macro_rules! read_export {
    ($name:ident ( $fd:ident : $fdty:ty $(, $arg:ident : $ty:ty)* ), $want:expr) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name($fd: $fdty $(, $arg: $ty)*) -> ssize_t {
            // SAFETY: forwarded unchanged to the real function of the same name.
            let r = unsafe { real::$name($fd $(, $arg)*) };
            // No table check here: a kTLS socket inherited across exec is not in this image's
            // table, and EIO on a read is rare enough that the slow path may look for itself.
            // EOF (0) is once per stream: the slow path checks it was not a truncation.
            if r > 0 {
                // One atomic load (zero unless a kTLS connection may see a KeyUpdate); a read that
                // filled the buffer never looks further.
                if ops::io::short_reads_watched() && (r as usize) < $want {
                    short_read($fd);
                }
                return r;
            }
            if r == 0 {
                return if fd_table::is_empty() { 0 } else { read_eof($fd) };
            }
            if guard::errno() != libc::EIO {
                return r;
            }
            // SAFETY: as above; the slow path may repeat the call.
            read_slow($fd, r, &mut || unsafe { real::$name($fd $(, $arg)*) })
        }
    };
}

read_export!(read(fd: c_int, buf: *mut c_void, n: size_t), n);
// SAFETY: readv's contract: `iov` holds `cnt` iovecs.
read_export!(readv(fd: c_int, iov: *const iovec, cnt: c_int), unsafe { iov_room(iov, cnt.max(0) as usize) });
read_export!(recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int), n);
read_export!(recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t), n);
/// recvmsg is read_export! plus one case: a program that passes its own control buffer gets
/// kTLS control records as data (labelled by a cmsg it does not know), so a successful read
/// with a control buffer checks that label. Without a control buffer: the same one branch.
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller's msghdr (recvmsg's contract); read before the call changes it.
    let controllen = if msg.is_null() { 0 } else { unsafe { (*msg).msg_controllen } };
    // SAFETY: forwarded, recvmsg(2).
    let r = unsafe { real::recvmsg(fd, msg, flags) };
    if r > 0 {
        if controllen == 0 {
            // SAFETY: the caller's msghdr, as above.
            if ops::io::short_reads_watched() && !msg.is_null() && (r as usize) < unsafe { iov_room((*msg).msg_iov, (*msg).msg_iovlen) } {
                short_read(fd);
            }
            return r;
        }
        // SAFETY: the kernel just filled the caller's msghdr.
        let Some(ty) = (unsafe { crate::sys::ktls::control_record_in(msg) }) else {
            return r;
        };
        return hook(
            // SAFETY: the caller's msghdr; the slow path may repeat the call with it.
            || match unsafe {
                ops::io::control_in_program_buffer(fd, msg, flags, r, ty, controllen, &mut || real::recvmsg(fd, msg, flags))
            } {
                v if v >= 0 => Outcome::Done(v),
                v => Outcome::Fail(v, guard::errno()),
            },
            || r,
            || (-1, libc::ECONNRESET),
        );
    }
    if r == 0 {
        return if fd_table::is_empty() { 0 } else { read_eof(fd) };
    }
    if guard::errno() != libc::EIO {
        return r;
    }
    // SAFETY: as above; the slow path may repeat the call.
    read_slow(fd, r, &mut || unsafe { real::recvmsg(fd, msg, flags) })
}
read_export!(__read_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t), n);
read_export!(__recv_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int), n);
read_export!(__recvfrom_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t), n);

// ---- glibc's public double-underscore names ----------------------------------------------
// glibc exports these names for the same functions (`nm -D libc.so.6`), and a program may call
// them directly: `__connect` would otherwise be a plaintext connect. Each is the hook of the
// function it names (`exports.rs` in shim-tests checks that every such name libc exports for a
// hooked function is here).

macro_rules! alias_export {
    ($alias:ident => $target:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty) => {
        #[no_mangle]
        pub unsafe extern "C" fn $alias($($arg: $ty),*) -> $ret {
            // SAFETY: the contract of the function it names, whose hook this is.
            unsafe { $target($($arg),*) }
        }
    };
}

alias_export!(__connect => connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int);
alias_export!(__sendmmsg => sendmmsg(fd: c_int, msgs: *mut mmsghdr, vlen: c_uint, flags: c_int) -> c_int);
alias_export!(__send => send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t);
alias_export!(__write => write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t);
alias_export!(__read => read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t);
alias_export!(__recv => recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t);
alias_export!(__close => close(fd: c_int) -> c_int);
alias_export!(__dup2 => dup2(old: c_int, new: c_int) -> c_int);
alias_export!(__fcntl => fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int);
alias_export!(__libc_fcntl64 => fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int);
