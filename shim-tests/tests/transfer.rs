//! Acceptance 1, 5, 6: unmodified programs on both sides under tether move real data.

#![allow(clippy::unwrap_used)] // reason: tests

use std::fs;
use std::process::Command;
use std::time::Duration;

use tether_shim_tests::{
    curl_get, http_server, nginx, scaled_bytes, sha256, show, write_random_file, DataPathCheck,
    Harness, Policy,
};

/// Acceptance 1: curl → python3 -m http.server, both under tether: a 20 MB file arrives intact.
#[test]
fn curl_fetches_20mb_from_python_http_server_both_shimmed() {
    let port = tether_shim_tests::free_port();
    let mut h = Harness::new("curl-python", Policy::new().both(port));
    let www = h.path("www");
    fs::create_dir_all(&www).unwrap();
    write_random_file(&www.join("data.bin"), scaled_bytes(20));
    let check = DataPathCheck::begin(&h, port);

    h.spawn_server(
        "server",
        h.shim(&mut http_server(port, &www), "server"),
        port,
    );
    let out = h.path("out.bin");
    let run = h.run(
        "curl",
        h.shim(
            &mut curl_get(&format!("http://127.0.0.1:{port}/data.bin"), &out),
            "curl",
        ),
        Duration::from_secs(150),
    );
    assert!(
        run.success(),
        "curl failed: {run}\n{}",
        show(&h.log_lines("curl"))
    );
    assert_eq!(
        sha256(&out),
        sha256(&www.join("data.bin")),
        "sha256 differs"
    );

    let client = h.log_lines("curl");
    assert!(
        client.iter().any(|l| l.is("connect", "allow")),
        "no connect allow line:\n{}",
        show(&client)
    );
    let server = h.wait_log("server", Duration::from_secs(2), |l| {
        l.iter().any(|l| l.is("accept", "allow"))
    });
    assert!(
        server.iter().any(|l| l.is("accept", "allow")),
        "no accept allow line:\n{}",
        show(&server)
    );
    let mut all = client;
    all.extend(server);
    check.finish(&all);
}

/// Acceptance 5: nginx (epoll, non-blocking accept, sendfile on) serves 50 MB to curl, both under tether.
#[test]
fn nginx_sendfile_serves_50mb_to_curl_both_shimmed() {
    let port = tether_shim_tests::free_port();
    let mut h = Harness::new("nginx", Policy::new().both(port));
    let (mut nginx, prefix) = nginx(&h, port);
    write_random_file(&prefix.join("www/big.bin"), scaled_bytes(50));
    let check = DataPathCheck::begin(&h, port);
    h.spawn_server("nginx", h.shim(&mut nginx, "nginx"), port);

    let out = h.path("big.out");
    let run = h.run(
        "curl",
        h.shim(
            &mut curl_get(&format!("http://127.0.0.1:{port}/big.bin"), &out),
            "curl",
        ),
        Duration::from_secs(200),
    );
    let errlog = fs::read_to_string(prefix.join("error.log")).unwrap_or_default();
    assert!(
        run.success(),
        "curl failed: {run}\n{}\n--- nginx error.log\n{errlog}",
        show(&h.log_lines("curl"))
    );
    assert_eq!(
        sha256(&out),
        sha256(&prefix.join("www/big.bin")),
        "sha256 differs"
    );

    let mut all = h.log_lines("curl");
    let server = h.wait_log("nginx", Duration::from_secs(2), |l| {
        l.iter().any(|l| l.is("accept", "allow"))
    });
    assert!(
        server.iter().any(|l| l.is("accept", "allow")),
        "nginx logged no accept allow:\n{}",
        show(&server)
    );
    all.extend(server);
    check.finish(&all);
}

/// Acceptance 6: redis-server and redis-cli (hiredis: non-blocking connect) under tether: SET/GET.
#[test]
fn redis_cli_set_get_round_trip_both_shimmed() {
    let port = tether_shim_tests::free_port();
    let mut h = Harness::new("redis", Policy::new().both(port));
    let data = h.path("redis");
    fs::create_dir_all(&data).unwrap();
    let check = DataPathCheck::begin(&h, port);

    let mut server = Command::new("redis-server");
    server
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
        .arg(&data);
    h.spawn_server("redis-server", h.shim(&mut server, "redis-server"), port);

    let cli = |name: &str, args: &[&str]| {
        let mut c = Command::new("redis-cli");
        c.args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args);
        h.run(name, h.shim(&mut c, name), Duration::from_secs(30))
    };
    let set = cli("cli-set", &["SET", "tether-key", "tether-value-42"]);
    assert!(
        set.success() && set.stdout.trim() == "OK",
        "SET: {set}\n{}",
        show(&h.log_lines("cli-set"))
    );
    let get = cli("cli-get", &["GET", "tether-key"]);
    assert!(
        get.success() && get.stdout.trim() == "tether-value-42",
        "GET: {get}\n{}",
        show(&h.log_lines("cli-get"))
    );

    let mut all = h.log_lines("cli-set");
    all.extend(h.log_lines("cli-get"));
    assert_eq!(
        all.iter().filter(|l| l.is("connect", "allow")).count(),
        2,
        "{}",
        show(&all)
    );
    let server = h.wait_log("redis-server", Duration::from_secs(2), |l| {
        l.iter().filter(|l| l.is("accept", "allow")).count() >= 2
    });
    assert!(
        server.iter().filter(|l| l.is("accept", "allow")).count() >= 2,
        "{}",
        show(&server)
    );
    all.extend(server);
    check.finish(&all);
}
