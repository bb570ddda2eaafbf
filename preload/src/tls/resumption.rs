//! TLS 1.3 resumption between tether peers.
//!
//! A full mutual handshake costs two signatures, two chain verifications and certificate
//! parsing on each side; a resumed one (PSK with ECDHE, RFC 8446 §2.2) skips all of them. What
//! keeps it as strict as a full handshake:
//!
//! - **Server tickets** are stateful (rustls's in-memory store: the ticket is a random id, the
//!   session never leaves the process) and single-use. The store belongs to one server config,
//!   and a config to one identity generation (SVID) and one policy generation (see
//!   `configs`): a reload or an SVID renewal builds new configs, so every older ticket is
//!   unknown from then on and the client falls back to a full handshake.
//! - The stored session keeps the peer's certificate chain; after a resumed handshake the
//!   peer is checked again ([`super::verify::verified_peer`]): its SPIFFE ID against the
//!   `allow` list in force now, and every certificate's validity at the current time, so a
//!   ticket never outlives the SVID it was issued to.
//! - **Client tickets** are kept per (destination address and port, local identity
//!   generation): the store ([`TetherSessions`]) belongs to the client config of one identity,
//!   and its key is the destination socket address. It only keeps tickets from destinations
//!   whose server proved an SVID of our *own* trust domain, i.e. one tetherd issued: those are
//!   tether peers (or programs holding a tetherd SVID). Servers of federated trust domains and
//!   anything else are never offered a ticket, and what they send is dropped.
//! - A peer that is not tether ignores what it does not use: an OpenSSL client stores or drops
//!   our ticket as it likes (resuming with it passes the same re-check), and an OpenSSL
//!   server's tickets are never kept.
//!
//! Off with `TETHER_RESUMPTION=0` (servers then send no ticket, clients offer none).

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::{DnsName, ServerName};
use rustls::NamedGroup;

/// Destinations remembered per client identity (each keeps at most rustls's 8 tickets).
const DESTINATIONS: usize = 1024;

/// The session-cache key for a destination: the address *and* port (rustls keys its cache by
/// server name; an IP-address name would let two services on one host share tickets). The
/// name is never sent (SNI is off) and our verifier ignores it.
pub(crate) fn destination_name(dest: SocketAddr) -> ServerName<'static> {
    let ip: String = match dest.ip() {
        IpAddr::V4(a) => a.octets().iter().map(|b| format!("{b:02x}")).collect(),
        IpAddr::V6(a) => a.octets().iter().map(|b| format!("{b:02x}")).collect(),
    };
    let name = format!("h{ip}.p{}.tether.invalid", dest.port());
    match DnsName::try_from(name) {
        Ok(n) => ServerName::DnsName(n),
        // Unreachable (hex and digits only); the address itself is a safe fallback.
        Err(_) => ServerName::IpAddress(dest.ip().into()),
    }
}

/// The client's ticket store for one local identity generation: tickets only from
/// destinations marked as tether peers.
pub(crate) struct TetherSessions {
    inner: Arc<ClientSessionMemoryCache>,
    /// Destinations whose last verified server held an SVID of our own trust domain.
    /// A std mutex, never held across a call. It is not in the fork lock order: a fork child
    /// never touches a store made before the fork ([`Self::owner`]).
    tether: Mutex<HashSet<ServerName<'static>>>,
    /// The process that made this store. A fork child gets new configs with its new identity,
    /// but a kTLS client connection it inherited still carries the parent's, and a session
    /// ticket read there would take this store's locks, which a parent thread may have held at
    /// the fork (the child would then wait forever). So in any other process the store is
    /// empty and drops what it is given.
    owner: i32,
}

impl fmt::Debug for TetherSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TetherSessions")
    }
}

impl TetherSessions {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(ClientSessionMemoryCache::new(DESTINATIONS)),
            tether: Mutex::new(HashSet::new()),
            owner: crate::fork::owner(),
        }
    }

    /// Is this the process that made the store? (An atomic load: the fork child sets its own.)
    fn ours(&self) -> bool {
        crate::fork::owner() == self.owner
    }

    fn is_tether(&self, name: &ServerName<'_>) -> bool {
        self.ours() && self.tether.lock().map(|s| s.contains(name)).unwrap_or(false)
    }

    /// After a handshake with `name` completed: whether its server is a tether peer. A
    /// destination that stops being one loses its tickets at once.
    pub(crate) fn mark(&self, name: &ServerName<'static>, tether: bool) {
        if !self.ours() {
            return;
        }
        let Ok(mut s) = self.tether.lock() else { return };
        if tether {
            if s.len() >= DESTINATIONS && !s.contains(name) {
                s.clear();
            }
            s.insert(name.clone());
        } else if s.remove(name) {
            drop(s);
            while self.inner.take_tls13_ticket(name).is_some() {}
        }
    }
}

impl ClientSessionStore for TetherSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        if self.ours() {
            self.inner.set_kx_hint(server_name, group);
        }
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.ours().then(|| self.inner.kx_hint(server_name)).flatten()
    }

    // TLS 1.2 is never negotiated (the configs are TLS 1.3 only).
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        if self.is_tether(&server_name) {
            self.inner.insert_tls13_ticket(server_name, value);
        }
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        if !self.is_tether(server_name) {
            return None;
        }
        self.inner.take_tls13_ticket(server_name)
    }
}

/// The NewSessionTicket messages of a post-handshake handshake record that arrived on a kTLS
/// socket (the read slow path consumed it): each goes to rustls's `KernelConnection`, which
/// stores it in the client config's [`TetherSessions`] (kept only for a tether destination). A
/// ticket rustls refuses is dropped; the connection is unaffected (on a server's key schedule,
/// where a ticket from the client is meaningless, it is ignored).
pub(crate) fn store_tickets(keys: &mut super::danger::KeySchedule, record: &[u8]) {
    for body in tickets(record) {
        keys.new_session_ticket(body);
    }
}

/// The bodies of the NewSessionTicket (type 4) messages in a handshake record.
fn tickets(mut rest: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || loop {
        let &[ty, a, b, c] = rest.get(..4)? else { return None };
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        let body = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        if ty == 4 {
            return Some(body);
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    #[test]
    fn destination_names_differ_by_port_and_family() {
        let a = destination_name("127.0.0.1:443".parse().unwrap());
        let b = destination_name("127.0.0.1:444".parse().unwrap());
        let c = destination_name("[::1]:443".parse().unwrap());
        assert!(matches!(a, ServerName::DnsName(_)));
        assert!(matches!(c, ServerName::DnsName(_)));
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn tickets_are_found_among_the_messages_of_a_record() {
        let rec = [4, 0, 0, 2, 0xaa, 0xbb, 24, 0, 0, 1, 0, 4, 0, 0, 1, 0xcc];
        let t: Vec<&[u8]> = tickets(&rec).collect();
        assert_eq!(t, [&[0xaa, 0xbb][..], &[0xcc][..]]);
        assert_eq!(tickets(&[4, 0, 0, 9, 1]).count(), 0, "a cut message yields nothing");
    }

    #[test]
    fn unmarked_destinations_get_no_tickets() {
        let s = TetherSessions::new();
        let n = destination_name("10.0.0.1:8443".parse().unwrap());
        assert!(s.take_tls13_ticket(&n).is_none());
        s.mark(&n, true);
        assert!(s.is_tether(&n));
        s.mark(&n, false);
        assert!(!s.is_tether(&n));
    }
}
