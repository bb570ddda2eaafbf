//! Issue 9, part A: every way a TCP connection to a protected destination can start is
//! protected or refused, never plaintext. Each test is named after what leaked, and proves the
//! outcome at the destination (a plain observer listener) or on the wire (a capture on lo).

#![allow(clippy::unwrap_used)] // reason: tests

use std::process::Command;
use std::time::Duration;

use tether_shim_tests::wire::{Capture, Observer};
use tether_shim_tests::{free_port, kv, show, Harness, Policy, ANY_ID};

/// The capture is not blind: plaintext on an unprotected port is seen, and `assert_protected`
/// rejects it (so a protected test passing means something).
#[test]
fn capture_sees_plaintext_on_an_unprotected_port() {
    let port = free_port();
    let h = Harness::new("capture-sanity", Policy::new());
    let cap = Capture::start(h.dir(), port);
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut c, &mut b).unwrap();
        b
    });
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut c, b"PLAIN-MARKER-sanity").unwrap();
    drop(c);
    assert_eq!(t.join().unwrap(), b"PLAIN-MARKER-sanity");
    let wire = cap.finish();
    assert!(wire.saw_plaintext(b"PLAIN-MARKER-sanity"), "{}", wire.summary());
    let r = std::panic::catch_unwind(|| wire.assert_protected(&[]));
    assert!(r.is_err(), "assert_protected accepted plaintext:\n{}", wire.summary());
}

/// Client: make one protected connection to GOOD, lose its fd number through a close no hook
/// sees (METHOD), open a new socket (which gets the same number) and connect it to OBSERVED,
/// then send MARKER if that connect succeeded.
const PY_STALE_FD: &str = r#"
import ctypes, errno, os, socket, sys, time
method, good, observed, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
libc = ctypes.CDLL(None, use_errno=True)
s = socket.create_connection(("127.0.0.1", good), timeout=10)
time.sleep(0.3)  # let the shim's background threads (reports, relay) settle their own fds
fd = s.detach()
if method == "fclose":
    libc.fdopen.restype = ctypes.c_void_p
    fp = libc.fdopen(fd, b"r+")
    assert fp, "fdopen failed"
    assert libc.fclose(ctypes.c_void_p(fp)) == 0, "fclose failed"
elif method == "syscall":
    sys_close = {"x86_64": 3, "aarch64": 57}[os.uname().machine]
    assert libc.syscall(sys_close, fd) == 0, "syscall(SYS_close) failed"
elif method == "closefrom":
    libc.closefrom(fd)
# Another thread may take a lower free number first: keep opening until ours comes back.
spare = []
t = socket.socket()
while t.fileno() != fd and len(spare) < 20:
    spare.append(t)
    t = socket.socket()
print("reused=%d" % (t.fileno() == fd), flush=True)
t.settimeout(15)
try:
    t.connect(("127.0.0.1", observed))
except OSError as e:
    print("connect_errno=" + errno.errorcode.get(e.errno or 0, str(e)), flush=True)
    sys.exit(0)
print("connected", flush=True)
t.sendall(marker)
t.close()
"#;

fn stale_fd_case(method: &str) {
    let (good, observed) = (free_port(), free_port());
    let mut h = Harness::new(
        &format!("stale-{method}"),
        Policy::new().both(good).outbound(observed, &[ANY_ID]),
    );
    h.serve_http("server", good, "good\n");
    let obs = Observer::start(observed);
    let marker = format!("SECRET-after-{method}");
    let mut c = h.python("stale.py", PY_STALE_FD);
    c.args([method, &good.to_string(), &observed.to_string(), &marker])
        .env("TETHER_HANDSHAKE_TIMEOUT_MS", "1500");
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(40));
    let out = kv(&run.stdout);
    // closefrom must spare the shim's own fds (the report thread's broker connection among
    // them: closing it under that thread made Rust's fd-ownership check abort the process).
    assert!(
        run.success(),
        "client failed: {run}\n{}",
        show(&h.log_lines("client"))
    );
    assert_eq!(
        out.get("reused").map(String::as_str),
        Some("1"),
        "the new socket did not reuse the fd number, so this test proves nothing: {run}"
    );
    obs.assert_only_tls(marker.as_bytes());
    assert!(
        !out.contains_key("connected"),
        "a connect to a non-TLS destination succeeded (plaintext): {run}"
    );
}

