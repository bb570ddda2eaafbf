//! Broker key custody against a real tetherd: a key tetherd holds signs only for the process
//! it was issued to, while that process lives and passes its impersonation checks.
//!
//! The key owner is a child process (this test binary re-executed as `owner`, see
//! [`owner_role`]): it fetches its SVID, prints its key id and leaf, then signs on command.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::Daemon;
use tether_broker::client::Client;
use tether_proto::wire::sign::Status;

const ECDSA_P256_SHA256: u16 = 0x0403;

/// A TLS 1.3 CertificateVerify input (the only message tetherd signs).
fn cv() -> Vec<u8> {
    tether_proto::wire::sign::certificate_verify_input(false, &[9u8; 32])
}
const ROLE: &str = "H11_CUSTODY_ROLE";

/// Not a test of its own: the key owner, when re-executed with `H11_CUSTODY_ROLE=owner`.
#[test]
fn owner_role() {
    if std::env::var(ROLE).as_deref() != Ok("owner") {
        return;
    }
    let socket = std::env::var("TETHER_SOCKET").unwrap();
    let svid = Client::connect(socket.as_ref(), Duration::from_secs(5))
        .unwrap()
        .fetch_svid()
        .unwrap();
    assert!(svid.private_key.is_none(), "broker custody sends no key");
    let hex: String = svid.cert_chain[0]
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("key {} {hex}", svid.key_id.unwrap());
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        if line == "sign" {
            let mut c = Client::connect(socket.as_ref(), Duration::from_secs(5)).unwrap();
            match c
                .sign(svid.key_id.unwrap(), ECDSA_P256_SHA256, &cv())
                .unwrap()
            {
                Ok(sig) => println!("signed {}", sig.len()),
                Err((s, why)) => println!("refused {s:?} {why}"),
            }
        } else if line == "setuid" {
            // Drop to nobody, as a daemon started by root does (pid and start time stay).
            // SAFETY: setgid/setuid with constant ids; the owner runs no other threads of note.
            let ok = unsafe { libc::setgid(65534) == 0 && libc::setuid(65534) == 0 };
            println!("setuid {ok}");
        } else {
            break;
        }
    }
}

struct Owner {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    key_id: u64,
    leaf: Vec<u8>,
}

impl Owner {
    fn spawn(d: &Daemon) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "owner_role", "--nocapture", "--test-threads=1"])
            .env(ROLE, "owner")
            .env("TETHER_SOCKET", &d.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let line = read_until(&mut stdout, "key ");
        let mut f = line.split_whitespace().skip(1);
        let key_id = f.next().unwrap().parse().unwrap();
        let hex = f.next().unwrap();
        let leaf = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        Self {
            child,
            stdin,
            stdout,
            key_id,
            leaf,
        }
    }

    fn sign(&mut self) -> String {
        writeln!(self.stdin, "sign").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "owner exited"
            );
            if let Some(at) = line.find("signed").or_else(|| line.find("refused")) {
                return line[at..].trim().to_owned();
            }
        }
    }

    fn exit(mut self) -> u64 {
        writeln!(self.stdin, "exit").unwrap();
        self.child.wait().unwrap();
        self.key_id
    }
}

fn read_until(r: &mut impl BufRead, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "owner exited before printing {prefix:?}"
        );
        // libtest prints "test owner_role ... " with no newline before the role's output.
        if let Some(at) = line.find(prefix) {
            return line[at..].trim().to_owned();
        }
    }
}

fn sign_as_me(d: &Daemon, key_id: u64) -> Result<Vec<u8>, (Status, String)> {
    d.client()
        .sign(key_id, ECDSA_P256_SHA256, &cv())
        .unwrap()
}

