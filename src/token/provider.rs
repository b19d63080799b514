//! Token sources for the grant types the proxy supports, and the pieces they
//! share: the endpoint of one identity and how the app authenticates to it.

use super::assertion::{Signer, ASSERTION_TYPE};
use super::entra::EntraClient;
use super::shared::SharedTokens;
use super::store::{unix_millis, unix_now, StoredTokens, TokenStore};
use super::{fingerprint, BoxFuture, FreshToken, TokenError, TokenSource};
use crate::config::{ClientCredential, Flow, IdentityConfig};
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long to wait for another process that is refreshing the same account.
const STORE_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// How the app proves its identity to the token endpoint.
enum ClientAuth {
    Secret(Secret<String>),
    /// Read at each request, so a rotated secret needs no restart.
    SecretFile(PathBuf),
    Certificate(Box<Signer>),
    /// A public client (device code and refresh token flows only).
    Public,
}

impl ClientAuth {
    fn from_config(identity: &IdentityConfig) -> Result<Self, TokenError> {
        Ok(match &identity.credential {
            ClientCredential::Secret(s) => ClientAuth::Secret(s.clone()),
            ClientCredential::SecretFile(p) => ClientAuth::SecretFile(p.clone()),
            ClientCredential::Certificate { cert_file, key_file, algorithm } => ClientAuth::Certificate(Box::new(
                Signer::load(cert_file, key_file, *algorithm)
                    .map_err(|e| TokenError::Assertion { identity: identity.name.clone(), source: Arc::new(e) })?,
            )),
            ClientCredential::None => ClientAuth::Public,
        })
    }

    /// The form fields that authenticate the app for one request.
    async fn fields(
        &self,
        identity: &str,
        client_id: &str,
        token_url: &str,
    ) -> Result<Vec<(&'static str, Secret<String>)>, TokenError> {
        Ok(match self {
            ClientAuth::Secret(s) => vec![("client_secret", s.clone())],
            ClientAuth::SecretFile(path) => vec![("client_secret", read_secret_file(path).await?)],
            ClientAuth::Certificate(signer) => vec![
                ("client_assertion_type", Secret::new(ASSERTION_TYPE.to_string())),
                (
                    "client_assertion",
                    signer
                        .assertion(client_id, token_url, unix_now())
                        .map_err(|e| TokenError::Assertion { identity: identity.to_string(), source: Arc::new(e) })?,
                ),
            ],
            ClientAuth::Public => Vec::new(),
        })
    }
}

async fn read_secret_file(path: &Path) -> Result<Secret<String>, TokenError> {
    let text = Secret::new(
        tokio::fs::read_to_string(path)
            .await
            .map_err(|e| TokenError::SecretFile { path: path.to_path_buf(), source: Arc::new(e) })?,
    );
    let trimmed = text.expose().trim();
    if trimmed.is_empty() {
        return Err(TokenError::EmptySecretFile(path.to_path_buf()));
    }
    Ok(Secret::new(trimmed.to_string()))
}

/// Whether the token endpoint is on this machine (tests and demos): then no
/// HTTP proxy from the environment is used to reach it.
pub(crate) fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An identity's token endpoint and the app's credentials for it.
pub struct Endpoint {
    entra: EntraClient,
    pub identity: String,
    token_url: String,
    device_code_url: String,
    client_id: String,
    auth: ClientAuth,
    scope: String,
    timeout: Duration,
}

/// What the device authorization endpoint answers.
#[derive(Deserialize)]
pub struct DeviceAuthorization {
    device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default = "default_device_expiry")]
    pub expires_in: u64,
    #[serde(default = "default_device_interval")]
    pub interval: u64,
    #[serde(default)]
    pub message: Option<String>,
}

fn default_device_expiry() -> u64 {
    900
}

fn default_device_interval() -> u64 {
    5
}

