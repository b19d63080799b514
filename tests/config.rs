//! The configuration contract: the shipped example parses, every invalid
//! fixture fails with a message naming the file, the key and the problem, and
//! `xoauth2-proxy check` reports the same with a non-zero exit status.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use xoauth2_proxy::config::{Config, Flow, LocalTls, LocalTlsProfile, UpstreamTls};
use xoauth2_proxy::protocol::Protocol;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn the_example_config_parses_with_its_documented_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
    let config = Config::load_with_env(&path, &env(&[("CONTOSO_CLIENT_SECRET", "s")])).unwrap();
    assert_eq!(config.listeners.len(), 3);
    let smtp = &config.listeners[0];
    assert_eq!(
        (smtp.protocol, smtp.upstream_tls, smtp.local_tls),
        (Protocol::Smtp, UpstreamTls::Starttls, LocalTls::None)
    );
    assert_eq!(smtp.limits.idle_timeout.as_secs(), 1800);
    assert_eq!(smtp.limits.max_line_length, 8192);
    assert_eq!((smtp.limits.max_connections, smtp.limits.max_connections_per_ip), (1000, 50));
    // The kernel's maximum, read when the listener is bound.
    assert_eq!(smtp.limits.listen_backlog, None);
    assert!(smtp.allow_from.is_empty());
    // Exchange Online's limits per mailbox: SMTP AUTH 3, IMAP 20, POP3 20.
    assert_eq!(config.session_caps, xoauth2_proxy::config::SessionCaps { smtp: 3, imap: 20, pop3: 20 });
    assert_eq!((smtp.max_sessions_per_mailbox, config.session_wait.as_secs()), (3, 20));
    assert_eq!((smtp.local_tls_profile, &smtp.tls), (LocalTlsProfile::Modern, &None));
    assert_eq!(config.login_throttle.free_failures, 3);
    assert_eq!(config.login_throttle.max_delay.as_secs(), 30);
    let imap = &config.listeners[1];
    assert_eq!((imap.protocol, imap.upstream_tls), (Protocol::Imap, UpstreamTls::Implicit));
    assert_eq!(imap.limits.preauth_timeout.as_secs(), 60);
    let id = &config.identities["contoso"];
    assert_eq!(id.flow, Flow::ClientCredentials);
    assert_eq!(
        id.token_url,
        "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token"
    );
    assert_eq!(id.scope, "https://outlook.office365.com/.default");
    assert_eq!(id.min_token_lifetime.as_secs(), 600);
    assert_eq!(config.accounts[0].smtp_user, "scanner@contoso.com");
    assert_eq!(config.shutdown_timeout.as_secs(), 30);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let delegated = &config.identities["fabrikam"];
    assert_eq!(delegated.flow, Flow::RefreshToken);
    assert!(delegated.scope.ends_with("offline_access"));
    assert_eq!(
        delegated.device_code_url,
        "https://login.microsoftonline.com/fabrikam.onmicrosoft.com/oauth2/v2.0/devicecode"
    );
    let store = config.token_store.as_ref().unwrap();
    assert_eq!(store.path, Path::new("/var/lib/xoauth2-proxy"));
    assert!(config.on_reauth_required.as_deref().unwrap().contains("XOAUTH2_PROXY_ACCOUNT"));
    assert_eq!(config.find_account("CRM").unwrap().mailbox, "sales@fabrikam.com");
    assert_eq!(config.find_account("sales@fabrikam.com").unwrap().username, "crm");
    let accounts = xoauth2_proxy::accounts::Accounts::from_config(&config);
    assert_eq!(accounts.len(), 2);
}

