//! Invariants shared by the fuzz targets. Each helper panics (a libFuzzer crash) when the
//! property it names does not hold.

use std::io::Read;

use tether_proto::wire::{self, Request, Response, WireError, HEADER_LEN, MAX_BODY};

/// A reader that hands out its bytes in the chunk sizes of `sizes` (cycled), as a socket
/// delivering a frame in pieces would.
#[derive(Debug)]
pub struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], sizes: &'a [u8]) -> Self {
        Self { data, sizes, turn: 0 }
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let step = match self.sizes.get(self.turn % self.sizes.len().max(1)) {
            Some(&s) => usize::from(s.max(1)),
            None => usize::MAX,
        };
        self.turn += 1;
        let n = step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// `encode` must produce one well-formed frame whose header states the body length.
pub fn check_frame(frame: &[u8]) -> &[u8] {
    let header: &[u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("a frame has a header");
    let len = wire::parse_header(header).expect("encode wrote a header parse_header refuses");
    assert_eq!(len, frame.len() - HEADER_LEN, "header length differs from the body");
    assert!(len <= MAX_BODY);
    &frame[HEADER_LEN..]
}

/// A request that decodes must re-encode to a frame that decodes to the same request.
pub fn request_round_trip(body: &[u8]) -> Option<Request> {
    let req: Request = wire::decode(body).ok()?;
    let frame = match wire::encode(&req) {
        Ok(f) => f,
        Err(WireError::TooLarge(_)) => return Some(req),
        Err(e) => panic!("a decoded request does not encode: {e}"),
    };
    let back: Request = wire::decode(check_frame(&frame)).expect("an encoded request does not decode");
    assert_eq!(back, req, "request changed across encode/decode");
    Some(req)
}

/// A response that decodes must re-encode to a frame that decodes and encodes to the same bytes
/// (`Response` holds keys and has no `PartialEq`; its canonical encoding stands in).
pub fn response_round_trip(body: &[u8]) -> Option<()> {
    let resp: Response = wire::decode(body).ok()?;
    let first = match wire::encode(&resp) {
        Ok(f) => f,
        Err(WireError::TooLarge(_)) => return Some(()),
        Err(e) => panic!("a decoded response does not encode: {e}"),
    };
    let again: Response = wire::decode(check_frame(&first)).expect("an encoded response does not decode");
    let second = wire::encode(&again).expect("a re-decoded response does not encode");
    assert_eq!(&*first, &*second, "response changed across encode/decode");
    Some(())
}
