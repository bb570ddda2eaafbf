//! Process-wide settings, read once from the environment at load time.
//!
//! In secure-execution mode (setuid/setgid/capabilities, `AT_SECURE`) the environment is
//! attacker-controlled, so it is ignored and the defaults apply.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use tether_proto::wire::{DEFAULT_SOCKET, SOCKET_ENV};

/// Environment variable names, in one place.
pub(crate) mod env {
    pub(crate) const MODE: &str = "TETHER_MODE";
    pub(crate) const LOG: &str = "TETHER_LOG";
    pub(crate) const HANDSHAKE_TIMEOUT_MS: &str = "TETHER_HANDSHAKE_TIMEOUT_MS";
    pub(crate) const DISABLE: &str = "TETHER_DISABLE";
    /// `0`/`off`: never set `TLS_RX_EXPECT_NO_PAD` (the bench's "NO_PAD off" rows).
    pub(crate) const KTLS_RX_NO_PAD: &str = "TETHER_KTLS_RX_NO_PAD";
    pub(crate) const RESUMPTION: &str = "TETHER_RESUMPTION";
    /// `0`/`off`: accept never finishes a handshake inline; every one goes to a worker.
    pub(crate) const INLINE_ACCEPT: &str = "TETHER_INLINE_ACCEPT";
    pub(crate) const EXIT_FLUSH_MS: &str = "TETHER_EXIT_FLUSH_MS";
    /// Debug builds only: a named fault to inject (see [`super::Settings::fault`]).
    pub(crate) const TEST_FAULT: &str = "TETHER_TEST_FAULT";
}

/// Which data path protected connections use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataPathMode {
    /// kTLS when the kernel has it, userspace otherwise.
    Auto,
    /// kTLS or fail closed.
    Ktls,
    /// Always userspace.
    Userspace,
}

/// Where connection log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogTarget {
    Off,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) mode: DataPathMode,
    /// Set when TETHER_MODE held something we do not know: every protected connection fails
    /// closed rather than guessing.
    pub(crate) bad_mode: Option<String>,
    pub(crate) log: LogTarget,
    pub(crate) socket: PathBuf,
    pub(crate) handshake_timeout: Duration,
    /// `TETHER_DISABLE=1`: the shim is inert (tetherd itself sets this for its own process).
    pub(crate) disabled: bool,
    /// Set `TLS_RX_EXPECT_NO_PAD` on kTLS sockets whose peer is in our trust domain (default
    /// on; `TETHER_KTLS_RX_NO_PAD=0` turns it off).
    pub(crate) rx_no_pad: bool,
    /// TLS 1.3 resumption between tether peers (`TETHER_RESUMPTION=0` turns it off).
    pub(crate) resumption: bool,
    /// Accept finishes the handshake of a client that keeps up on its own thread (default on;
    /// `TETHER_INLINE_ACCEPT=0` turns it off).
    pub(crate) inline_accept: bool,
    /// At process exit, how long the relay may take to deliver what the program wrote and its
    /// `close_notify` (`TETHER_EXIT_FLUSH_MS`, 0 turns it off; see `fallback::at_exit`).
    pub(crate) exit_flush: Duration,
    /// `TETHER_TEST_FAULT`, honoured by debug builds only (release builds never read it): the
    /// e2e tests use it to reach failure paths a healthy peer cannot trigger, such as a panic
    /// after the real connect.
    pub(crate) test_fault: Option<String>,
}

/// A source of configuration values: the process environment, or a map in tests.
pub(crate) trait Source {
    fn var(&self, name: &str) -> Option<String>;
}

pub(crate) struct ProcessEnv;

impl Source for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_EXIT_FLUSH: Duration = Duration::from_secs(2);

impl Settings {
    pub(crate) fn from_source(src: &dyn Source, secure: bool) -> Self {
        let mut s = Settings {
            mode: DataPathMode::Auto,
            bad_mode: None,
            log: LogTarget::Off,
            socket: PathBuf::from(DEFAULT_SOCKET),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            disabled: false,
            rx_no_pad: true,
            resumption: true,
            inline_accept: true,
            exit_flush: DEFAULT_EXIT_FLUSH,
            test_fault: None,
        };
        if secure {
            return s;
        }
        match src.var(env::MODE).as_deref() {
            None | Some("") | Some("auto") => {}
            Some("ktls") => s.mode = DataPathMode::Ktls,
            Some("userspace") => s.mode = DataPathMode::Userspace,
            Some(other) => s.bad_mode = Some(other.to_owned()),
        }
        s.log = match src.var(env::LOG).as_deref() {
            None | Some("") | Some("0") | Some("off") => LogTarget::Off,
            Some(p) if p.starts_with('/') => LogTarget::File(PathBuf::from(p)),
            Some(_) => LogTarget::Stderr,
        };
        if let Some(p) = src.var(SOCKET_ENV).filter(|p| !p.is_empty()) {
            s.socket = PathBuf::from(p);
        }
        if let Some(ms) = src.var(env::HANDSHAKE_TIMEOUT_MS).and_then(|v| v.parse::<u64>().ok()) {
            s.handshake_timeout = Duration::from_millis(ms.clamp(50, 120_000));
        }
        if let Some(ms) = src.var(env::EXIT_FLUSH_MS).and_then(|v| v.parse::<u64>().ok()) {
            s.exit_flush = Duration::from_millis(ms.min(30_000));
        }
        s.disabled = matches!(src.var(env::DISABLE).as_deref(), Some("1") | Some("true"));
        s.rx_no_pad = !matches!(
            src.var(env::KTLS_RX_NO_PAD).as_deref(),
            Some("0") | Some("off") | Some("false")
        );
        s.resumption = !matches!(src.var(env::RESUMPTION).as_deref(), Some("0") | Some("off") | Some("false"));
        s.inline_accept = !matches!(src.var(env::INLINE_ACCEPT).as_deref(), Some("0") | Some("off") | Some("false"));
        if cfg!(debug_assertions) {
            s.test_fault = src.var(env::TEST_FAULT).filter(|v| !v.is_empty());
        }
        s
    }

    /// Debug builds: panic if `TETHER_TEST_FAULT` names `point`. A no-op in release builds.
    pub(crate) fn fault(&self, point: &str) {
        if cfg!(debug_assertions) && self.test_fault.as_deref() == Some(point) {
            panic!("injected test fault at {point}");
        }
    }
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

pub(crate) fn get() -> &'static Settings {
    SETTINGS.get_or_init(|| {
        // SAFETY: getauxval has no preconditions.
        let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
        Settings::from_source(&ProcessEnv, secure)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Map(HashMap<&'static str, &'static str>);

    impl Source for Map {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    #[test]
    fn environment_is_ignored_in_secure_mode() {
        let m = Map(HashMap::from([(env::MODE, "userspace"), (SOCKET_ENV, "/tmp/evil.sock")]));
        let s = Settings::from_source(&m, true);
        assert_eq!(s.mode, DataPathMode::Auto);
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        let s = Settings::from_source(&m, false);
        assert_eq!(s.mode, DataPathMode::Userspace);
        assert_eq!(s.socket, PathBuf::from("/tmp/evil.sock"));
    }

    #[test]
    fn unknown_mode_is_remembered_not_guessed() {
        let m = Map(HashMap::from([(env::MODE, "plaintext")]));
        assert_eq!(Settings::from_source(&m, false).bad_mode.as_deref(), Some("plaintext"));
    }
}
