//! Fixed-key kTLS for the benchmark's raw kTLS pair (`bench-client`/`bench-server
//! --ktls-fixed`), and sendfile. FFI: every unsafe block carries a SAFETY comment.

use std::io;
use std::os::fd::RawFd;

const TCP_ULP: libc::c_int = 31;
const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;

/// `struct tls12_crypto_info_aes_gcm_256` (linux/tls.h), TLS 1.3, AES-GCM-256: the suite tether
/// negotiates (TLS13_AES_256_GCM_SHA384), so the raw pair does the same cipher work.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Tls13AesGcm256 {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 32],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}
const _: () = assert!(std::mem::size_of::<Tls13AesGcm256>() == 56);

/// Client-to-server keys.
pub const KEY_A: Tls13AesGcm256 = Tls13AesGcm256 {
    version: 0x0304,
    cipher_type: 52,
    iv: [0xa1; 8],
    key: [0x11; 32],
    salt: [0x5a; 4],
    rec_seq: [0; 8],
};
/// Server-to-client keys.
pub const KEY_B: Tls13AesGcm256 = Tls13AesGcm256 {
    version: 0x0304,
    cipher_type: 52,
    iv: [0xb2; 8],
    key: [0x22; 32],
    salt: [0x6b; 4],
    rec_seq: [0; 8],
};

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn install_fixed_keys(
    fd: RawFd,
    tx: &Tls13AesGcm256,
    rx: &Tls13AesGcm256,
) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: `name` is a live 3-byte buffer and the length passed is its length; the kernel
    // only reads it.
    check(unsafe { libc::setsockopt(fd, libc::SOL_TCP, TCP_ULP, name.as_ptr().cast(), 3) })?;
    for (dir, info) in [(TLS_TX, tx), (TLS_RX, rx)] {
        // SAFETY: `info` is a fully initialised #[repr(C)] struct with the kernel's layout
        // (size asserted); the kernel copies 56 bytes and keeps no pointer.
        check(unsafe { libc::setsockopt(fd, SOL_TLS, dir, std::ptr::from_ref(info).cast(), 56) })?;
    }
    Ok(())
}

pub fn sendfile(
    out: RawFd,
    input: RawFd,
    offset: &mut libc::off_t,
    count: usize,
) -> io::Result<usize> {
    // SAFETY: `offset` is a valid, exclusive pointer to an off_t for the duration of the call;
    // the fds are plain integers the kernel validates.
    let n = unsafe { libc::sendfile(out, input, offset, count) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
