//! The mutual-TLS 1.3 handshake on a program's socket.
//!
//! rustls is the protocol state machine; this driver feeds it **one TLS record at a time**
//! (5-byte header, then exactly that many bytes), so when the handshake completes nothing
//! that followed it on the wire has been read out of the kernel. That is what makes handing
//! the socket to kTLS safe: no application byte can be stranded in a userspace buffer.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection, SignatureScheme};
use tether_proto::IdPattern;

use super::verify::{PeerCheck, Refusal, SpiffeVerifier, TrustStore, VerifiedPeer};
use crate::sys::net::DeadlineIo;

/// TLS 1.3 ciphertext records are at most 2^14 + 256 bytes.
const MAX_CIPHERTEXT: usize = 16384 + 256;

/// The one crypto provider, chosen explicitly; never installed process-wide.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
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

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
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
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ETIMEDOUT) => Self::Timeout,
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
    Kernel(super::danger::HandOff),
    Relay(Connection),
}

/// A completed handshake: the session and the peer it proved.
#[derive(Debug)]
pub(crate) struct Established {
    pub(crate) conn: Session,
    pub(crate) peer: VerifiedPeer,
}

fn verifier(creds: &Credentials, allow: &[IdPattern]) -> (Arc<SpiffeVerifier>, Arc<PeerCheck>) {
    let check = Arc::new(PeerCheck::default());
    let v = SpiffeVerifier::new(creds.trust.clone(), allow.to_vec(), check.clone());
    (Arc::new(v), check)
}

/// Client side: we connected to `dest`, which must prove an ID in `allow`.
pub(crate) fn client(
    io: &mut DeadlineIo,
    creds: &Credentials,
    allow: &[IdPattern],
    dest: SocketAddr,
    target: Target,
) -> Result<Established, HandshakeError> {
    let (v, check) = verifier(creds, allow);
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(HandshakeError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(v)
        .with_client_cert_resolver(Arc::new(Fixed(creds.key.clone())));
    cfg.enable_secret_extraction = true;
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = false;
    let name = ServerName::IpAddress(dest.ip().into());
    let cfg = Arc::new(cfg);
    let r = match target {
        Target::Kernel => {
            let conn = UnbufferedClientConnection::new(cfg, name).map_err(HandshakeError::Tls)?;
            super::unbuffered::drive(conn, io, false).map(kernel_session)
        }
        Target::Relay => {
            let mut conn = Connection::Client(ClientConnection::new(cfg, name).map_err(HandshakeError::Tls)?);
            drive(&mut conn, io, false).map(|()| Session::Relay(conn))
        }
    };
    finish(r, &check)
}

/// Server side: a client connected to us and must prove an ID in `allow`.
pub(crate) fn server(
    io: &mut DeadlineIo,
    creds: &Credentials,
    allow: &[IdPattern],
    target: Target,
) -> Result<Established, HandshakeError> {
    let (v, check) = verifier(creds, allow);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(HandshakeError::Tls)?
        .with_client_cert_verifier(v)
        .with_cert_resolver(Arc::new(Fixed(creds.key.clone())));
    cfg.enable_secret_extraction = true;
    // Tickets would arrive at the client after the handshake as control records; we never
    // resume, so send none.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let cfg = Arc::new(cfg);
    let r = match target {
        Target::Kernel => {
            let conn = UnbufferedServerConnection::new(cfg).map_err(HandshakeError::Tls)?;
            super::unbuffered::drive(conn, io, true).map(kernel_session)
        }
        Target::Relay => {
            let mut conn = Connection::Server(ServerConnection::new(cfg).map_err(HandshakeError::Tls)?);
            drive(&mut conn, io, true).map(|()| Session::Relay(conn))
        }
    };
    finish(r, &check)
}

fn kernel_session((secrets, keys): (rustls::ExtractedSecrets, super::danger::KeySchedule)) -> Session {
    Session::Kernel(super::danger::HandOff { secrets, keys })
}

fn finish(r: Result<Session, HandshakeError>, check: &PeerCheck) -> Result<Established, HandshakeError> {
    if let Some(refusal) = check.refusal() {
        return Err(HandshakeError::Refused(refusal));
    }
    let conn = r?;
    let peer = check.verified().ok_or(HandshakeError::Refused(Refusal::BadCertificate(
        "peer presented no certificate".into(),
    )))?;
    Ok(Established { conn, peer })
}

/// Run the handshake to completion, one record at a time, flushing everything we owe.
fn drive(conn: &mut Connection, io: &mut DeadlineIo, quickack: bool) -> Result<(), HandshakeError> {
    let mut record = Vec::with_capacity(MAX_CIPHERTEXT + 5);
    let mut flight = Vec::with_capacity(4096);
    loop {
        // Send a whole flight in one write: several small writes would meet Nagle's algorithm
        // and the peer's delayed ACK (a 40 ms stall per handshake, seen as the p99).
        flight.clear();
        while conn.wants_write() {
            conn.write_tls(&mut flight)?;
        }
        io.write_all(&flight)?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        read_record(io, &mut record)?;
        if quickack {
            // A server that sends no tickets has nothing to piggyback its ACK of the client's
            // last flight on; a delayed ACK (~40 ms) would then hold the client's first request
            // behind Nagle. Ack each handshake record at once instead.
            crate::sys::ktls::quickack(io.fd);
        }
        let mut rest = &record[..];
        while !rest.is_empty() {
            let n = conn.read_tls(&mut rest)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (the alert is queued), best effort.
                flight.clear();
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

pub(crate) fn read_record(io: &mut DeadlineIo, out: &mut Vec<u8>) -> Result<(), HandshakeError> {
    let mut h = [0u8; 5];
    read_exact(io, &mut h)?;
    let len = record_len(&h)?;
    out.clear();
    out.extend_from_slice(&h);
    out.resize(5 + len, 0);
    read_exact(io, &mut out[5..])
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
