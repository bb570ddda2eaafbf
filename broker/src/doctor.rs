//! `tether doctor`: check what tether depends on, and say how to fix what is wrong.
//!
//! Each check yields a [`Finding`]: `ok`, `warn` (works, but degraded or unverified) or `FAIL`
//! (tether will not work, or will break programs), a one-line detail, and, when not ok, a fix.
//! The checks that `tether install --host-wide` relies on (the library file, its glibc needs,
//! tetherd answering) are public functions here so both share one definition.
//!
//! Kernel TLS is probed the way the shim uses it (see [`ktls`]): the `tls` ULP, each TLS 1.3
//! cipher, rekey of an established pair, and `TLS_RX_EXPECT_NO_PAD`.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tether_proto::wire::StatusResponse;

use crate::client::Client;
use crate::elf::{self, ElfInfo, GlibcVersion};
use crate::env::Env;
use crate::error::Error;
use crate::run::find_library;
use crate::server::now_unix;
use crate::sys;

mod ktls;

pub use ktls::{probe_cipher, probe_ulp, Cipher, CIPHERS};

/// The exports every libtether.so has; a library without them is not ours or is broken.
pub const REQUIRED_HOOKS: &[&str] = &[
    "connect", "accept", "accept4", "close", "read", "recv", "sendfile",
];
/// `/etc/ld.so.preload`, relative to the root.
pub const PRELOAD_FILE: &str = "etc/ld.so.preload";
/// How long the doctor waits for tetherd.
const BROKER_TIMEOUT: Duration = Duration::from_secs(3);

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so that `{:<4}` aligns the table.
        f.pad(match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        })
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// How to fix it; `None` when ok.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What to check.
pub struct Options<'a> {
    /// tetherd's socket.
    pub socket: PathBuf,
    /// The filesystem root holding `etc/ld.so.preload` (`/` outside tests).
    pub root: PathBuf,
    /// `--lib`, else the places `tether run` looks.
    pub lib: Option<PathBuf>,
    pub env: &'a dyn Env,
}

impl fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("socket", &self.socket)
            .field("root", &self.root)
            .field("lib", &self.lib)
            .finish()
    }
}

/// Run every check, in a fixed order.
pub fn run(o: &Options<'_>) -> Vec<Finding> {
    let mut out = ktls::findings(o.env);
    let status = tetherd_status(&o.socket);
    out.push(tetherd_finding(&o.socket, &status));
    out.push(clock_finding(&o.socket, status.is_ok()));
    out.push(preload_finding(&o.root, status.is_ok()));
    let lib = find_library(o.lib.clone(), o.env);
    let inspected = lib
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|p| inspect_library(p).map(|i| (p.clone(), i)));
    out.push(library_finding(&lib, &inspected));
    out.push(glibc_finding(&inspected));
    out
}

/// No check failed.
pub fn passed(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.status != Status::Fail)
}

/// For people: `status  check  detail`, then an indented `fix:` line when there is one.
pub fn render_text(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s.push_str(&format!("{:<4}  {:<12} {}\n", f.status, f.check, f.detail));
        if let Some(fix) = &f.fix {
            s.push_str(&format!("{:<18} fix: {fix}\n", ""));
        }
    }
    let count = |st| findings.iter().filter(|f| f.status == st).count();
    s.push_str(&format!(
        "\n{} ok, {} warn, {} FAIL\n",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    ));
    s
}

/// For tools: an array of `{check, status, detail, fix}`; status is `ok`, `warn` or `fail`.
pub fn render_json(findings: &[Finding]) -> String {
    serde_json::to_string_pretty(findings).unwrap_or_else(|_| "[]".to_owned())
}

// ---- tetherd -----------------------------------------------------------------------------------

/// A status round trip to tetherd.
pub fn tetherd_status(socket: &Path) -> Result<StatusResponse, Error> {
    Client::connect(socket, BROKER_TIMEOUT)?.status()
}

