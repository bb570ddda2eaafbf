//! The signing CA and X.509-SVID issuance.
//!
//! By default the CA is an ECDSA P-256 root generated on first start into `state_dir`
//! (`ca.pem`, and `ca.key` with mode 0600, in a 0700 directory, each written to a temporary
//! file and renamed into place). Alternatively a configured root or intermediate is loaded.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use tether_proto::wire::{Der, SecretDer};
use tether_proto::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use zeroize::{Zeroize, Zeroizing};

use crate::config::{CaSource, Config};
use crate::files::write_atomically;
use crate::pem;

/// How far notBefore is backdated, to tolerate clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a generated root CA: ten years (there is no CA rotation yet).
pub const GENERATED_CA_LIFETIME: Duration = Duration::from_secs(3650 * 86400);

/// Why the CA could not be loaded or an SVID not issued.
#[derive(Debug)]
#[non_exhaustive]
pub enum CaError {
    Io { path: PathBuf, error: io::Error },
    /// A key file that group or others can read.
    InsecureKey { path: PathBuf, mode: u32 },
    Invalid { path: PathBuf, why: String },
    Rcgen(rcgen::Error),
    /// The CA certificate has expired.
    Expired,
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, error } => write!(f, "{}: {error}", path.display()),
            Self::InsecureKey { path, mode } => write!(
                f,
                "{}: CA key has mode {mode:04o}; it must not be readable by group or others (chmod 600)",
                path.display()
            ),
            Self::Invalid { path, why } => write!(f, "{}: {why}", path.display()),
            Self::Rcgen(e) => write!(f, "certificate generation failed: {e}"),
            Self::Expired => f.write_str("the CA certificate has expired"),
        }
    }
}

impl std::error::Error for CaError {}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        Self::Rcgen(e)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |error| CaError::Io { path: path.to_owned(), error }
}

/// The signing CA with the bundles it serves.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates between the leaf and the roots (the loaded intermediate, if any).
    intermediates: Vec<Der>,
    bundle: Vec<Der>,
    federated: BTreeMap<TrustDomain, Vec<Der>>,
    not_after: OffsetDateTime,
    rng: SystemRandom,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("key", &"<redacted>")
            .field("intermediates", &self.intermediates.len())
            .field("bundle", &self.bundle.len())
            .field("federated", &self.federated.keys().collect::<Vec<_>>())
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// A freshly issued SVID (by tetherd's CA, or handed over by an upstream).
#[derive(Clone)]
pub struct IssuedSvid {
    /// Leaf first, then intermediates.
    pub chain: Vec<Der>,
    pub key: SecretDer,
    /// Lowercase hex, no separators.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedSvid")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Ca {
    /// Load or create the CA described by `config`, and read the federated bundles.
    pub fn open(config: &Config) -> Result<Self, CaError> {
        let (issuer, cert_der, intermediates, bundle) = match &config.ca {
            CaSource::Generated => {
                let (issuer, der) = load_or_generate(&config.state_dir, &config.trust_domain)?;
                (issuer, der.clone(), Vec::new(), vec![Der(der)])
            }
            CaSource::Files { cert, key, bundle } => load_configured(cert, key, bundle.as_deref())?,
        };
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CaError::Invalid { path: "CA certificate".into(), why: e.to_string() })?;
        let not_after = x509.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::Expired);
        }
        let mut federated = BTreeMap::new();
        for (td, path) in &config.federated_bundles {
            federated.insert(td.clone(), read_certs(path)?);
        }
        Ok(Self {
            trust_domain: config.trust_domain.clone(),
            issuer,
            intermediates,
            bundle,
            federated,
            not_after,
            rng: SystemRandom::new(),
        })
    }

    pub fn bundle(&self) -> &[Der] {
        &self.bundle
    }

    pub fn federated(&self) -> &BTreeMap<TrustDomain, Vec<Der>> {
        &self.federated
    }

    /// When the signing certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issue an X.509-SVID for `id` with a fresh P-256 key, valid from now - [`BACKDATE`] for
    /// `ttl` (capped at the CA's own expiry).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedSvid, CaError> {
        let now = OffsetDateTime::now_utc();
        if now >= self.not_after {
            return Err(CaError::Expired);
        }
        let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let serial = random_serial(&self.rng)?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "tether");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - BACKDATE;
        params.not_after = (now + ttl).min(self.not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;

        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(Der(cert.der().to_vec()));
        chain.extend(self.intermediates.iter().cloned());
        let secret = SecretDer(Zeroizing::new(key.serialize_der()));
        key.zeroize();
        Ok(IssuedSvid {
            chain,
            key: secret,
            serial: crate::config::hex(&serial),
            not_before: params.not_before,
            not_after: params.not_after,
        })
    }
}

