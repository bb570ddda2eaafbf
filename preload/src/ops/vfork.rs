//! What a vfork child may do (see `crate::fork`): read the address family of a call that could
//! start a TCP connection, so that one is refused and everything else passes through. Nothing
//! here touches tether's state.

use std::os::fd::RawFd;

use libc::{c_int, sockaddr, socklen_t};

use crate::sys::net;

/// The family of a connect address, if it has one.
///
/// # Safety
/// `addr` points to `len` readable bytes, or is null.
pub(crate) unsafe fn family_of(addr: *const sockaddr, len: socklen_t) -> Option<c_int> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); read unaligned.
    let family = unsafe { std::ptr::addr_of!((*addr).sa_family).read_unaligned() };
    Some(c_int::from(family))
}

/// The family of a listening socket (one getsockname; no state).
pub(crate) fn listener_family(fd: RawFd) -> Option<c_int> {
    net::local_addr(fd).map(|a| if a.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 })
}
