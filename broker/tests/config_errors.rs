//! tetherd rejects bad config files with the line and the reason, and exits 2.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{TempDir, TETHERD};

fn reject(body: &str, why: &str, line: usize) {
    let dir = TempDir::new("cfg");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, body).unwrap();
    let o = Command::new(TETHERD)
        .arg("--config")
        .arg(&path)
        .arg("--socket")
        .arg(dir.path().join("s"))
        .arg("--state-dir")
        .arg(dir.path().join("st"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(why), "want {why:?} in {err}");
    assert!(err.contains(&format!("line {line}")), "want line {line} in {err}");
    assert!(err.contains("bad.toml"), "{err}");
}

const HEAD: &str = "trust_domain = \"example.org\"\n";

#[test]
fn unknown_field() {
    reject(&format!("{HEAD}trust_domian = \"x\"\n"), "unknown field `trust_domian`", 2);
}

#[test]
fn unknown_entry_field() {
    reject(&format!("{HEAD}[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nselector = []\n"), "unknown field", 4);
}

#[test]
fn bad_spiffe_id() {
    reject(&format!("{HEAD}[[entry]]\nspiffe_id = \"spiffe://example.org/a/../b\"\nselectors = [\"unix:uid:0\"]\n"), "\".\" or \"..\"", 3);
}

#[test]
fn bad_trust_domain() {
    reject("trust_domain = \"Example.org\"\n", "trust domain may hold only", 1);
}

#[test]
fn bad_selector() {
    reject(&format!("{HEAD}[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = [\"unix:uid:0\",\n  \"unix:usr:root\"]\n"), "unknown kind", 5);
}

#[test]
fn unknown_user() {
    reject(&format!("{HEAD}[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = [\"unix:user:no-such-user-xyz\"]\n"), "no user", 4);
}

#[test]
fn bad_duration() {
    reject(&format!("{HEAD}svid_ttl = \"1 hour\"\n"), "bad duration", 2);
}

#[test]
fn bad_policy_destination() {
    reject(&format!("{HEAD}[[outbound]]\nto = [\"10.0.0.1/8:80\"]\nallow = []\n"), "host bits", 3);
}

#[test]
fn missing_config_file_exits_2() {
    let o = Command::new(TETHERD).args(["--config", "/nonexistent/t.toml"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read"));
}