#[test]
fn stale_fd_after_fclose_of_fdopened_socket_is_not_a_pass_through() {
    stale_fd_case("fclose");
}

#[test]
fn stale_fd_after_raw_syscall_close_is_not_a_pass_through() {
    stale_fd_case("syscall");
}

#[test]
fn stale_fd_after_closefrom_is_not_a_pass_through() {
    stale_fd_case("closefrom");
}

/// Client: one protected connection (the shim logs it, and keeps its log file open), then the
/// log file's fd is closed where no hook sees (`syscall(SYS_close)`), the number is reused by
/// a file of the program's own, and a second protected connection is made. Prints what the
/// program's file holds.
const PY_LOG_FD_REUSE: &str = r#"
import ctypes, os, socket, sys, time
port, log, mine = int(sys.argv[1]), sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
def get():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
get()
fds = [int(f) for f in os.listdir("/proc/self/fd") if os.path.realpath("/proc/self/fd/" + f) == os.path.realpath(log)]
print("log_fds=%s" % fds, flush=True)
if not fds:
    sys.exit(0)
sys_close = {"x86_64": 3, "aarch64": 57}[os.uname().machine]
assert libc.syscall(sys_close, fds[0]) == 0, "syscall(SYS_close) failed"
spare = []
f = os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
while f != fds[0] and len(spare) < 20:
    spare.append(f)
    f = os.open(mine, os.O_WRONLY)
print("reused=%d" % (f == fds[0]), flush=True)
get()
time.sleep(0.2)
print("mine=%r" % open(mine, "rb").read(), flush=True)
"#;

/// The shim keeps its log file open; a close no hook sees must never make it write log lines
/// into the program's file that reused the number (it checks the file behind the number).
#[test]
fn log_lines_never_land_in_a_file_that_reused_the_log_fd_number() {
    let port = free_port();
    let mut h = Harness::new("log-fd-reuse", Policy::new().both(port));
    h.serve_http("server", port, "good\n");
    let mine = h.path("mine.txt");
    let mut c = h.python("logreuse.py", PY_LOG_FD_REUSE);
    c.arg(port.to_string()).arg(h.log_path("client")).arg(&mine);
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(40));
    let out = kv(&run.stdout);
    assert!(run.success(), "client failed: {run}\n{}", show(&h.log_lines("client")));
    assert!(out.get("log_fds").is_some_and(|v| v != "[]"), "the shim keeps no log fd open: {run}");
    assert_eq!(out.get("reused").map(String::as_str), Some("1"), "the number was not reused, this proves nothing: {run}");
    assert_eq!(out.get("mine").map(String::as_str), Some("b''"), "log lines went into the program's file: {run}");
    let connects = h.log_lines("client").iter().filter(|l| l.get("event") == "connect").count();
    assert_eq!(connects, 2, "the second connection's line is missing from the log:\n{}", show(&h.log_lines("client")));
}

/// Client: start a TCP connection to 127.0.0.1:PORT one of the ways that bypassed the shim,
/// send PAYLOAD, and with `--read` print the first response line. Prints `connect_errno=NAME`
/// or `send_errno=NAME` when refused, `sent=N` when the payload went out.
const PY_WAYS_IN: &str = r#"
import ctypes, errno, socket, struct, sys
from e2e import read_to_eof
way, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
read = "--read" in sys.argv
libc = ctypes.CDLL(None, use_errno=True)
def name(e):
    return errno.errorcode.get(e, str(e))
def raw_connect(s, sa, length):
    buf = ctypes.create_string_buffer(sa, max(len(sa), length))
    if libc.connect(s.fileno(), buf, length) != 0:
        print("connect_errno=" + name(ctypes.get_errno()), flush=True)
        sys.exit(0)
