//! Who is on the other end of the socket: SO_PEERCRED, then /proc, with PID-reuse checks.
//!
//! At accept time [`Peer::from_stream`] records the kernel's credentials, a pidfd
//! (`SO_PEERPIDFD`, when the kernel has it) and the process start time. For each request,
//! [`Peer::attest`] reads `/proc/<pid>` and then proves the pid still names the same process:
//!
//! - the start time (field 22 of `/proc/<pid>/stat`) is re-read after everything else and must
//!   equal the one recorded at accept time, and
//! - when there is a pidfd, `/proc/self/fdinfo/<pidfd>` must still report the same pid (it
//!   reports `-1` once the process is reaped, and a pid cannot be reused before that).
//!
//! Only this module can build an [`AttestedPeer`], so code holding one knows the checks ran.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use ring::digest;

use crate::config::ProcessFacts;
use crate::sys;

/// Executables larger than this are not hashed; `unix:sha256` attestation fails for them.
pub const MAX_HASHED_EXE: u64 = 512 << 20;

/// Why a peer could not be attested.
#[derive(Debug)]
#[non_exhaustive]
pub enum AttestError {
    /// SO_PEERCRED or SO_PEERPIDFD failed.
    Socket(io::Error),
    /// The process is gone (or its /proc entry could not be read).
    Vanished { pid: i32 },
    /// The pid now names a different process than the one that connected.
    PidReused { pid: i32 },
    /// /proc held something unexpected.
    Proc { pid: i32, what: String },
    /// The executable is too large to hash.
    ExeTooLarge { pid: i32, size: u64 },
    /// The uid used up its budget for hashing executables; retry in a few seconds.
    HashRateLimited { pid: i32, uid: u32 },
    /// Bytes of a request came from a process (or credentials) other than the one that
    /// connected: a forked child, or a process that changed its uid, on an inherited socket.
    ForeignSender { conn: sys::PeerCred, sender: Option<sys::PeerCred> },
    /// The process runs another executable than when it connected: it exec'd, and the
    /// request may have been written by the program before.
    Exec { pid: i32 },
    /// The peer is in a namespace whose root is not tetherd's, so `refused` is refused.
    ForeignNamespace { pid: i32, ns: ForeignNs, refused: &'static str },
}

/// Why a peer's credentials and memory are controlled by a root other than tetherd's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForeignNs {
    /// Its user namespace is not tetherd's: that namespace's root may ptrace it (yama scope 2
    /// included) and write its memory.
    User,
    /// Its pid namespace (or one between it and tetherd's) is owned by another user namespace:
    /// that namespace's root may put the peer's pid and any mapped uid into SCM_CREDENTIALS.
    Pid,
}

impl fmt::Display for AttestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(e) => write!(f, "cannot read peer credentials: {e}"),
            Self::Vanished { pid } => write!(f, "process {pid} exited during attestation"),
            Self::PidReused { pid } => write!(f, "pid {pid} no longer names the process that connected"),
            Self::Proc { pid, what } => write!(f, "cannot attest pid {pid}: {what}"),
            Self::ExeTooLarge { pid, size } => {
                write!(f, "executable of pid {pid} is {size} bytes, over the {MAX_HASHED_EXE}-byte hash limit")
            }
            Self::HashRateLimited { pid, uid } => write!(
                f,
                "pid {pid}: uid {uid} has used its budget for hashing changed executables; retry in a few seconds"
            ),
            Self::ForeignSender { conn, sender: Some(s) } => write!(
                f,
                "request sent by pid {} (uid {}, gid {}) on a connection opened by pid {} (uid {}, gid {}); \
                 each process must open its own connection",
                s.pid, s.uid, s.gid, conn.pid, conn.uid, conn.gid
            ),
            Self::Exec { pid } => write!(
                f,
                "the program changed (exec) since this connection was opened (pid {pid}); a program must open \
                 its own connection"
            ),
            Self::ForeignNamespace { pid, ns, refused } => {
                let which = match ns {
                    ForeignNs::User => "a user namespace other than tetherd's",
                    ForeignNs::Pid => "a pid namespace owned by a user namespace other than tetherd's",
                };
                write!(
                    f,
                    "pid {pid}: peer runs in {which}: its credentials and memory are controlled by that \
                     namespace's root; {refused} is refused for it"
                )
            }
            Self::ForeignSender { conn, sender: None } => {
                write!(f, "request without sender credentials on the connection of pid {}", conn.pid)
            }
        }
    }
}

