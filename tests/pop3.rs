//! POP3 through the proxy: USER/PASS, AUTH PLAIN inline and continued,
//! AUTH LOGIN, CAPA rewriting, and each row of the error table.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use testkit::{Fault, Proto, UpstreamOptions, UpstreamTls};
use tokio::net::TcpStream;

async fn assert_spliced(c: &mut TestClient<TcpStream>) {
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "STAT");
}

#[tokio::test]
async fn user_pass_and_capa() {
    let h = Harness::start().await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send("CAPA\r\n").await;
    let capa = c.until(".").await;
    for cap in ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "USER", "SASL PLAIN LOGIN"] {
        assert!(capa.iter().any(|l| l == cap), "{cap} missing from {capa:?}");
    }
    assert!(!capa.iter().any(|l| l.contains("XOAUTH2") || l == "STLS"), "{capa:?}");
    c.send("USER printer\r\n").await;
    c.expect("+OK").await;
    c.send(format!("PASS {PRINTER_PASSWORD}\r\n")).await;
    c.expect("+OK User successfully authenticated").await;
    assert_spliced(&mut c).await;
    assert_eq!(h.pop3.logins(), [MAILBOX]);
}

#[tokio::test]
async fn auth_plain_inline_and_continued() {
    let h = Harness::start().await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.expect("+OK").await;
    assert_spliced(&mut c).await;

    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send("AUTH PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(format!("{}\r\n", plain("app", APP_PASSWORD))).await;
    c.expect("+OK").await;
    assert_eq!(h.pop3.logins(), [SHARED_MAILBOX, SHARED_MAILBOX]);
}

#[tokio::test]
async fn auth_login() {
    let h = Harness::start().await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send("AUTH LOGIN\r\n").await;
    assert_eq!(c.line().await, "+ VXNlcm5hbWU6");
    c.send(format!("{}\r\n", b64(b"printer"))).await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(PRINTER_PASSWORD.as_bytes()))).await;
    c.expect("+OK").await;
    assert_spliced(&mut c).await;
}

#[tokio::test]
async fn upstream_with_stls() {
    let mut pop3 = UpstreamOptions::new(Proto::Pop3);
    pop3.tls = UpstreamTls::Starttls;
    let h = Harness::with(Options { pop3, ..Options::default() }).await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send("CAPA\r\n").await;
    let capa = c.until(".").await;
    assert!(!capa.iter().any(|l| l == "STLS"), "{capa:?}");
    c.send("USER app\r\nPASS app-pass\r\n").await;
    c.expect("+OK").await;
    c.expect("+OK").await;
    assert_spliced(&mut c).await;
}

#[tokio::test]
async fn commands_before_auth_get_authenticate_first() {
    let h = Harness::start().await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    for cmd in ["STAT", "LIST", "RETR 1", "DELE 1", "UIDL"] {
        c.send(format!("{cmd}\r\n")).await;
        c.expect("-ERR").await;
    }
    c.send("QUIT\r\n").await;
    c.expect("+OK").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn error_rows() {
    let h = Harness::start().await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    let login = format!("USER printer\r\nPASS {PRINTER_PASSWORD}\r\n");

    c.send("USER printer\r\nPASS wrong\r\n").await;
    c.expect("+OK").await;
    c.expect("-ERR [AUTH]").await;
    assert_eq!(h.token.requests(), 0);

    h.pop3.set_temporary_failure(true);
    c.send(&login).await;
    c.expect("+OK").await;
    c.expect("-ERR [SYS/TEMP]").await;
    h.pop3.set_temporary_failure(false);

    h.pop3.set_refuse_all(true);
    c.send(&login).await;
    c.expect("+OK").await;
    c.expect("-ERR [AUTH]").await;
    assert_eq!(h.pop3.auth_attempts(), 3, "temporary once, refused twice (one retry)");
    h.pop3.set_refuse_all(false);

    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER {}\r\n", "u".repeat(10_000))).await;
    c.expect("-ERR").await;
    c.send("FROB\r\n").await;
    c.expect("-ERR").await;
    c.send(&login).await;
    c.expect("+OK").await;
    c.expect("+OK").await;

    // The token endpoint down: a temporary failure (and, for the backoff
    // that follows, for every login until it ends).
    let h = Harness::start().await;
    h.token.set_fault(Some(Fault::Hangup));
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(&login).await;
    c.expect("+OK").await;
    c.expect("-ERR [SYS/TEMP]").await;
}

#[tokio::test]
async fn upstream_unreachable_is_sys_temp() {
    let mut options = Options::default();
    options.upstream_override.insert("pop3", closed_port().await);
    let h = Harness::with(options).await;
    let mut c = h.connect("pop3").await;
    c.expect("-ERR [SYS/TEMP]").await;
    assert!(c.closed().await);

    let h = Harness::with(Options { untrusted_upstream: true, ..Options::default() }).await;
    let mut c = h.connect("pop3").await;
    c.expect("-ERR [SYS/TEMP]").await;
}
