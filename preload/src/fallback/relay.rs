//! The relay thread: one per process, edge-triggered epoll over every userspace connection.
//!
//! Each connection is a small state machine over four readiness flags (TCP/app × read/write),
//! set by epoll edges and cleared by EAGAIN. Any event on a connection drives both directions
//! until neither makes progress, so backpressure on one side resumes as soon as the other side
//! drains. Bounds: the program is read only when rustls has flushed all TLS output to the
//! kernel, and TCP is read only when all decrypted plaintext has been handed to the program
//! (`rx`: batched, at most one batch held back), so per connection we hold at most one 64 KiB
//! chunk of ciphertext, one 128 KiB plaintext batch, plus rustls' own buffers.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::Connection;

use super::sys::{self, SocketWriter};
use super::{RelayFds, Stats};

mod exit;
mod rx;

/// The epoll token of the eventfd that announces new connections.
pub(super) const WAKE_TOKEN: u64 = u64::MAX;

/// Stack of the relay thread. rustls record processing is shallow: every fallback test
/// (bulk, alerts, close_notify, garbage) passed with 32 KiB in a debug build, so this is 8x that.
pub(super) const STACK_SIZE: usize = 256 * 1024;

/// Largest single read from either socket.
const CHUNK: usize = 64 * 1024;

/// Reads per connection per turn before other connections get theirs (fairness).
const BUDGET: u32 = 16;

const MAX_EVENTS: usize = 64;

/// How often lingering connections (`LinkState::linger_until`) are looked at without events.
const LINGER_TICK_MS: libc::c_int = 100;

/// A connection handed over by `adopt`, waiting for the relay thread.
pub(super) struct Pending {
    pub(super) id: u64,
    pub(super) conn: Connection,
    pub(super) tcp: RawFd,
    pub(super) app: RawFd,
    pub(super) stats: Arc<Stats>,
    /// The rule's `key_update_after`, if any.
    pub(super) rotate: Option<tether_proto::KeyUpdateAfter>,
}

/// Start the relay thread for `fds`.
pub(super) fn spawn(fds: RelayFds, generation: u64) -> io::Result<()> {
    crate::sync::spawn_thread("tether-relay", STACK_SIZE, move || run(fds, generation)).map(drop)
}

/// The relay's connection states. The relay thread holds this lock while it works on a batch of
/// events (never while it waits in epoll), so whoever holds it knows the relay is quiescent:
/// `atfork_prepare` takes it first (lock order STATE → REGISTRY → INTERNAL), and the exec
/// hand-off moves the whole state into a keeper process with it.
static STATE: Mutex<Option<Relay>> = Mutex::new(None);

pub(super) fn lock_state() -> MutexGuard<'static, Option<Relay>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tests hold this to keep a freshly spawned relay thread from publishing its state yet.
#[cfg(test)]
pub(super) static START_GATE: Mutex<()> = Mutex::new(());

fn run(fds: RelayFds, generation: u64) {
    #[cfg(test)]
    drop(START_GATE.lock().unwrap_or_else(PoisonError::into_inner));
    let _ = catch_unwind(AssertUnwindSafe(|| {
        {
            // An exit flush may have set our state up before we ran (`fallback::at_exit`).
            let mut state = lock_state();
            if state.as_ref().is_none_or(|r| r.generation != generation) {
                *state = Some(Relay::new(fds, generation));
            }
        }
        serve_thread(fds.epoll, generation)
    }));
    // Only an unrecoverable epoll failure or a panic outside a connection gets here.
    super::relay_died(generation);
}

/// The relay thread's loop: wait without the lock, work with it.
fn serve_thread(epoll: RawFd, generation: u64) -> io::Result<()> {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut timeout = -1;
    loop {
        let n = match sys::epoll_wait(epoll, &mut events, timeout) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut state = lock_state();
        let Some(relay) = state.as_mut().filter(|r| r.generation == generation) else {
            return Ok(()); // our state was taken away (fork reset): nothing left to serve
        };
        timeout = relay.turn(events.get(..n).unwrap_or_default());
    }
}

