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
    /// Bytes of a request came from a process (or credentials) other than the one that
    /// connected: a forked child, or a process that changed its uid, on an inherited socket.
    ForeignSender { conn: sys::PeerCred, sender: Option<sys::PeerCred> },
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
            Self::ForeignSender { conn, sender: Some(s) } => write!(
                f,
                "request sent by pid {} (uid {}, gid {}) on a connection opened by pid {} (uid {}, gid {}); \
                 each process must open its own connection",
                s.pid, s.uid, s.gid, conn.pid, conn.uid, conn.gid
            ),
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
        let pidfd_ino = pidfd.as_ref().map(fd_inode).transpose().map_err(AttestError::Socket)?;
        let peer = Self { cred, start_time, pidfd, pidfd_ino };
        // The start time must belong to the process the pidfd pins, not to a successor.
        peer.check_pidfd()?;
        Ok(peer)
    }

    /// A peer for an arbitrary pid and start time, with no pidfd: lets tests exercise the
    /// start-time check on chosen values.
    #[cfg(test)]
    fn for_test(pid: i32, uid: u32, gid: u32, start_time: u64) -> Self {
        Self { cred: sys::PeerCred { pid, uid, gid }, start_time, pidfd: None, pidfd_ino: None }
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
            if fd_inode(fd).map_err(AttestError::Socket)? != want {
                return Err(foreign());
            }
        }
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.cred.pid
    }

    pub fn uid(&self) -> u32 {
        self.cred.uid
    }

    pub fn gid(&self) -> u32 {
        self.cred.gid
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
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| proc_err(pid, "status", e))?;
        let supplementary_gids = parse_groups(&status).ok_or_else(|| AttestError::Proc {
            pid,
            what: "no Groups: line in status".to_owned(),
        })?;
        let exe_sha256 = match hashes {
            Some(h) => Some(h.hash(pid)?),
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

    /// The cheap half of [`Peer::attest`]: the pid still names the process that connected
    /// (start time, and the pidfd when there is one). For repeated requests on a connection
    /// that was already attested, such as connection reports.
    pub fn recheck(&self) -> Result<(), AttestError> {
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

fn fd_inode(fd: &OwnedFd) -> io::Result<u64> {
    Ok(File::from(fd.try_clone()?).metadata()?.ino())
}

fn proc_err(pid: i32, file: &str, e: io::Error) -> AttestError {
    match e.kind() {
        io::ErrorKind::NotFound => AttestError::Vanished { pid },
        _ => AttestError::Proc { pid, what: format!("/proc/{pid}/{file}: {e}") },
    }
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

/// SHA-256 of executables, cached by (device, inode, mtime, size) so each binary is read once.
#[derive(Debug, Default)]
pub struct ExeHashes {
    cache: Mutex<HashMap<(u64, u64, i64, i64, u64), [u8; 32]>>,
}

/// Bound on cached hashes; the cache is cleared when it fills (binaries rarely change).
const MAX_CACHED_HASHES: usize = 4096;

impl ExeHashes {
    /// Hash the file `/proc/<pid>/exe` refers to. Opening through /proc reads the binary the
    /// process really runs, whatever mount namespace or rename tricks it used.
    pub fn hash(&self, pid: i32) -> Result<[u8; 32], AttestError> {
        let mut file = File::open(format!("/proc/{pid}/exe")).map_err(|e| proc_err(pid, "exe", e))?;
        let key_of = |f: &File| -> Result<_, AttestError> {
            let m = f.metadata().map_err(|e| proc_err(pid, "exe", e))?;
            Ok((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
        };
        let key = key_of(&file)?;
        if let Some(h) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(*h);
        }
        if key.4 > MAX_HASHED_EXE {
            return Err(AttestError::ExeTooLarge { pid, size: key.4 });
        }
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
        if key_of(&file)? != key || total != key.4 {
            return Err(AttestError::Proc { pid, what: "executable changed while hashing".to_owned() });
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_HASHES {
            cache.clear();
        }
        cache.insert(key, out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn pidfd_peer_over_a_real_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::from_stream(&a).unwrap();
        assert_eq!(peer.pid(), std::process::id() as i32);
        assert!(peer.has_pidfd(), "kernel 6.5+ should offer SO_PEERPIDFD");
        peer.attest(None).unwrap();
    }
}
