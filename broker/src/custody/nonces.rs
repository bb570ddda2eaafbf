//! Offline/online ECDSA P-256 for broker signatures: the expensive half of a signature, the
//! nonce `k` and `r = x(k·G) mod n`, does not depend on the key or the message, so an
//! idle-priority thread makes `(k⁻¹, r)` pairs ahead of time and a signing frame only computes
//! `s = k⁻¹·(z + r·d) mod n` (well under a microsecond) instead of a whole signature on the
//! handshake's critical path (ARCHITECTURE.md, "Key custody").
//!
//! ring makes the nonce: the pool thread signs a fixed message `m₀` with a key `d₀` that signs
//! nothing else, and recovers `k⁻¹ = s₀·(z₀ + r·d₀)⁻¹` from that signature `(r, s₀)`, which is
//! then wiped and never leaves this module. (The RustCrypto `p256` crate could make `k·G`
//! itself, but took 131 µs a point against ring's 17 µs for a whole signature on the same
//! host.) The scalar arithmetic is `p256`'s, constant time. Every pair is moved out of the
//! pool by the one signature that uses it and wiped when that signature is made: a nonce is
//! never used twice. An empty pool (a burst, or a busy machine where the idle-priority thread
//! gets no CPU) is no failure: the signature is then ring's, made inline.

use std::sync::{Condvar, Mutex};

use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::Field;
use p256::{FieldBytes, Scalar, U256};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use zeroize::Zeroize;

use crate::sys;

/// Pairs kept ready: a burst of 128 handshakes (two signatures each) without an inline one.
pub const POOL: usize = 256;
/// The pool thread is woken when a signature leaves fewer than this.
const LOW_WATER: usize = POOL * 3 / 4;
/// The fixed message the nonce key signs.
const M0: &[u8] = b"tetherd nonce";

/// One nonce: `k⁻¹` and `r`. Wiped on drop.
struct Nonce {
    k_inv: Scalar,
    r: Scalar,
}

impl Drop for Nonce {
    fn drop(&mut self) {
        self.k_inv.zeroize();
        self.r.zeroize();
    }
}

struct Pool {
    ready: Vec<Nonce>,
    /// The pool thread waits for `wake` (it is not computing).
    sleeping: bool,
}

/// The nonce pool and its maker.
pub struct Nonces {
    pool: Mutex<Pool>,
    wake: Condvar,
    maker: Option<Maker>,
}

/// The nonce key `d₀` (as ring's pair, which signs `m₀`, and as a scalar) and `z₀`.
struct Maker {
    pair: sys::Wiped<EcdsaKeyPair>,
    d0: Scalar,
    z0: Scalar,
    rng: SystemRandom,
}

impl Drop for Maker {
    fn drop(&mut self) {
        self.d0.zeroize();
    }
}

impl Default for Nonces {
    fn default() -> Self {
        Self {
            pool: Mutex::new(Pool { ready: Vec::with_capacity(POOL), sleeping: false }),
            wake: Condvar::new(),
            maker: Maker::new(),
        }
    }
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces").field("ready", &self.lock().ready.len()).finish()
    }
}

impl Maker {
    fn new() -> Option<Self> {
        use p256::pkcs8::DecodePrivateKey;
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).ok()?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).ok()?;
        // `doc` (ring's Document) is not wiped on drop: its key signs only m₀, whose
        // signatures never leave this module, and the nonces it yields are fresh per signature.
        let d0 = *p256::SecretKey::from_pkcs8_der(doc.as_ref()).ok()?.to_nonzero_scalar();
        Some(Self { pair: sys::Wiped::new(pair), d0, z0: digest_scalar(M0), rng })
    }

    /// A fresh nonce, or `None` if ring failed or the (negligible) degenerate case came up.
    fn make(&self) -> Option<Nonce> {
        // ring's `Signature` (a stack value with no way to wipe it) holds (r, s₀) until the
        // stack is reused; with d₀, which lives in this process too, it gives k.
        let sig = self.pair.sign(&self.rng, M0).ok()?;
        let mut rs = [0u8; 64];
        rs.copy_from_slice(sig.as_ref());
        let r = reduce(&rs[..32]);
        let mut s0 = reduce(&rs[32..]);
        rs.zeroize();
        // k = s₀⁻¹·(z₀ + r·d₀), so k⁻¹ = s₀·(z₀ + r·d₀)⁻¹.
        let mut t = self.z0 + r * self.d0;
        let inv = Option::<Scalar>::from(t.invert());
        t.zeroize();
        let nonce = inv.map(|inv| Nonce { k_inv: s0 * inv, r });
        s0.zeroize();
        nonce.filter(|n| !bool::from(n.r.is_zero()))
    }
}

