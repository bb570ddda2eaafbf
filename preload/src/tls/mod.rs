//! TLS: the handshake drivers and the SPIFFE verifier. Key export into the kernel lives in
//! [`danger`], the one place that touches traffic secrets.

pub(crate) mod configs;
pub(crate) mod deferred;
pub(crate) mod handshake;
pub(crate) mod random;
pub(crate) mod remote_key;
pub(crate) mod resumption;
pub(crate) mod unbuffered;
pub(crate) mod verify;

pub(crate) mod danger {
    //! Traffic secrets. They go straight into the kernel's crypto_info (wiped on drop) and
    //! nowhere else; the key schedule that derives the next ones after a KeyUpdate stays
    //! inside rustls's [`KernelConnection`].

    use std::fmt;
    use std::io;
    use std::os::fd::RawFd;
    use std::sync::{Mutex, MutexGuard, TryLockError};
    use std::time::{Duration, Instant};

    use rustls::client::ClientConnectionData;
    use rustls::kernel::KernelConnection;
    use rustls::server::ServerConnectionData;
    use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

    /// rustls's key schedule for a connection handed to the kernel.
    pub(crate) enum KeySchedule {
        Client(KernelConnection<ClientConnectionData>),
        Server(KernelConnection<ServerConnectionData>),
    }

    impl fmt::Debug for KeySchedule {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("KeySchedule(<redacted>)")
        }
    }

    impl KeySchedule {
        fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
            match self {
                Self::Client(k) => k.update_rx_secret(),
                Self::Server(k) => k.update_rx_secret(),
            }
        }

        /// A NewSessionTicket's body, read on a kTLS socket: a client's rustls stores it (in
        /// the config's session store); a server ignores it. Errors drop the ticket.
        pub(crate) fn new_session_ticket(&mut self, body: &[u8]) {
            if let Self::Client(k) = self {
                let _ = k.handle_new_session_ticket(body);
            }
        }

        fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
            match self {
                Self::Client(k) => k.update_tx_secret(),
                Self::Server(k) => k.update_tx_secret(),
            }
        }
    }

    /// A finished kTLS-path handshake: the current keys and the schedule for the next ones.
    pub(crate) struct HandOff {
        pub(crate) secrets: ExtractedSecrets,
        pub(crate) keys: KeySchedule,
    }

    impl fmt::Debug for HandOff {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("HandOff(<redacted>)")
        }
    }

    /// The per-connection key schedule, behind the lock that the read slow path (and only it)
    /// takes while it follows a KeyUpdate.
    pub(crate) type Rekey = Mutex<KeySchedule>;

    /// How long [`lock_keys`] waits. Every holder keeps the lock for one control-record read, a
    /// derivation and a setsockopt, never across the program's I/O; a longer wait means this is
    /// a fork child that inherited it held by a parent thread that does not exist here.
    const KEYS_WAIT: Duration = Duration::from_secs(2);

    /// Why a connection fails closed when [`lock_keys`] gives up.
    pub(crate) const KEYS_STUCK: &str =
        "kTLS key schedule still locked after 2 s (inherited across fork while a parent thread rekeyed)";

    /// The connection's key schedule, waited for at most [`KEYS_WAIT`]; `None` then, and the
    /// caller fails the connection closed rather than hang its program (a poisoned lock is
    /// taken over: the schedule is consistent between its two setsockopts' callers).
    pub(crate) fn lock_keys(m: &Rekey) -> Option<MutexGuard<'_, KeySchedule>> {
        let deadline = Instant::now() + KEYS_WAIT;
        loop {
            match m.try_lock() {
                Ok(g) => return Some(g),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Err(TryLockError::WouldBlock) => return None,
            }
        }
    }

    /// Move the handshake's keys into the kernel on `fd`. After this there is no way back to
    /// userspace TLS, which is why kTLS is probed before the handshake.
    pub(crate) fn install_ktls(fd: RawFd, h: HandOff) -> io::Result<(&'static str, Rekey)> {
        let cipher = crate::sys::ktls::install(fd, h.secrets)?;
        Ok((cipher, Mutex::new(h.keys)))
    }

    /// The peer sent KeyUpdate (already consumed): derive its next traffic secret and give it
    /// to the kernel's RX. Fails on a kernel that cannot rekey (< 6.14).
    pub(crate) fn follow_rx(fd: RawFd, keys: &mut KeySchedule) -> io::Result<()> {
        let (seq, s) = keys.next_rx().map_err(|e| io::Error::other(format!("next RX secret: {e}")))?;
        crate::sys::ktls::set_key(fd, crate::sys::ktls::Dir::Rx, seq, &s)
    }

    /// Move the kernel's TX to our next key. The caller has just sent our KeyUpdate under the
    /// current one (`ops::txkey`, the only caller).
    pub(crate) fn move_tx(fd: RawFd, keys: &mut KeySchedule) -> io::Result<()> {
        let (seq, s) = keys.next_tx().map_err(|e| io::Error::other(format!("next TX secret: {e}")))?;
        crate::sys::ktls::set_key(fd, crate::sys::ktls::Dir::Tx, seq, &s)
    }
}
