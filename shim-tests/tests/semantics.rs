//! Socket semantics a program must not notice changing under tether (issue 3, section 6):
//! bulk data towards the server, `sendfile` and poll readiness on the client side, half-close,
//! `getpeername`/`getsockname`, and a protected fd handed to another program across exec.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::process::Command;
use std::time::Duration;

use tether_shim_tests::{
    curl_get, free_port, kv, scaled_bytes, sha256, show, write_random_file, DataPathCheck, Harness,
    Policy, PY_ASYNCIO_ECHO_SERVER, PY_READ_TO_END, PYTHON,
};

/// Threaded server: reads each connection to EOF, then replies with what it saw, one
/// `key=value` per line (sha256, byte count, its getpeername and getsockname), and closes.
const PY_SINK_SERVER: &str = r#"
import hashlib, socket, sys, threading
from e2e import listener
port = int(sys.argv[1])
ls = listener(port, 64)
def serve(c):
    try:
        h, n, buf = hashlib.sha256(), 0, bytearray(1 << 16)
        while True:
            k = c.recv_into(buf)
            if k == 0:
                break
            h.update(memoryview(buf)[:k])
            n += k
        p, l = c.getpeername(), c.getsockname()
        c.sendall(("sha=%s\nn=%d\nserver_peer=%s:%d\nserver_local=%s:%d\n" % (h.hexdigest(), n, p[0], p[1], l[0], l[1])).encode())
    except OSError as e:
        print("serve error %r" % (e,), flush=True)
    finally:
        c.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Client: connect (socket timeout set, so Python drives it non-blocking with poll), print its
/// getsockname/getpeername, send a file with socket.sendfile (os.sendfile) or a short
/// payload, shut down writing, print the server's reply.
const PY_SINK_CLIENT: &str = r#"
import socket, sys
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=120)
print("client_local=%s:%d" % s.getsockname())
print("client_peer=%s:%d" % s.getpeername())
if len(sys.argv) > 2:
    with open(sys.argv[2], "rb") as f:
        sent = s.sendfile(f)
else:
    sent = len(b"short payload")
    s.sendall(b"short payload")
print("sent=%d" % sent)
s.shutdown(socket.SHUT_WR)
r = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    r += d
sys.stdout.write(r.decode())
s.close()
"#;

fn sink(name: &str) -> (Harness, u16) {
    let port = free_port();
    let mut h = Harness::new(name, Policy::new().both(port));
    h.serve_python("server", port, "sink_server.py", PY_SINK_SERVER, &[]);
    (h, port)
}

/// A 20 MB upload with sendfile(2) from the client, then shutdown(SHUT_WR): the server reads
/// exactly the file up to EOF and its reply still reaches the client.
#[test]
fn sendfile_upload_then_half_close_arrives_intact_and_reply_returns() {
    let (h, port) = sink("upload");
    let file = h.path("upload.bin");
    write_random_file(&file, scaled_bytes(20));
    let check = DataPathCheck::begin(&h, port);
    let run = h.run_python(
        "client",
        "sink_client.py",
        PY_SINK_CLIENT,
        &[&port.to_string(), &file],
        Duration::from_secs(150),
    );
    let lines = h.log_lines("client");
    let out = kv(&run.stdout);
    let len = fs::metadata(&file).unwrap().len().to_string();
    assert!(
        run.success(),
        "client failed: {run}\n{}\n{}",
        show(&lines),
        h.output("server")
    );
    assert_eq!(
        out.get("sent"),
        Some(&len),
        "sendfile sent a different count: {run}"
    );
    assert_eq!(
        out.get("n"),
        Some(&len),
        "server received a different count: {run}"
    );
    assert_eq!(
        out.get("sha").map(String::as_str),
        Some(sha256(&file).as_str()),
        "sha256 differs: {run}"
    );
    let mut all = lines;
    all.extend(h.log_lines("server"));
    check.finish(&all);
}

