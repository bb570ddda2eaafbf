//! This process's identity: its SVID, trust bundle and policy, fetched from tetherd on first
//! need, cached, and refreshed at half-life. After fork the child forgets the parent's and
//! fetches its own (tetherd attests the child as the new process it is).
//!
//! Under broker key custody (tetherd's default) the SVID comes without its private key: the
//! [`CertifiedKey`] holds a [`RemoteKey`] and each handshake's signature is made by tetherd.
//! A restarted tetherd holds none of the old keys, so an identity is re-fetched when the
//! socket file is a new one (a restart binds a new socket: one `stat`, already made for the
//! policy stamp) or when tetherd answers a signing request with "unknown key".
//!
//! A process that tetherd attests but gives no identity (no entry matches it, under
//! `unmatched = "deny"`) still gets the policy ([`policy_without_identity`]), so that
//! destinations no rule protects pass through; only protected ones fail.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tether_proto::wire::{self, ErrorCode, Request, Response, SvidResponse};
use tether_proto::{Policy, SpiffeId};

use crate::settings;
use crate::sys::tetherd::Greeted;
use crate::sync::Lock as Mutex;
use crate::tls::handshake::Credentials;
use crate::tls::remote_key::RemoteKey;
use crate::tls::verify::TrustStore;

/// How long we wait for tetherd, per operation.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failed fetch, do not ask again for this long (keeps a down broker from turning
/// every connect into a 5 s stall), unless the socket file changed meanwhile: a restarted
/// tetherd binds a new one, and is asked at once.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

pub(crate) struct Identity {
    pub(crate) id: SpiffeId,
    pub(crate) creds: Credentials,
    pub(crate) policy: Policy,
    pub(crate) serial: String,
    refresh_at: u64,
    not_after: u64,
    /// The broker socket's mtime when the policy was fetched. tetherd touches the socket on
    /// every config reload, so a different mtime means "re-read the policy".
    policy_stamp: Option<SystemTime>,
    /// Under broker custody: the id of the key tetherd holds for us, and the inode of the
    /// socket of the tetherd that holds it.
    remote: Option<(u64, Option<u64>)>,
}

impl Identity {
    /// Under broker custody: tetherd holds the private key and signs for us.
    pub(crate) fn key_held_by_broker(&self) -> bool {
        self.remote.is_some()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Why we have no identity.
#[derive(Debug, Clone)]
pub(crate) enum IdentityError {
    /// tetherd could not be reached.
    Unreachable(String),
    /// tetherd attested us and no registration entry matches (the message says what it saw).
    NoIdentity(String),
    /// tetherd answered with another error.
    Refused(String),
    /// tetherd's answer was unusable.
    Invalid(String),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(w) => write!(f, "tetherd unreachable: {w}"),
            Self::NoIdentity(w) => write!(f, "no identity for this process (add a registration entry): {w}"),
            Self::Refused(w) => write!(f, "tetherd refused an identity: {w}"),
            Self::Invalid(w) => write!(f, "tetherd sent an unusable SVID: {w}"),
        }
    }
}

struct State {
    current: Option<Arc<Identity>>,
    /// When the last fetch failed, why, and the socket's mtime then.
    last_failure: Option<(std::time::Instant, IdentityError, Option<SystemTime>)>,
}

static STATE: Mutex<State> = Mutex::new(State { current: None, last_failure: None });
/// The policy alone, for a process with no identity, and the socket mtime it was read at.
static POLICY_ONLY: Mutex<Option<(Option<SystemTime>, Arc<Policy>)>> = Mutex::new(None);
/// Serialises fetches, so a burst of first connections makes one broker round trip.
static FETCH: Mutex<()> = Mutex::new(());

