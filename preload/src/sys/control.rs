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
    /// The peer moved to its next traffic key (the record is consumed); `requested`: it asks
    /// us to move ours too.
    KeyUpdate { requested: bool },
    /// A fatal alert, or garbage.
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
        CONTENT_HANDSHAKE => classify_handshake(body),
        CONTENT_APPLICATION_DATA => Control::Retry,
        _ => Control::Reset("unknown TLS record type"),
    }
}

/// A post-handshake handshake record may carry several messages: every one is looked at.
/// NewSessionTickets are dropped (we never resume). A KeyUpdate must be the record's last
/// message (RFC 8446 §5.1: a key change aligns with a record boundary) and carry exactly one
/// valid byte. A message cut off at the record's end (fragmented across records) fails closed.
fn classify_handshake(body: &[u8]) -> Control {
    if body.is_empty() {
        return Control::Reset("empty handshake record");
    }
    let mut rest = body;
    while !rest.is_empty() {
        let Some(&[ty, a, b, c]) = rest.get(..4) else {
            return Control::Reset("fragmented post-handshake message");
        };
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        let Some(next) = rest.get(4 + len..) else {
            return Control::Reset("fragmented post-handshake message");
        };
        match ty {
            4 => {} // NewSessionTicket
            24 => {
                return match (&rest[4..4 + len], next.is_empty()) {
                    ([0], true) => Control::KeyUpdate { requested: false },
                    ([1], true) => Control::KeyUpdate { requested: true },
                    (_, true) => Control::Reset("malformed KeyUpdate"),
                    (_, false) => Control::Reset("KeyUpdate not at the end of its record"),
                }
            }
            _ => return Control::Reset("unexpected post-handshake message"),
        }
        rest = next;
    }
    Control::Retry
}

/// How many more bytes complete the control record whose first `have` bytes are `got` (the
/// program's buffer was too small for it): alerts are 2 bytes, handshake messages
/// 4 + length. `None` for a record type we do not complete (the caller fails closed).
pub(crate) fn control_bytes_missing(ty: u8, got: &[u8]) -> Option<usize> {
    match ty {
        CONTENT_ALERT => Some(2usize.saturating_sub(got.len())),
        CONTENT_HANDSHAKE => {
            let mut at = 0;
            loop {
                let Some(h) = got.get(at..at + 4) else {
                    // A header cut short: first finish the header, then look again.
                    return Some(at + 4 - got.len());
                };
                let len = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
                let end = at + 4 + len;
                if end >= got.len() {
                    return Some(end - got.len());
                }
                at = end;
            }
        }
        _ => None,
    }
}
