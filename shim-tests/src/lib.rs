//! Helpers for the end-to-end tests: real programs under `libtether.so` against a real
//! `tetherd`, one broker and one scratch directory per test.
//!
//! Each test builds a [`Harness`]: it writes a tetherd config with the test's own ports, starts
//! tetherd on a private socket, and owns every child it starts. Children run in their own
//! process group, and dropping the harness kills each group with SIGKILL (so forking servers
//! such as nginx leave nothing behind), even when the test panics. On a failure the scratch
//! directory is kept and its path printed, so the shim and tetherd logs can be read.
//!
//! Where the issue 3 acceptance cases live: `transfer.rs` (1 curl/python, 5 nginx, 6 redis),
//! `refusal.rs` (2 ClientHello to nc, 3 plain client, 4 allow lists, 11 TETHER_MODE=ktls, and
//! the rest of the errno mapping), `interop.rs` (7 openssl both ways, plus KeyUpdate),
//! `process.rs` (8 fork, 9 200 concurrent), `hostile.rs` (10), `exports.rs` (12), and
//! `semantics.rs` (what a program must not notice: sendfile/half-close, addresses, exec,
//! sockopts and dups, asyncio, pass-through, logging, leaks, first-request latency), and for
//! issue 9 `leaks.rs` (every way a connection starts: stale fds, Fast Open, MPTCP, sockaddr
//! lengths, a panic after connect) and `integrity.rs` (truncation, close_notify, control records
//! in a program's cmsg buffer). [`wire`] proves protection on the wire.
//! [`programs`] holds the scripts and commands several tests run the same way (an echo server,
//! a marker client, a read-to-end reader, `openssl s_server`/`s_client` with the test's SVID,
//! [`Harness::run_python`], and `e2e.py`, the Python helpers every test script can import).
//! [`procfs`] reads what the kernel says about a server under test (thread wake-ups, TCP fds,
//! epoll registrations).
//! Run them with `scripts/test-e2e [--host|--uml|--all]`.
//!
//! Environment knobs (all optional):
//! - `TETHER_E2E_SIZE_PCT`: scale the large test files (default 100; the UML runner uses less,
//!   as kTLS crypto there is generic C at about 25 MB/s).
//! - `TETHER_E2E_KEEP=1`: keep scratch directories even when the test passes.
//! - `TETHER_IN_UML=1` (set by `scripts/ktls-vm`): expect kTLS rather than the userspace relay.

#![allow(clippy::unwrap_used)] // reason: test helpers; a panic is the failure report

pub mod fixed_ktls;
pub mod memscan;
pub mod procfs;
pub mod programs;
pub mod svid_dir;
pub mod wire;

pub use programs::{
    echo_server, openssl_s_client, openssl_s_server, real_client_hello, wait_dropped, SvidFiles, PY_ASYNCIO_ECHO_SERVER,
    PY_MARKER_CLIENT, PY_READ_TO_END,
};

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The interpreter used for helper scripts and `http.server` (not a pyenv shim: its SPIFFE ID
/// must be the real executable's).
pub const PYTHON: &str = "/usr/bin/python3";

/// The trust domain of every test broker.
pub const TRUST_DOMAIN: &str = "tether.internal";

/// A pattern that allows every identity in the test trust domain.
pub const ANY_ID: &str = "spiffe://tether.internal/*";

// ---------------------------------------------------------------------------------------------
// Locations and environment

/// The cargo target profile directory (`target/debug`) holding the binaries under test. Found
/// from this test binary's own path (`target/debug/deps/NAME`), so it also works in UML.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TETHER_E2E_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    deps.parent().unwrap().to_path_buf()
}