fn now_secs() -> u64 {
    crate::clock::real().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The identity to use now, fetching or refreshing as needed. A refresh that fails while the
/// cached SVID is still valid keeps the cached one.
pub(crate) fn current() -> Result<Arc<Identity>, IdentityError> {
    if let Some(id) = fresh() {
        let (stamp, ino) = socket_stamp();
        if id.remote.is_some_and(|(_, held_by)| ino.is_some() && ino != held_by) {
            // A new tetherd: it holds none of the old keys. Fetch a new SVID.
            forget_identity(&id);
            return current();
        }
        if stamp == id.policy_stamp {
            return Ok(id);
        }
        return Ok(refresh_policy(id, stamp));
    }
    let _one = FETCH.lock();
    if let Some(id) = fresh() {
        return Ok(id);
    }
    {
        let st = STATE.lock();
        if let Some((at, e, stamp)) = &st.last_failure {
            if crate::clock::mono().saturating_duration_since(*at) < RETRY_AFTER_FAILURE && *stamp == policy_stamp() {
                return usable(&st).ok_or_else(|| e.clone());
            }
        }
    }
    let stamp = policy_stamp();
    match fetch() {
        Ok(id) => {
            let id = Arc::new(id);
            let mut st = STATE.lock();
            st.current = Some(id.clone());
            st.last_failure = None;
            Ok(id)
        }
        Err(e) => {
            let mut st = STATE.lock();
            st.last_failure = Some((crate::clock::mono(), e.clone(), stamp));
            usable(&st).ok_or(e)
        }
    }
}

/// The identity to run a handshake with now: the current one, or `captured` (taken when a
/// blocking accept began, possibly long ago) if none can be had. A server that sits in one
/// `accept` across a refresh or a tetherd restart must not keep presenting the old SVID, nor
/// keep asking tetherd to sign with a key it no longer holds.
pub(crate) fn latest(captured: &Arc<Identity>) -> Arc<Identity> {
    current().unwrap_or_else(|_| captured.clone())
}

/// How long a read of the socket's mtime and inode stands for: a reload (mtime) or a tetherd
/// restart (inode) reaches a running process within this, and a process making thousands of
/// connections a second makes ten stats, not thousands.
const STAMP_FRESH: Duration = Duration::from_millis(100);

/// The socket's (mtime, inode), as last read, and when (a copy: no lock is held across the stat).
type Stamp = (Option<SystemTime>, Option<u64>);
/// Aged on the wall clock, whose read the same connection's [`fresh`] shares (see `clock`): a
/// clock stepped back reads as stale (one more `stat`), never as fresh for longer.
static STAMP: Mutex<Option<(SystemTime, Stamp)>> = Mutex::new(None);

/// The broker socket's mtime (the policy generation's stamp).
fn policy_stamp() -> Option<SystemTime> {
    socket_stamp().0
}

/// The broker socket's mtime and inode: one `stat`, at most every [`STAMP_FRESH`].
fn socket_stamp() -> Stamp {
    if let Some((at, stamp)) = *STAMP.lock() {
        if crate::clock::real().duration_since(at).is_ok_and(|age| age < STAMP_FRESH) {
            return stamp;
        }
    }
    let stamp = match std::fs::metadata(&settings::get().socket) {
        Ok(m) => (m.modified().ok(), Some(m.ino())),
        Err(_) => (None, None),
    };
    *STAMP.lock() = Some((crate::clock::real(), stamp));
    stamp
}

/// Drop `id` as the current identity (if it still is), so the next connection fetches anew.
fn forget_identity(id: &Arc<Identity>) {
    let mut st = STATE.lock();
    if st.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, id)) {
        st.current = None;
    }
}

/// tetherd no longer holds `key_id` (it said so when asked to sign): forget the identity
/// that uses it, so the next connection fetches a new SVID.
pub(crate) fn forget_key(key_id: u64) {
    let mut st = STATE.lock();
    if st.current.as_ref().is_some_and(|c| c.remote.is_some_and(|(k, _)| k == key_id)) {
        st.current = None;
        st.last_failure = None;
    }
}

