//! Signal handlers never get around the shim. While tether's code runs on a thread its guard
//! sends hooked calls straight to libc, so a handler that interrupts one of our hooks, or that
//! runs on one of our threads, must not be able to open a plaintext connection to a protected
//! destination. (Found by review: both sent their payload in plaintext.)

#![allow(clippy::unwrap_used)] // reason: tests

use std::process::Command;
use std::time::Duration;

use tether_shim_tests::wire::Observer;
use tether_shim_tests::{free_port, show, Harness, Policy, ANY_ID};

/// Main: a protected connect to OBSERVED, whose handshake stalls (the observer never answers),
/// with SIGALRM due inside it. The handler connects to OBSERVED too and sends the marker.
const C_HANDLER_INSIDE_A_HOOK: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static struct sockaddr_in to;
static void on_alarm(int sig) {
    (void)sig;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&to, sizeof to) == 0) {
        write(s, "SECRET-from-a-handler", 21);
        write(1, "handler=sent\n", 13);
    } else {
        char m[64];
        int n = snprintf(m, sizeof m, "handler=%s\n", errno == EACCES ? "EACCES" : strerror(errno));
        write(1, m, n);
    }
    close(s);
}
int main(int argc, char **argv) {
    to.sin_family = AF_INET;
    to.sin_port = htons(atoi(argv[1]));
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    alarm(1);
    int r = connect(s, (struct sockaddr *)&to, sizeof to);
    printf("main=%d\n", r);
    return 0;
}
"#;

/// Main: a protected connection to SERVED (so tether's threads exist), then SIGUSR1 blocked in
/// the main thread and sent to the process: the kernel hands it to a thread that does not block
/// it. The handler connects to OBSERVED and sends the marker, saying which thread it ran on.
const C_HANDLER_ON_OUR_THREAD: &str = r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static volatile int ran;
static int dial(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    a.sin_addr.s_addr = htonl(0x7f000001);
    return connect(fd, (struct sockaddr *)&a, sizeof a) == 0 ? fd : -1;
}
static int observed;
static void on_usr1(int s) {
    (void)s;
    char name[32] = {0};
    pthread_getname_np(pthread_self(), name, sizeof name);
    int fd = dial(observed);
    if (fd >= 0) write(fd, "SECRET-from-our-thread", 22);
    char out[96];
    int n = snprintf(out, sizeof out, "handler_thread=%s\nhandler_fd=%d\n", name, fd);
    write(1, out, n);
    ran = 1;
}
int main(int argc, char **argv) {
    observed = atoi(argv[2]);
    signal(SIGUSR1, on_usr1);
    int fd = dial(atoi(argv[1]));
    if (fd < 0 || write(fd, "GET / HTTP/1.0\r\n\r\n", 18) != 18) { puts("main=failed"); return 1; }
    char b[256];
    (void)read(fd, b, sizeof b); /* the relay or the reporter is running now */
    usleep(200000);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &s, 0);
    kill(getpid(), SIGUSR1);
    for (int i = 0; i < 50 && !ran; i++) usleep(20000);
    printf("ran=%d\n", ran);
    return 0;
}
"#;

fn build(h: &Harness, name: &str, src: &str) -> std::path::PathBuf {
    h.build_c(name, src, &["-lpthread"], "apt-get install gcc")
}

#[test]
fn a_handler_that_connects_inside_a_hook_is_refused_not_plaintext() {
    let observed = free_port();
    let h = Harness::new("signal-inside-hook", Policy::new().outbound(observed, &[ANY_ID]));
    let obs = Observer::start(observed);
    let prog = build(&h, "inside", C_HANDLER_INSIDE_A_HOOK);
    let mut c = Command::new(&prog);
    c.arg(observed.to_string()).env("TETHER_HANDSHAKE_TIMEOUT_MS", "3000");
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(30));
    obs.assert_only_tls(b"SECRET-from-a-handler");
    assert!(
        run.stdout.contains("handler=EACCES"),
        "the handler's connect was not refused with EACCES: {run}\n{}",
        show(&h.log_lines("client"))
    );
    assert!(run.stderr.contains("inside one of tether's hooks"), "no reason logged: {run}");
}

#[test]
fn a_program_handler_never_runs_on_a_tether_thread() {
    let served = free_port();
    let observed = free_port();
    let mut h = Harness::new(
        "signal-our-thread",
        Policy::new().both(served).outbound(observed, &[ANY_ID]),
    );
    h.serve_http("server", served, "hello\n");
    let obs = Observer::start(observed);
    let prog = build(&h, "ours", C_HANDLER_ON_OUR_THREAD);
    let mut c = Command::new(&prog);
    c.args([served.to_string(), observed.to_string()]);
    let run = h.run("client", h.shim(&mut c, "client"), Duration::from_secs(30));
    assert!(run.success(), "{run}\n{}", show(&h.log_lines("client")));
    assert!(
        !run.stdout.contains("handler_thread=tether-"),
        "a program's signal handler ran on one of tether's threads: {run}"
    );
    for (i, b) in obs.wait(1, Duration::from_secs(1)).iter().enumerate() {
        assert!(
            !b.windows(22).any(|w| w == b"SECRET-from-our-thread"),
            "PLAINTEXT AT THE DESTINATION: connection {i} carried the handler's marker: {run}"
        );
    }
}
