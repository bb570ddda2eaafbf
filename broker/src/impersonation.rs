//! Anti-impersonation checks for entries that name a binary (a path or sha256 selector).
//!
//! A path or hash selector says "this identity belongs to that program". A process of the
//! same uid can run the genuine program and still be someone else:
//!
//! - under ptrace, where it can change anything the program does;
//! - with its own code loaded (LD_PRELOAD, LD_AUDIT, LD_LIBRARY_PATH, a memfd), which lives
//!   in a file the attacker can write;
//! - with something else mounted over the registered path, in a mount namespace of its own.
//!
//! [`check`] refuses each of these, reading every thread's `/proc/<pid>/task/<tid>/status` (a
//! tracer attaches to one thread, and any thread's tracer can write the shared memory),
//! `/proc/<pid>/maps` and
//! `/proc/<pid>/map_files/` (which needs root, or CAP_CHECKPOINT_RESTORE; without it the check
//! fails closed). What it does not stop is written in the README's security model.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::ProcessFacts;

/// Why a process was judged to be impersonating a registered binary.
#[derive(Debug)]
#[non_exhaustive]
pub enum Impersonation {
    /// `TracerPid` is not 0 on thread `tid` of the process (`tid == pid`: the main thread).
    Traced { pid: i32, tid: i32, tracer: i32 },
    /// Executable code is mapped from a file the process's own user (or one of its groups)
    /// can write.
    WritableCode { pid: i32, file: PathBuf },
    /// The mapped executable is not the file the registered path names in tetherd's mount
    /// namespace (a bind mount, or another mount namespace).
    NotTheRegisteredFile { pid: i32, registered: PathBuf },
    /// /proc could not be read, so nothing can be vouched for.
    Unreadable { pid: i32, what: String },
}

impl fmt::Display for Impersonation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Traced { pid, tid, tracer } if tid == pid => write!(f, "pid {pid} is being traced by pid {tracer}"),
            Self::Traced { pid, tid, tracer } => {
                write!(f, "thread {tid} of pid {pid} is being traced by pid {tracer}")
            }
            Self::WritableCode { pid, file } => write!(
                f,
                "pid {pid} runs code from {}, which its own user or group can write (set \
                 impersonation_checks = false on the entry if that is intended)",
                file.display()
            ),
            Self::NotTheRegisteredFile { pid, registered } => write!(
                f,
                "pid {pid} does not run the file {} names in tetherd's mount namespace",
                registered.display()
            ),
            Self::Unreadable { pid, what } => write!(f, "cannot check pid {pid} for impersonation: {what}"),
        }
    }
}

impl std::error::Error for Impersonation {}

/// Refuse a process that may be impersonating the binary an entry names. `registered` is
/// the entry's path selector, if it has one. Call [`crate::attest::Peer::recheck`] afterwards:
/// everything here is read from /proc by pid.
pub fn check(facts: &ProcessFacts, registered: Option<&Path>) -> Result<(), Impersonation> {
    traced_or_replaced(facts, registered)?;
    // root can write every file; the check would refuse every root process and stop nothing.
    if facts.uid == 0 {
        return Ok(());
    }
    writable_code(facts, read_maps(facts.pid, 0)?).map(drop)
}

/// What [`recheck`] keeps between the signatures of one process.
///
/// `/proc/<pid>/status` stays open: the file is bound to the process it was opened on, not to
/// its pid number, so each signature re-reads it with one `pread` at offset 0 (which makes the
/// kernel generate it afresh) instead of an open, reads and a close; once the process is gone
/// it reads `ESRCH`. The other threads' are read by path ([`other_thread_traced`]). `maps`
/// is never kept open: its file is bound to the memory image it was opened on, and
/// after an `exec` it would go on showing the old one.
#[derive(Debug)]
pub struct Watch {
    status: File,
    /// Fingerprint of the executable mappings last found clean (0: none yet).
    clean_maps: u64,
    /// Length of the maps last read: the next read's buffer.
    maps_len: usize,
}

