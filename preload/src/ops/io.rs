//! The read family's slow path, for kTLS sockets only.
//!
//! A control record (alert, NewSessionTicket, KeyUpdate) makes a plain read on a kTLS socket
//! fail with EIO. Exports call the real function first and come here only when it failed with
//! EIO and the fd is a kTLS connection of ours: one branch on the fast path.
//!
//! A peer's KeyUpdate (Linux >= 6.14) is followed here too: the record is consumed, rustls's
//! key schedule gives the next RX secret, and TLS_RX is set again before the program's call is
//! repeated; if the peer asked for it, the connection's next write sends our own KeyUpdate
//! under the old TX key and moves TLS_TX to the next one (`ops::txkey`). The per-connection key-schedule lock is taken only here, from
//! before the record is consumed until the new keys are in, so a second reader that meets
//! EKEYEXPIRED in between waits for it rather than rekeying twice.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::fd_table::{self, DataPath};
use crate::guard;
use crate::log;
use crate::sys::ktls::{self, Control};
use crate::tls::danger::{self, KeySchedule};

/// Live kTLS connections with a key schedule on a kernel that rekeys: while there are any, a
/// short read on a kTLS socket looks for a KeyUpdate the kernel decrypted ahead.
static SHORT_READ_WATCH: AtomicUsize = AtomicUsize::new(0);

/// One connection counted in [`SHORT_READ_WATCH`] (kept in its [`fd_table::Protected`]).
#[derive(Debug)]
pub(crate) struct ShortReadWatch(());

impl ShortReadWatch {
    pub(crate) fn new() -> Self {
        SHORT_READ_WATCH.fetch_add(1, Ordering::AcqRel);
        Self(())
    }
}

