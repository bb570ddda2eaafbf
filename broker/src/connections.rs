//! The live connection table fed by the shims' reports, and its rendering for `tether connections`.
//!
//! A row is keyed by the reporting process (pid, start time) and the shim's `conn_id`. The pid,
//! uid and executable come from attestation of the reporting socket, never from the report.
//! The table is bounded per process and in total; rows of exited processes are swept.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;

use tether_proto::wire::{ConnectionEvent, ConnectionReport, Direction, LiveConnection};
use tether_proto::SpiffeId;

use crate::attest::AttestedPeer;
use crate::cache::ProcessKey;
use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::error::Error;

/// Live rows one process may hold.
pub const MAX_PER_PROCESS: usize = 1024;
/// Live rows the processes of one uid may hold together.
pub const MAX_PER_UID: usize = 4096;
/// Live rows in all.
pub const MAX_TOTAL: usize = 65536;
/// Bytes of row data the processes of one uid may hold together (see [`ValidReport::cost`]).
pub const MAX_BYTES_PER_UID: usize = 4 << 20;
/// Bytes of row data in all.
pub const MAX_BYTES_TOTAL: usize = 64 << 20;
/// Longest `reason` a report may carry.
pub const MAX_REASON: usize = 512;
/// Longest `data_path` or `decision` word.
pub const MAX_WORD: usize = 16;

/// Why an `open` report was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFull {
    /// The reporting process already has [`MAX_PER_PROCESS`] live rows.
    Process,
    /// The reporting process's uid already has [`MAX_PER_UID`] rows or [`MAX_BYTES_PER_UID`].
    Uid,
    /// The table already has [`MAX_TOTAL`] live rows or [`MAX_BYTES_TOTAL`].
    Total,
}

impl TableFull {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Process => "process_limit",
            Self::Uid => "uid_limit",
            Self::Total => "table_limit",
        }
    }
}

impl fmt::Display for TableFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Process => {
                write!(f, "this process already has {MAX_PER_PROCESS} live connections reported; report dropped")
            }
            Self::Uid => write!(
                f,
                "this user's processes already have {MAX_PER_UID} live connections (or {MAX_BYTES_PER_UID} bytes) \
                 reported; report dropped"
            ),
            Self::Total => write!(f, "tetherd's connection table is full; report dropped"),
        }
    }
}

impl std::error::Error for TableFull {}

/// A report field that failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadReport(pub String);

impl fmt::Display for BadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad connection report: {}", self.0)
    }
}

impl std::error::Error for BadReport {}

/// A connection report with every field checked: addresses parsed, words and the reason
/// bounded. The SPIFFE IDs are as the reporting process claims them; tetherd cannot know
/// whom a process really talked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidReport {
    pub conn_id: u64,
    pub direction: Direction,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub local_id: Option<SpiffeId>,
    pub claimed_peer_id: Option<SpiffeId>,
    data_path: Box<str>,
    decision: Box<str>,
    reason: Option<Box<str>>,
    pub opened_at: u64,
    pub bytes: Option<(u64, u64)>,
}

fn word(field: &str, v: &str) -> Result<Box<str>, BadReport> {
    if v.len() > MAX_WORD || !v.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(BadReport(format!("{field} must be at most {MAX_WORD} lowercase letters")));
    }
    Ok(v.into())
}

fn addr(field: &str, v: &str) -> Result<SocketAddr, BadReport> {
    v.parse().map_err(|_| BadReport(format!("{field} is not an IP:PORT address")))
}

impl ValidReport {
    /// Check `r` field by field.
    pub fn parse(r: ConnectionReport) -> Result<Self, BadReport> {
        if let Some(reason) = &r.reason {
            if reason.len() > MAX_REASON {
                return Err(BadReport(format!("reason is {} bytes, over {MAX_REASON}", reason.len())));
            }
        }
        Ok(Self {
            conn_id: r.conn_id,
            direction: r.direction,
            local: addr("local_addr", &r.local_addr)?,
            remote: addr("remote_addr", &r.remote_addr)?,
            local_id: r.local_id,
            claimed_peer_id: r.peer_id,
            data_path: word("data_path", &r.data_path)?,
            decision: word("decision", &r.decision)?,
            reason: r.reason.map(String::into_boxed_str),
            opened_at: r.opened_at,
            bytes: r.bytes,
        })
    }

