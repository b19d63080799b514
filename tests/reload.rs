//! SIGHUP applies the whole configuration without dropping a session:
//! listeners added, removed and moved (sessions on them run to their end),
//! identities added or changed (a rotated secret: a new source and a new
//! token; an unchanged identity keeps its cached token), and a reload that
//! fails anywhere changes nothing and says why in one line.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;
use testkit::token::{CLIENT_ID, TENANT_ID};

/// The lines of listener `name` in the harness's config.
fn listener_block(text: &str, name: &str) -> String {
    let start = text.find(&format!("  - name: {name}\n")).unwrap_or_else(|| panic!("no listener {name}"));
    let rest = &text[start..];
    let end =
        rest[1..].find("\n  - name: ").map(|i| i + 2).unwrap_or_else(|| rest.find("\nupstream_ca_file").unwrap() + 1);
    rest[..end].to_string()
}

fn without_listener(text: &str, name: &str) -> String {
    text.replacen(&listener_block(text, name), "", 1)
}

/// A copy of listener `like` named `name`, with its bind replaced.
fn add_listener(text: &str, like: &str, name: &str, bind: &str) -> String {
    let block = listener_block(text, like)
        .replace(&format!("name: {like}\n"), &format!("name: {name}\n"))
        .replace("bind: 127.0.0.1:0", &format!("bind: {bind}"));
    text.replacen("upstream_ca_file:", &format!("{block}upstream_ca_file:"), 1)
}

