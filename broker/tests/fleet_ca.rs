//! Standalone fleet mode: `tether ca init`, `tether ca intermediate`, and tetherd serving the
//! chain. Chains are verified with webpki exactly as the shim verifies them.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, TempDir, TETHER, TETHERD};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tether_broker::pem;
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;

const TD: &str = "fleet.test";

fn tether(args: &[&str]) -> std::process::Output {
    Command::new(TETHER)
        .args(args)
        .env_remove("TETHER_SOCKET")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = tether(args);
    assert!(
        out.status.success(),
        "tether {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn der(path: &Path) -> Vec<u8> {
    let text = fs::read_to_string(path).unwrap();
    let mut all = pem::decode_all(&text, pem::CERTIFICATE).unwrap();
    assert_eq!(all.len(), 1, "{}", path.display());
    all.remove(0).to_vec()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A root in `dir/root` and host `host`'s intermediate in `dir/<host>`.
fn fleet(dir: &Path, hosts: &[&str], ttl: &str) {
    ok(&[
        "ca",
        "init",
        "--out",
        p(&dir.join("root")),
        "--trust-domain",
        TD,
    ]);
    for h in hosts {
        ok(&[
            "ca",
            "intermediate",
            "--host",
            h,
            "--root",
            p(&dir.join("root")),
            "--out",
            p(&dir.join(h)),
            "--ttl",
            ttl,
        ]);
    }
}

fn host_config(host_dir: &Path) -> String {
    format!(
        "trust_domain = \"{TD}\"\nunmatched = \"derive\"\nca_cert = \"{}\"\nca_key = \"{}\"\nca_bundle = \"{}\"\n",
        host_dir.join("intermediate.pem").display(),
        host_dir.join("intermediate.key").display(),
        host_dir.join("bundle.pem").display()
    )
}

/// Verify `leaf` + `intermediates` against `root` as the shim does (webpki, client auth).
fn webpki_verify(leaf: &[u8], intermediates: &[Vec<u8>], root: &[u8]) -> Result<(), webpki::Error> {
    let root = CertificateDer::from(root.to_vec());
    let anchor = webpki::anchor_from_trusted_cert(&root).unwrap().to_owned();
    let leaf = CertificateDer::from(leaf.to_vec());
    let ee = EndEntityCert::try_from(&leaf).unwrap();
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &inter,
        UnixTime::now(),
        KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}

/// Start tetherd with `config` and expect it to exit with an error; returns its stderr.
fn tetherd_refuses(dir: &Path, config: &str) -> String {
    let cfg = dir.join("refused.toml");
    fs::write(&cfg, config).unwrap();
    let mut child = Command::new(TETHERD)
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .arg("--state-dir")
        .arg(dir.join("refused-state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(!st.success());
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(
                !dir.join("refused.sock").exists(),
                "socket created by a refusing tetherd"
            );
            return err;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("tetherd started with a bad intermediate");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ca_init_writes_a_0600_key_in_a_0700_dir_and_never_overwrites_a_root() {
    let t = TempDir::new("fleet-init");
    let root = t.path().join("offline/root");
    let out = ok(&[
        "ca",
        "init",
        "--out",
        p(&root),
        "--trust-domain",
        TD,
        "--ttl",
        "2y",
    ]);
    assert!(out.contains("trust domain: fleet.test"), "{out}");
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("root.key")), 0o600);
    let before = fs::read(root.join("root.key")).unwrap();
    let again = tether(&["ca", "init", "--out", p(&root), "--trust-domain", TD]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(
        fs::read(root.join("root.key")).unwrap(),
        before,
        "the root key was replaced"
    );
    let root_der = der(&root.join("root.pem"));
    let (_, x) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    let bc = x.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca && bc.path_len_constraint == Some(1), "{bc:?}");
    assert_eq!(x.subject().as_raw(), x.issuer().as_raw());
    // Everything in the directory is ours: no temporary files left behind.
    let mut names: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["root.key", "root.pem"]);
}

#[test]
fn ca_commands_refuse_open_directories_and_readable_root_keys() {
    let t = TempDir::new("fleet-perm");
    let open = t.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    let e = tether(&["ca", "init", "--out", p(&open), "--trust-domain", TD]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("chmod 700"));
    assert!(!open.join("root.key").exists());

    fleet(t.path(), &[], "1d");
    fs::set_permissions(
        t.path().join("root/root.key"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = tether(&[
        "ca",
        "intermediate",
        "--host",
        "a",
        "--root",
        p(&t.path().join("root")),
        "--out",
        p(&t.path().join("a")),
    ]);
    assert!(
        !e.status.success() && String::from_utf8_lossy(&e.stderr).contains("chmod 600"),
        "{e:?}"
    );
    assert!(!t.path().join("a/intermediate.key").exists());

    let (root, b) = (t.path().join("root"), t.path().join("b"));
    for bad in [["--ttl", "91d"], ["--host", "../x"]] {
        let mut args = vec!["ca", "intermediate", "--root", p(&root), "--out", p(&b)];
        if bad[0] != "--host" {
            args.extend(["--host", "b"]);
        }
        args.extend(bad);
        assert!(!tether(&args).status.success(), "{args:?}");
    }
}

#[test]
fn intermediate_is_a_path_len_0_ca_of_the_roots_trust_domain_with_a_short_ttl() {
    let t = TempDir::new("fleet-int");
    fleet(t.path(), &["db-1"], "2h");
    let a = t.path().join("db-1");
    assert_eq!(mode(&a), 0o700);
    assert_eq!(mode(&a.join("intermediate.key")), 0o600);
    assert_eq!(
        fs::read(a.join("bundle.pem")).unwrap(),
        fs::read(t.path().join("root/root.pem")).unwrap()
    );
    let root_der = der(&t.path().join("root/root.pem"));
    let int_der = der(&a.join("intermediate.pem"));
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&int_der).unwrap();
    let bc = x.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca && bc.value.path_len_constraint == Some(0));
    let ku = x.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && !ku.value.digital_signature());
    assert_eq!(x.issuer().as_raw(), root.subject().as_raw());
    assert!(x.subject().to_string().contains("db-1"), "{}", x.subject());
    let san = x.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        [GeneralName::URI("spiffe://fleet.test")]
    );
    let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    assert!(
        (7200..=7200 + 61).contains(&life),
        "lifetime {life}s (2h + 60s backdating)"
    );
    assert!(
        x.name_constraints().unwrap().is_none(),
        "see fleet/mod.rs: webpki fails closed on URI constraints"
    );

    // Re-issuing (rotation) replaces the intermediate and its key; the root is untouched.
    let old_key = fs::read(a.join("intermediate.key")).unwrap();
    fleet_reissue(t.path(), "db-1");
    assert_ne!(fs::read(a.join("intermediate.key")).unwrap(), old_key);
    assert_ne!(der(&a.join("intermediate.pem")), int_der);
    assert_eq!(der(&t.path().join("root/root.pem")), root_der);
}

