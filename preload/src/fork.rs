//! fork and vfork.
//!
//! **fork** runs our `pthread_atfork` handlers. Every lock the shim has is taken by
//! [`prepare`] and released by [`parent`]/[`child`] in ONE order, the only order any code path
//! may nest them in (ARCHITECTURE.md, "Fork"):
//!
//! 1. identity `FETCH`, 2. identity `STATE`, 3. identity `POLICY_ONLY` then `STAMP`, 4. fd table `TABLE`,
//! 5. reporter `REPORTER`, 6. reporter `BROKER_FD`, 7. inbound `WORKERS`, 8. inbound `POOL`,
//! 9. relay `STATE`, 10. relay `REGISTRY`, 11. relay `INTERNAL`, 12. key rotation `INBOX`,
//! 13. TLS `CONFIGS` (`tls::configs`: the per-identity rustls configs; the relay stores a ticket
//!     under lock 9), 14. signer `SIGNER` (broker key custody: a leaf, never held while another
//!     is taken), 15. closed kTLS connections' `KEPT` copies (`ops::lingering`: a leaf).
//!
//! A [`crate::fd_table::Protected`] reports its close (lock 5) and its `Link` closes the relay's
//! TCP copy (lock 11), so one may be dropped only while holding nothing above 4: the inbound
//! pool moves connections out of its lock before dropping them. The child releases every lock
//! first and only then cleans up (it has a single thread, so nothing can contend); nothing it
//! drops does I/O: a `Protected` reports only in the process that created it, the parent's
//! reporter (its channel and its broker connection) is forgotten, never dropped, and the
//! child's copy of the broker connection's fd is closed without a byte being written.
//!
//! **vfork** runs no handlers: the child shares the parent's memory (and a suspended parent
//! thread's thread-locals) until it execs or exits. A hook running there would change the
//! parent's state (empty its fd table on `close_range`, start a report thread, hand the
//! parent's relayed connections to a keeper on `exec`). So a hook compares
//! `syscall(SYS_getpid)` with the pid of the address space's owner (set at load and in the fork
//! child) whenever this call could change shim state (`guard::hook_if`: for most hooks
//! [`shim_has_state`]; `close`, the dup family and the socket-option hooks ask the fd table
//! first, without a syscall; re-entrant calls never check); in a vfork child the
//! hooks pass straight to libc, touching nothing, and a TCP connect, accept or Fast Open send
//! (which could only be carried out in plaintext) is refused with `EACCES`.

use std::sync::atomic::{AtomicI32, Ordering};

use crate::{fallback, fd_table, guard, identity, ops, report, sync, tls};

/// The process that owns this address space: the loader's process, or the fork child.
static OWNER: AtomicI32 = AtomicI32::new(0);

/// The calling task's process id, from the kernel (never a cached copy).
pub(crate) fn raw_pid() -> i32 {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// Record the current process as the owner of this address space (load time, fork child).
pub(crate) fn set_owner() {
    OWNER.store(raw_pid(), Ordering::Release);
}

/// The process that owns this address space, as recorded (no syscall). Hook logic only runs
/// outside vfork children (every state-changing path checks [`in_vfork_child`] first), so there
/// it is the calling process's pid.
pub(crate) fn owner() -> i32 {
    OWNER.load(Ordering::Acquire)
}

/// Is this a vfork child (or a `clone` child sharing our memory) running in its parent's
/// address space? One syscall.
pub(crate) fn in_vfork_child() -> bool {
    let owner = OWNER.load(Ordering::Acquire);
    owner != 0 && raw_pid() != owner
}

/// Could a hook's logic change anything here? Only with a table entry or an fd of ours; the
/// calls that create state (connect, accept, Fast Open sends) check [`in_vfork_child`]
/// themselves. This keeps the getpid syscall off `close`/`dup` in processes that never
/// protected a connection (most of them, host-wide).
pub(crate) fn shim_has_state() -> bool {
    !crate::fd_table::is_empty() || fallback::has_internal_fds() || ops::inbound::holds_fds() || ops::lingering::has_kept()
}

/// In a vfork child: should a connect to `family` be refused? Only inet addresses could make a
/// TCP connection we are unable to protect here.
pub(crate) fn vfork_refuses_family(family: libc::c_int) -> bool {
    matches!(family, libc::AF_INET | libc::AF_INET6)
}

/// Register the handlers (once, from `ensure_init`).
pub(crate) fn register() {
    set_owner();
    // SAFETY: the handlers are plain extern "C" fns valid for the life of the process
    // (this library is never unloaded: it is preloaded).
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

extern "C" fn prepare() {
    guard::internal(|| {
        identity::atfork_prepare(); // 1, 2, 3
        fd_table::atfork_prepare(); // 4
        report::atfork_prepare(); // 5, 6
        ops::inbound::atfork_prepare(); // 7, 8
        fallback::atfork_prepare(); // 9, 10, 11
        ops::rotation::atfork_prepare(); // 12
        tls::configs::atfork_prepare(); // 13
        crate::tls::remote_key::atfork_prepare(); // 14
        ops::lingering::atfork_prepare(); // 15
    });
}

extern "C" fn parent() {
    guard::internal(|| {
        fallback::atfork_parent();
        sync::release_fork_locks();
    });
}

extern "C" fn child() {
    guard::internal(|| {
        set_owner();
        // Release everything, in reverse order, before any cleanup.
        fallback::atfork_child();
        sync::release_fork_locks();
        identity::atfork_child();
        tls::configs::atfork_child();
        tls::random::after_fork_child();
        // Single-threaded from here; no lock is held, and nothing below writes to a socket.
        report::after_fork_child();
        ops::inbound::after_fork_child();
        ops::rotation::after_fork_child();
        fd_table::each_after_fork(|p| p.tx_rekey.forget_busy());
        crate::tls::remote_key::after_fork_child();
        ops::lingering::after_fork_child();
    });
}
