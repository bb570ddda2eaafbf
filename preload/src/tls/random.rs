//! The randomness rustls asks its provider for (`CryptoProvider::secure_random`): a client's
//! hello random, legacy session id and extension-order seed (66 bytes, three `getrandom` calls
//! per handshake with ring's), a server's random. None of it is key material: ECDHE and
//! signing keys come from ring's own `SystemRandom`, untouched. Here each thread keeps a small
//! buffer filled by one call to ring's source and hands it out, wiped as it goes, so a
//! handshake usually makes no `getrandom` of its own for these.
//!
//! Fork: the child handler wipes the forking thread's buffer (the only thread a child has), so
//! parent and child never hand out the same bytes. A vfork child (or a `clone` child without
//! `CLONE_VM`) runs no handshake: its connects are refused (`crate::fork`).

use std::cell::RefCell;

use rustls::crypto::{GetRandomFailed, SecureRandom};

/// Bytes fetched per refill: about 15 client handshakes.
const BUF: usize = 1024;

struct Pool {
    bytes: [u8; BUF],
    /// Bytes at the end of `bytes` not handed out yet (the rest are zero).
    left: usize,
}

thread_local! {
    // `const`: no destructor, usable while other thread-locals are being destroyed.
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; BUF], left: 0 }) };
}

/// ring's source (one `getrandom` per fill).
fn source() -> &'static dyn SecureRandom {
    rustls::crypto::ring::default_provider().secure_random
}

#[derive(Debug)]
pub(crate) struct Buffered;

impl SecureRandom for Buffered {
    fn fill(&self, out: &mut [u8]) -> Result<(), GetRandomFailed> {
        if out.len() > BUF / 4 {
            return source().fill(out);
        }
        let taken = POOL.try_with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else { return Err(GetRandomFailed) };
            if p.left < out.len() {
                source().fill(&mut p.bytes)?;
                p.left = BUF;
            }
            let end = p.left;
            let start = end - out.len();
            out.copy_from_slice(&p.bytes[start..end]);
            p.bytes[start..end].fill(0);
            p.left = start;
            Ok(())
        });
        match taken {
            Ok(r) => r,
            // Thread-locals gone (thread exit): straight from the source.
            Err(_) => source().fill(out),
        }
    }
}

/// In the fork child, on the thread that forked: forget what the parent had buffered.
pub(crate) fn after_fork_child() {
    let _ = POOL.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.bytes.fill(0);
            p.left = 0;
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;

    #[test]
    fn fills_never_repeat_and_refill_when_short() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut b = [0u8; 32];
            Buffered.fill(&mut b).unwrap();
            assert!(seen.insert(b), "a 32-byte fill repeated");
        }
        let mut big = [0u8; 4096];
        Buffered.fill(&mut big).unwrap();
        assert!(big.iter().any(|&b| b != 0));
    }

    #[test]
    fn fork_child_forgets_the_buffer() {
        let mut b = [0u8; 2];
        Buffered.fill(&mut b).unwrap();
        assert!(POOL.with(|p| p.borrow().left) > 0);
        after_fork_child();
        assert_eq!(POOL.with(|p| p.borrow().left), 0);
        assert!(POOL.with(|p| p.borrow().bytes.iter().all(|&b| b == 0)));
    }
}
