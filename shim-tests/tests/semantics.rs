//! Socket semantics a program must not notice changing under tether (issue 3, section 6):
//! bulk data towards the server, `sendfile` and poll readiness on the client side, half-close,
//! `getpeername`/`getsockname`, and a protected fd handed to another program across exec.

#![allow(clippy::unwrap_used)] // reason: tests

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;
use std::time::Duration;

use tether_shim_tests::{
    free_port, http_server, scaled_bytes, sha256, show, write_random_file, DataPathCheck, Harness, Policy, PYTHON,
};

/// Threaded server: reads each connection to EOF, then replies with what it saw, one
/// `key=value` per line (sha256, byte count, its getpeername and getsockname), and closes.
const PY_SINK_SERVER: &str = r#"
import hashlib, socket, sys, threading
port = int(sys.argv[1])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(64)
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

fn kv(out: &str) -> BTreeMap<String, String> {
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn sink(name: &str) -> (Harness, u16) {
    let port = free_port();
    let mut h = Harness::new(name, Policy::new().both(port));
    let mut server = Command::new(PYTHON);
    server.arg(h.script("sink_server.py", PY_SINK_SERVER)).arg(port.to_string());
    h.spawn_server("server", h.shim(&mut server, "server"), port);
    (h, port)
}

/// A 20 MB upload with sendfile(2) from the client, then shutdown(SHUT_WR): the server reads
/// exactly the file up to EOF and its reply still reaches the client.
#[test]
fn sendfile_upload_then_half_close_arrives_intact_and_reply_returns() {
    let (h, port) = sink("upload");
    let file = h.path("upload.bin");
    write_random_file(&file, scaled_bytes(20));
    let check = DataPathCheck::begin();
    let mut client = Command::new(PYTHON);
    client.arg(h.script("sink_client.py", PY_SINK_CLIENT)).arg(port.to_string()).arg(&file);
    let run = h.run("client", h.shim(&mut client, "client"), Duration::from_secs(150));
    let lines = h.log_lines("client");
    let out = kv(&run.stdout);
    let len = fs::metadata(&file).unwrap().len().to_string();
    assert!(run.success(), "client failed: {run}\n{}\n{}", show(&lines), h.output("server"));
    assert_eq!(out.get("sent"), Some(&len), "sendfile sent a different count: {run}");
    assert_eq!(out.get("n"), Some(&len), "server received a different count: {run}");
    assert_eq!(out.get("sha").map(String::as_str), Some(sha256(&file).as_str()), "sha256 differs: {run}");
    let mut all = lines;
    all.extend(h.log_lines("server"));
    check.finish(&all);
}

/// getpeername/getsockname on both ends of a protected connection report the real TCP
/// endpoints, and each side's view mirrors the other's.
#[test]
fn getpeername_and_getsockname_report_the_real_endpoints() {
    let (h, port) = sink("addrs");
    let mut client = Command::new(PYTHON);
    client.arg(h.script("sink_client.py", PY_SINK_CLIENT)).arg(port.to_string());
    let run = h.run("client", h.shim(&mut client, "client"), Duration::from_secs(30));
    let out = kv(&run.stdout);
    assert!(run.success() && out.contains_key("server_peer"), "client failed: {run}\n{}", show(&h.log_lines("client")));
    assert_eq!(out["client_peer"], format!("127.0.0.1:{port}"), "client getpeername: {run}");
    assert_eq!(out["server_local"], format!("127.0.0.1:{port}"), "server getsockname: {run}");
    assert_eq!(out["client_local"], out["server_peer"], "client getsockname != server getpeername: {run}");
    let allow = h.log_lines("client").into_iter().find(|l| l.is("connect", "allow")).unwrap();
    assert_eq!(allow.get("local"), out["client_local"], "logged local address: {}", allow.raw);
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
    let www = h.path("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "after exec\n").unwrap();
    h.spawn_server("server", h.shim(&mut http_server(port, &www), "server"), port);
    let mut cmd = Command::new(PYTHON);
    cmd.arg(h.script("exec.py", PY_EXEC)).arg(port.to_string());
    let run = h.run("exec", h.shim(&mut cmd, "exec"), Duration::from_secs(20));
    assert!(
        run.success() && run.stdout.contains("HTTP/1.0 200") && run.stdout.contains("after exec"),
        "the exec'd program could not use the inherited protected connection: {run}\n{}",
        show(&h.log_lines("exec"))
    );
}
