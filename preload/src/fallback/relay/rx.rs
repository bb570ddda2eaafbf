//! Peer → program: TCP ciphertext → rustls → the program's socket, in batches.
//!
//! Decrypted plaintext is gathered from rustls record by record into the relay's `plain` buffer
//! (up to [`BATCH`]) and handed to the program in one `send`, so a reader blocked in `read`
//! wakes once per batch rather than once per 16 KiB record. Profiled before this (512 MiB
//! bulk write on the host, see bench/results notes): the receiving program and the relay each
//! switched context ~14,000 times, about once per two records; contention for the CPU made
//! every one of those hand-overs a wait in the run queue.
//!
//! Bounds: TCP is read only while `plain` has room and nothing is held back for the program;
//! plaintext the program's socket did not take waits in `outbox` (at most one batch), and the
//! ciphertext after a full batch waits in `leftover` (at most one TCP read).

use std::io::{self, BufRead};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::super::sys;
use super::{Fatal, LinkState};

/// Most plaintext handed to the program in one `send`.
pub(super) const BATCH: usize = 128 * 1024;

/// How long a connection whose program is gone keeps reading TCP for the peer's end.
pub(super) const LINGER: Duration = Duration::from_secs(2);

/// What taking plaintext out of rustls found.
enum Taken {
    /// rustls holds no more plaintext for now.
    Empty,
    /// `plain` reached [`BATCH`].
    Full,
    /// The peer's stream ended (`close_notify`, or a TCP EOF without one) and every byte
    /// before the end is in `plain`.
    Ended,
}

/// What sending to the program did.
enum Sent {
    /// Everything was taken.
    All,
    /// The program's socket is full; this many bytes were taken.
    Part(usize),
    /// The program is gone (EPIPE): nothing more can be delivered.
    Gone,
}

impl LinkState {
    /// Peer → program: deliver held plaintext, then gather and deliver more, until something
    /// blocks. Returns whether anything moved.
    pub(super) fn pump_rx(
        &mut self,
        scratch: &mut [u8],
        plain: &mut Vec<u8>,
        budget: &mut u32,
    ) -> Result<bool, Fatal> {
        if self.rx_done {
            return Ok(false);
        }
        if self.app_hup {
            return self.linger(scratch, plain, budget);
        }
        let mut progress = false;
        loop {
            if !self.outbox.is_empty() {
                if !self.app_writable {
                    return Ok(progress);
                }
                let held = std::mem::take(&mut self.outbox);
                match self.send_app(&held)? {
                    Sent::All => progress = true,
                    Sent::Part(n) => {
                        progress |= n > 0;
                        self.outbox = held;
                        self.outbox.drain(..n);
                        return Ok(progress);
                    }
                    Sent::Gone => return self.gone_mid_stream(scratch, plain, budget),
                }
            }
            if self.peer_ended {
                // Every byte before the end is delivered: now the program reads EOF.
                sys::shutdown(self.app, libc::SHUT_WR);
                self.rx_done = true;
                return Ok(true);
            }
            plain.clear();
            self.peer_ended = self.collect(scratch, plain, budget)?;
            if plain.is_empty() {
                if self.peer_ended {
                    continue;
                }
                return Ok(progress);
            }
            progress = true;
            match self.send_app(plain)? {
                Sent::All => {}
                Sent::Part(n) => {
                    // Held for the next EPOLLOUT; TCP is not read meanwhile.
                    self.outbox.extend_from_slice(plain.get(n..).ok_or(Fatal)?);
                    return Ok(true);
                }
                Sent::Gone => return self.gone_mid_stream(scratch, plain, budget),
            }
        }
    }

    /// The program is gone, so nobody reads what we would decrypt; but a socket closed now
    /// would answer the peer's next bytes (a TLS 1.3 server's session tickets, often sent
    /// after the client's first data; its reply; its close_notify) with a reset, and a reset
    /// makes the peer's kernel drop what its program has not read yet. So read and drop
    /// until the peer's end, for at most [`LINGER`].
    fn linger(&mut self, scratch: &mut [u8], plain: &mut Vec<u8>, budget: &mut u32) -> Result<bool, Fatal> {
        let until = *self.linger_until.get_or_insert_with(|| Instant::now() + LINGER);
        let mut progress = false;
        loop {
            if self.peer_ended || self.tcp_eof || Instant::now() >= until {
                return Ok(self.program_gone());
            }
            plain.clear();
            let before = *budget;
            self.peer_ended = self.collect(scratch, plain, budget)?;
            let moved = !plain.is_empty() || *budget != before;
            plain.clear();
            if !moved && !self.peer_ended {
                return Ok(progress);
            }
            progress = true;
        }
    }

