//! Issue 9, part A: the end of a protected stream cannot be forged, and control records never
//! reach the program as data. Each test runs on the host (userspace relay) and in UML (kTLS):
//! `scripts/test-e2e --uml --no-build -- NAME`.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::Duration;

use tether_shim_tests::{
    free_port, kv, openssl_s_client, openssl_s_server, show, DataPathCheck, Harness, Policy, Run, SvidFiles,
    ANY_ID, PY_READ_TO_END,
};

/// Server: accept connections; read the request line; send BODY; then end the stream the way
/// argv[2] says: `exit` (the process dies: the kernel sends a FIN, nobody a close_notify) or
/// `close` (a plain close(), no shutdown).
const PY_ENDING_SERVER: &str = r#"
import os, socket, sys, time
from e2e import listener
port, how = int(sys.argv[1]), sys.argv[2]
ls = listener(port, 8)
while True:
    c, _ = ls.accept()
    f = c.makefile("rb")
    f.readline()
    c.sendall(b"BODY-" + b"b" * 100000 + b"-END")
    if how == "exit":
        time.sleep(0.5)  # the userspace relay lives in this process: let it send the body
        os._exit(0)
    f.close()
    c.close()
"#;

const BODY_LEN: usize = 100_009;

fn ending(name: &str, policy_of: impl Fn(u16) -> Policy, how: &str) -> (Harness, std::collections::BTreeMap<String, String>) {
    ending_at(name, policy_of, how, "127.0.0.1")
}

/// [`ending`], the client connecting to `host` (as the program writes it).
fn ending_at(
    name: &str,
    policy_of: impl Fn(u16) -> Policy,
    how: &str,
    host: &str,
) -> (Harness, std::collections::BTreeMap<String, String>) {
    let port = free_port();
    let mut h = Harness::new(name, policy_of(port));
    h.serve_python("server", port, "server.py", PY_ENDING_SERVER, &[how]);
    let check = DataPathCheck::begin(&h, port);
    // Send a request line, read to the end; print the byte count and how the stream ended.
    let script = PY_READ_TO_END.replace("\"127.0.0.1\"", &format!("\"{host}\""));
    let mut client = h.python("client.py", &script);
    client.arg(port.to_string()).arg("GET /SECRET-request\n");
    let run = h.run("client", h.shim(&mut client, "client"), Duration::from_secs(40));
    assert!(run.success(), "client failed: {run}\n{}", show(&h.log_lines("client")));
    let out = kv(&run.stdout);
    assert_eq!(
        out.get("bytes").map(String::as_str),
        Some(BODY_LEN.to_string().as_str()),
        "the client did not get the whole body before the end: {run}"
    );
    check.finish_with_markers(&h.log_lines("client"), &[b"SECRET-request", b"BODY-bbbb"]);
    (h, out)
}

/// A peer whose stream ends with a TCP FIN but no close_notify (here it dies; an on-path
/// attacker can do the same to cut a close-delimited body short): the program reads all the
/// data, then ECONNRESET, never a clean EOF.
#[test]
fn peer_eof_without_close_notify_reaches_the_program_as_econnreset() {
    let (h, out) = ending("truncated", |p| Policy::new().both(p), "exit");
    assert_eq!(
        out.get("end").map(String::as_str),
        Some("errno_ECONNRESET"),
        "a truncated stream read as {:?}\n{}",
        out.get("end"),
        show(&h.log_lines("client"))
    );
    assert!(
        h.log_lines("client").iter().any(|l| l.get("event") == "read" && l.get("reason").contains("close_notify")),
        "the truncation was not logged:\n{}",
        show(&h.log_lines("client"))
    );
}

/// `allow_truncation = true` on the rule: the same truncated end reads as EOF.
#[test]
fn allow_truncation_rule_turns_a_truncated_end_into_eof() {
    let policy = |p: u16| {
        Policy::new().inbound(p, &[ANY_ID]).raw(&format!(
            "[[outbound]]\nto = [\"127.0.0.1/32:{p}\"]\nallow = [\"{ANY_ID}\"]\nallow_truncation = true"
        ))
    };
    let (h, out) = ending("truncation-allowed", policy, "exit");
    assert_eq!(
        out.get("end").map(String::as_str),
        Some("eof"),
        "allow_truncation did not apply:\n{}",
        show(&h.log_lines("client"))
    );
}

/// The rule that admitted a connection is the one whose `allow_truncation` applies. A program
/// connecting to `0.0.0.0` (Linux connects it to loopback) is admitted by a rule naming
/// `0.0.0.0` as written, listed first, which does not allow truncation; a later rule for
/// 127.0.0.1 does. Before 2026-12-07 the data path looked the rule up again by the loopback
/// address, took the second rule's `allow_truncation`, and read the truncated end as EOF.
#[test]
fn the_admitting_rule_decides_truncation_for_a_connect_to_0_0_0_0() {
    let policy = |p: u16| {
        Policy::new().inbound(p, &[ANY_ID]).raw(&format!(
            "[[outbound]]\nto = [\"0.0.0.0/32:{p}\"]\nallow = [\"{ANY_ID}\"]\n\
             [[outbound]]\nto = [\"127.0.0.1/32:{p}\"]\nallow = [\"{ANY_ID}\"]\nallow_truncation = true"
        ))
    };
    let (h, out) = ending_at("truncation-rule-of-0000", policy, "exit", "0.0.0.0");
    assert_eq!(
        out.get("end").map(String::as_str),
        Some("errno_ECONNRESET"),
        "the second rule's allow_truncation applied:\n{}",
        show(&h.log_lines("client"))
    );
}

