//! Back-pressure through the splice: a client that reads slowly while the
//! upstream sends 100 MiB makes the proxy wait, not buffer. Its own test
//! binary, so no other test's allocations move the process's RSS.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::*;
use testkit::{AfterAuth, Proto, UpstreamOptions};
use tokio::io::AsyncReadExt;

const MESSAGE: usize = 100 * 1024 * 1024;

/// This process's resident set (VmRSS), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_upstream_back_instead_of_filling_memory() {
    let message = Arc::new(vec![b'x'; MESSAGE]);
    let options = Options {
        imap: UpstreamOptions { after_auth: AfterAuth::ImapBulk(message), ..UpstreamOptions::new(Proto::Imap) },
        ..Options::default()
    };
    let h = Harness::with(options).await;
    let mut c = h.connect("imap").await.patience(Duration::from_secs(30));
    c.expect("* OK").await;
    c.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    c.until("a OK").await;
    c.send("s SELECT INBOX\r\n").await;
    c.until("s OK").await;
    let before = rss_kib();
    c.send("f FETCH 1 BODY[]\r\n").await;
    // The response line, a byte at a time, so no byte of the literal is
    // read ahead into the test client's buffer.
    let mut stream = c.stream;
    let mut header = Vec::new();
    while !header.ends_with(b"\r\n") {
        header.push(stream.read_u8().await.unwrap());
    }
    let header = String::from_utf8_lossy(&header);
    assert!(header.starts_with(&format!("* 1 FETCH (BODY[] {{{MESSAGE}}}")), "{header}");

    // Not reading at all: what is in flight fills the kernel's socket
    // buffers, then the upstream waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut peak = rss_kib().saturating_sub(before);
    // Then reading at about 25 MB/s, far slower than the upstream sends.
    let mut chunk = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    while got < MESSAGE {
        let want = chunk.len().min(MESSAGE - got);
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk[..want])).await.unwrap().unwrap();
        assert!(n > 0, "closed after {got} bytes");
        assert!(chunk[..n].iter().all(|b| *b == b'x'), "a byte changed near offset {got}");
        got += n;
        if got % (4 * 1024 * 1024) < n {
            peak = peak.max(rss_kib().saturating_sub(before));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rest = Vec::new();
    while !rest.ends_with(b"f OK FETCH completed.\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&chunk[..n]);
    }
    // A proxy that buffered what the client did not take would have grown
    // by most of the 100 MiB; copy buffers and TLS records are well under 16.
    assert!(peak < 16 * 1024, "RSS grew by {peak} KiB while a client read 100 MiB slowly");
}
