//! The token lifecycle through the real proxy and CLI: certificate
//! credentials, refresh tokens with rotation, device code login, the encrypted
//! store shared by the proxy and the `token` command, endpoint outages, and
//! re-authorisation after `invalid_grant`.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;
use testkit::{DeviceOutcome, Fault};
use xoauth2_proxy::config::{TokenStoreConfig, TokenStoreKey};
use xoauth2_proxy::token::store::{unix_now, StoredTokens, TokenStore};

const STORE: &str = "token_store: {path: \"{dir}/store\", key_file: \"{dir}/store.key\"}";

fn delegated(extra_top: &[&str]) -> Options {
    let mut top = vec![STORE.to_string()];
    top.extend(extra_top.iter().map(|s| s.to_string()));
    Options {
        identity_auth: vec!["flow: refresh_token".into(), "client_secret: ${TEST_CLIENT_SECRET}".into()],
        top_extra: top,
        ..Options::default()
    }
}

fn store(h: &Harness) -> TokenStore {
    TokenStore::open(&TokenStoreConfig {
        path: h.dir().join("store"),
        key: TokenStoreKey::File(h.dir().join("store.key")),
    })
    .unwrap()
}

/// Stores a refresh token for `account` as a completed `login` would.
fn seed(h: &Harness, account: &str, access: Option<(&str, i64)>) -> String {
    let rt = h.token.seed_refresh_token(account);
    store(h)
        .save(&StoredTokens {
            identity: "contoso".into(),
            account: account.into(),
            refresh_token: rt.clone(),
            access_token: access.map(|(t, _)| t.to_string()),
            access_expires_at: access.map(|(_, left)| (unix_now() as i64 + left) as u64),
            updated_at: unix_now(),
            version: 0,
        })
        .unwrap();
    rt
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/certs").join(name)
}

/// An app registration certificate made from the fixture RSA key.
fn app_certificate(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = std::fs::read_to_string(fixture("rsa-2048-pkcs8.pem")).unwrap();
    let cert = testkit::TestPki::self_signed_for_key(&key, name);
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, &cert).unwrap();
    (path, cert)
}

