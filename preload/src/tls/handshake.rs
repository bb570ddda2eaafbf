//! The mutual-TLS 1.3 handshake on a program's socket.
//!
//! rustls is the protocol state machine; this driver feeds it **one TLS record at a time**
//! from an [`Inbox`] (one peek per flight, then one read of exactly the records rustls took),
//! so when the handshake completes nothing that followed it on the wire has been read out of
//! the kernel. That is what makes handing
//! the socket to kTLS safe: no application byte can be stranded in a userspace buffer.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::UnbufferedClientConnection;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::sign::CertifiedKey;
use rustls::{ClientConnection, Connection, ServerConnection};
use tether_proto::IdPattern;

use super::verify::{Refusal, TrustStore, VerifiedPeer};
use crate::identity::Identity;
use crate::settings;
use crate::sys::net::DeadlineIo;

/// TLS 1.3 ciphertext records are at most 2^14 + 256 bytes.
const MAX_CIPHERTEXT: usize = 16384 + 256;

/// The one crypto provider, chosen explicitly; never installed process-wide. ring's, with its
/// hello randoms from a per-thread buffer ([`super::random`]; key generation is ring's own).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    static RANDOM: super::random::Buffered = super::random::Buffered;
    P.get_or_init(|| Arc::new(CryptoProvider { secure_random: &RANDOM, ..rustls::crypto::ring::default_provider() }))
        .clone()
}

/// What the handshake needs from our identity.
pub(crate) struct Credentials {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) trust: Arc<TrustStore>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The peer's SVID was refused (bad chain, or not in `allow`).
    Refused(Refusal),
    /// The deadline passed.
    Timeout,
    /// The peer closed before the handshake finished.
    PeerClosed,
    /// The peer does not speak TLS (first bytes are not a TLS record).
    NotTls,
    Tls(rustls::Error),
    Io(io::Error),
    /// Inline at accept only: the peer's next records were not there within the [`Pause`]'s
    /// bound. Nothing unread was consumed; the [`ServerHandshake`] goes on from here elsewhere.
    Paused,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(r) => write!(f, "{r}"),
            Self::Timeout => f.write_str("handshake timed out"),
            Self::PeerClosed => f.write_str("peer closed the connection during the handshake"),
            Self::NotTls => f.write_str("peer is not speaking TLS"),
            Self::Tls(e) => write!(f, "TLS error: {e}"),
            Self::Io(e) => write!(f, "i/o error during handshake: {e}"),
            Self::Paused => f.write_str("handshake paused to finish on a worker"),
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ETIMEDOUT) => Self::Timeout,
            // The peer closed or reset the connection mid-handshake (a write then sees EPIPE):
            // one errno for it however the close is noticed.
            Some(libc::EPIPE | libc::ECONNRESET) => Self::PeerClosed,
            _ if e.kind() == io::ErrorKind::UnexpectedEof => Self::PeerClosed,
            _ => Self::Io(e),
        }
    }
}

/// Which data path the handshake is for: it picks the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// rustls's unbuffered API, whose connection turns into a kernel key schedule.
    Kernel,
    /// A buffered rustls connection for the userspace relay.
    Relay,
}

/// What a handshake produced for its data path.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "one per handshake, moved once into its data path; boxing buys nothing")]
pub(crate) enum Session {
    Kernel(Box<super::danger::HandOff>),
    Relay(Box<Connection>),
}

/// A completed handshake: the session and the peer it proved.
#[derive(Debug)]
pub(crate) struct Established {
    pub(crate) conn: Session,
    pub(crate) peer: VerifiedPeer,
    /// TLS 1.3 resumption: no certificates were exchanged.
    pub(crate) resumed: bool,
}