def in6(port, scope):
    sa = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + struct.pack("=I", 0)
    sa += socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
    return sa + (struct.pack("=I", 0) if scope else b"")
def in4(port):
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton("127.0.0.1") + bytes(8)
try:
    if way == "short-in6":
        s = socket.socket(socket.AF_INET6)
        raw_connect(s, in6(port, False), 24)
    elif way == "oversized-in6":
        s = socket.socket(socket.AF_INET6)
        raw_connect(s, in6(port, True), 128)
    elif way == "oversized-in4":
        s = socket.socket(socket.AF_INET)
        raw_connect(s, in4(port), 128)
    elif way == "dunder-connect":
        s = socket.socket()
        buf = ctypes.create_string_buffer(in4(port), 16)
        if getattr(libc, "__connect")(s.fileno(), buf, 16) != 0:
            print("connect_errno=" + name(ctypes.get_errno()), flush=True)
            sys.exit(0)
    elif way == "any4":
        s = socket.socket()
        s.connect(("0.0.0.0", port))
    elif way == "mapped-any":
        s = socket.socket(socket.AF_INET6)
        s.connect(("::ffff:0.0.0.0", port))
    elif way == "mptcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
        s.connect(("127.0.0.1", port))
    elif way == "fastopen-connect":
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, 30, 1)  # TCP_FASTOPEN_CONNECT
        s.connect(("127.0.0.1", port))
    elif way == "abort-then-retry":
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            print("first_connect=ok", flush=True)
        except OSError as e:
            print("first_connect=" + name(e.errno), flush=True)
        try:
            s.connect(("127.0.0.1", port))
        except OSError as e:
            print("retry_connect=" + name(e.errno), flush=True)
    elif way in ("sendto-fastopen", "sendmsg-fastopen", "sendmmsg-fastopen"):
        s = socket.socket()
    else:
        sys.exit("unknown way " + way)
except OSError as e:
    print("connect_errno=" + name(e.errno), flush=True)
    sys.exit(0)
s.settimeout(10)
try:
    if way == "sendto-fastopen":
        n = s.sendto(payload, socket.MSG_FASTOPEN, ("127.0.0.1", port))
    elif way == "sendmsg-fastopen":
        n = s.sendmsg([payload], [], socket.MSG_FASTOPEN, ("127.0.0.1", port))
    elif way == "sendmmsg-fastopen":
        class Iov(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        class Msg(ctypes.Structure):
            _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(Iov)),
                        ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                        ("flags", ctypes.c_int)]
        class MMsg(ctypes.Structure):
            _fields_ = [("hdr", Msg), ("len", ctypes.c_uint)]
        sa = ctypes.create_string_buffer(in4(port), 16)
        data = ctypes.create_string_buffer(payload, len(payload))
        iov = Iov(ctypes.cast(data, ctypes.c_void_p), len(payload))
        m = MMsg(Msg(ctypes.cast(sa, ctypes.c_void_p), 16, ctypes.pointer(iov), 1, None, 0, 0), 0)
        s.setblocking(True)
        if libc.sendmmsg(s.fileno(), ctypes.byref(m), 1, socket.MSG_FASTOPEN) != 1:
            raise OSError(ctypes.get_errno(), "sendmmsg")
        n = m.len
    else:
        n = s.send(payload)
except OSError as e:
    print("send_errno=" + name(e.errno), flush=True)
    sys.exit(0)
print("sent=%d" % n, flush=True)
if read:
    data = read_to_eof(s)
    print("status=" + data.split(b"\r\n", 1)[0].decode("latin1"), flush=True)
    print("body=" + data.split(b"\r\n\r\n", 1)[-1].decode("latin1").strip(), flush=True)
"#;

