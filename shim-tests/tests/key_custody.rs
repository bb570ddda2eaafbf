//! Issue 11, key custody, with real programs under the shim and a real tetherd.
//!
//! - The memory test: after a protected connection, the workload's memory (read through
//!   /proc/PID/mem, as root) holds no copy of the 32-byte private scalar tetherd holds for it
//!   under broker custody, in any of its encodings (raw, or the Montgomery form ring's parsed
//!   key keeps: the shim wipes the PKCS#8 bytes it receives, so under process custody only that
//!   form remains); under process custody the same scan finds it (the test can fail).
//!   The scalar is learnt without any export path: tetherd's own memory is scanned for the
//!   PKCS#8 documents it keeps, and the one whose public key is in the workload's certificate
//!   (as `openssl s_server -www` printed it) is the workload's.
//! - tetherd stopping after a first connection: the next handshake fails closed with EACCES
//!   (nobody can sign it), the established connection is untouched.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tether_shim_tests::{expect_line, free_port, memscan, openssl_s_server, show, Harness, Policy, ANY_ID, PYTHON};

/// Connects to each port in argv (one connection each, kept open), prints `connected PORT` or
/// `connect_errno=NAME PORT`; on "get" sends a GET on the first connection and prints the
/// page, then `done`; stays alive until stdin closes.
const CLIENT: &str = r#"
import errno, os, socket, sys
from e2e import http_get
print("pid %d" % os.getpid(), flush=True)
conns = []
def connect(port):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        print("connected %d" % port, flush=True)
        conns.append(s)
    except OSError as e:
        print("connect_errno=%s %d" % (errno.errorcode.get(e.errno, str(e.errno)), port), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "connect":
        connect(int(cmd[1]))
    elif cmd[0] == "get":
        s = conns[0]
        s.settimeout(30)
        data = http_get(s)
        print(data.decode("latin1"), flush=True)
        print("done", flush=True)
"#;

/// Starts the shimmed [`CLIENT`] and has it connect to `port`; returns its stdin and its stdout
/// so far (which holds its pid, see [`pid_of`]).
fn start_client(h: &mut Harness, port: u16) -> (std::process::ChildStdin, String) {
    let mut py = h.python("client.py", CLIENT);
    let mut stdin = h.spawn_with_stdin("client", h.shim(&mut py, "client"));
    writeln!(stdin, "connect {port}").unwrap();
    let out = h.wait_stdout("client", Duration::from_secs(30), |o| o.contains("connected"));
    assert!(out.contains(&format!("connected {port}")), "{out}
{}", show(&h.log_lines("client")));
    (stdin, out)
}

/// The pid [`CLIENT`] printed first.
fn pid_of(out: &str) -> u32 {
    out.lines().find_map(|l| l.strip_prefix("pid ")).unwrap().trim().parse().unwrap()
}

/// The first PEM certificate after "Client certificate" in an s_server -www page.
fn client_cert(page: &str) -> Vec<u8> {
    let after = &page[page
        .find("Client certificate")
        .unwrap_or_else(|| panic!("no client certificate: {page}"))..];
    let begin = after.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = after.find("-----END CERTIFICATE-----").unwrap();
    let b64: String = after[begin..end].lines().skip(1).map(str::trim).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// Of the PKCS#8 keys in tetherd's memory, the one whose public key is in `cert`.
fn held_scalar_for(broker: u32, cert: &[u8]) -> Option<[u8; 32]> {
    let docs = memscan::pkcs8_documents(broker);
    eprintln!(
        "{} P-256 PKCS#8 document(s) in tetherd's memory",
        docs.len()
    );
    docs.iter().find_map(|doc| {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&doc[..]));
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&der).ok()?;
        let spki = key.public_key()?;
        cert.windows(spki.len())
            .any(|w| w == spki.as_ref())
            .then(|| memscan::scalar(doc))
            .flatten()
    })
}