fn tetherd_finding(socket: &Path, status: &Result<StatusResponse, Error>) -> Finding {
    const C: &str = "tetherd";
    let cli = env!("CARGO_PKG_VERSION");
    match status {
        Ok(s) if s.version == cli => Finding::ok(
            C,
            format!(
                "reachable at {}: version {}, trust domain {}",
                socket.display(),
                s.version,
                s.trust_domain
            ),
        ),
        Ok(s) => Finding::warn(
            C,
            format!(
                "reachable at {}, but tetherd is version {} and this CLI {cli}",
                socket.display(),
                s.version
            ),
            "install matching versions and restart tetherd (systemctl restart tetherd)",
        ),
        Err(e) => {
            let fix = match e {
                Error::Connect { error, .. } if error.kind() == io::ErrorKind::PermissionDenied => {
                    "the socket is not accessible to this user: tetherd makes it 0666; check the directory's permissions"
                        .to_owned()
                }
                _ => format!(
                    "start it: systemctl start tetherd (or tetherd --socket {}); if it runs elsewhere pass --socket or set $TETHER_SOCKET",
                    socket.display()
                ),
            };
            let why = match e {
                Error::Connect { error, .. } => error.to_string(),
                other => other.to_string(),
            };
            Finding::fail(
                C,
                format!("not answering at {}: {why}", socket.display()),
                fix,
            )
        }
    }
}

// ---- clock -------------------------------------------------------------------------------------

fn clock_finding(socket: &Path, broker_up: bool) -> Finding {
    const C: &str = "clock";
    let now = now_unix();
    let date = civil_date(now);
    // 2024-01-01 and 2200-01-01.
    if !(1_704_067_200..7_258_118_400).contains(&now) {
        return Finding::fail(
            C,
            format!(
                "system clock reads {date}, which is not plausible: certificates will not validate"
            ),
            "set the clock (timedatectl set-ntp true, or chronyc makestep), then restart tetherd",
        );
    }
    let ntp = ntp_synchronized();
    let mut detail = format!("system clock {date}");
    if broker_up {
        match Client::connect(socket, BROKER_TIMEOUT).and_then(|mut c| c.fetch_svid()) {
            Ok(svid) if svid.not_before <= now && now < svid.not_after => {
                detail.push_str(&format!(
                    "; an SVID fetched now is valid (not_before {}, not_after {})",
                    civil_date(svid.not_before),
                    civil_date(svid.not_after)
                ));
            }
            Ok(svid) => {
                return Finding::fail(
                    C,
                    format!(
                        "{detail} is outside the SVID tetherd just issued (not_before {}, not_after {}): peers will refuse it",
                        civil_date(svid.not_before),
                        civil_date(svid.not_after)
                    ),
                    "fix the clock (timedatectl set-ntp true), then restart tetherd so it re-issues",
                );
            }
            Err(e) => detail.push_str(&format!("; SVID validity not checked ({e})")),
        }
    } else {
        detail.push_str("; SVID validity not checked (tetherd not answering)");
    }
    match ntp {
        Some(true) => Finding::ok(C, format!("{detail}; NTP synchronized")),
        Some(false) => Finding::warn(
            C,
            format!("{detail}; NTP not synchronized"),
            "timedatectl set-ntp true (or run chrony/ntpd): SVIDs live an hour, so drift between hosts breaks handshakes",
        ),
        None => Finding::ok(C, format!("{detail}; NTP state unknown (timedatectl unavailable)")),
    }
}

