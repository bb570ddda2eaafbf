//! Flood resistance: connections that have not sent their first byte yet.
//!
//! A TLS client sends its ClientHello as soon as TCP connects, so a connection that is still
//! silent when accepted costs no thread: it is *parked* until its first byte arrives, then
//! handed to a handshake worker. Parking adds the fd to an epoll set (one-shot, `EPOLLIN |
//! EPOLLRDHUP`) that one "tether-silent" thread waits on; the registration takes effect at once,
//! even while the watcher sleeps, and a byte that came before it is reported too, so a first
//! byte is seen when it arrives (no tick). The watcher sleeps until an event, the oldest parked
//! connection's deadline, or a due summary line, and never longer than a deadline: a connection
//! parked during its sleep needs no wake-up (an eventfd in the set kicks it only to log a first
//! eviction). A connection leaves the set (`EPOLL_CTL_DEL`) whenever it leaves the parked list,
//! before anyone closes it: a socket file that outlives our close (a fork child not yet through
//! its atfork handler) would otherwise keep a registration under a number the next connection
//! gets. Parking is bounded three ways, so that silent connections can never lock anyone out:
//! - a **first-byte deadline** ([`FIRST_BYTE`], at most the handshake timeout): a connection
//!   still silent then is closed (mutual) or handed out as plaintext (permissive: a protocol
//!   where the server speaks first);
//! - a **per-source cap** ([`PER_SOURCE`] parked connections per IPv4 address or IPv6 /64):
//!   one more from a source at its cap evicts that source's oldest parked connection;
//! - a **global cap** ([`MAX_PARKED`], and never more than a quarter of `RLIMIT_NOFILE`): one
//!   more evicts the oldest parked connection of all.
//!
//! Evicted and expired connections are closed without a log line each (a flood would flood the
//! log too): they are summed up in at most one line per [`SUMMARY`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::{InboundRule, Mode};

use super::{close_fd, start, with_pool, Pool, Ready};
use crate::fd_table::{DataPath, Direction, Protected};
use crate::identity::Identity;
use crate::sys::net;
use crate::{guard, log, settings};

/// Longest a connection may stay silent after it was accepted.
pub(super) const FIRST_BYTE: Duration = Duration::from_secs(2);
/// Parked connections per source before the source's oldest is evicted.
pub(super) const PER_SOURCE: usize = 128;
/// Parked connections per process before the oldest is evicted.
pub(super) const MAX_PARKED: usize = 1024;
/// The global cap is never below this, whatever `RLIMIT_NOFILE` says, so a park with fewer
/// parked makes no `getrlimit` call (parking is on the setup path of nearly every connection).
const MIN_PARKED_CAP: usize = 16;
/// The watcher exits after this long with nothing parked (the next park starts a new one).
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// Evictions and expiries are logged at most this often (summed up), the first one at once.
const SUMMARY: Duration = Duration::from_secs(1);

/// Where a connection comes from, for the per-source cap: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Source(u128);

impl Source {
    pub(super) fn of(peer: SocketAddr) -> Self {
        match peer.ip() {
            IpAddr::V4(ip) => Self(u128::from(u32::from(ip))),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => Self(u128::from(u32::from(v4))),
                None => Self((u128::from(ip) >> 64) | (1 << 127)),
            },
        }
    }
}

/// One parked connection.
pub(super) struct Parked {
    pub(super) lfd: RawFd,
    pub(super) fd: RawFd,
    pub(super) peer: SocketAddr,
    pub(super) at: Instant,
    pub(super) ident: Arc<Identity>,
    pub(super) rule: InboundRule,
}

/// The parked set, inside the pool (under its lock).
#[derive(Default)]
pub(super) struct Silent {
    /// Oldest first.
    parked: std::collections::VecDeque<Parked>,
    per_source: HashMap<Source, usize>,
}

