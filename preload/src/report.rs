//! Connection reports to tetherd: asynchronous, bounded and best-effort, never on the data
//! path. A hook only enqueues (a `try_send` on a bounded channel; a full queue drops the
//! report and counts it); one "tether-report" thread per process keeps a broker connection
//! and sends them in batches ([`BATCH_WINDOW`]). tetherd attributes each report to the attested sender, so a report can only
//! ever describe the process that sent it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, UNIX_EPOCH};

use tether_proto::wire::{self, ConnectionReport, Request, Response};

use crate::sync::Lock as Mutex;
use crate::sys::tetherd::Greeted;
use crate::settings;

const QUEUE: usize = 1024;
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);
/// Reports are sent in batches: after the first of a batch arrives the thread waits this long
/// (not on the channel, so a hook's enqueue wakes nobody) and then sends all that queued, their
/// frames in one write and the answers read after. A burst of connections then costs a few
/// wake-ups and writes rather than two per connection; a report reaches tetherd at most this
/// late.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// At most this many reports per batch (their answers must fit the socket's buffer unread).
const BATCH_MAX: usize = 128;

struct Reporter {
    /// The process that started the thread: after fork the child needs its own.
    pid: u32,
    tx: SyncSender<ConnectionReport>,
}

static REPORTER: Mutex<Option<Reporter>> = Mutex::new(None);
/// The report thread's broker connection fd (-1 when it has none). Set and cleared, and the
/// stream closed, under this lock, so a fork child knows exactly which inherited number is the
/// parent's connection (and closes its copy without touching the stream).
static BROKER_FD: Mutex<RawFd> = Mutex::new(-1);
/// The same fd, readable without a lock: `close`/`close_range` spare it (a program's
/// `closefrom` would otherwise close the reporter's socket under it, and the reporter's later
/// close could hit a number the program reused).
static BROKER_FD_NOW: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The reporter's broker connection, if it has one open.
pub(crate) fn broker_fd() -> Option<RawFd> {
    let fd = BROKER_FD_NOW.load(std::sync::atomic::Ordering::Acquire);
    (fd >= 0).then_some(fd)
}

fn set_broker_fd(slot: &mut RawFd, fd: RawFd) {
    *slot = fd;
    BROKER_FD_NOW.store(fd, std::sync::atomic::Ordering::Release);
}
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub(crate) fn next_conn_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn now_secs() -> u64 {
    crate::clock::real().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Queue a report. Never blocks.
pub(crate) fn send(r: ConnectionReport) {
    if settings::get().disabled {
        return;
    }
    // This process (hook logic never runs in a vfork child): no getpid per report.
    let pid = crate::fork::owner() as u32;
    let mut g = REPORTER.lock();
    if g.as_ref().map(|r| r.pid) != Some(pid) {
        *g = start(pid);
    }
    let full = match g.as_ref() {
        Some(rep) => rep.tx.try_send(r).is_err(),
        None => true,
    };
    if full {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

fn start(pid: u32) -> Option<Reporter> {
    let (tx, rx) = sync_channel(QUEUE);
    crate::sync::spawn_thread("tether-report", 128 * 1024, move || {
        let _ = std::panic::catch_unwind(move || run(rx));
    })
    .ok()?;
    Some(Reporter { pid, tx })
}

fn run(rx: Receiver<ConnectionReport>) {
    let mut conn: Option<UnixStream> = None;
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while let Ok(first) = rx.recv() {
        std::thread::sleep(BATCH_WINDOW);
        batch.clear();
        batch.push(first);
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // One retry on a fresh connection (tetherd may have restarted); then drop the batch.
        for _ in 0..2 {
            if conn.is_none() {
                conn = connect().ok();
                if let Some(s) = &conn {
                    set_broker_fd(&mut BROKER_FD.lock(), s.as_raw_fd());
                }
            }
            let Some(s) = conn.as_mut() else { break };
            if send_batch(s, &batch).is_ok() {
                break;
            }
            set_broker_fd(&mut BROKER_FD.lock(), -1);
            conn = None;
        }
    }
    set_broker_fd(&mut BROKER_FD.lock(), -1);
    drop(conn);
}

fn connect() -> io::Result<UnixStream> {
    match crate::sys::tetherd::connect(&settings::get().socket, BROKER_TIMEOUT)? {
        Greeted::Ready(s) => Ok(s),
        Greeted::Refused(e) => Err(io::Error::other(format!("tetherd refused the connection: {}: {}", e.code, e.message))),
    }
}

/// Send every report's frame in one write, then read the answers in order (tetherd answers
/// each request on a connection before it reads the next, and sends nothing unasked). They are
/// read through a buffer: whatever answers are queued come in one `recv`, not two per answer
/// (header, body), and exactly the batch's answers are taken, so nothing is left behind in it.
fn send_batch(s: &mut UnixStream, batch: &[ConnectionReport]) -> Result<(), wire::WireError> {
    let mut frames = Vec::new();
    for r in batch {
        let frame = wire::encode(&Request::Report(r.clone()))?;
        wire::io::write_frame(&mut frames, &frame)?;
    }
    io::Write::write_all(s, &frames).map_err(wire::WireError::Io)?;
    let mut answers = io::BufReader::with_capacity(ANSWERS_BUF, &*s);
    for _ in batch {
        let body = wire::io::read_frame(&mut answers)?.ok_or(wire::WireError::Truncated)?;
        match wire::decode::<Response>(&body)? {
            Response::Ok(_) => {}
            // Refused (e.g. an older broker, or a full table): the report is dropped, the
            // connection is fine.
            Response::Error(_) => {}
            _ => return Err(wire::WireError::Malformed("unexpected response".into())),
        }
    }
    Ok(())
}

/// Room for the answers of a batch read at once (an `ok` answer is 34 bytes).
const ANSWERS_BUF: usize = 4096;

/// Fork lock order: `REPORTER` then `BROKER_FD` (released by `crate::fork`).
pub(crate) fn atfork_prepare() {
    REPORTER.hold_for_fork();
    BROKER_FD.hold_for_fork();
}

/// In the fork child, with no lock held: the report thread is the parent's. Its channel may be
/// mid-operation (a thread frozen inside it at fork), so the sender is forgotten, never dropped;
/// the child's copy of the parent's broker connection is closed (just the descriptor: nothing
/// is written, the parent's connection is untouched). The child starts its own reporter, on
/// its own connection, when it first has something to report.
pub(crate) fn after_fork_child() {
    if let Some(parents) = REPORTER.lock().take() {
        std::mem::forget(parents);
    }
    let mut fd = BROKER_FD.lock();
    if *fd >= 0 {
        // SAFETY: the child's copy of the parent's report connection; no code in the child
        // refers to it (the thread that owned it does not exist here).
        unsafe { crate::real::close(*fd) };
        set_broker_fd(&mut fd, -1);
    }
}