/// `timedatectl show -p NTPSynchronized --value`, bounded to 2 s. `None` when unavailable.
fn ntp_synchronized() -> Option<bool> {
    let mut child = Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let out = child.wait_with_output().ok()?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn civil_date(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

// ---- /etc/ld.so.preload ------------------------------------------------------------------------

/// The entries of an ld.so.preload text, as the loader splits them (on blanks, tabs, newlines
/// and colons; it has no comment syntax).
pub fn preload_entries(text: &str) -> Vec<&str> {
    text.split([' ', '\t', '\n', ':', '\r'])
        .filter(|s| !s.is_empty())
        .collect()
}

/// Is this preload entry a libtether?
pub fn is_tether_entry(entry: &str) -> bool {
    Path::new(entry)
        .file_name()
        .is_some_and(|n| n == "libtether.so")
}

/// `root` joined with an absolute path from inside it.
pub fn under_root(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

fn preload_finding(root: &Path, broker_up: bool) -> Finding {
    const C: &str = "preload";
    let file = root.join(PRELOAD_FILE);
    let shown = Path::new("/").join(PRELOAD_FILE);
    let text = match fs::read_to_string(&file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Finding::ok(
                C,
                format!("host-wide mode off ({} does not exist)", shown.display()),
            )
        }
        Err(e) => {
            return Finding::fail(
                C,
                format!("cannot read {}: {e}", shown.display()),
                "check its permissions (it should be 0644 root:root)",
            )
        }
        Ok(t) => t,
    };
    let entries = preload_entries(&text);
    let missing: Vec<&str> = entries
        .iter()
        .copied()
        .filter(|e| !under_root(root, Path::new(e)).exists())
        .collect();
    let ours: Vec<&str> = entries
        .iter()
        .copied()
        .filter(|e| is_tether_entry(e))
        .collect();
    if !missing.is_empty() {
        return Finding::fail(
            C,
            format!(
                "{} lists {} that do not exist: every program prints \"cannot be preloaded\"",
                shown.display(),
                missing.join(", ")
            ),
            "remove those entries (tether install --uninstall removes libtether's), or restore the files",
        );
    }
    match ours.as_slice() {
        [] => Finding::ok(C, format!("host-wide mode off ({} lists {} other entries)", shown.display(), entries.len())),
        [lib] if broker_up => Finding::ok(C, format!("host-wide mode ON: {} preloads {lib}", shown.display())),
        [lib] => Finding::fail(
            C,
            format!("host-wide mode ON ({lib}) but tetherd is not answering: protected connections fail closed"),
            "start tetherd (systemctl start tetherd), or turn host-wide mode off: tether install --uninstall",
        ),
        many => Finding::warn(
            C,
            format!("{} lists libtether more than once: {}", shown.display(), many.join(", ")),
            "tether install --uninstall, then tether install --host-wide once",
        ),
    }
}

// ---- the library -------------------------------------------------------------------------------

/// Check that `path` is a shared object for this machine exporting tether's hooks.
pub fn inspect_library(path: &Path) -> Result<ElfInfo, String> {
    let info = elf::inspect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !info.is_shared_object() || info.has_interp {
        return Err(format!("{} is not an ELF shared object", path.display()));
    }
    if info.machine != elf::HOST_MACHINE {
        return Err(format!(
            "{} is for another machine (e_machine {})",
            path.display(),
            info.machine
        ));
    }
    let missing: Vec<&str> = REQUIRED_HOOKS
        .iter()
        .copied()
        .filter(|s| !info.exports(s))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} does not export {} (not libtether.so?)",
            path.display(),
            missing.join(", ")
        ));
    }
    Ok(info)
}

/// Why a file that root will load into every program is unsafe: not root-owned, or writable
/// by group/others, or inside a directory that someone other than root can change (a sticky
/// directory such as /tmp only lets owners rename, so it is accepted). `None` when safe.
pub fn insecure_path(path: &Path) -> Option<String> {
    let mut p = Some(path);
    let mut first = true;
    while let Some(cur) = p {
        let md = match fs::symlink_metadata(cur) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", cur.display())),
        };
        let mode = md.mode();
        if md.uid() != 0 {
            return Some(format!(
                "{} is owned by uid {}, not root",
                cur.display(),
                md.uid()
            ));
        }
        let writable = mode & 0o022 != 0;
        let sticky_dir = md.is_dir() && mode & 0o1000 != 0;
        if writable && (first || !sticky_dir) && !md.file_type().is_symlink() {
            return Some(format!(
                "{} is writable by group or others (mode {:o})",
                cur.display(),
                mode & 0o7777
            ));
        }
        first = false;
        p = cur.parent();
    }
    None
}

