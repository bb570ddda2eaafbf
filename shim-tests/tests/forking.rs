//! Issue 9 (fork, vfork): a fork with a finished inbound handshake waiting, the parent's broker
//! connection in a fork child, CPython's vfork-based subprocess next to a protected
//! connection, and postgres (fork per connection) under pgbench -C, all under tether; issue 14:
//! a fork between two parked silent connections (the silent watcher's epoll set is shared).

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_shim_tests::wire::Observer;
use tether_shim_tests::{
    echo_server, free_port, in_uml, real_client_hello, show, DataPathCheck, Harness, Policy, ANY_ID, PY_MARKER_CLIENT,
};

/// A server that forks while a protected connection whose handshake has finished waits in the
/// shim's pool (the program has not accepted it yet). The child must not hang in the fork
/// handlers; the parent then accepts and echoes. The child also lists the sockets it inherited
/// that are connected to tetherd (the parent's report connection must not be among them).
const PY_FORK_SERVER: &str = r#"
import os, select, socket, sys, time
port, broker = int(sys.argv[1]), sys.argv[2]
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port)); l.listen(16); l.setblocking(False)
print("listening", flush=True)
select.select([l], [], [], 20)
try:
    l.accept(); print("raced: the handshake finished inside accept", flush=True); sys.exit(2)
except BlockingIOError:
    pass
time.sleep(1.0)   # the handshake finishes on a tether thread; the connection waits, ready
def broker_sockets():
    n = 0
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family == socket.AF_UNIX and s.getpeername() == broker:
                n += 1
        except OSError:
            pass
        s.close()
    return n
print("parent_broker_sockets=%d" % broker_sockets(), flush=True)
pid = os.fork()
if pid == 0:
    print("child_broker_sockets=%d" % broker_sockets(), flush=True)
    os._exit(0)
deadline = time.time() + 5
while time.time() < deadline:
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child_status=%d" % st, flush=True)
        break
    time.sleep(0.02)
else:
    print("child hung in fork", flush=True); os.kill(pid, 9); sys.exit(3)
l.setblocking(True)
c, _ = l.accept()
c.settimeout(10)
data = c.recv(100)
c.sendall(data)
c.close()
print("served", flush=True)
"#;

#[test]
fn fork_with_a_finished_inbound_handshake_waiting_does_not_hang_the_child() {
    let port = free_port();
    let mut h = Harness::new("fork-ready", Policy::new().both(port));
    let mut server = h.python("fork_server.py", PY_FORK_SERVER);
    server.arg(port.to_string()).arg(h.socket());
    // The state under test is a finished handshake waiting in the pool for the program: with
    // inline handshakes the server's accept would finish this fast client itself instead.
    server.env("TETHER_INLINE_ACCEPT", "0");
    h.spawn_server("server", h.shim(&mut server, "server"), port);
    let check = DataPathCheck::begin(&h, port);
    let marker = "FORK-READY-MARKER-4711";
    // Connects once, sends `marker`, expects it back.
    let mut client = h.python("echo_client.py", PY_MARKER_CLIENT);
    client.arg(port.to_string()).arg(marker);
    let run = h.run("client", h.shim(&mut client, "client"), Duration::from_secs(30));
    let out = h.wait_stdout("server", Duration::from_secs(15), |o| o.contains("served") || o.contains("hung") || o.contains("raced"));
    assert!(run.success() && run.stdout.contains("echo_ok"), "client: {run}\n{}", h.output("server"));
    assert!(out.contains("child_status=0") && out.contains("served"), "server:\n{}\n{}", h.output("server"), show(&h.log_lines("server")));
    assert!(out.contains("child_broker_sockets=0"), "the fork child kept the parent's broker connection:\n{out}");
    check.finish_with_markers(&h.log_lines("server"), &[marker.as_bytes()]);
}

