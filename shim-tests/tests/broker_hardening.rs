//! The shim against a hardened tetherd: processes without an identity still get the policy,
//! and tetherd's per-user shares keep one user from cutting everyone's networking.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use tether_shim_tests::{curl_get, expect_line, free_port, http_server, show, Harness, Policy, ANY_ID};

/// Under `unmatched = "deny"` a program with no registration entry used to get EACCES on
/// every TCP connect, protected or not. Now it reaches an unprotected port in plaintext (as
/// without tether), and only the protected one fails, with a reason naming the missing entry.
#[test]
fn unmatched_program_under_deny_reaches_an_unprotected_port_and_not_a_protected_one() {
    let open = free_port();
    let protected = free_port();
    let mut h = Harness::new("noid", Policy::new().unmatched("deny").outbound(protected, &[ANY_ID]));
    let www = h.www("unprotected page\n");
    h.spawn_server("open", h.plain(&mut http_server(open, &www)), open);
    h.spawn_server("protected", h.plain(&mut http_server(protected, &www)), protected);

    let mut ok = curl_get(&format!("http://127.0.0.1:{open}/index.html"), &h.path("open.out"));
    let run = h.run("curl-open", h.shim(&mut ok, "curl-open"), Duration::from_secs(30));
    assert!(run.success(), "the unprotected port must be reachable: {run}\n{}", show(&h.log_lines("curl-open")));
    assert_eq!(fs::read_to_string(h.path("open.out")).unwrap(), "unprotected page\n");

    let mut refused = curl_get(&format!("http://127.0.0.1:{protected}/index.html"), &h.path("prot.out"));
    let run = h.run("curl-prot", h.shim(&mut refused, "curl-prot"), Duration::from_secs(30));
    assert!(!run.success(), "the protected port must be refused: {run}");
    let lines = h.log_lines("curl-prot");
    let deny = expect_line(&lines, "connect", "deny");
    assert_eq!(deny.get("errno"), "EACCES", "{}", deny.raw);
    assert!(deny.get("reason").contains("registration entry"), "{}", deny.raw);
    assert!(!h.path("prot.out").exists() || fs::read(h.path("prot.out")).unwrap().is_empty());
}

/// One user holding 1,000 connections to tetherd (a 0666 socket) used to make every new
/// process get `busy` and then EACCES on each protected connect. The hog (nobody) is held to
/// its own share; root's protected connect still works and is TLS on the wire.
#[test]
fn one_uid_holding_1000_broker_connections_does_not_stop_another_uids_protected_connect() {
    let port = free_port();
    let mut h = Harness::new("hog", Policy::new().both(port));
    let www = h.www("protected page\n");
    h.spawn_server("server", h.shim(&mut http_server(port, &www), "server"), port);
    let script = format!(
        "import socket, time\nheld = []\nfor _ in range(1000):\n    c = socket.socket(socket.AF_UNIX)\n    \
         c.connect({:?})\n    held.append(c)\nprint(len(held), flush=True)\ntime.sleep(60)\n",
        h.socket().display().to_string()
    );
    let mut hog = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(hog.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "1000");
    // Let tetherd accept the whole backlog, so the hog holds all it can.
    std::thread::sleep(Duration::from_millis(300));

    let mut c = curl_get(&format!("http://127.0.0.1:{port}/index.html"), &h.path("c.out"));
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(30));
    let _ = hog.kill();
    let _ = hog.wait();
    assert!(run.success(), "root's protected connect failed: {run}\n{}", show(&h.log_lines("client")));
    assert_eq!(fs::read_to_string(h.path("c.out")).unwrap(), "protected page\n");
    let lines = h.log_lines("client");
    let allow = expect_line(&lines, "connect", "allow");
    // The allow line names the server's verified SPIFFE ID: a TLS handshake took place.
    assert!(allow.raw.contains("spiffe://tether.internal/"), "{}", allow.raw);
}
