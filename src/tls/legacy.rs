//! The legacy TLS profile (`local_tls_profile: legacy`, cargo feature
//! `legacy-tls`): OpenSSL serving TLS 1.0 to 1.3, with RSA key exchange, to
//! printers and scanners whose TLS stack stopped in the early 2010s. rustls
//! will never speak TLS 1.0/1.1 or RSA key exchange, so this is the one place
//! the proxy uses OpenSSL (vendored: built from source and linked in).
//!
//! Everything that decides what is offered is set here, at run time, on the
//! context: the protocol range, the security level, the suites and their
//! order, the groups, renegotiation. Neither the vendored OpenSSL's
//! compile-time defaults nor an `openssl.cnf` on the host can widen or narrow
//! it behind the configuration's back.

use super::TlsError;
use openssl::pkey::{Id, PKey, Private};
use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslOptions, SslVersion};
use openssl::x509::X509;
use std::path::Path;

/// The suites for TLS 1.2 and older, in the server's order of preference
/// (which wins: `CIPHER_SERVER_PREFERENCE`). Forward-secret ECDHE first, so
/// a client that can do better does; then RSA key exchange, which is what
/// Ricoh, Xerox, Kyocera and Sharp devices of that era offer: AES-GCM for
/// the TLS 1.2 ones, AES-CBC with SHA-256 or SHA-1 MACs (`AES128-SHA`,
/// `AES256-SHA`: TLS 1.0/1.1 have nothing else).
///
/// Left out on purpose: 3DES (`DES-CBC3-SHA`, Sweet32: 64-bit blocks, and
/// every device that has it also has AES, which TLS has carried since 2002),
/// RC4, export and NULL suites, anonymous and static DH, and CAMELLIA, SEED
/// and ARIA, which no such device needs. TLS 1.3 keeps OpenSSL's own suites.
pub const CIPHERS: &str = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305:\
    ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:\
    AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA";

/// Key exchange groups for ECDHE, best first.
const GROUPS: &str = "X25519:P-256:P-384";

/// The smallest RSA key accepted for the certificate. Security level 0 (which
/// TLS 1.0/1.1 need, for their MD5/SHA-1 handshake hashes) would let OpenSSL
/// take any size, so the floor is kept here.
pub const MIN_RSA_BITS: u32 = 2048;

/// A server context for the legacy profile from a PEM certificate chain
/// (leaf first) and its RSA private key.
pub fn context(cert_file: &Path, key_file: &Path) -> Result<SslContext, TlsError> {
    let (leaf, chain) = load_chain(cert_file)?;
    let key = load_rsa_key(key_file)?;
    let fail = |what: &str, e: openssl::error::ErrorStack| TlsError::Legacy(format!("{what}: {e}"));
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(|e| fail("OpenSSL", e))?;
    // Level 0: OpenSSL 3 refuses TLS 1.0/1.1 (MD5-SHA1 and SHA-1 in the
    // handshake) and SHA-1 suites at level 1 and above.
    b.set_security_level(0);
    b.set_min_proto_version(Some(SslVersion::TLS1)).map_err(|e| fail("TLS 1.0 floor", e))?;
    // TLS 1.3 stays on: a modern client on the same listener gets it.
    b.set_max_proto_version(Some(SslVersion::TLS1_3)).map_err(|e| fail("TLS 1.3 ceiling", e))?;
    b.set_cipher_list(CIPHERS).map_err(|e| fail("cipher list", e))?;
    b.set_groups_list(GROUPS).map_err(|e| fail("groups", e))?;
    b.set_options(
        SslOptions::CIPHER_SERVER_PREFERENCE
            // Printers never renegotiate; client-initiated renegotiation is
            // a CPU cost an attacker could make the proxy pay at will.
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::NO_COMPRESSION
            // As Apache and nginx do (SSL_OP_ALL): some old stacks choke on
            // the empty records OpenSSL would otherwise put before each
            // TLS 1.0 CBC record. They counter BEAST, which needs a script
            // of the attacker's inside the client; a printer runs none.
            | SslOptions::DONT_INSERT_EMPTY_FRAGMENTS
            | SslOptions::NO_SSLV2
            | SslOptions::NO_SSLV3,
    );
    b.set_certificate(&leaf).map_err(|e| fail(&cert_file.display().to_string(), e))?;
    for cert in chain {
        b.add_extra_chain_cert(cert).map_err(|e| fail(&cert_file.display().to_string(), e))?;
    }
    let mismatch = || {
        TlsError::Legacy(format!(
            "{} does not belong to the certificate in {}",
            key_file.display(),
            cert_file.display()
        ))
    };
    // OpenSSL 3.6 compares the key with the certificate already here; older
    // releases only in check_private_key.
    b.set_private_key(&key).map_err(|e| {
        if e.to_string().contains("key values mismatch") {
            mismatch()
        } else {
            fail(&key_file.display().to_string(), e)
        }
    })?;
    b.check_private_key().map_err(|_| mismatch())?;
    Ok(b.build())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.to_path_buf(), source })
}

