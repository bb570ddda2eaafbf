use std::os::fd::RawFd;
use std::sync::Arc;
#[derive(Debug)]
pub(crate) struct Link;
impl Link { pub(crate) fn tcp_fd(&self) -> RawFd { -1 } }
pub(crate) fn adopt(_app_fd: RawFd, _conn: rustls::Connection) -> std::io::Result<Arc<Link>> { Err(std::io::Error::other("stub")) }
pub(crate) fn is_internal(_fd: RawFd) -> bool { false }
pub(crate) fn internal_fds() -> Vec<RawFd> { Vec::new() }
pub(crate) fn atfork_prepare() {}
pub(crate) fn atfork_parent() {}
pub(crate) fn atfork_child() {}