/// Client side: we connected to `dest`, which must prove an ID in `allow`.
pub(crate) fn client(
    io: &mut DeadlineIo,
    ident: &Arc<Identity>,
    allow: &[IdPattern],
    dest: SocketAddr,
    target: Target,
) -> Result<Established, HandshakeError> {
    // On the kTLS path the ticket reaches the kernel as a control record after the hand-over;
    // the read slow path gives it to the key schedule (`resumption::store_tickets`).
    let resume = settings::get().resumption;
    let side = super::configs::client(&provider(), ident, allow, resume).map_err(HandshakeError::Tls)?;
    let name = super::resumption::destination_name(dest);
    let mut inbox = Inbox::new();
    // Only a signing round trip to tetherd has time to hide the chain's verification in.
    let _deferral = ident.key_held_by_broker().then(super::deferred::scope);
    let r = match target {
        Target::Kernel => {
            let mut conn = UnbufferedClientConnection::new(side.config, name.clone()).map_err(HandshakeError::Tls)?;
            super::unbuffered::Driver::new()
                .drive(&mut conn, io, &mut inbox, false)
                .and_then(|()| super::unbuffered::into_kernel(conn))
                .map(|(k, peer)| (kernel_session(k), peer))
        }
        Target::Relay => {
            let mut conn = ClientConnection::new(side.config, name.clone()).map_err(HandshakeError::Tls)?;
            drive(&mut conn, io, &mut inbox, false).map(|()| {
                let peer = PeerChain::of(&conn);
                (Session::Relay(Box::new(Connection::Client(conn))), peer)
            })
        }
    };
    // The server's chain, if its verification was deferred and nothing settled it yet; a
    // failure is the handshake's error whatever else went wrong after it.
    let r = match super::deferred::settle() {
        Ok(()) => r,
        Err(e) => Err(HandshakeError::Tls(e)),
    };
    let est = finish(r, allow)?;
    // Only a server holding an SVID of our own trust domain (issued by tetherd) gets to give
    // us tickets, and only it is offered them.
    side.sessions.mark(&name, est.peer.id().trust_domain() == ident.id.trust_domain());
    Ok(est)
}

/// Server side: a client connected to us and must prove an ID in `allow`.
pub(crate) fn server(
    io: &mut DeadlineIo,
    ident: &Arc<Identity>,
    allow: &[IdPattern],
    target: Target,
) -> Result<Established, HandshakeError> {
    ServerHandshake::new(ident, allow, target)?.run(io, allow)
}

/// A server handshake that can stop between two records and go on later, on another thread:
/// accept starts it inline and hands it to a worker when the client's next flight is late
/// (`ops::inbound`). All its state is here (rustls's connection, the records not yet given to
/// it, what the socket's queue still holds for it), so nothing is lost at the hand-over.
pub(crate) struct ServerHandshake {
    side: ServerSide,
    inbox: Inbox,
}

enum ServerSide {
    Kernel(Box<UnbufferedServerConnection>, super::unbuffered::Driver),
    Relay(Box<ServerConnection>),
}

impl ServerHandshake {
    pub(crate) fn new(ident: &Arc<Identity>, allow: &[IdPattern], target: Target) -> Result<Self, HandshakeError> {
        let cfg = super::configs::server(&provider(), ident, allow, settings::get().resumption).map_err(HandshakeError::Tls)?;
        let side = match target {
            Target::Kernel => ServerSide::Kernel(
                Box::new(UnbufferedServerConnection::new(cfg).map_err(HandshakeError::Tls)?),
                super::unbuffered::Driver::new(),
            ),
            Target::Relay => ServerSide::Relay(Box::new(ServerConnection::new(cfg).map_err(HandshakeError::Tls)?)),
        };
        Ok(Self { side, inbox: Inbox::new() })
    }

    /// Drive the handshake to its end (the deadline is `io`'s).
    pub(crate) fn run(mut self, io: &mut DeadlineIo, allow: &[IdPattern]) -> Result<Established, HandshakeError> {
        self.inbox.pause = None;
        let r = self.drive(io);
        self.finish(r, allow)
    }

    /// Drive the handshake while the peer keeps up: every wait for its records is bounded by
    /// `pause`, and when one runs out (or `pause` yields) the handshake stops, resumable.
    pub(crate) fn run_inline(mut self, io: &mut DeadlineIo, allow: &[IdPattern], pause: &mut Pause) -> Inline {
        self.inbox.pause = Some(std::mem::take(pause));
        let r = self.drive(io);
        *pause = self.inbox.pause.take().unwrap_or_default();
        match r {
            Err(HandshakeError::Paused) => Inline::Paused(Box::new(self)),
            r => Inline::Done(self.finish(r, allow)),
        }
    }

    fn drive(&mut self, io: &mut DeadlineIo) -> Result<(), HandshakeError> {
        match &mut self.side {
            ServerSide::Kernel(conn, d) => d.drive(&mut **conn, io, &mut self.inbox, true),
            ServerSide::Relay(conn) => drive(conn, io, &mut self.inbox, true),
        }
    }

