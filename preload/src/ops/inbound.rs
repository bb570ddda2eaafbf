//! Inbound handshakes, bounded on the program's accept path.
//!
//! A server handshake can take as long as the client likes (up to the timeout), so running it
//! to the end inside the program's `accept` would let one silent TCP client stall an event-loop
//! server for the whole timeout, and a trickle of them stall it forever. Instead the accept hook
//! drains the kernel backlog without blocking; a connection whose client keeps up is finished
//! on the accepting thread, every wait for the client bounded ([`inline`]), and the rest go to
//! handshake threads (a half-done inline one resumes there). `accept` returns only connections
//! whose handshake has finished (kTLS installed or relay adopted), or that permissive mode lets
//! through in plaintext.
//!
//! How the program learns that one is ready:
//! - a **blocking** accept waits on the listener *and* our eventfd;
//! - a **non-blocking** listener is woken with a *doorbell*: the handshake thread makes a
//!   loopback connection to the listener, so whatever the program polls with (poll, epoll LT or
//!   ET, select) reports it readable; our accept recognises the doorbell by its source address,
//!   closes it, and hands out the ready connection. In a pre-fork server (several processes
//!   accepting on one socket) a doorbell may wake a sibling, so it is rung again every
//!   [`RERING`] until the connection is taken.
//!
//! Pending and ready fds are tether's own until handed out: `close`/`close_range`/`dup2` cannot
//! touch them, and a forked child closes its copies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::{InboundRule, Mode};

mod inline;
mod silent;

use super::protect::{self, InlineInbound};
use crate::fd_table::{Direction, Protected};
use crate::identity::Identity;
use crate::sync::Lock as Mutex;
use crate::sys::net::{self, FdFlags};
use crate::tls::handshake::Pause;
use crate::{guard, log, settings};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Handshakes in flight per process; connections beyond this are refused at once.
const MAX_PENDING: usize = 256;
/// Connections a process takes from a listener's backlog beyond what it has handed to the
/// program (handshakes under way plus ready ones). The rest stay in the kernel's queue for
/// whichever process of a pre-fork server accepts next. Parked silent connections do not count.
const CLAIM: usize = 8;
/// When a process is at [`CLAIM`] with nothing ready, a non-blocking accept waits this long for
/// one of its handshakes before it says EAGAIN (so a level-triggered loop does not spin).
const CLAIMED_WAIT_MS: i32 = 1;
/// How often an untaken ready connection rings the doorbell again.
const RERING: Duration = Duration::from_millis(25);
/// Longest a blocking accept sleeps before re-checking (a safety net for lost wake-ups).
const BLOCKING_POLL_MS: i32 = 100;

/// A connection ready to be handed to the program.
struct Ready {
    fd: RawFd,
    peer: SocketAddr,
    conn: Option<Arc<Protected>>,
    at: Instant,
}

#[derive(Default)]
struct Pool {
    /// Listener fd → connections ready for it, oldest first.
    ready: HashMap<RawFd, VecDeque<Ready>>,
    /// Every fd we hold: pending handshakes and ready connections.
    held: HashSet<RawFd>,
    /// Source addresses of our doorbell connections, with when they were rung.
    doorbells: HashMap<SocketAddr, Instant>,
    /// Listener fd → connections taken from its backlog and not yet handed out (handshakes
    /// under way and ready ones): at most [`CLAIM`].
    claimed: HashMap<RawFd, usize>,
    /// Connections that have not sent a byte yet.
    silent: silent::Silent,
}

impl Pool {
    fn unclaim(&mut self, lfd: RawFd) {
        if let Some(n) = self.claimed.get_mut(&lfd) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.claimed.remove(&lfd);
            }
        }
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static PENDING: AtomicUsize = AtomicUsize::new(0);
static HELD: AtomicUsize = AtomicUsize::new(0);
/// eventfd signalled when a connection becomes ready (for blocking accepts); -1 until needed.
static WAKE: AtomicI32 = AtomicI32::new(-1);

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    let mut g = POOL.lock();
    let r = f(g.get_or_insert_with(Pool::default));
    let held = g.as_ref().map_or(0, |p| p.held.len());
    HELD.store(held, Ordering::Release);
    r
}

