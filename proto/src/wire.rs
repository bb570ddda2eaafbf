//! tetherd's wire protocol.
//!
//! Every message is one frame:
//!
//! ```text
//! +------+------+---------+----------------+-----------------------+
//! | 'T'  | 'T'  | version | length (u32 BE)| body: `length` bytes  |
//! | 1 B  | 1 B  | u16 BE  | <= MAX_BODY    | UTF-8 JSON, one value |
//! +------+------+---------+----------------+-----------------------+
//! ```
//!
//! The body is a [`Request`] or [`Response`], internally tagged by `"type"`. Parsing is
//! strict: unknown fields are rejected, and so is anything after the JSON value. New message
//! kinds are added as new variants; a peer that does not know one answers
//! [`ErrorCode::UnknownRequest`], so older brokers fail clearly instead of misbehaving.
//!
//! The request/response exchange is one frame each way; a connection may carry several.
//! Frames holding private keys live in [`Zeroizing`] buffers and are wiped when dropped.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::policy::Policy;
use crate::spiffe::{SpiffeId, TrustDomain};

pub const MAGIC: [u8; 2] = *b"TT";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 8;
/// Hard limit on a frame body. A full SVID response with a large federated bundle stays far
/// below this; anything bigger is hostile or broken.
pub const MAX_BODY: usize = 1 << 20;

/// Default path of tetherd's socket.
pub const DEFAULT_SOCKET: &str = "/run/tether/tetherd.sock";
/// Environment variable naming the socket, for the CLI and the shim.
pub const SOCKET_ENV: &str = "TETHER_SOCKET";

/// What can go wrong reading or writing a frame.
#[derive(Debug)]
#[non_exhaustive]
pub enum WireError {
    BadMagic([u8; 2]),
    UnsupportedVersion(u16),
    TooLarge(usize),
    /// The body is not a valid message.
    Malformed(String),
    /// The peer closed the connection before a whole frame arrived.
    Truncated,
    Io(std::io::Error),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "not a tether frame (magic {m:02x?})"),
            Self::UnsupportedVersion(v) => {
                write!(f, "protocol version {v} is not supported (this side speaks {VERSION})")
            }
            Self::TooLarge(n) => write!(f, "frame body of {n} bytes exceeds the {MAX_BODY}-byte limit"),
            Self::Malformed(why) => write!(f, "malformed message: {why}"),
            Self::Truncated => f.write_str("connection closed mid-frame"),
            Self::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl std::error::Error for WireError {}

impl WireError {
    /// The code a server answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadMagic(_) | Self::Malformed(_) | Self::Truncated => ErrorCode::BadRequest,
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::Io(e) if is_timeout(e) => ErrorCode::Timeout,
            Self::Io(_) => ErrorCode::BadRequest,
        }
    }
}

pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// Parse a frame header, returning the body length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<usize, WireError> {
    if h[0..2] != MAGIC {
        return Err(WireError::BadMagic([h[0], h[1]]));
    }
    let version = u16::from_be_bytes([h[2], h[3]]);
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Counts the bytes serialised into it, keeping none.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encode `msg` as one complete frame. The buffer is sized exactly before anything is
/// written into it, so it never reallocates: a private key in `msg` exists in one buffer,
/// which is wiped on drop, and never in a freed, unwiped one.
pub fn encode<T: Serialize>(msg: &T) -> Result<Zeroizing<Vec<u8>>, WireError> {
    let mut size = Counter(0);
    serde_json::to_writer(&mut size, msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if size.0 > MAX_BODY {
        return Err(WireError::TooLarge(size.0));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + size.0));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *out, msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    out[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decode a frame body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Requests a client sends to tetherd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// The caller's own SVID, key, trust bundle and connection policy.
    FetchSvid {},
    /// Broker health and counts.
    Status {},
    /// Just the current policy and its generation (the shim re-reads it when the generation
    /// it sees on the socket file's mtime changes).
    FetchPolicy {},
    /// A protected connection opened or closed in the caller (sent by the shim, off the data
    /// path). The broker attributes it to the attested caller, never to what the report says.
    Report(ConnectionReport),
    /// The live connection table.
    Connections {},
    /// Re-read the config file (root or tetherd's own uid only).
    Reload {},
    /// Explain which rule decides a connection from `from` to `to`.
    PolicyCheck(PolicyCheckRequest),
}

/// What a shim reports about one protected connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionReport {
    pub event: ConnectionEvent,
    /// Unique within the reporting process.
    pub conn_id: u64,
    pub direction: Direction,
    pub local_addr: String,
    pub remote_addr: String,
    pub local_id: Option<SpiffeId>,
    /// The peer's ID as the reporting process claims it; tetherd shows it as a claim.
    pub peer_id: Option<SpiffeId>,
    /// "ktls", "userspace", or "plaintext" (observe/permissive).
    pub data_path: String,
    /// allow | deny | observe | plaintext
    pub decision: String,
    pub reason: Option<String>,
    /// Seconds since the epoch when the connection opened.
    pub opened_at: u64,
    /// Plaintext bytes (sent, received), when known.
    #[serde(default)]
    pub bytes: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionEvent {
    Open,
    Close,
    /// A refused or failed attempt: never in the live table, counted in metrics.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCheckRequest {
    pub from: SpiffeId,
    /// `ADDR:PORT`
    pub to: String,
}

/// tetherd's answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Response {
    Svid(SvidResponse),
    Status(StatusResponse),
    Error(ErrorResponse),
    Policy(PolicyResponse),
    Connections(ConnectionsResponse),
    /// A request that needs no data back succeeded (Report, Reload).
    Ok(OkResponse),
    PolicyCheck(PolicyCheckResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyResponse {
    pub policy: Policy,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsResponse {
    pub connections: Vec<LiveConnection>,
    /// Rows left out because the whole table would not fit in one frame.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One row of `tether connections`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveConnection {
    /// Attested by the broker from the reporting socket.
    pub pid: u32,
    pub exe: String,
    #[serde(flatten)]
    pub report: ConnectionReport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OkResponse {
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCheckResponse {
    /// "protect" | "pass" | "deny"
    pub decision: String,
    pub mode: Option<crate::policy::Mode>,
    /// Index of the deciding `[[outbound]]` rule, if any.
    pub rule: Option<usize>,
    /// Whether `from` would be accepted by the inbound rule of the destination port (when
    /// one exists on this host), and whether it matches that rule's allow list.
    pub explanation: String,
}

/// An X.509-SVID with its key, the trust bundle and the policy for the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidResponse {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then any intermediates up to (not including) the root.
    pub cert_chain: Vec<Der>,
    /// PKCS#8 private key of the leaf.
    pub private_key: SecretDer,
    /// Root certificates of our own trust domain.
    pub bundle: Vec<Der>,
    /// Roots of federated trust domains.
    #[serde(default)]
    pub federated: BTreeMap<TrustDomain, Vec<Der>>,
    /// Leaf serial number, lowercase hex.
    pub serial: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub policy: Policy,
    /// Bumped on every successful config reload.
    #[serde(default)]
    pub policy_generation: u64,
}

impl SvidResponse {
    /// When a holder should fetch a fresh SVID: half-way through the lifetime.
    pub fn refresh_at(&self) -> u64 {
        self.not_before + self.not_after.saturating_sub(self.not_before) / 2
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusResponse {
    pub version: String,
    pub trust_domain: TrustDomain,
    /// Processes that currently hold a cached SVID.
    pub live_identities: u64,
    pub uptime_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorResponse {
    pub code: ErrorCode,
    /// For people; never parse it.
    pub message: String,
}

/// Machine-readable reasons for an error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Bytes that are not a valid frame or message.
    BadRequest,
    UnsupportedVersion,
    TooLarge,
    /// The client stalled mid-message.
    Timeout,
    /// A message type this broker does not know.
    UnknownRequest,
    /// The caller could not be attested (vanished, PID reused, /proc unreadable).
    AttestationFailed,
    /// The caller was attested but no registration entry grants it an identity.
    NoIdentity,
    /// The broker is at its connection limit; retry.
    Busy,
    /// The caller is not allowed this request (e.g. `reload` by a non-root user).
    PermissionDenied,
    /// A reload found the config file invalid; the old config stays in force.
    InvalidConfig,
    /// A bounded table is full (e.g. too many live connections reported by one process).
    LimitExceeded,
    Internal,
    /// A code from a newer peer.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned));
        f.write_str(s.as_deref().unwrap_or("unknown"))
    }
}

/// DER bytes, base64 on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Der(pub Vec<u8>);

impl fmt::Debug for Der {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Der({} bytes)", self.0.len())
    }
}

impl Serialize for Der {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Der {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(Der)
            .map_err(serde::de::Error::custom)
    }
}

/// Secret DER bytes (a private key): base64 on the wire, wiped on drop, never printed.
#[derive(Clone)]
pub struct SecretDer(pub Zeroizing<Vec<u8>>);

impl fmt::Debug for SecretDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDer(<redacted>)")
    }
}

impl Serialize for SecretDer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*self.0));
        s.serialize_str(&b64)
    }
}

