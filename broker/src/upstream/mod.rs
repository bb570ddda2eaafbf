//! SPIRE as tetherd's upstream: per-process X.509-SVIDs from the local SPIRE agent.
//!
//! With `[upstream] kind = "spire"`, tetherd does not sign SVIDs. It is a *delegate* of the
//! local SPIRE agent (the agent's `authorized_delegates` names tetherd's own SPIFFE ID) and
//! asks the agent's Delegated Identity API, over the agent's admin Unix socket:
//!
//! - `SubscribeToX509SVIDs{pid}` once per attested process: the agent attests that pid with its
//!   own workload attestors and streams the SVIDs its registration entries grant, again on
//!   every rotation or entry change (an empty list: the process has no identity any more);
//! - `SubscribeToX509Bundles` once: the local and federated bundles, again on every change.
//!
//! Local policy (`[[inbound]]`/`[[outbound]]`) still comes from tetherd's config.
//!
//! **PID reuse.** The API leaves it to the delegate. Each subscription holds the process's
//! pidfd (the one the kernel gave with the caller's socket, or one opened and then checked
//! against the attested start time) for its whole life; when the pidfd turns readable (the
//! process exited) the subscription is dropped at once, before the pid can name anyone else.
//! Every SVID that arrives is checked against the pidfd first (still the same, still alive).
//!
//! **Agent down.** Established connections never depend on tetherd. While the agent is
//! unreachable, new issuance fails closed with `busy` and a message naming the socket and the
//! error; the bundle stream reconnects with backoff (at most [`MAX_BACKOFF`]) and issuance
//! resumes when it is back, with no tetherd restart.
//!
//! **Threads.** tonic needs tokio. The runtime is a current-thread runtime on one thread of its
//! own ("spire-upstream"), started here; the rest of tetherd stays thread-per-connection and
//! talks to it through a channel and per-subscription condvars (see [`Upstream::svid_for`]).
//!
//! **Keys.** The PKCS#8 key SPIRE hands over stays in tetherd's memory in a zeroizing buffer;
//! the result is an [`IssuedSvid`], the same value tetherd's own CA issuance yields.

mod agent;
mod proto;
mod svid;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tether_proto::wire::Der;
use tether_proto::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

use crate::attest::{self, AttestedPeer, Peer};
use crate::ca::IssuedSvid;
use crate::cache::ProcessKey;

/// How long a FetchSvid waits for the agent's first answer on a new subscription.
pub const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause between two attempts to reach the agent.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Live per-process subscriptions; a FetchSvid beyond this is answered `busy`.
pub const MAX_SUBSCRIPTIONS: usize = 16384;

/// `[upstream]` in tetherd's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub kind: UpstreamKind,
    /// The agent's `admin_socket_path`.
    pub admin_socket: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UpstreamKind {
    Spire,
}

/// Why the upstream gave no SVID.
#[derive(Debug)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The agent cannot be reached, refused tetherd, or did not answer in time.
    Unavailable(String),
    /// The agent answered: no registration entry grants this process an identity.
    NoIdentity(String),
    /// The process exited, or its pid now names another process.
    Attest(attest::AttestError),
    /// The agent sent something unusable (wrong trust domain, key not matching, ...).
    Invalid(String),
    /// [`MAX_SUBSCRIPTIONS`] processes are subscribed already.
    TooMany,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "SPIRE agent unavailable: {why}"),
            Self::NoIdentity(why) => f.write_str(why),
            Self::Attest(e) => e.fmt(f),
            Self::Invalid(why) => write!(f, "the SPIRE agent sent an unusable SVID: {why}"),
            Self::TooMany => write!(
                f,
                "{MAX_SUBSCRIPTIONS} processes hold SPIRE subscriptions already"
            ),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// What the upstream yields for one process: the same parts tetherd's own CA issuance
/// produces, ready for the SvidResponse (or for broker key custody).
pub struct UpstreamSvid {
    pub spiffe_id: SpiffeId,
    pub issued: IssuedSvid,
    /// The roots of our own trust domain.
    pub bundle: Vec<Der>,
    /// The bundles of the trust domains this workload federates with (from its entry).
    pub federated: BTreeMap<TrustDomain, Vec<Der>>,
}

