//! The per-connection reader: frame deadlines, and the sender of every chunk checked against
//! the process that connected.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::attest::{self, Peer};
use crate::sys;

/// Reads that fail with `TimedOut` once the frame's deadline passes, however the bytes trickle
/// in, and that check the sender of every chunk (`SCM_CREDENTIALS`, `SCM_PIDFD`) against the
/// process that connected. A chunk from anyone else fails with `PermissionDenied`, with the
/// reason left in `foreign`.
///
/// One per connection, so that a request costs one `recvmsg` (plus the `fstat` and `close` of
/// its `SCM_PIDFD`): a chunk is received into `buf` whole (a signing frame always fits) and the
/// frame is parsed from there. Every buffered byte was checked when it was received (the kernel
/// never merges two senders' bytes into one `recvmsg`). SO_RCVTIMEO stays at the frame
/// timeout between frames, which bounds a frame's first wait; only a frame that needs a second
/// `recvmsg` sets it to what is left of its deadline (and the next frame sets it back).
pub(super) struct AttestedReader<'a> {
    stream: &'a UnixStream,
    peer: Option<&'a Peer>,
    frame_timeout: Duration,
    deadline: Instant,
    /// SO_RCVTIMEO is `frame_timeout` (false before the first read, and after a shortened one).
    standing: bool,
    /// Nothing of the current frame has been taken from the socket yet.
    fresh: bool,
    buf: [u8; READ_BUF],
    start: usize,
    end: usize,
    pub(super) foreign: Option<attest::AttestError>,
}

/// Room for a whole signing frame and a small message frame.
const READ_BUF: usize = 1024;

impl<'a> AttestedReader<'a> {
    pub(super) fn new(stream: &'a UnixStream, peer: Option<&'a Peer>, frame_timeout: Duration) -> Self {
        let deadline = Instant::now() + frame_timeout;
        Self {
            stream,
            peer,
            frame_timeout,
            deadline,
            standing: false,
            fresh: true,
            buf: [0; READ_BUF],
            start: 0,
            end: 0,
            foreign: None,
        }
    }

    /// The next frame starts now: its deadline is one frame timeout away.
    pub(super) fn begin_frame(&mut self) {
        self.deadline = Instant::now() + self.frame_timeout;
        self.fresh = true;
    }

    /// One `recvmsg` into `into`, its sender checked.
    fn recv(&mut self, into: Dest<'_>) -> io::Result<usize> {
        let buf = match into {
            Dest::Caller(b) => b,
            Dest::Own => &mut self.buf[..],
        };
        let (n, sender) = sys::recv_with_sender(self.stream, buf)?;
        if n > 0 {
            if let Some(p) = self.peer {
                if let Err(e) = p.check_sender(sender.as_ref()) {
                    self.foreign = Some(e);
                    return Err(io::ErrorKind::PermissionDenied.into());
                }
            }
        }
        Ok(n)
    }
}

/// Where [`AttestedReader::recv`] puts the bytes: the caller's buffer (large reads) or its own.
enum Dest<'b> {
    Caller(&'b mut [u8]),
    Own,
}

impl Read for AttestedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.start < self.end {
            let n = buf.len().min(self.end - self.start);
            buf[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            self.fresh = false;
            return Ok(n);
        }
        if !self.fresh {
            // The rest of a frame: whatever is left of its deadline (the clock is read only
            // here: a frame taken in one `recvmsg`, every signing frame, reads it once, in
            // `begin_frame`).
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
            self.standing = false;
        } else if !self.standing {
            self.stream.set_read_timeout(Some(self.frame_timeout))?;
            self.standing = true;
        }
        self.fresh = false;
        if buf.len() >= READ_BUF {
            return self.recv(Dest::Caller(buf));
        }
        let got = self.recv(Dest::Own)?;
        let n = buf.len().min(got);
        buf[..n].copy_from_slice(&self.buf[..n]);
        (self.start, self.end) = (n, got);
        Ok(n)
    }
}

impl Drop for AttestedReader<'_> {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf);
    }
}
