//! The per-fd table of protected connections.
//!
//! Updated on every path that creates or destroys an fd number referring to a protected
//! connection: connect/accept (insert), close/close_range (remove), dup/dup2/dup3/
//! fcntl(F_DUPFD*) (copy, and remove whatever the target number held). A stale entry on a
//! reused fd number would make us treat a fresh socket as protected, so every close path
//! removes first.
//!
//! Not every close passes through a hook (glibc's `fclose` of an `fdopen`ed socket closes
//! internally, and so do `closefrom`, `syscall(SYS_close)` and io_uring). So an entry is tied to
//! the socket itself, not to the number: it records the socket's `SO_COOKIE` (a 64-bit id the
//! kernel never reuses) and [`get`] checks it on every use. A mismatch means the number now
//! names another socket: the stale entry is dropped and the fd is treated as new, never as
//! already protected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use tether_proto::wire::{ConnectionEvent, ConnectionReport};
use tether_proto::SpiffeId;

use crate::fallback::Link;
use crate::sync::{self, RwLock};
use crate::sys::net;
use crate::{log, report};
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
    /// The rule says a TCP EOF without close_notify is a clean end (`allow_truncation`).
    pub(crate) allow_truncation: AtomicBool,
    /// A truncated end was already reported as ECONNRESET; later reads see EOF, as after a
    /// TCP reset.
    pub(crate) truncation_reported: AtomicBool,
    /// The program shut down its reading side: an EOF is its own doing, not the peer's.
    pub(crate) local_shut_rd: AtomicBool,
    /// kTLS: rustls's key schedule, for following the peer's KeyUpdates (set once, after the
    /// keys are installed; empty for other paths and for sockets inherited across exec).
    pub(crate) rekey: std::sync::OnceLock<crate::tls::danger::Rekey>,
    /// kTLS: a TX rekey owed, done by the next write on the connection (`ops::txkey`).
    pub(crate) tx_rekey: crate::ops::txkey::TxRekey,
    /// kTLS on a kernel that rekeys: counted while it lives, so short reads look for a
    /// KeyUpdate the kernel decrypted ahead (`ops::io::after_short_read`).
    pub(crate) short_read_watch: std::sync::OnceLock<crate::ops::io::ShortReadWatch>,
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
            allow_truncation: AtomicBool::new(false),
            truncation_reported: AtomicBool::new(false),
            local_shut_rd: AtomicBool::new(false),
            rekey: std::sync::OnceLock::new(),
            tx_rekey: Default::default(),
            short_read_watch: std::sync::OnceLock::new(),
            decision,
            conn_id: report::next_conn_id(),
            opened_at: report::now_secs(),
            // Made only by hook logic, never in a vfork child: the owner is this process.
            owner: crate::fork::owner(),
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
        // A fork child's copy: the child handler made the child the owner (no syscall here).
        if crate::fork::owner() == self.owner {
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

/// A table entry: the connection, and the cookie of the socket the fd number named when the
/// entry was made.
#[derive(Debug, Clone)]
struct Entry {
    cookie: u64,
    conn: Arc<Protected>,
    /// The pid of the process that called fork while this entry existed (the latest fork):
    /// another process may hold the socket too. See [`Closing`].
    forked_by: Option<libc::pid_t>,
}

/// What a close learns about the connection it ends in this process.
#[derive(Debug)]
pub(crate) struct Closing {
    pub(crate) conn: Arc<Protected>,
    /// No other fd number in this process refers to the connection.
    pub(crate) last_here: bool,
    /// `Some(pid)`: process `pid` forked while holding it (this process, or our parent).
    pub(crate) forked_by: Option<libc::pid_t>,
}

static TABLE: LazyLock<RwLock<HashMap<RawFd, Entry>>> = LazyLock::new(|| RwLock::new(HashMap::new()));
/// Entries in the table; lets the hot paths skip the lock entirely when it is empty.
static LEN: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn is_empty() -> bool {
    LEN.load(Ordering::Acquire) == 0
}

/// The connection `fd` refers to, if the socket behind the number is still the one the entry
/// was made for (one getsockopt). A stale entry is removed (not in a vfork child) and `None`
/// returned. Otherwise read-only, so callers need no vfork check of their own.
pub(crate) fn get(fd: RawFd) -> Option<Arc<Protected>> {
    if is_empty() {
        return None;
    }
    let e = TABLE.read().get(&fd).cloned()?;
    if net::socket_cookie(fd) == Some(e.cookie) {
        return Some(e.conn);
    }
    // A vfork child (the only time this runs there: `getsockopt` and the like check no pid up
    // front) leaves the parent's table alone; the fd is new to it either way.
    if crate::fork::in_vfork_child() {
        return None;
    }
    let stale = {
        let mut t = TABLE.write();
        let same = t.get(&fd).is_some_and(|cur| Arc::ptr_eq(&cur.conn, &e.conn) && cur.cookie == e.cookie);
        let r = if same { t.remove(&fd) } else { None };
        LEN.store(t.len(), Ordering::Release);
        r
    };
    if stale.is_some() {
        log::Line::new("fd")
            .kv("fd", fd)
            .kv("peer", e.conn.remote)
            .kv("reason", "stale entry dropped: the fd was closed where no hook could see it and now names another socket")
            .emit();
    }
    // Dropped here, outside the lock (its Drop queues a Close report).
    drop(stale);
    None
}

/// Look at `fd`'s entry without checking that the number still names its socket (no syscall):
/// for a cheap "is there anything to do" test; act only on what [`get`] returns. `false` when
/// there is no entry.
pub(crate) fn peek(fd: RawFd, f: impl FnOnce(&Protected) -> bool) -> bool {
    if is_empty() {
        return false;
    }
    TABLE.read().get(&fd).is_some_and(|e| f(&e.conn))
}

/// Has `fd` an entry (stale or not)? No syscall: for deciding whether a call can change the
/// table at all.
pub(crate) fn contains(fd: RawFd) -> bool {
    !is_empty() && TABLE.read().contains_key(&fd)
}

/// Record that `fd` (a socket) now refers to `p`.
pub(crate) fn insert(fd: RawFd, p: Arc<Protected>) {
    // A socket always has a cookie; 0 (never a real cookie) makes every later `get` miss,
    // which fails safe: the fd is then treated as a new socket.
    let cookie = net::socket_cookie(fd).unwrap_or(0);
    let old = {
        let mut t = TABLE.write();
        let old = t.insert(fd, Entry { cookie, conn: p, forked_by: None });
        LEN.store(t.len(), Ordering::Release);
        old
    };
    drop(old);
}

/// Every kTLS connection in the table, once each (at its lowest fd number whose socket is still
/// the entry's), with the pid that forked while holding it: for the exit linger
/// ([`crate::ops::ending::at_exit`]).
pub(crate) fn ktls_connections() -> Vec<(RawFd, Option<libc::pid_t>)> {
    if is_empty() {
        return Vec::new();
    }
    let mut all: Vec<(RawFd, Entry)> = TABLE
        .read()
        .iter()
        .filter(|(_, e)| matches!(e.conn.path, DataPath::Ktls))
        .map(|(fd, e)| (*fd, e.clone()))
        .collect();
    all.sort_by_key(|(fd, _)| *fd);
    let mut seen: Vec<*const Protected> = Vec::new();
    let mut out = Vec::new();
    for (fd, e) in all {
        let p = Arc::as_ptr(&e.conn);
        if !seen.contains(&p) && net::socket_cookie(fd) == Some(e.cookie) {
            seen.push(p);
            out.push((fd, e.forked_by));
        }
    }
    out
}

/// Remove `fd`'s entry because the program closes it. A stale entry (the number names another
/// socket now) is removed without a [`Closing`]: there is nothing of ours to end.
pub(crate) fn remove(fd: RawFd) -> Option<Closing> {
    if is_empty() || !TABLE.read().contains_key(&fd) {
        return None; // most closes: not ours, no syscall
    }
    let cookie = net::socket_cookie(fd);
    let mut t = TABLE.write();
    let r = t.remove(&fd);
    let others = r.as_ref().is_some_and(|e| t.values().any(|o| Arc::ptr_eq(&o.conn, &e.conn)));
    LEN.store(t.len(), Ordering::Release);
    drop(t);
    let e = r?;
    (cookie == Some(e.cookie)).then(|| Closing { last_here: !others, forked_by: e.forked_by, conn: e.conn })
}

/// Remove every entry in `first..=last` (close_range). Returns the connections that had their
/// last fd in this process in the range, for the caller to end.
pub(crate) fn remove_range(first: RawFd, last: RawFd) -> Vec<(RawFd, Closing)> {
    if is_empty() {
        return Vec::new();
    }
    let mut t = TABLE.write();
    let doomed: Vec<RawFd> = t.keys().copied().filter(|fd| (first..=last).contains(fd)).collect();
    let mut gone: Vec<(RawFd, Entry)> = doomed.iter().filter_map(|fd| t.remove(fd).map(|e| (*fd, e))).collect();
    LEN.store(t.len(), Ordering::Release);
    let out = gone
        .drain(..)
        .filter(|(fd, e)| net::socket_cookie(*fd) == Some(e.cookie))
        .filter(|(_, e)| !t.values().any(|o| Arc::ptr_eq(&o.conn, &e.conn)))
        .collect::<Vec<_>>();
    drop(t);
    // Of several fds in the range for one connection, one ends it.
    let mut seen: Vec<*const Protected> = Vec::new();
    out.into_iter()
        .filter(|(_, e)| {
            let p = Arc::as_ptr(&e.conn);
            let first = !seen.contains(&p);
            seen.push(p);
            first
        })
        .map(|(fd, e)| (fd, Closing { last_here: true, forked_by: e.forked_by, conn: e.conn }))
        .collect()
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

/// Fork child (single-threaded, no lock held): call `f` on every connection in the table.
pub(crate) fn each_after_fork(f: impl Fn(&Protected)) {
    for e in TABLE.read().values() {
        f(&e.conn);
    }
}

/// Fork lock order: the table after identity (released by `crate::fork`).
pub(crate) fn atfork_prepare() {
    let mut t = TABLE.write();
    if !t.is_empty() {
        // Both processes will hold every socket in the table: remember who forked.
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        for e in t.values_mut() {
            e.forked_by = Some(me);
        }
    }
    sync::hold(t);
}