impl std::error::Error for AttestError {}

/// The process that connected, as recorded at accept time. Not yet attested.
#[derive(Debug)]
pub struct Peer {
    cred: sys::PeerCred,
    start_time: u64,
    pidfd: Option<OwnedFd>,
    /// The pidfd's inode: on pidfs (Linux 6.9+) it names one process for the boot's lifetime.
    pidfd_ino: Option<u64>,
    /// (device, inode) of the executable it ran when tetherd greeted it.
    exe: (u64, u64),
    /// Set when the peer's credentials can be forged, or its memory written, by the root of a
    /// user namespace other than tetherd's (see [`namespaces`]).
    foreign_ns: Option<ForeignNs>,
}

/// A peer whose identity facts were read from /proc and re-checked against PID reuse.
/// Only [`Peer::attest`] constructs it.
#[derive(Debug, Clone)]
pub struct AttestedPeer {
    facts: ProcessFacts,
    start_time: u64,
}

impl AttestedPeer {
    pub fn facts(&self) -> &ProcessFacts {
        &self.facts
    }

    /// The start time (clock ticks after boot), which with the pid names the process uniquely.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }
}

impl Peer {
    /// Record the peer of an accepted connection.
    pub fn from_stream(stream: &UnixStream) -> Result<Self, AttestError> {
        let cred = sys::peer_cred(stream).map_err(AttestError::Socket)?;
        let pidfd = sys::peer_pidfd(stream).map_err(AttestError::Socket)?;
        let start_time = start_time(cred.pid)?;
        let pidfd_ino = pidfd.as_ref().map(sys::fd_inode).transpose().map_err(AttestError::Socket)?;
        let exe = exe_id(cred.pid)?;
        let foreign_ns = namespaces(cred.pid)?;
        let peer = Self { cred, start_time, pidfd, pidfd_ino, exe, foreign_ns };
        // The start time and the executable must belong to the process the pidfd pins, not
        // to a successor.
        peer.check_pidfd()?;
        Ok(peer)
    }

    /// A peer for an arbitrary pid and start time, with no pidfd: lets tests exercise the
    /// start-time check on chosen values.
    #[cfg(test)]
    fn for_test(pid: i32, uid: u32, gid: u32, start_time: u64) -> Self {
        let exe = exe_id(pid).unwrap_or_default();
        Self { cred: sys::PeerCred { pid, uid, gid }, start_time, pidfd: None, pidfd_ino: None, exe, foreign_ns: None }
    }

    /// The bytes described by `sender` (one `recvmsg`) came from the process that connected,
    /// with the credentials it connected with. The kernel stamps every message, so a forked
    /// child writing on an inherited connection, or a process that changed its uid or gid
    /// since it connected, is caught here, before its request is read. With pidfds on pidfs
    /// the sender is compared by process, not only by pid number.
    pub fn check_sender(&self, sender: Option<&sys::Sender>) -> Result<(), AttestError> {
        let foreign = || AttestError::ForeignSender { conn: self.cred, sender: sender.map(|s| s.cred) };
        let s = sender.ok_or_else(foreign)?;
        if s.cred != self.cred {
            return Err(foreign());
        }
        if let (Some(want), Some(fd)) = (self.pidfd_ino, &s.pidfd) {
            if sys::fd_inode(fd).map_err(AttestError::Socket)? != want {
                return Err(foreign());
            }
        }
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.cred.pid
    }