/// A way in, aimed at a plain observer on a protected destination: the observer must see a
/// TLS ClientHello (the handshake then fails), never the payload.
fn refused_way(way: &str, extra_env: &[(&str, &str)]) -> tether_shim_tests::Run {
    let observed = free_port();
    let h = Harness::new(&format!("way-{way}"), Policy::new().outbound(observed, &[ANY_ID]));
    let obs = Observer::start(observed);
    let marker = format!("SECRET-{way}");
    let mut c = h.python("ways.py", PY_WAYS_IN);
    c.args([way, &observed.to_string(), &marker])
        .env("TETHER_HANDSHAKE_TIMEOUT_MS", "1500");
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(40));
    assert!(run.success(), "client failed: {run}\n{}", show(&h.log_lines("client")));
    obs.assert_only_tls(marker.as_bytes());
    assert!(
        !kv(&run.stdout).contains_key("sent"),
        "the payload was sent to a destination that does not speak TLS: {run}\n{}",
        show(&h.log_lines("client"))
    );
    run
}

/// The same way in, aimed at a real tether server: it works, and the wire shows only TLS.
fn protected_way(way: &str) {
    let port = free_port();
    let mut h = Harness::new(&format!("way-ok-{way}"), Policy::new().both(port));
    h.serve_http("server", port, "served-through-the-side-door\n");
    let check = tether_shim_tests::DataPathCheck::begin(&h, port);
    let request = "GET /index.html HTTP/1.0\r\nX-Secret: SECRET-request\r\n\r\n";
    let run = h.run_python(
        "client",
        "ways.py",
        PY_WAYS_IN,
        &[&way, &port.to_string(), &request, &"--read"],
        Duration::from_secs(40),
    );
    let out = kv(&run.stdout);
    assert!(
        run.success() && out.get("status").is_some_and(|s| s.contains(" 200 ")),
        "{way} to a tether server failed: {run}\n{}",
        show(&h.log_lines("client"))
    );
    assert_eq!(out.get("body").map(String::as_str), Some("served-through-the-side-door"), "{run}");
    check.finish_with_markers(
        &h.log_lines("client"),
        &[b"SECRET-request", b"served-through-the-side-door"],
    );
}

#[test]
fn short_sockaddr_in6_connect_is_protected_not_plaintext() {
    refused_way("short-in6", &[]);
    protected_way("short-in6");
}

#[test]
fn oversized_sockaddr_lengths_are_protected_not_plaintext() {
    refused_way("oversized-in6", &[]);
    refused_way("oversized-in4", &[]);
}

/// glibc's public `__connect` is the same function as `connect`, and a program can call it.
#[test]
fn glibc_dunder_connect_is_protected_not_plaintext() {
    refused_way("dunder-connect", &[]);
    protected_way("dunder-connect");
}

/// Linux connects an unspecified address to loopback: `0.0.0.0:P` (and `::ffff:0.0.0.0:P`)
/// reaches 127.0.0.1:P, so a rule for 127.0.0.1 must cover it. (Found by review: these went out
/// in plaintext to a protected 127.0.0.1 port.)
#[test]
fn unspecified_address_connect_is_protected_as_loopback() {
    refused_way("any4", &[]);
    refused_way("mapped-any", &[]);
    protected_way("any4");
}

/// A socket first connected where plaintext is allowed (an observe rule), then disconnected
/// (`connect(AF_UNSPEC)`) or left with a failed non-blocking connect, is connected again, by
/// `connect` or by `sendto(MSG_FASTOPEN)`, to a protected destination: that second connect is
/// decided afresh. (Found by review: the fd's plaintext entry made it pass straight through.)
const PY_RECONNECT: &str = r#"
import ctypes, errno, select, socket, struct, sys, time
how, plain, observed, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket()
if how.startswith("unspec"):
    s.connect(("127.0.0.1", plain))
    unspec = ctypes.create_string_buffer(struct.pack("=H", socket.AF_UNSPEC) + bytes(14), 16)
    assert libc.connect(s.fileno(), unspec, 16) == 0, "AF_UNSPEC: %d" % ctypes.get_errno()