    fn finish(self, r: Result<(), HandshakeError>, allow: &[IdPattern]) -> Result<Established, HandshakeError> {
        let r = r.and_then(|()| match self.side {
            ServerSide::Kernel(conn, _) => super::unbuffered::into_kernel(*conn).map(|(k, peer)| (kernel_session(k), peer)),
            ServerSide::Relay(conn) => {
                let peer = PeerChain::of(&conn);
                Ok((Session::Relay(Box::new(Connection::Server(*conn))), peer))
            }
        });
        finish(r, allow)
    }
}

/// Where [`ServerHandshake::run_inline`] got to.
pub(crate) enum Inline {
    Done(Result<Established, HandshakeError>),
    /// Stopped before a record of the peer's that is not here yet; go on with `run`.
    Paused(Box<ServerHandshake>),
}

/// How long an inline handshake may wait for its peer, and what else cuts the wait short.
#[derive(Debug)]
pub(crate) struct Pause {
    /// The most the handshake may wait for the peer's records, all waits together.
    pub(crate) bound: Duration,
    /// A descriptor (the listener) whose readiness ends a wait at once: other work is queued.
    pub(crate) yield_to: RawFd,
    /// Time spent waiting so far.
    pub(crate) waited: Duration,
}

impl Default for Pause {
    fn default() -> Self {
        Self { bound: Duration::ZERO, yield_to: -1, waited: Duration::ZERO }
    }
}

impl Pause {
    /// Peek what is queued on `fd`, first waiting (within the bound) if `wait_first` or if
    /// nothing is.
    fn peek(&mut self, fd: RawFd, buf: &mut [u8], mut wait_first: bool) -> Result<usize, HandshakeError> {
        loop {
            if wait_first {
                self.wait(fd)?;
            }
            // SAFETY: `buf` is a valid writable buffer; never blocks.
            let n = unsafe {
                crate::real::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            match crate::guard::errno() {
                libc::EAGAIN => wait_first = true,
                libc::EINTR => {}
                e => return Err(HandshakeError::from(io::Error::from_raw_os_error(e))),
            }
        }
    }

    /// Wait until `fd` is readable; [`HandshakeError::Paused`] when the bound is spent or
    /// `yield_to` is readable first.
    pub(crate) fn wait(&mut self, fd: RawFd) -> Result<(), HandshakeError> {
        loop {
            let left = self.bound.saturating_sub(self.waited);
            if left.is_zero() {
                return Err(HandshakeError::Paused);
            }
            let mut fds = [
                libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.yield_to, events: libc::POLLIN, revents: 0 },
            ];
            let ts = libc::timespec { tv_sec: left.as_secs() as libc::time_t, tv_nsec: left.subsec_nanos().into() };
            let t0 = crate::clock::mono();
            // SAFETY: two valid pollfds (a negative fd is ignored), a valid timespec, no sigmask.
            let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
            crate::clock::waited();
            self.waited += crate::clock::mono().saturating_duration_since(t0);
            if rc < 0 {
                match crate::guard::errno() {
                    libc::EINTR => continue,
                    e => return Err(HandshakeError::from(io::Error::from_raw_os_error(e))),
                }
            }
            // The peer first: when its records are here, finishing costs no more waiting.
            if fds[0].revents != 0 {
                return Ok(());
            }
            if fds[1].revents & libc::POLLIN != 0 {
                return Err(HandshakeError::Paused);
            }
        }
    }
}

/// What a completed handshake knows of its peer, taken before the connection is handed over.
#[derive(Debug)]
pub(crate) struct PeerChain {
    chain: Option<Vec<CertificateDer<'static>>>,
    resumed: bool,
}

