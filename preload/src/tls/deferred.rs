//! A client handshake verifies the server's chain while tetherd signs the client's
//! CertificateVerify (broker key custody), instead of before: the two no longer add up on the
//! connection's critical path (ARCHITECTURE.md, "Key custody").
//!
//! rustls asks the verifier for the chain as soon as the server's Certificate arrives, and the
//! signer for the client's signature once the server's Finished has been checked: both within
//! one `process_new_packets`/`process` call, before anything of the client's flight is on the
//! wire. Inside a client handshake's [`Scope`], the verifier records the chain ([`defer`]) and
//! lets rustls go on; the chain is then verified ([`settle`]) in the signing round trip, after
//! the request is sent and before the answer is read, and in any case **before any byte of
//! ours is written** (`DeadlineIo::write` settles first and writes nothing if the chain fails),
//! and once more when the handshake ends. So whatever the server requested, nothing of the
//! client's second flight (its certificate, its signature, its Finished) reaches a server whose
//! chain has not verified, and a chain that fails fails the handshake with the same refusal as
//! before. What the server no longer gets when its chain fails inside the signing round trip is
//! a TLS alert naming the reason (rustls sends none for a signer's error): it sees the
//! connection closed; the client logs the reason as before.
//!
//! The state is per thread: a client handshake runs on one thread from start to end. A scope is
//! opened only for client handshakes under broker custody (with the key in the process there is
//! no round trip to overlap); outside one (server handshakes, process custody, tests) the
//! verifier verifies at once.

use std::cell::RefCell;

use rustls::pki_types::{CertificateDer, UnixTime};

use super::verify::SpiffeVerifier;

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new(State::Off) };
}

enum State {
    /// No client handshake on this thread: verify at once.
    Off,
    /// In a client handshake; no chain yet.
    Armed,
    /// A chain to verify before anything is written.
    Pending(Box<Pending>),
    Verified,
    Failed(rustls::Error),
}

/// A server chain as rustls gave it, and what verifies it.
pub(super) struct Pending {
    pub(super) verifier: SpiffeVerifier,
    pub(super) end_entity: CertificateDer<'static>,
    pub(super) intermediates: Vec<CertificateDer<'static>>,
    pub(super) now: UnixTime,
}

/// One client handshake on this thread; dropping it forgets any chain (no I/O).
pub(crate) struct Scope(());

/// Start deferring the server's chain verification on this thread.
pub(crate) fn scope() -> Scope {
    let _ = STATE.try_with(|s| *s.borrow_mut() = State::Armed);
    Scope(())
}

impl Drop for Scope {
    fn drop(&mut self) {
        let _ = STATE.try_with(|s| *s.borrow_mut() = State::Off);
    }
}

/// Record `pending` to be verified before anything is written; false (verify it now) outside a
/// client handshake's scope, or if a chain was already recorded in it.
pub(super) fn defer(pending: impl FnOnce() -> Pending) -> bool {
    STATE
        .try_with(|s| {
            let mut s = s.borrow_mut();
            if !matches!(*s, State::Armed) {
                return false;
            }
            *s = State::Pending(Box::new(pending()));
            true
        })
        .unwrap_or(false)
}

/// Verify the recorded chain if there is one; the verdict is kept, so later calls are cheap.
/// `Err`: the chain failed (the same error the verifier would have given rustls).
pub(crate) fn settle() -> Result<(), rustls::Error> {
    let taken = STATE.try_with(|s| {
        let mut s = s.borrow_mut();
        match &*s {
            State::Failed(e) => Err(e.clone()),
            State::Pending(_) => match std::mem::replace(&mut *s, State::Armed) {
                State::Pending(p) => Ok(Some(p)),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    });
    let pending = match taken {
        Ok(r) => r?,
        // Thread-locals being torn down: nothing can have been recorded on this thread.
        Err(_) => None,
    };
    let Some(p) = pending else { return Ok(()) };
    let verdict = p.verifier.verify(&p.end_entity, &p.intermediates, p.now, webpki::KeyUsage::server_auth());
    let _ = STATE.try_with(|s| {
        *s.borrow_mut() = match &verdict {
            Ok(()) => State::Verified,
            Err(e) => State::Failed(e.clone()),
        }
    });
    verdict
}
