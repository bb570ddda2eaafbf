//! Issue 12: TLS 1.3 KeyUpdate mid-stream, sent by OpenSSL (`k`: update_not_requested, `K`:
//! update_requested, typed on its stdin), in both directions, against a tether reader. The
//! whole transfer must arrive intact (sha256). On kTLS the kernel's rekey counters must rise
//! (Linux >= 6.14); a kernel that cannot rekey must fail closed (ECONNRESET, reason logged).
//! On the host (userspace relay) rustls follows the KeyUpdates itself.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::io::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_shim_tests::programs::presenting;
use tether_shim_tests::{
    free_port, scaled_bytes, show, DataPathCheck, Harness, Policy, SvidFiles, TlsStat, ANY_ID, PYTHON,
};

/// KeyUpdates per transfer (alternating `K` and `k`).
const REKEYS: usize = 50;

/// Read exactly argv[3] bytes (or until EOF/error), printing `at=N` after every read so the
/// test knows what has arrived; print their sha256 and how it ended, and send `sink-sha=HEX`
/// back to the peer (a write after the peer's KeyUpdates: our TX rekey happens there).
/// argv[1]: "connect" or "listen", argv[2]: the port. argv[4] (duplex): a second thread writes
/// that many bytes (TETHER-BEGIN, digit lines, TETHER-END) while the main thread reads, so TX
/// rekeys owed by the reader are done by another thread's writes.
const PY_SINK: &str = r#"
import errno, hashlib, socket, sys, threading, time
mode, port, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
duplex = int(sys.argv[4]) if len(sys.argv) > 4 else 0
if mode == "connect":
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
else:
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port)); l.listen(1)
    print("listening", flush=True)
    s, _ = l.accept(); s.settimeout(60)
print("connected", flush=True)
wrote = {"end": "none", "bytes": 0}
reading = threading.Event()
def writer():
    # Writes for as long as the reader reads (at least `duplex` bytes), so the update requests
    # the reader follows are answered by this thread's writes.
    try:
        s.sendall(b"TETHER-BEGIN\n")
        i, sent = 0, 0
        while sent < duplex or reading.is_set():
            line = b"".join(b"%063d\n" % ((i * 64 + k) * 7919 % 10**18) for k in range(256))
            s.sendall(line); sent += len(line); i += 1
            if sent >= duplex:
                time.sleep(0.01)
        s.sendall(b"TETHER-END\n")
        wrote["bytes"] = sent
        wrote["end"] = "complete"
    except OSError as e:
        wrote["end"] = "errno_" + errno.errorcode.get(e.errno, str(e.errno))
w = threading.Thread(target=writer)
if duplex:
    reading.set()
    w.start()
h, got, end = hashlib.sha256(), 0, "eof"
try:
    while got < want:
        d = s.recv(65536)
        if not d:
            break
        h.update(d); got += len(d)
        print("at=%d" % got, flush=True)
    if got == want:
        end = "complete"
except socket.timeout:
    end = "timeout"
except OSError as e:
    end = "errno_" + errno.errorcode.get(e.errno, str(e.errno))
if duplex:
    reading.clear()
    w.join()
    print("wrote=" + wrote["end"])
    print("wrote_bytes=%d" % wrote["bytes"])
if end == "complete":
    try:
        s.sendall(b"sink-sha=" + h.hexdigest().encode() + b"\n")
    except OSError as e:
        end = "reply_errno_" + errno.errorcode.get(e.errno, str(e.errno))
    # A graceful close: end our side, then wait (bounded) for the peer to close after it read
    # the reply. Exiting straight after the write races the userspace relay's flush of the
    # reply and close_notify (README, Limits: write-then-exit).
    try:
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        while s.recv(65536):
            pass
    except OSError:
        pass
print("got=%d" % got)
print("sha=" + h.hexdigest())
print("end=" + end)
print("done", flush=True)
"#;

