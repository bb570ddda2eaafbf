//! Standalone fleet mode on one machine: each "host" is its own tetherd with its own
//! intermediate from one offline root (`tether ca init` / `tether ca intermediate`). Programs
//! under host A's shim talk to programs under host B's shim through a tap that checks every
//! byte on the wire is a TLS record and the test's plaintext marker never appears.
//! (`scripts/test-fleet` runs the same across network namespaces joined by veth.)

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tether_shim_tests::{
    curl_get, derived_id, free_port, nginx, scaled_bytes, sha256, show, tether_cli_path,
    write_random_file, DataPathCheck, Harness, Policy, ANY_ID, TRUST_DOMAIN,
};

const MARKER: &[u8] = b"FLEET-PLAINTEXT-MARKER-7f3a";

/// Offline roots and per-host intermediates in a scratch directory (removed on drop).
struct Fleet(PathBuf);

impl Fleet {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::var_os("TETHER_E2E_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!(
                "tether-fleet-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Fleet(d)
    }

    fn ca(&self, args: &[&str]) {
        let out = Command::new(tether_cli_path())
            .arg("ca")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tether ca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `tether ca init` for `td` into `<dir>/<root>`.
    fn root(&self, root: &str, td: &str) -> PathBuf {
        let d = self.0.join(root);
        self.ca(&["init", "--out", d.to_str().unwrap(), "--trust-domain", td]);
        d
    }

    /// `tether ca intermediate` for `host` from `<dir>/<root>` into `<dir>/<host>`.
    fn host(&self, root: &str, host: &str) -> PathBuf {
        let d = self.0.join(host);
        self.ca(&[
            "intermediate",
            "--host",
            host,
            "--root",
            self.0.join(root).to_str().unwrap(),
            "--out",
            d.to_str().unwrap(),
            "--ttl",
            "1h",
        ]);
        d
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The tetherd config lines that make a harness one fleet host.
fn host_policy(host_dir: &Path) -> Policy {
    Policy::new().raw(&format!(
        "ca_cert = {:?}\nca_key = {:?}\nca_bundle = {:?}",
        host_dir.join("intermediate.pem"),
        host_dir.join("intermediate.key"),
        host_dir.join("bundle.pem")
    ))
}

/// What a tap saw in one direction.
#[derive(Debug, Default, Clone)]
struct Seen {
    bytes: u64,
    records: u64,
    app_data_bytes: u64,
    bad: Vec<String>,
    marker: bool,
}

/// Follows TLS record framing across reads and looks for the marker across chunk borders.
#[derive(Default)]
struct Scanner {
    header: Vec<u8>,
    body_left: usize,
    body_type: u8,
    tail: Vec<u8>,
    seen: Seen,
}

impl Scanner {
    fn feed(&mut self, mut data: &[u8]) {
        self.seen.bytes += data.len() as u64;
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(data);
        if window.windows(MARKER.len()).any(|w| w == MARKER) {
            self.seen.marker = true;
        }
        let keep = window.len().saturating_sub(MARKER.len() - 1);
        self.tail = window.split_off(keep);
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                if self.body_type == 0x17 {
                    self.seen.app_data_bytes += n as u64;
                }
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            self.header.push(data[0]);
            data = &data[1..];
            if self.header.len() == 5 {
                let h = std::mem::take(&mut self.header);
                let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
                let ok_type = (0x14..=0x17).contains(&h[0]);
                let ok_ver = h[1] == 3 && (h[2] == 1 || h[2] == 3);
                let bad = !ok_type || !ok_ver || len > 16384 + 256 || len == 0;
                if bad && self.seen.bad.len() < 4 {
                    self.seen.bad.push(format!(
                        "not a TLS record header (in the read ending at byte {}): {h:02x?}",
                        self.seen.bytes
                    ));
                }
                self.seen.records += 1;
                self.body_type = h[0];
                self.body_left = len;
            }
        }
    }
}

/// A plain TCP forwarder on `port` to 127.0.0.1:`to` that records what crosses it.
struct Tap {
    port: u16,
    seen: Arc<Mutex<[Seen; 2]>>,
}

impl Tap {
    fn start(to: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new([Seen::default(), Seen::default()]));
        let s = seen.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                for (dir, from, into) in [
                    (0, client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (1, server, client),
                ] {
                    let s = s.clone();
                    thread::spawn(move || pump(dir, from, into, &s));
                }
            }
        });
        Tap { port, seen }
    }

    /// Client-to-server and server-to-client.
    fn seen(&self) -> [Seen; 2] {
        self.seen.lock().unwrap().clone()
    }
}

