//! TLS: the handshake driver and the SPIFFE verifier. Key export into the kernel lives in
//! [`danger`], the one place that touches traffic secrets.

pub(crate) mod handshake;
pub(crate) mod verify;

pub(crate) mod danger {
    //! Traffic-secret extraction. The secrets go straight into the kernel's crypto_info (wiped
    //! on drop) and nowhere else.

    use std::io;
    use std::os::fd::RawFd;

    use rustls::Connection;

    /// Move `conn`'s keys into the kernel on `fd`. Consumes the connection: after this, there
    /// is no way back to userspace TLS, which is why kTLS is probed before the handshake.
    pub(crate) fn install_ktls(fd: RawFd, conn: Connection) -> io::Result<&'static str> {
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| io::Error::other(format!("secret extraction failed: {e}")))?;
        crate::sys::ktls::install(fd, secrets)
    }
}