/// Is `fd` a connection we hold (pending or ready, not yet the program's)?
pub(crate) fn is_internal(fd: RawFd) -> bool {
    if fd == WAKE.load(Ordering::Relaxed) || silent::own_fds().contains(&fd) {
        return true;
    }
    HELD.load(Ordering::Acquire) != 0 && with_pool(|p| p.held.contains(&fd))
}

/// Does the pool hold any fd (or the eventfd, or the silent watcher's)? (Atomic loads only.)
pub(crate) fn holds_fds() -> bool {
    HELD.load(Ordering::Acquire) != 0 || WAKE.load(Ordering::Relaxed) >= 0 || silent::own_fds()[0] >= 0
}

/// Fds we hold, for `close_range`.
pub(crate) fn internal_fds() -> Vec<RawFd> {
    let mut v: Vec<RawFd> = with_pool(|p| p.held.iter().copied().collect());
    v.extend([WAKE.load(Ordering::Relaxed)].into_iter().chain(silent::own_fds()).filter(|&w| w >= 0));
    v.sort_unstable();
    v
}

/// How the pool accepts every connection; the program's own accept4 flags are applied only at
/// delivery (`accept::set_flags`).
const ACCEPT4_FLAGS: libc::c_int = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
/// The flags of every connection the pool holds until it is delivered, as [`ACCEPT4_FLAGS`]
/// made them (adoption by the relay keeps them on the socketpair end): nobody reads them.
pub(crate) const ACCEPTED: FdFlags = FdFlags { nonblocking: true, cloexec: true };

/// What accept should do for this listener.
pub(crate) enum Next {
    /// Hand this connection to the program.
    Deliver { fd: RawFd, peer: SocketAddr, conn: Option<Arc<Protected>> },
    /// Nothing ready and the backlog is empty.
    WouldBlock,
    /// Nothing ready, and this process already has [`CLAIM`] handshakes under way: the backlog
    /// is left to siblings. Wait for one of ours only.
    Claimed,
    /// The real accept failed with this errno.
    Error(i32),
}

