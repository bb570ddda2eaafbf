//! `tether run -- CMD`: execute CMD with libtether.so preloaded.
//!
//! Before exec it checks that the preload can take effect: statically linked executables and
//! Go binaries never call libc's `connect`/`accept`, so LD_PRELOAD cannot interpose them and
//! their connections would silently stay plaintext. Those are refused unless the operator
//! says otherwise.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::env::Env;

/// Overrides where libtether.so is looked for.
pub const LIB_ENV: &str = "TETHER_LIB";
/// Where packages install the library.
pub const INSTALLED_LIB: &str = "/usr/lib/tether/libtether.so";

/// What an executable is, as far as interposition goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExeKind {
    /// A dynamically linked ELF using the system loader: LD_PRELOAD works.
    Dynamic,
    /// `#!` script: the interpreter (checked separately when it is a path).
    Script(PathBuf),
    /// No PT_INTERP: the loader never runs, LD_PRELOAD is ignored.
    Static,
    /// A Go binary: its net package makes raw syscalls.
    Go,
    /// Not ELF, not a script.
    Unknown,
}

impl fmt::Display for ExeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dynamic => f.write_str("dynamically linked"),
            Self::Script(i) => write!(f, "a script for {}", i.display()),
            Self::Static => f.write_str("statically linked (LD_PRELOAD cannot reach it)"),
            Self::Go => f.write_str("a Go binary (its network calls bypass libc, so LD_PRELOAD cannot reach them)"),
            Self::Unknown => f.write_str("not an ELF executable or script"),
        }
    }
}

/// Find CMD the way execvp would.
pub fn resolve(cmd: &OsStr, env: &dyn Env) -> Option<PathBuf> {
    let p = Path::new(cmd);
    if p.components().count() > 1 || cmd.as_encoded_bytes().contains(&b'/') {
        return p.is_file().then(|| p.to_owned());
    }
    let path = env.var("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(&path).map(|d| d.join(cmd)).find(|c| is_executable(c))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Classify an executable by reading its ELF headers (64- and 32-bit, either endianness).
pub fn classify(path: &Path) -> std::io::Result<ExeKind> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 256];
    let n = read_up_to(&mut f, &mut head)?;
    let head = &head[..n];
    if let Some(rest) = head.strip_prefix(b"#!") {
        let line = rest.split(|b| *b == b'\n').next().unwrap_or_default();
        let interp = String::from_utf8_lossy(line).split_whitespace().next().unwrap_or_default().to_owned();
        return Ok(ExeKind::Script(PathBuf::from(interp)));
    }
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return Ok(ExeKind::Unknown);
    }
    let elf = Elf { is64: head[4] == 2, le: head[5] == 1 };
    let (phoff, phentsize, phnum, shoff, shentsize, shnum, shstrndx) = if elf.is64 {
        (
            elf.u64(&head[32..40]),
            elf.u16(&head[54..56]),
            elf.u16(&head[56..58]),
            elf.u64(&head[40..48]),
            elf.u16(&head[58..60]),
            elf.u16(&head[60..62]),
            elf.u16(&head[62..64]),
        )
    } else {
        (
            elf.u32(&head[28..32]),
            elf.u16(&head[42..44]),
            elf.u16(&head[44..46]),
            elf.u32(&head[32..36]),
            elf.u16(&head[46..48]),
            elf.u16(&head[48..50]),
            elf.u16(&head[50..52]),
        )
    };
    // Bound what a hostile file can make us read.
    if phnum > 4096 || phentsize > 256 || shentsize > 256 {
        return Ok(ExeKind::Unknown);
    }
    let phdrs = read_at(&mut f, phoff, phentsize as usize * phnum as usize)?;
    let has_interp = phdrs.chunks_exact(phentsize.max(1) as usize).any(|ph| elf.u32(&ph[0..4]) == 3);
    // Sections: look for Go's markers.
    if shnum > 0 && (shstrndx as usize) < shnum as usize {
        let shdrs = read_at(&mut f, shoff, shentsize as usize * shnum as usize)?;
        let es = shentsize as usize;
        // (name offset, file offset, size) of section i
        let sec = |i: usize| -> (usize, u64, u64) {
            let s = &shdrs[i * es..(i + 1) * es];
            if elf.is64 {
                (elf.u32(&s[0..4]) as usize, elf.u64(&s[24..32]), elf.u64(&s[32..40]))
            } else {
                (elf.u32(&s[0..4]) as usize, elf.u32(&s[16..20]), elf.u32(&s[20..24]))
            }
        };
        let (_, off, size) = sec(shstrndx as usize);
        let strtab = read_at(&mut f, off, size.min(1 << 20) as usize)?;
        for i in 0..shnum as usize {
            let name = strtab.get(sec(i).0..).and_then(|s| s.split(|b| *b == 0).next()).unwrap_or_default();
            if name == b".go.buildinfo" || name == b".gopclntab" || name == b".note.go.buildid" {
                return Ok(ExeKind::Go);
            }
        }
    }
    Ok(if has_interp { ExeKind::Dynamic } else { ExeKind::Static })
}

struct Elf {
    is64: bool,
    le: bool,
}

impl Elf {
    fn u16(&self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    }

