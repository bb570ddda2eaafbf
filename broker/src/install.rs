//! Putting programs under tether without `tether run`:
//!
//! - host-wide: `tether install --host-wide` adds libtether.so to `/etc/ld.so.preload`, so
//!   every dynamically linked program on the host loads it; `--uninstall` removes it.
//! - per service: `tether enable-unit NAME` writes a systemd drop-in setting `LD_PRELOAD` and
//!   `TETHER_SOCKET` for one unit; `disable-unit` removes it.
//!
//! A broken `/etc/ld.so.preload` breaks every program on the host, so installing refuses,
//! before touching anything, unless: the library is a shared object for this machine that
//! exports tether's hooks; the host's glibc is new enough for it; tetherd answers (without it
//! every protected connection fails closed; `--force` skips only this guard); and the library
//! and its directories are root-owned and not writable by others (a writable preload library is
//! a root compromise). Files are replaced atomically (temp file in the same directory, fsync,
//! chmod, rename, fsync of the directory), so a crash leaves the old file or the new one.
//!
//! Every path is taken inside `root` (`/` outside tests): `--lib /usr/lib/tether/libtether.so
//! --root /tmp/r` checks `/tmp/r/usr/lib/tether/libtether.so` and writes
//! `/usr/lib/tether/libtether.so` into `/tmp/r/etc/ld.so.preload`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::doctor::{self, is_tether_entry, preload_entries, under_root, PRELOAD_FILE};
use crate::env::Env;
use crate::files::write_atomically;
use crate::run::{find_library, INSTALLED_LIB};

/// The drop-in template shipped in `packaging/` (`@TETHER_LIB@`, `@TETHER_SOCKET@`).
pub const DROPIN_TEMPLATE: &str = include_str!("../../packaging/tether-dropin.conf.in");
/// The drop-in's file name inside `NAME.service.d/`.
pub const DROPIN_NAME: &str = "tether.conf";

/// What `install --host-wide` is asked to do.
#[derive(Debug, Clone)]
pub struct HostWide {
    pub root: PathBuf,
    /// Absolute path of the library as the host sees it (inside `root`).
    pub lib: PathBuf,
    /// tetherd's socket (on this host; not under `root`).
    pub socket: PathBuf,
    /// Install even if tetherd does not answer, and replace another libtether entry.
    pub force: bool,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Added,
    AlreadyThere,
    Removed(Vec<String>),
    NothingToRemove,
}

/// Why an install or uninstall refused or failed. The message explains what to do.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(msg.into()))
}

fn preload_path(root: &Path) -> PathBuf {
    root.join(PRELOAD_FILE)
}

/// The current text of ld.so.preload ("" when absent). Refuses a symlink: renaming over it
/// would silently replace the link instead of the file it points to.
fn read_preload(path: &Path) -> Result<Option<String>, Refused> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return refuse(format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() => {
            return refuse(format!(
                "{} is not a regular file (symlink?): edit it by hand",
                path.display()
            ))
        }
        Ok(_) => {}
    }
    fs::read_to_string(path)
        .map(Some)
        .map_err(|e| Refused(format!("cannot read {}: {e}", path.display())))
}

fn write_preload(path: &Path, text: &str) -> Result<(), Refused> {
    write_atomically(path, text.as_bytes(), 0o644)
        .map_err(|e| Refused(format!("cannot write {}: {e}", path.display())))
}

/// Every guard of the host-wide install, in order; nothing is written by this function.
pub fn check_host_wide(o: &HostWide) -> Result<(), Refused> {
    if !o.lib.is_absolute() {
        return refuse(format!(
            "--lib {} must be an absolute path",
            o.lib.display()
        ));
    }
    let on_disk = under_root(&o.root, &o.lib);
    if !on_disk.is_file() {
        return refuse(format!(
            "refusing: {} does not exist (install the package, or pass --lib)",
            on_disk.display()
        ));
    }
    let info = doctor::inspect_library(&on_disk).map_err(|e| Refused(format!("refusing: {e}")))?;
    doctor::glibc_compatible(&on_disk, &info).map_err(|e| {
        Refused(format!("refusing: {e}; every program on the host would fail to load it. Build it for this glibc"))
    })?;
    if let Some(why) = doctor::insecure_path(&on_disk) {
        return refuse(format!(
            "refusing: {why}. A preload library that others can change is a root compromise: \
             chown root:root and chmod 0644 it (and its directories 0755), e.g. install it under /usr/lib/tether"
        ));
    }
    if let Err(e) = doctor::tetherd_status(&o.socket) {
        if !o.force {
            return refuse(format!(
                "refusing: tetherd is not answering at {} ({e}); with host-wide mode on, every protected \
                 connection would fail closed. Start tetherd first (systemctl start tetherd), or pass --force",
                o.socket.display()
            ));
        }
    }
    Ok(())
}

