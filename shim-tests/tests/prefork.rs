//! Issue 9 (pre-fork servers): gunicorn's sync workers (4 processes accepting on one
//! inherited listener, select + non-blocking accept) under tether serve 400 requests from 50
//! concurrent tether clients (threads of one process, started together so that connections
//! arrive in bursts), every worker serves some, and none more than twice its fair share: no
//! worker pulls the whole backlog.

#![allow(clippy::unwrap_used)] // reason: tests

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use tether_shim_tests::{free_port, in_uml, show, DataPathCheck, Harness, Policy, PYTHON};

const WORKERS: usize = 4;
const CLIENTS: usize = 50;
const PER_CLIENT: usize = 8;

const APP: &str = r#"
import os, time
def app(environ, start_response):
    assert environ.get("HTTP_X_MARKER") == "PREFORK-REQUEST-MARKER"
    time.sleep(0.05)
    body = ("worker=%d PREFORK-RESPONSE-MARKER\n" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

/// `CLIENTS` threads started together, each making `PER_CLIENT` requests (one connection
/// each), so that connections reach the shared backlog in bursts; prints the worker pid of
/// every answer.
const CLIENT: &str = r#"
import socket, sys, threading, time
from e2e import http_get
port, clients, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
start = threading.Barrier(clients)
out, errors, waits = [], [], []
def one():
    t = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = http_get(s, headers="X-Marker: PREFORK-REQUEST-MARKER\r\n")
    s.close()
    waits.append(time.monotonic() - t)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), data[:200]
    return body.decode().split()[0]
def client():
    start.wait()
    for i in range(n):
        try:
            out.append(one())
        except Exception as e:
            errors.append(repr(e))
ts = [threading.Thread(target=client) for _ in range(clients)]
for t in ts: t.start()
for t in ts: t.join()
print("\n".join(out))
waits.sort()
print("slowest_ms=%d p90_ms=%d" % (waits[-1] * 1000, waits[len(waits) * 9 // 10] * 1000))
print("errors=%d %s" % (len(errors), errors[:3]), flush=True)
"#;

#[test]
fn gunicorn_sync_workers_all_serve_concurrent_tether_clients() {
    let port = free_port();
    let mut h = Harness::new("prefork", Policy::new().both(port));
    let app = h.script("app.py", APP);
    let client = h.script("client.py", CLIENT);
    let mut server = Command::new(PYTHON);
    server
        .args(["-m", "gunicorn", "-k", "sync", "-w", &WORKERS.to_string(), "-b"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--chdir")
        .arg(app.parent().unwrap())
        .args(["--backlog", "256", "app:app"]);
    h.spawn_server("gunicorn", h.shim(&mut server, "gunicorn"), port);
    // Let every worker boot (each logs "Booting worker").
    let booted = |h: &Harness| h.output("gunicorn").matches("Booting worker").count();
    for _ in 0..200 {
        if booted(&h) >= WORKERS {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(booted(&h), WORKERS, "{}", h.output("gunicorn"));

    let check = DataPathCheck::begin(&h, port);
    let mut c = Command::new(PYTHON);
    c.arg(&client).arg(port.to_string()).arg(CLIENTS.to_string()).arg(PER_CLIENT.to_string());
    let run = h.run("clients", h.shim(&mut c, "clients"), Duration::from_secs(180));
    assert!(run.success() && run.stdout.contains("errors=0 "), "clients: {run}\n{}", show(&h.log_lines("clients")));
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for l in run.stdout.lines().filter(|l| l.starts_with("worker=")) {
        *served.entry(l.to_owned()).or_default() += 1;
    }
    let total: usize = served.values().sum();
    eprintln!("requests per worker: {served:?}; {}", run.stdout.lines().find(|l| l.starts_with("slowest")).unwrap_or(""));
    assert_eq!(total, CLIENTS * PER_CLIENT, "{served:?}");
    assert_eq!(served.len(), WORKERS, "not every worker served (per worker: {served:?})\n{}", h.output("gunicorn"));
    // No worker took the bursts for itself: at most twice its fair share of the requests, and
    // (on the host, where timing is steady) no request waited much longer than its fair turn
    // (50 clients / 4 workers x 50 ms = 625 ms). When one worker pulled a whole burst, the last
    // of its queue waited for all of them: 2.3 s measured on the old code, 1.0 s now.
    let most = served.values().copied().max().unwrap_or(0);
    assert!(most <= 2 * total / WORKERS, "one worker served {most} of {total}: {served:?}");
    let slowest: u64 = run.stdout.split_whitespace().find_map(|w| w.strip_prefix("slowest_ms=")?.parse().ok()).unwrap();
    if !in_uml() {
        assert!(slowest < 1600, "a request waited {slowest} ms: a worker hoarded a burst of connections");
    }
    let lines = h.log_lines("gunicorn");
    check.finish_with_markers(&lines, &[b"PREFORK-REQUEST-MARKER", b"PREFORK-RESPONSE-MARKER"]);
}
