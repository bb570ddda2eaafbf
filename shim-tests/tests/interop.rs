//! Acceptance 7: interop with a standard TLS stack (OpenSSL) in both directions, using an SVID
//! written by `tether svid --out`.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::Duration;

use tether_shim_tests::{
    curl_with_headers, derived_id, expect_line, free_port, openssl_s_client, openssl_s_server, show, tether_cli_path,
    DataPathCheck, Harness, Policy,
};

/// `openssl s_server -Verify 1` (client certificate required, the bundle as CA) accepts curl
/// under tether; the GET reaches OpenSSL and its status page (naming curl's SVID) comes back. OpenSSL sends two
/// session tickets after the handshake: under kTLS the shim's read slow path must drop them.
#[test]
fn openssl_s_server_requiring_client_cert_accepts_tether_client() {
    let port = free_port();
    let mut h = Harness::new(
        "s-server",
        Policy::new().outbound(port, &[tether_shim_tests::ANY_ID]),
    );
    let mut server = openssl_s_server(&h.svid_files(), port, &["-www"]);
    h.spawn_server("s_server", h.plain(&mut server), port);
    let check = DataPathCheck::begin(&h, port);

    let mut curl = curl_with_headers(&format!("http://127.0.0.1:{port}/tether-was-here"), 30);
    let run = h.run("curl", h.shim(&mut curl, "curl"), Duration::from_secs(40));
    let lines = h.log_lines("curl");
    assert!(
        run.success(),
        "curl via tether to openssl s_server failed: {run}\n{}\n{}",
        show(&lines),
        h.output("s_server")
    );
    assert!(
        run.stdout.starts_with("HTTP/1.0 200"),
        "no HTTP response: {run}"
    );
    // The -www page describes the session, including the client certificate it verified.
    assert!(
        !run.stdout.contains("no client certificate available"),
        "s_server saw no client cert: {run}"
    );
    let curl_uri = format!("URI:{}", derived_id("/usr/bin/curl"));
    assert!(
        run.stdout.contains(&curl_uri),
        "s_server's page does not show curl's SVID ({curl_uri}): {run}"
    );
    let allow = expect_line(&lines, "connect", "allow");
    assert_eq!(
        allow.get("peer_id"),
        derived_id(tether_cli_path().to_str().unwrap()),
        "{}",
        allow.raw
    );
    check.finish(&lines);
}

/// `openssl s_client` presenting the `tether svid --out` SVID reaches python http.server under
/// tether and gets an HTTP response to its GET.
#[test]
fn openssl_s_client_with_exported_svid_reaches_tether_server() {
    let port = free_port();
    let mut h = Harness::new(
        "s-client",
        Policy::new().inbound(port, &[tether_shim_tests::ANY_ID]),
    );
    let svid = h.svid_files();
    h.serve_http("server", port, "served through tether\n");
    let check = DataPathCheck::begin(&h, port);

    let run = openssl_s_client(&h, &svid, port, &[], "GET /index.html HTTP/1.0\r\nHost: t\r\n\r\n");
    let server = h.wait_log("server", Duration::from_secs(3), |l| {
        l.iter().any(|l| l.is("accept", "allow"))
    });
    assert!(
        run.stdout.contains("HTTP/1.0 200"),
        "s_client got no HTTP response: {run}\n{}",
        show(&server)
    );
    assert!(
        run.stdout.contains("served through tether"),
        "no body: {run}"
    );
    let allow = expect_line(&server, "accept", "allow");
    assert_eq!(
        allow.get("peer_id"),
        derived_id(tether_cli_path().to_str().unwrap()),
        "{}",
        allow.raw
    );
    check.finish(&server);
}

/// Client: read until "hello2" arrives, the stream ends, or an error; report how it ended.
const PY_KEYUPDATE_READER: &str = r#"
import errno, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
print("connected", flush=True)
data, end = b"", "eof"
try:
    while b"hello2" not in data:
        d = s.recv(4096)
        if not d:
            break
        data += d
    if b"hello2" in data:
        end = "complete"
except socket.timeout:
    end = "timeout"
except OSError as e:
    end = "errno_" + errno.errorcode.get(e.errno, str(e.errno))
print("got=%r" % (data,))
print("end=" + end)
print("done", flush=True)
"#;

/// `openssl s_server` sends a TLS 1.3 KeyUpdate between two lines of data. Userspace rustls
/// must carry on; kTLS must rekey on Linux >= 6.14 and fail closed with ECONNRESET before
/// (6.1 cannot rekey RX): never EIO, never a hang, never garbage.
#[test]
fn openssl_key_update_mid_stream_is_handled_or_fails_closed() {
    use std::io::Write as _;
    let port = free_port();
    let mut h = Harness::new(
        "keyupdate",
        Policy::new().outbound(port, &[tether_shim_tests::ANY_ID]),
    );
    let mut server = openssl_s_server(&h.svid_files(), port, &[]);
    let mut stdin = h.spawn_with_stdin("s_server", h.plain(&mut server));
    h.wait_listening("s_server", port);
    let mut client = h.python("ku_reader.py", PY_KEYUPDATE_READER);
    client.arg(port.to_string());
    h.spawn("reader", h.shim(&mut client, "reader"));
    let out = h.wait_stdout("reader", Duration::from_secs(20), |o| {
        o.contains("connected") || o.contains("done")
    });
    assert!(
        out.contains("connected"),
        "reader did not connect: {out}\n{}",
        show(&h.log_lines("reader"))
    );
    std::thread::sleep(Duration::from_millis(500));
    for line in ["hello1\n", "k\n", "hello2\n"] {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = h.wait_stdout("reader", Duration::from_secs(30), |o| o.contains("done"));
    let end = out
        .lines()
        .find_map(|l| l.strip_prefix("end="))
        .unwrap_or("(none)")
        .to_string();
    let s_server = h.output("s_server");
    assert!(
        out.contains("hello1"),
        "data before the KeyUpdate was lost: {out}\n{s_server}\n{}",
        show(&h.log_lines("reader"))
    );
    // s_server reports its `k` command (SSL_key_update + SSL_do_handshake) this way.
    assert!(
        s_server.contains("SSL_do_handshake -> 1"),
        "s_server did not send a KeyUpdate:\n{s_server}"
    );
    if tether_shim_tests::in_uml() && !tether_shim_tests::kernel_can_rekey_ktls() {
        assert_eq!(end, "errno_ECONNRESET", "kTLS after KeyUpdate on a kernel without rekey: {out}");
    } else {
        assert_eq!(
            end,
            "complete",
            "userspace path did not survive a KeyUpdate: {out}\n{}",
            show(&h.log_lines("reader"))
        );
    }
    eprintln!(
        "KeyUpdate: reader ended with {end} (mode {})",
        tether_shim_tests::expected_mode()
    );
}
