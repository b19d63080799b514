//! What a valid configuration names on disk, checked before it is used:
//! every file readable, every certificate, key and client assertion usable.
//!
//! Kept out of `config` so that parsing and validation stay pure and the
//! configuration depends on nothing above it; `check`, `run` and a reload
//! call this right after loading.

use crate::config::{ClientCredential, Config, ConfigError, LocalTls, LocalTlsProfile, Problem, TlsFiles};
use crate::tls::ServerTls;
use std::path::Path;

/// Every problem with the files `config` names, each with its key path.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    let mut add = |path: String, message: String| problems.push(Problem { path, message });
    local_tls(config, &mut add);
    if let Some(ca) = &config.upstream_ca_file {
        match readable(ca) {
            Ok(()) => {
                if let Err(e) = crate::tls::load_certificates(ca) {
                    add("upstream_ca_file".into(), e.to_string());
                }
            }
            Err(e) => add("upstream_ca_file".into(), e),
        }
    }
    for id in config.identities.values() {
        let at = |key: &str| format!("identities.{}.{key}", id.name);
        match &id.credential {
            ClientCredential::SecretFile(file) => {
                if let Err(e) = readable(file) {
                    add(at("client_secret_file"), e);
                }
            }
            ClientCredential::Certificate { cert_file, key_file, algorithm } => {
                let cert = readable(cert_file).map_err(|e| add(at("certificate.cert_file"), e)).is_ok();
                let key = readable(key_file).map_err(|e| add(at("certificate.key_file"), e)).is_ok();
                if cert && key {
                    if let Err(e) = crate::token::assertion::Signer::load(cert_file, key_file, *algorithm) {
                        add(at("certificate"), e.to_string());
                    }
                }
            }
            ClientCredential::Secret(_) | ClientCredential::None => {}
        }
    }
    if let Some(state) = &config.state {
        if let Some(crate::config::StatePassword::File(file)) = &state.password {
            if let Err(e) = readable(file) {
                add("state.password_file".into(), e);
            }
        }
        if let Some(ca) = &state.ca_file {
            match readable(ca) {
                Ok(()) => {
                    if let Err(e) = crate::tls::load_certificates(ca) {
                        add("state.ca_file".into(), e.to_string());
                    }
                }
                Err(e) => add("state.ca_file".into(), e),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { file: config.source.clone(), problems })
    }
}

/// The top-level certificate and each listener's own: readable, and usable
/// by every listener that serves it with its profile (the legacy profile
/// needs RSA). Each combination of files and profile is loaded once.
fn local_tls(config: &Config, add: &mut impl FnMut(String, String)) {
    let global = config.tls.as_ref().is_some_and(|files| usable("tls", files, add));
    let mut loaded: Vec<(LocalTlsProfile, &TlsFiles)> = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        if l.local_tls == LocalTls::None {
            continue;
        }
        let own = format!("listeners[{i}].tls");
        let (key, files) = match (&l.tls, &config.tls) {
            (Some(files), _) if usable(&own, files, add) => (own, files),
            (None, Some(files)) if global => ("tls".to_string(), files),
            _ => continue,
        };
        if loaded.contains(&(l.local_tls_profile, files)) {
            continue;
        }
        loaded.push((l.local_tls_profile, files));
        if let Err(e) = ServerTls::load(l.local_tls_profile, files) {
            let message = match (l.tls.is_some(), l.local_tls_profile) {
                (false, LocalTlsProfile::Legacy) => {
                    format!("for listener {:?} (local_tls_profile: legacy): {e}", l.name)
                }
                _ => e.to_string(),
            };
            add(key, message);
        }
    }
}

/// Both files of a certificate readable (each problem reported under `key`).
fn usable(key: &str, files: &TlsFiles, add: &mut impl FnMut(String, String)) -> bool {
    let cert = readable(&files.cert_file).map_err(|e| add(format!("{key}.cert_file"), e)).is_ok();
    let key_file = readable(&files.key_file).map_err(|e| add(format!("{key}.key_file"), e)).is_ok();
    cert && key_file
}

fn readable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn missing_and_unusable_files_are_named_by_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("not-a-cert.pem"), "hello").unwrap();
        let text =
            "listeners:\n  - {name: a, protocol: imap, bind: '127.0.0.1:0', upstream: 'h:993', local_tls: implicit}\n\
            tls: {cert_file: missing.pem, key_file: missing-key.pem}\n\
            upstream_ca_file: not-a-cert.pem\n\
            identities:\n  c: {tenant: t, client_id: i, client_secret_file: nowhere}\n  \
            d: {tenant: t, client_id: i, certificate: {cert_file: nope.pem, key_file: nope-key.pem}}\n";
        let config = Config::parse(text, &dir.path().join("c.yaml"), &HashMap::new()).unwrap();
        let err = check(&config).unwrap_err().to_string();
        for key in [
            "tls.cert_file: cannot read",
            "tls.key_file: cannot read",
            "upstream_ca_file: ",
            "identities.c.client_secret_file: cannot read",
            "identities.d.certificate.cert_file: cannot read",
        ] {
            assert!(err.contains(key), "{key} missing in:\n{err}");
        }
        assert!(err.contains("no certificate found"), "{err}");
    }
}
