//! Prometheus counters and a minimal HTTP/1.1 responder for `GET /metrics`.
//!
//! Every label value comes from a small fixed set (error codes, data paths, reason classes), so
//! no client can grow the number of series. The responder is one accept thread plus at most
//! [`MAX_SCRAPERS`] short-lived handler threads, each bounded by a read timeout and a request
//! size limit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_proto::wire::{ConnectionEvent, ConnectionReport, ErrorCode};
use tracing::{debug, info, warn};

use crate::config::MetricsListen;
use crate::connections::TableFull;

/// Concurrent scrapes being answered; more are closed at once.
pub const MAX_SCRAPERS: usize = 8;
/// Largest request head accepted.
pub const MAX_REQUEST: usize = 8192;
/// How long a scraper may take to send its request (and to read the answer).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";


/// A counter with a fixed list of label names; values are `&'static str` from bounded sets.
#[derive(Debug, Default)]
struct Labeled(Mutex<BTreeMap<Vec<&'static str>, u64>>);

impl Labeled {
    fn inc(&self, values: &[&'static str]) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(values.to_vec()).or_insert(0) += 1;
    }

    fn snapshot(&self) -> Vec<(Vec<&'static str>, u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Values read at scrape time rather than counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub live_connections: u64,
    /// Seconds until the CA's notAfter (negative once expired).
    pub ca_expiry_seconds: i64,
    pub policy_generation: u64,
    pub held_keys: u64,
}

/// tetherd's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    svids_issued: AtomicU64,
    svids_refused: Labeled,
    attestation_failures: AtomicU64,
    handshakes: Labeled,
    connections: Labeled,
    reports_dropped: Labeled,
    reload_failures: AtomicU64,
    signatures: AtomicU64,
    signatures_refused: Labeled,
    keys_destroyed: Labeled,
}

impl Metrics {
    pub fn svid_issued(&self) {
        self.svids_issued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn svid_refused(&self, code: ErrorCode) {
        self.svids_refused.inc(&[code_label(code)]);
    }

    pub fn attestation_failed(&self) {
        self.attestation_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A CertificateVerify signed with a key tetherd holds (broker custody).
    pub fn signed(&self) {
        self.signatures.fetch_add(1, Ordering::Relaxed);
    }

    /// A signing request refused; `why` is one of `custody::Refusal::label`'s values.
    pub fn sign_refused(&self, why: &'static str) {
        self.signatures_refused.inc(&[why]);
    }

    /// A held key destroyed; `why`: "exited", "impersonation", "expired", "evicted".
    pub fn key_destroyed(&self, why: &'static str) {
        self.keys_destroyed.inc(&[why]);
    }

    pub fn reload_failed(&self) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn report_dropped(&self, why: TableFull) {
        self.reports_dropped.inc(&[why.label()]);
    }

    /// A report failed its field checks.
    pub fn report_invalid(&self) {
        self.reports_dropped.inc(&["invalid"]);
    }

    /// Count what a shim's report says happened. An `open` over kTLS or userspace TLS is a
    /// successful handshake; a plaintext open (observe, permissive) had none. A `refused`
    /// report is a failed handshake, labelled by the class of its reason.
    pub fn report(&self, r: &ConnectionReport) {
        let mode = data_path_label(&r.data_path);
        match r.event {
            ConnectionEvent::Open => {
                self.connections.inc(&[mode]);
                if mode != "plaintext" {
                    self.handshakes.inc(&["ok", mode, "none"]);
                }
            }
            ConnectionEvent::Refused => {
                self.handshakes.inc(&["failed", mode, reason_class(r.reason.as_deref())]);
            }
            ConnectionEvent::Close => {}
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::with_capacity(2048);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let labeled = |out: &mut String, name: &str, keys: &[&str], rows: Vec<(Vec<&'static str>, u64)>| {
            for (values, n) in rows {
                let labels: Vec<String> = keys.iter().zip(values).map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                let _ = writeln!(out, "{name}{{{}}} {n}", labels.join(","));
            }
        };
        head(&mut out, "tether_svids_issued_total", "counter", "X.509-SVIDs signed (cache hits not counted).");
        let _ = writeln!(out, "tether_svids_issued_total {}", self.svids_issued.load(Ordering::Relaxed));
        head(&mut out, "tether_svids_refused_total", "counter", "SVID requests refused, by error code.");
        labeled(&mut out, "tether_svids_refused_total", &["reason"], self.svids_refused.snapshot());
        head(&mut out, "tether_attestation_failures_total", "counter", "Callers that could not be attested.");
        let _ = writeln!(
            out,
            "tether_attestation_failures_total {}",
            self.attestation_failures.load(Ordering::Relaxed)
        );
        head(
            &mut out,
            "tether_handshakes_total",
            "counter",
            "mTLS handshakes reported by shims, by result, data path and reason class.",
        );
        labeled(&mut out, "tether_handshakes_total", &["result", "mode", "reason"], self.handshakes.snapshot());
        head(&mut out, "tether_connections_total", "counter", "Connections opened, by data path (ktls, userspace, plaintext).");
        labeled(&mut out, "tether_connections_total", &["mode"], self.connections.snapshot());
        head(&mut out, "tether_live_connections", "gauge", "Connections reported open and not yet closed.");
        let _ = writeln!(out, "tether_live_connections {}", g.live_connections);
        head(
            &mut out,
            "tether_connection_reports_dropped_total",
            "counter",
            "Open reports not stored because the connection table was full.",
        );
        labeled(&mut out, "tether_connection_reports_dropped_total", &["reason"], self.reports_dropped.snapshot());
        head(&mut out, "tether_ca_expiry_seconds", "gauge", "Seconds until the signing CA certificate expires.");
        let _ = writeln!(out, "tether_ca_expiry_seconds {}", g.ca_expiry_seconds);
        head(&mut out, "tether_policy_generation", "gauge", "Generation of the config in force; bumped by each reload.");
        let _ = writeln!(out, "tether_policy_generation {}", g.policy_generation);
        head(&mut out, "tether_config_reload_failures_total", "counter", "Reloads refused because the config was invalid.");
        let _ = writeln!(
            out,
            "tether_config_reload_failures_total {}",
            self.reload_failures.load(Ordering::Relaxed)
        );
        head(&mut out, "tether_signatures_total", "counter", "CertificateVerify signatures made with keys tetherd holds.");
        let _ = writeln!(out, "tether_signatures_total {}", self.signatures.load(Ordering::Relaxed));
        head(&mut out, "tether_signatures_refused_total", "counter", "Signing requests refused, by reason.");
        labeled(&mut out, "tether_signatures_refused_total", &["reason"], self.signatures_refused.snapshot());
        head(&mut out, "tether_held_keys_destroyed_total", "counter", "Keys tetherd held and destroyed, by cause.");
        labeled(&mut out, "tether_held_keys_destroyed_total", &["reason"], self.keys_destroyed.snapshot());
        head(&mut out, "tether_held_keys", "gauge", "Private keys tetherd holds for live processes (broker custody).");
        let _ = writeln!(out, "tether_held_keys {}", g.held_keys);
        out
    }
}

/// The wire name of an error code, as a static label.
pub fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::Timeout => "timeout",
        ErrorCode::UnknownRequest => "unknown_request",
        ErrorCode::AttestationFailed => "attestation_failed",
        ErrorCode::NoIdentity => "no_identity",
        ErrorCode::Busy => "busy",
        ErrorCode::PermissionDenied => "permission_denied",
        ErrorCode::InvalidConfig => "invalid_config",
        ErrorCode::LimitExceeded => "limit_exceeded",
        ErrorCode::Internal => "internal",
        _ => "other",
    }
}

/// `ktls`, `userspace`, `plaintext`, or `other` for anything a shim made up.
pub fn data_path_label(data_path: &str) -> &'static str {
    match data_path {
        "ktls" => "ktls",
        "userspace" => "userspace",
        "plaintext" => "plaintext",
        _ => "other",
    }
}

/// Map a shim's free-text refusal reason to one of a few classes:
/// `not_allowed`, `no_identity`, `bad_certificate`, `timeout`, `not_tls`, `peer_closed`,
/// `tls_error`, `other`. The first matching class wins, in that order.
pub fn reason_class(reason: Option<&str>) -> &'static str {
    let Some(r) = reason else { return "other" };
    let r = r.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| r.contains(w));
    if has(&["not in the allow list", "not allowed", "allow list", "default is deny", "denied", "eperm"]) {
        "not_allowed"
    } else if has(&["tetherd", "no identity", "no_identity", "eacces"]) {
        "no_identity"
    } else if has(&["certificate", "svid", "trust domain", "unknown issuer", "unknownissuer", "expired", "bad signature"])
    {
        "bad_certificate"
    } else if has(&["timed out", "timeout", "etimedout"]) {
        "timeout"
    } else if has(&["not speaking tls", "not tls", "not a tls", "clienthello", "did not start tls"]) {
        "not_tls"
    } else if has(&["peer closed", "connection reset", "closed the connection", "eof", "broken pipe"]) {
        "peer_closed"
    } else if has(&["tls error", "alert", "handshake", "decrypt"]) {
        "tls_error"
    } else {
        "other"
    }
}