/// A plain close() (no shutdown) of the last fd sends close_notify: the tether client sees a
/// clean EOF.
#[test]
fn close_of_the_last_fd_ends_the_stream_cleanly() {
    let (h, out) = ending("close-notify", |p| Policy::new().both(p), "close");
    assert_eq!(
        out.get("end").map(String::as_str),
        Some("eof"),
        "a closed stream did not end cleanly:\n{}",
        show(&h.log_lines("client"))
    );
}


/// `openssl s_client` (not under the shim, presenting the test's exported SVID) sends
/// `GET /x` to the tether server on `port` and reads until the server ends the stream.
fn s_client_request(h: &Harness, port: u16, svid: &SvidFiles) -> Run {
    openssl_s_client(h, svid, port, &["-ign_eof"], "GET /x\n")
}

/// The same, judged by a peer that is not tether: `openssl s_client` reports an unexpected EOF
/// when a stream ends without close_notify. On kTLS this is the kernel path (close() sends
/// nothing by itself); on the relay, the relay's own close_notify.
#[test]
fn close_without_shutdown_sends_close_notify_to_openssl() {
    let port = free_port();
    let mut h = Harness::new("close-notify-openssl", Policy::new().inbound(port, &[ANY_ID]));
    let svid = h.svid_files();
    h.serve_python("server", port, "server.py", PY_ENDING_SERVER, &["close"]);
    let run = s_client_request(&h, port, &svid);
    assert!(run.stdout.contains("-END"), "s_client did not get the body: {run}");
    assert!(
        !run.stderr.to_lowercase().contains("unexpected eof"),
        "the server's close sent no close_notify (openssl saw a truncated stream): {run}\n{}",
        show(&h.log_lines("server"))
    );
}

/// Client: GET / from an HTTP server, reading only with recvmsg and an ancillary buffer of its
/// own (as programs that ask for timestamps or packet info do), BUFSIZE bytes at a time.
const PY_RECVMSG_CMSG: &str = r#"
import errno, socket, sys
port, bufsize = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=20)
s.sendall(b"GET /cmsg-reader HTTP/1.0\r\n\r\n")
data, end = b"", "eof"
try:
    while True:
        d, anc, flags, _ = s.recvmsg(bufsize, 512)
        if not d:
            break
        data += d
except OSError as e:
    end = "errno_" + errno.errorcode.get(e.errno, str(e.errno))
print("head=" + data[:16].hex())
print("http=%s" % data.startswith(b"HTTP/1.0 200"))
print("end=" + end)
"#;

fn recvmsg_with_own_cmsg_buffer(bufsize: usize) {
    let port = free_port();
    let mut h = Harness::new("recvmsg-cmsg", Policy::new().outbound(port, &[ANY_ID]));
    let mut server = openssl_s_server(&h.svid_files(), port, &["-www"]);
    h.spawn_server("s_server", h.plain(&mut server), port);
    let check = DataPathCheck::begin(&h, port);
    let mut c = h.python("cmsg.py", PY_RECVMSG_CMSG);
    c.args([port.to_string(), bufsize.to_string()]);
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(60));
    let out = kv(&run.stdout);
    assert!(
        run.success() && out.get("http").map(String::as_str) == Some("True"),
        "the program's data did not start with the HTTP response (control records as data?): {run}\n{}",
        show(&h.log_lines("client"))
    );
    check.finish_with_markers(&h.log_lines("client"), &[b"GET /cmsg-reader"]);
}

/// OpenSSL sends two NewSessionTickets after the handshake. A program reading with its own
/// cmsg buffer must not receive them as data (under kTLS the kernel labels them only by a
/// cmsg); the HTTP response is the first thing it reads.
#[test]
fn recvmsg_with_own_cmsg_buffer_never_returns_control_records_as_data() {
    recvmsg_with_own_cmsg_buffer(65536);
}

/// The same, 3 bytes per call: control records cut by the program's small buffer are still
/// consumed whole, and never start the program's data.
#[test]
fn recvmsg_with_tiny_buffer_and_cmsg_consumes_control_records_whole() {
    recvmsg_with_own_cmsg_buffer(3);
}

/// Server: fork per connection (the postgres/inetd pattern). The parent closes its copy at
/// once; the child reads the request, sends BODY after a pause (so the parent's close came
/// first), and closes with a plain close().
const PY_FORKING_SERVER: &str = r#"
import os, socket, sys, time
from e2e import listener
ls = listener(int(sys.argv[1]), 8)
while True:
    c, _ = ls.accept()
    if os.fork() == 0:
        ls.close()
        f = c.makefile("rb")
        f.readline()
        time.sleep(0.3)
        c.sendall(b"BODY-" + b"b" * 100000 + b"-END")
        f.close()
        c.close()
        os._exit(0)
    c.close()
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"#;

/// Fork per connection: the parent's close of its copy sends nothing (the child still serves
/// the connection), and the child's final close sends close_notify (its parent no longer holds
/// the socket: `kcmp`). Judged by openssl: the whole body, then a clean end.
#[test]
fn fork_per_connection_server_ends_the_stream_with_close_notify_from_the_child() {
    let port = free_port();
    let mut h = Harness::new("fork-close-notify", Policy::new().inbound(port, &[ANY_ID]));
    let svid = h.svid_files();
    h.serve_python("server", port, "forking.py", PY_FORKING_SERVER, &[]);
    let run = s_client_request(&h, port, &svid);
    assert!(
        run.stdout.contains("-END"),
        "the body did not arrive whole (did the parent's close end the stream?): {run}\n{}",
        show(&h.log_lines("server"))
    );
    assert!(
        !run.stderr.to_lowercase().contains("unexpected eof"),
        "the child's close sent no close_notify: {run}\n{}",
        show(&h.log_lines("server"))
    );
}
