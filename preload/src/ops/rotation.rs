//! `key_update_after` on kTLS: our own traffic-key rotation.
//!
//! The kernel seals the program's writes, which tether does not count, so one "tether-rekey"
//! thread per process (started with the first such connection) looks at each connection every
//! [`TICK`] (every [`FAST_TICK`] while a byte limit is small): the time since its last rotation, and its bytes sent + received from
//! `getsockopt(TCP_INFO)` (`tcpi_bytes_acked + tcpi_bytes_received`: ciphertext, close enough
//! to the plaintext for a limit). When one is due it records a TX rekey owed with
//! update_requested ([`super::txkey::DUE`]); the connection's next write sends the KeyUpdate
//! and moves TLS_TX (the peer then moves its own keys before its next data). An idle connection
//! therefore rotates before its next byte, never under a write in flight. Nothing here runs on
//! the data path.
//!
//! Locks: the inbox (fork order 12, last) is held only to push or take registrations; weak
//! references are dropped under it, never a `Protected` (whose drop reports under lock 5).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tether_proto::KeyUpdateAfter;

use crate::fd_table::{self, Protected};
use crate::sync::Lock;
use crate::sys::net;

/// How often the thread looks at its connections.
const TICK: Duration = Duration::from_millis(50);
/// How often, while a connection has a small byte limit (at most [`SMALL_LIMIT`]): a fast
/// transfer would otherwise pass several limits between two looks.
const FAST_TICK: Duration = Duration::from_millis(10);
const SMALL_LIMIT: u64 = 16 << 20;

struct Watch {
    fd: RawFd,
    conn: Weak<Protected>,
    limit: KeyUpdateAfter,
    since: Instant,
    bytes_at: u64,
}

static INBOX: Lock<Vec<Watch>> = Lock::new(Vec::new());
static STARTED: AtomicBool = AtomicBool::new(false);

/// Rotate `p` (now installed on `fd`) per `limit`.
pub(crate) fn watch(fd: RawFd, p: &Arc<Protected>, limit: KeyUpdateAfter) {
    let w = Watch {
        fd,
        conn: Arc::downgrade(p),
        limit,
        since: Instant::now(),
        bytes_at: tcp_bytes(fd).unwrap_or(0),
    };
    INBOX.lock().push(w);
    if !STARTED.swap(true, Ordering::AcqRel) {
        let spawned = crate::sync::spawn_thread("tether-rekey", 128 * 1024, run);
        if spawned.is_err() {
            STARTED.store(false, Ordering::Release);
            crate::log::Line::new("rekey")
                .kv("reason", "could not start the key rotation thread")
                .emit();
        }
    }
}

fn run() {
    let mut watched: Vec<Watch> = Vec::new();
    loop {
        let small = watched
            .iter()
            .any(|w| matches!(w.limit, KeyUpdateAfter::Bytes(n) if n <= SMALL_LIMIT));
        std::thread::sleep(if small { FAST_TICK } else { TICK });
        watched.append(&mut INBOX.lock());
        watched.retain_mut(|w| {
            let Some(p) = w.conn.upgrade() else {
                return false;
            };
            // The number must still name this connection's socket (cookie-checked).
            let here = fd_table::get(w.fd).is_some_and(|q| Arc::ptr_eq(&p, &q));
            if here && !p.peer_closed.load(Ordering::Relaxed) && !p.tx_rekey.pending() {
                let bytes = tcp_bytes(w.fd).unwrap_or(w.bytes_at);
                let due = match w.limit {
                    KeyUpdateAfter::Elapsed(d) => w.since.elapsed() >= d,
                    KeyUpdateAfter::Bytes(n) => bytes.saturating_sub(w.bytes_at) >= n,
                    _ => false,
                };
                if due {
                    p.tx_rekey.owe(super::txkey::DUE);
                    w.since = Instant::now();
                    w.bytes_at = bytes;
                }
            }
            true
        });
    }
}

/// Bytes acknowledged by the peer plus bytes received, from the kernel.
fn tcp_bytes(fd: RawFd) -> Option<u64> {
    net::tcp_info(fd).map(|info| info.tcpi_bytes_acked.saturating_add(info.tcpi_bytes_received))
}

/// Fork order 12: the inbox, after the relay's locks.
pub(crate) fn atfork_prepare() {
    INBOX.hold_for_fork();
}

/// The child has no rotation thread: it starts one if it protects a connection that needs it.
/// (Connections inherited from the parent are rotated by the parent only.)
pub(crate) fn after_fork_child() {
    INBOX.lock().clear();
    STARTED.store(false, Ordering::Release);
}
