//! The legacy TLS profile (`local_tls_profile: legacy`, cargo feature
//! `legacy-tls`): an OpenSSL client limited to what a 2010s printer offers
//! (TLS 1.0 or 1.1, RSA key exchange, `AES128-SHA`) logs in through implicit
//! TLS and STARTTLS on each protocol; the default profile refuses the same
//! handshake; the server's order puts forward secrecy first; 3DES and
//! stalled handshakes are refused or timed out; `check` warns; SIGHUP replaces the certificate.
//!
//! `cargo test --features legacy-tls --test legacy_tls` (`.ci/run` does).
#![cfg(feature = "legacy-tls")]
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;
use support::*;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/certs").join(name)
}

/// The RSA certificate (for localhost and 127.0.0.1) as the top-level `tls:`.
fn rsa_tls() -> String {
    format!(
        "tls: {{cert_file: \"{}\", key_file: \"{}\"}}",
        fixture("rsa-2048-cert.pem").display(),
        fixture("rsa-2048-pkcs8.pem").display()
    )
}

fn legacy(mode: &str, extra: &[&str]) -> Options {
    let mut listener_extra = vec![format!("local_tls: {mode}"), "local_tls_profile: legacy".to_string()];
    listener_extra.extend(extra.iter().map(|s| s.to_string()));
    Options { listener_extra, top_extra: vec![rsa_tls()], ..Options::default() }
}

/// An old device's TLS stack: exactly one protocol version and the suites
/// given, trusting `ca` (the proxy's self-signed certificate).
fn old_client(version: SslVersion, ciphers: &str, ca: &Path) -> SslConnector {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    // The client's own OpenSSL, like Debian's s_client, needs @SECLEVEL=0 to
    // offer TLS 1.0/1.1 and SHA-1 suites at all.
    b.set_security_level(0);
    b.set_min_proto_version(Some(version)).unwrap();
    b.set_max_proto_version(Some(version)).unwrap();
    b.set_cipher_list(ciphers).unwrap();
    b.set_ca_file(ca).unwrap();
    b.set_verify(SslVerifyMode::PEER);
    b.build()
}

async fn handshake(client: &SslConnector, tcp: TcpStream) -> Result<SslStream<TcpStream>, openssl::ssl::Error> {
    let ssl = client.configure().unwrap().into_ssl("localhost").unwrap();
    let mut stream = SslStream::new(ssl, tcp).unwrap();
    Pin::new(&mut stream).connect().await?;
    Ok(stream)
}

fn rsa_client(version: SslVersion, ciphers: &str) -> SslConnector {
    old_client(version, ciphers, &fixture("rsa-2048-cert.pem"))
}

/// What was negotiated, as OpenSSL names it: ("TLSv1", "AES128-SHA").
fn negotiated(stream: &SslStream<TcpStream>) -> (String, String) {
    let ssl = stream.ssl();
    (ssl.version_str().to_string(), ssl.current_cipher().map(|c| c.name().to_string()).unwrap_or_default())
}

#[tokio::test]
async fn tls1_and_tls1_1_with_rsa_key_exchange_log_in_on_each_protocol() {
    let h = Harness::with(legacy("implicit", &[])).await;
    for (version, suite, name) in [
        (SslVersion::TLS1, "AES128-SHA", "TLSv1"),
        (SslVersion::TLS1_1, "AES256-SHA", "TLSv1.1"),
        (SslVersion::TLS1_2, "AES128-GCM-SHA256", "TLSv1.2"),
    ] {
        let client = rsa_client(version, suite);

        let mut imap = TestClient::new(handshake(&client, h.connect("imap").await.stream).await.unwrap());
        assert_eq!(negotiated(&imap.stream), (name.to_string(), suite.to_string()));
        imap.expect("* OK [CAPABILITY ").await;
        imap.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
        imap.expect("a OK").await;
        imap.send("b NOOP\r\n").await;
        assert_eq!(imap.line().await, "b NOOP", "the upstream echoes after login");

        let mut pop = TestClient::new(handshake(&client, h.connect("pop3").await.stream).await.unwrap());
        pop.expect("+OK").await;
        pop.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
        pop.expect("+OK").await;
        pop.expect("+OK").await;

        let mut smtp = TestClient::new(handshake(&client, h.connect("smtp").await.stream).await.unwrap());
        smtp.expect("220 ").await;
        smtp.send("EHLO printer\r\n").await;
        smtp.until("250 ").await;
        smtp.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
        smtp.expect("235 ").await;
    }
}

