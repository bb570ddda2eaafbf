//! `ktls-selfcheck`: proves that the running kernel offers working kernel TLS.
//!
//! It builds a loopback TCP pair, attaches the `tls` ULP to both ends and installs TLS 1.3
//! AES-GCM-128 keys by hand (client TX == server RX, server TX == client RX). It then sends data
//! both ways with plain `write`/`read`, pushes a 1 MiB file through `sendfile`, checks every byte,
//! and checks that `/proc/net/tls_stat` counted the software TX/RX sessions.
//!
//! It then reports what this kernel's kTLS can do, each probed on loopback (never guessed from the
//! kernel version): which TLS 1.3 ciphers `TLS_TX` accepts, whether an established kTLS pair can be
//! rekeyed (a second `TLS_TX`/`TLS_RX` setsockopt, data checked under the new keys and counted by
//! `TlsTxRekeyOk`/`TlsRxRekeyOk`), and whether `TLS_RX_EXPECT_NO_PAD` is accepted. A kernel without
//! rekey or without a cipher is reported, not failed; a rekey the kernel accepts but then gets wrong
//! is a FAIL.
//!
//! Exit status: 0 = PASS, 1 = a step failed (the step and errno are printed), 2 = the kernel has no
//! kTLS (`TCP_ULP "tls"` gives ENOENT), which is the normal result outside `scripts/ktls-vm`.
//!
//! All FFI lives in `tether_shim_tests::fixed_ktls` (`sys` here); every unsafe block there states
//! why it is sound.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

// The kTLS socket options and `sendfile` (the only unsafe code this program runs).
use tether_shim_tests::fixed_ktls as sys;

/// A failed step: what was being done and the OS error, if any.
#[derive(Debug)]
struct StepError {
    step: &'static str,
    detail: String,
}

impl StepError {
    fn os(step: &'static str, err: &io::Error) -> Self {
        let errno = err
            .raw_os_error()
            .map_or_else(String::new, |n| format!(" (errno {n})"));
        Self {
            step,
            detail: format!("{err}{errno}"),
        }
    }
    fn msg(step: &'static str, detail: impl Into<String>) -> Self {
        Self {
            step,
            detail: detail.into(),
        }
    }
}

type Result<T> = std::result::Result<T, StepError>;

enum Outcome {
    Pass(String),
    Unavailable(String),
}

fn main() -> ExitCode {
    match run() {
        Ok(Outcome::Pass(summary)) => match abilities::report() {
            Ok(lines) => {
                for line in lines {
                    println!("ktls-selfcheck: {line}");
                }
                println!("ktls-selfcheck: PASS ({summary})");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("ktls-selfcheck: FAIL at {}: {}", e.step, e.detail);
                ExitCode::FAILURE
            }
        },
        Ok(Outcome::Unavailable(why)) => {
            println!("ktls-selfcheck: kTLS unavailable ({why})");
            ExitCode::from(2)
        }
        Err(e) => {
            println!("ktls-selfcheck: FAIL at {}: {}", e.step, e.detail);
            ExitCode::FAILURE
        }
    }
}

/// Fixed test keys: client -> server traffic uses A, server -> client uses B.
const KEY_A: sys::Tls13AesGcm128 = sys::Tls13AesGcm128::new([0x11; 16], [0xa1; 8], [0x5a; 4]);
const KEY_B: sys::Tls13AesGcm128 = sys::Tls13AesGcm128::new([0x22; 16], [0xb2; 8], [0x6b; 4]);

const SENDFILE_LEN: usize = 1 << 20;

