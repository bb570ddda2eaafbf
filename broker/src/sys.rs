//! All of tetherd's unsafe code: two `getsockopt` calls on an accepted Unix stream.
//!
//! std's `UnixStream::peer_cred` is unstable and there is no safe `SO_PEERPIDFD`, so this
//! module calls libc directly. It is the only module allowed `unsafe` (the crate denies it
//! everywhere else), and every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// `SO_PEERPIDFD` (Linux 6.5+). The generic value, shared by x86_64 and aarch64.
const SO_PEERPIDFD: libc::c_int = 77;

/// The credentials the kernel recorded when the peer called `connect(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// `getsockopt(SO_PEERCRED)`.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a live, writable `ucred` and `len` is its exact size, so the kernel
    // writes at most `len` bytes into it. The fd is owned by `stream`, open for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<libc::ucred>() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short SO_PEERCRED"));
    }
    Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// `getsockopt(SO_PEERPIDFD)`: a pidfd for the process that connected. `Ok(None)` when the
/// kernel does not have it (ENOPROTOOPT, before Linux 6.5).
pub fn peer_pidfd(stream: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a live, writable c_int and `len` is its size. The stream's fd is open.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(err),
        };
    }
    if fd < 0 || len as usize != size_of::<libc::c_int>() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad SO_PEERPIDFD result"));
    }
    // SAFETY: on success the kernel installed `fd` as a new descriptor in our table that
    // nothing else refers to, so taking ownership of it here is sound and it is closed once.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}
