//! What a kTLS control record means to the program reading the socket. Pure: no I/O and no
//! crate paths, so the fuzz crate (`fuzz/`, target `ktls_control`) compiles this file as is.

pub(crate) const CONTENT_ALERT: u8 = 21;
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 23;

/// What the read slow path should make of the record that caused EIO.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Control {
    /// A record we consumed and dropped (a session ticket, a warning alert): read again.
    Retry,
    /// close_notify: the program sees EOF.
    Eof,
    /// A fatal alert, a KeyUpdate this kernel cannot follow, or garbage.
    Reset(&'static str),
}

/// Decide what a control record means.
pub(crate) fn classify(ty: u8, body: &[u8]) -> Control {
    match ty {
        CONTENT_ALERT => match body {
            [_, 0] => Control::Eof,
            // user_canceled and other warnings: TLS 1.3 says close_notify follows.
            [1, _] => Control::Retry,
            _ => Control::Reset("fatal alert from peer"),
        },
        CONTENT_HANDSHAKE => match body.first() {
            Some(4) => Control::Retry, // NewSessionTicket: we never resume, drop it
            Some(24) => Control::Reset("peer sent KeyUpdate; this kernel cannot rekey kTLS RX"),
            _ => Control::Reset("unexpected post-handshake message"),
        },
        CONTENT_APPLICATION_DATA => Control::Retry,
        _ => Control::Reset("unknown TLS record type"),
    }
}
