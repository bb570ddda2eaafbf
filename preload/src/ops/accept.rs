//! Inbound: accept(2)/accept4(2).
//!
//! Unprotected ports pass straight through. On a protected port (a `mutual` or `permissive`
//! inbound rule) the program only ever receives connections whose handshake finished (see
//! [`super::inbound`]): on the accepting thread when the client keeps up, within a short bound,
//! else on a tether thread. A client that fails (garbage, a truncated hello, silence, a bad or
//! unlisted SVID) is logged and closed without the program seeing it or waiting for it beyond
//! that bound.

use std::os::fd::RawFd;

use libc::{c_int, sockaddr, socklen_t};
use tether_proto::Mode;

use super::inbound::{self, Next};
use super::protect::{self, Failure};
use crate::fd_table::{self, Direction};
use crate::guard::Outcome;
use crate::sys::net;
use crate::{identity, log, settings};

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
    // Unix and other non-inet listeners end here, with one syscall.
    let Some(local) = net::local_addr(lfd) else {
        return Outcome::PassThrough;
    };
    if !net::is_tcp_stream(lfd) {
        return Outcome::PassThrough;
    }
    // One read of each clock per stretch of work between waits (see `clock`).
    let _burst = crate::clock::Burst::begin();
    let ident = match identity::current() {
        Ok(i) => i,
        Err(e) => {
            // No identity, but tetherd's policy may say this port is not protected.
            if identity::policy_without_identity(&e).is_some_and(|p| p.inbound_rule(local.port()).is_none()) {
                return Outcome::PassThrough;
            }
            // Without a policy we cannot tell whether this port is protected: refuse the
            // connection rather than hand it over unchecked.
            // SAFETY: forwarded from the caller.
            let fd = unsafe { real_accept(lfd, addr, len, flags) };
            if fd < 0 {
                return Outcome::Fail(-1, crate::guard::errno());
            }
            let remote = net::peer_addr(fd).unwrap_or(local);
            protect::log_failure(Direction::Inbound, None, remote, &Failure::NoIdentity(e));
            net::kill(fd);
            // SAFETY: the connection we just accepted and never handed out.
            unsafe { crate::real::close(fd) };
            return Outcome::Fail(-1, libc::ECONNABORTED);
        }
    };
    let Some(rule) = ident.policy.inbound_rule(local.port()).cloned() else {
        return Outcome::PassThrough;
    };
    if rule.mode == Mode::Observe {
        // SAFETY: forwarded from the caller.
        let fd = unsafe { real_accept(lfd, addr, len, flags) };
        if fd < 0 {
            return Outcome::Fail(-1, crate::guard::errno());
        }
        let remote = net::peer_addr(fd).unwrap_or(local);
        log::Line::new("accept")
            .kv("decision", "observe")
            .kv("local_id", &ident.id)
            .kv("peer", remote)
            .kv("reason", "rule would require mutual TLS; observe mode lets plaintext through")
            .emit();
        protect::track_plaintext(fd, Direction::Inbound, &ident, net::local_addr(fd).unwrap_or(local), remote, "observe");
        return Outcome::Done(fd);
    }
    let blocking = net::status_flags(lfd) & libc::O_NONBLOCK == 0;
    let mut waited = false;
    loop {
        match inbound::step(lfd, &ident, &rule) {
            Next::Deliver { fd, peer, conn } => {
                // The program's accept4 flags apply to what it receives.
                let f = flags.unwrap_or(0);
                set_flags(fd, f & libc::SOCK_NONBLOCK != 0, f & libc::SOCK_CLOEXEC != 0);
                // SAFETY: the caller's out-parameters, as accept(2) fills them.
                unsafe { net::to_raw(peer, addr, len) };
                if let Some(c) = conn {
                    fd_table::insert(fd, c);
                }
                return Outcome::Done(fd);
            }
            Next::Error(e) => return Outcome::Fail(-1, e),
            Next::WouldBlock if blocking => inbound::wait(lfd),
            Next::WouldBlock => return Outcome::Fail(-1, libc::EAGAIN),
            // This process has all it may take from the backlog under way: wait for one of
            // its own handshakes (briefly, for a non-blocking listener).
            Next::Claimed if blocking || !waited => {
                inbound::wait_claimed(blocking);
                waited = true;
            }
            Next::Claimed => return Outcome::Fail(-1, libc::EAGAIN),
        }
    }
}

/// # Safety
/// As accept4(2).
unsafe fn real_accept(lfd: RawFd, addr: *mut sockaddr, len: *mut socklen_t, flags: Option<c_int>) -> c_int {
    // SAFETY: forwarded.
    let fd = unsafe {
        match flags {
            Some(f) => crate::real::accept4(lfd, addr, len, f),
            None => crate::real::accept(lfd, addr, len),
        }
    };
    // A blocking accept waited for a client.
    crate::clock::waited();
    fd
}

/// Give a delivered connection the program's accept4 flags. It has [`inbound::ACCEPTED`]
/// (non-blocking, close-on-exec), so only what differs is changed and nothing is read: its
/// one status flag is `O_NONBLOCK`, so clearing that is `F_SETFL` 0.
fn set_flags(fd: RawFd, nonblock: bool, cloexec: bool) {
    if nonblock != inbound::ACCEPTED.nonblocking {
        net::set_status_flags(fd, if nonblock { libc::O_NONBLOCK } else { 0 });
    }
    if cloexec != inbound::ACCEPTED.cloexec {
        // SAFETY: F_SETFD with an int argument.
        unsafe { crate::real::fcntl(fd, libc::F_SETFD, if cloexec { libc::FD_CLOEXEC as usize } else { 0 }) };
    }
}