/// Add the library to `root/etc/ld.so.preload` (idempotent), after [`check_host_wide`].
pub fn install_host_wide(o: &HostWide) -> Result<Outcome, Refused> {
    check_host_wide(o)?;
    let path = preload_path(&o.root);
    let text = read_preload(&path)?.unwrap_or_default();
    let ours = o.lib.to_string_lossy().into_owned();
    let entries = preload_entries(&text);
    if entries.iter().any(|e| *e == ours)
        && entries.iter().filter(|e| is_tether_entry(e)).count() == 1
    {
        return Ok(Outcome::AlreadyThere);
    }
    let others: Vec<&str> = entries
        .iter()
        .copied()
        .filter(|e| is_tether_entry(e) && *e != ours)
        .collect();
    if !others.is_empty() && !o.force {
        return refuse(format!(
            "refusing: {} already preloads another libtether ({}); tether install --uninstall first, or pass --force",
            path.display(),
            others.join(", ")
        ));
    }
    let kept = remove_tether_entries(&text).0;
    let mut new = kept;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&ours);
    new.push('\n');
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| Refused(format!("{}: {e}", dir.display())))?;
    }
    write_preload(&path, &new)?;
    Ok(Outcome::Added)
}

/// Remove every libtether entry from `root/etc/ld.so.preload`, keeping the others (and
/// removing the file when nothing else is left in it).
pub fn uninstall_host_wide(root: &Path) -> Result<Outcome, Refused> {
    let path = preload_path(root);
    let Some(text) = read_preload(&path)? else {
        return Ok(Outcome::NothingToRemove);
    };
    let (kept, removed) = remove_tether_entries(&text);
    if removed.is_empty() {
        return Ok(Outcome::NothingToRemove);
    }
    if preload_entries(&kept).is_empty() {
        fs::remove_file(&path)
            .map_err(|e| Refused(format!("cannot remove {}: {e}", path.display())))?;
    } else {
        write_preload(&path, &kept)?;
    }
    Ok(Outcome::Removed(removed))
}

/// `text` without libtether entries (other entries and line structure kept; lines left empty
/// are dropped), and the entries removed.
fn remove_tether_entries(text: &str) -> (String, Vec<String>) {
    let mut kept = String::new();
    let mut removed = Vec::new();
    for line in text.lines() {
        let entries = preload_entries(line);
        if !entries.iter().any(|e| is_tether_entry(e)) {
            kept.push_str(line);
            kept.push('\n');
            continue;
        }
        removed.extend(
            entries
                .iter()
                .filter(|e| is_tether_entry(e))
                .map(|e| (*e).to_owned()),
        );
        let rest: Vec<&str> = entries
            .into_iter()
            .filter(|e| !is_tether_entry(e))
            .collect();
        if !rest.is_empty() {
            kept.push_str(&rest.join(" "));
            kept.push('\n');
        }
    }
    (kept, removed)
}

/// The library to install: `--lib`; else, on the real root, where `tether run` finds it; else
/// the packaged location.
pub fn choose_lib(root: &Path, flag: Option<PathBuf>, env: &dyn Env) -> Result<PathBuf, Refused> {
    match flag {
        Some(p) => Ok(p),
        None if root == Path::new("/") => find_library(None, env).map_err(Refused),
        None => Ok(PathBuf::from(INSTALLED_LIB)),
    }
}

/// `tether install --host-wide` / `--uninstall`: do it and say what happened.
pub fn host_wide_command(o: Option<&HostWide>, root: &Path) -> Result<String, Refused> {
    let file = Path::new("/").join(PRELOAD_FILE);
    match o {
        Some(o) => Ok(match install_host_wide(o)? {
            Outcome::AlreadyThere => format!("host-wide mode already on: {} lists {}", file.display(), o.lib.display()),
            _ => format!(
                "host-wide mode ON: {} now lists {}; programs started from now on load it \
                 (running ones are unaffected). Undo with: tether install --uninstall",
                file.display(),
                o.lib.display()
            ),
        }),
        None => Ok(match uninstall_host_wide(root)? {
            Outcome::Removed(r) => format!(
                "host-wide mode off: removed {} from {}; programs started from now on do not load it",
                r.join(", "),
                file.display()
            ),
            _ => format!("host-wide mode already off: {} lists no libtether", file.display()),
        }),
    }
}