impl Watch {
    /// Open `/proc/<pid>/status` for [`recheck`]. `still_the_process` must prove that `pid`
    /// still names the process that was checked (its pidfd has not polled readable, or its
    /// start time is unchanged); it runs after the open, so the file cannot belong to a
    /// successor on a recycled pid.
    pub fn open(pid: i32, still_the_process: impl FnOnce() -> bool) -> Result<Self, Impersonation> {
        let unreadable = |what: String| Impersonation::Unreadable { pid, what };
        let status = File::open(format!("/proc/{pid}/status")).map_err(|e| unreadable(format!("status: {e}")))?;
        if !still_the_process() {
            return Err(unreadable("the process exited".to_owned()));
        }
        Ok(Self { status, clean_maps: 0, maps_len: 0 })
    }
}

/// The first thread other than the main one found traced, as (tid, tracer).
///
/// `ptrace` attaches to one thread (a tid); a tracer on any thread can read and write the whole
/// address space, yet `/proc/<pid>/status` shows only the main thread's tracer. So the thread
/// list (`/proc/<pid>/task`) is read every time, and each other thread's own status: 4 syscalls,
/// plus 3 per thread. Nothing is kept open between signatures: tetherd holds keys for up to
/// [`crate::custody::MAX_OWNERS`] processes, and a kept file per thread would let one user's
/// many-threaded processes exhaust its descriptors. A thread that exits while it is being looked
/// at is skipped: it can no longer be used. A tid reused by a new thread is simply read anew.
fn other_thread_traced(pid: i32) -> Result<Option<(i32, i32)>, Impersonation> {
    other_thread_traced_within(pid, MAX_THREADS)
}

/// The most threads (main included) [`other_thread_traced`] lists before it refuses: it bounds what one
/// signature can cost tetherd (3 syscalls a thread), and a process with more cannot be vouched
/// for. A JVM with a few hundred threads is well inside.
const MAX_THREADS: usize = 4096;

fn other_thread_traced_within(pid: i32, max: usize) -> Result<Option<(i32, i32)>, Impersonation> {
    let unreadable = |what: String| Impersonation::Unreadable { pid, what };
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH);
    let dir = fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| unreadable(format!("task: {e}")))?;
    for (n, entry) in dir.enumerate() {
        if n >= max {
            return Err(unreadable(format!("more than {max} threads (main included) to check for a tracer")));
        }
        let entry = entry.map_err(|e| unreadable(format!("task: {e}")))?;
        let tid = match entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
            Some(tid) if tid == pid => continue,
            Some(tid) => tid,
            None => return Err(unreadable(format!("task: unexpected entry {:?}", entry.file_name()))),
        };
        let tracer = File::open(format!("/proc/{pid}/task/{tid}/status")).and_then(|f| status_tracer(pid, &f));
        match tracer {
            Ok(0) => {}
            Ok(tracer) => return Ok(Some((tid, tracer))),
            Err(e) if gone(&e) => {}
            Err(e) => return Err(unreadable(format!("task/{tid}/status: {e}"))),
        }
    }
    Ok(None)
}

/// `TracerPid` of a status file, read afresh with one `pread`.
fn status_tracer(pid: i32, status: &File) -> io::Result<i32> {
    // TracerPid is the 8th line, after Name (at most 64 bytes escaped): well inside 1 KiB.
    let mut buf = [0u8; 1024];
    let n = status.read_at(&mut buf, 0)?;
    // Only whole lines: a number cut at the end of the buffer must not parse.
    let text = buf.get(..n).unwrap_or_default();
    let whole = &text[..text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)];
    tracer_pid(&String::from_utf8_lossy(whole)).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("pid {pid}: no TracerPid: line in status"))
    })
}