/// Copies of the workload's private scalar in its own memory after a protected connection.
fn scalar_copies_in_workload(custody: &'static str) -> usize {
    let port = free_port();
    let mut h = Harness::new(
        &format!("custody-{custody}"),
        Policy::new().outbound(port, &[ANY_ID]).key_custody(custody),
    );
    let mut server = openssl_s_server(&h.svid_files(), port, &["-www"]);
    h.spawn_server("s_server", h.plain(&mut server), port);
    let (mut stdin, _) = start_client(&mut h, port);
    writeln!(stdin, "get").unwrap();
    let out = h.wait_stdout("client", Duration::from_secs(30), |o| o.contains("done"));
    assert!(out.contains("done"), "{out}\n{}", show(&h.log_lines("client")));
    let cert = client_cert(&out);
    let broker = h.broker_pid().unwrap();
    let scalar = held_scalar_for(broker, &cert).expect("tetherd holds the workload's key");
    let pid = pid_of(&out);
    let regions = memscan::regions(pid);
    let counts: Vec<usize> = memscan::scalar_encodings(&scalar)
        .iter()
        .map(|needle| {
            regions
                .iter()
                .map(|r| r.windows(32).filter(|w| w == needle).count())
                .sum()
        })
        .collect();
    let n = counts.iter().sum();
    eprintln!("{custody} custody: copies of the scalar in the workload (pid {pid}), raw BE/LE/ring Montgomery: {counts:?}");
    drop(stdin);
    n
}

#[test]
fn broker_custody_leaves_no_copy_of_the_private_scalar_in_the_workload() {
    assert_eq!(
        scalar_copies_in_workload("broker"),
        0,
        "the workload holds its private key"
    );
}

/// The control: the same scan finds the key when the process holds it.
#[test]
fn process_custody_control_the_scan_finds_the_scalar_in_the_workload() {
    assert!(
        scalar_copies_in_workload("process") > 0,
        "the scan cannot see a key the workload holds"
    );
}

/// Two `openssl s_server`s (ports p1, p2) and a shimmed python [`CLIENT`] connected to p1, under
/// a policy protecting both, plus `extra` TOML. Returns the harness, the client's stdin, its
/// stdout so far, and p2.
fn connected_client(name: &str, extra: &str) -> (Harness, std::process::ChildStdin, String, u16) {
    let (p1, p2) = (free_port(), free_port());
    let policy = Policy::new()
        .outbound(p1, &[ANY_ID])
        .outbound(p2, &[ANY_ID])
        .raw(extra);
    let mut h = Harness::new(name, policy);
    let svid = h.svid_files();
    for (n, p) in [("s1", p1), ("s2", p2)] {
        let mut s = openssl_s_server(&svid, p, &["-www"]);
        h.spawn_server(n, h.plain(&mut s), p);
    }
    let (stdin, out) = start_client(&mut h, p1);
    (h, stdin, out, p2)
}

#[test]
fn tetherd_down_after_a_first_connection_fails_the_next_handshake_with_eacces() {
    let (mut h, mut stdin, _, p2) = connected_client("custody-down", "");
    h.stop_broker();
    writeln!(stdin, "connect {p2}").unwrap();
    let out = h.wait_stdout("client", Duration::from_secs(30), |o| {
        o.contains(&format!(" {p2}"))
    });
    assert!(
        out.contains(&format!("connect_errno=EACCES {p2}")),
        "{out}\n{}",
        show(&h.log_lines("client"))
    );
    let lines = h.log_lines("client");
    let deny = expect_line(&lines, "connect", "deny");
    assert!(
        deny.get("reason").contains("tetherd did not sign"),
        "{}",
        deny.raw
    );
    // The connection made before tetherd went away still works.
    writeln!(stdin, "get").unwrap();
    let out = h.wait_stdout("client", Duration::from_secs(30), |o| o.contains("done"));
    assert!(
        out.contains("HTTP/1.0 200"),
        "the established connection broke: {out}"
    );
}

/// Code injected after the first handshake (here a tracer attached to the workload, for an
/// entry that names its binary): the next signature is refused, so the next connect fails
/// closed, and tetherd logs why.
#[test]
fn a_tracer_attached_after_the_first_handshake_stops_the_next_one() {
    let python = std::fs::canonicalize(PYTHON).unwrap();
    let entry = format!(
        "[[entry]]\nspiffe_id = \"spiffe://tether.internal/custody-python\"\nselectors = [\"unix:uid:0\", \"unix:path:{}\"]\n",
        python.display()
    );
    let (h, mut stdin, out, p2) = connected_client("custody-traced", &entry);
    let pid = pid_of(&out);
    let mut tracer = Command::new("strace")
        .args(["-qq", "-e", "trace=none", "-p", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "strace never attached"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    writeln!(stdin, "connect {p2}").unwrap();
    let out = h.wait_stdout("client", Duration::from_secs(30), |o| {
        o.contains(&format!(" {p2}"))
    });
    let _ = tracer.kill();
    let _ = tracer.wait();
    assert!(
        out.contains(&format!("connect_errno=EACCES {p2}")),
        "{out}\n{}",
        show(&h.log_lines("client"))
    );
    let log = h.broker_log();
    assert!(
        log.contains("event=\"sign_refused\"") && log.contains("is being traced"),
        "{log}"
    );
}