/// The exec hand-off's keeper process: serve the inherited connections on this (only) thread
/// until all of them have ended, then exit. Never returns.
pub(super) fn keep(mut relay: Relay, epoll: RawFd) -> ! {
    relay.fds = RelayFds { epoll, wake: -1 };
    let edge = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
    let ids: Vec<u64> = relay.links.keys().copied().collect();
    for id in ids {
        if let Some(state) = relay.links.get_mut(&id) {
            // Readiness may have been consumed by the old epoll: assume everything is ready.
            state.note(u32::MAX, false);
            state.note(libc::EPOLLIN as u32 | libc::EPOLLOUT as u32, true);
            let (tcp, app) = (state.tcp, state.app);
            let added = sys::epoll_add(epoll, tcp, edge, id << 1)
                .and_then(|()| sys::epoll_add(epoll, app, edge, id << 1 | 1));
            if added.is_err() {
                relay.retire(id, true);
            } else {
                relay.busy.push(id);
            }
        }
    }
    relay.welcome();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut timeout = 0;
    let _ = catch_unwind(AssertUnwindSafe(|| loop {
        if relay.links.is_empty() {
            break;
        }
        let n = match sys::epoll_wait(epoll, &mut events, timeout) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        timeout = relay.turn(events.get(..n).unwrap_or_default());
    }));
    // Whatever is left (only after an internal failure) fails closed.
    let ids: Vec<u64> = relay.links.keys().copied().collect();
    for id in ids {
        relay.retire(id, true);
    }
    // SAFETY: _exit ends this single-threaded keeper without running the program's atexit code.
    unsafe { libc::_exit(0) }
}

pub(super) struct Relay {
    fds: RelayFds,
    generation: u64,
    links: HashMap<u64, LinkState>,
    /// Shared read buffer: every read lands here and is handed on before the next one.
    scratch: Vec<u8>,
    /// Shared plaintext batch for the program (`rx::BATCH`): gathered, sent, then cleared
    /// (what the program's socket does not take moves to that connection's `outbox`).
    plain: Vec<u8>,
    /// Connections that ran out of budget in the last turn: driven again in the next.
    busy: Vec<u64>,
    /// Connections whose program is gone, reading TCP until the peer's end or their linger
    /// deadline (checked every [`LINGER_TICK_MS`] while there are any).
    lingering: Vec<u64>,
}

impl Relay {
    pub(super) fn new(fds: RelayFds, generation: u64) -> Self {
        Self {
            fds,
            generation,
            links: HashMap::new(),
            scratch: vec![0; CHUNK],
            plain: Vec::with_capacity(rx::BATCH),
            busy: Vec::new(),
            lingering: Vec::new(),
        }
    }

