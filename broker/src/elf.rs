//! Just enough ELF reading to vet a shared library before it is preloaded into every program:
//! its type and machine, the symbols it defines in `.dynsym`, and the symbol versions it needs
//! from `.gnu.version_r` (e.g. `GLIBC_2.34` from `libc.so.6`).
//!
//! Why parse instead of `nm -D` or scanning the bytes for `GLIBC_2.`: `nm` is binutils (not on
//! every host that runs `tether install`), and a byte scan also counts strings that are not
//! requirements. `.gnu.version_r` is exactly what the loader checks: if a needed version is
//! missing from the host's libc, the loader refuses the library (and with /etc/ld.so.preload it
//! prints an error in every program). Reads are bounded so that a hostile file cannot make us
//! allocate much.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// `e_type` of a shared object (also used by PIE executables).
pub const ET_DYN: u16 = 3;
const SHT_DYNSYM: u32 = 11;
const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;
const PT_INTERP: u32 = 3;
/// Largest section we read (a `.dynsym` or `.dynstr` is far smaller).
const MAX_SECTION: u64 = 64 << 20;

/// The host's `e_machine`.
#[cfg(target_arch = "x86_64")]
pub const HOST_MACHINE: u16 = 62;
#[cfg(target_arch = "aarch64")]
pub const HOST_MACHINE: u16 = 183;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const HOST_MACHINE: u16 = 0;

/// What we learned about an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub is64: bool,
    /// `e_type` (ET_DYN = 3 for shared objects).
    pub kind: u16,
    /// `e_machine` (62 = x86_64).
    pub machine: u16,
    /// Has a PT_INTERP segment (an executable, not a plain library).
    pub has_interp: bool,
    /// Global or weak symbols the file defines in `.dynsym`.
    pub exports: Vec<String>,
    /// `(file, version)` pairs from `.gnu.version_r`, e.g. `("libc.so.6", "GLIBC_2.34")`.
    pub version_needs: Vec<(String, String)>,
}

impl ElfInfo {
    pub fn is_shared_object(&self) -> bool {
        self.kind == ET_DYN
    }

    pub fn exports(&self, symbol: &str) -> bool {
        self.exports.iter().any(|s| s == symbol)
    }

    /// Links liburing (a `.gnu.version_r` need on `liburing.so.*`; liburing versions every
    /// symbol it exports). Its io_uring connects and accepts reach the kernel without a libc
    /// call that LD_PRELOAD could interpose. (A statically linked liburing, or raw io_uring
    /// syscalls, leave no such trace.)
    pub fn links_liburing(&self) -> bool {
        self.version_needs.iter().any(|(file, _)| file.starts_with("liburing.so"))
    }

    /// The newest `GLIBC_x.y` version the file needs, if any.
    pub fn max_glibc(&self) -> Option<GlibcVersion> {
        self.version_needs
            .iter()
            .filter_map(|(_, v)| v.strip_prefix("GLIBC_").and_then(|v| v.parse().ok()))
            .max()
    }
}

/// A glibc version such as 2.34 (`GLIBC_2.34`) or 2.36 (`gnu_get_libc_version()`).
/// Up to three numeric components (missing ones are 0), compared numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GlibcVersion(pub [u32; 3]);

impl std::str::FromStr for GlibcVersion {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut v = [0u32; 3];
        let mut n = 0;
        for part in s.trim().split('.') {
            if n == 3 {
                return Err(());
            }
            v[n] = part.parse().map_err(|_| ())?;
            n += 1;
        }
        if n < 2 {
            return Err(());
        }
        Ok(Self(v))
    }
}

