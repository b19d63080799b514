//! `xoauth2-proxy gen-cert`: a self-signed certificate and key for local
//! TLS, for sites without a PKI.

use crate::fsutil::{write_atomically, write_atomically_with_mode};
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use std::path::Path;
use std::process::ExitCode;

const CERT_FILE: &str = "local.pem";
const KEY_FILE: &str = "local-key.pem";

pub fn run(out: &Path, hosts: &[String], days: u32, force: bool) -> ExitCode {
    match generate(out, hosts, days, force) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path, hosts: &[String], days: u32, force: bool) -> Result<(), String> {
    let hosts: Vec<String> =
        if hosts.is_empty() { vec!["localhost".into(), "127.0.0.1".into(), "::1".into()] } else { hosts.to_vec() };
    for path in [out.join(CERT_FILE), out.join(KEY_FILE)] {
        if path.exists() && !force {
            return Err(format!("{} exists; use --force to replace it", path.display()));
        }
    }
    super::owner::check_writer(out)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    // The printed snippet goes into a config file elsewhere: absolute paths
    // mean the same from there as from here.
    let out = &std::fs::canonicalize(out).map_err(|e| format!("{}: {e}", out.display()))?;

    let (cert_path, key_path) = (out.join(CERT_FILE), out.join(KEY_FILE));

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
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // A day of slack for clients whose clocks run behind.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));

    // ECDSA P-256: what ring can generate, and what TLS 1.2+ clients accept.
    // Clients limited to RSA need a key made elsewhere (see README).
    let key = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the certificate: {e}"))?;
    write_atomically(&key_path, key.serialize_pem().as_bytes()).map_err(|e| e.to_string())?;
    write_atomically_with_mode(&cert_path, cert.pem().as_bytes(), 0o644).map_err(|e| e.to_string())?;
    let fingerprint: Vec<String> =
        ring::digest::digest(&ring::digest::SHA256, cert.der()).as_ref().iter().map(|b| format!("{b:02X}")).collect();
    println!("certificate: {} (valid {days} days, for {})", cert_path.display(), hosts.join(", "));
    println!("private key: {} (mode 0600)", key_path.display());
    println!("SHA-256 fingerprint: {}", fingerprint.join(":"));
    println!();
    println!("In the config:");
    println!("  tls:");
    println!("    cert_file: {}", cert_path.display());
    println!("    key_file: {}", key_path.display());
    println!("and `local_tls: implicit` or `local_tls: starttls` on the listeners.");
    println!("Clients must trust {} (see the README, \"Local TLS\").", cert_path.display());
    Ok(())
}
