//! The one way the shim connects to tetherd: bounded, and greeted before anything is sent.
//! FFI module (`socket`, the real `connect`).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tether_proto::wire::{self, ErrorResponse};

/// Pause between connect attempts while tetherd's listen backlog is full (EAGAIN).
const BACKLOG_RETRY: Duration = Duration::from_millis(5);

/// What tetherd said first on a new connection.
pub(crate) enum Greeted {
    /// Its greeting: send requests now.
    Ready(UnixStream),
    /// An error in place of the greeting (`busy`, or a refusal); the connection is closed.
    Refused(ErrorResponse),
}

/// Connect to tetherd at `path` and read its greeting (`wire::GREETING`), all within
/// `timeout`; the stream then blocks with `timeout` as its SO_RCVTIMEO and SO_SNDTIMEO.
///
/// The connect is non-blocking, so a tetherd that is stopped (or stuck) with a full listen
/// backlog makes this fail with ETIMEDOUT instead of hanging the program's connect (and its
/// fork, which waits for locks held meanwhile): EAGAIN is retried with short sleeps until the
/// deadline.
pub(crate) fn connect(path: &Path, timeout: Duration) -> io::Result<Greeted> {
    let deadline = crate::clock::mono() + timeout;
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, format!("{}: tetherd did not answer in {timeout:?}", path.display()));
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: socket path too long", path.display())));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes; the fd is ours.
        let rc = unsafe {
            crate::real::connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            // The backlog is full: tetherd is not accepting (stopped, or overwhelmed).
            Some(libc::EAGAIN) => {
                if crate::clock::mono() + BACKLOG_RETRY >= deadline {
                    return Err(timed_out());
                }
                std::thread::sleep(BACKLOG_RETRY);
                crate::clock::waited();
            }
            _ => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }
    let mut s = UnixStream::from(fd);
    s.set_nonblocking(false)?;
    let left = deadline.saturating_duration_since(crate::clock::mono());
    if left.is_zero() {
        return Err(timed_out());
    }
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(timeout))?;
    let greeting = wire::io::read_greeting(&mut s);
    crate::clock::waited();
    match greeting {
        Ok(None) => {}
        Ok(Some(e)) => return Ok(Greeted::Refused(e)),
        Err(wire::WireError::Io(e)) if wire::is_timeout(&e) => return Err(timed_out()),
        Err(wire::WireError::Io(e)) => return Err(e),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("tetherd's greeting: {e}"))),
    }
    s.set_read_timeout(Some(timeout))?;
    Ok(Greeted::Ready(s))
}
