//! tetherd's configuration: TOML, validated once at load.
//!
//! See `broker/CONFIG.md` for the reference. Every error names the file, the line and column,
//! and the reason; `tetherd` prints it and exits with status 2.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tether_proto::policy::DefaultAction;
use tether_proto::{InboundRule, OutboundRule, Policy, SpiffeId, TrustDomain};
use toml::Spanned;

/// The configuration used when `tetherd` runs without `--config`: the demo.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

pub const DEFAULT_SOCKET_PATH: &str = tether_proto::wire::DEFAULT_SOCKET;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether";
/// Ten minutes. Under broker custody the key cannot leave tetherd, so a certificate is only
/// good for handshakes its process makes, and issuing one is cheap (one P-256 key and one
/// signature, a cache hit for every other connection of the half-life): a short lifetime
/// bounds how long a stolen *certificate* (which is public anyway) names a live identity and
/// how long a revoked entry keeps working, at the cost of one issuance per process per 5 min.
/// Established connections are not affected: TLS authenticates at the handshake.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(600);
/// Shortest accepted `svid_ttl`. Values under a minute are meant for tests: the certificate
/// is backdated by 60 s, so clients refreshing at half of (notAfter - notBefore) refresh early.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(2);
/// Longest accepted `svid_ttl`: 30 days.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(30 * 86400);

/// Where a process's SVID private key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyCustody {
    /// tetherd keeps the key and signs each handshake for the process (the default): the key
    /// never enters the workload, and it is destroyed when the process exits.
    #[default]
    Broker,
    /// The process receives its key (tether before key custody).
    Process,
}

impl KeyCustody {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Broker => "broker",
            Self::Process => "process",
        }
    }
}

/// What a process that matches no `[[entry]]` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Refuse with `no_identity` (the default for config files).
    #[default]
    Deny,
    /// `spiffe://<trust domain>/uid/<uid>/exe/<executable path>` (the embedded default).
    Derive,
}

/// A validated SVID lifetime, written `30s`, `15m`, `1h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(pub Duration);

impl FromStr for Ttl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("bad duration {s:?}: expected a number then s, m, h or d, e.g. \"1h\""))?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(format!("bad duration {s:?}: unit must be s, m, h or d")),
        };
        let d = Duration::from_secs(n.saturating_mul(mult));
        if d < MIN_SVID_TTL || d > MAX_SVID_TTL {
            return Err(format!("duration {s:?} is outside the allowed range 2s..=30d"));
        }
        Ok(Self(d))
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One attestation selector. `unix:user` and `unix:group` are resolved to `Uid`/`Gid` at load.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Selector {
    /// `unix:uid:N` (or `unix:user:NAME`): the uid the kernel reports for the socket peer.
    Uid(u32),
    /// `unix:gid:N` (or `unix:group:NAME`): the peer's primary gid.
    Gid(u32),
    /// `unix:supplementary_gid:N`: one of the `Groups:` in `/proc/<pid>/status`.
    SupplementaryGid(u32),
    /// `unix:path:/abs/path`: the target of `/proc/<pid>/exe`.
    Path(PathBuf),
    /// `unix:sha256:HEX`: the SHA-256 of the executable's contents.
    Sha256([u8; 32]),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(n) => write!(f, "unix:uid:{n}"),
            Self::Gid(n) => write!(f, "unix:gid:{n}"),
            Self::SupplementaryGid(n) => write!(f, "unix:supplementary_gid:{n}"),
            Self::Path(p) => write!(f, "unix:path:{}", p.display()),
            Self::Sha256(h) => write!(f, "unix:sha256:{}", hex(h)),
        }
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Selector {
    /// Parse `unix:KIND:VALUE`, resolving names through `accounts`.
    pub fn parse(s: &str, accounts: &dyn Accounts) -> Result<Self, String> {
        let rest = s
            .strip_prefix("unix:")
            .ok_or_else(|| format!("bad selector {s:?}: must start with \"unix:\""))?;
        let (kind, value) = rest
            .split_once(':')
            .ok_or_else(|| format!("bad selector {s:?}: expected unix:KIND:VALUE"))?;
        let num = |what: &str| {
            value.parse::<u32>().map_err(|_| format!("bad selector {s:?}: {what} must be a number"))
        };
        Ok(match kind {
            "uid" => Self::Uid(num("uid")?),
            "gid" => Self::Gid(num("gid")?),
            "supplementary_gid" => Self::SupplementaryGid(num("gid")?),
            "user" => Self::Uid(
                accounts.uid_of(value).ok_or_else(|| format!("bad selector {s:?}: no user {value:?}"))?,
            ),
            "group" => Self::Gid(
                accounts.gid_of(value).ok_or_else(|| format!("bad selector {s:?}: no group {value:?}"))?,
            ),
            "path" => {
                if !value.starts_with('/') {
                    return Err(format!("bad selector {s:?}: the path must be absolute"));
                }
                Self::Path(PathBuf::from(value))
            }
            "sha256" => {
                let v = value.to_ascii_lowercase();
                if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("bad selector {s:?}: sha256 needs 64 hex digits"));
                }
                let mut h = [0u8; 32];
                for (i, byte) in h.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
                }
                Self::Sha256(h)
            }
            other => {
                return Err(format!(
                    "bad selector {s:?}: unknown kind {other:?} (expected uid, gid, user, group, \
                     supplementary_gid, path or sha256)"
                ))
            }
        })
    }

    /// Does the process described by `facts` satisfy this selector?
    pub fn matches(&self, facts: &ProcessFacts) -> bool {
        match self {
            Self::Uid(n) => facts.uid == *n,
            Self::Gid(n) => facts.gid == *n,
            Self::SupplementaryGid(n) => facts.supplementary_gids.contains(n),
            Self::Path(p) => facts.exe == *p,
            Self::Sha256(h) => facts.exe_sha256.as_ref() == Some(h),
        }
    }
}

