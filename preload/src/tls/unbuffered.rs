//! The kTLS path's handshake driver: rustls's unbuffered API, which is the only one that hands
//! over a [`KernelConnection`] (the key schedule that follows KeyUpdates after the hand-over).
//!
//! Same discipline as the buffered driver: **one TLS record at a time** is given to rustls
//! from the [`Inbox`] (one peek per flight, one read of exactly the records consumed), so
//! nothing that follows the handshake is ever read out of the kernel. Bytes rustls has not yet consumed (a handshake message
//! split across records) stay at the head of our buffer and the next record is appended.

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::ExtractedSecrets;
use zeroize::Zeroize;

use super::danger::KeySchedule;
use super::handshake::{HandshakeError, Inbox, PeerChain};
use crate::sys::net::DeadlineIo;
use std::io::Write;

/// Both sides of the unbuffered API, so one driver serves client and server.
pub(crate) trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn common(&self) -> &rustls::CommonState;
    fn into_kernel(self) -> Result<(ExtractedSecrets, KeySchedule), rustls::Error>;
}

/// The two impls are the same but for the connection type, its data and which side of the key
/// schedule it becomes; one macro writes both so they cannot drift apart.
macro_rules! unbuffered_impl {
    ($conn:ty, $data:ty, $side:path) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn common(&self) -> &rustls::CommonState {
                self
            }
            fn into_kernel(self) -> Result<(ExtractedSecrets, KeySchedule), rustls::Error> {
                let (s, k): (_, KernelConnection<$data>) = self.dangerous_into_kernel_connection()?;
                Ok((s, $side(k)))
            }
        }
    };
}

unbuffered_impl!(UnbufferedClientConnection, ClientConnectionData, KeySchedule::Client);
unbuffered_impl!(UnbufferedServerConnection, ServerConnectionData, KeySchedule::Server);

/// The driver's state between records: it survives a pause ([`HandshakeError::Paused`]), so a
/// handshake stopped inline at accept goes on from the same point on a worker.
pub(crate) struct Driver {
    /// Bytes given to rustls and not yet consumed by it (a message split across records).
    incoming: Vec<u8>,
    /// Our records not yet sent: sent whole when the peer's next flight is needed.
    flight: Vec<u8>,
    out: Vec<u8>,
    /// rustls is blocked on the peer: the next step is to fetch a record.
    want_record: bool,
}

impl Driver {
    pub(crate) fn new() -> Self {
        Self {
            incoming: Vec::with_capacity(2 * 16_640),
            flight: Vec::with_capacity(4096),
            out: vec![0u8; 16_640],
            want_record: false,
        }
    }

    /// Run the handshake to completion (or to a pause, after which calling this again goes on).
    pub(crate) fn drive<C: Unbuffered>(
        &mut self,
        conn: &mut C,
        io: &mut DeadlineIo,
        inbox: &mut Inbox,
        quickack: bool,
    ) -> Result<(), HandshakeError> {
        let Self { incoming, flight, out, want_record } = self;
        loop {
            if *want_record {
                if inbox.needs_read() && !flight.is_empty() {
                    io.write_all(flight)?;
                    flight.clear();
                    inbox.expect_wait();
                }
                incoming.extend_from_slice(inbox.next_record(io)?);
                *want_record = false;
            }
            let status = conn.process(incoming);
            let discard = status.discard;
            let need_more = match status.state {
                Err(e) => {
                    incoming.drain(..discard.min(incoming.len()));
                    // Tell the peer why (rustls queued the alert), best effort.
                    if let Ok(ConnectionState::EncodeTlsData(mut enc)) = conn.process(&mut []).state {
                        if let Ok(n) = enc.encode(out) {
                            let _ = io.write_all(&out[..n]);
                        }
                    }
                    return Err(HandshakeError::Tls(e));
                }
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    let n = match enc.encode(out) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(s)) => {
                            out.resize(s.required_size, 0);
                            enc.encode(out).map_err(|e| HandshakeError::Tls(rustls::Error::General(e.to_string())))?
                        }
                        Err(e) => return Err(HandshakeError::Tls(rustls::Error::General(e.to_string()))),
                    };
                    // Gather a whole flight, sent in one write when the peer's next flight is
                    // needed (see the buffered driver: Nagle and delayed ACKs would otherwise
                    // stall each handshake by ~40 ms, and each extra write costs the peer a read).
                    flight.extend_from_slice(&out[..n]);
                    Some(false)
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Some(false)
                }
                Ok(ConnectionState::BlockedHandshake) => Some(true),
                // The server may send from its Finished on (0.5-RTT), but the handshake is only
                // over once the client's Finished has been read.
                Ok(ConnectionState::WriteTraffic(_)) => None,
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => return Err(HandshakeError::PeerClosed),
                Ok(_) => {
                    return Err(HandshakeError::Tls(rustls::Error::General("unexpected data during the handshake".into())))
                }
            };
            incoming.drain(..discard.min(incoming.len()));
            match need_more {
                Some(true) => *want_record = true,
                Some(false) => {}
                None if conn.handshaking() => *want_record = true,
                None if incoming.is_empty() => break,
                None => {
                    return Err(HandshakeError::Tls(rustls::Error::General("records past the handshake's end".into())));
                }
            }
        }
        super::handshake::finish_flight(io, flight, quickack)?;
        out.zeroize();
        // Exactly the records rustls consumed leave the kernel's queue; kTLS decrypts the rest.
        inbox.commit(io)
    }
}

/// Hand over the keys, the key schedule and the peer of a finished handshake.
pub(crate) fn into_kernel<C: Unbuffered>(conn: C) -> Result<((ExtractedSecrets, KeySchedule), PeerChain), HandshakeError> {
    let peer = PeerChain::of(conn.common());
    Ok((conn.into_kernel().map_err(HandshakeError::Tls)?, peer))
}
