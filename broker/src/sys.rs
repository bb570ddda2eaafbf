//! All of tetherd's unsafe code: `getsockopt`/`setsockopt` and `recvmsg` with credential
//! messages on Unix streams, `geteuid`, `utimensat` on the socket path, the epoll set that
//! watches held pidfds (broker custody), wiping a signing key's memory, and for the SPIRE
//! upstream `pidfd_open`, `poll` on a pidfd and its registration with tokio.
//!
//! std's `UnixStream::peer_cred` is unstable, there is no safe `SO_PEERPIDFD`, and
//! `File::set_modified` needs an open file (a socket path cannot be opened), so this
//! module calls libc directly. It is the only module allowed `unsafe` (the crate denies it
//! everywhere else), and every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `SO_PEERPIDFD` (Linux 6.5+). The generic value, shared by x86_64 and aarch64.
const SO_PEERPIDFD: libc::c_int = 77;

/// `SO_PASSPIDFD` (Linux 6.5+): every received message carries an `SCM_PIDFD`.
const SO_PASSPIDFD: libc::c_int = 76;
/// The control message type of a pidfd passed with `SO_PASSPIDFD`.
const SCM_PIDFD: libc::c_int = 0x04;

/// Ask the kernel to stamp every message received on `socket` with its sender's credentials
/// (`SO_PASSCRED`, required) and a pidfd (`SO_PASSPIDFD`, when the kernel has it). Set on a
/// listening socket, both are inherited by every accepted stream, and a message sent before
/// the accept is stamped too. Returns whether pidfds will come.
pub fn pass_credentials(socket: &impl AsRawFd) -> io::Result<bool> {
    let on: libc::c_int = 1;
    set_raw_sockopt(socket, libc::SOL_SOCKET, libc::SO_PASSCRED, &on.to_ne_bytes())?;
    match set_raw_sockopt(socket, libc::SOL_SOCKET, SO_PASSPIDFD, &on.to_ne_bytes()) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Who sent the bytes of one `recvmsg`, as the kernel stamped them.
#[derive(Debug)]
pub struct Sender {
    /// `SCM_CREDENTIALS`: the sender's thread-group id and *real* uid and gid at send time.
    pub cred: PeerCred,
    /// `SCM_PIDFD`: a pidfd for the sending process.
    pub pidfd: Option<OwnedFd>,
}

/// `recvmsg` into `buf`, returning the byte count and the sender of those bytes. The kernel
/// never merges bytes from two different senders into one `recvmsg` on a Unix stream, so the
/// sender applies to every byte returned. `None` only when the socket lacks `SO_PASSCRED`.
pub fn recv_with_sender(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<Sender>)> {
    // Room for one ucred and one int cmsg, with alignment to spare.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (which describes the live, writable `buf`) and at the
    // live, writable `control` array with its exact size; all outlive the call. The fd is
    // owned by `stream`. MSG_CMSG_CLOEXEC keeps received pidfds out of any child.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cred = None;
    let mut pidfd = None;
    let mut passed_fds = false;
    // SAFETY: the CMSG_* walk stays within `msg_controllen` bytes of `control`, which the
    // kernel filled; each header is read only after CMSG_NXTHDR/CMSG_FIRSTHDR vouched for it.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a complete cmsghdr inside `control`.
        let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
        // SAFETY: CMSG_LEN is pure arithmetic.
        let want = |n: usize| len >= unsafe { libc::CMSG_LEN(n as u32) } as usize;
        if level == libc::SOL_SOCKET && kind == libc::SCM_CREDENTIALS && want(size_of::<libc::ucred>()) {
            // SAFETY: the data holds a whole ucred (checked just above); it may be unaligned.
            let u: libc::ucred = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            cred = Some(PeerCred { pid: u.pid, uid: u.uid, gid: u.gid });
        } else if level == libc::SOL_SOCKET && kind == SCM_PIDFD && want(size_of::<libc::c_int>()) {
            // SAFETY: the data holds a whole int (checked above).
            let fd: libc::c_int = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            if fd >= 0 {
                // SAFETY: the kernel installed `fd` in our table for us alone; owning it here
                // closes it exactly once.
                pidfd = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        } else if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // A client passed descriptors: close them at once (they would pile up in our fd
            // table) and refuse the message.
            passed_fds = true;
            // SAFETY: CMSG_LEN(0) is pure arithmetic; the data holds `count` ints, all inside
            // this cmsg, each a descriptor the kernel installed for us alone.
            let count = len.saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize) / size_of::<libc::c_int>();
            for i in 0..count {
                // SAFETY: as above; each fd is owned here and closed once, on drop.
                drop(unsafe {
                    let p = libc::CMSG_DATA(c).cast::<libc::c_int>().add(i);
                    OwnedFd::from_raw_fd(std::ptr::read_unaligned(p))
                });
            }
        }
        // SAFETY: `msg` and `c` are as above.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if passed_fds {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "a client passed file descriptors"));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // Something was cut off (a descriptor we did not expect?): trust nothing from it.
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "truncated credential message"));
    }
    Ok((n as usize, cred.map(|cred| Sender { cred, pidfd })))
}

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

