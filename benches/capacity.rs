//! Capacity and efficiency of the release proxy binary (issue 13), each figure
//! next to a direct connection to the same fake upstream measured in the same run.
//!
//!     cargo bench --bench capacity                       # every scenario
//!     cargo bench --bench capacity -- idle --sessions 9000
//!     cargo bench --bench capacity -- fetch login burst --rounds 5
//!
//! Scenarios: `idle` (RSS per idle authenticated IMAP session, and the same
//! number of bare rustls server ends in a child process), `fetch` (IMAP FETCH
//! and APPEND of `--fetch-mib` MiB: proxy CPU per GB each way, MB/s through
//! the proxy and direct), `login` (proxy CPU per sequential login with a
//! cached token and a cached verification), `burst` (`--burst` simultaneous
//! connects and logins on one listener, on a freshly started proxy), and,
//! only when named, `dovecot` (FETCH from a private Dovecot started here, on
//! a free port in a temporary directory; needs the dovecot-imapd package).
//!
//! The proxy is `$XOAUTH2_BENCH_BIN` or the binary cargo builds for this
//! bench (the bench profile is the release profile), run as its own process:
//! RSS is VmRSS from /proc/<pid>/status, CPU is utime + stime from
//! /proc/<pid>/stat (the kernel's rusage of the process, 10 ms ticks). The
//! fake token endpoint, the fake IMAP upstream (testkit `ImapBulk`: FETCH
//! from memory, APPEND discarded) and the clients run in this process.
//! Units: MB = 10^6 bytes, GB = 10^9 bytes, KiB = 1024 bytes.

// A benchmark that cannot measure must stop at once and loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{AfterAuth, FakeUpstream, Proto, TestPki, TokenServer, UpstreamOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";
const STEP: Duration = Duration::from_secs(30);

struct World {
    pki: TestPki,
    token: TokenServer,
    upstream: FakeUpstream,
    dir: tempfile::TempDir,
    message_len: usize,
    access_token: String,
}

impl World {
    async fn start(message_len: usize) -> World {
        let pki = TestPki::generate();
        let token = TokenServer::start().await;
        // Looks like mail (text lines), costs nothing to serve: one buffer, shared.
        let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n";
        let message: Vec<u8> = line.iter().copied().cycle().take(message_len).collect();
        let mut opts = UpstreamOptions::new(Proto::Imap);
        opts.after_auth = AfterAuth::ImapBulk(Arc::new(message));
        let upstream = FakeUpstream::start(opts, &pki, token.validator()).await;
        let access_token = fetch_token(&token).await;
        World { pki, token, upstream, dir: tempfile::tempdir().unwrap(), message_len, access_token }
    }

    /// A config with one IMAP listener whose caps are out of the way: this
    /// bench measures cost per session, not admission policy.
    fn config(&self, port: u16, pass: Pass) -> std::path::PathBuf {
        let listener = Listener {
            name: "imap",
            protocol: "imap",
            port,
            upstream_port: self.upstream.addr().port(),
            extra: vec!["max_connections: 100000".into(), "max_connections_per_ip: 100000".into()],
        };
        let account = AccountSpec { username: USER.into(), pass, mailbox: "bench@example.com".into() };
        write_config(
            self.dir.path(),
            &[listener],
            &self.pki.ca_path(),
            &self.token.authority(),
            &[account],
            &["max_sessions_per_mailbox: 100000".into(), "log: {level: error}".into()],
        )
    }
}

fn tls_name() -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::try_from("localhost").unwrap()
}

