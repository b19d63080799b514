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

/// A token's SHA-256, to recognise it again (a refused one, a rotated one)
/// without keeping its text.
fn fingerprint(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().to_vec()
}

pub use cache::{Applied, IdentityPlan, TokenManager};
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
    manager_counted(config, ctx, None)
}

/// [`manager_with`], its token requests counted in `metrics` if given.
pub fn manager_counted(
    config: &crate::config::Config,
    ctx: provider::SourceContext,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> Result<TokenManager, TokenError> {
    let mut builder = TokenManager::builder();
    if let Some(metrics) = metrics {
        builder.metrics(metrics);
    }
    let manager = builder.build();
    manager.apply(plans(config, Some(&ctx), ctx.shared.is_some(), &manager)?);
    Ok(manager)
}

/// One identity's source over `ctx`: with shared state, wrapped so that the
/// replicas make one request between them (as at start, so on a reload too).
fn source_with(
    identity: &crate::config::IdentityConfig,
    ctx: &provider::SourceContext,
) -> Result<Arc<dyn TokenSource>, TokenError> {
    let source = provider::source_for(identity, ctx)?;
    let delegated = matches!(source, provider::Source::Delegated(_));
    Ok(match &ctx.shared {
        Some(shared) => Arc::new(shared::SharedSource::new(source.as_dyn(), identity, delegated, shared.clone()))
            as Arc<dyn TokenSource>,
        None => source.as_dyn(),
    })
}

/// What `config` wants of each identity, compared with what `running` has:
/// a source is built only where the identity's settings or what surrounds
/// it (CA roots, token store, re-authorisation hook) changed, through the
/// shared context (`state`, the connection the process started with) like
/// the first ones. Fails, before anything is replaced, if a source cannot
/// be built.
pub fn plan_for(
    config: &crate::config::Config,
    tls: Arc<rustls::ClientConfig>,
    state: Option<Arc<crate::state::SharedState>>,
    running: &TokenManager,
) -> Result<Vec<cache::IdentityPlan>, TokenError> {
    let unchanged = config.identities.values().all(|identity| {
        running.digests(&identity.name)
            == Some((settings_digest(identity), environment_digest(config, identity, state.is_some())))
    });
    // Opening the token store reads its key: only when a source is built.
    let ctx = match unchanged {
        true => None,
        false => Some(shared_context_for(config, tls, state.clone())?),
    };
    plans(config, ctx.as_ref(), state.is_some(), running)
}

fn plans(
    config: &crate::config::Config,
    ctx: Option<&provider::SourceContext>,
    shared: bool,
    running: &TokenManager,
) -> Result<Vec<cache::IdentityPlan>, TokenError> {
    let mut plans = Vec::new();
    for identity in config.identities.values() {
        let (settings, environment) = (settings_digest(identity), environment_digest(config, identity, shared));
        let unchanged = running.digests(&identity.name) == Some((settings.clone(), environment.clone()));
        let source = match (ctx, unchanged) {
            (Some(ctx), false) => Some(source_with(identity, ctx)?),
            _ => None,
        };
        plans.push(cache::IdentityPlan {
            name: identity.name.clone(),
            settings,
            environment,
            min_lifetime: identity.min_token_lifetime,
            delegated: identity.flow == crate::config::Flow::RefreshToken,
            source,
        });
    }
    Ok(plans)
}

/// A digest of what decides an identity's tokens: endpoint, client, flow,
/// scope, lifetimes and the credential (a secret's value, a secret file's
/// name, a certificate's files and their contents). Two equal digests mean
/// the cached tokens still fit.
fn settings_digest(identity: &crate::config::IdentityConfig) -> Vec<u8> {
    use crate::config::ClientCredential;
    let mut d = Digest::new();
    d.field(identity.token_url.as_bytes())
        .field(identity.device_code_url.as_bytes())
        .field(identity.client_id.as_bytes())
        .field(identity.flow.as_str().as_bytes())
        .field(identity.scope.as_bytes())
        .field(&identity.min_token_lifetime.as_millis().to_le_bytes())
        .field(&identity.token_timeout.as_millis().to_le_bytes());
    match &identity.credential {
        ClientCredential::Secret(secret) => d.field(b"secret").field(secret.expose().as_bytes()),
        ClientCredential::SecretFile(path) => d.field(b"secret_file").field(path.as_os_str().as_encoded_bytes()),
        ClientCredential::Certificate { cert_file, key_file, algorithm } => {
            d.field(b"certificate").file(cert_file).file(key_file).field(format!("{algorithm:?}").as_bytes())
        }
        ClientCredential::None => d.field(b"public"),
    };
    d.finish()
}

/// A digest of what an identity's source depends on besides its own
/// settings: the trust roots for the token endpoint, the token store and
/// the re-authorisation hook (for delegated identities), the config's path
/// (it is in the `login` command the hook is given).
fn environment_digest(
    config: &crate::config::Config,
    identity: &crate::config::IdentityConfig,
    shared: bool,
) -> Vec<u8> {
    let mut d = Digest::new();
    match &config.upstream_ca_file {
        Some(path) => d.file(path),
        None => d.field(b"public roots"),
    };
    // With shared state every source seals its tokens with the store's key.
    d.field(if shared { b"shared" } else { b"local" });
    if identity.flow == crate::config::Flow::RefreshToken || shared {
        match &config.token_store {
            Some(store) => {
                d.field(store.path.as_os_str().as_encoded_bytes());
                match &store.key {
                    crate::config::TokenStoreKey::File(path) => d.field(path.as_os_str().as_encoded_bytes()),
                    crate::config::TokenStoreKey::Inline(key) => d.field(key.expose().as_bytes()),
                };
            }
            None => {
                d.field(b"no store");
            }
        }
        d.field(config.on_reauth_required.as_deref().unwrap_or("").as_bytes())
            .field(config.source.as_os_str().as_encoded_bytes());
    }
    d.finish()
}

/// SHA-256 over length-prefixed fields, so no two field lists collide.
struct Digest(ring::digest::Context);

impl Digest {
    fn new() -> Self {
        Digest(ring::digest::Context::new(&ring::digest::SHA256))
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// A file's name and contents (a file that cannot be read counts by its
    /// error: building the source reports it).
    fn file(&mut self, path: &std::path::Path) -> &mut Self {
        self.field(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(bytes) => self.field(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()),
            Err(e) => self.field(e.to_string().as_bytes()),
        }
    }

    fn finish(&mut self) -> Vec<u8> {
        self.0.clone().finish().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ProcessEnv};
    use std::path::Path;

    fn identity(extra: &str) -> Config {
        let text = format!(
            "listeners: [{{ name: l, protocol: imap, bind: \"127.0.0.1:0\", upstream: \"x:993\" }}]\n\
             identities:\n  contoso:\n    tenant: t1\n    client_id: c1\n{extra}"
        );
        Config::parse(&text, Path::new("/etc/xoauth2-proxy/config.yaml"), &ProcessEnv).unwrap()
    }

    fn digest(extra: &str) -> (Vec<u8>, Vec<u8>) {
        let config = identity(extra);
        let id = &config.identities["contoso"];
        (settings_digest(id), environment_digest(&config, id, false))
    }

    #[test]
    fn a_digest_changes_with_each_setting_that_decides_the_tokens() {
        let base = digest("    client_secret: s1\n");
        assert_eq!(base, digest("    client_secret: s1\n"));
        for changed in [
            "    client_secret: s2\n",
            "    client_secret_file: /run/s1\n",
            "    client_secret: s1\n    scope: https://outlook.office365.com/IMAP.AccessAsApp\n",
            "    client_secret: s1\n    min_token_lifetime: 5m\n",
            "    client_secret: s1\n    authority: https://login.example.com\n",
        ] {
            let (settings, environment) = digest(changed);
            assert_ne!(settings, base.0, "{changed}");
            assert_eq!(environment, base.1, "{changed}");
        }
        // The trust roots are the identity's surroundings, not its settings.
        let (settings, environment) = digest("    client_secret: s1\nupstream_ca_file: /etc/ssl/extra.pem\n");
        assert_eq!(settings, base.0);
        assert_ne!(environment, base.1);
    }
}