#[test]
fn valid_fixtures_load() {
    for path in fixtures("valid") {
        Config::load_with_env(&path, &env(&[])).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn invalid_fixtures_fail_with_file_key_and_reason() {
    let files = fixtures("invalid");
    assert!(files.len() >= 15);
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected =
            text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("first line: # expect: ...");
        let err = Config::load_with_env(&path, &env(&[])).err().unwrap_or_else(|| panic!("{} loaded", path.display()));
        let message = err.to_string();
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(message.contains(expected), "{}:\n  expected {expected:?}\n  got      {message:?}", path.display());
    }
}

const LEGACY_LISTENER: &str = "listeners:\n  - {name: printer, protocol: smtp, bind: '127.0.0.1:1465', \
    upstream: 'smtp.office365.com:587', local_tls: implicit, local_tls_profile: legacy, \
    tls: {cert_file: rsa.pem, key_file: rsa-key.pem}}\n  \
    - {name: imap, protocol: imap, bind: '127.0.0.1:1993', upstream: 'outlook.office365.com:993', local_tls: implicit}\n\
    tls: {cert_file: ec.pem, key_file: ec-key.pem}\n";

#[cfg(feature = "legacy-tls")]
#[test]
fn a_legacy_listener_has_its_own_certificate_and_a_warning() {
    let config = Config::parse(LEGACY_LISTENER, Path::new("/etc/x/c.yaml"), &env(&[])).unwrap();
    let (printer, imap) = (&config.listeners[0], &config.listeners[1]);
    assert_eq!((printer.local_tls_profile, imap.local_tls_profile), (LocalTlsProfile::Legacy, LocalTlsProfile::Modern));
    assert_eq!(config.local_tls_files(printer).unwrap().cert_file, Path::new("/etc/x/rsa.pem"));
    assert_eq!(config.local_tls_files(imap).unwrap().key_file, Path::new("/etc/x/ec-key.pem"));
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    let warning = &config.warnings[0];
    assert!(warning.starts_with("listener \"printer\" uses local_tls_profile: legacy: "), "{warning}");
    for what in ["TLS 1.0 and 1.1", "RSA key exchange", "no forward secrecy", "SHA-1 MACs", "printer VLAN"] {
        assert!(warning.contains(what), "{what}: {warning}");
    }
}

#[cfg(not(feature = "legacy-tls"))]
#[test]
fn a_legacy_listener_needs_the_cargo_feature() {
    let err = Config::parse(LEGACY_LISTENER, Path::new("c.yaml"), &env(&[])).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "c.yaml: listeners[0].local_tls_profile: this xoauth2-proxy was built without the cargo \
             feature \"legacy-tls\""
        ),
        "{err}"
    );
    assert!(err.contains("--features legacy-tls") && err.lines().count() == 1, "{err}");
}

#[test]
fn plain_passwords_and_exposed_listeners_are_warned_about() {
    let text =
        "listeners:\n  - {name: a, protocol: imap, bind: '0.0.0.0:1143', upstream: 'outlook.office365.com:993'}\n\
        identities:\n  c: {tenant: t, client_id: i, client_secret: s}\n\
        accounts:\n  - {username: u, password: p, mailbox: m@x.y, identity: c}\n";
    let config = Config::parse(text, Path::new("inline.yaml"), &env(&[])).unwrap();
    assert!(!config.listeners[0].plaintext_allowed);
    assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
    assert!(config.warnings.iter().any(|w| w.contains("plain-text password")));
    assert!(config.warnings.iter().any(|w| w.contains("logins are refused")));
}

#[test]
fn check_command_reports_problems_with_a_non_zero_status() {
    let binary = env!("CARGO_BIN_EXE_xoauth2-proxy");
    // Not every valid fixture passes `check`: it reads the files a config
    // names, and listener_own_certificate.yaml's certificates do not exist.
    let valid = fixtures("valid").into_iter().find(|p| p.ends_with("minimal.yaml")).unwrap();
    let out = Command::new(binary).args(["check", "-c"]).arg(&valid).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));

    let invalid = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/invalid/unknown_identity.yaml");
    let out = Command::new(binary).args(["check", "-c"]).arg(&invalid).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown_identity.yaml: accounts[0].identity: no identity named \"fabrikam\""), "{stderr}");

    let out = Command::new(binary).args(["check", "-c", "/nonexistent/config.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.yaml: cannot read"));
}
