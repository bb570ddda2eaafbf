//! Issue 12: TLS 1.3 KeyUpdate mid-stream, sent by OpenSSL (`k`: update_not_requested, `K`:
//! update_requested, typed on its stdin), in both directions, against a tether reader. The
//! whole transfer must arrive intact (sha256). On kTLS the kernel's rekey counters must rise
//! (Linux >= 6.14); a kernel that cannot rekey must fail closed (ECONNRESET, reason logged).
//! On the host (userspace relay) rustls follows the KeyUpdates itself.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_shim_tests::{free_port, scaled_bytes, show, DataPathCheck, Harness, Policy, TlsStat, ANY_ID, PYTHON};

/// KeyUpdates per transfer (alternating `K` and `k`).
const REKEYS: usize = 50;

/// Read exactly argv[2] bytes (or until EOF/error), print their sha256 and how it ended.
/// argv[1]: "connect PORT" or "listen PORT".
const PY_SINK: &str = r#"
import errno, hashlib, socket, sys
mode, port, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "connect":
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
else:
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port)); l.listen(1)
    print("listening", flush=True)
    s, _ = l.accept(); s.settimeout(30)
print("connected", flush=True)
h, got, end = hashlib.sha256(), 0, "eof"
try:
    while got < want:
        d = s.recv(65536)
        if not d:
            break
        h.update(d); got += len(d)
    if got == want:
        end = "complete"
except socket.timeout:
    end = "timeout"
except OSError as e:
    end = "errno_" + errno.errorcode.get(e.errno, str(e.errno))
print("got=%d" % got)
print("sha=" + h.hexdigest())
print("end=" + end)
print("done", flush=True)
"#;

/// Lines of decimal digits: never one of OpenSSL's stdin commands (`Q`, `k`, `K`, ...).
fn payload(len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    let mut i: u64 = 0;
    while (v.len() as u64) < len {
        let line = format!("{:063}\n", i.wrapping_mul(2_654_435_761) % 10u64.pow(18));
        v.extend_from_slice(line.as_bytes());
        i += 1;
    }
    v.truncate(len as usize);
    if let Some(last) = v.last_mut() {
        *last = b'\n';
    }
    v
}

fn sha256_hex(data: &[u8], h: &Harness) -> String {
    let p = h.path("payload.bin");
    fs::write(&p, data).unwrap();
    tether_shim_tests::sha256(&p)
}

fn openssl(svid: &(PathBuf, PathBuf, PathBuf), role: &str, port: u16) -> Command {
    let (cert, key, bundle) = svid;
    let mut c = Command::new("openssl");
    c.arg(role).args(["-verify_return_error", "-tls1_3"]);
    if role == "s_server" {
        c.args(["-Verify", "1", "-accept", &port.to_string()]);
    } else {
        c.args(["-connect", &format!("127.0.0.1:{port}")]);
    }
    c.arg("-CAfile").arg(bundle).arg("-cert").arg(cert).arg("-key").arg(key);
    c
}

