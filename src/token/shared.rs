//! Tokens shared by every replica through [`crate::state`]: access tokens
//! and delegated refresh-token records, sealed with the token-store key
//! exactly as on disk, and one refresh at a time across the fleet.
//!
//! [`SharedSource`] wraps an identity's [`TokenSource`]. Before asking the
//! token endpoint it looks in Redis for a token another replica obtained;
//! if there is none it takes the identity's (or account's) refresh lock,
//! looks again, and only then makes the request and publishes the result.
//! A replica that finds the lock taken polls for the holder's result; a
//! holder that died delays it by at most the lock's expiry. While Redis is
//! down the wrapped source is used as it is: tokens never depend on Redis.

use super::store::{unix_millis, StoredTokens, TokenStore};
use super::{fingerprint, BoxFuture, FreshToken, TokenError, TokenSource};
use crate::config::IdentityConfig;
use crate::secret::Secret;
use crate::state::{Record, SharedState, StateError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// How often a replica waiting for another's refresh looks for its result.
const POLL: Duration = Duration::from_millis(100);

/// What the fleet shares about tokens: the link and the key that seals.
pub struct SharedTokens {
    pub state: Arc<SharedState>,
    store: Arc<TokenStore>,
    /// Delegated accounts whose newest record may not be in Redis yet
    /// (written while it was down): written back when it returns.
    pending: Mutex<HashSet<(String, String)>>,
    /// Every delegated account this replica knows, for the write-back
    /// after Redis comes back (it may have lost everything).
    accounts: Mutex<HashSet<(String, String)>>,
    /// The key check failed once: said once.
    key_warned: std::sync::atomic::AtomicBool,
    /// Ends the write-back task when this is dropped (a reload that rebuilt
    /// the identities replaces it), rather than at Redis's next change.
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for SharedTokens {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An access token as Redis holds it (sealed).
#[derive(Serialize, Deserialize)]
struct AccessRecord {
    token: String,
    /// Unix milliseconds.
    expires_at: u64,
    /// Its lifetime when issued.
    lifetime_ms: u64,
    /// What it was issued for ([`grant`]): a replica whose identity of the
    /// same name now asks for something else (after a reload changed its
    /// scope, say) must not take it. Empty in records of earlier versions,
    /// which so are never taken.
    #[serde(default)]
    grant: String,
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.token.zeroize();
    }
}

fn access_aad(identity: &str, account: Option<&str>) -> Vec<u8> {
    format!("xoauth2-proxy access {identity}\0{}", account.unwrap_or("")).into_bytes()
}

const KEY_CHECK_AAD: &[u8] = b"xoauth2-proxy keycheck";
const KEY_CHECK_TEXT: &[u8] = b"replicas share one token_store key";

/// What decides a token's audience and rights: the token endpoint (so
/// authority and tenant), the application, the scope and the flow. Not the
/// secret: a rotated secret's predecessor's tokens stay good to their end.
fn grant(identity: &IdentityConfig) -> String {
    let text =
        format!("{}\0{}\0{}\0{}", identity.token_url, identity.client_id, identity.scope, identity.flow.as_str());
    crate::text::hex(&fingerprint(&text))
}

impl SharedTokens {
    pub fn new(state: Arc<SharedState>, store: Arc<TokenStore>) -> Arc<Self> {
        let shared = Arc::new(SharedTokens {
            state,
            store,
            pending: Mutex::default(),
            accounts: Mutex::default(),
            key_warned: Default::default(),
            stop: tokio_util::sync::CancellationToken::new(),
        });
        shared.clone().start_write_back();
        shared
    }

    /// Whether this replica's token-store key is the fleet's: the first
    /// replica to ask stores a value sealed with its key; the others must
    /// be able to open it. `None`: Redis is down.
    pub async fn key_matches(&self) -> Result<bool, StateError> {
        let sealed =
            self.store.seal_bytes(KEY_CHECK_AAD, KEY_CHECK_TEXT).map_err(|e| StateError::Failed(e.to_string()))?;
        let fleet = self.state.key_check(&sealed).await?;
        Ok(self.store.open_bytes(KEY_CHECK_AAD, fleet).is_some_and(|plain| plain.expose() == KEY_CHECK_TEXT))
    }

    fn undecryptable(&self, what: &str) {
        if !self.key_warned.swap(true, std::sync::atomic::Ordering::SeqCst) {
            error!(
                state.url = %self.state.url(),
                "a {what} in the shared state cannot be decrypted: every replica must use the same token_store key \
                 (key: ${{VAR}} or the same key_file); this replica ignores it"
            );
        }
    }

    /// The shared access token, if it has `need` left.
    async fn access(&self, identity: &str, account: Option<&str>) -> Result<Option<AccessRecord>, StateError> {
        let Some((_, sealed)) = self.state.get_record(Record::Access, identity, account).await? else {
            return Ok(None);
        };
        let Some(plain) = self.store.open_bytes(&access_aad(identity, account), sealed) else {
            self.undecryptable("token");
            return Ok(None);
        };
        Ok(serde_json::from_slice::<AccessRecord>(plain.expose()).ok())
    }

    async fn publish_access(
        &self,
        identity: &str,
        account: Option<&str>,
        grant: &str,
        fresh: &FreshToken,
    ) -> Result<(), StateError> {
        let now = unix_millis();
        let lifetime_ms = u64::try_from(fresh.expires_in.as_millis()).unwrap_or(u64::MAX);
        let record = AccessRecord {
            token: fresh.access_token.expose().clone(),
            expires_at: now.saturating_add(lifetime_ms),
            lifetime_ms,
            grant: grant.to_string(),
        };
        let plain = Secret::new(serde_json::to_vec(&record).map_err(|e| StateError::Failed(e.to_string()))?);
        let sealed = self
            .store
            .seal_bytes(&access_aad(identity, account), plain.expose())
            .map_err(|e| StateError::Failed(e.to_string()))?;
        // Newest wins by expiry: a replica publishing a token it had cached
        // cannot replace a later one.
        self.state
            .put_record(Record::Access, identity, account, record.expires_at, &sealed, Some(fresh.expires_in))
            .await?;
        Ok(())
    }

    /// Drops the shared access token if it is `token` (the upstream refused it).
    async fn withdraw_access(&self, identity: &str, account: Option<&str>, token: &[u8]) -> Result<(), StateError> {
        if let Some(record) = self.access(identity, account).await? {
            if fingerprint(&record.token) == token {
                // Only that version: a newer token published meanwhile stays.
                self.state.delete_record(Record::Access, identity, account, record.expires_at).await?;
            }
        }
        Ok(())
    }

    /// The delegated account's record in Redis.
    pub async fn load_refresh(&self, identity: &str, account: &str) -> Result<Option<StoredTokens>, StateError> {
        self.remember(identity, account);
        let Some((_, sealed)) = self.state.get_record(Record::Refresh, identity, Some(account)).await? else {
            return Ok(None);
        };
        match self.store.unseal(identity, account, sealed, Path::new("(shared state)")) {
            Ok(record) => Ok(Some(record)),
            Err(_) => {
                self.undecryptable("refresh token record");
                Ok(None)
            }
        }
    }

    /// Publishes a delegated account's record (newest wins); remembered for
    /// the write-back if Redis is away.
    pub async fn save_refresh(&self, record: &StoredTokens) -> Result<bool, StateError> {
        self.remember(&record.identity, &record.account);
        let key = (record.identity.clone(), record.account.clone());
        let sealed = self.store.seal(record).map_err(|e| StateError::Failed(e.to_string()))?;
        match self
            .state
            .put_record(Record::Refresh, &record.identity, Some(&record.account), record.order(), &sealed, None)
            .await
        {
            Ok(written) => {
                self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                Ok(written)
            }
            Err(e) => {
                self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
                Err(e)
            }
        }
    }

    fn remember(&self, identity: &str, account: &str) {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner()).insert((identity.to_string(), account.to_string()));
    }

    /// The newest of the local file and the shared record; the older copy
    /// is brought up to date (the file, so this replica can go on alone if
    /// Redis goes; Redis, so the fleet gets a token rotated while it was away).
    pub async fn newest(&self, identity: &str, account: &str) -> Result<Option<StoredTokens>, TokenError> {
        let local = self.store.load(identity, account)?;
        let shared = match self.load_refresh(identity, account).await {
            Ok(shared) => shared,
            Err(_) => return Ok(local),
        };
        match (local, shared) {
            (None, None) => Ok(None),
            (Some(local), None) => {
                let _ = self.save_refresh(&local).await;
                Ok(Some(local))
            }
            (None, Some(shared)) => {
                self.save_file(&shared);
                Ok(Some(shared))
            }
            (Some(local), Some(shared)) if local.order() > shared.order() => {
                let _ = self.save_refresh(&local).await;
                Ok(Some(local))
            }
            (Some(local), Some(shared)) => {
                if shared.order() > local.order() {
                    self.save_file(&shared);
                }
                Ok(Some(shared))
            }
        }
    }

    /// Brings the local file up to the fleet's record, so that this
    /// replica refreshes with the newest refresh token if Redis goes away.
    async fn sync_file(&self, identity: &str, account: &str) {
        let Ok(Some(shared)) = self.load_refresh(identity, account).await else { return };
        let local = self.store.load(identity, account).ok().flatten();
        if local.is_none_or(|l| shared.order() > l.order()) {
            self.save_file(&shared);
        }
    }

    fn save_file(&self, record: &StoredTokens) {
        if let Err(e) = self.store.save(record) {
            warn!(identity = %record.identity, account = %record.account, error = %e, "cannot keep the shared refresh token in the local store");
        }
    }

    /// When Redis comes back, every delegated account's local record is
    /// offered to it (newest wins): it may have lost them, and a token
    /// rotated meanwhile must not be lost.
    fn start_write_back(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let mut health = self.state.watch();
        let stop = self.stop.clone();
        drop(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = health.changed() => if changed.is_err() { return },
                }
                if !*health.borrow_and_update() {
                    continue;
                }
                let Some(shared) = weak.upgrade() else { return };
                shared.write_back().await;
            }
        });
    }

    /// Offers every known delegated account's local record to Redis.
    pub async fn write_back(&self) {
        let accounts: Vec<(String, String)> =
            self.accounts.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        let mut written = 0;
        for (identity, account) in &accounts {
            let local = match self.store.load(identity, account) {
                Ok(Some(local)) => local,
                Ok(None) => continue,
                Err(e) => {
                    warn!(identity, account, error = %e, "cannot read the local refresh token for the write-back");
                    continue;
                }
            };
            match self.save_refresh(&local).await {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(_) => return,
            }
        }
        if written > 0 {
            info!(accounts = written, "wrote refresh tokens back to the shared state (newer than what it had)");
        }
    }
}

