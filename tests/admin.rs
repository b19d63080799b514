//! The admin listener: `/metrics` counts exactly what happened (logins by
//! result on each protocol, connections, token requests, bytes, phases), in
//! a text exposition Prometheus' parser accepts; `/healthz`; `/readyz` turns
//! 503 with the failing identity when the token endpoint fails, and back.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::*;
use testkit::token::Fault;

const ADMIN: &str = "admin: { bind: 127.0.0.1:0 }";

async fn with_admin() -> Harness {
    Harness::with(Options { top_extra: vec![ADMIN.into()], ..Options::default() }).await
}

struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

async fn get(h: &Harness, path: &str) -> Answer {
    request(h, reqwest::Method::GET, path).await
}

async fn request(h: &Harness, method: reqwest::Method, path: &str) -> Answer {
    xoauth2_proxy::tls::install_default_provider();
    let client = reqwest::Client::builder().no_proxy().timeout(STEP).build().unwrap();
    let url = format!("http://{}{path}", h.admin.expect("the config has admin:"));
    let response = client.request(method, url).send().await.unwrap();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    Answer { status: response.status().as_u16(), content_type, body: response.text().await.unwrap() }
}

/// Every sample of the exposition by its series (`name{labels}`).
fn samples(exposition: &str) -> HashMap<String, f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            (series.to_string(), value.parse().unwrap_or_else(|_| panic!("not a number: {l:?}")))
        })
        .collect()
}

async fn scrape(h: &Harness) -> HashMap<String, f64> {
    let answer = get(h, "/metrics").await;
    assert_eq!(answer.status, 200);
    samples(&answer.body)
}

fn logins(s: &HashMap<String, f64>, listener: &str, result: &str) -> f64 {
    let series = format!("xoauth2_proxy_logins_total{{listener=\"{listener}\",result=\"{result}\"}}");
    *s.get(&series).unwrap_or_else(|| panic!("no {series}"))
}

fn value(s: &HashMap<String, f64>, series: &str) -> f64 {
    *s.get(series).unwrap_or_else(|| panic!("no {series} in {:?}", s.keys().collect::<Vec<_>>()))
}

