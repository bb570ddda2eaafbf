//! Turning an established TCP connection into a protected one: choose the data path, run the
//! handshake, install kTLS or hand over to the userspace relay. Shared by connect and accept.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use tether_proto::wire::{ConnectionEvent, ConnectionReport};
use tether_proto::policy::{InboundRule, OutboundRule};
use tether_proto::{IdPattern, KeyUpdateAfter};

use crate::fd_table::{DataPath, Direction, Protected};
use crate::identity::{Identity, IdentityError};
use crate::settings::{self, DataPathMode};
use crate::sys::ktls::{self, AttachError};
use crate::sys::net::{self, DeadlineIo};
use crate::tls::handshake::{self, HandshakeError, Inline, Pause, ServerHandshake};
use crate::tls::verify::Refusal;
use crate::{fallback, log, tls};

/// Why a protected connection could not be set up. Every variant fails closed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No SVID/policy from tetherd, so we cannot tell what is protected.
    NoIdentity(IdentityError),
    /// Unmatched outbound TCP under `default = "deny"`.
    DeniedByDefault,
    /// TETHER_MODE holds a value we do not understand.
    BadMode(String),
    /// TETHER_MODE=ktls and the kernel has no kTLS.
    KtlsUnavailable,
    /// The kernel refused the ULP or the keys.
    Ktls(io::Error),
    /// The connect itself failed (errno passed through).
    Connect(i32),
    Handshake(HandshakeError),
    /// The userspace relay could not take the connection.
    Relay(io::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoIdentity(e) => write!(f, "{e}"),
            Self::DeniedByDefault => f.write_str("no rule matches and the policy default is deny"),
            Self::BadMode(m) => write!(f, "TETHER_MODE={m:?} is not auto, ktls or userspace"),
            Self::KtlsUnavailable => {
                f.write_str("TETHER_MODE=ktls but this kernel has no kTLS (modprobe tls, or CONFIG_TLS)")
            }
            Self::Ktls(e) => write!(f, "kTLS setup failed: {e}"),
            Self::Connect(e) => write!(f, "connect failed: {}", io::Error::from_raw_os_error(*e)),
            Self::Handshake(e) => write!(f, "{e}"),
            Self::Relay(e) => write!(f, "userspace TLS relay failed: {e}"),
        }
    }
}

impl Failure {
    /// The errno a program sees from connect(2). Documented in ARCHITECTURE.md.
    pub(crate) fn errno(&self) -> i32 {
        match self {
            Self::NoIdentity(_) | Self::DeniedByDefault => libc::EACCES,
            Self::BadMode(_) | Self::KtlsUnavailable => libc::EPROTONOSUPPORT,
            Self::Ktls(_) | Self::Relay(_) => libc::EIO,
            Self::Connect(e) => *e,
            Self::Handshake(h) => match h {
                HandshakeError::Refused(_) => libc::EPERM,
                HandshakeError::Timeout => libc::ETIMEDOUT,
                HandshakeError::PeerClosed | HandshakeError::NotTls => libc::ECONNREFUSED,
                // Broker custody: tetherd did not sign our CertificateVerify (down, or the
                // key refused): no identity, as when the SVID cannot be fetched.
                HandshakeError::Tls(e) if tls::remote_key::is_sign_failure(e) => libc::EACCES,
                HandshakeError::Tls(_) => libc::ECONNRESET,
                HandshakeError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
                // Never leaves the shim: a paused handshake is resumed, not failed.
                HandshakeError::Paused => libc::ETIMEDOUT,
            },
        }
    }
}

