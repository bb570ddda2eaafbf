//! SPIFFE X.509-SVID verification for both handshake sides.
//!
//! A peer is accepted only if: its leaf carries exactly one URI SAN, which is a valid SPIFFE
//! ID; the chain verifies (webpki) to a root of *that ID's* trust domain, with the right EKU
//! for its role; and the ID matches the rule's `allow` list. The verifier is shared by every
//! connection of one config (see `configs`): a refusal travels back inside the rustls error
//! ([`refusal_of`]), and the only way to obtain a [`VerifiedPeer`] is [`verified_peer`] on the
//! chain of a handshake that completed: that chain passed this verifier, in this handshake or
//! (TLS 1.3 resumption) in the one that issued the ticket, under the same config.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme};
use tether_proto::{IdPattern, SpiffeId, TrustDomain};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;

/// Trust anchors per trust domain.
pub(crate) struct TrustStore {
    roots: HashMap<TrustDomain, Vec<rustls::pki_types::TrustAnchor<'static>>>,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tds: Vec<_> = self.roots.iter().map(|(td, r)| format!("{td}:{}", r.len())).collect();
        write!(f, "TrustStore({})", tds.join(","))
    }
}

impl TrustStore {
    /// Build from DER roots per trust domain. Roots that do not parse are skipped (and the
    /// count returned, so the caller can log it).
    pub(crate) fn new(bundles: impl IntoIterator<Item = (TrustDomain, Vec<Vec<u8>>)>) -> (Self, usize) {
        let mut roots = HashMap::new();
        let mut bad = 0;
        for (td, ders) in bundles {
            let mut anchors = Vec::new();
            for der in ders {
                let cert = CertificateDer::from(der);
                match webpki::anchor_from_trusted_cert(&cert) {
                    Ok(a) => anchors.push(a.to_owned()),
                    Err(_) => bad += 1,
                }
            }
            roots.entry(td).or_insert_with(Vec::new).extend(anchors);
        }
        (Self { roots }, bad)
    }
}

/// The SPIFFE ID of a peer whose certificate chain and `allow` entry were checked for this
/// connection. Only [`verified_peer`] constructs one.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct VerifiedPeer(SpiffeId);

impl VerifiedPeer {
    pub(crate) fn id(&self) -> &SpiffeId {
        &self.0
    }
}

impl fmt::Debug for VerifiedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifiedPeer({})", self.0)
    }
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The certificate is not a usable SVID, or does not chain to a trusted root.
    BadCertificate(String),
    /// The SVID is valid but its ID is not in `allow`.
    NotAllowed(SpiffeId),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadCertificate(why) => write!(f, "peer certificate rejected: {why}"),
            Self::NotAllowed(id) => write!(f, "peer {id} is not in the allow list"),
        }
    }
}

/// A refusal carried inside the rustls error that aborts the handshake.
#[derive(Debug)]
struct Refused(Refusal);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Refused {}

/// The refusal our verifier put in `e`, if it is one of ours.
pub(crate) fn refusal_of(e: &Error) -> Option<Refusal> {
    match e {
        Error::InvalidCertificate(CertificateError::Other(OtherError(o))) => {
            o.downcast_ref::<Refused>().map(|r| r.0.clone())
        }
        _ => None,
    }
}

/// The peer of a completed handshake, from the chain rustls holds for it: re-checked against
/// `allow` (the policy in force now) and the validity of every certificate in it at `now`.
/// For a full handshake this repeats what the verifier just did; for a resumed one it is the
/// check that the ticket's peer is still allowed and its SVID not expired.
pub(crate) fn verified_peer(
    chain: Option<&[CertificateDer<'_>]>,
    allow: &[IdPattern],
    now: UnixTime,
) -> Result<VerifiedPeer, Refusal> {
    let chain = chain.filter(|c| !c.is_empty()).ok_or(Refusal::BadCertificate("peer presented no certificate".into()))?;
    for cert in chain {
        let (_, x) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| Refusal::BadCertificate(format!("unparseable certificate: {e}")))?;
        let t = now.as_secs() as i64;
        if t >= x.validity().not_after.timestamp() || t < x.validity().not_before.timestamp() {
            return Err(Refusal::BadCertificate("certificate expired or not yet valid".into()));
        }
    }
    let id = spiffe_id_of(&chain[0]).map_err(Refusal::BadCertificate)?;
    if !allow.iter().any(|p| p.matches(&id)) {
        return Err(Refusal::NotAllowed(id));
    }
    Ok(VerifiedPeer(id))
}

