//! Outbound: connect(2) to a protected destination.

use std::os::fd::RawFd;

use libc::{c_int, sockaddr, socklen_t};
use tether_proto::Mode;
use tether_proto::policy::DefaultAction;

use super::protect::{self, Failure};
use crate::fd_table::{self, Direction};
use crate::guard::Outcome;
use crate::sys::net;
use crate::{identity, log, settings};

/// # Safety
/// Arguments as passed to connect(2).
pub(crate) unsafe fn connect(fd: RawFd, addr: *const sockaddr, len: socklen_t) -> Outcome<c_int> {
    if settings::get().disabled {
        return Outcome::PassThrough;
    }
    // SAFETY: forwarded from the caller.
    let Some(dest) = (unsafe { net::from_raw(addr, len) }) else {
        return Outcome::PassThrough;
    };
    // An inet address: the socket is AF_INET/AF_INET6 (or the real connect fails anyway).
    if !net::is_tcp_stream(fd) || fd_table::get(fd).is_some() {
        return Outcome::PassThrough;
    }
    // One read of each clock per stretch of work between waits (see `clock`).
    let _burst = crate::clock::Burst::begin();
    let ident = match identity::current() {
        Ok(i) => i,
        Err(e) => {
            // No identity, but tetherd's policy may say this destination is not protected.
            let policy = identity::policy_without_identity(&e);
            if policy.is_some_and(|p| p.outbound_rule(dest).is_none() && p.default != DefaultAction::Deny) {
                return Outcome::PassThrough;
            }
            let f = Failure::NoIdentity(e);
            protect::log_failure(Direction::Outbound, None, dest, &f);
            return Outcome::Fail(-1, f.errno());
        }
    };
    let Some(rule) = ident.policy.outbound_rule(dest) else {
        if ident.policy.default == DefaultAction::Deny {
            let f = Failure::DeniedByDefault;
            protect::log_failure(Direction::Outbound, Some(&ident), dest, &f);
            return Outcome::Fail(-1, f.errno());
        }
        return Outcome::PassThrough;
    };
    if rule.mode == Mode::Observe {
        log::Line::new("connect")
            .kv("decision", "observe")
            .kv("local_id", &ident.id)
            .kv("peer", dest)
            .kv("reason", "rule would require mutual TLS; observe mode lets plaintext through")
            .emit();
        // SAFETY: forwarded from the caller.
        let rc = unsafe { crate::real::connect(fd, addr, len) };
        let e = crate::guard::errno();
        if rc == 0 || e == libc::EINPROGRESS {
            let local = net::local_addr(fd).unwrap_or(dest);
            protect::track_plaintext(fd, Direction::Outbound, &ident, local, dest, "observe");
        }
        return if rc == 0 { Outcome::Done(0) } else { Outcome::Fail(rc, e) };
    }
    // The real connect first; a non-blocking one is waited for, within the handshake budget.
    // SAFETY: forwarded from the caller.
    let rc = unsafe { crate::real::connect(fd, addr, len) };
    // A blocking connect waited for the peer's SYN-ACK.
    crate::clock::waited();
    if rc != 0 {
        let e = crate::guard::errno();
        if e != libc::EINPROGRESS && e != libc::EINTR {
            return Outcome::Fail(-1, e);
        }
        let deadline = crate::clock::mono() + settings::get().handshake_timeout;
        if let Err(err) = net::wait(fd, libc::POLLOUT, deadline) {
            let f = Failure::Connect(err.raw_os_error().unwrap_or(libc::ETIMEDOUT));
            protect::log_failure(Direction::Outbound, Some(&ident), dest, &f);
            net::kill(fd);
            return Outcome::Fail(-1, f.errno());
        }
        let so = net::so_error(fd);
        if so != 0 {
            return Outcome::Fail(-1, so);
        }
    }
    settings::get().fault("after-connect");
    let local = net::local_addr(fd).unwrap_or(dest);
    match protect::protect(fd, Direction::Outbound, &ident, &rule.allow, local, dest) {
        Ok(p) => {
            fd_table::insert(fd, p);
            Outcome::Done(0)
        }
        Err(f) => {
            protect::log_failure(Direction::Outbound, Some(&ident), dest, &f);
            Outcome::Fail(-1, f.errno())
        }
    }
}