/// Logged in through the proxy: plain TCP, `LOGIN`.
async fn proxied_login(port: u16) -> Result<Lines<TcpStream>, String> {
    let tcp = connect_from(None, local(port)).await.map_err(|e| format!("connect: {e}"))?;
    let mut c = Lines::new(tcp);
    let greeting = c.line(STEP).await.map_err(|e| format!("greeting: {e:?}"))?;
    if !greeting.starts_with("* OK") {
        return Err(greeting);
    }
    c.send(format!("a LOGIN {USER} {}\r\n", quoted(PASSWORD))).await;
    let answer = c.until("a ", STEP).await.map_err(|e| format!("login: {e:?}"))?;
    if !answer.starts_with("a OK") {
        return Err(answer);
    }
    Ok(c)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Logged in straight to the upstream: TLS, `AUTHENTICATE XOAUTH2` (SASL-IR).
async fn direct_login(w: &World) -> Lines<Tls> {
    direct_login_to(w, w.upstream.addr()).await
}

async fn direct_login_to(w: &World, addr: std::net::SocketAddr) -> Lines<Tls> {
    use base64::Engine;
    let tcp = connect_from(None, addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(w.pki.client_config()).connect(tls_name(), tcp).await.unwrap();
    let mut c = Lines::new(tls);
    c.line(STEP).await.unwrap();
    let ir = base64::engine::general_purpose::STANDARD
        .encode(format!("user=bench@example.com\x01auth=Bearer {}\x01\x01", w.access_token));
    c.send(format!("a AUTHENTICATE XOAUTH2 {ir}\r\n")).await;
    let answer = c.until("a ", STEP).await.unwrap();
    assert!(answer.starts_with("a OK"), "{answer}");
    c
}

/// `FETCH 1 BODY.PEEK[]` (no \\Seen flag update from a real server): literal bytes received and seconds from command to OK.
async fn fetch<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Lines<S>, path: &str) -> (usize, f64) {
    let started = Instant::now();
    c.send("f FETCH 1 BODY.PEEK[]\r\n").await;
    let head = c.line(STEP).await.unwrap_or_else(|e| panic!("{path} FETCH: no response ({e:?})"));
    let len: usize = head
        .rsplit_once('{')
        .and_then(|(_, n)| n.trim_end_matches('}').parse().ok())
        .unwrap_or_else(|| panic!("no literal in {head:?}"));
    c.discard(len, STEP * 4).await.unwrap_or_else(|e| panic!("{path} FETCH: literal cut short ({e:?})"));
    let ok = c.until("f ", STEP).await.unwrap_or_else(|e| panic!("{path} FETCH: no OK after the literal ({e:?})"));
    assert!(ok.starts_with("f OK"), "{ok}");
    (len, started.elapsed().as_secs_f64())
}

/// `APPEND` of `len` bytes: seconds from the literal's first byte to OK.
async fn append<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Lines<S>, len: usize, path: &str) -> f64 {
    c.send(format!("p APPEND INBOX {{{len}}}\r\n")).await;
    let go = c.line(STEP).await.unwrap_or_else(|e| panic!("{path} APPEND: no continuation ({e:?})"));
    assert!(go.starts_with('+'), "{go}");
    let chunk = vec![b'x'; 256 * 1024];
    let started = Instant::now();
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        c.s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    c.s.write_all(b"\r\n").await.unwrap();
    // A timeout here means bytes were lost or held on the way: say which path.
    let ok = c.until("p ", STEP * 4).await.unwrap_or_else(|e| panic!("{path} APPEND: no OK after the literal ({e:?})"));
    assert!(ok.starts_with("p OK"), "{ok}");
    started.elapsed().as_secs_f64()
}

/// SELECT then IDLE: the session a mail client leaves open.
async fn go_idle<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Lines<S>) -> Result<(), String> {
    c.send("s SELECT INBOX\r\n").await;
    c.until("s OK", STEP).await.map_err(|e| format!("SELECT: {e:?}"))?;
    c.send("i IDLE\r\n").await;
    c.until("+", STEP).await.map_err(|e| format!("IDLE: {e:?}"))?;
    Ok(())
}

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

struct Run {
    table: Table,
}

async fn idle(w: &World, proxy: &ProxyProcess, port: u16, n: usize, run: &mut Run) {
    println!("idle: {n} IMAP sessions logged in through the proxy, each SELECTed and in IDLE ({})", load());
    // Settled baseline: warm-up done (probe, token, verification cached).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = proxy.rss_kib();
    let sessions = open_many(n, 64, move || async move {
        let mut c = proxied_login(port).await?;
        go_idle(&mut c).await?;
        Ok(c)
    })
    .await;
    // Let the proxy's tasks and allocator settle before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = proxy.rss_kib();
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    println!("  proxy RSS {} -> {} for {n} sessions: {per:.1} KiB each", mib(before), mib(after));
    drop(sessions);

    // The reference: the server end of the same TLS sessions and nothing
    // else, in a process of its own (this bench, re-run as a bare server).
    let bare = bare_tls_per_session(w, n).await;
    run.table.row(vec![
        format!("RSS per idle authenticated IMAP session, {n} sessions"),
        format!("{per:.1} KiB"),
        format!("bare rustls server end: {bare:.1} KiB"),
        format!("{:.2}x the bare server end", per / bare),
    ]);
}