/// The data path chosen before the handshake.
enum Plan {
    Ktls,
    Userspace { why: &'static str },
}

fn plan(fd: RawFd, rotates: bool) -> Result<Plan, Failure> {
    let s = settings::get();
    if let Some(m) = &s.bad_mode {
        return Err(Failure::BadMode(m.clone()));
    }
    // `key_update_after` needs a kernel that rekeys kTLS; without one, rustls rotates in the relay.
    if rotates && s.mode == DataPathMode::Auto && !ktls::can_rekey() {
        return Ok(Plan::Userspace { why: "key_update_after is set and this kernel cannot rekey kTLS" });
    }
    match s.mode {
        DataPathMode::Userspace => Ok(Plan::Userspace { why: "TETHER_MODE=userspace" }),
        DataPathMode::Ktls => match ktls::attach_ulp(fd) {
            Ok(()) => Ok(Plan::Ktls),
            Err(AttachError::Unsupported) => Err(Failure::KtlsUnavailable),
            Err(AttachError::Other(e)) => Err(Failure::Ktls(e)),
        },
        DataPathMode::Auto => match ktls::attach_ulp(fd) {
            Ok(()) => Ok(Plan::Ktls),
            Err(AttachError::Unsupported) => Ok(Plan::Userspace { why: "kernel has no kTLS" }),
            Err(AttachError::Other(_)) => Ok(Plan::Userspace { why: "TCP_ULP refused on this socket" }),
        },
    }
}

/// The rule that admitted a connection, read once by the caller: a second lookup here could
/// find another rule (a reload in between, or a destination the program wrote as `0.0.0.0`,
/// which a rule matches as written or as where the kernel connects it).
pub(crate) struct Rule<'a> {
    pub(crate) allow: &'a [IdPattern],
    pub(crate) allow_truncation: bool,
    pub(crate) key_update_after: Option<KeyUpdateAfter>,
}

impl<'a> From<&'a OutboundRule> for Rule<'a> {
    fn from(r: &'a OutboundRule) -> Self {
        Self { allow: &r.allow, allow_truncation: r.allow_truncation, key_update_after: r.key_update_after }
    }
}

impl<'a> From<&'a InboundRule> for Rule<'a> {
    fn from(r: &'a InboundRule) -> Self {
        Self { allow: &r.allow, allow_truncation: r.allow_truncation, key_update_after: r.key_update_after }
    }
}

/// Protect the established TCP connection on `fd`. On failure the socket has been shut down
/// both ways (nothing can flow in plaintext) and the fd number is left for the program to
/// close.
pub(crate) fn protect(
    fd: RawFd,
    direction: Direction,
    ident: &Arc<Identity>,
    rule: Rule<'_>,
    local: SocketAddr,
    remote: SocketAddr,
) -> Result<Arc<Protected>, Failure> {
    let r = protect_inner(fd, direction, ident, rule, local, remote);
    if r.is_err() {
        net::kill(fd);
    }
    r
}

fn protect_inner(
    fd: RawFd,
    direction: Direction,
    ident: &Arc<Identity>,
    rule: Rule<'_>,
    local: SocketAddr,
    remote: SocketAddr,
) -> Result<Arc<Protected>, Failure> {
    let allow = rule.allow;
    let setup = Setup::new(fd, direction, rule)?;
    let mut io = setup.io();
    let est = match direction {
        Direction::Outbound => handshake::client(&mut io, ident, allow, remote, setup.target()),
        Direction::Inbound => handshake::server(&mut io, ident, allow, setup.target()),
    };
    let est = est.map_err(Failure::Handshake)?;
    let at = (direction == Direction::Inbound).then_some("worker");
    setup.finish(est, ident, local, remote, at)
}

/// An inbound handshake that stopped inline at accept, waiting for the client: [`resume_inbound`]
/// finishes it (on a handshake worker).
pub(crate) struct HalfInbound {
    setup: Setup,
    hs: Box<ServerHandshake>,
    local: SocketAddr,
    remote: SocketAddr,
}

/// Where [`protect_inbound_inline`] got to.
pub(crate) enum InlineInbound {
    /// Finished (the connection is protected, or it failed and was shut down).
    Done(Result<Arc<Protected>, Failure>),
    Paused(HalfInbound),
}

