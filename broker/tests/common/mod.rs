//! Shared test harness: temp dirs, a real tetherd on a temp socket, and the CLI.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tether_broker::client::Client;
use tether_proto::wire::{self, Response, SvidResponse};

pub const TETHERD: &str = env!("CARGO_BIN_EXE_tetherd");
pub const TETHER: &str = env!("CARGO_BIN_EXE_tether");
pub const NOBODY_UID: u32 = 65534;

/// The libtether.so cargo built next to the `tether` binary under test.
pub fn built_lib() -> PathBuf {
    let p = Path::new(TETHER).with_file_name("libtether.so");
    assert!(p.is_file(), "{} missing: build the workspace first (cargo build --workspace)", p.display());
    p
}

/// A directory under /tmp, removed on drop. World-traversable so `nobody` can reach the socket.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A subdirectory owned by `uid`.
    pub fn owned_subdir(&self, name: &str, uid: u32) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running tetherd, killed on drop. Its stderr (the audit log) goes to `log`.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub dir: TempDir,
}

impl Daemon {
    /// Start tetherd with the embedded default config.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(None, extra)
    }

    /// Start tetherd with `config` (TOML text) if given.
    pub fn start_with(config: Option<&str>, extra: &[&str]) -> Self {
        let dir = TempDir::new("d");
        let socket = dir.path().join("run/tetherd.sock");
        let log = dir.path().join("tetherd.log");
        let mut cmd = Command::new(TETHERD);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"));
        if let Some(text) = config {
            let path = dir.path().join("tetherd.toml");
            fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        cmd.args(extra)
            .env("TETHERD_LOG", "info")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let mut d = Self {
            child,
            socket,
            log,
            dir,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tetherd exited early ({status}): {}", self.log_text());
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tetherd did not come up: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(10)).unwrap()
    }

    pub fn fetch(&self) -> SvidResponse {
        self.client().fetch_svid().unwrap()
    }

    /// A connection greeted by tetherd: ready for raw frames.
    pub fn raw(&self) -> UnixStream {
        let mut s = self.raw_ungreeted();
        assert!(wire::io::read_greeting(&mut s).unwrap().is_none(), "tetherd refused the connection");
        s
    }

    /// A connection whose greeting is left unread.
    pub fn raw_ungreeted(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Assert the daemon is alive and still issues.
    pub fn assert_serving(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "tetherd died: {}",
            self.log_text()
        );
        let svid = self.fetch();
        assert!(svid.spiffe_id.as_str().starts_with("spiffe://"));
    }

    /// Run `tether ARGS` as root (None) or through `setpriv` as another user.
    pub fn tether(&self, as_nobody: bool, args: &[&str]) -> Output {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                TETHER,
            ]);
            c
        } else {
            Command::new(TETHER)
        };
        cmd.args(args)
            .env("TETHER_SOCKET", &self.socket)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Python helpers for tests that speak the wire protocol from a script (as another user, or in
/// a namespace): `frame(obj)` encodes a request, `read_frame(sock)` returns `(magic, body)` or
/// None at EOF. Put in front of the script.
pub const PY_FRAMES: &str = r#"
import json, os, socket, struct, sys, time
def frame(obj):
    b = json.dumps(obj).encode()
    return b"TT\x00\x01" + struct.pack(">I", len(b)) + b
def read_frame(s):
    h = b""
    while len(h) < 8:
        c = s.recv(8 - len(h))
        if not c: return None
        h += c
    n = struct.unpack(">I", h[4:8])[0]
    body = b""
    while len(body) < n:
        c = s.recv(n - len(body))
        if not c: return None
        body += c
    return h[:2], body
"#;

/// Read one response frame from a raw stream.
pub fn read_response(s: &mut UnixStream) -> Response {
    let body = wire::io::read_frame(s).unwrap().expect("a response frame");
    wire::decode(&body).unwrap()
}

/// Read to EOF, asserting the daemon closed the connection. Closing a Unix socket with our
/// bytes still unread shows up as ECONNRESET, which counts as closed too.
pub fn assert_closed(s: &mut UnixStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "unexpected trailing bytes: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

pub fn send(s: &mut UnixStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
}
