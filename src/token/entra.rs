//! The Microsoft identity platform's token endpoint over HTTP: one bounded
//! request, one parsed answer, and Entra's errors turned into messages an
//! admin can act on.

use super::{FreshToken, TokenError};
use crate::secret::Secret;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Token responses are a few kilobytes; anything much larger is not one.
const MAX_RESPONSE: usize = 256 * 1024;

/// Entra's default when a response omits `expires_in`.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);

/// An error answer from the token endpoint (`error`, `error_description`, `error_codes`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EntraError {
    pub status: u16,
    pub error: String,
    pub description: String,
    pub codes: Vec<u32>,
}

impl EntraError {
    /// The AADSTS number: from `error_codes`, else from the description text.
    pub fn aadsts(&self) -> Option<u32> {
        if let Some(code) = self.codes.first() {
            return Some(*code);
        }
        let at = self.description.find("AADSTS")? + "AADSTS".len();
        let digits: String = self.description[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// What the admin should know, for the errors people actually hit: the
    /// cause from the diagnosis table (`check --online` adds the fix).
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self.aadsts().and_then(crate::doctor::entra::cause) {
            Some(cause) => cause,
            None => match self.error.as_str() {
                "invalid_grant" => {
                    "the grant is no longer valid (for a delegated identity: run `xoauth2-proxy login` for the account again)"
                }
                "invalid_client" => "client authentication failed: check client_id and the secret or certificate",
                "unauthorized_client" => "the app is not allowed to use this grant type: check the app registration",
                _ => return None,
            },
        })
    }

    fn first_line(&self) -> &str {
        self.description.lines().next().unwrap_or("").trim()
    }
}

impl fmt::Display for EntraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        if let Some(code) = self.aadsts() {
            write!(f, " (AADSTS{code})")?;
        }
        match self.hint() {
            Some(hint) => write!(f, ": {hint}"),
            None if !self.first_line().is_empty() => write!(f, ": {}", self.first_line()),
            None => write!(f, " (HTTP {})", self.status),
        }
    }
}

/// `expires_in` arrives as a number, or as a string of digits from some endpoints.
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
struct Answer {
    access_token: Option<String>,
    expires_in: Option<Seconds>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    error_codes: Option<Vec<u32>>,
}

impl Answer {
    fn entra_error(self, status: u16) -> Option<EntraError> {
        Some(EntraError {
            status,
            error: self.error?,
            description: self.error_description.unwrap_or_default(),
            codes: self.error_codes.unwrap_or_default(),
        })
    }
}

/// An HTTP client for one authority.
#[derive(Clone)]
pub struct EntraClient {
    http: reqwest::Client,
}

