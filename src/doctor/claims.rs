//! Step 3: what the access token says, read without verifying its signature
//! (that is Microsoft's to do; the proxy never relies on these claims, it only
//! explains with them why Exchange will refuse a token). Printed by name:
//! `aud`, `tid`, `roles` or `scp`, `exp`; the token itself never is.

use super::commands::{self as cmd, Ids};
use super::report::{Diagnosis, Status};
use crate::config::{Flow, IdentityConfig};
use crate::protocol::Protocol;
use base64::Engine;
use serde_json::Value;

/// The audiences Exchange Online accepts: its two resource URIs and its
/// application ID (`00000002-0000-0ff1-ce00-000000000000`).
pub const EXCHANGE_AUDIENCES: [&str; 3] =
    ["https://outlook.office.com", "https://outlook.office365.com", "00000002-0000-0ff1-ce00-000000000000"];

/// More clock difference than this between `exp` and `expires_in` is worth saying.
const CLOCK_SLACK_SECS: i64 = 300;

/// The claims the diagnosis reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub aud: Vec<String>,
    pub tid: Option<String>,
    /// `None` when the token has no `roles` claim at all.
    pub roles: Option<Vec<String>>,
    pub scp: Option<Vec<String>>,
    pub exp: Option<u64>,
    /// App-only tokens: the service principal's (Enterprise application's) object ID.
    pub oid: Option<String>,
    pub upn: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotJwt {
    #[error("the token is not a JWT (three base64url parts)")]
    Shape,
    #[error("the token's payload is not base64url JSON")]
    Payload,
}

/// Decodes the payload of a JWS compact token (`header.payload.signature`).
pub fn decode(token: &str) -> Result<Claims, NotJwt> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(NotJwt::Shape);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| NotJwt::Payload)?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|_| NotJwt::Payload)?;
    let text = |key: &str| json.get(key).and_then(Value::as_str).map(str::to_string);
    let list = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
            Value::Array(items) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            _ => Vec::new(),
        }
    };
    Ok(Claims {
        aud: json.get("aud").map(list).unwrap_or_default(),
        tid: text("tid"),
        roles: json.get("roles").map(list),
        scp: json.get("scp").map(list),
        exp: json.get("exp").and_then(Value::as_u64),
        oid: text("oid"),
        upn: text("upn").or_else(|| text("preferred_username")).or_else(|| text("unique_name")),
    })
}

/// What the configuration expects of the token.
#[derive(Debug, Clone)]
pub struct Expect {
    pub flow: Flow,
    /// The identity's configured scope (delegated tokens carry what it asks for).
    pub scope: String,
    /// The tenant ID the token must come from, when known.
    pub tenant_id: Option<String>,
    /// Each protocol the listeners use, with the listeners' names.
    pub needs: Vec<(Protocol, Vec<String>)>,
    /// Seconds since the epoch, now.
    pub now: u64,
    /// What the token endpoint said the token lives.
    pub expires_in: u64,
    pub min_lifetime: u64,
}

/// The outcome of step 3.
#[derive(Debug, Clone)]
pub struct Assessment {
    pub status: Status,
    pub summary: String,
    pub diagnosis: Option<Diagnosis>,
    /// No login can work with this token.
    pub stop: bool,
    /// Protocols whose logins are not tried (their permission is missing).
    pub blocked: Vec<Protocol>,
    pub claims: Option<Claims>,
}

fn normalise(aud: &str) -> String {
    aud.trim_end_matches('/').to_ascii_lowercase()
}

