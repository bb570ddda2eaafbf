//! Programs several end-to-end tests run the same way: helper scripts, the commands that start
//! them, and `openssl s_server`/`s_client` with the test's exported SVID. A script that only
//! one test needs stays in that test, next to the assertions that read its output.

use std::ffi::OsStr;
use std::fs;
use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{http_server, Harness, Run, PYTHON};

/// The SVID files [`Harness::svid_files`] exports: (certificate, key, bundle).
pub type SvidFiles = (PathBuf, PathBuf, PathBuf);

impl Harness {
    /// Compile the C program `src` (written to the scratch directory as NAME.c) with gcc and
    /// `libs` (e.g. `-lpthread`); returns the executable's path. Panics with gcc's output if
    /// it fails (`hint` says what to install).
    pub fn build_c(&self, name: &str, src: &str, libs: &[&str], hint: &str) -> PathBuf {
        let file = self.script(&format!("{name}.c"), src);
        let prog = self.path(name);
        let mut cc = Command::new("gcc");
        cc.arg("-o").arg(&prog).arg(&file).args(libs);
        let built = self.run("gcc", self.plain(&mut cc), Duration::from_secs(60));
        assert!(built.success(), "cannot build {name} ({hint}): {built}");
        prog
    }

    /// `python3 FILE` (arguments to follow), with `body` written to the scratch directory as FILE.
    pub fn python(&self, file: &str, body: &str) -> Command {
        let mut c = Command::new(PYTHON);
        c.arg(self.script(file, body));
        c
    }

    /// Runs a shimmed `python3 FILE ARGS...` named `name` to completion (killed after `timeout`),
    /// with `body` written as FILE.
    pub fn run_python(&self, name: &str, file: &str, body: &str, args: &[&dyn AsRef<OsStr>], timeout: Duration) -> Run {
        let mut c = self.python(file, body);
        c.args(args);
        self.run(name, self.shim(&mut c, name), timeout)
    }

    /// A shimmed `python3 -m http.server` named `name` on `port` serving `www/index.html` with
    /// `index` as its content; returns its pid once it listens.
    pub fn serve_http(&mut self, name: &str, port: u16, index: &str) -> u32 {
        let www = self.www(index);
        self.spawn_server(name, self.shim(&mut http_server(port, &www), name), port)
    }

    /// A shimmed `python3 FILE PORT ARGS...` named `name`, with `body` written as FILE; returns
    /// its pid once it listens on `port`.
    pub fn serve_python(&mut self, name: &str, port: u16, file: &str, body: &str, args: &[&str]) -> u32 {
        let mut c = self.python(file, body);
        c.arg(port.to_string()).args(args);
        self.spawn_server(name, self.shim(&mut c, name), port)
    }
}

/// `python3 scripts/py/echo_server.py PORT`: a threaded echo server on 127.0.0.1 (as a command).
pub fn echo_server(port: u16) -> Command {
    let mut c = Command::new(PYTHON);
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/py/echo_server.py")).arg(port.to_string());
    c
}

/// `aserver.py PORT`: an asyncio echo server on 127.0.0.1 (non-blocking accept, epoll
/// readiness), backlog 256.
pub const PY_ASYNCIO_ECHO_SERVER: &str = r#"
import asyncio, sys
async def handle(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                break
            w.write(d)
            await w.drain()
    finally:
        w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=256)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"#;