impl Silent {
    /// Take out the `i`th parked connection, and its registration in the epoll set (for a
    /// connection that goes on, a spent one-shot registration would stay on its socket's wait
    /// queue, called on every wake-up of the socket for its whole life).
    fn remove_at(&mut self, i: usize) -> Option<Parked> {
        let p = self.parked.remove(i)?;
        unregister(p.fd);
        let src = Source::of(p.peer);
        if let Some(n) = self.per_source.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&src);
            }
        }
        Some(p)
    }

    /// In the fork child: forget everything, and leave the epoll set alone (it is the parent's:
    /// an `EPOLL_CTL_DEL` here would remove the parent's registration of the same socket).
    pub(super) fn clear(&mut self) -> Vec<Parked> {
        self.per_source.clear();
        self.parked.drain(..).collect()
    }

    /// Take out every parked connection of a listener the program closed.
    pub(super) fn take_listener(&mut self, lfd: RawFd) -> Vec<Parked> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].lfd == lfd {
                out.extend(self.remove_at(i));
            } else {
                i += 1;
            }
        }
        out
    }
}

static EVICTED: AtomicU64 = AtomicU64::new(0);
static EXPIRED: AtomicU64 = AtomicU64::new(0);
static WATCHER: AtomicBool = AtomicBool::new(false);
/// The watcher's epoll set and the eventfd in it (-1 until the first park; created and changed
/// under the POOL lock; the fork child closes its copies and forgets them).
static EPOLL: AtomicI32 = AtomicI32::new(-1);
static KICK: AtomicI32 = AtomicI32::new(-1);
/// epoll data of the eventfd (parked connections use their fd, never negative).
const KICK_TOKEN: u64 = u64::MAX;

/// What a non-blocking peek at a fresh connection found.
pub(super) enum FirstByte {
    Data,
    Silent,
    Gone,
}

pub(super) fn peek(fd: RawFd) -> FirstByte {
    let mut b = [0u8; 1];
    // SAFETY: one-byte buffer; never blocks.
    let n = unsafe { crate::real::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match n {
        1 => FirstByte::Data,
        0 => FirstByte::Gone,
        _ if matches!(guard::errno(), libc::EAGAIN | libc::EINTR) => FirstByte::Silent,
        _ => FirstByte::Gone,
    }
}

/// The global cap: [`MAX_PARKED`], or a quarter of the fd limit if that is lower.
fn max_parked() -> usize {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 { r.rlim_cur as usize } else { 1024 };
    MAX_PARKED.min(cur / 4).max(MIN_PARKED_CAP)
}

/// Park `c` (already in `held`), in the order of its `at` (a connection woken by a stale event
/// is parked again, behind younger ones otherwise). Returns the fds evicted to make room; the
/// caller closes them outside the lock.
pub(super) fn park(p: &mut Pool, c: Parked) -> Vec<RawFd> {
    let mut evicted = Vec::new();
    if register(c.fd) {
        let src = Source::of(c.peer);
        let n = p.silent.per_source.entry(src).or_insert(0);
        *n += 1;
        if *n > PER_SOURCE {
            if let Some(i) = p.silent.parked.iter().position(|x| Source::of(x.peer) == src) {
                evicted.extend(p.silent.remove_at(i));
            }
        }
        let at = p.silent.parked.partition_point(|x| x.at <= c.at);
        p.silent.parked.insert(at, c);
        if p.silent.parked.len() > MIN_PARKED_CAP {
            let max = max_parked();
            while p.silent.parked.len() > max {
                evicted.extend(p.silent.remove_at(0));
            }
        }
    } else {
        // No epoll set (fd or memory exhaustion): nobody would see its first byte.
        evicted.push(c);
    }
    let before = EVICTED.fetch_add(evicted.len() as u64, Ordering::Relaxed);
    let fds = evicted.iter().map(|e| e.fd).collect();
    for e in &evicted {
        p.held.remove(&e.fd);
    }
    // The first eviction since the last summary line must schedule the next (the watcher adds
    // it to its sleep from then). A new deadline needs no kick: the watcher never sleeps longer
    // than a deadline, so it wakes before the one of a connection parked during its sleep.
    if before == 0 && !evicted.is_empty() {
        kick();
    }
    ensure_watcher();
    fds
}

/// The epoll set and its eventfd, created on first use. Call under the POOL lock.
fn sets() -> Option<(RawFd, RawFd)> {
    let ep = EPOLL.load(Ordering::Acquire);
    if ep >= 0 {
        return Some((ep, KICK.load(Ordering::Acquire)));
    }
    // SAFETY: plain fd creation; both are closed on failure.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        if ep < 0 {
            return None;
        }
        let kick = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: KICK_TOKEN };
        if kick < 0 || libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, kick, &mut ev) != 0 {
            if kick >= 0 {
                crate::real::close(kick);
            }
            crate::real::close(ep);
            return None;
        }
        KICK.store(kick, Ordering::Release);
        EPOLL.store(ep, Ordering::Release);
        Some((ep, kick))
    }
}

