//! `xoauth2-proxy gen-cert`: a self-signed certificate and key for local
//! TLS, for sites without a PKI: ECDSA P-256 by default, RSA 2048 for the
//! legacy profile (`--key-type rsa`, whose key OpenSSL generates: ring, and
//! so rcgen, cannot generate RSA keys, only sign with them).

use crate::fsutil::{write_atomically, write_atomically_with_mode};
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use std::path::Path;
use std::process::ExitCode;

/// The kind of key, and so of certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA P-256: for the default (modern) TLS profile.
    Ecdsa,
    /// RSA 2048: for `local_tls_profile: legacy` (RSA key exchange).
    Rsa,
}

impl KeyType {
    /// The two files' names: the RSA pair has its own, so that both can
    /// live in one directory.
    fn files(self) -> (&'static str, &'static str) {
        match self {
            KeyType::Ecdsa => ("local.pem", "local-key.pem"),
            KeyType::Rsa => ("local-rsa.pem", "local-rsa-key.pem"),
        }
    }
}

/// RSA keys: 2048 bits, the largest that every device of the TLS 1.0 era
/// takes, and the floor the legacy profile accepts.
const RSA_BITS: u32 = 2048;

pub fn run(out: &Path, hosts: &[String], days: u32, force: bool, key_type: KeyType) -> ExitCode {
    match generate(out, hosts, days, force, key_type) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path, hosts: &[String], days: u32, force: bool, key_type: KeyType) -> Result<(), String> {
    let hosts: Vec<String> =
        if hosts.is_empty() { vec!["localhost".into(), "127.0.0.1".into(), "::1".into()] } else { hosts.to_vec() };
    let (cert_file, key_file) = key_type.files();
    // Before anything is written: a build that cannot make the key says so.
    let key = new_key(key_type, &hosts, days)?;
    for path in [out.join(cert_file), out.join(key_file)] {
        if path.exists() && !force {
            return Err(format!("{} exists; use --force to replace it", path.display()));
        }
    }
    super::owner::check_writer(out)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    // The printed snippet goes into a config file elsewhere: absolute paths
    // mean the same from there as from here.
    let out = &std::fs::canonicalize(out).map_err(|e| format!("{}: {e}", out.display()))?;

    let (cert_path, key_path) = (out.join(cert_file), out.join(key_file));

    let mut params = CertificateParams::default();
    params.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => h.clone().try_into().map(SanType::DnsName).map_err(|e| format!("{h:?} is not a host name: {e}")),
        })
        .collect::<Result<_, String>>()?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, hosts[0].as_str());
    name.push(DnType::OrganizationName, "xoauth2-proxy (self-signed)");
    params.distinguished_name = name;
    params.key_usages = match key_type {
        KeyType::Ecdsa => vec![KeyUsagePurpose::DigitalSignature],
        // RSA key exchange encrypts the premaster secret to the key:
        // clients check for keyEncipherment before they do.
        KeyType::Rsa => vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment],
    };
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // A day of slack for clients whose clocks run behind.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));

    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the certificate: {e}"))?;
    write_atomically(&key_path, key.serialize_pem().as_bytes()).map_err(|e| e.to_string())?;
    write_atomically_with_mode(&cert_path, cert.pem().as_bytes(), 0o644).map_err(|e| e.to_string())?;
    let fingerprint: Vec<String> =
        ring::digest::digest(&ring::digest::SHA256, cert.der()).as_ref().iter().map(|b| format!("{b:02X}")).collect();
    println!("certificate: {} (valid {days} days, for {})", cert_path.display(), hosts.join(", "));
    println!("private key: {} (mode 0600)", key_path.display());
    println!("SHA-256 fingerprint: {}", fingerprint.join(":"));
    println!();
    match key_type {
        KeyType::Ecdsa => {
            println!("In the config:");
            println!("  tls:");
            println!("    cert_file: {}", cert_path.display());
            println!("    key_file: {}", key_path.display());
            println!("and `local_tls: implicit` or `local_tls: starttls` on the listeners.");
        }
        KeyType::Rsa => {
            println!("In the config, on the listener for the old devices:");
            println!("    local_tls: implicit            # or starttls");
            println!("    local_tls_profile: legacy");
            println!("    tls:");
            println!("      cert_file: {}", cert_path.display());
            println!("      key_file: {}", key_path.display());
            println!("(or as the top-level tls: if every TLS listener may use this RSA certificate).");
        }
    }
    println!("Clients must trust {} (see the README, \"Local TLS\").", cert_path.display());
    Ok(())
}

/// ECDSA P-256 from ring; RSA from OpenSSL where this build has it,
/// otherwise the openssl command that makes the same pair.
fn new_key(key_type: KeyType, hosts: &[String], days: u32) -> Result<KeyPair, String> {
    match key_type {
        KeyType::Ecdsa => KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}")),
        KeyType::Rsa => rsa_key(hosts, days),
    }
}

#[cfg(feature = "legacy-tls")]
fn rsa_key(_hosts: &[String], _days: u32) -> Result<KeyPair, String> {
    let pem = crate::tls::legacy::generate_rsa_key(RSA_BITS).map_err(|e| e.to_string())?;
    KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).map_err(|e| format!("cannot use the RSA key: {e}"))
}

#[cfg(not(feature = "legacy-tls"))]
fn rsa_key(hosts: &[String], days: u32) -> Result<KeyPair, String> {
    Err(format!(
        "this build cannot generate RSA keys (it lacks the cargo feature {}, which the legacy TLS profile needs \
         too); make the pair with openssl instead:\n  {}",
        crate::config::LEGACY_FEATURE,
        openssl_command(hosts, days)
    ))
}

/// The openssl(1) command that makes what `--key-type rsa` makes.
#[cfg_attr(feature = "legacy-tls", allow(dead_code))]
fn openssl_command(hosts: &[String], days: u32) -> String {
    let san: Vec<String> = hosts
        .iter()
        .map(|h| if h.parse::<std::net::IpAddr>().is_ok() { format!("IP:{h}") } else { format!("DNS:{h}") })
        .collect();
    let (cert, key) = KeyType::Rsa.files();
    format!(
        "openssl req -x509 -newkey rsa:{RSA_BITS} -nodes -days {days} -subj '/CN={}' -keyout {key} -out {cert} \
         -addext 'subjectAltName={}' -addext 'keyUsage=critical,digitalSignature,keyEncipherment' \
         -addext 'extendedKeyUsage=serverAuth' && chmod 0600 {key}",
        hosts.first().map_or("localhost", String::as_str),
        san.join(",")
    )
}
