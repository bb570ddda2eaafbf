//! Locks that survive fork.
//!
//! parking_lot keeps its waiters in a process-wide table. A lock that another thread was
//! waiting for at fork still lists that (non-existent) thread in the child, and unlocking it
//! there may hand the lock to the ghost: the child then blocks forever (seen with postgres under
//! pgbench -C). std's locks are a futex word and nothing else, so releasing a guard in the
//! child simply unlocks. Every lock the fork handlers take is one of these; a poisoned lock is
//! used as is (a panic in a hook already failed that call closed).
//!
//! [`Lock::hold_for_fork`] (or [`hold`] with a guard already taken) parks a guard in a
//! thread-local stack (the fork handlers run on the forking thread); [`release_fork_locks`]
//! drops them, newest first.

use std::any::Any;
use std::cell::RefCell;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, RwLockReadGuard, RwLockWriteGuard, TryLockError, WaitTimeoutResult};
use std::time::Duration;

thread_local! {
    static HELD: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// Keep `guard` (a lock guard taken in atfork prepare) until [`release_fork_locks`].
pub(crate) fn hold<G: 'static>(guard: G) {
    let _ = HELD.try_with(|h| h.borrow_mut().push(Box::new(guard)));
}

/// Drop every guard taken by `hold_for_fork` on this thread, in reverse order.
pub(crate) fn release_fork_locks() {
    let _ = HELD.try_with(|h| {
        let mut h = h.borrow_mut();
        while let Some(g) = h.pop() {
            drop(g);
        }
    });
}

/// Start one of tether's own threads: its guard is set for life (every hook its code lands on
/// passes straight to libc, see `guard`), and every signal is blocked. The mask is set on the calling
/// thread around the spawn, so the new thread inherits it and no signal can land in between;
/// glibc keeps its own internal signals (cancellation, setxid) unblockable. A program's handler
/// then never runs on a thread of ours, where the guard is set for good (its calls would go
/// straight to libc: a connect there would be plaintext) and where it could interrupt our locks.
pub(crate) fn spawn_thread<F, T>(name: &str, stack: usize, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointers; pthread_sigmask changes only this thread's mask.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
    }
    let spawned = std::thread::Builder::new().name(name.into()).stack_size(stack).spawn(move || {
        crate::guard::mark_internal_thread();
        f()
    });
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}

/// A mutex (std, poison ignored).
#[derive(Debug, Default)]
pub(crate) struct Lock<T>(Mutex<T>);

impl<T: 'static> Lock<T> {
    pub(crate) const fn new(v: T) -> Self {
        Self(Mutex::new(v))
    }

    /// Take the lock. If another thread held it, this one waited (perhaps across that thread's
    /// broker round trip): the clock burst's read ends there (`crate::clock`).
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        match self.0.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
                crate::clock::waited();
                g
            }
        }
    }

    /// Take the lock until [`release_fork_locks`] (atfork prepare).
    pub(crate) fn hold_for_fork(&'static self) {
        hold(self.lock());
    }

    /// Wait on `cv` for at most `dur` (see [`Condvar::wait_timeout`]).
    pub(crate) fn wait_timeout<'a>(&'a self, cv: &Condvar, g: MutexGuard<'a, T>, dur: Duration) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        cv.wait_timeout(g, dur).unwrap_or_else(PoisonError::into_inner)
    }
}

/// A reader-writer lock (std, poison ignored).
#[derive(Debug, Default)]
pub(crate) struct RwLock<T>(std::sync::RwLock<T>);

impl<T: 'static> RwLock<T> {
    pub(crate) const fn new(v: T) -> Self {
        Self(std::sync::RwLock::new(v))
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail by panicking
    use super::*;
    use std::sync::{mpsc, Arc};

    /// A thread that waited for a lock another thread held (across a broker round trip, say) must
    /// not go on with a clock read from before the wait; an uncontended lock keeps the read.
    #[test]
    fn a_contended_lock_ends_the_clock_burst() {
        let lock = Arc::new(Lock::new(()));
        let _burst = crate::clock::Burst::begin();
        let before = crate::clock::mono();
        drop(lock.lock());
        assert_eq!(crate::clock::mono(), before, "an uncontended lock is not a wait");

        let (held, wait_held) = mpsc::channel();
        let holder = {
            let lock = Arc::clone(&lock);
            std::thread::spawn(move || {
                let _g = lock.lock();
                held.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            })
        };
        wait_held.recv().unwrap();
        drop(lock.lock());
        holder.join().unwrap();
        assert!(
            crate::clock::mono() >= before + Duration::from_millis(20),
            "the read after waiting for the lock is fresh"
        );
    }
}