    /// Refuse `what` when the peer is in a foreign namespace (recorded at accept).
    pub fn refuse_in_foreign_namespace(&self, what: &'static str) -> Result<(), AttestError> {
        match self.foreign_ns {
            Some(ns) => Err(AttestError::ForeignNamespace { pid: self.cred.pid, ns, refused: what }),
            None => Ok(()),
        }
    }

    pub fn uid(&self) -> u32 {
        self.cred.uid
    }

    pub fn gid(&self) -> u32 {
        self.cred.gid
    }

    /// The process this connection belongs to: (pid, start time).
    pub fn process(&self) -> (i32, u64) {
        (self.cred.pid, self.start_time)
    }

    /// A second handle on the peer's pidfd (for tetherd to keep while it holds the peer's key).
    pub fn pidfd_clone(&self) -> Option<OwnedFd> {
        self.pidfd.as_ref().and_then(|fd| fd.try_clone().ok())
    }

    /// The pidfd the kernel attached to the connection (`SO_PEERPIDFD`), if it did.
    pub fn pidfd(&self) -> Option<&OwnedFd> {
        self.pidfd.as_ref()
    }

    pub fn has_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }

    /// Read the process's facts from /proc and prove the pid was not reused meanwhile.
    /// The executable is hashed only when `hashes` is given.
    pub fn attest(&self, hashes: Option<&ExeHashes>) -> Result<AttestedPeer, AttestError> {
        let pid = self.cred.pid;
        if start_time(pid)? != self.start_time {
            return Err(AttestError::PidReused { pid });
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| proc_err(pid, "exe", e))?;
        self.check_exec()?;
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| proc_err(pid, "status", e))?;
        let supplementary_gids = parse_groups(&status).ok_or_else(|| AttestError::Proc {
            pid,
            what: "no Groups: line in status".to_owned(),
        })?;
        let exe_sha256 = match hashes {
            Some(h) => Some(h.hash(pid, self.cred.uid)?),
            None => None,
        };
        // Everything above may describe a successor process if the pid was recycled while we
        // read; these two checks run last so that cannot go unnoticed.
        if start_time(pid)? != self.start_time {
            return Err(AttestError::PidReused { pid });
        }
        self.check_pidfd()?;
        let facts = ProcessFacts {
            pid,
            uid: self.cred.uid,
            gid: self.cred.gid,
            supplementary_gids,
            exe,
            exe_sha256,
        };
        Ok(AttestedPeer { facts, start_time: self.start_time })
    }

    /// The process still runs the executable it ran when the connection was greeted: one
    /// `stat`. A caller that relies on it proves the pid afterwards ([`Peer::recheck`]).
    pub fn check_exec(&self) -> Result<(), AttestError> {
        if exe_id(self.cred.pid)? != self.exe {
            return Err(AttestError::Exec { pid: self.cred.pid });
        }
        Ok(())
    }

    /// The cheap half of [`Peer::attest`]: the pid still names the process that connected.
    /// For repeated requests on a connection that was already attested (connection reports,
    /// every signature under broker custody) and after /proc reads by pid.
    ///
    /// With a pidfd this is one `poll` and no /proc read: the pidfd names the connecting
    /// process (its start time was matched to it in [`Peer::from_stream`]), and while it does
    /// not poll readable that process has not exited, so it has not been reaped and its pid
    /// cannot name anyone else. A zombie is refused (it polls readable). Without a pidfd (Linux
    /// before 6.5) the start time is re-read from `/proc/<pid>/stat`.
    pub fn recheck(&self) -> Result<(), AttestError> {
        if let Some(fd) = &self.pidfd {
            let pid = self.cred.pid;
            return match sys::pidfd_exited(fd) {
                Ok(false) => Ok(()),
                Ok(true) => Err(AttestError::Vanished { pid }),
                Err(e) => Err(AttestError::Proc { pid, what: format!("poll on the pidfd: {e}") }),
            };
        }
        if start_time(self.cred.pid)? != self.start_time {
            return Err(AttestError::PidReused { pid: self.cred.pid });
        }
        self.check_pidfd()
    }

    fn check_pidfd(&self) -> Result<(), AttestError> {
        let Some(fd) = &self.pidfd else { return Ok(()) };
        let pid = self.cred.pid;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
            .map_err(|e| AttestError::Proc { pid, what: format!("pidfd fdinfo: {e}") })?;
        let now = info
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|v| v.trim().parse::<i32>().ok())
            .ok_or_else(|| AttestError::Proc { pid, what: "pidfd fdinfo has no Pid:".to_owned() })?;
        match now {
            n if n == pid => Ok(()),
            -1 | 0 => Err(AttestError::Vanished { pid }),
            _ => Err(AttestError::PidReused { pid }),
        }
    }
}

