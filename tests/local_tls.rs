//! TLS towards local clients: implicit TLS and STARTTLS on each protocol,
//! the STARTTLS injection defence, `require_tls`, plain-text refusal on a
//! non-loopback listener, `allow_from`, and certificate reload on SIGHUP.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use tokio::net::TcpStream;

const TLS: &str = "tls: {cert_file: \"{local_cert}\", key_file: \"{local_key}\"}";

fn tls_options(mode: &str, extra: &[&str]) -> Options {
    let mut listener_extra = vec![format!("local_tls: {mode}")];
    listener_extra.extend(extra.iter().map(|s| s.to_string()));
    Options { listener_extra, top_extra: vec![TLS.into()], ..Options::default() }
}

#[tokio::test]
async fn implicit_tls_on_each_protocol() {
    let h = Harness::with(tls_options("implicit", &[])).await;

    let mut smtp = h.connect_tls("smtp").await;
    smtp.expect("220 ").await;
    smtp.send("EHLO x\r\n").await;
    let caps = smtp.until("250 ").await;
    assert!(
        caps.iter().any(|l| l.ends_with("AUTH PLAIN LOGIN")) && !caps.iter().any(|l| l.ends_with("STARTTLS")),
        "{caps:?}"
    );
    smtp.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    smtp.expect("235 ").await;
    smtp.send("NOOP\r\n").await;
    assert_eq!(smtp.line().await, "NOOP");

    let mut imap = h.connect_tls("imap").await;
    let greeting = imap.expect("* OK [CAPABILITY ").await;
    assert!(!greeting.contains("STARTTLS") && greeting.contains("AUTH=PLAIN"), "{greeting}");
    imap.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    imap.expect("a OK").await;

    let mut pop = h.connect_tls("pop3").await;
    pop.expect("+OK").await;
    pop.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    pop.expect("+OK").await;
    pop.expect("+OK").await;

    // A client that does not speak TLS gets nothing it could misread.
    let mut plain_client = h.connect("smtp").await;
    plain_client.send("EHLO x\r\n").await;
    assert!(plain_client.closed().await);
}

#[tokio::test]
async fn starttls_on_each_protocol_then_a_fresh_login() {
    let h = Harness::with(tls_options("starttls", &[])).await;

    let mut smtp = h.connect("smtp").await;
    smtp.expect("220 ").await;
    smtp.send("EHLO x\r\n").await;
    assert!(smtp.until("250 ").await.iter().any(|l| l.ends_with("STARTTLS")));
    smtp.send("STARTTLS\r\n").await;
    smtp.expect("220 2.0.0").await;
    let mut smtp = smtp.starttls(&h.local_pki).await;
    smtp.send("EHLO x\r\n").await;
    let caps = smtp.until("250 ").await;
    assert!(!caps.iter().any(|l| l.ends_with("STARTTLS")), "{caps:?}");
    smtp.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    smtp.expect("235 ").await;

    let mut imap = h.connect("imap").await;
    assert!(imap.expect("* OK [CAPABILITY ").await.contains("STARTTLS"));
    imap.send("s STARTTLS\r\n").await;
    imap.expect("s OK").await;
    let mut imap = imap.starttls(&h.local_pki).await;
    imap.send("c CAPABILITY\r\n").await;
    assert!(!imap.expect("* CAPABILITY").await.contains("STARTTLS"));
    imap.expect("c OK").await;
    imap.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    imap.expect("a OK").await;

    let mut pop = h.connect("pop3").await;
    pop.expect("+OK").await;
    pop.send("CAPA\r\n").await;
    assert!(pop.until(".").await.iter().any(|l| l == "STLS"));
    pop.send("STLS\r\n").await;
    pop.expect("+OK").await;
    let mut pop = pop.starttls(&h.local_pki).await;
    pop.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    pop.expect("+OK").await;
    pop.expect("+OK").await;
}

