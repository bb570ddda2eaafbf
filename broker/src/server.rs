//! The socket server: std threads, one per connection, with a cap and per-frame deadlines.
//!
//! A connection carries any number of request/response exchanges. Framing errors (garbage,
//! wrong version, oversize length, a stall past the deadline) are answered with their error
//! code and the connection is closed, because the byte stream can no longer be trusted. A
//! well-framed request of an unknown type is answered with `unknown_request` and the
//! connection stays open. Nothing a client sends can stop the daemon.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether_proto::wire::{
    self, io::write_frame, ConnectionEvent, ConnectionReport, ConnectionsResponse, ErrorCode,
    ErrorResponse, OkResponse, PolicyCheckRequest, PolicyResponse, Request, Response, StatusResponse,
    SvidResponse, WireError,
};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::{debug, error, info, warn};

use crate::attest::{self, AttestedPeer, ExeHashes, Peer};
use crate::ca::Ca;
use crate::cache::SvidCache;
use crate::config::{Config, KeyCustody};
use crate::custody::{self, HeldKey, KeyStore};
use crate::connections::{self, ConnectionTable, Viewer};
use crate::error::Error;
use crate::metrics::{Gauges, Metrics};
use crate::quota::PerUid;
use crate::reload::{ConfigSource, ReloadError, SocketStamp};
use crate::upstream::{Upstream, UpstreamSvid};
use crate::{policy_check, sys};

/// Audit events use this tracing target.
pub const AUDIT: &str = "tether::audit";

mod reader;
mod signing;
use reader::AttestedReader;
use signing::{sign_request, RefusalLog};

/// Tunables; the defaults are what `tetherd` uses.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long a client may take to send one whole frame (and to read a response).
    pub client_timeout: Duration,
    /// Live connections beyond this are answered `busy` and closed.
    pub max_connections: usize,
    /// Live connections one uid may hold (root and tetherd's own uid: only the global cap).
    pub max_connections_per_uid: usize,
    /// Requests of one uid served at the same time; more are answered `busy`.
    pub max_in_flight_per_uid: usize,
    /// Cache SVIDs per process until half-life. Off only for benchmarking issuance.
    pub cache: bool,
    /// How often entries of exited processes are dropped from the cache.
    pub sweep_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            client_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_uid: 256,
            max_in_flight_per_uid: 32,
            cache: true,
            sweep_interval: Duration::from_secs(10),
        }
    }
}

/// The config in force and its generation (1 at start, bumped by each successful reload).
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub generation: u64,
}

/// Everything a connection handler needs.
#[derive(Debug)]
pub struct Broker {
    state: RwLock<Arc<Snapshot>>,
    source: ConfigSource,
    /// Serialises reloads, so generations and socket stamps advance together.
    reloading: Mutex<()>,
    stamp: SocketStamp,
    ca: Ca,
    cache: SvidCache,
    keys: KeyStore,
    hashes: ExeHashes,
    connections: ConnectionTable,
    metrics: Metrics,
    started: Instant,
    opts: ServerOptions,
    live: AtomicUsize,
    connections_per_uid: PerUid,
    in_flight: PerUid,
    /// `[upstream]`: the SPIRE agent issues instead of `ca`.
    upstream: Option<Upstream>,
    /// Rate limit of the `sign_refused` audit line, per uid.
    sign_refusals: RefusalLog,
}

impl Broker {
    /// A broker serving `config`. Reloads re-read the embedded default with `config`'s socket,
    /// state dir and metrics listener pinned, unless [`Broker::with_source`] names the real source.
    pub fn new(config: Config, ca: Ca, opts: ServerOptions) -> Self {
        let source = ConfigSource {
            path: None,
            socket: Some(config.socket.clone()),
            state_dir: Some(config.state_dir.clone()),
            metrics: config.metrics.clone(),
        };
        Self {
            stamp: SocketStamp::new(config.socket.clone()),
            state: RwLock::new(Arc::new(Snapshot { config, generation: 1 })),
            source,
            reloading: Mutex::new(()),
            ca,
            cache: SvidCache::default(),
            keys: KeyStore::default(),
            hashes: ExeHashes::default(),
            connections: ConnectionTable::default(),
            metrics: Metrics::default(),
            started: Instant::now(),
            connections_per_uid: PerUid::new(opts.max_connections_per_uid),
            in_flight: PerUid::new(opts.max_in_flight_per_uid),
            opts,
            live: AtomicUsize::new(0),
            upstream: None,
            sign_refusals: RefusalLog::default(),
        }
    }