/// An identity's source, shared across replicas.
pub struct SharedSource {
    inner: Arc<dyn TokenSource>,
    identity: String,
    /// [`grant`] of the identity's settings.
    grant: String,
    delegated: bool,
    min_lifetime: Duration,
    shared: Arc<SharedTokens>,
    /// Tokens the upstream refused: not taken from Redis again.
    refused: Mutex<HashMap<Option<String>, Vec<u8>>>,
}

impl SharedSource {
    pub fn new(
        inner: Arc<dyn TokenSource>,
        identity: &IdentityConfig,
        delegated: bool,
        shared: Arc<SharedTokens>,
    ) -> Self {
        SharedSource {
            inner,
            identity: identity.name.clone(),
            grant: grant(identity),
            delegated,
            min_lifetime: identity.min_token_lifetime,
            shared,
            refused: Mutex::default(),
        }
    }

    /// A shared token worth taking: with enough life left that this
    /// replica's cache hands it out and refreshes it as if it had obtained
    /// it itself (more than twice `min_token_lifetime` plus a minute, or
    /// more than half its lifetime for tokens shorter than that).
    fn worth_taking(&self, record: &AccessRecord, account: Option<&str>) -> Option<Duration> {
        let left = Duration::from_millis(record.expires_at.saturating_sub(unix_millis()));
        let lifetime = Duration::from_millis(record.lifetime_ms);
        let lead = (lifetime / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let enough = (self.min_lifetime * 2 + Duration::from_secs(60)).min(lifetime / 2 + lead);
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let was_refused = refused.get(&account.map(str::to_string)).is_some_and(|f| *f == fingerprint(&record.token));
        (left > enough && !was_refused && record.grant == self.grant).then_some(left)
    }

    async fn take_shared(&self, account: Option<&str>) -> Result<Option<FreshToken>, StateError> {
        let Some(record) = self.shared.access(&self.identity, account).await? else { return Ok(None) };
        Ok(self.worth_taking(&record, account).map(|left| FreshToken {
            access_token: Secret::new(record.token.clone()),
            expires_in: left,
            refresh_token: None,
        }))
    }

    async fn fetch_shared(&self, account: Option<&str>) -> Result<FreshToken, TokenError> {
        let state = &self.shared.state;
        // Bounded: past the lock's expiry a dead holder's lock is gone.
        let deadline = tokio::time::Instant::now() + state.refresh_lock + POLL * 5;
        let mut waited = false;
        loop {
            match self.take_shared(account).await {
                Ok(Some(fresh)) => {
                    debug!(identity = %self.identity, waited, "access token from the shared state");
                    if let Some(account) = account {
                        self.shared.sync_file(&self.identity, account).await;
                    }
                    return Ok(fresh);
                }
                Ok(None) => {}
                Err(_) => return self.inner.fetch(account).await,
            }
            match state.lock(&self.identity, account).await {
                Ok(Some(lock)) => {
                    // Someone may have finished between the look and the lock.
                    if let Ok(Some(fresh)) = self.take_shared(account).await {
                        let _ = state.unlock(lock).await;
                        return Ok(fresh);
                    }
                    let result = self.inner.fetch(account).await;
                    if let Ok(fresh) = &result {
                        if let Err(e) = self.shared.publish_access(&self.identity, account, &self.grant, fresh).await {
                            debug!(identity = %self.identity, error = %e, "access token not shared");
                        }
                    }
                    let _ = state.unlock(lock).await;
                    return result;
                }
                Ok(None) => {
                    waited = true;
                    if tokio::time::Instant::now() >= deadline {
                        warn!(identity = %self.identity, "the shared refresh lock outlived its expiry; refreshing here");
                        return self.inner.fetch(account).await;
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(_) => return self.inner.fetch(account).await,
            }
        }
    }
}

impl TokenSource for SharedSource {
    fn fetch<'a>(&'a self, account: Option<&'a str>) -> BoxFuture<'a, Result<FreshToken, TokenError>> {
        let account = if self.delegated { account } else { None };
        Box::pin(async move {
            if self.delegated && account.is_none() {
                return Err(TokenError::NoAccount);
            }
            if !self.shared.state.is_up() {
                return self.inner.fetch(account).await;
            }
            self.fetch_shared(account).await
        })
    }

    fn refused(&self, account: Option<&str>, token: &str) {
        let account = if self.delegated { account } else { None };
        self.inner.refused(account, token);
        let print = fingerprint(token);
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).insert(account.map(str::to_string), print.clone());
        let (shared, identity, account) = (self.shared.clone(), self.identity.clone(), account.map(str::to_string));
        tokio::spawn(async move {
            let _ = shared.withdraw_access(&identity, account.as_deref(), &print).await;
        });
    }
}
