//! Access tokens: where they come from ([`TokenSource`], one per identity)
//! and how they are cached and shared ([`TokenManager`]).
//!
//! The session asks the manager for a token for an account; the manager hands
//! out a cached one with enough life left, or makes exactly one request to the
//! identity's source while every other caller for the same key waits for it.

pub mod assertion;
mod cache;
pub mod entra;
pub mod provider;
pub mod shared;
pub mod store;

pub use cache::TokenManager;
pub use entra::EntraError;

use crate::secret::Secret;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a token is cached under: the identity, and for delegated flows the
/// account whose refresh token it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub identity: Arc<str>,
    pub account: Option<Arc<str>>,
}

impl TokenKey {
    pub fn app(identity: &str) -> Self {
        TokenKey { identity: identity.into(), account: None }
    }
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.account {
            Some(account) => write!(f, "{}/{}", self.identity, account),
            None => f.write_str(&self.identity),
        }
    }
}

/// A new token as the endpoint returned it.
#[derive(Debug)]
pub struct FreshToken {
    pub access_token: Secret<String>,
    pub expires_in: Duration,
    pub refresh_token: Option<Secret<String>>,
}

/// Obtains new access tokens for one identity. Grant types (client
/// credentials with a secret or certificate, refresh tokens) plug in here.
pub trait TokenSource: Send + Sync {
    /// `account` names the account for delegated flows; app-only sources ignore it.
    fn fetch<'a>(&'a self, account: Option<&'a str>) -> BoxFuture<'a, Result<FreshToken, TokenError>>;

    /// The upstream refused `token`: a source that shares tokens must not
    /// hand it out again.
    fn refused(&self, _account: Option<&str>, _token: &str) {}
}

/// A cached access token. Cloning shares it.
#[derive(Clone)]
pub struct AccessToken {
    inner: Arc<TokenInner>,
}

struct TokenInner {
    value: Secret<String>,
    expires_at: Instant,
    lifetime: Duration,
}

impl AccessToken {
    pub fn new(value: Secret<String>, lifetime: Duration) -> Self {
        AccessToken { inner: Arc::new(TokenInner { value, expires_at: Instant::now() + lifetime, lifetime }) }
    }

    pub fn expose(&self) -> &str {
        self.inner.value.expose()
    }

    pub fn remaining(&self) -> Duration {
        self.inner.expires_at.saturating_duration_since(Instant::now())
    }

    pub fn lifetime(&self) -> Duration {
        self.inner.lifetime
    }

    pub fn expires_at(&self) -> Instant {
        self.inner.expires_at
    }

    /// Whether two handles are the very same token (not just equal text).
    pub fn same_as(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken").field("remaining", &self.remaining()).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("token endpoint failed with HTTP {status}: {detail}")]
    Server { status: u16, detail: String },
    #[error("token endpoint refused the request: {0}")]
    Entra(#[from] EntraError),
    #[error("token endpoint sent an unusable answer: {0}")]
    Malformed(String),
    #[error("token store: {0}")]
    Store(#[source] Arc<store::StoreError>),
    #[error("identity {identity}: {source}")]
    Assertion { identity: String, source: Arc<assertion::AssertionError> },
    #[error("cannot read client_secret_file {path}: {source}")]
    SecretFile { path: std::path::PathBuf, source: Arc<std::io::Error> },
    #[error("client_secret_file {0} is empty")]
    EmptySecretFile(std::path::PathBuf),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] Arc<reqwest::Error>),
    #[error("identity {0}: no token_store configured")]
    NoTokenStore(String),
    #[error("a delegated identity needs an account")]
    NoAccount,
    #[error("the token endpoint returned no refresh token: the identity's scope must include offline_access")]
    NoRefreshToken,
    #[error("the device code expired before the sign-in completed; run login again")]
    DeviceCodeExpired,
    #[error("the sign-in was declined; nothing was stored")]
    SignInDeclined,
    #[error("no refresh token stored for account {account} (identity {identity}): run `xoauth2-proxy login` for it")]
    NotLoggedIn { identity: String, account: String },
    #[error("the stored refresh token for {account} was refused; waiting for `{login}`")]
    ReauthRequired { account: String, login: String },
    #[error("no identity named {0:?}")]
    UnknownIdentity(String),
}

impl From<store::StoreError> for TokenError {
    fn from(e: store::StoreError) -> Self {
        TokenError::Store(Arc::new(e))
    }
}

impl TokenError {
    /// A human must act (re-consent, `xoauth2-proxy login`): retrying will not
    /// help, and clients get the authentication-failure answer.
    pub fn requires_reauthorization(&self) -> bool {
        match self {
            TokenError::Entra(e) => e.error == "invalid_grant",
            TokenError::NotLoggedIn { .. } | TokenError::ReauthRequired { .. } => true,
            _ => false,
        }
    }
}

/// What every token source of a config shares: the TLS client setup for the
/// token endpoint, the refresh-token store, and the re-authorisation hook.
pub fn context_for(
    config: &crate::config::Config,
    tls: Arc<rustls::ClientConfig>,
) -> Result<provider::SourceContext, TokenError> {
    let store = match &config.token_store {
        Some(store) => Some(Arc::new(store::TokenStore::open(store)?)),
        None => None,
    };
    Ok(provider::SourceContext {
        tls,
        store,
        notifier: Arc::new(provider::ReauthNotifier::new(config.on_reauth_required.clone(), &config.source)),
        shared: None,
    })
}

/// [`context_for`], with the replicas' shared state when `state:` is set
/// (it seals with the token store's key, which `state:` requires).
pub fn shared_context_for(
    config: &crate::config::Config,
    tls: Arc<rustls::ClientConfig>,
    state: Option<Arc<crate::state::SharedState>>,
) -> Result<provider::SourceContext, TokenError> {
    let mut ctx = context_for(config, tls)?;
    if let (Some(state), Some(store)) = (state, &ctx.store) {
        ctx.shared = Some(shared::SharedTokens::new(state, store.clone()));
    }
    Ok(ctx)
}

/// The token manager for a config: one source per identity.
pub fn manager_for(config: &crate::config::Config, tls: Arc<rustls::ClientConfig>) -> Result<TokenManager, TokenError> {
    manager_with(config, context_for(config, tls)?)
}

/// The token manager over a prepared context: with shared state, every
/// source is wrapped so that the replicas make one request between them.
pub fn manager_with(config: &crate::config::Config, ctx: provider::SourceContext) -> Result<TokenManager, TokenError> {
    let mut builder = TokenManager::builder();
    for identity in config.identities.values() {
        let source = provider::source_for(identity, &ctx)?;
        let delegated = matches!(source, provider::Source::Delegated(_));
        let source = match &ctx.shared {
            Some(shared) => Arc::new(shared::SharedSource::new(
                source.as_dyn(),
                &identity.name,
                delegated,
                identity.min_token_lifetime,
                shared.clone(),
            )) as Arc<dyn TokenSource>,
            None => source.as_dyn(),
        };
        builder.add_identity(&identity.name, source, identity.min_token_lifetime, delegated);
    }
    Ok(builder.build())
}