impl Drop for ShortReadWatch {
    fn drop(&mut self) {
        SHORT_READ_WATCH.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Should a short successful read look for a decrypted-ahead KeyUpdate? (One atomic load.)
#[inline]
pub(crate) fn short_reads_watched() -> bool {
    SHORT_READ_WATCH.load(Ordering::Relaxed) != 0
}

/// A read on `fd` returned data but less than the program asked for. On Linux >= 6.14 the
/// kernel may then have decrypted the *next* record too (it keeps going while a whole record is
/// queued) and, if that was a KeyUpdate, it hides the socket's POLLIN until the new RX key is
/// set (`tls_sk_poll`: `key_update_pending`): a program that polls before reading would wait
/// forever for a record it never gets to read. So (never on a read that filled the buffer: the
/// kernel stops at a full buffer without looking ahead) one non-blocking `MSG_PEEK` looks at the
/// head of the queue: this function, the whole cost of the common case. It changes nothing
/// (the fd's entry is looked at without its cookie check, a peek consumes nothing even on a
/// number that now names another socket), so the export runs it before the guard's vfork check
/// (a getpid). Only when it finds a handshake record does [`after_short_read`] run.
pub(crate) fn handshake_record_queued(fd: RawFd) -> bool {
    fd_table::peek(fd, |p| matches!(p.path, DataPath::Ktls) && p.rekey.get().is_some())
        && ktls::head_record_type(fd) == Some(crate::sys::control::CONTENT_HANDSHAKE)
}

/// [`handshake_record_queued`] said yes: consume that record and follow it now, exactly as the
/// EIO path would. Application data is never consumed here.
pub(crate) fn after_short_read(fd: RawFd) {
    // The cookie check (one getsockopt), now that there is something to act on.
    let Some(p) = fd_table::get(fd) else { return };
    let Some(rekey) = p.rekey.get() else { return };
    let Some(mut keys) = danger::lock_keys(rekey) else {
        reset(fd, Some(&p), danger::KEYS_STUCK);
        return;
    };
    let why = match ktls::handle_control_record(fd) {
        Ok(Control::KeyUpdate { requested }) => {
            follow_key_update(fd, Some(&p), Some(&mut keys), requested).err()
        }
        Ok(Control::Reset(why)) => Some(why.to_owned()),
        // A ticket (dropped), or nothing after all: the next read carries on.
        _ => None,
    };
    drop(keys);
    if let Some(why) = why {
        // The data already returned stays the program's; nothing more can flow.
        crate::sys::net::kill(fd);
        let _ = reset(fd, Some(&p), &why);
    }
}

/// Control records we will skip in a row before calling the stream broken.
const MAX_SKIPPED: usize = 64;

/// What the export should return after `first` (the real call's result) failed.
/// `again` repeats the program's original call.
pub(crate) fn after_read_error(fd: RawFd, first: isize, again: &mut dyn FnMut() -> isize) -> isize {
    let e = guard::errno();
    if e != libc::EIO && e != libc::EKEYEXPIRED {
        return first;
    }
    let p = fd_table::get(fd);
    match &p {
        Some(p) if !matches!(p.path, DataPath::Ktls) => {
            guard::set_errno(e);
            return first;
        }
        Some(p) if p.peer_closed.load(Ordering::Relaxed) => return 0,
        Some(_) => {}
        // Not in our table, but a kTLS socket all the same: inherited across exec (the new
        // image's table starts empty). Handle its control records too.
        None if ktls::is_ktls_socket(fd) => {}
        None => {
            guard::set_errno(e);
            return first;
        }
    }
    if e == libc::EKEYEXPIRED {
        return after_key_expired(fd, p.as_deref(), again);
    }
    let rekey = p.as_ref().and_then(|p| p.rekey.get());
    for _ in 0..MAX_SKIPPED {
        let mut keys = match rekey.map(danger::lock_keys) {
            Some(None) => return reset(fd, p.as_deref(), danger::KEYS_STUCK),
            Some(g) => g,
            None => None,
        };
        let mut control = ktls::handle_control_record_with(fd, keys.as_deref_mut());
        if let Ok(Control::KeyUpdate { requested }) = control {
            control = Ok(
                match follow_key_update(fd, p.as_deref(), keys.as_deref_mut(), requested) {
                    Ok(()) => Control::Retry,
                    Err(why) => return reset(fd, p.as_deref(), &why),
                },
            );
        }
        drop(keys);
        match control {
            Ok(Control::KeyUpdate { .. }) => {
                return reset(fd, p.as_deref(), "KeyUpdate not followed")
            }
            Ok(Control::Retry) => {
                let r = again();
                if r >= 0 || guard::errno() != libc::EIO {
                    return r;
                }
            }
            Ok(Control::Eof) => {
                if let Some(p) = &p {
                    p.peer_closed.store(true, Ordering::Relaxed);
                }
                return 0;
            }
            Ok(Control::Reset(why)) => return reset(fd, p.as_deref(), why),
            Err(err) => {
                guard::set_errno(err.raw_os_error().unwrap_or(libc::EIO));
                return -1;
            }
        }
    }
    guard::set_errno(libc::ECONNRESET);
    -1
}

/// How long a reader that met EKEYEXPIRED waits for the thread following the KeyUpdate.
const KEY_EXPIRED_WAIT_MS: u32 = 200;

/// The kernel says RX awaits its next key: another thread of ours is following a KeyUpdate
/// (wait on its lock, then read again), or the record went where we could not see it (an
/// interface we do not hook): then we cannot know the peer's request, and fail closed.
fn after_key_expired(
    fd: RawFd,
    p: Option<&fd_table::Protected>,
    again: &mut dyn FnMut() -> isize,
) -> isize {
    let Some(rekey) = p.and_then(|p| p.rekey.get()) else {
        return reset(
            fd,
            p,
            "kTLS RX key expired on a socket without a key schedule",
        );
    };
    for _ in 0..KEY_EXPIRED_WAIT_MS {
        // Wait out a rekey another thread is doing (bounded).
        if danger::lock_keys(rekey).is_none() {
            return reset(fd, p, danger::KEYS_STUCK);
        }
        let r = again();
        match (r, guard::errno()) {
            (r, _) if r >= 0 => return r,
            (_, libc::EKEYEXPIRED) => std::thread::sleep(std::time::Duration::from_millis(1)),
            (_, libc::EIO) => return after_read_error(fd, r, again),
            _ => return r,
        }
    }
    reset(
        fd,
        p,
        "kTLS RX key expired: the peer's KeyUpdate was consumed outside tether",
    )
}

/// Move RX to the peer's next key; an update request is recorded for the connection's next
/// write, which sends our KeyUpdate and moves TX (`ops::txkey`: a write from another thread can
/// then never fall between our KeyUpdate and the TX switch). `keys` is the locked key schedule
/// (`None`: a kTLS socket inherited across exec, which has none).
fn follow_key_update(
    fd: RawFd,
    p: Option<&fd_table::Protected>,
    keys: Option<&mut KeySchedule>,
    requested: bool,
) -> Result<(), String> {
    let (Some(p), Some(keys)) = (p, keys) else {
        return Err(
            "peer sent KeyUpdate; no key schedule for this socket (kTLS inherited across exec)"
                .into(),
        );
    };
    danger::follow_rx(fd, keys).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) | Some(libc::EEXIST) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT) => {
            format!("peer sent KeyUpdate; this kernel cannot rekey kTLS RX (Linux < 6.14: {e})")
        }
        _ => format!("peer sent KeyUpdate; RX rekey failed: {e}"),
    })?;
    if requested {
        p.tx_rekey.owe(super::txkey::PEER_ASKED);
    }
    Ok(())
}