impl fmt::Display for GlibcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.0;
        if c == 0 {
            write!(f, "{a}.{b}")
        } else {
            write!(f, "{a}.{b}.{c}")
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

struct Reader {
    f: File,
    is64: bool,
    le: bool,
}

impl Reader {
    fn at(&mut self, off: u64, len: u64) -> io::Result<Vec<u8>> {
        if len > MAX_SECTION {
            return Err(invalid("section too large"));
        }
        self.f.seek(SeekFrom::Start(off))?;
        let mut v = vec![0u8; len as usize];
        self.f
            .read_exact(&mut v)
            .map_err(|_| invalid("truncated ELF file"))?;
        Ok(v)
    }

    fn u16(&self, b: &[u8], at: usize) -> io::Result<u16> {
        let s = b
            .get(at..at + 2)
            .ok_or_else(|| invalid("truncated ELF structure"))?;
        let a = [s[0], s[1]];
        Ok(if self.le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        })
    }

    fn u32(&self, b: &[u8], at: usize) -> io::Result<u32> {
        let s = b
            .get(at..at + 4)
            .ok_or_else(|| invalid("truncated ELF structure"))?;
        let a = [s[0], s[1], s[2], s[3]];
        Ok(if self.le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    }

    fn u64(&self, b: &[u8], at: usize) -> io::Result<u64> {
        let s = b
            .get(at..at + 8)
            .ok_or_else(|| invalid("truncated ELF structure"))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(if self.le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        })
    }

    /// A word: 8 bytes in ELF64, 4 in ELF32.
    fn word(&self, b: &[u8], at64: usize, at32: usize) -> io::Result<u64> {
        if self.is64 {
            self.u64(b, at64)
        } else {
            self.u32(b, at32).map(u64::from)
        }
    }
}

/// A section header, reduced to what we use.
struct Section {
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
}