fn proc_err(pid: i32, file: &str, e: io::Error) -> AttestError {
    match e.kind() {
        io::ErrorKind::NotFound => AttestError::Vanished { pid },
        _ => AttestError::Proc { pid, what: format!("/proc/{pid}/{file}: {e}") },
    }
}

/// tetherd's own user and pid namespaces' inodes (all namespaces live on one nsfs).
fn own_namespaces() -> Result<(u64, u64), AttestError> {
    static OWN: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    if let Some(own) = OWN.get() {
        return Ok(*own);
    }
    let me = std::process::id() as i32;
    let ino = |n: &str| std::fs::metadata(format!("/proc/self/ns/{n}")).map(|m| m.ino()).map_err(|e| proc_err(me, n, e));
    let own = (ino("user")?, ino("pid")?);
    Ok(*OWN.get_or_init(|| own))
}

/// Can someone other than tetherd's root forge `pid`'s credentials or write its memory?
///
/// - Its user namespace must be tetherd's: otherwise that namespace's root may ptrace it
///   (`process_vm_writev`, whatever yama's scope below 3) or load code into it.
/// - Every pid namespace from its own up to tetherd's must be owned by tetherd's user
///   namespace: the kernel lets a sender with CAP_SYS_ADMIN over a pid namespace's owner name
///   any pid of that namespace in SCM_CREDENTIALS (and SCM_PIDFD follows the pid).
///
/// A `stat`, and for a peer in tetherd's own pid namespace an `open`, an `fstat` and a `close`.
fn namespaces(pid: i32) -> Result<Option<ForeignNs>, AttestError> {
    let (user, own_pid) = own_namespaces()?;
    let m = std::fs::metadata(format!("/proc/{pid}/ns/user")).map_err(|e| proc_err(pid, "ns/user", e))?;
    if m.ino() != user {
        return Ok(Some(ForeignNs::User));
    }
    let io = |what: &str, e: io::Error| AttestError::Proc { pid, what: format!("{what}: {e}") };
    let mut ns: OwnedFd = File::open(format!("/proc/{pid}/ns/pid")).map_err(|e| proc_err(pid, "ns/pid", e))?.into();
    // Pid namespaces nest at most 32 deep.
    for _ in 0..=32 {
        if sys::fd_inode(&ns).map_err(|e| io("ns/pid", e))? == own_pid {
            return Ok(None);
        }
        let owner = sys::ns_related(&ns, sys::NsRelation::Owner).map_err(|e| io("NS_GET_USERNS", e))?;
        if sys::fd_inode(&owner).map_err(|e| io("NS_GET_USERNS", e))? != user {
            return Ok(Some(ForeignNs::Pid));
        }
        ns = match sys::ns_related(&ns, sys::NsRelation::Parent) {
            Ok(parent) => parent,
            // Outside tetherd's pid namespace: not one of its descendants.
            Err(_) => return Ok(Some(ForeignNs::Pid)),
        };
    }
    Ok(Some(ForeignNs::Pid))
}

/// (device, inode) of the executable `pid` runs.
fn exe_id(pid: i32) -> Result<(u64, u64), AttestError> {
    let m = std::fs::metadata(format!("/proc/{pid}/exe")).map_err(|e| proc_err(pid, "exe", e))?;
    Ok((m.dev(), m.ino()))
}

