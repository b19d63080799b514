//! The small commands: `gen-cert` makes a certificate clients can trust and a
//! key only the proxy can read; `hash-password` makes a hash logins verify against.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use argon2::password_hash::{phc::PasswordHash, PasswordVerifier};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use support::*;
use tokio::io::AsyncWriteExt;

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"));
    cmd.env_remove("XOAUTH2_PROXY_LOG");
    cmd
}

#[tokio::test]
async fn gen_cert_makes_a_certificate_clients_can_trust() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |force: bool| {
        let mut cmd = binary();
        cmd.args(["gen-cert", "--out"]).arg(&out).args(["--host", "localhost", "--host", "127.0.0.1"]);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let first = run(false);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let (cert, key) = (out.join("local.pem"), out.join("local-key.pem"));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777, 0o644);
    assert!(String::from_utf8_lossy(&first.stdout).contains("SHA-256 fingerprint"));
    // Existing files are not replaced by accident.
    let again = run(false);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists; use --force"));
    let original = std::fs::read(&cert).unwrap();
    assert!(run(true).status.success());
    assert_ne!(std::fs::read(&cert).unwrap(), original);

    // A client that trusts local.pem completes the handshake with the proxy.
    let tls = format!("tls: {{cert_file: \"{}\", key_file: \"{}\"}}", cert.display(), key.display());
    let h = Harness::with(Options {
        listener_extra: vec!["local_tls: implicit".into()],
        top_extra: vec![tls],
        ..Options::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for c in xoauth2_proxy::tls::load_certificates(&cert).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(xoauth2_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(h.addr("smtp")).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("a client trusting local.pem accepts the proxy");
    TestClient::new(stream).expect("220 ").await;
}

#[tokio::test]
async fn hash_password_reads_stdin_and_prints_a_verifiable_hash() {
    let mut child = tokio::process::Command::from({
        let mut cmd = binary();
        cmd.arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    })
    .spawn()
    .unwrap();
    child.stdin.take().unwrap().write_all(b"correct horse \"battery\"\n").await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let parsed = PasswordHash::new(hash.trim()).unwrap();
    assert!(argon2::Argon2::default().verify_password(b"correct horse \"battery\"", &parsed).is_ok());
    assert!(argon2::Argon2::default().verify_password(b"correct horse", &parsed).is_err());

    let empty = binary().arg("hash-password").stdin(Stdio::null()).output().unwrap();
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("empty password"));
}
