//! Flood resistance: connections that have not sent their first byte yet.
//!
//! A TLS client sends its ClientHello as soon as TCP connects, so a connection that is still
//! silent when accepted costs no thread: it is *parked* (an fd in a set watched by one
//! "tether-silent" thread with `poll`) until its first byte arrives, then handed to a handshake
//! worker. Parking is bounded three ways, so that silent connections can never lock anyone out:
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// How often the watcher re-reads the parked set (new arrivals wait at most this long). Nearly
/// every connection is accepted before its ClientHello arrives, so this is on the setup path:
/// at 5 ms it was most of the host setup p50 (4.3 ms, against 1.9 ms at 1 ms, scripts/bench
/// --quick 2026-12-02). The cost is a thread waking 1000 times a second while connections are
/// parked and for up to 10 s after the last one (then it exits).
const TICK_MS: i32 = 1;
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
    fn remove_at(&mut self, i: usize) -> Option<Parked> {
        let p = self.parked.remove(i)?;
        let src = Source::of(p.peer);
        if let Some(n) = self.per_source.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&src);
            }
        }
        Some(p)
    }

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
    MAX_PARKED.min(cur / 4).max(16)
}

/// Park `c` (already in `held`). Returns the fds evicted to make room; the caller closes them
/// outside the lock.
pub(super) fn park(p: &mut Pool, c: Parked) -> Vec<RawFd> {
    let mut evicted = Vec::new();
    let src = Source::of(c.peer);
    let n = p.silent.per_source.entry(src).or_insert(0);
    *n += 1;
    if *n > PER_SOURCE {
        if let Some(i) = p.silent.parked.iter().position(|x| Source::of(x.peer) == src) {
            evicted.extend(p.silent.remove_at(i));
        }
    }
    p.silent.parked.push_back(c);
    while p.silent.parked.len() > max_parked() {
        evicted.extend(p.silent.remove_at(0));
    }
    EVICTED.fetch_add(evicted.len() as u64, Ordering::Relaxed);
    let fds = evicted.iter().map(|e| e.fd).collect();
    for e in &evicted {
        p.held.remove(&e.fd);
    }
    ensure_watcher();
    fds
}

fn ensure_watcher() {
    if WATCHER.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new().name("tether-silent".into()).stack_size(128 * 1024).spawn(|| {
        guard::mark_internal_thread();
        if std::panic::catch_unwind(watch).is_err() {
            WATCHER.store(false, Ordering::Release);
        }
    });
    if spawned.is_err() {
        WATCHER.store(false, Ordering::Release);
    }
}

/// The watcher: hand parked connections to a worker when their first byte comes, drop those
/// that leave or stay silent past the deadline.
fn watch() {
    let deadline = FIRST_BYTE.min(settings::get().handshake_timeout);
    let mut idle_since = Instant::now();
    let mut summary_at: Option<Instant> = None;
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    loop {
        pfds.clear();
        let n = with_pool(|p| {
            pfds.extend(p.silent.parked.iter().map(|c| libc::pollfd { fd: c.fd, events: libc::POLLIN, revents: 0 }));
            if p.silent.parked.is_empty() && idle_since.elapsed() > Duration::from_secs(10) {
                WATCHER.store(false, Ordering::Release);
            }
            p.silent.parked.len()
        });
        if summary_at.is_none_or(|t| t.elapsed() >= SUMMARY) && summarise(deadline) {
            summary_at = Some(Instant::now());
        }
        if n == 0 {
            if !WATCHER.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(TICK_MS as u64));
            continue;
        }
        idle_since = Instant::now();
        // SAFETY: a valid array of `pfds.len()` pollfds. A number closed meanwhile (evicted)
        // reports POLLNVAL or its new socket's state; either is re-checked under the lock.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, TICK_MS) };
        let woke: Vec<RawFd> = pfds.iter().filter(|f| f.revents != 0).map(|f| f.fd).collect();
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
                    let evicted = with_pool(|p| park(p, c));
                    evicted.into_iter().for_each(close_fd);
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

pub(super) fn atfork_child() {
    WATCHER.store(false, Ordering::Release);
}
