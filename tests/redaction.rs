//! Full sessions of all three protocols with every log at TRACE level: no
//! password, token, client secret or refresh token, nor the base64 of any of
//! them, may appear in what is logged.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use support::*;
use testkit::token::CLIENT_SECRET;
use testkit::{ExchangeFault, Fault};
use xoauth2_proxy::config::{TokenStoreConfig, TokenStoreKey};
use xoauth2_proxy::token::store::{unix_now, StoredTokens, TokenStore};

static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_everything() -> Arc<Mutex<Vec<u8>>> {
    LOG.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .try_init()
            .expect("the only subscriber in this test binary");
        buffer
    })
    .clone()
}

const WRONG: &str = "Wr0ng-Passw0rd!";

async fn smtp_sessions(h: &Harness) {
    let mut c = h.connect("smtp").await;
    c.expect("220").await;
    c.send("EHLO x\r\n").await;
    c.until("250 ").await;
    c.send(format!("AUTH PLAIN {}\r\n", plain("printer", WRONG))).await;
    c.expect("535").await;
    c.send("AUTH LOGIN\r\n").await;
    c.expect("334").await;
    c.send(format!("{}\r\n", b64(b"printer"))).await;
    c.expect("334").await;
    c.send(format!("{}\r\n", b64(PRINTER_PASSWORD.as_bytes()))).await;
    c.expect("235").await;
    let mut c = h.connect("smtp").await;
    c.expect("220").await;
    c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    c.expect("235").await;
}