/// A non-blocking server that parks a silent connection (its accept takes it from the backlog and
/// says EAGAIN), forks on a line from stdin, and whose child parks another on the next line.
const PY_PARK_FORK_SERVER: &str = r#"
import os, socket, sys, time
port = int(sys.argv[1])
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port)); l.listen(16); l.setblocking(False)
print("listening", flush=True)
def park(who):
    try:
        l.accept(); print(who + ": a silent connection was handed out", flush=True); os._exit(2)
    except BlockingIOError:
        print(who + "-parked", flush=True)
sys.stdin.readline(); park("parent")
sys.stdin.readline()
if os.fork() == 0:
    print("child-ready", flush=True)
    sys.stdin.readline(); park("child")
time.sleep(60)
"#;

/// Issue 14: the silent watcher's epoll set is one file shared across fork, so a fork child that
/// took an inherited parked fd out of it (`EPOLL_CTL_DEL`) would remove the parent's registration:
/// the parent's parked connection would go unseen until its first-byte deadline. The parent parks
/// one, forks, the child parks another (in a set of its own); each one's late ClientHello is
/// answered at once, by the process that parked it.
#[test]
fn a_fork_child_leaves_the_parents_parked_connections_watched() {
    let port = free_port();
    let mut h = Harness::new("park-fork", Policy::new().both(port));
    let mut server = h.python("park_fork_server.py", PY_PARK_FORK_SERVER);
    server.arg(port.to_string());
    let mut stdin = h.spawn_with_stdin("server", h.shim(&mut server, "server"));
    h.wait_listening("server", port);
    let hello = real_client_hello();
    let mut step = |line: &str, want: &str| {
        writeln!(stdin, "{line}").unwrap();
        let out = h.wait_stdout("server", Duration::from_secs(20), |o| o.contains(want));
        assert!(out.contains(want), "no {want:?} from the server\n{}", h.output("server"));
    };
    let mut parents = TcpStream::connect(("127.0.0.1", port)).unwrap();
    step("park", "parent-parked");
    step("fork", "child-ready");
    let mut childs = TcpStream::connect(("127.0.0.1", port)).unwrap();
    step("park", "child-parked");
    for (s, whose) in [(&mut parents, "parent"), (&mut childs, "child")] {
        let sent = Instant::now();
        s.write_all(&hello).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut first = [0u8; 1];
        s.read_exact(&mut first).unwrap_or_else(|e| {
            panic!("the {whose}'s parked connection got no answer to its ClientHello: {e}\n{}", show(&h.log_lines("server")))
        });
        let took = sent.elapsed();
        eprintln!("the {whose}'s parked connection: ClientHello answered in {took:?}");
        assert_eq!(first[0], 0x16, "the {whose}'s answer is not a TLS handshake record");
        assert!(took < Duration::from_secs(1), "the {whose}'s parked connection was answered after {took:?}");
    }
}

/// A client holds a protected connection and spawns children with `subprocess` (CPython uses
/// vfork; the child calls close_range and execve through our hooks), then keeps using it. Any
/// process left over from the children (an exec hand-off keeper) is killed first.
const PY_SUBPROCESS_CLIENT: &str = r#"
import os, socket, subprocess, sys
port = int(sys.argv[1])
print("pid=%d use_vfork=%s" % (os.getpid(), getattr(subprocess, "_USE_VFORK", "n/a")), flush=True)
s = socket.create_connection(("127.0.0.1", port), timeout=20)
def rt(m):
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        d = s.recv(65536)
        if not d:
            raise SystemExit("EOF after %d of %d bytes" % (len(got), len(m)))
        got += d
    assert got == m, "echo mismatch"
rt(b"SUBPROCESS-BEFORE-MARKER")
before = s.getpeername()
for i in range(20):
    subprocess.run(["/bin/true"], check=True)
