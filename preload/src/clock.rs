//! Clock reads on the connection path, shared within one burst of work.
//!
//! Setting up a protected connection asks the time about ten times per side: the identity's
//! refresh time, the policy stamp's age, the handshake deadline, rustls's certificate checks,
//! the signer's idle check, the connection table's open time. On a host kernel each read is a
//! vDSO call of ~20 ns. In User-Mode Linux (and wherever else the vDSO is missing)
//! `clock_gettime` is a real system call: a ptrace round trip of ~30 µs there, and the largest
//! single group of the kTLS path's calls per connection (bench/results/2026-12-03: 11 of 48 on
//! the client, 18 of 70 on the server).
//!
//! A [`Burst`] is the work one shim call does between two waits: while one is open on a thread,
//! [`mono`] and [`real`] read each clock at most once and then answer from that read. Every
//! place that can block ends the read with [`waited`], so the next read after a wait is fresh:
//! a cached time is never older than the CPU work done since the last wait (microseconds to a
//! few milliseconds of handshake computation), never the wait itself. Deadlines therefore stay
//! exact to within that work, and a certificate's validity is judged at most that much late.
//! Outside a burst both functions read the clock.
//!
//! No lock, no allocation, no destructor: a thread-local `Cell` with const initialisation.

use std::cell::Cell;
use std::time::{Instant, SystemTime};

#[derive(Clone, Copy)]
struct Cache {
    depth: u32,
    mono: Option<Instant>,
    real: Option<SystemTime>,
}

thread_local! {
    static CACHE: Cell<Cache> = const { Cell::new(Cache { depth: 0, mono: None, real: None }) };
}

/// While alive, clock reads on this thread are shared until the next [`waited`]. Nests; not
/// `Send` (the cache is the thread's).
pub(crate) struct Burst {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Burst {
    pub(crate) fn begin() -> Self {
        let _ = CACHE.try_with(|c| {
            let mut v = c.get();
            v.depth += 1;
            c.set(v);
        });
        Self { _not_send: std::marker::PhantomData }
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        let _ = CACHE.try_with(|c| {
            let mut v = c.get();
            v.depth = v.depth.saturating_sub(1);
            if v.depth == 0 {
                v.mono = None;
                v.real = None;
            }
            c.set(v);
        });
    }
}

/// The monotonic time: the burst's read if there is one, else a fresh one.
pub(crate) fn mono() -> Instant {
    shared(|c| &mut c.mono, Instant::now)
}

/// The wall-clock time (certificate validity, SVID refresh, report times), likewise.
pub(crate) fn real() -> SystemTime {
    shared(|c| &mut c.real, SystemTime::now)
}

/// `read()`, or within a burst the value `slot` of the cache keeps from the burst's first read.
fn shared<T: Copy>(slot: fn(&mut Cache) -> &mut Option<T>, read: fn() -> T) -> T {
    CACHE
        .try_with(|c| {
            let mut v = c.get();
            if v.depth == 0 {
                return read();
            }
            let t = *slot(&mut v).get_or_insert_with(read);
            c.set(v);
            t
        })
        .unwrap_or_else(|_| read())
}

/// The thread may have waited (poll, a blocking connect or accept, a broker round trip, a
/// contended lock: `sync::Lock`): the next read is fresh.
pub(crate) fn waited() {
    let _ = CACHE.try_with(|c| {
        let v = c.get();
        if v.mono.is_some() || v.real.is_some() {
            c.set(Cache { mono: None, real: None, ..v });
        }
    });
}

/// [`real`] as rustls and webpki take it (a wall clock before 1970 reads as 1970).
pub(crate) fn unix_time() -> rustls::pki_types::UnixTime {
    rustls::pki_types::UnixTime::since_unix_epoch(real().duration_since(std::time::UNIX_EPOCH).unwrap_or_default())
}

/// rustls's clock for the configs of [`crate::tls::configs`]: the burst's wall-clock time.
#[derive(Debug)]
pub(crate) struct RustlsTime;

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(unix_time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_shares_one_read_until_a_wait() {
        let outside = mono();
        std::thread::sleep(Duration::from_millis(2));
        assert!(mono() > outside, "outside a burst every read is fresh");
        let b = Burst::begin();
        let (m, r) = (mono(), real());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!((mono(), real()), (m, r), "within a burst the first read is kept");
        {
            let _inner = Burst::begin();
            assert_eq!(mono(), m, "a nested burst shares the outer one's read");
        }
        assert_eq!(mono(), m, "the end of a nested burst keeps the outer one's read");
        waited();
        assert!(mono() >= m + Duration::from_millis(2), "after a wait the read is fresh");
        drop(b);
        let after = mono();
        std::thread::sleep(Duration::from_millis(2));
        assert!(mono() > after, "after the burst every read is fresh again");
    }

    #[test]
    fn bursts_are_per_thread() {
        let _b = Burst::begin();
        let m = mono();
        std::thread::sleep(Duration::from_millis(2));
        let other = std::thread::spawn(mono).join().expect("the thread reads the clock");
        assert!(other > m, "another thread has no burst open");
    }
}
