//! The crate's error type, and the one place errors become wire error codes.

use std::fmt;
use std::io;

use tether_proto::wire::{ErrorCode, ErrorResponse, WireError};

use crate::attest::AttestError;
use crate::ca::CaError;
use crate::config::ConfigError;
use crate::impersonation::Impersonation;

#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    Config(ConfigError),
    Attest(AttestError),
    /// Attested, but the process may be impersonating the binary its entry names.
    Impersonation(Impersonation),
    Ca(CaError),
    /// `[upstream]` (the SPIRE agent) gave no SVID.
    Upstream(crate::upstream::UpstreamError),
    /// Attested, but no entry grants an identity (and `unmatched = "deny"`).
    NoIdentity { reason: String },
    /// Framing or message errors on the socket.
    Wire(WireError),
    /// The broker answered with an error (client side).
    Refused(ErrorResponse),
    /// The broker answered with a message we did not ask for (client side).
    UnexpectedResponse(&'static str),
    /// The broker socket could not be reached (client side).
    Connect { path: std::path::PathBuf, error: io::Error },
    Io(io::Error),
    /// A CLI usage or environment problem, explained for people.
    Cli(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::Attest(e) => e.fmt(f),
            Self::Impersonation(e) => write!(f, "refused as a possible impersonation: {e}"),
            Self::Ca(e) => e.fmt(f),
            Self::Upstream(e) => e.fmt(f),
            Self::NoIdentity { reason } => write!(f, "no identity: {reason}"),
            Self::Wire(e) => e.fmt(f),
            Self::Refused(r) => write!(f, "tetherd refused ({}): {}", r.code, r.message),
            Self::UnexpectedResponse(what) => write!(f, "tetherd sent an unexpected response (wanted {what})"),
            Self::Connect { path, error } => {
                write!(f, "cannot reach tetherd at {}: {error} (is it running? set --socket or $TETHER_SOCKET)", path.display())
            }
            Self::Io(e) => e.fmt(f),
            Self::Cli(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}
impl From<AttestError> for Error {
    fn from(e: AttestError) -> Self {
        Self::Attest(e)
    }
}
impl From<Impersonation> for Error {
    fn from(e: Impersonation) -> Self {
        Self::Impersonation(e)
    }
}
impl From<CaError> for Error {
    fn from(e: CaError) -> Self {
        Self::Ca(e)
    }
}
impl From<crate::upstream::UpstreamError> for Error {
    fn from(e: crate::upstream::UpstreamError) -> Self {
        Self::Upstream(e)
    }
}
impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}
impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl Error {
    /// What a client is told. Internal details (paths, CA errors) stay in the log.
    pub fn to_wire(&self) -> ErrorResponse {
        let (code, message) = match self {
            Self::Attest(e) => (ErrorCode::AttestationFailed, e.to_string()),
            Self::Impersonation(_) => (ErrorCode::AttestationFailed, self.to_string()),
            Self::NoIdentity { reason } => (ErrorCode::NoIdentity, reason.clone()),
            Self::Upstream(e) => {
                use crate::upstream::UpstreamError as U;
                match e {
                    U::NoIdentity(why) => (ErrorCode::NoIdentity, why.clone()),
                    U::Attest(a) => (ErrorCode::AttestationFailed, a.to_string()),
                    // Transient: the shim retries briefly and fails this connection closed.
                    U::Unavailable(_) | U::TooMany => (ErrorCode::Busy, e.to_string()),
                    U::Invalid(_) => (ErrorCode::Internal, e.to_string()),
                }
            }
            Self::Wire(e) => (e.code(), e.to_string()),
            Self::Refused(r) => (r.code, r.message.clone()),
            Self::Config(_)
            | Self::Ca(_)
            | Self::UnexpectedResponse(_)
            | Self::Connect { .. }
            | Self::Io(_)
            | Self::Cli(_) => {
                (ErrorCode::Internal, "internal broker error; see the tetherd log".to_owned())
            }
        };
        ErrorResponse { code, message }
    }
}
