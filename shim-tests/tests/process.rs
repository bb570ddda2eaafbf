//! Acceptance 8, 9: fork, and many concurrent connections from threads without fd leaks.

#![allow(clippy::unwrap_used)] // reason: tests

use std::collections::BTreeMap;
use std::time::Duration;

use tether_shim_tests::{free_port, kv, show, DataPathCheck, Harness, Policy};

/// Parent connects, forks with the connection open; the child opens its own protected
/// connection; then the parent uses its pre-fork connection and a new one.
const PY_FORK: &str = r#"
import os, socket, sys
from e2e import http_get, status_line
port = int(sys.argv[1])
def request(s):
    data = http_get(s)
    s.close()
    return status_line(data)
def connect():
    return socket.create_connection(("127.0.0.1", port), timeout=30)
print("parent_pid=%d" % os.getpid(), flush=True)
held = connect()
pid = os.fork()
if pid == 0:
    try:
        print("child_pid=%d" % os.getpid(), flush=True)
        print("child=" + request(connect()), flush=True)
        os._exit(0)
    except Exception as e:
        print("child_error=%r" % (e,), flush=True)
        os._exit(1)
_, st = os.waitpid(pid, 0)
print("child_status=%d" % st, flush=True)
try:
    print("parent_held=" + request(held), flush=True)
except Exception as e:
    print("parent_held_error=%r" % (e,), flush=True)
print("parent_new=" + request(connect()), flush=True)
"#;

/// tetherd audit lines for `event="issued"`: pid -> serial.
fn issued(broker_log: &str) -> BTreeMap<String, String> {
    let field = |l: &str, k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
    };
    broker_log
        .lines()
        .filter(|l| l.contains("event=\"issued\"") || l.contains("event=issued"))
        .filter_map(|l| Some((field(l, "pid")?, field(l, "serial")?)))
        .collect()
}

/// Acceptance 8: A forked child gets its own SVID (its own attestation by pid) and both processes keep
/// working, including the parent's connection opened before the fork.
#[test]
fn forked_child_fetches_its_own_svid_and_both_connect() {
    let port = free_port();
    let mut h = Harness::new("fork", Policy::new().both(port));
    h.serve_http("server", port, "fork test\n");
    let check = DataPathCheck::begin(&h, port);

    let run = h.run_python("fork", "fork.py", PY_FORK, &[&port.to_string()], Duration::from_secs(60));
    let lines = h.log_lines("fork");
    let out = kv(&run.stdout);
    let ok = |k: &str| out.get(k).is_some_and(|v| v.starts_with("HTTP/1.0 200"));
    assert!(
        run.success()
            && ok("child")
            && ok("parent_held")
            && ok("parent_new")
            && out.get("child_status").map(String::as_str) == Some("0"),
        "fork program failed: {run}\n{}",
        show(&lines)
    );

    let parent = out.get("parent_pid").unwrap();
    let child = out.get("child_pid").unwrap();
    let issued = issued(&h.broker_log());
    let (ps, cs) = (issued.get(parent), issued.get(child));
    assert!(
        ps.is_some() && cs.is_some() && ps != cs,
        "expected SVIDs issued to parent pid {parent} and child pid {child} with distinct serials; issued: {issued:?}\n{}",
        h.broker_log()
    );
    assert_eq!(
        lines.iter().filter(|l| l.is("connect", "allow")).count(),
        3,
        "{}",
        show(&lines)
    );
    check.finish(&lines);
}

/// A threaded echo server with a deep backlog: one line in, `echo:` + line out.
const PY_ECHO_SERVER: &str = r#"
import socket, sys, threading
from e2e import listener
port = int(sys.argv[1])
ls = listener(port, 1024)
def serve(c):
    try:
        buf = b""
        while not buf.endswith(b"\n"):
            d = c.recv(4096)
            if not d:
                break
            buf += d
        c.sendall(b"echo:" + buf)
    except OSError as e:
        print("serve error %r" % (e,), flush=True)
    finally:
        c.close()
while True:
    try:
        c, _ = ls.accept()
    except OSError as e:
        print("accept error %r" % (e,), flush=True)
        continue
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// N threads each open a protected connection, exchange a line, wait until all N are open at
/// once, then close. Prints ok/errors and fd counts: baseline (after one warm-up connection,
/// which fetches the SVID and starts anything the shim keeps per process), peak, after.
const PY_THREADED_CLIENT: &str = r#"
import os, socket, sys, threading, time
port, n = int(sys.argv[1]), int(sys.argv[2])
def fds():
    return len(os.listdir("/proc/self/fd"))
def exchange(i):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    msg = b"hello %d\n" % i
    s.sendall(msg)
    r = b""
    while not r.endswith(b"\n"):
        d = s.recv(4096)
        if not d:
            break
        r += d
    if r != b"echo:" + msg:
        raise RuntimeError("bad reply %r" % (r,))
    return s
exchange(-1).close()
time.sleep(0.5)
base = fds()
lock = threading.Lock()
ok, errors, peak = [0], [], [0]
def at_peak():
    peak[0] = fds()
barrier = threading.Barrier(n, action=at_peak)
def one(i):
    try:
        s = exchange(i)
        barrier.wait(timeout=120)
        s.close()
        with lock:
            ok[0] += 1
    except Exception as e:
        with lock:
            errors.append(repr(e))
        barrier.abort()
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
after = fds()
deadline = time.time() + 5
while after != base and time.time() < deadline:
    time.sleep(0.1)
    after = fds()
print("ok=%d" % ok[0])
print("errors=%d" % len(errors))
for e in sorted(set(errors))[:10]:
    print("error: " + e)
print("base=%d" % base)
print("peak=%d" % peak[0])
print("after=%d" % after)
"#;

/// Acceptance 9: 200 concurrent protected connections from one threaded client all succeed, and the
/// client's fd count returns to its baseline.
#[test]
fn two_hundred_concurrent_connections_succeed_without_fd_leaks() {
    let n = 200;
    let port = free_port();
    let mut h = Harness::new("concurrent", Policy::new().both(port));
    h.serve_python("server", port, "echo_server.py", PY_ECHO_SERVER, &[]);
    let check = DataPathCheck::begin(&h, port);

    let run = h.run_python(
        "client",
        "threaded_client.py",
        PY_THREADED_CLIENT,
        &[&port.to_string(), &n.to_string()],
        Duration::from_secs(180),
    );
    let out = kv(&run.stdout);
    let num = |k: &str| out.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
    let lines = h.log_lines("client");
    let denies: Vec<_> = lines
        .iter()
        .filter(|l| l.get("decision") != "allow")
        .cloned()
        .collect();
    assert!(
        run.success() && num("ok") == n && num("errors") == 0,
        "not all {n} connections succeeded: {run}\nnon-allow client log lines:\n{}\n{}",
        show(&denies),
        h.output("server")
    );
    assert!(
        num("peak") >= num("base") + n,
        "peak fd count {} < base {} + {n}: were they concurrent?",
        num("peak"),
        num("base")
    );
    assert_eq!(
        num("after"),
        num("base"),
        "fd leak: {} fds after, baseline {}\n{run}",
        num("after"),
        num("base")
    );
    assert_eq!(
        lines.iter().filter(|l| l.is("connect", "allow")).count(),
        n as usize + 1,
        "{}",
        show(&denies)
    );
    check.finish(&lines);
}
