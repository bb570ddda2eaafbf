//! `tether ca init` and `tether ca intermediate`: the offline root and per-host intermediates.
//!
//! Both write keys with mode 0600 into a 0700 directory, each file through a temporary file
//! renamed into place ([`write_atomically`]). A root is never overwritten; an intermediate is
//! (re-issuing it is how a host's CA is rotated).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SystemRandom;
use tether_proto::TrustDomain;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use zeroize::{Zeroize, Zeroizing};

use super::FleetError;
use crate::ca::{check_key_matches, random_serial, read_key, read_one_cert, BACKDATE};
use crate::config::hex;
use crate::files::write_atomically;
use crate::pem;

pub const ROOT_CERT: &str = "root.pem";
pub const ROOT_KEY: &str = "root.key";
pub const INTERMEDIATE_CERT: &str = "intermediate.pem";
pub const INTERMEDIATE_KEY: &str = "intermediate.key";
pub const BUNDLE: &str = "bundle.pem";

/// What was written.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The root (for an intermediate: the bundle.pem written next to it).
    pub bundle: PathBuf,
    pub trust_domain: TrustDomain,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// A host name for `--host`: 1 to 63 of `[a-zA-Z0-9._-]`, not starting with `.` or `-`.
fn check_host(host: &str) -> Result<(), FleetError> {
    let ok = !host.is_empty()
        && host.len() <= 63
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !host.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(FleetError::Invalid(format!(
            "bad host name {host:?}: use 1 to 63 of [a-zA-Z0-9._-], not starting with '.' or '-'"
        )))
    }
}

/// Create `dir` with mode 0700 if missing; refuse an existing one that group or others can
/// access, or that another user owns.
fn key_dir(dir: &Path) -> Result<(), FleetError> {
    let io = |error| FleetError::Io {
        path: dir.to_owned(),
        error,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let meta = fs::metadata(dir).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FleetError::InsecureDir {
            path: dir.to_owned(),
            mode,
        });
    }
    let euid = crate::sys::effective_uid();
    if meta.uid() != euid {
        return Err(FleetError::Invalid(format!(
            "{}: owned by uid {}, not by us (uid {euid})",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

fn ca_params(
    cn: String,
    td: &TrustDomain,
    path_len: u8,
    ttl: Duration,
    cap: Option<OffsetDateTime>,
) -> Result<CertificateParams, FleetError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tether");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(td.id_string().as_str().try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial(
        &SystemRandom::new(),
    )?));
    params.not_before = now - BACKDATE;
    params.not_after = cap.map_or(now + ttl, |c| (now + ttl).min(c));
    Ok(params)
}

fn write_pair(
    dir: &Path,
    cert_name: &str,
    key_name: &str,
    cert_der: &[u8],
    key: &KeyPair,
) -> Result<(PathBuf, PathBuf), FleetError> {
    let key_path = dir.join(key_name);
    let cert_path = dir.join(cert_name);
    let key_pem = Zeroizing::new(pem::encode(
        pem::PRIVATE_KEY,
        &Zeroizing::new(key.serialize_der()),
    ));
    write_atomically(&key_path, key_pem.as_bytes(), 0o600).map_err(|error| FleetError::Io {
        path: key_path.clone(),
        error,
    })?;
    write_atomically(
        &cert_path,
        pem::encode(pem::CERTIFICATE, cert_der).as_bytes(),
        0o644,
    )
    .map_err(|error| FleetError::Io {
        path: cert_path.clone(),
        error,
    })?;
    Ok((cert_path, key_path))
}

/// `tether ca init`: a fresh P-256 root for `td` in `out` (root.pem, root.key), allowing one
/// level of intermediates. Refuses to overwrite an existing root.
pub fn init_root(out: &Path, td: &TrustDomain, ttl: Duration) -> Result<Issued, FleetError> {
    key_dir(out)?;
    for name in [ROOT_CERT, ROOT_KEY] {
        let p = out.join(name);
        if p.exists() {
            return Err(FleetError::Exists(p));
        }
    }
    let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(format!("tether fleet root {td}"), td, 1, ttl, None)?;
    let cert = params.self_signed(&key)?;
    let (cert_path, key_path) = write_pair(out, ROOT_CERT, ROOT_KEY, cert.der(), &key)?;
    key.zeroize();
    Ok(Issued {
        bundle: cert_path.clone(),
        cert: cert_path,
        key: key_path,
        trust_domain: td.clone(),
        serial: serial_hex(&params),
        not_after: params.not_after,
    })
}

