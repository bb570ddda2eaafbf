//! Broker key custody: tetherd keeps each process's SVID private key and signs its TLS 1.3
//! CertificateVerify for it, so the key never enters the workload.
//!
//! A [`KeyStore`] holds keys by *owner*: the (pid, start time) the SVID was issued to, with a
//! pidfd for that process. A signing request is honoured only when
//!
//! - it names a key the store holds ([`Refusal::UnknownKey`] otherwise: tetherd restarted, or
//!   the key was destroyed),
//! - it comes from the owner itself (the server has already checked the kernel's per-message
//!   credentials against the connection's peer, and that peer's start time and pidfd; here the
//!   peer must *be* the owner, so a process holding another's certificate gets
//!   [`Refusal::NotOwner`]), and
//! - the owner still passes the impersonation checks that applied at issuance
//!   ([`crate::impersonation::recheck`]); a failure destroys every key of the owner and marks
//!   it so that it is never issued a key again (code may have been injected).
//!
//! Keys die with their process: a reaper thread waits on the owners' pidfds in one epoll set
//! (a pidfd polls readable when its process exits) and destroys the owner's keys at once.
//! Without pidfds (kernels before 6.5) the periodic sweep does it, and every signature
//! re-checks the start time anyway.
//!
//! The key material is the PKCS#8 document (kept in a zeroizing buffer, so that a key from any
//! source, such as an upstream SPIRE agent, can be held as is) and ring's parsed key pair,
//! whose bytes are overwritten when it is dropped ([`crate::sys::Wiped`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::attest;
use crate::cache::ProcessKey;
use crate::config::ProcessFacts;
use crate::impersonation::{self, Impersonation};
use crate::metrics::Metrics;
use crate::sys;

mod nonces;
pub use nonces::Nonces;

/// TLS SignatureScheme `ecdsa_secp256r1_sha256`: the only scheme tetherd's P-256 keys sign.
pub const ECDSA_NISTP256_SHA256: u16 = 0x0403;
/// Bound on owners (processes) with held keys. Full: dead owners are dropped, then issuance
/// is refused until processes exit.
pub const MAX_OWNERS: usize = 16384;
/// Each uid's share of [`MAX_OWNERS`] (root and tetherd's own uid: only the global bound), so
/// that one user's live processes cannot take every other user's broker custody away.
pub const MAX_OWNERS_PER_UID: usize = 1024;
/// Keys kept per owner: the current one and the one before it (a handshake that started just
/// before a refresh still signs).
const KEYS_PER_OWNER: usize = 2;

/// Why a signing request was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum Refusal {
    /// No key by that id (never issued, destroyed, or issued by an earlier tetherd).
    UnknownKey,
    /// The key belongs to another process instance.
    NotOwner {
        owner: ProcessKey,
        caller: ProcessKey,
    },
    /// The owner failed the impersonation checks since its key was issued.
    Impersonation(Impersonation),
    /// A scheme this key does not sign, or a message that is not a CertificateVerify input.
    BadRequest(&'static str),
    /// The key is past its certificate's notAfter.
    Expired,
    /// The caller's uid or gid is not the one the key was issued for (it called setuid or
    /// setgid since): it must fetch the identity of its new credentials.
    CredentialsChanged { issued: (u32, u32), now: (u32, u32) },
    Internal,
}

impl Refusal {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::NotOwner { .. } => "not_owner",
            Self::Impersonation(_) => "impersonation",
            Self::BadRequest(_) => "bad_request",
            Self::Expired => "expired",
            Self::CredentialsChanged { .. } => "credentials_changed",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey => f.write_str("tetherd holds no such key (fetch a new SVID)"),
            Self::NotOwner { owner, caller } => write!(
                f,
                "key belongs to pid {} (start {}), not to the caller pid {} (start {})",
                owner.0, owner.1, caller.0, caller.1
            ),
            Self::Impersonation(e) => write!(f, "{e}; this process's identity is revoked"),
            Self::BadRequest(why) => f.write_str(why),
            Self::Expired => f.write_str("the key's certificate has expired"),
            Self::CredentialsChanged { issued, now } => write!(
                f,
                "the key was issued to uid {} gid {}, and the process now runs as uid {} gid {} (fetch the identity of its new credentials)",
                issued.0, issued.1, now.0, now.1
            ),
            Self::Internal => f.write_str("signing failed"),
        }
    }
}

