//! Token sources for the grant types the proxy supports.

use super::entra::EntraClient;
use super::{BoxFuture, FreshToken, TokenError, TokenSource};
use crate::config::{ClientCredential, Flow, IdentityConfig};
use crate::secret::Secret;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// App-only tokens with the client credentials grant and a client secret.
pub struct ClientCredentials {
    entra: EntraClient,
    token_url: String,
    client_id: String,
    secret: SecretSource,
    scope: String,
    timeout: Duration,
}

enum SecretSource {
    Inline(Secret<String>),
    File(PathBuf),
}

impl SecretSource {
    async fn read(&self) -> Result<Secret<String>, TokenError> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(path) => {
                let text = Secret::new(tokio::fs::read_to_string(path).await.map_err(|e| {
                    TokenError::Local(format!("cannot read client_secret_file {}: {e}", path.display()))
                })?);
                let trimmed = text.expose().trim();
                if trimmed.is_empty() {
                    return Err(TokenError::Local(format!("client_secret_file {} is empty", path.display())));
                }
                Ok(Secret::new(trimmed.to_string()))
            }
        }
    }
}

impl TokenSource for ClientCredentials {
    fn fetch<'a>(&'a self, _account: Option<&'a str>) -> BoxFuture<'a, Result<FreshToken, TokenError>> {
        Box::pin(async move {
            let secret = self.secret.read().await?;
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", secret.expose().as_str()),
                ("scope", self.scope.as_str()),
            ];
            self.entra.token_request(&self.token_url, &form, self.timeout).await
        })
    }
}

/// Whether the token endpoint is on this machine (tests and demos): then no
/// HTTP proxy from the environment is used to reach it.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Builds the token source an identity's configuration describes.
pub fn source_for(
    identity: &IdentityConfig,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Arc<dyn TokenSource>, TokenError> {
    let entra = EntraClient::new(tls, is_loopback_url(&identity.token_url))?;
    let secret = match (identity.flow, &identity.credential) {
        (Flow::ClientCredentials, ClientCredential::Secret(secret)) => SecretSource::Inline(secret.clone()),
        (Flow::ClientCredentials, ClientCredential::SecretFile(path)) => SecretSource::File(path.clone()),
        (flow, credential) => {
            return Err(TokenError::Local(format!(
                "identity {}: {} with {} is not supported by this version",
                identity.name,
                flow.as_str(),
                match credential {
                    ClientCredential::Certificate { .. } => "a certificate",
                    ClientCredential::None => "no client credential",
                    _ => "this credential",
                }
            )))
        }
    };
    Ok(Arc::new(ClientCredentials {
        entra,
        token_url: identity.token_url.clone(),
        client_id: identity.client_id.clone(),
        secret,
        scope: identity.scope.clone(),
        timeout: identity.token_timeout,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_url("http://127.0.0.1:8080/t/oauth2/v2.0/token"));
        assert!(is_loopback_url("http://localhost/x"));
        assert!(is_loopback_url("http://[::1]:80/x"));
        assert!(!is_loopback_url("https://login.microsoftonline.com/t/oauth2/v2.0/token"));
    }
}
