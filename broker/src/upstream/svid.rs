//! Checking what the agent sends before anything of it is served.
//!
//! An SVID is used only if its leaf is a valid X.509-SVID of our trust domain (one URI SAN,
//! CA=false, the ID the agent named), currently valid, with a private key that matches the
//! leaf. Key bytes are wiped as soon as they are copied into a zeroizing buffer.

use std::collections::BTreeMap;

use tether_proto::wire::{Der, SecretDer};
use tether_proto::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use zeroize::{Zeroize, Zeroizing};

use super::proto::{SubscribeToX509BundlesResponse, SubscribeToX509sviDsResponse};
use super::Fetched;
use crate::ca::IssuedSvid;

/// Wipes every key in `resp` (the ones not used, and the original of the one copied).
fn wipe_keys(resp: &mut SubscribeToX509sviDsResponse) {
    for s in &mut resp.x509_svids {
        s.x509_svid_key.zeroize();
    }
}

/// The first SVID of `resp` (SPIRE's default identity when several entries match), checked;
/// `None` when the agent grants the process no identity.
pub(super) fn parse(
    mut resp: SubscribeToX509sviDsResponse,
    td: &TrustDomain,
) -> Result<Option<Fetched>, String> {
    let result = parse_inner(&mut resp, td);
    wipe_keys(&mut resp);
    result
}

fn parse_inner(
    resp: &mut SubscribeToX509sviDsResponse,
    td: &TrustDomain,
) -> Result<Option<Fetched>, String> {
    let Some(first) = resp.x509_svids.first_mut() else {
        return Ok(None);
    };
    let key = Zeroizing::new(std::mem::take(&mut first.x509_svid_key));
    let svid = first
        .x509_svid
        .as_ref()
        .ok_or("the response has no x509_svid")?;
    let chain: Vec<Der> = svid.cert_chain.iter().map(|c| Der(c.clone())).collect();
    let leaf_der = chain
        .first()
        .ok_or("the SVID's certificate chain is empty")?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der.0)
        .map_err(|e| format!("leaf certificate: {e}"))?;
    let spiffe_id = leaf_id(&leaf)?;
    if spiffe_id.trust_domain() != *td {
        return Err(format!("{spiffe_id} is not in our trust domain {td}"));
    }
    if let Some(named) = &svid.id {
        let named = format!("spiffe://{}{}", named.trust_domain, named.path);
        if named != spiffe_id.as_str() {
            return Err(format!(
                "the agent named {named} but the certificate says {spiffe_id}"
            ));
        }
    }
    if leaf.is_ca() {
        return Err("the leaf is a CA certificate".to_owned());
    }
    let now = OffsetDateTime::now_utc();
    let not_before = leaf.validity().not_before.to_datetime();
    let not_after = leaf.validity().not_after.to_datetime();
    if now >= not_after {
        return Err(format!("the SVID of {spiffe_id} has expired"));
    }
    let pair = rcgen::KeyPair::try_from(key.as_slice())
        .map_err(|e| format!("the private key is not usable PKCS#8: {e}"))?;
    if pair.public_key_raw() != leaf.public_key().subject_public_key.data.as_ref() {
        return Err("the private key does not match the SVID's certificate".to_owned());
    }
    drop(pair);
    let mut federates_with = Vec::new();
    for td in &resp.federates_with {
        federates_with.push(parse_td(td)?);
    }
    let issued = IssuedSvid {
        serial: crate::config::hex(leaf.raw_serial()),
        not_before,
        not_after,
        key: SecretDer(key),
        chain,
    };
    Ok(Some(Fetched {
        spiffe_id,
        issued,
        federates_with,
    }))
}

/// The leaf's one URI SAN, as a SPIFFE ID.
fn leaf_id(leaf: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?
        .ok_or("the leaf has no subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one
            .parse::<SpiffeId>()
            .map_err(|e| format!("URI SAN {one:?}: {e}")),
        _ => Err(format!(
            "the leaf has {} URI SANs; an X.509-SVID has exactly one",
            uris.len()
        )),
    }
}

/// `spiffe://example.org` (the form the agent uses for trust domains) or a bare name.
fn parse_td(s: &str) -> Result<TrustDomain, String> {
    s.strip_prefix("spiffe://")
        .unwrap_or(s)
        .parse::<TrustDomain>()
        .map_err(|e| format!("trust domain {s:?}: {e}"))
}