fn fleet_reissue(dir: &Path, host: &str) {
    ok(&[
        "ca",
        "intermediate",
        "--host",
        host,
        "--root",
        p(&dir.join("root")),
        "--out",
        p(&dir.join(host)),
    ]);
}

#[test]
fn tetherd_with_an_intermediate_serves_the_chain_and_trusts_the_root() {
    let t = TempDir::new("fleet-serve");
    fleet(t.path(), &["a", "b"], "1d");
    let root_der = der(&t.path().join("root/root.pem"));
    let a = Daemon::start_with(Some(&host_config(&t.path().join("a"))), &[]);
    let b = Daemon::start_with(Some(&host_config(&t.path().join("b"))), &[]);
    let sa = a.fetch();
    let sb = b.fetch();
    for (svid, host) in [(&sa, "a"), (&sb, "b")] {
        assert_eq!(svid.cert_chain.len(), 2, "SVID + intermediate");
        assert_eq!(
            svid.cert_chain[1].0,
            der(&t.path().join(host).join("intermediate.pem"))
        );
        assert_eq!(svid.bundle.len(), 1);
        assert_eq!(
            svid.bundle[0].0, root_der,
            "the bundle is the fleet root, not the intermediate"
        );
        assert!(svid.spiffe_id.as_str().starts_with("spiffe://fleet.test/"));
    }
    // Each host's SVID verifies against the one root through its own intermediate...
    webpki_verify(
        &sa.cert_chain[0].0,
        &[sa.cert_chain[1].0.clone()],
        &root_der,
    )
    .unwrap();
    webpki_verify(
        &sb.cert_chain[0].0,
        &[sb.cert_chain[1].0.clone()],
        &root_der,
    )
    .unwrap();
    // ...and not without it, nor through the other host's.
    assert!(webpki_verify(&sa.cert_chain[0].0, &[], &root_der).is_err());
    assert!(webpki_verify(
        &sa.cert_chain[0].0,
        &[sb.cert_chain[1].0.clone()],
        &root_der
    )
    .is_err());
}

