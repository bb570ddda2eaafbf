//! The kernel TLS interface (Documentation/networking/tls.rst): ULP attach, key install, and
//! control-record handling for the read slow path. FFI module.

use std::ffi::c_int;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, Ordering};

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use zeroize::Zeroize;

const SOL_TLS: c_int = 282;
const TCP_ULP: c_int = 31;
const TLS_TX: c_int = 1;
const TLS_RX: c_int = 2;
const TLS_GET_RECORD_TYPE: c_int = 2;
const TLS_SET_RECORD_TYPE: c_int = 1;
const TLS_1_3_VERSION: u16 = 0x0304;
const CIPHER_AES_GCM_128: u16 = 51;
const CIPHER_AES_GCM_256: u16 = 52;
const CIPHER_CHACHA20_POLY1305: u16 = 54;

pub(crate) use super::control::{classify, control_bytes_missing, Control};
use super::control::{CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE};

/// Largest TLS 1.3 record plaintext plus slack.
const MAX_RECORD: usize = 16384 + 256;

const UNKNOWN: u8 = 0;
const SUPPORTED: u8 = 1;
const UNSUPPORTED: u8 = 2;

/// Whether this kernel has kTLS, learned once per process from the first attach.
static SUPPORT: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Known not to work in this process: skip the attempt.
pub(crate) fn known_unsupported() -> bool {
    SUPPORT.load(Ordering::Relaxed) == UNSUPPORTED
}

/// Why the TLS ULP could not be attached.
#[derive(Debug)]
pub(crate) enum AttachError {
    /// The kernel has no kTLS (ENOENT: module missing, CONFIG_TLS unset).
    Unsupported,
    Other(io::Error),
}

/// Attach the "tls" upper-layer protocol to a connected TCP socket. Until keys are set the
/// socket behaves exactly as before, so this is the probe: it runs before the handshake,
/// while falling back to userspace is still possible.
pub(crate) fn attach_ulp(fd: RawFd) -> Result<(), AttachError> {
    if known_unsupported() {
        return Err(AttachError::Unsupported);
    }
    let name = b"tls";
    // SAFETY: valid fd number, pointer/length describe `name`.
    let rc = unsafe {
        crate::real::setsockopt(
            fd,
            libc::SOL_TCP,
            TCP_ULP,
            name.as_ptr().cast(),
            name.len() as u32,
        )
    };
    if rc == 0 {
        SUPPORT.store(SUPPORTED, Ordering::Relaxed);
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP) => {
            SUPPORT.store(UNSUPPORTED, Ordering::Relaxed);
            Err(AttachError::Unsupported)
        }
        _ => Err(AttachError::Other(e)),
    }
}

/// Can this kernel rekey kTLS (Linux >= 6.14)? Probed once per process, and only when a rule
/// with `key_update_after` is used: a throwaway loopback TCP pair, the ULP, a TX key, then a
/// second TX key. Any failure (no loopback, no kTLS, EBUSY from an older kernel) is "no",
/// which sends such rules to the userspace relay (never a connection that cannot rotate).
pub(crate) fn can_rekey() -> bool {
    static REKEY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REKEY.get_or_init(probe_rekey)
}

fn probe_rekey() -> bool {
    // SAFETY: plain socket calls on fds this function owns and closes.
    unsafe {
        let l = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        let mut a = -1;
        let mut ok = false;
        if l >= 0 && c >= 0 {
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let salen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let mut len = salen;
            if libc::bind(l, (&sa as *const libc::sockaddr_in).cast(), salen) == 0
                && libc::listen(l, 1) == 0
                && crate::real::getsockname(l, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len)
                    == 0
                && crate::real::connect(c, (&sa as *const libc::sockaddr_in).cast(), salen) == 0
            {
                a = crate::real::accept4(
                    l,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                );
                let name = b"tls";
                let key = ConnectionTrafficSecrets::Aes128Gcm {
                    key: rustls::crypto::cipher::AeadKey::from([0u8; 32]),
                    iv: rustls::crypto::cipher::Iv::from([0u8; 12]),
                };
                ok = a >= 0
                    && crate::real::setsockopt(
                        c,
                        libc::SOL_TCP,
                        TCP_ULP,
                        name.as_ptr().cast(),
                        name.len() as u32,
                    ) == 0
                    && set_key(c, Dir::Tx, 0, &key).is_ok()
                    && set_key(c, Dir::Tx, 0, &key).is_ok();
            }
        }
        for fd in [l, c, a] {
            if fd >= 0 {
                crate::real::close(fd);
            }
        }
        ok
    }
}