/// getpeername/getsockname on both ends of a protected connection report the real TCP
/// endpoints, and each side's view mirrors the other's.
#[test]
fn getpeername_and_getsockname_report_the_real_endpoints() {
    let (h, port) = sink("addrs");
    let check = DataPathCheck::begin(&h, port);
    let run = h.run_python("client", "sink_client.py", PY_SINK_CLIENT, &[&port.to_string()], Duration::from_secs(30));
    let out = kv(&run.stdout);
    assert!(
        run.success() && out.contains_key("server_peer"),
        "client failed: {run}\n{}",
        show(&h.log_lines("client"))
    );
    assert_eq!(
        out["client_peer"],
        format!("127.0.0.1:{port}"),
        "client getpeername: {run}"
    );
    assert_eq!(
        out["server_local"],
        format!("127.0.0.1:{port}"),
        "server getsockname: {run}"
    );
    assert_eq!(
        out["client_local"], out["server_peer"],
        "client getsockname != server getpeername: {run}"
    );
    let allow = h
        .log_lines("client")
        .into_iter()
        .find(|l| l.is("connect", "allow"))
        .unwrap();
    assert_eq!(
        allow.get("local"),
        out["client_local"],
        "logged local address: {}",
        allow.raw
    );
    let mut all = h.log_lines("client");
    all.extend(h.log_lines("server"));
    check.finish_with_markers(&all, &[b"short payload", b"server_peer="]);
}

/// A program connects, then execs another program that inherits the protected fd (the
/// inetd/wrapper pattern): the new image must be able to use it, and see EOF (not EIO) at
/// the end.
const PY_EXEC: &str = r#"
import os, socket, sys
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
s.settimeout(None)
fd = s.detach()
os.set_inheritable(fd, True)
print("connected fd=%d" % fd, flush=True)
os.execv("/bin/sh", ["sh", "-c", 'printf "GET /index.html HTTP/1.0\\r\\nHost: t\\r\\n\\r\\n" >&%d && exec cat <&%d' % (fd, fd)])
"#;

#[test]
fn protected_fd_inherited_across_exec_keeps_working() {
    let port = free_port();
    let mut h = Harness::new("exec", Policy::new().both(port));
    h.serve_http("server", port, "after exec\n");
    let check = DataPathCheck::begin(&h, port);
    let run = h.run_python("exec", "exec.py", PY_EXEC, &[&port.to_string()], Duration::from_secs(20));
    assert!(
        run.success() && run.stdout.contains("HTTP/1.0 200") && run.stdout.contains("after exec"),
        "the exec'd program could not use the inherited protected connection: {run}\n{}",
        show(&h.log_lines("exec"))
    );
    check.finish_with_markers(&h.log_lines("exec"), &[b"GET /index.html", b"after exec"]);
}

/// The shell pattern: bash opens `/dev/tcp` (a hooked connect), writes the request itself,
/// and a forked-and-exec'd `cat` reads the response from the inherited fd to the end.
#[test]
fn bash_dev_tcp_with_cat_reads_response_to_eof() {
    let port = free_port();
    let mut h = Harness::new("bash-dev-tcp", Policy::new().both(port));
    h.serve_http("server", port, "hello shell\n");
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET /index.html HTTP/1.0\\r\\nHost: t\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let check = DataPathCheck::begin(&h, port);
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script);
    let run = h.run("bash", h.shim(&mut cmd, "bash"), Duration::from_secs(20));
    assert!(
        run.success() && run.stdout.contains("HTTP/1.0 200") && run.stdout.contains("hello shell"),
        "bash /dev/tcp + cat failed: {run}\n{}",
        show(&h.log_lines("bash"))
    );
    check.finish_with_markers(&h.log_lines("bash"), &[b"GET /index.html", b"hello shell"]);
}

/// Server: accept one connection, send 2 MiB, then die by SIGKILL (no close_notify).
const PY_DYING_SERVER: &str = r#"
import os, signal, socket, sys, time
from e2e import listener
port = int(sys.argv[1])
ls = listener(port, 8)
c, _ = ls.accept()
c.sendall(b"x" * (2 << 20))
time.sleep(0.3)
os.kill(os.getpid(), signal.SIGKILL)
"#;

/// A protected peer killed mid-stream: the reader's stream ends promptly with EOF or
/// ECONNRESET; it neither hangs nor sees EIO.
#[test]
fn peer_killed_mid_stream_ends_the_read_without_eio_or_hang() {
    let port = free_port();
    let mut h = Harness::new("peer-killed", Policy::new().both(port));
    h.serve_python("server", port, "dying.py", PY_DYING_SERVER, &[]);
    let check = DataPathCheck::begin(&h, port);
    let run = h.run_python("client", "reader.py", PY_READ_TO_END, &[&port.to_string()], Duration::from_secs(40));
    let out = kv(&run.stdout);
    let end = out.get("end").map(String::as_str).unwrap_or("");
    assert!(
        run.success() && ["eof", "errno_ECONNRESET"].contains(&end),
        "reader ended with {end:?}: {run}\n{}",
        show(&h.log_lines("client"))
    );
    let n: u64 = out["bytes"].parse().unwrap();
    assert!(n <= 2 << 20, "more bytes than were sent: {n}");
    eprintln!("peer killed: reader got {n} bytes, then {end}");
    check.finish_with_markers(&h.log_lines("client"), &[b"xxxxxxxxxxxxxxxxxxxxxxxx"]);
}

