//! A small blocking client for tetherd's socket, shared by the CLI and tests.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tether_proto::wire::{
    self, io::read_frame, io::write_frame, sign, ConnectionReport, LiveConnection, PolicyCheckRequest,
    PolicyCheckResponse, PolicyResponse, Request, Response, StatusResponse, SvidResponse,
};
use tether_proto::SpiffeId;

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
        let mut stream = stream;
        // tetherd speaks first; nothing may be sent before its greeting.
        if let Some(e) = wire::io::read_greeting(&mut stream)? {
            return Err(Error::Refused(e));
        }
        Ok(Self { stream })
    }

    /// Send `request` and read one response. A broker error is returned as `Ok(Response::Error)`.
    pub fn call(&mut self, request: &Request) -> Result<Response, Error> {
        write_frame(&mut self.stream, &wire::encode(request)?)?;
        let body = read_frame(&mut self.stream)?.ok_or(wire::WireError::Truncated)?;
        Ok(wire::decode(&body)?)
    }

    /// The caller's own SVID with its private key, whatever tetherd's key custody: an explicit
    /// export (`tether svid --out`).
    pub fn export_svid(&mut self) -> Result<SvidResponse, Error> {
        match self.call(&Request::ExportSvid {})? {
            Response::Svid(s) => Ok(s),
            Response::Error(e) => Err(Error::Refused(e)),
            _ => Err(Error::UnexpectedResponse("svid")),
        }
    }

    /// Ask tetherd to sign `message` with the key it holds under `key_id` (broker custody).
    /// `Ok(Err((status, reason)))` is a refusal.
    pub fn sign(&mut self, key_id: u64, scheme: u16, message: &[u8]) -> Result<Result<Vec<u8>, (sign::Status, String)>, Error> {
        let mut frame: sign::RequestBuf = [0; wire::HEADER_LEN + sign::MAX_BODY];
        let n = sign::encode_request(&sign::Request { key_id, scheme, message }, &mut frame)?;
        write_frame(&mut self.stream, &frame[..n])?;
        // One read for the whole answer (tetherd writes it in one piece).
        let mut answer: sign::ResponseBuf = [0; wire::HEADER_LEN + sign::MAX_RESPONSE_BODY];
        let (kind, len, got) = sign::read_response(&mut self.stream, &mut answer)?;
        if kind != wire::FrameKind::Sign || len > sign::MAX_RESPONSE_BODY {
            // An error message frame (e.g. a broker that does not know signing frames).
            let mut body = vec![0u8; len];
            let have = got - wire::HEADER_LEN;
            body[..have].copy_from_slice(&answer[wire::HEADER_LEN..got]);
            wire::io::read_body(&mut self.stream, &mut body[have..])?;
            return match wire::decode::<Response>(&body)? {
                Response::Error(e) => Err(Error::Refused(e)),
                _ => Err(Error::UnexpectedResponse("signature")),
            };
        }
        let (status, payload) = sign::parse_response(&answer[wire::HEADER_LEN..got])?;
        Ok(match status {
            sign::Status::Ok => Ok(payload.to_vec()),
            s => Err((s, String::from_utf8_lossy(payload).into_owned())),
        })
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

    /// The policy in force and its generation.
    pub fn fetch_policy(&mut self) -> Result<PolicyResponse, Error> {
        match self.call(&Request::FetchPolicy {})? {
            Response::Policy(p) => Ok(p),
            Response::Error(e) => Err(Error::Refused(e)),
            _ => Err(Error::UnexpectedResponse("policy")),
        }
    }

    /// Report a connection of this process.
    pub fn report(&mut self, report: ConnectionReport) -> Result<(), Error> {
        self.expect_ok(&Request::Report(report)).map(drop)
    }

    /// The live connection table (all rows for root, else this user's), and how many rows
    /// did not fit in the response.
    pub fn connections(&mut self) -> Result<(Vec<LiveConnection>, u64), Error> {
        match self.call(&Request::Connections {})? {
            Response::Connections(c) => Ok((c.connections, c.omitted)),
            Response::Error(e) => Err(Error::Refused(e)),
            _ => Err(Error::UnexpectedResponse("connections")),
        }
    }

    /// Ask tetherd to re-read its config; returns its message.
    pub fn reload(&mut self) -> Result<String, Error> {
        self.expect_ok(&Request::Reload {})
    }

    /// Which rules decide a connection from `from` to `to` (`ADDR:PORT`).
    pub fn policy_check(&mut self, from: SpiffeId, to: String) -> Result<PolicyCheckResponse, Error> {
        match self.call(&Request::PolicyCheck(PolicyCheckRequest { from, to }))? {
            Response::PolicyCheck(p) => Ok(p),
            Response::Error(e) => Err(Error::Refused(e)),
            _ => Err(Error::UnexpectedResponse("policy_check")),
        }
    }

    fn expect_ok(&mut self, request: &Request) -> Result<String, Error> {
        match self.call(request)? {
            Response::Ok(ok) => Ok(ok.message),
            Response::Error(e) => Err(Error::Refused(e)),
            _ => Err(Error::UnexpectedResponse("ok")),
        }
    }
}