fn c_str(table: &[u8], at: u32) -> String {
    let bytes = table.get(at as usize..).unwrap_or_default();
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Read `path`'s ELF header, dynamic symbols and version needs. Not an ELF file, or a
/// malformed one, is `InvalidData`.
pub fn inspect(path: &Path) -> io::Result<ElfInfo> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    if got < 52 || &head[..4] != b"\x7fELF" {
        return Err(invalid("not an ELF file"));
    }
    let is64 = match head[4] {
        1 => false,
        2 => true,
        _ => return Err(invalid("bad ELF class")),
    };
    if is64 && got < 64 {
        return Err(invalid("truncated ELF header"));
    }
    let le = head[5] == 1;
    let mut r = Reader { f, is64, le };
    let h = &head[..];
    let kind = r.u16(h, 16)?;
    let machine = r.u16(h, 18)?;
    let phoff = r.word(h, 32, 28)?;
    let shoff = r.word(h, 40, 32)?;
    let (phentsize, phnum, shentsize, shnum) = if is64 {
        (r.u16(h, 54)?, r.u16(h, 56)?, r.u16(h, 58)?, r.u16(h, 60)?)
    } else {
        (r.u16(h, 42)?, r.u16(h, 44)?, r.u16(h, 46)?, r.u16(h, 48)?)
    };
    let (phentsize, shentsize) = (u64::from(phentsize), u64::from(shentsize));
    let min_ph = if is64 { 56 } else { 32 };
    let min_sh = if is64 { 64 } else { 40 };
    let mut has_interp = false;
    if phnum > 0 {
        if phentsize < min_ph {
            return Err(invalid("bad program header size"));
        }
        let phdrs = r.at(phoff, phentsize * u64::from(phnum))?;
        for i in 0..usize::from(phnum) {
            if r.u32(&phdrs, i * phentsize as usize)? == PT_INTERP {
                has_interp = true;
            }
        }
    }
    let mut info = ElfInfo {
        is64,
        kind,
        machine,
        has_interp,
        exports: Vec::new(),
        version_needs: Vec::new(),
    };
    if shnum == 0 {
        return Ok(info);
    }
    if shentsize < min_sh {
        return Err(invalid("bad section header size"));
    }
    let shdrs = r.at(shoff, shentsize * u64::from(shnum))?;
    let mut sections = Vec::with_capacity(usize::from(shnum));
    for i in 0..usize::from(shnum) {
        let b = &shdrs[i * shentsize as usize..];
        sections.push(Section {
            kind: r.u32(b, 4)?,
            offset: r.word(b, 24, 16)?,
            size: r.word(b, 32, 20)?,
            link: r.u32(b, if is64 { 40 } else { 24 })?,
            info: r.u32(b, if is64 { 44 } else { 28 })?,
        });
    }
    let strings_of = |r: &mut Reader, s: &Section| -> io::Result<Vec<u8>> {
        let t = sections
            .get(s.link as usize)
            .ok_or_else(|| invalid("bad sh_link"))?;
        r.at(t.offset, t.size)
    };
    for s in &sections {
        match s.kind {
            SHT_DYNSYM => {
                let strtab = strings_of(&mut r, s)?;
                let syms = r.at(s.offset, s.size)?;
                let size = if is64 { 24 } else { 16 };
                for sym in syms.chunks_exact(size) {
                    let name = r.u32(sym, 0)?;
                    let (st_info, shndx) = if is64 {
                        (sym[4], r.u16(sym, 6)?)
                    } else {
                        (sym[12], r.u16(sym, 14)?)
                    };
                    let binding = st_info >> 4;
                    // Defined (not SHN_UNDEF) and global (1) or weak (2).
                    if shndx != 0 && (binding == 1 || binding == 2) && name != 0 {
                        info.exports.push(c_str(&strtab, name));
                    }
                }
            }
            SHT_GNU_VERNEED => {
                let strtab = strings_of(&mut r, s)?;
                let data = r.at(s.offset, s.size)?;
                // Verneed {u16 version, u16 cnt, u32 file, u32 aux, u32 next} and
                // Vernaux {u32 hash, u16 flags, u16 other, u32 name, u32 next}: same in ELF32/64.
                let mut at = 0usize;
                for _ in 0..s.info.min(1024) {
                    let cnt = r.u16(&data, at + 2)?;
                    let file = c_str(&strtab, r.u32(&data, at + 4)?);
                    let mut aux = at + r.u32(&data, at + 8)? as usize;
                    for _ in 0..cnt.min(1024) {
                        let name = c_str(&strtab, r.u32(&data, aux + 8)?);
                        info.version_needs.push((file.clone(), name));
                        match r.u32(&data, aux + 12)? {
                            0 => break,
                            n => aux += n as usize,
                        }
                    }
                    match r.u32(&data, at + 12)? {
                        0 => break,
                        n => at += n as usize,
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn libc_path() -> std::path::PathBuf {
        for p in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
            "/usr/lib/libc.so.6",
        ] {
            if Path::new(p).exists() {
                return p.into();
            }
        }
        panic!("no libc.so.6 found");
    }

    #[test]
    fn libc_is_a_shared_object_exporting_connect() {
        let info = inspect(&libc_path()).unwrap();
        assert!(info.is_shared_object());
        assert_eq!(info.machine, HOST_MACHINE);
        assert!(
            info.exports("connect") && info.exports("accept4"),
            "{:?}",
            &info.exports[..10]
        );
        assert!(!info.exports("definitely_not_a_libc_symbol"));
    }

    #[test]
    fn executables_need_glibc_versions() {
        let info = inspect(Path::new("/bin/sh")).unwrap();
        assert!(info.has_interp);
        let v = info.max_glibc().unwrap();
        assert!(v >= "2.2.5".parse().unwrap(), "{v}");
        assert!(info.version_needs.iter().any(|(f, _)| f == "libc.so.6"));
    }

    #[test]
    fn a_liburing_version_need_means_io_uring_may_bypass_the_shim() {
        let mut info = ElfInfo {
            is64: true,
            kind: ET_DYN,
            machine: HOST_MACHINE,
            has_interp: true,
            exports: Vec::new(),
            version_needs: vec![("libc.so.6".into(), "GLIBC_2.34".into())],
        };
        assert!(!info.links_liburing());
        info.version_needs.push(("liburing.so.2".into(), "LIBURING_2.0".into()));
        assert!(info.links_liburing());
        // Real system binaries do not link it.
        assert!(!inspect(&libc_path()).unwrap().links_liburing());
    }

    #[test]
    fn glibc_versions_compare_numerically() {
        let p = |s: &str| s.parse::<GlibcVersion>().unwrap();
        assert!(p("2.34") > p("2.4"));
        assert!(p("2.2.5") < p("2.3"));
        assert_eq!(p("2.36").to_string(), "2.36");
        assert_eq!(p("2.2.5").to_string(), "2.2.5");
        assert!("2".parse::<GlibcVersion>().is_err());
        assert!("x.y".parse::<GlibcVersion>().is_err());
    }

    #[test]
    fn non_elf_and_truncated_files_are_invalid_data() {
        let dir = std::env::temp_dir().join(format!("tether-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert_eq!(inspect(&p).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut junk = b"\x7fELF\x02\x01\x01".to_vec();
        junk.resize(junk.len() + 200, 0xff);
        std::fs::write(&p, &junk).unwrap();
        assert!(inspect(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
