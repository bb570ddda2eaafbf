//! The frame decoder as tetherd runs it: a byte stream, delivered in arbitrary pieces, read
//! frame by frame with `wire::io::read_frame`; each body decoded as a request (the broker's
//! side) and as a response (the shim's and the CLI's side).
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use tether_fuzz::{request_round_trip, response_round_trip, Chunked};
use tether_proto::wire::{self, io::read_frame, WireError, HEADER_LEN, MAX_BODY};

fuzz_target!(|data: &[u8]| {
    // First byte: how many bytes describe the chunking; then the chunk sizes; then the stream.
    let (n_sizes, rest) = match data.split_first() {
        Some((n, rest)) => (usize::from(*n % 8), rest),
        None => (0, data),
    };
    let (sizes, stream) = rest.split_at(n_sizes.min(rest.len()));

    let mut whole = Cursor::new(stream);
    let mut pieces = Chunked::new(stream, sizes);
    let mut consumed = 0usize;
    loop {
        let a = read_frame(&mut whole);
        let b = read_frame(&mut pieces);
        match (&a, &b) {
            (Ok(Some(x)), Ok(Some(y))) => assert_eq!(&**x, &**y, "chunking changed a frame"),
            (Ok(None), Ok(None)) => break,
            (Err(_), Err(_)) => break,
            _ => panic!("chunking changed the outcome: {a:?} vs {b:?}"),
        }
        let Ok(Some(body)) = a else { unreachable!() };
        assert!(body.len() <= MAX_BODY);
        // The header the reader accepted is the one at this offset, and states this length.
        let header: &[u8; HEADER_LEN] = stream[consumed..consumed + HEADER_LEN].try_into().unwrap();
        assert_eq!(wire::parse_header(header).unwrap(), body.len());
        consumed += HEADER_LEN + body.len();
        assert_eq!(whole.position() as usize, consumed);
        request_round_trip(&body);
        response_round_trip(&body);
    }

    // A header refused on its own is refused with the matching error code.
    if let Some(h) = stream.get(..HEADER_LEN) {
        if let Err(e) = wire::parse_header(h.try_into().unwrap()) {
            assert!(!matches!(e, WireError::Io(_) | WireError::Truncated));
            let _ = e.code();
        }
    }
});
