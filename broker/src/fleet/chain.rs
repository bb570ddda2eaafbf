//! Checking that a CA certificate was issued by one of a bundle's roots.
//!
//! tetherd serves `[SVID, intermediate]` and the bundle as the trust anchors. If the
//! intermediate was not signed by a bundle root (a stale bundle.pem, another fleet's root),
//! every peer would reject every SVID; tetherd refuses to start instead. Signatures are checked
//! with ring for the algorithms webpki accepts (ECDSA P-256/P-384, RSA PKCS#1 SHA-2, Ed25519).

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_NIST_EC_P384, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
    OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};

/// Ok if `cert` is signed by a root in `roots` that is a valid CA allowing one level of
/// intermediates below it, and both are within their validity period now.
pub fn check_issued_by(
    cert: &X509Certificate<'_>,
    roots: &[X509Certificate<'_>],
) -> Result<(), String> {
    let now = OffsetDateTime::now_utc();
    if !within_validity(cert, now) {
        return Err("the intermediate is not valid now (expired, or not yet valid)".to_owned());
    }
    let candidates: Vec<_> = roots
        .iter()
        .filter(|r| r.subject().as_raw() == cert.issuer().as_raw())
        .collect();
    if candidates.is_empty() {
        return Err(format!(
            "no certificate in the bundle is named {} (the intermediate's issuer)",
            cert.issuer()
        ));
    }
    let mut why = String::new();
    for root in candidates {
        match check_one(cert, root, now) {
            Ok(()) => return Ok(()),
            Err(e) => why = e,
        }
    }
    Err(why)
}

fn check_one(
    cert: &X509Certificate<'_>,
    root: &X509Certificate<'_>,
    now: OffsetDateTime,
) -> Result<(), String> {
    let bc = root
        .basic_constraints()
        .map_err(|e| format!("bundle root: bad basicConstraints: {e}"))?
        .ok_or("bundle root has no basicConstraints")?;
    if !bc.value.ca {
        return Err("bundle root is not a CA".to_owned());
    }
    if bc.value.path_len_constraint == Some(0) {
        return Err("bundle root has pathLenConstraint 0: it cannot have intermediates (make the root with `tether ca init`)".to_owned());
    }
    if !within_validity(root, now) {
        return Err("the bundle root is not valid now".to_owned());
    }
    let alg = algorithm(&cert.signature_algorithm.algorithm, root)?;
    let spki = root.public_key();
    UnparsedPublicKey::new(alg, spki.subject_public_key.data.as_ref())
        .verify(
            cert.tbs_certificate.as_ref(),
            cert.signature_value.data.as_ref(),
        )
        .map_err(|_| {
            "the intermediate's signature does not verify with the bundle root's key".to_owned()
        })
}

fn within_validity(c: &X509Certificate<'_>, now: OffsetDateTime) -> bool {
    c.validity().not_before.to_datetime() <= now && now < c.validity().not_after.to_datetime()
}

fn algorithm(
    sig: &Oid<'_>,
    issuer: &X509Certificate<'_>,
) -> Result<&'static dyn VerificationAlgorithm, String> {
    let curve = issuer
        .public_key()
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let is = |o: &Oid<'_>| curve.as_ref() == Some(o);
    let alg: &'static dyn VerificationAlgorithm =
        if *sig == OID_SIG_ECDSA_WITH_SHA256 && is(&OID_EC_P256) {
            &signature::ECDSA_P256_SHA256_ASN1
        } else if *sig == OID_SIG_ECDSA_WITH_SHA256 && is(&OID_NIST_EC_P384) {
            &signature::ECDSA_P384_SHA256_ASN1
        } else if *sig == OID_SIG_ECDSA_WITH_SHA384 && is(&OID_EC_P256) {
            &signature::ECDSA_P256_SHA384_ASN1
        } else if *sig == OID_SIG_ECDSA_WITH_SHA384 && is(&OID_NIST_EC_P384) {
            &signature::ECDSA_P384_SHA384_ASN1
        } else if *sig == OID_PKCS1_SHA256WITHRSA {
            &signature::RSA_PKCS1_2048_8192_SHA256
        } else if *sig == OID_PKCS1_SHA384WITHRSA {
            &signature::RSA_PKCS1_2048_8192_SHA384
        } else if *sig == OID_PKCS1_SHA512WITHRSA {
            &signature::RSA_PKCS1_2048_8192_SHA512
        } else if *sig == OID_SIG_ED25519 {
            &signature::ED25519
        } else {
            return Err(format!(
                "unsupported signature algorithm {sig} (or key type) on the intermediate"
            ));
        };
    Ok(alg)
}
