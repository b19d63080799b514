//! The token cache: one slot per [`TokenKey`], single-flight requests,
//! refresh in the background before a token gets too old to hand out,
//! jittered exponential backoff while the endpoint fails, and the still-valid
//! token served meanwhile. Identities can be replaced while running (a
//! reload): see [`TokenManager::apply`].

use super::{AccessToken, TokenError, TokenKey, TokenSource};
use dashmap::DashMap;
use rand::RngExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// First retry delay after a failed request; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

struct IdentityEntry {
    /// Replaced in place when only what surrounds the identity changes (its
    /// CA roots, the token store, the re-authorisation hook): cached tokens stay.
    source: RwLock<Arc<dyn TokenSource>>,
    min_lifetime: Duration,
    /// Tokens are per account (refresh tokens), not per identity.
    delegated: bool,
    /// Digests of the identity's own settings and of its surroundings, to
    /// tell at a reload what changed (see [`IdentityPlan`]).
    settings: Vec<u8>,
    environment: Vec<u8>,
    metrics: Option<crate::metrics::TokenMetrics>,
}

impl IdentityEntry {
    fn source(&self) -> Arc<dyn TokenSource> {
        self.source.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Below this much life left, a token is not handed out when a new one can be had.
    fn threshold(&self, token: &AccessToken) -> Duration {
        self.min_lifetime.min(token.lifetime() / 2)
    }

    /// While the endpoint fails, a token is handed out until it is this close
    /// to expiry: a valid token is better than no login (DESIGN.md).
    fn floor(token: &AccessToken) -> Duration {
        Duration::from_secs(5).min(token.lifetime() / 10)
    }

    /// When the background refresh should replace `token`: a little before it
    /// reaches the threshold, so no client ever waits for a request; but not
    /// before half its life, so very short-lived tokens cannot cause a storm.
    fn refresh_at(&self, token: &AccessToken) -> Instant {
        let lead = (token.lifetime() / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let issued = token.expires_at().checked_sub(token.lifetime()).unwrap_or_else(Instant::now);
        let early = token.expires_at().checked_sub(self.threshold(token) + lead).unwrap_or(issued);
        early.max(issued + token.lifetime() / 2)
    }
}

#[derive(Default)]
struct SlotState {
    current: Option<AccessToken>,
    /// Completed requests, so a caller can tell whether one finished while it waited.
    attempts: u64,
    failures: u32,
    /// When the background refresh tries again after a failure.
    retry_at: Option<Instant>,
    last_error: Option<TokenError>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// Held while a request is in flight: later callers wait, then reuse its result.
    fetching: tokio::sync::Mutex<()>,
    refresher: AtomicBool,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, entry: &IdentityEntry) -> Option<AccessToken> {
        let state = self.state();
        state.current.as_ref().filter(|t| t.remaining() > entry.threshold(t)).cloned()
    }

    /// The cached token, if it can still serve while the endpoint fails.
    fn fallback(&self) -> Option<AccessToken> {
        let state = self.state();
        state.current.as_ref().filter(|t| t.remaining() > IdentityEntry::floor(t)).cloned()
    }

    /// The last error while the endpoint is in its backoff: callers share it
    /// instead of each asking the failing endpoint again. For a delegated
    /// account, a refusal that needs a human (`login` again) is not waited
    /// out: its source answers that from the store without a request, and
    /// picks up a new sign-in at once.
    fn backing_off(&self, entry: &IdentityEntry) -> Option<TokenError> {
        let state = self.state();
        match (state.retry_at, &state.last_error) {
            (Some(_), Some(error)) if entry.delegated && error.requires_reauthorization() => None,
            (Some(at), Some(error)) if Instant::now() < at => Some(error.clone()),
            _ => None,
        }
    }

    /// The error of a request that completed since `seen`: a caller that
    /// waited for that request shares its outcome instead of repeating it.
    fn failed_since(&self, seen: u64) -> Option<TokenError> {
        let state = self.state();
        if state.attempts != seen {
            state.last_error.clone()
        } else {
            None
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let exp = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(8));
    let base = exp.min(MAX_BACKOFF);
    // ±20% so that many proxies (or accounts) do not retry in step.
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// Makes one request for `key` and records the outcome in `slot`. The caller
/// holds `slot.fetching`.
async fn fetch_into(key: &TokenKey, slot: &Slot, entry: &IdentityEntry) -> Result<AccessToken, TokenError> {
    let fetched = entry.source().fetch(key.account.as_deref()).await;
    if let Some(metrics) = &entry.metrics {
        metrics.request(fetched.as_ref().map(|_| ()));
    }
    match fetched {
        Ok(fresh) => {
            let token = AccessToken::new(fresh.access_token, fresh.expires_in);
            tracing::info!(token.key = %key, expires_in = ?fresh.expires_in, "obtained an access token");
            let mut state = slot.state();
            state.current = Some(token.clone());
            state.attempts += 1;
            state.failures = 0;
            state.retry_at = None;
            state.last_error = None;
            Ok(token)
        }
        Err(e) => {
            let mut state = slot.state();
            state.attempts += 1;
            state.failures += 1;
            let delay = backoff(state.failures);
            state.retry_at = Some(Instant::now() + delay);
            let repeated = state.last_error.as_ref().is_some_and(|last| last.to_string() == e.to_string());
            state.last_error = Some(e.clone());
            if !repeated {
                tracing::warn!(token.key = %key, error = %e, retry_in = ?delay, "token request failed");
            }
            Err(e)
        }
    }
}

struct Inner {
    identities: RwLock<HashMap<String, Arc<IdentityEntry>>>,
    slots: DashMap<TokenKey, Arc<Slot>>,
    /// By key, so the refreshers of a replaced identity can be stopped.
    refreshers: Mutex<HashMap<TokenKey, AbortHandle>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, task) in self.refreshers.get_mut().unwrap_or_else(|e| e.into_inner()).drain() {
            task.abort();
        }
    }
}

/// What a reload wants for one identity: its settings' digests and, when
/// they differ from the running entry's, a source built for them.
pub struct IdentityPlan {
    pub name: String,
    pub settings: Vec<u8>,
    pub environment: Vec<u8>,
    pub min_lifetime: Duration,
    pub delegated: bool,
    /// `None`: keep the running entry's source (nothing it depends on changed).
    pub source: Option<Arc<dyn TokenSource>>,
}

/// What [`TokenManager::apply`] did, by identity name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    /// Its own settings changed: a new source, its cached tokens dropped.
    pub replaced: Vec<String>,
    /// Only its surroundings changed: a new source, its tokens kept.
    pub rewired: Vec<String>,
    pub kept: Vec<String>,
    pub removed: Vec<String>,
}