/// Absolute path of `libtether.so`.
pub fn shim_path() -> PathBuf {
    let p = bin_dir().join("libtether.so");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace`",
        p.display()
    );
    p
}

/// Absolute path of `tetherd`.
pub fn tetherd_path() -> PathBuf {
    bin_dir().join("tetherd")
}

/// Absolute path of the `tether` CLI.
pub fn tether_cli_path() -> PathBuf {
    bin_dir().join("tether")
}

/// True inside `scripts/ktls-vm` (kTLS available).
pub fn in_uml() -> bool {
    std::env::var("TETHER_IN_UML").is_ok_and(|v| v == "1")
}

/// Does this kernel rekey kTLS after a KeyUpdate (Linux >= 6.14)?
pub fn kernel_can_rekey_ktls() -> bool {
    let rel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (6, 14)
}

/// The mode every allowed connection must log here: `ktls` in UML, `userspace` on the host.
pub fn expected_mode() -> &'static str {
    if in_uml() {
        "ktls"
    } else {
        "userspace"
    }
}

/// `mb` megabytes scaled by `TETHER_E2E_SIZE_PCT` (at least 1 MiB).
pub fn scaled_bytes(mb: u64) -> u64 {
    let pct: u64 = std::env::var("TETHER_E2E_SIZE_PCT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    (mb * pct / 100).max(1) * 1024 * 1024
}

/// The SPIFFE ID tetherd derives (`unmatched = "derive"`) for this uid running `exe`: its
/// canonical path, exactly (tetherd derives none for a path outside `[a-zA-Z0-9._-]` segments).
pub fn derived_id(exe: &str) -> String {
    let real = fs::canonicalize(exe).unwrap_or_else(|e| panic!("canonicalize {exe}: {e}"));
    let real = real.to_str().unwrap();
    assert!(
        real.split('/').all(|seg| seg.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))),
        "{real}: tetherd derives no ID for this path"
    );
    format!("spiffe://{TRUST_DOMAIN}/uid/{}/exe{real}", current_uid())
}

fn current_uid() -> u32 {
    // /proc/self/status avoids an unsafe libc::getuid call.
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Ports

/// A loopback port that was free a moment ago and that no other test in this process got.
pub fn free_port() -> u16 {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let taken = TAKEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if taken.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Whether some socket listens on TCP `port` (read from /proc/net/tcp{,6}, so the check never
/// opens a connection that a protected server would log as a hostile client).
pub fn is_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
    })
}

// ---------------------------------------------------------------------------------------------
// Policy

/// Builder for the policy part of a tetherd config.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    toml: String,
    /// `unmatched = ...`; "derive" unless set.
    unmatched: Option<&'static str>,
    /// `None`: [`TRUST_DOMAIN`].
    trust_domain: Option<String>,
    /// `key_custody = ...`; tetherd's default unless set.
    key_custody: Option<&'static str>,
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Policy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Protect the local listening `port`, accepting clients matching `allow`.
    pub fn inbound(mut self, port: u16, allow: &[&str]) -> Self {
        let _ = write!(
            self.toml,
            "\n[[inbound]]\nports = [{port}]\nallow = [{}]\n",
            quoted_list(allow)
        );
        self
    }

    /// Protect connections to 127.0.0.1:`port`, accepting servers matching `allow`.
    pub fn outbound(mut self, port: u16, allow: &[&str]) -> Self {
        let _ = write!(
            self.toml,
            "\n[[outbound]]\nto = [\"127.0.0.1/32:{port}\"]\nallow = [{}]\n",
            quoted_list(allow)
        );
        self
    }

    /// `unmatched = "deny"` or `"derive"` (the default here).
    pub fn unmatched(mut self, value: &'static str) -> Self {
        self.unmatched = Some(value);
        self
    }

    /// `key_custody = "broker"` or `"process"`.
    pub fn key_custody(mut self, value: &'static str) -> Self {
        self.key_custody = Some(value);
        self
    }

    /// Serve trust domain `td` instead of [`TRUST_DOMAIN`] (fleet tests: another trust domain).
    pub fn trust_domain(mut self, td: &str) -> Self {
        self.trust_domain = Some(td.to_owned());
        self
    }

    /// Append raw TOML (rules with a `mode`, `default = "deny"`, ...).
    pub fn raw(mut self, toml: &str) -> Self {
        self.toml.push('\n');
        self.toml.push_str(toml);
        self.toml.push('\n');
        self
    }

    /// The whole tetherd config this policy produces (for rewriting it before a reload).
    pub fn to_config(&self) -> String {
        self.config()
    }

    /// Both directions on `port`, allowing the whole trust domain: the common case.
    pub fn both(self, port: u16) -> Self {
        self.inbound(port, &[ANY_ID]).outbound(port, &[ANY_ID])
    }

    fn config(&self) -> String {
        let custody = self.key_custody.map(|c| format!("key_custody = \"{c}\"\n")).unwrap_or_default();
        format!(
            "trust_domain = \"{}\"\nunmatched = \"{}\"\n{custody}{}",
            self.trust_domain.as_deref().unwrap_or(TRUST_DOMAIN),
            self.unmatched.unwrap_or("derive"),
            self.toml
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One test's world: scratch directory, tetherd, and children. Drop kills everything.
#[derive(Debug)]
pub struct Harness {
    dir: PathBuf,
    socket: PathBuf,
    broker_log: PathBuf,
    broker: Option<Child>,
    children: Vec<Child>,
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Run {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status={:?} timed_out={}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.timed_out, self.stdout, self.stderr
        )
    }
}

impl Harness {
    /// A scratch directory and a running tetherd serving `policy`.
    pub fn new(name: &str, policy: Policy) -> Self {
        let base = std::env::var_os("TETHER_E2E_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "tether-e2e-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("logs")).unwrap();
        let socket = dir.join("tetherd.sock");
        let broker_log = dir.join("logs/tetherd.log");
        let mut h = Harness {
            dir,
            socket,
            broker_log,
            broker: None,
            children: Vec::new(),
        };
        h.start_broker(&policy);
        h
    }

    fn start_broker(&mut self, policy: &Policy) {
        let cfg = self.dir.join("tetherd.toml");
        fs::write(&cfg, policy.config()).unwrap();
        let log = fs::File::create(&self.broker_log).unwrap();
        let mut cmd = Command::new(tetherd_path());
        cmd.arg("--config")
            .arg(&cfg)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env_remove("LD_PRELOAD")
            .env_remove("TETHER_LOG")
            .env_remove("TETHERD_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", tetherd_path().display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "tetherd exited with {st}:\n{}",
                    fs::read_to_string(&self.broker_log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tetherd did not create {}",
                self.socket.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
        self.broker = Some(child);
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A document root `www/` holding `index.html` with `index` as its content.
    pub fn www(&self, index: &str) -> PathBuf {
        let d = self.dir.join("www");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("index.html"), index).unwrap();
        d
    }

    /// A path inside the scratch directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// tetherd's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The shim log file of the program named `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.tether.log"))
    }

    /// tetherd's log so far.
    pub fn broker_log(&self) -> String {
        fs::read_to_string(&self.broker_log).unwrap_or_default()
    }

    /// Put `cmd` under the shim, logging to [`log_path`](Self::log_path)`(name)`. Mode and
    /// timeout come from the shim's defaults unless the caller sets them.
    pub fn shim<'c>(&self, cmd: &'c mut Command, name: &str) -> &'c mut Command {
        cmd.env("LD_PRELOAD", shim_path())
            .env("TETHER_SOCKET", &self.socket)
            .env("TETHER_LOG", self.log_path(name))
    }

    /// A plain command (not under the shim, whatever the test process environment says).
    pub fn plain<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env_remove("LD_PRELOAD")
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_MODE")
    }

    /// Start a long-running child; output goes to `logs/NAME.out` / `.err`. Killed on drop.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command) -> u32 {
        let child = self.spawn_child(name, cmd, Stdio::piped());
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// [`spawn`](Self::spawn), keeping a pipe to the child's stdin.
    pub fn spawn_with_stdin(&mut self, name: &str, cmd: &mut Command) -> std::process::ChildStdin {
        let mut child = self.spawn_child(name, cmd, Stdio::piped());
        let stdin = child.stdin.take().unwrap();
        self.children.push(child);
        stdin
    }

    /// Wait up to `timeout` for the stdout of spawned child `name` to satisfy `pred`; returns
    /// the stdout at that point.
    pub fn wait_stdout(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = fs::read_to_string(self.dir.join("logs").join(format!("{name}.out")))
                .unwrap_or_default();
            if pred(&out) || Instant::now() >= deadline {
                return out;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn_child(&self, name: &str, cmd: &mut Command, stdin: Stdio) -> Child {
        let out = fs::File::create(self.dir.join("logs").join(format!("{name}.out"))).unwrap();
        let err = fs::File::create(self.dir.join("logs").join(format!("{name}.err"))).unwrap();
        cmd.stdin(stdin).stdout(out).stderr(err).process_group(0);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"))
    }

    /// Start a server and wait until it listens on `port`.
    pub fn spawn_server(&mut self, name: &str, cmd: &mut Command, port: u16) -> u32 {
        let pid = self.spawn(name, cmd);
        self.wait_listening(name, port);
        pid
    }

    /// Wait up to 20 s until the child spawned last (named `name`) listens on `port`; panics with
    /// its output if it exits first or does not listen in time.
    pub fn wait_listening(&mut self, name: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_listening(port) {
            let idx = self.children.len() - 1;
            if let Some(st) = self.children[idx].try_wait().unwrap() {
                panic!(
                    "{name} exited with {st} before listening on {port}:\n{}",
                    self.output(name)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen on {port}:\n{}",
                self.output(name)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// stdout and stderr of a spawned child so far.
    pub fn output(&self, name: &str) -> String {
        let rd = |ext: &str| {
            fs::read_to_string(self.dir.join("logs").join(format!("{name}.{ext}")))
                .unwrap_or_default()
        };
        format!(
            "--- {name} stdout\n{}\n--- {name} stderr\n{}",
            rd("out"),
            rd("err")
        )
    }

    /// Run a command to completion, killing its process group after `timeout`.
    pub fn run(&self, name: &str, cmd: &mut Command, timeout: Duration) -> Run {
        self.run_with_stdin(name, cmd, timeout, Stdio::null())
    }

    /// [`run`](Self::run) with stdin read from a file.
    pub fn run_with_stdin(
        &self,
        name: &str,
        cmd: &mut Command,
        timeout: Duration,
        stdin: Stdio,
    ) -> Run {
        let mut child = self.spawn_child(name, cmd, stdin);
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                timed_out = true;
                kill_group(&mut child);
                break None;
            }
            thread::sleep(Duration::from_millis(10));
        };
        // Children of the command (if any) go with it.
        kill_group(&mut child);
        let rd = |ext: &str| {
            fs::read_to_string(self.dir.join("logs").join(format!("{name}.{ext}")))
                .unwrap_or_default()
        };
        Run {
            status,
            stdout: rd("out"),
            stderr: rd("err"),
            timed_out,
        }
    }

    /// The parsed shim log lines of program `name`.
    pub fn log_lines(&self, name: &str) -> Vec<LogLine> {
        read_log(&self.log_path(name))
    }

    /// Write a helper script into the scratch directory and return its path. The shared
    /// [`PY_E2E_MODULE`](programs::PY_E2E_MODULE) goes next to it as `e2e.py`.
    pub fn script(&self, file: &str, body: &str) -> PathBuf {
        fs::write(self.dir.join("e2e.py"), programs::PY_E2E_MODULE).unwrap();
        let p = self.dir.join(file);
        fs::write(&p, body).unwrap();
        p
    }

    /// Wait up to `timeout` for `pred` over the shim log of `name`.
    pub fn wait_log(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&[LogLine]) -> bool,
    ) -> Vec<LogLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines(name);
            if pred(&lines) || Instant::now() >= deadline {
                return lines;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start tetherd again after [`Harness::stop_broker`], with the same state (CA) and
    /// socket path, and wait until it answers.
    pub fn restart_broker(&mut self, policy: &Policy) {
        self.start_broker(policy);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "tetherd did not come back");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// `tether svid --out DIR` for the test process (not under the shim): the files
    /// `(svid.pem, svid.key, bundle.pem)` a non-tether peer (openssl) presents and trusts.
    pub fn svid_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self.path("svid");
        let mut cmd = Command::new(tether_cli_path());
        cmd.arg("svid").arg("--out").arg(&dir).env("TETHER_SOCKET", self.socket());
        let run = self.run("tether-svid", self.plain(&mut cmd), Duration::from_secs(20));
        assert!(run.success(), "tether svid --out failed: {run}");
        (dir.join("svid.pem"), dir.join("svid.key"), dir.join("bundle.pem"))
    }

    /// tetherd's pid (None when stopped).
    pub fn broker_pid(&self) -> Option<u32> {
        self.broker.as_ref().map(Child::id)
    }

    /// Stop tetherd (to test what the shim does without it).
    pub fn stop_broker(&mut self) {
        if let Some(mut b) = self.broker.take() {
            kill_group(&mut b);
        }
    }

    /// Kill the children now (before reading final logs, for example).
    pub fn kill_children(&mut self) {
        for c in &mut self.children {
            kill_group(c);
        }
        self.children.clear();
    }
}

fn kill_group(child: &mut Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on a process group we created (process_group(0)); a stale pgid
    // only yields ESRCH.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_children();
        if let Some(mut b) = self.broker.take() {
            kill_group(&mut b);
        }
        let keep = std::env::var("TETHER_E2E_KEEP").is_ok_and(|v| v == "1");
        if thread::panicking() || keep {
            eprintln!("kept scratch directory {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shim log lines

/// One `tether: key=value ...` line of the shim's connection log.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub raw: String,
    pub fields: BTreeMap<String, String>,
}

impl LogLine {
    /// Parse a logfmt line starting with `tether: `; other lines give None.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("tether: ")?;
        let mut fields = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.peek() == Some(&' ') {
                chars.next();
            }
            let mut key = String::new();
            while let Some(&c) = chars.peek() {
                if c == '=' || c == ' ' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            if key.is_empty() {
                break;
            }
            let mut val = String::new();
            if chars.peek() == Some(&'=') {
                chars.next();
                if chars.peek() == Some(&'"') {
                    chars.next();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(o) => val.push(o),
                                None => break,
                            },
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                } else {
                    while let Some(&c) = chars.peek() {
                        if c == ' ' {
                            break;
                        }
                        val.push(c);
                        chars.next();
                    }
                }
            }
            fields.insert(key, val);
        }
        Some(LogLine {
            raw: line.to_string(),
            fields,
        })
    }

    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }

    pub fn is(&self, event: &str, decision: &str) -> bool {
        self.get("event") == event && self.get("decision") == decision
    }
}

/// All shim log lines in `text` (other lines, such as a program's own stderr, are skipped).
pub fn parse_log(text: &str) -> Vec<LogLine> {
    text.lines().filter_map(LogLine::parse).collect()
}

/// The shim log lines in the file at `path` (none if it does not exist).
pub fn read_log(path: &Path) -> Vec<LogLine> {
    parse_log(&fs::read_to_string(path).unwrap_or_default())
}

/// The first line with this event and decision, or a panic that shows all of `lines`.
pub fn expect_line<'a>(lines: &'a [LogLine], event: &str, decision: &str) -> &'a LogLine {
    lines
        .iter()
        .find(|l| l.is(event, decision))
        .unwrap_or_else(|| {
            panic!(
                "no `event={event} decision={decision}` line:\n{}",
                show(lines)
            )
        })
}

