//! Socket helpers over raw fds: addresses, flags, and deadline-bounded I/O for the handshake.
//! FFI module; all calls go to the real libc functions.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::time::Instant;

use libc::{c_int, sockaddr, socklen_t};

/// The shortest `sockaddr_in6` the kernel accepts (RFC 2133's, without `sin6_scope_id`).
const SIN6_LEN_RFC2133: usize = 24;

/// Parse a C socket address. `None` for anything but AF_INET/AF_INET6, or a length the
/// kernel itself would refuse (EINVAL). Every length the kernel accepts parses: a 24-byte
/// `sockaddr_in6` (scope id 0), and any oversized length (the extra bytes are ignored, as the
/// kernel ignores them).
///
/// # Safety
/// `addr` must point at `len` readable bytes (or be null).
pub(crate) unsafe fn from_raw(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above).
    let family = c_int::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: length checked; read_unaligned copes with any alignment.
            let a = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len as usize >= SIN6_LEN_RFC2133 => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut a: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let n = (len as usize).min(size_of::<libc::sockaddr_in6>());
            // SAFETY: `n` <= `len` readable bytes at `addr`, and <= the size of `a`.
            unsafe { std::ptr::copy_nonoverlapping(addr.cast::<u8>(), (&mut a as *mut libc::sockaddr_in6).cast::<u8>(), n) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Write `sa` into a caller's (addr, len) pair with getsockname(2) truncation semantics.
///
/// # Safety
/// `addr`/`len` as passed to getpeername(2).
pub(crate) unsafe fn to_raw(sa: SocketAddr, addr: *mut sockaddr, len: *mut socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let mut storage = zeroed_storage();
    let full = match sa {
        SocketAddr::V4(v4) => {
            let p = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            unsafe {
                (*p).sin_family = libc::AF_INET as libc::sa_family_t;
                (*p).sin_port = v4.port().to_be();
                (*p).sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            }
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let p = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            // SAFETY: as above.
            unsafe {
                (*p).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*p).sin6_port = v6.port().to_be();
                (*p).sin6_addr.s6_addr = v6.ip().octets();
                (*p).sin6_flowinfo = v6.flowinfo();
                (*p).sin6_scope_id = v6.scope_id();
            }
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: the caller gave us a buffer of *len bytes; we copy at most that and report the
    // full size, as the kernel does.
    unsafe {
        let room = (*len as usize).min(full);
        std::ptr::copy_nonoverlapping((&storage as *const libc::sockaddr_storage).cast::<u8>(), addr.cast::<u8>(), room);
        *len = full as socklen_t;
    }
}

/// An all-zero `sockaddr_storage`: an empty out-buffer for the socket calls.
pub(crate) fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage.
    unsafe { std::mem::zeroed() }
}

/// A C sockaddr for `sa`, and its length.
pub(crate) fn sockaddr_of(sa: SocketAddr) -> (libc::sockaddr_storage, socklen_t) {
    let mut st = zeroed_storage();
    let mut len = size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: a buffer of `len` bytes.
    unsafe { to_raw(sa, (&mut st as *mut libc::sockaddr_storage).cast(), &mut len) };
    (st, len)
}

fn sockname(fd: RawFd, peer: bool) -> Option<SocketAddr> {
    let mut st = zeroed_storage();
    let mut len = size_of::<libc::sockaddr_storage>() as socklen_t;
    let p = (&mut st as *mut libc::sockaddr_storage).cast::<sockaddr>();
    // SAFETY: out-buffer as above.
    let rc = unsafe {
        if peer {
            crate::real::getpeername(fd, p, &mut len)
        } else {
            crate::real::getsockname(fd, p, &mut len)
        }
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel filled `len` bytes of `st`.
    unsafe { from_raw(p, len) }
}

pub(crate) fn local_addr(fd: RawFd) -> Option<SocketAddr> {
    sockname(fd, false)
}

pub(crate) fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    sockname(fd, true)
}

fn int_opt(fd: RawFd, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: out-pointers to a c_int and its size.
    let rc = unsafe { crate::real::getsockopt(fd, level, name, (&mut v as *mut c_int).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// Is `fd` a TCP socket, given that the caller already knows it is AF_INET/AF_INET6 (from the
/// address it connects to or is bound to)? Two getsockopt calls; UDP fails at the first.
/// MPTCP (`IPPROTO_MPTCP`) is TCP to the peer and to policy: it counts. (kTLS cannot attach to
/// an MPTCP socket, so those connections take the userspace relay.)
pub(crate) fn is_tcp_stream(fd: RawFd) -> bool {
    int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && matches!(
            int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL),
            Some(0) | Some(libc::IPPROTO_TCP) | Some(libc::IPPROTO_MPTCP)
        )
}

/// `SO_COOKIE` (linux/asm-generic/socket.h; not in the libc crate): a socket's 64-bit id,
/// unique for the life of the network namespace and never reused.
const SO_COOKIE: c_int = 57;

/// The kernel's id of the socket `fd` names now (`None` if `fd` is not a socket).
pub(crate) fn socket_cookie(fd: RawFd) -> Option<u64> {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as socklen_t;
    // SAFETY: out-pointers to a u64 and its size.
    let rc = unsafe { crate::real::getsockopt(fd, libc::SOL_SOCKET, SO_COOKIE, (&mut v as *mut u64).cast(), &mut len) };
    (rc == 0 && len as usize == size_of::<u64>()).then_some(v)
}

pub(crate) fn so_error(fd: RawFd) -> c_int {
    int_opt(fd, libc::SOL_SOCKET, libc::SO_ERROR).unwrap_or(libc::EIO)
}

/// An fd's `O_NONBLOCK` (on its open file description) and `FD_CLOEXEC` (on the number), when
/// the shim knows them without asking the kernel: a socket it created itself and has not
/// handed to the program yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdFlags {
    pub(crate) nonblocking: bool,
    pub(crate) cloexec: bool,
}

pub(crate) fn status_flags(fd: RawFd) -> c_int {
    // SAFETY: F_GETFL takes no argument.
    unsafe { crate::real::fcntl(fd, libc::F_GETFL, 0) }
}

pub(crate) fn set_status_flags(fd: RawFd, flags: c_int) {
    // SAFETY: F_SETFL with an int argument.
    unsafe { crate::real::fcntl(fd, libc::F_SETFL, flags as usize) };
}

/// The kernel's `TCP_INFO` for a TCP socket.
pub(crate) fn tcp_info(fd: RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as socklen_t;
    // SAFETY: out-buffer and its length.
    let rc = unsafe {
        crate::real::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
    };
    (rc == 0).then_some(info)
}

/// Wait until `fd` is ready for `events`, or the deadline passes (ETIMEDOUT).
pub(crate) fn wait(fd: RawFd, events: i16, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(crate::clock::mono());
        if left.is_zero() {
            return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        let mut p = libc::pollfd { fd, events, revents: 0 };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as c_int;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        crate::clock::waited();
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}

/// Shut a socket down both ways: nothing more leaves or enters, whoever else holds it.
pub(crate) fn kill(fd: RawFd) {
    // SAFETY: shutdown on any fd is harmless; errors are ignored on purpose.
    unsafe { crate::real::shutdown(fd, libc::SHUT_RDWR) };
}

/// Blocking-with-deadline I/O on a socket, whatever its O_NONBLOCK flag: every call is
/// `MSG_DONTWAIT` and waits in poll, so the handshake never reads or toggles the fd's flags.
#[derive(Debug)]
pub(crate) struct DeadlineIo {
    pub(crate) fd: RawFd,
    pub(crate) deadline: Instant,
}

impl DeadlineIo {
    fn recv(&mut self, buf: &mut [u8], flags: c_int) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid writable buffer.
            let n = unsafe { crate::real::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), flags | libc::MSG_DONTWAIT) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => wait(self.fd, libc::POLLIN, self.deadline)?,
                Some(libc::EINTR) => {}
                _ => return Err(e),
            }
        }
    }

    /// Copy what is queued (at least one byte, or 0 at EOF) without consuming it.
    pub(crate) fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf, libc::MSG_PEEK)
    }
}

impl io::Read for DeadlineIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf, 0)
    }
}

impl io::Write for DeadlineIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A client handshake's deferred check of the server's chain comes before any byte of
        // ours leaves (`tls::deferred`).
        if let Err(e) = crate::tls::deferred::settle() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()));
        }
        loop {
            // SAFETY: `buf` is a valid readable buffer.
            let n = unsafe {
                libc::send(self.fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => wait(self.fd, libc::POLLOUT, self.deadline)?,
                Some(libc::EINTR) => {}
                _ => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Peek at the first byte a client sends, waiting at most until `deadline`.
pub(crate) fn peek_first_byte(fd: RawFd, deadline: Instant) -> io::Result<Option<u8>> {
    wait(fd, libc::POLLIN, deadline)?;
    let mut b = [0u8; 1];
    // SAFETY: one-byte buffer.
    let n = unsafe { crate::real::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match n {
        1 => Ok(Some(b[0])),
        0 => Ok(None),
        _ => Err(io::Error::last_os_error()),
    }
}