/// What attestation learned about a process; selectors match against this.
///
/// Anyone can build one (it is plain data, and tests do); only [`crate::attest`] can vouch for
/// one, by wrapping it in an [`crate::attest::AttestedPeer`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessFacts {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub supplementary_gids: Vec<u32>,
    pub exe: PathBuf,
    /// Present only when some entry has a `unix:sha256` selector.
    pub exe_sha256: Option<[u8; 32]>,
}

/// Resolves `unix:user` and `unix:group` names.
pub trait Accounts {
    fn uid_of(&self, name: &str) -> Option<u32>;
    fn gid_of(&self, name: &str) -> Option<u32>;
}

/// `/etc/passwd` and `/etc/group`, parsed directly (no NSS): names served only by LDAP or
/// systemd-homed are not visible, which is why numeric selectors are preferred.
#[derive(Debug, Clone)]
pub struct EtcFiles {
    pub passwd: PathBuf,
    pub group: PathBuf,
}

impl Default for EtcFiles {
    fn default() -> Self {
        Self { passwd: "/etc/passwd".into(), group: "/etc/group".into() }
    }
}

fn colon_file_lookup(path: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

impl Accounts for EtcFiles {
    fn uid_of(&self, name: &str) -> Option<u32> {
        colon_file_lookup(&self.passwd, name)
    }
    fn gid_of(&self, name: &str) -> Option<u32> {
        colon_file_lookup(&self.group, name)
    }
}

/// A fixed table of names, for tests.
#[derive(Debug, Clone, Default)]
pub struct MapAccounts {
    pub users: HashMap<String, u32>,
    pub groups: HashMap<String, u32>,
}

impl Accounts for MapAccounts {
    fn uid_of(&self, name: &str) -> Option<u32> {
        self.users.get(name).copied()
    }
    fn gid_of(&self, name: &str) -> Option<u32> {
        self.groups.get(name).copied()
    }
}

/// A registration entry: processes matching every selector get `spiffe_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spiffe_id: SpiffeId,
    pub selectors: Vec<Selector>,
    /// Refuse a process that may be impersonating the registered binary (traced, running code
    /// its own user can write, or an executable other than the registered path). Applies only
    /// to entries with a path or sha256 selector; on unless `impersonation_checks = false`.
    pub impersonation_checks: bool,
}

impl Entry {
    /// Does this entry name a binary (path or sha256), the thing an impersonator targets?
    pub fn names_a_binary(&self) -> bool {
        self.selectors.iter().any(|s| matches!(s, Selector::Path(_) | Selector::Sha256(_)))
    }