/// `openssl_role` sends `len` bytes to a tether-protected python sink, with REKEYS KeyUpdates
/// spread through the stream.
fn transfer_with_key_updates(name: &str, openssl_role: &str) {
    let port = free_port();
    let policy = if openssl_role == "s_server" {
        Policy::new().outbound(port, &[ANY_ID])
    } else {
        Policy::new().inbound(port, &[ANY_ID])
    };
    let mut h = Harness::new(name, policy);
    let len = scaled_bytes(100);
    let data = payload(len);
    let want_sha = sha256_hex(&data, &h);
    let sink = h.script("sink.py", PY_SINK);
    let check = DataPathCheck::begin(&h, port);
    let before = TlsStat::read();
    let mut openssl_cmd = openssl(&h.svid_files(), openssl_role, port);
    let mut sink_cmd = Command::new(PYTHON);
    let mode = if openssl_role == "s_server" { "connect" } else { "listen" };
    sink_cmd.arg(&sink).args([mode, &port.to_string(), &len.to_string()]);

    let stdin = if openssl_role == "s_server" {
        let stdin = h.spawn_with_stdin("openssl", h.plain(&mut openssl_cmd));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !tether_shim_tests::is_listening(port) {
            assert!(Instant::now() < deadline, "s_server did not listen:\n{}", h.output("openssl"));
            std::thread::sleep(Duration::from_millis(20));
        }
        h.spawn("sink", h.shim(&mut sink_cmd, "sink"));
        stdin
    } else {
        h.spawn("sink", h.shim(&mut sink_cmd, "sink"));
        h.wait_stdout("sink", Duration::from_secs(20), |o| o.contains("listening"));
        h.spawn_with_stdin("openssl", h.plain(&mut openssl_cmd))
    };
    let out = h.wait_stdout("sink", Duration::from_secs(30), |o| o.contains("connected") || o.contains("done"));
    assert!(out.contains("connected"), "sink did not connect: {out}\n{}", show(&h.log_lines("sink")));
    std::thread::sleep(Duration::from_millis(300));

    // Fed from a thread: if the stream stalls, the sink's timeout still ends the test.
    let feed = data.clone();
    let feeder = std::thread::spawn(move || {
        let mut stdin = stdin;
        let chunk = feed.len().div_ceil(REKEYS + 1);
        for (i, part) in feed.chunks(chunk).enumerate() {
            stdin.write_all(part)?;
            stdin.flush()?;
            if i < REKEYS {
                // Let OpenSSL drain the pipe so the command is the start of its next read.
                std::thread::sleep(Duration::from_millis(60));
                stdin.write_all(if i % 2 == 0 { b"K\n" } else { b"k\n" })?;
                stdin.flush()?;
                std::thread::sleep(Duration::from_millis(60));
            }
        }
        Ok::<_, std::io::Error>(stdin)
    });
    let out = h.wait_stdout("sink", Duration::from_secs(600), |o| o.contains("done"));
    if feeder.is_finished() {
        let _ = feeder.join();
    }
    let after = TlsStat::read();
    let field = |k: &str| out.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("(none)").to_string();
    let end = field("end=");
    let lines = h.log_lines("sink");
    let openssl_out = h.output("openssl");
    let updates = openssl_out.matches("KEYUPDATE").count();
    let rx_ok = after.get("TlsRxRekeyOk") - before.get("TlsRxRekeyOk");
    let tx_ok = after.get("TlsTxRekeyOk") - before.get("TlsTxRekeyOk");
    eprintln!(
        "{name}: {len} bytes, end={end}, openssl KEYUPDATE lines={updates}, TlsRxRekeyOk +{rx_ok}, TlsTxRekeyOk +{tx_ok} (mode {})",
        tether_shim_tests::expected_mode()
    );
    if tether_shim_tests::in_uml() && !tether_shim_tests::kernel_can_rekey_ktls() {
        // Fail closed: ECONNRESET with the reason logged, never garbage or a hang.
        assert_eq!(end, "errno_ECONNRESET", "{out}\n{}", show(&lines));
        assert!(
            lines.iter().any(|l| l.get("reason").contains("cannot rekey")),
            "no logged reason:\n{}",
            show(&lines)
        );
        return;
    }
    assert_eq!(end, "complete", "{out}\n{openssl_out}\n{}", show(&lines));
    assert_eq!(field("sha="), want_sha, "stream corrupted across KeyUpdates");
    if tether_shim_tests::in_uml() {
        assert!(rx_ok >= REKEYS as u64, "TlsRxRekeyOk rose by {rx_ok}, want >= {REKEYS}");
        assert!(tx_ok >= (REKEYS / 2) as u64, "TlsTxRekeyOk rose by {tx_ok}, want >= {}", REKEYS / 2);
    }
    check.finish_with_markers(&lines, &[&data[..40]]);
}

#[test]
fn openssl_s_server_key_updates_reach_tether_client_intact() {
    transfer_with_key_updates("ku-server", "s_server");
}

#[test]
fn openssl_s_client_key_updates_reach_tether_server_intact() {
    transfer_with_key_updates("ku-client", "s_client");
}
