//! Live config reload: where the config comes from, what a reload may change, and the signal
//! the shims watch (the socket file's mtime).
//!
//! A reload (SIGHUP or `tether reload`) re-reads the config source. Registration entries,
//! `unmatched`, `svid_ttl` and the policy take effect at once; the settings tetherd binds at start
//! (trust domain, socket, state dir, CA files, federated bundles, metrics listener) cannot
//! change, and a file that changes them is refused like an invalid one: the old config stays in
//! force and the reason is logged and returned. CA and bundle *files* are read only at start.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use signal_hook::consts::SIGHUP;
use signal_hook::iterator::Signals;

use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::config::{Config, ConfigError, EtcFiles, MetricsListen};
use crate::error::Error;
use crate::server::Broker;
use crate::sys;

/// The config file (or the embedded default) plus the command-line overrides, re-applied on
/// every reload.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `--config`; `None` is the embedded default.
    pub path: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub metrics: Option<MetricsListen>,
}

impl ConfigSource {
    /// Read, validate and apply the overrides.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.path {
            Some(p) => Config::load(p, &EtcFiles::default())?,
            None => Config::embedded_default()?,
        };
        if let Some(s) = &self.socket {
            c.socket = s.clone();
        }
        if let Some(d) = &self.state_dir {
            c.state_dir = d.clone();
        }
        if let Some(m) = &self.metrics {
            c.metrics = Some(m.clone());
        }
        Ok(c)
    }
}

/// Why a reload was refused. The old config stays in force either way.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReloadError {
    /// The file does not load (line, column and reason inside).
    Invalid(ConfigError),
    /// The file changes settings that only a restart applies.
    NeedsRestart(Vec<String>),
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "{e}; the old config stays in force"),
            Self::NeedsRestart(what) => write!(
                f,
                "{} changed, which takes effect only when tetherd restarts; the old config stays in force",
                what.join(", ")
            ),
        }
    }
}

impl std::error::Error for ReloadError {}

/// The start-time settings that differ between `old` and `new`, described for people.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.trust_domain != new.trust_domain {
        out.push(format!("trust_domain ({} -> {})", old.trust_domain, new.trust_domain));
    }
    if old.socket != new.socket {
        out.push(format!("socket ({} -> {})", old.socket.display(), new.socket.display()));
    }
    if old.state_dir != new.state_dir {
        out.push(format!("state_dir ({} -> {})", old.state_dir.display(), new.state_dir.display()));
    }
    if old.ca != new.ca {
        out.push("ca_cert/ca_key/ca_bundle".to_owned());
    }
    if old.upstream != new.upstream {
        out.push("[upstream]".to_owned());
    }
    if old.federated_bundles != new.federated_bundles {
        out.push("federated_bundles".to_owned());
    }
    if old.metrics != new.metrics {
        let show = |m: &Option<MetricsListen>| m.as_ref().map_or_else(|| "off".to_owned(), ToString::to_string);
        out.push(format!("metrics ({} -> {})", show(&old.metrics), show(&new.metrics)));
    }
    out
}

/// The socket file's mtime, which shims stat to notice a reload. Each successful reload sets it
/// to a value strictly greater than the last one tetherd set (nanoseconds, so two reloads in the
/// same clock tick still differ).
#[derive(Debug)]
pub struct SocketStamp {
    path: PathBuf,
    last: Mutex<SystemTime>,
}

impl SocketStamp {
    pub fn new(path: PathBuf) -> Self {
        let last = std::fs::symlink_metadata(&path).and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
        Self { path, last: Mutex::new(last) }
    }

    /// Set the mtime to now (or just past the previous stamp). Returns the value set.
    pub fn touch(&self) -> io::Result<SystemTime> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let t = if now > *last { now } else { *last + Duration::from_nanos(1) };
        sys::set_mtime(&self.path, t)?;
        *last = t;
        Ok(t)
    }
}

/// Block SIGHUP's default action (exit) now, so a SIGHUP that arrives before the broker is
/// serving is queued, not fatal.
pub fn catch_sighup() -> io::Result<Signals> {
    Signals::new([SIGHUP])
}

/// Reload `broker` on every SIGHUP, from a background thread. Errors are logged by the reload.
pub fn spawn_sighup_reloader(broker: Arc<Broker>, mut signals: Signals) -> io::Result<()> {
    std::thread::Builder::new().name("sighup".into()).spawn(move || {
        for _ in signals.forever() {
            let _ = broker.reload("SIGHUP");
        }
    })?;
    Ok(())
}

/// `tether reload`: ask tetherd to re-read its config. tetherd's refusal (not root, or an
/// invalid file with its line, column and reason) comes back as the error.
pub fn command(socket: &Path) -> Result<String, Error> {
    let msg = Client::connect(socket, DEFAULT_TIMEOUT)?.reload()?;
    Ok(format!("{msg}\n"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(body: &str) -> Config {
        Config::parse(&format!("trust_domain = \"example.org\"\n{body}"), "t.toml", &EtcFiles::default()).unwrap()
    }

    #[test]
    fn policy_and_entries_may_change_but_start_time_settings_may_not() {
        let old = parse("[[inbound]]\nports = [1]\nallow = []\n");
        let new = parse("svid_ttl = \"2h\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = [\"unix:uid:0\"]\n");
        assert!(restart_only_changes(&old, &new).is_empty());
        let moved = parse("socket = \"/tmp/x.sock\"\nmetrics = \"127.0.0.1:1\"\n");
        let why = restart_only_changes(&old, &moved);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].starts_with("socket (") && why[1] == "metrics (off -> 127.0.0.1:1)", "{why:?}");
        let e = ReloadError::NeedsRestart(why).to_string();
        assert!(e.contains("only when tetherd restarts"), "{e}");
    }

    #[test]
    fn overrides_are_reapplied() {
        let src = ConfigSource { socket: Some("/s".into()), state_dir: Some("/d".into()), ..Default::default() };
        let c = src.load().unwrap();
        assert_eq!((c.socket, c.state_dir), (PathBuf::from("/s"), PathBuf::from("/d")));
    }

    #[test]
    fn stamps_strictly_increase() {
        let dir = std::env::temp_dir().join(format!("tether-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let stamp = SocketStamp::new(sock.clone());
        let mut prev = std::fs::symlink_metadata(&sock).unwrap().modified().unwrap();
        for _ in 0..50 {
            let t = stamp.touch().unwrap();
            let seen = std::fs::symlink_metadata(&sock).unwrap().modified().unwrap();
            assert_eq!(seen, t);
            assert!(seen > prev);
            prev = seen;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
