//! Fleet mode without SPIRE: one offline root, one short-lived intermediate per host.
//!
//! - [`offline`]: `tether ca init` (the root) and `tether ca intermediate` (a host's CA).
//! - [`cli`]: the `tether ca` subcommands.
//! - [`chain`]: checking that a configured intermediate really was issued by a root of the
//!   bundle tetherd will serve, so a mismatched pair fails at start, not at every peer.
//!
//! The layout on disk:
//!
//! ```text
//! ROOT_DIR/root.pem  root.key (0600)                  -- stays offline
//! HOST_DIR/intermediate.pem  intermediate.key (0600)  -- tetherd's ca_cert / ca_key
//! HOST_DIR/bundle.pem                                 -- tetherd's ca_bundle (the root)
//! ```
//!
//! The intermediate has `pathLenConstraint = 0` (it signs SVIDs only) and carries NO URI name
//! constraint: rustls-webpki (the verifier of tether's shim, and of other rustls-based SPIFFE
//! peers) rejects every URI SAN under a CA with a URI permitted subtree (it does not implement
//! URI constraints and fails closed), and rcgen cannot emit one. The trust domain is bound by
//! the verifiers instead: a peer's chain is checked only against the roots of the trust domain
//! named in its own SPIFFE ID. `tests/fleet_ca.rs` pins the webpki behaviour.

pub mod chain;
pub mod cli;
pub mod offline;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Default lifetime of `tether ca init`'s root: ten years.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(3650 * 86400);
/// Default lifetime of a host intermediate: seven days. Revoking a host means not re-issuing
/// its intermediate, so this is the longest a removed host keeps issuing trusted SVIDs.
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(7 * 86400);
/// Longest accepted intermediate lifetime (a longer one defeats revocation by expiry).
pub const MAX_INTERMEDIATE_TTL: Duration = Duration::from_secs(90 * 86400);
/// Longest accepted root lifetime.
pub const MAX_ROOT_TTL: Duration = Duration::from_secs(20 * 365 * 86400);
/// Shortest accepted lifetime of either (shorter values are for tests of expiry).
pub const MIN_CA_TTL: Duration = Duration::from_secs(10);

/// Why a fleet CA operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum FleetError {
    Io {
        path: PathBuf,
        error: io::Error,
    },
    /// Refusing to overwrite an existing root.
    Exists(PathBuf),
    /// A directory that would hold a key is readable or writable by group or others.
    InsecureDir {
        path: PathBuf,
        mode: u32,
    },
    /// Bad input: a certificate, key, host name or lifetime.
    Invalid(String),
    Ca(crate::ca::CaError),
}

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, error } => write!(f, "{}: {error}", path.display()),
            Self::Exists(p) => write!(f, "{} already exists: refusing to overwrite a root CA", p.display()),
            Self::InsecureDir { path, mode } => write!(
                f,
                "{}: directory has mode {mode:04o}; a key directory must not be accessible to group or others (chmod 700)",
                path.display()
            ),
            Self::Invalid(why) => f.write_str(why),
            Self::Ca(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for FleetError {}

impl From<crate::ca::CaError> for FleetError {
    fn from(e: crate::ca::CaError) -> Self {
        Self::Ca(e)
    }
}

impl From<rcgen::Error> for FleetError {
    fn from(e: rcgen::Error) -> Self {
        Self::Ca(crate::ca::CaError::Rcgen(e))
    }
}

/// Parse a CA lifetime (`90s`, `30m`, `12h`, `7d`, `10y`) within `min..=max`.
pub fn parse_lifetime(s: &str, min: Duration, max: Duration) -> Result<Duration, FleetError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || {
        FleetError::Invalid(format!(
            "bad lifetime {s:?}: expected a number then s, m, h, d or y, e.g. \"7d\""
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "y" => 365 * 86400,
        _ => return Err(bad()),
    };
    let d = Duration::from_secs(n.saturating_mul(mult));
    if d < min || d > max {
        return Err(FleetError::Invalid(format!(
            "lifetime {s:?} is outside the allowed range {}s..={}d",
            min.as_secs(),
            max.as_secs() / 86400
        )));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_within_bounds() {
        let d = |s| parse_lifetime(s, MIN_CA_TTL, MAX_INTERMEDIATE_TTL);
        assert_eq!(d("7d").ok(), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(d("90s").ok(), Some(Duration::from_secs(90)));
        assert!(d("1y").is_err(), "over 90 days");
        assert!(d("5s").is_err(), "under the minimum");
        assert!(d("7w").is_err());
        assert!(d("-1d").is_err());
        assert!(d("").is_err());
    }
}
