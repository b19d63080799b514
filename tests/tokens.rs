//! Token handling seen from clients: one request shared by concurrent logins,
//! reuse across sessions, and a fresh token after the upstream refuses one.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_logins_make_one_token_request() {
    // All from one address to one mailbox: lift the caps that would refuse that.
    let h = std::sync::Arc::new(
        Harness::with(Options {
            listener_extra: vec!["max_connections_per_ip: 1000".into()],
            top_extra: vec!["max_sessions_per_mailbox: 1000".into()],
            ..Options::default()
        })
        .await,
    );
    let logins: Vec<_> = (0..200)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.login_answer("pop3", "app", APP_PASSWORD).await })
        })
        .collect();
    for login in logins {
        assert!(login.await.unwrap().starts_with("+OK User successfully authenticated"));
    }
    assert_eq!(h.token.requests(), 1);
    assert_eq!(h.pop3.logins().len(), 200);
}

#[tokio::test]
async fn a_token_is_reused_across_sessions_and_protocols() {
    let h = Harness::start().await;
    for _ in 0..3 {
        assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
    }
    let mut c = h.connect("imap").await;
    c.expect("* OK").await;
    c.send("a LOGIN app app-pass\r\n").await;
    c.expect("a OK").await;
    assert_eq!(h.token.requests(), 1);
    let scope = h.token.forms()[0]["scope"].clone();
    assert_eq!(scope, "https://outlook.office365.com/.default");
}

#[tokio::test]
async fn a_revoked_token_is_replaced_after_one_upstream_refusal() {
    let h = Harness::start().await;
    assert!(h.login_answer("pop3", "app", APP_PASSWORD).await.starts_with("+OK"));
    h.token.revoke_all();
    assert!(h.login_answer("pop3", "app", APP_PASSWORD).await.starts_with("+OK"));
    assert_eq!(h.token.requests(), 2);
    assert_eq!(h.pop3.auth_attempts(), 3);
    assert_eq!(h.pop3.logins().len(), 2);
}