else:  # a non-blocking connect to the observe port that fails (nothing listens there)
    s.setblocking(False)
    assert s.connect_ex(("127.0.0.1", plain)) == errno.EINPROGRESS
    select.select([], [s], [], 5)
    print("first=" + errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"), flush=True)
    s.setblocking(True)
s.settimeout(10)
for attempt in range(2):  # after a failed connect, Linux reports ECONNABORTED once
    try:
        if how.endswith("fastopen"):
            s.sendto(marker, socket.MSG_FASTOPEN, ("127.0.0.1", observed))
        else:
            s.connect(("127.0.0.1", observed))
            s.sendall(marker)
    except OSError as e:
        print("errno=" + errno.errorcode.get(e.errno or 0, str(e)), flush=True)
        if e.errno == errno.ECONNABORTED and attempt == 0:
            continue
        sys.exit(0)
    print("sent", flush=True)
    break
"#;

fn reconnect_case(how: &str) {
    let observed = free_port();
    let plain = free_port();
    let observe_rule = format!(
        "[[outbound]]\nto = [\"127.0.0.1/32:{plain}\"]\nallow = [\"{ANY_ID}\"]\nmode = \"observe\""
    );
    let h = Harness::new(
        &format!("reconnect-{how}"),
        Policy::new().outbound(observed, &[ANY_ID]).raw(&observe_rule),
    );
    // The plaintext destination accepts (the AF_UNSPEC cases) or refuses (the failed connect).
    let _plain_listener = how.starts_with("unspec").then(|| std::net::TcpListener::bind(("127.0.0.1", plain)).unwrap());
    let obs = Observer::start(observed);
    let marker = format!("SECRET-reconnect-{how}");
    let mut c = h.python("reconnect.py", PY_RECONNECT);
    let (p, o) = (plain.to_string(), observed.to_string());
    c.args([how, p.as_str(), o.as_str(), marker.as_str()])
        .env("TETHER_HANDSHAKE_TIMEOUT_MS", "1500");
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(40));
    assert!(run.success(), "client failed: {run}\n{}", show(&h.log_lines("client")));
    obs.assert_only_tls(marker.as_bytes());
    assert!(
        !kv(&run.stdout).contains_key("sent"),
        "the payload was sent to a destination that does not speak TLS: {run}\n{}",
        show(&h.log_lines("client"))
    );
}

#[test]
fn reconnect_after_af_unspec_is_protected_not_plaintext() {
    reconnect_case("unspec");
    reconnect_case("unspec-fastopen");
}

#[test]
fn reconnect_after_a_failed_observe_connect_is_protected_not_plaintext() {
    reconnect_case("failed");
    reconnect_case("failed-fastopen");
}

/// Whether this kernel has MPTCP (UML 6.1's config does not; the host's does).
fn kernel_has_mptcp() -> bool {
    // SAFETY: socket(2) and close(2) on a socket we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP);
        if fd < 0 {
            eprintln!("this kernel has no MPTCP: nothing to test");
            return false;
        }
        libc::close(fd);
    }
    true
}

#[test]
fn mptcp_connect_is_protected_not_plaintext() {
    if !kernel_has_mptcp() {
        return;
    }
    refused_way("mptcp", &[]);
    protected_way("mptcp");
}

#[test]
fn sendto_with_msg_fastopen_is_protected_not_plaintext() {
    refused_way("sendto-fastopen", &[]);
    protected_way("sendto-fastopen");
}

#[test]
fn sendmsg_with_msg_fastopen_is_protected_not_plaintext() {
    refused_way("sendmsg-fastopen", &[]);
    protected_way("sendmsg-fastopen");
}

#[test]
fn sendmmsg_with_msg_fastopen_is_protected_not_plaintext() {
    refused_way("sendmmsg-fastopen", &[]);
    protected_way("sendmmsg-fastopen");
}

#[test]
fn tcp_fastopen_connect_sockopt_is_protected_not_plaintext() {
    refused_way("fastopen-connect", &[]);
    protected_way("fastopen-connect");
}

