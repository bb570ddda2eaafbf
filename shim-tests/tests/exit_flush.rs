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
