//! The files `tether svid --out DIR` writes (`svid.pem`, `svid.key`, `bundle.pem`), loaded for
//! rustls: the in-process handshake floor of `bench-client --rustls` and `bench-server --rustls`.

use std::io;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// `DIR/svid.pem` (the chain), `DIR/svid.key` and `DIR/bundle.pem` (every certificate a root).
pub fn load(dir: &Path) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, RootCertStore)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("svid.pem"))
        .map_err(io::Error::other)?
        .collect::<Result<_, _>>()
        .map_err(io::Error::other)?;
    let key = PrivateKeyDer::from_pem_file(dir.join("svid.key")).map_err(io::Error::other)?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("bundle.pem")).map_err(io::Error::other)? {
        roots.add(c.map_err(io::Error::other)?).map_err(io::Error::other)?;
    }
    Ok((chain, key, roots))
}
