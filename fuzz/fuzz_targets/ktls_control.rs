//! The kTLS control-record classifier (preload/src/sys/control.rs, compiled here as is: the shim
//! is a cdylib, and linking its hooks into this binary would hook the fuzzer's own calls).
//!
//! Input: the record type byte, then the record body. Properties, for every record:
//! - application data is never consumed as a control record (always Retry: the read is redone);
//! - EOF only for a well-formed close_notify alert (exactly level + description 0);
//! - a record is dropped (Retry) only when it is application data, a warning alert, or a
//!   handshake record made only of whole NewSessionTickets; in particular never when it holds a
//!   KeyUpdate, and never for an unknown record type;
//! - completing a record cut short (`control_bytes_missing`) never panics and fits the record.
//! - a KeyUpdate is followed only when it is the record's last message, well-formed, after
//!   nothing but whole tickets;
//! - everything else resets the connection.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../preload/src/sys/control.rs"]
#[allow(dead_code)]
mod control;

use control::{classify, control_bytes_missing, Control, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE};

const WARNING: u8 = 1;
const CLOSE_NOTIFY: u8 = 0;
const NEW_SESSION_TICKET: u8 = 4;

fuzz_target!(|data: &[u8]| {
    let Some((&ty, body)) = data.split_first() else { return };
    let got = classify(ty, body);
    match got {
        Control::Eof => {
            assert_eq!(ty, CONTENT_ALERT);
            assert_eq!(body.len(), 2, "EOF from a malformed alert");
            assert_eq!(body[1], CLOSE_NOTIFY);
        }
        Control::Retry => match ty {
            CONTENT_APPLICATION_DATA => {}
            CONTENT_ALERT => assert!(body.len() == 2 && body[0] == WARNING, "dropped alert {body:?}"),
            CONTENT_HANDSHAKE => assert!(only_tickets(body), "dropped a handshake record that is not whole tickets: {body:?}"),
            _ => panic!("dropped a record of unknown type {ty}"),
        },
        Control::KeyUpdate { requested } => {
            assert_eq!(ty, CONTENT_HANDSHAKE);
            assert!(key_update_last(body, requested), "KeyUpdate from {body:?}");
        }
        Control::Reset(why) => {
            assert!(!why.is_empty());
            assert_ne!(ty, CONTENT_APPLICATION_DATA, "application data reset the connection");
        }
    }
    // Completing a record cut short by the program's buffer: never panics, an alert needs at
    // most its 2 bytes, and a record that classifies as droppable tickets is already whole.
    match control_bytes_missing(ty, body) {
        Some(n) if ty == CONTENT_ALERT => assert!(n <= 2),
        Some(n) if got == Control::Retry && ty == CONTENT_HANDSHAKE => assert_eq!(n, 0),
        Some(_) => assert!(ty == CONTENT_ALERT || ty == CONTENT_HANDSHAKE),
        None => assert!(ty != CONTENT_ALERT && ty != CONTENT_HANDSHAKE),
    }
    // Deterministic: the same record always means the same thing.
    assert_eq!(classify(ty, body), got);
});

/// An independent check: whole NewSessionTickets, then exactly one KeyUpdate message of one
/// byte (1 = update_requested, 0 = not) that ends the record.
fn key_update_last(body: &[u8], requested: bool) -> bool {
    let Some(at) = body.len().checked_sub(5) else { return false };
    let (head, ku) = body.split_at(at);
    ku == [24, 0, 0, 1, u8::from(requested)] && (head.is_empty() || only_tickets(head))
}

/// An independent check: the body is one or more whole NewSessionTicket messages, nothing else.
fn only_tickets(mut body: &[u8]) -> bool {
    if body.is_empty() {
        return false;
    }
    while let [ty, a, b, c, rest @ ..] = body {
        let len = (usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c);
        if *ty != NEW_SESSION_TICKET || rest.len() < len {
            return false;
        }
        body = &rest[len..];
    }
    body.is_empty()
}