/// Polls the metrics until `done` holds (sessions end a moment after the
/// client hangs up).
async fn scrape_until(h: &Harness, done: impl Fn(&HashMap<String, f64>) -> bool) -> HashMap<String, f64> {
    for _ in 0..100 {
        let s = scrape(h).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the metrics never got there: {:?}", scrape(h).await);
}

#[tokio::test]
async fn the_login_counters_move_by_exactly_the_logins_made_on_each_protocol() {
    let h = with_admin().await;
    let before = scrape(&h).await;
    for listener in ["imap", "pop3", "smtp"] {
        assert_eq!(logins(&before, listener, "ok"), 0.0);
        for _ in 0..2 {
            let answer = h.login_answer(listener, "printer", PRINTER_PASSWORD).await;
            assert!(answer.starts_with("a OK") || answer.starts_with("+OK") || answer.starts_with("235"), "{answer}");
        }
        let answer = h.login_answer(listener, "printer", "wrong").await;
        assert!(answer.contains("AUTH") || answer.starts_with("535"), "{answer}");
    }
    let after = scrape_until(&h, |s| {
        ["imap", "pop3", "smtp"]
            .iter()
            .all(|l| value(s, &format!("xoauth2_proxy_sessions{{listener=\"{l}\",phase=\"spliced\"}}")) == 0.0)
    })
    .await;
    for listener in ["imap", "pop3", "smtp"] {
        assert_eq!(logins(&after, listener, "ok"), 2.0, "{listener}");
        assert_eq!(logins(&after, listener, "bad_credentials"), 1.0, "{listener}");
        for other in ["throttled", "token_unavailable", "upstream_refused", "upstream_unavailable", "limit"] {
            assert_eq!(logins(&after, listener, other), 0.0, "{listener} {other}");
        }
        let accepted = format!("xoauth2_proxy_connections_accepted_total{{listener=\"{listener}\"}}");
        assert_eq!(value(&after, &accepted), 3.0, "{accepted}");
        let logged_in = format!("xoauth2_proxy_upstream_login_duration_seconds_count{{listener=\"{listener}\"}}");
        assert_eq!(value(&after, &logged_in), 2.0, "{logged_in}");
        let ended = format!("xoauth2_proxy_session_duration_seconds_count{{listener=\"{listener}\"}}");
        assert_eq!(value(&after, &ended), 2.0, "{ended}");
        for phase in ["pre_auth", "authenticating", "spliced"] {
            let open = format!("xoauth2_proxy_sessions{{listener=\"{listener}\",phase=\"{phase}\"}}");
            assert_eq!(value(&after, &open), 0.0, "{open}");
        }
    }
    // One token served all six logins; it has about an hour left.
    assert_eq!(value(&after, "xoauth2_proxy_token_requests_total{identity=\"contoso\",result=\"ok\"}"), 1.0);
    assert_eq!(h.token.requests(), 1);
    let left = value(&after, "xoauth2_proxy_token_expires_in_seconds{account=\"\",identity=\"contoso\"}");
    assert!((3000.0..=3600.0).contains(&left), "{left}");
    // Nothing names a mailbox or a client address.
    let text = get(&h, "/metrics").await.body;
    for private in [MAILBOX, SMTP_USER, "127.0.0.1"] {
        assert!(!text.contains(private), "the exposition names {private}");
    }
}

#[tokio::test]
async fn phases_bytes_and_refusals_are_counted() {
    let h = Harness::with(Options {
        top_extra: vec![ADMIN.into()],
        listener_extra: vec!["max_connections_per_ip: 1".into()],
        ..Options::default()
    })
    .await;
    let mut waiting = h.connect("imap").await;
    waiting.expect("* OK").await;
    let mut spliced = h.connect("smtp").await;
    spliced.expect("220 ").await;
    spliced.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    spliced.until("250 ").await;
    spliced.expect("235 ").await;
    let s = scrape(&h).await;
    assert_eq!(value(&s, "xoauth2_proxy_sessions{listener=\"imap\",phase=\"pre_auth\"}"), 1.0);
    assert_eq!(value(&s, "xoauth2_proxy_sessions{listener=\"smtp\",phase=\"spliced\"}"), 1.0);
    assert_eq!(value(&s, "xoauth2_proxy_sessions{listener=\"smtp\",phase=\"pre_auth\"}"), 0.0);
    // A second connection from this address is over max_connections_per_ip.
    let mut refused = h.connect("imap").await;
    assert!(refused.line().await.starts_with("* BYE"));
    // The fake upstream echoes after login: 12 bytes each way.
    spliced.send("hello there\n").await;
    assert_eq!(spliced.line().await, "hello there");
    drop(spliced);
    let s = scrape_until(&h, |s| value(s, "xoauth2_proxy_sessions{listener=\"smtp\",phase=\"spliced\"}") == 0.0).await;
    assert_eq!(value(&s, "xoauth2_proxy_spliced_bytes_total{direction=\"from_client\",listener=\"smtp\"}"), 12.0);
    assert_eq!(value(&s, "xoauth2_proxy_spliced_bytes_total{direction=\"to_client\",listener=\"smtp\"}"), 12.0);
    assert_eq!(
        value(&s, "xoauth2_proxy_connections_refused_total{listener=\"imap\",reason=\"max_connections_per_ip\"}"),
        1.0
    );
    assert_eq!(value(&s, "xoauth2_proxy_connections_refused_total{listener=\"imap\",reason=\"max_connections\"}"), 0.0);
    assert!(value(&s, "process_open_fds") > 0.0);
    assert!(value(&s, "xoauth2_proxy_password_verifications_total") >= 0.0);
}

#[tokio::test]
async fn failures_are_counted_by_cause() {
    let h = with_admin().await;
    h.token.set_fault(Some(Fault::Status(503)));
    for listener in ["imap", "pop3", "smtp"] {
        let answer = h.login_answer(listener, "printer", PRINTER_PASSWORD).await;
        assert!(answer.contains("UNAVAILABLE") || answer.contains("SYS/TEMP") || answer.starts_with("454"), "{answer}");
    }
    let s = scrape(&h).await;
    for listener in ["imap", "pop3", "smtp"] {
        assert_eq!(logins(&s, listener, "token_unavailable"), 1.0, "{listener}");
        assert_eq!(logins(&s, listener, "ok"), 0.0, "{listener}");
    }
    // One request failed; the other logins shared its error during the backoff.
    assert_eq!(value(&s, "xoauth2_proxy_token_requests_total{identity=\"contoso\",result=\"unavailable\"}"), 1.0);
}

#[tokio::test]
async fn the_exposition_is_the_classic_text_format() {
    let h = with_admin().await;
    assert!(h.login_answer("smtp", "printer", PRINTER_PASSWORD).await.starts_with("235"));
    let answer = get(&h, "/metrics").await;
    assert_eq!(answer.content_type, "text/plain; version=0.0.4");
    let text = answer.body;
    // Every family has its HELP and TYPE; counters end in _total (histograms
    // in _bucket, _sum and _count); every name has the prefix but the
    // process_* ones every Prometheus client library exports.
    let mut typed = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            typed.insert(name.to_string(), kind.to_string());
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
            assert!(name.starts_with("xoauth2_proxy_") || name.starts_with("process_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name}");
            }
        }
    }
    for series in samples(&text).keys() {
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.contains_key(name) || typed.get(family).is_some_and(|k| k == "histogram"), "untyped {series}");
    }
    for kind in ["counter", "gauge", "histogram"] {
        assert!(typed.values().any(|k| k == kind), "no {kind}");
    }
    // Debian's promtool, where installed (e2e/run.sh installs it and runs it
    // against the real binary's exposition too).
    if let Ok(promtool) = which("promtool") {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool is not installed here: the format checks above ran without it");
    }
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file()).ok_or(())
}

