//! kTLS connections the program has closed while the peer was still sending.
//!
//! A close with bytes queued for reading, or with bytes arriving after it (a TLS 1.3 server's
//! session tickets reach a client that only writes after its last call), makes the kernel
//! answer with a reset: it throws away what it had not sent yet and the peer's kernel drops
//! what its program had not read. So a write-then-close client loses the end of its stream
//! (UML 7.2: 5 of 51 rounds of `exit_flush.rs` on an Intel host). Instead, the close of a
//! connection's last holder sends close_notify and a FIN (`shutdown(SHUT_WR)`), and if the
//! peer has not finished, keeps a copy of the socket here, one the program never sees (spared
//! from its `close`, `close_range` and `dup2` like the relay's own fds). What arrives on it is
//! read and dropped until the peer's FIN, and then it is closed: by a "tether-linger" thread that
//! sweeps every [`SWEEP_EVERY`] while any copy is kept (and, once none has been for
//! [`IDLE_AFTER`] sweeps, waits on a condition variable until one is kept again: it is started
//! once per process, not once per close, which in UML cost ~13 system calls and a thread
//! creation on every client's close), at the
//! program's later protected closes, and at exit (with the other connections, within
//! `TETHER_EXIT_FLUSH_MS`). At most [`MAX`] are kept, each for at most [`LINGER`]; past either,
//! the oldest is closed as before. A sweep is non-blocking (one `poll` of all copies with timeout
//! 0, then a read where something arrived) and runs under the lock; copies are closed only after
//! they have left the set, so no sweep ever touches a number that could have been reused.
//!
//! Lock: `KEPT` is a leaf (15th in the fork order); nothing is closed while it is held. A
//! fork child closes its copies (no byte written): the parent still holds the sockets.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Condvar;
use std::time::{Duration, Instant};

use crate::sync::Lock;
use crate::sys::ktls;

/// How many closed connections may wait for their peer at once.
const MAX: usize = 256;

/// How long a closed connection waits for its peer's end.
const LINGER: Duration = Duration::from_secs(10);

/// How often the linger thread sweeps while copies are kept.
const SWEEP_EVERY: Duration = Duration::from_millis(20);

/// After how many sweeps in a row with nothing kept the linger thread waits for `keep` instead
/// (100 ms): a program closing connections more often than that costs it one sleep per sweep
/// and no wake-ups; one closing them rarely, five sleeps and one wake-up per close.
const IDLE_AFTER: u32 = 5;

/// How long the idle linger thread waits before looking again (a bound, in case a wake-up were
/// ever missed; `keep` wakes it).
const IDLE_WAIT: Duration = Duration::from_secs(30);

/// Is the linger thread running (or being started)?
static SWEEPER: AtomicBool = AtomicBool::new(false);
/// Is the linger thread waiting on [`KEPT_AGAIN`] (nothing kept)? Set and cleared under `KEPT`.
static IDLE: AtomicBool = AtomicBool::new(false);
/// Signalled by `keep` when the linger thread is idle.
static KEPT_AGAIN: Condvar = Condvar::new();

/// Our copies, with the time each is given up.
static KEPT: Lock<Vec<(RawFd, Instant)>> = Lock::new(Vec::new());
/// `KEPT`'s length, so the close hook's common case takes no lock.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// The program is closing `fd`, a kTLS connection's last holder, after our close_notify:
/// send the FIN now and, unless the peer's end is already here, keep a copy until it is.
pub(crate) fn keep(fd: RawFd) {
    // SAFETY: shutdown of the program's own socket, which it is closing.
    unsafe { crate::real::shutdown(fd, libc::SHUT_WR) };
    if !ktls::discard_incoming(fd) {
        return; // the peer's FIN is in: the close meets nothing
    }
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and touches no memory.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return; // out of descriptors: close as before
    }
    let (evicted, idle) = {
        let mut kept = KEPT.lock();
        kept.push((copy, Instant::now() + LINGER));
        let evicted = (kept.len() > MAX).then(|| kept.remove(0).0);
        COUNT.store(kept.len(), Ordering::Release);
        (evicted, IDLE.load(Ordering::Acquire))
    };
    if let Some(old) = evicted {
        close(old);
    }
    if idle {
        KEPT_AGAIN.notify_one();
    } else {
        ensure_sweeper();
    }
}

