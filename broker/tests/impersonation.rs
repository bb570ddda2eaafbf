//! Impersonating a path-selected identity: a user runs the genuine registered binary (here a
//! copy of the `tether` CLI, whose `tether svid` asks for its own SVID) with its own code
//! preloaded, under ptrace, or with another binary bind-mounted over the registered path.
//! Each used to get the entry's identity; each is refused now. The control run is not.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Daemon, TempDir, NOBODY_UID, TETHER};

const ID: &str = "spiffe://tether.internal/genuine";

struct Setup {
    d: Daemon,
    _dir: TempDir,
    genuine: PathBuf,
    /// A root-owned copy of the same program at another inode.
    other: PathBuf,
    /// A copy of libz owned by nobody: what an impersonator preloads.
    lib: PathBuf,
}

fn setup(uid: u32, extra: &str) -> Setup {
    let dir = TempDir::new("h10a-imp");
    let genuine = dir.path().join("genuine-tether");
    let other = dir.path().join("other-tether");
    for p in [&genuine, &other] {
        fs::copy(TETHER, p).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let home = dir.owned_subdir("home", NOBODY_UID);
    let lib = home.join("libinject.so");
    fs::copy("/lib/x86_64-linux-gnu/libz.so.1", &lib).unwrap();
    std::os::unix::fs::chown(&lib, Some(NOBODY_UID), Some(NOBODY_UID)).unwrap();
    let config = format!(
        "trust_domain = \"tether.internal\"\n\
         [[entry]]\nspiffe_id = \"{ID}\"\nselectors = [\"unix:uid:{uid}\", \"unix:path:{}\"]\n{extra}",
        genuine.display()
    );
    let d = Daemon::start_with(Some(&config), &[]);
    Setup { d, _dir: dir, genuine, other, lib }
}

fn as_nobody(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]);
    for a in args {
        c.arg(a);
    }
    c
}

fn svid_args(s: &Setup) -> Vec<String> {
    vec!["svid".into(), "--socket".into(), s.d.socket.display().to_string()]
}

fn assert_issued(out: &Output) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains(ID), "the genuine run must get {ID}: {text}");
}

fn assert_refused(out: &Output, why: &str) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the impersonator got an identity: {text}");
    assert!(!text.contains(&format!("{ID}\n")) && !text.contains("serial"), "{text}");
    assert!(text.contains("attestation_failed") && text.contains(why), "{text}");
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

#[test]
fn ld_preload_impersonation_of_a_path_selected_identity_is_refused() {
    let s = setup(NOBODY_UID, "");
    let args = svid_args(&s);
    let mut genuine = as_nobody(&[&s.genuine]);
    genuine.args(&args);
    assert_issued(&run(genuine));

    let mut injected = as_nobody(&[&s.genuine]);
    injected.args(&args).env("LD_PRELOAD", &s.lib);
    assert_refused(&run(injected), "its own user or group can write");
    assert!(s.d.log_text().contains("libinject.so"), "{}", s.d.log_text());
}

#[test]
fn ptrace_impersonation_of_a_path_selected_identity_is_refused() {
    let s = setup(NOBODY_UID, "");
    let mut traced = as_nobody(&[&"strace", &"-f", &"-o", &"/dev/null", &s.genuine]);
    traced.args(svid_args(&s));
    assert_refused(&run(traced), "is being traced");
}

#[test]
fn bind_mount_impersonation_in_a_user_and_mount_namespace_is_refused() {
    let s = setup(NOBODY_UID, "");
    let script = format!(
        "mount --bind {} {} && exec {} {}",
        s.other.display(),
        s.genuine.display(),
        s.genuine.display(),
        svid_args(&s).join(" ")
    );
    let mut c = as_nobody(&[&"unshare", &"--user", &"--mount", &"--map-root-user", &"sh", &"-c", &script]);
    c.env_remove("LD_PRELOAD");
    // Refused before the inode check is reached: in its own user namespace the process is its
    // namespace root's to fake, so no path-selected identity applies to it at all.
    assert_refused(&run(c), "user namespace other than tetherd's");
}

#[test]
fn impersonation_checks_can_be_turned_off_per_entry() {
    let s = setup(NOBODY_UID, "impersonation_checks = false\n");
    let mut traced = as_nobody(&[&"strace", &"-f", &"-o", &"/dev/null", &s.genuine]);
    traced.args(svid_args(&s));
    assert_issued(&run(traced));
}

#[test]
fn check_config_warns_about_a_path_entry_without_a_uid() {
    let dir = TempDir::new("h10a-cc");
    let cfg = dir.path().join("t.toml");
    fs::write(
        &cfg,
        "trust_domain = \"tether.internal\"\n[[entry]]\nspiffe_id = \"spiffe://tether.internal/a\"\n\
         selectors = [\"unix:path:/usr/bin/true\"]\n",
    )
    .unwrap();
    let out = Command::new(common::TETHERD).arg("--config").arg(&cfg).arg("--check-config").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("warning: entry spiffe://tether.internal/a: a path or sha256 selector without a uid"), "{text}");
}

#[test]
fn federated_bundles_for_our_own_trust_domain_are_refused_at_start() {
    let dir = TempDir::new("h10a-fed");
    let cfg = dir.path().join("t.toml");
    let pem = Path::new("/dev/null");
    fs::write(&cfg, format!("trust_domain = \"tether.internal\"\n[federated_bundles]\n\"tether.internal\" = \"{}\"\n", pem.display()))
        .unwrap();
    let out = Command::new(common::TETHERD).arg("--config").arg(&cfg).arg("--check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("our own trust domain"), "{out:?}");
}
