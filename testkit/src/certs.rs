//! A throwaway CA and a server certificate for localhost, written to a
//! temporary directory so configs can point at the files.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;

pub struct TestPki {
    dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestPki {
    /// A CA and a leaf for `localhost`, `127.0.0.1` and `::1`.
    pub fn generate() -> Self {
        Self::for_hosts(&["localhost", "127.0.0.1", "::1"])
    }

    pub fn for_hosts(hosts: &[&str]) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "xoauth2-proxy test CA");
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let mut leaf = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).expect("SANs");
        leaf.distinguished_name.push(DnType::CommonName, hosts.first().copied().unwrap_or("localhost"));
        leaf.use_authority_key_identifier_extension = true;
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf certificate");

        let dir = tempfile::tempdir().expect("temp dir");
        let pki = TestPki { dir, ca_pem: ca_cert.pem(), cert_pem: leaf_cert.pem(), key_pem: leaf_key.serialize_pem() };
        std::fs::write(pki.ca_path(), &pki.ca_pem).expect("write CA");
        std::fs::write(pki.cert_path(), &pki.cert_pem).expect("write certificate");
        std::fs::write(pki.key_path(), &pki.key_pem).expect("write key");
        pki
    }

    /// A self-signed certificate for an existing key (PEM), e.g. the RSA key
    /// of an app registration's certificate credential.
    pub fn self_signed_for_key(key_pem: &str, name: &str) -> String {
        let key = KeyPair::from_pem(key_pem).expect("key PEM");
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("SAN");
        params.distinguished_name.push(DnType::CommonName, name);
        params.self_signed(&key).expect("self-signed certificate").pem()
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        let certs = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).expect("certificate PEM")];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM");
        Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server config"),
        )
    }

    /// A client config that trusts only this CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("CA PEM")).expect("CA");
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}