/// Start time of `pid` in clock ticks since boot: field 22 of `/proc/<pid>/stat`.
pub fn start_time(pid: i32) -> Result<u64, AttestError> {
    if pid <= 0 {
        return Err(AttestError::Vanished { pid });
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| proc_err(pid, "stat", e))?;
    parse_start_time(&stat).ok_or_else(|| AttestError::Proc { pid, what: "unparsable stat".to_owned() })
}

/// Is `(pid, start_time)` still a running process? A zombie (exited, not yet reaped by its
/// parent) is not: its connections and SVID died with it.
pub fn is_running(pid: i32, start_time: u64) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X")) && parse_start_time(&stat) == Some(start_time)
}

/// `comm` (field 2) may hold spaces and parentheses, so fields are counted after the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts at field 3 (state); field 22 is 19 further on.
    after.split_whitespace().nth(19)?.parse().ok()
}

fn parse_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    line.split_whitespace().map(|g| g.parse().ok()).collect()
}

/// SHA-256 of executables, cached by (device, inode, size, mtime, ctime), so each binary is
/// read once. The ctime matters: an owner can rewrite a binary in place at the same size and
/// restore its mtime with `touch -r`, but any write or `utimensat` moves the ctime, and only
/// the kernel can set it. Fresh hashing is rate-limited per uid (bytes per second), so a user
/// who keeps touching a large binary cannot keep tetherd busy reading it.
#[derive(Debug, Default)]
pub struct ExeHashes {
    cache: Mutex<HashMap<FileStamp, [u8; 32]>>,
    budgets: Mutex<HashMap<u32, HashBudget>>,
}

/// (dev, ino, size, mtime s, mtime ns, ctime s, ctime ns)
type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

/// Bound on cached hashes; the cache is cleared when it fills (binaries rarely change).
const MAX_CACHED_HASHES: usize = 4096;
/// Each uid may have this many bytes hashed afresh in a burst...
const HASH_BURST: u64 = 2 * MAX_HASHED_EXE;
/// ...refilled at this many bytes per second.
const HASH_RATE: u64 = 64 << 20;

/// A token bucket of bytes.
#[derive(Debug, Clone, Copy)]
struct HashBudget {
    left: u64,
    at: std::time::Instant,
}