/// asyncio on both sides (non-blocking connect and accept, epoll readiness): 50 concurrent
/// connections each echo 256 KiB.
const PY_ASYNCIO_CLIENT: &str = r#"
import asyncio, os, sys
port, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
async def one(i):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    payload = os.urandom(size)
    async def send():
        w.write(payload)
        await w.drain()
        w.write_eof()
    t = asyncio.ensure_future(send())
    got = await r.read(-1)
    await t
    w.close()
    return got == payload
async def main():
    res = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True), 120)
    ok = sum(1 for x in res if x is True)
    print("ok=%d" % ok)
    for x in res:
        if x is not True:
            print("error=%r" % (x,))
            break
asyncio.run(main())
"#;

#[test]
fn asyncio_echo_with_fifty_concurrent_connections_both_shimmed() {
    let (n, size) = (50, 256 * 1024);
    let port = free_port();
    let mut h = Harness::new("asyncio", Policy::new().both(port));
    h.serve_python("server", port, "aserver.py", PY_ASYNCIO_ECHO_SERVER, &[]);
    let check = DataPathCheck::begin(&h, port);
    let run = h.run_python(
        "client",
        "aclient.py",
        PY_ASYNCIO_CLIENT,
        &[&port.to_string(), &n.to_string(), &size.to_string()],
        Duration::from_secs(150),
    );
    let lines = h.log_lines("client");
    assert!(
        run.success() && kv(&run.stdout).get("ok") == Some(&n.to_string()),
        "asyncio echo failed: {run}\n{}\n{}",
        show(
            &lines
                .iter()
                .filter(|l| l.get("decision") != "allow")
                .cloned()
                .collect::<Vec<_>>()
        ),
        h.output("server")
    );
    check.finish(&lines);
}

/// A port no rule names passes through untouched: both sides under the shim, plain HTTP works,
/// a plain client (no tether) can talk to the shimmed server, and nothing is logged.
#[test]
fn unlisted_port_passes_through_in_plaintext() {
    let (protected, unlisted) = (free_port(), free_port());
    let mut h = Harness::new("passthrough", Policy::new().both(protected));
    h.serve_http("server", unlisted, "plain and simple\n");
    let url = format!("http://127.0.0.1:{unlisted}/index.html");
    let run = h.run(
        "curl",
        h.shim(&mut curl_get(&url, &h.path("a.out")), "curl"),
        Duration::from_secs(30),
    );
    assert!(
        run.success(),
        "shimmed curl to an unlisted port failed: {run}"
    );
    let plain = h.run(
        "plain",
        h.plain(&mut curl_get(&url, &h.path("b.out"))),
        Duration::from_secs(30),
    );
    assert!(
        plain.success(),
        "plain curl to a shimmed server on an unlisted port failed: {plain}"
    );
    for f in ["a.out", "b.out"] {
        assert_eq!(fs::read_to_string(h.path(f)).unwrap(), "plain and simple\n");
    }
    let logged = [h.log_lines("curl"), h.log_lines("server")].concat();
    assert!(
        logged.is_empty(),
        "pass-through connections were logged:\n{}",
        show(&logged)
    );
}

/// Logging is off unless TETHER_LOG is set; `TETHER_LOG=1` writes the line to stderr.
#[test]
fn connection_log_only_when_tether_log_is_set() {
    let port = free_port();
    let mut h = Harness::new("logging", Policy::new().both(port));
    h.serve_http("server", port, "logged?\n");
    let url = format!("http://127.0.0.1:{port}/index.html");

    let mut quiet = curl_get(&url, &h.path("q.out"));
    h.shim(&mut quiet, "quiet").env_remove("TETHER_LOG");
    let run = h.run("quiet", &mut quiet, Duration::from_secs(30));
    assert!(run.success(), "{run}");
    assert!(
        !run.stderr.contains("tether:"),
        "logged without TETHER_LOG: {run}"
    );
    assert!(
        !h.log_path("quiet").exists(),
        "a log file appeared without TETHER_LOG"
    );

    let mut loud = curl_get(&url, &h.path("l.out"));
    h.shim(&mut loud, "loud").env("TETHER_LOG", "1");
    let run = h.run("loud", &mut loud, Duration::from_secs(30));
    assert!(run.success(), "{run}");
    let lines = tether_shim_tests::parse_log(&run.stderr);
    assert_eq!(lines.len(), 1, "expected one line on stderr: {run}");
    assert!(lines[0].is("connect", "allow"), "{}", lines[0].raw);
}

