//! Broker key custody: a rustls signing key whose private half stays in tetherd.
//!
//! The handshake's CertificateVerify input goes to tetherd in one compact signing frame
//! (`tether_proto::wire::sign`) on a connection of its own, and the signature comes back. The
//! connection lives only for that round trip: no fd of ours idles in the program's fd space,
//! and a fork child can never use a parent's connection (tetherd attests every message, and
//! would refuse it anyway: a key is honoured only for the process it was issued to).
//!
//! Any failure fails the handshake closed; [`is_sign_failure`] lets the caller report it as
//! `EACCES` (no identity), like an unreachable tetherd at fetch time.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use tether_proto::wire::{self, sign};

use crate::settings;

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
        match round_trip(self.key_id, message) {
            Ok(Ok(sig)) => Ok(sig),
            Ok(Err((sign::Status::UnknownKey, why))) => {
                // tetherd restarted or destroyed the key: the next connection fetches a new SVID.
                crate::identity::forget_key(self.key_id);
                Err(fail(format!(
                    "unknown key ({why}); a new SVID will be fetched"
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

/// One signing request on a fresh connection, bounded by [`SIGN_TIMEOUT`].
fn round_trip(key_id: u64, message: &[u8]) -> io::Result<Answer> {
    let bad = |e: wire::WireError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let mut frame: sign::RequestBuf = [0; wire::HEADER_LEN + sign::MAX_BODY];
    let n = sign::encode_request(
        &sign::Request {
            key_id,
            scheme: 0x0403,
            message,
        },
        &mut frame,
    )
    .map_err(bad)?;
    let socket = &settings::get().socket;
    let mut s = UnixStream::connect(socket)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", socket.display())))?;
    s.set_read_timeout(Some(SIGN_TIMEOUT))?;
    s.set_write_timeout(Some(SIGN_TIMEOUT))?;
    s.write_all(&frame[..n])?;
    let mut header = [0u8; wire::HEADER_LEN];
    s.read_exact(&mut header)?;
    let (kind, len) = wire::parse_any_header(&header).map_err(bad)?;
    if kind != wire::FrameKind::Sign || len > sign::MAX_RESPONSE_BODY {
        // A JSON error (an older tetherd, a busy answer): not a signature.
        return Ok(Err((
            sign::Status::Refused,
            "tetherd answered without a signature".to_owned(),
        )));
    }
    let mut body = [0u8; sign::MAX_RESPONSE_BODY];
    s.read_exact(&mut body[..len])?;
    let (status, payload) = sign::parse_response(&body[..len]).map_err(bad)?;
    Ok(match status {
        sign::Status::Ok => Ok(payload.to_vec()),
        other => Err((other, String::from_utf8_lossy(payload).into_owned())),
    })
}