    /// Take SVIDs from `upstream` (the SPIRE agent) instead of the CA.
    pub fn with_upstream(mut self, upstream: Upstream) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// Reload from `source` (the `--config` file and the command-line overrides).
    pub fn with_source(mut self, source: ConfigSource) -> Self {
        self.source = source;
        self
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn connections(&self) -> &ConnectionTable {
        &self.connections
    }

    /// The Prometheus exposition, gauges read now.
    pub fn render_metrics(&self) -> String {
        let ca_left = self.ca.not_after().unix_timestamp() - OffsetDateTime::now_utc().unix_timestamp();
        self.metrics.render(Gauges {
            live_connections: self.connections.len() as u64,
            ca_expiry_seconds: ca_left,
            policy_generation: self.current().generation,
            held_keys: self.keys.len() as u64,
        })
    }

    /// Re-read the config source and put it in force; `trigger` names the cause in the log.
    /// On failure the old config stays in force, and the error is logged and returned.
    pub fn reload(&self, trigger: &str) -> Result<u64, ReloadError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current();
        let loaded = self.source.load().map_err(ReloadError::Invalid).and_then(|new| {
            let fixed = crate::reload::restart_only_changes(&old.config, &new);
            if fixed.is_empty() {
                Ok(new)
            } else {
                Err(ReloadError::NeedsRestart(fixed))
            }
        });
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reload_failed();
                error!(trigger, error = %e, "config reload failed");
                return Err(e);
            }
        };
        let generation = old.generation + 1;
        let (rules_in, rules_out, entries) = (new.policy.inbound.len(), new.policy.outbound.len(), new.entries.len());
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Snapshot { config: new, generation });
        // After the swap: a shim that sees the new mtime and re-fetches gets the new policy.
        if let Err(e) = self.stamp.touch() {
            warn!(error = %e, "cannot update the socket's mtime; shims see the new policy with their next SVID");
        }
        info!(trigger, generation, rules_in, rules_out, entries, "policy reloaded");
        Ok(generation)
    }

    pub fn status(&self) -> StatusResponse {
        StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            trust_domain: self.current().config.trust_domain.clone(),
            live_identities: self.cache.len() as u64,
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// The caller's own SVID: attest, pick the identity, then reuse or issue. Audited.
    pub fn fetch_svid(&self, peer: &Peer) -> Result<SvidResponse, Error> {
        self.audited(peer, self.fetch_svid_inner(peer, false))
    }

    /// The caller's own SVID with its private key, whatever the custody mode (`tether svid
    /// --out`): issued for this answer only, never cached or held. Audited.
    pub fn export_svid(&self, peer: &Peer) -> Result<SvidResponse, Error> {
        self.audited(peer, self.fetch_svid_inner(peer, true))
    }

    fn audited(&self, peer: &Peer, result: Result<SvidResponse, Error>) -> Result<SvidResponse, Error> {
        if let Err(e) = &result {
            if matches!(e, Error::Attest(_) | Error::Impersonation(_)) {
                self.metrics.attestation_failed();
            }
            self.metrics.svid_refused(e.to_wire().code);
            warn!(
                target: AUDIT,
                event = "refused",
                pid = peer.pid(),
                uid = peer.uid(),
                gid = peer.gid(),
                code = %e.to_wire().code,
                reason = %e,
                "SVID refused"
            );
        }
        result
    }

    fn fetch_svid_inner(&self, peer: &Peer, export: bool) -> Result<SvidResponse, Error> {
        let snap = self.current();
        let config = &snap.config;
        if let Some(upstream) = &self.upstream {
            return self.fetch_from_upstream(upstream, peer, &snap, export);
        }
        let attested = peer.attest(config.needs_exe_hash().then_some(&self.hashes))?;
        let facts = attested.facts();
        let key = (facts.pid, attested.start_time());
        self.refuse_revoked(key)?;
        let entry = config.matching_entry(facts);
        // In a foreign namespace the executable (and the process's own messages) are the
        // namespace root's to fake: only uid-only entries, the whole namespace's, apply.
        if entry.map_or(config.unmatched == crate::config::Unmatched::Derive, |e| e.names_a_binary()) {
            peer.refuse_in_foreign_namespace("an identity that depends on the executable")?;
        }
        let checked = entry.filter(|e| e.names_a_binary() && e.impersonation_checks);
        if let Some(e) = checked {
            crate::impersonation::check(facts, e.path())?;
            // Those checks read /proc by pid: prove it still names the process that connected.
            peer.recheck()?;
        }
        let broker_custody = config.key_custody == KeyCustody::Broker && !export;
        if broker_custody {
            peer.refuse_in_foreign_namespace(FOREIGN_CUSTODY)?;
        }
        let id = config.identity_for(facts).map_err(|reason| Error::NoIdentity { reason })?;
        if self.opts.cache && !export {
            let held = |s: &SvidResponse| match s.key_id {
                Some(k) => broker_custody && self.keys.holds(key, k),
                None => !broker_custody,
            };
            if let Some(mut svid) = self.cache.get(key, &id).filter(held) {
                // The certificate is reused; the policy is always the one in force.
                svid.policy = config.policy.clone();
                svid.policy_generation = snap.generation;
                info!(
                    target: AUDIT,
                    event = "reused",
                    pid = facts.pid,
                    uid = facts.uid,
                    gid = facts.gid,
                    exe = %facts.exe.display(),
                    spiffe_id = %id,
                    serial = %svid.serial,
                    expiry = %rfc3339(svid.not_after),
                    "SVID served from cache"
                );
                return Ok(svid);
            }
        }
        let issued = self.ca.issue(&id, config.svid_ttl)?;
        self.metrics.svid_issued();
        let got = UpstreamSvid { spiffe_id: id, issued, bundle: self.ca.bundle().to_vec(), federated: self.ca.federated().clone() };
        let owner = custody::Owner { process: key, facts: facts.clone(), checks: checked.map(|e| e.path().map(Path::to_path_buf)) };
        let svid = self.serve(got, &snap, peer, owner, broker_custody, ("issued", "SVID issued"))?;
        if self.opts.cache && !export {
            self.cache.insert(key, svid.clone(), config.svid_ttl);
        }
        Ok(svid)
    }
}