/// Socket options and dups on a protected fd: TCP options reach the TCP socket, the fd still
/// looks like an AF_INET stream socket, and a dup keeps working after the original is closed
/// (fcntl F_DUPFD_CLOEXEC, then dup2 onto a fixed number).
const PY_SOCKOPTS: &str = r#"
import fcntl, os, socket, sys
from e2e import http_get, status_line
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
fd = s.fileno()
def opt(level, name):
    try:
        return str(s.getsockopt(level, name))
    except OSError as e:
        return "errno%d" % e.errno
try:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("set_nodelay=ok")
except OSError as e:
    print("set_nodelay=errno%d" % e.errno)
print("nodelay=" + opt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
print("domain=" + opt(socket.SOL_SOCKET, socket.SO_DOMAIN))
print("type=" + opt(socket.SOL_SOCKET, socket.SO_TYPE))
print("protocol=" + opt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
print("so_error=" + opt(socket.SOL_SOCKET, socket.SO_ERROR))
d1 = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
os.dup2(d1, 50)
os.close(d1)
s.close()
t = socket.socket(fileno=50)
t.settimeout(30)
data = http_get(t, "/index.html")
print("status=" + status_line(data))
print("body_ok=%s" % data.endswith(b"sockopts\n"))
"#;

#[test]
fn socket_options_and_dups_on_a_protected_fd_behave_like_tcp() {
    let port = free_port();
    let mut h = Harness::new("sockopts", Policy::new().both(port));
    h.serve_http("server", port, "sockopts\n");
    let check = DataPathCheck::begin(&h, port);
    let run = h.run_python("client", "sockopts.py", PY_SOCKOPTS, &[&port.to_string()], Duration::from_secs(30));
    let out = kv(&run.stdout);
    let want = [
        ("set_nodelay", "ok"),
        ("nodelay", "1"),
        ("domain", "2"),   // AF_INET
        ("type", "1"),     // SOCK_STREAM
        ("protocol", "6"), // IPPROTO_TCP
        ("so_error", "0"),
        ("status", "HTTP/1.0 200 OK"),
        ("body_ok", "True"),
    ];
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| out.get(*k).map(String::as_str) != Some(*v))
        .map(|(k, v)| format!("{k}: want {v}, got {:?}", out.get(*k)))
        .collect();
    assert!(
        wrong.is_empty(),
        "protected fd differs from TCP: {wrong:#?}\n{run}\n{}",
        show(&h.log_lines("client"))
    );
    check.finish_with_markers(&h.log_lines("client"), &[b"GET /index.html", b"sockopts\n"]);
}

/// 300 sequential protected connections from one process: threads and fds return to their
/// baseline (nothing per connection is left behind in the shim).
const PY_SEQUENTIAL: &str = r#"
import os, socket, sys, time
from e2e import http_get
port, n = int(sys.argv[1]), int(sys.argv[2])
def one():
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = http_get(s, "/index.html")
    s.close()
    return data.startswith(b"HTTP/1.0 200")
def counts():
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
one()
time.sleep(0.3)
base = counts()
t0 = time.time()
ok = sum(one() for _ in range(n))
print("ms_per_connection=%.1f" % ((time.time() - t0) * 1000 / n))
after = counts()
deadline = time.time() + 5
while after != base and time.time() < deadline:
    time.sleep(0.1)
    after = counts()
print("ok=%d" % ok)
print("base_fds=%d" % base[0])
print("after_fds=%d" % after[0])
print("base_threads=%d" % base[1])
print("after_threads=%d" % after[1])
"#;

#[test]
fn sequential_connections_leave_no_fds_or_threads_behind() {
    let n = 300;
    let port = free_port();
    let mut h = Harness::new("sequential", Policy::new().both(port));
    h.serve_http("server", port, "seq\n");
    let run = h.run_python(
        "client",
        "seq.py",
        PY_SEQUENTIAL,
        &[&port.to_string(), &n.to_string()],
        Duration::from_secs(240),
    );
    let out = kv(&run.stdout);
    assert_eq!(out.get("ok"), Some(&n.to_string()), "{run}");
    assert_eq!(out.get("after_fds"), out.get("base_fds"), "fd leak: {run}");
    assert_eq!(
        out.get("after_threads"),
        out.get("base_threads"),
        "thread leak: {run}"
    );
    eprintln!(
        "sequential: {} ms per connection (python client and server)",
        out["ms_per_connection"]
    );
}

/// Median times over 30 connections: connect() (handshake included) and the first response
/// byte after a small request. Printed as key=value.
const PY_LATENCY: &str = r#"
import socket, statistics, sys, time
port = int(sys.argv[1])
conn, first = [], []
for _ in range(30):
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    t1 = time.perf_counter()
    s.sendall(b"GET /index.html HTTP/1.0\r\nHost: t\r\n\r\n")
    d = s.recv(65536)
    t2 = time.perf_counter()
    assert d.startswith(b"HTTP/1.0 200"), d
    while d:
        d = s.recv(65536)
    s.close()
    conn.append(t1 - t0)
    first.append(t2 - t1)
print("connect_ms=%.2f" % (statistics.median(conn) * 1000))
print("first_byte_ms=%.2f" % (statistics.median(first) * 1000))
"#;

/// The first request after the handshake is not held back by Nagle + delayed ACK (a 40 ms
/// stall per connection): the median time to the first response byte on a protected
/// connection stays within 15 ms of the same exchange on an unprotected port.
#[test]
fn first_request_after_handshake_is_not_delayed() {
    let (protected, unlisted) = (free_port(), free_port());
    let mut h = Harness::new("latency", Policy::new().both(protected));
    for (name, port) in [("server-tls", protected), ("server-plain", unlisted)] {
        h.serve_http(name, port, "latency\n");
    }
    let script = h.script("latency.py", PY_LATENCY);
    let measure = |name: &str, port: u16| {
        let mut c = Command::new(PYTHON);
        c.arg(&script).arg(port.to_string());
        let run = h.run(name, h.shim(&mut c, name), Duration::from_secs(120));
        assert!(run.success(), "{name}: {run}\n{}", show(&h.log_lines(name)));
        let out = kv(&run.stdout);
        let ms = |k: &str| out[k].parse::<f64>().unwrap();
        (ms("connect_ms"), ms("first_byte_ms"))
    };
    let (tls_connect, tls_first) = measure("client-tls", protected);
    let (plain_connect, plain_first) = measure("client-plain", unlisted);
    eprintln!(
        "latency ({}): connect {tls_connect:.2} ms vs {plain_connect:.2} ms plain; first byte {tls_first:.2} ms vs {plain_first:.2} ms plain",
        tether_shim_tests::expected_mode()
    );
    assert!(
        tls_first < plain_first + 15.0,
        "first response byte on a protected connection takes {tls_first:.2} ms (median of 30) vs \
         {plain_first:.2} ms plain: the first request after the handshake is delayed (Nagle + delayed ACK?)"
    );
}

/// Server: accept4 (through ctypes, so the flags reach the hook as given) with no flags, with
/// SOCK_NONBLOCK and with SOCK_CLOEXEC, and report what each accepted fd has.
const PY_ACCEPT4_FLAGS: &str = r#"
import ctypes, fcntl, os, socket, sys
from e2e import listener
libc = ctypes.CDLL(None, use_errno=True)
ls = listener(int(sys.argv[1]), 8)
for flags in (0, socket.SOCK_NONBLOCK, socket.SOCK_CLOEXEC):
    fd = libc.accept4(ls.fileno(), None, None, flags)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    nonblock = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK != 0
    cloexec = fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC != 0
    os.write(fd, b"flags=%d nonblock=%d cloexec=%d\n" % (flags, nonblock, cloexec))
    os.close(fd)
"#;

const PY_ACCEPT4_CLIENT: &str = r#"
import socket, sys
from e2e import read_to_eof
for _ in range(3):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
    sys.stdout.write(read_to_eof(s).decode())
    s.close()
"#;

/// A protected connection the program accepts has exactly its accept4 flags: the shim accepts
/// and handshakes with its own (non-blocking, close-on-exec) and applies the program's at
/// delivery, on the relay's socketpair end as on a TCP socket, without reading them back.
#[test]
fn accepted_connections_have_the_accept4_flags_the_program_asked_for() {
    let port = free_port();
    let mut h = Harness::new("accept4_flags", Policy::new().both(port));
    h.serve_python("server", port, "accept4_server.py", PY_ACCEPT4_FLAGS, &[]);
    let run = h.run_python("client", "accept4_client.py", PY_ACCEPT4_CLIENT, &[&port.to_string()], Duration::from_secs(30));
    let want = format!(
        "flags=0 nonblock=0 cloexec=0\nflags={} nonblock=1 cloexec=0\nflags={} nonblock=0 cloexec=1\n",
        libc::SOCK_NONBLOCK,
        libc::SOCK_CLOEXEC
    );
    assert_eq!(run.stdout, want, "{run}\n{}", show(&h.log_lines("server")));
}