/// A `recvmsg` with the program's own control buffer: the kernel then returns a kTLS control
/// record (alert, session ticket, KeyUpdate) as the call's data, labelled only by a cmsg the
/// program does not know about. Consume it completely (its tail too, when the program's buffer
/// cut it short), act on it as the EIO slow path does, and return what the program should
/// see. `first` is the real call's result, `ty` the record type it carried, `controllen` the
/// program's control buffer size (restored before every retry).
///
/// # Safety
/// `msg` is the program's msghdr, just filled by a successful recvmsg on `fd`.
pub(crate) unsafe fn control_in_program_buffer(
    fd: RawFd,
    msg: *mut libc::msghdr,
    flags: libc::c_int,
    first: isize,
    ty: u8,
    controllen: usize,
    again: &mut dyn FnMut() -> isize,
) -> isize {
    let (mut got_n, mut ty) = (first, ty);
    for _ in 0..MAX_SKIPPED {
        let control = if flags & libc::MSG_PEEK != 0 {
            // A peek left it queued: consume it with our own buffer.
            ktls::handle_control_record(fd)
        } else {
            // SAFETY: the kernel wrote `got_n` bytes into the program's iovecs.
            let mut body = unsafe { gather(msg, got_n as usize) };
            complete(fd, ty, &mut body).map(|()| ktls::classify(ty, &body))
        };
        let p = fd_table::get(fd);
        match control {
            Ok(Control::Retry) => {
                // SAFETY: the program's msghdr; its control buffer size as it passed it.
                unsafe {
                    (*msg).msg_controllen = controllen;
                    (*msg).msg_flags = 0;
                }
                let r = again();
                if r < 0 {
                    return if guard::errno() == libc::EIO {
                        after_read_error(fd, r, again)
                    } else {
                        r
                    };
                }
                if r == 0 {
                    return super::ending::after_eof(fd);
                }
                // SAFETY: the kernel just filled the program's msghdr.
                match unsafe { ktls::control_record_in(msg) } {
                    Some(t) => (got_n, ty) = (r, t),
                    None => return r,
                }
            }
            Ok(Control::Eof) => {
                if let Some(p) = &p {
                    p.peer_closed.store(true, Ordering::Relaxed);
                }
                return 0;
            }
            Ok(Control::KeyUpdate { requested }) => {
                let rekey = p.as_ref().and_then(|p| p.rekey.get());
                let mut keys = match rekey.map(danger::lock_keys) {
                    Some(None) => return reset(fd, p.as_deref(), danger::KEYS_STUCK),
                    Some(g) => g,
                    None => None,
                };
                if let Err(why) =
                    follow_key_update(fd, p.as_deref(), keys.as_deref_mut(), requested)
                {
                    return reset(fd, p.as_deref(), &why);
                }
                drop(keys);
                // SAFETY: as for Retry below.
                unsafe {
                    (*msg).msg_controllen = controllen;
                    (*msg).msg_flags = 0;
                }
                let r = again();
                if r < 0 {
                    return after_read_error(fd, r, again);
                }
                if r == 0 {
                    return super::ending::after_eof(fd);
                }
                // SAFETY: the kernel just filled the program's msghdr.
                match unsafe { ktls::control_record_in(msg) } {
                    Some(t) => (got_n, ty) = (r, t),
                    None => return r,
                }
            }
            Ok(Control::Reset(why)) => return reset(fd, p.as_deref(), why),
            Err(_) => return reset(fd, p.as_deref(), "control record could not be read whole"),
        }
    }
    guard::set_errno(libc::ECONNRESET);
    -1
}

fn reset(fd: RawFd, p: Option<&crate::fd_table::Protected>, why: &str) -> isize {
    let peer = p.and_then(|p| p.peer.as_ref()).map(|v| v.id().to_string());
    log::Line::new("read")
        .kv("fd", fd)
        .kv("peer_id", peer.unwrap_or_default())
        .kv("reason", why)
        .emit();
    guard::set_errno(libc::ECONNRESET);
    -1
}

/// Read the rest of a control record the program's buffer cut short, onto `body`.
fn complete(fd: RawFd, ty: u8, body: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        let missing = ktls::control_bytes_missing(ty, body)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EPROTO))?;
        if missing == 0 {
            return Ok(());
        }
        let at = body.len();
        body.resize(at + missing, 0);
        ktls::finish_control_record(fd, ty, &mut body[at..])?;
    }
}

/// The first `n` bytes the kernel wrote into a msghdr's iovecs.
///
/// # Safety
/// `msg`'s iovecs are valid and hold at least `n` written bytes in order.
unsafe fn gather(msg: *const libc::msghdr, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    // SAFETY: per the contract, msg_iov points at msg_iovlen iovecs.
    let iovs = unsafe { std::slice::from_raw_parts((*msg).msg_iov, (*msg).msg_iovlen) };
    for v in iovs {
        let take = (n - out.len()).min(v.iov_len);
        // SAFETY: the kernel wrote these bytes into this iovec.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), take) });
        if out.len() == n {
            break;
        }
    }
    out
}