impl Broker {
    /// SPIRE mode: the agent attests the process too (by pid) and grants the identity; tetherd
    /// attests it first, so a caller that cannot be attested never reaches the agent.
    fn fetch_from_upstream(
        &self,
        upstream: &Upstream,
        peer: &Peer,
        snap: &Snapshot,
        export: bool,
    ) -> Result<SvidResponse, Error> {
        let attested = peer.attest(None)?;
        let facts = attested.facts();
        let key = (facts.pid, attested.start_time());
        self.refuse_revoked(key)?;
        if snap.config.key_custody == KeyCustody::Broker && !export {
            peer.refuse_in_foreign_namespace(FOREIGN_CUSTODY)?;
        }
        let got = upstream.svid_for(peer, &attested)?;
        self.metrics.svid_issued();
        // SPIRE hands the delegate the key; under broker custody it stays here like our own.
        let broker_custody = snap.config.key_custody == KeyCustody::Broker && !export;
        let owner = custody::Owner { process: key, facts: facts.clone(), checks: None };
        self.serve(got, snap, peer, owner, broker_custody, ("upstream", "SVID from the SPIRE agent"))
    }

    /// A process whose impersonation re-check failed after issuance keeps no identity.
    fn refuse_revoked(&self, key: (i32, u64)) -> Result<(), Error> {
        if self.keys.is_revoked(key) {
            return Err(Error::Refused(ErrorResponse {
                code: ErrorCode::AttestationFailed,
                message: "this process failed an impersonation re-check after its SVID was issued; its identity \
                          is revoked for its lifetime"
                    .to_owned(),
            }));
        }
        Ok(())
    }