impl ExeHashes {
    /// Hash the file `/proc/<pid>/exe` refers to, for a process of `uid`. Opening through
    /// /proc reads the binary the process really runs, whatever mount namespace or rename
    /// tricks it used.
    pub fn hash(&self, pid: i32, uid: u32) -> Result<[u8; 32], AttestError> {
        let mut file = File::open(format!("/proc/{pid}/exe")).map_err(|e| proc_err(pid, "exe", e))?;
        let key_of = |f: &File| -> Result<FileStamp, AttestError> {
            let m = f.metadata().map_err(|e| proc_err(pid, "exe", e))?;
            Ok((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
        };
        let key = key_of(&file)?;
        if let Some(h) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(*h);
        }
        let size = key.2;
        if size > MAX_HASHED_EXE {
            return Err(AttestError::ExeTooLarge { pid, size });
        }
        self.spend(pid, uid, size)?;
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| proc_err(pid, "exe", e))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > MAX_HASHED_EXE {
                return Err(AttestError::ExeTooLarge { pid, size: total });
            }
            ctx.update(&buf[..n]);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        // If the file changed while we read it, do not cache (or trust) the result.
        if key_of(&file)? != key || total != size {
            return Err(AttestError::Proc { pid, what: "executable changed while hashing".to_owned() });
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_HASHES {
            cache.clear();
        }
        cache.insert(key, out);
        Ok(out)
    }

    /// Take `bytes` from `uid`'s hashing budget, or refuse.
    fn spend(&self, pid: i32, uid: u32, bytes: u64) -> Result<(), AttestError> {
        let now = std::time::Instant::now();
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        if budgets.len() >= MAX_CACHED_HASHES && !budgets.contains_key(&uid) {
            // Full budgets only grant more; dropping them loses nothing but memory.
            budgets.retain(|_, b| b.left < HASH_BURST);
        }
        let b = budgets.entry(uid).or_insert(HashBudget { left: HASH_BURST, at: now });
        let refill = now.duration_since(b.at).as_millis() as u64 * (HASH_RATE / 1000);
        b.left = b.left.saturating_add(refill).min(HASH_BURST);
        b.at = now;
        if b.left < bytes {
            return Err(AttestError::HashRateLimited { pid, uid });
        }
        b.left -= bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use std::process::Command;

    use super::*;

    /// A process that exited but was not reaped yet (a zombie) kept its live-connection rows
    /// and cached SVID: the sweeper must count it as gone.
    #[test]
    fn unreaped_zombie_is_not_running() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let st = start_time(pid).unwrap();
        // Wait until it has exited, without reaping it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while is_running(pid, st) {
            assert!(std::time::Instant::now() < deadline, "child never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_ok(), "still in /proc as a zombie");
        child.wait().unwrap();
        assert!(is_running(std::process::id() as i32, start_time(std::process::id() as i32).unwrap()));
    }

    /// The owner of a registered binary rewrites it in place at the same size and puts its
    /// mtime back (`touch -r`). The old cache key (dev, ino, size, mtime) served the genuine
    /// binary's hash for the rewritten one; the ctime, which only the kernel sets, catches it.
    #[test]
    fn rewritten_same_size_binary_with_restored_mtime_is_hashed_again() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("h10a-broker-rewrite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("sleep");
        std::fs::copy("/usr/bin/sleep", &bin).unwrap();
        let hashes = ExeHashes::default();
        let run_and_hash = || {
            let mut child = Command::new(&bin).arg("30").spawn().unwrap();
            let h = hashes.hash(child.id() as i32, 0);
            child.kill().unwrap();
            child.wait().unwrap();
            h.unwrap()
        };
        let genuine = run_and_hash();
        let meta = std::fs::metadata(&bin).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            // Flip a byte of the section header table (e_shoff, at 0x28): the loader never
            // reads it, so the binary still runs.
            let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&bin).unwrap();
            let bytes = std::fs::read(&bin).unwrap();
            let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap());
            f.seek(SeekFrom::Start(shoff)).unwrap();
            f.write_all(&[bytes[shoff as usize] ^ 0xff]).unwrap();
            f.set_modified(meta.modified().unwrap()).unwrap();
        }
        let after = std::fs::metadata(&bin).unwrap();
        assert_eq!((after.len(), after.mtime(), after.mtime_nsec()), (meta.len(), meta.mtime(), meta.mtime_nsec()));
        let rewritten = run_and_hash();
        let want = digest::digest(&digest::SHA256, &std::fs::read(&bin).unwrap());
        assert_ne!(genuine, rewritten, "the rewritten binary was served the genuine binary's cached hash");
        assert_eq!(rewritten.as_slice(), want.as_ref());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fresh_hashing_is_rate_limited_per_uid() {
        let hashes = ExeHashes::default();
        hashes.spend(1, 1000, HASH_BURST).unwrap();
        assert!(matches!(hashes.spend(1, 1000, 1 << 20), Err(AttestError::HashRateLimited { uid: 1000, .. })));
        // Another uid is not affected.
        hashes.spend(2, 1001, HASH_BURST).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        hashes.spend(1, 1000, 1 << 20).unwrap();
    }

