//! Limits: line length, the pre-auth timeout (paused clock), connections per
//! listener and per address, sessions per mailbox, and delays after failures.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};
use support::*;

#[tokio::test]
async fn the_line_limit_is_configurable_and_the_session_survives_it() {
    let h = Harness::with(Options { listener_extra: vec!["max_line_length: 512".into()], ..Options::default() }).await;
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send(format!("NOOP {}\r\n", "a".repeat(600))).await;
    c.expect("500 5.5.2 Line too long").await;
    c.send(format!("NOOP {}\r\n", "a".repeat(400))).await;
    c.expect("250 2.0.0 OK").await;
}

#[tokio::test]
async fn silent_clients_are_closed_after_the_preauth_timeout() {
    let h = Harness::start().await;
    let cases =
        [("smtp", "220 ", "421 4.4.2 Timeout"), ("imap", "* OK", "* BYE Autologout"), ("pop3", "+OK", "-ERR Timeout")];
    // Learn the upstreams' capabilities in real time first: the probe resolves
    // "localhost" on the blocking pool, and a paused clock would jump ahead
    // while it waits.
    for (listener, greeting, _) in cases {
        h.connect(listener).await.expect(greeting).await;
    }
    tokio::time::pause();
    for (listener, greeting, farewell) in cases {
        let mut c = h.connect(listener).await.patience(Duration::from_secs(3600));
        c.expect(greeting).await;
        let started = tokio::time::Instant::now();
        c.expect(farewell).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(60) && waited < Duration::from_secs(61), "{listener}: {waited:?}");
        assert!(c.closed().await);
    }
}

#[tokio::test]
async fn connections_are_capped_per_address_and_per_listener() {
    let h =
        Harness::with(Options { listener_extra: vec!["max_connections_per_ip: 2".into()], ..Options::default() }).await;
    let mut first = h.connect("smtp").await;
    first.expect("220 ").await;
    let mut second = h.connect("smtp").await;
    second.expect("220 ").await;
    let mut third = h.connect("smtp").await;
    third.expect("421 4.7.0 Too many connections").await;
    assert!(third.closed().await);
    // Other listeners count separately; a closed connection frees its place.
    h.connect("imap").await.expect("* OK").await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.connect("smtp").await.expect("220 ").await;

    let h = Harness::with(Options { listener_extra: vec!["max_connections: 1".into()], ..Options::default() }).await;
    let mut only = h.connect("pop3").await;
    only.expect("+OK").await;
    let mut refused = h.connect("pop3").await;
    refused.expect("-ERR [SYS/TEMP] Too many connections").await;
    let mut imap = h.connect("imap").await;
    imap.expect("* OK").await;
    let mut refused = h.connect("imap").await;
    refused.expect("* BYE [UNAVAILABLE] Too many connections").await;
}

async fn pop3_session(h: &Harness) -> TestClient<tokio::net::TcpStream> {
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    c
}

#[tokio::test]
async fn upstream_sessions_are_capped_per_mailbox_and_protocol_and_wait_for_a_place() {
    let h = Harness::with(Options {
        top_extra: vec!["max_sessions_per_mailbox: 2".into(), "session_wait: 1s".into()],
        ..Options::default()
    })
    .await;
    let mut a = pop3_session(&h).await;
    a.expect("+OK").await;
    let mut b = pop3_session(&h).await;
    b.expect("+OK").await;
    // The third waits for the whole session_wait, then gets the temporary failure.
    let started = Instant::now();
    let mut c = pop3_session(&h).await;
    c.expect("-ERR [IN-USE]").await;
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    // The cap is per protocol: IMAP for the same mailbox has its own places.
    assert!(h.login_answer("imap", "app", APP_PASSWORD).await.starts_with("a OK"));
    // Another mailbox is not affected.
    assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
    assert_eq!(h.pop3.logins().iter().filter(|u| *u == SHARED_MAILBOX).count(), 2);
    // A session that ends gives its place to the one waiting.
    let waiting = tokio::spawn(async move {
        c.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
        c.expect("+OK").await;
        c.line().await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.send("QUIT\r\n").await;
    drop(a);
    assert!(waiting.await.unwrap().starts_with("+OK"));
}

#[tokio::test]
async fn repeated_failures_are_slowed_down_and_logged_per_address_and_user() {
    let throttle = "login_throttle: {free_failures: 1, initial_delay: 300ms, max_delay: 600ms}";
    let h = Harness::with(Options { top_extra: vec![throttle.into()], ..Options::default() }).await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    let mut timings = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        c.send("USER printer\r\nPASS wrong\r\n").await;
        c.expect("+OK").await;
        c.expect("-ERR [AUTH]").await;
        timings.push(started.elapsed());
    }
    assert!(timings[0] < Duration::from_millis(250), "{timings:?}");
    assert!(timings[1] >= Duration::from_millis(300) && timings[1] < Duration::from_millis(550), "{timings:?}");
    assert!(timings[2] >= Duration::from_millis(600), "{timings:?}");
    // A new connection from the same address keeps the delay; the right
    // password still works and clears the username's record.
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER printer\r\nPASS {PRINTER_PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    c.expect("+OK").await;
}
