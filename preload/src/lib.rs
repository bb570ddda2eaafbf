//! libtether.so: transparent mutual TLS for unmodified programs.
//!
//! Loaded with `LD_PRELOAD`, it interposes `connect`, `accept`/`accept4` and the calls that
//! keep its per-fd table true (close, dup, fcntl, fork) plus the read family's kTLS slow path.
//! When tetherd's policy protects a connection it runs a mutual TLS 1.3 handshake with the
//! process's own SPIFFE SVID, checks the peer's SPIFFE ID, and installs the session keys in
//! the kernel (kTLS) on the same fd, or hands the connection to a userspace relay when the
//! kernel has no kTLS. The program keeps reading and writing plaintext.
//!
//! Layers (after socket_wrapper): [`exports`] only guards; [`ops`] decides; [`real`] calls
//! libc. FFI lives in [`real`], [`sys`], [`guard`], [`fallback`] and [`exports`].

// reason: in the unit-test build the exports (every code path's root) are compiled out, so
// everything they reach looks dead; the cdylib build keeps the lint.
#![cfg_attr(test, allow(dead_code))]

mod clock;
mod fd_table;
mod fallback;
mod fork;
mod guard;
mod identity;
mod log;
mod ops;
mod real;
mod report;
mod settings;
mod sync;
mod sys;
mod tls;

#[cfg(not(test))]
mod exports;

use std::sync::Once;

static INIT: Once = Once::new();

/// One-time setup. Runs from the ELF constructor, or from the first hooked call if that comes
/// earlier (another library's constructor may connect before ours runs).
pub(crate) fn ensure_init() {
    if INIT.is_completed() {
        return;
    }
    guard::internal(|| {
        INIT.call_once(|| {
            let _ = settings::get();
            fork::register();
        });
    });
}

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = {
    extern "C" fn init() {
        ensure_init();
    }
    init
};

/// The ELF destructor, run by `exit()` (from any thread) after the program's atexit handlers:
/// lets the userspace relay deliver what the program wrote before the process dies
/// ([`fallback::at_exit`], bounded), and ends kTLS connections cleanly ([`ops::ending::at_exit`]).
#[cfg(not(test))]
#[used]
#[link_section = ".fini_array"]
static DESTRUCTOR: extern "C" fn() = {
    extern "C" fn fini() {
        let saved = guard::errno();
        guard::internal(|| {
            let _ = std::panic::catch_unwind(fallback::at_exit);
            let _ = std::panic::catch_unwind(ops::ending::at_exit);
        });
        guard::set_errno(saved);
    }
    fini
};
