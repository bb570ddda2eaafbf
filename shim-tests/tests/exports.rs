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
    // glibc's public double-underscore names of hooked functions (a program can call them).
    "__connect",
    "__sendmmsg",
    "__send",
    "__write",
    "__read",
    "__recv",
    "__close",
    "__dup2",
    "__fcntl",
    "__libc_fcntl64",
];

/// The defined function names of a shared object (`nm -D --defined-only`).
fn defined_functions(so: &std::path::Path) -> BTreeSet<String> {
    let out = Command::new("nm").args(["-D", "--defined-only"]).arg(so).output().unwrap();
    assert!(out.status.success(), "nm {} failed: {}", so.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (kind, name) = match cols.as_slice() {
                [_, k, n] => (*k, *n),
                [k, n] => (*k, *n),
                _ => return None,
            };
            ["T", "t", "W", "i"].contains(&kind).then(|| name.split('@').next().unwrap().to_string())
        })
        .collect()
}

/// Every other public name this machine's libc gives a hooked function (`__connect` for
/// `connect`, `__libc_fcntl64` for `fcntl64`) is hooked too: a program calling it directly
/// would otherwise skip the shim (found by review: `__connect` connected in plaintext).
#[test]
fn every_public_libc_alias_of_a_hook_is_hooked() {
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
        .expect("no libc.so.6 found");
    let theirs = defined_functions(libc);
    let ours = defined_functions(&shim_path());
    let missing: Vec<String> = HOOKS
        .iter()
        .filter(|h| !h.starts_with("__"))
        .flat_map(|h| [format!("__{h}"), format!("__libc_{h}")])
        .filter(|a| theirs.contains(a) && !ours.contains(a))
        .collect();
    assert!(missing.is_empty(), "{} exports these names of hooked functions, and the shim does not: {missing:?}", libc.display());
}

/// Acceptance 12: `nm -D --defined-only libtether.so`: the defined functions (T, W, i) are exactly the
/// hooks. Non-function symbols (data, absolute version nodes) are ignored.
#[test]
fn shared_object_exports_exactly_the_hooks() {
    let so = shim_path();
    let got = defined_functions(&so);
    let want: BTreeSet<String> = HOOKS.iter().map(|s| s.to_string()).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "export list of {} differs\n  unexpected: {extra:?}\n  missing:    {missing:?}",
        so.display()
    );
}