/// What a request head asks for.
fn route(head: &[u8]) -> &'static str {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return "400 Bad Request";
    }
    let path = target.unwrap_or_default().split('?').next().unwrap_or_default();
    if method == Some("GET") && path == "/metrics" {
        "200 OK"
    } else {
        "404 Not Found"
    }
}

/// Read one request head (bounded in size, and in time by an absolute deadline of
/// [`SCRAPE_TIMEOUT`]: each read waits only for what is left of it), answer it, close.
fn answer<S: ScrapeStream>(mut s: S, render: &dyn Fn() -> String) {
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let status = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_left(left).is_err() {
            debug!("metrics scrape: request head not complete by the deadline");
            return;
        }
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!(error = %e, "metrics scrape: read failed");
                return;
            }
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break route(&buf);
        }
        if buf.len() > MAX_REQUEST {
            break "431 Request Header Fields Too Large";
        }
    };
    let body = if status.starts_with("200") { render() } else { format!("{status}\n") };
    let content_type = if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes())).and_then(|()| s.flush());
}

/// A bound metrics listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Bind `listen`. A Unix socket's parent directory is created (0755) and a stale socket file
/// replaced; the socket is made 0666 (the same exposure as a loopback TCP port).
pub fn bind(listen: &MetricsListen) -> io::Result<Listener> {
    match listen {
        MetricsListen::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                warn!(%addr, "metrics are served on a non-loopback address");
            }
            TcpListener::bind(addr).map(Listener::Tcp)
        }
        MetricsListen::Unix(path) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
                fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
            }
            crate::server::remove_stale_socket(path)?;
            let l = UnixListener::bind(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o666))?;
            Ok(Listener::Unix(l))
        }
    }
}

