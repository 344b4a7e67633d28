//! TLS to PostgreSQL, chosen by the URL's `sslmode` as libpq reads it:
//!
//! - `disable`: never.
//! - `prefer` (the default): when the server offers it, encrypted but not
//!   verified (as libpq does).
//! - `require`: always, not verified, unless `sslrootcert` is given (then
//!   as `verify-ca`).
//! - `verify-ca`: always, the server's chain checked against `sslrootcert`
//!   (a PEM file) or the system's trusted roots.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host.
//!
//! tokio-postgres knows only the first three and no root certificates, so
//! `sslmode` and `sslrootcert` are taken off the URL here. rustls (on
//! aws-lc-rs), no OpenSSL.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{BackendError, StoreError};

/// The connector every connection of a store uses.
pub(super) type Tls = MakeRustlsConnect;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Not at all: encryption only.
    Nothing,
    /// Its chain, not its name.
    Chain,
    /// Its chain and its name.
    Full,
}

fn bad(message: impl Into<String>) -> StoreError {
    BackendError::Tls(message.into()).into()
}

/// Parses a `postgres://` URL (or a libpq key-value string, which
/// tokio-postgres reads with `sslmode` up to `require`) into connection
/// settings and the TLS connector they need.
///
/// # Errors
/// A malformed URL, an unknown `sslmode`, an unreadable `sslrootcert`.
pub(super) fn configure(url: &str) -> Result<(tokio_postgres::Config, Tls), StoreError> {
    let (rest, mode, root_file) = split_tls_options(url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(super::postgres)?;
    let verify = match mode.as_deref() {
        None | Some("prefer") => {
            config.ssl_mode(SslMode::Prefer);
            Verify::Nothing
        }
        Some("disable") => {
            config.ssl_mode(SslMode::Disable);
            Verify::Nothing
        }
        Some("allow") => {
            // libpq's "plain text unless the server insists": tokio-postgres
            // has no such mode; the nearest safe one.
            config.ssl_mode(SslMode::Prefer);
            Verify::Nothing
        }
        Some("require") => {
            config.ssl_mode(SslMode::Require);
            if root_file.is_some() {
                Verify::Chain
            } else {
                Verify::Nothing
            }
        }
        Some("verify-ca") => {
            config.ssl_mode(SslMode::Require);
            Verify::Chain
        }
        Some("verify-full") => {
            config.ssl_mode(SslMode::Require);
            Verify::Full
        }
        Some(other) => {
            return Err(bad(format!(
                "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    Ok((config, connector(verify, root_file.as_deref())?))
}

/// The URL without `sslmode` and `sslrootcert`, and their values.
fn split_tls_options(url: &str) -> Result<(String, Option<String>, Option<String>), StoreError> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_owned(), None, None));
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "sslmode" => mode = Some(value.into_owned()),
            "sslrootcert" => root = Some(value.into_owned()),
            _ => {
                kept.append_pair(&key, &value);
                any = true;
            }
        }
    }
    if root.as_deref() == Some("system") {
        // libpq's name for the system's roots: what is used without a file.
        root = None;
        if mode.is_none() {
            mode = Some("verify-full".into());
        }
    }
    let rest = if any {
        format!("{base}?{}", kept.finish())
    } else {
        base.to_owned()
    };
    Ok((rest, mode, root))
}

/// The trusted roots: the PEM file's certificates, or the system's.
fn roots(file: Option<&str>) -> Result<RootCertStore, StoreError> {
    let mut roots = RootCertStore::empty();
    match file {
        Some(path) => {
            crate::tls_roots::add_pem_file(&mut roots, std::path::Path::new(path))
                .map_err(|e| bad(format!("sslrootcert {e}")))?;
        }
        None => {
            if crate::tls_roots::add_system_roots(&mut roots) == 0 {
                return Err(bad(
                    "no trusted root certificates on this system (give sslrootcert=<PEM file>)",
                ));
            }
        }
    }
    Ok(roots)
}

fn connector(verify: Verify, root_file: Option<&str>) -> Result<Tls, StoreError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(Unverified { provider }),
        Verify::Chain | Verify::Full => {
            let checks =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(root_file)?), provider)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
            if verify == Verify::Full {
                checks
            } else {
                Arc::new(ChainOnly { checks })
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `prefer` and `require` without roots: the connection is encrypted and
/// its handshake signed by the key the server presented, but who presented
/// it is not checked (libpq's semantics for these modes).
#[derive(Debug)]
struct Unverified {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not
/// checked.
#[derive(Debug)]
struct ChainOnly {
    checks: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .checks
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.checks.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.checks.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.checks.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_come_off_the_url_and_the_rest_stays() {
        let (rest, mode, root) = split_tls_options(
            "postgres://u:p@db:5432/gust?sslmode=verify-full&application_name=gust&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/gust?application_name=gust");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, root) = split_tls_options("postgres://db/gust").unwrap();
        assert_eq!(
            (rest.as_str(), mode, root),
            ("postgres://db/gust", None, None)
        );
        // libpq's `sslrootcert=system` means the system roots, verified fully.
        let (_, mode, root) = split_tls_options("postgres://db/gust?sslrootcert=system").unwrap();
        assert_eq!((mode.as_deref(), root), (Some("verify-full"), None));
    }

    #[test]
    fn modes_set_what_tokio_postgres_does_and_bad_ones_are_refused() {
        let (config, _) = configure("postgres://db/gust?sslmode=disable").unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
        let (config, _) = configure("postgres://db/gust").unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Prefer);
        let (config, _) = configure("postgres://db/gust?sslmode=require").unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        let error = configure("postgres://db/gust?sslmode=sometimes")
            .err()
            .unwrap();
        assert!(error.to_string().contains("sometimes"), "{error}");
        let error = configure("postgres://db/gust?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
            .err()
            .unwrap();
        assert!(error.to_string().contains("/nonexistent.pem"), "{error}");
    }
}