out = subprocess.run(["/bin/echo", "child-ran"], capture_output=True, check=True).stdout
after = s.getpeername()
print("peer_before=%s peer_after=%s child=%s" % (before, after, out.decode().strip()), flush=True)
print("spawned", flush=True)
sys.stdin.readline()
rt(b"SUBPROCESS-AFTER-MARKER" * 500)
print("still_working", flush=True)
"#;

/// Pids of processes (other than `except`) whose environment names `log`.
fn processes_with_env(log: &Path, except: u32) -> Vec<u32> {
    let needle = format!("TETHER_LOG={}", log.display());
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != except)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn python_subprocess_vfork_children_keep_the_protected_connection() {
    let port = free_port();
    let mut h = Harness::new("vfork", Policy::new().both(port));
    h.spawn_server("server", h.shim(&mut echo_server(port), "server"), port);
    let check = DataPathCheck::begin(&h, port);
    let mut client = h.python("subprocess_client.py", PY_SUBPROCESS_CLIENT);
    client.arg(port.to_string());
    let mut stdin = h.spawn_with_stdin("client", h.shim(&mut client, "client"));
    let out = h.wait_stdout("client", Duration::from_secs(30), |o| o.contains("spawned"));
    let pid: u32 = out.split_whitespace().find_map(|w| w.strip_prefix("pid=")?.parse().ok()).unwrap_or(0);
    assert!(out.contains("spawned"), "client:\n{}\n{}", h.output("client"), show(&h.log_lines("client")));
    assert!(out.contains("use_vfork=True"), "CPython does not use vfork here, the test proves nothing:\n{out}");
    let peer = format!("('127.0.0.1', {port})");
    assert!(
        out.contains(&format!("peer_before={peer} peer_after={peer}")),
        "the vfork child changed the parent's fd table (getpeername of the protected fd):\n{out}"
    );
    // Whatever the children left behind (an exec hand-off keeper holding our connection) dies.
    let log = h.log_path("client");
    let leftovers = processes_with_env(&log, pid);
    for p in &leftovers {
        // SAFETY: SIGKILL to a pid this test's client spawned.
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"go\n").unwrap();
    stdin.flush().unwrap();
    let out = h.wait_stdout("client", Duration::from_secs(20), |o| o.contains("still_working") || o.contains("Error") || o.contains("EOF"));
    assert!(
        out.contains("still_working"),
        "the protected connection broke after the vfork children (killed leftovers {leftovers:?}):\n{}\n{}",
        h.output("client"),
        show(&h.log_lines("client"))
    );
    assert!(leftovers.is_empty(), "the vfork children left processes holding our connection: {leftovers:?}");
    check.finish_with_markers(&h.log_lines("client"), &[b"SUBPROCESS-BEFORE-MARKER", b"SUBPROCESS-AFTER-MARKER"]);
}

// ---- postgres under pgbench -C ----------------------------------------------------------

/// The system user the postgresql package creates (postgres refuses to run as root).
const PG_USER: &str = "postgres";

/// The newest installed server's bin directory.
fn pg_bin() -> std::path::PathBuf {
    let mut bins: Vec<_> = fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql is not installed (scripts/test-e2e installs it)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("postgres").exists())
        .collect();
    bins.sort_by_key(|b| b.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()));
    bins.pop().expect("no /usr/lib/postgresql/*/bin/postgres")
}

fn as_pg_user(cmd: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", PG_USER, "--regid", PG_USER, "--clear-groups", "--"]).arg(pg_bin().join(cmd));
    c
}