/// Arm a one-shot wait for `fd`'s first byte (or its close). Every parked fd left the set when
/// it left the parked list, so this is always a new registration.
fn register(fd: RawFd) -> bool {
    let Some((ep, _)) = sets() else { return false };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
        u64: fd as u64,
    };
    // SAFETY: valid epoll fd and event.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) == 0 }
}

/// Take `fd` out of the epoll set (it leaves the parked list, for a worker, the program or a
/// close).
fn unregister(fd: RawFd) {
    let ep = EPOLL.load(Ordering::Acquire);
    if ep >= 0 {
        // SAFETY: valid epoll fd; a non-null event pointer for old kernels.
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }
}

fn kick() {
    let k = KICK.load(Ordering::Acquire);
    if k >= 0 {
        let one = 1u64;
        // SAFETY: eventfd writes are 8 bytes.
        unsafe { libc::write(k, (&one as *const u64).cast(), 8) };
    }
}

/// The epoll set and eventfd, for `close`/`close_range` protection.
pub(super) fn own_fds() -> [RawFd; 2] {
    [EPOLL.load(Ordering::Relaxed), KICK.load(Ordering::Relaxed)]
}

fn ensure_watcher() {
    if WATCHER.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = crate::sync::spawn_thread("tether-silent", 128 * 1024, || {
        if std::panic::catch_unwind(watch).is_err() {
            WATCHER.store(false, Ordering::Release);
        }
    });
    if spawned.is_err() {
        WATCHER.store(false, Ordering::Release);
    }
}

/// The watcher: hand parked connections to a worker when their first byte comes, drop those
/// that leave or stay silent past the deadline. It sleeps in `epoll_wait` until an event, the
/// oldest parked connection's deadline, or a summary line that is due; with nothing parked, for
/// one deadline at most (so the first connection parked meanwhile is never overslept).
fn watch() {
    let deadline = FIRST_BYTE.min(settings::get().handshake_timeout);
    let mut idle_since = Instant::now();
    let mut summary_at: Option<Instant> = None;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        // One clock read per round (in UML each is a system call).
        let now = Instant::now();
        let wait = with_pool(|p| match p.silent.parked.front() {
            Some(c) => {
                idle_since = now;
                Some(deadline.saturating_sub(now.saturating_duration_since(c.at)))
            }
            None if now.saturating_duration_since(idle_since) >= IDLE_EXIT => {
                WATCHER.store(false, Ordering::Release);
                None
            }
            None => Some(deadline.min(IDLE_EXIT.saturating_sub(now.saturating_duration_since(idle_since)))),
        });
        let Some(mut wait) = wait else { return };
        if EXPIRED.load(Ordering::Relaxed) + EVICTED.load(Ordering::Relaxed) > 0 {
            match summary_at.map(|t| SUMMARY.saturating_sub(now.saturating_duration_since(t))) {
                Some(d) if !d.is_zero() => wait = wait.min(d),
                _ => {
                    summarise(deadline);
                    summary_at = Some(now);
                }
            }
        }
        let ep = EPOLL.load(Ordering::Acquire);
        // Round up: a deadline 0.3 ms away must not spin with a zero timeout.
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: an epoll fd (-1 only if the first park could not make one: EBADF) and a
        // valid event array.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, ms) };
        if n < 0 && guard::errno() != libc::EINTR {
            // No set to wait on: deadlines and the idle exit still come, without a spin.
            std::thread::sleep(wait);
        }
        let mut woke: Vec<RawFd> = Vec::new();
        for e in events.iter().take(n.max(0) as usize) {
            if e.u64 == KICK_TOKEN {
                let mut v = 0u64;
                // SAFETY: eventfd reads are 8 bytes.
                unsafe { libc::read(KICK.load(Ordering::Acquire), (&mut v as *mut u64).cast(), 8) };
            } else {
                woke.push(e.u64 as RawFd);
            }
        }
        // An event for a number that was evicted and reused meanwhile finds the new connection
        // (re-checked by the peek below, parked again in its place if still silent).
        let (spoke, expired) = with_pool(|p| {
            let mut spoke = Vec::new();
            let mut expired = Vec::new();
            for fd in woke {
                if let Some(i) = p.silent.parked.iter().position(|c| c.fd == fd) {
                    spoke.extend(p.silent.remove_at(i));
                }
            }
            while p.silent.parked.front().is_some_and(|c| c.at.elapsed() >= deadline) {
                expired.extend(p.silent.remove_at(0));
            }
            for c in &expired {
                if c.rule.mode != Mode::Permissive {
                    p.held.remove(&c.fd);
                }
            }
            (spoke, expired)
        });
        for c in spoke {
            match peek(c.fd) {
                FirstByte::Data => start(c.lfd, c.fd, c.peer, c.ident, c.rule),
                FirstByte::Silent => {
                    for e in with_pool(|p| park(p, c)) {
                        net::kill(e);
                        close_fd(e);
                    }
                }
                FirstByte::Gone => {
                    with_pool(|p| p.held.remove(&c.fd));
                    close_fd(c.fd);
                }
            }
        }
        for c in expired {
            if c.rule.mode == Mode::Permissive {
                plaintext(c);
            } else {
                EXPIRED.fetch_add(1, Ordering::Relaxed);
                net::kill(c.fd);
                close_fd(c.fd);
            }
        }
    }
}