/// [`protect`] for an accepted connection, run on the accepting thread: every wait for the
/// client is bounded by `pause` (ARCHITECTURE.md "Inbound (accept)"). A handshake that would
/// wait longer stops between records, nothing lost, and is handed back to be resumed.
pub(crate) fn protect_inbound_inline(
    fd: RawFd,
    ident: &Arc<Identity>,
    rule: Rule<'_>,
    local: SocketAddr,
    remote: SocketAddr,
    pause: &mut Pause,
) -> InlineInbound {
    let allow = rule.allow;
    let r = Setup::new(fd, Direction::Inbound, rule).and_then(|setup| {
        let hs = ServerHandshake::new(ident, allow, setup.target()).map_err(Failure::Handshake)?;
        match hs.run_inline(&mut setup.io(), allow, pause) {
            Inline::Paused(hs) => Ok(InlineInbound::Paused(HalfInbound { setup, hs, local, remote })),
            Inline::Done(est) => {
                let est = est.map_err(Failure::Handshake)?;
                Ok(InlineInbound::Done(Ok(setup.finish(est, ident, local, remote, Some("inline"))?)))
            }
        }
    });
    r.unwrap_or_else(|f| {
        net::kill(fd);
        InlineInbound::Done(Err(f))
    })
}

/// Finish a handshake [`protect_inbound_inline`] stopped, under its original deadline.
pub(crate) fn resume_inbound(half: HalfInbound, ident: &Arc<Identity>, allow: &[IdPattern]) -> Result<Arc<Protected>, Failure> {
    let HalfInbound { setup, hs, local, remote } = half;
    let fd = setup.fd;
    let r = hs
        .run(&mut setup.io(), allow)
        .map_err(Failure::Handshake)
        .and_then(|est| setup.finish(est, ident, local, remote, Some("worker")));
    if r.is_err() {
        net::kill(fd);
    }
    r
}

/// What is decided before a handshake and needed after it.
struct Setup {
    fd: RawFd,
    direction: Direction,
    plan: Plan,
    rotate: Option<KeyUpdateAfter>,
    allow_truncation: bool,
    deadline: Instant,
}

impl Setup {
    fn new(fd: RawFd, direction: Direction, rule: Rule<'_>) -> Result<Self, Failure> {
        let Rule { key_update_after: rotate, allow_truncation, .. } = rule;
        let plan = plan(fd, rotate.is_some())?;
        let deadline = crate::clock::mono() + settings::get().handshake_timeout;
        Ok(Self { fd, direction, plan, rotate, allow_truncation, deadline })
    }

    /// The handshake's I/O is MSG_DONTWAIT: the fd's flags are neither read nor changed.
    fn io(&self) -> DeadlineIo {
        DeadlineIo { fd: self.fd, deadline: self.deadline }
    }

    fn target(&self) -> handshake::Target {
        match self.plan {
            Plan::Ktls => handshake::Target::Kernel,
            Plan::Userspace { .. } => handshake::Target::Relay,
        }
    }

