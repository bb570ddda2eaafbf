//! Issue 4 on a real tetherd: live reload, connection reports and `tether connections`,
//! `tether policy check`, and the metrics endpoint.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::Daemon;
use tether_broker::connections::MAX_PER_PROCESS;
use tether_broker::Error;
use tether_proto::wire::{ConnectionEvent, ConnectionReport, Direction, ErrorCode};

const BASE: &str = r#"
trust_domain = "example.org"
unmatched = "derive"
[[inbound]]
ports = [8443]
allow = ["spiffe://example.org/*"]
"#;

fn config_path(d: &Daemon) -> PathBuf {
    d.dir.path().join("tetherd.toml")
}

fn socket_mtime(d: &Daemon) -> SystemTime {
    fs::symlink_metadata(&d.socket).unwrap().modified().unwrap()
}

fn sighup(d: &Daemon) {
    let ok = Command::new("kill").arg("-HUP").arg(d.child.id().to_string()).status().unwrap();
    assert!(ok.success());
}

/// Poll until the policy generation reaches `want` (SIGHUP is asynchronous).
fn wait_generation(d: &Daemon, want: u64) {
    let start = Instant::now();
    loop {
        let g = d.client().fetch_policy().unwrap().generation;
        if g == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "generation stuck at {g}, want {want}: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_log(d: &Daemon, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let log = d.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "log never said {needle:?}: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn report(event: ConnectionEvent, conn_id: u64) -> ConnectionReport {
    ConnectionReport {
        event,
        conn_id,
        direction: Direction::Outbound,
        local_addr: "127.0.0.1:40000".into(),
        remote_addr: "127.0.0.1:8443".into(),
        local_id: Some("spiffe://tether.internal/client".parse().unwrap()),
        peer_id: Some("spiffe://tether.internal/server".parse().unwrap()),
        data_path: "ktls".into(),
        decision: "allow".into(),
        reason: None,
        opened_at: tether_broker::server::now_unix(),
        bytes: Some((10, 20)),
    }
}

fn refused_code(r: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    match r {
        Err(Error::Refused(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn reload_by_sighup_and_by_cli_applies_policy_and_entries() {
    let d = Daemon::start_with(Some(BASE), &[]);
    let p = d.client().fetch_policy().unwrap();
    assert_eq!((p.generation, p.policy.inbound.len(), p.policy.outbound.len()), (1, 1, 0));
    let before = d.fetch();
    assert_eq!(before.policy_generation, 1);
    assert!(before.spiffe_id.as_str().starts_with("spiffe://example.org/uid/0/exe/"), "{}", before.spiffe_id);
    let mtime0 = socket_mtime(&d);

    // SIGHUP: a new outbound rule and an entry that now names this (root) process.
    let with_entry = format!(
        "{BASE}[[outbound]]\nto = [\"127.0.0.0/8:9443\"]\nallow = [\"spiffe://example.org/*\"]\n\
         [[entry]]\nspiffe_id = \"spiffe://example.org/root\"\nselectors = [\"unix:uid:0\"]\n"
    );
    fs::write(config_path(&d), &with_entry).unwrap();
    sighup(&d);
    wait_generation(&d, 2);
    let p = d.client().fetch_policy().unwrap();
    assert_eq!(p.policy.outbound.len(), 1);
    let mtime1 = socket_mtime(&d);
    assert!(mtime1 > mtime0, "socket mtime must move on reload");
    let log = wait_log(&d, "policy reloaded");
    assert!(log.contains("generation=2") && log.contains("rules_in=1") && log.contains("rules_out=1"), "{log}");
    // The cached SVID's ID no longer matches the entries: a fresh one is issued.
    let after = d.fetch();
    assert_eq!(after.spiffe_id.as_str(), "spiffe://example.org/root");
    assert_ne!(after.serial, before.serial);
    assert_eq!((after.policy_generation, after.policy.outbound.len()), (2, 1));

    // `tether reload` as root.
    fs::write(config_path(&d), format!("default = \"deny\"\n{with_entry}")).unwrap();
    let o = d.tether(false, &["reload"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("policy generation 3"));
    let p = d.client().fetch_policy().unwrap();
    assert_eq!(p.generation, 3);
    assert_eq!(p.policy.default, tether_proto::policy::DefaultAction::Deny);
    assert!(socket_mtime(&d) > mtime1);
    // Cached SVIDs carry the policy in force, not the one they were issued under.
    let cached = d.fetch();
    assert_eq!(cached.serial, after.serial);
    assert_eq!(cached.policy_generation, 3);
}

#[test]
fn broken_config_on_reload_keeps_the_old_one_and_says_why() {
    let d = Daemon::start_with(Some(BASE), &[]);
    let mtime = socket_mtime(&d);
    fs::write(config_path(&d), format!("{BASE}bogus = 1\n")).unwrap();
    let o = d.tether(false, &["reload"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid_config") && err.contains("line 7") && err.contains("unknown field"), "{err}");
    assert!(err.contains("old config stays in force"), "{err}");
    fs::write(config_path(&d), "trust_domain = \"example.org\"\n[[inbound]]\nports = [1]\n").unwrap();
    sighup(&d);
    let log = wait_log(&d, "missing field");
    assert!(log.contains("config reload failed") && log.contains("line 2"), "{log}");
    // Start-time settings cannot change by reload.
    fs::write(config_path(&d), "trust_domain = \"other.org\"\n").unwrap();
    let o = d.tether(false, &["reload"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("trust_domain (example.org -> other.org) changed"));
    let p = d.client().fetch_policy().unwrap();
    assert_eq!((p.generation, p.policy.inbound[0].ports.clone()), (1, vec![8443]));
    assert_eq!(socket_mtime(&d), mtime);
    let mut d = d;
    d.assert_serving();
}

#[test]
fn reload_without_a_config_file_reapplies_the_embedded_default() {
    let d = Daemon::start(&[]);
    let o = d.tether(false, &["reload"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.client().fetch_policy().unwrap().generation, 2);
}

#[test]
fn non_root_reload_is_refused() {
    let d = Daemon::start(&[]);
    let o = d.tether(true, &["reload"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("permission_denied") && err.contains("only root"), "{err}");
    assert_eq!(d.client().fetch_policy().unwrap().generation, 1);
}

#[test]
fn reports_appear_in_tether_connections_and_close_drops_them() {
    let d = Daemon::start(&[]);
    let mut c = d.client();
    // Several reports on one connection, as the shim sends them.
    c.report(report(ConnectionEvent::Open, 1)).unwrap();
    c.report(report(ConnectionEvent::Open, 2)).unwrap();
    c.report(report(ConnectionEvent::Refused, 3)).unwrap();
    c.report(report(ConnectionEvent::Close, 2)).unwrap();

    let o = d.tether(false, &["connections", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r["pid"], std::process::id());
    assert_eq!(r["exe"], std::env::current_exe().unwrap().display().to_string());
    assert_eq!(r["conn_id"], 1);
    assert_eq!(r["peer_id"], "spiffe://tether.internal/server");
    assert_eq!(r["data_path"], "ktls");

    let o = d.tether(false, &["connections"]);
    let table = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("PID") && lines[0].contains("PEER ID") && lines[0].ends_with("BYTES"), "{table}");
    assert!(lines[1].starts_with(&std::process::id().to_string()) && lines[1].contains("10/20"), "{table}");

    // Other users see only their own rows.
    let o = d.tether(true, &["connections", "--json"]);
    assert!(o.status.success());
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap(), serde_json::json!([]));

    c.report(report(ConnectionEvent::Close, 1)).unwrap();
    assert!(d.client().connections().unwrap().0.is_empty());
}

#[test]
fn rows_of_exited_processes_are_swept() {
    let d = Daemon::start(&["--sweep-interval-ms", "50"]);
    // A child process reports and exits; its row must go.
    let o = Command::new("python3")
        .arg("-c")
        .arg(format!(
            r#"
import json, socket, struct
s = socket.socket(socket.AF_UNIX); s.connect({sock:?}); assert s.recv(8) == b"TG\x00\x01\x00\x00\x00\x00"
body = json.dumps({{"type":"report","event":"open","conn_id":9,"direction":"inbound","local_addr":"127.0.0.1:1",
    "remote_addr":"127.0.0.1:2","local_id":None,"peer_id":None,"data_path":"userspace","decision":"allow",
    "reason":None,"opened_at":1}}).encode()
s.sendall(b"TT" + struct.pack(">HI", 1, len(body)) + body)
h = s.recv(8); n = struct.unpack(">I", h[4:8])[0]; print(s.recv(n).decode())
"#,
            sock = d.socket.display().to_string()
        ))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"ok\""), "{o:?}");
    let start = Instant::now();
    while !d.client().connections().unwrap().0.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "row of an exited process not swept");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn per_process_cap_refuses_excess_open_reports() {
    let d = Daemon::start(&[]);
    let mut c = d.client();
    for i in 0..MAX_PER_PROCESS as u64 {
        c.report(report(ConnectionEvent::Open, i)).unwrap_or_else(|e| panic!("report {i}: {e}: {}", d.log_text()));
    }
    assert_eq!(refused_code(c.report(report(ConnectionEvent::Open, u64::MAX))), ErrorCode::LimitExceeded);
    // Closing one makes room again; the connection to tetherd stays usable throughout.
    c.report(report(ConnectionEvent::Close, 0)).unwrap();
    c.report(report(ConnectionEvent::Open, u64::MAX)).unwrap();
    // A full process's rows fit one frame (a longer table is cut: see connections::fit).
    let (rows, omitted) = c.connections().unwrap();
    assert_eq!((rows.len(), omitted), (MAX_PER_PROCESS, 0));
}

#[test]
fn policy_check_explains_human_and_json() {
    let d = Daemon::start(&[]);
    let args = ["policy", "check", "--from", "spiffe://tether.internal/x/y", "--to", "127.0.0.1:8443"];
    let o = d.tether(true, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("protect: spiffe://tether.internal/x/y -> 127.0.0.1:8443\n"), "{text}");
    assert!(text.contains("  - outbound rule #0 (to 127.0.0.0/8:8443, mode mutual) protects 127.0.0.1:8443"), "{text}");
    assert!(
        text.contains("  - inbound rule #0 (ports [8443], mode mutual) allows spiffe://tether.internal/x/y via pattern spiffe://tether.internal/*"),
        "{text}"
    );
    let o = d.tether(false, &[&args[..], &["--json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["decision"].as_str(), v["rule"].as_u64(), v["mode"].as_str()), (Some("protect"), Some(0), Some("mutual")));
    let o = d.tether(false, &["policy", "check", "--from", "spiffe://other.org/z", "--to", "127.0.0.1:8443"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("deny: "));
    let o = d.tether(false, &["policy", "check", "--from", "spiffe://a/b", "--to", "localhost:1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no host names"));
}

fn http_get<S: Read + Write>(mut s: S, path: &str) -> String {
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn scrape(port: u16) -> String {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = http_get(s, "/metrics");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    r
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn metrics_scrape_over_tcp_moves_with_issuance_reports_and_reloads() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(Some(BASE), &["--metrics", &metrics]);
    let m0 = scrape(port);
    assert!(m0.contains("# TYPE tether_svids_issued_total counter"), "{m0}");
    assert_eq!(sample(&m0, "tether_svids_issued_total"), 0.0);
    assert_eq!(sample(&m0, "tether_policy_generation"), 1.0);
    let ca_left = sample(&m0, "tether_ca_expiry_seconds");
    assert!(ca_left > 9.0 * 365.0 * 86400.0, "generated CA lives 10 years: {ca_left}");

    d.fetch();
    let mut c = d.client();
    c.report(report(ConnectionEvent::Open, 1)).unwrap();
    let mut refused = report(ConnectionEvent::Refused, 2);
    refused.reason = Some("peer spiffe://x/y is not in the allow list".into());
    c.report(refused).unwrap();
    fs::write(config_path(&d), "not toml at all").unwrap();
    assert!(!d.tether(false, &["reload"]).status.success());
    // With unmatched = "deny", nobody has no identity: refused, counted by reason.
    fs::write(config_path(&d), BASE.replace("derive", "deny")).unwrap();
    assert!(d.tether(false, &["reload"]).status.success());
    assert!(!d.tether(true, &["svid"]).status.success());

    let m1 = scrape(port);
    assert_eq!(sample(&m1, "tether_svids_issued_total"), 1.0, "{m1}");
    assert_eq!(sample(&m1, "tether_svids_refused_total{reason=\"no_identity\"}"), 1.0, "{m1}");
    assert_eq!(sample(&m1, "tether_connections_total{mode=\"ktls\"}"), 1.0, "{m1}");
    assert_eq!(sample(&m1, "tether_live_connections"), 1.0, "{m1}");
    assert_eq!(sample(&m1, "tether_handshakes_total{result=\"ok\",mode=\"ktls\",reason=\"none\"}"), 1.0, "{m1}");
    assert_eq!(
        sample(&m1, "tether_handshakes_total{result=\"failed\",mode=\"ktls\",reason=\"not_allowed\"}"),
        1.0,
        "{m1}"
    );
    assert_eq!(sample(&m1, "tether_config_reload_failures_total"), 1.0, "{m1}");
    assert_eq!(sample(&m1, "tether_policy_generation"), 2.0, "{m1}");

    // Anything but GET /metrics is 404; garbage does not hurt the responder.
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(http_get(s, "/").starts_with("HTTP/1.1 404"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[b'A'; 20000]).unwrap_or_default();
    drop(s);
    scrape(port);
}

#[test]
fn metrics_over_a_unix_socket() {
    let dir = common::TempDir::new("metrics");
    let path = dir.path().join("m/metrics.sock");
    let d = Daemon::start(&["--metrics", &format!("unix:{}", path.display())]);
    // The metrics socket is bound just after the broker's, which is what readiness waits for.
    let start = Instant::now();
    while UnixStream::connect(&path).is_err() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = http_get(s, "/metrics");
    assert!(r.starts_with("HTTP/1.1 200 OK") && r.contains("tether_live_connections 0"), "{r}");
    drop(d);
}

/// Review F10: SO_RCVTIMEO bounds each read of a scrape, not the request: one byte every few
/// seconds held a metrics slot (of 8, shared by everyone) for hours. A scrape now has an
/// absolute deadline of `SCRAPE_TIMEOUT` for its request head.
#[test]
fn a_scraper_trickling_its_request_is_cut_off_at_the_scrape_deadline() {
    let dir = common::TempDir::new("m-slow");
    let path = dir.path().join("m.sock");
    let _d = Daemon::start(&["--metrics", &format!("unix:{}", path.display())]);
    let start = Instant::now();
    while UnixStream::connect(&path).is_err() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = UnixStream::connect(&path).unwrap();
    let limit = tether_broker::metrics::SCRAPE_TIMEOUT;
    let w = s.try_clone().unwrap();
    let t = Instant::now();
    // One byte every second for three deadlines' worth of time, never ending the head.
    let trickle = std::thread::spawn(move || {
        let mut w = w;
        while t.elapsed() < limit * 3 {
            if w.write_all(b"G").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let held = t.elapsed();
    trickle.join().unwrap();
    assert!(held < limit + Duration::from_secs(2), "a trickling scraper held its slot for {held:?}");
}