/// `e2e.py`, the helpers test scripts share: [`Harness::script`] writes it next to every script,
/// so a script can `from e2e import listener, http_get`.
pub const PY_E2E_MODULE: &str = r#"
import socket
def listener(port, backlog):
    """A socket listening on 127.0.0.1:PORT with `backlog`, SO_REUSEADDR set."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(backlog)
    return ls
def read_to_eof(s):
    """Everything `s` receives (65536 bytes a recv) until the peer ends the stream."""
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            return data
        data += d
def http_get(s, path="/", headers=""):
    """Sends `GET PATH HTTP/1.0` with `Host: t` and `headers` ("Name: value\r\n" lines) in one
    sendall, and returns the whole response (read to EOF)."""
    s.sendall(("GET %s HTTP/1.0\r\nHost: t\r\n%s\r\n" % (path, headers)).encode())
    return read_to_eof(s)
def status_line(response):
    """The first line of an HTTP response, as text."""
    return response.split(b"\r\n", 1)[0].decode("latin1")
"#;

/// `marker_client.py PORT MARKER`: connects, sends MARKER, reads as many bytes back (an echo
/// server's answer) and prints `served_in_ms=N echo_ok`, or `echo_bad` and what came back.
pub const PY_MARKER_CLIENT: &str = r#"
import socket, sys, time
port, m = int(sys.argv[1]), sys.argv[2].encode()
t = time.monotonic()
s = socket.create_connection(("127.0.0.1", port), timeout=20)
s.sendall(m)
got = b""
while len(got) < len(m):
    d = s.recv(65536)
    if not d:
        break
    got += d
took = time.monotonic() - t
print("served_in_ms=%d %s" % (took * 1000, "echo_ok" if got == m else "echo_bad %r" % got), flush=True)
"#;

/// `read_to_end.py PORT [REQUEST]`: connects, sends REQUEST if given, reads until the stream
/// ends, and prints `bytes=N` and how it ended: `end=eof`, `end=timeout` or `end=errno_NAME`.
pub const PY_READ_TO_END: &str = r#"
import errno, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
if len(sys.argv) > 2:
    s.sendall(sys.argv[2].encode())
n, end = 0, "eof"
try:
    while True:
        d = s.recv(65536)
        if not d:
            break
        n += len(d)
except socket.timeout:
    end = "timeout"
except OSError as e:
    end = "errno_" + errno.errorcode.get(e.errno, str(e.errno))
print("bytes=%d" % n)
print("end=" + end)
"#;

/// `openssl s_server` on `port` presenting `svid` and requiring a client certificate that
/// chains to its bundle (TLS 1.3 only), plus `extra` arguments. Not under the shim.
pub fn openssl_s_server(svid: &SvidFiles, port: u16, extra: &[&str]) -> Command {
    let mut c = Command::new("openssl");
    c.args(["s_server", "-Verify", "1", "-verify_return_error", "-tls1_3"]).args(extra);
    presenting(&mut c, svid).args(["-accept", &port.to_string()]);
    c
}

/// `openssl s_client` (not under the shim, TLS 1.3 only, verifying the server against the
/// bundle) presenting `svid`, plus `extra` arguments: connects to 127.0.0.1:`port`, sends
/// `request` and reads until its input ends (until the server ends the stream, with `-ign_eof`).
pub fn openssl_s_client(h: &Harness, svid: &SvidFiles, port: u16, extra: &[&str], request: &str) -> Run {
    let req = h.path("request.txt");
    fs::write(&req, request).unwrap();
    let mut client = Command::new("openssl");
    client.args(["s_client", "-quiet", "-verify_return_error", "-tls1_3"]).args(extra);
    presenting(&mut client, svid).args(["-connect", &format!("127.0.0.1:{port}")]);
    let stdin = Stdio::from(fs::File::open(&req).unwrap());
    h.run_with_stdin("s_client", h.plain(&mut client), Duration::from_secs(30), stdin)
}

/// openssl's `-CAfile BUNDLE -cert CERT -key KEY` for `svid`.
pub fn presenting<'c>(c: &'c mut Command, (cert, key, bundle): &SvidFiles) -> &'c mut Command {
    c.arg("-CAfile").arg(bundle).arg("-cert").arg(cert).arg("-key").arg(key)
}

/// The first TLS record a real client sends: a ClientHello from `openssl s_client`, to send by
/// hand over a plain socket (a hostile or a late client).
pub fn real_client_hello() -> Vec<u8> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut client = Command::new("openssl")
        .args(["s_client", "-tls1_3", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 5];
    s.read_exact(&mut buf).unwrap();
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    buf.resize(5 + len, 0);
    s.read_exact(&mut buf[5..]).unwrap();
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(buf[0], 0x16);
    buf
}

/// The server dropped us: a read ends with EOF or a reset; data or a hang panics.
pub fn wait_dropped(s: &mut TcpStream, what: &str, limit: Duration) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: the protected server sent {n} bytes to a hostile client"),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe) => {}
        Err(e) => panic!("{what}: not dropped within {limit:?}: {e}"),
    }
}