/// A random certificate serial, positive and exactly 16 bytes long (sign bit clear, top byte
/// non-zero).
pub(crate) fn random_serial(rng: &SystemRandom) -> Result<[u8; 16], CaError> {
    let mut serial = [0u8; 16];
    rng.fill(&mut serial).map_err(|_| CaError::Rcgen(rcgen::Error::RingUnspecified))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn ca_params(td: &TrustDomain) -> Result<CertificateParams, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tether");
    dn.push(DnType::CommonName, format!("tether CA {td}"));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(td.id_string().as_str().try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + GENERATED_CA_LIFETIME;
    Ok(params)
}

fn load_or_generate(dir: &Path, td: &TrustDomain) -> Result<(Issuer<'static, KeyPair>, Vec<u8>), CaError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    if cert_path.exists() {
        let key = read_key(&key_path)?;
        let der = read_one_cert(&cert_path)?;
        check_key_matches(&cert_path, &der, &key)?;
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)?;
        tracing::info!(cert = %cert_path.display(), "loaded CA");
        return Ok((issuer, der));
    }
    // No certificate: generate (overwriting any key left by an interrupted first start,
    // which never signed anything).
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(td)?;
    let cert = params.self_signed(&key)?;
    let key_pem = pem::encode(pem::PRIVATE_KEY, &Zeroizing::new(key.serialize_der()));
    write_atomically(&key_path, key_pem.as_bytes(), 0o600).map_err(io_err(&key_path))?;
    write_atomically(&cert_path, pem::encode(pem::CERTIFICATE, cert.der()).as_bytes(), 0o644)
        .map_err(io_err(&cert_path))?;
    tracing::info!(cert = %cert_path.display(), trust_domain = %td, "generated a new root CA");
    Ok((Issuer::new(params, key), cert.der().to_vec()))
}

pub(crate) fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::InsecureKey { path: path.to_owned(), mode });
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io_err(path))?);
    KeyPair::from_pem(&text).map_err(|e| CaError::Invalid { path: path.to_owned(), why: e.to_string() })
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<Der>, CaError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let ders = pem::decode_all(&text, pem::CERTIFICATE).map_err(|why| CaError::Invalid { path: path.to_owned(), why })?;
    if ders.is_empty() {
        return Err(CaError::Invalid { path: path.to_owned(), why: "no CERTIFICATE block".to_owned() });
    }
    for d in &ders {
        x509_parser::parse_x509_certificate(d)
            .map_err(|e| CaError::Invalid { path: path.to_owned(), why: e.to_string() })?;
    }
    Ok(ders.into_iter().map(|d| Der(d.to_vec())).collect())
}

pub(crate) fn read_one_cert(path: &Path) -> Result<Vec<u8>, CaError> {
    let mut certs = read_certs(path)?;
    if certs.len() != 1 {
        return Err(CaError::Invalid { path: path.to_owned(), why: "expected exactly one certificate".to_owned() });
    }
    Ok(certs.remove(0).0)
}

pub(crate) fn check_key_matches(path: &Path, der: &[u8], key: &KeyPair) -> Result<(), CaError> {
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::Invalid { path: path.to_owned(), why: e.to_string() })?;
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::Invalid { path: path.to_owned(), why: "the CA key does not match the certificate".to_owned() });
    }
    if !x509.is_ca() {
        return Err(CaError::Invalid { path: path.to_owned(), why: "not a CA certificate (BasicConstraints CA=false)".to_owned() });
    }
    Ok(())
}

type Loaded = (Issuer<'static, KeyPair>, Vec<u8>, Vec<Der>, Vec<Der>);

fn load_configured(cert_path: &Path, key_path: &Path, bundle: Option<&Path>) -> Result<Loaded, CaError> {
    let key = read_key(key_path)?;
    let der = read_one_cert(cert_path)?;
    check_key_matches(cert_path, &der, &key)?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError::Invalid { path: cert_path.to_owned(), why: e.to_string() })?;
    let self_signed = x509.subject().as_raw() == x509.issuer().as_raw();
    let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)?;
    match (self_signed, bundle) {
        (true, None) => Ok((issuer, der.clone(), Vec::new(), vec![Der(der)])),
        (true, Some(b)) => Ok((issuer, der, Vec::new(), read_certs(b)?)),
        (false, Some(b)) => {
            let roots = read_certs(b)?;
            check_intermediate_against(cert_path, &x509, b, &roots)?;
            Ok((issuer, der.clone(), vec![Der(der)], roots))
        }
        (false, None) => Err(CaError::Invalid {
            path: cert_path.to_owned(),
            why: "this is an intermediate CA: set ca_bundle to the file holding its roots".to_owned(),
        }),
    }
}

/// Fleet mode: refuse an intermediate that no bundle root signed (peers would reject every SVID).
fn check_intermediate_against(
    cert_path: &Path,
    cert: &x509_parser::certificate::X509Certificate<'_>,
    bundle_path: &Path,
    roots: &[Der],
) -> Result<(), CaError> {
    let mut parsed = Vec::with_capacity(roots.len());
    for r in roots {
        let (_, x) = x509_parser::parse_x509_certificate(&r.0)
            .map_err(|e| CaError::Invalid { path: bundle_path.to_owned(), why: e.to_string() })?;
        parsed.push(x);
    }
    crate::fleet::chain::check_issued_by(cert, &parsed).map_err(|why| CaError::Invalid {
        path: cert_path.to_owned(),
        why: format!("not usable with ca_bundle {}: {why}", bundle_path.display()),
    })
}