    /// Handle one batch of epoll events; returns the timeout for the next wait: 0 if some
    /// connection wants another turn at once, a tick while some linger, else none (-1).
    fn turn(&mut self, events: &[libc::epoll_event]) -> libc::c_int {
        let mut ready = std::mem::take(&mut self.busy);
        if !self.lingering.is_empty() {
            // Their deadline may pass without an event: look at them on every turn.
            for &id in &self.lingering {
                if !ready.contains(&id) {
                    ready.push(id);
                }
            }
        }
        for event in events {
            let (bits, token) = (event.events, event.u64);
            if token == WAKE_TOKEN {
                self.welcome();
                ready.append(&mut self.busy);
                continue;
            }
            let id = token >> 1;
            if let Some(state) = self.links.get_mut(&id) {
                state.note(bits, token & 1 == 1);
                if !ready.contains(&id) {
                    ready.push(id);
                }
            }
        }
        for &id in &ready {
            if self.drive(id) == Turn::Busy && !self.busy.contains(&id) {
                self.busy.push(id);
            }
        }
        if !self.busy.is_empty() {
            0
        } else if !self.lingering.is_empty() {
            LINGER_TICK_MS
        } else {
            -1
        }
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Forget every connection without touching the sockets: a keeper process now owns them.
    /// Returns nothing; the registry side is cleaned by the caller.
    pub(super) fn hand_off(&mut self) {
        for (_, state) in self.links.drain() {
            sys::epoll_del(self.fds.epoll, state.tcp);
            sys::epoll_del(self.fds.epoll, state.app);
        }
        self.busy.clear();
        self.lingering.clear();
    }

    /// Pick up connections that `adopt` queued and register them; they are driven in this turn
    /// (plaintext rustls already holds goes out first).
    fn welcome(&mut self) {
        sys::eventfd_drain(self.fds.wake);
        for pending in super::take_pending(self.generation) {
            let id = pending.id;
            let edge = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            let registered = sys::epoll_add(self.fds.epoll, pending.tcp, edge, id << 1)
                .and_then(|()| sys::epoll_add(self.fds.epoll, pending.app, edge, id << 1 | 1));
            let state = LinkState::new(pending);
            self.links.insert(id, state);
            if registered.is_err() {
                self.retire(id, true);
            } else if !self.busy.contains(&id) {
                self.busy.push(id);
            }
        }
    }

    fn drive(&mut self, id: u64) -> Turn {
        let Some(state) = self.links.get_mut(&id) else {
            return Turn::Idle;
        };
        let (scratch, plain) = (&mut self.scratch, &mut self.plain);
        let step = catch_unwind(AssertUnwindSafe(|| state.drive(scratch, plain)));
        match step {
            Ok(Ok(Step::Open { busy })) => {
                if state.linger_until.is_some() && !self.lingering.contains(&id) {
                    self.lingering.push(id);
                }
                if busy {
                    Turn::Busy
                } else {
                    Turn::Idle
                }
            }
            Ok(Ok(Step::Finished)) => {
                self.retire(id, false);
                Turn::Idle
            }
            Ok(Err(Fatal)) | Err(_) => {
                self.retire(id, true);
                Turn::Idle
            }
        }
    }

    /// Take connection `id` out of the relay: off epoll, both sockets shut down, then the
    /// registry closes the relay end and drops the relay's `Arc<Link>`.
    fn retire(&mut self, id: u64, failed: bool) {
        let Some(state) = self.links.remove(&id) else {
            return;
        };
        self.lingering.retain(|&l| l != id);
        // Explicit DEL: a forked child's copy would keep the registration alive past close().
        sys::epoll_del(self.fds.epoll, state.tcp);
        sys::epoll_del(self.fds.epoll, state.app);
        if failed {
            // A reset or a TLS error is not a clean end: the program's EOF reads as
            // ECONNRESET (the read hooks check this flag). Unless the peer's close_notify
            // came first and its EOF is already delivered: then the stream did end cleanly
            // (a peer that exits with bytes of ours unread resets a connection it closed).
            if !(state.peer_ended && state.rx_done) {
                state.stats.truncated.store(true, Ordering::Release);
            }
            sys::shutdown(state.app, libc::SHUT_RDWR);
        }
        sys::shutdown(state.tcp, libc::SHUT_RDWR);
        // The rustls state (traffic secrets included) is dropped here.
        drop(state);
        super::retire(id);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Turn {
    Idle,
    Busy,
}

enum Step {
    Open { busy: bool },
    Finished,
}

/// A connection that cannot go on; both sockets get shut down.
#[derive(Debug)]
struct Fatal;

struct LinkState {
    tls: Connection,
    tcp: RawFd,
    /// The relay's end of the socketpair.
    app: RawFd,
    stats: Arc<Stats>,
    tcp_readable: bool,
    tcp_writable: bool,
    app_readable: bool,
    app_writable: bool,
    /// Both directions of the program's end are shut (it closed its last copy).
    app_hup: bool,
    /// The program is gone and the peer's end has not come yet: TCP is read (and dropped)
    /// until it comes or this passes (`rx::LINGER`).
    linger_until: Option<std::time::Instant>,
    /// Ciphertext read from TCP that rustls did not take yet (the plaintext batch was full).
    leftover: Vec<u8>,
    /// Decrypted plaintext the program's socket did not take yet (at most one batch).
    outbox: Vec<u8>,
    /// The peer's stream ended; EOF goes to the program once `outbox` is delivered.
    peer_ended: bool,
    tcp_eof: bool,
    /// Peer → program direction finished (EOF delivered, or the program is gone).
    rx_done: bool,
    /// The program's EOF was read; `close_notify` is queued.
    app_eof: bool,
    /// Program → peer direction finished (`close_notify` flushed, TCP shut for writing).
    tx_done: bool,
    /// Not driven yet: records rustls buffered during the handshake still need processing.
    fresh: bool,
    /// `key_update_after`: the limit, and when / at how many bytes we last rotated.
    rotate: Option<(tether_proto::KeyUpdateAfter, std::time::Instant, u64)>,
}

impl LinkState {
    fn new(pending: Pending) -> Self {
        Self {
            tls: pending.conn,
            tcp: pending.tcp,
            app: pending.app,
            stats: pending.stats,
            tcp_readable: true,
            tcp_writable: true,
            app_readable: true,
            app_writable: true,
            app_hup: false,
            linger_until: None,
            leftover: Vec::new(),
            outbox: Vec::new(),
            peer_ended: false,
            tcp_eof: false,
            rx_done: false,
            app_eof: false,
            tx_done: false,
            fresh: true,
            rotate: pending.rotate.map(|limit| (limit, std::time::Instant::now(), 0)),
        }
    }

    /// Record an epoll edge for the TCP side (`app == false`) or the program side.
    fn note(&mut self, bits: u32, app: bool) {
        let has = |mask: libc::c_int| bits & mask as u32 != 0;
        let broken = has(libc::EPOLLHUP | libc::EPOLLERR);
        let readable = broken || has(libc::EPOLLIN | libc::EPOLLRDHUP);
        let writable = broken || has(libc::EPOLLOUT);
        if app {
            self.app_readable |= readable;
            self.app_writable |= writable;
            self.app_hup |= has(libc::EPOLLHUP);
        } else {
            self.tcp_readable |= readable;
            self.tcp_writable |= writable;
        }
    }

    fn drive(&mut self, scratch: &mut [u8], plain: &mut Vec<u8>) -> Result<Step, Fatal> {
        let mut budget = BUDGET;
        if std::mem::take(&mut self.fresh) && self.tls.process_new_packets().is_err() {
            // Records rustls buffered before adoption may be bad: same handling as later ones.
            self.flush_alert();
            return Err(Fatal);
        }
        loop {
            let rx = self.pump_rx(scratch, plain, &mut budget)?;
            let tx = self.pump_tx(scratch, &mut budget)?;
            if self.rx_done && self.tx_done {
                return Ok(Step::Finished);
            }
            if budget == 0 {
                return Ok(Step::Open { busy: true });
            }
            if !rx && !tx {
                return Ok(Step::Open { busy: false });
            }
        }
    }

    /// After a TLS error rustls has queued an alert: one best-effort attempt to send it.
    fn flush_alert(&mut self) {
        let _ = self.tls.write_tls(&mut SocketWriter(self.tcp));
    }

    /// Program → peer: flush TLS output, then encrypt more of the program's bytes.
    fn pump_tx(&mut self, scratch: &mut [u8], budget: &mut u32) -> Result<bool, Fatal> {
        let mut progress = false;
        loop {
            while self.tls.wants_write() {
                if !self.tcp_writable {
                    return Ok(progress);
                }
                match self.tls.write_tls(&mut SocketWriter(self.tcp)) {
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.tcp_writable = false;
                        return Ok(progress);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(Fatal),
                }
            }
            if self.tx_done {
                return Ok(progress);
            }
            if self.app_eof {
                // close_notify is on the wire (in the kernel's send queue) before the FIN.
                sys::shutdown(self.tcp, libc::SHUT_WR);
                self.tx_done = true;
                return Ok(true);
            }
            if !self.app_readable || *budget == 0 {
                return Ok(progress);
            }
            *budget -= 1;
            match sys::recv(self.app, scratch) {
                Ok(n) if n > 0 => {
                    self.rotate_if_due();
                    let chunk = scratch.get(..n).ok_or(Fatal)?;
                    self.tls.writer().write_all(chunk).map_err(|_| Fatal)?;
                    self.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                // EOF (close or SHUT_WR); ECONNRESET means the program closed with our
                // plaintext unread: what it wrote before is still sent, then close_notify.
                Ok(_) => self.end_program_stream(),
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    self.end_program_stream()
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.app_readable = false;
                    return Ok(progress);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Fatal),
            }
            progress = true;
        }
    }

    /// `key_update_after`: before the program's next bytes are sealed, rotate our keys if the
    /// limit passed (rustls queues a KeyUpdate(update_requested), so the peer rotates too).
    fn rotate_if_due(&mut self) {
        let Some((limit, since, at)) = self.rotate else { return };
        let bytes = self.stats.sent.load(Ordering::Relaxed) + self.stats.received.load(Ordering::Relaxed);
        let due = match limit {
            tether_proto::KeyUpdateAfter::Elapsed(d) => since.elapsed() >= d,
            tether_proto::KeyUpdateAfter::Bytes(n) => bytes.saturating_sub(at) >= n,
            _ => false,
        };
        if due && self.tls.refresh_traffic_keys().is_ok() {
            self.rotate = Some((limit, std::time::Instant::now(), bytes));
        }
    }

    fn end_program_stream(&mut self) {
        self.app_eof = true;
        self.tls.send_close_notify();
    }
}
