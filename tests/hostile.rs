//! Hostile and bursty clients: bounded verification, gated guessing, a
//! shared token backoff, the login deadline, the bad-command limit, logins
//! cancelled by a client that leaves, and running out of descriptors. Memory
//! and time under load are measured in `benches/`, not asserted here.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};
use support::*;
use testkit::Fault;
use tokio::io::AsyncWriteExt;
use xoauth2_proxy::config::{AccountConfig, Config, PasswordConfig};

/// An account whose hash has the real default cost (19 MiB of argon2 memory).
fn heavy_account(config: &mut Config) {
    config.accounts.push(AccountConfig {
        username: "heavy".into(),
        password: PasswordConfig::Hash(xoauth2_proxy::accounts::hash_password(b"heavy-pw").unwrap()),
        mailbox: MAILBOX.into(),
        smtp_user: SMTP_USER.into(),
        identity: "contoso".into(),
    });
}

/// Logs in with IMAP LOGIN on a new connection; returns the answer.
async fn imap_login(addr: std::net::SocketAddr, user: impl Into<String>, pass: impl Into<String>) -> String {
    let (user, pass) = (user.into(), pass.into());
    let mut c = TestClient::new(tokio::net::TcpStream::connect(addr).await.unwrap()).patience(Duration::from_secs(60));
    c.expect("* OK").await;
    c.send(format!("a LOGIN {user} \"{pass}\"\r\n")).await;
    c.line().await
}

#[tokio::test]
async fn a_full_verification_queue_answers_at_once_and_identical_attempts_share_one_verification() {
    let h = Harness::with(Options {
        top_extra: vec![
            "password_verification: {workers: 1, queue: 1}".into(),
            "login_throttle: {free_failures: 1000}".into(),
        ],
        tweak: Some(heavy_account),
        ..Options::default()
    })
    .await;
    let addr = h.addr("imap");
    let distinct: Vec<_> = (0..30).map(|i| tokio::spawn(imap_login(addr, "heavy", format!("wrong-{i}")))).collect();
    let mut answers = Vec::new();
    for a in distinct {
        answers.push(a.await.unwrap());
    }
    let busy = answers.iter().filter(|a| a.starts_with("a NO [UNAVAILABLE]")).count();
    let refused = answers.iter().filter(|a| a.starts_with("a NO [AUTHENTICATIONFAILED]")).count();
    assert_eq!(busy + refused, 30, "{answers:?}");
    assert!(busy > 0 && refused > 0, "one worker and one queue place cannot take 30 at once: {answers:?}");

    // The same guess thirty times at once is one verification, so the
    // queue never fills: everyone gets the real answer.
    let same: Vec<_> = (0..30).map(|_| tokio::spawn(imap_login(addr, "nosuch", "same-guess"))).collect();
    for a in same {
        let answer = a.await.unwrap();
        assert!(answer.starts_with("a NO [AUTHENTICATIONFAILED]"), "{answer}");
    }
    // And the right password still works, through the same pool.
    assert!(imap_login(addr, "heavy", "heavy-pw").await.starts_with("a OK"));
}

#[tokio::test]
async fn parallel_guesses_from_one_address_wait_behind_each_other() {
    let throttle = "login_throttle: {free_failures: 1, initial_delay: 300ms, max_delay: 300ms}";
    let h = Harness::with(Options { top_extra: vec![throttle.into()], ..Options::default() }).await;
    let addr = h.addr("imap");
    let started = Instant::now();
    let guesses: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let answer = imap_login(addr, format!("user{i}"), "guess").await;
                (started.elapsed(), answer)
            })
        })
        .collect();
    let mut times = Vec::new();
    for g in guesses {
        let (at, answer) = g.await.unwrap();
        assert!(answer.starts_with("a NO [AUTHENTICATIONFAILED]"), "{answer}");
        times.push(at);
    }
    times.sort();
    // One free guess, then one at a time through the address's gate, each
    // failure answered no sooner than 300 ms after the one before it was
    // counted: the last of four is at least two delays in. (Lower bounds
    // only: a loaded machine makes every answer later, never earlier.)
    assert!(times[3] >= Duration::from_millis(550), "{times:?}");
    assert!(times.iter().filter(|t| **t < Duration::from_millis(250)).count() <= 2, "{times:?}");
}

#[tokio::test]
async fn logins_share_the_token_endpoint_backoff() {
    let h = Harness::start().await;
    h.token.set_fault(Some(Fault::Status(503)));
    let addr = h.addr("imap");
    let logins: Vec<_> = (0..20).map(|_| tokio::spawn(imap_login(addr, "app", APP_PASSWORD))).collect();
    for l in logins {
        let answer = l.await.unwrap();
        assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    }
    assert_eq!(h.token.requests(), 1, "one request per backoff step, however many logins");
}

/// Two handles on one connection: the test reads with one while a task
/// writes through the other.
async fn connect_twice(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap().into_std().unwrap();
    let other = stream.try_clone().unwrap();
    (tokio::net::TcpStream::from_std(stream).unwrap(), tokio::net::TcpStream::from_std(other).unwrap())
}

