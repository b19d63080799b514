//! Step 4, the pure half: what Exchange Online answered to a real XOAUTH2
//! login, mapped to the cause and the fix. The wording matched is Exchange's
//! own, as Microsoft documents it (../shared/seeds/001_*.txt) and as peers'
//! issue trackers quote it:
//!
//! - `BAD User is authenticated but not connected.` after a successful
//!   AUTHENTICATE (simonrob/email-oauth2-proxy#74, jstedfast/MailKit#1496,
//!   imapsync/imapsync#411; also seen when a mailbox has too many connections,
//!   mscdex/node-imap#523)
//! - `NO AUTHENTICATE failed.` / `-ERR Authentication failure: unknown user
//!   name or bad password.` / `535 5.7.3 Authentication unsuccessful` with a
//!   valid token (Microsoft's document; simonrob/email-oauth2-proxy#238)
//! - `535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is
//!   disabled for the Tenant|Mailbox` (simonrob/email-oauth2-proxy#193)
//! - `554 5.2.252 SendAsDenied; ... not allowed to send as ...`
//!   (gophish/gophish#2900) and `5.2.0 ... SendAsDeniedException`
//!   (MicrosoftDocs/OfficeDocs-Support#1187)
//! - `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded`
//!   (timeoff-management/timeoff-management-application#308)
//! - the XOAUTH2 error challenge, `{"status":"401","schemes":"bearer","scope":...}`

use super::commands::{self as cmd, Ids};
use super::report::{Diagnosis, Status};
use crate::protocol::Protocol;

/// What happened when the check logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Logged in, the mailbox answered, logged out.
    Accepted { detail: String },
    /// The login was refused; `challenge` is the decoded XOAUTH2 error
    /// challenge (JSON) if the server sent one.
    Refused { reply: String, challenge: Option<String> },
    /// The server asked to come back later.
    Temporary { reply: String, challenge: Option<String> },
    /// The login succeeded, but `command` right after it was refused.
    AfterLogin { command: String, reply: String },
    /// No dialogue: connection, TLS or timeout.
    Unreachable { detail: String },
}

/// The fields of an XOAUTH2 error challenge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenge {
    pub status: Option<String>,
    pub schemes: Option<String>,
    pub scope: Option<String>,
}

/// Reads the challenge JSON; `status` may be a number or a string.
pub fn parse_challenge(json: &str) -> Option<Challenge> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let field = |k: &str| match value.get(k)? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    Some(Challenge { status: field("status"), schemes: field("schemes"), scope: field("scope") })
}

impl Challenge {
    /// "status 401, schemes bearer, scope https://..."
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [("status", &self.status), ("schemes", &self.schemes), ("scope", &self.scope)] {
            if let Some(v) = v {
                parts.push(format!("{k} {v}"));
            }
        }
        parts.join(", ")
    }

    /// What the status says (OAuth bearer error semantics, RFC 6750).
    fn meaning(&self) -> Option<&'static str> {
        Some(match self.status.as_deref()? {
            "400" | "invalid_request" => "the server found the XOAUTH2 request malformed",
            "401" | "invalid_token" => {
                "the server did not accept the token (expired, revoked, or issued for another resource or tenant)"
            }
            "403" | "insufficient_scope" => "the token lacks the permission the server wants",
            _ => return None,
        })
    }
}

fn has(text: &str, needle: &str) -> bool {
    text.to_ascii_lowercase().contains(&needle.to_ascii_lowercase())
}

/// The Exchange-side setup a valid token needs, for a refused login: the
/// service principal (app-only), mailbox access, the protocol switched on.
fn mailbox_access(protocol: Protocol, ids: &Ids) -> Diagnosis {
    let user = ids.login_user(protocol).to_string();
    let mut d = Diagnosis::default().note(cmd::ps_where(ids));
    if ids.app_only() {
        d = d
            .note("1. the app must be registered in Exchange; this must list it:")
            .command(cmd::ps_get_service_principal(ids))
            .note(match &ids.sp_object_id {
                Some(oid) => format!(
                    "   missing, or its ObjectId is not {oid} (the Enterprise application's; the App Registration's Object ID is another object)? (re)create it:"
                ),
                None => "   missing, or its ObjectId is not the Enterprise application's (Entra admin center > Enterprise applications, not App registrations)? (re)create it:".to_string(),
            })
            .command(cmd::ps_remove_service_principal(ids))
            .command(cmd::ps_new_service_principal(ids))
            .note(format!("2. it needs FullAccess on {user}:"))
            .command(cmd::ps_full_access(ids, &user, None));
    } else {
        let signed_in = ids.signed_in.clone().unwrap_or_else(|| "<SIGNED_IN_USER>".into());
        if signed_in.eq_ignore_ascii_case(&user) {
            d = d.note(format!("1. {user} signed in itself, so no mailbox permission is needed"));
        } else {
            d = d
                .note(format!("1. the token is {signed_in}'s; it needs FullAccess on {user}:"))
                .command(cmd::ps_full_access(ids, &user, Some(&signed_in)));
        }
    }
    let step = if ids.app_only() { "3." } else { "2." };
    match protocol {
        Protocol::Smtp => d
            .note(format!("{step} SMTP AUTH must be on for {user} (or the tenant):"))
            .command(cmd::ps_show_protocols(&user))
            .command(cmd::ps_enable_protocol(Protocol::Smtp, &user)),
        _ => d
            .note(format!("{step} {} must be on for {user}:", protocol.as_str().to_uppercase()))
            .command(cmd::ps_show_protocols(&user))
            .command(cmd::ps_enable_protocol(protocol, &user)),
    }
}

