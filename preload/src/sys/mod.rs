//! Raw kernel interfaces (FFI): kTLS and socket helpers.

pub(crate) mod control;
pub(crate) mod ktls;
pub(crate) mod net;
pub(crate) mod tetherd;
