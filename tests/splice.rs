//! After authentication: large payloads byte-exact both ways, pipelined
//! bytes right after the login, half-close, and the idle timeout.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn smtp_login(h: &Harness) -> TestClient<tokio::net::TcpStream> {
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send("EHLO x\r\n").await;
    c.until("250 ").await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.expect("235 ").await;
    c
}

/// A payload that is not periodic, so a dropped or repeated chunk cannot hide.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn twenty_mebibytes_each_way_byte_exact() {
    let h = Harness::start().await;
    let c = smtp_login(&h).await;
    let data = payload(20 * 1024 * 1024);
    let (mut reader, mut writer) = tokio::io::split(c.stream);
    let to_send = data.clone();
    let sender = tokio::spawn(async move {
        writer.write_all(&to_send).await.unwrap();
        writer.shutdown().await.unwrap();
        writer
    });
    let mut received = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut received)).await.unwrap().unwrap();
    sender.await.unwrap();
    assert_eq!(received.len(), data.len());
    assert!(received == data, "the echoed bytes differ");
    assert_eq!(h.smtp.echoed(), data.len() as u64);
}

#[tokio::test]
async fn bytes_pipelined_with_the_login_reach_the_upstream() {
    let h = Harness::start().await;
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send(format!(
        "EHLO x\r\nAUTH PLAIN {}\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
        plain("app", APP_PASSWORD)
    ))
    .await;
    c.until("250 ").await;
    c.expect("235 ").await;
    assert_eq!(c.line().await, "MAIL FROM:<a@b.example>");
    assert_eq!(c.line().await, "RCPT TO:<c@d.example>");
    assert_eq!(c.line().await, "DATA");

    let mut c = h.connect("imap").await;
    c.expect("* OK").await;
    c.send(format!("a LOGIN app {APP_PASSWORD}\r\nb SELECT INBOX\r\nc NOOP\r\n")).await;
    c.expect("a OK").await;
    assert_eq!(c.line().await, "b SELECT INBOX");
    assert_eq!(c.line().await, "c NOOP");
}

#[tokio::test]
async fn half_close_still_delivers_the_other_direction() {
    let h = Harness::start().await;
    let c = smtp_login(&h).await;
    let (mut reader, mut writer) = tokio::io::split(c.stream);
    writer.write_all(b"last words\r\n").await.unwrap();
    writer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, b"last words\r\n");
}

#[tokio::test]
async fn idle_sessions_are_closed_after_the_idle_timeout() {
    let h = Harness::with(Options { listener_extra: vec!["idle_timeout: 300ms".into()], ..Options::default() }).await;
    let mut c = smtp_login(&h).await;
    // Traffic keeps it alive past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send("NOOP\r\n").await;
        assert_eq!(c.line().await, "NOOP");
    }
    // ...silence ends it.
    let started = Instant::now();
    assert!(c.closed().await);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "{waited:?}");
}