    /// Bytes this row costs the table, for the quotas: its strings plus a fixed overhead.
    pub fn cost(&self) -> usize {
        let id = |i: &Option<SpiffeId>| i.as_ref().map_or(0, |i| i.as_str().len());
        256 + id(&self.local_id)
            + id(&self.claimed_peer_id)
            + self.data_path.len()
            + self.decision.len()
            + self.reason.as_ref().map_or(0, |r| r.len())
    }

    fn to_wire(&self) -> ConnectionReport {
        ConnectionReport {
            event: ConnectionEvent::Open,
            conn_id: self.conn_id,
            direction: self.direction,
            local_addr: self.local.to_string(),
            remote_addr: self.remote.to_string(),
            local_id: self.local_id.clone(),
            peer_id: self.claimed_peer_id.clone(),
            data_path: self.data_path.to_string(),
            decision: self.decision.to_string(),
            reason: self.reason.as_deref().map(str::to_owned),
            opened_at: self.opened_at,
            bytes: self.bytes,
        }
    }
}

/// The rows of one reporting process.
#[derive(Debug)]
struct Process {
    uid: u32,
    exe: Box<str>,
    rows: HashMap<u64, ValidReport>,
}

/// Rows and bytes held, per uid and in total.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    rows: usize,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_process: HashMap<ProcessKey, Process>,
    by_uid: HashMap<u32, Usage>,
    total: Usage,
}

impl Inner {
    fn release(&mut self, uid: u32, rows: usize, bytes: usize) {
        self.total.rows -= rows;
        self.total.bytes -= bytes;
        if let Some(u) = self.by_uid.get_mut(&uid) {
            u.rows -= rows;
            u.bytes -= bytes;
            if u.rows == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }
}

/// Who may see which rows of `tether connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer {
    /// root, or tetherd's own uid: every row.
    All,
    /// Anyone else: the rows of processes running as this uid.
    Uid(u32),
}

#[derive(Debug, Default)]
pub struct ConnectionTable {
    inner: Mutex<Inner>,
}