impl Endpoint {
    pub fn new(identity: &IdentityConfig, tls: Arc<rustls::ClientConfig>) -> Result<Self, TokenError> {
        Ok(Endpoint {
            entra: EntraClient::new(tls, is_loopback_url(&identity.token_url))?,
            identity: identity.name.clone(),
            token_url: identity.token_url.clone(),
            device_code_url: identity.device_code_url.clone(),
            client_id: identity.client_id.clone(),
            auth: ClientAuth::from_config(identity)?,
            scope: identity.scope.clone(),
            timeout: identity.token_timeout,
        })
    }

    /// A token request: the grant's own fields plus client ID, scope and credentials.
    async fn request(&self, grant: &[(&str, &str)]) -> Result<FreshToken, TokenError> {
        let auth = self.auth.fields(&self.identity, &self.client_id, &self.token_url).await?;
        let mut form: Vec<(&str, &str)> = grant.to_vec();
        form.push(("client_id", &self.client_id));
        form.push(("scope", &self.scope));
        form.extend(auth.iter().map(|(k, v)| (*k, v.expose().as_str())));
        self.entra.token_request(&self.token_url, &form, self.timeout).await
    }

    pub async fn client_credentials(&self) -> Result<FreshToken, TokenError> {
        self.request(&[("grant_type", "client_credentials")]).await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<FreshToken, TokenError> {
        self.request(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)]).await
    }

    /// Starts a device code login (RFC 8628).
    pub async fn device_authorization(&self) -> Result<DeviceAuthorization, TokenError> {
        let form = [("client_id", self.client_id.as_str()), ("scope", self.scope.as_str())];
        let (status, body) = tokio::time::timeout(self.timeout, self.entra.post(&self.device_code_url, &form))
            .await
            .map_err(|_| TokenError::Timeout(self.timeout))??;
        if !(200..300).contains(&status) {
            return Err(match super::entra::parse_token_answer(status, &body) {
                Err(e) => e,
                Ok(_) => TokenError::Malformed(format!("device authorization answered HTTP {status}")),
            });
        }
        serde_json::from_slice(&body).map_err(|e| TokenError::Malformed(format!("device authorization answer: {e}")))
    }

    /// One poll of the token endpoint for a device code.
    pub async fn poll_device(&self, authorization: &DeviceAuthorization) -> Result<FreshToken, TokenError> {
        self.request(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", authorization.device_code.as_str()),
        ])
        .await
    }
}

/// App-only tokens: the client credentials grant.
pub struct ClientCredentials {
    endpoint: Endpoint,
}

impl ClientCredentials {
    pub async fn fetch_new(&self) -> Result<FreshToken, TokenError> {
        self.endpoint.client_credentials().await
    }
}

impl TokenSource for ClientCredentials {
    fn fetch<'a>(&'a self, _account: Option<&'a str>) -> BoxFuture<'a, Result<FreshToken, TokenError>> {
        Box::pin(self.endpoint.client_credentials())
    }
}

/// Runs `on_reauth_required` and says, once per refused refresh token, what
/// a human has to do.
pub struct ReauthNotifier {
    command: Option<String>,
    config_path: PathBuf,
}

impl ReauthNotifier {
    pub fn new(command: Option<String>, config_path: &Path) -> Self {
        ReauthNotifier { command, config_path: config_path.to_path_buf() }
    }

    pub fn login_command(&self, account: &str) -> String {
        format!("xoauth2-proxy login -c {} {account}", self.config_path.display())
    }

    pub fn notify(&self, identity: &str, account: &str, reason: &TokenError) {
        let login = self.login_command(account);
        tracing::error!(identity, account, reason = %reason, "re-authorisation required for account {account}: run `{login}`");
        let Some(command) = self.command.clone() else { return };
        let (identity, account, reason) = (identity.to_string(), account.to_string(), reason.to_string());
        tokio::spawn(async move {
            let child = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&command)
                .env("XOAUTH2_PROXY_ACCOUNT", &account)
                .env("XOAUTH2_PROXY_IDENTITY", &identity)
                .env("XOAUTH2_PROXY_REASON", &reason)
                .env("XOAUTH2_PROXY_LOGIN_COMMAND", &login)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            match tokio::time::timeout(Duration::from_secs(60), child).await {
                Ok(Ok(out)) if out.status.success() => tracing::info!(account, "on_reauth_required ran"),
                Ok(Ok(out)) => tracing::warn!(
                    account,
                    status = %out.status,
                    stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                    "on_reauth_required failed"
                ),
                Ok(Err(e)) => tracing::warn!(account, error = %e, "cannot run on_reauth_required"),
                Err(_) => tracing::warn!(account, "on_reauth_required did not finish within 60s; killed"),
            }
        });
    }
}