/// A scraper's connection: TCP or Unix.
trait ScrapeStream: Read + Write + Send + 'static {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
    fn set_read_left(&self, t: Duration) -> io::Result<()>;
}

impl ScrapeStream for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }

    fn set_read_left(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

impl ScrapeStream for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }

    fn set_read_left(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

/// Accept forever, answering each scrape on its own short-lived thread (at most [`MAX_SCRAPERS`]).
fn accept_loop<S: ScrapeStream>(incoming: impl Iterator<Item = io::Result<S>>, render: &Arc<Renderer>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for s in incoming {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_SCRAPERS {
            busy.fetch_sub(1, Ordering::AcqRel);
            debug!("metrics: too many concurrent scrapes; closing one");
            continue;
        }
        let _ = s.set_timeouts(SCRAPE_TIMEOUT);
        let (busy2, render) = (Arc::clone(&busy), Arc::clone(render));
        let spawned = std::thread::Builder::new().name("scrape".into()).stack_size(128 << 10).spawn(move || {
            answer(s, &*render);
            busy2.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
            warn!("metrics: cannot spawn a scrape thread");
        }
    }
}

/// Renders the exposition at scrape time.
pub type Renderer = dyn Fn() -> String + Send + Sync;

/// Serve `GET /metrics` on `listener` from a background thread.
pub fn spawn(listener: Listener, render: Arc<Renderer>) -> io::Result<()> {
    std::thread::Builder::new().name("metrics".into()).spawn(move || match listener {
        Listener::Tcp(l) => {
            info!(addr = ?l.local_addr().ok(), "serving metrics");
            accept_loop(l.incoming(), &render);
        }
        Listener::Unix(l) => {
            info!(path = ?l.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.to_owned())), "serving metrics");
            accept_loop(l.incoming(), &render);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn shim_reasons_map_to_few_classes() {
        for (reason, class) in [
            ("peer spiffe://a/b is not in the allow list", "not_allowed"),
            ("no rule matches and the policy default is deny", "not_allowed"),
            ("peer certificate rejected: UnknownIssuer", "bad_certificate"),
            ("peer certificate rejected: wrong trust domain", "bad_certificate"),
            ("handshake timed out", "timeout"),
            ("peer is not speaking TLS", "not_tls"),
            ("permissive mode: client did not start TLS", "not_tls"),
            ("peer closed the connection during the handshake", "peer_closed"),
            ("tetherd unreachable: connection refused", "no_identity"),
            ("tetherd sent an unusable SVID: bad key", "no_identity"),
            ("TLS error: received fatal alert: HandshakeFailure", "tls_error"),
            ("kTLS setup failed: EINVAL", "other"),
        ] {
            assert_eq!(reason_class(Some(reason)), class, "{reason}");
        }
        assert_eq!(reason_class(None), "other");
        assert_eq!(data_path_label("ktls"), "ktls");
        assert_eq!(data_path_label("made-up\"}"), "other");
    }

    #[test]
    fn exposition_has_help_type_and_labels() {
        let m = Metrics::default();
        m.svid_issued();
        m.svid_refused(ErrorCode::NoIdentity);
        let mut r = ConnectionReport {
            event: ConnectionEvent::Open,
            conn_id: 1,
            direction: tether_proto::wire::Direction::Outbound,
            local_addr: String::new(),
            remote_addr: String::new(),
            local_id: None,
            peer_id: None,
            data_path: "ktls".into(),
            decision: "allow".into(),
            reason: None,
            opened_at: 0,
            bytes: None,
        };
        m.report(&r);
        r.event = ConnectionEvent::Refused;
        r.reason = Some("handshake timed out".into());
        m.report(&r);
        let text = m.render(Gauges { live_connections: 3, ca_expiry_seconds: 99, policy_generation: 2, held_keys: 0 });
        for want in [
            "# TYPE tether_svids_issued_total counter",
            "tether_svids_issued_total 1",
            "tether_svids_refused_total{reason=\"no_identity\"} 1",
            "tether_handshakes_total{result=\"ok\",mode=\"ktls\",reason=\"none\"} 1",
            "tether_handshakes_total{result=\"failed\",mode=\"ktls\",reason=\"timeout\"} 1",
            "tether_connections_total{mode=\"ktls\"} 1",
            "tether_live_connections 3",
            "tether_ca_expiry_seconds 99",
            "tether_policy_generation 2",
            "tether_config_reload_failures_total 0",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
        for line in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(line.split_whitespace().count() > 3, "{line}");
        }
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), "200 OK");
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), "200 OK");
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), "404 Not Found");
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), "404 Not Found");
        assert_eq!(route(b"\x16\x03\x01garbage\r\n\r\n"), "400 Bad Request");
    }
}