/// One step of a pooled accept on `lfd`: take a ready connection, else drain the backlog (a
/// connection whose client keeps up is finished here and returned at once, the rest go to
/// handshake threads or are parked) and try again.
pub(crate) fn step(lfd: RawFd, ident: &Arc<Identity>, rule: &InboundRule) -> Next {
    if let Some(r) = take_ready(lfd) {
        return Next::Deliver { fd: r.fd, peer: r.peer, conn: r.conn };
    }
    loop {
        // Take no more than this process is about to hand out: in a pre-fork server the rest
        // belongs to the siblings (a connection goes to the process whose accept took it).
        if claimed(lfd) >= CLAIM {
            return Next::Claimed;
        }
        // accept4's SOCK_NONBLOCK applies to the new socket, not to the wait: never call it
        // on a listener with nothing queued (a blocking listener would block us here).
        let mut pfd = libc::pollfd { fd: lfd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 || pfd.revents & libc::POLLIN == 0 {
            break;
        }
        let mut st = net::zeroed_storage();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: out-buffers of the declared size.
        let fd = unsafe {
            crate::real::accept4(lfd, (&mut st as *mut libc::sockaddr_storage).cast(), &mut len, ACCEPT4_FLAGS)
        };
        if fd < 0 {
            let e = guard::errno();
            match e {
                libc::EAGAIN => break,
                libc::ECONNABORTED | libc::EINTR | libc::EPROTO => continue,
                _ => return Next::Error(e),
            }
        }
        // SAFETY: the kernel filled `len` bytes of `st`.
        let peer = unsafe { net::from_raw((&st as *const libc::sockaddr_storage).cast(), len) };
        let Some(peer) = peer else {
            // Not an inet peer (cannot happen on a TCP listener of a protected port): never
            // handed over unprotected; dropped, as a connection that failed its handshake.
            log::Line::new("accept").kv("decision", "deny").kv("reason", "the kernel gave no inet peer address").emit();
            close_fd(fd);
            continue;
        };
        if is_doorbell(peer) {
            close_fd(fd);
            continue;
        }
        if let Some(r) = admit(lfd, fd, peer, ident, rule) {
            return Next::Deliver { fd: r.fd, peer: r.peer, conn: r.conn };
        }
    }
    match take_ready(lfd) {
        Some(r) => Next::Deliver { fd: r.fd, peer: r.peer, conn: r.conn },
        None => Next::WouldBlock,
    }
}

/// For a blocking accept: wait until the listener or a handshake has something.
pub(crate) fn wait(lfd: RawFd) {
    wait_on(Some(lfd), BLOCKING_POLL_MS);
}

/// At [`CLAIM`]: wait for one of this process's handshakes only (the listener is the
/// siblings' business). `blocking` says whether the program's accept may block.
pub(crate) fn wait_claimed(blocking: bool) {
    wait_on(None, if blocking { BLOCKING_POLL_MS } else { CLAIMED_WAIT_MS });
}

fn wait_on(lfd: Option<RawFd>, ms: i32) {
    let wake = wake_fd();
    let mut fds = [
        libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: lfd.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
    ];
    let n = if lfd.is_some() { 2 } else { 1 };
    // SAFETY: valid pollfd array of `n` entries (a negative fd is ignored by poll).
    unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
    crate::clock::waited();
    if wake >= 0 && fds[0].revents & libc::POLLIN != 0 {
        let mut v = 0u64;
        // SAFETY: eventfd reads are 8 bytes.
        unsafe { libc::read(wake, (&mut v as *mut u64).cast(), 8) };
    }
}

fn claimed(lfd: RawFd) -> usize {
    if HELD.load(Ordering::Acquire) == 0 {
        return 0;
    }
    with_pool(|p| p.claimed.get(&lfd).copied().unwrap_or(0))
}

/// A connection just taken from the backlog: finished inline if its handshake can be (returned
/// for the program), else a worker if it has spoken, else parked.
fn admit(lfd: RawFd, fd: RawFd, peer: SocketAddr, ident: &Arc<Identity>, rule: &InboundRule) -> Option<Ready> {
    let first = silent::peek(fd);
    if matches!(first, silent::FirstByte::Gone) {
        close_fd(fd);
        return None;
    }
    let spoken = matches!(first, silent::FirstByte::Data);
    match inline::bound(lfd, fd, rule) {
        Some(bound) => inline(lfd, fd, peer, ident, rule, bound, spoken),
        None if spoken => {
            start(lfd, fd, peer, ident.clone(), rule.clone());
            None
        }
        None => {
            park(lfd, fd, peer, ident, rule);
            None
        }
    }
}

/// `fd` has not spoken: it waits for its first byte with the silent watcher, costing no thread.
fn park(lfd: RawFd, fd: RawFd, peer: SocketAddr, ident: &Arc<Identity>, rule: &InboundRule) {
    let c = silent::Parked { lfd, fd, peer, at: crate::clock::mono(), ident: ident.clone(), rule: rule.clone() };
    let evicted = with_pool(|p| {
        p.held.insert(fd);
        silent::park(p, c)
    });
    for e in evicted {
        net::kill(e);
        close_fd(e);
    }
}

/// Run the server handshake of `fd` on the accepting thread, waiting at most `bound` for the
/// client (for its ClientHello too, unless it has `spoken`); a handshake the client does not
/// keep up with goes on on a worker, a client still silent is parked.
fn inline(
    lfd: RawFd,
    fd: RawFd,
    peer: SocketAddr,
    ident: &Arc<Identity>,
    rule: &InboundRule,
    bound: Duration,
    spoken: bool,
) -> Option<Ready> {
    // As on a worker: a blocking accept may have begun before a refresh or a tetherd restart.
    let ident = &crate::identity::latest(ident);
    // Ours while the handshake runs: a fork child closes its copy, the program cannot close it.
    with_pool(|p| p.held.insert(fd));
    let drop_it = |fd| {
        with_pool(|p| p.held.remove(&fd));
        close_fd(fd);
    };
    let mut pause = Pause { bound, yield_to: lfd, ..Pause::default() };
    if !spoken {
        // TLS clients send their ClientHello right after connect returns: usually just after
        // our accept took the connection.
        let _ = pause.wait(fd);
        match silent::peek(fd) {
            silent::FirstByte::Data => {}
            silent::FirstByte::Gone => {
                inline::finished(false, pause.waited);
                drop_it(fd);
                return None;
            }
            silent::FirstByte::Silent => {
                inline::finished(false, pause.waited);
                park(lfd, fd, peer, ident, rule);
                return None;
            }
        }
    }
    let Some(local) = net::local_addr(fd) else {
        inline::finished(false, pause.waited);
        drop_it(fd);
        return None;
    };
    let rule = rule_now(ident, local.port(), rule);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        protect::protect_inbound_inline(fd, ident, rule.into(), local, peer, &mut pause)
    }));
    match r {
        Ok(InlineInbound::Done(Ok(conn))) => {
            inline::finished(true, pause.waited);
            with_pool(|p| p.held.remove(&fd));
            Some(Ready { fd, peer, conn: Some(conn), at: crate::clock::mono() })
        }
        Ok(InlineInbound::Done(Err(f))) => {
            inline::finished(false, pause.waited);
            protect::log_failure(Direction::Inbound, Some(ident), peer, &f);
            drop_it(fd);
            None
        }
        Ok(InlineInbound::Paused(half)) => {
            inline::finished(false, pause.waited);
            start_job(Job { lfd, fd, peer, ident: ident.clone(), rule: rule.clone(), half: Some(half) });
            None
        }
        Err(_) => {
            inline::finished(false, pause.waited);
            net::kill(fd);
            drop_it(fd);
            None
        }
    }
}

