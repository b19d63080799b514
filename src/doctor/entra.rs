//! Entra's refusals, mapped to their cause and the fix: the AADSTS codes
//! admins actually hit (the token endpoint's `error_codes`), the proxy's other
//! token errors, and the transport failures of the first request.
//!
//! [`cause`] is also what the proxy's log lines say (`EntraError`'s Display).

use super::commands::{self as cmd, Credential, Ids};
use super::report::Diagnosis;
use crate::token::{EntraError, TokenError};

/// The one-line cause of an AADSTS code, for logs and the diagnosis.
pub fn cause(code: u32) -> Option<&'static str> {
    Some(match code {
        7000215 => "invalid client secret: the configured client_secret is wrong (often the secret's ID was pasted instead of its Value)",
        7000222 => "the client secret has expired",
        700016 => "application not found in the tenant: the client_id is wrong, or the tenant is another one than the app's",
        90002 => "tenant not found: the tenant is neither a directory (tenant) ID nor a domain of an existing tenant",
        900023 => "the tenant is not a valid tenant identifier (neither a GUID nor a domain name)",
        65001 => "consent missing: no administrator granted consent for the app's API permissions",
        700027 => "the client assertion was rejected: the certificate is not the one uploaded to the app registration",
        700024 => "the client assertion is outside its validity period: this machine's clock is wrong",
        50173 => "the refresh token was revoked (password changed or sessions revoked)",
        700082 => "the refresh token expired after a long period of inactivity",
        70008 => "the refresh token or authorization code has expired or was already used",
        70011 => "invalid scope: the identity's scope is not one Entra accepts for this flow",
        1002012 => "invalid scope: client credentials need a scope ending in /.default",
        7000218 => "the app registration does not allow public client flows, and no client secret or certificate is configured",
        500011 => "Exchange Online was not found in the tenant (no Exchange Online subscription, or the scope names another resource)",
        7000112 => "the application is disabled in the tenant",
        53003 => "blocked by a Conditional Access policy",
        50076 => "the user must complete multi-factor authentication again",
        50126 => "invalid username or password at the identity provider",
        _ => return None,
    })
}

/// Cause and fix for an AADSTS code, with the admin's ids.
pub fn diagnose_code(code: u32, ids: &Ids) -> Option<Diagnosis> {
    let d = Diagnosis::new(format!("AADSTS{code}: {}.", cause(code)?));
    let app = cmd::portal_app(ids);
    let secret_goes = match &ids.credential {
        Credential::SecretFile(path) => {
            format!("write it to client_secret_file {path} (read at each request: no restart needed)")
        }
        _ => format!("put it in client_secret of identity {:?} (or in a client_secret_file)", ids.identity),
    };
    Some(match code {
        7000215 => d
            .note(format!("{app} > Certificates & secrets > Client secrets > New client secret;"))
            .note("copy the Value column right away (it is shown once), not the Secret ID column;")
            .note(secret_goes),
        7000222 => d
            .note(format!("{app} > Certificates & secrets > Client secrets > New client secret (note its expiry date);"))
            .note(format!("copy its Value, {secret_goes}, then delete the expired secret")),
        700016 => d
            .note(format!(
                "compare client_id {} with Application (client) ID, and tenant {} with Directory (tenant) ID, on the app's Overview page: {app}",
                ids.client_id(),
                ids.tenant
            ))
            .note("an app registered in another tenant must first be consented to in this one"),
        90002 | 900023 => d.note(format!(
            "set tenant of identity {:?} to the Directory (tenant) ID from Entra admin center > Overview, or to a verified domain such as contoso.onmicrosoft.com",
            ids.identity
        )),
        65001 => {
            let d = d.note(cmd::portal_grant_consent(ids));
            if ids.app_only() {
                d
            } else {
                d.note(format!("or let the user consent when signing in: {}", ids.login_command()))
            }
        }
        700027 => {
            let cert = match &ids.credential {
                Credential::Certificate(path) => path.clone(),
                _ => "<cert_file>".into(),
            };
            d.note(format!("{app} > Certificates & secrets > Certificates > Upload certificate: {cert}"))
                .note("or compare the Thumbprint column there with:")
                .command(format!("openssl x509 -in {cert} -noout -fingerprint -sha1"))
        }
        700024 => d
            .note("set the clock right and keep it right (NTP):")
            .command("timedatectl set-ntp true && timedatectl status"),
        50173 | 700082 | 70008 | 50076 => d.note("sign the account in again:").command(ids.login_command()),
        70011 | 1002012 => {
            let scope = if ids.app_only() {
                crate::config::IdentityConfig::APP_ONLY_SCOPE
            } else {
                crate::config::IdentityConfig::DELEGATED_SCOPE
            };
            d.note(format!(
                "remove scope from identity {:?} to use the default, or set it to (individual application permissions are not requested, /.default covers them):",
                ids.identity
            ))
            .command(format!("scope: {scope}"))
        }
        7000218 => d
            .note(format!("{app} > Authentication > Advanced settings > Allow public client flows: Yes"))
            .note(format!("or configure a client_secret for identity {:?}", ids.identity)),
        500011 => d.note(format!(
            "check that the tenant has Exchange Online, and that identity {:?} requests {} (client_credentials) or the outlook.office.com scopes (refresh_token)",
            ids.identity,
            crate::config::IdentityConfig::APP_ONLY_SCOPE
        )),
        7000112 => d.note(format!(
            "Entra admin center > Enterprise applications > {} > Properties > Enabled for users to sign-in: Yes",
            ids.client_id()
        )),
        53003 => d.note(format!(
            "Entra admin center > Sign-in logs (service principal sign-ins for {}) names the policy; exclude this app or its location from it",
            ids.client_id()
        )),
        _ => d,
    })
}

