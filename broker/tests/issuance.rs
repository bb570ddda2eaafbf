//! A real tetherd issues correct, distinct SVIDs to different users and programs.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, NOBODY_UID, TETHER};
use tether_broker::server::now_unix;
use tether_proto::wire::ErrorCode;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

fn svid_json(d: &Daemon, as_nobody: bool, out: Option<&std::path::Path>) -> serde_json::Value {
    let mut args = vec!["svid", "--json"];
    let out_s;
    if let Some(o) = out {
        out_s = o.display().to_string();
        args.extend(["--out", &out_s]);
    }
    let o = d.tether(as_nobody, &args);
    assert!(o.status.success(), "tether svid failed: {}\n{}", String::from_utf8_lossy(&o.stderr), d.log_text());
    serde_json::from_slice(&o.stdout).unwrap()
}

fn openssl_verify(dir: &std::path::Path) {
    let o = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.pem"))
        .arg(dir.join("svid.pem"))
        .output()
        .unwrap();
    assert!(o.status.success(), "openssl verify: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// SPIFFE X509-SVID constraints on a DER leaf; returns the serial.
fn check_leaf(der: &[u8], want_id: &str) -> Vec<u8> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    let mut uris = Vec::new();
    let (mut ku_ok, mut bc_ok, mut eku_ok) = (false, false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(u.to_string());
                    }
                }
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ext.critical, "KU must be critical");
                assert!(ku.digital_signature());
                assert!(!ku.key_cert_sign() && !ku.crl_sign());
                ku_ok = true;
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(ext.critical, "BasicConstraints must be critical");
                assert!(!bc.ca);
                bc_ok = true;
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                eku_ok = true;
            }
            _ => {}
        }
    }
    assert_eq!(uris, vec![want_id.to_owned()], "exactly one URI SAN");
    assert!(ku_ok && bc_ok && eku_ok);
    let nb = cert.validity().not_before.timestamp() as u64;
    let na = cert.validity().not_after.timestamp() as u64;
    let now = now_unix();
    assert!(nb + 50 <= now && now <= nb + 75, "notBefore backdated ~60s: {nb} vs {now}");
    assert!(na > now + 500 && na <= now + 601, "notAfter = now + 10 min (the default svid_ttl)");
    let serial = cert.raw_serial().to_vec();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] < 0x80, "positive serial");
    serial
}

