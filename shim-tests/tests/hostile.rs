//! Acceptance 10: hostile peers against a protected server (garbage, a truncated ClientHello,
//! silence). They are dropped, the silent ones at the handshake timeout, and good clients are
//! still served.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tether_shim_tests::{
    curl_get, free_port, http_server, nginx, real_client_hello, show, wait_dropped, Harness, LogLine, Policy,
};

fn count(lines: &[LogLine], reason: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.is("accept", "deny") && l.get("reason").contains(reason))
        .count()
}

/// Acceptance 10: Garbage, a truncated ClientHello and a silent client against python http.server under
/// tether (handshake timeout 1 s): all are dropped, the silent and truncated ones at the
/// timeout, and good clients are served while and after they hang around.
#[test]
fn hostile_clients_are_dropped_and_good_clients_still_served() {
    let timeout = Duration::from_millis(1000);
    let port = free_port();
    let mut h = Harness::new("hostile", Policy::new().both(port));
    let www = h.www("still here\n");
    let mut server = http_server(port, &www);
    server.env(
        "TETHER_HANDSHAKE_TIMEOUT_MS",
        timeout.as_millis().to_string(),
    );
    h.spawn_server("server", h.shim(&mut server, "server"), port);
    let hello = real_client_hello();

    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(&addr).unwrap();
    let mut garbage = TcpStream::connect(&addr).unwrap();
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
        .collect();
    garbage.write_all(&junk).unwrap();
    let mut truncated = TcpStream::connect(&addr).unwrap();
    truncated.write_all(&hello[..50]).unwrap();

    let good = |name: &str| {
        let mut c = curl_get(
            &format!("http://{addr}/index.html"),
            &h.path(&format!("{name}.out")),
        );
        let run = h.run(name, h.shim(&mut c, name), Duration::from_secs(40));
        assert!(
            run.success(),
            "{name} failed: {run}\n{}",
            show(&h.log_lines(name))
        );
        assert_eq!(
            fs::read_to_string(h.path(&format!("{name}.out"))).unwrap(),
            "still here\n"
        );
    };
    good("good-during");

    wait_dropped(&mut garbage, "garbage", Duration::from_secs(5));
    wait_dropped(
        &mut truncated,
        "truncated ClientHello",
        timeout * 5 + Duration::from_secs(5),
    );
    wait_dropped(
        &mut silent,
        "silent client",
        timeout * 5 + Duration::from_secs(5),
    );
    assert!(
        t0.elapsed() >= timeout * 9 / 10,
        "silent client dropped before the handshake timeout"
    );
    good("good-after");

    let lines = h.wait_log("server", Duration::from_secs(3), |l| {
        count(l, "timed out") >= 2 && count(l, "not speaking TLS") >= 1
    });
    assert!(
        count(&lines, "timed out") >= 2,
        "silent and truncated clients were not logged as timed out:\n{}",
        show(&lines)
    );
    assert!(
        count(&lines, "not speaking TLS") >= 1,
        "garbage client not logged as non-TLS:\n{}",
        show(&lines)
    );
    for l in lines
        .iter()
        .filter(|l| l.is("accept", "deny") && l.get("reason").contains("timed out"))
    {
        assert_eq!(l.get("errno"), "ETIMEDOUT", "{}", l.raw);
    }
    assert_eq!(
        lines.iter().filter(|l| l.is("accept", "allow")).count(),
        2,
        "{}",
        show(&lines)
    );
}

/// Acceptance 10b: nginx (one worker, epoll, non-blocking listener) keeps serving a good client while a
/// silent client sits in its accept queue: the good client must not wait for the silent one's
/// handshake timeout. (The handshake runs inside accept(2); if it is serialised, one idle TCP
/// connection freezes the whole event loop for the timeout.)
#[test]
fn nginx_serves_good_client_while_silent_client_is_pending() {
    let timeout = Duration::from_millis(6000);
    let port = free_port();
    let mut h = Harness::new("hostile-nginx", Policy::new().both(port));
    let (mut cmd, prefix) = nginx(&h, port);
    fs::write(prefix.join("www/index.html"), "still here\n").unwrap();
    cmd.env(
        "TETHER_HANDSHAKE_TIMEOUT_MS",
        timeout.as_millis().to_string(),
    );
    h.spawn_server("nginx", h.shim(&mut cmd, "nginx"), port);

    let addr = format!("127.0.0.1:{port}");
    let mut silent = TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let check = tether_shim_tests::DataPathCheck::begin(&h, port);
    let t = Instant::now();
    let mut c = curl_get(&format!("http://{addr}/index.html"), &h.path("good.out"));
    let run = h.run("good", h.shim(&mut c, "good"), Duration::from_secs(40));
    let waited = t.elapsed();
    assert!(
        run.success(),
        "good client failed: {run}\n{}",
        show(&h.log_lines("good"))
    );
    check.finish_with_markers(&h.log_lines("good"), &[b"GET /index.html", b"still here"]);
    assert!(
        waited < timeout / 2,
        "the good client waited {waited:?} behind a silent client (handshake timeout {timeout:?}): \
         the protected server stops serving while one peer stays silent"
    );
    wait_dropped(
        &mut silent,
        "silent client",
        timeout + Duration::from_secs(5),
    );
}