/// pgbench -i, then `pgbench -C -c 8 -t 200` (a new connection, so a new postgres backend
/// forked by the postmaster, per transaction), both ends under tether; the wire shows TLS only.
/// `TETHER_E2E_PGBENCH_TX` overrides the 200 (UML forks slowly: about 0.7 s per connection).
#[test]
fn pgbench_connect_per_transaction_against_forking_postgres() {
    let port = free_port();
    let mut h = Harness::new("pgbench", Policy::new().both(port));
    let data = h.path("pgdata");
    fs::create_dir_all(&data).unwrap();
    for d in [h.dir(), &h.dir().join("logs"), &data] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let chown = Command::new("chown").arg(format!("{PG_USER}:{PG_USER}")).arg(&data).status().unwrap();
    assert!(chown.success());
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    let mut initdb = as_pg_user("initdb");
    initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions"]);
    let run = h.run("initdb", h.plain(&mut initdb), Duration::from_secs(300));
    assert!(run.success(), "initdb: {run}");
    let log = h.log_path("postgres");
    fs::write(&log, "").unwrap();
    fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
    let mut pg = as_pg_user("postgres");
    pg.arg("-D").arg(&data).args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=40", "-c", "fsync=off"])
        .arg("-c").arg(format!("unix_socket_directories={}", data.display()))
        .args(["-p", &port.to_string()]);
    h.spawn_server("postgres", h.shim(&mut pg, "postgres"), port);

    let check = DataPathCheck::begin(&h, port);
    let pgbench = |h: &Harness, name: &str, args: &[&str], t: Duration| {
        let mut c = Command::new("pgbench");
        c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"]).args(args).arg("postgres");
        let run = h.run(name, h.shim(&mut c, name), t);
        assert!(run.success(), "{name}: {run}\n{}\n{}", show(&h.log_lines(name)), show(&h.log_lines("postgres")));
        run
    };
    let scale = if in_uml() { Duration::from_secs(900) } else { Duration::from_secs(300) };
    pgbench(&h, "pgbench-init", &["-i", "-s", "1"], scale);
    pgbench(&h, "pgbench-C-short", &["-C", "-c", "8", "-t", "10", "-n"], scale);
    let tx: usize = std::env::var("TETHER_E2E_PGBENCH_TX").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let t0 = Instant::now();
    let run = pgbench(&h, "pgbench-C", &["-C", "-c", "8", "-t", &tx.to_string(), "-n"], scale);
    let took = t0.elapsed();
    let want = format!("number of transactions actually processed: {0}/{0}", 8 * tx);
    assert!(run.stdout.contains(&want), "{run}");
    let lines = h.log_lines("postgres");
    // Every connection of pgbench -i and -C, one flow each (client ports come back within
    // seconds under -C; the capture splits connections on a reused port pair by their SYN):
    // only TLS records, and none of the SQL, COPY data or startup packet pgbench sends.
    check.finish_with_markers(&lines, &[b"pgbench_accounts", b"pgbench_branches", b"user\0postgres", b"BEGIN;"]);
    let accepted = lines.iter().filter(|l| l.is("accept", "allow")).count();
    assert!(accepted > 8 * tx + 80, "postgres accepted {accepted} protected connections, expected > {}", 8 * tx + 80);
    let other: Vec<_> = lines.iter().filter(|l| l.get("event") == "accept" && l.get("decision") != "allow").collect();
    assert!(other.is_empty(), "postgres saw other than protected connections: {other:?}");
    eprintln!("pgbench -C -c 8 -t {tx}: {took:?}; {}", run.stdout.lines().filter(|l| l.contains("tps")).collect::<Vec<_>>().join("; "));
}

