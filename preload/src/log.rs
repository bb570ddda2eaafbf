//! Connection logging: off unless `TETHER_LOG` is set, then one logfmt line per protected
//! connection. Lines are written with a single raw `write(2)` (no locks, no allocation after
//! formatting, safe in thread-local destructors and after fork). Key material never reaches
//! this module.
//!
//! A log file is opened once (`O_APPEND | O_CLOEXEC`) and kept: a line costs an `fstat` and a
//! `write`, not `openat` + `write` + `close`. The fd is one of tether's own (`close`,
//! `close_range` and `dup2` spare it, as the relay's), and the fstat checks that the number
//! still names the file that was opened (a close no hook sees, then a reuse of the number, must
//! never send log lines into the program's file): otherwise the file is opened again. A fork
//! child keeps using the inherited fd (same file, appended); exec closes it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crate::settings::{self, LogTarget};

pub(crate) fn enabled() -> bool {
    settings::get().log != LogTarget::Off
}

/// One `key=value` line; values with spaces or quotes are quoted.
pub(crate) struct Line(String);

impl Line {
    pub(crate) fn new(event: &str) -> Self {
        let mut s = String::with_capacity(256);
        s.push_str("tether: event=");
        s.push_str(event);
        Line(s)
    }

    pub(crate) fn kv(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        let mut v = String::new();
        let _ = write!(v, "{value}");
        self.0.push(' ');
        self.0.push_str(key);
        self.0.push('=');
        if v.is_empty() || v.contains([' ', '"', '=']) {
            self.0.push('"');
            for c in v.chars() {
                match c {
                    '"' => self.0.push_str("\\\""),
                    '\n' => self.0.push_str("\\n"),
                    c => self.0.push(c),
                }
            }
            self.0.push('"');
        } else {
            self.0.push_str(&v);
        }
        self
    }

    pub(crate) fn emit(self) {
        if enabled() {
            write_line(self.0);
        }
    }
}

/// An unconditional line to stderr, for things that must never pass silently (a panic in a
/// hook, a misconfiguration that fails connections closed).
pub(crate) fn raw(msg: &str) {
    let mut s = String::with_capacity(msg.len() + 1);
    s.push_str(msg);
    s.push('\n');
    write_fd(2, s.as_bytes());
}

/// [`raw`] without allocating: one `write` of a constant (async-signal-safe).
pub(crate) fn raw_const(msg: &'static [u8]) {
    write_fd(2, msg);
}

fn write_line(mut s: String) {
    s.push('\n');
    match &settings::get().log {
        LogTarget::Off => {}
        LogTarget::Stderr => write_fd(2, s.as_bytes()),
        LogTarget::File(path) => {
            if let Some((fd, once)) = log_file(path) {
                write_fd(fd, s.as_bytes());
                if once {
                    // SAFETY: opened by `log_file` for this line only; nothing else knows it.
                    unsafe { crate::real::close(fd) };
                }
            }
        }
    }
}

/// The open log file's fd (-1: none), and the device and inode it was opened on.
static FILE_FD: AtomicI32 = AtomicI32::new(-1);
static FILE_DEV: AtomicU64 = AtomicU64::new(0);
static FILE_INO: AtomicU64 = AtomicU64::new(0);

/// The log file's fd, if one is open now (for the close hooks: it is one of ours).
pub(crate) fn file_fd() -> Option<i32> {
    let fd = FILE_FD.load(Ordering::Acquire);
    (fd >= 0).then_some(fd)
}

/// The (device, inode) `fd` names, if it is open.
fn file_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: all-zero is a valid `stat`; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// The fd to append a line to: the kept one if its number still names the file it was opened
/// on (one fstat), else a freshly opened one. Threads racing to open keep one fd between them.
/// `true` with the fd: close it after the write (it was not kept).
fn log_file(path: &std::path::Path) -> Option<(i32, bool)> {
    let fd = FILE_FD.load(Ordering::Acquire);
    if fd >= 0 && file_id(fd) == Some((FILE_DEV.load(Ordering::Acquire), FILE_INO.load(Ordering::Acquire))) {
        return Some((fd, false));
    }
    use std::os::unix::ffi::OsStrExt;
    let mut p = path.as_os_str().as_bytes().to_vec();
    p.push(0);
    // SAFETY: `p` is NUL-terminated; flags and mode are valid.
    let new = unsafe {
        libc::open(
            p.as_ptr().cast(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if new < 0 {
        return None;
    }
    let Some((dev, ino)) = file_id(new) else {
        // SAFETY: we opened `new` just above and nothing else knows it.
        unsafe { crate::real::close(new) };
        return None;
    };
    // A number that no longer names our file is not ours to close: it is simply replaced. A
    // thread that loses a race to install its fd writes its line through it and closes it.
    let installed = FILE_FD.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire).is_ok();
    if installed {
        FILE_DEV.store(dev, Ordering::Release);
        FILE_INO.store(ino, Ordering::Release);
        FILE_FD.store(new, Ordering::Release);
    }
    Some((new, !installed))
}

fn write_fd(fd: i32, b: &[u8]) {
    // SAFETY: `b` is a valid buffer of `b.len()` bytes. One write: O_APPEND lines stay whole.
    let _ = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}
