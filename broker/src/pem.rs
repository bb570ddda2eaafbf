//! Minimal PEM encoding and decoding (RFC 7468) for certificates and PKCS#8 keys.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

pub const CERTIFICATE: &str = "CERTIFICATE";
pub const PRIVATE_KEY: &str = "PRIVATE KEY";

/// One PEM block, base64 wrapped at 64 columns. The result is zeroized on drop, because
/// it may hold a private key.
pub fn encode(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64 = Zeroizing::new(STANDARD.encode(der));
    let mut out = Zeroizing::new(String::with_capacity(b64.len() + b64.len() / 64 + 64));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Every block labelled `label` in `text`, in order. Other blocks and text between blocks
/// are skipped; a malformed block is an error.
pub fn decode_all(text: &str, label: &str) -> Result<Vec<Zeroizing<Vec<u8>>>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != begin {
            continue;
        }
        let mut b64 = Zeroizing::new(String::new());
        loop {
            match lines.next() {
                Some(l) if l == end => break,
                Some(l) => b64.push_str(l),
                None => return Err(format!("unterminated {label} block")),
            }
        }
        let der = STANDARD.decode(b64.as_bytes()).map_err(|e| format!("bad base64 in {label} block: {e}"))?;
        out.push(Zeroizing::new(der));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;

    #[test]
    fn round_trip_and_wrapping() {
        let der: Vec<u8> = (0..200u8).collect();
        let pem = encode(CERTIFICATE, &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let twice = format!("junk\n{}{}", *pem, *pem);
        let back = decode_all(&twice, CERTIFICATE).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(*back[0], der);
        assert!(decode_all(&twice, PRIVATE_KEY).unwrap().is_empty());
        assert!(decode_all("-----BEGIN CERTIFICATE-----\nAAAA\n", CERTIFICATE).is_err());
    }
}
