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
//!
//! **tetherd speaks first.** On every connection it accepts, tetherd records which program
//! the peer runs and then sends [`GREETING`] (or, instead, one error frame and closes). A
//! client must read the greeting ([`io::read_greeting`]) before it sends anything: tetherd
//! refuses a connection on which bytes arrived before it recorded the peer's executable,
//! because such bytes may have been written by a program the process ran before an `exec`.
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
/// Limit on a request body (what tetherd reads), far below [`MAX_BODY`] (what it may answer):
/// real requests are under 2 KiB; a connection report, the largest, is bounded well below this.
pub const MAX_REQUEST_BODY: usize = 64 << 10;

/// Magic of [`GREETING`].
pub const GREETING_MAGIC: [u8; 2] = *b"TG";
/// tetherd's first bytes on every connection: a frame header with magic `'T' 'G'`, the
/// protocol version and an empty body. It means "your executable is recorded; send now".
/// In its place tetherd may send one message frame holding a [`Response::Error`] (`busy`,
/// or `attestation_failed` for bytes sent before the greeting) and close.
pub const GREETING: [u8; HEADER_LEN] =
    [GREETING_MAGIC[0], GREETING_MAGIC[1], (VERSION >> 8) as u8, VERSION as u8, 0, 0, 0, 0];

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
    /// A request body over [`MAX_REQUEST_BODY`].
    RequestTooLarge(usize),
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
            Self::RequestTooLarge(n) => {
                write!(f, "request body of {n} bytes exceeds the {MAX_REQUEST_BODY}-byte limit for requests")
            }
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
            Self::TooLarge(_) | Self::RequestTooLarge(_) => ErrorCode::TooLarge,
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

/// The two kinds of frame: JSON messages (`'T' 'T'`) and signing frames (`'T' 'S'`, [`sign`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Message,
    Sign,
}