/// Delegated tokens: each account's refresh token, kept in the store and
/// rotated on every refresh.
pub struct RefreshTokens {
    endpoint: Endpoint,
    store: Arc<TokenStore>,
    notifier: Arc<ReauthNotifier>,
    min_lifetime: Duration,
    /// Per account, the refresh token the endpoint last refused: not tried
    /// again until `login` stores a new one.
    refused: Mutex<HashMap<String, Vec<u8>>>,
    /// With `state:`, the fleet's copy of each record (newest wins).
    shared: Option<Arc<SharedTokens>>,
    /// Per account, the access token the upstream last refused: the stored
    /// copy of it is not handed out again, a refresh is made instead.
    refused_access: Mutex<HashMap<String, Vec<u8>>>,
}

impl RefreshTokens {
    pub fn new(
        endpoint: Endpoint,
        store: Arc<TokenStore>,
        notifier: Arc<ReauthNotifier>,
        min_lifetime: Duration,
    ) -> Self {
        RefreshTokens {
            endpoint,
            store,
            notifier,
            min_lifetime,
            refused: Mutex::new(HashMap::new()),
            shared: None,
            refused_access: Mutex::new(HashMap::new()),
        }
    }

    /// Shares the records with the other replicas.
    pub fn with_shared(mut self, shared: Option<Arc<SharedTokens>>) -> Self {
        self.shared = shared;
        self
    }

    /// The account's newest record: the file's, or the fleet's if newer.
    async fn load(&self, identity: &str, account: &str) -> Result<Option<StoredTokens>, TokenError> {
        match &self.shared {
            Some(shared) => shared.newest(identity, account).await,
            None => Ok(self.store.load(identity, account)?),
        }
    }