    /// The one place an SVID (from tetherd's CA or from the upstream) becomes a response, with
    /// the policy in force. Under broker custody the key goes into the key store, held for the
    /// owner's (pid, start time) and pidfd, and the response carries only its id.
    fn serve(
        &self,
        got: UpstreamSvid,
        snap: &Snapshot,
        peer: &Peer,
        owner: custody::Owner,
        broker_custody: bool,
        (event, what): (&'static str, &'static str),
    ) -> Result<SvidResponse, Error> {
        let UpstreamSvid { spiffe_id, issued, bundle, federated } = got;
        let not_after = unix(issued.not_after);
        let facts = owner.facts.clone();
        let (private_key, key_id) = if broker_custody {
            let held = HeldKey::from_pkcs8(issued.key.0, not_after).map_err(|e| {
                Error::Refused(ErrorResponse { code: ErrorCode::Internal, message: format!("issued key unusable: {e}") })
            })?;
            let id = self.keys.insert(owner, peer.pidfd_clone(), held).map_err(|why| {
                Error::Refused(ErrorResponse { code: ErrorCode::LimitExceeded, message: why.to_owned() })
            })?;
            (None, Some(id))
        } else {
            (Some(issued.key), None)
        };
        let svid = SvidResponse {
            spiffe_id,
            cert_chain: issued.chain,
            private_key,
            key_id,
            bundle,
            federated,
            serial: issued.serial,
            not_before: unix(issued.not_before),
            not_after,
            policy: snap.config.policy.clone(),
            policy_generation: snap.generation,
        };
        audit_served(event, what, &facts, &svid, if broker_custody { "broker" } else { "process" });
        Ok(svid)
    }
}

/// Broker key custody for a peer in a foreign namespace: its root can send signing frames that
/// tetherd cannot tell from the peer's own (forged SCM_CREDENTIALS), so tetherd holds no key
/// for such a peer and signs nothing for it.
const FOREIGN_CUSTODY: &str = "broker key custody (tetherd cannot tell its signing requests from that root's; \
                               export_svid or key_custody = \"process\" give the key to the process)";

/// The audit line for an SVID handed to a process (`event` = issued by the CA, or upstream).
fn audit_served(
    event: &'static str,
    what: &'static str,
    facts: &crate::config::ProcessFacts,
    svid: &SvidResponse,
    custody: &'static str,
) {
    info!(
        target: AUDIT,
        event,
        pid = facts.pid,
        uid = facts.uid,
        gid = facts.gid,
        exe = %facts.exe.display(),
        spiffe_id = %svid.spiffe_id,
        serial = %svid.serial,
        expiry = %rfc3339(svid.not_after),
        custody,
        "{what}"
    );
}

fn unix(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp()).unwrap_or(0)
}

fn rfc3339(unix_secs: u64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_secs as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix_secs.to_string())
}

/// Bind the socket at `path`: the parent directory is created (0755) if missing, a stale socket
/// nobody answers on is replaced, and the socket is made 0666 so every local user can fetch its
/// own identity.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
        }
    }
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    // Before anyone can connect through the permissions below: a stream accepted from this
    // listener takes its credential-passing flags from it at connect time.
    sys::pass_credentials(&listener)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Remove a socket file at `path` that nobody answers on. A live socket (another daemon) or
/// a file that is not a socket is an error; a missing path is fine.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another tetherd is serving {}", path.display()),
                ));
            }
            fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to remove it", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Serve forever.