    #[test]
    fn start_time_survives_hostile_comm() {
        let stat = "123 (a) b) (c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("123 (x"), None);
    }

    #[test]
    fn groups_parse() {
        assert_eq!(parse_groups("Name:\tx\nGroups:\t4 27 100 \nNSpid:\t1"), Some(vec![4, 27, 100]));
        assert_eq!(parse_groups("Groups:\n"), Some(vec![]));
        assert_eq!(parse_groups("Name:\tx"), None);
    }

    #[test]
    fn own_process_attests() {
        let me = std::process::id() as i32;
        let peer = Peer::for_test(me, 0, 0, start_time(me).unwrap());
        let a = peer.attest(Some(&ExeHashes::default())).unwrap();
        assert_eq!(a.facts().exe, std::env::current_exe().unwrap());
        let want = digest::digest(&digest::SHA256, &std::fs::read(std::env::current_exe().unwrap()).unwrap());
        assert_eq!(a.facts().exe_sha256.unwrap().as_slice(), want.as_ref());
    }

    #[test]
    fn pid_reuse_wrong_start_time_is_refused() {
        let me = std::process::id() as i32;
        let stale = Peer::for_test(me, 0, 0, start_time(me).unwrap() - 1);
        assert!(matches!(stale.attest(None), Err(AttestError::PidReused { .. })));
    }

    #[test]
    fn pid_reuse_reaped_process_is_refused() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let recorded = start_time(pid).unwrap();
        assert!(Peer::for_test(pid, 0, 0, recorded).attest(None).is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        // The pid is now free (or already reused by someone else): either way, refused.
        let r = Peer::for_test(pid, 0, 0, recorded).attest(None);
        assert!(matches!(r, Err(AttestError::Vanished { .. } | AttestError::PidReused { .. })), "{r:?}");
    }

    /// The per-signature re-check is one poll on the pidfd: a peer that exited (not reaped
    /// yet, so its /proc stat and pidfd fdinfo still read as before) must fail it at once.
    #[test]
    fn an_exited_unreaped_peer_fails_the_recheck() {
        let dir = std::env::temp_dir().join(format!("tether-recheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let script = "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ntime.sleep(60)";
        let mut child = Command::new("python3").args(["-c", script]).arg(&path).spawn().unwrap();
        let (stream, _) = listener.accept().unwrap();
        let peer = Peer::from_stream(&stream).unwrap();
        assert_eq!(peer.pid(), child.id() as i32);
        assert!(peer.has_pidfd(), "kernel 6.5+ should offer SO_PEERPIDFD");
        peer.recheck().unwrap();
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while is_running(peer.pid(), peer.process().1) {
            assert!(std::time::Instant::now() < deadline, "child never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(peer.recheck(), Err(AttestError::Vanished { .. })), "a zombie passed the recheck");
        child.wait().unwrap();
        assert!(matches!(peer.recheck(), Err(AttestError::Vanished { .. })), "a reaped peer passed the recheck");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A child in its own user namespace is foreign; one in a new pid namespace made by root
    /// (owned by tetherd's user namespace) is not, and neither is tetherd's own process.
    #[test]
    fn namespaces_tell_a_foreign_user_namespace_from_a_root_made_pid_namespace() {
        assert_eq!(namespaces(std::process::id() as i32).unwrap(), None);
        let wait_exec = |c: &std::process::Child| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !std::fs::read_link(format!("/proc/{}/exe", c.id())).is_ok_and(|e| e.ends_with("sleep")) {
                assert!(std::time::Instant::now() < deadline);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let mut userns = Command::new("unshare").args(["-U", "sleep", "30"]).spawn().unwrap();
        wait_exec(&userns);
        assert_eq!(namespaces(userns.id() as i32).unwrap(), Some(ForeignNs::User));
        let _ = userns.kill();
        let _ = userns.wait();
        // With -f, unshare forks: the child is pid 1 of the new pid namespace.
        let mut pidns = Command::new("unshare").args(["-pf", "sleep", "30"]).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let child = loop {
            let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", pidns.id())).unwrap_or_default();
            if let Some(k) = kids.split_whitespace().next() {
                break k.parse::<i32>().unwrap();
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_ne!(
            std::fs::metadata(format!("/proc/{child}/ns/pid")).unwrap().ino(),
            std::fs::metadata("/proc/self/ns/pid").unwrap().ino()
        );
        assert_eq!(namespaces(child).unwrap(), None);
        let _ = pidns.kill();
        let _ = pidns.wait();
    }

    #[test]
    fn pidfd_peer_over_a_real_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::from_stream(&a).unwrap();
        assert_eq!(peer.pid(), std::process::id() as i32);
        assert!(peer.has_pidfd(), "kernel 6.5+ should offer SO_PEERPIDFD");
        peer.attest(None).unwrap();
    }
}