fn serial_hex(params: &CertificateParams) -> String {
    params
        .serial_number
        .as_ref()
        .map(|s| hex(s.as_ref()))
        .unwrap_or_default()
}

/// The trust domain a root certifies: its single URI SAN, `spiffe://<td>` with no path.
fn root_trust_domain(path: &Path, der: &[u8]) -> Result<TrustDomain, FleetError> {
    let bad = |why: String| FleetError::Invalid(format!("{}: {why}", path.display()));
    let (_, x) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| {
            if let GeneralName::URI(u) = g {
                Some(*u)
            } else {
                None
            }
        })
        .collect();
    let [uri] = uris[..] else {
        return Err(bad(format!(
            "expected exactly one URI SAN naming the trust domain, found {}",
            uris.len()
        )));
    };
    let td = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad(format!("URI SAN {uri:?} is not spiffe://<trust domain>")))?;
    td.parse::<TrustDomain>()
        .map_err(|e| bad(format!("URI SAN {uri:?}: {e}")))
}

/// `tether ca intermediate`: a P-256 intermediate for `host` signed by the root in `root_dir`,
/// with pathLenConstraint 0, valid for `ttl` (capped at the root's expiry). Writes
/// intermediate.pem, intermediate.key and bundle.pem (the root) into `out`, replacing any
/// earlier intermediate there.
pub fn issue_intermediate(
    root_dir: &Path,
    host: &str,
    out: &Path,
    ttl: Duration,
) -> Result<Issued, FleetError> {
    check_host(host)?;
    let root_cert = root_dir.join(ROOT_CERT);
    let root_key_path = root_dir.join(ROOT_KEY);
    let root_key = read_key(&root_key_path)?;
    let root_der = read_one_cert(&root_cert)?;
    check_key_matches(&root_cert, &root_der, &root_key)?;
    let td = root_trust_domain(&root_cert, &root_der)?;
    let (_, root_x) = x509_parser::parse_x509_certificate(&root_der)
        .map_err(|e| FleetError::Invalid(format!("{}: {e}", root_cert.display())))?;
    let root_not_after = root_x.validity().not_after.to_datetime();
    if root_not_after <= OffsetDateTime::now_utc() + MIN_LEFT {
        return Err(FleetError::Invalid(format!(
            "{}: the root has expired (or expires within a minute)",
            root_cert.display()
        )));
    }
    let issuer = Issuer::from_ca_cert_der(&root_der.clone().into(), root_key)?;

    key_dir(out)?;
    let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(
        format!("tether intermediate {host} {td}"),
        &td,
        0,
        ttl,
        Some(root_not_after),
    )?;
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, host);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;

    // Self-check before anything is written: the same check tetherd makes at start.
    let (_, ix) = x509_parser::parse_x509_certificate(cert.der())
        .map_err(|e| FleetError::Invalid(format!("generated intermediate does not parse: {e}")))?;
    super::chain::check_issued_by(&ix, std::slice::from_ref(&root_x))
        .map_err(FleetError::Invalid)?;

    let bundle = out.join(BUNDLE);
    write_atomically(
        &bundle,
        pem::encode(pem::CERTIFICATE, &root_der).as_bytes(),
        0o644,
    )
    .map_err(|error| FleetError::Io {
        path: bundle.clone(),
        error,
    })?;
    let (cert_path, key_path) =
        write_pair(out, INTERMEDIATE_CERT, INTERMEDIATE_KEY, cert.der(), &key)?;
    key.zeroize();
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        bundle,
        trust_domain: td,
        serial: serial_hex(&params),
        not_after: params.not_after,
    })
}

/// An intermediate must outlive its issuance by at least this much.
const MIN_LEFT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        for good in ["a", "db-1", "host.example_2"] {
            assert!(check_host(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "é", &"x".repeat(64)] {
            assert!(check_host(bad).is_err(), "{bad:?}");
        }
    }
}
