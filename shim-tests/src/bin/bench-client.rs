//! `bench-client`: the client half of `scripts/bench` (protocol in `bench-server.rs`). Not linked
//! with the shim; the configuration under test is applied from outside (LD_PRELOAD, stunnel).
//!
//! ```text
//! bench-client --port PORT [--ktls-fixed] [--rustls DIR] bulk --bytes N [--sendfile FILE]
//! bench-client --port PORT [--ktls-fixed] [--rustls DIR] connrate --n N
//! ```
//!
//! - `bulk`: one connection; sends N bytes with `write()` (256 KiB buffers) or with `sendfile()`
//!   from FILE (re-sent from offset 0 until N bytes went out), then waits for the server's ack.
//!   Timed from the first byte to the ack; the connect (and handshake) is not in the time.
//! - `connrate`: N sequential connections, each connect (+ handshake) → 1-byte request →
//!   1-byte reply → close. Reports connections/s over the whole loop and the per-connection
//!   setup latency (connect to reply) median, p99 and min.
//!
//! Prints one JSON object, including this process's VmHWM and VmRSS (KiB) at the end.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

const BUF: usize = 256 * 1024;

#[derive(Debug)]
enum Work {
    Bulk { bytes: u64, sendfile: Option<PathBuf> },
    ConnRate { n: usize },
}

#[derive(Debug)]
struct Args {
    port: u16,
    ktls_fixed: bool,
    rustls: Option<PathBuf>,
    work: Work,
}