/// Parse the header of either kind of frame, returning its kind and body length. A signing
/// frame's body is bounded by [`sign::MAX_BODY`], far below a message's.
pub fn parse_any_header(h: &[u8; HEADER_LEN]) -> Result<(FrameKind, usize), WireError> {
    if h[0..2] == sign::MAGIC {
        let version = u16::from_be_bytes([h[2], h[3]]);
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if len > sign::MAX_BODY {
            return Err(WireError::TooLarge(len));
        }
        return Ok((FrameKind::Sign, len));
    }
    parse_header(h).map(|len| (FrameKind::Message, len))
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
    /// The caller's own SVID, trust bundle and connection policy; with the private key only
    /// under `key_custody = "process"` (under broker custody tetherd keeps the key and signs
    /// with it, see [`sign`]).
    FetchSvid {},
    /// The caller's own SVID *with* its private key, whatever the custody mode: an explicit
    /// export by the caller of its own identity (`tether svid --out`). The key is issued for
    /// this answer only and tetherd keeps no copy.
    ExportSvid {},
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
    /// PKCS#8 private key of the leaf: present under process custody and for `export_svid`,
    /// absent under broker custody (tetherd keeps it and signs for the caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<SecretDer>,
    /// Under broker custody: the handle the caller's signing requests name ([`sign`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<u64>,
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

/// Signing frames (broker custody): the shim sends the bytes its TLS 1.3 CertificateVerify
/// covers, tetherd answers with the signature made by the key it holds for the caller.
///
/// ```text
/// request  body: key_id (u64 BE) | scheme (u16 BE, TLS SignatureScheme) | message
/// response body: status (u8) | signature (status 0) or a reason for people (UTF-8)
/// ```
///
/// Both are framed like messages but with magic `'T' 'S'`, and both fit in fixed-size
/// buffers on the stack: a signature costs no JSON, no chain and no allocation on either side.
pub mod sign {
    use super::{WireError, HEADER_LEN, VERSION};

    pub const MAGIC: [u8; 2] = *b"TS";
    /// The frame's bound on a message. tetherd signs only a TLS 1.3 CertificateVerify input
    /// ([`is_certificate_verify_input`]: 130 or 146 bytes); longer frames are refused here.
    pub const MAX_MESSAGE: usize = 256;

    /// RFC 8446 §4.4.3: 64 spaces, the context string, a zero byte.
    const PAD: [u8; 64] = [0x20; 64];
    const CONTEXTS: [&[u8]; 2] = [b"TLS 1.3, server CertificateVerify", b"TLS 1.3, client CertificateVerify"];

    /// Is `m` what a TLS 1.3 CertificateVerify signs: 64 spaces, the server's or the client's
    /// context string, a zero byte, then a SHA-256 or SHA-384 transcript hash (the hashes of
    /// TLS 1.3's cipher suites)? tetherd signs nothing else, so its keys cannot sign a TLS 1.2
    /// ServerKeyExchange or any statement of the caller's choosing.
    pub fn is_certificate_verify_input(m: &[u8]) -> bool {
        let Some(rest) = m.strip_prefix(&PAD[..]) else { return false };
        CONTEXTS.iter().any(|c| {
            rest.strip_prefix(*c)
                .and_then(|r| r.strip_prefix(&[0u8][..]))
                .is_some_and(|hash| hash.len() == 32 || hash.len() == 48)
        })
    }

    /// The CertificateVerify input for `hash`, as the server (`server`) or the client signs it
    /// (load generators and tests).
    pub fn certificate_verify_input(server: bool, hash: &[u8]) -> Vec<u8> {
        let mut m = PAD.to_vec();
        m.extend_from_slice(CONTEXTS[usize::from(!server)]);
        m.push(0);
        m.extend_from_slice(hash);
        m
    }
    const FIXED: usize = 8 + 2;
    /// Largest request body.
    pub const MAX_BODY: usize = FIXED + MAX_MESSAGE;
    /// Largest response body (a DER ECDSA P-384 signature is at most 104 bytes; reasons are cut).
    pub const MAX_RESPONSE_BODY: usize = 1 + 255;
    /// A buffer that holds any whole request frame.
    pub type RequestBuf = [u8; HEADER_LEN + MAX_BODY];
    /// A buffer that holds any whole response frame.
    pub type ResponseBuf = [u8; HEADER_LEN + MAX_RESPONSE_BODY];

    /// The answer's first byte.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(u8)]
    pub enum Status {
        Ok = 0,
        /// tetherd holds no key under this id (it restarted, or the key was destroyed when
        /// its process exited): fetch a new SVID.
        UnknownKey = 1,
        /// The key exists but the caller may not use it (another process, a process that is
        /// exiting, or one that failed the impersonation checks since issuance).
        Refused = 2,
        BadRequest = 3,
        /// Per-user limits: retry.
        Busy = 4,
        Internal = 5,
        /// The caller's uid or gid changed since the key was issued (setuid): fetch the
        /// identity of its new credentials.
        Stale = 6,
    }

    impl Status {
        fn from_u8(b: u8) -> Option<Self> {
            Some(match b {
                0 => Self::Ok,
                1 => Self::UnknownKey,
                2 => Self::Refused,
                3 => Self::BadRequest,
                4 => Self::Busy,
                5 => Self::Internal,
                6 => Self::Stale,
                _ => return None,
            })
        }
    }

    /// One signing request, borrowed from its frame.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Request<'a> {
        pub key_id: u64,
        pub scheme: u16,
        pub message: &'a [u8],
    }

    fn header(out: &mut [u8], body_len: usize) {
        out[0..2].copy_from_slice(&MAGIC);
        out[2..4].copy_from_slice(&VERSION.to_be_bytes());
        out[4..8].copy_from_slice(&(body_len as u32).to_be_bytes());
    }

    /// Write the whole request frame into `out`; returns its length.
    pub fn encode_request(req: &Request<'_>, out: &mut RequestBuf) -> Result<usize, WireError> {
        if req.message.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge(req.message.len()));
        }
        let body = FIXED + req.message.len();
        header(out, body);
        out[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&req.key_id.to_be_bytes());
        out[HEADER_LEN + 8..HEADER_LEN + FIXED].copy_from_slice(&req.scheme.to_be_bytes());
        out[HEADER_LEN + FIXED..HEADER_LEN + body].copy_from_slice(req.message);
        Ok(HEADER_LEN + body)
    }

    pub fn parse_request(body: &[u8]) -> Result<Request<'_>, WireError> {
        if body.len() < FIXED || body.len() > MAX_BODY {
            return Err(WireError::Malformed(format!("signing request of {} bytes", body.len())));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&body[..8]);
        Ok(Request {
            key_id: u64::from_be_bytes(id),
            scheme: u16::from_be_bytes([body[8], body[9]]),
            message: &body[FIXED..],
        })
    }

    /// Write a whole response frame into `out` (`payload` is cut to fit); returns its length.
    pub fn encode_response(status: Status, payload: &[u8], out: &mut ResponseBuf) -> usize {
        let n = payload.len().min(MAX_RESPONSE_BODY - 1);
        header(out, 1 + n);
        out[HEADER_LEN] = status as u8;
        out[HEADER_LEN + 1..HEADER_LEN + 1 + n].copy_from_slice(&payload[..n]);
        HEADER_LEN + 1 + n
    }

    /// Read one answer to a signing request into `buf` in as few reads as the stream allows:
    /// one `read` of up to a whole response frame (tetherd writes it in one piece), more only
    /// if it comes short. Returns the frame's kind, its body length and how many of its bytes
    /// are in `buf`: the whole frame for a signing answer; for a message frame (an error from
    /// tetherd, or a signing answer too long to be one) only its start, the rest unread.
    pub fn read_response<R: std::io::Read>(
        r: &mut R,
        buf: &mut ResponseBuf,
    ) -> Result<(super::FrameKind, usize, usize), WireError> {
        let mut got = 0;
        let mut want = HEADER_LEN;
        let mut parsed = None;
        loop {
            while got < want {
                match r.read(&mut buf[got..]) {
                    Ok(0) => return Err(WireError::Truncated),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(WireError::Io(e)),
                }
            }
            let (kind, len) = match parsed {
                Some(p) => p,
                None => {
                    let mut h = [0u8; HEADER_LEN];
                    h.copy_from_slice(&buf[..HEADER_LEN]);
                    *parsed.insert(super::parse_any_header(&h)?)
                }
            };
            if kind != super::FrameKind::Sign || len > MAX_RESPONSE_BODY {
                return Ok((kind, len, got.min(HEADER_LEN + len)));
            }
            if got > HEADER_LEN + len {
                return Err(WireError::Malformed("bytes after a signing answer".into()));
            }
            if got == HEADER_LEN + len {
                return Ok((kind, len, got));
            }
            want = HEADER_LEN + len;
        }
    }

    pub fn parse_response(body: &[u8]) -> Result<(Status, &[u8]), WireError> {
        let (&first, rest) = body.split_first().ok_or_else(|| WireError::Malformed("empty signing response".into()))?;
        let status = Status::from_u8(first).ok_or_else(|| WireError::Malformed(format!("signing status {first}")))?;
        Ok((status, rest))
    }
}