/// Blocks of 256 lines of 63 digits, line `k` of block `i` holding
/// `(i * stride + k) * mult mod 10^18`: what PY_SINK's duplex writer (stride 64, mult 7919)
/// and PY_SENDER (stride 256, mult 2654435761) send, cut to `len` bytes.
fn digit_blocks(len: u64, stride: u64, mult: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize + 16_384);
    let mut i: u64 = 0;
    while (v.len() as u64) < len {
        for k in 0..256u64 {
            v.extend_from_slice(
                format!("{:063}\n", ((i * stride + k) * mult) % 10u64.pow(18)).as_bytes(),
            );
        }
        i += 1;
    }
    v.truncate(len as usize);
    v
}

/// What PY_SINK's duplex writer sends.
fn duplex_payload(len: u64) -> Vec<u8> {
    digit_blocks(len, 64, 7919)
}

/// The last `at=N` the sink printed (bytes it has received so far).
fn sink_at(out: &std::path::Path) -> u64 {
    let text = fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("at=")?.parse().ok())
        .unwrap_or(0)
}

/// The rest of the first line of the sink's output `out` that starts with `key` (`(none)`).
fn field(out: &str, key: &str) -> String {
    out.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("(none)").to_string()
}

/// The sink's output without its `at=N` progress lines (for a failure message).
fn without_progress(out: &str) -> String {
    out.lines().filter(|l| !l.starts_with("at=")).collect::<Vec<_>>().join("\n")
}