fn pump(dir: usize, mut from: TcpStream, mut into: TcpStream, seen: &Mutex<[Seen; 2]>) {
    let mut scan = Scanner::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                scan.feed(&buf[..n]);
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = into.shutdown(Shutdown::Write);
    let mut g = seen.lock().unwrap();
    let s = &mut g[dir];
    s.bytes += scan.seen.bytes;
    s.records += scan.seen.records;
    s.app_data_bytes += scan.seen.app_data_bytes;
    s.marker |= scan.seen.marker;
    s.bad.extend(scan.seen.bad);
}

/// Assert both directions carried only TLS records, without the marker.
fn assert_tls_only(seen: &[Seen; 2], min_server_app_data: u64) {
    for (name, s) in ["client->server", "server->client"].iter().zip(seen) {
        assert!(s.records > 0, "{name}: no TLS records: {s:?}");
        assert!(s.bad.is_empty(), "{name}: non-TLS bytes on the wire: {s:?}");
        assert!(
            !s.marker,
            "{name}: the plaintext marker crossed the wire: {s:?}"
        );
    }
    assert!(
        seen[1].app_data_bytes >= min_server_app_data,
        "server->client carried only {} bytes of application data",
        seen[1].app_data_bytes
    );
}

/// Only a handshake crossed: no marker, and far fewer bytes than the 64 KiB file.
/// (TLS 1.3 encrypts handshake messages as application-data records, so count bytes.)
fn assert_no_content_served(tap: &Tap) {
    let seen = tap.seen();
    assert!(!seen[0].marker && !seen[1].marker, "{seen:?}");
    assert!(
        seen[1].bytes < 16384,
        "the server sent {} bytes: {seen:?}",
        seen[1].bytes
    );
}

/// nginx under `server`'s shim on a fresh port protected inbound (`allow`), with a file whose
/// name and content hold the marker. Returns (port, the file's path, its URL path).
fn serve(server: &mut Harness, port: u16, size: u64) -> (PathBuf, String) {
    let (mut cmd, prefix) = nginx(server, port);
    let name = format!("{}.bin", String::from_utf8_lossy(MARKER));
    let file = prefix.join("www").join(&name);
    write_random_file(&file, size);
    let mut f = fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all(MARKER).unwrap();
    server.spawn_server("nginx", server.shim(&mut cmd, "nginx"), port);
    (file, format!("/{name}"))
}

fn curl_via(client: &Harness, tap: &Tap, url_path: &str, out: &Path) -> tether_shim_tests::Run {
    let url = format!("http://127.0.0.1:{}{url_path}", tap.port);
    let mut curl = curl_get(&url, out);
    curl.env("TETHER_HANDSHAKE_TIMEOUT_MS", "5000");
    client.run(
        "curl",
        client.shim(&mut curl, "curl"),
        Duration::from_secs(150),
    )
}

fn server_denials(server: &Harness) -> Vec<tether_shim_tests::LogLine> {
    server
        .wait_log("nginx", Duration::from_secs(3), |l| {
            l.iter().any(|l| l.is("accept", "deny"))
        })
        .into_iter()
        .filter(|l| l.is("accept", "deny"))
        .collect()
}