/// Does `fd` have the "tls" ULP attached (a kTLS socket, possibly inherited across exec)?
pub(crate) fn is_ktls_socket(fd: RawFd) -> bool {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: out-buffer and its length.
    let rc = unsafe {
        crate::real::getsockopt(
            fd,
            libc::SOL_TCP,
            TCP_ULP,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    rc == 0 && name.starts_with(b"tls")
}

/// Ask the kernel to send any delayed ACK now (and leave delayed-ACK "pingpong" mode).
pub(crate) fn quickack(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: pointer/length of an int.
    unsafe {
        crate::real::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
}

#[repr(C)]
#[derive(Zeroize)]
struct Aes128 {
    version: u16,
    cipher: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

#[repr(C)]
#[derive(Zeroize)]
struct Aes256 {
    version: u16,
    cipher: u16,
    iv: [u8; 8],
    key: [u8; 32],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

#[repr(C)]
#[derive(Zeroize)]
struct Chacha {
    version: u16,
    cipher: u16,
    iv: [u8; 12],
    key: [u8; 32],
    rec_seq: [u8; 8],
}

/// The kernel's crypto_info for one direction, wiped on drop.
enum CryptoInfo {
    Aes128(Aes128),
    Aes256(Aes256),
    Chacha(Chacha),
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        match self {
            Self::Aes128(c) => c.zeroize(),
            Self::Aes256(c) => c.zeroize(),
            Self::Chacha(c) => c.zeroize(),
        }
    }
}

/// The cipher suite, for logs.
pub(crate) fn cipher_name(s: &ConnectionTrafficSecrets) -> &'static str {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { .. } => "TLS13_AES_128_GCM_SHA256",
        ConnectionTrafficSecrets::Aes256Gcm { .. } => "TLS13_AES_256_GCM_SHA384",
        ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => "TLS13_CHACHA20_POLY1305_SHA256",
        _ => "unknown",
    }
}

fn crypto_info(seq: u64, s: &ConnectionTrafficSecrets) -> Option<CryptoInfo> {
    let rec_seq = seq.to_be_bytes();
    // TLS 1.3 nonce = 12-byte IV; the kernel wants it split as salt (first 4) + iv (last 8)
    // for GCM, and whole for ChaCha20.
    Some(match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let mut c = Aes128 {
                version: TLS_1_3_VERSION,
                cipher: CIPHER_AES_GCM_128,
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq,
            };
            c.key.copy_from_slice(key.as_ref().get(..16)?);
            c.salt.copy_from_slice(iv.as_ref().get(..4)?);
            c.iv.copy_from_slice(iv.as_ref().get(4..12)?);
            CryptoInfo::Aes128(c)
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let mut c = Aes256 {
                version: TLS_1_3_VERSION,
                cipher: CIPHER_AES_GCM_256,
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq,
            };
            c.key.copy_from_slice(key.as_ref().get(..32)?);
            c.salt.copy_from_slice(iv.as_ref().get(..4)?);
            c.iv.copy_from_slice(iv.as_ref().get(4..12)?);
            CryptoInfo::Aes256(c)
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let mut c = Chacha {
                version: TLS_1_3_VERSION,
                cipher: CIPHER_CHACHA20_POLY1305,
                iv: [0; 12],
                key: [0; 32],
                rec_seq,
            };
            c.key.copy_from_slice(key.as_ref().get(..32)?);
            c.iv.copy_from_slice(iv.as_ref().get(..12)?);
            CryptoInfo::Chacha(c)
        }
        _ => return None,
    })
}

