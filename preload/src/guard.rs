//! The exported layer's guard: re-entrancy, panics and errno.
//!
//! Every exported hook runs its logic through [`hook`]. While tether's own code runs on a
//! thread, that thread's flag is set, so any libc call our code makes that lands on one of our
//! own exports (std's `UnixStream::connect` resolves to the hooked `connect`, for instance)
//! goes straight to the real function. Every tether thread has the flag set for good (`sync::spawn_thread`).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    // `const` with a `Copy` type: no destructor is registered, so this stays readable while
    // other thread-locals are being destroyed (hooked calls do happen there).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// What the logic layer decided.
#[derive(Debug)]
pub(crate) enum Outcome<T> {
    /// Hand the call to the real libc function, untouched.
    PassThrough,
    /// We handled it: return this value with errno preserved from before the call.
    Done(T),
    /// We handled it and it failed: return `T` (-1 / NULL style) with this errno.
    Fail(T, i32),
}

/// Run a hook. `logic` decides; `real` is the libc function. `on_panic` is what the caller sees
/// if `logic` panics: callers that might have touched a protected connection fail closed.
#[inline]
pub(crate) fn hook<T>(
    logic: impl FnOnce() -> Outcome<T>,
    real: impl FnOnce() -> T,
    on_panic: impl FnOnce() -> (T, i32),
) -> T {
    hook_if(crate::fork::shim_has_state, logic, real, on_panic)
}

/// [`hook`] for a call whose logic can change shim state only when `touches` says so (no
/// syscall: a table or atomic lookup, such as "is this fd in the table or one of ours"). The
/// vfork check (one getpid) is made only then; otherwise the logic changes nothing, so running
/// it in a vfork child is harmless.
#[inline]
pub(crate) fn hook_if<T>(
    touches: impl FnOnce() -> bool,
    logic: impl FnOnce() -> Outcome<T>,
    real: impl FnOnce() -> T,
    on_panic: impl FnOnce() -> (T, i32),
) -> T {
    if inside() {
        // Re-entered from our own code, or thread-locals are gone: be invisible. (No vfork check
        // needed: either way the call goes straight to libc and nothing is changed.)
        return real();
    }
    // A vfork child runs in its parent's memory (these thread-locals included): it must change
    // nothing, so it does not even set the flag (see `crate::fork`).
    if touches() && crate::fork::in_vfork_child() {
        return real();
    }
    let entered = INSIDE.try_with(|f| !f.replace(true)).unwrap_or(false);
    if !entered {
        return real();
    }
    let saved = errno();
    let result = catch_unwind(AssertUnwindSafe(logic));
    let ret = match result {
        Ok(Outcome::PassThrough) => {
            set_errno(saved);
            // Keep the flag set while the real call runs? No: the real call is the program's
            // own I/O and must behave exactly as without us. Clear first.
            leave();
            return real();
        }
        Ok(Outcome::Done(v)) => {
            set_errno(saved);
            v
        }
        Ok(Outcome::Fail(v, e)) => {
            set_errno(e);
            v
        }
        Err(_) => {
            crate::log::raw("tether: internal panic in hook; failing the call closed");
            let (v, e) = on_panic();
            set_errno(e);
            v
        }
    };
    leave();
    ret
}

fn leave() {
    let _ = INSIDE.try_with(|f| f.set(false));
}

/// Is tether's own code running on this thread?
pub(crate) fn inside() -> bool {
    INSIDE.try_with(Cell::get).unwrap_or(true)
}

/// Mark the current thread as tether-internal for its whole life: every hook passes through.
pub(crate) fn mark_internal_thread() {
    let _ = INSIDE.try_with(|f| f.set(true));
}

/// Run `f` with the guard set (for code outside a hook, such as the constructor).
pub(crate) fn internal<R>(f: impl FnOnce() -> R) -> R {
    let was = INSIDE.try_with(|g| g.replace(true)).unwrap_or(true);
    let r = f();
    if !was {
        leave();
    }
    r
}

pub(crate) fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

pub(crate) fn set_errno(e: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e }
}
