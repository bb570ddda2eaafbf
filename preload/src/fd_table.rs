//! The per-fd table of protected connections.
//!
//! Updated on every path that creates or destroys an fd number referring to a protected
//! connection: connect/accept (insert), close/close_range (remove), dup/dup2/dup3/
//! fcntl(F_DUPFD*) (copy, and remove whatever the target number held). A stale entry on a
//! reused fd number would make us treat a fresh socket as protected, so every close path
//! removes first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use tether_proto::wire::{ConnectionEvent, ConnectionReport};
use tether_proto::SpiffeId;

use crate::fallback::Link;
use crate::report;
use crate::sync::RwLock;
use crate::tls::verify::VerifiedPeer;

/// Where the crypto happens for a connection.
#[derive(Debug)]
pub(crate) enum DataPath {
    /// Kernel TLS on the program's own socket.
    Ktls,
    /// The userspace relay; the program's fd is one end of a socketpair.
    Userspace(Arc<Link>),
    /// Not encrypted, by policy (observe mode, or a plaintext client in permissive mode):
    /// tracked only so its close is reported.
    Plaintext,
}

impl DataPath {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Ktls => "ktls",
            Self::Userspace(_) => "userspace",
            Self::Plaintext => "plaintext",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Outbound,
    Inbound,
}

/// One protected connection (shared by every fd number that refers to it).
#[derive(Debug)]
pub(crate) struct Protected {
    pub(crate) path: DataPath,
    pub(crate) direction: Direction,
    pub(crate) local_id: SpiffeId,
    /// `None` only for [`DataPath::Plaintext`].
    pub(crate) peer: Option<VerifiedPeer>,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// kTLS: the peer's close_notify was consumed; reads return EOF from now on.
    pub(crate) peer_closed: AtomicBool,
    /// allow | observe | plaintext
    pub(crate) decision: &'static str,
    pub(crate) conn_id: u64,
    pub(crate) opened_at: u64,
    /// The process that set the connection up: the only one that reports on it. A fork child's
    /// inherited copy reports nothing (and so does no I/O when dropped in a fork handler).
    owner: i32,
}

impl Protected {
    pub(crate) fn new(
        path: DataPath,
        direction: Direction,
        local_id: SpiffeId,
        peer: Option<VerifiedPeer>,
        local: SocketAddr,
        remote: SocketAddr,
        decision: &'static str,
    ) -> Arc<Self> {
        let p = Arc::new(Self {
            path,
            direction,
            local_id,
            peer,
            local,
            remote,
            peer_closed: AtomicBool::new(false),
            decision,
            conn_id: report::next_conn_id(),
            opened_at: report::now_secs(),
            owner: crate::fork::raw_pid(),
        });
        report::send(p.report(ConnectionEvent::Open));
        p
    }

    pub(crate) fn report(&self, event: ConnectionEvent) -> ConnectionReport {
        ConnectionReport {
            event,
            conn_id: self.conn_id,
            direction: self.direction.into(),
            local_addr: self.local.to_string(),
            remote_addr: self.remote.to_string(),
            local_id: Some(self.local_id.clone()),
            peer_id: self.peer.as_ref().map(|p| p.id().clone()),
            data_path: self.path.name().to_owned(),
            decision: self.decision.to_owned(),
            reason: None,
            opened_at: self.opened_at,
            bytes: match &self.path {
                DataPath::Userspace(link) => Some(link.bytes()),
                _ => None,
            },
        }
    }
}

/// The last fd referring to the connection in its own process is gone: report the close.
impl Drop for Protected {
    fn drop(&mut self) {
        if crate::fork::raw_pid() == self.owner {
            report::send(self.report(ConnectionEvent::Close));
        }
    }
}

impl From<Direction> for tether_proto::wire::Direction {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Outbound => Self::Outbound,
            Direction::Inbound => Self::Inbound,
        }
    }
}

static TABLE: LazyLock<RwLock<HashMap<RawFd, Arc<Protected>>>> = LazyLock::new(|| RwLock::new(HashMap::new()));
/// Entries in the table; lets the hot paths skip the lock entirely when it is empty.
static LEN: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn is_empty() -> bool {
    LEN.load(Ordering::Acquire) == 0
}

pub(crate) fn get(fd: RawFd) -> Option<Arc<Protected>> {
    if is_empty() {
        return None;
    }
    TABLE.read().get(&fd).cloned()
}

pub(crate) fn insert(fd: RawFd, p: Arc<Protected>) {
    let mut t = TABLE.write();
    t.insert(fd, p);
    LEN.store(t.len(), Ordering::Release);
}

pub(crate) fn remove(fd: RawFd) -> Option<Arc<Protected>> {
    if is_empty() {
        return None;
    }
    let mut t = TABLE.write();
    let r = t.remove(&fd);
    LEN.store(t.len(), Ordering::Release);
    r
}

/// Remove every entry in `first..=last`.
pub(crate) fn remove_range(first: RawFd, last: RawFd) {
    if is_empty() {
        return;
    }
    let mut t = TABLE.write();
    t.retain(|fd, _| *fd < first || *fd > last);
    LEN.store(t.len(), Ordering::Release);
}

/// `new` now refers to what `old` refers to (dup semantics). Whatever `new` held is gone.
pub(crate) fn duplicate(old: RawFd, new: RawFd) {
    if is_empty() {
        return;
    }
    let mut t = TABLE.write();
    match t.get(&old).cloned() {
        Some(p) => {
            t.insert(new, p);
        }
        None => {
            t.remove(&new);
        }
    }
    LEN.store(t.len(), Ordering::Release);
}

/// Fork lock order: the table after identity (released by `crate::fork`).
pub(crate) fn atfork_prepare() {
    TABLE.hold_for_fork();
}
