//! SPIFFE IDs, validated once at the edge (SPIFFE-ID.md), and `allow` patterns.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest SPIFFE ID we accept; the spec requires support up to 2048 bytes.
pub const MAX_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    Empty,
    TooLong(usize),
    WrongScheme,
    MissingTrustDomain,
    BadTrustDomainChar(char),
    /// Userinfo, port, query or fragment: all forbidden.
    ForbiddenPart(&'static str),
    EmptySegment,
    DotSegment,
    TrailingSlash,
    BadPathChar(char),
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("empty SPIFFE ID"),
            Self::TooLong(n) => write!(f, "SPIFFE ID is {n} bytes, longer than {MAX_ID_LEN}"),
            Self::WrongScheme => f.write_str("scheme must be \"spiffe://\""),
            Self::MissingTrustDomain => f.write_str("trust domain is missing"),
            Self::BadTrustDomainChar(c) => {
                write!(f, "trust domain may hold only [a-z0-9._-], found {c:?}")
            }
            Self::ForbiddenPart(p) => write!(f, "SPIFFE IDs may not contain a {p}"),
            Self::EmptySegment => f.write_str("path has an empty segment"),
            Self::DotSegment => f.write_str("path has a \".\" or \"..\" segment"),
            Self::TrailingSlash => f.write_str("path has a trailing '/'"),
            Self::BadPathChar(c) => write!(f, "path segments may hold only [a-zA-Z0-9._-], found {c:?}"),
        }
    }
}

impl std::error::Error for IdError {}

/// A SPIFFE trust domain, e.g. `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`: the ID of the trust domain itself.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::MissingTrustDomain);
        }
        if s.contains('@') {
            return Err(IdError::ForbiddenPart("userinfo"));
        }
        if s.contains(':') {
            return Err(IdError::ForbiddenPart("port"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::BadTrustDomainChar(c));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust-domain>/<path>`.
///
/// The only way to build one is [`FromStr`] (or [`SpiffeId::from_parts`], which validates the
/// same way), so holding a `SpiffeId` proves the string met the spec.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    /// Byte offset where the path starts (== full.len() when the path is empty).
    path_start: usize,
}

impl SpiffeId {
    /// Build `spiffe://<td><path>`, validating the result.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        format!("spiffe://{}{}", td.as_str(), path).parse()
    }

    pub fn trust_domain(&self) -> TrustDomain {
        let td = &self.full["spiffe://".len()..self.path_start];
        TrustDomain(td.to_owned())
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

/// Is `c` allowed in a path segment?
pub fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix("spiffe://").ok_or(IdError::WrongScheme)?;
        if rest.contains('?') {
            return Err(IdError::ForbiddenPart("query"));
        }
        if rest.contains('#') {
            return Err(IdError::ForbiddenPart("fragment"));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::from_str(td)?;
        if !path.is_empty() {
            if path.ends_with('/') {
                return Err(IdError::TrailingSlash);
            }
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(IdError::EmptySegment);
                }
                if seg == "." || seg == ".." {
                    return Err(IdError::DotSegment);
                }
                if let Some(c) = seg.chars().find(|c| !is_path_char(*c)) {
                    return Err(IdError::BadPathChar(c));
                }
            }
        }
        Ok(Self { full: s.to_owned(), path_start: "spiffe://".len() + td.len() })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An `allow` entry: an exact SPIFFE ID, or a prefix ending in `/*` that matches that ID's
/// descendants (`spiffe://example.org/*` matches every ID in the trust domain, but not the
/// trust domain ID itself).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum IdPattern {
    Exact(SpiffeId),
    /// The ID before `/*`; matches IDs whose path continues it with `/`.
    Prefix(SpiffeId),
}

impl IdPattern {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::Prefix(base) => id
                .as_str()
                .strip_prefix(base.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

impl FromStr for IdPattern {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        match s.strip_suffix("/*") {
            Some(base) => Ok(Self::Prefix(base.parse()?)),
            None => Ok(Self::Exact(s.parse()?)),
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Prefix(id) => write!(f, "{id}/*"),
        }
    }
}

impl fmt::Debug for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPattern({self})")
    }
}

impl Serialize for IdPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/web",
            "spiffe://a-b_c.d/x/Y.z/-_",
            "spiffe://td/uid/0/exe/usr/bin/python3.11",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        let id: SpiffeId = "spiffe://example.org/a/b".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/a/b");
    }

    #[test]
    fn invalid_ids_are_rejected_with_a_reason() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://example.org/x", IdError::WrongScheme),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe://Example.org/x", IdError::BadTrustDomainChar('E')),
            ("spiffe://example.org:443/x", IdError::ForbiddenPart("port")),
            ("spiffe://u@example.org/x", IdError::ForbiddenPart("userinfo")),
            ("spiffe://example.org/x?q", IdError::ForbiddenPart("query")),
            ("spiffe://example.org/x#f", IdError::ForbiddenPart("fragment")),
            ("spiffe://example.org//x", IdError::EmptySegment),
            ("spiffe://example.org/./x", IdError::DotSegment),
            ("spiffe://example.org/../x", IdError::DotSegment),
            ("spiffe://example.org/x/", IdError::TrailingSlash),
            ("spiffe://example.org/x%20", IdError::BadPathChar('%')),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<SpiffeId>().unwrap_err(), *want, "{s}");
        }
    }

    #[test]
    fn long_ids_up_to_the_limit() {
        let base = "spiffe://example.org/";
        let ok = format!("{base}{}", "a".repeat(MAX_ID_LEN - base.len()));
        assert!(ok.parse::<SpiffeId>().is_ok());
        let too_long = format!("{ok}a");
        assert_eq!(too_long.parse::<SpiffeId>().unwrap_err(), IdError::TooLong(MAX_ID_LEN + 1));
    }

    #[test]
    fn prefix_patterns_match_descendants_only() {
        let p: IdPattern = "spiffe://example.org/web/*".parse().unwrap();
        let yes: SpiffeId = "spiffe://example.org/web/a".parse().unwrap();
        let no1: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        let no2: SpiffeId = "spiffe://example.org/webx/a".parse().unwrap();
        assert!(p.matches(&yes));
        assert!(!p.matches(&no1));
        assert!(!p.matches(&no2));
        let all: IdPattern = "spiffe://example.org/*".parse().unwrap();
        assert!(all.matches(&yes));
        let other: SpiffeId = "spiffe://example.com/web/a".parse().unwrap();
        assert!(!all.matches(&other));
    }
}
