//! The live connection table fed by the shims' reports, and its rendering for `tether connections`.
//!
//! A row is keyed by the reporting process (pid, start time) and the shim's `conn_id`. The pid,
//! uid and executable come from attestation of the reporting socket, never from the report.
//! The table is bounded per process and in total; rows of exited processes are swept.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use tether_proto::wire::{ConnectionReport, Direction, LiveConnection};

use crate::attest::AttestedPeer;
use crate::cache::ProcessKey;
use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::error::Error;

/// Live rows one process may hold.
pub const MAX_PER_PROCESS: usize = 4096;
/// Live rows in all.
pub const MAX_TOTAL: usize = 65536;

/// Why an `open` report was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFull {
    /// The reporting process already has [`MAX_PER_PROCESS`] live rows.
    Process,
    /// The table already has [`MAX_TOTAL`] live rows.
    Total,
}

impl TableFull {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Process => "process_limit",
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
            Self::Total => write!(f, "tetherd's connection table is full ({MAX_TOTAL} rows); report dropped"),
        }
    }
}

impl std::error::Error for TableFull {}

#[derive(Debug)]
struct Row {
    uid: u32,
    conn: LiveConnection,
}

#[derive(Debug, Default)]
struct Inner {
    by_process: HashMap<ProcessKey, HashMap<u64, Row>>,
    total: usize,
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
    pub fn open(&self, who: &AttestedPeer, report: ConnectionReport) -> Result<(), TableFull> {
        let facts = who.facts();
        let key = (facts.pid, who.start_time());
        let mut inner = self.lock();
        let total = inner.total;
        let rows = inner.by_process.entry(key).or_default();
        let replacing = rows.contains_key(&report.conn_id);
        if !replacing {
            if rows.len() >= MAX_PER_PROCESS {
                return Err(TableFull::Process);
            }
            if total >= MAX_TOTAL {
                if rows.is_empty() {
                    inner.by_process.remove(&key);
                }
                return Err(TableFull::Total);
            }
        }
        let conn_id = report.conn_id;
        let row = Row {
            uid: facts.uid,
            conn: LiveConnection {
                pid: u32::try_from(facts.pid).unwrap_or(0),
                exe: facts.exe.display().to_string(),
                report,
            },
        };
        rows.insert(conn_id, row);
        if !replacing {
            inner.total += 1;
        }
        Ok(())
    }

    /// Remove the row `conn_id` of the process `key`. Returns whether it was there.
    pub fn close(&self, key: ProcessKey, conn_id: u64) -> bool {
        let mut inner = self.lock();
        let Some(rows) = inner.by_process.get_mut(&key) else { return false };
        let removed = rows.remove(&conn_id).is_some();
        if rows.is_empty() {
            inner.by_process.remove(&key);
        }
        if removed {
            inner.total -= 1;
        }
        removed
    }

    /// The rows `viewer` may see, ordered by pid, open time and conn_id.
    pub fn list(&self, viewer: Viewer) -> Vec<LiveConnection> {
        let inner = self.lock();
        let mut out: Vec<LiveConnection> = inner
            .by_process
            .values()
            .flat_map(|rows| rows.values())
            .filter(|r| match viewer {
                Viewer::All => true,
                Viewer::Uid(u) => r.uid == u,
            })
            .map(|r| r.conn.clone())
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
            if let Some(rows) = inner.by_process.remove(&k) {
                n += rows.len();
            }
        }
        inner.total -= n;
        n
    }

    pub fn len(&self) -> usize {
        self.lock().total
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

/// The human table of `tether connections`: one aligned row per connection.
pub fn render_table(rows: &[LiveConnection], now: u64) -> String {
    const HEADER: [&str; 10] =
        ["PID", "EXE", "DIR", "LOCAL", "REMOTE", "LOCAL ID", "PEER ID", "MODE", "AGE", "BYTES"];
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

    fn report(conn_id: u64) -> ConnectionReport {
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
    fn table_renders_aligned() {
        let who = me();
        let t = ConnectionTable::default();
        t.open(&who, report(1)).unwrap();
        let mut r = report(2);
        r.direction = Direction::Inbound;
        r.data_path = "plaintext".into();
        r.decision = "observe".into();
        r.local_id = None;
        r.bytes = None;
        t.open(&who, r).unwrap();
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