impl fmt::Debug for UpstreamSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("issued", &self.issued)
            .field("bundle", &self.bundle.len())
            .field("federated", &self.federated.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One SVID from the agent, checked (see `svid::parse`). Debug redacts the key (IssuedSvid's).
#[derive(Debug)]
struct Fetched {
    spiffe_id: SpiffeId,
    issued: IssuedSvid,
    federates_with: Vec<TrustDomain>,
}

enum SubState {
    /// Subscribed; no answer yet.
    Pending,
    Ready(Arc<Fetched>),
    /// The agent's latest answer had no SVID.
    NoIdentity,
    /// The stream failed (agent down, refused, bad data); the subscription is gone.
    Failed(String),
    /// The process exited; the subscription is gone.
    Ended,
}

/// One process's subscription, shared by the tokio task that follows the stream and the
/// connection threads that wait for its answers.
struct Subscription {
    pid: i32,
    /// What tetherd attested when the agent was asked. The agent attested the pid then; a
    /// process that has since exec'd another binary or changed ids keeps its pid and start
    /// time, so it must be asked about again (see [`Upstream::subscription`]).
    attested: Attested,
    state: Mutex<SubState>,
    changed: Condvar,
    /// Ends the subscription's task (superseded).
    cancel: tokio::sync::Notify,
}

/// The facts an agent's unix attestor derives selectors from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attested {
    uid: u32,
    gid: u32,
    supplementary_gids: Vec<u32>,
    exe: PathBuf,
}

impl Attested {
    fn of(a: &AttestedPeer) -> Self {
        let f = a.facts();
        Self {
            uid: f.uid,
            gid: f.gid,
            supplementary_gids: f.supplementary_gids.clone(),
            exe: f.exe.clone(),
        }
    }
}

impl Subscription {
    fn set(&self, s: SubState) {
        *lock(&self.state) = s;
        self.changed.notify_all();
    }
}

#[derive(Debug, Clone)]
enum AgentState {
    Connecting,
    Up,
    Down { why: String, since: Instant },
}

/// Trust domain -> its X.509 authorities.
type Bundles = BTreeMap<TrustDomain, Vec<Der>>;

struct Shared {
    socket: PathBuf,
    trust_domain: TrustDomain,
    agent: Mutex<AgentState>,
    /// Trust domain -> X.509 authorities, from the bundle stream (local and federated).
    bundles: Mutex<Option<Arc<Bundles>>>,
    bundles_changed: Condvar,
    subs: Mutex<HashMap<ProcessKey, Arc<Subscription>>>,
}

impl Shared {
    /// Forget `sub` if it is still the one registered under `key`.
    fn remove(&self, key: ProcessKey, sub: &Arc<Subscription>) {
        let mut subs = lock(&self.subs);
        if subs.get(&key).is_some_and(|s| Arc::ptr_eq(s, sub)) {
            subs.remove(&key);
        }
    }

    fn set_agent(&self, s: AgentState) {
        *lock(&self.agent) = s;
        self.bundles_changed.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new subscription for the tokio side.
struct Subscribe {
    key: ProcessKey,
    sub: Arc<Subscription>,
    pidfd: OwnedFd,
}

/// The handle tetherd's connection threads use.
pub struct Upstream {
    shared: Arc<Shared>,
    tx: tokio::sync::mpsc::UnboundedSender<Subscribe>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("socket", &self.shared.socket)
            .field("agent", &*lock(&self.shared.agent))
            .field("subscriptions", &lock(&self.shared.subs).len())
            .finish()
    }
}

impl Upstream {
    /// Start the upstream thread for `config`; it connects (and reconnects) on its own.
    pub fn start(config: &UpstreamConfig, trust_domain: TrustDomain) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            socket: config.admin_socket.clone(),
            trust_domain,
            agent: Mutex::new(AgentState::Connecting),
            bundles: Mutex::new(None),
            bundles_changed: Condvar::new(),
            subs: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("spire-upstream".into())
            .spawn(move || runtime.block_on(agent::run(s, rx)))?;
        Ok(Self { shared, tx })
    }

    /// The admin socket this upstream talks to.
    pub fn socket(&self) -> &std::path::Path {
        &self.shared.socket
    }

    /// The SVID the agent grants the attested process `peer`: from its live subscription, or
    /// from a new one (waiting up to [`FIRST_ANSWER_TIMEOUT`] for the agent's first answer).
    pub fn svid_for(
        &self,
        peer: &Peer,
        attested: &AttestedPeer,
    ) -> Result<UpstreamSvid, UpstreamError> {
        self.agent_usable()?;
        let key = (attested.facts().pid, attested.start_time());
        let sub = self.subscription(peer, key, Attested::of(attested))?;
        let deadline = Instant::now() + FIRST_ANSWER_TIMEOUT;
        let fetched = {
            let mut state = lock(&sub.state);
            loop {
                match &*state {
                    SubState::Pending => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(UpstreamError::Unavailable(format!(
                                "no answer from the agent at {} within {}s",
                                self.shared.socket.display(),
                                FIRST_ANSWER_TIMEOUT.as_secs()
                            )));
                        }
                        state = sub.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
                    }
                    SubState::Ready(f) => break Arc::clone(f),
                    SubState::NoIdentity => {
                        return Err(UpstreamError::NoIdentity(format!(
                            "the SPIRE agent grants pid {} (uid {}, {}) no identity: no registration entry matches it",
                            sub.pid,
                            attested.facts().uid,
                            attested.facts().exe.display()
                        )))
                    }
                    SubState::Failed(why) => {
                        let why = why.clone();
                        drop(state);
                        self.shared.remove(key, &sub);
                        return Err(UpstreamError::Unavailable(why));
                    }
                    SubState::Ended => return Err(UpstreamError::Attest(attest::AttestError::Vanished { pid: sub.pid })),
                }
            }
        };
        // The answer may be older than the agent's failure: it counts only while the agent is up.
        self.agent_usable()?;
        if fetched.issued.not_after <= OffsetDateTime::now_utc() {
            return Err(UpstreamError::Unavailable(format!(
                "the agent's latest SVID for pid {} has expired and no rotation arrived",
                sub.pid
            )));
        }
        // Answers are checked against the subscription's pidfd as they arrive; this checks the
        // connection's own pidfd and start time once more.
        peer.recheck().map_err(UpstreamError::Attest)?;
        let bundles = self.bundles(deadline)?;
        let bundle = bundles
            .get(&self.shared.trust_domain)
            .cloned()
            .unwrap_or_default();
        if bundle.is_empty() {
            return Err(UpstreamError::Invalid(format!(
                "the agent's bundles hold no authority for our trust domain {}",
                self.shared.trust_domain
            )));
        }
        let mut federated = BTreeMap::new();
        for td in &fetched.federates_with {
            match bundles.get(td) {
                Some(b) if *td != self.shared.trust_domain => {
                    federated.insert(td.clone(), b.clone());
                }
                _ => {
                    tracing::warn!(trust_domain = %td, "the entry federates with a trust domain the agent has no bundle for")
                }
            }
        }
        Ok(UpstreamSvid {
            spiffe_id: fetched.spiffe_id.clone(),
            issued: fetched.issued.clone(),
            bundle,
            federated,
        })
    }

    fn agent_usable(&self) -> Result<(), UpstreamError> {
        match &*lock(&self.shared.agent) {
            AgentState::Down { why, since } => Err(UpstreamError::Unavailable(format!(
                "{}: {why} (for {}s; retrying)",
                self.shared.socket.display(),
                since.elapsed().as_secs()
            ))),
            AgentState::Connecting | AgentState::Up => Ok(()),
        }
    }

    /// Whether the agent has withdrawn `key`'s identity since it was served (its latest answer on
    /// the process's subscription had no SVID: the entry was deleted or no longer matches). The
    /// signing path asks this, so a key held under broker custody stops signing at once.
    pub fn withdrawn(&self, key: ProcessKey) -> bool {
        let sub = lock(&self.shared.subs).get(&key).cloned();
        sub.is_some_and(|s| matches!(*lock(&s.state), SubState::NoIdentity))
    }

    /// The live subscription of `key`, or a new one holding the process's pidfd.
    fn subscription(
        &self,
        peer: &Peer,
        key: ProcessKey,
        attested: Attested,
    ) -> Result<Arc<Subscription>, UpstreamError> {
        let mut subs = lock(&self.shared.subs);
        if let Some(s) = subs.get(&key) {
            if s.attested == attested {
                return Ok(Arc::clone(s));
            }
            // Same process, another binary or other ids (exec, setuid): the agent's answer
            // was about what it was, not what it is. Drop it and ask again.
            tracing::info!(pid = key.0, exe = %attested.exe.display(), "process changed since its SPIRE subscription (exec or ids); re-subscribing");
            s.cancel.notify_one();
            subs.remove(&key);
        }
        if subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(UpstreamError::TooMany);
        }
        let pidfd = pin_process(peer, key).map_err(UpstreamError::Attest)?;
        let sub = Arc::new(Subscription {
            pid: key.0,
            attested,
            state: Mutex::new(SubState::Pending),
            changed: Condvar::new(),
            cancel: tokio::sync::Notify::new(),
        });
        self.tx
            .send(Subscribe {
                key,
                sub: Arc::clone(&sub),
                pidfd,
            })
            .map_err(|_| {
                UpstreamError::Unavailable("the upstream thread has stopped".to_owned())
            })?;
        subs.insert(key, Arc::clone(&sub));
        Ok(sub)
    }

    /// The agent's bundles, waiting until `deadline` for the first ones.
    fn bundles(&self, deadline: Instant) -> Result<Arc<Bundles>, UpstreamError> {
        let mut b = lock(&self.shared.bundles);
        loop {
            if let Some(b) = &*b {
                return Ok(Arc::clone(b));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(UpstreamError::Unavailable(
                    "no bundle from the agent yet".to_owned(),
                ));
            }
            b = self
                .shared
                .bundles_changed
                .wait_timeout(b, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A pidfd for the process `key` names: the one the kernel attached to its connection, or
/// one opened now and checked to pin the process with the attested start time (the pid could
/// have been reused between the attestation and `pidfd_open`).
fn pin_process(peer: &Peer, key: ProcessKey) -> Result<OwnedFd, attest::AttestError> {
    let (pid, start) = key;
    let fd = match peer.pidfd() {
        Some(fd) => fd.try_clone().map_err(attest::AttestError::Socket)?,
        None => crate::sys::pidfd_open(pid).map_err(|_| attest::AttestError::Vanished { pid })?,
    };
    if attest::start_time(pid)? != start {
        return Err(attest::AttestError::PidReused { pid });
    }
    if !crate::sys::pidfd_names(&fd, pid).map_err(attest::AttestError::Socket)? {
        return Err(attest::AttestError::Vanished { pid });
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::config::{Config, MapAccounts};

    fn parse(extra: &str) -> Result<Config, String> {
        let src = format!("trust_domain = \"example.org\"\n{extra}");
        Config::parse(&src, "test", &MapAccounts::default()).map_err(|e| e.to_string())
    }

    const UPSTREAM: &str =
        "[upstream]\nkind = \"spire\"\nadmin_socket = \"/run/spire/admin.sock\"\n";

    /// Regression: the bundle loop held the agent-state lock while replacing the state, so the
    /// first failure to reach the agent deadlocked the upstream thread and then every FetchSvid.
    #[test]
    fn an_unreachable_agent_is_reported_and_retried_without_deadlock() {
        let dir = std::env::temp_dir().join(format!("tether-upstream-test-{}", std::process::id()));
        let config = super::UpstreamConfig {
            kind: super::UpstreamKind::Spire,
            admin_socket: dir.join("none.sock"),
        };
        let up = super::Upstream::start(&config, "example.org".parse().unwrap()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Two failed attempts at least: Connecting -> Down, then Down -> Down.
            std::thread::sleep(std::time::Duration::from_millis(600));
            let first = up.agent_usable().map_err(|e| e.to_string());
            std::thread::sleep(std::time::Duration::from_millis(400));
            let later = up.agent_usable().map_err(|e| e.to_string());
            let _ = tx.send((first, later));
        });
        let (first, later) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("upstream state lock deadlocked");
        for r in [first, later] {
            let e = r.unwrap_err();
            assert!(
                e.contains("SPIRE agent unavailable") && e.contains("none.sock"),
                "{e}"
            );
        }
    }

    #[test]
    fn upstream_spire_parses() {
        let c = parse(UPSTREAM).unwrap();
        let u = c.upstream.unwrap();
        assert_eq!(
            u.admin_socket,
            std::path::PathBuf::from("/run/spire/admin.sock")
        );
    }

    #[test]
    fn settings_spire_would_ignore_are_refused() {
        let e = parse(&format!("ca_cert = \"/a\"\nca_key = \"/b\"\n{UPSTREAM}")).unwrap_err();
        assert!(e.contains("ca_cert"), "{e}");
        let e = parse(&format!("unmatched = \"derive\"\n{UPSTREAM}")).unwrap_err();
        assert!(e.contains("unmatched"), "{e}");
        let entry =
            "[[entry]]\nspiffe_id = \"spiffe://example.org/x\"\nselectors = [\"unix:uid:0\"]\n";
        let e = parse(&format!("{UPSTREAM}{entry}")).unwrap_err();
        assert!(e.contains("[[entry]]"), "{e}");
        let e = parse("[upstream]\nkind = \"spire\"\nadmin_socket = \"admin.sock\"\n").unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = parse("[upstream]\nkind = \"istio\"\nadmin_socket = \"/a\"\n").unwrap_err();
        assert!(e.contains("istio") || e.contains("unknown variant"), "{e}");
    }
}