/// Start the linger thread unless it runs (once per process, and again in a fork child).
fn ensure_sweeper() {
    if SWEEPER.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = crate::sync::spawn_thread("tether-linger", 64 * 1024, || {
        let ran = std::panic::catch_unwind(|| {
            let mut empty = 0u32;
            loop {
                std::thread::sleep(SWEEP_EVERY);
                sweep();
                empty = if has_kept() { 0 } else { empty + 1 };
                if empty >= IDLE_AFTER {
                    wait_until_kept();
                    empty = 0;
                }
            }
        });
        if ran.is_err() {
            IDLE.store(false, Ordering::Release);
            SWEEPER.store(false, Ordering::Release);
        }
    });
    if spawned.is_err() {
        SWEEPER.store(false, Ordering::Release);
    }
}

/// The linger thread, between sweeps: return at once while copies are kept, else wait (without
/// waking up every [`SWEEP_EVERY`]) until `keep` keeps one. `IDLE` is set and the set checked
/// under `KEPT`, where `keep` adds its copy and reads `IDLE`: no wake-up is missed.
fn wait_until_kept() {
    let mut kept = KEPT.lock();
    while kept.is_empty() {
        IDLE.store(true, Ordering::Release);
        kept = KEPT.wait_timeout(&KEPT_AGAIN, kept, IDLE_WAIT).0;
    }
    IDLE.store(false, Ordering::Release);
}

/// Close every kept copy whose peer has ended (or whose time is up). Non-blocking: one `poll`
/// of them all, then a read only where something arrived.
pub(crate) fn sweep() {
    if COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let now = Instant::now();
    let done: Vec<RawFd> = {
        let mut kept = KEPT.lock();
        let mut polled: Vec<libc::pollfd> =
            kept.iter().map(|&(fd, _)| libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 }).collect();
        // SAFETY: a live array of `polled.len()` pollfds; timeout 0 never blocks.
        if unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) } < 0 {
            return;
        }
        let mut done = Vec::new();
        let mut i = 0;
        kept.retain(|&(fd, until)| {
            let ready = polled[i].revents != 0;
            i += 1;
            let open = until > now && (!ready || ktls::discard_incoming(fd));
            if !open {
                done.push(fd);
            }
            open
        });
        COUNT.store(kept.len(), Ordering::Release);
        done
    };
    done.into_iter().for_each(close);
}

/// Are any copies kept? (One atomic load.)
pub(crate) fn has_kept() -> bool {
    COUNT.load(Ordering::Acquire) != 0
}

/// Is `fd` one of our kept copies?
pub(crate) fn is_kept(fd: RawFd) -> bool {
    COUNT.load(Ordering::Acquire) != 0 && KEPT.lock().iter().any(|&(k, _)| k == fd)
}

/// The program wants the number `fd` (a `dup2` onto it): if it is one of our kept copies, close
/// it now (what arrives later may meet a reset, as before this module) and say so.
pub(crate) fn give_up(fd: RawFd) -> bool {
    if COUNT.load(Ordering::Acquire) == 0 {
        return false;
    }
    let found = {
        let mut kept = KEPT.lock();
        let before = kept.len();
        kept.retain(|&(k, _)| k != fd);
        COUNT.store(kept.len(), Ordering::Release);
        kept.len() != before
    };
    if found {
        close(fd);
    }
    found
}

/// Our kept copies' numbers (for `close_range`).
pub(crate) fn kept_fds() -> Vec<RawFd> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return Vec::new();
    }
    KEPT.lock().iter().map(|&(fd, _)| fd).collect()
}

/// At exit: hand every kept copy to the exit flush, which waits for them with the rest.
pub(crate) fn take_all() -> Vec<RawFd> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return Vec::new();
    }
    let mut kept = KEPT.lock();
    COUNT.store(0, Ordering::Release);
    kept.drain(..).map(|(fd, _)| fd).collect()
}

pub(crate) fn atfork_prepare() {
    KEPT.hold_for_fork();
}

/// In the fork child, with no lock held: close the child's copies (just the descriptors).
pub(crate) fn after_fork_child() {
    SWEEPER.store(false, Ordering::Release); // the parent's thread is not in the child
    IDLE.store(false, Ordering::Release);
    take_all().into_iter().for_each(close);
}

fn close(fd: RawFd) {
    // SAFETY: our own copy; nothing else refers to this number.
    unsafe { crate::real::close(fd) };
}
