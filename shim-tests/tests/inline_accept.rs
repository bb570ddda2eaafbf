//! Issue 14 (setup path): accept finishes a server handshake on its own thread when the client
//! keeps up, and a client that sends its ClientHello and then stalls delays nobody beyond the
//! inline bound (ARCHITECTURE.md "Inbound (accept)").

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_shim_tests::{
    echo_server, free_port, real_client_hello, show, DataPathCheck, Harness, LogLine, Policy, PYTHON, PY_ASYNCIO_ECHO_SERVER, PY_MARKER_CLIENT,
};

/// A raw client that sends a whole ClientHello with its first segment and then goes silent;
/// returns once the server's flight has come back (so the server has really begun its handshake).
fn staller(port: u16, hello: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], 0x16, "the server answered the ClientHello with a handshake record");
    s
}

fn accepted(lines: &[LogLine]) -> Vec<&LogLine> {
    lines.iter().filter(|l| l.is("accept", "allow")).collect()
}

/// `ROUNDS` sequential connections from one process (its SVID fetched once), each echoing MARKER.
const PY_SEQUENTIAL_CLIENT: &str = r#"
import socket, sys
port, rounds, m = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
ok = 0
for _ in range(rounds):
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        d = s.recv(65536)
        if not d:
            break
        got += d
    ok += got == m
    s.close()
print("echo_ok=%d" % ok, flush=True)
"#;

#[test]
fn server_handshake_finishes_inline_at_accept_when_the_client_keeps_up() {
    const ROUNDS: usize = 20;
    let port = free_port();
    let mut h = Harness::new("inline-accept", Policy::new().both(port));
    h.spawn_server("server", h.shim(&mut echo_server(port), "server"), port);
    let client = h.script("sequential_client.py", PY_SEQUENTIAL_CLIENT);
    let check = DataPathCheck::begin(&h, port);
    let marker = "INLINE-ACCEPT-MARKER-4711";
    let mut c = Command::new(PYTHON);
    c.arg(&client).arg(port.to_string()).arg(ROUNDS.to_string()).arg(marker);
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(60));
    assert!(run.success() && run.stdout.contains(&format!("echo_ok={ROUNDS}")), "{run}");
    let lines = h.wait_log("server", Duration::from_secs(3), |l| accepted(l).len() >= ROUNDS);
    let ok = accepted(&lines);
    assert_eq!(ok.len(), ROUNDS, "{}", show(&lines));
    let inline = ok.iter().filter(|l| l.get("at") == "inline").count();
    eprintln!("{inline} of {ROUNDS} server handshakes finished inline at accept");
    assert!(ok.iter().all(|l| matches!(l.get("at"), "inline" | "worker")), "{}", show(&lines));
    assert!(inline >= 1, "no handshake finished inline at accept:\n{}", show(&lines));
    check.finish_with_markers(&lines, &[marker.as_bytes()]);
}

#[test]
fn client_hello_then_silence_does_not_delay_a_good_client() {
    let port = free_port();
    // The staller's handshake fails at this timeout; an accept that waited for it would hold
    // the good client at least this long.
    let timeout_ms = 4000;
    let mut h = Harness::new("inline-stall", Policy::new().both(port));
    let mut server = echo_server(port);
    server.env("TETHER_HANDSHAKE_TIMEOUT_MS", timeout_ms.to_string());
    h.spawn_server("server", h.shim(&mut server, "server"), port);
    let client = h.script("timed_client.py", PY_MARKER_CLIENT);
    let marker = "INLINE-STALL-GOOD-CLIENT-0042";
    let good = |name: &str| {
        let mut c = Command::new(PYTHON);
        c.arg(&client).arg(port.to_string()).arg(marker);
        let run = h.run(name, h.shim(&mut c, "good"), Duration::from_secs(30));
        assert!(run.success() && run.stdout.contains("echo_ok"), "{name}: {run}\n{}", show(&h.log_lines("server")));
        run.stdout.split_whitespace().find_map(|w| w.strip_prefix("served_in_ms=")?.parse::<u64>().ok()).unwrap()
    };
    let warm = good("warm");
    let hello = real_client_hello();
    let check = DataPathCheck::begin(&h, port);
    let mut stalled = Vec::new();
    let mut worst = 0;
    for i in 0..5 {
        let t0 = Instant::now();
        stalled.push(staller(port, &hello));
        let answered = t0.elapsed();
        let ms = good(&format!("good{i}"));
        eprintln!("staller {i}: server flight after {answered:?}; good client then served in {ms} ms (warm-up {warm} ms)");
        worst = worst.max(ms);
    }
    assert!(worst < 1000, "a good client took {worst} ms behind a stalled handshake (its timeout is {timeout_ms} ms)");
    // The stalled handshakes really were under way, and end at the timeout on a worker.
    let lines = h.wait_log("server", Duration::from_millis(timeout_ms + 3000), |l| {
        l.iter().filter(|l| l.is("accept", "deny") && l.get("reason").contains("timed out")).count() >= 5
    });
    let timed_out = lines.iter().filter(|l| l.is("accept", "deny") && l.get("reason").contains("timed out")).count();
    assert_eq!(timed_out, 5, "the stalled handshakes did not time out:\n{}", show(&lines));
    check.finish_with_markers(&lines, &[marker.as_bytes()]);
    drop(stalled);
}

/// An event loop must not block in accept beyond the bound: an established connection's echo
/// keeps its latency while clients send a ClientHello and stall.
#[test]
fn stalled_client_hellos_do_not_stall_an_event_loop_beyond_the_bound() {
    // One connection; each line it sends is echoed; prints the worst round trip.
    const PINGER: &str = r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print("connected", flush=True)
worst, n, end = 0.0, 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.monotonic()
    s.sendall(b"ping\n")
    got = b""
    while len(got) < 5:
        got += s.recv(64)
    worst = max(worst, time.monotonic() - t)
    n += 1
    time.sleep(0.002)
print("pings=%d worst_ms=%.1f" % (n, worst * 1000), flush=True)
"#;
    let port = free_port();
    let mut h = Harness::new("inline-loop", Policy::new().both(port));
    h.serve_python("server", port, "aserver.py", PY_ASYNCIO_ECHO_SERVER, &[]);
    let pinger = h.script("pinger.py", PINGER);
    let mut p = Command::new(PYTHON);
    p.arg(&pinger).arg(port.to_string()).arg("3");
    h.spawn("pinger", h.shim(&mut p, "pinger"));
    h.wait_stdout("pinger", Duration::from_secs(20), |o| o.contains("connected"));
    let hello = real_client_hello();
    // Fewer than the 8 a process claims from a listener: each stalled one holds its claim until
    // the handshake timeout (as before inline handshakes), and more would wait in the backlog.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        stalled.push(staller(port, &hello));
    }
    let out = h.wait_stdout("pinger", Duration::from_secs(20), |o| o.contains("worst_ms="));
    let worst: f64 = out.split_whitespace().find_map(|w| w.strip_prefix("worst_ms=")?.parse().ok()).unwrap();
    eprintln!("{} stalled ClientHellos; {out}", stalled.len());
    assert!(worst < 250.0, "the event loop stalled {worst} ms while clients stalled their handshakes");
    drop(stalled);
}