impl PeerChain {
    pub(crate) fn of(c: &rustls::CommonState) -> Self {
        Self {
            chain: c.peer_certificates().map(<[_]>::to_vec),
            resumed: c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

fn kernel_session((secrets, keys): (rustls::ExtractedSecrets, super::danger::KeySchedule)) -> Session {
    Session::Kernel(Box::new(super::danger::HandOff { secrets, keys }))
}

fn finish(r: Result<(Session, PeerChain), HandshakeError>, allow: &[IdPattern]) -> Result<Established, HandshakeError> {
    let (conn, chain) = r.map_err(|e| match &e {
        HandshakeError::Tls(t) => super::verify::refusal_of(t).map_or(e, HandshakeError::Refused),
        _ => e,
    })?;
    // A resumed handshake ran no verifier: this is where its peer is checked against the
    // policy in force and its certificates' expiry (for a full one it repeats the verifier's
    // allow and validity checks).
    let peer = super::verify::verified_peer(chain.chain.as_deref(), allow, crate::clock::unix_time())
        .map_err(HandshakeError::Refused)?;
    Ok(Established { conn, peer, resumed: chain.resumed })
}

/// Run the handshake to completion, one record at a time, flushing everything we owe.
fn drive<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    io: &mut DeadlineIo,
    inbox: &mut Inbox,
    quickack: bool,
) -> Result<(), HandshakeError> {
    let mut flight = Vec::with_capacity(4096);
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut flight)?;
        }
        if !conn.is_handshaking() {
            finish_flight(io, &flight, quickack)?;
            // What rustls was given is taken out of the kernel; nothing after it is.
            return inbox.commit(io);
        }
        // Send a whole flight in one write, and only when the peer's next one is needed (the
        // records of one peeked flight can each make rustls queue output: the client's CCS
        // after the ServerHello, the rest after the server's Finished). Several small writes
        // would meet Nagle's algorithm and the peer's delayed ACK (a 40 ms stall per handshake,
        // seen as the p99), and cost the peer a read each.
        if inbox.needs_read() && !flight.is_empty() {
            io.write_all(&flight)?;
            flight.clear();
            // The peer's answer cannot be there yet: wait for it before peeking.
            inbox.expect_wait();
        }
        let mut rest = inbox.next_record(io)?;
        while !rest.is_empty() {
            let n = conn.read_tls(&mut rest)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (the alert is queued), best effort.
                let _ = conn.write_tls(&mut flight);
                let _ = io.write_all(&flight);
                return Err(HandshakeError::Tls(e));
            }
            if n == 0 && !rest.is_empty() {
                return Err(HandshakeError::Tls(rustls::Error::General("record not consumed".into())));
            }
        }
    }
}

/// The handshake's last write, if any. A server that sends nothing after the client's last
/// flight (no ticket) has nothing to piggyback its ACK on; a delayed ACK (~40 ms) would then hold
/// the client's first request behind Nagle, so it acks at once (`quickack`).
pub(crate) fn finish_flight(io: &mut DeadlineIo, flight: &[u8], quickack: bool) -> Result<(), HandshakeError> {
    if !flight.is_empty() {
        io.write_all(flight)?;
    } else if quickack {
        crate::sys::ktls::quickack(io.fd);
    }
    Ok(())
}