impl<'de> Deserialize<'de> for SecretDer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Borrowed from the (zeroized) frame buffer, so no owned copy of the base64 text lingers.
        let s = <&str>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(|v| SecretDer(Zeroizing::new(v)))
            .map_err(serde::de::Error::custom)
    }
}

/// Blocking helpers over `Read`/`Write`. Timeouts are the caller's socket options.
pub mod io {
    use std::io::{ErrorKind, Read, Write};

    use zeroize::Zeroizing;

    use super::{parse_header, WireError, HEADER_LEN};

    /// Read one frame and return its body. `Ok(None)` is a clean EOF before any byte.
    pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, WireError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        let len = parse_header(&header)?;
        let mut body = Zeroizing::new(vec![0u8; len]);
        let mut got = 0;
        while got < len {
            match r.read(&mut body[got..]) {
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(Some(body))
    }

    pub fn write_frame<W: Write>(w: &mut W, frame: &[u8]) -> Result<(), WireError> {
        w.write_all(frame).map_err(WireError::Io)?;
        w.flush().map_err(WireError::Io)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;

    #[test]
    fn requests_round_trip() {
        for req in [Request::FetchSvid {}, Request::Status {}] {
            let frame = encode(&req).unwrap();
            let len = parse_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - HEADER_LEN);
            let back: Request = decode(&frame[HEADER_LEN..]).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn bad_headers_are_rejected() {
        assert!(matches!(parse_header(b"XX\0\x01\0\0\0\0"), Err(WireError::BadMagic(_))));
        assert!(matches!(
            parse_header(b"TT\0\x02\0\0\0\0"),
            Err(WireError::UnsupportedVersion(2))
        ));
        assert!(matches!(parse_header(b"TT\0\x01\xff\0\0\0"), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn strict_bodies() {
        assert!(decode::<Request>(br#"{"type":"fetch_svid","x":1}"#).is_err());
        assert!(decode::<Request>(br#"{"type":"fetch_svid"} junk"#).is_err());
        assert!(decode::<Request>(br#"{"type":"launch_missiles"}"#).is_err());
        assert!(decode::<Request>(b"\xff\xfe").is_err());
    }

    #[test]
    fn unknown_error_codes_from_newer_peers_parse() {
        let r: Response =
            decode(br#"{"type":"error","code":"quota_exceeded","message":"m"}"#).unwrap();
        assert!(matches!(r, Response::Error(ErrorResponse { code: ErrorCode::Unknown, .. })));
    }

    #[test]
    fn frames_are_sized_before_they_are_written() {
        let frame = encode(&Request::Report(ConnectionReport {
            event: ConnectionEvent::Open,
            conn_id: 1,
            direction: Direction::Inbound,
            local_addr: "x".repeat(10_000),
            remote_addr: String::new(),
            local_id: None,
            peer_id: None,
            data_path: String::new(),
            decision: String::new(),
            reason: None,
            opened_at: 0,
            bytes: None,
        }))
        .unwrap();
        assert_eq!(frame.len(), frame.capacity(), "no spare capacity means no reallocation");
    }

    #[test]
    fn secret_der_debug_is_redacted() {
        let s = SecretDer(Zeroizing::new(vec![1, 2, 3]));
        assert_eq!(format!("{s:?}"), "SecretDer(<redacted>)");
    }
}