#[tokio::test]
async fn starttls_on_a_legacy_listener_then_a_fresh_login() {
    let h = Harness::with(legacy("starttls", &[])).await;
    let client = rsa_client(SslVersion::TLS1, "AES128-SHA");

    let mut smtp = h.connect("smtp").await;
    smtp.expect("220 ").await;
    smtp.send("EHLO printer\r\n").await;
    assert!(smtp.until("250 ").await.iter().any(|l| l.ends_with("STARTTLS")));
    smtp.send("STARTTLS\r\n").await;
    smtp.expect("220 2.0.0").await;
    let mut smtp = TestClient::new(handshake(&client, smtp.stream).await.unwrap());
    assert_eq!(negotiated(&smtp.stream), ("TLSv1".to_string(), "AES128-SHA".to_string()));
    smtp.send("EHLO printer\r\n").await;
    let caps = smtp.until("250 ").await;
    assert!(!caps.iter().any(|l| l.ends_with("STARTTLS")), "{caps:?}");
    smtp.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    smtp.expect("235 ").await;

    let mut imap = h.connect("imap").await;
    assert!(imap.expect("* OK [CAPABILITY ").await.contains("STARTTLS"));
    imap.send("s STARTTLS\r\n").await;
    imap.expect("s OK").await;
    let mut imap = TestClient::new(handshake(&client, imap.stream).await.unwrap());
    imap.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    imap.expect("a OK").await;

    let mut pop = h.connect("pop3").await;
    pop.expect("+OK").await;
    pop.send("STLS\r\n").await;
    pop.expect("+OK").await;
    let mut pop = TestClient::new(handshake(&client, pop.stream).await.unwrap());
    pop.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    pop.expect("+OK").await;
    pop.expect("+OK").await;
}

#[tokio::test]
async fn the_default_profile_refuses_the_old_handshake() {
    // The same RSA certificate, served by rustls.
    let h = Harness::with(Options {
        listener_extra: vec!["local_tls: implicit".into()],
        top_extra: vec![rsa_tls()],
        ..Options::default()
    })
    .await;
    for (version, suite) in [(SslVersion::TLS1, "AES128-SHA"), (SslVersion::TLS1_1, "AES128-SHA")] {
        let result = handshake(&rsa_client(version, suite), h.connect("imap").await.stream).await;
        let err = result.expect_err("rustls must refuse TLS 1.0/1.1");
        // The refusal is the server's alert, not a local failure to offer.
        assert!(err.to_string().contains("alert"), "{err}");
    }
    // And RSA key exchange on TLS 1.2 as well (rustls has no such suite).
    let err = handshake(&rsa_client(SslVersion::TLS1_2, "AES128-GCM-SHA256"), h.connect("imap").await.stream)
        .await
        .expect_err("rustls must refuse RSA key exchange");
    assert!(err.to_string().contains("alert"), "{err}");
}

#[tokio::test]
async fn forward_secrecy_first_when_the_client_has_it() {
    let h = Harness::with(legacy("implicit", &[])).await;
    // The client lists RSA key exchange first; the server's order wins.
    let client = rsa_client(SslVersion::TLS1, "AES128-SHA:ECDHE-RSA-AES128-SHA");
    let stream = handshake(&client, h.connect("imap").await.stream).await.unwrap();
    assert_eq!(negotiated(&stream), ("TLSv1".to_string(), "ECDHE-RSA-AES128-SHA".to_string()));
    // A modern client on the same listener gets TLS 1.3.
    let mut modern = SslConnector::builder(SslMethod::tls_client()).unwrap();
    modern.set_ca_file(fixture("rsa-2048-cert.pem")).unwrap();
    let stream = handshake(&modern.build(), h.connect("imap").await.stream).await.unwrap();
    assert_eq!(stream.ssl().version_str(), "TLSv1.3");
}

#[tokio::test]
async fn suites_left_out_are_refused() {
    let h = Harness::with(legacy("implicit", &[])).await;
    for suite in ["DES-CBC3-SHA", "ECDHE-RSA-DES-CBC3-SHA", "NULL-SHA"] {
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_security_level(0);
        b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
        if b.set_cipher_list(suite).is_err() {
            // Not even compiled into this OpenSSL: nothing to offer.
            continue;
        }
        b.set_verify(SslVerifyMode::NONE);
        let err = handshake(&b.build(), h.connect("imap").await.stream).await.err();
        assert!(err.is_some(), "{suite} was accepted");
    }
}

#[tokio::test]
async fn a_handshake_that_stalls_is_closed_after_preauth_timeout() {
    let h = Harness::with(legacy("implicit", &["preauth_timeout: 1s"])).await;
    let mut stalled = h.connect("imap").await.patience(Duration::from_secs(5));
    // The start of a TLS record, then nothing: OpenSSL waits for the rest
    // until the handshake's timeout (the pre-auth patience) closes it.
    stalled.send([0x16, 0x03, 0x01]).await;
    assert!(stalled.closed().await);
}

