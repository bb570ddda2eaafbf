//! The logic layer: each function decides what a hooked call means for tether and returns
//! [`Outcome`](crate::guard::Outcome): pass through, handled, or failed with a chosen errno.

pub(crate) mod accept;
pub(crate) mod connect;
pub(crate) mod ending;
pub(crate) mod fds;
pub(crate) mod inbound;
pub(crate) mod io;
pub(crate) mod lingering;
pub(crate) mod protect;
pub(crate) mod rotation;
pub(crate) mod send;
pub(crate) mod txkey;
pub(crate) mod vfork;