fn smtp_auth_disabled(ids: &Ids, tenant_wide: bool) -> Diagnosis {
    let user = ids.smtp_user().to_string();
    if tenant_wide {
        Diagnosis::new("SMTP AUTH is disabled for the whole tenant")
            .note(cmd::ps_where(ids))
            .command(cmd::PS_SMTP_AUTH_TENANT)
            .note(format!("or only for {user} (a mailbox setting wins over the tenant's):"))
            .command(cmd::ps_enable_protocol(Protocol::Smtp, &user))
    } else {
        Diagnosis::new(format!("SMTP AUTH is disabled for the mailbox {user}"))
            .note(cmd::ps_where(ids))
            .command(cmd::ps_enable_protocol(Protocol::Smtp, &user))
    }
}

/// Cause and fix for what Exchange answered; `None` when the login worked.
pub fn diagnose(protocol: Protocol, answer: &Answer, ids: &Ids) -> Option<(Status, Diagnosis)> {
    let user = ids.login_user(protocol).to_string();
    Some(match answer {
        Answer::Accepted { .. } => return None,
        Answer::Unreachable { detail } => {
            let d = if has(detail, "certificate") || has(detail, "tls") {
                Diagnosis::new("the TLS handshake failed: the certificate is not trusted or does not name the host")
                    .note("a TLS-inspecting proxy needs its CA in upstream_ca_file (PEM); otherwise check the upstream's host name")
            } else if has(detail, "timed out") {
                Diagnosis::new("the upstream did not answer in time: a firewall may drop the packets")
                    .note("outbound ports 993 (IMAP), 995 (POP3) and 587 (SMTP) must be open to Exchange Online")
            } else {
                Diagnosis::new("the upstream cannot be reached")
                    .note("check the upstream address, DNS, and that outbound 993/995/587 are open")
            };
            (Status::Fail, d)
        }
        Answer::AfterLogin { command, reply } => {
            if has(reply, "authenticated but not connected") {
                let d = Diagnosis::new(format!(
                    "Exchange accepted the token, then refused `{command}`: it cannot open {user} for this {}. The service principal is missing or was registered with the App Registration's Object ID, or it has no FullAccess on the mailbox (too many open connections to the mailbox cause this too)",
                    if ids.app_only() { "app" } else { "user" }
                ))
                .and(mailbox_access(protocol, ids));
                (Status::Fail, d)
            } else if has(reply, "sendasdenied") || has(reply, "5.2.252") || has(reply, "5.7.60") {
                let sender = ids.mailbox().to_string();
                let trustee = if ids.app_only() { None } else { Some(ids.smtp_user().to_string()) };
                let who = trustee.clone().unwrap_or_else(|| "the app".into());
                (
                    Status::Fail,
                    Diagnosis::new(format!("{who} may log in but not send as {sender}"))
                        .note(cmd::ps_where(ids))
                        .command(cmd::ps_send_as(ids, &sender, trustee.as_deref())),
                )
            } else if has(reply, "thread limit") || has(reply, "4.3.2") || reply.starts_with('4') {
                (
                    Status::Fail,
                    Diagnosis::new(format!(
                        "Exchange is throttling {user}: too many connections at once (SMTP allows 3 per mailbox)"
                    ))
                    .note("close other clients of this mailbox, keep max_sessions_per_mailbox at 3 or less for SMTP, and check again in a few minutes"),
                )
            } else {
                (
                    Status::Fail,
                    Diagnosis::new(format!("the login worked, but `{command}` was refused")).and(mailbox_access(protocol, ids)),
                )
            }
        }
        Answer::Temporary { reply, .. } => (
            Status::Fail,
            Diagnosis::new(if has(reply, "thread limit") || has(reply, "4.3.2") {
                format!("Exchange is throttling {user}: too many connections at once")
            } else {
                "Exchange answered with a temporary failure (busy or throttling)".to_string()
            })
            .note("close other clients of this mailbox or lower max_sessions_per_mailbox, and check again in a few minutes"),
        ),
        Answer::Refused { reply, challenge } => {
            let decoded = challenge.as_deref().and_then(parse_challenge);
            let mut d = if has(reply, "5.7.139") && has(reply, "for the tenant") {
                smtp_auth_disabled(ids, true)
            } else if has(reply, "5.7.139") && has(reply, "for the mailbox") {
                smtp_auth_disabled(ids, false)
            } else if has(reply, "5.7.139") {
                Diagnosis::new("Exchange refused SMTP AUTH by policy (5.7.139)").and(smtp_auth_disabled(ids, true))
            } else if has(reply, "accesstokenexpired") {
                Diagnosis::new("the token had expired when Exchange saw it: this machine's clock is wrong")
                    .command("timedatectl set-ntp true && timedatectl status")
            } else if decoded.as_ref().is_some_and(|c| c.status.as_deref().is_some_and(|s| s == "403" || s == "insufficient_scope")) {
                let perm = cmd::permission(protocol, ids.flow);
                Diagnosis::new(format!("the token lacks {perm}"))
                    .note(cmd::portal_add_permission(ids, perm))
                    .note(format!("then {}", cmd::portal_grant_consent(ids)))
            } else {
                // "AUTHENTICATE failed." / "Authentication failure" / "5.7.3":
                // the token is good (step 3 said so); Exchange cannot map it to the mailbox.
                Diagnosis::new(format!(
                    "Exchange refused a valid token for {user}: the app is not registered in Exchange (or with the App Registration's Object ID instead of the Enterprise application's), has no FullAccess on the mailbox, or {} is off for it",
                    if protocol == Protocol::Smtp { "SMTP AUTH" } else { protocol.as_str() }
                ))
                .and(mailbox_access(protocol, ids))
            };
            if let Some(c) = &decoded {
                let meaning = c.meaning().map(|m| format!(": {m}")).unwrap_or_default();
                d.cause = format!("{}. The XOAUTH2 error challenge says {}{meaning}", d.cause, c.describe());
            } else if let Some(raw) = challenge {
                d.cause = format!("{}. The XOAUTH2 error challenge: {raw}", d.cause);
            }
            (Status::Fail, d)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flow;
    use crate::doctor::commands::Credential;
    use crate::doctor::report::Fix;

    fn ids(flow: Flow) -> Ids {
        Ids {
            config: "c.yaml".into(),
            identity: "contoso".into(),
            tenant: "contoso.onmicrosoft.com".into(),
            tenant_id: None,
            client_id: Some("11111111-2222-3333-4444-555555555555".into()),
            flow,
            credential: Credential::Secret,
            sp_object_id: Some("0c9f3a52-7d1e-4b8a-9e6f-2a4b6c8d0e1f".into()),
            account: Some("printer".into()),
            mailbox: Some("shared@contoso.com".into()),
            smtp_user: Some("sender@contoso.com".into()),
            signed_in: Some("sender@contoso.com".into()),
        }
    }

    fn text(d: &Diagnosis) -> String {
        let mut s = d.cause.clone();
        for f in &d.fix {
            let (Fix::Note(t) | Fix::Command(t)) = f;
            s.push('\n');
            s.push_str(t);
        }
        s
    }

    fn refused(reply: &str) -> Answer {
        Answer::Refused { reply: reply.into(), challenge: None }
    }

    fn check(protocol: Protocol, flow: Flow, answer: Answer, needles: &[&str]) {
        let (status, d) = diagnose(protocol, &answer, &ids(flow)).expect("a failure");
        assert_eq!(status, Status::Fail);
        let t = text(&d);
        for n in needles {
            assert!(t.contains(n), "{n:?} missing in\n{t}");
        }
    }

    #[test]
    fn exchange_answers_map_to_fixes_with_the_admins_ids() {
        use Protocol::*;
        let app = Flow::ClientCredentials;
        check(Imap, app, Answer::AfterLogin { command: "LIST \"\" INBOX".into(), reply: "BAD User is authenticated but not connected.".into() }, &[
            "cannot open shared@contoso.com",
            "Get-ServicePrincipal -Identity 11111111-2222-3333-4444-555555555555",
            "its ObjectId is not 0c9f3a52-7d1e-4b8a-9e6f-2a4b6c8d0e1f",
            "New-ServicePrincipal -AppId 11111111-2222-3333-4444-555555555555 -ObjectId 0c9f3a52-7d1e-4b8a-9e6f-2a4b6c8d0e1f",
            "Add-MailboxPermission -Identity \"shared@contoso.com\" -User (Get-ServicePrincipal -Identity 11111111-2222-3333-4444-555555555555).Identity -AccessRights FullAccess",
            "Set-CASMailbox -Identity \"shared@contoso.com\" -ImapEnabled $true",
        ]);
        check(
            Imap,
            app,
            refused("NO AUTHENTICATE failed."),
            &["refused a valid token for shared@contoso.com", "New-ServicePrincipal"],
        );
        check(Pop3, app, refused("Authentication failure: unknown user name or bad password."), &["-PopEnabled $true"]);
        check(
            Smtp,
            app,
            refused("535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]"),
            &["for sender@contoso.com", "-SmtpClientAuthenticationDisabled $false"],
        );
        check(Smtp, app, refused("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."), &[
            "disabled for the whole tenant",
            "Connect-ExchangeOnline -Organization contoso.onmicrosoft.com",
            "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
            "Set-CASMailbox -Identity \"sender@contoso.com\" -SmtpClientAuthenticationDisabled $false",
        ]);
        check(
            Smtp,
            app,
            refused("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."),
            &[
                "disabled for the mailbox sender@contoso.com",
                "Set-CASMailbox -Identity \"sender@contoso.com\" -SmtpClientAuthenticationDisabled $false",
            ],
        );
        check(Smtp, app, Answer::AfterLogin { command: "MAIL FROM:<shared@contoso.com>".into(), reply: "554 5.2.252 SendAsDenied; sender@contoso.com not allowed to send as shared@contoso.com".into() }, &[
            "not send as shared@contoso.com",
            "Add-RecipientPermission -Identity \"shared@contoso.com\" -Trustee (Get-ServicePrincipal -Identity 11111111-2222-3333-4444-555555555555).Identity -AccessRights SendAs",
        ]);
        check(
            Smtp,
            Flow::RefreshToken,
            Answer::AfterLogin {
                command: "MAIL FROM:<shared@contoso.com>".into(),
                reply: "554 5.2.252 SendAsDenied".into(),
            },
            &["-Trustee \"sender@contoso.com\" -AccessRights SendAs"],
        );
        check(
            Smtp,
            app,
            Answer::AfterLogin {
                command: "MAIL FROM:<x>".into(),
                reply: "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".into(),
            },
            &["throttling sender@contoso.com: too many connections"],
        );
        check(Imap, Flow::RefreshToken, refused("NO AUTHENTICATE failed."), &[
            "the token is sender@contoso.com's; it needs FullAccess on shared@contoso.com",
            "Add-MailboxPermission -Identity \"shared@contoso.com\" -User \"sender@contoso.com\" -AccessRights FullAccess",
        ]);
    }

    #[test]
    fn the_error_challenge_is_decoded() {
        let json = r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office365.com/"}"#;
        assert_eq!(
            parse_challenge(json).unwrap().describe(),
            "status 401, schemes bearer, scope https://outlook.office365.com/"
        );
        let answer =
            Answer::Refused { reply: "535 5.7.3 Authentication unsuccessful".into(), challenge: Some(json.into()) };
        let (_, d) = diagnose(Protocol::Smtp, &answer, &ids(Flow::ClientCredentials)).unwrap();
        assert!(d.cause.contains("The XOAUTH2 error challenge says status 401, schemes bearer, scope https://outlook.office365.com/: the server did not accept the token"), "{}", d.cause);
        let answer = Answer::Refused {
            reply: "NO AUTHENTICATE failed.".into(),
            challenge: Some(r#"{"status":403,"scope":"x"}"#.into()),
        };
        let (_, d) = diagnose(Protocol::Imap, &answer, &ids(Flow::ClientCredentials)).unwrap();
        assert!(text(&d).contains("the token lacks IMAP.AccessAsApp"), "{}", text(&d));
        assert!(parse_challenge("not json").is_none());
    }

    #[test]
    fn success_needs_no_fix() {
        assert!(diagnose(Protocol::Imap, &Answer::Accepted { detail: "ok".into() }, &ids(Flow::ClientCredentials))
            .is_none());
    }
}