/// Blocking helpers over `Read`/`Write`. Timeouts are the caller's socket options.
pub mod io {
    use std::io::{ErrorKind, Read, Write};

    use zeroize::Zeroizing;

    use super::{parse_header, ErrorResponse, Response, WireError, GREETING, GREETING_MAGIC, HEADER_LEN};

    /// Read one frame and return its body. `Ok(None)` is a clean EOF before any byte.
    pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, WireError> {
        let mut header = [0u8; HEADER_LEN];
        if !read_header(r, &mut header)? {
            return Ok(None);
        }
        let len = parse_header(&header)?;
        let mut body = Zeroizing::new(vec![0u8; len]);
        read_body(r, &mut body)?;
        Ok(Some(body))
    }

    /// Read tetherd's [`GREETING`](super::GREETING), the first thing on every connection.
    /// `Ok(Some(error))`: tetherd answered an error in its place (`busy`, or a refusal) and
    /// closed the connection. Bounded by the caller's read timeout.
    pub fn read_greeting<R: Read>(r: &mut R) -> Result<Option<ErrorResponse>, WireError> {
        let mut header = [0u8; HEADER_LEN];
        if !read_header(r, &mut header)? {
            return Err(WireError::Truncated);
        }
        if header == GREETING {
            return Ok(None);
        }
        if header[0..2] == GREETING_MAGIC {
            return Err(WireError::UnsupportedVersion(u16::from_be_bytes([header[2], header[3]])));
        }
        let len = parse_header(&header)?;
        let mut body = Zeroizing::new(vec![0u8; len]);
        read_body(r, &mut body)?;
        match super::decode::<Response>(&body)? {
            Response::Error(e) => Ok(Some(e)),
            _ => Err(WireError::Malformed("expected tetherd's greeting".into())),
        }
    }

    /// Read a frame header. `Ok(false)` is a clean EOF before any byte.
    pub fn read_header<R: Read>(r: &mut R, header: &mut [u8; HEADER_LEN]) -> Result<bool, WireError> {
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(true)
    }