/// A panic inside the connect hook after the real connect (injected; debug builds only): the
/// caller gets ECONNABORTED, and the socket can carry nothing, so a retry that sees EISCONN
/// cannot write plaintext.
#[test]
fn panic_after_real_connect_leaves_a_socket_that_cannot_carry_plaintext() {
    let run = refused_way("abort-then-retry", &[("TETHER_TEST_FAULT", "after-connect")]);
    let out = kv(&run.stdout);
    assert_eq!(
        out.get("first_connect").map(String::as_str),
        Some("ECONNABORTED"),
        "the injected panic did not surface: {run}"
    );
    assert!(
        out.contains_key("send_errno"),
        "the send after the aborted connect did not fail: {run}"
    );
}

/// Server: an MPTCP listener on PORT; prints what the first client sent (up to 5 s).
const PY_MPTCP_SERVER: &str = r#"
import socket, sys
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(8)
while True:
    c, _ = ls.accept()
    c.settimeout(5)
    data = b""
    try:
        while True:
            d = c.recv(4096)
            if not d:
                break
            data += d
    except OSError:
        pass
    print("received=%r" % data, flush=True)
    c.close()
"#;

/// An MPTCP listener on a protected port is a protected listener: a plain client's bytes never
/// reach the program.
#[test]
fn mptcp_listener_on_protected_port_never_hands_plaintext_to_the_program() {
    if !kernel_has_mptcp() {
        return;
    }
    let port = free_port();
    let mut h = Harness::new("mptcp-listener", Policy::new().inbound(port, &[ANY_ID]));
    let mut server = h.python("mptcp_server.py", PY_MPTCP_SERVER);
    server
        .arg(port.to_string())
        .env("TETHER_HANDSHAKE_TIMEOUT_MS", "1500");
    h.spawn_server("server", h.shim(&mut server, "server"), port);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut c, b"SECRET-plain-client-to-mptcp\r\n").unwrap();
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 64];
    let _ = std::io::Read::read(&mut c, &mut buf);
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let out = h.output("server");
    assert!(
        !out.contains("SECRET-plain-client-to-mptcp"),
        "the MPTCP listener handed a plain client's bytes to the program:\n{out}"
    );
    let lines = h.wait_log("server", Duration::from_secs(3), |l| {
        l.iter().any(|l| l.is("accept", "deny"))
    });
    assert!(
        lines.iter().any(|l| l.is("accept", "deny")),
        "the shim did not refuse the plain client on the MPTCP listener:\n{}\n{out}",
        show(&lines)
    );
}

/// io_uring connects and accepts never pass through libc, so the shim cannot see them: `tether
/// run` says so for a program that links liburing (and not for one that does not).
#[test]
fn tether_run_warns_that_a_program_linking_liburing_can_bypass_the_shim() {
    let h = Harness::new("liburing", Policy::new());
    let prog = h.build_c(
        "uring",
        "#include <liburing.h>\nint main(void) { struct io_uring r;\n  \
         if (io_uring_queue_init(2, &r, 0) == 0) io_uring_queue_exit(&r);\n  return 0; }\n",
        &["-luring"],
        "apt-get install gcc liburing-dev",
    );
    let tether_run = |name: &str, cmd: &std::path::Path| {
        let mut c = Command::new(tether_shim_tests::tether_cli_path());
        c.arg("run")
            .arg("--socket")
            .arg(h.socket())
            .arg("--lib")
            .arg(tether_shim_tests::shim_path())
            .arg("--")
            .arg(cmd);
        h.run(name, h.plain(&mut c), Duration::from_secs(30))
    };
    let run = tether_run("run-uring", &prog);
    assert!(run.success(), "tether run failed: {run}");
    assert!(
        run.stderr.contains("links liburing") && run.stderr.contains("NOT protected"),
        "no io_uring warning for a program linking liburing: {run}"
    );
    let run = tether_run("run-true", std::path::Path::new("/bin/true"));
    assert!(run.success() && !run.stderr.contains("liburing"), "spurious warning: {run}");
}