/// Refuse a traced thread: the main one from `status`, then the others.
fn refuse_traced(pid: i32, status: &File) -> Result<(), Impersonation> {
    let tracer = status_tracer(pid, status).map_err(|e| Impersonation::Unreadable { pid, what: format!("status: {e}") })?;
    if tracer != 0 {
        return Err(Impersonation::Traced { pid, tid: pid, tracer });
    }
    match other_thread_traced(pid)? {
        Some((tid, tracer)) => Err(Impersonation::Traced { pid, tid, tracer }),
        None => Ok(()),
    }
}

/// [`check`] again, before a signature made with a key tetherd holds (broker custody): code
/// injected after issuance (a tracer attached, a writable library mapped) must not sign.
/// Every thread's TracerPid (the main thread's from the kept status file, the others' by path)
/// and the registered file are read every time; the executable mappings are re-read every time too, but verified again through
/// `map_files/` only when they changed since the last clean pass (a fingerprint of their maps
/// lines).
pub fn recheck(facts: &ProcessFacts, registered: Option<&Path>, watch: &mut Watch) -> Result<(), Impersonation> {
    let pid = facts.pid;
    refuse_traced(pid, &watch.status)?;
    if let Some(path) = registered {
        replaced(pid, path)?;
    }
    if facts.uid == 0 {
        return Ok(());
    }
    let maps = read_maps(pid, watch.maps_len)?;
    watch.maps_len = maps.len();
    let fp = fingerprint(&maps);
    if fp == watch.clean_maps {
        return Ok(());
    }
    let clean = writable_code(facts, maps)?;
    watch.clean_maps = fingerprint(&clean);
    Ok(())
}

/// A tracer attached to any thread (TracerPid), or a running executable that is not the
/// registered file.
fn traced_or_replaced(facts: &ProcessFacts, registered: Option<&Path>) -> Result<(), Impersonation> {
    let pid = facts.pid;
    let status = File::open(format!("/proc/{pid}/status"))
        .map_err(|e| Impersonation::Unreadable { pid, what: format!("status: {e}") })?;
    refuse_traced(pid, &status)?;
    match registered {
        Some(path) => replaced(pid, path),
        None => Ok(()),
    }
}

/// The running executable is not the file `registered` names in tetherd's mount namespace.
fn replaced(pid: i32, registered: &Path) -> Result<(), Impersonation> {
    let unreadable = |what: String| Impersonation::Unreadable { pid, what };
    let running = fs::metadata(format!("/proc/{pid}/exe")).map_err(|e| unreadable(format!("exe: {e}")))?;
    let genuine = fs::metadata(registered).map_err(|e| unreadable(format!("{}: {e}", registered.display())))?;
    if (running.dev(), running.ino()) != (genuine.dev(), genuine.ino()) {
        return Err(Impersonation::NotTheRegisteredFile { pid, registered: registered.to_owned() });
    }
    Ok(())
}

/// `/proc/<pid>/maps`, whole. The buffer is sized from `hint` (the length read last time, plus
/// a page), so one `read` usually takes it all and a second sees the end, without the size
/// probe that `fs::read_to_string` makes (a `statx`, then reads starting at 32 bytes and
/// growing): 5 KiB of maps took 2 reads instead of 9 (`strace -c` of tetherd).
fn read_maps(pid: i32, hint: usize) -> Result<String, Impersonation> {
    const PAGE: usize = 4096;
    let unreadable = |e: io::Error| Impersonation::Unreadable { pid, what: format!("maps: {e}") };
    let mut file = File::open(format!("/proc/{pid}/maps")).map_err(unreadable)?;
    let mut buf = vec![0u8; hint + PAGE];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unreadable(e)),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|_| unreadable(io::ErrorKind::InvalidData.into()))
}

/// How many snapshots of the maps [`writable_code`] takes before it gives up on a process whose
/// executable mappings keep changing under it.
const MAPS_SNAPSHOTS: usize = 8;

