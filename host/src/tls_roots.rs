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

/// A TLS client configuration (rustls on aws-lc-rs) trusting the system's
/// roots plus those of `ca_file`; no ALPN (the caller sets what it speaks).
/// `Err` names the CA file and what is wrong with it.
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let system = add_system_roots(&mut roots);
    if let Some(path) = ca_file {
        add_pem_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        tracing::warn!(
            "no trusted root certificates: HTTPS connections will fail until the system has some or --ca-file names a CA"
        );
    }
    tracing::debug!(system, total = roots.len(), "TLS roots loaded");
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
