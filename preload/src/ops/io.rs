//! The read family's slow path, for kTLS sockets only.
//!
//! A control record (alert, NewSessionTicket, KeyUpdate) makes a plain read on a kTLS socket
//! fail with EIO. Exports call the real function first and come here only when it failed with
//! EIO and the fd is a kTLS connection of ours: one branch on the fast path.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use crate::fd_table::{self, DataPath};
use crate::guard;
use crate::log;
use crate::sys::ktls::{self, Control};

/// Control records we will skip in a row before calling the stream broken.
const MAX_SKIPPED: usize = 64;

/// What the export should return after `first` (the real call's result) failed.
/// `again` repeats the program's original call.
pub(crate) fn after_read_error(fd: RawFd, first: isize, again: &mut dyn FnMut() -> isize) -> isize {
    let e = guard::errno();
    if e != libc::EIO {
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
    for _ in 0..MAX_SKIPPED {
        match ktls::handle_control_record(fd) {
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
            Ok(Control::Reset(why)) => {
                let peer = p.as_ref().and_then(|p| p.peer.as_ref()).map(|v| v.id().to_string());
                log::Line::new("read").kv("fd", fd).kv("peer_id", peer.unwrap_or_default()).kv("reason", why).emit();
                guard::set_errno(libc::ECONNRESET);
                return -1;
            }
            Err(err) => {
                guard::set_errno(err.raw_os_error().unwrap_or(libc::EIO));
                return -1;
            }
        }
    }
    guard::set_errno(libc::ECONNRESET);
    -1
}