/// Refuse an executable file mapping the process's uid or groups can write. `maps` is a
/// snapshot of `/proc/<pid>/maps`; each of its executable file mappings is looked up in
/// `map_files/`. A range that is no longer there (`ENOENT`: the process unmapped it after the
/// snapshot, or an `mprotect` split it, as a loader does while a program starts) is not
/// skipped, since code split into new ranges is still mapped: the maps are read again and the
/// new snapshot checked from the start, up to [`MAPS_SNAPSHOTS`] times, after which the process
/// is unreadable (refused). Returns the snapshot that checked clean.
fn writable_code(facts: &ProcessFacts, mut maps: String) -> Result<String, Impersonation> {
    for _ in 0..MAPS_SNAPSHOTS {
        if all_mappings_found(facts, &maps)? {
            return Ok(maps);
        }
        // Gone since the snapshot (or the whole process is: this read says so).
        maps = read_maps(facts.pid, maps.len())?;
    }
    Err(Impersonation::Unreadable {
        pid: facts.pid,
        what: format!("its executable mappings changed in each of {MAPS_SNAPSHOTS} snapshots of maps"),
    })
}

/// One snapshot's executable file mappings: refused if one is writable; `false` if one was no
/// longer there.
fn all_mappings_found(facts: &ProcessFacts, maps: &str) -> Result<bool, Impersonation> {
    let pid = facts.pid;
    for m in executable_file_mappings(maps) {
        // map_files/ names the mapped file itself, in whatever mount namespace it came from.
        let meta = match fs::metadata(format!("/proc/{pid}/map_files/{}", m.range)) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Impersonation::Unreadable { pid, what: format!("map_files/{}: {e}", m.range) }),
        };
        if writable_by(&meta, facts) {
            return Err(Impersonation::WritableCode { pid, file: PathBuf::from(m.path) });
        }
    }
    Ok(true)
}

/// FNV-1a over the whole maps lines (range, perms, offset, device, inode, path) of
/// executable mappings (never 0).
fn fingerprint(maps: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for line in maps.lines().filter(|l| l.split(' ').nth(1).is_some_and(|p| p.as_bytes().get(2) == Some(&b'x'))) {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h | 1
}

/// Can the process's uid, primary gid or a supplementary group write (or make writable) the
/// file? The owner counts whatever the mode says, because the owner may chmod.
fn writable_by(meta: &fs::Metadata, facts: &ProcessFacts) -> bool {
    let mode = meta.mode();
    let in_group = meta.gid() == facts.gid || facts.supplementary_gids.contains(&meta.gid());
    meta.uid() == facts.uid || (in_group && mode & 0o020 != 0) || mode & 0o002 != 0
}

fn tracer_pid(status: &str) -> Option<i32> {
    status.lines().find_map(|l| l.strip_prefix("TracerPid:"))?.trim().parse().ok()
}

#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    range: &'a str,
    path: &'a str,
}

