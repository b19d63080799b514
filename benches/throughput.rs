//! Throughput, latency and login rate through the proxy, each as a ratio to
//! a direct connection to the same (fake) upstream measured in the same run.
//!
//!     cargo bench --bench throughput
//!
//! Direct: the client speaks TLS and XOAUTH2 to the upstream itself. Proxied:
//! the client logs in to the proxy with a password over loopback; the proxy
//! holds the TLS connection and the token. Both paths carry one TLS link.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{FakeUpstream, Proto, TestPki, TokenServer, UpstreamOptions};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use xoauth2_proxy::config::Config;
use xoauth2_proxy::server::Proxy;

const PASSWORD: &str = "bench-password";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Setup {
    pki: TestPki,
    token: TokenServer,
    upstream: FakeUpstream,
    proxy_port: u16,
    access_token: String,
}

async fn setup() -> Setup {
    let pki = TestPki::generate();
    let token = TokenServer::start().await;
    let upstream = FakeUpstream::start(UpstreamOptions::new(Proto::Pop3), &pki, token.validator()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.yaml");
    std::fs::write(
        &path,
        format!(
            "listeners:\n  - {{name: pop3, protocol: pop3, bind: \"127.0.0.1:0\", upstream: \"localhost:{}\", max_connections_per_ip: 10000}}\n\
             upstream_ca_file: {}\nmax_sessions_per_mailbox: 10000\n\
             identities:\n  bench: {{authority: {}, tenant: {}, client_id: {}, client_secret: {}}}\n\
             accounts:\n  - {{username: bench, password: {PASSWORD}, mailbox: bench@example.com, identity: bench}}\n\
             log: {{level: error}}\n",
            upstream.addr().port(),
            pki.ca_path().display(),
            token.authority(),
            testkit::token::TENANT,
            testkit::token::CLIENT_ID,
            testkit::token::CLIENT_SECRET,
        ),
    )
    .unwrap();
    let config = Config::load_with_env(&path, &HashMap::new()).unwrap();
    let proxy = Proxy::bind(&config).await.unwrap();
    let proxy_port = proxy.local_addrs()[0].1.port();
    tokio::spawn(proxy.run(std::future::pending()));
    // A token for the direct path, from the same fake endpoint.
    let access_token = common::fetch_token(&token).await;
    std::mem::forget(dir);
    Setup { pki, token, upstream, proxy_port, access_token }
}

async fn expect_ok<S: AsyncRead + Unpin>(r: &mut BufReader<S>) {
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with('+'), "{line}");
}

/// A logged-in session straight to the upstream: TLS, then AUTH XOAUTH2.
async fn direct(s: &Setup) -> BufReader<Box<dyn Io>> {
    use base64::Engine;
    let tcp = TcpStream::connect(s.upstream.addr()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(s.pki.client_config())
        .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut r = BufReader::new(Box::new(tls) as Box<dyn Io>);
    expect_ok(&mut r).await;
    r.get_mut().write_all(b"AUTH XOAUTH2\r\n").await.unwrap();
    expect_ok(&mut r).await;
    let ir = base64::engine::general_purpose::STANDARD
        .encode(format!("user=bench@example.com\x01auth=Bearer {}\x01\x01", s.access_token));
    r.get_mut().write_all(format!("{ir}\r\n").as_bytes()).await.unwrap();
    expect_ok(&mut r).await;
    r
}

/// A logged-in session through the proxy: plain TCP, USER/PASS.
async fn proxied(s: &Setup) -> BufReader<Box<dyn Io>> {
    let tcp = TcpStream::connect(("127.0.0.1", s.proxy_port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut r = BufReader::new(Box::new(tcp) as Box<dyn Io>);
    expect_ok(&mut r).await;
    r.get_mut().write_all(format!("USER bench\r\nPASS {PASSWORD}\r\n").as_bytes()).await.unwrap();
    expect_ok(&mut r).await;
    expect_ok(&mut r).await;
    r
}

/// MiB/s for `total` bytes sent and echoed back concurrently.
async fn throughput(session: BufReader<Box<dyn Io>>, total: usize) -> f64 {
    let (mut rd, mut wr) = tokio::io::split(session.into_inner());
    let chunk = vec![0x5au8; 64 * 1024];
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            wr.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        wr
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < total {
        let n = rd.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    let _ = writer.await;
    total as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64()
}

/// Round-trip times of small request/response exchanges, sorted.
async fn round_trips(mut session: BufReader<Box<dyn Io>>, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    let mut line = String::new();
    for _ in 0..n {
        let started = Instant::now();
        session.get_mut().write_all(b"NOOP ping ping ping ping ping ping ping ping ping\r\n").await.unwrap();
        line.clear();
        session.read_line(&mut line).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let s = Arc::new(setup().await);
        // Warm up both paths (capability probe, token cache, TLS session setup).
        drop(direct(&s).await);
        drop(proxied(&s).await);

        const BYTES: usize = 256 * 1024 * 1024;
        let mut direct_mibs = Vec::new();
        let mut proxy_mibs = Vec::new();
        for _ in 0..3 {
            direct_mibs.push(throughput(direct(&s).await, BYTES).await);
            proxy_mibs.push(throughput(proxied(&s).await, BYTES).await);
        }
        let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        let (d, p) = (best(&direct_mibs), best(&proxy_mibs));
        println!("throughput, 256 MiB each way, best of 3:  direct {d:8.1} MiB/s   proxied {p:8.1} MiB/s   ratio {:.2}", p / d);

        let rt_direct = round_trips(direct(&s).await, 5000).await;
        let rt_proxy = round_trips(proxied(&s).await, 5000).await;
        println!(
            "round trip, 5000 x 52 bytes:  direct p50 {:6.1} us p99 {:6.1} us   proxied p50 {:6.1} us p99 {:6.1} us   ratio p50 {:.2}",
            pct(&rt_direct, 0.5),
            pct(&rt_direct, 0.99),
            pct(&rt_proxy, 0.5),
            pct(&rt_proxy, 0.99),
            pct(&rt_proxy, 0.5) / pct(&rt_direct, 0.5)
        );

        const LOGINS: usize = 500;
        let started = Instant::now();
        for _ in 0..LOGINS {
            drop(direct(&s).await);
        }
        let direct_rate = LOGINS as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..LOGINS {
            drop(proxied(&s).await);
        }
        let proxy_rate = LOGINS as f64 / started.elapsed().as_secs_f64();
        println!(
            "sequential logins ({LOGINS}):  direct {direct_rate:7.1}/s (TLS + XOAUTH2)   proxied {proxy_rate:7.1}/s (password + new upstream TLS + XOAUTH2)   ratio {:.2}",
            proxy_rate / direct_rate
        );
        println!("token requests during the run: {}", s.token.requests());
    });
}