pub fn serve(broker: Arc<Broker>, listener: UnixListener) -> io::Result<()> {
    // Every request is attested by the credentials the kernel stamps on it (see AttestedReader).
    let pidfds = sys::pass_credentials(&listener)?;
    debug!(pidfds, "per-message credentials on");
    let reaper = Arc::clone(&broker);
    std::thread::Builder::new()
        .name("key-reaper".into())
        .spawn(move || reaper.keys.reap(&reaper.metrics, reaper.opts.sweep_interval))?;
    let maker = Arc::clone(&broker);
    std::thread::Builder::new()
        .name("nonces".into())
        .spawn(move || maker.keys.nonces().refill_forever())?;
    let sweeper = Arc::clone(&broker);
    std::thread::Builder::new().name("cache-sweep".into()).spawn(move || loop {
        std::thread::sleep(sweeper.opts.sweep_interval);
        let n = sweeper.cache.sweep();
        if n > 0 {
            debug!(dropped = n, "dropped cached SVIDs of exited processes");
        }
        let n = sweeper.connections.sweep(|(pid, st)| attest::is_running(pid, st));
        if n > 0 {
            debug!(dropped = n, "dropped live connections of exited processes");
        }
    })?;
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if broker.live.fetch_add(1, Ordering::AcqRel) >= broker.opts.max_connections {
            broker.live.fetch_sub(1, Ordering::AcqRel);
            warn!(limit = broker.opts.max_connections, "connection limit reached; answering busy");
            busy(stream, "tetherd is at its connection limit; retry shortly".into());
            continue;
        }
        // Also on the stream itself, in case it connected before the listener had the flags
        // (a caller's own listener). Bytes queued before the accept carry credentials anyway.
        if let Err(e) = sys::pass_credentials(&stream) {
            broker.live.fetch_sub(1, Ordering::AcqRel);
            warn!(error = %e, "cannot turn on credential passing; closing the connection");
            continue;
        }
        // The uid the kernel recorded at connect; the per-message checks come later.
        let uid = sys::peer_cred(&stream).map_or(u32::MAX, |c| c.uid);
        if !broker.connections_per_uid.try_take(uid, is_admin(uid)) {
            broker.live.fetch_sub(1, Ordering::AcqRel);
            let limit = broker.opts.max_connections_per_uid;
            debug!(uid, limit, "per-user connection limit reached; answering busy");
            busy(stream, format!("uid {uid} already holds {limit} connections to tetherd, the per-user limit"));
            continue;
        }
        let held = Held { broker: Arc::clone(&broker), uid };
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                handle_connection(&held.broker, stream);
                drop(held);
            });
        if let Err(e) = spawned {
            // The closure, and the `Held` in it, were dropped: the counts are given back.
            warn!(error = %e, "cannot spawn a connection thread");
        }
    }
    Ok(())
}

/// A live connection's share of the global and per-uid counts, given back on drop (also
/// when the connection's thread panics or cannot be spawned).
struct Held {
    broker: Arc<Broker>,
    uid: u32,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.broker.connections_per_uid.give_back(self.uid);
        self.broker.live.fetch_sub(1, Ordering::AcqRel);
    }
}

fn busy(stream: UnixStream, message: String) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    reply_error(&stream, ErrorCode::Busy, message);
}

fn reply(mut stream: &UnixStream, response: &Response) -> bool {
    match wire::encode(response) {
        Ok(frame) => write_frame(&mut stream, &frame).is_ok(),
        Err(e) => {
            warn!(error = %e, "cannot encode a response");
            false
        }
    }
}

fn reply_error(stream: &UnixStream, code: ErrorCode, message: String) -> bool {
    reply(stream, &Response::Error(ErrorResponse { code, message }))
}

/// A frame that parses as `{"type": T, ...}` where T names no request this broker knows. The
/// other fields are skipped, not built (`IgnoredAny`): no second copy of the body in memory.
fn is_unknown_type(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Tagged<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    let Ok(Tagged { kind }) = serde_json::from_slice::<Tagged<'_>>(body) else { return false };
    let probe = serde_json::json!({ "type": kind }).to_string();
    matches!(wire::decode::<Request>(probe.as_bytes()), Err(WireError::Malformed(m)) if m.starts_with("unknown variant"))
}