    /// Install the handshake's keys on the chosen path. `at` says, for the log, where an
    /// inbound handshake finished: on the accepting thread (`inline`) or a worker.
    fn finish(
        self,
        est: handshake::Established,
        ident: &Arc<Identity>,
        local: SocketAddr,
        remote: SocketAddr,
        at: Option<&'static str>,
    ) -> Result<Arc<Protected>, Failure> {
        let Self { fd, direction, plan, rotate, allow_truncation, .. } = self;
        let (path, detail, rekey, no_pad) = match (plan, est.conn) {
            (Plan::Ktls, handshake::Session::Kernel(h)) => {
                let (cipher, rekey) = tls::danger::install_ktls(fd, *h).map_err(Failure::Ktls)?;
                let no_pad = expect_no_pad(fd, &est.peer, ident);
                (DataPath::Ktls, cipher, Some(rekey), Some(no_pad))
            }
            (Plan::Userspace { why }, handshake::Session::Relay(conn)) => {
                // An inbound socket is the shim's own accept4, not handed out yet; an outbound
                // one is the program's, whose flags it may have changed at any time.
                let known = (direction == Direction::Inbound).then_some(super::inbound::ACCEPTED);
                let link = fallback::adopt(fd, *conn, rotate, known).map_err(Failure::Relay)?;
                (DataPath::Userspace(link), why, None, None)
            }
            _ => return Err(Failure::Ktls(std::io::Error::other("handshake made for the other data path"))),
        };
        let p = Protected::new(path, direction, ident.id.clone(), Some(est.peer), local, remote, "allow");
        if let Some(r) = rekey {
            let _ = p.rekey.set(r);
            if ktls::can_rekey() {
                let _ = p.short_read_watch.set(super::io::ShortReadWatch::new());
            }
            if let Some(limit) = rotate {
                super::rotation::watch(fd, &p, limit);
            }
        }
        p.allow_truncation.store(allow_truncation, std::sync::atomic::Ordering::Relaxed);
        let mut line = log::Line::new(event_name(direction))
            .kv("decision", "allow")
            .kv("mode", p.path.name())
            .kv("local_id", &p.local_id)
            .kv("peer_id", p.peer.as_ref().map(|v| v.id().to_string()).unwrap_or_default())
            .kv("local", local)
            .kv("peer", remote)
            .kv("detail", detail)
            .kv("handshake", if est.resumed { "resumed" } else { "full" });
        if let Some(no_pad) = no_pad {
            line = line.kv("rx_no_pad", no_pad);
        }
        if let Some(at) = at {
            line = line.kv("at", at);
        }
        line.emit();
        Ok(p)
    }
}

/// `TLS_RX_EXPECT_NO_PAD` for a peer whose SVID is in our own trust domain: a tether peer
/// (rustls never pads). A peer of another trust domain may pad, so it keeps the kernel's
/// default. The option is a hint the kernel checks record by record (ARCHITECTURE.md, "kTLS
/// RX without padding"), so a wrong guess costs time, never data. Returns what the log says.
fn expect_no_pad(fd: RawFd, peer: &tls::verify::VerifiedPeer, ident: &Identity) -> &'static str {
    if !settings::get().rx_no_pad {
        return "off";
    }
    if peer.id().trust_domain() != ident.id.trust_domain() {
        return "foreign";
    }
    match ktls::set_rx_no_pad(fd) {
        Ok(()) => "on",
        Err(_) => "unsupported",
    }
}

pub(crate) fn event_name(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "connect",
        Direction::Inbound => "accept",
    }
}

/// Log a refusal.
pub(crate) fn log_failure(direction: Direction, ident: Option<&Identity>, remote: SocketAddr, f: &Failure) {
    let mut l = log::Line::new(event_name(direction)).kv("decision", "deny");
    if let Some(i) = ident {
        l = l.kv("local_id", &i.id);
    }
    if let Failure::Handshake(HandshakeError::Refused(Refusal::NotAllowed(id))) = f {
        l = l.kv("peer_id", id);
    }
    l.kv("peer", remote).kv("errno", errno_name(f.errno())).kv("reason", f).emit();
    crate::report::send(ConnectionReport {
        event: ConnectionEvent::Refused,
        conn_id: crate::report::next_conn_id(),
        direction: direction.into(),
        local_addr: String::new(),
        remote_addr: remote.to_string(),
        local_id: ident.map(|i| i.id.clone()),
        peer_id: match f {
            Failure::Handshake(HandshakeError::Refused(Refusal::NotAllowed(id))) => Some(id.clone()),
            _ => None,
        },
        data_path: String::new(),
        decision: "deny".to_owned(),
        reason: Some(f.to_string()),
        opened_at: crate::report::now_secs(),
        bytes: None,
    });
}

/// Track a connection that policy lets through in plaintext (observe, or a plaintext client on
/// a permissive port), so its open and close are reported.
pub(crate) fn track_plaintext(fd: RawFd, direction: Direction, ident: &Identity, local: SocketAddr, remote: SocketAddr, decision: &'static str) {
    let p = Protected::new(DataPath::Plaintext, direction, ident.id.clone(), None, local, remote, decision);
    crate::fd_table::insert(fd, p);
}

pub(crate) fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EIO => "EIO",
        _ => "other",
    }
}