/// What is queued on a stream, without taking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Nothing,
    Bytes,
    /// The peer closed its end and nothing is left to read.
    Eof,
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte: has the peer sent anything yet?
pub fn queued(stream: &UnixStream) -> io::Result<Queued> {
    let mut b = 0u8;
    loop {
        // SAFETY: `b` is one writable byte; the fd is owned by `stream`, open for the call.
        let n = unsafe {
            libc::recv(stream.as_raw_fd(), (&mut b as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        return match n {
            0 => Ok(Queued::Eof),
            n if n > 0 => Ok(Queued::Bytes),
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => Ok(Queued::Nothing),
                    _ => Err(e),
                }
            }
        };
    }
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

/// Raise the soft open-file limit towards `want` (never above the hard limit): tetherd holds
/// one descriptor per live connection, and a 1024 soft limit is below its connection cap.
/// Returns the soft limit in force afterwards.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a live, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = want.min(lim.rlim_max);
    if lim.rlim_cur >= target {
        return Ok(lim.rlim_cur);
    }
    lim.rlim_cur = target;
    // SAFETY: `lim` is a valid rlimit whose soft value does not exceed its hard value.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}

/// Set the mtime (and atime) of `path` itself, not of what it points to, to `when`.
/// Works on sockets, which cannot be opened. Nanosecond precision is kept, so distinct
/// values stay distinct on tmpfs and ext4.
pub fn set_mtime(path: &Path, when: SystemTime) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let since = when.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let ts = libc::timespec {
        tv_sec: since.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(since.subsec_nanos() as i32),
    };
    let times = [ts, ts];
    // SAFETY: `c` is a NUL-terminated string that outlives the call; `times` is an array of
    // exactly two initialised timespecs, as utimensat requires; AT_FDCWD needs no open fd.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SOL_TCP`-level option that attaches an upper-layer protocol (`"tls"`) to a TCP socket.
pub const TCP_ULP: libc::c_int = 31;
/// The kernel TLS socket level.
pub const SOL_TLS: libc::c_int = 282;
/// Install the transmit key (`tls12_crypto_info_*` struct) on a socket with the tls ULP.
pub const TLS_TX: libc::c_int = 1;

/// `setsockopt(fd, level, name, bytes)`: for the kTLS probes of `tether doctor`.
pub fn set_raw_sockopt(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is a live, readable slice and we pass its exact length, so the kernel
    // reads at most `value.len()` bytes from it. The fd is borrowed from an open socket.
    let rc = unsafe {
        libc::setsockopt(socket.as_raw_fd(), level, name, value.as_ptr().cast(), value.len() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An epoll instance watching pidfds: a pidfd polls readable once its process has exited.
#[derive(Debug)]
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; the returned fd is checked and owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh epoll fd that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watch `fd` for readability, reporting `token`. The caller keeps `fd` open while it is
    /// watched (closing it removes it from the set).
    pub fn add(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: `ev` is a live epoll_event for the duration of the call; both fds are open.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Tokens of watched fds that are readable, waiting at most `timeout`. EINTR is no event.
    pub fn wait(&self, out: &mut Vec<u64>, timeout: Duration) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `events` is a live, writable array and we pass its exact length.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as libc::c_int, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        out.extend(events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// A value on the heap whose bytes are overwritten with zeros (volatile writes) when it is
/// dropped, instead of running its destructor. For ring's `EcdsaKeyPair`, which holds the
/// private scalar (Montgomery form) inline, owns no heap memory or other resources, and has no
/// way to wipe itself.
pub struct Wiped<T>(std::ptr::NonNull<T>);

// SAFETY: `Wiped<T>` owns its `T` exclusively, like a `Box<T>`.
unsafe impl<T: Send> Send for Wiped<T> {}
// SAFETY: shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for Wiped<T> {}

impl<T> Wiped<T> {
    /// Only for types whose destructor does nothing but free inline data (checked by the
    /// caller: `T` must own no heap memory, fds or locks).
    pub fn new(value: T) -> Self {
        Self(std::ptr::NonNull::from(Box::leak(Box::new(value))))
    }
}

impl<T> std::ops::Deref for Wiped<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the pointer came from a live Box and is only invalidated in drop.
        unsafe { self.0.as_ref() }
    }
}

impl<T> Drop for Wiped<T> {
    fn drop(&mut self) {
        let p = self.0.as_ptr().cast::<u8>();
        for i in 0..size_of::<T>() {
            // SAFETY: `p..p+size_of::<T>()` is the Box's live allocation; volatile so the
            // writes are not elided. The value is never used again (its destructor is
            // deliberately not run: it owns nothing but these bytes).
            unsafe { std::ptr::write_volatile(p.add(i), 0) };
        }
        // SAFETY: the allocation was made by `Box::new::<T>` with T's layout; freeing it as
        // `MaybeUninit<T>` releases the memory without running T's destructor.
        drop(unsafe { Box::from_raw(self.0.as_ptr().cast::<std::mem::MaybeUninit<T>>()) });
    }
}

impl<T> std::fmt::Debug for Wiped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wiped(<redacted>)")
    }
}

/// The running C library's version (`gnu_get_libc_version()`, e.g. "2.36").
pub fn glibc_version() -> String {
    // SAFETY: glibc returns a pointer to a static NUL-terminated string that lives for the
    // whole process and is never written to; we copy it out at once.
    let s = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    s.to_string_lossy().into_owned()
}

/// `pidfd_open(pid, 0)` (Linux 5.3+): a descriptor that names the process `pid` names now,
/// and keeps naming it (never a successor) until closed.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The inode number of the file `fd` refers to: one `fstat`, no duplicate descriptor. For a
/// pidfd on pidfs (Linux 6.9+) it names one process for the boot's lifetime.
pub fn fd_inode(fd: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: an all-zero `stat` is a valid value for the kernel to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat; the fd is borrowed from an open descriptor.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

/// What [`ns_related`] asks of a namespace descriptor (`<linux/nsfs.h>`).
#[derive(Debug, Clone, Copy)]
pub enum NsRelation {
    /// `NS_GET_USERNS`: the user namespace that owns it.
    Owner = 0xb701,
    /// `NS_GET_PARENT`: the parent of a pid (or user) namespace; EPERM once outside ours.
    Parent = 0xb702,
}

/// `ioctl(ns_fd, NS_GET_USERNS | NS_GET_PARENT)`: a new descriptor for the related namespace.
pub fn ns_related(ns: &impl AsRawFd, what: NsRelation) -> io::Result<OwnedFd> {
    // SAFETY: these nsfs ioctls take no argument and return a new fd or -1.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), what as libc::c_ulong) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel installed `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Move the calling thread to `SCHED_IDLE`: it runs only when a CPU has nothing else to do
/// (tetherd's nonce pool; best effort, a failure leaves it at normal priority).
pub fn set_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

/// Has the process behind `pidfd` exited? A pidfd polls readable once its process has
/// terminated (a zombie counts), so this is the "before its pid can be reused" signal.
pub fn pidfd_exited(pidfd: &impl AsRawFd) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: `p` is one initialised pollfd that lives across the call; the count is 1 and
    // the timeout 0, so poll returns at once and writes only `p.revents`.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Does `pidfd` still name the live process `pid` (not exited, same pid in its fdinfo)?
pub fn pidfd_names(pidfd: &impl AsRawFd, pid: i32) -> io::Result<bool> {
    if pidfd_exited(pidfd)? {
        return Ok(false);
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    let now = info.lines().find_map(|l| l.strip_prefix("Pid:")).and_then(|v| v.trim().parse::<i32>().ok());
    Ok(now == Some(pid))
}

/// Register `pidfd` with the current tokio runtime, to await its process's exit (readable).
/// Must be called on the upstream thread's runtime.
pub fn watch_pidfd(pidfd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and
    // names the same pidfd until the AsyncFd is dropped (OwnedFd::as_raw_fd always returns it).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}