#[test]
fn curl_on_host_a_gets_50mb_from_nginx_on_host_b_through_per_host_intermediates() {
    let fleet = Fleet::new();
    fleet.root("root", TRUST_DOMAIN);
    let (a, b) = (fleet.host("root", "a"), fleet.host("root", "b"));
    let port = free_port();
    let mut hb = Harness::new("fleet-b", host_policy(&b).inbound(port, &[ANY_ID]));
    let size = scaled_bytes(50);
    let (file, path) = serve(&mut hb, port, size);
    let tap = Tap::start(port);
    let ha = Harness::new("fleet-a", host_policy(&a).outbound(tap.port, &[ANY_ID]));
    let check = DataPathCheck::begin(&ha, port);

    let out = ha.path("big.out");
    let run = curl_via(&ha, &tap, &path, &out);
    assert!(
        run.success(),
        "curl failed: {run}\n{}",
        show(&ha.log_lines("curl"))
    );
    assert_eq!(sha256(&out), sha256(&file), "sha256 differs");
    assert_tls_only(&tap.seen(), size);

    // Each side saw the other's identity, certified by the other host's intermediate.
    let client = ha.log_lines("curl");
    let c = client.iter().find(|l| l.is("connect", "allow")).unwrap();
    assert_eq!(c.get("peer_id"), derived_id("/usr/sbin/nginx"), "{}", c.raw);
    let server = hb.wait_log("nginx", Duration::from_secs(2), |l| {
        l.iter().any(|l| l.is("accept", "allow"))
    });
    let s = server.iter().find(|l| l.is("accept", "allow")).unwrap();
    assert_eq!(s.get("peer_id"), derived_id("/usr/bin/curl"), "{}", s.raw);
    let mut all = client;
    all.extend(server);
    check.finish(&all);
}

#[test]
fn host_b_refuses_an_identity_from_host_a_that_it_does_not_allow() {
    let fleet = Fleet::new();
    fleet.root("root", TRUST_DOMAIN);
    let (a, b) = (fleet.host("root", "a"), fleet.host("root", "b"));
    let port = free_port();
    let only = format!("spiffe://{TRUST_DOMAIN}/service/db-admin");
    let mut hb = Harness::new("fleet-b-allow", host_policy(&b).inbound(port, &[&only]));
    let (_, path) = serve(&mut hb, port, 65536);
    let tap = Tap::start(port);
    let ha = Harness::new(
        "fleet-a-allow",
        host_policy(&a).outbound(tap.port, &[ANY_ID]),
    );

    let run = curl_via(&ha, &tap, &path, &ha.path("out"));
    assert!(!run.success(), "an unlisted identity got through: {run}");
    let denied = server_denials(&hb);
    assert!(
        denied
            .iter()
            .any(|l| l.get("reason").contains("not in the allow list")),
        "nginx's shim did not refuse curl's identity:\n{}",
        show(&denied)
    );
    assert_no_content_served(&tap);
}

