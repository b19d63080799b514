//! Client assertions: the app proves its identity with a certificate instead
//! of a secret (RFC 7523, as the Microsoft identity platform expects it).
//!
//! A JWT signed with the certificate's RSA key: header `alg` (PS256 or
//! RS256), `typ: JWT` and `x5t#S256` (SHA-256 thumbprint of the certificate);
//! claims `aud` (the token endpoint), `iss` = `sub` = client ID, a unique
//! `jti`, and a five-minute validity.

use crate::config::JwtAlgorithm;
use crate::secret::Secret;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid: short, it is used once.
const VALIDITY_SECS: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("certificate: {0}")]
    Certificate(#[from] crate::tls::TlsError),
    #[error("certificate key {0}: the key must be RSA, 2048 bits or more ({1})")]
    Key(String, String),
    #[error("cannot sign the client assertion")]
    Sign,
}

/// Signs client assertions with one certificate and key.
pub struct Signer {
    key: RsaKeyPair,
    thumbprint: String,
    algorithm: JwtAlgorithm,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("x5t#S256", &self.thumbprint)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn load(cert_file: &Path, key_file: &Path, algorithm: JwtAlgorithm) -> Result<Self, AssertionError> {
        let certs = crate::tls::load_certificates(cert_file)?;
        let key = crate::tls::load_private_key(key_file)?;
        Self::from_der(&certs[0], &key, algorithm).map_err(|e| match e {
            AssertionError::Key(_, reason) => AssertionError::Key(key_file.display().to_string(), reason),
            other => other,
        })
    }

    pub fn from_der(
        cert: &CertificateDer<'_>,
        key: &PrivateKeyDer<'_>,
        algorithm: JwtAlgorithm,
    ) -> Result<Self, AssertionError> {
        let rejected = |e: ring::error::KeyRejected| AssertionError::Key(String::new(), e.to_string());
        let key = match key {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).map_err(rejected)?,
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()).map_err(rejected)?,
            _ => return Err(AssertionError::Key(String::new(), "an EC key was given".into())),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        Ok(Signer { key, thumbprint: URL_SAFE_NO_PAD.encode(digest.as_ref()), algorithm, rng: SystemRandom::new() })
    }

    /// A fresh assertion for `token_url`, valid from `now` (Unix seconds).
    pub fn assertion(&self, client_id: &str, token_url: &str, now: u64) -> Result<Secret<String>, AssertionError> {
        let alg = match self.algorithm {
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::RS256 => "RS256",
        };
        let header = serde_json::json!({ "alg": alg, "typ": "JWT", "x5t#S256": self.thumbprint });
        let mut jti = [0u8; 16];
        self.rng.fill(&mut jti).map_err(|_| AssertionError::Sign)?;
        let claims = serde_json::json!({
            "aud": token_url,
            "iss": client_id,
            "sub": client_id,
            "jti": crate::text::hex(&jti),
            "nbf": now,
            "iat": now,
            "exp": now + VALIDITY_SECS,
        });
        let signing_input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let padding: &'static dyn ring::signature::RsaEncoding = match self.algorithm {
            JwtAlgorithm::PS256 => &RSA_PSS_SHA256,
            JwtAlgorithm::RS256 => &RSA_PKCS1_SHA256,
        };
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(padding, &self.rng, signing_input.as_bytes(), &mut signature)
            .map_err(|_| AssertionError::Sign)?;
        Ok(Secret::new(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256};
    use rustls_pki_types::pem::PemObject;

    const KEY: &str = include_str!("../../tests/fixtures/certs/rsa-2048-pkcs8.pem");
    const KEY_PKCS1: &str = include_str!("../../tests/fixtures/certs/rsa-2048-pkcs1.pem");

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn assertions_verify_and_carry_the_expected_claims() {
        let cert = CertificateDer::from(b"not really a certificate, only hashed".to_vec());
        for (pem, algorithm) in [(KEY, JwtAlgorithm::PS256), (KEY_PKCS1, JwtAlgorithm::RS256)] {
            let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
            let signer = Signer::from_der(&cert, &key, algorithm).unwrap();
            let jwt = signer.assertion("client-1", "https://login.example/t/oauth2/v2.0/token", 1_700_000_000).unwrap();
            let parts: Vec<&str> = jwt.expose().split('.').collect();
            assert_eq!(parts.len(), 3);
            let header = decode(parts[0]);
            let claims = decode(parts[1]);
            let thumb = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()));
            assert_eq!(header["x5t#S256"], thumb.as_str());
            assert_eq!(header["typ"], "JWT");
            assert_eq!(claims["aud"], "https://login.example/t/oauth2/v2.0/token");
            assert_eq!((claims["iss"].as_str(), claims["sub"].as_str()), (Some("client-1"), Some("client-1")));
            assert_eq!(claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap(), VALIDITY_SECS);
            let public = RsaKeyPair::from_pkcs8(
                PrivateKeyDer::from_pem_slice(KEY.as_bytes())
                    .map(|k| match k {
                        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
                        _ => unreachable!(),
                    })
                    .unwrap()
                    .as_slice(),
            )
            .unwrap()
            .public()
            .as_ref()
            .to_vec();
            let verify_alg: &dyn ring::signature::VerificationAlgorithm = match algorithm {
                JwtAlgorithm::PS256 => &RSA_PSS_2048_8192_SHA256,
                JwtAlgorithm::RS256 => &RSA_PKCS1_2048_8192_SHA256,
            };
            assert_eq!(header["alg"], if algorithm == JwtAlgorithm::PS256 { "PS256" } else { "RS256" });
            let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
            UnparsedPublicKey::new(verify_alg, &public)
                .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
                .unwrap();
            // Every assertion is unique.
            let again =
                signer.assertion("client-1", "https://login.example/t/oauth2/v2.0/token", 1_700_000_000).unwrap();
            assert_ne!(decode(again.expose().split('.').nth(1).unwrap())["jti"], claims["jti"]);
        }
    }
}
