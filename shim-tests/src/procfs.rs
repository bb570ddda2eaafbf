//! What `/proc` says about a process under test: its threads' wake-ups, its TCP sockets and its
//! epoll registrations. The flood tests use these to prove that the silent watcher sleeps while
//! nothing happens and leaves no fd or registration behind, without trusting the shim's log.

use std::collections::HashSet;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// The id of `pid`'s thread named `name`, waited for up to `timeout`.
pub fn thread_named(pid: u32, name: &str, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().find_map(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim_end() == name).then(|| t.file_name().to_str()?.parse().ok()).flatten()
        });
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// How often thread `tid` of `pid` has been switched out (voluntary + involuntary): once per
/// wake-up of a thread that sleeps in a syscall.
pub fn context_switches(pid: u32, tid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// How many of `pid`'s fds are TCP sockets (their inodes listed in `/proc/net/tcp{,6}`).
pub fn tcp_fds(pid: u32) -> usize {
    let mut tcp = HashSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let table = fs::read_to_string(f).unwrap_or_default();
        tcp.extend(table.lines().skip(1).filter_map(|l| Some(format!("socket:[{}]", l.split_whitespace().nth(9)?))));
    }
    fds(pid).iter().filter(|(_, link)| tcp.contains(link)).count()
}

/// Registrations in each of `pid`'s epoll sets that watch an eventfd (tether's silent watcher
/// and relay keep one in theirs; a program's own epoll sets rarely hold one).
pub fn epoll_sets_with_eventfd(pid: u32) -> Vec<usize> {
    let fds = fds(pid);
    let is_eventfd = |n: &str| fds.iter().any(|(fd, l)| fd == n && l == "anon_inode:[eventfd]");
    fds.iter()
        .filter(|(_, l)| l == "anon_inode:[eventpoll]")
        .filter_map(|(fd, _)| {
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
            let watched: Vec<&str> =
                info.lines().filter_map(|l| l.strip_prefix("tfd:")?.split_whitespace().next()).collect();
            watched.iter().any(|t| is_eventfd(t)).then_some(watched.len())
        })
        .collect()
}

fn fds(pid: u32) -> Vec<(String, String)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), fs::read_link(e.path()).ok()?.to_str()?.to_owned())))
        .collect()
}