/// An Entra error the table does not know: its own words and where to look it up.
fn unknown_entra(e: &EntraError) -> Diagnosis {
    let first = e.description.lines().next().unwrap_or("").trim();
    let d = Diagnosis::new(if first.is_empty() {
        format!("Entra refused the request: {}", e.error)
    } else {
        first.to_string()
    });
    match e.aadsts() {
        Some(code) => d.note(format!("Microsoft's explanation: https://login.microsoftonline.com/error?code={code}")),
        None => d,
    }
}

/// Cause and fix for a failed token request.
pub fn diagnose_token_error(e: &TokenError, ids: &Ids) -> Diagnosis {
    match e {
        TokenError::Entra(entra) => entra.aadsts().and_then(|code| diagnose_code(code, ids)).unwrap_or_else(|| unknown_entra(entra)),
        TokenError::Unreachable(_) | TokenError::Timeout(_) => Diagnosis::new(
            "the token endpoint answered the first request but not this one",
        )
        .note("check the network path (proxy, firewall) to the authority, then run the check again"),
        TokenError::Server { status, .. } if *status == 429 => {
            Diagnosis::new("Entra is throttling this app (HTTP 429)").note("wait a minute and run the check again")
        }
        TokenError::Server { status, .. } => Diagnosis::new(format!(
            "the token endpoint failed with HTTP {status}: a problem at Entra or at a proxy in between"
        ))
        .note("run the check again later; https://status.cloud.microsoft shows Microsoft's incidents"),
        TokenError::Malformed(_) => Diagnosis::new("the answer was not a token response: is authority an Entra endpoint?")
            .note(format!("identity {:?}: authority should be https://login.microsoftonline.com", ids.identity)),
        TokenError::Assertion { .. } => Diagnosis::new("the client assertion cannot be signed on this machine")
            .note(format!(
                "identity {:?}: certificate.cert_file must be the certificate uploaded to the app registration, key_file its RSA key (2048 bits or more)",
                ids.identity
            )),
        TokenError::SecretFile { path, .. } => Diagnosis::new(format!("client_secret_file {} cannot be read", path.display()))
            .note("it must exist and be readable by the proxy's user (mode 0600 or 0640)"),
        TokenError::EmptySecretFile(path) => Diagnosis::new(format!("client_secret_file {} is empty", path.display()))
            .note("write the client secret's Value into it (not its Secret ID)"),
        TokenError::HttpClient(_) => Diagnosis::new("the HTTP client for the token endpoint cannot be set up")
            .note("check upstream_ca_file and any HTTPS_PROXY setting in the environment"),
        TokenError::NoTokenStore(_) => Diagnosis::new("a refresh_token identity needs a token_store")
            .command("token_store: { path: /var/lib/xoauth2-proxy }"),
        TokenError::NoRefreshToken => Diagnosis::new("Entra returned no refresh token")
            .note(format!("the scope of identity {:?} must include offline_access; then sign in again:", ids.identity))
            .command(ids.login_command()),
        TokenError::DeviceCodeExpired | TokenError::SignInDeclined => {
            Diagnosis::new("the sign-in did not complete").note("sign the account in again:").command(ids.login_command())
        }
        TokenError::NoAccount => Diagnosis::new("a delegated identity was asked for a token without an account"),
        TokenError::Store(_) => Diagnosis::new("the token store cannot be read")
            .note("check token_store.path and key_file: owner, mode 0600/0700, and that the key is the one the store was written with"),
        TokenError::NotLoggedIn { .. } => {
            Diagnosis::new("the account has never signed in").note("sign it in once:").command(ids.login_command())
        }
        TokenError::ReauthRequired { .. } => {
            Diagnosis::new("Entra refused the stored refresh token").note("sign the account in again:").command(ids.login_command())
        }
        TokenError::UnknownIdentity(_) => Diagnosis::new("the account names an identity that does not exist"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flow;

    fn ids(flow: Flow) -> Ids {
        Ids {
            config: "/etc/x.yaml".into(),
            identity: "contoso".into(),
            tenant: "contoso.onmicrosoft.com".into(),
            tenant_id: None,
            client_id: Some("11111111-2222-3333-4444-555555555555".into()),
            flow,
            credential: Credential::SecretFile("/run/secrets/contoso".into()),
            sp_object_id: None,
            account: Some("crm".into()),
            mailbox: Some("sales@contoso.com".into()),
            smtp_user: None,
            signed_in: None,
        }
    }

    fn text(d: &Diagnosis) -> String {
        let mut s = d.cause.clone();
        for f in &d.fix {
            match f {
                super::super::report::Fix::Note(t) | super::super::report::Fix::Command(t) => {
                    s.push('\n');
                    s.push_str(t)
                }
            }
        }
        s
    }

    /// Every code the issue lists has a cause and a fix that names what to do.
    #[test]
    fn every_listed_code_is_mapped_to_a_fix() {
        let cases: &[(u32, Flow, &[&str])] = &[
            (7000215, Flow::ClientCredentials, &["Value", "not the Secret ID", "/run/secrets/contoso"]),
            (7000222, Flow::ClientCredentials, &["expired", "New client secret"]),
            (700016, Flow::ClientCredentials, &["11111111-2222-3333-4444-555555555555", "Directory (tenant) ID"]),
            (90002, Flow::ClientCredentials, &["tenant not found", "Directory (tenant) ID"]),
            (900023, Flow::ClientCredentials, &["not a valid tenant identifier"]),
            (65001, Flow::ClientCredentials, &["Grant admin consent for contoso.onmicrosoft.com"]),
            (65001, Flow::RefreshToken, &["xoauth2-proxy login -c /etc/x.yaml crm"]),
            (700027, Flow::ClientCredentials, &["Upload certificate", "openssl x509"]),
            (700024, Flow::ClientCredentials, &["clock", "timedatectl"]),
            (50173, Flow::RefreshToken, &["revoked", "xoauth2-proxy login -c /etc/x.yaml crm"]),
            (700082, Flow::RefreshToken, &["inactivity", "xoauth2-proxy login"]),
            (70008, Flow::RefreshToken, &["expired", "xoauth2-proxy login"]),
            (70011, Flow::ClientCredentials, &["scope: https://outlook.office365.com/.default"]),
            (7000218, Flow::RefreshToken, &["Allow public client flows: Yes"]),
        ];
        for (code, flow, needles) in cases {
            let d = diagnose_code(*code, &ids(*flow)).unwrap_or_else(|| panic!("AADSTS{code} is not mapped"));
            let t = text(&d);
            assert!(t.starts_with(&format!("AADSTS{code}: ")), "{t}");
            for needle in *needles {
                assert!(t.contains(needle), "AADSTS{code}: {needle:?} missing in\n{t}");
            }
        }
    }

    #[test]
    fn unknown_codes_keep_entras_words_and_a_lookup_link() {
        let e = EntraError {
            status: 400,
            error: "invalid_request".into(),
            description: "AADSTS90014: The required field 'scope' is missing.\r\nTrace ID: x".into(),
            codes: vec![90014],
        };
        let d = diagnose_token_error(&TokenError::Entra(e), &ids(Flow::ClientCredentials));
        assert_eq!(d.cause, "AADSTS90014: The required field 'scope' is missing.");
        assert!(text(&d).contains("https://login.microsoftonline.com/error?code=90014"));
    }

    #[test]
    fn a_delegated_account_without_a_login_is_told_the_command() {
        let e = TokenError::NotLoggedIn { identity: "contoso".into(), account: "crm".into() };
        assert!(text(&diagnose_token_error(&e, &ids(Flow::RefreshToken)))
            .contains("xoauth2-proxy login -c /etc/x.yaml crm"));
    }
}
