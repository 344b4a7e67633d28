//! Trusted root certificates for the host's TLS clients (PostgreSQL and the
//! guests' HTTPS egress): the system's, which `rustls-native-certs` reads
//! (honouring `SSL_CERT_FILE` and `SSL_CERT_DIR`), and PEM files an operator
//! names.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// Adds every certificate of the PEM file at `path` to `roots`, returning
/// how many there were; `Err` says what is wrong with the file, naming it.
pub(crate) fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<usize, String> {
    let shown = path.display();
    let certificates = CertificateDer::pem_file_iter(path).map_err(|e| format!("{shown}: {e}"))?;
    let mut added = 0;
    for certificate in certificates {
        let certificate = certificate.map_err(|e| format!("{shown}: {e}"))?;
        roots
            .add(certificate)
            .map_err(|e| format!("{shown}: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err(format!("{shown} holds no certificate"));
    }
    Ok(added)
}

/// Adds the system's trusted roots to `roots`, returning how many could be
/// used; the ones that cannot be read are logged and skipped.
pub(crate) fn add_system_roots(roots: &mut RootCertStore) -> usize {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "a system root certificate could not be read");
    }
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    added
}