    /// The registered path, if the entry has a path selector.
    pub fn path(&self) -> Option<&Path> {
        self.selectors.iter().find_map(|s| match s {
            Selector::Path(p) => Some(p.as_path()),
            _ => None,
        })
    }
}

/// Where the signing CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `state_dir/ca.pem` and `state_dir/ca.key`, generated on first start.
    Generated,
    /// A configured root or intermediate. `bundle` (the roots) is required for an intermediate.
    Files { cert: PathBuf, key: PathBuf, bundle: Option<PathBuf> },
}

/// Where tetherd serves Prometheus metrics: `"127.0.0.1:9464"` or `"unix:/run/tether/metrics.sock"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("bad metrics address {s:?}: the unix socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!(
                "bad metrics address {s:?}: expected IP:PORT (e.g. \"127.0.0.1:9464\", \"[::1]:9464\") \
                 or unix:/absolute/path"
            )
        })
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub svid_ttl: Duration,
    pub key_custody: KeyCustody,
    pub unmatched: Unmatched,
    pub ca: CaSource,
    pub federated_bundles: BTreeMap<TrustDomain, PathBuf>,
    pub entries: Vec<Entry>,
    pub policy: Policy,
    /// Prometheus listener; off when `None`.
    pub metrics: Option<MetricsListen>,
    /// `[upstream]`: SVIDs come from a SPIRE agent instead of tetherd's own CA.
    pub upstream: Option<crate::upstream::UpstreamConfig>,
}

/// The file as written. Policy keys are listed here rather than `#[serde(flatten)]`ed, because
/// flatten loses both `deny_unknown_fields` and toml's line numbers. Keep in step with `Policy`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: TrustDomain,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    svid_ttl: Option<Ttl>,
    #[serde(default)]
    key_custody: KeyCustody,
    #[serde(default)]
    unmatched: Unmatched,
    ca_cert: Option<Spanned<PathBuf>>,
    ca_key: Option<PathBuf>,
    ca_bundle: Option<PathBuf>,
    #[serde(default)]
    federated_bundles: BTreeMap<TrustDomain, PathBuf>,
    #[serde(default, rename = "entry")]
    entries: Vec<RawEntry>,
    #[serde(default)]
    inbound: Vec<InboundRule>,
    #[serde(default)]
    outbound: Vec<OutboundRule>,
    #[serde(default)]
    default: DefaultAction,
    metrics: Option<Spanned<String>>,
    upstream: Option<Spanned<crate::upstream::UpstreamConfig>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    spiffe_id: Spanned<SpiffeId>,
    selectors: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "yes")]
    impersonation_checks: bool,
}

fn yes() -> bool {
    true
}

/// An invalid configuration: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}: {}", self.origin, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column of byte `offset` in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