impl EntraClient {
    /// `direct` bypasses any HTTP proxy from the environment (for loopback endpoints).
    pub fn new(tls: Arc<rustls::ClientConfig>, direct: bool) -> Result<Self, TokenError> {
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .user_agent(concat!("xoauth2-proxy/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none());
        if direct {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| TokenError::HttpClient(std::sync::Arc::new(e)))?;
        Ok(EntraClient { http })
    }

    /// POSTs a form and parses the answer as a token response.
    pub async fn token_request(
        &self,
        url: &str,
        form: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<FreshToken, TokenError> {
        let (status, body) =
            tokio::time::timeout(timeout, self.post(url, form)).await.map_err(|_| TokenError::Timeout(timeout))??;
        parse_token_answer(status, &body)
    }

    /// POSTs a form and returns the status and a bounded body.
    pub async fn post(&self, url: &str, form: &[(&str, &str)]) -> Result<(u16, Vec<u8>), TokenError> {
        let response = self.http.post(url).form(form).send().await.map_err(|e| {
            let e = e.without_url();
            TokenError::Unreachable(error_chain(&e))
        })?;
        bounded_body(response).await
    }

    /// GETs a URL (the discovery document, for `check --online`) and says,
    /// when no answer came, whether DNS, the connection or TLS failed.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<(u16, Vec<u8>), Unanswered> {
        let request = async {
            let response = self.http.get(url).send().await.map_err(|e| Unanswered::from_reqwest(&e.without_url()))?;
            bounded_body(response).await.map_err(|e| Unanswered { kind: Transport::Other, detail: e.to_string() })
        };
        tokio::time::timeout(timeout, request)
            .await
            .map_err(|_| Unanswered { kind: Transport::Timeout, detail: format!("no answer within {timeout:?}") })?
    }
}

async fn bounded_body(mut response: reqwest::Response) -> Result<(u16, Vec<u8>), TokenError> {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) =
        response.chunk().await.map_err(|e| TokenError::Unreachable(error_chain(&e.without_url())))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(TokenError::Malformed(format!("response larger than {MAX_RESPONSE} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// Where a request without an answer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The host name did not resolve.
    Dns,
    /// Nothing accepted the connection (refused, unreachable, reset).
    Connect,
    /// The TLS handshake failed (untrusted or wrong certificate, TLS intercepted).
    Tls,
    Timeout,
    Other,
}

#[derive(Debug, Clone)]
pub struct Unanswered {
    pub kind: Transport,
    /// The error chain, for the admin.
    pub detail: String,
}

impl Unanswered {
    fn from_reqwest(e: &reqwest::Error) -> Self {
        let detail = error_chain(e);
        // io::Error's source() skips the error it wraps, so look inside each
        // io::Error too: that is where rustls' certificate errors sit.
        let mut tls = false;
        let mut refused = false;
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if err.downcast_ref::<rustls::Error>().is_some() {
                tls = true;
            }
            // Connectors nest io::Errors (Other around InvalidData around rustls').
            let mut io = err.downcast_ref::<std::io::Error>();
            while let Some(e) = io {
                refused |= matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                );
                let inner = e.get_ref();
                tls |= inner.is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some());
                io = inner.and_then(|i| i.downcast_ref::<std::io::Error>());
            }
            source = err.source();
        }
        // hyper-util names a failed lookup "dns error"; there is no type for it.
        let kind = if detail.contains("dns error") {
            Transport::Dns
        } else if tls {
            Transport::Tls
        } else if e.is_timeout() {
            Transport::Timeout
        } else if refused || e.is_connect() {
            Transport::Connect
        } else {
            Transport::Other
        };
        Unanswered { kind, detail }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Interprets a token endpoint answer.
pub fn parse_token_answer(status: u16, body: &[u8]) -> Result<FreshToken, TokenError> {
    let answer: Option<Answer> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        let detail = || String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string();
        return Err(match answer.and_then(|a| a.entra_error(status)) {
            Some(e) if (400..500).contains(&status) && status != 429 => TokenError::Entra(e),
            Some(e) => TokenError::Server { status, detail: e.to_string() },
            None => TokenError::Server { status, detail: detail() },
        });
    }
    let answer = answer.ok_or_else(|| TokenError::Malformed("response is not JSON".into()))?;
    if answer.error.is_some() {
        return Err(answer
            .entra_error(status)
            .map_or_else(|| TokenError::Malformed("error answer".into()), TokenError::Entra));
    }
    let access_token =
        answer.access_token.filter(|t| !t.is_empty()).ok_or_else(|| TokenError::Malformed("no access_token".into()))?;
    let expires_in = match answer.expires_in {
        None => DEFAULT_EXPIRES_IN,
        Some(Seconds::Number(n)) => Duration::from_secs(n),
        Some(Seconds::Text(s)) => Duration::from_secs(
            s.trim().parse().map_err(|_| TokenError::Malformed(format!("expires_in {s:?} is not a number")))?,
        ),
    };
    Ok(FreshToken {
        access_token: Secret::new(access_token),
        expires_in,
        refresh_token: answer.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_answers() {
        let t = parse_token_answer(200, br#"{"token_type":"Bearer","expires_in":3599,"access_token":"eyJ0"}"#).unwrap();
        assert_eq!(t.access_token.expose(), "eyJ0");
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        assert!(t.refresh_token.is_none());
        let t = parse_token_answer(200, br#"{"expires_in":"4000","access_token":"a","refresh_token":"r"}"#).unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(4000));
        assert_eq!(t.refresh_token.unwrap().expose(), "r");
        let t = parse_token_answer(200, br#"{"access_token":"a"}"#).unwrap();
        assert_eq!(t.expires_in, DEFAULT_EXPIRES_IN);
    }

    #[test]
    fn malformed_answers() {
        for body in [
            &b"not json"[..],
            br#"{"expires_in":10}"#,
            br#"{"access_token":""}"#,
            br#"{"access_token":"a","expires_in":"soon"}"#,
        ] {
            assert!(matches!(parse_token_answer(200, body), Err(TokenError::Malformed(_))), "{body:?}");
        }
    }

    fn entra(status: u16, error: &str, description: &str, codes: &str) -> TokenError {
        let body = format!(r#"{{"error":"{error}","error_description":"{description}","error_codes":{codes}}}"#);
        parse_token_answer(status, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn entra_errors_become_actionable_messages() {
        let cases = [
            (
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided.",
                "[7000215]",
                "AADSTS7000215",
                "client_secret is wrong",
            ),
            (
                "invalid_client",
                "AADSTS7000222: The provided client secret keys are expired.",
                "[7000222]",
                "AADSTS7000222",
                "has expired",
            ),
            (
                "unauthorized_client",
                "AADSTS700016: Application with identifier 'x' was not found",
                "[700016]",
                "AADSTS700016",
                "not found in the tenant",
            ),
            (
                "invalid_grant",
                "AADSTS65001: The user or administrator has not consented",
                "[65001]",
                "AADSTS65001",
                "consent",
            ),
            (
                "invalid_grant",
                "AADSTS700082: The refresh token has expired due to inactivity.",
                "[700082]",
                "AADSTS700082",
                "inactivity",
            ),
            (
                "invalid_grant",
                "AADSTS50173: The provided grant has expired due to it being revoked",
                "[50173]",
                "AADSTS50173",
                "revoked",
            ),
            ("invalid_grant", "AADSTS50173: no codes array", "[]", "AADSTS50173", "revoked"),
        ];
        for (error, description, codes, code, hint) in cases {
            let e = entra(400, error, description, codes);
            let text = e.to_string();
            assert!(text.contains(code) && text.contains(hint), "{text}");
            assert_eq!(e.requires_reauthorization(), error == "invalid_grant");
        }
        let e = entra(400, "invalid_request", "AADSTS90014: The required field 'scope' is missing.", "[90014]");
        assert!(e.to_string().contains("The required field 'scope' is missing"), "{e}");
    }

    #[test]
    fn server_errors_are_not_entra_refusals() {
        assert!(matches!(parse_token_answer(503, b"<html>down</html>"), Err(TokenError::Server { status: 503, .. })));
        let e = entra(500, "temporarily_unavailable", "AADSTS50196: loop", "[50196]");
        assert!(matches!(e, TokenError::Server { status: 500, .. }));
        let e = entra(429, "too_many_requests", "slow down", "[]");
        assert!(matches!(e, TokenError::Server { status: 429, .. }));
    }
}