fn run() -> Result<Outcome> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| StepError::os("bind 127.0.0.1:0", &e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StepError::os("local_addr", &e))?;
    let mut client = TcpStream::connect(addr).map_err(|e| StepError::os("connect", &e))?;
    let (mut server, _) = listener.accept().map_err(|e| StepError::os("accept", &e))?;

    match sys::attach_tls_ulp(client.as_raw_fd()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Ok(Outcome::Unavailable("TCP_ULP tls: ENOENT".into()));
        }
        Err(e) => return Err(StepError::os("setsockopt(TCP_ULP, \"tls\") on client", &e)),
    }
    sys::attach_tls_ulp(server.as_raw_fd())
        .map_err(|e| StepError::os("setsockopt(TCP_ULP, \"tls\") on server", &e))?;

    let before = TlsStat::read()?;

    sys::set_crypto(client.as_raw_fd(), sys::TLS_TX, &KEY_A)
        .map_err(|e| StepError::os("setsockopt(TLS_TX) on client", &e))?;
    sys::set_crypto(server.as_raw_fd(), sys::TLS_RX, &KEY_A)
        .map_err(|e| StepError::os("setsockopt(TLS_RX) on server", &e))?;
    sys::set_crypto(server.as_raw_fd(), sys::TLS_TX, &KEY_B)
        .map_err(|e| StepError::os("setsockopt(TLS_TX) on server", &e))?;
    sys::set_crypto(client.as_raw_fd(), sys::TLS_RX, &KEY_B)
        .map_err(|e| StepError::os("setsockopt(TLS_RX) on client", &e))?;

    // Plain write/read, both directions.
    let ping = b"tether ktls-selfcheck: client to server";
    client
        .write_all(ping)
        .map_err(|e| StepError::os("write client->server", &e))?;
    expect_bytes(&mut server, ping, "read at server")?;
    let pong = b"tether ktls-selfcheck: server to client, a bit longer";
    server
        .write_all(pong)
        .map_err(|e| StepError::os("write server->client", &e))?;
    expect_bytes(&mut client, pong, "read at client")?;

    // sendfile through the client socket: the kernel builds the TLS records itself.
    let payload = pattern(SENDFILE_LEN);
    let file = temp_file_with(&payload)?;
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; SENDFILE_LEN];
        server.read_exact(&mut got).map(|()| got)
    });
    let mut offset: libc::off_t = 0;
    while usize::try_from(offset).unwrap_or(usize::MAX) < SENDFILE_LEN {
        let left = SENDFILE_LEN - usize::try_from(offset).unwrap_or(SENDFILE_LEN);
        let sent = sys::sendfile(client.as_raw_fd(), file.as_raw_fd(), &mut offset, left)
            .map_err(|e| StepError::os("sendfile client->server", &e))?;
        if sent == 0 {
            return Err(StepError::msg(
                "sendfile client->server",
                "returned 0 before the end",
            ));
        }
    }
    let got = reader
        .join()
        .map_err(|_| StepError::msg("read sendfile data at server", "reader thread panicked"))?
        .map_err(|e| StepError::os("read sendfile data at server", &e))?;
    if got != payload {
        let at = got
            .iter()
            .zip(&payload)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(StepError::msg(
            "verify sendfile data",
            format!("first difference at byte {at}"),
        ));
    }
    let after = TlsStat::read()?;
    drop(client);
    print_counters(&before, &after);
    let (tx0, tx1) = (before.get("TlsTxSw")?, after.get("TlsTxSw")?);
    let (rx0, rx1) = (before.get("TlsRxSw")?, after.get("TlsRxSw")?);
    if tx1 < tx0 + 2 || rx1 < rx0 + 2 {
        return Err(StepError::msg(
            "check /proc/net/tls_stat",
            format!(
                "expected TlsTxSw and TlsRxSw to rise by 2: TxSw {tx0}->{tx1}, RxSw {rx0}->{rx1}"
            ),
        ));
    }
    if after.get("TlsDecryptError")? != before.get("TlsDecryptError")? {
        return Err(StepError::msg(
            "check /proc/net/tls_stat",
            "TlsDecryptError rose",
        ));
    }
    check_wire_is_encrypted(&listener)?;
    Ok(Outcome::Pass(format!(
        "TlsTxSw {tx0}->{tx1}, TlsRxSw {rx0}->{rx1}, wire encrypted"
    )))
}