#[test]
fn tetherd_refuses_an_intermediate_that_no_bundle_root_signed() {
    let t = TempDir::new("fleet-mismatch");
    fleet(t.path(), &["a"], "1d");
    let other = TempDir::new("fleet-other");
    fleet(other.path(), &[], "1d");
    let mut cfg = host_config(&t.path().join("a"));
    cfg = cfg.replace(
        p(&t.path().join("a/bundle.pem")),
        p(&other.path().join("root/root.pem")),
    );
    let err = tetherd_refuses(t.path(), &cfg);
    assert!(err.contains("not usable with ca_bundle"), "{err}");
}

#[test]
fn tetherd_refuses_a_root_that_forbids_intermediates() {
    // A root made by tetherd itself (pathLen 0) cannot anchor a fleet: peers would reject the chain.
    let t = TempDir::new("fleet-pathlen");
    fleet(t.path(), &["a"], "1d");
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "strict root");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let strict_root = params.self_signed(&root_key).unwrap();
    let dir = t.path().join("a");
    write_intermediate(
        &dir,
        &Issuer::new(params, root_key),
        time::OffsetDateTime::now_utc() + Duration::from_secs(3600),
    );
    fs::write(
        dir.join("bundle.pem"),
        pem::encode(pem::CERTIFICATE, strict_root.der()),
    )
    .unwrap();
    let cfg = host_config(&dir);
    let err = tetherd_refuses(t.path(), &cfg);
    assert!(err.contains("pathLenConstraint 0"), "{err}");
}

#[test]
fn tetherd_refuses_an_expired_intermediate() {
    let t = TempDir::new("fleet-expired");
    fleet(t.path(), &["a"], "1d");
    let root_key =
        KeyPair::from_pem(&fs::read_to_string(t.path().join("root/root.key")).unwrap()).unwrap();
    let issuer =
        Issuer::from_ca_cert_der(&der(&t.path().join("root/root.pem")).into(), root_key).unwrap();
    let dir = t.path().join("a");
    write_intermediate(
        &dir,
        &issuer,
        time::OffsetDateTime::now_utc() - Duration::from_secs(3600),
    );
    let err = tetherd_refuses(t.path(), &host_config(&dir));
    assert!(
        err.contains("expired") || err.contains("not valid now"),
        "{err}"
    );
}

/// Replace `dir`'s intermediate with one signed by `issuer`, valid until `not_after`.
fn write_intermediate(dir: &Path, issuer: &Issuer<'_, KeyPair>, not_after: time::OffsetDateTime) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "handmade intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.not_before = not_after - Duration::from_secs(7200);
    params.not_after = not_after;
    let cert = params.signed_by(&key, issuer).unwrap();
    fs::write(
        dir.join("intermediate.pem"),
        pem::encode(pem::CERTIFICATE, cert.der()),
    )
    .unwrap();
    fs::write(
        dir.join("intermediate.key"),
        pem::encode(pem::PRIVATE_KEY, &key.serialize_der()),
    )
    .unwrap();
}