    /// Fill `body` exactly.
    pub fn read_body<R: Read>(r: &mut R, body: &mut [u8]) -> Result<(), WireError> {
        let mut got = 0;
        while got < body.len() {
            match r.read(&mut body[got..]) {
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(())
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

    /// Hands out at most `step` bytes per read, to exercise short reads.
    struct Trickle<'a>(&'a [u8], usize);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn the_greeting_or_an_error_in_its_place_is_read() {
        assert!(io::read_greeting(&mut &GREETING[..]).unwrap().is_none());
        let busy = Response::Error(ErrorResponse { code: ErrorCode::Busy, message: "later".into() });
        let frame = encode(&busy).unwrap();
        assert_eq!(io::read_greeting(&mut &frame[..]).unwrap().unwrap().code, ErrorCode::Busy);
        let mut v9 = GREETING;
        v9[3] = 9;
        assert!(matches!(io::read_greeting(&mut &v9[..]), Err(WireError::UnsupportedVersion(9))));
        assert!(matches!(io::read_greeting(&mut &b""[..]), Err(WireError::Truncated)));
    }

    #[test]
    fn a_signing_answer_is_read_whole_in_one_read_or_in_pieces() {
        let mut frame: sign::ResponseBuf = [0; HEADER_LEN + sign::MAX_RESPONSE_BODY];
        let n = sign::encode_response(sign::Status::Ok, &[7u8; 71], &mut frame);
        for step in [usize::MAX, 1, 5, HEADER_LEN] {
            let mut buf: sign::ResponseBuf = [0; HEADER_LEN + sign::MAX_RESPONSE_BODY];
            let (kind, len, got) = sign::read_response(&mut Trickle(&frame[..n], step), &mut buf).unwrap();
            assert_eq!((kind, len, got), (FrameKind::Sign, 72, n), "step {step}");
            let (status, sig) = sign::parse_response(&buf[HEADER_LEN..got]).unwrap();
            assert_eq!((status, sig), (sign::Status::Ok, &[7u8; 71][..]));
        }
        let mut buf: sign::ResponseBuf = [0; HEADER_LEN + sign::MAX_RESPONSE_BODY];
        assert!(matches!(sign::read_response(&mut Trickle(&frame[..n - 1], 64), &mut buf), Err(WireError::Truncated)));
        let mut two = frame[..n].to_vec();
        two.push(0);
        assert!(matches!(sign::read_response(&mut Trickle(&two, 1024), &mut buf), Err(WireError::Malformed(_))));
        // A message frame (tetherd's error answer): its start, the rest left to the caller.
        let msg = encode(&Request::Status {}).unwrap();
        let (kind, len, got) = sign::read_response(&mut Trickle(&msg, 1024), &mut buf).unwrap();
        assert_eq!((kind, len, got), (FrameKind::Message, msg.len() - HEADER_LEN, msg.len()));
    }

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
    fn signing_frames_round_trip_and_are_bounded() {
        let mut buf: sign::RequestBuf = [0; HEADER_LEN + sign::MAX_BODY];
        let req = sign::Request { key_id: 0x0102_0304_0506_0708, scheme: 0x0403, message: b"to be signed" };
        let n = sign::encode_request(&req, &mut buf).unwrap();
        let (kind, len) = parse_any_header(buf[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!((kind, len), (FrameKind::Sign, n - HEADER_LEN));
        assert_eq!(sign::parse_request(&buf[HEADER_LEN..n]).unwrap(), req);
        let long = [0u8; sign::MAX_MESSAGE + 1];
        assert!(sign::encode_request(&sign::Request { message: &long, ..req }, &mut buf).is_err());
        assert!(matches!(parse_any_header(b"TS\0\x01\0\0\x10\0"), Err(WireError::TooLarge(_))));
        assert!(sign::parse_request(&[0; 9]).is_err());
        let mut out: sign::ResponseBuf = [0; HEADER_LEN + sign::MAX_RESPONSE_BODY];
        let n = sign::encode_response(sign::Status::Refused, &[b'x'; 1000], &mut out);
        assert_eq!(n, out.len(), "a long reason is cut to fit");
        let (status, reason) = sign::parse_response(&out[HEADER_LEN..n]).unwrap();
        assert_eq!((status, reason.len()), (sign::Status::Refused, sign::MAX_RESPONSE_BODY - 1));
        assert!(sign::parse_response(&[9]).is_err());
    }

    #[test]
    fn secret_der_debug_is_redacted() {
        let s = SecretDer(Zeroizing::new(vec![1, 2, 3]));
        assert_eq!(format!("{s:?}"), "SecretDer(<redacted>)");
    }
}