/// vfork child (the parent suspended, its memory shared): accept4 and accept on a protected
/// inet listener, connect to a protected destination, and accept4 on a Unix listener with a
/// connection queued; it prints each result. Then a `_Fork` child (glibc 2.34+: no fork
/// handlers, as a signal handler should fork) connects and accepts, and the parent accepts on the
/// inet listener.
const C_VFORK_CHILD: &str = r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
static const char *res(int r, int e) {
    if (r >= 0) return "ok";
    return e == EACCES ? "EACCES" : e == EAGAIN ? "EAGAIN" : strerror(e);
}
int main(int argc, char **argv) {
    struct sockaddr_in in = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
    in.sin_addr.s_addr = htonl(0x7f000001);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&in, sizeof in) || listen(l, 8)) { perror("inet listener"); return 1; }
    fcntl(l, F_SETFL, O_NONBLOCK);
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
    to.sin_addr.s_addr = htonl(0x7f000001);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_un un = { .sun_family = AF_UNIX };
    snprintf(un.sun_path + 1, sizeof un.sun_path - 1, "tether-vfork-%d", getpid());
    socklen_t ulen = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(un.sun_path + 1);
    int u = socket(AF_UNIX, SOCK_STREAM, 0), uc = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(u, (struct sockaddr *)&un, ulen) || listen(u, 8) || connect(uc, (struct sockaddr *)&un, ulen)) { perror("unix"); return 1; }
    static char line[256];
    pid_t pid = vfork();
    if (pid == 0) {
        int a = accept4(l, 0, 0, SOCK_CLOEXEC); int ea = errno;
        int b = accept(l, 0, 0); int eb = errno;
        int k = connect(c, (struct sockaddr *)&to, sizeof to); int ek = errno;
        int d = accept4(u, 0, 0, 0); int ed = errno;
        int n = snprintf(line, sizeof line, "child accept4=%s accept=%s connect=%s unix_accept4=%s\n",
                         res(a, ea), res(b, eb), res(k, ek), res(d, ed));
        write(1, line, n);
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    /* _Fork runs no fork handlers: its child is in the same position as a vfork child. */
    int c2 = socket(AF_INET, SOCK_STREAM, 0);
    pid = _Fork();
    if (pid == 0) {
        int k = connect(c2, (struct sockaddr *)&to, sizeof to); int ek = errno;
        int a = accept4(l, 0, 0, 0); int ea = errno;
        int n = snprintf(line, sizeof line, "_Fork child connect=%s accept4=%s\n", res(k, ek), res(a, ea));
        write(1, line, n);
        _exit(0);
    }
    waitpid(pid, &st, 0);
    int p = accept4(l, 0, 0, 0); int ep = errno;
    printf("parent accept4=%s\n", res(p, ep));
    return 0;
}
"#;

/// In a vfork child no handshake can run (it would change its parent's state), so an inet
/// accept or connect there could only be plaintext: each is refused with EACCES and a reason on
/// stderr, and nothing reaches the destination; a Unix-socket accept passes through. A `_Fork`
/// child, whose fork handlers never ran, is treated the same (README: the safe way to fork from
/// a signal handler). The parent then accepts as usual. (The reason was not logged before
/// 2026-12-08.)
#[test]
fn a_vfork_child_is_refused_inet_accepts_and_connects_with_a_reason() {
    let served = free_port();
    let observed = free_port();
    let h = Harness::new("vfork-refusal", Policy::new().inbound(served, &[ANY_ID]).outbound(observed, &[ANY_ID]));
    let obs = Observer::start(observed);
    let prog = h.build_c("vfork_child", C_VFORK_CHILD, &[], "apt-get install gcc");
    let mut c = Command::new(&prog);
    c.args([served.to_string(), observed.to_string()]);
    let run = h.run("program", h.shim(&mut c, "program"), Duration::from_secs(30));
    assert!(run.success(), "{run}\n{}", show(&h.log_lines("program")));
    assert!(
        run.stdout.contains("child accept4=EACCES accept=EACCES connect=EACCES unix_accept4=ok"),
        "the vfork child's calls were not refused (inet) and passed through (unix) as they should: {run}"
    );
    assert!(
        run.stdout.contains("_Fork child connect=EACCES accept4=EACCES"),
        "a _Fork child (no fork handlers ran) was not refused like a vfork child: {run}"
    );
    assert!(run.stdout.contains("parent accept4=EAGAIN"), "the parent's accept after the vfork and the _Fork: {run}");
    assert!(run.stderr.contains("refused a TCP connect/accept in a vfork child"), "no reason logged for the refusal: {run}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(obs.received().is_empty(), "the vfork child's connect reached the destination: {run}");
}
