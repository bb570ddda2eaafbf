//! Acceptance 12: libtether.so exports exactly the hooks, and no other function.

#![allow(clippy::unwrap_used)] // reason: tests

use std::collections::BTreeSet;
use std::process::Command;

use tether_shim_tests::shim_path;

const HOOKS: &[&str] = &[
    "connect",
    "accept",
    "accept4",
    "sendfile",
    "sendfile64",
    "close",
    "close_range",
    // closefrom: glibc closes with an internal syscall; the hook spares tether's fds and keeps
    // the fd table true (issue 9).
    "closefrom",
    // TCP Fast Open: MSG_FASTOPEN connects without connect() (issue 9).
    "sendto",
    "sendmsg",
    "sendmmsg",
    // kTLS TX rekeys are done by the program's next write (issue 12, `ops::txkey`).
    "write",
    "writev",
    "send",
    "shutdown",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "fcntl64",
    "getpeername",
    "getsockname",
    "getsockopt",
    "setsockopt",
    "read",
    "readv",
    "recv",
    "recvfrom",
    "recvmsg",
    "__read_chk",
    "__recv_chk",
    "__recvfrom_chk",
    // exec hand-off of relayed fds (f09708a): the userspace relay lives in the calling process,
    // so exec must hand inherited protected fds over before the image is replaced.
    "execve",
    "execv",
    "execvp",
    "execvpe",
    "fexecve",
];

/// Acceptance 12: `nm -D --defined-only libtether.so`: the defined functions (T, W, i) are exactly the
/// hooks. Non-function symbols (data, absolute version nodes) are ignored.
#[test]
fn shared_object_exports_exactly_the_hooks() {
    let so = shim_path();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let got: BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (kind, name) = match cols.as_slice() {
                [_, k, n] => (*k, *n),
                [k, n] => (*k, *n),
                _ => return None,
            };
            ["T", "t", "W", "i"]
                .contains(&kind)
                .then(|| name.split('@').next().unwrap().to_string())
        })
        .collect();
    let want: BTreeSet<String> = HOOKS.iter().map(|s| s.to_string()).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "export list of {} differs\n  unexpected: {extra:?}\n  missing:    {missing:?}\n--- nm -D --defined-only\n{text}",
        so.display()
    );
}
