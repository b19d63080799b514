//! PROXY protocol listeners through the real proxy: the header's client
//! address drives allow_from and the per-address limit; a header from an
//! unlisted address, or a listed one's connection without a header, is
//! refused; bytes after the header reach the session untouched.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn balanced(extra: &[&str]) -> Options {
    let mut listener_extra = vec!["proxy_protocol: true".to_string(), "allow_plaintext_auth: true".to_string()];
    listener_extra.extend(extra.iter().map(|s| s.to_string()));
    Options { listener_extra, ..Options::default() }
}

fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 {port} 1143\r\n").into_bytes()
}

fn v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12 + 7]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&1143u16.to_be_bytes());
    // A TLV (NOOP) that must be skipped.
    h.extend_from_slice(&[0x04, 0, 4, 1, 2, 3, 4]);
    h
}

/// What the proxy sends first (or nothing, if it closes), within 5 s.
async fn first_bytes(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        Ok(Err(_)) => Vec::new(),
        Err(_) => panic!("no answer and no close within 5 s"),
    }
}

async fn connect(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(header).await.unwrap();
    s
}

#[tokio::test]
async fn the_headers_client_address_drives_allow_from() {
    let h = Harness::with(balanced(&["proxy_protocol_from: [127.0.0.1/32]", "allow_from: [192.0.2.0/24]"])).await;
    let addr = h.addr("imap");
    let mut allowed = connect(addr, &v2([192, 0, 2, 7], 50123)).await;
    assert!(first_bytes(&mut allowed).await.starts_with(b"* OK"), "a listed client gets the greeting");
    let mut v1_allowed = connect(addr, &v1("192.0.2.8", 40000)).await;
    assert!(first_bytes(&mut v1_allowed).await.starts_with(b"* OK"));
    // The connection itself comes from 127.0.0.1, which allow_from does not list:
    // only the header's address counts, and this one is not allowed.
    let mut refused = connect(addr, &v2([198, 51, 100, 9], 50123)).await;
    assert_eq!(first_bytes(&mut refused).await, b"", "a client outside allow_from was greeted");
}

#[tokio::test]
async fn a_login_works_through_a_header_sent_in_pieces_with_the_command_right_behind() {
    let h = Harness::with(balanced(&["proxy_protocol_from: [127.0.0.1/32]"])).await;
    let header = v1("192.0.2.7", 40000);
    let mut s = TcpStream::connect(h.addr("imap")).await.unwrap();
    s.set_nodelay(true).unwrap();
    for piece in header.chunks(7) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = TestClient::new(s);
    c.line().await;
    c.send(format!("a LOGIN printer \"{PRINTER_PASSWORD}\"\r\n")).await;
    assert!(c.line().await.starts_with("a OK"));
    // Pipelined: header and the first command in one write. The proxy reads
    // exactly the header; the command is the session's.
    let mut bytes = v2([192, 0, 2, 9], 1);
    bytes.extend_from_slice(b"c1 CAPABILITY\r\n");
    let mut c = TestClient::new(connect(h.addr("imap"), &bytes).await);
    c.line().await;
    assert!(c.until("c1 OK").await.iter().any(|l| l.contains("CAPABILITY")));
}

#[tokio::test]
async fn no_header_from_a_balancer_or_a_header_from_anyone_else_is_refused() {
    let h = Harness::with(balanced(&["proxy_protocol_from: [127.0.0.1/32]", "preauth_timeout: 1s"])).await;
    // A listed balancer that sends nothing: closed after the header timeout, never greeted.
    let mut silent = TcpStream::connect(h.addr("smtp")).await.unwrap();
    let started = Instant::now();
    assert_eq!(first_bytes(&mut silent).await, b"");
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    // Something that is not a header: closed at once.
    let mut garbage = connect(h.addr("smtp"), b"EHLO printer\r\n").await;
    let started = Instant::now();
    assert_eq!(first_bytes(&mut garbage).await, b"");
    assert!(started.elapsed() < Duration::from_millis(900));

    let other = Harness::with(balanced(&["proxy_protocol_from: [127.0.0.2/32]"])).await;
    let mut unlisted = connect(other.addr("pop3"), &v1("192.0.2.7", 1)).await;
    assert_eq!(first_bytes(&mut unlisted).await, b"", "a header from an unlisted address was accepted");
}

#[tokio::test]
async fn the_per_address_limit_counts_real_clients() {
    let h = Harness::with(balanced(&["proxy_protocol_from: [127.0.0.1/32]", "max_connections_per_ip: 1"])).await;
    let addr = h.addr("pop3");
    let mut a = connect(addr, &v1("192.0.2.7", 1)).await;
    assert!(first_bytes(&mut a).await.starts_with(b"+OK"));
    // Another client behind the same balancer is not the same address.
    let mut b = connect(addr, &v1("192.0.2.8", 2)).await;
    assert!(first_bytes(&mut b).await.starts_with(b"+OK"));
    // The same client again is over its limit.
    let mut again = connect(addr, &v1("192.0.2.7", 3)).await;
    let answer = first_bytes(&mut again).await;
    assert!(answer.starts_with(b"-ERR"), "{}", String::from_utf8_lossy(&answer));
    // A LOCAL header (a health check) counts as the balancer itself.
    let mut local = connect(addr, b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00").await;
    assert!(first_bytes(&mut local).await.starts_with(b"+OK"));
}

#[tokio::test]
async fn proxy_protocol_keys_are_validated() {
    use std::collections::HashMap;
    use xoauth2_proxy::config::Config;
    let parse = |extra: &str| {
        let text =
            format!("listeners:\n  - {{name: a, protocol: imap, bind: '127.0.0.1:0', upstream: 'h:993'{extra}}}\n");
        Config::parse(&text, std::path::Path::new("c.yaml"), &HashMap::new()).map(|_| ()).map_err(|e| e.to_string())
    };
    assert!(parse(", proxy_protocol: true").unwrap_err().contains("listeners[0].proxy_protocol_from"));
    assert!(parse(", proxy_protocol_from: [10.0.0.5]").unwrap_err().contains("only used with proxy_protocol: true"));
    assert!(parse(", proxy_protocol: true, proxy_protocol_from: []").unwrap_err().contains("at least one"));
    assert!(parse(", proxy_protocol: true, proxy_protocol_from: [nope]")
        .unwrap_err()
        .contains("proxy_protocol_from[0]"));
    assert!(parse(", proxy_protocol: true, proxy_protocol_from: [10.0.0.5/32]").is_ok());
}
