//! The exit flush (`fallback::at_exit`): the exiting thread drives every connection itself, with
//! the relay's `STATE` held (the relay thread is parked on it), until what the program wrote is
//! sealed and on its way, or the deadline passes.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::super::sys;
use super::{Relay, Turn};

impl Relay {
    /// Drain every connection's program bytes to TCP; end the streams this process alone holds
    /// (`close_notify`, then FIN) and wait for the peer's end: a socket closed by our exit
    /// answers anything that arrives after it (a TLS 1.3 server's session tickets, which it
    /// sends once it has our Finished, often after we are gone; its reply; its close_notify)
    /// with a reset, and a reset makes the peer's kernel drop what its program has not read
    /// yet (seen on the host: a peer read 0 of 512 KiB it had acknowledged). Returns by
    /// `deadline` at the latest (each wait is a `poll` bounded by it; a turn reads at most a
    /// budget of chunks).
    pub(in super::super) fn flush_at_exit(&mut self, deadline: Instant) {
        // Connections adopted but not picked up yet, then readiness: the relay thread may
        // have consumed edges we will not see again, so assume everything is ready (EAGAIN
        // clears a flag that was wrong).
        self.welcome();
        for state in self.links.values_mut() {
            state.note(u32::MAX, false);
            state.note((libc::EPOLLIN | libc::EPOLLOUT) as u32, true);
        }
        let mut todo: Vec<u64> = self.links.keys().copied().collect();
        while !todo.is_empty() {
            let mut again = Vec::new();
            // (id, fd, is the program's end, events)
            let mut waits: Vec<(u64, RawFd, bool, libc::c_short)> = Vec::new();
            for id in todo {
                while self.drive(id) == Turn::Busy {
                    if Instant::now() >= deadline {
                        return;
                    }
                }
                // Gone: both directions finished, or failed (retired, sockets shut down).
                let Some(state) = self.links.get_mut(&id) else { continue };
                if state.tls.wants_write() && !state.tcp_writable {
                    waits.push((id, state.tcp, false, libc::POLLOUT));
                } else if state.tx_done {
                    // Our end is on the wire: wait for the peer's (it has read everything).
                    waits.push((id, state.tcp, false, libc::POLLIN | libc::POLLRDHUP));
                    if !state.app_writable {
                        waits.push((id, state.app, true, libc::POLLOUT));
                    }
                } else if !state.app_eof && !state.app_readable {
                    // The program's bytes are all sealed. Its exit closes our copies of its end:
                    // if nobody else may hold one, that is its EOF, and the stream ends.
                    if !state.stats.shared.load(Ordering::Relaxed) {
                        state.end_program_stream();
                        again.push(id);
                    }
                }
            }
            if waits.is_empty() {
                todo = again;
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            let mut fds: Vec<libc::pollfd> =
                waits.iter().map(|&(_, fd, _, events)| libc::pollfd { fd, events, revents: 0 }).collect();
            sys::poll(&mut fds, ms);
            for (&(id, _, app, _), pfd) in waits.iter().zip(&fds) {
                if let Some(state) = self.links.get_mut(&id) {
                    state.note(u32::from(pfd.revents as u16), app);
                }
                if !again.contains(&id) {
                    again.push(id);
                }
            }
            todo = again;
        }
    }
}