/// Hands out access tokens; cheap to clone.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

#[derive(Default)]
pub struct TokenManagerBuilder {
    identities: HashMap<String, Arc<IdentityEntry>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl TokenManagerBuilder {
    /// Registers the source for `identity`. A cached token is handed out only
    /// while it has more than `min_lifetime` left (or half its lifetime, for
    /// tokens issued with less than that in total). `delegated` sources hold
    /// one token per account.
    pub fn add_identity(
        &mut self,
        identity: &str,
        source: Arc<dyn TokenSource>,
        min_lifetime: Duration,
        delegated: bool,
    ) -> &mut Self {
        let entry = IdentityEntry {
            source: RwLock::new(source),
            min_lifetime,
            delegated,
            settings: Vec::new(),
            environment: Vec::new(),
            metrics: None,
        };
        self.identities.insert(identity.to_string(), Arc::new(entry));
        self
    }

    /// Counts token requests per identity in `metrics`.
    pub fn metrics(&mut self, metrics: Arc<crate::metrics::Metrics>) -> &mut Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn build(&mut self) -> TokenManager {
        let metrics = self.metrics.take();
        let identities = std::mem::take(&mut self.identities)
            .into_iter()
            .map(|(name, entry)| {
                let entry = match (&metrics, Arc::try_unwrap(entry)) {
                    (Some(m), Ok(mut e)) => {
                        e.metrics = Some(m.identity(&name));
                        Arc::new(e)
                    }
                    (_, Ok(e)) => Arc::new(e),
                    (_, Err(shared)) => shared,
                };
                (name, entry)
            })
            .collect();
        TokenManager {
            inner: Arc::new(Inner {
                identities: RwLock::new(identities),
                slots: DashMap::new(),
                refreshers: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }
}

impl TokenManager {
    pub fn builder() -> TokenManagerBuilder {
        TokenManagerBuilder::default()
    }

    fn entry(&self, identity: &str) -> Option<Arc<IdentityEntry>> {
        self.inner.identities.read().unwrap_or_else(|e| e.into_inner()).get(identity).cloned()
    }

    /// The cache key for an account of `identity`.
    pub fn key_for(&self, identity: &str, account: &str) -> TokenKey {
        let delegated = self.entry(identity).is_some_and(|e| e.delegated);
        TokenKey { identity: identity.into(), account: delegated.then(|| account.into()) }
    }

    /// The digests of a running identity's settings and surroundings.
    pub fn digests(&self, identity: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        self.entry(identity).map(|e| (e.settings.clone(), e.environment.clone()))
    }

    /// Makes the identities those of `plans`, in place: an identity whose
    /// settings are unchanged keeps its cached tokens (and, if nothing
    /// around it changed either, its source); one whose settings changed
    /// starts afresh (its tokens dropped, its background refreshes stopped);
    /// identities not in `plans` are removed. Logins already waiting for a
    /// token finish with the entry they started with.
    pub fn apply(&self, plans: Vec<IdentityPlan>) -> Applied {
        let mut applied = Applied::default();
        let mut fresh = HashMap::new();
        let mut identities = self.inner.identities.write().unwrap_or_else(|e| e.into_inner());
        for plan in plans {
            let current = identities.get(&plan.name).cloned();
            let same = current.as_ref().filter(|e| e.settings == plan.settings && e.delegated == plan.delegated);
            let entry = match (same, plan.source) {
                (Some(entry), None) => {
                    applied.kept.push(plan.name.clone());
                    entry.clone()
                }
                (Some(entry), Some(source)) => {
                    *entry.source.write().unwrap_or_else(|e| e.into_inner()) = source;
                    applied.rewired.push(plan.name.clone());
                    entry.clone()
                }
                (None, source) => {
                    let source = match (source, &current) {
                        (Some(s), _) => s,
                        // A plan always brings a source for new or changed settings;
                        // without one the old source is the only one there is.
                        (None, Some(old)) => old.source(),
                        (None, None) => continue,
                    };
                    if current.is_some() {
                        applied.replaced.push(plan.name.clone());
                    } else {
                        applied.added.push(plan.name.clone());
                    }
                    Arc::new(IdentityEntry {
                        source: RwLock::new(source),
                        min_lifetime: plan.min_lifetime,
                        delegated: plan.delegated,
                        settings: plan.settings,
                        environment: plan.environment,
                        metrics: self.inner.metrics.as_ref().map(|m| m.identity(&plan.name)),
                    })
                }
            };
            fresh.insert(plan.name, entry);
        }
        applied.removed = identities.keys().filter(|name| !fresh.contains_key(*name)).cloned().collect();
        applied.removed.sort();
        let dropped: Vec<&String> = applied.replaced.iter().chain(&applied.removed).collect();
        *identities = fresh;
        drop(identities);
        if !dropped.is_empty() {
            self.inner.slots.retain(|key, _| !dropped.iter().any(|name| **name == *key.identity));
            let mut refreshers = self.inner.refreshers.lock().unwrap_or_else(|e| e.into_inner());
            refreshers.retain(|key, task| {
                let stop = dropped.iter().any(|name| **name == *key.identity);
                if stop {
                    task.abort();
                }
                !stop
            });
        }
        applied
    }

    fn slot(&self, key: &TokenKey) -> Arc<Slot> {
        if let Some(slot) = self.inner.slots.get(key) {
            return slot.clone();
        }
        self.inner.slots.entry(key.clone()).or_default().clone()
    }

    /// A token for `key` with enough life left. Requests one if needed (one
    /// request at a time per key); while the endpoint fails, hands out the
    /// cached token as long as it is still comfortably valid.
    pub async fn get(&self, key: &TokenKey) -> Result<AccessToken, TokenError> {
        let entry = self.entry(&key.identity).ok_or_else(|| TokenError::UnknownIdentity(key.identity.to_string()))?;
        let slot = self.slot(key);
        if let Some(token) = slot.usable(&entry) {
            return Ok(token);
        }
        let seen = slot.state().attempts;
        let result = match slot.backing_off(&entry) {
            // At most one request per backoff step, whoever asks.
            Some(error) => Err(error),
            None => {
                let _in_flight = slot.fetching.lock().await;
                if let Some(token) = slot.usable(&entry) {
                    return Ok(token);
                }
                match slot.failed_since(seen).or_else(|| slot.backing_off(&entry)) {
                    Some(error) => Err(error),
                    None => fetch_into(key, &slot, &entry).await,
                }
            }
        };
        let result = result.or_else(|e| match slot.fallback() {
            Some(token) => {
                tracing::warn!(token.key = %key, remaining = ?token.remaining(), "token endpoint failing; using the cached token");
                Ok(token)
            }
            None => Err(e),
        });
        if result.is_ok() {
            self.start_refresher(key, &slot, &entry);
        }
        result
    }

    /// How many cached tokens are still valid ("warm"), for the status line.
    pub fn valid_tokens(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|slot| slot.state().current.as_ref().is_some_and(|t| !t.remaining().is_zero()))
            .count()
    }

    /// The time left of every cached token, by identity and account (`""`
    /// for app-only identities), for the metrics.
    pub fn lifetimes(&self) -> Vec<(String, String, Duration)> {
        let mut out: Vec<_> = self
            .inner
            .slots
            .iter()
            .filter_map(|slot| {
                let remaining = slot.state().current.as_ref()?.remaining();
                let key = slot.key();
                Some((key.identity.to_string(), key.account.as_deref().unwrap_or("").to_string(), remaining))
            })
            .collect();
        out.sort();
        out
    }

    /// Whether every identity holds a usable token or can get one: its
    /// last request did not fail, or a token it holds can still serve. An
    /// identity no login has needed yet counts as able (its first login
    /// asks for its token). The error names the identity (and account) and
    /// the endpoint's last error, in one line.
    pub fn readiness(&self) -> Result<(), String> {
        let mut failing: Vec<(TokenKey, String)> = self
            .inner
            .slots
            .iter()
            .filter_map(|slot| {
                if slot.fallback().is_some() {
                    return None;
                }
                let error = slot.state().last_error.as_ref()?.to_string();
                Some((slot.key().clone(), error))
            })
            .collect();
        failing.sort_by_key(|a| a.0.to_string());
        let Some((key, error)) = failing.first() else { return Ok(()) };
        let who = match &key.account {
            Some(account) => format!("identity {} account {account}", key.identity),
            None => format!("identity {}", key.identity),
        };
        let more = match failing.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        Err(format!("{who}: token endpoint failing: {}{more}", error.replace(['\n', '\r'], " ")))
    }

    /// Forgets `token` if it is still the cached one for `key`: the upstream
    /// refused it, so the next [`get`](Self::get) must fetch a new one.
    pub fn invalidate(&self, key: &TokenKey, token: &AccessToken) {
        if let Some(slot) = self.inner.slots.get(key) {
            let mut state = slot.state();
            if state.current.as_ref().is_some_and(|c| c.same_as(token)) {
                state.current = None;
                state.retry_at = None;
            }
            drop(state);
            if let Some(entry) = self.entry(&key.identity) {
                entry.source().refused(key.account.as_deref(), token.expose());
            }
        }
    }

    /// Keeps `key`'s token fresh from now on, whether or not clients ask.
    fn start_refresher(&self, key: &TokenKey, slot: &Arc<Slot>, entry: &Arc<IdentityEntry>) {
        // A login that started before a reload replaced its identity holds a
        // slot that is no longer the key's: nothing refreshes that one.
        if !self.inner.slots.get(key).is_some_and(|current| Arc::ptr_eq(&current, slot)) {
            return;
        }
        if slot.refresher.swap(true, Ordering::SeqCst) {
            return;
        }
        let (key, slot, entry) = (key.clone(), slot.clone(), entry.clone());
        let (task_key, task) = (
            key.clone(),
            tokio::spawn(async move {
                loop {
                    let wake = {
                        let state = slot.state();
                        match (state.retry_at, &state.current) {
                            (Some(at), _) => at,
                            (None, Some(token)) => entry.refresh_at(token),
                            (None, None) => Instant::now(),
                        }
                    };
                    tokio::time::sleep_until(wake).await;
                    let _in_flight = slot.fetching.lock().await;
                    let due = {
                        let state = slot.state();
                        let now = Instant::now();
                        match (state.retry_at, &state.current) {
                            (Some(at), _) => now >= at,
                            (None, Some(token)) => now >= entry.refresh_at(token),
                            (None, None) => true,
                        }
                    };
                    if due {
                        let _ = fetch_into(&key, &slot, &entry).await;
                    }
                }
            }),
        );
        if let Some(old) =
            self.inner.refreshers.lock().unwrap_or_else(|e| e.into_inner()).insert(task_key, task.abort_handle())
        {
            old.abort();
        }
    }

    /// Obtains tokens for `keys` now, in the background, so their refresh
    /// starts without waiting for a client (delegated accounts: this keeps
    /// refresh tokens in use, so they do not expire for inactivity).
    ///
    /// The refresh keeps trying even when the first attempt fails, so an
    /// account that is signed in with `login` while the proxy runs is picked
    /// up within a minute, without waiting for a client.
    ///
    /// Keys that already have a slot (asked for before, e.g. before a
    /// reload) are left as they are.
    pub fn warm_up(&self, keys: Vec<TokenKey>) {
        for key in keys {
            if self.inner.slots.contains_key(&key) {
                continue;
            }
            let manager = self.clone();
            tokio::spawn(async move {
                if let Err(e) = manager.get(&key).await {
                    tracing::warn!(token.key = %key, error = %e, "no access token at start");
                }
                if let Some(entry) = manager.entry(&key.identity) {
                    let slot = manager.slot(&key);
                    manager.start_refresher(&key, &slot, &entry);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::token::{BoxFuture, FreshToken};
    use std::sync::atomic::AtomicUsize;

    struct Scripted {
        calls: AtomicUsize,
        lifetime: Duration,
        delay: Duration,
        down: AtomicBool,
    }

    impl TokenSource for Scripted {
        fn fetch<'a>(&'a self, account: Option<&'a str>) -> BoxFuture<'a, Result<FreshToken, TokenError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                if self.down.load(Ordering::SeqCst) {
                    return Err(TokenError::Unreachable("down".into()));
                }
                Ok(FreshToken {
                    access_token: Secret::new(format!(
                        "token-{n}{}",
                        account.map(|a| format!("-{a}")).unwrap_or_default()
                    )),
                    expires_in: self.lifetime,
                    refresh_token: None,
                })
            })
        }
    }

    fn manager(lifetime: Duration, delay: Duration, delegated: bool) -> (TokenManager, Arc<Scripted>) {
        let source = Arc::new(Scripted { calls: AtomicUsize::new(0), lifetime, delay, down: AtomicBool::new(false) });
        let m = TokenManager::builder()
            .add_identity("contoso", source.clone(), Duration::from_secs(600), delegated)
            .build();
        (m, source)
    }

    fn calls(s: &Scripted) -> usize {
        s.calls.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_request() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::from_millis(200), false);
        let key = m.key_for("contoso", "printer");
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (m, key) = (m.clone(), key.clone());
                tokio::spawn(async move { m.get(&key).await.map(|t| t.expose().to_string()) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "token-1");
        }
        assert_eq!(calls(&source), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delegated_identities_have_one_token_per_account() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::ZERO, true);
        let a = m.key_for("contoso", "alice");
        let b = m.key_for("contoso", "bob");
        assert_ne!(a, b);
        assert_eq!(m.get(&a).await.unwrap().expose(), "token-1-alice");
        assert_eq!(m.get(&b).await.unwrap().expose(), "token-2-bob");
        assert_eq!(m.get(&a).await.unwrap().expose(), "token-1-alice");
        assert_eq!(calls(&source), 2);
        let (app, _) = manager(Duration::from_secs(3600), Duration::ZERO, false);
        assert_eq!(app.key_for("contoso", "alice"), app.key_for("contoso", "bob"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_background_refresh_replaces_a_token_before_clients_would_wait() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::ZERO, false);
        let key = TokenKey::app("contoso");
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        // Refresh is due 600s (threshold) + 60s (lead) before expiry.
        tokio::time::sleep(Duration::from_secs(3600 - 661)).await;
        assert_eq!(calls(&source), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(calls(&source), 2);
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-2");
        // And it keeps going, one request per cycle.
        tokio::time::sleep(Duration::from_secs(3 * 2940)).await;
        assert_eq!(calls(&source), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_are_used_for_about_half_their_life() {
        let (m, source) = manager(Duration::from_secs(60), Duration::ZERO, false);
        let key = TokenKey::app("contoso");
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-2");
        assert_eq!(calls(&source), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tiny_lifetimes_cannot_cause_a_refresh_storm() {
        let (m, source) = manager(Duration::from_secs(2), Duration::ZERO, false);
        m.get(&TokenKey::app("contoso")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(calls(&source) <= 11, "{}", calls(&source));
    }

    #[tokio::test(start_paused = true)]
    async fn a_valid_token_is_served_while_the_endpoint_is_down() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::ZERO, false);
        let key = TokenKey::app("contoso");
        m.get(&key).await.unwrap();
        source.down.store(true, Ordering::SeqCst);
        // Past the refresh point and past the threshold: still served while valid.
        tokio::time::sleep(Duration::from_secs(3600 - 10)).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-1");
        let failed_so_far = calls(&source);
        assert!(failed_so_far >= 3, "the background refresh retried with backoff ({failed_so_far})");
        // Backoff is bounded: from 2940s to 3590s, at most one attempt per 48s (60s - 20%) after the ramp.
        assert!(failed_so_far <= 1 + 5 + 650 / 48 + 1, "{failed_so_far}");
        // Within 5 s of expiry, the failure reaches the caller.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(matches!(m.get(&key).await, Err(TokenError::Unreachable(_))));
        // The endpoint recovers: within one backoff period a token is back.
        source.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(MAX_BACKOFF + MAX_BACKOFF / 5).await;
        assert!(m.get(&key).await.unwrap().expose().starts_with("token-"));
    }

    #[tokio::test(start_paused = true)]
    async fn callers_waiting_on_a_failed_request_share_its_error() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::from_secs(3), false);
        source.down.store(true, Ordering::SeqCst);
        let key = TokenKey::app("contoso");
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (m, key) = (m.clone(), key.clone());
                tokio::spawn(async move { m.get(&key).await.is_err() })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap());
        }
        assert_eq!(calls(&source), 1, "one request failed for all of them");
        // Callers during the backoff share the error at once, without a request.
        source.down.store(false, Ordering::SeqCst);
        for _ in 0..100 {
            assert!(matches!(m.get(&key).await, Err(TokenError::Unreachable(_))));
        }
        assert_eq!(calls(&source), 1, "logins during the backoff do not reach the endpoint");
        // After it, the next caller tries again and succeeds now that the endpoint is back.
        tokio::time::sleep(MAX_BACKOFF + MAX_BACKOFF / 5).await;
        assert_eq!(m.get(&key).await.unwrap().expose(), "token-2");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_a_cap() {
        let delays: Vec<Duration> = (1..=8).map(backoff).collect();
        assert!(delays[0] >= Duration::from_secs(4) && delays[0] <= Duration::from_secs(6));
        assert!(delays[2] >= Duration::from_secs(16) && delays[2] <= Duration::from_secs(24));
        assert!(delays[7] <= Duration::from_secs(72));
    }

    #[tokio::test(start_paused = true)]
    async fn warm_up_keeps_trying_until_the_source_works() {
        let (m, source) = manager(Duration::from_secs(3600), Duration::ZERO, true);
        source.down.store(true, Ordering::SeqCst);
        let key = m.key_for("contoso", "alice");
        m.warm_up(vec![key.clone()]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(calls(&source), 1);
        // Nobody logs in; the account becomes usable (someone ran `login`).
        source.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(MAX_BACKOFF + MAX_BACKOFF / 5).await;
        let before = calls(&source);
        assert!(before >= 2);
        assert!(m.get(&key).await.unwrap().expose().starts_with("token-"));
        assert_eq!(calls(&source), before, "the background refresh had a token ready");
    }

    #[tokio::test(start_paused = true)]
    async fn valid_tokens_counts_cached_tokens_until_they_expire() {
        let (m, source) = manager(Duration::from_secs(60), Duration::ZERO, true);
        assert_eq!(m.valid_tokens(), 0);
        m.get(&m.key_for("contoso", "alice")).await.unwrap();
        m.get(&m.key_for("contoso", "bob")).await.unwrap();
        assert_eq!(m.valid_tokens(), 2);
        // The endpoint goes down: no refresh succeeds, and the tokens expire.
        source.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(m.valid_tokens(), 0);
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
        assert_eq!(calls(&source), 2);
        assert!(matches!(m.get(&TokenKey::app("other")).await, Err(TokenError::UnknownIdentity(_))));
    }

    fn plan(name: &str, settings: &[u8], environment: &[u8], source: Option<Arc<Scripted>>) -> IdentityPlan {
        IdentityPlan {
            name: name.into(),
            settings: settings.to_vec(),
            environment: environment.to_vec(),
            min_lifetime: Duration::from_secs(600),
            delegated: false,
            source: source.map(|s| s as Arc<dyn TokenSource>),
        }
    }

    fn scripted() -> Arc<Scripted> {
        Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            lifetime: Duration::from_secs(3600),
            delay: Duration::ZERO,
            down: AtomicBool::new(false),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn apply_keeps_rewires_replaces_and_removes_identities() {
        let m = TokenManager::builder().build();
        let (a, b, c) = (scripted(), scripted(), scripted());
        let applied = m.apply(vec![plan("a", b"1", b"x", Some(a.clone())), plan("b", b"1", b"x", Some(b.clone()))]);
        assert_eq!(applied.added, ["a", "b"]);
        let (ka, kb) = (TokenKey::app("a"), TokenKey::app("b"));
        assert_eq!(m.get(&ka).await.unwrap().expose(), "token-1");
        assert_eq!(m.get(&kb).await.unwrap().expose(), "token-1");
        // a: only its surroundings change (new source, token kept); b: its
        // settings change (new source, token dropped); c: new.
        let (a2, b2) = (scripted(), scripted());
        let applied = m.apply(vec![
            plan("a", b"1", b"y", Some(a2.clone())),
            plan("b", b"2", b"x", Some(b2.clone())),
            plan("c", b"1", b"x", Some(c.clone())),
        ]);
        assert_eq!(
            applied,
            Applied {
                added: vec!["c".into()],
                replaced: vec!["b".into()],
                rewired: vec!["a".into()],
                kept: vec![],
                removed: vec![]
            }
        );
        assert_eq!(m.get(&ka).await.unwrap().expose(), "token-1", "a keeps its token");
        assert_eq!(calls(&a2), 0);
        assert_eq!(m.get(&kb).await.unwrap().expose(), "token-1", "b's new source issued it");
        assert_eq!((calls(&b), calls(&b2)), (1, 1));
        // The background refresh of a uses its new source.
        tokio::time::sleep(Duration::from_secs(3600 - 600)).await;
        assert_eq!((calls(&a), calls(&a2)), (1, 1));
        // Unchanged: kept as is; absent: removed.
        let applied = m.apply(vec![plan("a", b"1", b"y", None)]);
        assert_eq!((applied.kept, applied.removed), (vec!["a".to_string()], vec!["b".to_string(), "c".to_string()]));
        assert!(matches!(m.get(&kb).await, Err(TokenError::UnknownIdentity(_))));
        assert_eq!(m.lifetimes().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_names_the_identity_whose_last_request_failed() {
        let (m, source) = manager(Duration::from_secs(60), Duration::ZERO, true);
        assert_eq!(m.readiness(), Ok(()), "nothing asked yet");
        m.get(&m.key_for("contoso", "alice")).await.unwrap();
        assert_eq!(m.readiness(), Ok(()));
        source.down.store(true, Ordering::SeqCst);
        // While the token is usable, a failing refresh does not matter.
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(m.readiness(), Ok(()));
        assert!(m.get(&m.key_for("contoso", "bob")).await.is_err());
        assert_eq!(
            m.readiness(),
            Err("identity contoso account bob: token endpoint failing: token endpoint unreachable: down".into())
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        let both = m.readiness().unwrap_err();
        assert!(both.starts_with("identity contoso account alice: ") && both.ends_with(" (and 1 more)"), "{both}");
        source.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(MAX_BACKOFF + MAX_BACKOFF / 5).await;
        m.get(&m.key_for("contoso", "bob")).await.unwrap();
        assert_eq!(m.readiness(), Ok(()), "alice's refresher and bob's login both recovered");
    }
}