/// Validate a TLS record header; returns the body length.
pub(crate) fn record_len(h: &[u8; 5]) -> Result<usize, HandshakeError> {
    // content type 20..=23, legacy version 0x03 0x01..=0x04
    if !(20..=23).contains(&h[0]) || h[1] != 3 || h[2] > 4 {
        return Err(HandshakeError::NotTls);
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len == 0 || len > MAX_CIPHERTEXT {
        return Err(HandshakeError::NotTls);
    }
    Ok(len)
}

/// Peeked bytes this large hold any flight (a whole record is at most 16 KiB + 261).
const PEEK: usize = 2 * (MAX_CIPHERTEXT + 5);

/// The handshake's view of the socket's receive queue: **one peek and one consuming read per
/// flight**, whole records only. A flight is peeked, its whole records are handed to rustls one
/// at a time, and only the records rustls was given are then taken out of the kernel
/// ([`Inbox::commit`]): whatever follows the handshake's last record (the client's first
/// request, a ticket) stays queued for kTLS or the relay. A record that has not fully arrived
/// is read exactly (header, then its length), never past its end.
pub(crate) struct Inbox {
    buf: Vec<u8>,
    /// Start of the next record to hand out.
    pos: usize,
    /// End of the whole records in `buf`.
    whole: usize,
    /// `buf` is a peek: the records before `pos` are still in the kernel until committed.
    peeked: bool,
    /// We just sent a flight: the next fill waits for readability before it peeks.
    wait_first: bool,
    /// Inline at accept: every wait is bounded by this and ends in [`HandshakeError::Paused`],
    /// which leaves the kernel's queue untouched.
    pause: Option<Pause>,
}

impl Inbox {
    pub(crate) fn new() -> Self {
        Self { buf: Vec::new(), pos: 0, whole: 0, peeked: false, wait_first: false, pause: None }
    }

    /// Will the next record need a read from the socket?
    pub(crate) fn needs_read(&self) -> bool {
        self.pos >= self.whole
    }

    /// A flight was just sent: the peer's answer is at least a round trip away, so the next read
    /// polls first instead of trying a peek that would fail with EAGAIN.
    pub(crate) fn expect_wait(&mut self) {
        self.wait_first = true;
    }

    /// The next whole record (header included).
    pub(crate) fn next_record(&mut self, io: &mut DeadlineIo) -> Result<&[u8], HandshakeError> {
        if self.pos >= self.whole {
            self.commit(io)?;
            self.fill(io)?;
        }
        let h: [u8; 5] = self.buf[self.pos..self.pos + 5].try_into().expect("five bytes");
        let len = 5 + record_len(&h)?;
        let at = self.pos;
        self.pos += len;
        Ok(&self.buf[at..at + len])
    }

    /// Take the records handed out so far out of the kernel (one read).
    /// The bytes read must be the ones peeked (nobody else reads the socket during the
    /// handshake; if something did, fail closed rather than hand over a desynchronised stream).
    pub(crate) fn commit(&mut self, io: &mut DeadlineIo) -> Result<(), HandshakeError> {
        if self.peeked && self.pos > 0 {
            let mut got = vec![0u8; self.pos];
            read_exact(io, &mut got)?;
            if got[..] != self.buf[..self.pos] {
                return Err(HandshakeError::Io(io::Error::from_raw_os_error(libc::EPROTO)));
            }
        }
        self.pos = 0;
        self.whole = 0;
        self.peeked = false;
        Ok(())
    }

    fn fill(&mut self, io: &mut DeadlineIo) -> Result<(), HandshakeError> {
        self.buf.resize(PEEK, 0);
        let wait_first = std::mem::take(&mut self.wait_first);
        let n = match &mut self.pause {
            Some(p) => match p.peek(io.fd, &mut self.buf, wait_first) {
                Err(HandshakeError::Paused) => {
                    self.wait_first = wait_first;
                    return Err(HandshakeError::Paused);
                }
                r => r?,
            },
            None => {
                if wait_first {
                    crate::sys::net::wait(io.fd, libc::POLLIN, io.deadline)?;
                }
                io.peek(&mut self.buf)?
            }
        };
        if n == 0 {
            return Err(HandshakeError::PeerClosed);
        }
        let mut end = 0;
        while let Some(h) = self.buf[..n].get(end..end + 5) {
            let len = 5 + record_len(h.try_into().expect("five bytes"))?;
            if end + len > n {
                break;
            }
            end += len;
        }
        if end > 0 {
            self.whole = end;
            self.peeked = true;
            return Ok(());
        }
        // The first record is still arriving. Inline, leave it queued for the worker (reading
        // it now could wait for the rest); elsewhere read it exactly, consuming it.
        if self.pause.is_some() {
            return Err(HandshakeError::Paused);
        }
        let mut h = [0u8; 5];
        read_exact(io, &mut h)?;
        let len = record_len(&h)?;
        self.buf[..5].copy_from_slice(&h);
        read_exact(io, &mut self.buf[5..5 + len])?;
        self.whole = 5 + len;
        self.peeked = false;
        Ok(())
    }
}

fn read_exact(io: &mut DeadlineIo, buf: &mut [u8]) -> Result<(), HandshakeError> {
    let mut got = 0;
    while got < buf.len() {
        match io.read(&mut buf[got..])? {
            0 => return Err(HandshakeError::PeerClosed),
            n => got += n,
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    #[test]
    fn record_headers_are_checked() {
        assert_eq!(record_len(&[22, 3, 1, 0, 200]).expect("a whole header"), 200);
        assert!(matches!(record_len(b"GET /"), Err(HandshakeError::NotTls)));
        assert!(matches!(record_len(&[23, 3, 3, 0x48, 0x01]), Err(HandshakeError::NotTls)));
        assert!(matches!(record_len(&[22, 3, 1, 0, 0]), Err(HandshakeError::NotTls)));
    }
}