/// Leaf params for an SVID `id`.
fn svid_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

fn host_issuer(host_dir: &Path) -> Issuer<'static, KeyPair> {
    let key =
        KeyPair::from_pem(&fs::read_to_string(host_dir.join("intermediate.key")).unwrap()).unwrap();
    Issuer::from_ca_cert_der(&der(&host_dir.join("intermediate.pem")).into(), key).unwrap()
}

#[test]
fn a_stolen_intermediate_key_cannot_mint_a_sub_ca() {
    // pathLenConstraint 0: a host's intermediate signs SVIDs only. A sub-CA under it (to hide
    // issuance from the host's tetherd, or outlive the intermediate) is rejected by webpki.
    let t = TempDir::new("fleet-subca");
    fleet(t.path(), &["a"], "1d");
    let a = t.path().join("a");
    let int_der = der(&a.join("intermediate.pem"));
    let sub_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut sub = CertificateParams::default();
    sub.distinguished_name
        .push(DnType::CommonName, "rogue sub-CA");
    sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let sub_cert = sub.signed_by(&sub_key, &host_issuer(&a)).unwrap();
    let sub_issuer = Issuer::from_ca_cert_der(sub_cert.der(), sub_key).unwrap();
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = svid_params("spiffe://fleet.test/rogue")
        .signed_by(&leaf_key, &sub_issuer)
        .unwrap();
    let root_der = der(&t.path().join("root/root.pem"));
    let e = webpki_verify(
        leaf.der(),
        &[sub_cert.der().to_vec(), int_der.clone()],
        &root_der,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            webpki::Error::UnknownIssuer | webpki::Error::PathLenConstraintViolated
        ),
        "{e:?}"
    );
    // The same leaf signed by the intermediate directly is fine (the control).
    let ok_leaf = svid_params("spiffe://fleet.test/ok")
        .signed_by(&leaf_key, &host_issuer(&a))
        .unwrap();
    webpki_verify(ok_leaf.der(), &[int_der], &root_der).unwrap();
}

#[test]
fn webpki_rejects_every_uri_san_under_a_uri_name_constrained_ca() {
    // Why `tether ca intermediate` sets no URI name constraint: rustls-webpki 0.103 does not
    // implement URI constraints and fails closed, so even a matching SVID is rejected. If this
    // test starts failing, webpki has learned URI constraints and the intermediate can carry one.
    let t = TempDir::new("fleet-nc");
    fleet(t.path(), &[], "1d");
    let root_key =
        KeyPair::from_pem(&fs::read_to_string(t.path().join("root/root.key")).unwrap()).unwrap();
    let root_der = der(&t.path().join("root/root.pem"));
    let root = Issuer::from_ca_cert_der(&root_der.clone().into(), root_key).unwrap();
    // NameConstraints { permittedSubtrees [0] { GeneralSubtree { uniformResourceIdentifier [6] "fleet.test" } } }
    let nc = [
        &[0x30, 0x10, 0xa0, 0x0e, 0x30, 0x0c, 0x86, 0x0a][..],
        b"fleet.test",
    ]
    .concat();
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], nc);
    ext.set_criticality(true);
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name
        .push(DnType::CommonName, "constrained");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ip.custom_extensions = vec![ext];
    let int = ip.signed_by(&int_key, &root).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(int.der()).unwrap();
    assert!(
        parsed.name_constraints().unwrap().is_some(),
        "the constraint was encoded"
    );
    let int_issuer = Issuer::from_ca_cert_der(int.der(), int_key).unwrap();
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = svid_params("spiffe://fleet.test/inside")
        .signed_by(&leaf_key, &int_issuer)
        .unwrap();
    let e = webpki_verify(leaf.der(), &[int.der().to_vec()], &root_der).unwrap_err();
    assert_eq!(e, webpki::Error::NameConstraintViolation);
}
