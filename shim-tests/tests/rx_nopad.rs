//! kTLS RX `TLS_RX_EXPECT_NO_PAD` (issue 14): set between tether peers (our trust domain), off
//! with `TETHER_KTLS_RX_NO_PAD=0`, and a peer that does pad (openssl `-record_padding`) still
//! gets every byte through: the kernel decrypts such a record again (TlsRxNoPadViolation,
//! TlsDecryptRetry). The kTLS cases need a kernel with kTLS (UML); on the host the shim takes the
//! userspace relay, which never sets the option, and the log says nothing about it.

#![allow(clippy::unwrap_used)] // reason: tests

use std::process::Command;
use std::time::Duration;

use tether_shim_tests::{
    bin_dir, curl_with_headers, derived_id, in_uml, openssl_s_server, scaled_bytes, show, DataPathCheck, Harness, LogLine,
    Policy, TlsStat,
};

/// bench-server (sink) and bench-client (bulk write) under the shim on `port`, `bytes` bytes;
/// returns both sides' allow lines.
fn bulk_between_tether_peers(
    h: &mut Harness,
    port: u16,
    bytes: u64,
    no_pad_env: Option<&str>,
) -> Vec<LogLine> {
    let mut server = Command::new(bin_dir().join("bench-server"));
    server.args(["--port", &port.to_string()]);
    if let Some(v) = no_pad_env {
        server.env("TETHER_KTLS_RX_NO_PAD", v);
    }
    h.spawn_server("server", h.shim(&mut server, "server"), port);
    let mut client = Command::new(bin_dir().join("bench-client"));
    client.args([
        "--port",
        &port.to_string(),
        "bulk",
        "--bytes",
        &bytes.to_string(),
    ]);
    if let Some(v) = no_pad_env {
        client.env("TETHER_KTLS_RX_NO_PAD", v);
    }
    let run = h.run(
        "client",
        h.shim(&mut client, "client"),
        Duration::from_secs(120),
    );
    assert!(
        run.success(),
        "bulk transfer failed: {run}\n{}",
        show(&h.log_lines("client"))
    );
    assert!(
        run.stdout.contains("\"op\":\"write\""),
        "no result from bench-client: {run}"
    );
    let mut lines = h.log_lines("client");
    lines.extend(h.wait_log("server", Duration::from_secs(2), |l| {
        l.iter().any(|l| l.is("accept", "allow"))
    }));
    lines
}

fn allow_lines(lines: &[LogLine]) -> Vec<&LogLine> {
    lines
        .iter()
        .filter(|l| l.get("decision") == "allow")
        .collect()
}

/// One connect and one accept were allowed, each logging `rx_no_pad=IN_UML` under kTLS (UML) and
/// no `rx_no_pad` on the relay (host).
fn assert_both_sides_log_rx_no_pad(lines: &[LogLine], in_uml_want: &str) {
    let allowed = allow_lines(lines);
    assert_eq!(allowed.len(), 2, "expected one connect and one accept:\n{}", show(lines));
    for l in &allowed {
        let want = if in_uml() { in_uml_want } else { "" };
        assert_eq!(l.get("rx_no_pad"), want, "{}", l.raw);
    }
}

/// Between two tether programs the receiving kTLS socket expects no padding, and the kernel
/// never found any: TlsRxNoPadViolation stays where it was while the bulk data arrives over
/// kTLS (TlsRxSw rose; the wire carried only TLS records).
#[test]
fn tether_peers_set_no_pad_and_the_kernel_never_sees_padding() {
    let port = tether_shim_tests::free_port();
    let mut h = Harness::new("nopad-on", Policy::new().both(port));
    let check = DataPathCheck::begin(&h, port);
    let before = TlsStat::read();
    let lines = bulk_between_tether_peers(&mut h, port, scaled_bytes(8), None);
    let after = TlsStat::read();
    assert_both_sides_log_rx_no_pad(&lines, "on");
    if in_uml() {
        assert_eq!(
            after.get("TlsRxNoPadViolation"),
            before.get("TlsRxNoPadViolation"),
            "a tether peer's record was padded"
        );
    }
    check.finish(&lines);
}

/// `TETHER_KTLS_RX_NO_PAD=0` (the bench's "NO_PAD off" rows) leaves the option unset.
#[test]
fn no_pad_can_be_turned_off() {
    let port = tether_shim_tests::free_port();
    let mut h = Harness::new("nopad-off", Policy::new().both(port));
    let check = DataPathCheck::begin(&h, port);
    let lines = bulk_between_tether_peers(&mut h, port, scaled_bytes(2), Some("0"));
    assert_both_sides_log_rx_no_pad(&lines, "off");
    check.finish(&lines);
}

/// A peer that pads every record (openssl s_server `-record_padding`), holding a tether SVID
/// (`tether svid --out`, so the shim takes it for a tether peer and sets NO_PAD): its padded
/// records still decrypt correctly. The kernel notices each one after the zero-copy decrypt and
/// decrypts it again (TlsRxNoPadViolation and TlsDecryptRetry rise), and curl gets the whole
/// page.
#[test]
fn a_padding_peer_still_decrypts_correctly_with_no_pad_set() {
    let port = tether_shim_tests::free_port();
    let mut h = Harness::new(
        "nopad-padded",
        Policy::new().outbound(port, &[tether_shim_tests::ANY_ID]),
    );
    let mut server = openssl_s_server(&h.svid_files(), port, &["-www", "-record_padding", "4096"]);
    h.spawn_server("s_server", h.plain(&mut server), port);
    let check = DataPathCheck::begin(&h, port);
    let before = TlsStat::read();
    let mut curl = curl_with_headers(&format!("http://127.0.0.1:{port}/padded"), 30);
    let run = h.run("curl", h.shim(&mut curl, "curl"), Duration::from_secs(40));
    let after = TlsStat::read();
    let lines = h.log_lines("curl");
    assert!(
        run.success(),
        "curl via tether to a padding s_server failed: {run}\n{}",
        show(&lines)
    );
    assert!(
        run.stdout.starts_with("HTTP/1.0 200"),
        "no HTTP response: {run}"
    );
    // The -www page ends the session description with the closing tags: all of it arrived.
    assert!(
        run.stdout.trim_end().ends_with("</HTML>"),
        "page cut short: {run}"
    );
    let curl_uri = format!("URI:{}", derived_id("/usr/bin/curl"));
    assert!(
        run.stdout.contains(&curl_uri),
        "s_server's page does not show curl's SVID: {run}"
    );
    let allow = allow_lines(&lines);
    assert_eq!(allow.len(), 1, "{}", show(&lines));
    if in_uml() {
        assert_eq!(allow[0].get("rx_no_pad"), "on", "{}", allow[0].raw);
        assert!(
            after.get("TlsRxNoPadViolation") > before.get("TlsRxNoPadViolation"),
            "openssl's padded records did not reach kTLS RX with NO_PAD set ({} -> {})",
            before.get("TlsRxNoPadViolation"),
            after.get("TlsRxNoPadViolation")
        );
        assert!(
            after.get("TlsDecryptRetry") > before.get("TlsDecryptRetry"),
            "no decrypt retry counted"
        );
    }
    check.finish(&lines);
}