/// Whose key it is and which impersonation checks apply to it.
#[derive(Debug, Clone)]
pub struct Owner {
    pub process: ProcessKey,
    pub facts: ProcessFacts,
    /// `Some(registered path)` when the issuing entry names a binary and has
    /// `impersonation_checks` on: then every signature re-runs them.
    pub checks: Option<Option<PathBuf>>,
}

/// A private key tetherd holds. Never printed, wiped on drop.
pub struct HeldKey {
    id: u64,
    not_after: u64,
    pair: sys::Wiped<EcdsaKeyPair>,
    /// The private scalar, for signatures made with a precomputed nonce ([`Nonces`]).
    d: sys::Wiped<p256::Scalar>,
    /// The key as issued (or as an upstream gave it), wiped on drop.
    _pkcs8: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for HeldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl HeldKey {
    /// Parse a PKCS#8 P-256 key from any source. The buffer is kept (zeroizing) as the key's
    /// canonical form.
    pub fn from_pkcs8(
        pkcs8: Zeroizing<Vec<u8>>,
        not_after: u64,
    ) -> Result<Self, String> {
        use p256::pkcs8::DecodePrivateKey;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
            .map_err(|e| format!("not a P-256 PKCS#8 key: {e}"))?;
        // The same document ring accepted; `SecretKey` wipes itself on drop.
        let d = p256::SecretKey::from_pkcs8_der(&pkcs8).map_err(|e| format!("not a P-256 PKCS#8 key: {e}"))?;
        Ok(Self {
            id: 0,
            not_after,
            pair: sys::Wiped::new(pair),
            d: sys::Wiped::new(*d.to_nonzero_scalar()),
            _pkcs8: pkcs8,
        })
    }

    /// The uncompressed public point, to match against a certificate.
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }
}

struct Held {
    token: u64,
    /// The owner's uid, whose share of owners this one takes, and its gid: the credentials its
    /// keys were issued for, which every signing frame must carry.
    uid: u32,
    gid: u32,
    keys: Vec<Arc<HeldKey>>,
    /// Kept open so the epoll set watches it; closing it removes it from the set.
    _pidfd: Option<OwnedFd>,
    /// The impersonation checks every signature re-runs, if the issuing entry has them. Shared
    /// with signatures in flight, so that the signing path clones one `Arc`, nothing else.
    checks: Option<Arc<Checks>>,
}

/// What [`impersonation::recheck`] needs for one owner. Its status file is closed when the
/// owner's keys are destroyed (at its exit at the latest) and the last signature in flight
/// ends: at most one per owner, so at most [`MAX_OWNERS`] in all.
struct Checks {
    facts: ProcessFacts,
    registered: Option<PathBuf>,
    /// Serialises the owner's re-checks.
    watch: Mutex<impersonation::Watch>,
}

#[derive(Default)]
struct Tables {
    owners: HashMap<ProcessKey, Held>,
    /// key id -> owner
    keys: HashMap<u64, ProcessKey>,
    /// epoll token -> owner
    tokens: HashMap<u64, ProcessKey>,
    /// Owners whose identity was revoked for their lifetime (failed a re-check).
    revoked: HashSet<ProcessKey>,
    /// Owners per uid.
    per_uid: HashMap<u32, usize>,
}

