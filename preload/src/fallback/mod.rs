//! Userspace TLS fallback, for kernels without kTLS. **Contains FFI** (confined to `sys`;
//! every `unsafe` block carries a `// SAFETY:` comment).
//!
//! A protected connection whose handshake completed in userspace is [`adopt`]ed: the program's
//! fd number is switched (with `dup3`) to one end of an `AF_UNIX` stream socketpair, the TCP
//! socket lives on as an internal close-on-exec fd, and one relay thread per process
//! ("tether-relay", epoll, edge-triggered) moves bytes: program plaintext → rustls → TCP, and
//! TCP → rustls → program. Because the program's fd is a real socket, blocking and non-blocking
//! I/O, `poll`/`epoll`, `sendfile` and `fork` work on it natively.
//!
//! Ends are signalled with `shutdown()`, never by relying on `close()` (a forked child may hold
//! copies): the program's EOF becomes `close_notify` then `shutdown(tcp, SHUT_WR)`; the peer's
//! `close_notify` (or a TCP EOF without one, which is recorded) becomes `shutdown(SHUT_WR)` on
//! the relay end, so the program reads EOF. A fatal TLS error or a TCP reset shuts both ends
//! down for reading and writing: the program then reads EOF and its writes fail with EPIPE (an
//! `AF_UNIX` socket has no way to deliver ECONNRESET on demand). Plaintext never reaches TCP
//! except through rustls.
//!
//! `exec` would end the relay thread with the old image, so [`before_exec`] hands every
//! connection to a detached keeper process first.
//!
//! Locks, always in this order: the relay's `STATE` (held while it works on a batch), then
//! `REGISTRY` (links, pending hand-overs, the relay's fds), then `INTERNAL` (the sorted set of
//! our fds). All three are held across `fork()` by [`atfork_prepare`], and no lock is held while
//! calling into the program.

mod relay;
mod sys;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::Connection;

use crate::sys::net::FdFlags;

/// Send buffer asked for on both ends of the pair (the kernel caps it at `net.core.wmem_max`
/// and doubles it): room for a few 128 KiB relay batches or program writes in flight. Only the
/// sender's buffer bounds an `AF_UNIX` stream (measured: 227 KiB queue by default, the same
/// with the receiver's SO_RCVBUF at 4 KiB or 1 MiB, 2 MiB with the sender's SO_SNDBUF at
/// 1 MiB), so SO_RCVBUF is not set.
const PAIR_BUFFER: libc::c_int = 1 << 20;

/// Plaintext counters, shared by a [`Link`] and the relay's state for it. It holds no fd, so a
/// copy stranded in a forked child (whose relay thread does not exist) is harmless.
#[derive(Debug, Default)]
struct Stats {
    sent: AtomicU64,
    received: AtomicU64,
    /// The peer ended the TCP stream without `close_notify` (truncation; delivered as EOF).
    truncated: AtomicBool,
    /// This process forked while the connection was relayed: a child may hold the program's
    /// end, so the exit flush does not end the stream for it ([`at_exit`]).
    shared: AtomicBool,
}

/// Per-connection handle kept by the fd table: the internal TCP fd and plaintext counters.
///
/// The TCP fd is closed when the last `Arc<Link>` drops (the relay's own reference lives in the
/// registry, so the fork-child handler can release it).
pub(crate) struct Link {
    tcp: RawFd,
    stats: Arc<Stats>,
}

impl Link {
    /// The internal TCP socket: valid as long as this `Link` lives.
    pub(crate) fn tcp_fd(&self) -> RawFd {
        self.tcp
    }