fn take_ready(lfd: RawFd) -> Option<Ready> {
    if HELD.load(Ordering::Acquire) == 0 {
        return None;
    }
    with_pool(|p| {
        let q = p.ready.get_mut(&lfd)?;
        let r = q.pop_front()?;
        if q.is_empty() {
            p.ready.remove(&lfd);
        }
        p.held.remove(&r.fd);
        p.unclaim(lfd);
        Some(r)
    })
}

fn start(lfd: RawFd, fd: RawFd, peer: SocketAddr, ident: Arc<Identity>, rule: InboundRule) {
    start_job(Job { lfd, fd, peer, ident, rule, half: None });
}

/// Give `job` to a handshake worker (a new one if none is idle), or refuse it at [`MAX_PENDING`].
fn start_job(job: Job) {
    let (lfd, fd, peer) = (job.lfd, job.fd, job.peer);
    if PENDING.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
        PENDING.fetch_sub(1, Ordering::AcqRel);
        log::Line::new("accept")
            .kv("decision", "deny")
            .kv("peer", peer)
            .kv("reason", format!("more than {MAX_PENDING} handshakes in flight"))
            .emit();
        net::kill(fd);
        // Held already when it began inline.
        with_pool(|p| p.held.remove(&fd));
        close_fd(fd);
        return;
    }
    with_pool(|p| {
        p.held.insert(fd);
        *p.claimed.entry(lfd).or_insert(0) += 1;
    });
    let spawn = {
        let mut w = WORKERS.lock();
        w.jobs.push_back(job);
        if w.idle == 0 {
            w.threads += 1;
            true
        } else {
            WORK.notify_one();
            false
        }
    };
    if spawn {
        let spawned = crate::sync::spawn_thread("tether-accept", 256 * 1024, worker);
        if spawned.is_err() {
            // Take the job back out: it is refused.
            let mut w = WORKERS.lock();
            w.threads -= 1;
            if let Some(pos) = w.jobs.iter().position(|j| j.fd == fd) {
                w.jobs.remove(pos);
                drop(w);
                PENDING.fetch_sub(1, Ordering::AcqRel);
                with_pool(|p| {
                    p.held.remove(&fd);
                    p.unclaim(lfd);
                });
                net::kill(fd);
                close_fd(fd);
            }
        }
    }
}

/// One pending inbound handshake.
struct Job {
    lfd: RawFd,
    fd: RawFd,
    peer: SocketAddr,
    ident: Arc<Identity>,
    rule: InboundRule,
    /// A handshake begun inline at accept, to be finished here.
    half: Option<protect::HalfInbound>,
}

