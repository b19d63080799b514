//! `identities.<name>`: an Entra app registration, its endpoint, credential and flow.

use super::Ctx;
use crate::config::raw::{Flow, JwtAlgorithm, RawIdentity};
use crate::config::{ClientCredential, IdentityConfig};
use crate::secret::Secret;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub(super) fn validate(
    raw: BTreeMap<String, RawIdentity>,
    have_token_store: bool,
    cx: &mut Ctx,
) -> BTreeMap<String, IdentityConfig> {
    let mut identities = BTreeMap::new();
    for (name, id) in raw {
        let at = |key: &str| format!("identities.{name}.{key}");
        let authority = id.authority.as_deref().unwrap_or(IdentityConfig::DEFAULT_AUTHORITY).trim_end_matches('/');
        if let Err(e) = check_authority(authority) {
            cx.add(at("authority"), e);
        }
        for (key, value) in [("tenant", &id.tenant), ("client_id", &id.client_id)] {
            if value.trim().is_empty() {
                cx.add(at(key), "must not be empty");
            } else if !value.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
                cx.add(at(key), format!("{value:?} has characters that cannot appear in a {key}"));
            }
        }
        let flow = id.flow.unwrap_or(Flow::ClientCredentials);
        let given = [id.client_secret.is_some(), id.client_secret_file.is_some(), id.certificate.is_some()]
            .iter()
            .filter(|&&b| b)
            .count();
        if given > 1 {
            cx.add(at("client_secret"), "set only one of client_secret, client_secret_file and certificate");
        }
        let credential = if let Some(secret) = id.client_secret {
            if secret.is_empty() {
                cx.add(at("client_secret"), "must not be empty");
            }
            ClientCredential::Secret(Secret::new(secret))
        } else if let Some(file) = id.client_secret_file {
            ClientCredential::SecretFile(cx.resolve(&file))
        } else if let Some(cert) = id.certificate {
            ClientCredential::Certificate {
                cert_file: cx.resolve(&cert.cert_file),
                key_file: cx.resolve(&cert.key_file),
                algorithm: cert.algorithm.unwrap_or(JwtAlgorithm::PS256),
            }
        } else {
            if flow == Flow::ClientCredentials {
                cx.add(
                    at("client_secret"),
                    "client_credentials needs client_secret, client_secret_file or certificate",
                );
            }
            ClientCredential::None
        };
        if flow == Flow::RefreshToken && !have_token_store {
            cx.add(at("flow"), "flow refresh_token keeps refresh tokens in token_store: configure token_store.path");
        }
        let scope = id.scope.unwrap_or_else(|| match flow {
            Flow::ClientCredentials => IdentityConfig::APP_ONLY_SCOPE.to_string(),
            Flow::RefreshToken => IdentityConfig::DELEGATED_SCOPE.to_string(),
        });
        if scope.trim().is_empty() {
            cx.add(at("scope"), "must not be empty");
        }
        let min_token_lifetime = id.min_token_lifetime.map_or(IdentityConfig::DEFAULT_MIN_TOKEN_LIFETIME, |d| d.0);
        let token_timeout = id.token_timeout.map_or(IdentityConfig::DEFAULT_TOKEN_TIMEOUT, |d| d.0);
        if token_timeout.is_zero() {
            cx.add(at("token_timeout"), "must be longer than zero");
        }
        let tenant = id.tenant.trim();
        identities.insert(
            name.clone(),
            IdentityConfig {
                name: name.clone(),
                token_url: format!("{authority}/{tenant}/oauth2/v2.0/token"),
                device_code_url: format!("{authority}/{tenant}/oauth2/v2.0/devicecode"),
                client_id: id.client_id.trim().to_string(),
                credential,
                flow,
                scope,
                min_token_lifetime,
                token_timeout,
            },
        );
    }
    identities
}

/// The token endpoint must be HTTPS: it receives the client secret. Plain
/// HTTP is allowed only to a loopback address, for local test endpoints.
fn check_authority(authority: &str) -> Result<(), String> {
    if authority.starts_with("https://") && authority.len() > "https://".len() {
        return Ok(());
    }
    if let Some(rest) = authority.strip_prefix("http://") {
        let hostport = rest.split('/').next().unwrap_or("");
        let host = match hostport.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
        };
        let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return Ok(());
        }
        return Err(format!("{authority:?} must use https (plain http is allowed only to a loopback address)"));
    }
    Err(format!("{authority:?} is not an https URL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert!(check_authority("https://login.microsoftonline.com").is_ok());
        assert!(check_authority("http://127.0.0.1:8080").is_ok());
        assert!(check_authority("http://localhost:1234/x").is_ok());
        assert!(check_authority("http://[::1]:9/").is_ok());
        assert!(check_authority("http://login.microsoftonline.com").is_err());
        assert!(check_authority("http://127.0.0.1.evil.com").is_err());
        assert!(check_authority("ftp://x").is_err());
        assert!(check_authority("https://").is_err());
    }
}