#[tokio::test]
async fn an_ecdsa_certificate_is_a_config_error_for_a_legacy_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - {{name: printer, protocol: smtp, bind: '127.0.0.1:0', upstream: 'h:587', \
             local_tls: implicit, local_tls_profile: legacy}}\n  \
             - {{name: modern, protocol: imap, bind: '127.0.0.1:0', upstream: 'h:993', local_tls: implicit}}\n\
             tls: {{cert_file: \"{}\", key_file: \"{}\"}}\n",
            fixture("ec-p256-cert.pem").display(),
            fixture("ec-p256-sec1.pem").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"))
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls: for listener \"printer\" (local_tls_profile: legacy)")
            && stderr.contains("needs an RSA certificate")
            && stderr.contains("gen-cert --key-type rsa"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "the modern listener may use the ECDSA certificate: {stderr}");
}

#[tokio::test]
async fn check_warns_about_each_legacy_listener_and_names_its_certificate() {
    let h = Harness::with(Options {
        listener_extra: vec!["local_tls: implicit".into()],
        top_extra: vec![TLS_ECDSA.into()],
        ..Options::default()
    })
    .await;
    // A config whose SMTP listener alone is legacy, with its own RSA certificate.
    let text = h.config_text.replacen(
        "  - name: smtp\n",
        &format!(
            "  - name: smtp\n    local_tls_profile: legacy\n    tls: {{cert_file: \"{}\", key_file: \"{}\"}}\n",
            fixture("rsa-2048-cert.pem").display(),
            fixture("rsa-2048-pkcs1.pem").display()
        ),
        1,
    );
    std::fs::write(&h.config_path, &text).unwrap();
    let out = h.output(&["check"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("local_tls_profile: legacy:")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    for what in ["TLS 1.0 and 1.1", "no forward secrecy", "SHA-1 MACs", "printer VLAN"] {
        assert!(warnings[0].contains(what), "{what} missing: {}", warnings[0]);
    }
    let smtp = stdout.lines().find(|l| l.contains("listener \"smtp\"")).unwrap();
    assert!(smtp.contains("local_tls_profile: legacy") && smtp.contains("rsa-2048-cert.pem"), "{smtp}");
    let imap = stdout.lines().find(|l| l.contains("listener \"imap\"")).unwrap();
    assert!(!imap.contains("legacy"), "{imap}");
    let json = h.output(&["check", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let profiles: Vec<&str> =
        doc["listeners"].as_array().unwrap().iter().map(|l| l["local_tls_profile"].as_str().unwrap()).collect();
    assert_eq!(profiles, ["modern", "modern", "legacy"]);
}

const TLS_ECDSA: &str = "tls: {cert_file: \"{local_cert}\", key_file: \"{local_key}\"}";

/// SIGHUP re-reads a legacy listener's certificate; the session opened
/// before it goes on.
#[tokio::test]
async fn sighup_replaces_the_certificate_of_a_legacy_listener() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gen = |force: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"));
        cmd.args(["gen-cert", "--key-type", "rsa", "--host", "localhost", "--out"]).arg(dir.path());
        if force {
            cmd.arg("--force");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = gen(false);
    let (cert, key) = (dir.path().join("local-rsa.pem"), dir.path().join("local-rsa-key.pem"));
    assert!(printed.contains("local_tls_profile: legacy") && printed.contains(&cert.display().to_string()));
    let first = std::fs::read(&cert).unwrap();
    let config = h.config_text.replacen(
        "  - name: pop3\n",
        &format!(
            "  - name: pop3\n    local_tls: implicit\n    local_tls_profile: legacy\n    \
             tls: {{cert_file: \"{}\", key_file: \"{}\"}}\n",
            cert.display(),
            key.display()
        ),
        1,
    );
    let config = config.replace("level: debug", "level: info");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, &config).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"))
        .args(["run", "-c"])
        .arg(&config_path)
        .env("TEST_CLIENT_SECRET", testkit::token::CLIENT_SECRET)
        .env_remove("XOAUTH2_PROXY_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let port = listening_port(&mut log, "pop3").await;
    let connect = |trusted: PathBuf| async move {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        handshake(&old_client(SslVersion::TLS1, "AES128-SHA", &trusted), tcp).await
    };
    let saved = dir.path().join("first.pem");
    std::fs::write(&saved, &first).unwrap();
    let mut session = TestClient::new(connect(saved.clone()).await.unwrap());
    session.expect("+OK").await;
    session.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    session.expect("+OK").await;
    session.expect("+OK").await;

    gen(true);
    assert_ne!(std::fs::read(&cert).unwrap(), first);
    send_signal(child.id().unwrap(), "HUP");
    let reloaded = wait_for_line(&mut log, "SIGHUP: reloaded").await;
    assert!(reloaded.contains("local TLS certificate"), "{reloaded}");

    assert!(connect(saved).await.is_err(), "the old certificate is still served");
    let mut client = TestClient::new(connect(cert.clone()).await.unwrap());
    client.expect("+OK").await;
    // The session opened before the reload still goes through.
    session.send("STAT\r\n").await;
    assert_eq!(session.line().await, "STAT");
    child.start_kill().unwrap();
}