/// Handshake workers are reused: spawning a thread (and a malloc arena) per connection cost
/// both latency and memory. There is never a wait for a free worker, though: when none is idle a
/// new one starts (up to [`MAX_PENDING`] in all), so a silent client never delays another.
struct Workers {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

static WORKERS: Mutex<Workers> = Mutex::new(Workers { jobs: VecDeque::new(), threads: 0, idle: 0 });
static WORK: std::sync::Condvar = std::sync::Condvar::new();
/// An idle worker exits after this long without work.
const WORKER_IDLE: Duration = Duration::from_secs(10);

fn worker() {
    loop {
        let job = {
            let mut w = WORKERS.lock();
            loop {
                if let Some(j) = w.jobs.pop_front() {
                    break Some(j);
                }
                w.idle += 1;
                let (g, r) = WORKERS.wait_timeout(&WORK, w, WORKER_IDLE);
                w = g;
                let timed_out = r.timed_out();
                w.idle -= 1;
                if timed_out && w.jobs.is_empty() {
                    w.threads -= 1;
                    break None;
                }
            }
        };
        let Some(Job { lfd, fd, peer, ident, rule, half }) = job else { return };
        // One read of each clock per stretch of work between waits (see `clock`).
        let burst = crate::clock::Burst::begin();
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match half {
            Some(h) => resume(lfd, fd, peer, h, &ident, &rule),
            // The identity captured when a (blocking) accept began may have been replaced
            // since: a refresh, or a restarted tetherd that holds none of the old keys.
            None => handshake(lfd, fd, peer, &crate::identity::latest(&ident), &rule),
        }))
        .unwrap_or(false);
        drop(burst);
        if !ok {
            with_pool(|p| {
                p.held.remove(&fd);
                p.unclaim(lfd);
            });
            close_fd(fd);
        }
        PENDING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The rule for `port` in `ident`'s policy (the identity current at handshake time carries the
/// policy in force now). An `accept` that blocked since before a reload must not apply the rule
/// it read then: an `allow` entry removed, a permissive port made mutual, take effect on the
/// next handshake. A port the new policy no longer protects keeps the rule it was taken under.
fn rule_now<'a>(ident: &'a Identity, port: u16, captured: &'a InboundRule) -> &'a InboundRule {
    ident.policy.inbound_rule(port).unwrap_or(captured)
}

/// Runs on a handshake thread. Returns whether `fd` was queued for the program.
fn handshake(lfd: RawFd, fd: RawFd, peer: SocketAddr, ident: &Arc<Identity>, rule: &InboundRule) -> bool {
    let Some(local) = net::local_addr(fd) else { return false };
    let rule = rule_now(ident, local.port(), rule);
    let conn = match rule.mode {
        Mode::Permissive => {
            let deadline = crate::clock::mono() + settings::get().handshake_timeout;
            match net::peek_first_byte(fd, deadline) {
                Ok(Some(TLS_HANDSHAKE)) => protect_it(fd, ident, rule, local, peer),
                _ => {
                    log::Line::new("accept")
                        .kv("decision", "plaintext")
                        .kv("local_id", &ident.id)
                        .kv("peer", peer)
                        .kv("reason", "permissive mode: client did not start TLS")
                        .emit();
                    Some(Protected::new(
                        crate::fd_table::DataPath::Plaintext,
                        Direction::Inbound,
                        ident.id.clone(),
                        None,
                        local,
                        peer,
                        "plaintext",
                    ))
                }
            }
        }
        _ => protect_it(fd, ident, rule, local, peer),
    };
    let Some(conn) = conn else { return false };
    queue_ready(lfd, Ready { fd, peer, conn: Some(conn), at: crate::clock::mono() });
    true
}

/// Runs on a handshake thread: finish a handshake begun inline (its identity is the one its
/// server flight already proved). Returns whether `fd` was queued for the program.
fn resume(lfd: RawFd, fd: RawFd, peer: SocketAddr, half: protect::HalfInbound, ident: &Arc<Identity>, rule: &InboundRule) -> bool {
    match protect::resume_inbound(half, ident, &rule.allow) {
        Ok(conn) => {
            queue_ready(lfd, Ready { fd, peer, conn: Some(conn), at: crate::clock::mono() });
            true
        }
        Err(f) => {
            protect::log_failure(Direction::Inbound, Some(ident), peer, &f);
            false
        }
    }
}

/// `r` (an fd in `held`) is ready for the program: queue it and wake whoever accepts.
fn queue_ready(lfd: RawFd, r: Ready) {
    with_pool(|p| {
        p.ready.entry(lfd).or_default().push_back(r);
        ensure_ringer(p);
    });
    notify(lfd);
}

fn protect_it(fd: RawFd, ident: &Arc<Identity>, rule: &InboundRule, local: SocketAddr, peer: SocketAddr) -> Option<Arc<Protected>> {
    match protect::protect(fd, Direction::Inbound, ident, rule.into(), local, peer) {
        Ok(p) => Some(p),
        Err(f) => {
            protect::log_failure(Direction::Inbound, Some(ident), peer, &f);
            None
        }
    }
}

/// Wake whoever accepts on `lfd`: the eventfd for blocking accepts, a doorbell for event loops.
fn notify(lfd: RawFd) {
    let w = wake_fd();
    if w >= 0 {
        let one = 1u64;
        // SAFETY: eventfd writes are 8 bytes.
        unsafe { libc::write(w, (&one as *const u64).cast(), 8) };
    }
    // A blocking accept waits on the eventfd; only a non-blocking listener (an event loop,
    // maybe in several processes) needs a new connection to notice.
    if net::status_flags(lfd) & libc::O_NONBLOCK != 0 {
        ring_doorbell(lfd);
    }
}

/// Whether the ringer thread runs (changed only under the POOL lock).
static RINGER: AtomicBool = AtomicBool::new(false);

/// Start the ringer if it is not running. Call with the pool lock held (inside `with_pool`).
fn ensure_ringer(_locked: &mut Pool) {
    if RINGER.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = crate::sync::spawn_thread("tether-ringer", 128 * 1024, || {
        let _ = std::panic::catch_unwind(ringer);
    });
    if spawned.is_err() {
        RINGER.store(false, Ordering::Release);
    }
}

/// One thread per process re-rings for ready connections the program has not taken within
/// [`RERING`] (a sibling process may have been the one woken, or a wake-up was lost), and drops
/// those nobody takes within the handshake timeout. Handshake workers never wait for this.
fn ringer() {
    let give_up = settings::get().handshake_timeout.max(Duration::from_secs(5));
    let mut idle_since = Instant::now();
    loop {
        std::thread::sleep(RERING);
        let now = Instant::now();
        let (rering, expired, empty) = with_pool(|p| {
            let mut rering = Vec::new();
            let mut expired = Vec::new();
            let mut unclaim = Vec::new();
            for (lfd, q) in p.ready.iter_mut() {
                while q.front().is_some_and(|r| now.saturating_duration_since(r.at) > give_up) {
                    expired.extend(q.pop_front());
                    unclaim.push(*lfd);
                }
                if q.front().is_some_and(|r| now.saturating_duration_since(r.at) >= RERING) {
                    rering.push(*lfd);
                }
            }
            p.ready.retain(|_, q| !q.is_empty());
            for lfd in unclaim {
                p.unclaim(lfd);
            }
            for r in &expired {
                p.held.remove(&r.fd);
            }
            let empty = p.ready.is_empty();
            if empty && now.saturating_duration_since(idle_since) > Duration::from_secs(10) {
                RINGER.store(false, Ordering::Release);
            }
            (rering, expired, empty)
        });
        // Outside the pool lock: a `Protected` reports its close when dropped (fork lock order).
        for r in expired {
            log::Line::new("accept")
                .kv("decision", "deny")
                .kv("peer", r.peer)
                .kv("reason", "handshake finished but the program never accepted the connection")
                .emit();
            net::kill(r.fd);
            close_fd(r.fd);
            drop(r);
        }
        for lfd in rering {
            notify(lfd);
        }
        if !empty {
            idle_since = now;
        } else if !RINGER.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Make the listener readable: connect to it from a loopback address we remember.
fn ring_doorbell(lfd: RawFd) {
    let Some(listen) = net::local_addr(lfd) else { return };
    let target = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port()),
        _ => listen,
    };
    let domain = if target.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket creation.
    let s = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if s < 0 {
        return;
    }
    // Bind first and register the source address, so the doorbell is known before the
    // program can possibly accept it.
    let src = SocketAddr::new(if target.is_ipv4() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) }, 0);
    let (sa, sl) = net::sockaddr_of(src);
    // SAFETY: `sa`/`sl` describe a valid sockaddr.
    if unsafe { libc::bind(s, (&sa as *const libc::sockaddr_storage).cast(), sl) } == 0 {
        if let Some(me) = net::local_addr(s) {
            with_pool(|p| {
                let now = Instant::now();
                p.doorbells.retain(|_, t| now.duration_since(*t) < Duration::from_secs(30));
                p.doorbells.insert(me, now);
            });
            let (ta, tl) = net::sockaddr_of(target);
            // SAFETY: as above. Non-blocking: the SYN is enough to queue the connection.
            unsafe { crate::real::connect(s, (&ta as *const libc::sockaddr_storage).cast(), tl) };
            let _ = net::wait(s, libc::POLLOUT, Instant::now() + Duration::from_millis(200));
        }
    }
    close_fd(s);
}