/// The keys tetherd holds, by owner.
pub struct KeyStore {
    tables: Mutex<Tables>,
    epoll: Option<sys::Epoll>,
    next_token: AtomicU64,
    rng: SystemRandom,
    per_uid_limit: usize,
    nonces: Nonces,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("owners", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for KeyStore {
    fn default() -> Self {
        let epoll = sys::Epoll::new()
            .map_err(|e| warn!(error = %e, "no epoll set for pidfds; held keys are destroyed by the sweep"))
            .ok();
        Self {
            tables: Mutex::default(),
            epoll,
            next_token: AtomicU64::new(1),
            rng: SystemRandom::new(),
            per_uid_limit: MAX_OWNERS_PER_UID,
            nonces: Nonces::default(),
        }
    }
}

/// Count and audit-log a destruction of `process`'s held keys.
fn destroyed(metrics: &Metrics, process: ProcessKey, reason: &'static str) {
    metrics.key_destroyed(reason);
    info!(target: "tether::audit", event = "key_destroyed", pid = process.0, reason, "held keys destroyed");
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl KeyStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Owners with held keys.
    pub fn len(&self) -> usize {
        self.lock().owners.len()
    }

    /// The precomputed nonces signatures use ([`Nonces::refill_forever`] fills them).
    pub fn nonces(&self) -> &Nonces {
        &self.nonces
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Was this process's identity revoked (it failed a per-signature re-check)?
    pub fn is_revoked(&self, process: ProcessKey) -> bool {
        self.lock().revoked.contains(&process)
    }

    /// Does the store hold `key_id` for `process`?
    pub fn holds(&self, process: ProcessKey, key_id: u64) -> bool {
        self.lock().keys.get(&key_id) == Some(&process)
    }

    /// Hold `key` for `owner`, watching `pidfd` (the owner's, when the kernel has pidfds).
    /// Returns the key's id. Refused when the store is full of live owners.
    pub fn insert(
        &self,
        owner: Owner,
        pidfd: Option<OwnedFd>,
        mut key: HeldKey,
    ) -> Result<u64, &'static str> {
        let mut id_bytes = [0u8; 8];
        self.rng
            .fill(&mut id_bytes)
            .map_err(|_| "no randomness for a key id")?;
        key.id = u64::from_ne_bytes(id_bytes) | 1;
        let id = key.id;
        let process = owner.process;
        // Opened before the lock (a refresh of a known owner drops it unused), then proved to
        // belong to the owner: its pidfd has not polled readable, or its start time is the same.
        let watch = match &owner.checks {
            Some(_) => Some(
                impersonation::Watch::open(process.0, || match &pidfd {
                    Some(fd) => matches!(sys::pidfd_exited(fd), Ok(false)),
                    None => attest::is_running(process.0, process.1),
                })
                .map_err(|_| "cannot open the process's /proc status for its impersonation re-checks")?,
            ),
            None => None,
        };
        let mut t = self.lock();
        if t.revoked.contains(&process) {
            return Err("this process's identity was revoked");
        }
        let uid = owner.facts.uid;
        let limited = uid != 0 && uid != sys::effective_uid();
        let uid_full = |t: &Tables| limited && t.per_uid.get(&uid).copied().unwrap_or(0) >= self.per_uid_limit;
        if !t.owners.contains_key(&process) && uid_full(&t) {
            drop(t);
            self.sweep_uid(uid);
            t = self.lock();
            if uid_full(&t) {
                return Err("this user's processes already hold their share of tetherd's keys (1,024 live processes)");
            }
        }
        if !t.owners.contains_key(&process) && t.owners.len() >= MAX_OWNERS {
            drop(t);
            self.sweep(None);
            t = self.lock();
            if t.owners.len() >= MAX_OWNERS {
                return Err("tetherd holds keys for too many live processes");
            }
        }
        let tables = &mut *t;
        tables.keys.insert(id, process);
        if let Some(h) = tables.owners.get_mut(&process) {
            h.keys.push(Arc::new(key));
            while h.keys.len() > KEYS_PER_OWNER {
                let old = h.keys.remove(0);
                tables.keys.remove(&old.id);
            }
            return Ok(id);
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        if let (Some(ep), Some(fd)) = (&self.epoll, &pidfd) {
            if let Err(e) = ep.add(fd, token) {
                warn!(error = %e, pid = process.0, "cannot watch the pidfd; the sweep destroys this key");
            }
        }
        t.tokens.insert(token, process);
        *t.per_uid.entry(uid).or_insert(0) += 1;
        t.owners.insert(
            process,
            Held {
                token,
                uid,
                gid: owner.facts.gid,
                keys: vec![Arc::new(key)],
                _pidfd: pidfd,
                checks: owner.checks.zip(watch).map(|(registered, watch)| {
                    Arc::new(Checks { facts: owner.facts, registered, watch: Mutex::new(watch) })
                }),
            },
        );
        Ok(id)
    }

    /// Destroy every key of `process`. Returns whether there were any.
    pub fn destroy(&self, process: ProcessKey) -> bool {
        let held = {
            let mut t = self.lock();
            let Some(h) = t.owners.remove(&process) else {
                return false;
            };
            if let Some(n) = t.per_uid.get_mut(&h.uid) {
                *n -= 1;
                if *n == 0 {
                    t.per_uid.remove(&h.uid);
                }
            }
            t.tokens.remove(&h.token);
            for k in &h.keys {
                t.keys.remove(&k.id);
            }
            h
        };
        // Dropped outside the lock: the keys are wiped here (unless a signature in flight
        // still holds one; it is wiped when that signature ends) and the pidfd is closed.
        drop(held);
        true
    }

    /// Sign `message` with `key_id` for the caller `caller`, whose uid and gid this message
    /// carries as `ids` (already attested for this message by the server). Writes the DER
    /// signature into `out`, returning its length.
    pub fn sign(
        &self,
        caller: ProcessKey,
        ids: (u32, u32),
        key_id: u64,
        scheme: u16,
        message: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        if scheme != ECDSA_NISTP256_SHA256 {
            return Err(Refusal::BadRequest(
                "tetherd's keys sign ecdsa_secp256r1_sha256 only",
            ));
        }
        let (key, checks) = {
            let t = self.lock();
            let owner = *t.keys.get(&key_id).ok_or(Refusal::UnknownKey)?;
            if owner != caller {
                return Err(Refusal::NotOwner { owner, caller });
            }
            let h = t.owners.get(&owner).ok_or(Refusal::UnknownKey)?;
            if (h.uid, h.gid) != ids {
                // A process that dropped privileges keeps its pid and start time: the key of
                // the uid it ran as before must not sign for the one it runs as now.
                return Err(Refusal::CredentialsChanged { issued: (h.uid, h.gid), now: ids });
            }
            let key = h
                .keys
                .iter()
                .find(|k| k.id == key_id)
                .ok_or(Refusal::UnknownKey)?
                .clone();
            (key, h.checks.clone())
        };
        if now_unix() >= key.not_after {
            return Err(Refusal::Expired);
        }
        // Checked once the caller is known to own a live key (the refusals above keep their
        // meaning for anyone else's frames).
        if !tether_proto::wire::sign::is_certificate_verify_input(message) {
            return Err(Refusal::BadRequest(
                "tetherd signs only a TLS 1.3 CertificateVerify input",
            ));
        }
        if let Some(c) = checks {
            let mut watch = c.watch.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = impersonation::recheck(&c.facts, c.registered.as_deref(), &mut watch) {
                drop(watch);
                self.lock().revoked.insert(caller);
                self.destroy(caller);
                return Err(Refusal::Impersonation(e));
            }
        }
        if let Some(len) = self.nonces.sign(&key.d, message, out) {
            return Ok(len);
        }
        let sig = key
            .pair
            .sign(&self.rng, message)
            .map_err(|_| Refusal::Internal)?;
        let sig = sig.as_ref();
        let dst = out.get_mut(..sig.len()).ok_or(Refusal::Internal)?;
        dst.copy_from_slice(sig);
        Ok(sig.len())
    }

    /// Destroy the keys of `uid`'s owners that have exited (its share is full).
    fn sweep_uid(&self, uid: u32) {
        let owners: Vec<ProcessKey> =
            self.lock().owners.iter().filter(|(_, h)| h.uid == uid).map(|(p, _)| *p).collect();
        for p in owners {
            if !attest::is_running(p.0, p.1) {
                self.destroy(p);
            }
        }
    }

    /// Destroy keys whose owner has exited, and keys past notAfter. `metrics` counts them.
    pub fn sweep(&self, metrics: Option<&Metrics>) -> usize {
        let owners: Vec<ProcessKey> = self.lock().owners.keys().copied().collect();
        let mut n = 0;
        for p in owners {
            if !attest::is_running(p.0, p.1) && self.destroy(p) {
                n += 1;
                if let Some(m) = metrics {
                    destroyed(m, p, "exited");
                }
            }
        }
        let now = now_unix();
        let mut guard = self.lock();
        let t = &mut *guard;
        let expired: Vec<u64> = t
            .owners
            .values()
            .flat_map(|h| h.keys.iter().filter(|k| now >= k.not_after).map(|k| k.id))
            .collect();
        for id in expired {
            if let Some(p) = t.keys.remove(&id) {
                if let Some(h) = t.owners.get_mut(&p) {
                    h.keys.retain(|k| k.id != id);
                }
                if let Some(m) = metrics {
                    m.key_destroyed("expired");
                }
            }
        }
        // Revocations of processes that have exited can be forgotten.
        t.revoked.retain(|&(pid, st)| attest::is_running(pid, st));
        n
    }

    /// The reaper: destroy an owner's keys as soon as its pidfd says it exited, and sweep every
    /// `sweep` for owners without pidfds and expired keys. Runs forever.
    pub fn reap(&self, metrics: &Metrics, sweep: Duration) {
        let Some(ep) = &self.epoll else {
            loop {
                std::thread::sleep(sweep);
                self.sweep(Some(metrics));
            }
        };
        let mut ready = Vec::with_capacity(64);
        let mut last_sweep = std::time::Instant::now();
        loop {
            ready.clear();
            if let Err(e) = ep.wait(&mut ready, sweep) {
                warn!(error = %e, "epoll_wait on pidfds failed");
                std::thread::sleep(sweep);
            }
            for token in &ready {
                let process = self.lock().tokens.get(token).copied();
                if let Some(p) = process {
                    if self.destroy(p) {
                        destroyed(metrics, p, "exited");
                    }
                }
            }
            if last_sweep.elapsed() >= sweep {
                self.sweep(Some(metrics));
                last_sweep = std::time::Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;

    fn key() -> HeldKey {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        HeldKey::from_pkcs8(Zeroizing::new(doc.as_ref().to_vec()), now_unix() + 600).unwrap()
    }

    fn owner(p: ProcessKey) -> Owner {
        Owner {
            process: p,
            facts: ProcessFacts {
                pid: p.0,
                ..Default::default()
            },
            checks: None,
        }
    }

    #[test]
    fn only_the_owner_signs_and_destroyed_keys_are_unknown() {
        let store = KeyStore::default();
        let me = (1, 100);
        let k = key();
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            k.public_key().to_vec(),
        );
        let id = store.insert(owner(me), None, k).unwrap();
        let mut sig = [0u8; 128];
        let m = cv(true);
        let n = store
            .sign(me, ROOT, id, ECDSA_NISTP256_SHA256, &m, &mut sig)
            .unwrap();
        public.verify(&m, &sig[..n]).unwrap();
        assert!(matches!(
            store.sign((1, 101), ROOT, id, ECDSA_NISTP256_SHA256, &m, &mut sig),
            Err(Refusal::NotOwner { .. })
        ));
        assert!(matches!(
            store.sign(me, ROOT, id, 0x0804, &m, &mut sig),
            Err(Refusal::BadRequest(_))
        ));
        assert!(store.destroy(me));
        assert!(matches!(
            store.sign(me, ROOT, id, ECDSA_NISTP256_SHA256, &m, &mut sig),
            Err(Refusal::UnknownKey)
        ));
        assert!(store.is_empty());
    }

    /// uid and gid 0, as [`owner`] records them.
    const ROOT: (u32, u32) = (0, 0);

    fn cv(server: bool) -> Vec<u8> {
        tether_proto::wire::sign::certificate_verify_input(server, &[7u8; 32])
    }

    /// Found by review: a key signed any message of up to 256 bytes (a TLS 1.2 ServerKeyExchange
    /// input, or a statement of the caller's choosing). Only a TLS 1.3 CertificateVerify input is
    /// signed now.
    #[test]
    fn only_a_tls13_certificate_verify_input_is_signed() {
        let store = KeyStore::default();
        let me = (3, 300);
        let id = store.insert(owner(me), None, key()).unwrap();
        let mut sig = [0u8; 128];
        for good in [cv(true), cv(false), tether_proto::wire::sign::certificate_verify_input(false, &[1u8; 48])] {
            assert!(store.sign(me, ROOT, id, ECDSA_NISTP256_SHA256, &good, &mut sig).is_ok());
        }
        let mut short_hash = cv(true);
        short_hash.pop();
        let mut tls12 = vec![0u8; 32 + 32 + 4];
        tls12[64] = 3;
        let mut wrong_pad = cv(false);
        wrong_pad[0] = b'!';
        for bad in [b"owner message".to_vec(), short_hash, tls12, wrong_pad, Vec::new()] {
            assert!(
                matches!(store.sign(me, ROOT, id, ECDSA_NISTP256_SHA256, &bad, &mut sig), Err(Refusal::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    /// Found by review: a process that called setuid kept its pid and start time, so the key
    /// issued for its old uid still signed its handshakes. The frame's uid and gid must be the
    /// ones the key was issued for.
    #[test]
    fn a_key_does_not_sign_for_its_owner_after_a_change_of_uid_or_gid() {
        let store = KeyStore::default();
        let me = (4, 400);
        let id = store.insert(owner(me), None, key()).unwrap();
        let mut sig = [0u8; 128];
        for other in [(33, 0), (0, 33), (33, 33)] {
            assert!(matches!(
                store.sign(me, other, id, ECDSA_NISTP256_SHA256, &cv(true), &mut sig),
                Err(Refusal::CredentialsChanged { issued: (0, 0), .. })
            ));
        }
        assert!(store.sign(me, ROOT, id, ECDSA_NISTP256_SHA256, &cv(true), &mut sig).is_ok());
    }

    #[test]
    fn an_owner_keeps_its_two_newest_keys() {
        let store = KeyStore::default();
        let me = (2, 200);
        let ids: Vec<u64> = (0..3)
            .map(|_| store.insert(owner(me), None, key()).unwrap())
            .collect();
        assert!(!store.holds(me, ids[0]));
        assert!(store.holds(me, ids[1]) && store.holds(me, ids[2]));
    }

    /// Review F3: the owner table had only a global bound, so one uid's 16,384 live processes
    /// took broker custody from every other uid. Each uid now has its share.
    #[test]
    fn one_uid_cannot_hold_more_than_its_share_of_owners() {
        let store = KeyStore { per_uid_limit: 3, ..KeyStore::default() };
        let mut kids: Vec<_> =
            (0..5).map(|_| std::process::Command::new("sleep").arg("30").spawn().unwrap()).collect();
        let live = |c: &std::process::Child| {
            let pid = c.id() as i32;
            let mut o = owner((pid, attest::start_time(pid).unwrap()));
            o.facts.uid = 4242;
            o
        };
        for c in &kids[..3] {
            store.insert(live(c), None, key()).unwrap();
        }
        let over = store.insert(live(&kids[3]), None, key());
        assert!(over.is_err_and(|e| e.contains("share")), "a fourth owner of the uid was held");
        // Another uid is not affected.
        let mut other = live(&kids[4]);
        other.facts.uid = 4343;
        store.insert(other, None, key()).unwrap();
        // When one of the uid's processes exits, its slot comes back.
        kids[0].kill().unwrap();
        kids[0].wait().unwrap();
        store.insert(live(&kids[3]), None, key()).unwrap();
        for c in &mut kids[1..] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[test]
    fn held_key_debug_is_redacted() {
        let k = key();
        assert!(!format!("{k:?}").contains(&format!("{:?}", k._pkcs8.as_slice())));
        assert!(format!("{k:?}").contains("<redacted>"));
    }
}
