//! `bench-server`: the server half of `scripts/bench`. Not linked with the shim: the shim (or
//! stunnel in front of it) is applied from outside, so every configuration runs this same program.
//!
//! ```text
//! bench-server --port PORT [--ktls-fixed] [--rustls DIR]
//! ```
//!
//! One connection at a time (the benchmark client is sequential). Protocol, after the optional
//! TLS layer: the client sends one opcode byte.
//! - `P` (ping): reply `p`, close. This is the connection-rate request.
//! - `B` (bulk): a big-endian u64 length follows, then that many bytes; reply `k` once all are in.
//!
//! `--ktls-fixed` attaches the kernel `tls` ULP to each accepted socket and installs fixed TLS 1.3
//! AES-GCM-256 keys (no handshake): the raw kTLS data path, for a kernel that has kTLS.
//! `--rustls DIR` runs an in-process rustls mTLS 1.3 handshake (ring) with DIR/svid.pem,
//! DIR/svid.key and DIR/bundle.pem (`tether svid --out DIR`), requiring a client certificate
//! that chains to the bundle: the handshake floor without the shim.
//!
//! Prints `ready` on stdout once listening.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

const BUF: usize = 256 * 1024;

#[derive(Debug, Default)]
struct Args {
    port: u16,
    ktls_fixed: bool,
    rustls: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => {
                a.port = it
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or("--port needs a number")?;
            }
            "--ktls-fixed" => a.ktls_fixed = true,
            "--rustls" => a.rustls = Some(it.next().ok_or("--rustls needs a directory")?.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.port == 0 {
        return Err("--port is required".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-server: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &Args) -> io::Result<()> {
    let tls = args.rustls.as_deref().map(server_config).transpose()?;
    let listener = TcpListener::bind(("127.0.0.1", args.port))?;
    println!("ready");
    io::stdout().flush()?;
    let mut buf = vec![0u8; BUF];
    loop {
        let (sock, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let _ = sock.set_nodelay(true);
        if args.ktls_fixed {
            sys::install_fixed_keys(sock.as_raw_fd(), &sys::KEY_B, &sys::KEY_A)?;
        }
        let result = match &tls {
            Some(cfg) => {
                let conn = rustls::ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
                handle(&mut rustls::StreamOwned::new(conn, sock), &mut buf)
            }
            None => handle(&mut { sock }, &mut buf),
        };
        if let Err(e) = result {
            eprintln!("bench-server: connection: {e}");
        }
    }
}

fn handle(s: &mut impl ReadWrite, buf: &mut [u8]) -> io::Result<()> {
    let mut op = [0u8; 1];
    s.read_exact(&mut op)?;
    match op[0] {
        b'P' => {
            s.write_all(b"p")?;
            s.flush()
        }
        b'B' => {
            let mut len = [0u8; 8];
            s.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            while left > 0 {
                let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                let n = s.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "bulk: early EOF"));
                }
                left -= n as u64;
            }
            s.write_all(b"k")?;
            s.flush()
        }
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad opcode {other:#x}"))),
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// rustls server side of the handshake floor: TLS 1.3, client certificate required and checked
/// against the bundle, no tickets (as tether's servers).
fn server_config(dir: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key, roots) = tether_shim_tests::svid_dir::load(dir)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(io::Error::other)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(io::Error::other)?;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

use tether_shim_tests::fixed_ktls as sys;