/// The agent's bundle set: trust domain -> its X.509 authorities (DER certificates, which the
/// agent concatenates into one byte string per trust domain).
pub(super) fn bundles(
    resp: SubscribeToX509BundlesResponse,
) -> Result<BTreeMap<TrustDomain, Vec<Der>>, String> {
    let mut out = BTreeMap::new();
    for (td, bytes) in resp.ca_certificates {
        let td = parse_td(&td)?;
        let certs = split_der(&bytes).map_err(|e| format!("bundle of {td}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("the bundle of {td} holds no certificate"));
        }
        out.insert(td, certs);
    }
    Ok(out)
}

/// Split concatenated DER certificates, each one parsed.
fn split_der(mut data: &[u8]) -> Result<Vec<Der>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(data).map_err(|e| e.to_string())?;
        let len = data.len() - rest.len();
        out.push(Der(data[..len].to_vec()));
        data = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::upstream::proto::{types, X509svidWithKey};

    fn ca_and_leaf(id: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        let leaf = p.signed_by(&key, &issuer).unwrap();
        (
            ca_cert.der().to_vec(),
            leaf.der().to_vec(),
            key.serialize_der(),
        )
    }

    fn response(leaf: Vec<u8>, key: Vec<u8>, td: &str, path: &str) -> SubscribeToX509sviDsResponse {
        SubscribeToX509sviDsResponse {
            x509_svids: vec![X509svidWithKey {
                x509_svid: Some(types::X509svid {
                    cert_chain: vec![leaf],
                    id: Some(types::Spiffeid {
                        trust_domain: td.into(),
                        path: path.into(),
                    }),
                    expires_at: 0,
                    hint: String::new(),
                }),
                x509_svid_key: key,
            }],
            federates_with: vec!["spiffe://other.org".into()],
        }
    }

    #[test]
    fn a_good_svid_is_taken_with_its_federations() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let (_, leaf, key) = ca_and_leaf("spiffe://example.org/web");
        let f = parse(response(leaf, key, "example.org", "/web"), &td)
            .unwrap()
            .unwrap();
        assert_eq!(f.spiffe_id.as_str(), "spiffe://example.org/web");
        assert_eq!(
            f.federates_with,
            vec!["other.org".parse::<TrustDomain>().unwrap()]
        );
    }

    #[test]
    fn an_empty_answer_is_no_identity() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let r = SubscribeToX509sviDsResponse {
            x509_svids: vec![],
            federates_with: vec![],
        };
        assert!(parse(r, &td).unwrap().is_none());
    }

    #[test]
    fn wrong_trust_domain_mismatched_name_or_key_are_refused() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let (_, leaf, key) = ca_and_leaf("spiffe://evil.org/web");
        assert!(parse(response(leaf, key, "evil.org", "/web"), &td)
            .unwrap_err()
            .contains("not in our trust domain"));
        let (_, leaf, key) = ca_and_leaf("spiffe://example.org/web");
        assert!(
            parse(response(leaf.clone(), key, "example.org", "/db"), &td)
                .unwrap_err()
                .contains("named")
        );
        let (_, _, other_key) = ca_and_leaf("spiffe://example.org/x");
        assert!(parse(response(leaf, other_key, "example.org", "/web"), &td)
            .unwrap_err()
            .contains("does not match"));
    }

    #[test]
    fn concatenated_bundles_split_per_trust_domain() {
        let (ca1, _, _) = ca_and_leaf("spiffe://example.org/a");
        let (ca2, _, _) = ca_and_leaf("spiffe://example.org/b");
        let mut both = ca1.clone();
        both.extend_from_slice(&ca2);
        let resp = SubscribeToX509BundlesResponse {
            ca_certificates: [
                ("spiffe://example.org".to_owned(), both),
                ("spiffe://other.org".to_owned(), ca1),
            ]
            .into_iter()
            .collect(),
        };
        let b = bundles(resp).unwrap();
        assert_eq!(b[&"example.org".parse::<TrustDomain>().unwrap()].len(), 2);
        assert_eq!(b[&"other.org".parse::<TrustDomain>().unwrap()].len(), 1);
        let bad = SubscribeToX509BundlesResponse {
            ca_certificates: [("spiffe://example.org".to_owned(), vec![0x30, 0x03, 1, 2])]
                .into_iter()
                .collect(),
        };
        assert!(bundles(bad).is_err());
    }
}