/// A second pair where only the client has TLS_TX: the server reads the raw TCP stream and must
/// see one TLS 1.3 application-data record (header 17 03 03, plaintext + type byte + 16-byte tag)
/// that does not contain the plaintext.
fn check_wire_is_encrypted(listener: &TcpListener) -> Result<()> {
    const STEP: &str = "raw wire check";
    let addr = listener.local_addr().map_err(|e| StepError::os(STEP, &e))?;
    let mut client = TcpStream::connect(addr).map_err(|e| StepError::os(STEP, &e))?;
    let (mut raw_server, _) = listener.accept().map_err(|e| StepError::os(STEP, &e))?;
    sys::attach_tls_ulp(client.as_raw_fd()).map_err(|e| StepError::os(STEP, &e))?;
    sys::set_crypto(client.as_raw_fd(), sys::TLS_TX, &KEY_A)
        .map_err(|e| StepError::os(STEP, &e))?;
    let secret = b"this plaintext must never appear on the wire";
    client
        .write_all(secret)
        .map_err(|e| StepError::os(STEP, &e))?;
    let mut record = vec![0u8; 5 + secret.len() + 1 + 16];
    raw_server
        .read_exact(&mut record)
        .map_err(|e| StepError::os(STEP, &e))?;
    let want_len = u16::try_from(secret.len() + 1 + 16)
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    if record[..5] != [0x17, 0x03, 0x03, want_len[0], want_len[1]] {
        return Err(StepError::msg(
            STEP,
            format!("unexpected record header {:02x?}", &record[..5]),
        ));
    }
    if record.windows(secret.len()).any(|w| w == secret) {
        return Err(StepError::msg(STEP, "plaintext visible on the wire"));
    }
    Ok(())
}

fn expect_bytes(sock: &mut TcpStream, want: &[u8], step: &'static str) -> Result<()> {
    let mut got = vec![0u8; want.len()];
    sock.read_exact(&mut got)
        .map_err(|e| StepError::os(step, &e))?;
    if got == want {
        Ok(())
    } else {
        Err(StepError::msg(
            step,
            format!("payload mismatch: got {:?}", String::from_utf8_lossy(&got)),
        ))
    }
}

/// Deterministic, non-repeating-per-record bytes so that a misplaced record shows up.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// An unlinked temporary file holding `data`, positioned anywhere (sendfile uses its own offset).
fn temp_file_with(data: &[u8]) -> Result<File> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("ktls-selfcheck.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| StepError::os("create temp file", &e))?;
    let _ = std::fs::remove_file(&path);
    file.write_all(data)
        .map_err(|e| StepError::os("write temp file", &e))?;
    file.sync_data()
        .map_err(|e| StepError::os("sync temp file", &e))?;
    Ok(file)
}

/// A connected loopback TCP pair: (client, server side), with bounded reads.
fn tcp_pair(step: &'static str) -> Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| StepError::os(step, &e))?;
    let addr = l.local_addr().map_err(|e| StepError::os(step, &e))?;
    let c = TcpStream::connect(addr).map_err(|e| StepError::os(step, &e))?;
    let (s, _) = l.accept().map_err(|e| StepError::os(step, &e))?;
    for sock in [&c, &s] {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .map_err(|e| StepError::os(step, &e))?;
    }
    Ok((c, s))
}

/// `/proc/net/tls_stat`: lines of `Name<whitespace>value`.
#[derive(Debug)]
struct TlsStat(Vec<(String, u64)>);

impl TlsStat {
    fn read() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/net/tls_stat")
            .map_err(|e| StepError::os("read /proc/net/tls_stat", &e))?;
        let rows = text
            .lines()
            .filter_map(|line| {
                let mut it = line.split_whitespace();
                Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
            })
            .collect();
        Ok(Self(rows))
    }

    fn get(&self, name: &str) -> Result<u64> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
            .ok_or_else(|| StepError::msg("parse /proc/net/tls_stat", format!("no {name} counter")))
    }
}

fn print_counters(before: &TlsStat, after: &TlsStat) {
    for (name, v1) in &after.0 {
        let v0 = before.get(name).unwrap_or(0);
        if v0 != *v1 || name.starts_with("TlsCurr") {
            println!("  {name:<24} {v0} -> {v1}");
        }
    }
}

#[path = "ktls-selfcheck/abilities.rs"]
mod abilities;