#[tokio::test]
async fn bytes_sent_before_the_tls_handshake_are_refused() {
    let h = Harness::with(tls_options("starttls", &[])).await;
    let mut smtp = h.connect("smtp").await;
    smtp.expect("220 ").await;
    smtp.send("EHLO x\r\n").await;
    smtp.until("250 ").await;
    smtp.send(format!("STARTTLS\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    smtp.expect("421 4.7.0").await;
    assert!(smtp.closed().await);

    let mut imap = h.connect("imap").await;
    imap.expect("* OK").await;
    imap.send(format!("s STARTTLS\r\na LOGIN app {APP_PASSWORD}\r\n")).await;
    imap.expect("* BYE").await;
    assert!(imap.closed().await);

    let mut pop = h.connect("pop3").await;
    pop.expect("+OK").await;
    pop.send("STLS\r\nUSER app\r\n").await;
    pop.expect("-ERR").await;
    assert!(pop.closed().await);
    assert_eq!(h.smtp.auth_attempts() + h.imap.auth_attempts() + h.pop3.auth_attempts(), 0);
}

#[tokio::test]
async fn require_tls_refuses_logins_in_the_clear() {
    let h = Harness::with(tls_options("starttls", &["require_tls: true"])).await;

    let mut smtp = h.connect("smtp").await;
    smtp.expect("220 ").await;
    smtp.send("EHLO x\r\n").await;
    let caps = smtp.until("250 ").await;
    assert!(!caps.iter().any(|l| l.contains("AUTH")), "{caps:?}");
    smtp.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    smtp.expect("538 5.7.11").await;

    let mut imap = h.connect("imap").await;
    let greeting = imap.expect("* OK [CAPABILITY").await;
    assert!(greeting.contains("LOGINDISABLED") && !greeting.contains("AUTH=PLAIN"), "{greeting}");
    imap.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    imap.expect("a NO [PRIVACYREQUIRED]").await;
    imap.send("s STARTTLS\r\n").await;
    imap.expect("s OK").await;
    let mut imap = imap.starttls(&h.local_pki).await;
    imap.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    imap.expect("a OK").await;

    let mut pop = h.connect("pop3").await;
    pop.expect("+OK").await;
    pop.send("USER app\r\n").await;
    pop.expect("-ERR Authentication requires TLS").await;
    assert_eq!(h.smtp.auth_attempts() + h.pop3.auth_attempts(), 0);
}

fn not_loopback(config: &mut xoauth2_proxy::config::Config) {
    // What validation decides for a listener bound to a non-loopback address
    // without allow_plaintext_auth (the bind itself stays on loopback).
    for l in &mut config.listeners {
        l.plaintext_allowed = false;
    }
}

#[tokio::test]
async fn plain_text_passwords_are_refused_on_a_non_loopback_listener() {
    let h = Harness::with(Options { tweak: Some(not_loopback), ..Options::default() }).await;
    let mut smtp = h.connect("smtp").await;
    smtp.expect("220 ").await;
    smtp.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    smtp.until("250 ").await;
    smtp.expect("538 5.7.11 Plaintext authentication disabled").await;
    let mut imap = h.connect("imap").await;
    assert!(imap.expect("* OK [CAPABILITY").await.contains("LOGINDISABLED"));
    imap.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    imap.expect("a NO [PRIVACYREQUIRED]").await;
    let mut pop = h.connect("pop3").await;
    pop.expect("+OK").await;
    pop.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    pop.expect("-ERR [AUTH] Plaintext authentication disabled").await;

    // With STARTTLS offered, the same listener accepts logins inside TLS.
    let h = Harness::with(Options { tweak: Some(not_loopback), ..tls_options("starttls", &[]) }).await;
    let mut smtp = h.connect("smtp").await;
    smtp.expect("220 ").await;
    smtp.send("STARTTLS\r\n").await;
    smtp.expect("220 ").await;
    let mut smtp = smtp.starttls(&h.local_pki).await;
    smtp.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    smtp.until("250 ").await;
    smtp.expect("235 ").await;
}

#[tokio::test]
async fn allow_from_refuses_other_addresses_before_the_greeting() {
    let h = Harness::with(Options {
        listener_extra: vec!["allow_from: [10.0.0.0/8, \"fd00::/8\"]".into()],
        ..Options::default()
    })
    .await;
    for listener in ["smtp", "imap", "pop3"] {
        let mut c = h.connect(listener).await;
        assert!(c.try_line().await.is_none(), "{listener} greeted a refused client");
    }
    assert_eq!(h.smtp.connections(), 0, "no upstream connection for a refused client");
    let h =
        Harness::with(Options { listener_extra: vec!["allow_from: [127.0.0.0/8]".into()], ..Options::default() }).await;
    let mut c: TestClient<TcpStream> = h.connect("smtp").await;
    c.expect("220 ").await;
}

/// SIGHUP re-reads the certificate and the accounts; sessions already
/// running are not disturbed.
#[tokio::test]
async fn sighup_reloads_certificate_and_accounts_without_dropping_sessions() {
    let h = Harness::with(tls_options("implicit", &[])).await;
    // Run the real binary on a copy of the harness config with its own certificate files.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(h.local_pki.cert_path(), &cert).unwrap();
    std::fs::copy(h.local_pki.key_path(), &key).unwrap();
    let config = h
        .config_text
        .replace(&h.local_pki.cert_path().display().to_string(), &cert.display().to_string())
        .replace(&h.local_pki.key_path().display().to_string(), &key.display().to_string())
        .replace("level: debug", "level: info");
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
    let connect = |pki: &testkit::TestPki| {
        let pki_config = pki.client_config();
        async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(pki_config);
            connector.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await
        }
    };
    let mut session = TestClient::new(connect(&h.local_pki).await.unwrap());
    session.expect("+OK").await;
    session.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    session.expect("+OK").await;
    session.expect("+OK").await;

    // New certificate, new password for "app".
    let fresh = testkit::TestPki::generate();
    std::fs::copy(fresh.cert_path(), &cert).unwrap();
    std::fs::copy(fresh.key_path(), &key).unwrap();
    std::fs::write(&config_path, config.replace("password: app-pass", "password: new-pass")).unwrap();
    send_signal(child.id().unwrap(), "HUP");
    wait_for_line(&mut log, "SIGHUP: reloaded").await;

    assert!(connect(&h.local_pki).await.is_err(), "the old certificate is still served");
    let mut client = TestClient::new(connect(&fresh).await.unwrap());
    client.expect("+OK").await;
    client.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    client.expect("+OK").await;
    client.expect("-ERR [AUTH]").await;
    client.send("USER app\r\nPASS new-pass\r\n").await;
    client.expect("+OK").await;
    client.expect("+OK").await;
    // The session opened before the reload still goes through.
    session.send("STAT\r\n").await;
    assert_eq!(session.line().await, "STAT");
    child.start_kill().unwrap();
}