fn is_doorbell(peer: SocketAddr) -> bool {
    with_pool(|p| p.doorbells.remove(&peer).is_some())
}

fn wake_fd() -> RawFd {
    let w = WAKE.load(Ordering::Acquire);
    if w >= 0 {
        return w;
    }
    // SAFETY: plain eventfd creation.
    let e = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if e < 0 {
        return -1;
    }
    match WAKE.compare_exchange(-1, e, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => e,
        Err(other) => {
            close_fd(e);
            other
        }
    }
}

/// The program closed a listener: drop what was ready for it.
pub(crate) fn listener_closed(lfd: RawFd) {
    if HELD.load(Ordering::Acquire) == 0 {
        return;
    }
    // Moved out of the pool lock before anything drops (fork lock order).
    let (gone, parked) = with_pool(|p| {
        let q = p.ready.remove(&lfd).unwrap_or_default();
        for r in &q {
            p.held.remove(&r.fd);
        }
        p.claimed.remove(&lfd);
        let parked = p.silent.take_listener(lfd);
        for c in &parked {
            p.held.remove(&c.fd);
        }
        (q, parked)
    });
    for fd in gone.iter().map(|r| r.fd).chain(parked.iter().map(|c| c.fd)) {
        net::kill(fd);
        close_fd(fd);
    }
    drop(gone);
}

