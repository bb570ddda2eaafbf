//! Broker key custody: a rustls signing key whose private half stays in tetherd.
//!
//! The handshake's CertificateVerify input goes to tetherd in one compact signing frame
//! (`tether_proto::wire::sign`) and the signature comes back: one round trip. The process keeps
//! one signing connection (`SIGNER`) while it is in use and drops it after `IDLE` (below
//! tetherd's 5 s idle limit), so a burst of handshakes pays one connection setup. Signatures of
//! one process are serialised on it (a round trip is tens of µs). Its fd is spared from the
//! program's `close`/`close_range`/`dup2` ([`connection_fd`]); a fork child closes its copy of
//! the parent's without writing to it and opens its own (tetherd would refuse the parent's key
//! from the child anyway: a key is honoured only for the process it was issued to). Any failure
//! on a kept connection is retried once on a fresh one.
//!
//! Any failure fails the handshake closed; [`is_sign_failure`] lets the caller report it as
//! `EACCES` (no identity), like an unreachable tetherd at fetch time.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use tether_proto::wire::{self, sign};

use crate::settings;
use crate::sys::tetherd::Greeted;
use crate::sync::Lock as Mutex;

/// A kept connection is dropped after this long unused (tetherd closes idle ones after 5 s).
const IDLE: Duration = Duration::from_secs(2);

/// The process's signing connection and when its last request began. A leaf lock: nothing else
/// is taken while it is held (fork order: after everything else, `crate::fork`). Aged on the
/// wall clock, whose read the handshake's certificate check shares (see `clock`): a clock
/// stepped either way at worst makes one request on a connection tetherd has closed, which is
/// retried on a fresh one.
static SIGNER: Mutex<Option<(UnixStream, SystemTime)>> = Mutex::new(None);
/// Its fd, readable without the lock, for the close hooks to spare (-1: none).
static SIGNER_FD: AtomicI32 = AtomicI32::new(-1);

/// The signing connection's fd, if one is open: the program's `close` family must not touch it.
pub(crate) fn connection_fd() -> Option<RawFd> {
    let fd = SIGNER_FD.load(Ordering::Acquire);
    (fd >= 0).then_some(fd)
}

/// Fork: hold the signer lock (no signature is mid-flight on the connection at fork).
pub(crate) fn atfork_prepare() {
    SIGNER.hold_for_fork();
}

/// In the fork child, with no lock held: close the child's copy of the parent's signing
/// connection (just the descriptor: nothing is written), so the child opens its own.
pub(crate) fn after_fork_child() {
    if let Some((s, _)) = SIGNER.lock().take() {
        SIGNER_FD.store(-1, Ordering::Release);
        let fd = s.into_raw_fd();
        // SAFETY: our copy of the parent's connection; nothing in the child refers to it.
        unsafe { crate::real::close(fd) };
    }
}

/// How long a signature may take (connect, send, tetherd's checks, answer).
const SIGN_TIMEOUT: Duration = Duration::from_secs(2);

/// Every signing failure's message starts with this (see [`is_sign_failure`]).
const SIGN_FAILED: &str = "tetherd did not sign the handshake: ";

/// Is this rustls error a failure to get our CertificateVerify signed by tetherd?
pub(crate) fn is_sign_failure(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::General(m) if m.starts_with(SIGN_FAILED))
}

/// The SVID key under broker custody: only its id and public key are here.
pub(crate) struct RemoteKey {
    key_id: u64,
    spki: Vec<u8>,
}

impl fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteKey").finish_non_exhaustive()
    }
}

impl RemoteKey {
    /// A key tetherd holds under `key_id` for the certificate `leaf`.
    pub(crate) fn new(key_id: u64, leaf: &[u8]) -> Result<Arc<Self>, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("leaf certificate: {e}"))?;
        let spki = cert.tbs_certificate.subject_pki.raw.to_vec();
        Ok(Arc::new(Self { key_id, spki }))
    }
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(RemoteSigner {
                    key_id: self.key_id,
                }) as Box<dyn Signer>
            })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(&self.spki[..]))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

struct RemoteSigner {
    key_id: u64,
}

