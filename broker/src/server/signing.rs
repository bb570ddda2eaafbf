//! Signing frames (broker key custody): one CertificateVerify signature per frame, made only
//! for the process the key was issued to (see ARCHITECTURE.md, "Key custody"), and the bounds on
//! what refused frames may cost (a connection closed after a few, a rate-limited audit line).

use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tether_proto::wire::{self, io::write_frame};
use tracing::{debug, warn};

use super::{Broker, AUDIT, FOREIGN_CUSTODY};
use crate::attest::{self, Peer};
use crate::custody;

/// Refused signing frames a connection may send; the one that reaches this closes it (a shim
/// that is refused opens a new connection, or gives up on the handshake).
const MAX_SIGN_REFUSALS: u32 = 8;
/// `sign_refused` audit lines written per uid in each [`REFUSAL_WINDOW`]; the rest are counted
/// and the count is logged with the uid's first line of a later window.
const REFUSAL_LINES: u32 = 8;
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// Bound on uids tracked by [`RefusalLog`].
const REFUSAL_UIDS: usize = 4096;

/// Per-uid rate limit of an audit line (the metric counts every event regardless).
#[derive(Debug, Default)]
pub(super) struct RefusalLog(Mutex<std::collections::HashMap<u32, RefusalWindow>>);

#[derive(Debug, Clone, Copy)]
struct RefusalWindow {
    start: Instant,
    logged: u32,
    left_out: u64,
}

impl RefusalLog {
    /// Whether to write this event's line for `uid`, and how many of its lines were left out
    /// in the window that ended (reported with this line).
    fn admit(&self, uid: u32) -> (bool, u64) {
        let now = Instant::now();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= REFUSAL_UIDS && !m.contains_key(&uid) {
            m.retain(|_, w| now.duration_since(w.start) < REFUSAL_WINDOW);
            if m.len() >= REFUSAL_UIDS {
                return (false, 0);
            }
        }
        let w = m.entry(uid).or_insert(RefusalWindow { start: now, logged: 0, left_out: 0 });
        let mut ended = 0;
        if now.duration_since(w.start) >= REFUSAL_WINDOW {
            ended = w.left_out;
            *w = RefusalWindow { start: now, logged: 0, left_out: 0 };
        }
        if w.logged < REFUSAL_LINES {
            w.logged += 1;
            (true, ended)
        } else {
            w.left_out += 1;
            (false, ended)
        }
    }
}

/// Answer one signing request (broker custody). The bytes were sent by the connecting process
/// (checked per message by [`AttestedReader`]); that process must still be running and must
/// own the key. `refusals` counts this connection's refused frames. Returns false when the
/// connection is done.
pub(super) fn sign_request(
    broker: &Broker,
    peer: &Result<Peer, attest::AttestError>,
    body: &[u8],
    mut stream: &UnixStream,
    refusals: &mut u32,
) -> bool {
    use wire::sign::{self, Status};
    let mut out: sign::ResponseBuf = [0; wire::HEADER_LEN + sign::MAX_RESPONSE_BODY];
    let mut sig = [0u8; 128];
    let n = match broker.sign(peer, body, &mut sig) {
        Ok(len) => {
            broker.metrics.signed();
            sign::encode_response(Status::Ok, &sig[..len], &mut out)
        }
        Err((status, label, reason)) => {
            broker.metrics.sign_refused(label);
            *refusals += 1;
            let uid = peer.as_ref().map_or(u32::MAX, Peer::uid);
            let (log, left_out) = broker.sign_refusals.admit(uid);
            if log {
                warn!(
                    target: AUDIT,
                    event = "sign_refused",
                    pid = peer.as_ref().map_or(-1, Peer::pid),
                    uid,
                    reason = %reason,
                    earlier_not_logged = left_out,
                    "signing request refused"
                );
            }
            sign::encode_response(status, reason.as_bytes(), &mut out)
        }
    };
    if write_frame(&mut stream, &out[..n]).is_err() {
        return false;
    }
    if *refusals >= MAX_SIGN_REFUSALS {
        debug!(refusals = *refusals, "closing a connection after its refused signing frames");
        return false;
    }
    true
}

impl Broker {
    /// Sign a CertificateVerify for `peer` with a key tetherd holds for it. On refusal: the
    /// status to answer, the metrics label, and the reason.
    fn sign(
        &self,
        peer: &Result<Peer, attest::AttestError>,
        body: &[u8],
        out: &mut [u8],
    ) -> Result<usize, (wire::sign::Status, &'static str, String)> {
        use wire::sign::{self, Status};
        let p = peer.as_ref().map_err(|e| (Status::Refused, "attestation_failed", e.to_string()))?;
        let req = sign::parse_request(body).map_err(|e| (Status::BadRequest, "bad_request", e.to_string()))?;
        p.refuse_in_foreign_namespace(FOREIGN_CUSTODY).map_err(|e| (Status::Refused, "foreign_namespace", e.to_string()))?;
        // The sender was checked for this message; it must still run the executable it ran at
        // the greeting, and (proved after that stat) still be the process that connected.
        p.check_exec().map_err(|e| (Status::Refused, "attestation_failed", e.to_string()))?;
        p.recheck().map_err(|e| (Status::Refused, "exited", e.to_string()))?;
        if self.upstream.as_ref().is_some_and(|u| u.withdrawn(p.process())) {
            // SPIRE withdrew this process's identity (entry deleted): its held keys go now, so
            // a running workload stops at its next handshake, not at its SVID's expiry.
            if self.keys.destroy(p.process()) {
                self.metrics.key_destroyed("withdrawn");
            }
            return Err((Status::Refused, "withdrawn", "the SPIRE agent withdrew this process's identity".to_owned()));
        }
        self.keys.sign(p.process(), (p.uid(), p.gid()), req.key_id, req.scheme, req.message, out).map_err(|r| {
            let status = match r {
                custody::Refusal::UnknownKey => Status::UnknownKey,
                custody::Refusal::CredentialsChanged { .. } => Status::Stale,
                custody::Refusal::BadRequest(_) => Status::BadRequest,
                custody::Refusal::Internal => Status::Internal,
                _ => Status::Refused,
            };
            if matches!(r, custody::Refusal::Impersonation(_)) {
                self.metrics.key_destroyed("impersonation");
            }
            (status, r.label(), r.to_string())
        })
    }
}