fn close_fd(fd: RawFd) {
    // SAFETY: an fd we own.
    unsafe { crate::real::close(fd) };
}

/// Fork lock order: `WORKERS` then `POOL` (released by `crate::fork`).
pub(crate) fn atfork_prepare() {
    WORKERS.hold_for_fork();
    POOL.hold_for_fork();
}

/// In the fork child, with no lock held: the child has none of the handshake threads. Close its
/// copies of what they hold. The ready connections' `Protected` values belong to the parent:
/// dropping them here reports nothing (see `Protected::drop`); a relayed one's `Link` closes the
/// child's copy of the TCP fd.
pub(crate) fn after_fork_child() {
    let jobs = {
        let mut w = WORKERS.lock();
        w.threads = 0;
        w.idle = 0;
        std::mem::take(&mut w.jobs)
    };
    let (held, ready, parked) = with_pool(|p| {
        p.doorbells.clear();
        p.claimed.clear();
        (std::mem::take(&mut p.held), std::mem::take(&mut p.ready), p.silent.clear())
    });
    drop(parked);
    silent::atfork_child();
    for fd in held {
        close_fd(fd);
    }
    drop(ready);
    drop(jobs);
    PENDING.store(0, Ordering::Release);
    HELD.store(0, Ordering::Release);
    RINGER.store(false, Ordering::Release);
    let w = WAKE.swap(-1, Ordering::AcqRel);
    if w >= 0 {
        close_fd(w);
    }
}