fn with_account(text: &str, username: &str, identity: &str) -> String {
    text.replacen(
        "accounts:\n",
        &format!(
            "accounts:\n  - username: {username}\n    password: {username}-pass\n    mailbox: {username}@contoso.example\n    identity: {identity}\n"
        ),
        1,
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn spliced_pop3(h: &Harness) -> TestClient<tokio::net::TcpStream> {
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    c.expect("+OK").await;
    c
}

async fn spliced_smtp(h: &Harness) -> TestClient<tokio::net::TcpStream> {
    let mut c = h.connect("smtp").await;
    c.expect("220 ").await;
    c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    c.expect("235 ").await;
    c
}

/// The fake upstreams echo after login: a session that answers is alive.
async fn still_spliced(c: &mut TestClient<tokio::net::TcpStream>) {
    c.send("NOOP\r\n").await;
    assert_eq!(c.line().await, "NOOP");
}

async fn refused(addr: std::net::SocketAddr) -> bool {
    // The old accept loop ends at once; its socket closes with it.
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_listener_added_by_a_reload_serves_and_the_others_keep_their_sockets() {
    let mut h = Harness::start().await;
    let before: Vec<_> = ["imap", "pop3", "smtp"].iter().map(|l| h.addr(l)).collect();
    let mut spliced = spliced_smtp(&h).await;
    let text = add_listener(&h.config_text, "smtp", "smtp2", "127.0.0.1:0");
    let done = h.reload(&text).await.unwrap();
    assert!(done.starts_with("4 listeners (added smtp2 on 127.0.0.1:"), "{done}");
    assert!(done.contains("1 identity, 2 accounts"), "{done}");
    let after: Vec<_> = ["imap", "pop3", "smtp"].iter().map(|l| h.addr(l)).collect();
    assert_eq!(before, after, "unchanged listeners keep their sockets");
    assert!(h.login_answer("smtp2", "printer", PRINTER_PASSWORD).await.starts_with("235"));
    assert!(h.login_answer("smtp", "printer", PRINTER_PASSWORD).await.starts_with("235"));
    still_spliced(&mut spliced).await;
}

#[tokio::test]
async fn removing_a_listener_stops_its_accepts_but_not_its_sessions() {
    let mut h = Harness::start().await;
    let pop3 = h.addr("pop3");
    let mut spliced = spliced_pop3(&h).await;
    let mut logging_in = h.connect("pop3").await;
    logging_in.expect("+OK").await;
    let text = without_listener(&h.config_text, "pop3");
    let done = h.reload(&text).await.unwrap();
    assert!(done.starts_with("2 listeners (removed pop3)"), "{done}");
    assert!(refused(pop3).await, "pop3 still accepts connections");
    assert!(!h.reloader.local_addrs().iter().any(|(name, _)| name == "pop3"));
    // The spliced session runs on, and the one still logging in finishes
    // with the settings it started with.
    still_spliced(&mut spliced).await;
    logging_in.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    logging_in.expect("+OK").await;
    logging_in.expect("+OK").await;
    still_spliced(&mut logging_in).await;
    // Put back, it listens again (on a new socket).
    let done = h.reload(&h.config_text.clone()).await.unwrap();
    assert!(done.starts_with("3 listeners (added pop3 on 127.0.0.1:"), "{done}");
    assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
    still_spliced(&mut spliced).await;
}

#[tokio::test]
async fn a_moved_listener_listens_on_its_new_address_and_keeps_its_sessions() {
    let mut h = Harness::start().await;
    let old = h.addr("smtp");
    let mut spliced = spliced_smtp(&h).await;
    let port = free_port();
    let block = listener_block(&h.config_text, "smtp");
    let text =
        h.config_text.replacen(&block, &block.replace("bind: 127.0.0.1:0", &format!("bind: 127.0.0.1:{port}")), 1);
    let done = h.reload(&text).await.unwrap();
    assert!(done.starts_with(&format!("3 listeners (moved smtp to 127.0.0.1:{port})")), "{done}");
    assert_eq!(h.addr("smtp").port(), port);
    assert!(refused(old).await, "the old address still accepts");
    assert!(h.login_answer("smtp", "printer", PRINTER_PASSWORD).await.starts_with("235"));
    still_spliced(&mut spliced).await;
    // Renamed, on the same fixed address: the socket is handed over.
    let renamed = text.replacen("  - name: smtp\n", "  - name: smtp-submission\n", 1);
    let done = h.reload(&renamed).await.unwrap();
    assert!(done.contains("added smtp-submission on 127.0.0.1:"), "{done}");
    assert!(done.contains("removed smtp"), "{done}");
    assert_eq!(h.addr("smtp-submission").port(), port);
    assert!(h.login_answer("smtp-submission", "printer", PRINTER_PASSWORD).await.starts_with("235"));
}

#[tokio::test]
async fn a_rotated_secret_gets_a_new_token_an_unchanged_identity_keeps_its_own() {
    let mut h = Harness::start().await;
    assert!(h.login_answer("imap", "printer", PRINTER_PASSWORD).await.starts_with("a OK"));
    assert_eq!(h.token.requests(), 1);

    // Only the accounts change: the identity keeps its cached token.
    let text = with_account(&h.config_text, "extra", "contoso");
    let done = h.reload(&text).await.unwrap();
    assert!(done.ends_with("3 listeners, 1 identity, 3 accounts"), "{done}");
    assert!(h.login_answer("imap", "extra", "extra-pass").await.starts_with("a OK"));
    assert_eq!(h.token.requests(), 1, "the cached token was kept");

    // The admin rotates the app's secret in Entra, then in the config.
    h.token.rotate_secret("rotated~secret");
    let text = text.replace("client_secret: ${TEST_CLIENT_SECRET}", "client_secret: \"rotated~secret\"");
    let done = h.reload(&text).await.unwrap();
    assert!(done.contains("(contoso: settings changed, tokens dropped)"), "{done}");
    assert!(h.login_answer("smtp", "printer", PRINTER_PASSWORD).await.starts_with("235"));
    assert_eq!(h.token.requests(), 2, "a new token, from the new source");
    let forms = h.token.forms();
    assert_eq!(forms.last().unwrap()["client_secret"], "rotated~secret");
    assert_eq!(forms[0]["client_secret"], testkit::token::CLIENT_SECRET);
}

#[tokio::test]
async fn an_identity_added_by_a_reload_serves_its_accounts() {
    let mut h = Harness::start().await;
    assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
    let identity = format!(
        "identities:\n  fabrikam:\n    authority: {}\n    tenant: {TENANT_ID}\n    client_id: {CLIENT_ID}\n    \
         client_secret: ${{TEST_CLIENT_SECRET}}\n    scope: https://outlook.office365.com/.default\n",
        h.token.authority()
    );
    let text = with_account(&h.config_text.replacen("identities:\n", &identity, 1), "fab", "fabrikam");
    let done = h.reload(&text).await.unwrap();
    assert!(done.contains("2 identities (added fabrikam)"), "{done}");
    assert!(h.login_answer("imap", "fab", "fab-pass").await.starts_with("a OK"));
    assert!(h.login_answer("imap", "printer", PRINTER_PASSWORD).await.starts_with("a OK"));
    // One token per identity: contoso's from before, fabrikam's new one.
    assert_eq!(h.token.requests(), 2);
    // Removed again: its accounts' logins fail (the account is gone too).
    let done = h.reload(&h.config_text.clone()).await.unwrap();
    assert!(done.contains("1 identity (removed fabrikam)"), "{done}");
    assert!(h.login_answer("imap", "fab", "fab-pass").await.starts_with("a NO"));
}

#[tokio::test]
async fn a_reload_that_fails_changes_nothing_and_says_why_in_one_line() {
    let mut h = Harness::start().await;
    let before = h.reloader.local_addrs();
    let mut spliced = spliced_smtp(&h).await;
    assert_eq!(h.token.requests(), 1);

    let invalid = format!("{}\nmax_sessions_per_mailbox: 0\nlisteners_typo: 1\n", h.config_text);
    let error = h.reload(&invalid).await.unwrap_err();
    assert!(error.contains("listeners_typo"), "{error}");
    assert!(!error.contains('\n'), "{error}");

    // A new listener on an address in use, with a new account: neither applies.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let text =
        with_account(&add_listener(&h.config_text, "imap", "imap2", &format!("127.0.0.1:{port}")), "extra", "contoso");
    let error = h.reload(&text).await.unwrap_err();
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(error.starts_with(&format!("listener imap2: cannot listen on 127.0.0.1:{port}: ")), "{error}");
    assert_eq!(h.reloader.local_addrs(), before);
    assert!(h.login_answer("imap", "extra", "extra-pass").await.starts_with("a NO"), "the account was applied");

    // A certificate that cannot be read (a local TLS listener added).
    let block = listener_block(&h.config_text, "imap");
    let tls = h.config_text.replacen(&block, &format!("{block}    local_tls: implicit\n"), 1)
        + "tls: { cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem }\n";
    let error = h.reload(&tls).await.unwrap_err();
    assert!(error.contains("/nonexistent/cert.pem"), "{error}");

    // Everything still as it was.
    assert_eq!(h.reloader.local_addrs(), before);
    assert!(h.login_answer("imap", "printer", PRINTER_PASSWORD).await.starts_with("a OK"));
    assert_eq!(h.token.requests(), 1, "the cached token survived the failed reloads");
    still_spliced(&mut spliced).await;
}

/// The real binary: SIGHUP with a broken config, with a busy address, then
/// a good one; each outcome is one log line, and the proxy serves throughout.
#[tokio::test]
async fn sighup_on_the_binary_logs_one_line_per_outcome() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let text = h.config_text.replace("level: debug", "level: info");
    std::fs::write(&path, &text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"))
        .args(["run", "-c"])
        .arg(&path)
        .env("TEST_CLIENT_SECRET", testkit::token::CLIENT_SECRET)
        .env_remove("XOAUTH2_PROXY_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, log) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait = |needle: &str| loop {
        let line = log.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|e| panic!("no {needle:?}: {e}"));
        if line.contains(needle) {
            return line;
        }
    };
    let mut ports = HashMap::new();
    while ports.len() < 3 {
        let line = wait("listening");
        let name = line.split_whitespace().find_map(|w| w.strip_prefix("listener=")).unwrap().to_string();
        ports.insert(name, bound_port(&line));
    }
    let pid = child.id();

    std::fs::write(&path, text.replace("accounts:", "accounts: [")).unwrap();
    send_signal(pid, "HUP");
    let line = wait("SIGHUP");
    assert!(
        line.contains("ERROR") && line.contains("the configuration has errors; keeping the current one: "),
        "{line}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    std::fs::write(&path, add_listener(&text, "smtp", "smtp2", &format!("127.0.0.1:{port}"))).unwrap();
    send_signal(pid, "HUP");
    let line = wait("SIGHUP");
    assert!(
        line.contains(&format!("keeping the current configuration: listener smtp2: cannot listen on 127.0.0.1:{port}")),
        "{line}"
    );
    drop(busy);

    std::fs::write(&path, add_listener(&text, "smtp", "smtp2", &format!("127.0.0.1:{port}"))).unwrap();
    send_signal(pid, "HUP");
    let line = wait("SIGHUP");
    assert!(line.contains(&format!("SIGHUP: reloaded 4 listeners (added smtp2 on 127.0.0.1:{port})")), "{line}");
    for (name, port) in ports.iter().map(|(n, p)| (n.as_str(), *p)).chain([("smtp2", port)]) {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut c = TestClient::new(tcp);
        assert!(!c.line().await.is_empty(), "{name} greets");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The mailbox slots outlive a reload: a session opened before it still
/// holds its place under the (per-listener, reloaded) cap, and a raised cap
/// applies at once over the same counts.
#[tokio::test]
async fn mailbox_sessions_keep_their_places_and_a_new_cap_applies_at_once() {
    let caps = vec!["max_sessions_per_mailbox: 1".to_string(), "session_wait: 200ms".to_string()];
    let mut h = Harness::with(Options { top_extra: caps, ..Options::default() }).await;
    let mut first = spliced_pop3(&h).await;
    let text = with_account(&h.config_text, "other", "contoso");
    let done = h.reload(&text).await.unwrap();
    assert!(done.contains("3 accounts"), "{done}");
    let busy = h.login_answer("pop3", "app", APP_PASSWORD).await;
    assert!(busy.starts_with("-ERR [IN-USE]"), "the reload forgot the open session: {busy}");

    let done = h.reload(&text.replace("max_sessions_per_mailbox: 1", "max_sessions_per_mailbox: 2")).await.unwrap();
    assert!(done.contains("3 accounts"), "{done}");
    let mut second = spliced_pop3(&h).await;
    let busy = h.login_answer("pop3", "app", APP_PASSWORD).await;
    assert!(busy.starts_with("-ERR [IN-USE]"), "two sessions are open under a cap of 2: {busy}");
    still_spliced(&mut first).await;
    still_spliced(&mut second).await;
}

/// With `state:`, a reload keeps the replica's link to Redis (it connects
/// at start only) and builds new token sources through it; a changed
/// `state:` is said to apply at the next start.
#[tokio::test]
async fn a_reload_keeps_the_shared_state_and_says_a_changed_state_waits_for_a_restart() {
    let Some(redis) = support::redis::RedisServer::start() else { return };
    let state =
        format!("state: {{backend: redis, url: \"redis://127.0.0.1:{}\", prefix: r1, timeout: 500ms}}", redis.port);
    let top = vec!["token_store: { path: \"{dir}/tokens\" }".to_string(), state];
    let mut h = Harness::with(Options { top_extra: top, ..Options::default() }).await;
    assert!(h.login_answer("imap", "printer", PRINTER_PASSWORD).await.starts_with("a OK"));
    assert_eq!(h.token.requests(), 1);

    // Changed settings: a new source, wrapped for the fleet like the first.
    let changed = h.config_text.replace("prefix: r1", "prefix: r2").replace(
        "client_secret: ${TEST_CLIENT_SECRET}",
        "client_secret: ${TEST_CLIENT_SECRET}\n    min_token_lifetime: 4m",
    );
    let done = h.reload(&changed).await.unwrap();
    assert!(done.contains("contoso: settings changed, tokens dropped"), "{done}");
    assert!(done.ends_with("; state applies at the next start (the replica keeps its shared state link)"), "{done}");
    // The new source asks the fleet first (tokens are shared by identity
    // name): the token the first one put in Redis, still valid, serves
    // without a request to the token endpoint.
    assert!(h.login_answer("imap", "printer", PRINTER_PASSWORD).await.starts_with("a OK"));
    assert_eq!(h.token.requests(), 1, "the new source did not go through the shared state");

    // Still not the running one: said again; back to it: nothing said.
    let done = h.reload(&changed).await.unwrap();
    assert!(done.ends_with("3 listeners, 1 identity, 2 accounts; state applies at the next start (the replica keeps its shared state link)"), "{done}");
    let done = h.reload(&changed.replace("prefix: r2", "prefix: r1")).await.unwrap();
    assert!(done.ends_with("3 listeners, 1 identity, 2 accounts"), "{done}");
}