fn library_finding(
    lib: &Result<PathBuf, String>,
    inspected: &Result<(PathBuf, ElfInfo), String>,
) -> Finding {
    const C: &str = "library";
    let path = match lib {
        Ok(p) => p,
        Err(e) => {
            return Finding::fail(
                C,
                e.clone(),
                "install the package (it puts it at /usr/lib/tether/libtether.so), build it (cargo build --workspace), or pass --lib",
            )
        }
    };
    match inspected {
        Err(e) => Finding::fail(
            C,
            e.clone(),
            "rebuild or reinstall libtether.so (cargo build --workspace, or reinstall the package)",
        ),
        Ok((_, info)) => {
            let detail = format!(
                "{}: ELF shared object exporting {}",
                path.display(),
                REQUIRED_HOOKS.join(" ")
            );
            match insecure_path(path) {
                None => Finding::ok(C, detail),
                Some(why) => Finding::warn(
                    C,
                    format!("{detail} ({} exports); but {why}", info.exports.len()),
                    "host-wide mode needs a root-owned library not writable by others: install it under /usr/lib/tether (chown root:root, chmod 0644)",
                ),
            }
        }
    }
}

/// The running glibc's version.
pub fn host_glibc() -> Option<GlibcVersion> {
    sys::glibc_version().parse().ok()
}

/// The library's newest `GLIBC_x.y` need, compared with the host's. `Err` says why it cannot load.
pub fn glibc_compatible(path: &Path, info: &ElfInfo) -> Result<String, String> {
    let host = host_glibc().ok_or_else(|| {
        format!(
            "cannot tell the host's glibc version ({:?})",
            sys::glibc_version()
        )
    })?;
    match info.max_glibc() {
        None => Ok(format!(
            "host glibc {host}; {} needs no versioned glibc symbols",
            path.display()
        )),
        Some(need) if need <= host => Ok(format!(
            "host glibc {host} >= {need}, the newest version {} needs (.gnu.version_r)",
            path.display()
        )),
        Some(need) => Err(format!(
            "{} needs GLIBC_{need} but the host has glibc {host}: the loader would refuse it",
            path.display()
        )),
    }
}

fn glibc_finding(inspected: &Result<(PathBuf, ElfInfo), String>) -> Finding {
    const C: &str = "glibc";
    let Ok((path, info)) = inspected else {
        let host = sys::glibc_version();
        return Finding::warn(
            C,
            format!("host glibc {host}; library not checked"),
            "see the library check",
        );
    };
    match glibc_compatible(path, info) {
        Ok(d) => Finding::ok(C, d),
        Err(d) => Finding::fail(
            C,
            d,
            "build libtether.so on the oldest glibc you deploy to (or install the package built for this distribution release)",
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn preload_entries_split_like_the_loader() {
        let t = "/a/libx.so /usr/lib/tether/libtether.so\n\n/b.so:/c.so\t/d.so\n";
        assert_eq!(
            preload_entries(t),
            [
                "/a/libx.so",
                "/usr/lib/tether/libtether.so",
                "/b.so",
                "/c.so",
                "/d.so"
            ]
        );
        assert!(is_tether_entry("/usr/lib/tether/libtether.so"));
        assert!(!is_tether_entry("/usr/lib/libtether.so.1"));
    }

    #[test]
    fn under_root_keeps_absolute_paths_inside() {
        assert_eq!(
            under_root(Path::new("/tmp/r"), Path::new("/etc/x")),
            PathBuf::from("/tmp/r/etc/x")
        );
        assert_eq!(
            under_root(Path::new("/"), Path::new("/etc/x")),
            PathBuf::from("/etc/x")
        );
    }

    #[test]
    fn the_host_glibc_is_known() {
        let v = host_glibc().unwrap();
        assert!(v >= "2.17".parse().unwrap());
    }

    #[test]
    fn world_writable_files_are_insecure() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tether-doctor-perm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.join("lib.so");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        if nix_is_root() {
            assert_eq!(insecure_path(&f), None);
        }
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(insecure_path(&f).is_some());
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(insecure_path(&f).unwrap().contains("writable"));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn nix_is_root() -> bool {
        fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }
}
