//! Inbound: accept(2)/accept4(2) on a protected port.
//!
//! A client that fails the handshake (garbage, a bad or unlisted SVID, silence past the
//! timeout) is closed and the real accept is called again, so the program only ever sees
//! verified connections: a blocking listener keeps waiting for the next client, and a
//! non-blocking one gets the kernel's own EAGAIN when the backlog is empty.

use std::os::fd::RawFd;
use std::time::Instant;

use libc::{c_int, sockaddr, socklen_t};
use tether_proto::Mode;

use super::protect::{self, Failure};
use crate::fd_table::{self, Direction};
use crate::guard::Outcome;
use crate::sys::net;
use crate::{identity, log, settings};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// # Safety
/// Arguments as passed to accept4(2); `flags` is `None` for accept(2).
pub(crate) unsafe fn accept(
    lfd: RawFd,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: Option<c_int>,
) -> Outcome<c_int> {
    if settings::get().disabled {
        return Outcome::PassThrough;
    }
    loop {
        // SAFETY: forwarded from the caller.
        let fd = unsafe {
            match flags {
                Some(f) => crate::real::accept4(lfd, addr, len, f),
                None => crate::real::accept(lfd, addr, len),
            }
        };
        if fd < 0 {
            return Outcome::Fail(-1, crate::guard::errno());
        }
        match decide(fd) {
            Decision::Deliver => return Outcome::Done(fd),
            Decision::Drop => {
                // SAFETY: `fd` is the connection we just accepted and have not handed out.
                unsafe { crate::real::close(fd) };
            }
        }
    }
}

enum Decision {
    Deliver,
    Drop,
}

fn decide(fd: RawFd) -> Decision {
    if !net::is_tcp(fd) {
        return Decision::Deliver;
    }
    let (Some(local), Some(remote)) = (net::local_addr(fd), net::peer_addr(fd)) else {
        return Decision::Deliver;
    };
    let ident = match identity::current() {
        Ok(i) => i,
        Err(e) => {
            // Without a policy we cannot know whether this port is protected: refuse.
            protect::log_failure(Direction::Inbound, None, remote, &Failure::NoIdentity(e));
            net::kill(fd);
            return Decision::Drop;
        }
    };
    let Some(rule) = ident.policy.inbound_rule(local.port()) else {
        return Decision::Deliver;
    };
    match rule.mode {
        Mode::Observe => {
            log::Line::new("accept")
                .kv("decision", "observe")
                .kv("local_id", &ident.id)
                .kv("peer", remote)
                .kv("reason", "rule would require mutual TLS; observe mode lets plaintext through")
                .emit();
            protect::track_plaintext(fd, Direction::Inbound, &ident, local, remote, "observe");
            return Decision::Deliver;
        }
        Mode::Permissive => {
            let deadline = Instant::now() + settings::get().handshake_timeout;
            match net::peek_first_byte(fd, deadline) {
                Ok(Some(TLS_HANDSHAKE)) => {}
                Ok(_) | Err(_) => {
                    log::Line::new("accept")
                        .kv("decision", "plaintext")
                        .kv("local_id", &ident.id)
                        .kv("peer", remote)
                        .kv("reason", "permissive mode: client did not start TLS")
                        .emit();
                    protect::track_plaintext(fd, Direction::Inbound, &ident, local, remote, "plaintext");
                    return Decision::Deliver;
                }
            }
        }
        _ => {}
    }
    match protect::protect(fd, Direction::Inbound, &ident, &rule.allow, local, remote) {
        Ok(p) => {
            fd_table::insert(fd, p);
            Decision::Deliver
        }
        Err(f) => {
            protect::log_failure(Direction::Inbound, Some(&ident), remote, &f);
            Decision::Drop
        }
    }
}
