//! `tether doctor` against a real tetherd: on this host (no kTLS: it must say so and how to fix
//! it) and, through scripts/test-doctor-uml, inside User-Mode Linux (kTLS ok, ciphers listed,
//! rekey and TLS_RX_EXPECT_NO_PAD as that kernel has them: UML 7.2 rekeys, 6.1 cannot).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::{built_lib, Daemon, TempDir, TETHER};
use serde_json::Value;

fn doctor(args: &[&str]) -> (Output, Vec<Value>) {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let out = Command::new(TETHER)
        .args(&all)
        .env_remove("TETHER_MODE")
        .env_remove("TETHER_LIB")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out, v.as_array().unwrap().clone())
}

fn finding<'a>(findings: &'a [Value], check: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} in {findings:#?}"))
}

/// Whether this kernel has kTLS, decided independently of the doctor: scripts/test-doctor-uml
/// runs this test inside UML (TETHER_IN_UML=1), where tls.ko is loaded; the host has no kTLS.
fn kernel_has_ktls() -> bool {
    std::env::var_os("TETHER_IN_UML").is_some_and(|v| v == "1")
        || Path::new("/sys/module/tls").exists()
}

/// The running kernel's release is at least `major.minor`. This is the test's independent oracle
/// for what the doctor probes (kTLS rekey arrived in Linux 6.14, TLS_RX_EXPECT_NO_PAD in 6.0).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut it = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let v = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    v >= (major, minor)
}