#[tokio::test]
async fn the_login_deadline_closes_a_slow_client_on_every_protocol() {
    let h = Harness::with(Options { listener_extra: vec!["login_deadline: 2s".into()], ..Options::default() }).await;
    for (listener, greeting, farewell) in
        [("smtp", "220 ", "421 4.4.2 Timeout"), ("imap", "* OK", "* BYE Autologout"), ("pop3", "+OK", "-ERR Timeout")]
    {
        let (read, mut write) = connect_twice(h.addr(listener)).await;
        let mut c = TestClient::new(read);
        c.expect(greeting).await;
        let started = Instant::now();
        // One byte every 200 ms never completes a line and never lets the
        // silence timeout (60 s) expire: only the deadline ends it.
        let dripping = tokio::spawn(async move {
            for _ in 0..100 {
                if write.write_all(b"N").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        c.expect(farewell).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1800) && took < Duration::from_secs(5), "{listener}: {took:?}");
        assert!(c.closed().await, "{listener}");
        dripping.abort();
    }
}

#[tokio::test]
async fn garbage_before_login_gets_a_bounded_number_of_answers_then_a_goodbye() {
    let h = Harness::start().await;
    for (listener, greeting, bad, error, goodbye) in [
        ("smtp", "220 ", "FROB", "500 5.5.2", "421 4.7.0 Too many invalid commands"),
        ("imap", "* OK", "a FROB", "a BAD", "* BYE Too many invalid commands"),
        ("pop3", "+OK", "FROB", "-ERR Unknown command", "-ERR Too many invalid commands"),
    ] {
        let mut c = h.connect(listener).await;
        c.expect(greeting).await;
        c.send(format!("{bad}\r\n").repeat(30)).await;
        for _ in 0..10 {
            c.expect(error).await;
        }
        c.expect(goodbye).await;
        assert!(c.closed().await, "{listener}");
    }
    // 64 KiB of noise: a handful of answers, then the connection is closed.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect();
    for listener in ["smtp", "imap", "pop3"] {
        let mut c = h.connect(listener).await;
        c.line().await;
        let _ = c.stream.write_all(&noise).await;
        let mut answers = 0;
        while c.try_line().await.is_some() {
            answers += 1;
        }
        assert!((1..=11).contains(&answers), "{listener}: {answers} answers");
    }
}

#[tokio::test]
async fn a_client_that_leaves_during_its_login_cancels_the_upstream_login() {
    let mut imap = testkit::UpstreamOptions::new(testkit::Proto::Imap);
    imap.stall = Some(testkit::Stall::Auth);
    let h = Harness::with(Options { imap, listener_extra: vec!["upstream_timeout: 60s".into()], ..Options::default() })
        .await;
    let mut c = h.connect("imap").await;
    c.expect("* OK").await;
    c.send(format!("a LOGIN app {APP_PASSWORD}\r\n")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The probe's connection came and went; the login's is the second.
    while !(h.imap.connections() == 2 && h.imap.open_connections() == 1) {
        assert!(Instant::now() < deadline, "the login never reached the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.imap.open_connections(), 1, "the login's upstream connection is open");
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(3);
    while h.imap.open_connections() > 0 {
        assert!(Instant::now() < deadline, "the upstream login went on without its client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Out of descriptors, the proxy says so (to the log and the client), and
/// does not blame the upstream. A served session holds two descriptors, so
/// the two parities of the limit run out at different steps: at the
/// upstream connect of a client already in, or at accept(2) itself, which
/// then fails even while nobody waits (an odd limit once left every later
/// client unanswered: the reserve was let go idly and a session took it).
#[tokio::test]
async fn running_out_of_descriptors_is_reported_as_such() {
    for limit in [47, 48] {
        out_of_descriptors(limit).await;
    }
}

async fn out_of_descriptors(limit: u32) {
    let h =
        Harness::with(Options { top_extra: vec!["max_sessions_per_mailbox: 1000".into()], ..Options::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, h.config_text.replace("level: debug", "level: info")).unwrap();
    let mut child = tokio::process::Command::new("bash")
        .args(["-c", "ulimit -n \"$2\" && exec \"$0\" run -c \"$1\"", env!("CARGO_BIN_EXE_xoauth2-proxy")])
        .arg(&path)
        .arg(limit.to_string())
        .env("TEST_CLIENT_SECRET", testkit::token::CLIENT_SECRET)
        .env_remove("XOAUTH2_PROXY_LOG")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let port = listening_port(&mut log, "pop3").await;
    let log_task = tokio::spawn(async move {
        let mut all = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(15), tokio::io::AsyncReadExt::read_to_string(&mut log, &mut all))
                .await;
        all
    });
    let mut sessions = Vec::new();
    let (mut served, mut out_of_resources) = (0, 0);
    for _ in 0..40 {
        let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { break };
        let mut c = TestClient::new(tcp);
        let first = c.try_line().await.unwrap_or_else(|| panic!("limit {limit}: closed without an answer"));
        let answer = if first.starts_with("+OK") {
            c.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
            c.expect("+OK").await;
            c.line().await
        } else {
            first
        };
        assert!(!answer.contains("Upstream mail server unavailable"), "limit {limit}: {answer}");
        if answer.starts_with("+OK") {
            served += 1;
        } else {
            assert!(answer.starts_with("-ERR [SYS/TEMP] Proxy out of resources"), "limit {limit}: {answer}");
            out_of_resources += 1;
        }
        sessions.push(c);
    }
    assert!(served > 0 && out_of_resources > 0, "limit {limit}: served {served}, out of resources {out_of_resources}");
    drop(sessions);
    child.kill().await.unwrap();
    let all = log_task.await.unwrap();
    assert!(all.contains("proxy out of resources"), "{all}");
    assert!(!all.contains("upstream unavailable"), "{all}");
}
