//! The kernel TLS checks of `tether doctor`: is the `tls` ULP there, which TLS 1.3 ciphers does
//! `TLS_TX` accept, can an established kTLS pair be rekeyed, and is `TLS_RX_EXPECT_NO_PAD` accepted.
//!
//! Everything is probed the way the shim uses it, on connected loopback TCP pairs, never guessed
//! from the kernel version. The cipher probe installs dummy TLS 1.3 keys on a fresh pair (they never
//! protect any data: the sockets are closed unused). The rekey probe sends a short message under
//! one key, installs a second `TLS_TX`/`TLS_RX` on the same sockets, sends another, checks it
//! arrives intact and that `TlsTxRekeyOk`/`TlsRxRekeyOk` in /proc/net/tls_stat rose.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Finding;
use crate::env::Env;
use crate::sys;

/// `TLS_RX` from linux/tls.h.
const TLS_RX: libc::c_int = 2;
/// `TLS_RX_EXPECT_NO_PAD` from linux/tls.h (Linux 6.0+, TLS 1.3 only; an int, 0 or 1).
const TLS_RX_EXPECT_NO_PAD: libc::c_int = 4;
/// Bounds every read of a probe: a kernel that swallows a record must not hang the doctor.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The kernel TLS findings, in order: ktls, ktls-module, ktls-ciphers, ktls-rekey, ktls-no-pad.
pub(super) fn findings(env: &dyn Env) -> Vec<Finding> {
    let ulp = probe_ulp();
    vec![
        ktls_finding(&ulp, env),
        module_finding(&ulp),
        ciphers_finding(&ulp),
        rekey_finding(&ulp),
        no_pad_finding(&ulp),
    ]
}

/// A connected loopback TCP pair: (client, server side), reads bounded by [`PROBE_TIMEOUT`].
fn tcp_pair() -> io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let c = TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    c.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    Ok((c, s))
}

/// `setsockopt(SOL_TCP, TCP_ULP, "tls")` on a fresh connected pair.
pub fn probe_ulp() -> io::Result<()> {
    let (c, _s) = tcp_pair()?;
    attach_ulp(&c)
}

fn attach_ulp(c: &TcpStream) -> io::Result<()> {
    sys::set_raw_sockopt(c, libc::IPPROTO_TCP, sys::TCP_ULP, b"tls")
}

/// A TLS 1.3 cipher the kernel may implement.
pub use tether_proto::ktls::{Cipher, CIPHERS};

/// ULP, then `TLS_TX` with `cipher`, on a fresh pair.
pub fn probe_cipher(cipher: Cipher) -> io::Result<()> {
    let (c, _s) = tcp_pair()?;
    attach_ulp(&c)?;
    sys::set_raw_sockopt(
        &c,
        sys::SOL_TLS,
        sys::TLS_TX,
        &cipher.probe_crypto_info(0x5a),
    )
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::ENOPROTOOPT) => "ENOPROTOOPT",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EBUSY) => "EBUSY",
        Some(libc::ENOTCONN) => "ENOTCONN",
        _ => return e.to_string(),
    }
    .to_owned()
}

const KTLS_FIX: &str = "modprobe tls (the kernel needs CONFIG_TLS=m or =y; Debian's stock kernels have it), \
     and install packaging/modules-load.d/tls.conf as /etc/modules-load.d/tls.conf so it loads at boot";

fn ktls_finding(ulp: &io::Result<()>, env: &dyn Env) -> Finding {
    const C: &str = "ktls";
    match ulp {
        Ok(()) => Finding::ok(
            C,
            "kernel TLS available: setsockopt(TCP_ULP, \"tls\") works on a TCP socket",
        ),
        Err(e) => {
            let detail = format!(
                "kernel TLS missing: setsockopt(TCP_ULP, \"tls\") failed with {}; tether falls back to its \
                 userspace TLS relay (same security, more CPU, no zero-copy sendfile)",
                errno_name(e)
            );
            let forced = env.var("TETHER_MODE").is_some_and(|m| m == "ktls");
            if forced {
                Finding::fail(
                    C,
                    format!("{detail}; TETHER_MODE=ktls is set, so protected connections fail"),
                    KTLS_FIX,
                )
            } else {
                Finding::warn(C, detail, KTLS_FIX)
            }
        }
    }
}

