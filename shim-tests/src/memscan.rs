//! Reading a process's memory (root, `/proc/PID/mem`) for key material: the custody tests look
//! for the 32-byte P-256 private scalar that tetherd holds for a workload.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// The PKCS#8 v1 header of a P-256 key with its public key (as rcgen and ring write it):
/// `SEQUENCE(135) { INTEGER 0, AlgorithmIdentifier(ecPublicKey, prime256v1), OCTET STRING ...`
pub const P256_PKCS8_PREFIX: [u8; 26] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
];
/// Length of such a document.
pub const P256_PKCS8_LEN: usize = 138;

/// The private scalar inside a PKCS#8 v1 document (after `02 01 01 04 20`).
pub fn scalar(pkcs8: &[u8]) -> Option<[u8; 32]> {
    let at = pkcs8
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])?
        + 5;
    pkcs8.get(at..at + 32)?.try_into().ok()
}

/// Every readable region of `pid` worth searching: anonymous or writable mappings (heap,
/// stacks, arenas, .data/.bss), not read-only file contents.
pub fn regions(pid: u32) -> Vec<Vec<u8>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let Ok(mut mem) = File::open(format!("/proc/{pid}/mem")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).unwrap_or("");
        let anonymous =
            path.is_empty() || (path.starts_with('[') && path != "[vvar]" && path != "[vsyscall]");
        if !perms.starts_with('r') || !(anonymous || perms.as_bytes().get(1) == Some(&b'w')) {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        let mut buf = vec![0u8; (hi - lo) as usize];
        if mem.seek(SeekFrom::Start(lo)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            out.push(buf);
        }
    }
    out
}

/// Occurrences of `needle` in `pid`'s memory.
pub fn count(pid: u32, needle: &[u8]) -> usize {
    regions(pid)
        .iter()
        .map(|r| r.windows(needle.len()).filter(|w| *w == needle).count())
        .sum()
}

/// Every P-256 PKCS#8 document in `pid`'s memory (deduplicated).
pub fn pkcs8_documents(pid: u32) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for r in regions(pid) {
        let mut i = 0;
        while let Some(at) = r[i..]
            .windows(P256_PKCS8_PREFIX.len())
            .position(|w| w == P256_PKCS8_PREFIX)
        {
            let start = i + at;
            if let Some(doc) = r.get(start..start + P256_PKCS8_LEN) {
                if !out.iter().any(|d| d == doc) {
                    out.push(doc.to_vec());
                }
            }
            i = start + 1;
        }
    }
    out
}

/// The order n of P-256, as little-endian 64-bit limbs.
const P256_N: [u64; 4] = [
    0xf3b9_cac2_fc63_2551,
    0xbce6_faad_a717_9e84,
    0xffff_ffff_ffff_ffff,
    0xffff_ffff_0000_0000,
];

/// The encodings a P-256 private scalar `d` (big-endian, as in PKCS#8) takes in memory: the
/// raw big-endian bytes, the same little-endian, and ring's parsed form (`EcdsaKeyPair` keeps
/// `d` in Montgomery form, d·2^256 mod n, as little-endian 64-bit limbs).
pub fn scalar_encodings(d: &[u8; 32]) -> Vec<[u8; 32]> {
    let mut le = *d;
    le.reverse();
    let mut x = [0u64; 4];
    for (i, limb) in x.iter_mut().enumerate() {
        *limb = u64::from_le_bytes(le[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    }
    for _ in 0..256 {
        x = double_mod_n(x);
    }
    let mut mont = [0u8; 32];
    for (i, limb) in x.iter().enumerate() {
        mont[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
    }
    vec![*d, le, mont]
}

/// 2x mod n, for x < n.
fn double_mod_n(x: [u64; 4]) -> [u64; 4] {
    let mut y = [0u64; 4];
    let mut carry = 0u64;
    for i in 0..4 {
        y[i] = (x[i] << 1) | carry;
        carry = x[i] >> 63;
    }
    let ge = carry == 1
        || (0..4)
            .rev()
            .find(|&i| y[i] != P256_N[i])
            .is_none_or(|i| y[i] > P256_N[i]);
    if ge {
        let mut borrow = 0u64;
        for i in 0..4 {
            let (a, b1) = y[i].overflowing_sub(P256_N[i]);
            let (a, b2) = a.overflowing_sub(borrow);
            y[i] = a;
            borrow = u64::from(b1 || b2);
        }
    }
    y
}