    /// Writes the record to the file, then offers it to the fleet.
    async fn save(&self, record: &StoredTokens) -> Result<(), TokenError> {
        self.store.save(record)?;
        if let Some(shared) = &self.shared {
            if let Err(e) = shared.save_refresh(record).await {
                // Written back when the shared state returns (newest wins).
                tracing::warn!(identity = %record.identity, account = %record.account, error = %e, "rotated refresh token kept locally; it goes to the shared state when that returns");
            }
        }
        Ok(())
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A token for `account` with more than `min_left` to live: the one in the
    /// store if another process refreshed recently, else a refresh. The
    /// account's lock file is held throughout, so two processes never spend
    /// the same refresh token.
    pub async fn fetch_with(&self, account: &str, min_left: Duration) -> Result<FreshToken, TokenError> {
        let identity = self.endpoint.identity.as_str();
        let _lock = self.store.lock(identity, account, STORE_LOCK_TIMEOUT).await?;
        let stored = self
            .load(identity, account)
            .await?
            .ok_or_else(|| TokenError::NotLoggedIn { identity: identity.to_string(), account: account.to_string() })?;
        if let Some((access_token, left)) = stored.access_token_with(min_left) {
            let refused = self.refused_access.lock().unwrap_or_else(|e| e.into_inner()).get(account)
                == Some(&fingerprint(access_token.expose()));
            if !refused {
                return Ok(FreshToken { access_token, expires_in: left, refresh_token: None });
            }
        }
        let print = fingerprint(&stored.refresh_token);
        if self.refused.lock().unwrap_or_else(|e| e.into_inner()).get(account) == Some(&print) {
            return Err(TokenError::ReauthRequired {
                account: account.to_string(),
                login: self.notifier.login_command(account),
            });
        }
        match self.endpoint.refresh(&stored.refresh_token).await {
            Ok(fresh) => {
                let rotated = fresh.refresh_token.is_some();
                let record = StoredTokens {
                    identity: identity.to_string(),
                    account: account.to_string(),
                    refresh_token: fresh
                        .refresh_token
                        .as_ref()
                        .map_or_else(|| stored.refresh_token.clone(), |t| t.expose().clone()),
                    access_token: Some(fresh.access_token.expose().clone()),
                    access_expires_at: Some(unix_now() + fresh.expires_in.as_secs()),
                    updated_at: unix_now(),
                    version: unix_millis(),
                };
                if let Err(e) = self.save(&record).await {
                    // The access token is good; the next refresh may still work
                    // with the old refresh token, but say it loudly.
                    tracing::error!(identity, account, error = %e, "cannot save the rotated refresh token");
                }
                self.refused.lock().unwrap_or_else(|e| e.into_inner()).remove(account);
                tracing::debug!(identity, account, rotated, "refresh token used");
                Ok(fresh)
            }
            Err(e) if e.requires_reauthorization() => {
                self.refused.lock().unwrap_or_else(|e| e.into_inner()).insert(account.to_string(), print);
                self.notifier.notify(identity, account, &e);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Stores the result of a device code login.
    pub async fn store_login(&self, account: &str, fresh: &FreshToken) -> Result<PathBuf, TokenError> {
        let identity = self.endpoint.identity.as_str();
        let refresh_token = fresh.refresh_token.as_ref().ok_or(TokenError::NoRefreshToken)?;
        let _lock = self.store.lock(identity, account, STORE_LOCK_TIMEOUT).await?;
        let record = StoredTokens {
            identity: identity.to_string(),
            account: account.to_string(),
            refresh_token: refresh_token.expose().clone(),
            access_token: Some(fresh.access_token.expose().clone()),
            access_expires_at: Some(unix_now() + fresh.expires_in.as_secs()),
            updated_at: unix_now(),
            version: unix_millis(),
        };
        self.save(&record).await?;
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).remove(account);
        Ok(self.store.path_for(identity, account))
    }
}

impl TokenSource for RefreshTokens {
    fn fetch<'a>(&'a self, account: Option<&'a str>) -> BoxFuture<'a, Result<FreshToken, TokenError>> {
        Box::pin(async move {
            let account = account.ok_or(TokenError::NoAccount)?;
            self.fetch_with(account, self.min_lifetime).await
        })
    }

    fn refused(&self, account: Option<&str>, token: &str) {
        if let Some(account) = account {
            self.refused_access
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(account.to_string(), fingerprint(token));
        }
    }
}

/// What the rest of the proxy needs to build token sources.
pub struct SourceContext {
    pub tls: Arc<rustls::ClientConfig>,
    pub store: Option<Arc<TokenStore>>,
    pub notifier: Arc<ReauthNotifier>,
    /// With `state:`: tokens shared by the replicas.
    pub shared: Option<Arc<SharedTokens>>,
}

/// A source for an identity, with the delegated variant exposed for the CLI.
pub enum Source {
    App(Arc<ClientCredentials>),
    Delegated(Arc<RefreshTokens>),
}

impl Source {
    pub fn as_dyn(&self) -> Arc<dyn TokenSource> {
        match self {
            Source::App(s) => s.clone(),
            Source::Delegated(s) => s.clone(),
        }
    }
}

/// Builds the token source an identity's configuration describes.
pub fn source_for(identity: &IdentityConfig, ctx: &SourceContext) -> Result<Source, TokenError> {
    let endpoint = Endpoint::new(identity, ctx.tls.clone())?;
    Ok(match identity.flow {
        Flow::ClientCredentials => Source::App(Arc::new(ClientCredentials { endpoint })),
        Flow::RefreshToken => {
            let store = ctx.store.clone().ok_or_else(|| TokenError::NoTokenStore(identity.name.clone()))?;
            Source::Delegated(Arc::new(
                RefreshTokens::new(endpoint, store, ctx.notifier.clone(), identity.min_token_lifetime)
                    .with_shared(ctx.shared.clone()),
            ))
        }
    })
}

/// Polls for a device code login until it completes, honouring `interval`,
/// `authorization_pending` and `slow_down`; gives up at `expires_in`.
pub async fn poll_device_login<F, Fut>(
    interval: Duration,
    expires_in: Duration,
    mut poll: F,
) -> Result<FreshToken, TokenError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<FreshToken, TokenError>>,
{
    let deadline = tokio::time::Instant::now() + expires_in;
    let mut interval = interval.max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(TokenError::DeviceCodeExpired);
        }
        match poll().await {
            Ok(fresh) => return Ok(fresh),
            Err(TokenError::Entra(e)) => match e.error.as_str() {
                "authorization_pending" => {}
                // RFC 8628: add 5 seconds to the interval for this and every later poll.
                "slow_down" => interval += Duration::from_secs(5),
                "expired_token" | "code_expired" => return Err(TokenError::DeviceCodeExpired),
                "access_denied" | "authorization_declined" => return Err(TokenError::SignInDeclined),
                _ => return Err(TokenError::Entra(e)),
            },
            // The endpoint hiccuped; the person signing in is not to blame.
            Err(e @ (TokenError::Unreachable(_) | TokenError::Timeout(_) | TokenError::Server { .. })) => {
                tracing::warn!(error = %e, "device code poll failed; trying again");
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::EntraError;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_url("http://127.0.0.1:8080/t/oauth2/v2.0/token"));
        assert!(is_loopback_url("http://localhost/x"));
        assert!(is_loopback_url("http://[::1]:80/x"));
        assert!(!is_loopback_url("https://login.microsoftonline.com/t/oauth2/v2.0/token"));
    }

    fn entra(error: &str) -> TokenError {
        TokenError::Entra(EntraError { status: 400, error: error.into(), description: String::new(), codes: vec![] })
    }

    fn token() -> FreshToken {
        FreshToken {
            access_token: Secret::new("at".into()),
            expires_in: Duration::from_secs(3600),
            refresh_token: Some(Secret::new("rt".into())),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn device_polling_honours_interval_pending_and_slow_down() {
        let started = tokio::time::Instant::now();
        let mut answers = vec![
            Ok(token()),
            Err(entra("authorization_pending")),
            Err(entra("slow_down")),
            Err(entra("authorization_pending")),
        ];
        let mut polls = Vec::new();
        let result = poll_device_login(Duration::from_secs(5), Duration::from_secs(900), || {
            polls.push(started.elapsed().as_secs());
            let answer = answers.pop().unwrap();
            async move { answer }
        })
        .await;
        assert!(result.is_ok());
        // 5s, then 5s again, then slow_down: 10s, 10s.
        assert_eq!(polls, [5, 10, 20, 30]);
    }

    #[tokio::test(start_paused = true)]
    async fn device_polling_stops_on_expiry_and_denial() {
        let r = poll_device_login(Duration::from_secs(5), Duration::from_secs(900), || async {
            Err(entra("expired_token"))
        })
        .await;
        assert!(r.err().unwrap().to_string().contains("expired"));
        let r = poll_device_login(Duration::from_secs(5), Duration::from_secs(900), || async {
            Err(entra("access_denied"))
        })
        .await;
        assert!(r.err().unwrap().to_string().contains("declined"));
        let r = poll_device_login(Duration::from_secs(5), Duration::from_secs(12), || async {
            Err(entra("authorization_pending"))
        })
        .await;
        assert!(r.err().unwrap().to_string().contains("expired"));
        let mut n = 0;
        let r = poll_device_login(Duration::from_secs(5), Duration::from_secs(900), || {
            n += 1;
            let answer = if n < 3 { Err(TokenError::Unreachable("down".into())) } else { Ok(token()) };
            async move { answer }
        })
        .await;
        assert!(r.is_ok());
    }
}
