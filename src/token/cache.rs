//! The token cache: one slot per [`TokenKey`], single-flight refresh.

use super::{AccessToken, TokenError, TokenKey, TokenSource};
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct IdentityEntry {
    source: Arc<dyn TokenSource>,
    min_lifetime: Duration,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<AccessToken>>,
    /// Held while a request is in flight: later callers wait, then reuse its result.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
pub struct TokenManager {
    identities: HashMap<String, IdentityEntry>,
    slots: DashMap<TokenKey, Arc<Slot>>,
}

impl TokenManager {
    pub fn new() -> Self {
        TokenManager::default()
    }

    /// Registers the source for `identity`. A cached token is handed out only
    /// while it has more than `min_lifetime` left (or half its lifetime, for
    /// tokens issued with less than that in total).
    pub fn add_identity(&mut self, identity: &str, source: Arc<dyn TokenSource>, min_lifetime: Duration) {
        self.identities.insert(identity.to_string(), IdentityEntry { source, min_lifetime });
    }

    fn slot(&self, key: &TokenKey) -> Arc<Slot> {
        if let Some(slot) = self.slots.get(key) {
            return slot.clone();
        }
        self.slots.entry(key.clone()).or_default().clone()
    }

    fn usable(slot: &Slot, min_lifetime: Duration) -> Option<AccessToken> {
        let current = slot.current.lock().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|t| t.remaining() > min_lifetime.min(t.lifetime() / 2)).cloned()
    }

    /// A token for `key` with enough life left, requesting one if needed.
    pub async fn get(&self, key: &TokenKey) -> Result<AccessToken, TokenError> {
        let entry =
            self.identities.get(&*key.identity).ok_or_else(|| TokenError::UnknownIdentity(key.identity.to_string()))?;
        let slot = self.slot(key);
        if let Some(token) = Self::usable(&slot, entry.min_lifetime) {
            return Ok(token);
        }
        let _in_flight = slot.fetching.lock().await;
        if let Some(token) = Self::usable(&slot, entry.min_lifetime) {
            return Ok(token);
        }
        let fresh = entry.source.fetch(key.account.as_deref()).await?;
        let token = AccessToken::new(fresh.access_token, fresh.expires_in);
        tracing::info!(token.key = %key, expires_in = ?fresh.expires_in, "obtained new access token");
        *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(token)
    }

    /// Forgets `token` if it is still the cached one for `key`: the upstream
    /// refused it, so the next [`get`](Self::get) must fetch a new one.
    pub fn invalidate(&self, key: &TokenKey, token: &AccessToken) {
        if let Some(slot) = self.slots.get(key) {
            let mut current = slot.current.lock().unwrap_or_else(|e| e.into_inner());
            if current.as_ref().is_some_and(|c| c.same_as(token)) {
                *current = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::token::{BoxFuture, FreshToken};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        calls: AtomicUsize,
        lifetime: Duration,
        delay: Duration,
        fail: bool,
    }

    impl TokenSource for Counting {
        fn fetch<'a>(&'a self, _account: Option<&'a str>) -> BoxFuture<'a, Result<FreshToken, TokenError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                if self.fail {
                    return Err(TokenError::Unreachable("down".into()));
                }
                Ok(FreshToken {
                    access_token: Secret::new(format!("token-{n}")),
                    expires_in: self.lifetime,
                    refresh_token: None,
                })
            })
        }
    }

    fn manager(lifetime: Duration, delay: Duration, fail: bool) -> (Arc<TokenManager>, Arc<Counting>) {
        let source = Arc::new(Counting { calls: AtomicUsize::new(0), lifetime, delay, fail });
        let mut m = TokenManager::new();
        m.add_identity("contoso", source.clone(), Duration::from_secs(600));
        (Arc::new(m), source)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_request() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::from_millis(200), false);
        let key = TokenKey::app("contoso");
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (m, key) = (m.clone(), key.clone());
                tokio::spawn(async move { m.get(&key).await.map(|t| t.expose().to_string()) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "token-1");
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_once_min_lifetime_is_reached() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::ZERO, false);
        let key = TokenKey::app("contoso");
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        tokio::time::advance(Duration::from_secs(3600 - 601)).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-2");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_are_reused_for_half_their_life() {
        let (m, source) = manager(Duration::from_secs(60), Duration::ZERO, false);
        let key = TokenKey::app("contoso");
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-2");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_forces_a_new_token_only_for_the_refused_one() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::ZERO, false);
        let key = TokenKey::app("contoso");
        let first = m.get(&key).await.unwrap();
        m.invalidate(&key, &first);
        let second = m.get(&key).await.unwrap();
        assert_eq!(second.expose(), "token-2");
        // A late report about the old token must not throw away the new one.
        m.invalidate(&key, &first);
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-2");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_returned_and_unknown_identities_refused() {
        let (m, _) = manager(Duration::from_secs(3600), Duration::ZERO, true);
        assert!(matches!(m.get(&TokenKey::app("contoso")).await, Err(TokenError::Unreachable(_))));
        assert!(matches!(m.get(&TokenKey::app("other")).await, Err(TokenError::UnknownIdentity(_))));
    }
}