#[tokio::test]
async fn certificate_credentials_send_a_verified_client_assertion() {
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, cert) = app_certificate(certs.path(), "app");
    let key_path = fixture("rsa-2048-pkcs8.pem");
    let key = std::fs::read_to_string(&key_path).unwrap();
    for algorithm in ["PS256", "RS256"] {
        let auth = format!(
            "certificate: {{cert_file: \"{}\", key_file: \"{}\", algorithm: {algorithm}}}",
            cert_path.display(),
            key_path.display()
        );
        let h = Harness::with(Options { identity_auth: vec![auth], ..Options::default() }).await;
        h.token.register_certificate(&cert, &key);
        assert!(h.login_answer("pop3", "app", APP_PASSWORD).await.starts_with("+OK"), "{algorithm}");
        let form = &h.token.forms()[0];
        assert_eq!(form["client_assertion_type"], "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
        assert!(!form.contains_key("client_secret"));
        assert_eq!(h.token.grants("client_credentials"), 1);
    }

    // A certificate the app registration does not know: the endpoint refuses
    // the app, clients get a temporary failure and `check --online` says why.
    let (other_path, _) = app_certificate(certs.path(), "other");
    let auth =
        format!("certificate: {{cert_file: \"{}\", key_file: \"{}\"}}", other_path.display(), key_path.display());
    let h = Harness::with(Options { identity_auth: vec![auth], ..Options::default() }).await;
    h.token.register_certificate(&cert, &key);
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    c.expect("-ERR [SYS/TEMP]").await;
    let out = h.output(&["check", "--online"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("  FAIL token ") && stdout.contains("AADSTS700027"), "{stdout}");
}

#[tokio::test]
async fn refresh_tokens_rotate_and_the_newest_is_always_the_one_stored() {
    let h = Harness::with(delegated(&[])).await;
    h.token.set_lifetime(Duration::from_secs(3));
    seed(&h, "printer", None);
    assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
    // The background refresh runs about every 1.5s for 3s tokens.
    until("three refreshes", || h.token.grants("refresh_token") >= 3).await;
    assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
    // Every refresh presented the newest token: the strict fake refused none.
    assert_eq!(h.token.refused_refreshes(), 0);
    let live = h.token.live_refresh_tokens();
    assert_eq!(live.len(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stored = store(&h).load("contoso", "printer").unwrap().unwrap();
    let live = h.token.live_refresh_tokens();
    assert_eq!(vec![stored.refresh_token.clone()], live);
    assert!(h
        .token
        .forms()
        .iter()
        .filter(|f| f["grant_type"] == "refresh_token")
        .all(|f| f["client_secret"] == testkit::token::CLIENT_SECRET));
}

#[tokio::test]
async fn device_code_login_stores_a_refresh_token_the_proxy_then_uses() {
    let h = Harness::with(delegated(&[])).await;
    h.token.script_device_login(2, false, DeviceOutcome::Approve, 1);
    let out = h.output(&["login", "printer"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("https://microsoft.com/devicelogin") && stdout.contains("FAKE-CODE"), "{stdout}");
    assert!(stdout.contains("Signed in"), "{stdout}");
    assert_eq!(h.token.device_polls(), 3);
    let path = store(&h).path_for("contoso", "printer");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    // The proxy picks it up without a restart, and reuses the access token
    // the login obtained instead of refreshing.
    assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
    assert_eq!(h.token.grants("refresh_token"), 0);
}

#[tokio::test]
async fn device_code_login_denied_or_cancelled_leaves_the_store_untouched() {
    let h = Harness::with(delegated(&[])).await;
    let path = store(&h).path_for("contoso", "printer");

    h.token.script_device_login(0, false, DeviceOutcome::Deny, 1);
    let out = h.output(&["login", "printer"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("declined"));
    assert!(!path.exists());

    h.token.script_device_login(1000, false, DeviceOutcome::Approve, 1);
    let mut login = h.command(&["login", "printer"]);
    login.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = tokio::process::Command::from(login).spawn().unwrap();
    let polls = h.token.device_polls();
    until("the first poll", || h.token.device_polls() > polls).await;
    send_signal(child.id().unwrap(), "INT");
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the token store was not changed"));
    assert!(!path.exists());
}

#[tokio::test]
async fn token_command_prints_or_writes_a_valid_token() {
    // App-only: a new token each time.
    let h = Harness::start().await;
    let out = h.output(&["token", "printer"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.ends_with('\n') && h.token.issued().contains(&printed.trim_end().to_string()));
    let file = h.dir().join("out/tokenfile");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let out = h.output(&["token", "scanner@contoso.example", "--output", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(h.token.issued().contains(&std::fs::read_to_string(&file).unwrap().trim_end().to_string()));

    // Delegated: the stored token while it has enough life, else a refresh.
    let h = Harness::with(delegated(&[])).await;
    seed(&h, "printer", Some(("stored-access-token", 3600)));
    let out = h.output(&["token", "printer"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "stored-access-token\n");
    assert_eq!(h.token.grants("refresh_token"), 0);
    let out = h.output(&["token", "printer", "--min-lifetime", "2h"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A JWT: base64url of `{"typ":"JWT"...` starts "eyJ".
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("eyJ"));
    assert_eq!(h.token.grants("refresh_token"), 1);
    let out = h.output(&["token", "nobody"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account with username or mailbox \"nobody\""));
}

#[tokio::test]
async fn the_proxy_and_a_token_command_refresh_an_account_only_once() {
    let h = Harness::with(delegated(&[])).await;
    seed(&h, "printer", Some(("expired", -10)));
    h.token.set_fault(Some(Fault::Delay(Duration::from_millis(1500))));
    let login = {
        let addr = h.addr("pop3");
        tokio::spawn(async move {
            let mut c = TestClient::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            c.expect("+OK").await;
            c.send(format!("USER printer\r\nPASS {PRINTER_PASSWORD}\r\n")).await;
            c.expect("+OK").await;
            c.line().await
        })
    };
    until("the proxy's refresh to start", || h.token.grants("refresh_token") == 1).await;
    let out = h.output(&["token", "printer"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(login.await.unwrap().starts_with("+OK"));
    assert_eq!(h.token.grants("refresh_token"), 1, "the token command waited for the proxy's refresh and reused it");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(h.token.issued(), [printed.trim_end().to_string()]);
}

#[tokio::test]
async fn invalid_grant_means_reauthorisation_not_a_temporary_failure() {
    let hook = "on_reauth_required: 'echo \"$XOAUTH2_PROXY_ACCOUNT $XOAUTH2_PROXY_IDENTITY\" >> \"{dir}/hook.out\"'";
    let h = Harness::with(delegated(&[hook])).await;
    seed(&h, "printer", None);
    h.token.revoke_refresh_tokens();

    for (listener, answer) in [("smtp", "535 5.7.8"), ("imap", "a NO [AUTHENTICATIONFAILED]"), ("pop3", "-ERR [AUTH]")]
    {
        let got = h.login_answer(listener, "printer", PRINTER_PASSWORD).await;
        assert!(got.starts_with(answer), "{listener}: {got}");
    }
    // One refused refresh; the others did not hammer the endpoint.
    assert_eq!(h.token.refused_refreshes(), 1);
    let out = h.dir().join("hook.out");
    until("the hook", || std::fs::read_to_string(&out).is_ok_and(|s| s.contains("printer contoso"))).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1, "the hook runs once per refused token");

    // An admin runs `login` again (here: a new token in the store): no restart needed.
    seed(&h, "printer", None);
    assert!(h.login_answer("pop3", "printer", PRINTER_PASSWORD).await.starts_with("+OK"));
}

#[tokio::test]
async fn accounts_that_never_logged_in_are_told_to_authenticate() {
    let h = Harness::with(delegated(&[])).await;
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER app\r\nPASS {APP_PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    c.expect("-ERR [AUTH]").await;
    assert_eq!(h.token.requests(), 0);
}

#[tokio::test]
async fn a_store_written_with_another_key_is_a_temporary_failure_and_is_kept() {
    let h = Harness::with(delegated(&[])).await;
    let other = TokenStore::open(&TokenStoreConfig {
        path: h.dir().join("store"),
        key: TokenStoreKey::Inline(xoauth2_proxy::secret::Secret::new(
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
        )),
    })
    .unwrap();
    other
        .save(&StoredTokens {
            identity: "contoso".into(),
            account: "printer".into(),
            refresh_token: "rt".into(),
            access_token: None,
            access_expires_at: None,
            updated_at: 0,
            version: 0,
        })
        .unwrap();
    let mut c = h.connect("pop3").await;
    c.expect("+OK").await;
    c.send(format!("USER printer\r\nPASS {PRINTER_PASSWORD}\r\n")).await;
    c.expect("+OK").await;
    c.expect("-ERR [SYS/TEMP]").await;
    assert!(store(&h).path_for("contoso", "printer").exists());
}

#[tokio::test]
async fn a_cached_token_survives_an_endpoint_outage_but_not_its_expiry() {
    let h = Harness::start().await;
    assert!(h.login_answer("pop3", "app", APP_PASSWORD).await.starts_with("+OK"));
    h.token.set_fault(Some(Fault::Status(503)));
    assert!(h.login_answer("pop3", "app", APP_PASSWORD).await.starts_with("+OK"));
    assert_eq!(h.token.issued().len(), 1);

    let h = Harness::start().await;
    h.token.set_lifetime(Duration::from_secs(2));
    assert!(h.login_answer("pop3", "app", APP_PASSWORD).await.starts_with("+OK"));
    h.token.set_fault(Some(Fault::Status(503)));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (listener, answer) in [("smtp", "454 4.7.0"), ("imap", "a NO [UNAVAILABLE]"), ("pop3", "-ERR [SYS/TEMP]")] {
        let got = h.login_answer(listener, "app", APP_PASSWORD).await;
        assert!(got.starts_with(answer), "{listener}: {got}");
    }
}

#[tokio::test]
async fn check_online_reports_each_identity_with_the_parsed_entra_error() {
    // tests/doctor.rs diagnoses every step; this is the token endpoint's side.
    let h = Harness::start().await;
    h.token.set_fault(Some(Fault::Error {
        status: 401,
        error: "invalid_client".into(),
        description: "Invalid client secret provided.".into(),
        code: 7000215,
    }));
    let out = h.output(&["check", "--online"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains("  FAIL token ")
            && stdout.contains("AADSTS7000215")
            && stdout.contains("client_secret is wrong"),
        "{stdout}"
    );
    // Answers are bounded: a 1 MiB "token" is refused, not buffered.
    h.token.set_fault(Some(Fault::Oversized(1024 * 1024)));
    let out = h.output(&["check", "--online"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("response larger than 262144 bytes"), "{stdout}");
}