fn set_crypto(fd: RawFd, dir: c_int, info: &CryptoInfo) -> io::Result<()> {
    let (ptr, len) = match info {
        CryptoInfo::Aes128(c) => ((c as *const Aes128).cast(), size_of::<Aes128>()),
        CryptoInfo::Aes256(c) => ((c as *const Aes256).cast(), size_of::<Aes256>()),
        CryptoInfo::Chacha(c) => ((c as *const Chacha).cast(), size_of::<Chacha>()),
    };
    // SAFETY: `ptr`/`len` describe a live #[repr(C)] struct matching the kernel's layout.
    let rc = unsafe { crate::real::setsockopt(fd, SOL_TLS, dir, ptr, len as u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Install both directions' keys. After this the program's plaintext I/O on `fd` is
/// encrypted by the kernel.
pub(crate) fn install(fd: RawFd, secrets: ExtractedSecrets) -> io::Result<&'static str> {
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    let unsupported = || {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "cipher suite not supported by kTLS",
        )
    };
    let tx_info = crypto_info(*tx_seq, tx).ok_or_else(unsupported)?;
    let rx_info = crypto_info(*rx_seq, rx).ok_or_else(unsupported)?;
    set_crypto(fd, TLS_TX, &tx_info)?;
    set_crypto(fd, TLS_RX, &rx_info)?;
    Ok(cipher_name(tx))
}

/// Tell the kernel the peer never pads its TLS 1.3 records (`TLS_RX_EXPECT_NO_PAD`, Linux >=
/// 6.0): it then decrypts application data straight into the reader's buffer instead of into
/// its own and copying. Only a hint: a padded record (or a control record) is detected after
/// decryption and decrypted again the normal way (`TlsDecryptRetry`; a padded one also counts
/// `TlsRxNoPadViolation`), so a peer that does pad costs time, never correctness. Must follow
/// `TLS_RX`. Errors (an older kernel: ENOPROTOOPT) are returned for the caller to ignore.
pub(crate) fn set_rx_no_pad(fd: RawFd) -> io::Result<()> {
    const TLS_RX_EXPECT_NO_PAD: c_int = 4;
    let one: u32 = 1;
    // SAFETY: pointer/length of a u32 that lives for the call.
    let rc = unsafe {
        crate::real::setsockopt(
            fd,
            SOL_TLS,
            TLS_RX_EXPECT_NO_PAD,
            (&one as *const u32).cast(),
            size_of::<u32>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A direction of a kTLS socket, for [`set_key`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dir {
    Tx,
    Rx,
}

/// Set (or, on Linux >= 6.14, replace after a KeyUpdate) one direction's key. Older kernels
/// refuse a second key (EBUSY): the caller fails closed.
pub(crate) fn set_key(
    fd: RawFd,
    dir: Dir,
    seq: u64,
    s: &ConnectionTrafficSecrets,
) -> io::Result<()> {
    let info = crypto_info(seq, s).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "cipher suite not supported by kTLS",
        )
    })?;
    set_crypto(
        fd,
        match dir {
            Dir::Tx => TLS_TX,
            Dir::Rx => TLS_RX,
        },
        &info,
    )
}

/// Consume the control record at the head of `fd`'s receive queue. Called only after a plain
/// read failed with EIO on a kTLS socket. The record type is peeked first, so application
/// data is never taken from under the program.
pub(crate) fn handle_control_record(fd: RawFd) -> io::Result<Control> {
    handle_control_record_with(fd, None)
}

/// [`handle_control_record`], giving any NewSessionTicket in the record to the connection's key
/// schedule (`keys`), which stores it for resumption (`tls::resumption`).
pub(crate) fn handle_control_record_with(
    fd: RawFd,
    keys: Option<&mut crate::tls::danger::KeySchedule>,
) -> io::Result<Control> {
    let mut buf = vec![0u8; MAX_RECORD];
    let (ty, n) = recv_record(fd, &mut buf[..1], libc::MSG_PEEK | libc::MSG_DONTWAIT)?;
    if ty == CONTENT_APPLICATION_DATA {
        return Ok(Control::Retry);
    }
    let _ = n;
    let (ty, n) = recv_record(fd, &mut buf, libc::MSG_DONTWAIT)?;
    let body = &buf[..n];
    let r = classify(ty, body);
    if let (Some(k), CONTENT_HANDSHAKE, Control::Retry) = (keys, ty, &r) {
        crate::tls::resumption::store_tickets(k, body);
    }
    buf.zeroize();
    Ok(r)
}

/// The type of the record at the head of `fd`'s receive queue, without consuming it (one
/// non-blocking `MSG_PEEK` of one byte); `None` when nothing is queued.
pub(crate) fn head_record_type(fd: RawFd) -> Option<u8> {
    let mut b = [0u8; 1];
    match recv_record(fd, &mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Ok((ty, _)) => Some(ty),
        // EIO: a control record the peek could not label; let the EIO path see it.
        Err(_) => None,
    }
}

/// The TLS record type the kernel reported in a program's own `recvmsg` control buffer, if it
/// is not application data (a control record the program would otherwise take as data).
///
/// # Safety
/// `msg` is a msghdr the kernel just filled (recvmsg returned >= 0).
pub(crate) unsafe fn control_record_in(msg: *const libc::msghdr) -> Option<u8> {
    let mut found = None;
    // SAFETY: the kernel filled msg_control; CMSG_* walk it within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                let ty = *libc::CMSG_DATA(c);
                if ty != CONTENT_APPLICATION_DATA {
                    found = Some(ty);
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    found
}

/// Read exactly `buf.len()` more bytes of the control record of type `ty` at the head of the
/// queue (the rest of one the program's buffer cut short). Never reads past that record.
pub(crate) fn finish_control_record(fd: RawFd, ty: u8, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let (got_ty, n) = recv_record(fd, &mut buf[at..], libc::MSG_DONTWAIT)?;
        if got_ty != ty || n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EPROTO));
        }
        at += n;
    }
    Ok(())
}

