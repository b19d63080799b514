//! Graceful shutdown: stop accepting, tell clients that are still logging in,
//! let spliced sessions run until the deadline, then cut them.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

async fn spliced_smtp(h: &Harness) -> TestClient<tokio::net::TcpStream> {
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    c.expect("235 ").await;
    c
}

#[tokio::test]
async fn drain_then_deadline() {
    let mut h = Harness::with(Options { shutdown_timeout: "1s", ..Options::default() }).await;
    let mut spliced = spliced_smtp(&h).await;
    let mut waiting = h.connect("imap").await;
    waiting.expect("* OK").await;
    let smtp_addr = h.addr("smtp");

    let started = Instant::now();
    let proxy = h.shutdown();
    waiting.expect("* BYE [UNAVAILABLE] Server shutting down").await;
    assert!(waiting.closed().await);
    // New connections are refused...
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(smtp_addr).await.is_err());
    // ...while the spliced session still works until the deadline.
    spliced.send("NOOP\r\n").await;
    assert_eq!(spliced.line().await, "NOOP");
    assert!(spliced.closed().await);
    tokio::time::timeout(Duration::from_secs(5), proxy).await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test]
async fn sessions_that_end_early_let_the_proxy_stop_early() {
    let mut h = Harness::with(Options { shutdown_timeout: "30s", ..Options::default() }).await;
    let spliced = spliced_smtp(&h).await;
    let started = Instant::now();
    let proxy = h.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(spliced);
    tokio::time::timeout(Duration::from_secs(5), proxy).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The real binary with the harness's config, its log lines on a channel.
struct Binary {
    child: std::process::Child,
    log: std::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn start(h: &Harness) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, h.config_text.replace("level: debug", "level: info")).unwrap();
        let mut binary = Binary::spawn(&path);
        binary._dir = dir;
        binary
    }

    fn spawn(config: &std::path::Path) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"))
            .args(["run", "-c"])
            .arg(config)
            .env("TEST_CLIENT_SECRET", testkit::token::CLIENT_SECRET)
            .env_remove("XOAUTH2_PROXY_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Binary { child, log, _dir: tempfile::tempdir().unwrap() }
    }

    /// The next log line containing every one of `needles`.
    fn wait_for_log(&self, needles: &[&str]) -> String {
        let mut seen = Vec::new();
        loop {
            let line = self
                .log
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("no line with {needles:?} ({e}) in {seen:#?}"));
            if needles.iter().all(|n| line.contains(n)) {
                return line;
            }
            seen.push(line);
        }
    }

    /// The SMTP listener's port, from its "listening" log line.
    fn smtp_port(&self) -> u16 {
        bound_port(&self.wait_for_log(&["listening", "listener=smtp"]))
    }

    async fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the proxy did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The real binary exits 0 on SIGTERM.
#[tokio::test]
async fn sigterm_stops_the_binary() {
    let h = Harness::start().await;
    let mut proxy = Binary::start(&h);
    let port = proxy.smtp_port();
    let mut c = TestClient::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    c.expect("220 ").await;
    send_signal(proxy.child.id(), "TERM");
    c.expect("421 4.3.2").await;
    let exit = proxy.exit_status().await;
    assert!(exit.success(), "{exit:?}");
    let log: Vec<String> = proxy.log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("SIGTERM received")), "{log:?}");
}

/// Whether `pid` catches `signal` (its bit in /proc/PID/status SigCgt).
fn catches(pid: u32, signal: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// A reload right after a restart (SIGHUP before the proxy serves) is
/// deferred, never fatal; a SIGTERM that early still stops it cleanly. The
/// config is a FIFO, so the proxy is provably still starting (blocked
/// reading it) when the signal arrives.
#[tokio::test]
async fn early_signals_are_handled_from_the_first_instant() {
    let h = Harness::start().await;
    for (signal, serves) in [("HUP", true), ("TERM", false)] {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.yaml");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let mut proxy = Binary::spawn(&fifo);
        let pid = proxy.child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !catches(pid, 1) {
            assert!(Instant::now() < deadline, "SIGHUP never caught");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        send_signal(pid, signal);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(proxy.child.try_wait().unwrap().is_none(), "SIG{signal} during start-up killed the proxy");
        let config = h.config_text.replace("level: debug", "level: info");
        let write = |fifo: std::path::PathBuf, config: String| {
            tokio::task::spawn_blocking(move || std::fs::write(fifo, config).unwrap())
        };
        write(fifo.clone(), config.clone()).await.unwrap();
        if serves {
            let port = proxy.smtp_port();
            let mut c = TestClient::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
            c.expect("220 ").await;
            // The deferred reload reads the config again.
            write(fifo, config).await.unwrap();
            proxy.wait_for_log(&["SIGHUP: reloaded"]);
            send_signal(pid, "TERM");
        }
        assert!(proxy.exit_status().await.success(), "SIG{signal} during start-up");
    }
}

/// The deadline is hard for every phase: a login stuck in an upstream that
/// stopped answering, and a capability probe that never gets a greeting,
/// are cut at `shutdown_timeout`, not at the (longer) upstream timeout.
#[tokio::test]
async fn the_deadline_cuts_logins_and_probes_that_hang_upstream() {
    let mut imap = testkit::UpstreamOptions::new(testkit::Proto::Imap);
    imap.stall = Some(testkit::Stall::Auth);
    let mut pop3 = testkit::UpstreamOptions::new(testkit::Proto::Pop3);
    pop3.stall = Some(testkit::Stall::Greeting);
    let mut h = Harness::with(Options {
        imap,
        pop3,
        shutdown_timeout: "1s",
        listener_extra: vec!["upstream_timeout: 60s".into()],
        ..Options::default()
    })
    .await;
    let mut login = h.connect("imap").await;
    login.expect("* OK").await;
    login.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    // The proxy's login reaches the upstream, which goes silent.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.imap.connections() < 2 {
        assert!(Instant::now() < deadline, "the login never reached the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut probing = h.connect("pop3").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let proxy = h.shutdown();
    tokio::time::timeout(Duration::from_secs(10), proxy).await.expect("the proxy did not stop").unwrap();
    let took = started.elapsed();
    // Well before the 2 s grace the proxy allows after the deadline: the
    // sessions themselves stopped at the deadline.
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(1800), "{took:?}");
    assert!(login.until("* BYE").await.last().unwrap().contains("shutting down"));
    assert!(login.closed().await);
    assert!(probing.closed().await);
}
