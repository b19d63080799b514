//! `check --online` as a diagnosis: each fault is set up at the fake token
//! endpoint or the fake Exchange upstreams, and the test asserts the step
//! that fails and the fix printed, in the config's own ids.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use testkit::token::{CLIENT_ID, SP_OBJECT_ID, TENANT, TENANT_ID};
use testkit::{ExchangeFault, Fault, TokenShape};
use xoauth2_proxy::config::{TokenStoreConfig, TokenStoreKey};
use xoauth2_proxy::token::store::{unix_now, StoredTokens, TokenStore};

async fn harness() -> Harness {
    Harness::with(mailbox_upstreams(Options::default())).await
}

const STORE: &str = "token_store: {path: \"{dir}/store\", key_file: \"{dir}/store.key\"}";

async fn delegated() -> Harness {
    Harness::with(mailbox_upstreams(Options {
        identity_auth: vec!["flow: refresh_token".into(), "client_secret: ${TEST_CLIENT_SECRET}".into()],
        top_extra: vec![STORE.into()],
        ..Options::default()
    }))
    .await
}

/// Stores a refresh token for `account`, as `login` would have.
fn seed(h: &Harness, account: &str, upn: &str) {
    let store = TokenStore::open(&TokenStoreConfig {
        path: h.dir().join("store"),
        key: TokenStoreKey::File(h.dir().join("store.key")),
    })
    .unwrap();
    store
        .save(&StoredTokens {
            identity: "contoso".into(),
            account: account.into(),
            refresh_token: h.token.seed_refresh_token(upn),
            access_token: None,
            access_expires_at: None,
            updated_at: unix_now(),
            version: 0,
        })
        .unwrap();
}

struct Run {
    code: Option<i32>,
    stdout: String,
}

async fn check(h: &Harness) -> Run {
    let out = h.output(&["check", "--online"]).await;
    Run { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into_owned() }
}

impl Run {
    /// The line of the first check that is not ok, and everything indented under it.
    fn first_problem(&self) -> String {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("FAIL ") || l.trim_start().starts_with("warn "))
            .unwrap_or_else(|| panic!("no failing step in\n{}", self.stdout));
        let indent = lines[at].len() - lines[at].trim_start().len();
        let mut block = vec![lines[at]];
        block.extend(lines[at + 1..].iter().take_while(|l| l.len() - l.trim_start().len() > indent));
        block.join("\n")
    }

    /// Asserts the first problem is at `step` with `status` and mentions every needle.
    fn fails_at(&self, status: &str, step: &str, needles: &[&str]) -> String {
        let block = self.first_problem();
        let head = block.lines().next().unwrap().trim_start();
        assert!(head.starts_with(&format!("{status:<4} {step}")), "expected {status} {step}, got:\n{}", self.stdout);
        for needle in needles {
            assert!(block.contains(needle), "{needle:?} is not in\n{block}\n\nwhole output:\n{}", self.stdout);
        }
        block
    }
}

#[tokio::test]
async fn a_good_configuration_is_ok_at_every_step() {
    let h = harness().await;
    let run = check(&h).await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let s = &run.stdout;
    assert!(
        s.contains(&format!("identity \"contoso\" (client_credentials, tenant {TENANT}, client_id {CLIENT_ID})")),
        "{s}"
    );
    assert!(
        s.contains(&format!(
            "  ok   endpoint  {}/{TENANT}: HTTP 200, tenant exists (tenant ID {TENANT_ID})",
            h.token.authority()
        )),
        "{s}"
    );
    assert!(s.contains("  ok   token     issued, valid for 3599 s"), "{s}");
    assert!(s.contains(&format!("  ok   claims    aud https://outlook.office365.com, tid {TENANT_ID}, roles IMAP.AccessAsApp POP.AccessAsApp SMTP.SendAsApp, exp ")), "{s}");
    assert!(s.contains(&format!("  account \"printer\" (mailbox {MAILBOX}, smtp_user {SMTP_USER})")), "{s}");
    for (proto, port, user) in [
        ("imap", h.imap.addr().port(), MAILBOX),
        ("pop3", h.pop3.addr().port(), MAILBOX),
        ("smtp", h.smtp.addr().port(), SMTP_USER),
    ] {
        assert!(
            s.contains(&format!("    ok   login     {proto} localhost:{port} as {user}: authenticated; ")),
            "{proto}: {s}"
        );
    }
    assert!(s.contains("0 warning(s), 0 failed"), "{s}");
    // The upstreams saw one real login per account and protocol, as the right user.
    assert!(h.imap.logins().contains(&MAILBOX.to_string()) && h.imap.logins().contains(&SHARED_MAILBOX.to_string()));
    assert!(h.smtp.logins().contains(&SMTP_USER.to_string()), "SMTP logs in as smtp_user: {:?}", h.smtp.logins());
    assert_eq!(h.token.discovery_requests(), 1);
}