/// Read and drop what is queued on `fd`, records of any type, without blocking. Returns whether
/// to keep waiting for more: `false` at the peer's end (EOF) or on an error.
pub(crate) fn discard_incoming(fd: RawFd) -> bool {
    let mut buf = [0u8; 16 * 1024];
    for _ in 0..64 {
        match recv_record(fd, &mut buf, libc::MSG_DONTWAIT) {
            Ok((_, 0)) => return false,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return e.raw_os_error() == Some(libc::EAGAIN),
        }
    }
    true
}

fn recv_record(fd: RawFd, buf: &mut [u8], flags: c_int) -> io::Result<(u8, usize)> {
    let mut cbuf = [0u64; 8]; // aligned cmsg space
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is a valid "empty" value; we fill the pointers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&cbuf);
    // SAFETY: msg points at live buffers sized as declared.
    let n = unsafe { crate::real::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ty = CONTENT_APPLICATION_DATA;
    // SAFETY: the kernel filled msg_control; CMSG_* walk it within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                ty = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((ty, n as usize))
}

/// Send a close_notify alert on a kTLS socket (for `shutdown(SHUT_WR)`).
pub(crate) fn send_close_notify(fd: RawFd) {
    let _ = send_control(
        fd,
        CONTENT_ALERT,
        &[1, 0],
        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
    );
}