/// Render lines for an assertion message.
pub fn show(lines: &[LogLine]) -> String {
    if lines.is_empty() {
        return "(no shim log lines)".into();
    }
    lines
        .iter()
        .map(|l| l.raw.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Data path check: userspace on the host, kTLS (with rising /proc/net/tls_stat) in UML

/// Counters from `/proc/net/tls_stat` (empty when the kernel has no kTLS).
#[derive(Debug, Clone, Default)]
pub struct TlsStat(BTreeMap<String, u64>);

impl TlsStat {
    pub fn read() -> Self {
        let text = fs::read_to_string("/proc/net/tls_stat").unwrap_or_default();
        TlsStat(
            text.lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    Some((it.next()?.to_string(), it.next()?.parse().ok()?))
                })
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }
}

/// Taken before a test's traffic; [`finish`](Self::finish) checks which data path carried it
/// and what crossed the wire.
#[derive(Debug)]
pub struct DataPathCheck {
    before: TlsStat,
    capture: wire::Capture,
}

impl DataPathCheck {
    /// Start watching: kTLS counters, and a capture on lo of TCP `port` (the protected port the
    /// test's traffic goes to).
    pub fn begin(h: &Harness, port: u16) -> Self {
        DataPathCheck {
            before: TlsStat::read(),
            capture: wire::Capture::start(h.dir(), port),
        }
    }

    /// The wire carried TLS only (every byte of every flow on the port is inside a TLS record,
    /// with application-data records present); every `decision=allow` line in `lines` (at
    /// least one) names the expected mode; in UML, the kTLS software TX and RX counters rose.
    /// (Counters are per network namespace: `scripts/test-e2e --uml` runs one test at a time
    /// so that the rise is this test's own.) The wire check is what proves protection; the log
    /// and counters only say which path carried it.
    pub fn finish(self, lines: &[LogLine]) {
        self.finish_with_markers(lines, &[]);
    }

    /// [`finish`](Self::finish), and none of `markers` (the test's plaintext) is on the wire.
    pub fn finish_with_markers(self, lines: &[LogLine], markers: &[&[u8]]) {
        let wire = self.capture.finish();
        wire.assert_protected(markers);
        let allowed: Vec<&LogLine> = lines
            .iter()
            .filter(|l| l.get("decision") == "allow")
            .collect();
        assert!(
            !allowed.is_empty(),
            "no allowed protected connection was logged:\n{}",
            show(lines)
        );
        for l in &allowed {
            assert_eq!(
                l.get("mode"),
                expected_mode(),
                "wrong data path in: {}",
                l.raw
            );
        }
        if in_uml() {
            let after = TlsStat::read();
            for k in ["TlsTxSw", "TlsRxSw"] {
                assert!(
                    after.get(k) > self.before.get(k),
                    "{k} did not rise ({} -> {}): kTLS did not carry the data",
                    self.before.get(k),
                    after.get(k)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files

/// Write `len` pseudo-random bytes (xorshift; incompressible enough for transfer tests).
pub fn write_random_file(path: &Path, len: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ len ^ u64::from(std::process::id());
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// `key=value` lines of a helper's stdout (the first `=` splits).
pub fn kv(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// SHA-256 of a file, via `sha256sum`.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A python3 client used by several tests. `client.py PORT [--get] [--ktls-expected]`:
/// connects to 127.0.0.1:PORT, prints `connect_errno=NAME` (exit 3) or `connected`; with
/// `--get` sends an HTTP/1.0 GET and prints `status=<first line>` or `recv_errno=NAME`.
pub const PY_CLIENT: &str = r#"
import errno, socket, sys
port = int(sys.argv[1])
s = socket.socket()
try:
    s.connect(("127.0.0.1", port))
except OSError as e:
    print("connect_errno=" + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
    sys.exit(3)
print("connected", flush=True)
if "--get" in sys.argv:
    s.settimeout(30)
    data = b""
    try:
        s.sendall(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    except OSError as e:
        print("recv_errno=" + errno.errorcode.get(e.errno or 0, str(e)), flush=True)
    print("status=" + data.split(b"\r\n", 1)[0].decode("latin1"), flush=True)
    print("bytes=%d" % len(data), flush=True)
s.close()
"#;

/// `python3 -m http.server PORT --bind 127.0.0.1 --directory DIR` as a command.
pub fn http_server(port: u16, dir: &Path) -> Command {
    let mut c = Command::new(PYTHON);
    c.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
    ])
    .arg(dir);
    c
}

/// `curl` fetching `url` into `out`, failing on HTTP errors, bounded in time.
pub fn curl_get(url: &str, out: &Path) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail", "--max-time", "120", "-o"])
        .arg(out)
        .arg(url);
    c
}

/// `curl -i` (headers, then body, on stdout) getting `url`, giving up after `max_secs` seconds.
pub fn curl_with_headers(url: &str, max_secs: u32) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "-i", "--max-time", &max_secs.to_string(), url]);
    c
}

/// An nginx command (epoll, one worker, `sendfile on`, everything under `PREFIX = h.path("nginx")`)
/// serving `PREFIX/www` on 127.0.0.1:`port`. Returns the command and the prefix.
pub fn nginx(h: &Harness, port: u16) -> (Command, PathBuf) {
    let prefix = h.path("nginx");
    fs::create_dir_all(prefix.join("www")).unwrap();
    fs::create_dir_all(prefix.join("tmp")).unwrap();
    let p = prefix.display();
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/error.log info;\n\
         events {{ worker_connections 512; use epoll; }}\n\
         http {{\n  access_log {p}/access.log;\n  sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n\
         client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n  fastcgi_temp_path {p}/tmp/fastcgi;\n\
         uwsgi_temp_path {p}/tmp/uwsgi;\n  scgi_temp_path {p}/tmp/scgi;\n\
         server {{ listen 127.0.0.1:{port}; root {p}/www; }}\n}}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let mut c = Command::new("nginx");
    c.arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path);
    (c, prefix)
}
