//! Types shared by every tether component.
//!
//! - [`spiffe`]: the validated [`SpiffeId`] and the `allow` patterns that match it.
//! - [`policy`]: which TCP connections are protected, and which peers they accept.
//! - [`ktls`]: the kernel TLS ABI (cipher ids and `crypto_info` layouts) for probes.
//! - [`wire`]: the framed, versioned request/response protocol spoken on tetherd's Unix socket.
//!
//! This crate does no I/O beyond the small blocking helpers in [`wire::io`].
#![forbid(unsafe_code)]

pub mod ktls;
pub mod policy;
pub mod spiffe;
pub mod wire;

pub use policy::{Destination, InboundRule, KeyUpdateAfter, Mode, OutboundRule, Policy};
pub use spiffe::{IdPattern, SpiffeId, TrustDomain};