#[test]
fn root_and_nobody_get_distinct_derived_ids_with_the_embedded_default() {
    let d = Daemon::start(&[]);
    let root_out = d.dir.path().join("root-out");
    let nobody_out = d.dir.owned_subdir("nobody-out", NOBODY_UID).join("svid");
    let root = svid_json(&d, false, Some(&root_out));
    let nobody = svid_json(&d, true, Some(&nobody_out));
    let exe = TETHER.trim_start_matches('/');
    assert_eq!(root["spiffe_id"], format!("spiffe://tether.internal/uid/0/exe/{exe}"));
    assert_eq!(nobody["spiffe_id"], format!("spiffe://tether.internal/uid/65534/exe/{exe}"));
    assert_ne!(root["serial"], nobody["serial"]);
    for (dir, v) in [(&root_out, &root), (&nobody_out, &nobody)] {
        openssl_verify(dir);
        let key_mode = fs::metadata(dir.join("svid.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let pem = fs::read_to_string(dir.join("svid.pem")).unwrap();
        let der = &tether_broker::pem::decode_all(&pem, "CERTIFICATE").unwrap()[0];
        check_leaf(der, v["spiffe_id"].as_str().unwrap());
    }
    let meta = fs::metadata(nobody_out.join("svid.key")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), NOBODY_UID);
}

#[test]
fn configured_entries_for_root_and_nobody() {
    let cfg = r#"
trust_domain = "example.org"
[[entry]]
spiffe_id = "spiffe://example.org/admin"
selectors = ["unix:uid:0"]
[[entry]]
spiffe_id = "spiffe://example.org/guest"
selectors = ["unix:user:nobody"]
[[entry]]
spiffe_id = "spiffe://example.org/guest/tether-cli"
selectors = ["unix:uid:65534", "unix:group:nogroup", "unix:path:TETHER"]
"#
    .replace("TETHER", TETHER);
    let d = Daemon::start_with(Some(&cfg), &[]);
    let out = d.dir.owned_subdir("n", NOBODY_UID).join("o");
    let root = svid_json(&d, false, None);
    let nobody = svid_json(&d, true, Some(&out));
    assert_eq!(root["spiffe_id"], "spiffe://example.org/admin");
    assert_eq!(nobody["spiffe_id"], "spiffe://example.org/guest/tether-cli", "most specific entry wins");
    openssl_verify(&out);
}

#[test]
fn sha256_selector_matches_the_running_binary() {
    let digest = ring::digest::digest(&ring::digest::SHA256, &fs::read(TETHER).unwrap());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let cfg = format!(
        "trust_domain = \"example.org\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/cli\"\nselectors = [\"unix:sha256:{hex}\"]\n"
    );
    let d = Daemon::start_with(Some(&cfg), &[]);
    assert_eq!(svid_json(&d, false, None)["spiffe_id"], "spiffe://example.org/cli");
    // The test binary itself is a different executable: no entry, and unmatched = deny.
    let e = d.client().fetch_svid().unwrap_err();
    assert!(matches!(e, tether_broker::Error::Refused(ref r) if r.code == ErrorCode::NoIdentity), "{e}");
}

#[test]
fn unmatched_deny_refuses_with_no_identity_and_derive_derives() {
    let deny = Daemon::start_with(
        Some("trust_domain = \"example.org\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/admin\"\nselectors = [\"unix:uid:0\"]\n"),
        &[],
    );
    let o = deny.tether(true, &["svid"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no_identity") && err.contains("uid 65534"), "{err}");
    let log = deny.log_text();
    assert!(log.contains("refused") && log.contains("uid=65534"), "{log}");

    let derive = Daemon::start_with(Some("trust_domain = \"example.org\"\nunmatched = \"derive\"\n"), &[]);
    let v = svid_json(&derive, true, None);
    assert_eq!(v["spiffe_id"], format!("spiffe://example.org/uid/65534/exe/{}", TETHER.trim_start_matches('/')));
}

#[test]
fn x509_svid_fields_follow_the_spiffe_spec_and_serials_are_random() {
    let d = Daemon::start(&[]);
    let me = std::env::current_exe().unwrap();
    let want = format!("spiffe://tether.internal/uid/0/exe/{}", me.display().to_string().trim_start_matches('/'));
    let mut serials = HashSet::new();
    // Each CLI run is a new process, hence a fresh issuance.
    for _ in 0..5 {
        let v = svid_json(&d, false, None);
        assert!(serials.insert(v["serial"].as_str().unwrap().to_owned()));
    }
    let svid = d.fetch();
    assert_eq!(svid.spiffe_id.as_str(), want);
    assert_eq!(svid.cert_chain.len(), 1);
    assert_eq!(svid.bundle.len(), 1);
    let serial = check_leaf(&svid.cert_chain[0].0, &want);
    assert_eq!(svid.serial, serial.iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert!(!serials.contains(&svid.serial));
    assert!(svid.policy.inbound_rule(8443).is_some(), "the demo policy is served");
    // The root is a CA, and its key file is private.
    let (_, root) = X509Certificate::from_der(&svid.bundle[0].0).unwrap();
    assert!(root.is_ca());
    let key = d.dir.path().join("state/ca.key");
    assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(d.dir.path().join("state")).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn same_process_reuses_its_svid_until_half_life() {
    let d = Daemon::start_with(Some("trust_domain = \"example.org\"\nunmatched = \"derive\"\nsvid_ttl = \"4s\"\n"), &[]);
    let a = d.fetch();
    let b = d.fetch();
    assert_eq!(a.serial, b.serial, "cached per (pid, start time)");
    assert_eq!(a.not_after, b.not_after);
    std::thread::sleep(Duration::from_millis(2300));
    let c = d.fetch();
    assert_ne!(a.serial, c.serial, "reissued after half-life");
    let status = d.client().status().unwrap();
    assert_eq!(status.live_identities, 1);
    assert_eq!(status.trust_domain.as_str(), "example.org");
}

#[test]
fn exited_processes_leave_the_cache() {
    let d = Daemon::start(&["--sweep-interval-ms", "100"]);
    assert!(d.tether(false, &["svid"]).status.success());
    assert!(d.tether(false, &["svid"]).status.success());
    d.fetch();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.client().status().unwrap().live_identities, 1, "only this live test process remains");
}

#[test]
fn restart_keeps_the_generated_ca() {
    let d = Daemon::start(&[]);
    let first = d.fetch().bundle[0].0.clone();
    let state = d.dir.path().join("state");
    let mut again = std::process::Command::new(common::TETHERD)
        .arg("--socket")
        .arg(d.dir.path().join("second.sock"))
        .arg("--state-dir")
        .arg(&state)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = d.dir.path().join("second.sock");
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = tether_broker::client::Client::connect(&sock, Duration::from_secs(5)).unwrap().fetch_svid().unwrap();
    again.kill().unwrap();
    again.wait().unwrap();
    assert_eq!(second.bundle[0].0, first);
}

#[test]
fn group_readable_ca_key_is_refused() {
    let d = Daemon::start(&[]);
    let state = d.dir.path().join("state");
    fs::set_permissions(state.join("ca.key"), fs::Permissions::from_mode(0o640)).unwrap();
    let o = std::process::Command::new(common::TETHERD)
        .arg("--socket")
        .arg(d.dir.path().join("x.sock"))
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"));
}

#[test]
fn audit_log_records_issuance_and_never_a_key() {
    let d = Daemon::start(&[]);
    let svid = d.fetch();
    let out = d.dir.path().join("o");
    svid_json(&d, false, Some(&out));
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains(&svid.serial)).expect("issuance event");
    for field in ["event=\"issued\"", "pid=", "uid=0", "gid=0", "exe=", "spiffe_id=", "serial=", "expiry="] {
        assert!(line.contains(field), "missing {field}: {line}");
    }
    assert!(!log.contains("PRIVATE KEY"));
    let key_pem = fs::read_to_string(out.join("svid.key")).unwrap();
    let body: Vec<&str> = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for chunk in body {
        assert!(!log.contains(chunk), "key material in the log");
    }
    use base64::Engine;
    let exported = d.client().export_svid().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&*exported.private_key.unwrap().0);
    assert!(!log.contains(&b64[..40]));
    let ca_key = fs::read_to_string(d.dir.path().join("state/ca.key")).unwrap();
    assert!(!log.contains(ca_key.lines().nth(1).unwrap()));
}

#[test]
fn json_log_format_carries_structured_fields() {
    let d = Daemon::start(&["--log-format", "json"]);
    let svid = d.fetch();
    let log = d.log_text();
    let ev: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["serial"] == svid.serial.as_str())
        .expect("a JSON issuance event");
    assert_eq!(ev["event"], "issued");
    assert_eq!(ev["spiffe_id"], svid.spiffe_id.as_str());
    assert_eq!(ev["uid"], 0);
}

#[test]
fn status_reports_and_unreachable_is_an_error() {
    let d = Daemon::start(&[]);
    let o = d.tether(false, &["status", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust_domain"], "tether.internal");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let o = Command::new(TETHER).args(["status", "--socket", "/nonexistent/tetherd.sock"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach tetherd"));
}
