//! Issue 4: rollout modes (permissive, observe, default deny), live policy reload, and the
//! live connection table, with real programs under the shim and a real tetherd.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_shim_tests::{
    curl_get, derived_id, expected_mode, free_port, http_server, show, tether_cli_path, Harness, Policy, ANY_ID,
    PYTHON, PY_CLIENT,
};

/// A client that keeps one connection open and echoes one line per stdin line:
/// `held.py PORT` prints `connected`, then for each stdin line sends it and prints `echo=<reply>`.
const PY_HELD: &str = r#"
import socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    print("connect_error=%s" % e, flush=True); sys.exit(3)
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    data = b""
    s.settimeout(20)
    try:
        while not data.endswith(b"\n"):
            d = s.recv(4096)
            if not d:
                break
            data += d
    except OSError as e:
        print("recv_error=%s" % e, flush=True)
    print("echo=" + data.decode().strip(), flush=True)
"#;

fn echo_server(port: u16) -> Command {
    let mut c = Command::new(PYTHON);
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/py/echo_server.py")).arg(port.to_string());
    c
}

/// Rows in `tether connections --json` output (an array of objects).
fn rows_in(stdout: &[u8]) -> usize {
    serde_json::from_slice::<serde_json::Value>(stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

fn tether(h: &Harness, args: &[&str]) -> std::process::Output {
    Command::new(tether_cli_path())
        .args(args)
        .arg("--socket")
        .arg(h.socket())
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap()
}

/// Permissive: the same port accepts a tether mTLS client and a plain curl.
#[test]
fn permissive_port_accepts_tether_and_plaintext_clients() {
    let port = free_port();
    let policy = Policy::new()
        .raw(&format!("[[inbound]]\nports = [{port}]\nallow = [\"{ANY_ID}\"]\nmode = \"permissive\""))
        .outbound(port, &[ANY_ID]);
    let mut h = Harness::new("permissive", policy);
    let www = h.www("hello permissive\n");
    h.spawn_server("server", h.shim(&mut http_server(port, &www), "server"), port);

    let url = format!("http://127.0.0.1:{port}/index.html");
    // The tether client's connection is TLS on the wire (captured before the plain one).
    let check = tether_shim_tests::DataPathCheck::begin(&h, port);
    let run = h.run("curl-tether", h.shim(&mut curl_get(&url, &h.path("a")), "curl-tether"), Duration::from_secs(30));
    assert!(run.success(), "tether client: {run}");
    check.finish_with_markers(&h.log_lines("curl-tether"), &[b"GET /index.html", b"hello permissive"]);
    let run = h.run("curl-plain", h.plain(&mut curl_get(&url, &h.path("b"))), Duration::from_secs(30));
    assert!(run.success(), "plain client on a permissive port: {run}");
    for f in ["a", "b"] {
        assert_eq!(fs::read_to_string(h.path(f)).unwrap(), "hello permissive\n");
    }
    let server = h.wait_log("server", Duration::from_secs(10), |l| {
        l.iter().any(|x| x.is("accept", "allow")) && l.iter().any(|x| x.is("accept", "plaintext"))
    });
    let tls = server.iter().find(|l| l.is("accept", "allow")).unwrap_or_else(|| panic!("{}", show(&server)));
    assert_eq!(tls.get("mode"), expected_mode());
    assert_eq!(tls.get("peer_id"), derived_id("/usr/bin/curl"));
    assert!(server.iter().any(|l| l.is("accept", "plaintext")), "{}", show(&server));
}

/// Observe: nothing is encrypted, but the would-be decision is logged (and reported).
#[test]
fn observe_mode_logs_without_encrypting() {
    let port = free_port();
    let metrics = free_port();
    let policy = Policy::new().raw(&format!(
        "metrics = \"127.0.0.1:{metrics}\"\n[[outbound]]\nto = [\"127.0.0.1/32:{port}\"]\nallow = [\"{ANY_ID}\"]\nmode = \"observe\""
    ));
    let mut h = Harness::new("observe", policy);
    let mut nc = Command::new("nc");
    nc.args(["-l", "127.0.0.1", &port.to_string()]);
    h.spawn_server("nc", h.plain(&mut nc), port);
    let mut curl = curl_get(&format!("http://127.0.0.1:{port}/observed"), &h.path("out"));
    curl.args(["--max-time", "3"]);
    let _ = h.run("curl", h.shim(&mut curl, "curl"), Duration::from_secs(20));
    let got = fs::read(h.path("logs/nc.out")).unwrap_or_default();
    assert!(got.starts_with(b"GET /observed"), "observe mode must pass plaintext through: {:?}", String::from_utf8_lossy(&got));
    let lines = h.log_lines("curl");
    let l = lines.iter().find(|l| l.is("connect", "observe")).unwrap_or_else(|| panic!("{}", show(&lines)));
    assert!(l.get("reason").contains("observe"), "{}", l.raw);

    // ... and counted: the shim's report reaches tetherd's metrics as a plaintext connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = scrape(metrics);
        if body.lines().any(|l| l.starts_with("tether_connections_total{mode=\"plaintext\"} ") && !l.ends_with(" 0")) {
            break;
        }
        assert!(Instant::now() < deadline, "observe decision not counted:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// GET /metrics from tetherd's Prometheus endpoint.
fn scrape(port: u16) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `default = "deny"`: unmatched outbound TCP is refused (EACCES) with a logged reason, while
/// matched destinations still work and Unix sockets are untouched.
#[test]
fn default_deny_refuses_unmatched_destinations() {
    let port = free_port();
    let other = free_port();
    let mut h = Harness::new("default-deny", Policy::new().raw("default = \"deny\"").both(port));
    let www = h.www("ok\n");
    h.spawn_server("server", h.shim(&mut http_server(port, &www), "server"), port);
    h.spawn_server("plain", h.plain(&mut http_server(other, &www)), other);

    let script = h.script("client.py", PY_CLIENT);
    let mut c = Command::new(PYTHON);
    c.arg(&script).arg(other.to_string());
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(20));
    assert!(run.stdout.contains("connect_errno=EACCES"), "unmatched destination under default deny: {run}");
    let lines = h.log_lines("client");
    let deny = lines.iter().find(|l| l.is("connect", "deny")).unwrap_or_else(|| panic!("{}", show(&lines)));
    assert!(deny.get("reason").contains("default is deny"), "{}", deny.raw);

    let run = h.run("curl", h.shim(&mut curl_get(&format!("http://127.0.0.1:{port}/index.html"), &h.path("o")), "curl"), Duration::from_secs(20));
    assert!(run.success(), "a matched destination still works: {run}");
    // Unix sockets are not TCP: untouched (the shim itself talks to tetherd over one).
    let mut py = Command::new(PYTHON);
    py.args(["-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('unix ok')"]).arg(h.socket());
    let run = h.run("unix", h.shim(&mut py, "unix"), Duration::from_secs(10));
    assert!(run.stdout.contains("unix ok"), "{run}");
}

/// A server that sits in one blocking `accept()` from before a reload: the reload's `allow`
/// applies to the connection that call returns. (Found by review: the call kept the rule it read
/// when it began, so a client removed from `allow` was still admitted.)
const PY_ONE_ACCEPT: &str = r#"
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(16)
while True:
    c, _ = l.accept()  # blocks from before the reload
    data = c.recv(4096)
    c.sendall(data)
    c.close()
"#;

#[test]
fn reload_reaches_a_server_already_blocked_in_accept() {
    let port = free_port();
    let py_id = derived_id("/usr/bin/python3.11");
    let before = Policy::new().inbound(port, &[&py_id]).outbound(port, &[ANY_ID]);
    let mut h = Harness::new("reload-blocked-accept", before);
    let server = h.script("one_accept.py", PY_ONE_ACCEPT);
    let mut s = Command::new(PYTHON);
    s.arg(&server).arg(port.to_string());
    h.spawn_server("server", h.shim(&mut s, "server"), port);
    std::thread::sleep(Duration::from_millis(500)); // the server is inside accept() now

    let after = Policy::new().inbound(port, &[&derived_id("/usr/bin/curl")]).outbound(port, &[ANY_ID]);
    fs::write(h.path("tetherd.toml"), after.to_config()).unwrap();
    let o = tether(&h, &["reload"]);
    assert!(o.status.success(), "tether reload: {}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_millis(300)); // past the shim's 100 ms policy-stamp reuse

    let mut c = Command::new(PYTHON);
    c.args(["-c", "import socket,sys\ntry:\n s=socket.create_connection(('127.0.0.1',int(sys.argv[1])),timeout=10); s.sendall(b'ping'); print('echo='+s.recv(16).decode())\nexcept OSError as e: print('refused=%s' % e)"])
        .arg(port.to_string());
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(30));
    assert!(!run.stdout.contains("echo=ping"), "a client removed from allow was served: {run}");
    let lines = h.wait_log("server", Duration::from_secs(10), |l| l.iter().any(|x| x.is("accept", "deny")));
    let deny = lines.iter().find(|l| l.is("accept", "deny")).unwrap_or_else(|| panic!("no deny: {}", show(&lines)));
    assert!(deny.get("reason").contains("not in the allow list"), "{}", deny.raw);
}

/// Reload: removing an ID from `allow` leaves the established connection working and refuses
/// the next one; `tether connections --json` shows the live pair and drops it after close.
#[test]
fn reload_keeps_established_connections_and_refuses_the_next() {
    let port = free_port();
    let py_id = derived_id("/usr/bin/python3.11");
    let before = Policy::new().inbound(port, &[&py_id]).outbound(port, &[ANY_ID]);
    let mut h = Harness::new("reload", before);
    h.spawn_server("server", h.shim(&mut echo_server(port), "server"), port);

    let script = h.script("held.py", PY_HELD);
    let mut c = Command::new(PYTHON);
    c.arg(&script).arg(port.to_string());
    let mut stdin = h.spawn_with_stdin("held", h.shim(&mut c, "held"));
    writeln!(stdin, "one").unwrap();
    let out = h.wait_stdout("held", Duration::from_secs(20), |o| o.contains("echo=one"));
    assert!(out.contains("echo=one"), "first request: {out}");

    // The live table shows both ends, with both SPIFFE IDs and the data path.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let o = tether(&h, &["connections", "--json"]);
        let n = rows_in(&o.stdout);
        if n >= 2 || Instant::now() > deadline {
            break (String::from_utf8_lossy(&o.stdout).to_string(), n);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(rows.1 >= 2, "expected the client and server rows: {}", rows.0);
    assert!(rows.0.contains(&py_id), "{}", rows.0);
    assert!(rows.0.contains(expected_mode()), "{}", rows.0);

    // Remove python's ID from the server's allow list and reload.
    let after = Policy::new().inbound(port, &[&derived_id("/usr/bin/curl")]).outbound(port, &[ANY_ID]);
    fs::write(h.path("tetherd.toml"), after.to_config()).unwrap();
    let o = tether(&h, &["reload"]);
    assert!(o.status.success(), "tether reload: {}", String::from_utf8_lossy(&o.stderr));

    // The established connection keeps working.
    writeln!(stdin, "two").unwrap();
    let out = h.wait_stdout("held", Duration::from_secs(20), |o| o.contains("echo=two"));
    assert!(out.contains("echo=two"), "established connection after reload: {out}");

    // The next connection from the same program is refused by the server.
    let mut c2 = Command::new(PYTHON);
    c2.arg(&script).arg(port.to_string());
    let run = h.run_with_stdin("held2", h.shim(&mut c2, "held2"), Duration::from_secs(30), std::process::Stdio::piped());
    assert!(!run.stdout.contains("echo=three"), "{run}");
    let server = h.wait_log("server", Duration::from_secs(10), |l| l.iter().any(|x| x.is("accept", "deny")));
    let deny = server.iter().find(|l| l.is("accept", "deny")).unwrap_or_else(|| panic!("{}", show(&server)));
    assert_eq!(deny.get("errno"), "EPERM", "{}", deny.raw);
    assert!(deny.get("reason").contains("not in the allow list"), "{}", deny.raw);

    // Closing the held connection drops its rows.
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = tether(&h, &["connections", "--json"]);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        if o.status.success() && rows_in(&o.stdout) == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "rows not dropped after close: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