/// Where the tls module is: loaded, built in, available on disk, or nowhere.
fn module_finding(ulp: &io::Result<()>) -> Finding {
    const C: &str = "ktls-module";
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    if Path::new("/sys/module/tls").exists() {
        return if Path::new("/sys/module/tls/initstate").exists() {
            Finding::ok(C, "the tls module is loaded")
        } else {
            Finding::ok(C, "tls is built into the kernel")
        };
    }
    if ulp.is_ok() {
        return Finding::ok(
            C,
            "the tls ULP works (module state not visible in /sys/module)",
        );
    }
    let on_disk = ["ko", "ko.xz", "ko.zst", "ko.gz"]
        .iter()
        .map(|ext| PathBuf::from(format!("/lib/modules/{release}/kernel/net/tls/tls.{ext}")))
        .find(|p| p.exists());
    if let Some(p) = on_disk {
        return Finding::warn(
            C,
            format!("the tls module is not loaded ({} exists)", p.display()),
            KTLS_FIX,
        );
    }
    let config = fs::read_to_string(format!("/boot/config-{release}"))
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("CONFIG_TLS=") || l.starts_with("# CONFIG_TLS is not set"))
                .map(str::to_owned)
        });
    let why = config.map(|l| format!(" ({l})")).unwrap_or_default();
    Finding::warn(
        C,
        format!("no tls module for kernel {release}: not loaded, not built in, not in /lib/modules{why}"),
        "boot a kernel built with CONFIG_TLS=m or =y (e.g. Debian's linux-image-amd64); until then tether uses userspace TLS",
    )
}

fn ciphers_finding(ulp: &io::Result<()>) -> Finding {
    const C: &str = "ktls-ciphers";
    if ulp.is_err() {
        return Finding::warn(C, "not tested: no kernel TLS", "see the ktls check");
    }
    let mut works = Vec::new();
    let mut broken = Vec::new();
    for c in CIPHERS {
        match probe_cipher(c) {
            Ok(()) => works.push(c.name),
            Err(e) => broken.push(format!("{} ({})", c.name, errno_name(&e))),
        }
    }
    if broken.is_empty() {
        Finding::ok(
            C,
            format!("TLS 1.3 TLS_TX accepted for {}", works.join(", ")),
        )
    } else {
        let listed = if works.is_empty() {
            "none".to_owned()
        } else {
            works.join(", ")
        };
        Finding::warn(
            C,
            format!("kernel accepts {listed}; refuses {}: connections negotiating those use userspace TLS", broken.join(", ")),
            "load the crypto modules (modprobe gcm ctr ghash-generic chacha20poly1305) or use a kernel with them",
        )
    }
}

// ---- rekey -------------------------------------------------------------------------------------

/// What a rekey probe found.
#[derive(Debug)]
enum Rekey {
    /// Both second setsockopts worked, data arrived intact, both counters rose: the detail.
    Supported(String),
    /// The kernel refused the second `TLS_TX` (EBUSY before Linux 6.14).
    Unsupported(io::Error),
    /// The kernel accepted a rekey and then got something wrong.
    Broken(String),
}

/// Client `TLS_TX` / server `TLS_RX` with one AES-GCM-128 key, a message, a second key on both,
/// another message.
fn probe_rekey() -> io::Result<Rekey> {
    let aes = CIPHERS[0];
    let (mut c, mut s) = tcp_pair()?;
    attach_ulp(&c)?;
    attach_ulp(&s)?;
    sys::set_raw_sockopt(&c, sys::SOL_TLS, sys::TLS_TX, &aes.probe_crypto_info(0x31))?;
    sys::set_raw_sockopt(&s, sys::SOL_TLS, TLS_RX, &aes.probe_crypto_info(0x31))?;
    let first = b"tether doctor rekey probe: first key";
    c.write_all(first)?;
    if !read_matches(&mut s, first)? {
        return Ok(Rekey::Broken(
            "data under the first key arrived garbled".into(),
        ));
    }
    let before = tls_stat();
    let new = aes.probe_crypto_info(0x47);
    if let Err(e) = sys::set_raw_sockopt(&c, sys::SOL_TLS, sys::TLS_TX, &new) {
        return Ok(Rekey::Unsupported(e));
    }
    if let Err(e) = sys::set_raw_sockopt(&s, sys::SOL_TLS, TLS_RX, &new) {
        return Ok(Rekey::Broken(format!(
            "a second TLS_TX was accepted but a second TLS_RX failed with {}",
            errno_name(&e)
        )));
    }
    let second = b"tether doctor rekey probe: second key, longer";
    c.write_all(second)?;
    if !read_matches(&mut s, second)? {
        return Ok(Rekey::Broken(
            "data under the new key arrived garbled".into(),
        ));
    }
    let after = tls_stat();
    let mut counted = Vec::new();
    for name in ["TlsTxRekeyOk", "TlsRxRekeyOk"] {
        match (counter(&before, name), counter(&after, name)) {
            (Some(a), Some(b)) if b > a => counted.push(format!("{name} {a}->{b}")),
            (a, b) => {
                return Ok(Rekey::Broken(format!(
                    "rekey accepted but /proc/net/tls_stat {name} did not rise ({a:?} -> {b:?})"
                )))
            }
        }
    }
    Ok(Rekey::Supported(counted.join(", ")))
}