    /// EPIPE: the program closed its end with our plaintext unread (drop it), then linger.
    fn gone_mid_stream(&mut self, scratch: &mut [u8], plain: &mut Vec<u8>, budget: &mut u32) -> Result<bool, Fatal> {
        self.app_hup = true;
        self.outbox = Vec::new();
        self.linger(scratch, plain, budget).map(|_| true)
    }

    fn program_gone(&mut self) -> bool {
        self.rx_done = true;
        self.outbox = Vec::new();
        true
    }

    /// Gather plaintext into `plain` (up to [`BATCH`]): what rustls holds, then the leftover
    /// ciphertext, then TCP reads. Returns `true` if the peer's stream ended.
    fn collect(
        &mut self,
        scratch: &mut [u8],
        plain: &mut Vec<u8>,
        budget: &mut u32,
    ) -> Result<bool, Fatal> {
        loop {
            match self.take_plaintext(plain)? {
                Taken::Ended => return Ok(true),
                Taken::Full => return Ok(false),
                Taken::Empty => {}
            }
            if !self.leftover.is_empty() {
                let left = std::mem::take(&mut self.leftover);
                let used = self.feed(&left, plain)?;
                if let Some(rest) = left.get(used..).filter(|r| !r.is_empty()) {
                    self.leftover = rest.to_vec();
                }
                continue;
            }
            if self.tcp_eof || !self.tcp_readable || *budget == 0 {
                return Ok(false);
            }
            *budget -= 1;
            match sys::recv(self.tcp, scratch) {
                Ok(0) => {
                    self.tcp_eof = true;
                    // Tell rustls about the EOF: an unclean one then reads as UnexpectedEof.
                    let _ = self.tls.read_tls(&mut io::empty());
                }
                Ok(n) => {
                    let chunk = scratch.get(..n).ok_or(Fatal)?;
                    let used = self.feed(chunk, plain)?;
                    if let Some(rest) = chunk.get(used..) {
                        self.leftover.extend_from_slice(rest);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tcp_readable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNRESET and friends: the TCP stream is broken.
                Err(_) => return Err(Fatal),
            }
        }
    }

    /// Move rustls' decrypted plaintext into `plain`, up to [`BATCH`].
    fn take_plaintext(&mut self, plain: &mut Vec<u8>) -> Result<Taken, Fatal> {
        loop {
            let room = BATCH.saturating_sub(plain.len());
            if room == 0 {
                return Ok(Taken::Full);
            }
            let mut reader = self.tls.reader();
            match reader.fill_buf() {
                Ok([]) => return Ok(Taken::Ended),
                Ok(chunk) => {
                    let n = chunk.len().min(room);
                    plain.extend_from_slice(chunk.get(..n).ok_or(Fatal)?);
                    reader.consume(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Taken::Empty),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.stats.truncated.store(true, Ordering::Release);
                    return Ok(Taken::Ended);
                }
                Err(_) => return Err(Fatal),
            }
        }
    }

    /// Give rustls as much of `data` as it takes, record by record, moving the plaintext of
    /// each into `plain`; stops when `plain` is full. Returns how many bytes rustls took.
    fn feed(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<usize, Fatal> {
        let mut rest = data;
        while !rest.is_empty() {
            match self.tls.read_tls(&mut rest) {
                // close_notify was received: anything after it is ignored.
                Ok(0) => return Ok(data.len()),
                Ok(_) => {}
                // "received plaintext buffer full": `plain` is full too (see below).
                Err(e) if e.kind() == io::ErrorKind::Other => break,
                Err(_) => return Err(Fatal),
            }
            if self.tls.process_new_packets().is_err() {
                self.flush_alert();
                return Err(Fatal);
            }
            match self.take_plaintext(plain)? {
                Taken::Empty => {}
                // Ended: rustls takes nothing after close_notify; the caller sees Ended next.
                Taken::Full | Taken::Ended => break,
            }
        }
        Ok(data.len() - rest.len())
    }

    /// Send `data` to the program's socket until it is all taken or the socket is full.
    fn send_app(&mut self, data: &[u8]) -> Result<Sent, Fatal> {
        let mut at = 0;
        while let Some(rest) = data.get(at..).filter(|r| !r.is_empty()) {
            match sys::send(self.app, rest) {
                Ok(n) => {
                    at += n;
                    self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.app_writable = false;
                    return Ok(Sent::Part(at));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                    return Ok(Sent::Gone)
                }
                Err(_) => return Err(Fatal),
            }
        }
        Ok(Sent::All)
    }
}