#[test]
fn a_host_revoked_by_root_rotation_is_refused_and_a_reissued_host_is_not() {
    // Revoking host A: make a new root, re-issue every other host from it (B, C), and do not
    // re-issue A. A still holds an intermediate of the old root, which B no longer trusts.
    let fleet = Fleet::new();
    fleet.root("root1", TRUST_DOMAIN);
    let a = fleet.host("root1", "a");
    fleet.root("root2", TRUST_DOMAIN);
    let (b, c) = (fleet.host("root2", "b"), fleet.host("root2", "c"));
    let port = free_port();
    let mut hb = Harness::new("fleet-b-rot", host_policy(&b).inbound(port, &[ANY_ID]));
    let (file, path) = serve(&mut hb, port, 65536);
    let tap = Tap::start(port);

    // A has the new bundle (so it would accept B) but no new intermediate: B must refuse A.
    let both = [
        fs::read_to_string(fleet.0.join("root1/root.pem")).unwrap(),
        fs::read_to_string(fleet.0.join("root2/root.pem")).unwrap(),
    ]
    .concat();
    fs::write(a.join("bundle.pem"), both).unwrap();
    let ha = Harness::new("fleet-a-rot", host_policy(&a).outbound(tap.port, &[ANY_ID]));
    let run = curl_via(&ha, &tap, &path, &ha.path("out"));
    assert!(!run.success(), "the revoked host got through: {run}");
    let denied = server_denials(&hb);
    assert!(
        denied
            .iter()
            .any(|l| l.get("reason").contains("chain does not verify")),
        "nginx's shim did not refuse the revoked host's chain:\n{}",
        show(&denied)
    );
    assert_no_content_served(&tap);

    let hc = Harness::new("fleet-c-rot", host_policy(&c).outbound(tap.port, &[ANY_ID]));
    let out = hc.path("out");
    let run = curl_via(&hc, &tap, &path, &out);
    assert!(
        run.success(),
        "the re-issued host was refused: {run}\n{}",
        show(&hc.log_lines("curl"))
    );
    assert_eq!(sha256(&out), sha256(&file));
    assert_tls_only(&tap.seen(), 65536);
}

#[test]
fn another_trust_domain_is_refused_unless_federated() {
    let fleet = Fleet::new();
    let root = fleet.root("root", TRUST_DOMAIN);
    let other_root = fleet.root("other-root", "other.test");
    let b = fleet.host("root", "b");
    let d = fleet.host("other-root", "d");
    let other_any = "spiffe://other.test/*";
    // D (other.test) federates with tether.internal so that it accepts B's server SVID.
    let d_policy = host_policy(&d).trust_domain("other.test").raw(&format!(
        "[federated_bundles]\n{TRUST_DOMAIN:?} = {:?}",
        root.join("root.pem")
    ));

    // B without federation: D's client SVID has no trust bundle on B.
    let port = free_port();
    let mut hb = Harness::new(
        "fleet-b-td",
        host_policy(&b).inbound(port, &[ANY_ID, other_any]),
    );
    let (file, path) = serve(&mut hb, port, 65536);
    let tap = Tap::start(port);
    let hd = Harness::new("fleet-d-td", d_policy.clone().outbound(tap.port, &[ANY_ID]));
    let run = curl_via(&hd, &tap, &path, &hd.path("out"));
    assert!(!run.success(), "a foreign trust domain got through: {run}");
    let denied = server_denials(&hb);
    assert!(
        denied.iter().any(|l| l
            .get("reason")
            .contains("no trust bundle for trust domain other.test")),
        "B did not refuse the foreign trust domain:\n{}",
        show(&denied)
    );
    drop(hb);

    // B federated with other.test: accepted.
    let port2 = free_port();
    let federated = host_policy(&b)
        .raw(&format!(
            "[federated_bundles]\n\"other.test\" = {:?}",
            other_root.join("root.pem")
        ))
        .inbound(port2, &[ANY_ID, other_any]);
    let mut hb2 = Harness::new("fleet-b-fed", federated);
    let (file2, path2) = serve(&mut hb2, port2, 65536);
    let tap2 = Tap::start(port2);
    let hd2 = Harness::new("fleet-d-fed", d_policy.outbound(tap2.port, &[ANY_ID]));
    let out = hd2.path("out");
    let run = curl_via(&hd2, &tap2, &path2, &out);
    assert!(
        run.success(),
        "federated trust domain refused: {run}\n{}",
        show(&hd2.log_lines("curl"))
    );
    assert_eq!(sha256(&out), sha256(&file2));
    assert_ne!(file, file2);
    assert_tls_only(&tap2.seen(), 65536);
    let server = hb2.wait_log("nginx", Duration::from_secs(2), |l| {
        l.iter().any(|l| l.is("accept", "allow"))
    });
    let s = server.iter().find(|l| l.is("accept", "allow")).unwrap();
    assert!(
        s.get("peer_id").starts_with("spiffe://other.test/"),
        "{}",
        s.raw
    );
}
