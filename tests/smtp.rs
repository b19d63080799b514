//! SMTP through the proxy: every client mechanism, capability fidelity, and
//! each row of the DESIGN.md error table.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use testkit::{Fault, Proto, UpstreamOptions};

async fn ehlo(c: &mut TestClient<tokio::net::TcpStream>) -> Vec<String> {
    c.expect("220 ").await;
    c.send("EHLO printer.lan\r\n").await;
    c.until("250 ").await
}

#[tokio::test]
async fn auth_plain_with_initial_response_and_capability_fidelity() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    let caps = ehlo(&mut c).await;
    let caps: Vec<&str> = caps.iter().map(|l| &l[4..]).collect();
    for ext in
        ["SIZE 157286400", "PIPELINING", "8BITMIME", "SMTPUTF8", "CHUNKING", "DSN", "ENHANCEDSTATUSCODES", "BINARYMIME"]
    {
        assert!(caps.contains(&ext), "{ext} missing from {caps:?}");
    }
    assert!(caps.contains(&"AUTH PLAIN LOGIN"), "{caps:?}");
    assert!(!caps.iter().any(|c| c.contains("XOAUTH2") || *c == "STARTTLS"), "{caps:?}");

    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("235 2.7.0").await;
    // Spliced: the echo upstream returns what we send.
    c.send("MAIL FROM:<scanner@contoso.example>\r\n").await;
    assert_eq!(c.line().await, "MAIL FROM:<scanner@contoso.example>");
    assert_eq!(h.smtp.logins(), [SMTP_USER]);
    // The upstream heard our client's EHLO name, before and after STARTTLS.
    let names = h.smtp.ehlo_names();
    assert!(names.ends_with(&["printer.lan".to_string(), "printer.lan".to_string()]), "{names:?}");
}

#[tokio::test]
async fn auth_plain_with_continuation() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send("AUTH PLAIN\r\n").await;
    assert_eq!(c.line().await, "334 ");
    c.send(format!("{}\r\n", plain("app", APP_PASSWORD))).await;
    c.expect("235 ").await;
    assert_eq!(h.smtp.logins(), [SHARED_MAILBOX]);
}

#[tokio::test]
async fn auth_login_two_steps_and_with_initial_username() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send("AUTH LOGIN\r\n").await;
    assert_eq!(c.line().await, "334 VXNlcm5hbWU6");
    c.send(format!("{}\r\n", b64(b"printer"))).await;
    assert_eq!(c.line().await, "334 UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(PRINTER_PASSWORD.as_bytes()))).await;
    c.expect("235 ").await;

    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send(format!("AUTH LOGIN {}\r\n", b64(b"PRINTER"))).await;
    assert_eq!(c.line().await, "334 UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(PRINTER_PASSWORD.as_bytes()))).await;
    c.expect("235 ").await;
    assert_eq!(h.smtp.logins(), [SMTP_USER, SMTP_USER]);
}

#[tokio::test]
async fn commands_before_auth_get_authenticate_first() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    for cmd in ["MAIL FROM:<a@b.c>", "RCPT TO:<a@b.c>", "DATA", "BDAT 10 LAST"] {
        c.send(format!("{cmd}\r\n")).await;
        c.expect("530 5.7.0").await;
    }
    c.send("QUIT\r\n").await;
    c.expect("221 ").await;
    assert_eq!(h.smtp.auth_attempts(), 0);
}

#[tokio::test]
async fn wrong_password_is_535_and_costs_no_token() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", "wrong"))).await;
    c.expect("535 5.7.8").await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("nobody", "x"))).await;
    c.expect("535 5.7.8").await;
    assert_eq!(h.token.requests(), 0);
    assert_eq!(h.smtp.auth_attempts(), 0);
    // The third failure closes the connection.
    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", "again"))).await;
    c.expect("535 5.7.8").await;
    c.expect("421 4.7.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn token_endpoint_down_or_slow_is_454() {
    for fault in [Fault::Status(503), Fault::Hangup, Fault::Delay(std::time::Duration::from_secs(4))] {
        let h = Harness::start().await;
        h.token.set_fault(Some(fault.clone()));
        let mut c = h.connect("smtp").await;
        ehlo(&mut c).await;
        c.send(format!("AUTH PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
        c.expect("454 4.7.0").await;
        // Logins during the backoff that follows share the failure: the
        // endpoint is not asked again at once.
        let mut c = h.connect("smtp").await;
        ehlo(&mut c).await;
        c.send(format!("AUTH PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
        c.expect("454 4.7.0").await;
        assert_eq!(h.token.requests(), 1, "{fault:?}");
    }
}

#[tokio::test]
async fn upstream_refusing_a_fresh_token_is_535_after_one_retry() {
    let h = Harness::start().await;
    h.smtp.set_refuse_all(true);
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("535 5.7.8").await;
    assert_eq!(h.smtp.auth_attempts(), 2, "one retry with a fresh token");
    assert_eq!(h.token.requests(), 2);
}

#[tokio::test]
async fn upstream_temporary_failure_is_454() {
    let h = Harness::start().await;
    h.smtp.set_temporary_failure(true);
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("454 4.7.0").await;
    assert_eq!(h.smtp.auth_attempts(), 1, "a temporary failure is not retried");
}

#[tokio::test]
async fn upstream_unreachable_is_421() {
    let mut options = Options::default();
    options.upstream_override.insert("smtp", closed_port().await);
    let h = Harness::with(options).await;
    let mut c = h.connect("smtp").await;
    c.expect("421 4.4.2").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn upstream_tls_failure_is_421() {
    let h = Harness::with(Options { untrusted_upstream: true, ..Options::default() }).await;
    let mut c = h.connect("smtp").await;
    c.expect("421 4.4.2").await;
    assert_eq!(h.smtp.auth_attempts(), 0);
}

#[tokio::test]
async fn upstream_lost_after_greeting_is_421_at_auth() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    // Capabilities are cached; the upstream now goes away.
    h.smtp.stop();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("421 4.4.2").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn upstream_data_injected_after_starttls_is_refused() {
    let mut smtp = UpstreamOptions::new(Proto::Smtp);
    smtp.inject_after_starttls = true;
    let h = Harness::with(Options { smtp, ..Options::default() }).await;
    let mut c = h.connect("smtp").await;
    c.expect("421 4.4.2").await;
    assert_eq!(h.smtp.auth_attempts(), 0);
}

#[tokio::test]
async fn long_lines_and_garbage_are_500_and_the_session_survives() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send(format!("NOOP {}\r\n", "x".repeat(20_000))).await;
    c.expect("500 5.5.2").await;
    c.send("\x01\x02garbage\r\n").await;
    c.expect("500 5.5.2").await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("235 ").await;
}

#[tokio::test]
async fn cancelled_and_undecodable_sasl() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    ehlo(&mut c).await;
    c.send("AUTH LOGIN\r\n*\r\n").await;
    c.expect("334 ").await;
    c.expect("501 5.0.0").await;
    c.send("AUTH PLAIN %%%\r\n").await;
    c.expect("501 5.5.2").await;
    c.send("AUTH CRAM-MD5\r\n").await;
    c.expect("504 5.5.4").await;
}
