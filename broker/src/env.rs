//! Environment variables, read through a small trait so tests never mutate the process env.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

pub use tether_proto::wire::{DEFAULT_SOCKET, SOCKET_ENV};

/// Log filter for tetherd and the CLI (tracing `EnvFilter` syntax, e.g. `info,tether=debug`).
pub const LOG_ENV: &str = "TETHERD_LOG";
/// Fallback log filter, read when [`LOG_ENV`] is unset.
pub const RUST_LOG_ENV: &str = "RUST_LOG";

/// Where configuration values come from.
pub trait Env {
    fn var(&self, name: &str) -> Option<OsString>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }
}

/// A fixed map, for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub HashMap<String, OsString>);

impl MapEnv {
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.0.insert(name.to_owned(), value.into());
        self
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        self.0.get(name).cloned()
    }
}

/// The broker socket: an explicit flag, else `$TETHER_SOCKET` (if non-empty), else the default.
pub fn socket_path(flag: Option<PathBuf>, env: &dyn Env) -> PathBuf {
    flag.or_else(|| env.var(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// The log filter directive: `$TETHERD_LOG`, else `$RUST_LOG`, else `info`.
pub fn log_filter(env: &dyn Env) -> String {
    [LOG_ENV, RUST_LOG_ENV]
        .iter()
        .find_map(|n| env.var(n).and_then(|v| v.into_string().ok()).filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "info".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_flag_beats_env_beats_default() {
        let env = MapEnv::default().with(SOCKET_ENV, "/env.sock");
        assert_eq!(socket_path(Some("/flag.sock".into()), &env), PathBuf::from("/flag.sock"));
        assert_eq!(socket_path(None, &env), PathBuf::from("/env.sock"));
        assert_eq!(socket_path(None, &MapEnv::default()), PathBuf::from(DEFAULT_SOCKET));
        let empty = MapEnv::default().with(SOCKET_ENV, "");
        assert_eq!(socket_path(None, &empty), PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn log_filter_prefers_tether_log() {
        let env = MapEnv::default().with(RUST_LOG_ENV, "warn").with(LOG_ENV, "debug");
        assert_eq!(log_filter(&env), "debug");
        assert_eq!(log_filter(&MapEnv::default().with(RUST_LOG_ENV, "warn")), "warn");
        assert_eq!(log_filter(&MapEnv::default()), "info");
    }
}