/// Extract the single SPIFFE ID from a leaf certificate.
pub(crate) fn spiffe_id_of(cert: &[u8]) -> Result<SpiffeId, String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparseable certificate: {e}"))?;
    id_of(&x)
}

/// A peer's leaf, checked as X509-SVID §4.3/§5.2 ask beyond what webpki checks (webpki
/// ignores an end entity's keyUsage): keyUsage present with digitalSignature and without
/// keyCertSign or cRLSign; then its SPIFFE ID. One parse.
fn peer_leaf_id(cert: &[u8]) -> Result<SpiffeId, String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparseable certificate: {e}"))?;
    let ku = x.key_usage().map_err(|e| format!("bad keyUsage: {e}"))?.ok_or("the leaf has no keyUsage (an SVID must have digitalSignature)")?;
    if !ku.value.digital_signature() {
        return Err("the leaf's keyUsage lacks digitalSignature".into());
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err("the leaf's keyUsage has keyCertSign or cRLSign (a CA key, not an SVID)".into());
    }
    id_of(&x)
}

fn id_of(x: &x509_parser::certificate::X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = x
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let mut uris = san.value.general_names.iter().filter_map(|g| match g {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or("no URI SAN")?;
    if uris.next().is_some() {
        return Err("more than one URI SAN".into());
    }
    let id = uri.parse::<SpiffeId>().map_err(|e| format!("URI SAN is not a SPIFFE ID: {e}"))?;
    if id.path().is_empty() {
        // X509-SVID §3.1: a leaf's SPIFFE ID names a workload, never the trust domain itself.
        return Err(format!("{id} is a trust domain's ID, not a workload's (no path)"));
    }
    Ok(id)
}

/// Verifies a peer's SVID for one connection. Used as both the client's server verifier and
/// the server's client verifier.
#[derive(Clone)]
pub(crate) struct SpiffeVerifier {
    trust: Arc<TrustStore>,
    allow: Vec<IdPattern>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier").field("trust", &self.trust).field("allow", &self.allow).finish()
    }
}

impl SpiffeVerifier {
    pub(crate) fn new(trust: Arc<TrustStore>, allow: Vec<IdPattern>) -> Self {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Self { trust, allow, algs }
    }

    pub(super) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<(), Error> {
        match self.check_chain(end_entity, intermediates, now, usage) {
            Ok(_) => Ok(()),
            Err(r) => Err(Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(r)))))),
        }
    }

    fn check_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, Refusal> {
        let id = peer_leaf_id(end_entity).map_err(Refusal::BadCertificate)?;
        let td = id.trust_domain();
        let roots = self
            .trust
            .roots
            .get(&td)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Refusal::BadCertificate(format!("no trust bundle for trust domain {td}")))?;
        let ee = EndEntityCert::try_from(end_entity)
            .map_err(|e| Refusal::BadCertificate(format!("invalid leaf: {e}")))?;
        ee.verify_for_usage(self.algs.all, roots, intermediates, now, usage, None, None)
            .map_err(|e| Refusal::BadCertificate(format!("chain does not verify: {e}")))?;
        if !self.allow.iter().any(|p| p.matches(&id)) {
            return Err(Refusal::NotAllowed(id));
        }
        Ok(id)
    }

    fn tls13_sig(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

/// Both roles' answer to a TLS 1.2 signature: refused. The configs offer TLS 1.3 only, so rustls
/// should never ask; if it does, the handshake fails.
fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The server name is deliberately ignored: SVIDs name workloads by URI SAN, and the
        // allow list is the authorization.
        let deferred = super::deferred::defer(|| super::deferred::Pending {
            verifier: self.clone(),
            end_entity: end_entity.clone().into_owned(),
            intermediates: intermediates.iter().map(|c| c.clone().into_owned()).collect(),
            now,
        });
        if deferred {
            // Verified in the signing round trip, and before anything of ours is written.
            return Ok(ServerCertVerified::assertion());
        }
        self.verify(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13_sig(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13_sig(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    /// A leaf naming `id`, valid from `from` to `to` seconds relative to [`now`].
    fn leaf(id: &str, from: i64, to: i64) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        let at = |d: i64| {
            let base = rcgen::date_time_ymd(2027, 1, 15);
            let s = std::time::Duration::from_secs(d.unsigned_abs());
            if d < 0 { base - s } else { base + s }
        };
        p.not_before = at(from);
        p.not_after = at(to);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    fn allow(p: &str) -> Vec<IdPattern> {
        vec![p.parse().unwrap()]
    }

    /// What a resumed handshake's peer is checked against: the current allow list and the
    /// validity of the certificate the ticket was issued to.
    #[test]
    fn a_resumed_peer_is_rechecked_for_allow_and_expiry() {
        let now = rcgen::date_time_ymd(2027, 1, 15).unix_timestamp() as u64;
        let t = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now));
        let ok = [leaf("spiffe://td.test/a", -60, 3600)];
        assert_eq!(verified_peer(Some(&ok), &allow("spiffe://td.test/*"), t).unwrap().id().to_string(), "spiffe://td.test/a");
        assert!(matches!(verified_peer(Some(&ok), &allow("spiffe://td.test/b"), t), Err(Refusal::NotAllowed(_))));
        let expired = [leaf("spiffe://td.test/a", -3600, -1)];
        assert!(matches!(verified_peer(Some(&expired), &allow("spiffe://td.test/*"), t), Err(Refusal::BadCertificate(_))));
        let early = [leaf("spiffe://td.test/a", 60, 3600)];
        assert!(matches!(verified_peer(Some(&early), &allow("spiffe://td.test/*"), t), Err(Refusal::BadCertificate(_))));
        assert!(matches!(verified_peer(None, &allow("spiffe://td.test/*"), t), Err(Refusal::BadCertificate(_))));
    }

    fn leaf_with_usage(id: &str, usages: &[rcgen::KeyUsagePurpose]) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        p.key_usages = usages.to_vec();
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    /// X509-SVID §4.3/§5.2, which webpki does not check on an end entity: a peer's leaf needs
    /// keyUsage digitalSignature and must not have keyCertSign or cRLSign. (Found by review: such
    /// leaves, and leaves without keyUsage, were accepted.)
    #[test]
    fn a_peer_leaf_needs_digital_signature_and_no_ca_key_usage() {
        use rcgen::KeyUsagePurpose::{CrlSign, DigitalSignature, KeyCertSign, KeyEncipherment};
        let id = "spiffe://td.test/a";
        assert!(peer_leaf_id(&leaf_with_usage(id, &[DigitalSignature])).is_ok());
        assert!(peer_leaf_id(&leaf_with_usage(id, &[DigitalSignature, KeyEncipherment])).is_ok());
        for bad in [&[][..], &[KeyCertSign, CrlSign][..], &[DigitalSignature, KeyCertSign][..], &[DigitalSignature, CrlSign][..]] {
            let e = peer_leaf_id(&leaf_with_usage(id, bad)).unwrap_err();
            assert!(e.contains("keyUsage"), "{bad:?}: {e}");
        }
    }

    /// X509-SVID §3.1: a leaf names a workload; the trust domain's own ID (no path) is refused.
    #[test]
    fn a_leaf_naming_the_trust_domain_itself_is_refused() {
        let e = spiffe_id_of(&leaf("spiffe://td.test", -60, 3600)).unwrap_err();
        assert!(e.contains("no path"), "{e}");
        assert!(spiffe_id_of(&leaf("spiffe://td.test/w", -60, 3600)).is_ok());
    }

    #[test]
    fn a_refusal_survives_the_trip_through_rustls_errors() {
        let e = Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(Refusal::BadCertificate(
            "x".into(),
        ))))));
        assert_eq!(refusal_of(&e), Some(Refusal::BadCertificate("x".into())));
        assert_eq!(refusal_of(&Error::General("y".into())), None);
    }
}