fn parse_args() -> Result<Args, String> {
    let mut port = 0u16;
    let mut ktls_fixed = false;
    let mut rustls = None;
    let mut bytes = 0u64;
    let mut sendfile = None;
    let mut n = 0usize;
    let mut cmd = None;
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.and_then(|s| s.parse().ok()).ok_or(format!("{what} needs a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => port = u16::try_from(num(it.next(), "--port")?).map_err(|e| e.to_string())?,
            "--ktls-fixed" => ktls_fixed = true,
            "--rustls" => rustls = Some(PathBuf::from(it.next().ok_or("--rustls needs a directory")?)),
            "--bytes" => bytes = num(it.next(), "--bytes")?,
            "--sendfile" => sendfile = Some(PathBuf::from(it.next().ok_or("--sendfile needs a file")?)),
            "--n" => n = usize::try_from(num(it.next(), "--n")?).map_err(|e| e.to_string())?,
            "bulk" | "connrate" => cmd = Some(arg),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let work = match cmd.as_deref() {
        Some("bulk") if bytes > 0 => Work::Bulk { bytes, sendfile },
        Some("connrate") if n > 0 => Work::ConnRate { n },
        _ => return Err("need `bulk --bytes N` or `connrate --n N`".into()),
    };
    if port == 0 {
        return Err("--port is required".into());
    }
    Ok(Args { port, ktls_fixed, rustls, work })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-client: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(json) => {
            let (hwm, rss) = memory_kib();
            println!("{{{json},\"vmhwm_kib\":{hwm},\"vmrss_kib\":{rss}}}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-client: {e}");
            ExitCode::FAILURE
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A connected socket, with kTLS keys or a rustls session on it as configured.
struct Conn {
    raw: i32,
    stream: Box<dyn ReadWrite>,
}

fn open(args: &Args, tls: Option<&Arc<rustls::ClientConfig>>) -> io::Result<Conn> {
    let sock = TcpStream::connect(("127.0.0.1", args.port))?;
    sock.set_nodelay(true)?;
    let raw = sock.as_raw_fd();
    if args.ktls_fixed {
        sys::install_fixed_keys(raw, &sys::KEY_A, &sys::KEY_B)?;
    }
    let stream: Box<dyn ReadWrite> = match tls {
        Some(cfg) => {
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
            Box::new(rustls::StreamOwned::new(conn, sock))
        }
        None => Box::new(sock),
    };
    Ok(Conn { raw, stream })
}

fn run(args: &Args) -> io::Result<String> {
    let tls = args.rustls.as_deref().map(client_config).transpose()?;
    match &args.work {
        Work::Bulk { bytes, sendfile } => {
            if sendfile.is_some() && tls.is_some() {
                return Err(io::Error::other("--sendfile cannot go through --rustls"));
            }
            let file = sendfile.as_deref().map(File::open).transpose()?;
            let mut c = open(args, tls.as_ref())?;
            let t0 = Instant::now();
            let mut hdr = [0u8; 9];
            hdr[0] = b'B';
            hdr[1..].copy_from_slice(&bytes.to_be_bytes());
            c.stream.write_all(&hdr)?;
            match &file {
                Some(f) => send_file(c.raw, f, *bytes)?,
                None => write_loop(&mut c.stream, *bytes)?,
            }
            c.stream.flush()?;
            expect_byte(&mut c.stream, b'k')?;
            let secs = t0.elapsed().as_secs_f64();
            let op = if file.is_some() { "sendfile" } else { "write" };
            Ok(format!(
                "\"op\":\"{op}\",\"bytes\":{bytes},\"secs\":{secs:.6},\"mib_s\":{:.2}",
                *bytes as f64 / secs / 1048576.0
            ))
        }
        Work::ConnRate { n } => {
            let mut lat_us = Vec::with_capacity(*n);
            let t0 = Instant::now();
            for _ in 0..*n {
                let t = Instant::now();
                let mut c = open(args, tls.as_ref())?;
                c.stream.write_all(b"P")?;
                c.stream.flush()?;
                expect_byte(&mut c.stream, b'p')?;
                lat_us.push(t.elapsed().as_secs_f64() * 1e6);
                drop(c);
            }
            let secs = t0.elapsed().as_secs_f64();
            lat_us.sort_by(f64::total_cmp);
            let p = |q: f64| lat_us[((lat_us.len() - 1) as f64 * q).round() as usize];
            Ok(format!(
                "\"op\":\"connrate\",\"n\":{n},\"secs\":{secs:.6},\"conns_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"min_us\":{:.1}",
                *n as f64 / secs,
                p(0.5),
                p(0.99),
                lat_us[0]
            ))
        }
    }
}

fn write_loop(s: &mut Box<dyn ReadWrite>, bytes: u64) -> io::Result<()> {
    let buf: Vec<u8> = (0..BUF).map(|i| (i * 31 % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(BUF as u64)).unwrap_or(BUF);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn send_file(sock: i32, file: &File, bytes: u64) -> io::Result<()> {
    let flen = file.metadata()?.len();
    if flen == 0 {
        return Err(io::Error::other("sendfile: empty file"));
    }
    let mut left = bytes;
    while left > 0 {
        let mut off: libc::off_t = 0;
        let chunk = left.min(flen);
        while (off as u64) < chunk {
            let want = usize::try_from(chunk - off as u64).unwrap_or(usize::MAX);
            let n = sys::sendfile(sock, file.as_raw_fd(), &mut off, want)?;
            if n == 0 {
                return Err(io::Error::other("sendfile returned 0"));
            }
        }
        left -= chunk;
    }
    Ok(())
}

fn expect_byte(s: &mut Box<dyn ReadWrite>, want: u8) -> io::Result<()> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if b[0] == want {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, format!("expected {want:#x}, got {:#x}", b[0])))
    }
}

/// (VmHWM, VmRSS) of this process in KiB, from /proc/self/status.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// rustls client side of the handshake floor: TLS 1.3, our SVID as client certificate, no
/// resumption (each connection pays a full handshake, as under tether).
fn client_config(dir: &Path) -> io::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key, roots) = tether_shim_tests::svid_dir::load(dir)?;
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(io::Error::other)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
        .with_client_auth_cert(chain, key)
        .map_err(io::Error::other)?;
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// An SVID names a SPIFFE ID (URI SAN), not a host: verify the chain with webpki and accept the
/// name mismatch, which webpki reports only after the chain and signatures checked out.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

use tether_shim_tests::fixed_ktls as sys;