/// The leaf and the rest of the chain.
fn load_chain(path: &Path) -> Result<(X509, Vec<X509>), TlsError> {
    let pem = read(path)?;
    let mut certs = X509::stack_from_pem(&pem)
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: format!("invalid PEM: {e}") })?
        .into_iter();
    let leaf = certs.next().ok_or_else(|| TlsError::NoCertificates { path: path.to_path_buf() })?;
    let public = leaf
        .public_key()
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: format!("unreadable public key: {e}") })?;
    if public.id() != Id::RSA {
        return Err(TlsError::NotRsa { path: path.to_path_buf(), found: key_kind(public.id()) });
    }
    Ok((leaf, certs.collect()))
}

/// PKCS#8 or PKCS#1, and RSA: RSA key exchange encrypts the session's
/// secret to this key, which no other kind of key can do.
fn load_rsa_key(path: &Path) -> Result<PKey<Private>, TlsError> {
    let pem = read(path)?;
    let key = PKey::private_key_from_pem(&pem).map_err(|_| TlsError::NoKey { path: path.to_path_buf() })?;
    if key.id() != Id::RSA {
        return Err(TlsError::NotRsa { path: path.to_path_buf(), found: key_kind(key.id()) });
    }
    if key.bits() < MIN_RSA_BITS {
        return Err(TlsError::Legacy(format!(
            "{}: a {}-bit RSA key is too weak; use at least {MIN_RSA_BITS} bits",
            path.display(),
            key.bits()
        )));
    }
    Ok(key)
}

fn key_kind(id: Id) -> &'static str {
    match id {
        Id::EC => "an EC (ECDSA) key",
        Id::ED25519 => "an Ed25519 key",
        Id::ED448 => "an Ed448 key",
        Id::RSA_PSS => "an RSA-PSS key",
        Id::DSA => "a DSA key",
        _ => "a key of another kind",
    }
}

/// A new RSA private key, PKCS#8 PEM, for `gen-cert --key-type rsa`.
pub fn generate_rsa_key(bits: u32) -> Result<String, TlsError> {
    let fail = |e: openssl::error::ErrorStack| TlsError::Legacy(format!("cannot generate an RSA key: {e}"));
    let rsa = openssl::rsa::Rsa::generate(bits).map_err(fail)?;
    let key = PKey::from_rsa(rsa).map_err(fail)?;
    let pem = key.private_key_to_pem_pkcs8().map_err(fail)?;
    String::from_utf8(pem).map_err(|_| TlsError::Legacy("OpenSSL wrote a key that is not PEM text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/certs").join(name)
    }

    #[test]
    fn rsa_certificates_load_with_pkcs8_and_pkcs1_keys() {
        for key in ["rsa-2048-pkcs8.pem", "rsa-2048-pkcs1.pem"] {
            context(&fixture("rsa-2048-cert.pem"), &fixture(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }

    #[test]
    fn other_keys_are_refused_with_the_reason() {
        let err = context(&fixture("ec-p256-cert.pem"), &fixture("ec-p256-sec1.pem")).unwrap_err();
        assert!(matches!(err, TlsError::NotRsa { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("ec-p256-cert.pem") && text.contains("EC (ECDSA)") && text.contains("RSA"), "{text}");
        // An RSA certificate with an EC key: the key is named.
        let err = context(&fixture("rsa-2048-cert.pem"), &fixture("ec-p256-sec1.pem")).unwrap_err();
        assert!(err.to_string().contains("ec-p256-sec1.pem"), "{err}");
        let err = context(&fixture("rsa-2048-pkcs8.pem"), &fixture("rsa-2048-pkcs8.pem")).unwrap_err();
        assert!(err.to_string().contains("no certificate found"), "{err}");
        let err = context(&fixture("rsa-2048-cert.pem"), &fixture("rsa-2048-cert.pem")).unwrap_err();
        assert!(err.to_string().contains("no private key found"), "{err}");
        let err = context(Path::new("/nonexistent/cert.pem"), &fixture("rsa-2048-pkcs8.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other-key.pem");
        std::fs::write(&other, generate_rsa_key(2048).unwrap()).unwrap();
        let err = context(&fixture("rsa-2048-cert.pem"), &other).unwrap_err();
        assert!(err.to_string().contains("does not belong to the certificate"), "{err}");
    }

    #[test]
    fn short_rsa_keys_are_refused_despite_security_level_0() {
        let dir = tempfile::tempdir().unwrap();
        let weak = dir.path().join("weak-key.pem");
        std::fs::write(&weak, generate_rsa_key(1024).unwrap()).unwrap();
        let err = context(&fixture("rsa-2048-cert.pem"), &weak).unwrap_err();
        assert!(err.to_string().contains("1024-bit RSA key is too weak"), "{err}");
    }

    #[test]
    fn every_listed_suite_exists_in_this_openssl() {
        // set_cipher_list succeeds if any one name matches: check each alone,
        // so that a suite missing from the vendored build cannot go unnoticed.
        for suite in CIPHERS.split(':').map(str::trim) {
            let mut b = SslContextBuilder::new(SslMethod::tls_server()).unwrap();
            b.set_security_level(0);
            b.set_cipher_list(suite).unwrap_or_else(|e| panic!("{suite}: {e}"));
        }
        assert!(!CIPHERS.contains("DES") && !CIPHERS.contains("RC4"));
    }
}
