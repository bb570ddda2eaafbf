//! Issue 9 (pre-fork servers): gunicorn's sync workers (4 processes accepting on one
//! inherited listener, select + non-blocking accept) under tether serve 400 requests from 50
//! concurrent tether clients, and every worker serves some: no worker pulls the whole backlog.

#![allow(clippy::unwrap_used)] // reason: tests

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use tether_shim_tests::{free_port, show, DataPathCheck, Harness, Policy, PYTHON};

const WORKERS: usize = 4;
const CLIENTS: usize = 50;
const PER_CLIENT: usize = 8;

const APP: &str = r#"
import os, time
def app(environ, start_response):
    assert environ.get("HTTP_X_MARKER") == "PREFORK-REQUEST-MARKER"
    time.sleep(0.005)
    body = ("worker=%d PREFORK-RESPONSE-MARKER\n" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

/// `PER_CLIENT` requests, one connection each; prints the worker pid of each answer.
const CLIENT: &str = r#"
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET / HTTP/1.0\r\nHost: t\r\nX-Marker: PREFORK-REQUEST-MARKER\r\n\r\n")
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), data[:200]
    print(body.decode().split()[0], flush=True)
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
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let h = &h;
                let client = &client;
                s.spawn(move || {
                    let name = format!("client-{i}");
                    let mut c = Command::new(PYTHON);
                    c.arg(client).arg(port.to_string()).arg(PER_CLIENT.to_string());
                    h.run(&name, h.shim(&mut c, &name), Duration::from_secs(120))
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for (i, run) in runs.iter().enumerate() {
        assert!(run.success(), "client-{i}: {run}\n{}", show(&h.log_lines(&format!("client-{i}"))));
        for l in run.stdout.lines() {
            *served.entry(l.to_owned()).or_default() += 1;
        }
    }
    let total: usize = served.values().sum();
    eprintln!("requests per worker: {served:?}");
    assert_eq!(total, CLIENTS * PER_CLIENT, "{served:?}");
    assert_eq!(served.len(), WORKERS, "not every worker served (per worker: {served:?})\n{}", h.output("gunicorn"));
    let lines = h.log_lines("gunicorn");
    check.finish_with_markers(&lines, &[b"PREFORK-REQUEST-MARKER", b"PREFORK-RESPONSE-MARKER"]);
}
