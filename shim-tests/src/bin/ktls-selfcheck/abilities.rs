//! What the running kernel's kTLS can do, each probed on a fresh loopback pair: the TLS 1.3
//! ciphers `TLS_TX` accepts, rekey of an established pair, and `TLS_RX_EXPECT_NO_PAD`.
//!
//! The report lines are stable text (scripts/test greps `rekey: supported` / `rekey: unsupported`).

use std::io::Write;
use std::os::fd::AsRawFd;

use tether_proto::ktls::CIPHERS;

use super::{expect_bytes, sys, tcp_pair, StepError, TlsStat};

type Result<T> = std::result::Result<T, StepError>;

/// The report: one line per ability. `Err` only when the kernel accepted something and then
/// behaved wrongly (a rekey that loses or garbles data, or that its counters do not show).
pub(crate) fn report() -> Result<Vec<String>> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(vec![
        format!("kernel {}", release.trim()),
        ciphers()?,
        rekey()?,
        no_pad()?,
    ])
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EBUSY) => "EBUSY".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOPROTOOPT) => "ENOPROTOOPT".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".into(),
        _ => e.to_string(),
    }
}

fn ciphers() -> Result<String> {
    const STEP: &str = "cipher probe";
    let (mut works, mut refused) = (Vec::new(), Vec::new());
    for c in &CIPHERS {
        let (client, _server) = tcp_pair(STEP)?;
        sys::attach_tls_ulp(client.as_raw_fd()).map_err(|e| StepError::os(STEP, &e))?;
        match sys::set_tls_raw(client.as_raw_fd(), sys::TLS_TX, &c.probe_crypto_info(0x5a)) {
            Ok(()) => works.push(c.name),
            Err(e) => refused.push(format!("{} ({})", c.name, errno_name(&e))),
        }
    }
    let mut line = format!(
        "ciphers: {} (TLS 1.3 TLS_TX accepted)",
        if works.is_empty() {
            "none".to_owned()
        } else {
            works.join(", ")
        }
    );
    if !refused.is_empty() {
        line.push_str(&format!("; refused: {}", refused.join(", ")));
    }
    Ok(line)
}

/// One direction of an established kTLS pair (client TX -> server RX, AES-GCM-128), then a second
/// TLS_TX and TLS_RX with new keys, and data under them.
fn rekey() -> Result<String> {
    const STEP: &str = "rekey probe";
    let os = |e: std::io::Error| StepError::os(STEP, &e);
    let aes = &CIPHERS[0];
    let (mut client, mut server) = tcp_pair(STEP)?;
    sys::attach_tls_ulp(client.as_raw_fd()).map_err(os)?;
    sys::attach_tls_ulp(server.as_raw_fd()).map_err(os)?;
    let old = aes.probe_crypto_info(0x31);
    sys::set_tls_raw(client.as_raw_fd(), sys::TLS_TX, &old).map_err(os)?;
    sys::set_tls_raw(server.as_raw_fd(), sys::TLS_RX, &old).map_err(os)?;
    let first = b"rekey probe: under the first keys";
    client.write_all(first).map_err(os)?;
    expect_bytes(&mut server, first, STEP)?;

    let before = TlsStat::read()?;
    let new = aes.probe_crypto_info(0x47);
    if let Err(e) = sys::set_tls_raw(client.as_raw_fd(), sys::TLS_TX, &new) {
        return Ok(format!(
            "rekey: unsupported (a second TLS_TX on an established kTLS socket: {}; a peer's KeyUpdate ends the connection)",
            errno_name(&e)
        ));
    }
    if let Err(e) = sys::set_tls_raw(server.as_raw_fd(), sys::TLS_RX, &new) {
        return Err(StepError::msg(
            STEP,
            format!(
                "the kernel rekeyed TLS_TX but refused TLS_RX ({})",
                errno_name(&e)
            ),
        ));
    }
    let second = b"rekey probe: under the second keys, a little longer";
    client.write_all(second).map_err(os)?;
    expect_bytes(&mut server, second, STEP)?;
    let after = TlsStat::read()?;
    let rise = |name: &str| -> Result<(u64, u64)> {
        let (a, b) = (before.get(name)?, after.get(name)?);
        if b > a {
            Ok((a, b))
        } else {
            Err(StepError::msg(
                STEP,
                format!("rekey accepted but {name} did not rise ({a} -> {b})"),
            ))
        }
    };
    let (tx0, tx1) = rise("TlsTxRekeyOk")?;
    let (rx0, rx1) = rise("TlsRxRekeyOk")?;
    Ok(format!(
        "rekey: supported (second TLS_TX and TLS_RX accepted, data verified under the new keys; \
         TlsTxRekeyOk {tx0}->{tx1}, TlsRxRekeyOk {rx0}->{rx1})"
    ))
}

fn no_pad() -> Result<String> {
    const STEP: &str = "TLS_RX_EXPECT_NO_PAD probe";
    let os = |e: std::io::Error| StepError::os(STEP, &e);
    let (client, server) = tcp_pair(STEP)?;
    sys::attach_tls_ulp(server.as_raw_fd()).map_err(os)?;
    sys::set_tls_raw(
        server.as_raw_fd(),
        sys::TLS_RX,
        &CIPHERS[0].probe_crypto_info(0x29),
    )
    .map_err(os)?;
    drop(client);
    match sys::set_tls_raw(
        server.as_raw_fd(),
        sys::TLS_RX_EXPECT_NO_PAD,
        &1u32.to_ne_bytes(),
    ) {
        Ok(()) => {
            let back =
                sys::get_tls_u32(server.as_raw_fd(), sys::TLS_RX_EXPECT_NO_PAD).map_err(os)?;
            if back == 1 {
                Ok("TLS_RX_EXPECT_NO_PAD: accepted (reads back 1)".into())
            } else {
                Err(StepError::msg(
                    STEP,
                    format!("accepted but reads back {back}"),
                ))
            }
        }
        Err(e) => Ok(format!(
            "TLS_RX_EXPECT_NO_PAD: refused ({})",
            errno_name(&e)
        )),
    }
}