fn read_matches(s: &mut TcpStream, want: &[u8]) -> io::Result<bool> {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got)?;
    Ok(got == want)
}

/// `/proc/net/tls_stat` as `(name, value)` rows; empty when unreadable.
fn tls_stat() -> Vec<(String, u64)> {
    fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn counter(rows: &[(String, u64)], name: &str) -> Option<u64> {
    rows.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
}

fn rekey_finding(ulp: &io::Result<()>) -> Finding {
    const C: &str = "ktls-rekey";
    if ulp.is_err() {
        return Finding::warn(C, "not tested: no kernel TLS", "see the ktls check");
    }
    match probe_rekey() {
        Ok(Rekey::Supported(counts)) => Finding::ok(
            C,
            format!("kernel rekeys kTLS: a second TLS_TX and TLS_RX on an established pair worked, data intact ({counts})"),
        ),
        Ok(Rekey::Unsupported(e)) => Finding::warn(
            C,
            format!(
                "kTLS rekey: unsupported (kernel {}), peers that send KeyUpdate will be reset \
                 (kernel cannot rekey kTLS: a second TLS_TX failed with {})",
                fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
                errno_name(&e)
            ),
            "Linux 6.14 or newer rekeys kTLS (needed only if peers send KeyUpdate, e.g. long-lived OpenSSL \
             connections); rules with key_update_after use the userspace relay on this kernel",
        ),
        Ok(Rekey::Broken(why)) => Finding::fail(
            C,
            format!("kernel TLS rekey is broken: {why}"),
            "use a kernel whose kTLS passes scripts/ktls-vm --self-check, or TETHER_MODE=userspace",
        ),
        Err(e) => Finding::warn(
            C,
            format!("not tested: the probe failed before the rekey ({})", errno_name(&e)),
            "see the ktls-ciphers check",
        ),
    }
}

// ---- TLS_RX_EXPECT_NO_PAD ----------------------------------------------------------------------

/// `setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)` on a socket with a TLS 1.3 `TLS_RX` key.
fn probe_no_pad() -> io::Result<io::Result<()>> {
    let (_c, s) = tcp_pair()?;
    attach_ulp(&s)?;
    sys::set_raw_sockopt(
        &s,
        sys::SOL_TLS,
        TLS_RX,
        &CIPHERS[0].probe_crypto_info(0x29),
    )?;
    Ok(sys::set_raw_sockopt(
        &s,
        sys::SOL_TLS,
        TLS_RX_EXPECT_NO_PAD,
        &1u32.to_ne_bytes(),
    ))
}

fn no_pad_finding(ulp: &io::Result<()>) -> Finding {
    const C: &str = "ktls-no-pad";
    if ulp.is_err() {
        return Finding::warn(C, "not tested: no kernel TLS", "see the ktls check");
    }
    match probe_no_pad() {
        Ok(Ok(())) => Finding::ok(
            C,
            "TLS_RX_EXPECT_NO_PAD accepted: the kernel can decrypt TLS 1.3 records straight into the reader's buffer",
        ),
        Ok(Err(e)) => Finding::warn(
            C,
            format!("TLS_RX_EXPECT_NO_PAD refused ({}): kTLS reads take an extra copy", errno_name(&e)),
            "Linux 6.0 or newer has TLS_RX_EXPECT_NO_PAD",
        ),
        Err(e) => Finding::warn(
            C,
            format!("not tested: TLS_RX setup failed ({})", errno_name(&e)),
            "see the ktls-ciphers check",
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rekey_crypto_info_differs_from_the_first_key_but_not_in_layout() {
        let (a, b) = (
            CIPHERS[0].probe_crypto_info(0x31),
            CIPHERS[0].probe_crypto_info(0x47),
        );
        assert_eq!(a.len(), b.len());
        assert_eq!(
            a[..4],
            b[..4],
            "same version and cipher: the kernel requires that on rekey"
        );
        assert_ne!(a, b);
        assert_eq!(
            a[a.len() - 8..],
            [0; 8],
            "rec_seq starts at 0 under a new key"
        );
    }

    #[test]
    fn tls_stat_counters_parse() {
        let rows = vec![("TlsTxRekeyOk".to_owned(), 3), ("TlsRxSw".to_owned(), 1)];
        assert_eq!(counter(&rows, "TlsTxRekeyOk"), Some(3));
        assert_eq!(counter(&rows, "TlsRxRekeyOk"), None);
    }
}