async fn imap_sessions(h: &Harness) {
    let mut c = h.connect("imap").await;
    c.expect("* OK").await;
    c.send(format!("a LOGIN printer \"{WRONG}\"\r\n")).await;
    c.expect("a NO").await;
    c.send(format!("b LOGIN {{{}}}\r\n", "printer".len())).await;
    c.expect("+").await;
    c.send(format!("printer {{{}+}}\r\n{PRINTER_PASSWORD}\r\n", PRINTER_PASSWORD.len())).await;
    c.expect("b OK").await;
    let mut c = h.connect("imap").await;
    c.expect("* OK").await;
    c.send(format!("a AUTHENTICATE PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.expect("a OK").await;
}

async fn pop3_sessions(h: &Harness) {
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER printer\r\nPASS {WRONG}\r\n")).await;
    c.expect("+OK").await;
    c.expect("-ERR").await;
    c.send(format!("AUTH PLAIN\r\n{}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("+").await;
    c.expect("+OK").await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    c.expect("+OK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level() {
    let log = capture_everything();
    let mut secrets: Vec<String> =
        vec![PRINTER_PASSWORD.into(), APP_PASSWORD.into(), WRONG.into(), CLIENT_SECRET.into()];
    let users = ["printer", "app", "PRINTER"];
    let mailboxes = [MAILBOX, SMTP_USER, SHARED_MAILBOX];

    // App-only: client secret, SASL PLAIN and LOGIN, IMAP literals, a refused
    // token (the error challenge) and its fresh replacement.
    let h = Harness::start().await;
    smtp_sessions(&h).await;
    imap_sessions(&h).await;
    pop3_sessions(&h).await;
    h.token.revoke_all();
    pop3_sessions(&h).await;
    h.smtp.set_refuse_all(true);
    let mut c = h.connect("smtp").await;
    c.expect("220").await;
    c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain("app", APP_PASSWORD))).await;
    c.until("250 ").await;
    c.expect("535").await;
    secrets.extend(h.token.issued());

    // Delegated: refresh tokens from the encrypted store, rotated.
    let store_line = "token_store: {path: \"{dir}/store\", key_file: \"{dir}/store.key\"}";
    let d = Harness::with(Options {
        identity_auth: vec!["flow: refresh_token".into(), "client_secret: ${TEST_CLIENT_SECRET}".into()],
        top_extra: vec![store_line.into()],
        ..Options::default()
    })
    .await;
    let store = TokenStore::open(&TokenStoreConfig {
        path: d.dir().join("store"),
        key: TokenStoreKey::File(d.dir().join("store.key")),
    })
    .unwrap();
    for account in ["printer", "app"] {
        let seeded = d.token.seed_refresh_token(account);
        store
            .save(&StoredTokens {
                identity: "contoso".into(),
                account: account.into(),
                refresh_token: seeded.clone(),
                access_token: None,
                access_expires_at: None,
                updated_at: unix_now(),
                version: 0,
            })
            .unwrap();
        secrets.push(seeded);
    }
    let debug_log = log.clone();
    let _guard = scopeguard(move || {
        if std::env::var("REDACTION_DEBUG").is_ok() {
            eprintln!(
                "{}",
                String::from_utf8_lossy(&debug_log.lock().unwrap())
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    });
    pop3_sessions(&d).await;
    secrets.extend(d.token.live_refresh_tokens());
    secrets.extend(d.token.issued());
    secrets.push(std::fs::read_to_string(d.dir().join("store.key")).unwrap().trim().to_string());

    let needles = needles(&secrets, &users, &mailboxes);
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(text.len() > 10_000, "the capture looks empty ({} bytes)", text.len());
    assert!(text.contains("authentication failure") && text.contains("TRACE"), "capture is not at trace level");
    assert_no_needle(&text, &needles, "the log");
}

/// Everything `secrets` could look like on the wire or in a line of text.
fn needles(secrets: &[String], users: &[&str], mailboxes: &[&str]) -> Vec<String> {
    let mut needles = Vec::new();
    for secret in secrets {
        needles.push(secret.clone());
        needles.push(b64(secret.as_bytes()));
        // Long tokens: any 32-character slice counts.
        if secret.len() > 64 {
            needles.push(secret[secret.len() / 2..secret.len() / 2 + 32].to_string());
        }
        for user in users {
            needles.push(plain(user, secret));
        }
        for mailbox in mailboxes {
            let xoauth2 = format!("user={mailbox}\x01auth=Bearer {secret}\x01\x01");
            needles.push(b64(xoauth2.as_bytes()));
        }
    }
    needles
}

fn assert_no_needle(text: &str, needles: &[String], what: &str) {
    for needle in needles {
        if let Some(at) = text.find(needle.as_str()) {
            let start = text[..at].rfind('\n').map_or(0, |n| n + 1);
            panic!("a secret reached {what}:\n{}", &text[start..(at + needle.len() + 80).min(text.len())]);
        }
    }
}

/// Runs `check --online` and `check --online --json`; returns all they printed.
async fn check_output(h: &Harness) -> String {
    let mut out = String::new();
    for args in [&["check", "--online"][..], &["check", "--online", "--json"][..]] {
        let o = h.output(args).await;
        out.push_str(&String::from_utf8_lossy(&o.stdout));
        out.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    out
}

/// `check --online` and `--json` print claims by name, Entra's and
/// Exchange's answers and the fixes, but never a token, secret or password:
/// after successes, Entra refusals, refused tokens (with their error
/// challenge) and Exchange's failures, for app-only and delegated identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_prints_no_secret() {
    let mut printed = String::new();
    let mut secrets: Vec<String> = vec![PRINTER_PASSWORD.into(), APP_PASSWORD.into(), CLIENT_SECRET.into()];

    let h = Harness::with(mailbox_upstreams(Options::default())).await;
    printed.push_str(&check_output(&h).await);
    h.smtp.set_refuse_all(true);
    h.imap.set_exchange_fault(Some(ExchangeFault::NotConnected));
    h.pop3.set_exchange_fault(Some(ExchangeFault::Challenge(r#"{"status":"401","schemes":"bearer"}"#.into())));
    printed.push_str(&check_output(&h).await);
    h.token.set_fault(Some(Fault::aadsts(7000215)));
    printed.push_str(&check_output(&h).await);
    secrets.extend(h.token.issued());

    let d = Harness::with(mailbox_upstreams(Options {
        identity_auth: vec!["flow: refresh_token".into(), "client_secret: ${TEST_CLIENT_SECRET}".into()],
        top_extra: vec!["token_store: {path: \"{dir}/store\", key_file: \"{dir}/store.key\"}".into()],
        ..Options::default()
    }))
    .await;
    let store = TokenStore::open(&TokenStoreConfig {
        path: d.dir().join("store"),
        key: TokenStoreKey::File(d.dir().join("store.key")),
    })
    .unwrap();
    for (account, user) in [("printer", MAILBOX), ("app", SHARED_MAILBOX)] {
        let seeded = d.token.seed_refresh_token(user);
        store
            .save(&StoredTokens {
                identity: "contoso".into(),
                account: account.into(),
                refresh_token: seeded.clone(),
                access_token: None,
                access_expires_at: None,
                updated_at: unix_now(),
                version: 0,
            })
            .unwrap();
        secrets.push(seeded);
    }
    printed.push_str(&check_output(&d).await);
    d.imap.set_exchange_fault(Some(ExchangeFault::AuthenticationFailed));
    printed.push_str(&check_output(&d).await);
    secrets.extend(d.token.issued());
    secrets.extend(d.token.live_refresh_tokens());
    secrets.push(std::fs::read_to_string(d.dir().join("store.key")).unwrap().trim().to_string());

    assert!(printed.contains("ok   login     imap") && printed.contains("\"step\": \"login\""), "{printed}");
    assert!(printed.contains("AADSTS7000215") && printed.contains("not connected"), "{printed}");
    assert!(secrets.len() > 8, "tokens were issued and collected: {}", secrets.len());
    let needles = needles(&secrets, &["printer", "app"], &[MAILBOX, SMTP_USER, SHARED_MAILBOX]);
    assert_no_needle(&printed, &needles, "check's output");
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}
