//! Write-then-exit (issue 14 follow-up): a program under the shim writes its data and exits at
//! once. On the userspace relay the bytes and the close_notify must still reach the peer, intact
//! and cleanly ended (not ECONNRESET), every time; on the wire it is TLS only. Exit styles:
//! Python's normal end (its finalization closes the socket), C `exit` with the socket still open,
//! C `exit` called from a non-main thread, and a forked child that exits while its parent still
//! holds the connection (the child must not end the parent's stream).

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::Duration;

use tether_shim_tests::{free_port, show, DataPathCheck, Harness, Policy};

/// Sink: for each connection, read to EOF (or an error) and print one line:
/// `conn n=<bytes> sha=<sha256> end=<eof|errno_NAME>`.
const PY_SINK: &str = r#"
import errno, hashlib, socket, sys, threading
port = int(sys.argv[1])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(64)
lock = threading.Lock()
def serve(c):
    h, n, buf, end = hashlib.sha256(), 0, bytearray(1 << 16), "eof"
    try:
        while True:
            k = c.recv_into(buf)
            if k == 0:
                break
            h.update(memoryview(buf)[:k])
            n += k
    except OSError as e:
        end = "errno_" + errno.errorcode.get(e.errno, str(e.errno))
    finally:
        c.close()
    with lock:
        print("conn n=%d sha=%s end=%s" % (n, h.hexdigest(), end), flush=True)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Writer: connect, print the sha256 of what it will send, send it, then end as argv[3] says.
