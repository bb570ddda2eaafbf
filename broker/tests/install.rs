//! `tether install --host-wide` / `--uninstall` and `enable-unit` / `disable-unit`.
//!
//! Every test works inside a temporary `--root`, except `real_etc_path_inside_a_mount_namespace`,
//! which runs the `/etc` code path in a private mount namespace with a copy of /etc bind-mounted
//! over it. None of them may touch this machine's /etc/ld.so.preload: each test checks it is
//! byte-for-byte (or in absence) unchanged afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::{built_lib, Daemon, TempDir, TETHER};

const LIB: &str = "/usr/lib/tether/libtether.so";

/// The real /etc/ld.so.preload: its bytes, or None when absent.
fn real_preload() -> Option<Vec<u8>> {
    fs::read("/etc/ld.so.preload").ok()
}

/// Asserts on drop that the real /etc/ld.so.preload did not change.
struct RealPreloadUntouched(Option<Vec<u8>>);

impl RealPreloadUntouched {
    fn new() -> Self {
        Self(real_preload())
    }
}

impl Drop for RealPreloadUntouched {
    fn drop(&mut self) {
        assert_eq!(
            real_preload(),
            self.0,
            "the real /etc/ld.so.preload changed!"
        );
    }
}

/// A temp root with the library at /usr/lib/tether/libtether.so (root-owned, 0644, dirs 0755).
fn root_with_lib(tag: &str) -> TempDir {
    let root = TempDir::new(tag);
    let dir = root.path().join("usr/lib/tether");
    fs::create_dir_all(&dir).unwrap();
    for d in ["usr", "usr/lib", "usr/lib/tether"] {
        fs::set_permissions(root.path().join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::create_dir_all(root.path().join("etc")).unwrap();
    let lib = dir.join("libtether.so");
    fs::copy(built_lib(), &lib).unwrap();
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o644)).unwrap();
    root
}

fn tether(args: &[&str]) -> Output {
    Command::new(TETHER)
        .args(args)
        .env_remove("TETHER_LIB")
        .output()
        .unwrap()
}

fn install(root: &TempDir, socket: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "install",
        "--host-wide",
        "--root",
        root.path().to_str().unwrap(),
        "--lib",
        LIB,
    ];
    args.extend(["--socket", socket.to_str().unwrap()]);
    args.extend_from_slice(extra);
    tether(&args)
}