#[tokio::test]
async fn json_is_the_same_report_as_one_document() {
    let h = harness().await;
    h.pop3.set_exchange_fault(Some(ExchangeFault::AuthenticationFailed));
    let out = h.output(&["check", "--online", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["valid"], true);
    assert_eq!(doc["result"]["exit_code"], 1);
    let checks = doc["checks"].as_array().unwrap();
    let claims = checks.iter().find(|c| c["step"] == "claims").unwrap();
    assert_eq!(claims["status"], "ok");
    assert_eq!(claims["facts"]["roles"], serde_json::json!(["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"]));
    assert_eq!(claims["facts"]["tid"], TENANT_ID);
    let failed: Vec<&serde_json::Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(failed.len(), 2, "one POP3 login per account: {failed:?}");
    assert_eq!(failed[0]["protocol"], "pop3");
    assert_eq!(failed[0]["account"], "printer");
    assert_eq!(failed[0]["facts"]["reply"], "Authentication failure: unknown user name or bad password.");
    assert!(failed[0]["fix"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["command"].as_str().is_some_and(|c| c.starts_with("New-ServicePrincipal"))));
    assert_eq!(doc["result"]["counts"]["failed"], 2);
    // The offline form is JSON too, and an invalid config says why with exit 2.
    let out = h.output(&["check", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["listeners"][0]["upstream_tls"], "implicit");
    assert!(doc.get("checks").is_none());
    std::fs::write(&h.config_path, "listeners: []\nbogus: 1\n").unwrap();
    let out = h.output(&["check", "--online", "--json"]).await;
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], false);
    assert!(!doc["problems"].as_array().unwrap().is_empty());
}

// ---- 1. the token endpoint and the tenant ---------------------------------------

#[tokio::test]
async fn an_endpoint_failing_with_http_503_stops_before_any_token_request() {
    let h = harness().await;
    h.token.set_fault(Some(Fault::Status(503)));
    let before = h.token.requests();
    let run = check(&h).await;
    assert_eq!(run.code, Some(1));
    run.fails_at("FAIL", "endpoint", &["HTTP 503", "a problem at Entra or at a proxy in between"]);
    assert_eq!(h.token.requests(), before, "the chain stops at its first failure");
    assert!(!run.stdout.contains("token     "), "{}", run.stdout);
}

#[tokio::test]
async fn an_unknown_tenant_is_aadsts90002_and_a_malformed_one_900023() {
    let h = Harness::with(mailbox_upstreams(Options {
        tenant: Some("fabrikam.onmicrosoft.com".into()),
        ..Options::default()
    }))
    .await;
    check(&h).await.fails_at(
        "FAIL",
        "endpoint",
        &[
            "HTTP 400: AADSTS90002: Tenant 'fabrikam.onmicrosoft.com' not found.",
            "AADSTS90002: tenant not found",
            "set tenant of identity \"contoso\" to the Directory (tenant) ID",
        ],
    );
    let h =
        Harness::with(mailbox_upstreams(Options { tenant: Some("contoso_tenant".into()), ..Options::default() })).await;
    check(&h).await.fails_at("FAIL", "endpoint", &["AADSTS900023", "not a valid tenant identifier"]);
}

#[tokio::test]
async fn an_endpoint_nobody_listens_on_is_a_connection_failure() {
    let closed = closed_port().await;
    let h =
        Harness::with(mailbox_upstreams(Options { authority: Some(format!("http://{closed}")), ..Options::default() }))
            .await;
    check(&h).await.fails_at("FAIL", "endpoint", &["nothing accepted a connection to 127.0.0.1", "HTTPS_PROXY"]);
}