/// `fork`: the parent sends a third, forks; the child sends a third and exits (C `exit`, its
/// copy still open); the parent waits, sends the rest, closes and exits.
const PY_WRITER: &str = r#"
import ctypes, hashlib, os, socket, sys, threading, time
port, size, style = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
unit = b"tether-exit-marker;" + bytes(range(256))
data = (unit * (size // len(unit) + 1))[:size]
print("sha=%s" % hashlib.sha256(data).hexdigest(), flush=True)
libc = ctypes.CDLL(None)
s = socket.create_connection(("127.0.0.1", port), timeout=30)
if style == "return":
    s.sendall(data)
elif style == "exit":
    s.sendall(data)
    libc.exit(0)
elif style == "thread":
    s.sendall(data)
    threading.Thread(target=lambda: libc.exit(0)).start()
    time.sleep(30)
elif style == "fork":
    third = size // 3
    s.sendall(data[:third])
    pid = os.fork()
    if pid == 0:
        s.sendall(data[third:2 * third])
        libc.exit(0)
    os.waitpid(pid, 0)
    s.sendall(data[2 * third:])
    s.close()
    libc.exit(0)
"#;

fn run_writers(name: &str, styles: &[&str], rounds: usize, size: usize) {
    let port = free_port();
    let mut h = Harness::new(name, Policy::new().both(port));
    h.serve_python("server", port, "sink.py", PY_SINK, &[]);
    let check = DataPathCheck::begin(&h, port);
    let mut failures = Vec::new();
    for i in 0..rounds {
        let style = styles[i % styles.len()];
        let mut cmd = h.python("writer.py", PY_WRITER);
        cmd.arg(port.to_string()).arg(size.to_string()).arg(style);
        let run = h.run("writer", h.shim(&mut cmd, "writer"), Duration::from_secs(40));
        assert!(run.success(), "round {i} ({style}): writer failed: {run}");
        let sha = run.stdout.lines().find_map(|l| l.strip_prefix("sha=")).unwrap().to_owned();
        let out = h.wait_stdout("server", Duration::from_secs(10), |o| o.lines().count() > i);
        let line = out.lines().nth(i).unwrap_or("").to_owned();
        let want = format!("conn n={size} sha={sha} end=eof");
        if line != want {
            failures.push(format!("round {i} ({style}): got {line:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {rounds} write-then-exit rounds lost data or the clean end:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        h.output("server")
    );
    let mut lines = h.log_lines("writer");
    lines.extend(h.log_lines("server"));
    check.finish_with_markers(&lines, &[b"tether-exit-marker;"]);
    eprintln!("{name}: {rounds} rounds of {size} bytes arrived intact, each ended by close_notify");
    let _ = show;
}

/// 51 writers of 512 KiB each, exiting in three ways straight after their last write.
#[test]
fn write_then_exit_delivers_every_byte_and_close_notify() {
    run_writers("exit-flush", &["return", "exit", "thread"], 51, 512 << 10);
}

/// A forked child that exits with its copy of the connection open does not end the parent's
/// stream; the parent's own write-then-exit still ends it cleanly.
#[test]
fn forked_child_exit_leaves_parents_stream_open() {
    // On kTLS a parent that forked while holding a connection never sends close_notify (its
    // child may be the one serving it: ARCHITECTURE "How a stream ends"), so the peer reads a
    // truncation by design; the relay knows when every holder has closed.
    if tether_shim_tests::expected_mode() == "ktls" {
        eprintln!("forked_child_exit_leaves_parents_stream_open: relay only (kTLS: a forking parent never sends close_notify)");
        return;
    }
    run_writers("exit-flush-fork", &["fork"], 10, 768 << 10);
}

/// Client: one warm-up connection, 2 s of nothing, then `n` sequential connections (one byte each way, then
/// close). After each close: the fd count (a kTLS close whose peer has not ended yet leaves
/// tether's kept copy behind it) and the number of "tether-linger" threads. Then it waits up to
/// 5 s for its fds to be back to where they were before the loop.
const PY_CLOSER: &str = r#"
import os, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
def fds():
    return len(os.listdir("/proc/self/fd"))
def lingers():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open("/proc/self/task/%s/comm" % t).read().strip())
        except OSError:
            pass
    return names.count("tether-linger")
def one():
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    s.close()
one()
time.sleep(2.0)  # the linger thread has swept the warm-up's copy and waits (after 100 ms idle)
base, kept, most = fds(), 0, 0
for i in range(n):
    one()
    kept += fds() > base
    most = max(most, lingers())
deadline = time.time() + 5
while fds() > base and time.time() < deadline:
    time.sleep(0.05)
print("base=%d\nafter=%d\nkept=%d\nmost_lingers=%d" % (base, fds(), kept, most), flush=True)
"#;

/// A kTLS close whose peer has not sent its end yet leaves a copy of the socket with tether
/// until the peer's FIN (see `ops::lingering`); the "tether-linger" thread closes it. It is
/// one thread per process, which waits without polling once nothing is kept and is woken by the
/// next close that keeps a copy: a missed wake-up would leave copies open for its 30 s bound,
/// and a thread per close would show as more than one. (Until 2026-12-08 every such close
/// started a thread: in UML ~13 system calls and a thread creation on each client's close.)
#[test]
fn copies_kept_after_closes_are_released_by_one_linger_thread() {
    let port = free_port();
    let mut h = Harness::new("linger", Policy::new().both(port));
    let mut echo = tether_shim_tests::echo_server(port);
    h.spawn_server("server", h.shim(&mut echo, "server"), port);
    let check = DataPathCheck::begin(&h, port);
    let mut cmd = h.python("closer.py", PY_CLOSER);
    cmd.arg(port.to_string()).arg("40");
    let run = h.run("client", h.shim(&mut cmd, "client"), Duration::from_secs(60));
    assert!(run.success(), "{run}\n{}", show(&h.log_lines("client")));
    let kv = tether_shim_tests::kv(&run.stdout);
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u32>().ok()).unwrap_or_else(|| panic!("no {k} in {run}"));
    assert_eq!(num("after"), num("base"), "kept copies were not all closed within 5 s of the last close: {run}");
    assert!(num("most_lingers") <= 1, "more than one linger thread at once: {run}");
    if tether_shim_tests::expected_mode() == "ktls" {
        assert!(num("kept") > 0, "no close kept a copy, so this run did not test the linger thread: {run}");
        assert_eq!(num("most_lingers"), 1, "copies were kept, yet no linger thread ran: {run}");
    }
    let mut lines = h.log_lines("client");
    lines.extend(h.log_lines("server"));
    check.finish(&lines);
}