impl Config {
    /// Read and validate `path`.
    pub fn load(path: &Path, accounts: &dyn Accounts) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let src = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { origin: origin.clone(), message: format!("cannot read: {e}") })?;
        Self::parse(&src, &origin, accounts)
    }

    /// The embedded demo configuration.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, "(embedded default)", &EtcFiles::default())
    }

    /// Validate `src`; `origin` names it in errors.
    pub fn parse(src: &str, origin: &str, accounts: &dyn Accounts) -> Result<Self, ConfigError> {
        let err_at = |offset: usize, message: String| {
            let (line, col) = line_col(src, offset);
            ConfigError { origin: origin.to_owned(), message: format!("line {line}, column {col}: {message}") }
        };
        let raw: RawConfig = toml::from_str(src)
            .map_err(|e| ConfigError { origin: origin.to_owned(), message: e.to_string().trim_end().to_owned() })?;

        let mut entries = Vec::with_capacity(raw.entries.len());
        for e in raw.entries {
            let id = e.spiffe_id.get_ref();
            if id.trust_domain() != raw.trust_domain {
                return Err(err_at(
                    e.spiffe_id.span().start,
                    format!("{id} is not in the trust domain {:?}", raw.trust_domain.as_str()),
                ));
            }
            if e.selectors.get_ref().is_empty() {
                return Err(err_at(
                    e.selectors.span().start,
                    "an entry needs at least one selector (an empty list would match every process)"
                        .to_owned(),
                ));
            }
            let mut selectors = Vec::new();
            for s in e.selectors.get_ref() {
                selectors.push(Selector::parse(s.get_ref(), accounts).map_err(|m| err_at(s.span().start, m))?);
            }
            entries.push(Entry {
                spiffe_id: e.spiffe_id.into_inner(),
                selectors,
                impersonation_checks: e.impersonation_checks,
            });
        }

        if raw.federated_bundles.contains_key(&raw.trust_domain) {
            return Err(ConfigError {
                origin: origin.to_owned(),
                message: format!(
                    "federated_bundles names our own trust domain {:?}: its roots would be trusted for \
                     our own identities; put our roots in ca_bundle instead",
                    raw.trust_domain.as_str()
                ),
            });
        }

        let upstream = match raw.upstream {
            None => None,
            Some(u) => {
                let at = u.span().start;
                let u = u.into_inner();
                if !u.admin_socket.is_absolute() {
                    return Err(err_at(at, "[upstream] admin_socket must be an absolute path".to_owned()));
                }
                // Fail closed on settings that would silently not apply: with SPIRE, entries,
                // CA and federation all live in the SPIRE server.
                let unused = [
                    (!entries.is_empty(), "[[entry]] (registration entries live in the SPIRE server)"),
                    (raw.ca_cert.is_some() || raw.ca_key.is_some() || raw.ca_bundle.is_some(), "ca_cert/ca_key/ca_bundle (the SPIRE server is the CA)"),
                    (!raw.federated_bundles.is_empty(), "federated_bundles (federated bundles come from the agent)"),
                    (raw.unmatched != Unmatched::Deny, "unmatched (a process SPIRE does not know gets no identity)"),
                ];
                if let Some((_, what)) = unused.iter().find(|(set, _)| *set) {
                    return Err(err_at(at, format!("{what} cannot be used with [upstream] kind = \"spire\"")));
                }
                Some(u)
            }
        };

        let ca = match (raw.ca_cert, raw.ca_key) {
            (None, None) => {
                if raw.ca_bundle.is_some() {
                    return Err(ConfigError {
                        origin: origin.to_owned(),
                        message: "ca_bundle is only meaningful with ca_cert and ca_key".to_owned(),
                    });
                }
                CaSource::Generated
            }
            (Some(cert), Some(key)) => CaSource::Files { cert: cert.into_inner(), key, bundle: raw.ca_bundle },
            (Some(cert), None) => return Err(err_at(cert.span().start, "ca_cert needs ca_key".to_owned())),
            (None, Some(_)) => {
                return Err(ConfigError { origin: origin.to_owned(), message: "ca_key needs ca_cert".to_owned() })
            }
        };

        let metrics = match raw.metrics {
            Some(m) => Some(m.get_ref().parse::<MetricsListen>().map_err(|e| err_at(m.span().start, e))?),
            None => None,
        };

        Ok(Self {
            trust_domain: raw.trust_domain,
            socket: raw.socket.unwrap_or_else(|| DEFAULT_SOCKET_PATH.into()),
            state_dir: raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            svid_ttl: raw.svid_ttl.map_or(DEFAULT_SVID_TTL, |t| t.0),
            key_custody: raw.key_custody,
            unmatched: raw.unmatched,
            ca,
            federated_bundles: raw.federated_bundles,
            entries,
            policy: Policy { inbound: raw.inbound, outbound: raw.outbound, default: raw.default },
            metrics,
            upstream,
        })
    }

    /// Things that are valid but probably not meant, for `tetherd --check-config` and the log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.entries {
            if e.names_a_binary() && !e.selectors.iter().any(|s| matches!(s, Selector::Uid(_))) {
                out.push(format!(
                    "entry {}: a path or sha256 selector without a uid selector: any local user who \
                     runs that binary gets this identity; add unix:uid or unix:user",
                    e.spiffe_id
                ));
            }
            if e.names_a_binary() && !e.impersonation_checks {
                out.push(format!(
                    "entry {}: impersonation_checks = false: a process of the same user can obtain this \
                     identity by running the binary under ptrace or with its own LD_PRELOAD",
                    e.spiffe_id
                ));
            }
        }
        out
    }

    /// Does any entry need the executable's hash? Hashing is skipped otherwise.
    pub fn needs_exe_hash(&self) -> bool {
        self.entries.iter().any(|e| e.selectors.iter().any(|s| matches!(s, Selector::Sha256(_))))
    }

    /// The entry that applies to `facts`.
    ///
    /// Every selector of an entry must match. When several entries match, the one with the most
    /// selectors (the most specific) wins; among equally specific entries, the first in the file
    /// wins. `None` when no entry matches.
    pub fn matching_entry(&self, facts: &ProcessFacts) -> Option<&Entry> {
        let mut best: Option<&Entry> = None;
        for e in &self.entries {
            if e.selectors.iter().all(|s| s.matches(facts))
                && best.is_none_or(|b| e.selectors.len() > b.selectors.len())
            {
                best = Some(e);
            }
        }
        best
    }

    /// The SPIFFE ID for `facts`: the matching entry's, else (with `unmatched = "derive"`) the
    /// derived `spiffe://<td>/uid/<uid>/exe/<path>`; else why there is none.
    pub fn identity_for(&self, facts: &ProcessFacts) -> Result<SpiffeId, String> {
        if let Some(e) = self.matching_entry(facts) {
            return Ok(e.spiffe_id.clone());
        }
        match self.unmatched {
            Unmatched::Deny => Err(format!(
                "no registration entry matches uid {} running {} (unmatched = \"deny\")",
                facts.uid,
                facts.exe.display()
            )),
            Unmatched::Derive => derived_id(&self.trust_domain, facts.uid, &facts.exe),
        }
    }
}