#[tokio::test]
async fn an_untrusted_endpoint_certificate_is_a_tls_failure() {
    // A TLS server whose CA is not in upstream_ca_file: the fake IMAP upstream will do.
    let h = harness().await;
    let authority = format!("https://localhost:{}", h.imap.addr().port());
    let h2 = Harness::with(mailbox_upstreams(Options {
        authority: Some(authority),
        untrusted_upstream: true,
        ..Options::default()
    }))
    .await;
    check(&h2).await.fails_at("FAIL", "endpoint", &["certificate of localhost is not trusted", "upstream_ca_file"]);
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_a_dns_failure() {
    let h = Harness::with(mailbox_upstreams(Options {
        authority: Some("https://login.invalid".into()),
        identity_extra: vec!["token_timeout: 5s".into()],
        ..Options::default()
    }))
    .await;
    check(&h).await.fails_at("FAIL", "endpoint", &["login.invalid does not resolve", "getent hosts login.invalid"]);
}

// ---- 2. the token: Entra's refusals -----------------------------------------------

#[tokio::test]
async fn each_entra_refusal_of_an_app_only_token_gets_its_cause_and_fix() {
    let h = harness().await;
    let cases: &[(u32, &[&str])] = &[
        (
            7000215,
            &[
                "HTTP 401 invalid_client: AADSTS7000215: Invalid client secret provided.",
                "the secret's ID was pasted instead of its Value",
                "not the Secret ID column",
            ],
        ),
        (7000222, &["AADSTS7000222: the client secret has expired", "New client secret"]),
        (
            700016,
            &[
                "application not found in the tenant",
                &format!("compare client_id {CLIENT_ID} with Application (client) ID"),
            ],
        ),
        (90002, &["AADSTS90002: tenant not found"]),
        (900023, &["AADSTS900023"]),
        (65001, &["consent missing", &format!("Grant admin consent for {TENANT}")]),
        (700027, &["certificate is not the one uploaded", "Upload certificate"]),
        (700024, &["clock is wrong", "timedatectl set-ntp true"]),
        (70011, &["invalid scope", "scope: https://outlook.office365.com/.default"]),
        (500011, &["Exchange Online was not found in the tenant"]),
        (7000112, &["disabled", "Enabled for users to sign-in: Yes"]),
        (53003, &["Conditional Access"]),
    ];
    for (code, needles) in cases {
        h.token.set_fault(Some(Fault::aadsts(*code)));
        let run = check(&h).await;
        assert_eq!(run.code, Some(1), "AADSTS{code}");
        run.fails_at("FAIL", "token", needles);
        assert!(!run.stdout.contains("claims    "), "AADSTS{code}: the chain stops at the token\n{}", run.stdout);
    }
}

#[tokio::test]
async fn each_entra_refusal_of_a_delegated_token_gets_its_cause_and_fix() {
    let h = delegated().await;
    let login = format!("xoauth2-proxy login -c {} printer", h.config_path.display());
    let cases: &[(u32, &[&str])] = &[
        (50173, &["revoked", &login]),
        (700082, &["inactivity", &login]),
        (70008, &["expired or was already used", &login]),
        (7000218, &["Allow public client flows: Yes"]),
        (65001, &["consent missing", &login]),
        (50076, &["multi-factor", &login]),
    ];
    for (code, needles) in cases {
        seed(&h, "printer", MAILBOX);
        seed(&h, "app", SHARED_MAILBOX);
        h.token.set_fault(Some(Fault::aadsts(*code)));
        let run = check(&h).await;
        assert_eq!(run.code, Some(1), "AADSTS{code}");
        let block = run.fails_at("FAIL", "token", needles);
        assert!(block.contains(&format!("AADSTS{code}")), "{block}");
    }
    // Never signed in: the login command, with this config and account.
    h.token.set_fault(None);
    std::fs::remove_dir_all(h.dir().join("store")).unwrap();
    check(&h).await.fails_at("FAIL", "token", &["never signed in", &login]);
}

/// The ownership story: the delegated checks write the token store (a rotated
/// refresh token), so root is sent to the service user as `login` is, and the
/// app-only identities are checked all the same.
#[tokio::test]
async fn root_does_not_write_the_service_users_token_store() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root (CI runs as root) to give a directory to another user");
        return;
    }
    let h = delegated().await;
    seed(&h, "printer", MAILBOX);
    let store = h.dir().join("store");
    // 65534 is nobody on Debian.
    std::os::unix::fs::chown(&store, Some(65534), Some(65534)).unwrap();
    let before: Vec<_> = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name()).collect();
    let run = check(&h).await;
    assert_eq!(run.code, Some(1));
    run.fails_at("FAIL", "local", &[&format!("{} belongs to nobody", store.display()), "sudo -u nobody"]);
    assert!(
        run.stdout.contains("FAIL token     not checked: its accounts' tokens are in the token store"),
        "{}",
        run.stdout
    );
    let after: Vec<_> = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "nothing was written to the store");
}