fn wait_log(d: &Daemon, needle: &str, within: Duration) -> Duration {
    let start = Instant::now();
    while !d.log_text().contains(needle) {
        assert!(
            start.elapsed() < within,
            "no {needle:?} in the log within {within:?}: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// Found by review: a process keeps its pid and start time across setuid, so the key tetherd
/// issued for root kept signing after the owner dropped to nobody (until notAfter). Now such a
/// frame is refused with `Stale` (the shim then fetches the new uid's identity).
#[test]
fn a_key_stops_signing_when_its_owner_changes_uid() {
    let d = Daemon::start(&[]);
    let mut owner = Owner::spawn(&d);
    assert!(owner.sign().starts_with("signed"));
    writeln!(owner.stdin, "setuid").unwrap();
    assert!(read_until(&mut owner.stdout, "setuid ").ends_with("true"), "setuid failed");
    let r = owner.sign();
    assert!(r.starts_with("refused Stale") && r.contains("uid 65534"), "{r}");
    assert!(d.log_text().contains("credentials_changed") || d.log_text().contains("now runs as uid 65534"), "not logged: {}", d.log_text());
}

#[test]
fn signatures_verify_against_the_certificate_and_only_the_owner_gets_them() {
    let d = Daemon::start(&[]);
    let mut owner = Owner::spawn(&d);
    assert!(owner.sign().starts_with("signed"));
    // This test process holds the owner's certificate and key id: refused, logged.
    let r = sign_as_me(&d, owner.key_id);
    assert!(
        matches!(&r, Err((Status::Refused, why)) if why.contains("belongs to pid")),
        "{r:?}"
    );
    wait_log(&d, "event=\"sign_refused\"", Duration::from_secs(2));
    // Our own key signs, and the signature verifies under our certificate's public key.
    let mine = d.fetch();
    let sig = d
        .client()
        .sign(mine.key_id.unwrap(), ECDSA_P256_SHA256, &cv())
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&mine.cert_chain[0].0).unwrap();
    let public = cert
        .tbs_certificate
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
        .verify(&cv(), &sig)
        .unwrap();
    assert!(!owner.leaf.is_empty());
    owner.exit();
}

/// Exit test: once the owner exits its key is destroyed at once, and a process holding the
/// exited one's certificate and key id cannot get a signature.
#[test]
fn a_key_is_destroyed_when_its_process_exits_and_never_signs_again() {
    let d = Daemon::start(&["--sweep-interval-ms", "60000"]);
    let mut owner = Owner::spawn(&d);
    assert!(owner.sign().starts_with("signed"));
    let key_id = owner.exit();
    // The sweep is a minute away: only the pidfd watch can be this quick.
    let took = wait_log(&d, "event=\"key_destroyed\"", Duration::from_secs(2));
    eprintln!("key destroyed {took:?} after the owner was reaped");
    let r = sign_as_me(&d, key_id);
    assert!(matches!(r, Err((Status::UnknownKey, _))), "{r:?}");
}

/// A forked child (here: any other process, which is what a fork child is to tetherd) cannot
/// sign with its parent's key; it gets its own.
#[test]
fn a_child_cannot_use_its_parents_key() {
    let d = Daemon::start(&[]);
    let parent_key = d.fetch().key_id.unwrap();
    let mut child = Owner::spawn(&d);
    assert_ne!(child.key_id, parent_key, "the child got a key of its own");
    // The child asks for the parent's key: refused.
    writeln!(child.stdin, "exit").unwrap();
    child.child.wait().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "intruder_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "intruder")
        .env("TETHER_SOCKET", &d.socket)
        .env("H11_KEY_ID", parent_key.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refused Refused"), "{text}");
}

/// Not a test of its own: signs with someone else's key id (`H11_KEY_ID`).
#[test]
fn intruder_role() {
    if std::env::var(ROLE).as_deref() != Ok("intruder") {
        return;
    }
    let socket = std::env::var("TETHER_SOCKET").unwrap();
    let key_id: u64 = std::env::var("H11_KEY_ID").unwrap().parse().unwrap();
    let mut c = Client::connect(socket.as_ref(), Duration::from_secs(5)).unwrap();
    match c.sign(key_id, ECDSA_P256_SHA256, &cv()).unwrap() {
        Ok(_) => println!("signed"),
        Err((s, why)) => println!("refused {s:?} {why}"),
    }
}

/// Code injected after the first signature (a tracer attaches): the next signature is
/// refused and the identity revoked, for an entry naming the binary.
#[test]
fn a_tracer_attached_after_issuance_stops_the_next_signature() {
    tracer_attached_after(1);
}

/// tetherd keeps the owner's /proc status open and re-reads it per signature: after many
/// signatures through the kept file, a tracer attached now still stops the next one (a
/// file read once, or read on from where the last read ended, would miss it).
#[test]
fn a_tracer_attached_after_many_signatures_stops_the_next_one() {
    tracer_attached_after(20);
}

/// An owner under an entry naming this test binary signs `signatures` times, then strace
/// attaches to it: its next signature is refused, and so is every later one.
fn tracer_attached_after(signatures: usize) {
    let exe = std::env::current_exe().unwrap();
    let config = format!(
        "trust_domain = \"tether.internal\"\nunmatched = \"derive\"\n\
         [[entry]]\nspiffe_id = \"spiffe://tether.internal/custody-test\"\nselectors = [\"unix:uid:0\", \"unix:path:{}\"]\n",
        exe.display()
    );
    let d = Daemon::start_with(Some(&config), &[]);
    let mut owner = Owner::spawn(&d);
    for n in 0..signatures {
        let r = owner.sign();
        assert!(r.starts_with("signed"), "untraced: signature {n} signs: {r}");
    }
    let mut tracer = Command::new("strace")
        .args([
            "-qq",
            "-e",
            "trace=none",
            "-p",
            &owner.child.id().to_string(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/status", owner.child.id()))
        .unwrap()
        .lines()
        .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "strace never attached"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = owner.sign();
    assert!(
        r.starts_with("refused Refused") && r.contains("traced"),
        "{r}: {}",
        d.log_text()
    );
    let _ = tracer.kill();
    let _ = tracer.wait();
    // Detaching does not give the identity back: it is revoked for the process's lifetime.
    let r = owner.sign();
    assert!(r.starts_with("refused UnknownKey"), "{r}");
    let log = d.log_text();
    assert!(
        log.contains("event=\"sign_refused\"") && log.contains("is being traced"),
        "{log}"
    );
    owner.exit();
}

/// A process fetches a broker-held key on its connection, then execs another program (bash)
/// that keeps the connection (not close-on-exec) and sends a signing frame on it with the
/// builtin `printf` (same pid, start time and pidfd). The parent holds a copy of the socket and
/// reads the answer.
const EXEC_THEN_SIGN: &str = r#"
sock = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    s.connect(sock)
    assert read_frame(s)[0] == b"TG"
    s.sendall(frame({"type": "fetch_svid"}))
    kid = json.loads(read_frame(s)[1])["key_id"]
    body = struct.pack(">QH", kid, 0x0403) + b"a" * 32
    sign = b"TS\x00\x01" + struct.pack(">I", len(body)) + body
    fmt = "".join("\\x%02x" % b for b in sign)
    os.dup2(s.fileno(), 9)
    os.set_inheritable(9, True)
    os.write(w, b"x")
    os.execv("/bin/bash", ["bash", "-c", 'printf "$1" >&9; sleep 5', "_", fmt])
os.read(r, 1)
kind, body = read_frame(s)
print("answer", kind, body[0], body[1:].decode(errors="replace"))
os.kill(pid, 9)
"#;

/// Review F1 for signing frames: a signature was made for bytes sent after the process exec'd
/// another program on the connection its key was fetched on. Refused now: the executable is
/// re-checked (one `stat`) for every signing frame.
#[test]
fn a_signing_frame_sent_after_an_exec_is_refused() {
    let d = Daemon::start(&[]);
    let out = Command::new("python3").args(["-c", &format!("{}{EXEC_THEN_SIGN}", common::PY_FRAMES)]).arg(&d.socket).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("answer b'TS'"), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.starts_with("answer b'TS' 0 "), "the exec'd program got a signature: {text}");
    assert!(text.contains("changed (exec)"), "{text}");
}
