//! Step 1, the pure half: is the token endpoint there, and does it know the
//! tenant? The check fetches the tenant's OpenID discovery document,
//! `{authority}/{tenant}/v2.0/.well-known/openid-configuration`: it proves
//! DNS, TLS and HTTP work, Entra answers AADSTS90002 or 900023 for a tenant it
//! does not know, and its `issuer` names the directory (tenant) ID, which a
//! domain such as contoso.onmicrosoft.com does not show.

use super::commands::Ids;
use super::report::Diagnosis;
use crate::token::entra::{parse_token_answer, Transport, Unanswered};
use crate::token::TokenError;

const TOKEN_SUFFIX: &str = "/oauth2/v2.0/token";

/// `{authority}` and `{tenant}` of a token endpoint URL.
pub fn split_token_url(token_url: &str) -> Option<(&str, &str)> {
    let base = token_url.strip_suffix(TOKEN_SUFFIX)?;
    let (authority, tenant) = base.rsplit_once('/')?;
    (!tenant.is_empty() && authority.contains("://")).then_some((authority, tenant))
}

pub fn discovery_url(token_url: &str) -> Option<String> {
    let (authority, tenant) = split_token_url(token_url)?;
    Some(format!("{authority}/{tenant}/v2.0/.well-known/openid-configuration"))
}

/// Whether `s` is written like a directory (tenant) ID.
pub fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// What the discovery document told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub tenant_id: Option<String>,
}

/// Judges the discovery answer: the tenant ID, or what is wrong.
pub fn judge(status: u16, body: &[u8], ids: &Ids) -> Result<Found, (String, Diagnosis)> {
    if (200..300).contains(&status) {
        let doc: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let issuer = doc.as_ref().and_then(|d| d.get("issuer")).and_then(|i| i.as_str());
        let Some(issuer) = issuer else {
            return Err((
                format!("HTTP {status}, but not an OpenID discovery document"),
                Diagnosis::new("the authority does not look like an Entra endpoint").note(format!(
                    "identity {:?}: authority should be https://login.microsoftonline.com (or leave it out)",
                    ids.identity
                )),
            ));
        };
        // https://login.microsoftonline.com/{tid}/v2.0
        let tenant_id = issuer.trim_end_matches('/').rsplit('/').nth(1).filter(|t| is_guid(t)).map(str::to_string);
        return Ok(Found { tenant_id });
    }
    // Entra's refusals carry the same error document as the token endpoint's.
    match parse_token_answer(status, body) {
        Err(TokenError::Entra(e)) => {
            let d = e.aadsts().and_then(|code| super::entra::diagnose_code(code, ids));
            let summary = format!("HTTP {status}: {}", e.description.lines().next().unwrap_or(&e.error).trim());
            Err((summary, d.unwrap_or_else(|| Diagnosis::new(format!("Entra refused the request: {}", e.error)))))
        }
        _ if status == 404 => Err((
            "HTTP 404: no such endpoint".to_string(),
            Diagnosis::new("the authority URL is not Entra's")
                .note(format!("identity {:?}: authority should be https://login.microsoftonline.com", ids.identity)),
        )),
        _ => Err((
            format!("HTTP {status}"),
            Diagnosis::new(format!(
                "the endpoint failed with HTTP {status}: a problem at Entra or at a proxy in between"
            ))
            .note("run the check again later; https://status.cloud.microsoft shows Microsoft's incidents"),
        )),
    }
}

/// Cause and fix when no answer came at all.
pub fn unanswered(failure: &Unanswered, url: &str, ids: &Ids) -> Diagnosis {
    let host = url.split("://").nth(1).and_then(|r| r.split(['/', ':']).next()).unwrap_or(url);
    match failure.kind {
        Transport::Dns => Diagnosis::new(format!("{host} does not resolve: DNS is not working or the name is wrong"))
            .note("check this machine's resolver, and the authority of the identity:")
            .command(format!("getent hosts {host}")),
        Transport::Connect => Diagnosis::new(format!("nothing accepted a connection to {host}")).note(
            "outbound HTTPS (port 443) must be allowed; behind an HTTP proxy set HTTPS_PROXY for the proxy's service",
        ),
        Transport::Tls => Diagnosis::new(format!("the TLS certificate of {host} is not trusted or does not match"))
            .note(
            "a TLS-inspecting proxy needs its CA in upstream_ca_file (PEM); otherwise check the authority's host name",
        ),
        Transport::Timeout => Diagnosis::new(format!("{host} did not answer in time")).note(format!(
            "a firewall may drop the packets; or raise token_timeout of identity {:?} on a slow link",
            ids.identity
        )),
        Transport::Other => Diagnosis::new("the request failed before any answer").note(failure.detail.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flow;
    use crate::doctor::commands::Credential;

    fn ids() -> Ids {
        Ids {
            config: "c.yaml".into(),
            identity: "contoso".into(),
            tenant: "contoso.onmicrosoft.com".into(),
            tenant_id: None,
            client_id: None,
            flow: Flow::ClientCredentials,
            credential: Credential::Secret,
            sp_object_id: None,
            account: None,
            mailbox: None,
            smtp_user: None,
            signed_in: None,
        }
    }

    #[test]
    fn urls() {
        let url = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token";
        assert_eq!(split_token_url(url), Some(("https://login.microsoftonline.com", "contoso.onmicrosoft.com")));
        assert_eq!(
            discovery_url(url).unwrap(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration"
        );
        assert_eq!(split_token_url("https://x/oauth2/v2.0/token"), None);
        assert!(is_guid("5f4c7a1e-2b3d-4e6f-8a9b-0c1d2e3f4a5b"));
        assert!(!is_guid("contoso.onmicrosoft.com"));
        assert!(!is_guid("5f4c7a1e-2b3d-4e6f-8a9b-0c1d2e3f4a5"));
    }

    #[test]
    fn the_issuer_names_the_tenant_id() {
        let body = br#"{"issuer":"https://login.microsoftonline.com/5f4c7a1e-2b3d-4e6f-8a9b-0c1d2e3f4a5b/v2.0","token_endpoint":"x"}"#;
        let found = judge(200, body, &ids()).unwrap();
        assert_eq!(found.tenant_id.as_deref(), Some("5f4c7a1e-2b3d-4e6f-8a9b-0c1d2e3f4a5b"));
        let (summary, d) = judge(200, b"<html>login</html>", &ids()).unwrap_err();
        assert!(summary.contains("not an OpenID discovery document") && d.cause.contains("Entra endpoint"));
    }

    #[test]
    fn an_unknown_tenant_is_aadsts90002() {
        let body = br#"{"error":"invalid_tenant","error_description":"AADSTS90002: Tenant 'nope.example' not found. Check to make sure you have the correct tenant ID.\r\nTrace ID: x","error_codes":[90002]}"#;
        let (summary, d) = judge(400, body, &ids()).unwrap_err();
        assert_eq!(summary, "HTTP 400: AADSTS90002: Tenant 'nope.example' not found. Check to make sure you have the correct tenant ID.");
        assert!(d.cause.starts_with("AADSTS90002: tenant not found"), "{}", d.cause);
        let (summary, _) = judge(503, b"<html>down</html>", &ids()).unwrap_err();
        assert_eq!(summary, "HTTP 503");
    }
}
