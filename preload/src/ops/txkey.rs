//! kTLS TX rekeying, done by the program's own next write.
//!
//! A KeyUpdate we send and the kernel's switch to the next TX key are two syscalls
//! (`sendmsg` with `TLS_SET_RECORD_TYPE`, then `setsockopt(TLS_TX)`). A record another thread
//! writes between them would be sealed under the old key after the peer was told to expect the
//! new one, and the peer would reset the connection. So the thread that decides a TX rekey is
//! owed (the reader that followed a peer's `update_requested`, or the `key_update_after`
//! timer) only *records* it: a per-connection state word, plus a process-wide count of
//! connections that owe one. The write-family exports load that count (one relaxed atomic
//! load, no syscall) and go on to the real call when it is zero, which is always, except
//! between a decision and the next write on that connection. When it is not zero, the writer
//! looks its fd up and, if its connection owes a rekey, sends the KeyUpdate and moves TX itself,
//! before its own data: the program's writes to one socket are then ordered around the rekey
//! exactly as the program orders them. RFC 8446 §4.6.3 only asks for our KeyUpdate "prior to
//! sending \[our\] next Application Data record", which is exactly when this happens.
//!
//! Two writers racing on one socket without the program ordering them (already interleaving
//! their bytes arbitrarily) may still put one record between the two syscalls: the peer then
//! rejects it (bad_record_mac) and the connection is reset, never exposed.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::fd_table::{self, Protected};
use crate::sys::net;
use crate::tls::danger;
use crate::{guard, log};

/// The peer asked for our KeyUpdate (`update_requested`): answer with update_not_requested.
pub(crate) const PEER_ASKED: u8 = 1;
/// Our own rotation is due (`key_update_after`): send update_requested, so both directions move.
pub(crate) const DUE: u8 = 2;
/// A writer is rekeying now; other writers on the connection wait for it.
const BUSY: u8 = 4;

/// Connections whose state word is not zero. The write exports' whole fast path is a load of this.
static OWED: AtomicUsize = AtomicUsize::new(0);

/// Is any connection in this process owed a TX rekey? (The write exports' fast-path check.)
#[inline]
pub(crate) fn any_owed() -> bool {
    OWED.load(Ordering::Relaxed) != 0
}

/// Per-connection TX rekey state (in [`Protected`]).
#[derive(Debug, Default)]
pub(crate) struct TxRekey(AtomicU8);