/// `spiffe://<td>/uid/<uid>/exe/<exe>`: the executable's path as the ID's path, exactly. A path
/// the ID cannot carry as it is (a character outside `[a-zA-Z0-9._-]` in a segment, `.` or `..`
/// segments, which the spec forbids, a deleted file's ` (deleted)`, or an ID longer than the
/// spec's limit) gets no derived ID: rewriting it would make two executables one identity
/// (`/opt/a b` and `/opt/a_b` were both `.../opt/a_b` before 2026-12-07), and an entry can
/// name such a binary with any ID.
pub fn derived_id(td: &TrustDomain, uid: u32, exe: &Path) -> Result<SpiffeId, String> {
    let refuse = |why: &str| {
        Err(format!(
            "no derived identity for uid {uid} running {}: {why}; add an [[entry]] for it",
            exe.display()
        ))
    };
    let Some(text) = exe.to_str() else { return refuse("the path is not UTF-8") };
    let mut path = format!("/uid/{uid}/exe");
    for seg in text.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || !seg.chars().all(tether_proto::spiffe::is_path_char) {
            return refuse("its path has characters a SPIFFE ID cannot carry (outside [a-zA-Z0-9._-], \".\", \"..\", or a deleted file)");
        }
        path.push('/');
        path.push_str(seg);
    }
    SpiffeId::from_parts(td, &path).or_else(|e| refuse(&format!("{e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;

    fn accounts() -> MapAccounts {
        let mut a = MapAccounts::default();
        a.users.insert("alice".into(), 1000);
        a.groups.insert("staff".into(), 50);
        a
    }

    fn facts() -> ProcessFacts {
        ProcessFacts {
            pid: 42,
            uid: 1000,
            gid: 50,
            supplementary_gids: vec![50, 27],
            exe: "/usr/bin/python3.11".into(),
            exe_sha256: Some([0xab; 32]),
        }
    }

    fn cfg(body: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("trust_domain = \"example.org\"\n{body}"), "test.toml", &accounts())
    }

    #[test]
    fn each_selector_kind_matches_and_mismatches() {
        let a = accounts();
        let f = facts();
        let yes = [
            "unix:uid:1000",
            "unix:user:alice",
            "unix:gid:50",
            "unix:group:staff",
            "unix:supplementary_gid:27",
            "unix:path:/usr/bin/python3.11",
            &format!("unix:sha256:{}", "AB".repeat(32)),
        ];
        for s in yes {
            assert!(Selector::parse(s, &a).unwrap().matches(&f), "{s}");
        }
        let no = [
            "unix:uid:0",
            "unix:gid:0",
            "unix:supplementary_gid:0",
            "unix:path:/usr/bin/python3",
            &format!("unix:sha256:{}", "cd".repeat(32)),
        ];
        for s in no {
            assert!(!Selector::parse(s, &a).unwrap().matches(&f), "{s}");
        }
        let unhashed = ProcessFacts { exe_sha256: None, ..facts() };
        assert!(!Selector::parse(yes[6], &a).unwrap().matches(&unhashed));
    }

    #[test]
    fn bad_selectors_are_rejected_with_a_reason() {
        let a = accounts();
        for (s, why) in [
            ("uid:0", "must start with"),
            ("unix:uid", "unix:KIND:VALUE"),
            ("unix:uid:root", "must be a number"),
            ("unix:user:mallory", "no user"),
            ("unix:group:nobody-here", "no group"),
            ("unix:path:bin/sh", "absolute"),
            ("unix:sha256:abcd", "64 hex"),
            ("unix:cgroup:x", "unknown kind"),
        ] {
            let e = Selector::parse(s, &a).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn most_specific_entry_wins_and_ties_go_to_file_order() {
        let c = cfg(r#"
[[entry]]
spiffe_id = "spiffe://example.org/any-alice"
selectors = ["unix:uid:1000"]
[[entry]]
spiffe_id = "spiffe://example.org/python"
selectors = ["unix:uid:1000", "unix:path:/usr/bin/python3.11"]
[[entry]]
spiffe_id = "spiffe://example.org/python-staff"
selectors = ["unix:gid:50", "unix:path:/usr/bin/python3.11"]
[[entry]]
spiffe_id = "spiffe://example.org/root"
selectors = ["unix:uid:0", "unix:gid:50", "unix:path:/usr/bin/python3.11"]
"#)
        .unwrap();
        assert_eq!(c.identity_for(&facts()).unwrap().as_str(), "spiffe://example.org/python");
        let other_exe = ProcessFacts { exe: "/bin/sh".into(), ..facts() };
        assert_eq!(c.identity_for(&other_exe).unwrap().as_str(), "spiffe://example.org/any-alice");
        let bob = ProcessFacts { uid: 1001, ..facts() };
        assert_eq!(c.identity_for(&bob).unwrap().as_str(), "spiffe://example.org/python-staff");
        let stranger = ProcessFacts { uid: 7, gid: 7, ..other_exe };
        assert!(c.identity_for(&stranger).unwrap_err().contains("unmatched = \"deny\""), "unmatched defaults to deny");
    }

    #[test]
    fn unmatched_derive_names_the_path_exactly_or_refuses() {
        let c = cfg("unmatched = \"derive\"").unwrap();
        let f = |exe: &str| ProcessFacts { uid: 65534, exe: exe.into(), ..facts() };
        assert_eq!(
            c.identity_for(&f("/opt/my-app//v1.2/bin_x")).unwrap().as_str(),
            "spiffe://example.org/uid/65534/exe/opt/my-app/v1.2/bin_x"
        );
        // Before 2026-12-07 these were rewritten, and two executables could share an ID
        // (`/opt/a b` and `/opt/a_b`).
        for exe in ["/opt/a b", "/opt/ü", "/opt/x/../y", "/opt/./y", "/usr/bin/app (deleted)"] {
            let e = c.identity_for(&f(exe)).unwrap_err();
            assert!(e.contains("no derived identity") && e.contains("[[entry]]"), "{exe}: {e}");
        }
        assert_ne!(c.identity_for(&f("/opt/a b")).ok(), c.identity_for(&f("/opt/a_b")).ok());
    }

    #[test]
    fn config_errors_carry_line_and_reason() {
        let cases = [
            ("bogus = 1", "unknown field", 2),
            ("[[entry]]\nspiffe_id = \"spiffe://example.org/a/\"\nselectors = [\"unix:uid:0\"]", "trailing", 3),
            ("[[entry]]\nspiffe_id = \"spiffe://other.org/a\"\nselectors = [\"unix:uid:0\"]", "not in the trust domain", 3),
            ("[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = [\"unix:uid:x\"]", "must be a number", 4),
            ("[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = []", "at least one selector", 4),
            ("svid_ttl = \"1y\"", "unit must be", 2),
            ("svid_ttl = \"1s\"", "outside the allowed range", 2),
            ("svid_ttl = \"31d\"", "outside the allowed range", 2),
            ("unmatched = \"allow\"", "unknown variant", 2),
            ("metrics = \"localhost:9464\"", "bad metrics address", 2),
            ("metrics = \"unix:run/m.sock\"", "must be absolute", 2),
        ];
        for (body, why, line) in cases {
            let e = cfg(body).unwrap_err().to_string();
            assert!(e.contains(why), "{body}: {e}");
            assert!(e.contains(&format!("line {line}")), "{body}: {e}");
            assert!(e.contains("test.toml"), "{e}");
        }
    }

    #[test]
    fn federated_bundles_for_our_own_trust_domain_are_refused() {
        let e = cfg("[federated_bundles]\n\"example.org\" = \"/etc/tether/x.pem\"").unwrap_err().to_string();
        assert!(e.contains("our own trust domain"), "{e}");
        cfg("[federated_bundles]\n\"partner.org\" = \"/etc/tether/p.pem\"").unwrap();
    }

    #[test]
    fn binary_selectors_without_a_uid_are_warned_about() {
        let c = cfg(
            "[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = [\"unix:path:/usr/bin/a\"]\n\
             [[entry]]\nspiffe_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:0\", \"unix:path:/usr/bin/b\"]\n\
             [[entry]]\nspiffe_id = \"spiffe://example.org/c\"\nselectors = [\"unix:uid:0\", \"unix:path:/usr/bin/c\"]\n\
             impersonation_checks = false\n",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("/a") && w[0].contains("without a uid"), "{w:?}");
        assert!(w[1].contains("/c") && w[1].contains("impersonation_checks = false"), "{w:?}");
        assert!(c.entries[1].impersonation_checks && !c.entries[2].impersonation_checks);
    }

    #[test]
    fn embedded_default_is_the_demo() {
        let c = Config::embedded_default().unwrap();
        assert_eq!(c.trust_domain.as_str(), "tether.internal");
        assert_eq!(c.unmatched, Unmatched::Derive);
        assert!(c.entries.is_empty());
        assert_eq!(c.svid_ttl, DEFAULT_SVID_TTL);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(c.ca, CaSource::Generated);
        assert!(c.policy.inbound_rule(8443).is_some());
        assert!(c.policy.outbound_rule("127.0.0.1:8443".parse().unwrap()).is_some());
        assert!(c.policy.outbound_rule("[::1]:8443".parse().unwrap()).is_some());
    }

    #[test]
    fn metrics_listeners_parse() {
        assert_eq!(cfg("").unwrap().metrics, None);
        let tcp = cfg("metrics = \"127.0.0.1:9464\"").unwrap().metrics.unwrap();
        assert_eq!(tcp, MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(tcp.to_string(), "127.0.0.1:9464");
        let unix = cfg("metrics = \"unix:/run/tether/metrics.sock\"").unwrap().metrics.unwrap();
        assert_eq!(unix, MetricsListen::Unix("/run/tether/metrics.sock".into()));
        assert_eq!(unix.to_string(), "unix:/run/tether/metrics.sock");
    }

    #[test]
    fn ttl_units() {
        assert_eq!("90s".parse::<Ttl>().unwrap().0, Duration::from_secs(90));
        assert_eq!("15m".parse::<Ttl>().unwrap().0, Duration::from_secs(900));
        assert_eq!("2h".parse::<Ttl>().unwrap().0, Duration::from_secs(7200));
        assert_eq!("30d".parse::<Ttl>().unwrap().0, MAX_SVID_TTL);
        for bad in ["", "h", "1", "1.5h", "-1h", "1 h x", "99999999999999999999d"] {
            assert!(bad.parse::<Ttl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn etc_files_are_parsed_without_nss() {
        let a = EtcFiles::default();
        assert_eq!(a.uid_of("root"), Some(0));
        assert_eq!(a.gid_of("root"), Some(0));
        assert_eq!(a.uid_of("no-such-user-here"), None);
    }
}