impl fmt::Debug for RemoteSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RemoteSigner")
    }
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let fail = |why: String| rustls::Error::General(format!("{SIGN_FAILED}{why}"));
        let answer = round_trip(self.key_id, message);
        // The server's chain (client handshakes), verified while tetherd signed: its refusal
        // comes first, and no signature goes to a server that failed it.
        super::deferred::settle()?;
        match answer {
            Ok(Ok(sig)) => Ok(sig),
            Ok(Err((status @ (sign::Status::UnknownKey | sign::Status::Stale), why))) => {
                // tetherd restarted or destroyed the key, or the process changed its uid or gid
                // since the key was issued: the next connection fetches a new SVID.
                crate::identity::forget_key(self.key_id);
                Err(fail(format!(
                    "{status:?} ({why}); a new SVID will be fetched"
                )))
            }
            Ok(Err((status, why))) => Err(fail(format!("{status:?}: {why}"))),
            Err(e) => Err(fail(format!("tetherd unreachable: {e}"))),
        }
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

type Answer = Result<Vec<u8>, (sign::Status, String)>;

/// One signing request, on the kept connection if there is a recent one (retried once on a
/// fresh connection if that fails), bounded by [`SIGN_TIMEOUT`] per attempt.
fn round_trip(key_id: u64, message: &[u8]) -> io::Result<Answer> {
    let bad = |e: wire::WireError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let mut frame: sign::RequestBuf = [0; wire::HEADER_LEN + sign::MAX_BODY];
    let req = sign::Request { key_id, scheme: 0x0403, message };
    let n = sign::encode_request(&req, &mut frame).map_err(bad)?;
    let mut slot = SIGNER.lock();
    let now = crate::clock::real();
    if let Some((mut s, used)) = slot.take() {
        // tetherd may have just closed an idle connection: on any failure, try afresh.
        if now.duration_since(used).is_ok_and(|idle| idle < IDLE) {
            if let Ok(Some(answer)) = exchange(&mut s, &frame[..n]) {
                keep(&mut slot, s, now);
                return Ok(answer);
            }
        }
        SIGNER_FD.store(-1, Ordering::Release);
    }
    let mut s = match crate::sys::tetherd::connect(&settings::get().socket, SIGN_TIMEOUT)? {
        Greeted::Ready(s) => s,
        Greeted::Refused(e) => {
            let status = if e.code == wire::ErrorCode::Busy { sign::Status::Busy } else { sign::Status::Refused };
            return Ok(Err((status, format!("{}: {}", e.code, e.message))));
        }
    };
    SIGNER_FD.store(s.as_raw_fd(), Ordering::Release);
    let answer = exchange(&mut s, &frame[..n]);
    if let Ok(Some(a)) = answer {
        keep(&mut slot, s, now);
        return Ok(a);
    }
    SIGNER_FD.store(-1, Ordering::Release);
    match answer {
        Ok(_) => Ok(Err((sign::Status::Refused, "tetherd answered without a signature".to_owned()))),
        Err(e) => Err(e),
    }
}

fn keep(slot: &mut Option<(UnixStream, SystemTime)>, s: UnixStream, at: SystemTime) {
    SIGNER_FD.store(s.as_raw_fd(), Ordering::Release);
    *slot = Some((s, at));
}

/// Send one request frame and read the answer. `Ok(None)`: tetherd answered with a message
/// frame (an error such as `busy` or `timeout`, or an older tetherd), not a signature.
fn exchange(s: &mut UnixStream, frame: &[u8]) -> io::Result<Option<Answer>> {
    let bad = |e: wire::WireError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    send_all(s, frame)?;
    // While tetherd signs: the server's chain, if a client handshake deferred it (the verdict
    // is kept for `RemoteSigner::sign`).
    let _ = super::deferred::settle();
    // One blocking read for the whole answer (tetherd writes it in one piece), bounded by the
    // SO_RCVTIMEO set when the connection was opened.
    let mut answer: sign::ResponseBuf = [0; wire::HEADER_LEN + sign::MAX_RESPONSE_BODY];
    let answer_read = sign::read_response(s, &mut answer);
    // It waited for tetherd.
    crate::clock::waited();
    let (kind, len, got) = answer_read.map_err(|e| match e {
        wire::WireError::Io(e) => e,
        other => bad(other),
    })?;
    if kind != wire::FrameKind::Sign || len > sign::MAX_RESPONSE_BODY {
        return Ok(None);
    }
    let (status, payload) = sign::parse_response(&answer[wire::HEADER_LEN..got]).map_err(bad)?;
    Ok(Some(match status {
        sign::Status::Ok => Ok(payload.to_vec()),
        other => Err((other, String::from_utf8_lossy(payload).into_owned())),
    }))
}

/// `send` with MSG_NOSIGNAL: a connection tetherd closed must fail with EPIPE, never raise
/// SIGPIPE in the program.
fn send_all(s: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live, readable slice of the given length; the fd is owned by `s`.
        let n = unsafe { libc::send(s.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}