/// Kernel-side state for a failure message: TCP queues and the kTLS counters.
fn diagnose(port: u16) -> String {
    let ss = Command::new("ss")
        .args(["-tnie", &format!("( sport = :{port} or dport = :{port} )")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let stat = fs::read_to_string("/proc/net/tls_stat").unwrap_or_default();
    format!("--- ss\n{ss}--- tls_stat\n{stat}")
}

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

fn openssl(svid: &SvidFiles, role: &str, port: u16) -> Command {
    let mut c = Command::new("openssl");
    c.arg(role).args(["-verify_return_error", "-tls1_3"]);
    if role == "s_server" {
        c.args(["-Verify", "1", "-accept", &port.to_string()]);
    } else {
        c.args(["-connect", &format!("127.0.0.1:{port}")]);
    }
    presenting(&mut c, svid);
    c
}

/// `openssl_role` sends `len` bytes to a tether-protected python sink, with REKEYS KeyUpdates
/// spread through the stream. Each command is typed only once everything before it has
/// reached the sink (so OpenSSL reads it alone, as a command, never inside data). `duplex`:
/// the sink's second thread writes that many bytes back meanwhile.
fn transfer_with_key_updates(name: &str, openssl_role: &str, mb: u64, duplex_mb: u64) {
    let port = free_port();
    let policy = if openssl_role == "s_server" {
        Policy::new().outbound(port, &[ANY_ID])
    } else {
        Policy::new().inbound(port, &[ANY_ID])
    };
    let mut h = Harness::new(name, policy);
    let len = scaled_bytes(mb);
    let duplex = if duplex_mb == 0 {
        0
    } else {
        scaled_bytes(duplex_mb)
    };
    let data = payload(len);
    let want_sha = sha256_hex(&data, &h);
    let sink = h.script("sink.py", PY_SINK);
    let check = DataPathCheck::begin(&h, port);
    let before = TlsStat::read();
    let mut openssl_cmd = openssl(&h.svid_files(), openssl_role, port);
    let mut sink_cmd = Command::new(PYTHON);
    let mode = if openssl_role == "s_server" {
        "connect"
    } else {
        "listen"
    };
    sink_cmd.arg(&sink).args([
        mode,
        &port.to_string(),
        &len.to_string(),
        &duplex.to_string(),
    ]);

    let stdin = if openssl_role == "s_server" {
        let stdin = h.spawn_with_stdin("openssl", h.plain(&mut openssl_cmd));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !tether_shim_tests::is_listening(port) {
            assert!(
                Instant::now() < deadline,
                "s_server did not listen:\n{}",
                h.output("openssl")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h.spawn("sink", h.shim(&mut sink_cmd, "sink"));
        stdin
    } else {
        h.spawn("sink", h.shim(&mut sink_cmd, "sink"));
        h.wait_stdout("sink", Duration::from_secs(20), |o| o.contains("listening"));
        h.spawn_with_stdin("openssl", h.plain(&mut openssl_cmd))
    };
    let out = h.wait_stdout("sink", Duration::from_secs(30), |o| {
        o.contains("connected") || o.contains("done")
    });
    assert!(
        out.contains("connected"),
        "sink did not connect: {out}\n{}",
        show(&h.log_lines("sink"))
    );
    std::thread::sleep(Duration::from_millis(300));

    // Fed from a thread: if the stream stalls, the sink's timeout still ends the test.
    let feed = data.clone();
    let sink_out = h.dir().join("logs").join("sink.out");
    let feeder = std::thread::spawn(move || {
        let mut stdin = stdin;
        let chunk = feed.len().div_ceil(REKEYS + 1);
        let mut sent = 0u64;
        for (i, part) in feed.chunks(chunk).enumerate() {
            stdin.write_all(part)?;
            stdin.flush()?;
            sent += part.len() as u64;
            if i < REKEYS {
                // Wait until the sink has it all: OpenSSL's stdin is then drained, and the
                // command is a read of its own. Bounded: a stalled stream ends the feed.
                let mut last = (0, Instant::now());
                loop {
                    let at = sink_at(&sink_out);
                    if at >= sent {
                        break;
                    }
                    if at != last.0 {
                        last = (at, Instant::now());
                    } else if last.1.elapsed() > Duration::from_secs(60) {
                        return Err(std::io::Error::other(format!(
                            "sink stalled at {at} of {sent}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                stdin.write_all(if i % 2 == 0 { b"K\n" } else { b"k\n" })?;
                stdin.flush()?;
                std::thread::sleep(Duration::from_millis(150));
            }
        }
        Ok::<_, std::io::Error>(stdin)
    });
    let out = h.wait_stdout("sink", Duration::from_secs(900), |o| o.contains("done"));
    let diag = diagnose(port);
    // OpenSSL's stdin stays open until the end of the test: its EOF makes s_server close the
    // connection, possibly before it has read our reply.
    let mut _stdin_kept = None;
    let fed: Result<Result<(), String>, String> = if feeder.is_finished() {
        match feeder.join() {
            Ok(Ok(stdin)) => {
                _stdin_kept = Some(stdin);
                Ok(Ok(()))
            }
            Ok(Err(e)) => Ok(Err(e.to_string())),
            Err(_) => Err("feeder panicked".into()),
        }
    } else {
        Ok(Err("feeder still running".into()))
    };
    let after = TlsStat::read();
    let end = field(&out, "end=");
    let lines = h.log_lines("sink");
    let rx_ok = after.get("TlsRxRekeyOk") - before.get("TlsRxRekeyOk");
    let tx_ok = after.get("TlsTxRekeyOk") - before.get("TlsTxRekeyOk");
    let ours_tx = lines
        .iter()
        .filter(|l| l.get("event") == "rekey" && l.get("dir") == "tx")
        .count();
    eprintln!(
        "{name}: {len} bytes (+{duplex} back), end={end}, TlsRxRekeyOk +{rx_ok}, TlsTxRekeyOk +{tx_ok}, sink TX rekeys {ours_tx}, feeder {fed:?} (mode {})",
        tether_shim_tests::expected_mode()
    );
    if tether_shim_tests::in_uml() && !tether_shim_tests::kernel_can_rekey_ktls() {
        // Fail closed: ECONNRESET with the reason logged, never garbage or a hang.
        assert_eq!(end, "errno_ECONNRESET", "{out}\n{}", show(&lines));
        assert!(
            lines
                .iter()
                .any(|l| l.get("reason").contains("cannot rekey")),
            "no logged reason:\n{}",
            show(&lines)
        );
        return;
    }
    assert_eq!(
        end,
        "complete",
        "{}\n{diag}\n{}\n{}",
        without_progress(&out),
        h.output("openssl").chars().take(6000).collect::<String>(),
        show(&lines)
    );
    assert_eq!(
        field(&out, "sha="),
        want_sha,
        "stream corrupted across KeyUpdates"
    );
    // Our reply after the peer's update requests went out under our next key: OpenSSL read it.
    let reply = format!("sink-sha={want_sha}");
    let openssl_out = h.wait_stdout("openssl", Duration::from_secs(30), |o| o.contains(&reply));
    assert!(
        openssl_out.contains(&reply),
        "OpenSSL did not get the reply after our TX rekey\n{diag}"
    );
    if duplex > 0 {
        assert_eq!(field(&out, "wrote="), "complete", "{}", without_progress(&out));
        // s_server's own status lines, printed between the data it received.
        let text = ["KEYUPDATE\n", "SSL_do_handshake -> 1\n", "Read BLOCK\n"]
            .iter()
            .fold(openssl_out.clone(), |t, noise| t.replace(noise, ""));
        let (Some(a), Some(b)) = (text.find("TETHER-BEGIN\n"), text.find("TETHER-END\n")) else {
            panic!("OpenSSL's output lacks the writer thread's stream");
        };
        let got = &text.as_bytes()[a + "TETHER-BEGIN\n".len()..b];
        let wrote: u64 = field(&out, "wrote_bytes=").parse().unwrap_or(0);
        assert!(
            got == &duplex_payload(wrote)[..],
            "the writer thread's stream was corrupted ({} bytes, want {wrote})",
            got.len()
        );
    }
    if tether_shim_tests::in_uml() {
        assert!(
            rx_ok >= REKEYS as u64,
            "TlsRxRekeyOk rose by {rx_ok}, want >= {REKEYS}"
        );
        assert!(
            tx_ok >= 1 && ours_tx >= 1,
            "TlsTxRekeyOk rose by {tx_ok}, sink logged {ours_tx} TX rekeys, want >= 1"
        );
        if duplex > 0 {
            // The writer thread wrote between the update requests: it answered most of them.
            assert!(
                ours_tx >= REKEYS / 4,
                "the writer thread did {ours_tx} TX rekeys for {} requests",
                REKEYS.div_ceil(2)
            );
        }
    }
    check.finish_with_markers(&lines, &[&data[..40]]);
}

#[test]
fn openssl_s_server_key_updates_reach_tether_client_intact() {
    transfer_with_key_updates("ku-server", "s_server", 100, 0);
}

#[test]
fn openssl_s_client_key_updates_reach_tether_server_intact() {
    transfer_with_key_updates("ku-client", "s_client", 100, 0);
}

/// Issue 12: the reader follows the peer's KeyUpdate(update_requested) while another thread
/// writes; the TX rekey is done by that writer's next write, so neither stream is corrupted.
#[test]
fn key_update_requested_while_another_thread_writes_keeps_both_streams_intact() {
    transfer_with_key_updates("ku-duplex", "s_server", 20, 20);
}

/// Send argv[2] bytes of [`payload`]'s digit lines to 127.0.0.1:argv[1], then read the peer's
/// one-line reply (its sha256 of what it received) and print it.
const PY_SENDER: &str = r#"
import socket, sys
port, want = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=60)
i, sent = 0, 0
while sent < want:
    block = b"".join(b"%063d\n" % ((i * 256 + k) * 2654435761 % 10**18) for k in range(256))
    block = block[: want - sent]
    s.sendall(block); sent += len(block); i += 1
reply = b""
while not reply.endswith(b"\n"):
    d = s.recv(4096)
    if not d:
        break
    reply += d
print("sent=%d" % sent)
print("reply=" + reply.decode().strip(), flush=True)
"#;

/// The bytes PY_SENDER sends.
fn sender_payload(len: u64) -> Vec<u8> {
    digit_blocks(len, 256, 2_654_435_761)
}

/// Issue 12: `key_update_after = "1MiB"` on both sides of a tether<->tether transfer: each side
/// rotates its keys (a KeyUpdate asking the peer to rotate too) every MiB, the stream stays
/// intact, and the kernel counted the rekeys. On the host (relay) rustls rotates; on a kernel
/// that cannot rekey kTLS the rule takes the relay instead of kTLS.
#[test]
fn key_update_after_rotates_keys_on_both_sides_of_a_tether_transfer() {
    let port = free_port();
    let rule = |dir: &str| {
        if dir == "in" {
            format!("[[inbound]]\nports = [{port}]\nallow = [\"{ANY_ID}\"]\nkey_update_after = \"1MiB\"\n")
        } else {
            format!("[[outbound]]\nto = [\"127.0.0.1/32:{port}\"]\nallow = [\"{ANY_ID}\"]\nkey_update_after = \"1MiB\"\n")
        }
    };
    let mut h = Harness::new("ku-after", Policy::new().raw(&rule("in")).raw(&rule("out")));
    let len = scaled_bytes(100);
    let data = sender_payload(len);
    let want_sha = sha256_hex(&data, &h);
    let sink = h.script("sink.py", PY_SINK);
    let sender = h.script("sender.py", PY_SENDER);
    let check = DataPathCheck::begin(&h, port);
    let before = TlsStat::read();
    let mut sink_cmd = Command::new(PYTHON);
    sink_cmd
        .arg(&sink)
        .args(["listen", &port.to_string(), &len.to_string()]);
    h.spawn("sink", h.shim(&mut sink_cmd, "sink"));
    h.wait_stdout("sink", Duration::from_secs(20), |o| o.contains("listening"));
    let mut sender_cmd = Command::new(PYTHON);
    sender_cmd
        .arg(&sender)
        .args([&port.to_string(), &len.to_string()]);
    let run = h.run(
        "sender",
        h.shim(&mut sender_cmd, "sender"),
        Duration::from_secs(900),
    );
    let out = h.wait_stdout("sink", Duration::from_secs(60), |o| o.contains("done"));
    let diag = diagnose(port);
    let after = TlsStat::read();
    let (sink_lines, sender_lines) = (h.log_lines("sink"), h.log_lines("sender"));
    let tx = |lines: &[tether_shim_tests::LogLine]| {
        lines
            .iter()
            .filter(|l| l.get("event") == "rekey" && l.get("dir") == "tx")
            .count()
    };
    let (sink_tx, sender_tx) = (tx(&sink_lines), tx(&sender_lines));
    let rx_ok = after.get("TlsRxRekeyOk") - before.get("TlsRxRekeyOk");
    let tx_ok = after.get("TlsTxRekeyOk") - before.get("TlsTxRekeyOk");
    eprintln!(
        "ku-after: {len} bytes, end={}, sender TX rekeys {sender_tx}, sink TX rekeys {sink_tx}, TlsTxRekeyOk +{tx_ok}, TlsRxRekeyOk +{rx_ok} (mode {})",
        field(&out, "end="),
        tether_shim_tests::expected_mode()
    );
    assert_eq!(
        field(&out, "end="),
        "complete",
        "{}\n{diag}\n{}\n{}",
        without_progress(&out),
        show(&sink_lines),
        show(&sender_lines)
    );
    assert_eq!(
        field(&out, "sha="),
        want_sha,
        "stream corrupted across key rotations"
    );
    assert!(
        run.stdout.contains(&format!("reply=sink-sha={want_sha}")),
        "sender did not get the reply:\n{}",
        run.stdout
    );
    let can_rotate_in_kernel =
        !tether_shim_tests::in_uml() || tether_shim_tests::kernel_can_rekey_ktls();
    if !can_rotate_in_kernel {
        // 6.1: the rule took the relay (rustls rotates there), never kTLS.
        for lines in [&sink_lines, &sender_lines] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.get("mode") == "userspace"
                        && l.get("detail").contains("cannot rekey")),
                "{}",
                show(lines)
            );
        }
        return;
    }
    if tether_shim_tests::in_uml() {
        // About one rotation per MiB sent + received per side (the timer looks every 50 ms, so
        // a fast transfer rotates less often): at least 50 on a 100 MB run.
        let want = (len >> 21).clamp(1, 50) as usize;
        assert!(
            sender_tx >= want,
            "sender rotated {sender_tx} times, want >= {want}"
        );
        assert!(
            sink_tx >= 1,
            "the sink never rotated its TX key (its reply is its only write)"
        );
        assert!(
            tx_ok >= (sender_tx + sink_tx) as u64,
            "TlsTxRekeyOk +{tx_ok}"
        );
        assert!(
            rx_ok >= (sender_tx + sink_tx) as u64,
            "TlsRxRekeyOk +{rx_ok}"
        );
    }
    check.finish_with_markers(&sink_lines, &[&data[..40]]);
}