/// The policy changed on the broker: fetch it and swap it in, keeping the SVID. If the fetch
/// fails, keep the policy we have (it was valid a moment ago) and retry on the next connect.
fn refresh_policy(old: Arc<Identity>, stamp: Option<SystemTime>) -> Arc<Identity> {
    let _one = FETCH.lock();
    {
        let st = STATE.lock();
        if let Some(cur) = st.current.as_ref().filter(|c| c.policy_stamp == stamp) {
            return cur.clone();
        }
    }
    let policy = match call(&Request::FetchPolicy {}) {
        Ok(Response::Policy(p)) => p.policy,
        _ => return old,
    };
    crate::log::Line::new("policy").kv("decision", "reloaded").kv("local_id", &old.id).emit();
    let new = Arc::new(Identity {
        id: old.id.clone(),
        creds: Credentials { key: old.creds.key.clone(), trust: old.creds.trust.clone() },
        policy,
        serial: old.serial.clone(),
        refresh_at: old.refresh_at,
        not_after: old.not_after,
        policy_stamp: stamp,
        remote: old.remote,
    });
    STATE.lock().current = Some(new.clone());
    new
}

fn fresh() -> Option<Arc<Identity>> {
    let st = STATE.lock();
    st.current.as_ref().filter(|i| now_secs() < i.refresh_at).cloned()
}

fn usable(st: &State) -> Option<Arc<Identity>> {
    st.current.as_ref().filter(|i| now_secs() < i.not_after).cloned()
}

fn fetch() -> Result<Identity, IdentityError> {
    let (stamp, ino) = socket_stamp();
    match call(&Request::FetchSvid {})? {
        Response::Svid(svid) => build(svid, stamp, ino),
        Response::Error(e) if e.code == ErrorCode::NoIdentity => Err(IdentityError::NoIdentity(e.message)),
        Response::Error(e) => Err(IdentityError::Refused(format!("{}: {}", e.code, e.message))),
        _ => Err(IdentityError::Invalid("unexpected response type".into())),
    }
}

/// The policy in force, for a process that tetherd attested and gave no identity (`why` is
/// [`IdentityError::NoIdentity`]). `None` for any other failure, or if the policy cannot be
/// fetched: then nothing is known and every TCP connection fails closed. Re-read when the
/// socket's mtime says the config was reloaded.
pub(crate) fn policy_without_identity(why: &IdentityError) -> Option<Arc<Policy>> {
    if !matches!(why, IdentityError::NoIdentity(_)) {
        return None;
    }
    let stamp = policy_stamp();
    if let Some((at, p)) = POLICY_ONLY.lock().as_ref() {
        if *at == stamp {
            return Some(p.clone());
        }
    }
    let _one = FETCH.lock();
    let policy = match call(&Request::FetchPolicy {}) {
        Ok(Response::Policy(p)) => Arc::new(p.policy),
        _ => return None,
    };
    *POLICY_ONLY.lock() = Some((stamp, policy.clone()));
    Some(policy)
}

/// Pauses before asking again when tetherd answers `busy` (its per-user share is in use).
const BUSY_RETRIES: [Duration; 3] = [Duration::from_millis(10), Duration::from_millis(40), Duration::from_millis(100)];

/// One request/response round trip with tetherd on a fresh connection, retried a few times
/// (150 ms in all) while tetherd answers `busy`.
pub(crate) fn call(req: &Request) -> Result<Response, IdentityError> {
    let mut pauses = BUSY_RETRIES.iter();
    loop {
        let r = call_once(req);
        crate::clock::waited();
        match r? {
            Response::Error(e) if e.code == ErrorCode::Busy => match pauses.next() {
                Some(p) => {
                    std::thread::sleep(*p);
                    crate::clock::waited();
                }
                None => return Ok(Response::Error(e)),
            },
            r => return Ok(r),
        }
    }
}