#[test]
fn doctor_reports_kernel_tls_and_a_healthy_setup() {
    let d = Daemon::start(&[]);
    let root = TempDir::new("doctor-root");
    let lib = built_lib();
    let (out, f) = doctor(&[
        "--socket",
        d.socket.to_str().unwrap(),
        "--root",
        root.path().to_str().unwrap(),
        "--lib",
        lib.to_str().unwrap(),
    ]);
    for check in [
        "ktls",
        "ktls-module",
        "ktls-ciphers",
        "ktls-rekey",
        "ktls-no-pad",
        "tetherd",
        "clock",
        "preload",
        "library",
        "glibc",
    ] {
        let x = finding(&f, check);
        assert!(x["detail"].as_str().is_some_and(|s| !s.is_empty()), "{x}");
        assert_eq!(
            x["fix"].is_null(),
            x["status"] == "ok",
            "a fix exactly when not ok: {x}"
        );
    }
    if kernel_has_ktls() {
        assert_eq!(finding(&f, "ktls")["status"], "ok");
        assert_eq!(finding(&f, "ktls-module")["status"], "ok");
        let ciphers = finding(&f, "ktls-ciphers");
        assert_eq!(ciphers["status"], "ok", "{ciphers}");
        for c in ["aes-gcm-128", "aes-gcm-256", "chacha20-poly1305"] {
            assert!(ciphers["detail"].as_str().unwrap().contains(c), "{ciphers}");
        }
        let rekey = finding(&f, "ktls-rekey");
        let detail = rekey["detail"].as_str().unwrap();
        if kernel_at_least(6, 14) {
            assert_eq!(rekey["status"], "ok", "{rekey}");
            assert!(detail.contains("kernel rekeys kTLS"), "{rekey}");
            assert!(
                detail.contains("TlsTxRekeyOk") && detail.contains("TlsRxRekeyOk"),
                "{rekey}"
            );
        } else {
            assert_eq!(rekey["status"], "warn", "{rekey}");
            assert!(
                detail.starts_with("kTLS rekey: unsupported (kernel ")
                    && detail.contains("), peers that send KeyUpdate will be reset")
                    && detail.contains("EBUSY"),
                "{rekey}"
            );
            assert!(rekey["fix"].as_str().unwrap().contains("6.14"), "{rekey}");
        }
        let no_pad = finding(&f, "ktls-no-pad");
        assert_eq!(
            no_pad["status"],
            if kernel_at_least(6, 0) { "ok" } else { "warn" },
            "{no_pad}"
        );
        assert!(
            no_pad["detail"]
                .as_str()
                .unwrap()
                .contains("TLS_RX_EXPECT_NO_PAD"),
            "{no_pad}"
        );
    } else {
        for check in ["ktls-rekey", "ktls-no-pad"] {
            let x = finding(&f, check);
            assert_eq!(x["status"], "warn", "{x}");
            assert!(x["detail"].as_str().unwrap().contains("not tested"), "{x}");
        }
        let k = finding(&f, "ktls");
        assert_eq!(k["status"], "warn", "no kTLS is degraded, not fatal: {k}");
        assert!(k["detail"].as_str().unwrap().contains("ENOENT"), "{k}");
        assert!(k["detail"].as_str().unwrap().contains("userspace"), "{k}");
        assert!(k["fix"].as_str().unwrap().contains("modprobe tls"), "{k}");
    }
    let t = finding(&f, "tetherd");
    assert_eq!(t["status"], "ok", "{t}");
    let detail = t["detail"].as_str().unwrap();
    assert!(
        detail.contains(env!("CARGO_PKG_VERSION")) && detail.contains("tether.internal"),
        "{t}"
    );
    let clock = finding(&f, "clock");
    assert_ne!(clock["status"], "fail", "{clock}");
    assert!(
        clock["detail"]
            .as_str()
            .unwrap()
            .contains("SVID fetched now is valid"),
        "{clock}"
    );
    assert_eq!(finding(&f, "preload")["status"], "ok");
    assert!(finding(&f, "preload")["detail"]
        .as_str()
        .unwrap()
        .contains("host-wide mode off"));
    assert_ne!(finding(&f, "library")["status"], "fail");
    assert_eq!(finding(&f, "glibc")["status"], "ok");
    assert!(
        out.status.success(),
        "no FAIL, so exit 0: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The text form for people: aligned, with the fix on its own line.
    let text = Command::new(TETHER)
        .args([
            "doctor",
            "--socket",
            d.socket.to_str().unwrap(),
            "--root",
            root.path().to_str().unwrap(),
        ])
        .args(["--lib", lib.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    // Own lines: under --nocapture the harness has just printed "test NAME ... ".
    println!("\n{text}");
    assert!(text.contains("ok    tetherd"), "{text}");
    if !kernel_has_ktls() {
        assert!(
            text.contains("warn  ktls ") && text.contains("fix: modprobe tls"),
            "{text}"
        );
    }
}

#[test]
fn doctor_fails_without_tetherd_and_says_how_to_start_it() {
    let root = TempDir::new("doctor-nobroker");
    let sock = root.path().join("nothing.sock");
    let (out, f) = doctor(&[
        "--socket",
        sock.to_str().unwrap(),
        "--root",
        root.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let t = finding(&f, "tetherd");
    assert_eq!(t["status"], "fail");
    assert!(
        t["fix"]
            .as_str()
            .unwrap()
            .contains("systemctl start tetherd"),
        "{t}"
    );
}

#[test]
fn doctor_flags_a_broken_or_dangerous_ld_so_preload() {
    let root = TempDir::new("doctor-preload");
    fs::create_dir_all(root.path().join("etc")).unwrap();
    let preload = root.path().join("etc/ld.so.preload");
    let no_broker = root.path().join("none.sock");
    let args = [
        "--socket",
        no_broker.to_str().unwrap(),
        "--root",
        root.path().to_str().unwrap(),
    ];

    // An entry that does not exist: every program would print an error.
    fs::write(&preload, "/opt/gone.so\n").unwrap();
    let (_, f) = doctor(&args);
    let p = finding(&f, "preload");
    assert_eq!(p["status"], "fail", "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("/opt/gone.so"),
        "{p}"
    );

    // Host-wide mode on while tetherd is down: protected connections fail closed.
    fs::create_dir_all(root.path().join("usr/lib/tether")).unwrap();
    fs::copy(built_lib(), root.path().join("usr/lib/tether/libtether.so")).unwrap();
    fs::write(&preload, "/usr/lib/tether/libtether.so\n").unwrap();
    let (_, f) = doctor(&args);
    let p = finding(&f, "preload");
    assert_eq!(p["status"], "fail", "{p}");
    assert!(
        p["fix"]
            .as_str()
            .unwrap()
            .contains("tether install --uninstall"),
        "{p}"
    );

    // With tetherd up it is simply "on".
    let d = Daemon::start(&[]);
    let (_, f) = doctor(&[
        "--socket",
        d.socket.to_str().unwrap(),
        "--root",
        root.path().to_str().unwrap(),
    ]);
    let p = finding(&f, "preload");
    assert_eq!(p["status"], "ok", "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("host-wide mode ON"),
        "{p}"
    );
}

#[test]
fn doctor_rejects_a_library_that_is_not_libtether() {
    let root = TempDir::new("doctor-lib");
    let sock = root.path().join("none.sock");
    for (lib, why) in [
        ("/bin/sh", "not an ELF shared object"),
        ("/etc/hostname", "not an ELF file"),
    ] {
        if !Path::new(lib).exists() {
            continue;
        }
        let (out, f) = doctor(&[
            "--socket",
            sock.to_str().unwrap(),
            "--root",
            root.path().to_str().unwrap(),
            "--lib",
            lib,
        ]);
        assert_eq!(out.status.code(), Some(1));
        let l = finding(&f, "library");
        assert_eq!(l["status"], "fail", "{l}");
        assert!(l["detail"].as_str().unwrap().contains(why), "{l}");
    }
    // A real shared object without tether's hooks.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    if let Some(libm) = libm {
        let (_, f) = doctor(&[
            "--socket",
            sock.to_str().unwrap(),
            "--root",
            root.path().to_str().unwrap(),
            "--lib",
            libm,
        ]);
        let l = finding(&f, "library");
        assert!(
            l["detail"]
                .as_str()
                .unwrap()
                .contains("does not export connect"),
            "{l}"
        );
    }
}
