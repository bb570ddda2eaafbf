//! When accept runs a server handshake itself (issue 14).
//!
//! A connection whose ClientHello is queued when accept takes it can finish on the accepting
//! thread: the server flight is sent at once, and the client's second flight normally follows
//! within a round trip plus the client's own work (verifying our chain, having tetherd sign
//! its CertificateVerify). That saves the hand-offs to a worker and back (eventfd, futex,
//! poll, two wake-ups), which were most of the host setup latency. The price is that accept
//! waits for the client, so the wait is bounded three ways:
//! - **per connection**: [`SLACK`] plus two of the connection's measured round trips
//!   (`TCP_INFO`, from the TCP handshake), and a client farther than [`MAX_WAIT`] allows is
//!   not waited for at all (worker, as before);
//! - **other work first**: the wait ends as soon as the listener has another connection queued
//!   (the handshake goes on on a worker), and no handshake is started inline while one is ready
//!   for the program;
//! - **a budget for waits that were wasted** (ended in a pause or a failure): they may take at
//!   most 1/[`REPAY`] of the time, with a burst of [`BURST`]. Clients that send a ClientHello
//!   and stall therefore switch inline handshakes off for everyone until the budget refills,
//!   and cost accept no more than that share of its time.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tether_proto::{InboundRule, Mode};

use super::{with_pool, HELD};
use crate::settings;
use crate::sys::net;

/// The client's own work between our server flight and its second flight.
const SLACK: Duration = Duration::from_millis(2);
/// The longest an inline handshake waits for its client.
const MAX_WAIT: Duration = Duration::from_millis(5);
/// A wasted wait is repaid over this many times its length...
const REPAY: u32 = 20;
/// ...and at most this much wasted waiting can be owed at once.
const BURST: Duration = Duration::from_millis(10);
/// Below this, a wait is not worth starting inline.
const MIN_WAIT: Duration = Duration::from_micros(500);

/// Until when (ns after [`base`]) wasted waits are being repaid.
static REPAID_AT: AtomicU64 = AtomicU64::new(0);

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(crate::clock::mono().saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX)
}

/// How long a handshake on `fd` (just accepted from `lfd`) may wait for its client inline, or
/// `None` to hand it to a worker as before.
pub(super) fn bound(lfd: RawFd, fd: RawFd, rule: &InboundRule) -> Option<Duration> {
    // A permissive port's client may not speak TLS at all: the worker tells.
    if rule.mode != Mode::Mutual || !settings::get().inline_accept {
        return None;
    }
    let left = budget();
    if left < MIN_WAIT {
        return None;
    }
    // A connection the program has not taken yet goes first.
    if HELD.load(Ordering::Acquire) != 0 && with_pool(|p| p.ready.contains_key(&lfd)) {
        return None;
    }
    let rtt = Duration::from_micros(net::tcp_info(fd)?.tcpi_rtt.into());
    let want = SLACK + 2 * rtt;
    (want <= MAX_WAIT).then(|| want.min(left))
}

/// Wasted waiting this process may still do now.
fn budget() -> Duration {
    let owed = Duration::from_nanos(REPAID_AT.load(Ordering::Relaxed).saturating_sub(now_ns()));
    (BURST * REPAY).saturating_sub(owed) / REPAY
}

/// An inline handshake ended: delivered (`ok`), or paused or failed after `waited`.
pub(super) fn finished(ok: bool, waited: Duration) {
    if ok || waited.is_zero() {
        return;
    }
    let owe = u64::try_from((waited * REPAY).as_nanos()).unwrap_or(u64::MAX);
    let now = now_ns();
    let _ = REPAID_AT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.max(now).saturating_add(owe)));
}