/// Executable mappings backed by a file (inode not 0): `range` as map_files/ names it.
fn executable_file_mappings(maps: &str) -> impl Iterator<Item = Mapping<'_>> {
    maps.lines().filter_map(|line| {
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let perms = fields.next()?;
        let (_offset, _dev, inode) = (fields.next()?, fields.next()?, fields.next()?);
        let path = fields.next().unwrap_or("").trim_start();
        (perms.as_bytes().get(2) == Some(&b'x') && inode != "0").then_some(Mapping { range, path })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;

    #[test]
    fn maps_lines_parse() {
        let maps = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234 /usr/bin/sleep
55d0c0a02000-55d0c0a06000 r-xp 00002000 fd:01 1234 /usr/bin/sleep
7f00aa000000-7f00aa001000 r-xp 00000000 00:00 0 
7f00ab000000-7f00ab100000 r-xp 00000000 00:1f 99 /tmp/evil lib.so (deleted)
7ffd1e3f0000-7ffd1e3f2000 r-xp 00000000 00:00 0                          [vdso]";
        let got: Vec<_> = executable_file_mappings(maps).collect();
        assert_eq!(
            got,
            vec![
                Mapping { range: "55d0c0a02000-55d0c0a06000", path: "/usr/bin/sleep" },
                Mapping { range: "7f00ab000000-7f00ab100000", path: "/tmp/evil lib.so (deleted)" },
            ]
        );
    }

    #[test]
    fn tracer_pid_parses() {
        assert_eq!(tracer_pid("Name:\tx\nTracerPid:\t0\n"), Some(0));
        assert_eq!(tracer_pid("TracerPid:\t4242\n"), Some(4242));
        assert_eq!(tracer_pid("Name:\tx\n"), None);
    }

    fn child() -> (std::process::Child, ProcessFacts) {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let facts = ProcessFacts { pid: child.id() as i32, ..Default::default() };
        (child, facts)
    }

    #[test]
    fn a_kept_status_file_sees_a_tracer_attached_after_many_rechecks() {
        let (mut child, facts) = child();
        let mut watch = Watch::open(facts.pid, || true).unwrap();
        for _ in 0..50 {
            recheck(&facts, None, &mut watch).unwrap();
        }
        let mut tracer = std::process::Command::new("strace")
            .args(["-qq", "-e", "trace=none", "-p", &facts.pid.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let r = loop {
            match recheck(&facts, None, &mut watch) {
                Ok(()) if start.elapsed() < std::time::Duration::from_secs(5) => std::thread::yield_now(),
                r => break r,
            }
        };
        let strace = tracer.id() as i32;
        let _ = tracer.kill();
        let _ = tracer.wait();
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(r, Err(Impersonation::Traced { tracer, .. }) if tracer == strace), "{r:?}");
    }

    /// A python3 whose second thread prints its tid and sleeps; the main thread waits on stdin.
    fn two_threads() -> (std::process::Child, ProcessFacts, i32) {
        use std::io::BufRead;
        let script = "import sys, threading, time\n\
                      def t():\n    print(threading.get_native_id(), flush=True)\n    time.sleep(60)\n\
                      threading.Thread(target=t, daemon=True).start()\nsys.stdin.readline()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let facts = ProcessFacts { pid: child.id() as i32, ..Default::default() };
        (child, facts, line.trim().parse().unwrap())
    }

    /// Attach strace to one thread only; returns once that thread's status shows it.
    fn trace_thread(pid: i32, tid: i32) -> std::process::Child {
        let tracer = std::process::Command::new("strace")
            .args(["-qq", "-e", "trace=none", "-p", &tid.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let status = File::open(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        let start = std::time::Instant::now();
        while status_tracer(pid, &status).unwrap() == 0 && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        tracer
    }

    /// The attack: ptrace attached to a thread other than the main one, whose own status (the
    /// one tetherd used to read) still says TracerPid 0. Refused at issuance and per signature.
    #[test]
    fn a_tracer_on_a_thread_other_than_the_main_one_is_refused() {
        let (mut child, facts, tid) = two_threads();
        assert_ne!(tid, facts.pid);
        let mut watch = Watch::open(facts.pid, || true).unwrap();
        for _ in 0..20 {
            recheck(&facts, None, &mut watch).unwrap();
        }
        check(&facts, None).unwrap();
        let mut tracer = trace_thread(facts.pid, tid);
        let strace = tracer.id() as i32;
        let main = fs::read_to_string(format!("/proc/{}/status", facts.pid)).unwrap();
        let at_issuance = check(&facts, None);
        let per_signature = recheck(&facts, None, &mut watch);
        let _ = tracer.kill();
        let _ = tracer.wait();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tracer_pid(&main), Some(0), "the main thread is not the traced one");
        for r in [at_issuance, per_signature] {
            assert!(
                matches!(r, Err(Impersonation::Traced { pid, tid: t, tracer }) if pid == facts.pid && t == tid && tracer == strace),
                "{r:?}"
            );
        }
    }

    #[test]
    fn other_threads_are_listed_and_a_process_that_is_gone_is_unreadable() {
        let (mut child, facts, _) = two_threads();
        assert_eq!(other_thread_traced(facts.pid).unwrap(), None);
        // Two threads, main included: within a bound of 2; past a bound of 1 it fails closed.
        assert_eq!(other_thread_traced_within(facts.pid, 2).unwrap(), None);
        let r = other_thread_traced_within(facts.pid, 1);
        assert!(matches!(&r, Err(Impersonation::Unreadable { what, .. }) if what.contains("more than 1 threads")), "{r:?}");
        let _ = child.kill();
        let _ = child.wait();
        assert!(other_thread_traced(facts.pid).is_err(), "a reaped process has no task dir");
    }

    #[test]
    fn a_kept_status_file_answers_for_its_process_only() {
        let (mut child, facts) = child();
        let mut watch = Watch::open(facts.pid, || true).unwrap();
        recheck(&facts, None, &mut watch).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // Reaped: whoever gets the pid next, the kept file reads ESRCH.
        let r = recheck(&facts, None, &mut watch);
        assert!(matches!(r, Err(Impersonation::Unreadable { .. })), "{r:?}");
        assert!(Watch::open(facts.pid, || false).is_err(), "a process that is gone is refused at open");
    }

    #[test]
    fn code_mapped_after_many_rechecks_from_a_file_the_user_can_write_is_refused() {
        use std::io::{BufRead, Write};
        let lib = std::env::temp_dir().join(format!("tether-writable-code-{}", std::process::id()));
        fs::write(&lib, [0u8; 4096]).unwrap();
        std::os::unix::fs::chown(&lib, Some(65534), Some(65534)).unwrap();
        // Run as root, seen as uid 65534: its own code is root's, the file is 65534's.
        let script = "import mmap, sys\nf = open(sys.argv[1], 'rb')\nsys.stdin.readline()\n\
                      m = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)\n\
                      print('mapped', flush=True)\nsys.stdin.readline()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&lib)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let facts = ProcessFacts { pid: child.id() as i32, uid: 65534, gid: 65534, ..Default::default() };
        let mut watch = Watch::open(facts.pid, || true).unwrap();
        for _ in 0..20 {
            recheck(&facts, None, &mut watch).unwrap();
        }
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "map").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "mapped");
        let r = recheck(&facts, None, &mut watch);
        drop(stdin);
        let _ = child.wait();
        let _ = fs::remove_file(&lib);
        assert!(matches!(&r, Err(Impersonation::WritableCode { file, .. }) if file == &lib), "{r:?}");
    }

    #[test]
    fn code_mapped_and_unmapped_while_being_checked_is_not_refused_as_unreadable() {
        // A program mapping and unmapping code while tetherd checks it (a loader starting it,
        // dlopen/dlclose): a range of the maps snapshot can be gone at its map_files lookup.
        // That process is not unreadable; the maps are read again. (CI saw the refusal with a
        // python3 that was still starting.)
        use std::io::BufRead;
        let script = "import mmap, sys\nf = open(sys.executable, 'rb')\nprint('ready', flush=True)\n\
                      while True:\n    mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        // Its own code and python's are root's: clean for uid 65534.
        let facts = ProcessFacts { pid: child.id() as i32, uid: 65534, gid: 65534, ..Default::default() };
        let results: Vec<_> = (0..300).map(|_| check(&facts, None)).collect();
        let _ = child.kill();
        let _ = child.wait();
        let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(refused.is_empty(), "{} of 300 checks refused, first: {:?}", refused.len(), refused.first());
    }

    #[test]
    fn own_process_as_nobody_runs_no_writable_code() {
        // The test binary is root's; seen as a process of uid 65534 it passes every check.
        let me = std::process::id() as i32;
        let facts = ProcessFacts { pid: me, uid: 65534, gid: 65534, ..Default::default() };
        check(&facts, Some(&std::env::current_exe().unwrap_or_default())).unwrap();
    }
}
