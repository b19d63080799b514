//! What devices and apps in the field do: a pool of senders on one mailbox
//! (Exchange allows 3 SMTP sessions), a collector opening many IMAP
//! connections, Exchange's own connection limit, clients on the wrong port or
//! mode, `local_tls: auto`, endless lines, and the `AUTH=` line of old clients.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TLS: &str = "tls: {cert_file: \"{local_cert}\", key_file: \"{local_key}\"}";

/// One SMTP session that logs in, uses the upstream for a moment, and quits.
async fn smtp_sender(addr: std::net::SocketAddr) -> String {
    let mut c = TestClient::new(TcpStream::connect(addr).await.unwrap()).patience(Duration::from_secs(30));
    c.expect("220 ").await;
    c.send(format!("EHLO crm\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    let answer = c.line().await;
    if answer.starts_with("235 ") {
        c.send("NOOP\r\n").await;
        assert_eq!(c.line().await, "NOOP");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    answer
}

#[tokio::test]
async fn a_pool_of_senders_on_one_mailbox_waits_for_exchanges_three_places() {
    let h = Harness::start().await;
    let addr = h.addr("smtp");
    let senders: Vec<_> = (0..12).map(|_| tokio::spawn(smtp_sender(addr))).collect();
    for s in senders {
        let answer = s.await.unwrap();
        assert!(answer.starts_with("235 "), "{answer}");
    }
    // The capability probe came and went before the logins; then never more
    // than Exchange's 3 SMTP sessions for the mailbox at once.
    assert_eq!(h.smtp.logins().len(), 12);
    assert!(h.smtp.max_open_connections() <= 3, "{} open at once", h.smtp.max_open_connections());
}

#[tokio::test]
async fn a_collector_opening_fifty_imap_connections_gets_them_all_twenty_at_a_time() {
    let h = Harness::start().await;
    let addr = h.addr("imap");
    let collectors: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = TestClient::new(TcpStream::connect(addr).await.unwrap()).patience(Duration::from_secs(30));
                c.expect("* OK").await;
                c.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
                let answer = c.line().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                answer
            })
        })
        .collect();
    for c in collectors {
        let answer = c.await.unwrap();
        assert!(answer.starts_with("a OK"), "{answer}");
    }
    assert!(h.imap.max_open_connections() <= 20, "{} open at once", h.imap.max_open_connections());
}

#[tokio::test]
async fn exchanges_own_connection_limit_is_a_temporary_failure() {
    let h = Harness::start().await;
    h.smtp.set_exchange_fault(Some(testkit::upstream::ExchangeFault::ConcurrentConnections));
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    c.expect("454 4.7.0").await;
    // Not a refused token: no second attempt with a fresh one.
    assert_eq!(h.smtp.auth_attempts(), 1);
}

/// The first bytes a TLS client sends: a handshake record (a ClientHello).
const CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0x50, 0x01, 0x00, 0x00, 0x4c, 0x03, 0x03];

#[tokio::test]
async fn a_client_on_the_wrong_port_or_mode_is_closed_at_once() {
    // A TLS client on a plain-text port.
    let h = Harness::start().await;
    for (listener, greeting) in [("smtp", "220 "), ("imap", "* OK"), ("pop3", "+OK")] {
        let mut c = h.connect(listener).await.patience(Duration::from_secs(5));
        c.expect(greeting).await;
        let started = Instant::now();
        c.send(CLIENT_HELLO).await;
        assert!(c.closed().await);
        assert!(started.elapsed() < Duration::from_secs(2), "{listener}: {:?}", started.elapsed());
    }
    // A plain-text client on an implicit-TLS port: told so in words it reads.
    let h = Harness::with(Options {
        listener_extra: vec!["local_tls: implicit".into()],
        top_extra: vec![TLS.into()],
        ..Options::default()
    })
    .await;
    for (listener, answer) in [
        ("smtp", "421 4.7.0 This port expects TLS"),
        ("imap", "* BYE This port expects TLS"),
        ("pop3", "-ERR This port expects TLS"),
    ] {
        // One that waits for a greeting, and one that speaks first.
        let mut c = h.connect(listener).await.patience(Duration::from_secs(6));
        c.expect(answer).await;
        assert!(c.closed().await);
        let mut c = h.connect(listener).await.patience(Duration::from_secs(2));
        c.send("EHLO printer\r\n").await;
        c.expect(answer).await;
        assert!(c.closed().await);
    }
}

#[tokio::test]
async fn local_tls_auto_serves_implicit_tls_plain_text_and_starttls_on_one_port() {
    let h = Harness::with(Options {
        listener_extra: vec!["local_tls: auto".into()],
        top_extra: vec![TLS.into()],
        ..Options::default()
    })
    .await;
    // Implicit TLS: the ClientHello comes first.
    let mut tls = h.connect_tls("imap").await;
    let greeting = tls.expect("* OK [CAPABILITY ").await;
    assert!(!greeting.contains("STARTTLS"), "{greeting}");
    tls.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    tls.expect("a OK").await;
    // Plain text: the client waits; the greeting comes after the short wait.
    let mut plain_client = h.connect("imap").await;
    let started = Instant::now();
    let greeting = plain_client.expect("* OK [CAPABILITY ").await;
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
    assert!(greeting.contains("STARTTLS"), "{greeting}");
    plain_client.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    plain_client.expect("a OK").await;
    // STARTTLS on the same port.
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send("EHLO x\r\nSTARTTLS\r\n").await;
    c.until("250 ").await;
    c.expect("220 ").await;
    let mut c = c.starttls(&h.local_pki).await;
    c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    c.expect("235 ").await;
}

#[tokio::test]
async fn a_line_that_never_ends_is_answered_and_closed() {
    let h = Harness::start().await;
    for (listener, greeting, answer) in [
        ("smtp", "220 ", "500 5.5.2 Line too long"),
        ("imap", "* OK", "* BAD [TOOBIG]"),
        ("pop3", "+OK", "-ERR Line too long"),
    ] {
        let mut c = h.connect(listener).await.patience(Duration::from_secs(5));
        c.expect(greeting).await;
        // 16 times the 8192-byte limit, no line end: answered long before the 60 s timeout.
        let _ = c.stream.write_all(&vec![b'A'; 16 * 8192]).await;
        c.expect(answer).await;
        assert!(c.closed().await, "{listener}");
    }
}

#[tokio::test]
async fn the_auth_equals_line_is_added_only_when_asked() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send("EHLO x\r\n").await;
    assert!(!c.until("250 ").await.iter().any(|l| l.contains("AUTH=")));
    fn on_smtp(config: &mut xoauth2_proxy::config::Config) {
        for l in &mut config.listeners {
            l.broken_sasl_auth_clients = l.protocol == xoauth2_proxy::protocol::Protocol::Smtp;
        }
    }
    let h = Harness::with(Options { tweak: Some(on_smtp), ..Options::default() }).await;
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send("EHLO x\r\n").await;
    let ehlo = c.until("250 ").await;
    assert!(
        ehlo.iter().any(|l| l == "250-AUTH PLAIN LOGIN") && ehlo.last().unwrap() == "250 AUTH=PLAIN LOGIN",
        "{ehlo:?}"
    );
}