/// Tell the client that its executable is recorded (`wire::GREETING`), unless bytes arrived
/// already: those were sent before the record, perhaps by the program the process ran before
/// an `exec`, so the connection is refused. Returns false when the connection is done.
fn greet(broker: &Broker, mut stream: &UnixStream, peer: &Result<Peer, attest::AttestError>) -> bool {
    match sys::queued(stream) {
        Ok(sys::Queued::Nothing) => write_frame(&mut stream, &wire::GREETING).is_ok(),
        Ok(sys::Queued::Eof) => false,
        Ok(sys::Queued::Bytes) => {
            broker.metrics.attestation_failed();
            let why = "bytes arrived before tetherd's greeting: they may have been written by the program this \
                       process ran before an exec; a client must read the greeting before it sends";
            warn!(
                target: AUDIT,
                event = "refused",
                pid = peer.as_ref().map_or(-1, Peer::pid),
                uid = peer.as_ref().map_or(u32::MAX, Peer::uid),
                reason = why,
                "connection refused: bytes before the greeting"
            );
            reply_error(stream, ErrorCode::AttestationFailed, why.to_owned());
            false
        }
        Err(e) => {
            debug!(error = %e, "cannot peek at a new connection");
            false
        }
    }
}

fn handle_connection(broker: &Broker, stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(broker.opts.client_timeout));
    // Recorded now, so that a pid recycled later cannot inherit this connection's identity.
    let peer = Peer::from_stream(&stream);
    if !greet(broker, &stream, &peer) {
        return;
    }
    // Attested on the first report or policy fetch; later ones only re-check the pid.
    let mut reporter: Option<AttestedPeer> = None;
    let mut sign_refusals = 0u32;
    let mut reader = AttestedReader::new(&stream, peer.as_ref().ok(), broker.opts.client_timeout);
    let stream = &stream;
    loop {
        reader.begin_frame();
        let uid = peer.as_ref().map_or(u32::MAX, Peer::uid);
        // The in-flight slot is taken before a message body is allocated.
        let read = read_any_frame(&mut reader, || broker.in_flight.acquire(uid, is_admin(uid)));
        if let Some(e) = reader.foreign.take() {
            // Someone other than the connecting process wrote on this connection: nothing
            // more on it can be trusted, whoever sends it.
            broker.metrics.attestation_failed();
            warn!(target: AUDIT, event = "refused", reason = %e, "request refused: foreign sender on the connection");
            reply_error(stream, ErrorCode::AttestationFailed, e.to_string());
            return;
        }
        let (body, _in_flight) = match read {
            Ok(Some(Frame::Message(body, slot))) => (body, slot),
            Ok(Some(Frame::Busy)) => {
                let limit = broker.opts.max_in_flight_per_uid;
                let message = format!("uid {uid} already has {limit} requests in flight, the per-user limit; retry");
                if !reply_error(stream, ErrorCode::Busy, message) {
                    return;
                }
                continue;
            }
            Ok(Some(Frame::Sign(buf, len))) => {
                if !sign_request(broker, &peer, &buf[..len], stream, &mut sign_refusals) {
                    return;
                }
                continue;
            }
            Ok(None) => return,
            Err(WireError::Truncated) => {
                debug!("client disconnected mid-request");
                return;
            }
            Err(WireError::Io(e)) if !wire::is_timeout(&e) => {
                debug!(error = %e, "connection error");
                return;
            }
            Err(e) => {
                debug!(error = %e, "bad frame; closing");
                let code = e.code();
                reply_error(stream, code, e.to_string());
                return;
            }
        };
        let request = match wire::decode::<Request>(&body) {
            Ok(r) => r,
            Err(e) if is_unknown_type(&body) => {
                if !reply_error(stream, ErrorCode::UnknownRequest, format!("unknown request type: {e}")) {
                    return;
                }
                continue;
            }
            Err(e) => {
                reply_error(stream, ErrorCode::BadRequest, e.to_string());
                return;
            }
        };
        let response = match request {
            Request::FetchSvid {} => match &peer {
                Ok(p) => match broker.fetch_svid(p) {
                    Ok(svid) => Response::Svid(svid),
                    Err(e) => Response::Error(e.to_wire()),
                },
                Err(e) => {
                    broker.metrics.attestation_failed();
                    broker.metrics.svid_refused(ErrorCode::AttestationFailed);
                    warn!(target: AUDIT, event = "refused", reason = %e, "SVID refused: peer not attestable");
                    Response::Error(ErrorResponse { code: ErrorCode::AttestationFailed, message: e.to_string() })
                }
            },
            Request::ExportSvid {} => match &peer {
                Ok(p) => match broker.export_svid(p) {
                    Ok(svid) => Response::Svid(svid),
                    Err(e) => Response::Error(e.to_wire()),
                },
                Err(e) => Response::Error(attestation_failed(broker, e)),
            },
            Request::Status {} => Response::Status(broker.status()),
            Request::FetchPolicy {} => match attested_peer(broker, &peer, &mut reporter) {
                Ok(_) => {
                    let snap = broker.current();
                    Response::Policy(PolicyResponse { policy: snap.config.policy.clone(), generation: snap.generation })
                }
                Err(e) => Response::Error(e),
            },
            Request::Report(r) => match attested_peer(broker, &peer, &mut reporter) {
                Ok(who) => broker.report(who, r),
                Err(e) => Response::Error(e),
            },
            Request::Connections {} => match &peer {
                Ok(p) => {
                    let viewer = if is_admin(p.uid()) { Viewer::All } else { Viewer::Uid(p.uid()) };
                    // Leave room for the envelope under the frame limit.
                    let (connections, omitted) =
                        connections::fit(broker.connections.list(viewer), wire::MAX_BODY - 4096);
                    Response::Connections(ConnectionsResponse { connections, omitted })
                }
                Err(e) => {
                    broker.metrics.attestation_failed();
                    Response::Error(ErrorResponse { code: ErrorCode::AttestationFailed, message: e.to_string() })
                }
            },
            Request::Reload {} => reload_request(broker, &peer),
            Request::PolicyCheck(req) => policy_check_request(broker, req),
            _ => Response::Error(ErrorResponse {
                code: ErrorCode::UnknownRequest,
                message: "request type not handled by this broker".to_owned(),
            }),
        };
        if !reply(stream, &response) {
            return;
        }
    }
}