// ---- systemd drop-ins --------------------------------------------------------------------------

/// `NAME` or `NAME.service`, checked against systemd's unit name characters.
pub fn unit_name(name: &str) -> Result<String, Refused> {
    let base = name.strip_suffix(".service").unwrap_or(name);
    let ok = !base.is_empty()
        && base.len() <= 248
        && !base.starts_with('.')
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b));
    if !ok {
        return refuse(format!("{name:?} is not a systemd service name"));
    }
    Ok(format!("{base}.service"))
}

/// `root/etc/systemd/system/NAME.service.d/tether.conf`.
pub fn dropin_path(root: &Path, unit: &str) -> PathBuf {
    root.join("etc/systemd/system")
        .join(format!("{unit}.d"))
        .join(DROPIN_NAME)
}

/// The drop-in text for `lib` and `socket`.
pub fn render_dropin(lib: &Path, socket: &Path) -> String {
    DROPIN_TEMPLATE
        .replace("@TETHER_LIB@", &lib.to_string_lossy())
        .replace("@TETHER_SOCKET@", &socket.to_string_lossy())
}

/// Write the drop-in for `name`; returns its path and the commands to apply it.
pub fn enable_unit(
    root: &Path,
    name: &str,
    lib: &Path,
    socket: &Path,
) -> Result<(PathBuf, String), Refused> {
    let unit = unit_name(name)?;
    for (what, p) in [("--lib", lib), ("--socket", socket)] {
        if !p.is_absolute()
            || p.to_string_lossy()
                .contains(|c: char| c.is_whitespace() || c == '"' || c == '\\')
        {
            return refuse(format!(
                "{what} {} must be an absolute path without blanks, quotes or backslashes",
                p.display()
            ));
        }
    }
    let path = dropin_path(root, &unit);
    let dir = path.parent().unwrap_or(root);
    fs::create_dir_all(dir).map_err(|e| Refused(format!("{}: {e}", dir.display())))?;
    write_atomically(&path, render_dropin(lib, socket).as_bytes(), 0o644)
        .map_err(|e| Refused(format!("cannot write {}: {e}", path.display())))?;
    Ok((
        path,
        format!("systemctl daemon-reload && systemctl restart {unit}"),
    ))
}

/// Remove the drop-in for `name` (and its directory when empty). `Ok(None)` when there was none.
pub fn disable_unit(root: &Path, name: &str) -> Result<Option<(PathBuf, String)>, Refused> {
    let unit = unit_name(name)?;
    let path = dropin_path(root, &unit);
    match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return refuse(format!("cannot remove {}: {e}", path.display())),
        Ok(()) => {}
    }
    if let Some(dir) = path.parent() {
        let _ = fs::remove_dir(dir); // only succeeds when empty
    }
    Ok(Some((
        path,
        format!("systemctl daemon-reload && systemctl restart {unit}"),
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn removing_keeps_other_entries_and_lines() {
        let t = "/opt/a.so\n/usr/lib/tether/libtether.so\n/b.so /x/libtether.so:/c.so\n";
        let (kept, removed) = remove_tether_entries(t);
        assert_eq!(kept, "/opt/a.so\n/b.so /c.so\n");
        assert_eq!(removed, ["/usr/lib/tether/libtether.so", "/x/libtether.so"]);
        let (kept, removed) = remove_tether_entries("/opt/a.so\n");
        assert_eq!((kept.as_str(), removed.len()), ("/opt/a.so\n", 0));
    }

    #[test]
    fn unit_names_are_validated() {
        assert_eq!(unit_name("nginx").unwrap(), "nginx.service");
        assert_eq!(unit_name("foo@bar.service").unwrap(), "foo@bar.service");
        for bad in ["", "../etc", "a/b", ".hidden", "x y", "a\nb"] {
            assert!(unit_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_dropin_template_is_filled() {
        let t = render_dropin(
            Path::new("/usr/lib/tether/libtether.so"),
            Path::new("/run/tether/tetherd.sock"),
        );
        assert!(
            t.contains("Environment=LD_PRELOAD=/usr/lib/tether/libtether.so\n"),
            "{t}"
        );
        assert!(
            t.contains("Environment=TETHER_SOCKET=/run/tether/tetherd.sock\n"),
            "{t}"
        );
        assert!(t.contains("After=tetherd.service") && t.contains("Wants=tetherd.service"));
        assert!(!t.contains('@'));
    }
}
