//! The kernel TLS ABI for TLS 1.3 (`include/uapi/linux/tls.h`): the cipher ids and the layout of
//! the `tls12_crypto_info_*` structs that `setsockopt(SOL_TLS, TLS_TX | TLS_RX)` takes. Data only:
//! `tether doctor` and the kTLS self-check build their probe keys from it.

/// `TLS_1_3_VERSION`: the `version` field of every TLS 1.3 `crypto_info`.
pub const TLS_1_3_VERSION: u16 = 0x0304;

/// Bytes of the record sequence number that ends every `crypto_info`.
pub const REC_SEQ_LEN: usize = 8;

/// A TLS 1.3 cipher the kernel can run: its name, `TLS_CIPHER_*` id and the iv/key/salt sizes of
/// its `crypto_info` (`{u16 version, u16 cipher, iv, key, salt, rec_seq}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cipher {
    pub name: &'static str,
    pub id: u16,
    pub iv: usize,
    pub key: usize,
    pub salt: usize,
}

/// The three TLS 1.3 ciphers tether can hand to the kernel.
pub const CIPHERS: [Cipher; 3] = [
    Cipher { name: "aes-gcm-128", id: 51, iv: 8, key: 16, salt: 4 },
    Cipher { name: "aes-gcm-256", id: 52, iv: 8, key: 32, salt: 4 },
    Cipher { name: "chacha20-poly1305", id: 54, iv: 12, key: 32, salt: 0 },
];

impl Cipher {
    /// The size of this cipher's `crypto_info` struct.
    pub const fn crypto_info_len(&self) -> usize {
        4 + self.iv + self.key + self.salt + REC_SEQ_LEN
    }

    /// A `crypto_info` whose iv, key and salt bytes are all `fill`, rec_seq 0: a probe key for
    /// checking what the kernel accepts, never a real one.
    pub fn probe_crypto_info(&self, fill: u8) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.crypto_info_len());
        v.extend_from_slice(&TLS_1_3_VERSION.to_ne_bytes());
        v.extend_from_slice(&self.id.to_ne_bytes());
        v.resize(self.crypto_info_len() - REC_SEQ_LEN, fill);
        v.resize(self.crypto_info_len(), 0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_layouts_match_the_kernel_structs() {
        // sizeof(struct tls12_crypto_info_aes_gcm_128 / _aes_gcm_256 / _chacha20_poly1305)
        let sizes: Vec<usize> = CIPHERS.iter().map(|c| c.probe_crypto_info(0x5a).len()).collect();
        assert_eq!(sizes, [40, 56, 56]);
        let info = CIPHERS[0].probe_crypto_info(0x5a);
        assert_eq!(info[..4], [0x04, 0x03, 51, 0]);
        assert!(info[info.len() - REC_SEQ_LEN..].iter().all(|&b| b == 0));
    }
}