fn uninstall(root: &TempDir) -> Output {
    tether(&[
        "install",
        "--uninstall",
        "--root",
        root.path().to_str().unwrap(),
    ])
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn preload(root: &TempDir) -> Option<String> {
    fs::read_to_string(root.path().join("etc/ld.so.preload")).ok()
}

#[test]
fn install_is_idempotent_and_uninstall_keeps_other_entries() {
    let _guard = RealPreloadUntouched::new();
    let d = Daemon::start(&[]);
    let root = root_with_lib("inst-happy");
    fs::create_dir_all(root.path().join("opt")).unwrap();
    fs::write(root.path().join("opt/other.so"), b"x").unwrap();
    fs::write(root.path().join("etc/ld.so.preload"), "/opt/other.so\n").unwrap();

    let o = install(&root, &d.socket, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("host-wide mode ON"), "{}", text(&o));
    assert_eq!(preload(&root).unwrap(), format!("/opt/other.so\n{LIB}\n"));
    let md = fs::metadata(root.path().join("etc/ld.so.preload")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
    // No temp file left behind.
    assert_eq!(fs::read_dir(root.path().join("etc")).unwrap().count(), 1);

    let o = install(&root, &d.socket, &[]);
    assert!(
        o.status.success() && text(&o).contains("already on"),
        "{}",
        text(&o)
    );
    assert_eq!(preload(&root).unwrap(), format!("/opt/other.so\n{LIB}\n"));

    let o = uninstall(&root);
    assert!(
        o.status.success() && text(&o).contains("host-wide mode off"),
        "{}",
        text(&o)
    );
    assert_eq!(preload(&root).unwrap(), "/opt/other.so\n");
    let o = uninstall(&root);
    assert!(
        o.status.success() && text(&o).contains("already off"),
        "{}",
        text(&o)
    );

    // Alone in the file: uninstall removes the file it created.
    fs::remove_file(root.path().join("etc/ld.so.preload")).unwrap();
    assert!(install(&root, &d.socket, &[]).status.success());
    assert_eq!(preload(&root).unwrap(), format!("{LIB}\n"));
    assert!(uninstall(&root).status.success());
    assert_eq!(preload(&root), None);

    // The doctor agrees with what install did.
    assert!(install(&root, &d.socket, &[]).status.success());
    let o = tether(&[
        "doctor",
        "--socket",
        d.socket.to_str().unwrap(),
        "--root",
        root.path().to_str().unwrap(),
    ]);
    assert!(text(&o).contains("host-wide mode ON"), "{}", text(&o));
}

/// Each guard refuses with its reason, and leaves ld.so.preload exactly as it was.
#[test]
fn install_refuses_unsafe_libraries_old_glibc_and_a_silent_tetherd() {
    let _guard = RealPreloadUntouched::new();
    let d = Daemon::start(&[]);
    let before = "/opt/keep.so\n";
    let refused = |root: &TempDir, socket: &Path, extra: &[&str], why: &str| {
        fs::write(root.path().join("etc/ld.so.preload"), before).unwrap();
        let o = install(root, socket, extra);
        assert!(
            !o.status.success(),
            "installed although {why}: {}",
            text(&o)
        );
        assert!(text(&o).contains(why), "expected {why:?} in: {}", text(&o));
        assert_eq!(
            preload(root).unwrap(),
            before,
            "a refused install changed the file"
        );
    };

    // The library is missing.
    let root = root_with_lib("inst-missing");
    fs::remove_file(root.path().join(&LIB[1..])).unwrap();
    refused(&root, &d.socket, &[], "does not exist");

    // Not an ELF file; an ELF executable, not a shared object; a shared object without our hooks.
    let root = root_with_lib("inst-notelf");
    let lib = root.path().join(&LIB[1..]);
    fs::write(&lib, "#!/bin/sh\n").unwrap();
    refused(&root, &d.socket, &[], "not an ELF file");
    fs::copy("/bin/sh", &lib).unwrap();
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o644)).unwrap();
    refused(&root, &d.socket, &[], "not an ELF shared object");

    // Built for a newer glibc than the host has: rewrite its newest GLIBC_2.N need to 9.N.
    let root = root_with_lib("inst-glibc");
    let lib = root.path().join(&LIB[1..]);
    let need = tether_broker::elf::inspect(&lib)
        .unwrap()
        .max_glibc()
        .unwrap();
    let (from, to) = (
        format!("GLIBC_{need}\0"),
        format!("GLIBC_9{}\0", &need.to_string()[1..]),
    );
    let mut bytes = fs::read(&lib).unwrap();
    let mut n = 0;
    for i in 0..bytes.len() - from.len() {
        if bytes[i..].starts_with(from.as_bytes()) {
            bytes[i..i + to.len()].copy_from_slice(to.as_bytes());
            n += 1;
        }
    }
    assert!(n > 0);
    fs::write(&lib, bytes).unwrap();
    refused(&root, &d.socket, &[], "but the host has glibc");

    // tetherd is not answering (--force overrides only this guard).
    let root = root_with_lib("inst-nobroker");
    let gone = root.path().join("gone.sock");
    refused(&root, &gone, &[], "tetherd is not answering");
    let o = install(&root, &gone, &["--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(preload(&root).unwrap(), format!("{before}{LIB}\n"));

    // Not root-owned; writable by group; in a directory others can write to.
    let root = root_with_lib("inst-perms");
    let lib = root.path().join(&LIB[1..]);
    std::os::unix::fs::chown(&lib, Some(common::NOBODY_UID), None).unwrap();
    refused(
        &root,
        &d.socket,
        &["--force"],
        "owned by uid 65534, not root",
    );
    std::os::unix::fs::chown(&lib, Some(0), None).unwrap();
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o664)).unwrap();
    refused(
        &root,
        &d.socket,
        &["--force"],
        "writable by group or others",
    );
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(lib.parent().unwrap(), fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        &root,
        &d.socket,
        &["--force"],
        "writable by group or others",
    );
    fs::set_permissions(lib.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(install(&root, &d.socket, &[]).status.success());

    // A relative --lib.
    let root = root_with_lib("inst-relative");
    fs::write(root.path().join("etc/ld.so.preload"), before).unwrap();
    let o = tether(&[
        "install",
        "--host-wide",
        "--root",
        root.path().to_str().unwrap(),
        "--lib",
        "libtether.so",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("absolute"),
        "{}",
        text(&o)
    );
}

/// The real-/etc code path (`--root /`), run where /etc is a bind-mounted copy: a private mount
/// namespace that exists only for this test. The script proves it sees the copy (a marker file)
/// before installing; the real /etc/ld.so.preload is compared before and after.
#[test]
fn real_etc_path_inside_a_mount_namespace() {
    if !nix_root() {
        eprintln!("skipped: needs root for unshare --mount");
        return;
    }
    let guard = RealPreloadUntouched::new();
    let d = Daemon::start(&[]);
    let work = TempDir::new("inst-ns");
    let etc = work.path().join("etc");
    let ok = Command::new("cp")
        .arg("-a")
        .arg("/etc/.")
        .arg(&etc)
        .status()
        .unwrap();
    assert!(ok.success());
    let marker = format!(".tether-test-copy-{}", std::process::id());
    fs::write(etc.join(&marker), b"").unwrap();
    let lib_dir = work.path().join("lib");
    fs::create_dir_all(&lib_dir).unwrap();
    let lib = lib_dir.join("libtether.so");
    fs::copy(built_lib(), &lib).unwrap();
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o644)).unwrap();
    let out = work.path().join("out");
    fs::create_dir_all(&out).unwrap();

    let script = r#"set -eu
etc_copy=$1 marker=$2 tether=$3 lib=$4 sock=$5 out=$6
mount --bind "$etc_copy" /etc
# Refuse to go on unless /etc is now the copy.
test -e "/etc/$marker"
"$tether" install --host-wide --root / --lib "$lib" --socket "$sock" >"$out/install.txt"
cat /etc/ld.so.preload >"$out/after-install"
# Every program started now loads libtether (cat above did too); running tether itself still works.
"$tether" install --uninstall --root / >"$out/uninstall.txt"
if [ -e /etc/ld.so.preload ]; then cat /etc/ld.so.preload >"$out/after-uninstall"; fi
"#;
    let st = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&etc)
        .arg(&marker)
        .arg(TETHER)
        .arg(&lib)
        .arg(&d.socket)
        .arg(&out)
        .env_remove("TETHER_LIB")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "namespace script failed: {}",
        text(&st)
    );
    let installed = fs::read_to_string(out.join("after-install")).unwrap();
    let orig = guard
        .0
        .clone()
        .map(|b| String::from_utf8(b).unwrap())
        .unwrap_or_default();
    assert!(
        installed.ends_with(&format!("{}\n", lib.display())),
        "{installed}"
    );
    assert!(
        installed.starts_with(&orig),
        "other entries kept: {installed}"
    );
    let after = fs::read_to_string(out.join("after-uninstall")).ok();
    assert_eq!(
        after.unwrap_or_default(),
        orig,
        "uninstall restored the copy"
    );
    // The copy, not the real file, was written.
    assert_eq!(fs::read(etc.join("ld.so.preload")).ok(), guard.0);
    drop(guard); // asserts the real /etc/ld.so.preload is unchanged
}