#[tokio::test]
async fn health_and_readiness() {
    let h = with_admin().await;
    let health = get(&h, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = get(&h, "/readyz").await;
    assert_eq!(
        (ready.status, ready.content_type.as_str(), ready.body.as_str()),
        (200, "application/json", "{\"ready\":true}\n")
    );
    assert!(h.login_answer("imap", "printer", PRINTER_PASSWORD).await.starts_with("a OK"));
    assert_eq!(get(&h, "/readyz").await.status, 200);

    // The token endpoint fails and the cached token is gone (the upstream
    // refused it): the next request fails, and readiness says which identity.
    h.token.set_fault(Some(Fault::aadsts(7000222)));
    h.token.revoke_all();
    let answer = h.login_answer("imap", "printer", PRINTER_PASSWORD).await;
    assert!(answer.starts_with("a NO"), "{answer}");
    let ready = get(&h, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let doc: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(doc["ready"], false);
    let reason = doc["reason"].as_str().unwrap();
    assert!(reason.starts_with("identity contoso: token endpoint failing: "), "{reason}");
    assert!(reason.contains("AADSTS7000222"), "{reason}");
    assert!(!ready.body.contains(testkit::token::CLIENT_SECRET), "{reason}");
    assert_eq!(ready.body.lines().count(), 1, "one line: {}", ready.body);
    // Alive all the same.
    assert_eq!(get(&h, "/healthz").await.status, 200);

    // The endpoint recovers: after its backoff the next login gets a token,
    // and the proxy is ready again.
    h.token.set_fault(None);
    let mut ready = get(&h, "/readyz").await;
    for _ in 0..40 {
        if ready.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.login_answer("pop3", "printer", PRINTER_PASSWORD).await;
        ready = get(&h, "/readyz").await;
    }
    assert_eq!(ready.status, 200, "{}", ready.body);
}

#[tokio::test]
async fn only_get_and_head_on_three_paths() {
    let h = with_admin().await;
    assert_eq!(get(&h, "/").await.status, 404);
    assert_eq!(get(&h, "/metrics/x").await.status, 404);
    assert_eq!(request(&h, reqwest::Method::POST, "/metrics").await.status, 405);
    let head = request(&h, reqwest::Method::HEAD, "/readyz").await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
}

#[tokio::test]
async fn readiness_is_withdrawn_while_sessions_drain() {
    let mut h =
        Harness::with(Options { top_extra: vec![ADMIN.into()], shutdown_timeout: "2s", ..Options::default() }).await;
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    c.expect("235 ").await;
    let proxy = h.shutdown();
    let mut ready = get(&h, "/readyz").await;
    for _ in 0..20 {
        if ready.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        ready = get(&h, "/readyz").await;
    }
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("shutting down"), "{}", ready.body);
    assert_eq!(get(&h, "/healthz").await.status, 200);
    drop(c);
    tokio::time::timeout(Duration::from_secs(10), proxy).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_reload_turns_the_admin_listener_on_moves_it_and_off() {
    let mut h = Harness::start().await;
    assert_eq!(h.admin, None);
    let on = format!("{}\n{ADMIN}\n", h.config_text);
    let done = h.reload(&on).await.unwrap();
    assert!(done.contains("admin listener on 127.0.0.1:"), "{done}");
    let first = h.admin.unwrap();
    assert_eq!(get(&h, "/healthz").await.status, 200);
    // The same config again: the same server, the same address.
    h.reload(&on).await.unwrap();
    assert_eq!(h.admin, Some(first));
    let port = free_port();
    h.reload(&format!("{}\nadmin: {{ bind: \"127.0.0.1:{port}\" }}\n", h.config_text)).await.unwrap();
    assert_eq!(h.admin.unwrap().port(), port);
    assert_eq!(get(&h, "/healthz").await.status, 200);
    assert!(tokio::net::TcpStream::connect(first).await.is_err(), "the old address still answers");
    let config_text = h.config_text.clone();
    let done = h.reload(&config_text).await.unwrap();
    assert!(done.contains("admin listener off"), "{done}");
    assert_eq!(h.admin, None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// With `state:` and Redis gone, the replica serves with local state: still
/// ready (a fleet losing Redis must not take every replica out), with a
/// `degraded` reason, and `shared_state_up` says 0 until Redis is back.
#[tokio::test]
async fn readyz_says_degraded_while_the_shared_state_is_down() {
    let Some(mut redis) = support::redis::RedisServer::start() else { return };
    let state =
        format!("state: {{backend: redis, url: \"redis://127.0.0.1:{}\", prefix: a1, timeout: 300ms}}", redis.port);
    let top = vec![ADMIN.into(), "token_store: { path: \"{dir}/tokens\" }".into(), state];
    let h = Harness::with(Options { top_extra: top, ..Options::default() }).await;
    let ready = get(&h, "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "{\"ready\":true}\n"));
    assert_eq!(value(&scrape(&h).await, "xoauth2_proxy_shared_state_up"), 1.0);

    redis.stop();
    // A round trip notices it is gone.
    assert!(h.login_answer("imap", "printer", PRINTER_PASSWORD).await.starts_with("a OK"));
    let s = scrape_until(&h, |s| s.get("xoauth2_proxy_shared_state_up") == Some(&0.0)).await;
    assert_eq!(value(&s, "xoauth2_proxy_shared_state_up"), 0.0);
    let ready = get(&h, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let body: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(body["ready"], true);
    let degraded = body["degraded"].as_str().unwrap();
    assert!(degraded.starts_with("shared state unreachable (redis://127.0.0.1:"), "{degraded}");
    assert!(degraded.ends_with("): serving with local state"), "{degraded}");

    redis.restart();
    scrape_until(&h, |s| s.get("xoauth2_proxy_shared_state_up") == Some(&1.0)).await;
    assert_eq!(get(&h, "/readyz").await.body, "{\"ready\":true}\n");
}

/// A login over its mailbox's cap waits (`session_wait`): the wait is in
/// `mailbox_slot_wait_seconds`, and one that waits in vain is a `limit`.
#[tokio::test]
async fn mailbox_waits_are_observed() {
    let top = vec![ADMIN.into(), "max_sessions_per_mailbox: 1".into(), "session_wait: 300ms".into()];
    let h = Harness::with(Options { top_extra: top, ..Options::default() }).await;
    let mut first = h.connect("pop3").await;
    first.expect("+OK").await;
    first.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    first.expect("+OK").await;
    first.expect("+OK").await;
    let busy = h.login_answer("pop3", "app", APP_PASSWORD).await;
    assert!(busy.starts_with("-ERR [IN-USE]"), "{busy}");
    let s = scrape(&h).await;
    assert_eq!(value(&s, "xoauth2_proxy_mailbox_slot_wait_seconds_count{listener=\"pop3\"}"), 1.0);
    assert!(value(&s, "xoauth2_proxy_mailbox_slot_wait_seconds_sum{listener=\"pop3\"}") >= 0.3);
    assert_eq!(logins(&s, "pop3", "limit"), 1.0);
    assert_eq!(logins(&s, "pop3", "ok"), 1.0);
    // The place freed, a waiting login takes it and its wait is counted.
    let mut second = h.connect("pop3").await;
    second.expect("+OK").await;
    second.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    second.expect("+OK").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(first);
    second.expect("+OK").await;
    let s = scrape(&h).await;
    assert_eq!(value(&s, "xoauth2_proxy_mailbox_slot_wait_seconds_count{listener=\"pop3\"}"), 2.0);
    assert_eq!(logins(&s, "pop3", "ok"), 2.0);
}