impl ConnectionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store an `open` report from `who`. Re-reporting a live `conn_id` replaces its row.
    pub fn open(&self, who: &AttestedPeer, report: ValidReport) -> Result<(), TableFull> {
        let facts = who.facts();
        let key = (facts.pid, who.start_time());
        let uid = facts.uid;
        let mut inner = self.lock();
        let old_cost = inner.by_process.get(&key).and_then(|p| p.rows.get(&report.conn_id)).map(ValidReport::cost);
        let (new_rows, cost) = (usize::from(old_cost.is_none()), report.cost());
        let grow = cost.saturating_sub(old_cost.unwrap_or(0));
        let used = inner.by_uid.get(&uid).copied().unwrap_or_default();
        let rows_now = inner.by_process.get(&key).map_or(0, |p| p.rows.len());
        if new_rows == 1 && rows_now >= MAX_PER_PROCESS {
            return Err(TableFull::Process);
        }
        if used.rows + new_rows > MAX_PER_UID || used.bytes + grow > MAX_BYTES_PER_UID {
            return Err(TableFull::Uid);
        }
        if inner.total.rows + new_rows > MAX_TOTAL || inner.total.bytes + grow > MAX_BYTES_TOTAL {
            return Err(TableFull::Total);
        }
        let process = inner.by_process.entry(key).or_insert_with(|| Process {
            uid,
            exe: facts.exe.display().to_string().into_boxed_str(),
            rows: HashMap::new(),
        });
        process.rows.insert(report.conn_id, report);
        let delta = |u: &mut Usage| {
            u.rows += new_rows;
            u.bytes = u.bytes + cost - old_cost.unwrap_or(0);
        };
        delta(&mut inner.total);
        delta(inner.by_uid.entry(uid).or_default());
        Ok(())
    }

    /// Remove the row `conn_id` of the process `key`. Returns whether it was there.
    pub fn close(&self, key: ProcessKey, conn_id: u64) -> bool {
        let mut inner = self.lock();
        let Some(process) = inner.by_process.get_mut(&key) else { return false };
        let Some(row) = process.rows.remove(&conn_id) else { return false };
        let uid = process.uid;
        if process.rows.is_empty() {
            inner.by_process.remove(&key);
        }
        inner.release(uid, 1, row.cost());
        true
    }

    /// The rows `viewer` may see, ordered by pid, open time and conn_id.
    pub fn list(&self, viewer: Viewer) -> Vec<LiveConnection> {
        let inner = self.lock();
        let mut out: Vec<LiveConnection> = inner
            .by_process
            .iter()
            .filter(|(_, p)| match viewer {
                Viewer::All => true,
                Viewer::Uid(u) => p.uid == u,
            })
            .flat_map(|((pid, _), p)| {
                p.rows.values().map(move |r| LiveConnection {
                    pid: u32::try_from(*pid).unwrap_or(0),
                    exe: p.exe.to_string(),
                    report: r.to_wire(),
                })
            })
            .collect();
        out.sort_by_key(|c| (c.pid, c.report.opened_at, c.report.conn_id));
        out
    }

    /// Drop the rows of processes for which `alive` is false. Returns how many rows went.
    pub fn sweep(&self, alive: impl Fn(ProcessKey) -> bool) -> usize {
        // Decide liveness outside the lock: it reads /proc.
        let keys: Vec<ProcessKey> = self.lock().by_process.keys().copied().collect();
        let dead: Vec<ProcessKey> = keys.into_iter().filter(|k| !alive(*k)).collect();
        let mut inner = self.lock();
        let mut n = 0;
        for k in dead {
            if let Some(p) = inner.by_process.remove(&k) {
                let bytes = p.rows.values().map(ValidReport::cost).sum();
                inner.release(p.uid, p.rows.len(), bytes);
                n += p.rows.len();
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.lock().total.rows
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keep the first rows whose JSON fits in `budget` bytes; returns them and how many were left out.
/// (A full table of [`MAX_TOTAL`] rows is far larger than one wire frame.)
pub fn fit(mut rows: Vec<LiveConnection>, budget: usize) -> (Vec<LiveConnection>, u64) {
    let mut used = 0;
    let keep = rows
        .iter()
        .take_while(|r| {
            used += serde_json::to_vec(r).map_or(usize::MAX / 2, |v| v.len() + 1);
            used <= budget
        })
        .count();
    let omitted = (rows.len() - keep) as u64;
    rows.truncate(keep);
    (rows, omitted)
}

/// `5s`, `3m07s`, `2h05m`, `3d04h`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `512`, `1.5K`, `20.0M`, `3.1G` (powers of 1024).
pub fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// The human table of `tether connections`: one aligned row per connection. PID and EXE are
/// attested by tetherd; the rest, the peer ID above all, is what the reporting process says.
pub fn render_table(rows: &[LiveConnection], now: u64) -> String {
    const HEADER: [&str; 10] =
        ["PID", "EXE", "DIR", "LOCAL", "REMOTE", "LOCAL ID", "PEER ID (CLAIMED)", "MODE", "AGE", "BYTES"];
    let dash = || "-".to_owned();
    let cells: Vec<[String; 10]> = rows
        .iter()
        .map(|c| {
            let r = &c.report;
            let exe = Path::new(&c.exe).file_name().map_or_else(|| c.exe.clone(), |n| n.to_string_lossy().into_owned());
            let mode = match r.decision.as_str() {
                "allow" | "" => r.data_path.clone(),
                d => format!("{}/{d}", r.data_path),
            };
            [
                c.pid.to_string(),
                exe,
                match r.direction {
                    Direction::Outbound => "out".to_owned(),
                    Direction::Inbound => "in".to_owned(),
                },
                r.local_addr.clone(),
                r.remote_addr.clone(),
                r.local_id.as_ref().map_or_else(dash, |i| i.to_string()),
                r.peer_id.as_ref().map_or_else(dash, |i| i.to_string()),
                mode,
                age(now.saturating_sub(r.opened_at)),
                r.bytes.map_or_else(dash, |(tx, rx)| format!("{}/{}", size(tx), size(rx))),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |row: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&HEADER);
    for row in &cells {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// `tether connections [--json]`: the table for people, or a JSON array of rows.
pub fn command(socket: &Path, json: bool) -> Result<String, Error> {
    let (rows, omitted) = Client::connect(socket, DEFAULT_TIMEOUT)?.connections()?;
    if omitted > 0 {
        eprintln!("tether: {omitted} more connections not shown (the table exceeds one response)");
    }
    if json {
        return serde_json::to_string_pretty(&rows).map(|s| s + "\n").map_err(|e| Error::Cli(e.to_string()));
    }
    Ok(render_table(&rows, crate::server::now_unix()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::net::UnixStream;

    use tether_proto::wire::ConnectionEvent;

    use super::*;
    use crate::attest::Peer;

    fn me() -> AttestedPeer {
        let (a, _b) = UnixStream::pair().unwrap();
        Peer::from_stream(&a).unwrap().attest(None).unwrap()
    }

    fn report(conn_id: u64) -> ValidReport {
        ValidReport::parse(raw(conn_id)).unwrap()
    }

    fn raw(conn_id: u64) -> ConnectionReport {
        ConnectionReport {
            event: ConnectionEvent::Open,
            conn_id,
            direction: Direction::Outbound,
            local_addr: "127.0.0.1:40000".into(),
            remote_addr: "127.0.0.1:8443".into(),
            local_id: Some("spiffe://t/client".parse().unwrap()),
            peer_id: Some("spiffe://t/server".parse().unwrap()),
            data_path: "ktls".into(),
            decision: "allow".into(),
            reason: None,
            opened_at: 1000,
            bytes: Some((2048, 10)),
        }
    }

    #[test]
    fn open_close_and_attribution() {
        let t = ConnectionTable::default();
        let who = me();
        t.open(&who, report(1)).unwrap();
        t.open(&who, report(1)).unwrap();
        t.open(&who, report(2)).unwrap();
        assert_eq!(t.len(), 2, "re-reporting a conn_id replaces its row");
        let rows = t.list(Viewer::All);
        assert_eq!(rows[0].pid, std::process::id());
        assert_eq!(rows[0].exe, std::env::current_exe().unwrap().display().to_string());
        assert_eq!(t.list(Viewer::Uid(who.facts().uid)).len(), 2);
        assert!(t.list(Viewer::Uid(who.facts().uid + 1)).is_empty());
        let key = (who.facts().pid, who.start_time());
        assert!(t.close(key, 1));
        assert!(!t.close(key, 1));
        assert!(t.close(key, 2));
        assert!(t.is_empty());
    }

    #[test]
    fn per_process_cap_refuses_new_rows_only() {
        let t = ConnectionTable::default();
        let who = me();
        for i in 0..MAX_PER_PROCESS as u64 {
            t.open(&who, report(i)).unwrap();
        }
        assert_eq!(t.open(&who, report(u64::MAX)), Err(TableFull::Process));
        t.open(&who, report(7)).unwrap();
        assert_eq!(t.len(), MAX_PER_PROCESS);
        assert_eq!(t.sweep(|_| false), MAX_PER_PROCESS);
        assert!(t.is_empty());
    }

    #[test]
    fn reports_are_checked_field_by_field() {
        let bad = |f: fn(&mut ConnectionReport), why: &str| {
            let mut r = raw(1);
            f(&mut r);
            let e = ValidReport::parse(r).unwrap_err();
            assert!(e.0.contains(why), "{e}");
        };
        bad(|r| r.local_addr = "localhost:80".into(), "local_addr");
        bad(|r| r.remote_addr = "x".repeat(100_000), "remote_addr");
        bad(|r| r.data_path = "k".repeat(17), "data_path");
        bad(|r| r.decision = "ALLOW".into(), "decision");
        bad(|r| r.reason = Some("r".repeat(MAX_REASON + 1)), "reason");
        let ok = report(1);
        assert_eq!(ok.remote, "127.0.0.1:8443".parse::<SocketAddr>().unwrap());
        assert!(ok.cost() < 512);
    }

    #[test]
    fn per_uid_byte_quota_holds_across_processes() {
        let t = ConnectionTable::default();
        let who = me();
        let mut big = raw(0);
        big.reason = Some("r".repeat(MAX_REASON));
        let long: SpiffeId = format!("spiffe://t/{}", "a".repeat(2000)).parse().unwrap();
        big.local_id = Some(long.clone());
        big.peer_id = Some(long);
        let per_row = ValidReport::parse(big.clone()).unwrap().cost();
        let fits = MAX_BYTES_PER_UID / per_row;
        assert!(fits < MAX_PER_PROCESS, "the byte quota must bite first here");
        for i in 0..fits as u64 {
            big.conn_id = i;
            t.open(&who, ValidReport::parse(big.clone()).unwrap()).unwrap();
        }
        big.conn_id = u64::MAX;
        assert_eq!(t.open(&who, ValidReport::parse(big.clone()).unwrap()), Err(TableFull::Uid));
        // Replacing a row with a same-size one is fine; closing frees the budget.
        big.conn_id = 0;
        t.open(&who, ValidReport::parse(big.clone()).unwrap()).unwrap();
        assert!(t.close((who.facts().pid, who.start_time()), 0));
        t.open(&who, ValidReport::parse(big).unwrap()).unwrap();
        assert_eq!(t.sweep(|_| false), fits);
        assert!(t.is_empty());
    }

    #[test]
    fn table_renders_aligned() {
        let who = me();
        let t = ConnectionTable::default();
        t.open(&who, report(1)).unwrap();
        let mut r = raw(2);
        r.direction = Direction::Inbound;
        r.data_path = "plaintext".into();
        r.decision = "observe".into();
        r.local_id = None;
        r.bytes = None;
        t.open(&who, ValidReport::parse(r).unwrap()).unwrap();
        let out = render_table(&t.list(Viewer::All), 1185);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("PID"));
        let col = lines[0].find("PEER ID").unwrap();
        assert_eq!(&lines[1][col..col + 17], "spiffe://t/server");
        assert!(lines[1].contains("ktls") && lines[1].contains("3m05s") && lines[1].contains("2.0K/10"));
        assert!(lines[2].contains(" in ") && lines[2].contains("plaintext/observe"));
    }

    #[test]
    fn human_units() {
        assert_eq!(age(59), "59s");
        assert_eq!(age(3599), "59m59s");
        assert_eq!(age(7500), "2h05m");
        assert_eq!(age(90000), "1d01h");
        assert_eq!(size(1023), "1023");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(20 << 20), "20.0M");
    }

    #[test]
    fn a_large_table_is_cut_to_fit_one_frame() {
        let who = me();
        let t = ConnectionTable::default();
        for i in 0..MAX_PER_PROCESS as u64 {
            t.open(&who, report(i)).unwrap();
        }
        let (rows, omitted) = fit(t.list(Viewer::All), 100_000);
        assert!(!rows.is_empty() && omitted > 0);
        assert_eq!(rows.len() as u64 + omitted, MAX_PER_PROCESS as u64);
        assert!(serde_json::to_vec(&rows).unwrap().len() <= 100_000);
    }
}