// ---- 3. the token's claims ------------------------------------------------------

#[tokio::test]
async fn a_missing_application_permission_is_named_and_only_its_logins_are_skipped() {
    let h = harness().await;
    h.token.set_token_shape(Some(TokenShape::app_without("POP.AccessAsApp")));
    let attempts = h.pop3.auth_attempts();
    let run = check(&h).await;
    assert_eq!(run.code, Some(1));
    run.fails_at(
        "FAIL",
        "claims",
        &[
            "roles IMAP.AccessAsApp SMTP.SendAsApp",
            "the token lacks POP.AccessAsApp (pop3 for listener \"pop3\")",
            "Office 365 Exchange Online > Application permissions > POP.AccessAsApp > Add permissions",
            &format!("Grant admin consent for {TENANT}"),
        ],
    );
    assert_eq!(h.pop3.auth_attempts(), attempts, "no POP3 login is tried with a token that cannot work");
    assert!(
        run.stdout.contains("    ok   login     imap ") && run.stdout.contains("    ok   login     smtp "),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn delegated_permissions_on_an_app_only_registration_are_called_out() {
    let h = harness().await;
    h.token.set_token_shape(Some(TokenShape { roles: None, ..TokenShape::app() }));
    let run = check(&h).await;
    run.fails_at(
        "FAIL",
        "claims",
        &["roles (none)", "do not apply to client credentials", "IMAP.AccessAsApp", "SMTP.SendAsApp"],
    );
    assert!(!run.stdout.contains("login     "), "no login can work: {}", run.stdout);
}

#[tokio::test]
async fn a_token_for_another_resource_or_tenant_stops_the_chain() {
    let h = harness().await;
    h.token.set_token_shape(Some(TokenShape { aud: "https://graph.microsoft.com".into(), ..TokenShape::app() }));
    check(&h).await.fails_at(
        "FAIL",
        "claims",
        &["aud https://graph.microsoft.com", "Microsoft Graph token", "scope: https://outlook.office365.com/.default"],
    );
    h.token
        .set_token_shape(Some(TokenShape { tid: "00000000-1111-2222-3333-444444444444".into(), ..TokenShape::app() }));
    check(&h).await.fails_at(
        "FAIL",
        "claims",
        &[&format!("tid 00000000-1111-2222-3333-444444444444 is not the configured tenant {TENANT} ({TENANT_ID})")],
    );
}

#[tokio::test]
async fn a_delegated_token_without_a_scope_is_told_to_consent_and_sign_in_again() {
    let h = delegated().await;
    seed(&h, "printer", MAILBOX);
    seed(&h, "app", SHARED_MAILBOX);
    h.token.set_token_shape(Some(TokenShape {
        scp: Some("IMAP.AccessAsUser.All POP.AccessAsUser.All".into()),
        ..TokenShape::delegated()
    }));
    let run = check(&h).await;
    run.fails_at(
        "FAIL",
        "claims",
        &[
            &format!("upn {MAILBOX}"),
            "the token lacks SMTP.Send",
            "Microsoft Graph > Delegated permissions > SMTP.Send",
            &format!("xoauth2-proxy login -c {} printer", h.config_path.display()),
        ],
    );
}

#[tokio::test]
async fn an_opaque_token_is_a_warning_and_the_logins_decide() {
    let h = harness().await;
    h.token.set_token_shape(Some(TokenShape { opaque: true, ..TokenShape::app() }));
    let run = check(&h).await;
    assert_eq!(run.code, Some(0), "a warning is not a failure: {}", run.stdout);
    run.fails_at("warn", "claims", &["not a JWT", "the logins below still test it"]);
    assert!(run.stdout.contains("    ok   login     imap "), "{}", run.stdout);
}

#[tokio::test]
async fn a_delegated_account_is_checked_with_its_own_token() {
    let h = delegated().await;
    seed(&h, "printer", SMTP_USER);
    seed(&h, "app", SHARED_MAILBOX);
    let run = check(&h).await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert!(run.stdout.contains("identity \"contoso\" (refresh_token, "), "{}", run.stdout);
    assert!(run.stdout.contains(&format!("    ok   claims    aud https://outlook.office.com, tid {TENANT_ID}, scp IMAP.AccessAsUser.All POP.AccessAsUser.All SMTP.Send, upn {SMTP_USER}")), "{}", run.stdout);
    assert_eq!(run.stdout.matches("ok   token").count(), 2, "one token per account: {}", run.stdout);
}

// ---- 4. the real login: Exchange's answers --------------------------------------

#[tokio::test]
async fn user_is_authenticated_but_not_connected_points_at_the_service_principal() {
    let h = harness().await;
    h.imap.set_exchange_fault(Some(ExchangeFault::NotConnected));
    let run = check(&h).await;
    assert_eq!(run.code, Some(1));
    run.fails_at("FAIL", "login", &[
        &format!("imap localhost:{} as {MAILBOX}: authenticated, then LIST \"\" INBOX: BAD User is authenticated but not connected.", h.imap.addr().port()),
        "registered with the App Registration's Object ID",
        &format!("Connect-ExchangeOnline -Organization {TENANT}"),
        &format!("Get-ServicePrincipal -Identity {CLIENT_ID}"),
        &format!("its ObjectId is not {SP_OBJECT_ID}"),
        &format!("New-ServicePrincipal -AppId {CLIENT_ID} -ObjectId {SP_OBJECT_ID}"),
        &format!("Add-MailboxPermission -Identity \"{MAILBOX}\" -User (Get-ServicePrincipal -Identity {CLIENT_ID}).Identity -AccessRights FullAccess"),
    ]);
}

#[tokio::test]
async fn authenticate_failed_with_a_valid_token_is_the_exchange_side_setup() {
    let h = harness().await;
    for fake in [&h.imap, &h.pop3, &h.smtp] {
        fake.set_exchange_fault(Some(ExchangeFault::AuthenticationFailed));
    }
    let run = check(&h).await;
    let block = run.fails_at(
        "FAIL",
        "login",
        &[
            "imap ",
            ": AUTHENTICATE failed.",
            "refused a valid token",
            "New-ServicePrincipal",
            &format!("Set-CASMailbox -Identity \"{MAILBOX}\" -ImapEnabled $true"),
        ],
    );
    assert!(block.contains(&format!("FullAccess on {MAILBOX}")), "{block}");
    assert!(
        run.stdout.contains("Authentication failure: unknown user name or bad password.")
            && run.stdout.contains("-PopEnabled $true"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("535 5.7.3 Authentication unsuccessful")
            && run.stdout.contains(&format!(
                "Set-CASMailbox -Identity \"{SMTP_USER}\" -SmtpClientAuthenticationDisabled $false"
            )),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn smtp_auth_disabled_for_the_tenant_or_the_mailbox() {
    let h = harness().await;
    h.smtp.set_exchange_fault(Some(ExchangeFault::SmtpAuthDisabledTenant));
    check(&h).await.fails_at(
        "FAIL",
        "login",
        &[
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
            "SMTP AUTH is disabled for the whole tenant",
            "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
            &format!("Set-CASMailbox -Identity \"{SMTP_USER}\" -SmtpClientAuthenticationDisabled $false"),
        ],
    );
    h.smtp.set_exchange_fault(Some(ExchangeFault::SmtpAuthDisabledMailbox));
    let block = check(&h).await.fails_at(
        "FAIL",
        "login",
        &[
            &format!("SMTP AUTH is disabled for the mailbox {SMTP_USER}"),
            &format!("Set-CASMailbox -Identity \"{SMTP_USER}\" -SmtpClientAuthenticationDisabled $false"),
        ],
    );
    assert!(!block.contains("Set-TransportConfig"), "{block}");
}

#[tokio::test]
async fn send_as_denied_and_the_thread_limit_are_seen_at_mail_from() {
    let h = harness().await;
    h.smtp.set_exchange_fault(Some(ExchangeFault::SendAsDenied));
    check(&h).await.fails_at("FAIL", "login", &[
        &format!("authenticated, then MAIL FROM:<{MAILBOX}>: 554 5.2.252 SendAsDenied"),
        &format!("Add-RecipientPermission -Identity \"{MAILBOX}\" -Trustee (Get-ServicePrincipal -Identity {CLIENT_ID}).Identity -AccessRights SendAs"),
    ]);
    h.smtp.set_exchange_fault(Some(ExchangeFault::ThreadLimit));
    check(&h).await.fails_at(
        "FAIL",
        "login",
        &[
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
            "too many connections at once",
            "max_sessions_per_mailbox",
        ],
    );
}

#[tokio::test]
async fn a_temporary_failure_says_to_try_again() {
    let h = harness().await;
    h.pop3.set_temporary_failure(true);
    check(&h).await.fails_at(
        "FAIL",
        "login",
        &["pop3 ", "[SYS/TEMP] Server is busy", "temporary failure (busy or throttling)", "max_sessions_per_mailbox"],
    );
}

#[tokio::test]
async fn the_xoauth2_error_challenge_is_decoded() {
    let h = harness().await;
    h.imap.set_exchange_fault(Some(ExchangeFault::Challenge(
        r#"{"status":"403","schemes":"bearer","scope":"https://outlook.office365.com/IMAP.AccessAsApp"}"#.into(),
    )));
    check(&h).await.fails_at("FAIL", "login", &[
        "the token lacks IMAP.AccessAsApp",
        "The XOAUTH2 error challenge says status 403, schemes bearer, scope https://outlook.office365.com/IMAP.AccessAsApp: the token lacks the permission the server wants",
        "Application permissions > IMAP.AccessAsApp",
    ]);
    h.imap.set_exchange_fault(None);
    h.smtp.set_refuse_all(true);
    check(&h).await.fails_at("FAIL", "login", &["535 5.7.3", "status 401, schemes bearer", "did not accept the token"]);
}

#[tokio::test]
async fn unreachable_and_untrusted_upstreams() {
    let closed = closed_port().await;
    let mut over = std::collections::HashMap::new();
    over.insert("pop3", closed.clone());
    let h = Harness::with(mailbox_upstreams(Options { upstream_override: over, ..Options::default() })).await;
    check(&h).await.fails_at(
        "FAIL",
        "login",
        &[&format!("pop3 {closed} as {MAILBOX}: cannot connect"), "cannot be reached"],
    );
    let h = Harness::with(mailbox_upstreams(Options { untrusted_upstream: true, ..Options::default() })).await;
    check(&h).await.fails_at("FAIL", "login", &["TLS handshake failed", "upstream_ca_file"]);
}

// ---- offline: the config's own words (issue 11) ---------------------------------

#[tokio::test]
async fn check_names_settings_as_the_config_spells_them() {
    let h = Harness::with(Options { listener_extra: vec!["local_tls: none".into()], ..Options::default() }).await;
    let out = h.output(&["check"]).await;
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        s.contains("(local_tls: none) -> localhost:")
            && s.contains("(upstream_tls: implicit), plain-text logins (loopback bind)"),
        "{s}"
    );
    assert!(s.contains("(upstream_tls: starttls)"), "{s}");
    assert!(!s.contains("Implicit") && !s.contains("Starttls"), "no Rust names: {s}");
    let text = std::fs::read_to_string(&h.config_path)
        .unwrap()
        .replace("bind: 127.0.0.1:0", "bind: 0.0.0.0:0\n    allow_plaintext_auth: true");
    std::fs::write(&h.config_path, text).unwrap();
    let s = String::from_utf8_lossy(&h.output(&["check"]).await.stdout).into_owned();
    assert!(s.contains("plain-text logins (allow_plaintext_auth: true)"), "{s}");
}
