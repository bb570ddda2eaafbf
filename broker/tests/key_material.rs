//! No stray copy of an issued private key stays in tetherd's memory: while the process that
//! got it lives, only the cache holds it (once); after that process exits, nothing does.
//! Found by reading every writable anonymous mapping of tetherd through /proc/PID/mem (root).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Daemon, TempDir};

/// The P-256 private scalar inside a PKCS#8 v1 document (after `02 01 01 04 20`).
fn scalar(pkcs8: &[u8]) -> Vec<u8> {
    let at = pkcs8.windows(5).position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20]).unwrap() + 5;
    pkcs8[at..at + 32].to_vec()
}

/// 24 base64 characters that encode only bytes of the scalar, as they appear in a frame.
fn b64_window(pkcs8: &[u8]) -> Vec<u8> {
    let at = pkcs8.windows(5).position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20]).unwrap() + 5;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8);
    // Character i encodes bits of bytes i*3/4 and (i*3+5)/4; start at a group boundary inside.
    let first = at.div_ceil(3) * 4;
    b64.as_bytes()[first..first + 24].to_vec()
}

/// Occurrences of each needle in tetherd's writable private mappings (heap, arenas, stacks).
fn scan(pid: u32, needles: &[&[u8]]) -> Vec<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut counts = vec![0; needles.len()];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        let path = f.nth(3).unwrap_or("");
        if !perms.starts_with("rw") || !(path.is_empty() || path.starts_with('[')) {
            continue;
        }
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (u64::from_str_radix(lo, 16).unwrap(), u64::from_str_radix(hi, 16).unwrap());
        let mut buf = vec![0u8; (hi - lo) as usize];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        for (n, needle) in counts.iter_mut().zip(needles) {
            *n += buf.windows(needle.len()).filter(|w| w == needle).count();
        }
    }
    counts
}

fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

#[test]
fn no_stray_copy_of_an_issued_key_in_tetherds_memory() {
    // A policy large enough that an SVID response outgrows a 4 KiB buffer after the key.
    // Process custody: the key is sent to its process, and the cache keeps it for reuse.
    let mut config = "trust_domain = \"tether.internal\"\nunmatched = \"derive\"\nkey_custody = \"process\"\n".to_owned();
    for port in 10000..10060 {
        config.push_str(&format!("[[outbound]]\nto = [\"127.0.0.1/32:{port}\"]\nallow = [\"spiffe://tether.internal/*\"]\n"));
    }
    let d = Daemon::start_with(Some(&config), &["--sweep-interval-ms", "100"]);
    let pid = d.child.id();

    // Issued to this (live) test process: the cache holds the key, once, and nothing else.
    let svid = d.fetch();
    let key = svid.private_key.unwrap().0.to_vec();
    let counts = scan(pid, &[&scalar(&key), &b64_window(&key)]);
    assert_eq!(counts, vec![1, 0], "copies of the live process's key (raw scalar, base64 in a frame)");

    // Issued to a process that then exits: once its cache entry is swept, no copy is left.
    let dir = TempDir::new("h10a-keys");
    let out = d.tether(false, &["svid", "--out", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let key = pem_der(&std::fs::read_to_string(dir.path().join("svid.key")).unwrap());
    let start = Instant::now();
    while d.client().status().unwrap().live_identities > 1 {
        assert!(start.elapsed() < Duration::from_secs(5), "the exited process was never swept");
        std::thread::sleep(Duration::from_millis(50));
    }
    let counts = scan(pid, &[&scalar(&key), &b64_window(&key)]);
    assert_eq!(counts, vec![0, 0], "copies of an exited process's key (raw scalar, base64 in a frame)");
}