    /// Plaintext bytes `(sent, received)` so far.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (
            self.stats.sent.load(Ordering::Relaxed),
            self.stats.received.load(Ordering::Relaxed),
        )
    }

    /// Did the peer's stream end without `close_notify` (a TCP EOF, a reset, or a TLS error)?
    /// The relay delivers EOF to the program's socket; the read hooks turn it into ECONNRESET.
    pub(crate) fn ended_without_close_notify(&self) -> bool {
        self.stats.truncated.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sent, received) = self.bytes();
        f.debug_struct("Link")
            .field("tcp", &self.tcp)
            .field("sent", &sent)
            .field("received", &received)
            .finish()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Forget the number and close it under the lock, so `is_internal` never reports a
        // number that a concurrent socket() may already have reused, nor misses one still open.
        let mut set = lock_internal();
        forget_internal(&mut set, self.tcp);
        sys::close_raw(self.tcp);
    }
}

/// Take over a protected connection whose handshake completed in userspace.
///
/// `app_fd` is the fd number the program holds; right now it is the connected TCP socket.
/// `conn` has finished its handshake; `rotate` is its rule's `key_update_after`; `known` is
/// `app_fd`'s flags if the caller knows them (else they are read). On success the program's fd
/// number refers to one end of an `AF_UNIX` stream socketpair (with the original `O_NONBLOCK`
/// and `FD_CLOEXEC`), and the relay thread carries the traffic; plaintext rustls had already
/// buffered is delivered first. On error nothing has changed on `app_fd`.
pub(crate) fn adopt(
    app_fd: RawFd,
    mut conn: Connection,
    rotate: Option<tether_proto::KeyUpdateAfter>,
    known: Option<FdFlags>,
) -> io::Result<Arc<Link>> {
    if conn.is_handshaking() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "tether: handshake not complete",
        ));
    }
    // Our own backpressure bounds what rustls holds (we read the program only when rustls has
    // flushed its TLS output), so its buffer limit must never turn a write into a short one.
    conn.set_buffer_limit(None);

    let swapped = swap(app_fd, known)?;
    let stats = Arc::new(Stats::default());
    let link = Arc::new(Link {
        tcp: swapped.tcp,
        stats: Arc::clone(&stats),
    });

    let mut reg = lock_registry();
    let wake = match ensure_relay(&mut reg) {
        Ok(fds) => fds.wake,
        Err(error) => {
            drop(reg);
            swapped.undo(app_fd);
            // `link` drops here and closes the TCP dup; `app_fd` is the TCP socket again.
            return Err(error);
        }
    };
    let id = reg.next_id;
    reg.next_id += 1;
    reg.links.insert(
        id,
        Registered {
            link: Arc::clone(&link),
            relay_end: swapped.relay_end,
        },
    );
    reg.pending.push(relay::Pending {
        id,
        conn,
        tcp: swapped.tcp,
        app: swapped.relay_end,
        stats,
        rotate,
    });
    drop(reg);
    sys::eventfd_signal(wake);
    Ok(link)
}

/// Does the relay hold any fd in this address space? (One atomic load.)
pub(crate) fn has_internal_fds() -> bool {
    INTERNAL_COUNT.load(Ordering::Acquire) != 0
}

/// Is `fd` one of the relay's internal fds (TCP sockets, relay ends, epoll, eventfd)?
pub(crate) fn is_internal(fd: RawFd) -> bool {
    if INTERNAL_COUNT.load(Ordering::Acquire) == 0 {
        return false;
    }
    lock_internal().binary_search(&fd).is_ok()
}

/// Sorted list of internal fds (for splitting `close_range` around them).
pub(crate) fn internal_fds() -> Vec<RawFd> {
    if INTERNAL_COUNT.load(Ordering::Acquire) == 0 {
        return Vec::new();
    }
    lock_internal().clone()
}

