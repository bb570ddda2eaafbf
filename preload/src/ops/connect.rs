//! Outbound: connect(2) to a protected destination.

use std::os::fd::RawFd;

use libc::{c_int, sockaddr, socklen_t};
use tether_proto::Mode;
use tether_proto::policy::DefaultAction;

use super::protect::{self, Failure};
use crate::fd_table::{self, DataPath, Direction};
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
    if !net::is_tcp_stream(fd) || is_protected(fd) {
        return Outcome::PassThrough;
    }
    // Rules see both the address as written and where the kernel will connect it.
    let (written, dest) = (dest, effective_destination(fd, dest));
    // One read of each clock per stretch of work between waits (see `clock`).
    let _burst = crate::clock::Burst::begin();
    let ident = match identity::current() {
        Ok(i) => i,
        Err(e) => {
            // No identity, but tetherd's policy may say this destination is not protected.
            let policy = identity::policy_without_identity(&e);
            if policy.is_some_and(|p| p.outbound_rule_reaching(written, dest).is_none() && p.default != DefaultAction::Deny) {
                return Outcome::PassThrough;
            }
            let f = Failure::NoIdentity(e);
            protect::log_failure(Direction::Outbound, None, dest, &f);
            return Outcome::Fail(-1, f.errno());
        }
    };
    let Some(rule) = ident.policy.outbound_rule_reaching(written, dest) else {
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
    match protect::protect(fd, Direction::Outbound, &ident, rule.into(), local, dest) {
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

/// Is `fd` a connection tether protects (kTLS or relayed)? Its connect is the kernel's to
/// answer (`EISCONN`; a relayed fd is a socketpair end and not a TCP socket anyway). A
/// *plaintext* entry (observe mode, a permissive port's plain client, an observe connect that
/// failed) is not: that socket can be connected again, after `connect(AF_UNSPEC)` or a failed
/// non-blocking connect, and the new destination gets its own decision.
fn is_protected(fd: RawFd) -> bool {
    fd_table::get(fd).is_some_and(|p| !matches!(p.path, DataPath::Plaintext))
}

/// Where the kernel will really connect `dest` to. An unspecified address is not refused by
/// Linux: IPv4 `0.0.0.0` (also as `::ffff:0.0.0.0`) goes to the socket's bound source address,
/// or to 127.0.0.1 when it has none; IPv6 `::` goes to `::1` (`tcp_v6_connect`). The policy must
/// see that address, or a rule for 127.0.0.1 or `::1` is bypassed by `0.0.0.0` or `[::]`.
fn effective_destination(fd: RawFd, dest: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let v4 = match dest {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
    };
    match v4 {
        Some(ip) if ip.is_unspecified() => {
            let bound = net::local_addr(fd).and_then(|l| match l.ip() {
                IpAddr::V4(b) => Some(b),
                IpAddr::V6(b) => b.to_ipv4_mapped(),
            });
            let to = bound.filter(|b| !b.is_unspecified()).unwrap_or(Ipv4Addr::LOCALHOST);
            SocketAddr::new(IpAddr::V4(to), dest.port())
        }
        Some(_) => dest,
        None if dest.ip().is_unspecified() => {
            // A socket bound to a v4-mapped address goes to ::ffff:127.0.0.1.
            let mapped = net::local_addr(fd).is_some_and(|l| matches!(l.ip(), IpAddr::V6(b) if b.to_ipv4_mapped().is_some()));
            let to = if mapped { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) };
            SocketAddr::new(to, dest.port())
        }
        None => dest,
    }
}