/// A permissive port's client that never spoke: the server speaks first, in plaintext.
fn plaintext(c: Parked) {
    let Some(local) = net::local_addr(c.fd) else {
        with_pool(|p| p.held.remove(&c.fd));
        close_fd(c.fd);
        return;
    };
    log::Line::new("accept")
        .kv("decision", "plaintext")
        .kv("local_id", &c.ident.id)
        .kv("peer", c.peer)
        .kv("reason", "permissive mode: client did not start TLS")
        .emit();
    let conn = Protected::new(DataPath::Plaintext, Direction::Inbound, c.ident.id.clone(), None, local, c.peer, "plaintext");
    // A ready connection is claimed until handed out (taking it unclaims).
    with_pool(|p| *p.claimed.entry(c.lfd).or_insert(0) += 1);
    super::queue_ready(c.lfd, Ready { fd: c.fd, peer: c.peer, conn: Some(conn), at: Instant::now() });
}

/// Log what was closed since the last line. Returns whether it logged.
fn summarise(deadline: Duration) -> bool {
    let expired = EXPIRED.swap(0, Ordering::Relaxed);
    let evicted = EVICTED.swap(0, Ordering::Relaxed);
    if expired > 0 {
        log::Line::new("accept")
            .kv("decision", "deny")
            .kv("connections", expired)
            .kv("errno", "ETIMEDOUT")
            .kv("reason", format!("timed out: no first byte within {} ms", deadline.as_millis()))
            .emit();
    }
    if evicted > 0 {
        log::Line::new("accept")
            .kv("decision", "deny")
            .kv("connections", evicted)
            .kv("reason", format!("silent connections evicted (over {PER_SOURCE} from one source, or {} in all)", max_parked()))
            .emit();
    }
    expired + evicted > 0
}

/// In the fork child: no watcher runs, and the epoll set is the parent's (an epoll file is
/// shared across fork): close the child's copies and forget them. The counts not yet logged are
/// the parent's to log.
pub(super) fn atfork_child() {
    WATCHER.store(false, Ordering::Release);
    EVICTED.store(0, Ordering::Relaxed);
    EXPIRED.store(0, Ordering::Relaxed);
    for a in [&EPOLL, &KICK] {
        let fd = a.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            close_fd(fd);
        }
    }
}