/// Call just before the real `exec*` in a process that will replace itself (the lead's exec
/// hooks). Exec would kill the relay thread, so every userspace connection is handed to a
/// detached keeper process (a double fork: it is reparented to init, never the exec'd
/// program's child) that carries on relaying until each connection ends. Fds inherited across
/// exec therefore keep working, and close-on-exec ones end with a proper `close_notify` instead
/// of being cut. This process forgets the connections without shutting anything down. A no-op
/// without connections. (A forked child that execs needs none of this: its parent relays.)
pub(crate) fn before_exec() {
    if lock_registry().links.is_empty() {
        return;
    }
    set_fork_mode(ForkMode::HandOff);
    // SAFETY: fork runs our atfork handlers (and the lead's); the child only runs the code below.
    let first = unsafe { libc::fork() };
    if first == 0 {
        set_fork_mode(ForkMode::MakeKeeper);
        // SAFETY: as above; the intermediate child exits at once, the grandchild keeps.
        let second = unsafe { libc::fork() };
        if second == 0 {
            become_keeper();
        }
        // SAFETY: leaves the intermediate child without running the program's atexit code.
        unsafe { libc::_exit(0) };
    }
    set_fork_mode(ForkMode::Plain);
    if first > 0 {
        let mut status = 0;
        // SAFETY: reaps our own intermediate child (it exits at once).
        while unsafe { libc::waitpid(first, &mut status, 0) } == -1
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
}

/// The keeper (grandchild) of [`before_exec`]: detach, keep only the relay's sockets, serve.
fn become_keeper() -> ! {
    crate::guard::mark_internal_thread();
    // SAFETY: plain process-attribute calls; the keeper runs no program code from here on.
    unsafe {
        libc::setsid();
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let relay = relay::lock_state().take();
    let reg = lock_registry();
    let mut keep: Vec<RawFd> = Vec::new();
    for registered in reg.links.values() {
        keep.push(registered.link.tcp);
        keep.push(registered.relay_end);
    }
    // A relay thread publishes its state only once it runs. If the exec came right after the
    // first adopt, it may not have yet: then every connection is still in `reg.pending`, and
    // the keeper starts from an empty state of the current generation (`relay::keep` welcomes
    // the pending ones). Without this the keeper left, and nobody relayed.
    let relay = relay
        .filter(|r| r.generation() == reg.generation)
        .or_else(|| reg.relay.map(|fds| relay::Relay::new(fds, reg.generation)));
    drop(reg);
    let (Some(relay), Ok(epoll)) = (relay, sys::epoll_create()) else {
        // SAFETY: nothing to serve.
        unsafe { libc::_exit(0) }
    };
    keep.push(epoll);
    keep.sort_unstable();
    // Everything else (the program's files and sockets, our old epoll and eventfd) goes, so
    // the keeper holds nothing that would keep a pipe or a connection of the program open.
    let mut next: RawFd = 0;
    for &fd in &keep {
        if fd > next {
            sys::close_range_raw(next, fd - 1);
        }
        next = fd + 1;
    }
    sys::close_range_raw(next, RawFd::MAX);
    {
        let mut set = lock_internal();
        set.retain(|fd| keep.contains(fd));
        INTERNAL_COUNT.store(set.len(), Ordering::Release);
    }
    relay::keep(relay, epoll)
}

/// Process exit (the shim's ELF destructor, run by `exit()` on whichever thread called it, after
/// the program's atexit handlers and its own destructors): the relay thread dies with the
/// process, so whatever the program wrote into its socketpair and the relay has not sent yet
/// would be lost, and so would the `close_notify` its exit implies. Drain them on this thread,
/// for at most `TETHER_EXIT_FLUSH_MS` (default 2 s) in all, then return.
///
/// Each connection's bytes are read from the socketpair until it is empty and sealed; then,
/// unless this process forked while it was relayed (a child may still hold it, and ends it
/// itself), `close_notify` and a TCP FIN follow, as the kernel's close of the program's last
/// copy would have told the relay. A connection the program already closed ends on its own.
/// A fork child has no relay (its parent's serves its copies): nothing to do. Not covered:
/// `_exit`/`_Exit`, a fatal signal, and stdio buffers that `exit` flushes after this runs.
pub(crate) fn at_exit() {
    if !has_internal_fds() || crate::fork::in_vfork_child() {
        return;
    }
    let bound = crate::settings::get().exit_flush;
    if bound.is_zero() {
        return;
    }
    let deadline = std::time::Instant::now() + bound;
    // The relay thread holds STATE only while it works on a batch (bounded, non-blocking), so
    // this waits for at most one batch; from here the relay thread is parked on the lock.
    let mut state = relay::lock_state();
    let reg = lock_registry();
    if reg.links.is_empty() {
        return;
    }
    // The relay thread publishes its state when it first runs: right after a first adopt it
    // may not have yet (the connections are all in `pending`). `relay::run` keeps this one.
    if state.as_ref().is_none_or(|r| r.generation() != reg.generation) {
        let Some(fds) = reg.relay else { return };
        *state = Some(relay::Relay::new(fds, reg.generation));
    }
    drop(reg);
    if let Some(relay) = state.as_mut() {
        relay.flush_at_exit(deadline);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ForkMode {
    /// An ordinary fork: the child resets.
    Plain,
    /// `before_exec`'s first fork: the parent forgets its connections, the child keeps them.
    HandOff,
    /// `before_exec`'s second fork: the intermediate parent exits, the keeper keeps everything.
    MakeKeeper,
}

thread_local! {
    /// The locks taken by `atfork_prepare`, released by `atfork_parent`/`atfork_child` on the
    /// same (forking) thread.
    static FORK_HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
    static FORK_MODE: std::cell::Cell<ForkMode> = const { std::cell::Cell::new(ForkMode::Plain) };
}

fn set_fork_mode(mode: ForkMode) {
    let _ = FORK_MODE.try_with(|m| m.set(mode));
}

fn fork_mode() -> ForkMode {
    FORK_MODE.try_with(std::cell::Cell::get).unwrap_or(ForkMode::Plain)
}

type Held = (
    MutexGuard<'static, Option<relay::Relay>>,
    MutexGuard<'static, Registry>,
    MutexGuard<'static, Vec<RawFd>>,
);

/// `pthread_atfork` prepare: take our locks (the relay finishes its current batch first) so
/// the child inherits consistent state. No other atfork handler may call `is_internal` or
/// `internal_fds` between prepare and parent/child.
pub(crate) fn atfork_prepare() {
    let state = relay::lock_state();
    let reg = lock_registry();
    let set = lock_internal();
    let _ = FORK_HELD.try_with(|held| *held.borrow_mut() = Some((state, reg, set)));
}

/// `pthread_atfork` parent: release the locks (after an exec hand-off, first forget the
/// connections the keeper now owns).
pub(crate) fn atfork_parent() {
    let held = FORK_HELD.try_with(|held| held.borrow_mut().take()).ok().flatten();
    let Some((mut state, mut reg, mut set)) = held else {
        return;
    };
    if fork_mode() != ForkMode::HandOff {
        // A child now holds copies of every program end: our exit must not end those streams.
        for registered in reg.links.values() {
            registered.link.stats.shared.store(true, Ordering::Relaxed);
        }
        return;
    }
    if let Some(relay) = state.as_mut() {
        relay.hand_off();
    }
    let (links, pending) = release_registrations(&mut reg, &mut set);
    drop(set);
    drop(reg);
    drop(state);
    drop(pending);
    drop(links);
}

/// Take every registration out of the registry and close this process's copies of their relay
/// ends. The returned values hold `Arc<Link>`s: drop them after releasing the locks (a last
/// `Arc<Link>` closes its TCP fd under `INTERNAL`).
fn release_registrations(reg: &mut Registry, set: &mut Vec<RawFd>) -> (BTreeMap<u64, Registered>, Vec<relay::Pending>) {
    let links = std::mem::take(&mut reg.links);
    let pending = std::mem::take(&mut reg.pending);
    for registered in links.values() {
        forget_internal(set, registered.relay_end);
        sys::close_raw(registered.relay_end);
    }
    (links, pending)
}

/// `pthread_atfork` child: the child has no relay thread. Close the child's copies of the
/// relay ends, the epoll fd and the eventfd, forget every registration (releasing the relay's
/// `Arc<Link>`s: TCP copies still referenced by the child's fd table stay open until those
/// drop), and let the next [`adopt`] start a fresh relay thread.
pub(crate) fn atfork_child() {
    let held = FORK_HELD.try_with(|held| held.borrow_mut().take()).ok().flatten();
    let (mut state, mut reg, mut set) = match held {
        Some(locks) => locks,
        // prepare did not run on this thread (should not happen): take the locks now.
        None => (relay::lock_state(), lock_registry(), lock_internal()),
    };
    if fork_mode() != ForkMode::Plain {
        return; // on its way to becoming the exec hand-off's keeper: keep everything
    }
    // The relay thread is not in the child; its state (rustls sessions) is dropped here.
    let stale = state.take();
    if let Some(fds) = reg.relay.take() {
        for fd in [fds.epoll, fds.wake] {
            forget_internal(&mut set, fd);
            sys::close_raw(fd);
        }
    }
    let (links, pending) = release_registrations(&mut reg, &mut set);
    drop(set);
    drop(reg);
    drop(state);
    // Outside the locks: a last `Arc<Link>` closes its TCP fd under `INTERNAL`.
    drop(stale);
    drop(pending);
    drop(links);
}

/// Everything the relay thread and `adopt` share.
struct Registry {
    /// The running relay's epoll and eventfd, if a relay thread exists in this process.
    relay: Option<RelayFds>,
    /// Bumped each time a relay thread starts, so a dying relay only tears down its own state.
    generation: u64,
    next_id: u64,
    /// Every connection the relay owns, by id; the owner of the relay end fd.
    links: BTreeMap<u64, Registered>,
    /// Connections adopted but not yet picked up by the relay thread.
    pending: Vec<relay::Pending>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelayFds {
    epoll: RawFd,
    wake: RawFd,
}

struct Registered {
    link: Arc<Link>,
    relay_end: RawFd,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    relay: None,
    generation: 0,
    next_id: 1,
    links: BTreeMap::new(),
    pending: Vec::new(),
});

/// Sorted fd numbers that belong to us. `INTERNAL_COUNT` mirrors its length so the close hook's
/// common case (no userspace connection in this process) takes no lock.
static INTERNAL: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());
static INTERNAL_COUNT: AtomicUsize = AtomicUsize::new(0);

fn lock_registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lock_internal() -> MutexGuard<'static, Vec<RawFd>> {
    INTERNAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn remember_internal(set: &mut Vec<RawFd>, fd: RawFd) {
    if let Err(at) = set.binary_search(&fd) {
        set.insert(at, fd);
        INTERNAL_COUNT.store(set.len(), Ordering::Release);
    }
}

fn forget_internal(set: &mut Vec<RawFd>, fd: RawFd) {
    if let Ok(at) = set.binary_search(&fd) {
        set.remove(at);
        INTERNAL_COUNT.store(set.len(), Ordering::Release);
    }
}

/// A freshly created internal fd: recorded in `INTERNAL`, closed again on drop unless kept.
struct Fresh(RawFd);

impl Fresh {
    fn new(fd: RawFd) -> Self {
        remember_internal(&mut lock_internal(), fd);
        Self(fd)
    }

    fn keep(self) -> RawFd {
        let fd = self.0;
        std::mem::forget(self);
        fd
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let mut set = lock_internal();
        forget_internal(&mut set, self.0);
        sys::close_raw(self.0);
    }
}

/// The result of switching the program's fd onto the socketpair.
struct Swapped {
    tcp: RawFd,
    relay_end: RawFd,
    cloexec: bool,
}

impl Swapped {
    /// Put the TCP socket back on `app_fd` with its original flags, and close the relay end.
    /// (The TCP dup itself is closed by whoever owns it: the `Link`.)
    fn undo(self, app_fd: RawFd) {
        let _ = sys::dup3(self.tcp, app_fd, self.cloexec);
        drop(Fresh(self.relay_end));
    }
}

fn swap(app_fd: RawFd, known: Option<FdFlags>) -> io::Result<Swapped> {
    let FdFlags { nonblocking, cloexec } = match known {
        Some(flags) => flags,
        None => FdFlags {
            nonblocking: sys::status_flags(app_fd)? & libc::O_NONBLOCK != 0,
            cloexec: sys::is_cloexec(app_fd)?,
        },
    };
    let tcp = Fresh::new(sys::dup_cloexec(app_fd)?);
    // O_NONBLOCK lives on the open file description, so the program's end keeps it through dup3.
    let (app_end, relay_end) = sys::stream_pair(nonblocking)?;
    let app_end = Fresh::new(app_end);
    let relay_end = Fresh::new(relay_end);
    // Each end is the sending side of one direction (program → relay, relay → program).
    for fd in [app_end.0, relay_end.0] {
        sys::set_int_sockopt(fd, libc::SO_SNDBUF, PAIR_BUFFER);
    }
    // The relay's ends (its socketpair end, the TCP socket) keep the program's O_NONBLOCK:
    // every recv and send on them is MSG_DONTWAIT, so a blocking program costs no flag change.
    sys::dup3(app_end.0, app_fd, cloexec)?;
    drop(app_end);
    Ok(Swapped {
        tcp: tcp.keep(),
        relay_end: relay_end.keep(),
        cloexec,
    })
}

/// The running relay's fds, starting the relay thread first if there is none.
fn ensure_relay(reg: &mut Registry) -> io::Result<RelayFds> {
    if let Some(fds) = reg.relay {
        return Ok(fds);
    }
    let epoll = Fresh::new(sys::epoll_create()?);
    let wake = Fresh::new(sys::eventfd()?);
    sys::epoll_add(epoll.0, wake.0, libc::EPOLLIN as u32, relay::WAKE_TOKEN)?;
    let fds = RelayFds {
        epoll: epoll.0,
        wake: wake.0,
    };
    reg.generation += 1;
    relay::spawn(fds, reg.generation)?;
    epoll.keep();
    wake.keep();
    reg.relay = Some(fds);
    Ok(fds)
}

/// Hand the relay thread of `generation` what `adopt` queued for it.
fn take_pending(generation: u64) -> Vec<relay::Pending> {
    let mut reg = lock_registry();
    if reg.generation != generation || reg.relay.is_none() {
        return Vec::new();
    }
    std::mem::take(&mut reg.pending)
}

/// The relay is done with link `id`: close the relay end and release the relay's `Arc<Link>`.
/// The caller has already shut the sockets down and removed them from epoll.
fn retire(id: u64) {
    let mut reg = lock_registry();
    if let Some(registered) = reg.links.remove(&id) {
        {
            let mut set = lock_internal();
            forget_internal(&mut set, registered.relay_end);
            sys::close_raw(registered.relay_end);
        }
        // Lock order REGISTRY → INTERNAL: a last Arc closes the TCP fd under INTERNAL.
        drop(registered);
    }
}

/// The relay thread of `generation` is exiting after an internal failure: fail every
/// connection closed (both sockets shut down), close its fds, and let the next `adopt` start a
/// new thread.
fn relay_died(generation: u64) {
    let mut state = relay::lock_state();
    if state.as_ref().is_some_and(|r| r.generation() == generation) {
        *state = None;
    }
    let mut reg = lock_registry();
    if reg.generation != generation {
        return;
    }
    let Some(fds) = reg.relay.take() else {
        return;
    };
    let links = std::mem::take(&mut reg.links);
    let pending = std::mem::take(&mut reg.pending);
    {
        let mut set = lock_internal();
        for registered in links.values() {
            sys::shutdown(registered.link.tcp, libc::SHUT_RDWR);
            sys::shutdown(registered.relay_end, libc::SHUT_RDWR);
            forget_internal(&mut set, registered.relay_end);
            sys::close_raw(registered.relay_end);
        }
        for fd in [fds.epoll, fds.wake] {
            forget_internal(&mut set, fd);
            sys::close_raw(fd);
        }
    }
    drop(reg);
    drop(state);
    drop(pending);
    drop(links);
}

#[cfg(test)]
mod tests;
