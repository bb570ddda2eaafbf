//! A destination written in IPv4-mapped IPv6 notation protects the IPv4 connections it names.
//! Found by the `policy` fuzz target (fuzz/README.md): such a rule matched nothing, because the
//! shim maps the destination to IPv4 before matching, so those connections went out in plaintext.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::process::Command;
use std::time::Duration;

use tether_shim_tests::{curl_get, free_port, Harness, Policy, ANY_ID};

/// A plain `nc -l` on 127.0.0.1 behind a rule for `[::ffff:127.0.0.1]/128` sees a TLS
/// ClientHello from curl, never its `GET`.
#[test]
fn mapped_v6_rule_protects_its_ipv4_destination_on_the_wire() {
    let port = free_port();
    let rule = format!("[[outbound]]\nto = [\"[::ffff:127.0.0.1]/128:{port}\"]\nallow = [\"{ANY_ID}\"]");
    let mut h = Harness::new("mapped-v6-rule", Policy::new().raw(&rule));
    let mut nc = Command::new("nc");
    nc.args(["-l", "127.0.0.1", &port.to_string()]);
    h.spawn_server("nc", h.plain(&mut nc), port);

    let mut curl = curl_get(&format!("http://127.0.0.1:{port}/secret-marker"), &h.path("out"));
    curl.env("TETHER_HANDSHAKE_TIMEOUT_MS", "2000");
    let run = h.run("curl", h.shim(&mut curl, "curl"), Duration::from_secs(30));
    assert!(!run.success(), "curl must fail against a non-TLS server: {run}");

    let got = fs::read(h.path("logs/nc.out")).unwrap();
    assert!(
        !got.windows(b"secret-marker".len()).any(|w| w == b"secret-marker"),
        "plaintext request reached the destination the rule names: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(got.len() > 5, "nc received only {} bytes", got.len());
    assert_eq!(got[0], 0x16, "first byte is not a TLS handshake record: {:02x?}", &got[..got.len().min(16)]);
    assert_eq!(got[5], 0x01, "the first handshake message is not a ClientHello");
}
