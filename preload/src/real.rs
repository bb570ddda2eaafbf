//! The real libc functions behind our exports, resolved lazily with `dlsym(RTLD_NEXT)` and
//! cached in atomics. Resolving to one of our own exports is a fatal error: that would recurse
//! forever, so the call fails with ENOSYS instead.
//!
//! This module is FFI: every function here is `unsafe` to call with the libc contract of the
//! function it forwards to.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};

use libc::{c_uint, iovec, mmsghdr, msghdr, off64_t, off_t, size_t, sockaddr, socklen_t, ssize_t};

pub(crate) struct Sym {
    name: &'static [u8],
    ptr: AtomicPtr<c_void>,
}

impl Sym {
    const fn new(name: &'static [u8]) -> Self {
        Self { name, ptr: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// The real function's address, or null if it cannot be found.
    fn resolve(&self, ours: *const c_void) -> *mut c_void {
        let p = self.ptr.load(Ordering::Acquire);
        if !p.is_null() {
            return p;
        }
        // SAFETY: `name` is a NUL-terminated static string; RTLD_NEXT is a valid handle.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr().cast::<c_char>()) };
        if found.is_null() || std::ptr::eq(found.cast_const(), ours) {
            return std::ptr::null_mut();
        }
        self.ptr.store(found, Ordering::Release);
        found
    }
}

macro_rules! real_fns {
    ($( $name:ident : fn($($arg:ident : $ty:ty),*) -> $ret:ty = $err:expr ;)*) => {
        $(
            /// Calls the real libc function.
            ///
            /// # Safety
            /// The caller upholds the libc contract of this function.
            #[allow(dead_code)]
            #[allow(clippy::unused_unit)] // reason: closefrom returns void; every entry spells its type
            pub(crate) unsafe fn $name($($arg: $ty),*) -> $ret {
                static SYM: Sym = Sym::new(concat!(stringify!($name), "\0").as_bytes());
                #[cfg(not(test))]
                let ours = crate::exports::$name as *const c_void;
                #[cfg(test)]
                let ours = std::ptr::null();
                let p = SYM.resolve(ours);
                if p.is_null() {
                    crate::guard::set_errno(libc::ENOSYS);
                    return $err;
                }
                // SAFETY: `p` is the address of the libc function named `$name`, whose C
                // signature is the one declared here.
                let f: unsafe extern "C" fn($($ty),*) -> $ret = unsafe { std::mem::transmute(p) };
                // SAFETY: forwarded contract.
                unsafe { f($($arg),*) }
            }
        )*
    };
}

real_fns! {
    connect: fn(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int = -1;
    accept: fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int = -1;
    accept4: fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int = -1;
    close: fn(fd: c_int) -> c_int = -1;
    close_range: fn(first: u32, last: u32, flags: c_int) -> c_int = -1;
    closefrom: fn(low: c_int) -> () = ();
    write: fn(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t = -1;
    writev: fn(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t = -1;
    send: fn(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t = -1;
    sendto: fn(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t = -1;
    sendmsg: fn(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t = -1;
    sendmmsg: fn(fd: c_int, msgs: *mut mmsghdr, vlen: c_uint, flags: c_int) -> c_int = -1;
    dup: fn(fd: c_int) -> c_int = -1;
    dup2: fn(old: c_int, new: c_int) -> c_int = -1;
    dup3: fn(old: c_int, new: c_int, flags: c_int) -> c_int = -1;
    fcntl: fn(fd: c_int, cmd: c_int, arg: usize) -> c_int = -1;
    fcntl64: fn(fd: c_int, cmd: c_int, arg: usize) -> c_int = -1;
    sendfile: fn(out: c_int, inp: c_int, off: *mut off_t, count: size_t) -> ssize_t = -1;
    sendfile64: fn(out: c_int, inp: c_int, off: *mut off64_t, count: size_t) -> ssize_t = -1;
    read: fn(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t = -1;
    readv: fn(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t = -1;
    recv: fn(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t = -1;
    recvfrom: fn(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t = -1;
    recvmsg: fn(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t = -1;
    __read_chk: fn(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t) -> ssize_t = -1;
    __recv_chk: fn(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int) -> ssize_t = -1;
    __recvfrom_chk: fn(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t = -1;
    shutdown: fn(fd: c_int, how: c_int) -> c_int = -1;
    getpeername: fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int = -1;
    getsockname: fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int = -1;
    getsockopt: fn(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int = -1;
    execve: fn(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int = -1;
    execv: fn(path: *const c_char, argv: *const *const c_char) -> c_int = -1;
    execvp: fn(file: *const c_char, argv: *const *const c_char) -> c_int = -1;
    execvpe: fn(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int = -1;
    fexecve: fn(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int = -1;
    setsockopt: fn(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int = -1;
}
