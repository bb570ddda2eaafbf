//! Fixed-key kTLS for this crate's programs: `ktls-selfcheck` (AES-GCM-128 keys installed by
//! hand) and the benchmark's raw kTLS pair (`bench-client`/`bench-server --ktls-fixed`,
//! AES-GCM-256), plus sendfile. FFI: every unsafe block carries a SAFETY comment.

use std::io;
use std::os::fd::RawFd;

/// `TCP_ULP` from linux/tcp.h (libc may not export it on every target).
const TCP_ULP: libc::c_int = 31;
/// `SOL_TLS` from linux/socket.h.
const SOL_TLS: libc::c_int = 282;
/// `TLS_TX` / `TLS_RX` from linux/tls.h.
pub const TLS_TX: libc::c_int = 1;
pub const TLS_RX: libc::c_int = 2;
/// `TLS_RX_EXPECT_NO_PAD` from linux/tls.h (Linux 6.0+, TLS 1.3 only).
pub const TLS_RX_EXPECT_NO_PAD: libc::c_int = 4;
pub const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;

/// `struct tls12_crypto_info_aes_gcm_{128,256}` from linux/tls.h for TLS 1.3, with a `KEY`-byte
/// key (no padding: 40 bytes for AES-GCM-128, 56 for AES-GCM-256).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Tls13AesGcm<const KEY: usize> {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; KEY],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

/// AES-GCM-128, what `ktls-selfcheck` installs.
pub type Tls13AesGcm128 = Tls13AesGcm<16>;
/// AES-GCM-256: the suite tether negotiates (TLS13_AES_256_GCM_SHA384), so the raw benchmark
/// pair does the same cipher work.
pub type Tls13AesGcm256 = Tls13AesGcm<32>;

const _: () = assert!(std::mem::size_of::<Tls13AesGcm128>() == 40);
const _: () = assert!(std::mem::size_of::<Tls13AesGcm256>() == 56);

impl Tls13AesGcm128 {
    pub const fn new(key: [u8; 16], iv: [u8; 8], salt: [u8; 4]) -> Self {
        Tls13AesGcm { version: TLS_1_3_VERSION, cipher_type: TLS_CIPHER_AES_GCM_128, iv, key, salt, rec_seq: [0; 8] }
    }
}

impl Tls13AesGcm256 {
    pub const fn new(key: [u8; 32], iv: [u8; 8], salt: [u8; 4]) -> Self {
        Tls13AesGcm { version: TLS_1_3_VERSION, cipher_type: TLS_CIPHER_AES_GCM_256, iv, key, salt, rec_seq: [0; 8] }
    }
}

/// The benchmark's client-to-server keys.
pub const KEY_A: Tls13AesGcm256 = Tls13AesGcm256::new([0x11; 32], [0xa1; 8], [0x5a; 4]);
/// The benchmark's server-to-client keys.
pub const KEY_B: Tls13AesGcm256 = Tls13AesGcm256::new([0x22; 32], [0xb2; 8], [0x6b; 4]);

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `setsockopt(TCP_ULP, "tls")`.
pub fn attach_tls_ulp(fd: RawFd) -> io::Result<()> {
    let name = b"tls";
    let len = libc::socklen_t::try_from(name.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `name` is a live 3-byte buffer and `len` is its exact length; the kernel only
    // reads it. An invalid fd makes the call fail with EBADF, not misbehave.
    check(unsafe { libc::setsockopt(fd, libc::SOL_TCP, TCP_ULP, name.as_ptr().cast(), len) })
}

/// `setsockopt(SOL_TLS, direction, info)`: install `info` for `TLS_TX` or `TLS_RX`.
pub fn set_crypto<const KEY: usize>(fd: RawFd, direction: libc::c_int, info: &Tls13AesGcm<KEY>) -> io::Result<()> {
    let len =
        libc::socklen_t::try_from(std::mem::size_of::<Tls13AesGcm<KEY>>()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `info` points to a fully initialised #[repr(C)] struct laid out as the kernel's
    // `tls12_crypto_info_aes_gcm_*` (sizes asserted above); `len` is its size and the kernel
    // copies it in without keeping the pointer.
    check(unsafe { libc::setsockopt(fd, SOL_TLS, direction, std::ptr::from_ref(info).cast(), len) })
}

/// `setsockopt(SOL_TLS, opt, bytes)`: a crypto_info of any cipher, or an int option.
pub fn set_tls_raw(fd: RawFd, opt: libc::c_int, bytes: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(bytes.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `bytes` is a live buffer of exactly `len` bytes that the kernel only reads during
    // the call; an unknown option or wrong size makes the call fail, not misbehave.
    check(unsafe { libc::setsockopt(fd, SOL_TLS, opt, bytes.as_ptr().cast(), len) })
}

/// `getsockopt(SOL_TLS, opt)` for an int-valued option.
pub fn get_tls_u32(fd: RawFd, opt: libc::c_int) -> io::Result<u32> {
    let mut val: u32 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u32>()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `val` is a live, writable u32 and `len` holds its size, so the kernel writes at
    // most that many bytes; both pointers are valid for the duration of the call.
    check(unsafe { libc::getsockopt(fd, SOL_TLS, opt, std::ptr::from_mut(&mut val).cast(), &mut len) })?;
    Ok(val)
}

/// The `tls` ULP on `fd`, then `tx` and `rx` as its TLS_TX and TLS_RX keys.
pub fn install_fixed_keys(fd: RawFd, tx: &Tls13AesGcm256, rx: &Tls13AesGcm256) -> io::Result<()> {
    attach_tls_ulp(fd)?;
    set_crypto(fd, TLS_TX, tx)?;
    set_crypto(fd, TLS_RX, rx)
}

pub fn sendfile(out: RawFd, input: RawFd, offset: &mut libc::off_t, count: usize) -> io::Result<usize> {
    // SAFETY: `offset` is a valid, exclusive pointer to an off_t for the duration of the call;
    // the fds are plain integers the kernel validates.
    let n = unsafe { libc::sendfile(out, input, offset, count) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
