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

use parking_lot::RwLock;
use tether_proto::SpiffeId;

use crate::fallback::Link;
use crate::tls::verify::VerifiedPeer;

/// Where the crypto happens for a connection.
#[derive(Debug)]
pub(crate) enum DataPath {
    /// Kernel TLS on the program's own socket.
    Ktls,
    /// The userspace relay; the program's fd is one end of a socketpair.
    Userspace(Arc<Link>),
}

impl DataPath {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Ktls => "ktls",
            Self::Userspace(_) => "userspace",
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
    pub(crate) peer: VerifiedPeer,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// kTLS: the peer's close_notify was consumed; reads return EOF from now on.
    pub(crate) peer_closed: AtomicBool,
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

pub(crate) fn atfork_prepare() {
    std::mem::forget(TABLE.write());
}

pub(crate) fn atfork_release() {
    // SAFETY: locked exclusively by this thread in atfork_prepare, guard forgotten.
    unsafe { TABLE.force_unlock_write() };
}