impl TxRekey {
    /// Record that `why` (PEER_ASKED or DUE) is owed; the next write on the connection does it.
    pub(crate) fn owe(&self, why: u8) {
        if self.0.fetch_or(why, Ordering::AcqRel) == 0 {
            OWED.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Fork child: a rekey another thread had under way does not exist here. Clear BUSY so that
    /// no writer of the child waits for it (what is still owed stays owed).
    pub(crate) fn forget_busy(&self) {
        if self.0.fetch_and(!BUSY, Ordering::AcqRel) == BUSY {
            OWED.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Is anything owed (or under way)?
    pub(crate) fn pending(&self) -> bool {
        self.0.load(Ordering::Acquire) != 0
    }
}

/// The connection is gone with a rekey still owed: it no longer counts.
impl Drop for TxRekey {
    fn drop(&mut self) {
        if *self.0.get_mut() != 0 {
            OWED.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// After this long waiting for another writer's rekey, say so once (the wait goes on: that
/// writer waits for send-buffer room exactly as this one's write would).
const BUSY_WARN: Duration = Duration::from_secs(10);

/// Called by a write-family export on `fd` when [`any_owed`]: if `fd`'s connection owes a TX
/// rekey, do it now, before the program's data. `Err(errno)` is what the program's call returns
/// instead (EAGAIN: a non-blocking socket without room for the KeyUpdate; ECONNRESET: the
/// rekey failed and the connection was shut down).
pub(crate) fn before_write(fd: RawFd, dontwait: bool) -> Result<(), i32> {
    // Cheap look first (no cookie check, no syscall): most fds are not ours, or owe nothing.
    if !fd_table::peek(fd, |p| p.tx_rekey.pending()) {
        return Ok(());
    }
    let Some(p) = fd_table::get(fd) else {
        return Ok(());
    };
    let dontwait = dontwait || net::status_flags(fd) & libc::O_NONBLOCK != 0;
    let (slow, mut warned) = (Instant::now() + BUSY_WARN, false);
    let state = &p.tx_rekey.0;
    loop {
        let s = state.load(Ordering::Acquire);
        if s == 0 {
            return Ok(());
        }
        if s & BUSY != 0 {
            // Another thread is sending our KeyUpdate. A non-blocking caller retries later
            // (that thread holds BUSY for two non-blocking syscalls); a blocking one waits for
            // it, as its own write would wait for the same send buffer.
            if dontwait {
                return Err(libc::EAGAIN);
            }
            if !warned && Instant::now() >= slow {
                warned = true;
                log::Line::new("write")
                    .kv("fd", fd)
                    .kv(
                        "reason",
                        "waiting for another thread's TX rekey (send buffer full?)",
                    )
                    .emit();
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        // Answer the peer first (update_not_requested, RFC 8446 §4.6.3); our own due rotation,
        // if also owed, stays set and goes out as a second KeyUpdate right after.
        let (take, keep) = if s & PEER_ASKED != 0 {
            (PEER_ASKED, s & DUE)
        } else {
            (DUE, 0)
        };
        if state
            .compare_exchange(s, BUSY | keep, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        let r = rotate(fd, &p, take == DUE, dontwait);
        if r.is_err() {
            // Not done: still owed (the program's retry, or the next write, does it).
            state.fetch_or(take, Ordering::AcqRel);
        }
        let left = state.fetch_and(!BUSY, Ordering::AcqRel) & !BUSY;
        if left == 0 {
            OWED.fetch_sub(1, Ordering::AcqRel);
        }
        match r {
            Ok(()) if left == 0 => return Ok(()),
            Ok(()) => {}
            Err(Rotate::Again(e)) => return Err(e),
            Err(Rotate::Broken(why)) => return Err(fail(fd, &p, &why)),
        }
    }
}

enum Rotate {
    /// Nothing was sent: the program's call returns this errno and may be retried.
    Again(i32),
    /// The KeyUpdate may be out but TX did not move: the stream cannot continue.
    Broken(String),
}

/// Send one KeyUpdate under the current TX key, then move the kernel's TX to the next key.
fn rotate(fd: RawFd, p: &Protected, request_update: bool, dontwait: bool) -> Result<(), Rotate> {
    let Some(keys) = p.rekey.get() else {
        return Err(Rotate::Broken(
            "TX rekey owed on a socket without a key schedule".into(),
        ));
    };
    match crate::sys::ktls::send_key_update(fd, request_update, dontwait) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => {
            return Err(Rotate::Again(e.raw_os_error().unwrap_or(libc::EAGAIN)))
        }
        Err(e) => return Err(Rotate::Broken(format!("sending our KeyUpdate failed: {e}"))),
    }
    // The key schedule's lock is also the read path's; it is held only for the derivation
    // and the setsockopt, never across a wait.
    let Some(mut keys) = danger::lock_keys(keys) else {
        return Err(Rotate::Broken(danger::KEYS_STUCK.into()));
    };
    danger::move_tx(fd, &mut keys)
        .map_err(|e: io::Error| Rotate::Broken(format!("TX rekey failed: {e}")))?;
    drop(keys);
    log::Line::new("rekey")
        .kv("fd", fd)
        .kv("dir", "tx")
        .kv("update_requested", request_update)
        .kv(
            "peer_id",
            p.peer
                .as_ref()
                .map(|v| v.id().to_string())
                .unwrap_or_default(),
        )
        .emit();
    Ok(())
}

/// The connection cannot go on: shut it down both ways (no byte under a wrong key), log why.
fn fail(fd: RawFd, p: &Protected, why: &str) -> i32 {
    net::kill(fd);
    let peer = p
        .peer
        .as_ref()
        .map(|v| v.id().to_string())
        .unwrap_or_default();
    log::Line::new("write")
        .kv("fd", fd)
        .kv("peer_id", peer)
        .kv("reason", why)
        .emit();
    guard::set_errno(libc::ECONNRESET);
    libc::ECONNRESET
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_once_however_many_rekeys_it_owes() {
        let before = OWED.load(Ordering::Acquire);
        let t = TxRekey::default();
        assert!(!t.pending());
        t.owe(PEER_ASKED);
        t.owe(DUE);
        t.owe(PEER_ASKED);
        assert!(t.pending());
        assert_eq!(OWED.load(Ordering::Acquire), before + 1);
        drop(t);
        assert_eq!(
            OWED.load(Ordering::Acquire),
            before,
            "a dropped connection no longer counts"
        );
    }

    #[test]
    fn a_fork_child_forgets_a_rekey_under_way_but_not_what_is_owed() {
        let before = OWED.load(Ordering::Acquire);
        let busy = TxRekey(AtomicU8::new(BUSY));
        OWED.fetch_add(1, Ordering::AcqRel);
        busy.forget_busy();
        assert!(!busy.pending());
        assert_eq!(OWED.load(Ordering::Acquire), before);
        let owed = TxRekey(AtomicU8::new(BUSY | DUE));
        OWED.fetch_add(1, Ordering::AcqRel);
        owed.forget_busy();
        assert!(owed.pending(), "the due rotation is still owed");
        drop(owed);
        assert_eq!(OWED.load(Ordering::Acquire), before);
    }
}
