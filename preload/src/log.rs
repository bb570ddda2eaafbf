//! Connection logging: off unless `TETHER_LOG` is set, then one logfmt line per protected
//! connection. Lines are written with a single raw `write(2)` (no locks, no allocation after
//! formatting, safe in thread-local destructors and after fork). Key material never reaches
//! this module.

use std::fmt::Write as _;

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

fn write_line(mut s: String) {
    s.push('\n');
    match &settings::get().log {
        LogTarget::Off => {}
        LogTarget::Stderr => write_fd(2, s.as_bytes()),
        LogTarget::File(path) => {
            use std::os::unix::ffi::OsStrExt;
            let mut p = path.as_os_str().as_bytes().to_vec();
            p.push(0);
            // SAFETY: `p` is NUL-terminated; flags and mode are valid.
            let fd = unsafe {
                libc::open(
                    p.as_ptr().cast(),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            };
            if fd >= 0 {
                write_fd(fd, s.as_bytes());
                // SAFETY: we opened `fd` just above. (`crate::real` is not needed: this is
                // called with the guard set, so a hooked close passes straight through.)
                unsafe { libc::close(fd) };
            }
        }
    }
}

fn write_fd(fd: i32, b: &[u8]) {
    // SAFETY: `b` is a valid buffer of `b.len()` bytes. One write: O_APPEND lines stay whole.
    let _ = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}