    fn u32(&self, b: &[u8]) -> u64 {
        let a = [b[0], b[1], b[2], b[3]];
        u64::from(if self.le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) })
    }

    fn u64(&self, b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        if self.le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn read_at(f: &mut File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(off))?;
    let mut v = vec![0u8; len];
    f.read_exact(&mut v)?;
    Ok(v)
}

/// Decide whether CMD can run under tether. Returns the resolved path, or why not.
pub fn check_interposable(cmd: &OsStr, env: &dyn Env) -> Result<PathBuf, String> {
    let path = resolve(cmd, env).ok_or_else(|| format!("{}: command not found", cmd.to_string_lossy()))?;
    let mut target = path.clone();
    for _ in 0..4 {
        let kind = classify(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        match kind {
            ExeKind::Dynamic => return Ok(path),
            ExeKind::Script(interp) => {
                // `#!/usr/bin/env python3`: the real interpreter is the next word; resolve it.
                if interp.file_name() == Some(OsStr::new("env")) {
                    let next = script_env_target(&target).unwrap_or_default();
                    target = resolve(OsStr::new(&next), env)
                        .ok_or_else(|| format!("{}: interpreter {next} not found", path.display()))?;
                } else {
                    target = interp;
                }
            }
            other => return Err(format!("{} is {other}", target.display())),
        }
    }
    Err(format!("{}: too many levels of #! interpreters", path.display()))
}

fn script_env_target(script: &Path) -> Option<String> {
    let mut f = File::open(script).ok()?;
    let mut head = [0u8; 256];
    let n = read_up_to(&mut f, &mut head).ok()?;
    let line = head[2..n].split(|b| *b == b'\n').next()?;
    let words: Vec<String> = String::from_utf8_lossy(line).split_whitespace().map(str::to_owned).collect();
    words.into_iter().skip(1).find(|w| !w.starts_with('-'))
}

/// Where libtether.so is: `--lib`, `$TETHER_LIB`, next to this executable, then the
/// installed location.
pub fn find_library(flag: Option<PathBuf>, env: &dyn Env) -> Result<PathBuf, String> {
    let candidates = flag
        .into_iter()
        .chain(env.var(LIB_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .chain(std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("libtether.so"))))
        .chain(std::iter::once(PathBuf::from(INSTALLED_LIB)));
    for c in candidates {
        if c.is_file() {
            return c.canonicalize().map_err(|e| format!("{}: {e}", c.display()));
        }
    }
    Err(format!("libtether.so not found (use --lib, ${LIB_ENV}, or install it at {INSTALLED_LIB})"))
}

/// The LD_PRELOAD value: ours first, then whatever was already there.
pub fn preload_value(lib: &Path, existing: Option<OsString>) -> OsString {
    let mut v = lib.as_os_str().to_owned();
    if let Some(e) = existing.filter(|e| !e.is_empty()) {
        v.push(":");
        v.push(e);
    }
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests

    use super::*;
    use crate::env::MapEnv;

    #[test]
    fn dynamic_executables_are_interposable() {
        let env = MapEnv::default().with("PATH", "/usr/bin:/bin");
        assert_eq!(classify(Path::new("/bin/sh")).unwrap(), ExeKind::Dynamic);
        assert!(check_interposable(OsStr::new("sh"), &env).is_ok());
    }

    #[test]
    fn scripts_are_followed_to_their_interpreter() {
        let dir = std::env::temp_dir().join(format!("tether-run-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = dir.join("s");
        std::fs::write(&s, "#!/usr/bin/env sh\necho hi\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = MapEnv::default().with("PATH", "/usr/bin:/bin");
        assert!(check_interposable(s.as_os_str(), &env).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_not_mistaken_for_an_executable() {
        let dir = std::env::temp_dir().join(format!("tether-run-garbage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let g = dir.join("g");
        let mut junk = b"\x7fELF\x02\x01".to_vec();
        junk.extend(std::iter::repeat_n(0xffu8, 100));
        std::fs::write(&g, &junk).unwrap();
        assert!(matches!(classify(&g), Ok(ExeKind::Unknown) | Err(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Static and Go binaries are refused: LD_PRELOAD cannot reach their connections.
    /// (gcc and objcopy are installed by scripts/test.)
    #[test]
    fn static_and_go_binaries_are_detected() {
        use std::process::Command;
        let dir = std::env::temp_dir().join(format!("tether-run-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("m.c");
        std::fs::write(&src, "int main(void){return 0;}\n").unwrap();
        let st = dir.join("static");
        let ok = Command::new("cc").arg("-static").arg("-o").arg(&st).arg(&src).status().unwrap();
        assert!(ok.success());
        assert_eq!(classify(&st).unwrap(), ExeKind::Static);
        let env = MapEnv::default();
        assert!(check_interposable(st.as_os_str(), &env).unwrap_err().contains("statically linked"));
        // A Go binary is recognised by its sections, whether or not it is dynamically linked.
        let go = dir.join("go");
        let ok = Command::new("objcopy")
            .arg("--add-section")
            .arg(format!(".go.buildinfo={}", src.display()))
            .arg("/bin/sh")
            .arg(&go)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(classify(&go).unwrap(), ExeKind::Go);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn preload_is_prepended() {
        let v = preload_value(Path::new("/l/libtether.so"), Some("/x.so".into()));
        assert_eq!(v, OsString::from("/l/libtether.so:/x.so"));
    }
}