fn call_once(req: &Request) -> Result<Response, IdentityError> {
    let unreachable = |e: io::Error| IdentityError::Unreachable(e.to_string());
    let mut s = match crate::sys::tetherd::connect(&settings::get().socket, BROKER_TIMEOUT).map_err(unreachable)? {
        Greeted::Ready(s) => s,
        Greeted::Refused(e) => return Ok(Response::Error(e)),
    };
    let frame = wire::encode(req).map_err(|e| IdentityError::Invalid(e.to_string()))?;
    wire::io::write_frame(&mut s, &frame).map_err(|e| IdentityError::Unreachable(e.to_string()))?;
    let body = wire::io::read_frame(&mut s)
        .map_err(|e| IdentityError::Unreachable(e.to_string()))?
        .ok_or_else(|| IdentityError::Unreachable("tetherd closed the connection".into()))?;
    wire::decode::<Response>(&body).map_err(|e| IdentityError::Invalid(e.to_string()))
}

fn build(svid: SvidResponse, policy_stamp: Option<SystemTime>, socket_ino: Option<u64>) -> Result<Identity, IdentityError> {
    let invalid = |w: String| IdentityError::Invalid(w);
    if svid.cert_chain.is_empty() {
        return Err(invalid("empty certificate chain".into()));
    }
    let chain: Vec<CertificateDer<'static>> =
        svid.cert_chain.iter().map(|c| CertificateDer::from(c.0.clone())).collect();
    let (signing, remote): (Arc<dyn rustls::sign::SigningKey>, _) = match (&svid.private_key, svid.key_id) {
        (Some(pkcs8), _) => {
            // The PKCS#8 bytes are borrowed from the zeroizing buffer in `svid.private_key`.
            let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&pkcs8.0[..]));
            // `any_ecdsa_type` borrows: no unzeroized copy of the PKCS#8 bytes is made here.
            let k = rustls::crypto::ring::sign::any_ecdsa_type(&key_der).map_err(|e| invalid(format!("private key: {e}")))?;
            (k, None)
        }
        (None, Some(key_id)) => {
            let k = RemoteKey::new(key_id, &svid.cert_chain[0].0).map_err(invalid)?;
            (k, Some((key_id, socket_ino)))
        }
        (None, None) => return Err(invalid("neither a private key nor a key held by tetherd".into())),
    };
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|e| invalid(format!("key does not match certificate: {e}")))?;
    let own_td = svid.spiffe_id.trust_domain();
    let bundles = std::iter::once((own_td, svid.bundle.iter().map(|d| d.0.clone()).collect()))
        .chain(svid.federated.iter().map(|(td, ds)| (td.clone(), ds.iter().map(|d| d.0.clone()).collect())));
    let (trust, bad) = TrustStore::new(bundles);
    if bad > 0 {
        // A bundle root that does not parse trusts nothing; peers that chain only to it fail.
        crate::log::Line::new("identity")
            .kv("decision", "bundle_roots_skipped")
            .kv("local_id", &svid.spiffe_id)
            .kv("skipped", bad)
            .kv("reason", "bundle roots that do not parse as X.509 trust anchors were ignored")
            .emit();
    }
    let refresh_at = svid.refresh_at();
    Ok(Identity {
        id: svid.spiffe_id,
        creds: Credentials { key: Arc::new(key), trust: Arc::new(trust) },
        policy: svid.policy,
        serial: svid.serial,
        refresh_at,
        not_after: svid.not_after,
        policy_stamp,
        remote,
    })
}

/// Fork lock order: FETCH, STATE, then POLICY_ONLY, as in `current` and
/// `policy_without_identity`, then STAMP (the innermost: taken under FETCH or STATE) (released by
/// `crate::fork`; the policy-only cache is kept in the child: the policy is the same for every
/// process).
pub(crate) fn atfork_prepare() {
    FETCH.hold_for_fork();
    STATE.hold_for_fork();
    POLICY_ONLY.hold_for_fork();
    STAMP.hold_for_fork();
}

/// In the fork child, after every lock is released.
pub(crate) fn atfork_child() {
    // The child is a new process: it must fetch (and be attested for) its own SVID.
    let mut st = STATE.lock();
    st.current = None;
    st.last_failure = None;
}