/// One frame of either kind. A signing request's body stays on the stack; a message comes with
/// the in-flight slot `S` it was admitted under.
#[allow(clippy::large_enum_variant)] // reason: the signing body stays on the stack: no allocation per signature
enum Frame<S> {
    Message(zeroize::Zeroizing<Vec<u8>>, S),
    /// A message refused for want of an in-flight slot; its body was read and dropped.
    Busy,
    Sign([u8; wire::sign::MAX_BODY], usize),
}

/// Read one frame. A message body over [`wire::MAX_REQUEST_BODY`] is refused on its header,
/// and one is allocated only once `admit` grants it an in-flight slot (else it is skipped
/// through a small buffer, keeping the stream in frame).
fn read_any_frame<S>(r: &mut AttestedReader<'_>, admit: impl FnOnce() -> Option<S>) -> Result<Option<Frame<S>>, WireError> {
    let mut header = [0u8; wire::HEADER_LEN];
    if !wire::io::read_header(r, &mut header)? {
        return Ok(None);
    }
    match wire::parse_any_header(&header)? {
        (wire::FrameKind::Sign, len) => {
            let mut buf = [0u8; wire::sign::MAX_BODY];
            wire::io::read_body(r, &mut buf[..len])?;
            Ok(Some(Frame::Sign(buf, len)))
        }
        (wire::FrameKind::Message, len) => {
            if len > wire::MAX_REQUEST_BODY {
                return Err(WireError::RequestTooLarge(len));
            }
            let Some(slot) = admit() else {
                let mut skip = [0u8; 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(skip.len());
                    wire::io::read_body(r, &mut skip[..n])?;
                    left -= n;
                }
                return Ok(Some(Frame::Busy));
            };
            let mut body = zeroize::Zeroizing::new(vec![0u8; len]);
            wire::io::read_body(r, &mut body)?;
            Ok(Some(Frame::Message(body, slot)))
        }
    }
}

