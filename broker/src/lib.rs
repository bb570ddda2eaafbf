//! tetherd, the local identity broker, and the shared code of the `tether` CLI.
//!
//! - [`config`]: the TOML config, selectors and identity selection.
//! - [`attest`]: SO_PEERCRED + /proc, with PID-reuse checks; builds [`attest::AttestedPeer`].
//! - [`impersonation`]: refusing tracers, injected code and bind mounts for binary-named entries.
//! - [`ca`]: the signing CA and X.509-SVID issuance.
//! - [`fleet`]: `tether ca init/intermediate` (offline root, per-host intermediates).
//! - [`cache`]: SVIDs cached per process until half-life.
//! - [`upstream`]: SPIRE as the source of SVIDs (the agent's Delegated Identity API).
//! - [`server`]: the Unix socket server and audit log.
//! - [`reload`]: live config reload (SIGHUP, `tether reload`) and the socket-mtime signal.
//! - [`connections`]: the live connection table fed by the shims' reports.
//! - [`quota`]: per-uid shares of connections and requests in flight.
//! - [`policy_check`]: `tether policy check`, which rule decides a connection and why.
//! - [`metrics`]: Prometheus counters and the `GET /metrics` responder.
//! - [`client`]: a blocking client for the CLI and tests.
//! - [`env`]: environment variables, behind a trait.
//! - [`doctor`]: `tether doctor`'s checks (kTLS, tetherd, clock, ld.so.preload, library, glibc).
//! - [`install`]: `/etc/ld.so.preload` host-wide mode and systemd drop-ins, with guards.
//! - [`elf`]: reading a library's type, dynamic symbols and glibc version needs.
//!
//! `unsafe` is denied (not forbidden) crate-wide only so that [`sys`], the one module holding the
//! two `getsockopt` FFI calls std cannot do safely, may allow it locally.
#![deny(unsafe_code)]

pub mod attest;
pub mod ca;
pub mod cache;
pub mod client;
pub mod config;
pub mod connections;
pub mod custody;
pub mod doctor;
pub mod elf;
pub mod env;
pub mod error;
pub mod files;
pub mod fleet;
pub mod impersonation;
pub mod install;
pub mod metrics;
pub mod pem;
pub mod policy_check;
pub mod quota;
pub mod reload;
pub mod run;
pub mod server;
pub mod sys;
pub mod upstream;

pub use error::Error;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Terse lines for people.
    #[default]
    Text,
    /// One JSON object per event, for machines.
    Json,
}

/// Install the global tracing subscriber, writing to stderr. The filter comes from
/// `$TETHERD_LOG`, else `$RUST_LOG`, else `info`.
pub fn init_logging(format: LogFormat, env: &dyn env::Env) {
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(env::log_filter(env)).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