fn nix_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn enable_unit_writes_a_dropin_and_disable_unit_removes_it() {
    let root = TempDir::new("unit");
    let r = root.path().to_str().unwrap();
    let o = tether(&[
        "enable-unit",
        "nginx",
        "--root",
        r,
        "--lib",
        LIB,
        "--socket",
        "/run/tether/tetherd.sock",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("systemctl daemon-reload && systemctl restart nginx.service"),
        "{}",
        text(&o)
    );
    let path = root
        .path()
        .join("etc/systemd/system/nginx.service.d/tether.conf");
    let conf = fs::read_to_string(&path).unwrap();
    assert!(conf.contains(&format!("[Service]\nEnvironment=LD_PRELOAD={LIB}\nEnvironment=TETHER_SOCKET=/run/tether/tetherd.sock\n")), "{conf}");
    assert!(
        conf.contains("[Unit]\nWants=tetherd.service\nAfter=tetherd.service\n"),
        "{conf}"
    );
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);

    // Rewriting is fine (atomic replace); NAME.service is accepted too.
    let o = tether(&[
        "enable-unit",
        "nginx.service",
        "--root",
        r,
        "--lib",
        LIB,
        "--socket",
        "/run/t.sock",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(fs::read_to_string(&path)
        .unwrap()
        .contains("TETHER_SOCKET=/run/t.sock"));

    for bad in ["../../etc/passwd", "a/b", ""] {
        let o = tether(&["enable-unit", bad, "--root", r, "--lib", LIB]);
        assert!(!o.status.success(), "{bad:?} accepted");
    }
    let o = tether(&["enable-unit", "x", "--root", r, "--lib", "relative.so"]);
    assert!(
        !o.status.success() && text(&o).contains("absolute"),
        "{}",
        text(&o)
    );

    let o = tether(&["disable-unit", "nginx", "--root", r]);
    assert!(
        o.status.success() && text(&o).contains("removed"),
        "{}",
        text(&o)
    );
    assert!(
        !path.parent().unwrap().exists(),
        "empty drop-in dir removed"
    );
    let o = tether(&["disable-unit", "nginx", "--root", r]);
    assert!(
        o.status.success() && text(&o).contains("no tether drop-in"),
        "{}",
        text(&o)
    );
}