/// Opens `n` sessions with at most `parallel` being set up at once.
async fn open_many<T, F, Fut>(n: usize, parallel: usize, open: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, String>> + Send,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let open = Arc::new(open);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (gate, open) = (gate.clone(), open.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            open().await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => out.push(s),
            Err(e) => panic!("a session failed to open: {e}"),
        }
    }
    out
}

async fn bare_tls_per_session(w: &World, n: usize) -> f64 {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--bare-tls-server")
        .arg(w.pki.cert_path())
        .arg(w.pki.key_path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut port_line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut port_line).unwrap();
    let port: u16 = port_line.trim().parse().unwrap();
    let config = w.pki.client_config();
    // Warm-up, like the proxy's: one session first, so the baseline includes
    // the runtime's threads and buffers.
    let warm = bare_session(config.clone(), port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);
    let sessions = open_many(n, 64, move || {
        let config = config.clone();
        async move { Ok(bare_session(config, port).await) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    drop((warm, sessions));
    let _ = child.kill();
    let _ = child.wait();
    let per = after.saturating_sub(before) as f64 / n as f64;
    println!("  bare rustls server RSS {} -> {} for {n} sessions: {per:.1} KiB each", mib(before), mib(after));
    per
}

/// One TLS session with the bare server, one line exchanged each way (so its
/// buffers have been used once, as after a login), then left open.
async fn bare_session(config: Arc<rustls::ClientConfig>, port: u16) -> Lines<Tls> {
    let tcp = connect_from(None, local(port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect(tls_name(), tcp).await.unwrap();
    let mut c = Lines::new(tls);
    c.send("a NOOP\r\n").await;
    c.line(STEP).await.unwrap();
    c
}

/// The child process: accept TLS, answer every read with one line, hold the
/// session. A 4 KiB read buffer per task, as a minimal server has.
fn bare_tls_server(cert: &str, key: &str) {
    use rustls_pki_types::pem::PemObject;
    let certs = vec![rustls_pki_types::CertificateDer::from_pem_file(cert).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(b"* OK\r\n").await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

async fn bulk(w: &World, proxy: &ProxyProcess, port: u16, rounds: usize, run: &mut Run) {
    let len = w.message_len;
    println!("fetch: {rounds} interleaved rounds of FETCH and APPEND of {len} bytes, direct and proxied ({})", load());
    let (mut fetch_direct, mut fetch_proxy, mut append_direct, mut append_proxy) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut down_cpu, mut down_bytes, mut up_cpu, mut up_bytes) = (0.0, 0usize, 0.0, 0usize);
    for round in 0..rounds {
        let mut d = direct_login(w).await;
        let (n, secs) = fetch(&mut d, "direct").await;
        fetch_direct.push(mbps(n, secs));
        let secs = append(&mut d, len, "direct").await;
        append_direct.push(mbps(len, secs));
        drop(d);

        let mut p = proxied_login(port).await.unwrap();
        let cpu = proxy.cpu_secs();
        let (n, secs) = fetch(&mut p, "proxied").await;
        down_cpu += proxy.cpu_secs() - cpu;
        down_bytes += n;
        fetch_proxy.push(mbps(n, secs));
        let cpu = proxy.cpu_secs();
        let secs = append(&mut p, len, "proxied").await;
        up_cpu += proxy.cpu_secs() - cpu;
        up_bytes += len;
        append_proxy.push(mbps(len, secs));
        drop(p);
        println!(
            "  round {}: FETCH direct {:.0} MB/s proxied {:.0} MB/s; APPEND direct {:.0} MB/s proxied {:.0} MB/s ({})",
            round + 1,
            fetch_direct[round],
            fetch_proxy[round],
            append_direct[round],
            append_proxy[round],
            load()
        );
    }
    let mib_label = len as f64 / (1024.0 * 1024.0);
    run.table.row(vec![
        format!(
            "proxy CPU per GB spliced, upstream to client (IMAP FETCH {mib_label:.0} MiB, fast in-memory upstream)"
        ),
        format!("{:.2} s", down_cpu / (down_bytes as f64 / 1e9)),
        "-".into(),
        format!("{rounds} rounds, {down_cpu:.2} s CPU in all"),
    ]);
    run.table.row(vec![
        format!("proxy CPU per GB spliced, client to upstream (IMAP APPEND {mib_label:.0} MiB)"),
        format!("{:.2} s", up_cpu / (up_bytes as f64 / 1e9)),
        "-".into(),
        format!("{rounds} rounds, {up_cpu:.2} s CPU in all"),
    ]);
    let (fd, fp) = (median(fetch_direct), median(fetch_proxy));
    run.table.row(vec![
        format!("FETCH {mib_label:.0} MiB, MB/s (median of {rounds})"),
        format!("{fp:.0} MB/s"),
        format!("direct {fd:.0} MB/s"),
        format!("{:.2}", fp / fd),
    ]);
    let (ad, ap) = (median(append_direct), median(append_proxy));
    run.table.row(vec![
        format!("APPEND {mib_label:.0} MiB, MB/s (median of {rounds})"),
        format!("{ap:.0} MB/s"),
        format!("direct {ad:.0} MB/s"),
        format!("{:.2}", ap / ad),
    ]);
}

async fn logins(w: &World, proxy: &ProxyProcess, port: u16, n: usize, run: &mut Run) {
    println!("login: {n} sequential logins, direct and proxied ({})", load());
    for _ in 0..5 {
        drop(direct_login(w).await);
        drop(proxied_login(port).await.unwrap());
    }
    let started = Instant::now();
    for _ in 0..n {
        drop(direct_login(w).await);
    }
    let direct_rate = n as f64 / started.elapsed().as_secs_f64();
    let cpu = proxy.cpu_secs();
    let started = Instant::now();
    for _ in 0..n {
        drop(proxied_login(port).await.unwrap());
    }
    let proxy_rate = n as f64 / started.elapsed().as_secs_f64();
    // The last session's teardown belongs to the measurement too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_ms = (proxy.cpu_secs() - cpu) / n as f64 * 1e3;
    run.table.row(vec![
        format!("proxy CPU per sequential login, cached token ({n} logins)"),
        format!("{per_ms:.2} ms"),
        format!("{direct_rate:.0} direct logins/s vs {proxy_rate:.0} proxied/s"),
        format!("{:.2}", proxy_rate / direct_rate),
    ]);
}

/// `n` clients connect at the same instant to a proxy that has just started
/// (cold token cache, capabilities not yet probed, nothing verified).
async fn burst(w: &World, n: usize, runs: usize, hashed: bool, run: &mut Run) {
    let pass = || {
        if hashed {
            Pass::Hash(default_hashes(&[PASSWORD.to_string()]).remove(0))
        } else {
            Pass::Plain(PASSWORD.to_string())
        }
    };
    for r in 0..runs {
        let port = free_port();
        let config = w.config(port, pass());
        let mut proxy = ProxyProcess::spawn(&config, &Launch::default());
        proxy.wait_listening(port);
        println!("burst {}/{runs}: {n} simultaneous connects and logins ({})", r + 1, load());
        let tokens_before = w.token.requests();
        let go = Arc::new(tokio::sync::Barrier::new(n + 1));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let go = go.clone();
            tasks.push(tokio::spawn(async move {
                go.wait().await;
                let started = tokio::time::Instant::now();
                let greet_by = started + Duration::from_secs(30);
                let tcp = match tokio::time::timeout_at(greet_by, connect_from(None, local(port))).await {
                    Ok(Ok(tcp)) => tcp,
                    _ => return (None, false, None, false),
                };
                let mut c = Lines::new(tcp);
                match c.line(greet_by.saturating_duration_since(tokio::time::Instant::now())).await {
                    Ok(g) if g.starts_with("* OK") => {}
                    _ => return (None, false, Some(c), true),
                }
                let greeted = started.elapsed();
                c.send(format!("a LOGIN {USER} {}\r\n", quoted(PASSWORD))).await;
                let ok = matches!(c.until("a ", Duration::from_secs(60)).await, Ok(a) if a.starts_with("a OK"));
                (Some(greeted), ok, Some(c), true)
            }));
        }
        proxy.reset_peak();
        let overflows = tcp_counter("ListenOverflows");
        let started = Instant::now();
        go.wait().await;
        let mut greet_times = Vec::new();
        let (mut logged_in, mut held, mut connected) = (0, Vec::new(), 0);
        for t in tasks {
            let (greeted, ok, conn, was_connected) = t.await.unwrap();
            if let Some(g) = greeted {
                greet_times.push(g.as_secs_f64());
            }
            logged_in += ok as usize;
            connected += was_connected as usize;
            held.extend(conn);
        }
        // Connections whose handshake the client saw complete but whose
        // final ACK the kernel dropped because the accept queue was full.
        let overflows = tcp_counter("ListenOverflows") - overflows;
        let elapsed = started.elapsed().as_secs_f64();
        let tokens = w.token.requests() - tokens_before;
        let never = n - greet_times.len();
        let slowest = greet_times.iter().cloned().fold(0.0, f64::max);
        println!(
            "  greeted {}/{n} (slowest {slowest:.2} s), logged in {logged_in}, never greeted within 30 s {never} ({} of them with a connection), kernel ListenOverflows +{overflows}, token requests {tokens}, all done in {elapsed:.1} s, proxy peak RSS {}",
            greet_times.len(),
            never.saturating_sub(n - connected),
            mib(proxy.peak_kib())
        );
        run.table.row(vec![
            format!("{n} simultaneous connects and first logins on one listener, run {}/{runs}", r + 1),
            format!("greeted {}, logged in {logged_in}, never greeted within 30 s: {never}", greet_times.len()),
            format!("token requests: {tokens}"),
            format!(
                "slowest greeting {slowest:.2} s, kernel ListenOverflows +{overflows}, peak RSS {}",
                mib(proxy.peak_kib())
            ),
        ]);
        drop(held);
        proxy.stop();
    }
}

/// FETCH of the same message from a private Dovecot (opt-in: `dovecot`;
/// needs the dovecot-imapd package), direct and through the proxy. Dovecot
/// accepts any XOAUTH2 token here (a static passdb with `nopassword`): the
/// login is not what is measured, the bytes are.
async fn dovecot(w: &World, rounds: usize, run: &mut Run) {
    if std::process::Command::new("dovecot").arg("--version").output().is_err() {
        println!("dovecot: not installed (apt-get install dovecot-imapd); skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let port = free_port();
    let conf = root.join("dovecot.conf");
    std::fs::write(
        &conf,
        format!(
            "instance_name = xoauth2-bench-{port}\nbase_dir = {root}/run\nstate_dir = {root}/state\nlog_path = {root}/dovecot.log\n\
             protocols = imap\nlisten = 127.0.0.1\nssl = required\nssl_cert = <{cert}\nssl_key = <{key}\n\
             auth_mechanisms = xoauth2\nauth_failure_delay = 0\n\
             passdb {{\n  driver = static\n  args = nopassword=y\n}}\n\
             userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={root}/mail/%u\n}}\n\
             mail_location = maildir:{root}/mail/%u\n\
             service imap-login {{\n  inet_listener imap {{\n    port = 0\n  }}\n  inet_listener imaps {{\n    port = {port}\n    ssl = yes\n  }}\n}}\n",
            root = root.display(),
            cert = w.pki.cert_path().display(),
            key = w.pki.key_path().display(),
        ),
    )
    .unwrap();
    // The message, straight into the maildir (as delivered mail would be).
    let new = root.join("mail/bench@example.com/new");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::create_dir_all(root.join("mail/bench@example.com/cur")).unwrap();
    std::fs::create_dir_all(root.join("mail/bench@example.com/tmp")).unwrap();
    let mut message = b"From: bench@example.com\r\nTo: bench@example.com\r\nSubject: big\r\n\r\n".to_vec();
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n";
    message.extend(line.iter().copied().cycle().take(w.message_len));
    std::fs::write(new.join("1700000000.M1P1.bench"), &message).unwrap();
    let chown = format!("chown -R nobody:nogroup {}", root.join("mail").display());
    std::process::Command::new("bash").args(["-c", &chown]).status().unwrap();
    let mut server = std::process::Command::new("dovecot").arg("-F").arg("-c").arg(&conf).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listening(port) {
        assert!(Instant::now() < deadline, "Dovecot does not listen; see {}/dovecot.log", root.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proxy_port = free_port();
    let listener = Listener {
        name: "imap",
        protocol: "imap",
        port: proxy_port,
        upstream_port: port,
        extra: vec!["max_connections_per_ip: 100000".into()],
    };
    let account =
        AccountSpec { username: USER.into(), pass: Pass::Plain(PASSWORD.into()), mailbox: "bench@example.com".into() };
    let config = write_config(
        root,
        &[listener],
        &w.pki.ca_path(),
        &w.token.authority(),
        &[account],
        &["log: {level: error}".into()],
    );
    let mut proxy = ProxyProcess::spawn(&config, &Launch::default());
    proxy.wait_listening(proxy_port);
    println!(
        "dovecot: {rounds} interleaved rounds of FETCH of {} bytes from Dovecot, direct and proxied ({})",
        message.len(),
        load()
    );
    let (mut direct, mut proxied, mut cpu, mut bytes) = (Vec::new(), Vec::new(), 0.0, 0usize);
    for round in 0..rounds {
        let mut d = direct_login_to(w, local(port)).await;
        d.send("s SELECT INBOX\r\n").await;
        d.until("s OK", STEP).await.unwrap();
        let (n, secs) = fetch(&mut d, "direct (Dovecot)").await;
        direct.push(mbps(n, secs));
        drop(d);
        let mut p = proxied_login(proxy_port).await.unwrap();
        p.send("s SELECT INBOX\r\n").await;
        p.until("s OK", STEP).await.unwrap();
        let before = proxy.cpu_secs();
        let (n, secs) = fetch(&mut p, "proxied (Dovecot)").await;
        cpu += proxy.cpu_secs() - before;
        bytes += n;
        proxied.push(mbps(n, secs));
        drop(p);
        println!(
            "  round {}: direct {:.0} MB/s, proxied {:.0} MB/s ({})",
            round + 1,
            direct[round],
            proxied[round],
            load()
        );
    }
    proxy.stop();
    let _ = std::process::Command::new("bash").args(["-c", &format!("kill -TERM {}", server.id())]).status();
    let _ = server.wait();
    let mib_label = w.message_len as f64 / (1024.0 * 1024.0);
    run.table.row(vec![
        format!("proxy CPU per GB spliced, IMAP FETCH {mib_label:.0} MiB from Dovecot"),
        format!("{:.2} s", cpu / (bytes as f64 / 1e9)),
        "-".into(),
        format!("{rounds} rounds, {cpu:.2} s CPU in all"),
    ]);
    let (d, p) = (median(direct), median(proxied));
    run.table.row(vec![
        format!("FETCH {mib_label:.0} MiB from Dovecot, MB/s (median of {rounds})"),
        format!("{p:.0} MB/s"),
        format!("direct {d:.0} MB/s"),
        format!("{:.2}", p / d),
    ]);
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--bare-tls-server") {
        bare_tls_server(&argv[2], &argv[3]);
        return;
    }
    let args = Args::parse();
    let sessions: usize = args.num("sessions", 3000);
    let fetch_mib: usize = args.num("fetch-mib", 100);
    let rounds: usize = args.num("rounds", 5);
    let login_count: usize = args.num("logins", 500);
    let burst_n: usize = args.num("burst", 1000);
    let burst_runs: usize = args.num("burst-runs", 3);
    let burst_hashed = args.get("burst-password") == Some("hash");
    banner(&args, "capacity");
    // Each idle session holds two descriptors here (client end, fake upstream
    // end) and two in the proxy.
    let limit = soft_nofile();
    if args.wants("idle") && (sessions * 2 + 200) as u64 > limit {
        panic!(
            "--sessions {sessions} needs about {} descriptors, the limit is {limit}: raise it with `ulimit -n`",
            sessions * 2 + 200
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let w = World::start(fetch_mib * 1024 * 1024).await;
        let mut run = Run { table: Table::new(&["figure", "through the proxy", "direct / reference", "ratio / note"]) };
        if args.wants("idle") || args.wants("fetch") || args.wants("login") {
            let port = free_port();
            let config = w.config(port, Pass::Hash(default_hashes(&[PASSWORD.to_string()]).remove(0)));
            let mut proxy = ProxyProcess::spawn(&config, &Launch::default());
            proxy.wait_listening(port);
            // Warm-up: capability probe, token, cached verification.
            for _ in 0..3 {
                drop(proxied_login(port).await.unwrap());
            }
            if args.wants("idle") {
                idle(&w, &proxy, port, sessions, &mut run).await;
            }
            if args.wants("fetch") {
                bulk(&w, &proxy, port, rounds, &mut run).await;
            }
            if args.wants("login") {
                logins(&w, &proxy, port, login_count, &mut run).await;
            }
            proxy.stop();
        }
        if args.wants("burst") {
            burst(&w, burst_n, burst_runs, burst_hashed, &mut run).await;
        }
        // Opt-in: it needs Dovecot installed.
        if args.names.iter().any(|n| n == "dovecot") {
            dovecot(&w, rounds, &mut run).await;
        }
        println!();
        println!("{}, {} cores; command: {}", load(), num_cpus(), args.command("capacity"));
        run.table.print();
    });
}