/// root and tetherd's own user may reload and see every connection.
fn is_admin(uid: u32) -> bool {
    uid == 0 || uid == sys::effective_uid()
}

fn attestation_failed(broker: &Broker, e: &attest::AttestError) -> ErrorResponse {
    broker.metrics.attestation_failed();
    debug!(error = %e, "peer not attestable");
    ErrorResponse { code: ErrorCode::AttestationFailed, message: e.to_string() }
}

/// The connection's attested peer: attested in full (no exe hash) the first time, then only
/// re-checked (start time, pidfd) so that a stream of reports costs one small /proc read each.
fn attested_peer<'a>(
    broker: &Broker,
    peer: &Result<Peer, attest::AttestError>,
    cached: &'a mut Option<AttestedPeer>,
) -> Result<&'a AttestedPeer, ErrorResponse> {
    let p = peer.as_ref().map_err(|e| attestation_failed(broker, e))?;
    let attested = match cached.take() {
        Some(a) => {
            p.check_exec().map_err(|e| attestation_failed(broker, &e))?;
            p.recheck().map_err(|e| attestation_failed(broker, &e))?;
            a
        }
        None => p.attest(None).map_err(|e| attestation_failed(broker, &e))?,
    };
    Ok(cached.insert(attested))
}

impl Broker {
    /// A shim's connection report, attributed to `who`.
    fn report(&self, who: &AttestedPeer, r: ConnectionReport) -> Response {
        self.metrics.report(&r);
        match r.event {
            ConnectionEvent::Open => {
                let r = match connections::ValidReport::parse(r) {
                    Ok(r) => r,
                    Err(bad) => {
                        self.metrics.report_invalid();
                        debug!(pid = who.facts().pid, %bad, "connection report refused");
                        return Response::Error(ErrorResponse { code: ErrorCode::BadRequest, message: bad.to_string() });
                    }
                };
                if let Err(full) = self.connections.open(who, r) {
                    self.metrics.report_dropped(full);
                    debug!(pid = who.facts().pid, %full, "connection report dropped");
                    return Response::Error(ErrorResponse { code: ErrorCode::LimitExceeded, message: full.to_string() });
                }
            }
            ConnectionEvent::Close => {
                self.connections.close((who.facts().pid, who.start_time()), r.conn_id);
            }
            ConnectionEvent::Refused => {}
        }
        Response::Ok(OkResponse { message: String::new() })
    }
}

fn reload_request(broker: &Broker, peer: &Result<Peer, attest::AttestError>) -> Response {
    let p = match peer {
        Ok(p) => p,
        Err(e) => return Response::Error(attestation_failed(broker, e)),
    };
    if let Err(e) = p.attest(None) {
        return Response::Error(attestation_failed(broker, &e));
    }
    if !is_admin(p.uid()) {
        warn!(pid = p.pid(), uid = p.uid(), "reload refused: not root");
        return Response::Error(ErrorResponse {
            code: ErrorCode::PermissionDenied,
            message: format!(
                "only root or tetherd's own user (uid {}) may reload the config; you are uid {}",
                sys::effective_uid(),
                p.uid()
            ),
        });
    }
    match broker.reload(&format!("tether reload (pid {})", p.pid())) {
        Ok(generation) => Response::Ok(OkResponse { message: format!("config reloaded; policy generation {generation}") }),
        Err(e) => Response::Error(ErrorResponse { code: ErrorCode::InvalidConfig, message: e.to_string() }),
    }
}

fn policy_check_request(broker: &Broker, req: PolicyCheckRequest) -> Response {
    let to = match policy_check::parse_target(&req.to) {
        Ok(to) => to,
        Err(message) => return Response::Error(ErrorResponse { code: ErrorCode::BadRequest, message }),
    };
    let snap = broker.current();
    let local = policy_check::is_local_address(to.ip());
    Response::PolicyCheck(policy_check::explain(&snap.config.policy, &req.from, to, local))
}

/// Seconds since the epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
