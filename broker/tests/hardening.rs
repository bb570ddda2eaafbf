//! Attacks on tetherd from local users, each reproduced against a real daemon.
#![allow(clippy::unwrap_used, unsafe_code)]

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::{read_response, send, Daemon, NOBODY_UID};
use tether_proto::wire::{self, ErrorCode, Request, Response};

/// What a forked child read back after sending `frame` on `fd`, as uid/gid `drop_to` if given.
/// The child uses only raw syscalls (the test process is multithreaded), and its result comes
/// back through a pipe.
fn in_forked_child(fd: i32, drop_to: Option<u32>, frame: &[u8]) -> Vec<u8> {
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` is a writable array of two ints.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let mut buf = vec![0u8; wire::MAX_BODY + wire::HEADER_LEN];
    // SAFETY: fork in a test; the child below calls only async-signal-safe functions on
    // memory allocated before the fork, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: raw syscalls on fds and buffers that are valid in the child.
        unsafe {
            if let Some(id) = drop_to {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(id) != 0 || libc::setuid(id) != 0 {
                    libc::_exit(3);
                }
            }
            if libc::write(fd, frame.as_ptr().cast(), frame.len()) != frame.len() as isize {
                libc::_exit(4);
            }
            let mut got = 0usize;
            loop {
                let n = libc::read(fd, buf.as_mut_ptr().add(got).cast(), buf.len() - got);
                if n <= 0 {
                    break;
                }
                got += n as usize;
                if got >= wire::HEADER_LEN {
                    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                    if got >= wire::HEADER_LEN + len {
                        break;
                    }
                }
            }
            libc::write(pipe[1], buf.as_ptr().cast(), got);
            libc::_exit(0);
        }
    }
    // SAFETY: both pipe ends are ours; the write end is closed so the read sees EOF.
    let (read_end, _) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), libc::close(pipe[1])) };
    let mut out = Vec::new();
    std::fs::File::from(read_end).read_to_end(&mut out).unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed: {status:#x}");
    out
}

fn decode_response(frame: &[u8]) -> Response {
    assert!(frame.len() >= wire::HEADER_LEN, "no response: {} bytes", frame.len());
    wire::decode(&frame[wire::HEADER_LEN..]).unwrap()
}

/// The attack from issue 10: root opens a connection (as the shim's report thread does) and
/// forks; the child drops to nobody and asks for an SVID on the inherited socket. tetherd used
/// to attest the connection once, at accept, and handed the child root's SVID and key.
#[test]
fn forked_child_after_setuid_cannot_fetch_the_parents_svid_on_an_inherited_connection() {
    let d = Daemon::start(&[]);
    let mut s = d.raw();
    send(&mut s, &wire::encode(&Request::FetchSvid {}).unwrap());
    let Response::Svid(parent) = read_response(&mut s) else { panic!("parent gets its SVID") };
    let frame = wire::encode(&Request::FetchSvid {}).unwrap();

    let got = in_forked_child(s.as_raw_fd(), Some(NOBODY_UID), &frame);
    match decode_response(&got) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::AttestationFailed, "{}", e.message);
            assert!(e.message.contains("uid 65534"), "{}", e.message);
        }
        Response::Svid(svid) => panic!("the child got {} (the parent's is {})", svid.spiffe_id, parent.spiffe_id),
        other => panic!("unexpected {other:?}"),
    }
    // The connection is closed for everyone: the byte stream can no longer be trusted.
    common::assert_closed(&mut s);
    assert!(d.log_text().contains("foreign sender"), "{}", d.log_text());
    d.client().fetch_svid().unwrap();
}

/// The same without the uid change: a forked child is a different process, so it cannot use
/// its parent's connection either (it must open its own and be attested as itself).
#[test]
fn forked_child_with_the_same_uid_is_refused_on_the_parents_connection() {
    let d = Daemon::start(&[]);
    let s = d.raw();
    let frame = wire::encode(&Request::FetchSvid {}).unwrap();
    let got = in_forked_child(s.as_raw_fd(), None, &frame);
    let Response::Error(e) = decode_response(&got) else { panic!("the child must be refused") };
    assert_eq!(e.code, ErrorCode::AttestationFailed, "{}", e.message);
}

/// A frame split between two writers: the parent sends the header, the child the body.
/// The kernel stamps each write, so the child's half is caught.
#[test]
fn frame_half_written_by_a_forked_child_is_refused() {
    let d = Daemon::start(&[]);
    let mut s = d.raw();
    let frame = wire::encode(&Request::FetchSvid {}).unwrap();
    std::io::Write::write_all(&mut s, &frame[..wire::HEADER_LEN]).unwrap();
    let got = in_forked_child(s.as_raw_fd(), Some(NOBODY_UID), &frame[wire::HEADER_LEN..]);
    let Response::Error(e) = decode_response(&got) else { panic!("the split frame must be refused") };
    assert_eq!(e.code, ErrorCode::AttestationFailed, "{}", e.message);
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One local user opened 512 idle connections and every other process on the host got
/// `busy` (then EACCES on every TCP connect). Now each uid has its own share.
#[test]
fn one_uid_holding_1000_broker_connections_does_not_starve_other_uids() {
    let d = Daemon::start(&[]);
    let script = format!(
        "import socket, sys, time\n\
         held = []\n\
         for _ in range(1000):\n\
         \x20   c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         \x20   c.connect({:?})\n\
         \x20   held.append(c)\n\
         print(len(held), flush=True)\n\
         time.sleep(60)\n",
        d.socket.display().to_string()
    );
    let mut hog = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(hog.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "1000", "the hog could not open its connections");
    std::thread::sleep(std::time::Duration::from_millis(300));

    // Root, and an ordinary user other than the hog, are both still served.
    let root = d.client().fetch_svid();
    let other = std::process::Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", common::TETHER, "svid", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let _ = hog.kill();
    let _ = hog.wait();
    let root = root.unwrap();
    assert!(root.spiffe_id.as_str().contains("/uid/0/"), "{}", root.spiffe_id);
    let text = String::from_utf8_lossy(&other.stdout);
    assert!(other.status.success() && text.contains("/uid/1000/"), "{text} {}", String::from_utf8_lossy(&other.stderr));
    assert!(d.log_text().contains("per-user connection limit") || !d.log_text().contains("connection limit reached"));
}

/// 60 reports with megabyte-sized strings took tetherd from 8 MB to 67 MB. Each field is
/// now checked, so 1,000 oversized reports leave its memory where it was.
#[test]
fn a_thousand_oversized_reports_leave_tetherd_rss_within_16_mib() {
    let d = Daemon::start(&[]);
    let mut s = d.raw();
    let report = |conn_id: u64, reason: String| {
        Request::Report(wire::ConnectionReport {
            event: wire::ConnectionEvent::Open,
            conn_id,
            direction: wire::Direction::Outbound,
            local_addr: "127.0.0.1:40000".into(),
            remote_addr: "127.0.0.1:8443".into(),
            local_id: None,
            peer_id: Some("spiffe://tether.internal/admin".parse().unwrap()),
            data_path: "ktls".into(),
            decision: "allow".into(),
            reason: Some(reason),
            opened_at: 1,
            bytes: None,
        })
    };
    // Warm up (thread stacks, the table, the allocator) with a valid report.
    send(&mut s, &wire::encode(&report(u64::MAX, "ok".into())).unwrap());
    assert!(matches!(read_response(&mut s), Response::Ok(_)));
    let before = rss_kib(d.child.id());
    // Over every report field's limit, under the request limit.
    let huge = "x".repeat(48 << 10);
    let mut refused = 0;
    for i in 0..1000 {
        send(&mut s, &wire::encode(&report(i, huge.clone())).unwrap());
        if let Response::Error(e) = read_response(&mut s) {
            assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
            refused += 1;
        }
    }
    let after = rss_kib(d.child.id());
    eprintln!("tetherd RSS {before} KiB -> {after} KiB after 1000 oversized reports");
    assert!(after < before + 16 * 1024, "RSS grew from {before} KiB to {after} KiB");
    assert_eq!(refused, 1000);
    // The valid report is listed, with its peer ID marked as a claim.
    let out = d.tether(false, &["connections"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("PEER ID (CLAIMED)") && table.contains("spiffe://tether.internal/admin"), "{table}");
}

/// An idle broker connection is closed after the client deadline.
#[test]
fn idle_connections_time_out() {
    let d = Daemon::start(&["--client-timeout-ms", "300"]);
    let mut s = d.raw();
    let t = std::time::Instant::now();
    match read_response(&mut s) {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
    common::assert_closed(&mut s);
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
}

/// The attacker's half of review F1, in Python so it runs as nobody. A child connects, queues
/// requests (status padding, then `export_svid`) while running python, and execs the
/// registered binary; the parent holds a copy of the socket and reads the answers. `early`:
/// the bytes are sent at once (before tetherd's greeting); `greeted`: after reading it.
const EXEC_STEAL: &str = r#"
sock, target, mode = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
pid = os.fork()
if pid == 0:
    s.connect(sock)
    if mode == "greeted":
        s.settimeout(1.0)
        try: s.recv(8)
        except socket.timeout: pass
        s.settimeout(None)
    s.sendall(frame({"type": "status"}) * 3000 + frame({"type": "export_svid"}))
    os.execv(target, [target, "30"])
time.sleep(1.0)
while True:
    f = read_frame(s)
    if f is None: print("EOF"); break
    if f[0] != b"TT": continue
    r = json.loads(f[1])
    if r.get("type") == "status": continue
    if r.get("type") == "svid": print("STOLEN", r["spiffe_id"])
    else: print("ANSWER", r.get("code"), r.get("message"))
    break
os.kill(pid, 9)
"#;

/// Review F1: bytes queued while an unregistered program ran, answered after the process
/// exec'd the registered binary, carried that binary's identity and key to the attacker.
/// Refused now both ways: bytes queued before tetherd's greeting close the connection, and a
/// request whose sender exec'd since the connection opened is refused.
#[test]
fn requests_queued_before_an_exec_do_not_get_the_registered_binarys_identity() {
    let config = "trust_domain = \"tether.internal\"\nunmatched = \"deny\"\n\
                  [[entry]]\nspiffe_id = \"spiffe://tether.internal/sleeper\"\n\
                  selectors = [\"unix:uid:65534\", \"unix:path:/usr/bin/sleep\"]\n";
    let d = Daemon::start_with(Some(config), &[]);
    // Bytes queued before tetherd records the peer (here: sent while it is stopped) may
    // predate an exec: the connection is refused instead of greeted.
    let pid = d.child.id() as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut s = d.raw_ungreeted();
    send(&mut s, &wire::encode(&Request::ExportSvid {}).unwrap());
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let e = wire::io::read_greeting(&mut s).unwrap().expect("refused, not greeted");
    assert_eq!(e.code, ErrorCode::AttestationFailed, "{}", e.message);
    assert!(e.message.contains("before tetherd's greeting"), "{}", e.message);
    for mode in ["early", "greeted"] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c"])
            .arg(format!("{}{EXEC_STEAL}", common::PY_FRAMES))
            .arg(&d.socket)
            .args(["/usr/bin/sleep", mode])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("STOLEN"), "{mode}: the exec'd binary's identity went to the attacker: {text}");
        assert!(text.contains("ANSWER attestation_failed"), "{mode}: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    let log = d.log_text();
    assert!(log.contains("before tetherd's greeting"), "{log}");
    assert!(log.contains("changed (exec)"), "{log}");
    assert!(!log.contains("SVID issued"), "{log}");
}

/// Review F2, run as nobody inside `unshare -Urpf` (pid 1 of its own user and pid
/// namespaces): a child connects and execs the registered binary; the parent sends on the
/// child's connection with SCM_CREDENTIALS naming the child, which the kernel allows a
/// CAP_SYS_ADMIN-in-its-pid-namespace sender. Then, on its own connection, it asks for its
/// uid-only identity, both held by tetherd (broker custody) and exported.
const NS_FORGE: &str = r#"
sock, target = sys.argv[1], sys.argv[2]
def show(tag, f):
    if f is None: print(tag, "EOF"); return
    r = json.loads(f[1])
    if r.get("type") == "svid": print(tag, "SVID", r["spiffe_id"], "key" if r.get("private_key") else "key_id")
    else: print(tag, "ERROR", r.get("code"), r.get("message"))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
cpid = os.fork()
if cpid == 0:
    s.connect(sock)
    os.execv(target, [target, "60"])
time.sleep(0.5)
assert read_frame(s)[0] == b"TG"
creds = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("iII", cpid, 0, 0))]
s.sendmsg([frame({"type": "export_svid"})], creds)
show("forged_export", read_frame(s))
s.sendmsg([frame({"type": "fetch_svid"})], creds)
show("forged_fetch", read_frame(s))
os.kill(cpid, 9)
for req in ["fetch_svid", "export_svid"]:
    own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    own.connect(sock)
    assert read_frame(own)[0] == b"TG"
    own.sendall(frame({"type": req}))
    show("own_" + req, read_frame(own))
"#;

/// Review F2: per-message credentials are forgeable from a user + pid namespace, so the
/// registered binary's identity (and a signing oracle on its held key) went to the namespace's
/// root. Now a peer in a foreign namespace gets no identity that depends on the executable and
/// no broker-held key; its uid-only identity (the whole namespace's) can still be exported.
#[test]
fn a_user_namespace_root_forging_credentials_gets_no_registered_binarys_identity() {
    let config = "trust_domain = \"tether.internal\"\nunmatched = \"deny\"\n\
                  [[entry]]\nspiffe_id = \"spiffe://tether.internal/sleeper\"\n\
                  selectors = [\"unix:uid:65534\", \"unix:path:/usr/bin/sleep\"]\n\
                  [[entry]]\nspiffe_id = \"spiffe://tether.internal/nobody\"\nselectors = [\"unix:uid:65534\"]\n";
    let d = Daemon::start_with(Some(config), &[]);
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "unshare", "-Urpf", "/usr/bin/python3", "-c"])
        .arg(format!("{}{NS_FORGE}", common::PY_FRAMES))
        .arg(&d.socket)
        .arg("/usr/bin/sleep")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |tag: &str| text.lines().find(|l| l.starts_with(&format!("{tag} "))).unwrap_or_else(|| panic!("no {tag}: {text} {}", String::from_utf8_lossy(&out.stderr))).to_owned();
    let foreign = "user namespace other than tetherd's";
    for tag in ["forged_export", "forged_fetch"] {
        let l = line(tag);
        assert!(!l.contains("SVID"), "the namespace root got the registered binary's identity: {l}");
        // Refused as foreign; or, when tetherd recorded the child's executable before its exec
        // (a loaded machine), as exec'd since it connected.
        assert!(l.contains("attestation_failed") && (l.contains(foreign) || l.contains("changed (exec)")), "{l}");
    }
    let held = line("own_fetch_svid");
    assert!(held.contains("attestation_failed") && held.contains("key custody"), "{held}");
    let exported = line("own_export_svid");
    assert!(exported.contains("SVID spiffe://tether.internal/nobody key"), "{exported}");
}

/// Peak resident memory (VmHWM) of `pid`, in KiB.
fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Review F4: a 1 MiB request body (the shared frame limit) cost tetherd about 20 MB of heap
/// (the body, serde's buffering of an internally tagged enum, and a second whole-body parse
/// on failure); 16 at once took it past 300 MB. Requests are now capped at
/// `wire::MAX_REQUEST_BODY`, checked on the header before anything is allocated.
#[test]
fn sixteen_one_mib_requests_get_too_large_without_growing_tetherd() {
    let mut d = Daemon::start(&[]);
    d.assert_serving();
    let before = hwm_kib(d.child.id());
    // `{"a":[0,0,...,0],"type":"status"}` of exactly 1 MiB: valid JSON, a known type last.
    let len = 1 << 20;
    let tail = br#"],"type":"status"}"#;
    let mut body = br#"{"a":[0"#.to_vec();
    while body.len() + 2 + tail.len() <= len {
        body.extend_from_slice(b",0");
    }
    body.extend_from_slice(tail);
    let mut frame = b"TT".to_vec();
    frame.extend_from_slice(&wire::VERSION.to_be_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    // Everything but the last byte on each connection, then the last bytes together.
    let mut conns: Vec<_> = (0..16).map(|_| d.raw()).collect();
    std::thread::scope(|s| {
        for c in &mut conns {
            let f = &frame[..frame.len() - 1];
            s.spawn(move || {
                let _ = std::io::Write::write_all(c, f);
            });
        }
    });
    for c in &mut conns {
        let _ = std::io::Write::write_all(c, &frame[frame.len() - 1..]);
    }
    let answers: Vec<_> = conns.iter_mut().map(read_response).collect();
    let after = hwm_kib(d.child.id());
    eprintln!("tetherd VmHWM {before} KiB -> {after} KiB after 16 requests of 1 MiB");
    assert!(after < before + 8 * 1024, "VmHWM grew from {before} KiB to {after} KiB");
    for a in answers {
        match a {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::TooLarge, "{}", e.message),
            other => panic!("{other:?}"),
        }
    }
    d.assert_serving();
}

/// Read from `s` until it closes (tetherd closes an idle connection after 5 s); returns how
/// many signing answers came.
fn count_sign_answers(s: &mut std::os::unix::net::UnixStream) -> usize {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let (mut n, mut at) = (0, 0);
    while at + wire::HEADER_LEN <= all.len() {
        let len = u32::from_be_bytes(all[at + 4..at + 8].try_into().unwrap()) as usize;
        n += usize::from(all[at..at + 2] == wire::sign::MAGIC);
        at += wire::HEADER_LEN + len;
    }
    n
}

/// Review F5: refused signing frames were answered and audited one by one with the connection
/// left open: one unprivileged connection wrote ~15 MB/s of WARN audit lines. Now a connection
/// is closed after a few refusals, and the audit line is rate-limited per uid (with a count of
/// what was left out); the metric counts every refusal.
#[test]
fn a_flood_of_refused_signing_frames_closes_the_connection_and_bounds_the_audit_log() {
    let mdir = common::TempDir::new("h-f5");
    let msock = mdir.path().join("m.sock");
    let d = Daemon::start(&["--metrics", &format!("unix:{}", msock.display())]);
    let mut frame: wire::sign::RequestBuf = [0; wire::HEADER_LEN + wire::sign::MAX_BODY];
    let n = wire::sign::encode_request(&wire::sign::Request { key_id: 12345, scheme: 0x0403, message: &[7; 32] }, &mut frame).unwrap();
    let flood: Vec<u8> = frame[..n].repeat(1000);
    let mut s = d.raw();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let flood = flood.clone();
        std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut w, &flood);
        })
    };
    let answered = count_sign_answers(&mut s);
    writer.join().unwrap();
    assert!(answered <= 8, "{answered} refused signing frames answered on one connection");
    // More connections of the same uid: each closed early, the log bounded.
    for _ in 0..40 {
        let mut s = d.raw();
        let _ = std::io::Write::write_all(&mut s, &frame[..n].repeat(20));
        assert!(count_sign_answers(&mut s) <= 8);
    }
    let log = d.log_text();
    let lines = log.lines().filter(|l| l.contains("sign_refused")).count();
    assert!(lines <= 20, "{lines} sign_refused audit lines for {} refusals", answered + 40 * 8);
    let mut m = std::os::unix::net::UnixStream::connect(&msock).unwrap();
    std::io::Write::write_all(&mut m, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    let counted: u64 = text
        .lines()
        .find(|l| l.starts_with("tether_signatures_refused_total{reason=\"unknown_key\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(counted >= (answered + 40) as u64, "metric counted {counted}");
}