pub fn format_time(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn listeners(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("listener{} {}", if names.len() == 1 { "" } else { "s" }, quoted.join(", "))
}

/// Checks the token against what the configuration needs.
pub fn assess(token: &str, expect: &Expect, ids: &Ids) -> Assessment {
    let claims = match decode(token) {
        Ok(c) => c,
        Err(e) => return Assessment {
            status: Status::Warn,
            summary: format!("{e}: its claims cannot be read"),
            diagnosis: Some(Diagnosis::new(
                "opaque tokens (personal Microsoft accounts) cannot be checked here; the logins below still test it",
            )),
            stop: false,
            blocked: Vec::new(),
            claims: None,
        },
    };
    let app_only = expect.flow == Flow::ClientCredentials;
    let mut parts = vec![format!("aud {}", if claims.aud.is_empty() { "(none)".into() } else { claims.aud.join(" ") })];
    parts.push(format!("tid {}", claims.tid.as_deref().unwrap_or("(none)")));
    let granted = if app_only { claims.roles.clone() } else { claims.scp.clone() };
    let granted_text =
        granted.as_ref().map_or("(none)".into(), |g| if g.is_empty() { "(empty)".into() } else { g.join(" ") });
    parts.push(format!("{} {granted_text}", if app_only { "roles" } else { "scp" }));
    if let Some(upn) = &claims.upn {
        parts.push(format!("upn {upn}"));
    }
    let remaining = claims.exp.map(|exp| exp as i64 - expect.now as i64);
    match (claims.exp, remaining) {
        (Some(exp), Some(left)) => parts.push(format!("exp {} ({} min left)", format_time(exp), left.max(0) / 60)),
        _ => parts.push("exp (none)".into()),
    }
    let summary = parts.join(", ");
    let mut assessment =
        Assessment { status: Status::Ok, summary, diagnosis: None, stop: false, blocked: Vec::new(), claims: None };

    // The audience: a token for another resource is refused whatever else is right.
    if !claims.aud.iter().any(|a| EXCHANGE_AUDIENCES.iter().any(|x| normalise(x) == normalise(a))) {
        let graph =
            claims.aud.iter().any(|a| a.contains("graph.microsoft.com") || a == "00000003-0000-0000-c000-000000000000");
        let scope = if app_only { IdentityConfig::APP_ONLY_SCOPE } else { IdentityConfig::DELEGATED_SCOPE };
        let what = if graph { "a Microsoft Graph token" } else { "a token for another resource" };
        assessment.status = Status::Fail;
        assessment.stop = true;
        assessment.diagnosis = Some(
            Diagnosis::new(format!(
                "aud is not Exchange Online ({}): this is {what}, and Exchange refuses it",
                EXCHANGE_AUDIENCES.join(", ")
            ))
            .note(format!("set the scope of identity {:?} (or remove it, for the default):", ids.identity))
            .command(format!("scope: {scope}")),
        );
        assessment.claims = Some(claims);
        return assessment;
    }

    // The tenant: a token from another directory opens none of this one's mailboxes.
    if let (Some(want), Some(tid)) = (expect.tenant_id.as_deref(), claims.tid.as_deref()) {
        if !want.eq_ignore_ascii_case(tid) {
            assessment.status = Status::Fail;
            assessment.stop = true;
            assessment.diagnosis = Some(
                Diagnosis::new(format!("tid {tid} is not the configured tenant {} ({want})", ids.tenant))
                    .note(format!(
                        "the app signed in to another directory: set tenant of identity {:?} to the mailboxes' tenant ID, or register the app there",
                        ids.identity
                    )),
            );
            assessment.claims = Some(claims);
            return assessment;
        }
    }

    // The permissions each listener needs.
    let held: Vec<String> = granted.clone().unwrap_or_default().iter().map(|g| g.to_ascii_lowercase()).collect();
    let mut missing = Vec::new();
    for (protocol, names) in &expect.needs {
        let permission = cmd::permission(*protocol, expect.flow);
        if !held.contains(&permission.to_ascii_lowercase()) {
            missing.push((*protocol, permission, names.clone()));
        }
    }
    let mut diagnosis: Option<Diagnosis> = None;
    if !missing.is_empty() {
        let list: Vec<String> =
            missing.iter().map(|(p, perm, names)| format!("{perm} ({} for {})", p, listeners(names))).collect();
        let mut cause =
            format!("the token lacks {}, so Exchange refuses those logins; they were not tried", list.join(", "));
        if app_only && claims.roles.is_none() {
            cause.push_str(
                ". It has no application permissions at all: delegated ones (IMAP.AccessAsUser.All...) do not apply to client credentials",
            );
        }
        let mut d = Diagnosis::new(cause);
        for (_, permission, _) in &missing {
            let in_scope = expect.scope.split_whitespace().any(|s| {
                s.eq_ignore_ascii_case(permission)
                    || s.to_ascii_lowercase().ends_with(&format!("/{}", permission.to_ascii_lowercase()))
            });
            if !app_only && !in_scope {
                d = d
                    .note(format!("the scope of identity {:?} does not ask for {permission}; add it:", ids.identity))
                    .command(format!("scope: {} https://outlook.office.com/{permission}", expect.scope));
            } else {
                d = d.note(cmd::portal_add_permission(ids, permission));
            }
        }
        d = d.note(format!("then {}", cmd::portal_grant_consent(ids)));
        if !app_only {
            d = d
                .note("then sign the account in again, so the new permission is in its refresh token:")
                .command(ids.login_command());
        }
        assessment.status = Status::Fail;
        assessment.blocked = missing.iter().map(|(p, _, _)| *p).collect();
        assessment.stop = assessment.blocked.len() == expect.needs.len();
        diagnosis = Some(d);
    }

    // Lifetime and this machine's clock.
    let mut later = Vec::new();
    match (claims.exp, remaining) {
        (Some(exp), Some(left)) => {
            let skew = exp as i64 - (expect.now as i64 + expect.expires_in as i64);
            if left <= 0 {
                later.push((
                    Status::Fail,
                    Diagnosis::new(format!(
                        "the token expired at {} by this machine's clock, though the endpoint said it lives {} s: the clock is ahead",
                        format_time(exp),
                        expect.expires_in
                    ))
                    .command("timedatectl set-ntp true && timedatectl status"),
                ));
            } else if skew.abs() > CLOCK_SLACK_SECS {
                later.push((
                    Status::Warn,
                    Diagnosis::new(format!(
                        "exp and expires_in disagree by {} s: this machine's clock is {} (tokens are refreshed too early or too late)",
                        skew.abs(),
                        if skew < 0 { "ahead" } else { "behind" }
                    ))
                    .command("timedatectl set-ntp true && timedatectl status"),
                ));
            } else if (left as u64) < expect.min_lifetime {
                later.push((
                    Status::Warn,
                    Diagnosis::new(format!(
                        "the token lives {} min, less than min_token_lifetime ({} min): each token is used for half its life",
                        left / 60,
                        expect.min_lifetime / 60
                    )),
                ));
            }
        }
        _ => later.push((Status::Warn, Diagnosis::new("the token has no exp claim"))),
    }
    for (status, d) in later {
        if status == Status::Fail {
            assessment.stop = true;
        }
        assessment.status = assessment.status.max(status);
        diagnosis = Some(match diagnosis {
            Some(first) => first.and(d),
            None => d,
        });
    }
    assessment.diagnosis = diagnosis;
    assessment.claims = Some(claims);
    assessment
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::commands::Credential;
    use serde_json::json;

    fn jwt(claims: Value) -> String {
        let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.{}", b64(&json!({"typ":"JWT","alg":"RS256"})), b64(&claims), "c2lnbmF0dXJl")
    }

    const NOW: u64 = 1_750_000_000;
    const TID: &str = "5f4c7a1e-2b3d-4e6f-8a9b-0c1d2e3f4a5b";

    fn app_claims() -> Value {
        json!({
            "aud": "https://outlook.office365.com", "tid": TID, "exp": NOW + 3599,
            "roles": ["IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp"], "oid": "sp-object"
        })
    }

    fn ids(flow: Flow) -> Ids {
        Ids {
            config: "c.yaml".into(),
            identity: "contoso".into(),
            tenant: "contoso.onmicrosoft.com".into(),
            tenant_id: Some(TID.into()),
            client_id: Some("app-id".into()),
            flow,
            credential: Credential::Secret,
            sp_object_id: None,
            account: Some("crm".into()),
            mailbox: None,
            smtp_user: None,
            signed_in: None,
        }
    }

    fn expect(flow: Flow, protocols: &[Protocol]) -> Expect {
        Expect {
            flow,
            scope: match flow {
                Flow::ClientCredentials => IdentityConfig::APP_ONLY_SCOPE.into(),
                Flow::RefreshToken => "https://outlook.office.com/IMAP.AccessAsUser.All offline_access".into(),
            },
            tenant_id: Some(TID.into()),
            needs: protocols.iter().map(|p| (*p, vec![p.to_string()])).collect(),
            now: NOW,
            expires_in: 3599,
            min_lifetime: 600,
        }
    }

    fn all() -> Vec<Protocol> {
        vec![Protocol::Imap, Protocol::Pop3, Protocol::Smtp]
    }

    fn fix_text(a: &Assessment) -> String {
        let d = a.diagnosis.as_ref().unwrap();
        let mut s = d.cause.clone();
        for f in &d.fix {
            let (super::super::report::Fix::Note(t) | super::super::report::Fix::Command(t)) = f;
            s.push('\n');
            s.push_str(t);
        }
        s
    }

    #[test]
    fn decodes_claims_by_name_without_verifying() {
        let c = decode(&jwt(app_claims())).unwrap();
        assert_eq!(c.aud, ["https://outlook.office365.com"]);
        assert_eq!(c.roles.unwrap().len(), 3);
        assert_eq!(c.oid.as_deref(), Some("sp-object"));
        let c =
            decode(&jwt(json!({"aud": ["a", "b"], "scp": "IMAP.AccessAsUser.All SMTP.Send", "upn": "u@x"}))).unwrap();
        assert_eq!(c.aud, ["a", "b"]);
        assert_eq!(c.scp.unwrap(), ["IMAP.AccessAsUser.All", "SMTP.Send"]);
        assert!(c.roles.is_none());
        assert_eq!(decode("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"), Err(NotJwt::Shape));
        assert_eq!(decode("a.%%%.c"), Err(NotJwt::Payload));
        assert_eq!(decode("a.b.c.d.e"), Err(NotJwt::Shape), "an encrypted (JWE) token is opaque too");
    }

    #[test]
    fn a_good_app_only_token_is_ok_and_printed_by_claim_name() {
        let a = assess(&jwt(app_claims()), &expect(Flow::ClientCredentials, &all()), &ids(Flow::ClientCredentials));
        assert_eq!(a.status, Status::Ok, "{:?}", a.diagnosis);
        assert_eq!(
            a.summary,
            format!(
                "aud https://outlook.office365.com, tid {TID}, roles IMAP.AccessAsApp POP.AccessAsApp SMTP.SendAsApp, exp 2025-06-15T16:06:39Z (59 min left)"
            )
        );
        assert!(!a.stop && a.blocked.is_empty());
    }

    #[test]
    fn a_missing_role_names_the_permission_and_admin_consent() {
        let mut c = app_claims();
        c["roles"] = json!(["IMAP.AccessAsApp", "SMTP.SendAsApp"]);
        let a = assess(&jwt(c), &expect(Flow::ClientCredentials, &all()), &ids(Flow::ClientCredentials));
        assert_eq!(a.status, Status::Fail);
        assert_eq!(a.blocked, [Protocol::Pop3]);
        assert!(!a.stop, "IMAP and SMTP logins still run");
        let text = fix_text(&a);
        assert!(text.contains("lacks POP.AccessAsApp (pop3 for listener \"pop3\")"), "{text}");
        assert!(text.contains("Office 365 Exchange Online > Application permissions > POP.AccessAsApp"), "{text}");
        assert!(text.contains("Grant admin consent for contoso.onmicrosoft.com"), "{text}");
    }

    #[test]
    fn delegated_permissions_on_an_app_only_identity_are_called_out() {
        let mut c = app_claims();
        c.as_object_mut().unwrap().remove("roles");
        let a = assess(&jwt(c), &expect(Flow::ClientCredentials, &[Protocol::Imap]), &ids(Flow::ClientCredentials));
        assert!(a.stop);
        assert!(fix_text(&a).contains("delegated ones (IMAP.AccessAsUser.All...) do not apply to client credentials"));
    }

    #[test]
    fn delegated_scp_missing_from_the_configured_scope_says_to_ask_for_it() {
        let claims = json!({"aud": "https://outlook.office.com", "tid": TID, "exp": NOW + 3599, "scp": "IMAP.AccessAsUser.All", "upn": "crm@contoso.com"});
        let a = assess(
            &jwt(claims),
            &expect(Flow::RefreshToken, &[Protocol::Imap, Protocol::Smtp]),
            &ids(Flow::RefreshToken),
        );
        assert_eq!(a.blocked, [Protocol::Smtp]);
        let text = fix_text(&a);
        assert!(text.contains("does not ask for SMTP.Send"), "{text}");
        assert!(text.contains("offline_access https://outlook.office.com/SMTP.Send"), "{text}");
        assert!(text.contains("xoauth2-proxy login -c c.yaml crm"), "{text}");
        assert!(a.summary.contains("scp IMAP.AccessAsUser.All, upn crm@contoso.com"), "{}", a.summary);
    }

    #[test]
    fn a_graph_token_stops_everything() {
        let mut c = app_claims();
        c["aud"] = json!("https://graph.microsoft.com");
        let a = assess(&jwt(c), &expect(Flow::ClientCredentials, &all()), &ids(Flow::ClientCredentials));
        assert!(a.stop && a.status == Status::Fail);
        let text = fix_text(&a);
        assert!(
            text.contains("Microsoft Graph token") && text.contains("scope: https://outlook.office365.com/.default")
        );
        // Trailing slashes and the application ID are Exchange too.
        for aud in
            ["https://outlook.office365.com/", "00000002-0000-0ff1-ce00-000000000000", "https://outlook.office.com"]
        {
            let mut c = app_claims();
            c["aud"] = json!(aud);
            let a = assess(&jwt(c), &expect(Flow::ClientCredentials, &all()), &ids(Flow::ClientCredentials));
            assert_eq!(a.status, Status::Ok, "{aud}");
        }
    }

    #[test]
    fn another_tenant_stops_everything() {
        let mut c = app_claims();
        c["tid"] = json!("00000000-1111-2222-3333-444444444444");
        let a = assess(&jwt(c), &expect(Flow::ClientCredentials, &all()), &ids(Flow::ClientCredentials));
        assert!(a.stop);
        assert!(fix_text(&a).contains("is not the configured tenant contoso.onmicrosoft.com"));
    }

    #[test]
    fn the_clock_is_checked_against_expires_in() {
        let mut e = expect(Flow::ClientCredentials, &all());
        e.now = NOW + 1200; // this machine is 20 minutes ahead
        let a = assess(&jwt(app_claims()), &e, &ids(Flow::ClientCredentials));
        assert_eq!(a.status, Status::Warn);
        assert!(fix_text(&a).contains("clock is ahead"), "{}", fix_text(&a));
        e.now = NOW + 4000;
        let a = assess(&jwt(app_claims()), &e, &ids(Flow::ClientCredentials));
        assert!(a.stop && a.status == Status::Fail);
    }

    #[test]
    fn an_opaque_token_is_a_warning_not_a_stop() {
        let a = assess(
            "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
            &expect(Flow::RefreshToken, &all()),
            &ids(Flow::RefreshToken),
        );
        assert_eq!(a.status, Status::Warn);
        assert!(!a.stop && a.blocked.is_empty());
        assert!(!a.summary.contains("EwBA"), "the token is never printed");
    }
}