/// Send a KeyUpdate record under the current TX key. `request_update`: ask the peer to move
/// its keys too. `dontwait`: the program's socket (or call) is non-blocking, so a full send
/// buffer is EAGAIN for the program to retry; otherwise this waits for room exactly as the
/// program's own write would (SO_SNDTIMEO included), retrying on EINTR.
pub(crate) fn send_key_update(fd: RawFd, request_update: bool, dontwait: bool) -> io::Result<()> {
    let msg = [24u8, 0, 0, 1, u8::from(request_update)];
    let flags = libc::MSG_NOSIGNAL | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    loop {
        match send_control(fd, CONTENT_HANDSHAKE, &msg, flags) {
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::EPROTO)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

fn send_control(fd: RawFd, ty: u8, body: &[u8], flags: c_int) -> io::Result<usize> {
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut _,
        iov_len: body.len(),
    };
    // SAFETY: as in recv_record; we build one cmsg of type TLS_SET_RECORD_TYPE.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(c) = ty;
        let n = crate::real::sendmsg(fd, &msg, flags);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_records_map_to_program_outcomes() {
        assert_eq!(classify(CONTENT_ALERT, &[1, 0]), Control::Eof);
        assert_eq!(classify(CONTENT_ALERT, &[2, 0]), Control::Eof);
        assert_eq!(classify(CONTENT_ALERT, &[1, 90]), Control::Retry);
        assert!(matches!(
            classify(CONTENT_ALERT, &[2, 40]),
            Control::Reset(_)
        ));
        assert_eq!(
            classify(CONTENT_HANDSHAKE, &[4, 0, 0, 1, 0]),
            Control::Retry
        );
        assert_eq!(
            classify(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0]),
            Control::KeyUpdate { requested: false }
        );
        assert_eq!(
            classify(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 1]),
            Control::KeyUpdate { requested: true }
        );
        assert!(matches!(
            classify(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 2]),
            Control::Reset(_)
        ));
        assert!(matches!(
            classify(CONTENT_HANDSHAKE, &[24, 0, 0, 2, 0, 0]),
            Control::Reset(_)
        ));
        assert!(matches!(classify(99, &[]), Control::Reset(_)));
    }

    #[test]
    fn every_message_of_a_handshake_record_is_looked_at() {
        // Two tickets in one record: dropped.
        assert_eq!(
            classify(CONTENT_HANDSHAKE, &[4, 0, 0, 1, 9, 4, 0, 0, 0]),
            Control::Retry
        );
        // A ticket, then a KeyUpdate in the same record: not hidden behind the first.
        assert_eq!(
            classify(CONTENT_HANDSHAKE, &[4, 0, 0, 1, 9, 24, 0, 0, 1, 1]),
            Control::KeyUpdate { requested: true }
        );
        // Anything after a KeyUpdate in its record would be under the wrong key: closed.
        assert!(matches!(
            classify(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0, 4, 0, 0, 0]),
            Control::Reset(_)
        ));
        // A message longer than the record (fragmented), or an empty record: closed.
        assert!(matches!(
            classify(CONTENT_HANDSHAKE, &[4, 0, 0, 9, 1]),
            Control::Reset(_)
        ));
        assert!(matches!(
            classify(CONTENT_HANDSHAKE, &[]),
            Control::Reset(_)
        ));
    }

    #[test]
    fn bytes_missing_from_a_cut_control_record() {
        assert_eq!(control_bytes_missing(CONTENT_ALERT, &[1]), Some(1));
        assert_eq!(control_bytes_missing(CONTENT_ALERT, &[1, 0]), Some(0));
        assert_eq!(control_bytes_missing(CONTENT_HANDSHAKE, &[4, 0]), Some(2));
        assert_eq!(
            control_bytes_missing(CONTENT_HANDSHAKE, &[4, 0, 0, 3, 1]),
            Some(2)
        );
        assert_eq!(
            control_bytes_missing(CONTENT_HANDSHAKE, &[4, 0, 0, 1, 9]),
            Some(0)
        );
        assert_eq!(
            control_bytes_missing(CONTENT_HANDSHAKE, &[4, 0, 0, 1, 9, 4, 0]),
            Some(2)
        );
        assert_eq!(control_bytes_missing(99, &[1]), None);
    }

    #[test]
    fn gcm_nonce_is_split_into_salt_and_iv() {
        let key = rustls::crypto::cipher::AeadKey::from([7u8; 32]);
        let iv = rustls::crypto::cipher::Iv::from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let s = ConnectionTrafficSecrets::Aes256Gcm { key, iv };
        match &crypto_info(5, &s) {
            Some(CryptoInfo::Aes256(c)) => {
                assert_eq!(c.salt, [1, 2, 3, 4]);
                assert_eq!(c.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
                assert_eq!(c.rec_seq, 5u64.to_be_bytes());
            }
            _ => panic!("wrong variant"),
        }
    }
}
