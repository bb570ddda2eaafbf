//! A small blocking client for tetherd's socket, shared by the CLI and tests.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tether_proto::wire::{self, io::read_frame, io::write_frame, Request, Response, StatusResponse, SvidResponse};

use crate::error::Error;

/// Default bound on connecting, sending and waiting for an answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to tetherd; it may carry several requests.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let stream =
            UnixStream::connect(path).map_err(|error| Error::Connect { path: path.to_owned(), error })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self { stream })
    }

    /// Send `request` and read one response. A broker error is returned as `Ok(Response::Error)`.
    pub fn call(&mut self, request: &Request) -> Result<Response, Error> {
        write_frame(&mut self.stream, &wire::encode(request)?)?;
        let body = read_frame(&mut self.stream)?.ok_or(wire::WireError::Truncated)?;
        Ok(wire::decode(&body)?)
    }

    /// The caller's own SVID.
    pub fn fetch_svid(&mut self) -> Result<SvidResponse, Error> {
        match self.call(&Request::FetchSvid {})? {
            Response::Svid(s) => Ok(s),
            Response::Error(e) => Err(Error::Refused(e)),
            _ => Err(Error::UnexpectedResponse("svid")),
        }
    }

    pub fn status(&mut self) -> Result<StatusResponse, Error> {
        match self.call(&Request::Status {})? {
            Response::Status(s) => Ok(s),
            Response::Error(e) => Err(Error::Refused(e)),
            _ => Err(Error::UnexpectedResponse("status")),
        }
    }
}
