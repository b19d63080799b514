//! TLS configuration: PEM loading (rustls-pki-types), the client config used
//! for upstreams and the token endpoint, and the server side of local TLS.
//! One crypto provider (ring) for everything rustls does; the one exception
//! is the opt-in legacy profile for old devices (`legacy`, OpenSSL).

#[cfg(feature = "legacy-tls")]
pub mod legacy;

use crate::config::{LocalTlsProfile, TlsFiles};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: no certificate found (expected PEM blocks \"BEGIN CERTIFICATE\")")]
    NoCertificates { path: PathBuf },
    #[error("{path}: no private key found (expected PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")")]
    NoKey { path: PathBuf },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error(
        "{path}: the legacy TLS profile needs an RSA certificate and key (RSA key exchange encrypts to it), \
         this is {found}; make one with `xoauth2-proxy gen-cert --key-type rsa` or \
         `openssl req -x509 -newkey rsa:2048 ...` (README, \"Legacy TLS\")"
    )]
    NotRsa { path: PathBuf, found: &'static str },
    /// OpenSSL's own complaint, with the file it concerns.
    #[error("{0}")]
    Legacy(String),
    #[error("the legacy TLS profile is not in this build (cargo feature {})", crate::config::LEGACY_FEATURE)]
    LegacyUnavailable,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default so that any library building its own
/// rustls config (reqwest) agrees with ours. Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => TlsError::Io { path: path.to_path_buf(), source },
        other => TlsError::Pem { path: path.to_path_buf(), message: format!("invalid PEM: {other:?}") },
    }
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The first private key in a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.to_path_buf() },
        other => pem_error(path, other),
    })
}

/// Trust for upstream servers and the token endpoint: the public web roots
/// plus, optionally, the certificates in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in load_certificates(path)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: path.to_path_buf(),
                message: format!("unusable CA certificate: {e}"),
            })?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What serves one listener's local TLS: rustls, or OpenSSL for the legacy
/// profile. Cheap to clone (both are reference-counted).
#[derive(Clone)]
pub enum ServerTls {
    Modern(Arc<ServerConfig>),
    #[cfg(feature = "legacy-tls")]
    Legacy(openssl::ssl::SslContext),
}

impl ServerTls {
    /// Reads the certificate and key for `profile`.
    pub fn load(profile: LocalTlsProfile, files: &TlsFiles) -> Result<ServerTls, TlsError> {
        match profile {
            LocalTlsProfile::Modern => Ok(ServerTls::Modern(server_config(&files.cert_file, &files.key_file)?)),
            #[cfg(feature = "legacy-tls")]
            LocalTlsProfile::Legacy => Ok(ServerTls::Legacy(legacy::context(&files.cert_file, &files.key_file)?)),
            // Validation refuses the profile in such a build; this keeps it refused.
            #[cfg(not(feature = "legacy-tls"))]
            LocalTlsProfile::Legacy => Err(TlsError::LegacyUnavailable),
        }
    }
}

/// The certificate local clients see (`local_tls`, modern profile).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certificates(cert_file)?;
    let key = load_private_key(key_file)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/certs").join(name)
    }

    #[test]
    fn server_keys_load_in_pkcs8_pkcs1_and_sec1() {
        install_default_provider();
        for (cert, key, kind) in [
            ("rsa-2048-cert.pem", "rsa-2048-pkcs8.pem", "PKCS#8"),
            ("rsa-2048-cert.pem", "rsa-2048-pkcs1.pem", "PKCS#1"),
            ("ec-p256-cert.pem", "ec-p256-sec1.pem", "SEC1"),
        ] {
            server_config(&fixture(cert), &fixture(key)).unwrap_or_else(|e| panic!("{kind}: {e}"));
        }
    }

    #[test]
    fn unusable_files_are_explained() {
        let err = server_config(&fixture("rsa-2048-pkcs8.pem"), &fixture("rsa-2048-pkcs8.pem")).unwrap_err();
        assert!(err.to_string().contains("no certificate found"), "{err}");
        let err = server_config(&fixture("rsa-2048-cert.pem"), &fixture("rsa-2048-cert.pem")).unwrap_err();
        assert!(err.to_string().contains("no private key found"), "{err}");
        // A key that does not belong to the certificate.
        let err = server_config(&fixture("rsa-2048-cert.pem"), &fixture("ec-p256-sec1.pem")).unwrap_err();
        assert!(!err.to_string().is_empty());
        let err = load_certificates(Path::new("/nonexistent/cert.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