impl Nonces {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pairs ready now.
    pub fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    /// Fill the pool forever (the pool thread; at `SCHED_IDLE`, so that it only ever takes CPU
    /// no one else wants).
    pub fn refill_forever(&self) {
        if self.maker.is_none() {
            return;
        }
        sys::set_idle_priority();
        loop {
            if !self.refill(POOL) {
                // ring could not sign: signatures are made inline meanwhile.
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
            let mut p = self.lock();
            while p.ready.len() >= LOW_WATER {
                p.sleeping = true;
                p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            p.sleeping = false;
        }
    }

    /// Make nonces (outside the lock) until `target` are ready; false if one could not be made.
    pub fn refill(&self, target: usize) -> bool {
        let Some(maker) = &self.maker else { return false };
        while self.ready() < target.min(POOL) {
            let Some(n) = maker.make() else { return false };
            self.lock().ready.push(n);
        }
        true
    }

    /// Take one nonce, waking the pool thread when the pool runs low.
    fn take(&self) -> Option<Nonce> {
        let mut p = self.lock();
        let n = p.ready.pop();
        // `pop` moved the pair out; its bytes are still in the slot it left.
        if let Some(slot) = p.ready.spare_capacity_mut().first_mut() {
            slot.zeroize();
        }
        if p.sleeping && p.ready.len() < LOW_WATER {
            p.sleeping = false;
            self.wake.notify_one();
        }
        n
    }

    /// Sign `message` (ECDSA P-256, SHA-256) with the private scalar `d`, writing the DER
    /// signature into `out`. `None` when no nonce is ready (the caller signs inline).
    pub fn sign(&self, d: &Scalar, message: &[u8], out: &mut [u8]) -> Option<usize> {
        let nonce = self.take()?;
        let z = digest_scalar(message);
        let mut s = nonce.k_inv * (z + nonce.r * d);
        let r = nonce.r.to_bytes();
        drop(nonce);
        if bool::from(s.is_zero()) {
            return None;
        }
        let sig = p256::ecdsa::Signature::from_scalars(r, s.to_bytes());
        s.zeroize();
        let der = sig.ok()?.to_der();
        let der = der.as_bytes();
        let dst = out.get_mut(..der.len())?;
        dst.copy_from_slice(der);
        Some(der.len())
    }
}

fn reduce(bytes: &[u8]) -> Scalar {
    let mut b = FieldBytes::default();
    b.copy_from_slice(bytes);
    let x = <Scalar as Reduce<U256>>::reduce_bytes(&b);
    b.zeroize();
    x
}

/// `z`: the SHA-256 of `message` as a scalar (for P-256 and SHA-256, bits2int is the whole
/// digest, reduced mod n).
fn digest_scalar(message: &[u8]) -> Scalar {
    reduce(ring::digest::digest(&ring::digest::SHA256, message).as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests
    use super::*;
    use p256::pkcs8::DecodePrivateKey;
    use ring::signature::{KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING};

    fn key() -> (Scalar, Vec<u8>) {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref(), &rng).unwrap();
        let d = *p256::SecretKey::from_pkcs8_der(doc.as_ref()).unwrap().to_nonzero_scalar();
        (d, pair.public_key().as_ref().to_vec())
    }

    #[test]
    fn signatures_with_precomputed_nonces_verify_and_use_each_nonce_once() {
        let nonces = Nonces::default();
        assert!(nonces.refill(64));
        assert_eq!(nonces.ready(), 64);
        let (d, public) = key();
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public);
        let mut rs = std::collections::HashSet::new();
        for i in 0..64 {
            let message = format!("{:64}TLS 1.3, server CertificateVerify\0{i:032}", "");
            let mut out = [0u8; 128];
            let n = nonces.sign(&d, message.as_bytes(), &mut out).expect("a nonce was ready");
            assert_eq!(nonces.ready(), 63 - i);
            public.verify(message.as_bytes(), &out[..n]).expect("signature verifies");
            let sig = p256::ecdsa::Signature::from_der(&out[..n]).unwrap();
            assert!(rs.insert(sig.split_bytes().0), "a nonce was used twice");
            assert!(public.verify(b"another message", &out[..n]).is_err());
        }
        // Empty: the caller signs inline.
        assert_eq!(nonces.sign(&d, b"m", &mut [0u8; 128]), None);
    }

    #[test]
    fn the_pool_thread_refills_below_the_low_water_mark() {
        let nonces = std::sync::Arc::new(Nonces::default());
        let maker = std::sync::Arc::clone(&nonces);
        std::thread::spawn(move || maker.refill_forever());
        let wait_for = |n: usize| {
            let start = std::time::Instant::now();
            while nonces.ready() < n {
                assert!(start.elapsed() < std::time::Duration::from_secs(20), "pool stuck at {}", nonces.ready());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        wait_for(POOL);
        let (d, _) = key();
        for _ in 0..=(POOL - LOW_WATER) {
            nonces.sign(&d, b"m", &mut [0u8; 128]).unwrap();
        }
        wait_for(POOL);
    }
}
