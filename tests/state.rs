//! The shared state (`state:`) against a real, private redis-server: tokens
//! shared by replicas (one request for the fleet, rotation seen by all,
//! nothing in the clear), the refresh lock's expiry, session leases with
//! their FIFO queue and expiry, shared failure counts, and what happens when
//! Redis goes away and comes back.
//!
//! Each "replica" is a token manager built from its own config and its own
//! token-store directory, sharing the key and the Redis, as replicas in
//! separate processes would.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::redis::RedisServer;
use testkit::TokenServer;
use xoauth2_proxy::config::Config;
use xoauth2_proxy::protocol::Protocol;
use xoauth2_proxy::state::{SharedState, SlotAnswer};
use xoauth2_proxy::token::store::{unix_now, StoredTokens, TokenStore};
use xoauth2_proxy::token::TokenManager;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn config_text(token: &TokenServer, redis: &str, dir: &Path, flow: &str, extra_state: &str) -> String {
    format!(
        r#"
listeners:
  - {{name: imap, protocol: imap, bind: "127.0.0.1:0", upstream: "localhost:993"}}
identities:
  contoso:
    authority: {authority}
    tenant: {tenant}
    client_id: {client_id}
    client_secret: {secret}
    flow: {flow}
    token_timeout: 2s
accounts:
  - {{username: printer, password: pw, mailbox: scanner@contoso.example, identity: contoso}}
token_store: {{path: "{store}", key: "{KEY}"}}
state: {{backend: redis, url: "{redis}", prefix: test, timeout: 500ms, refresh_lock: 3s, session_lease: 3s{extra_state}}}
"#,
        authority = token.authority(),
        tenant = testkit::token::TENANT,
        client_id = testkit::token::CLIENT_ID,
        secret = testkit::token::CLIENT_SECRET,
        store = dir.join("store").display(),
    )
}

struct Replica {
    tokens: TokenManager,
    state: Arc<SharedState>,
    config: Config,
    _dir: tempfile::TempDir,
}

async fn replica(token: &TokenServer, redis: &str, flow: &str) -> Replica {
    replica_from(token, redis, flow, |text| text).await
}

/// A replica whose config text `edit` changed first.
async fn replica_from(token: &TokenServer, redis: &str, flow: &str, edit: impl FnOnce(String) -> String) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let text = edit(config_text(token, redis, dir.path(), flow, ""));
    let config = Config::parse(&text, &dir.path().join("c.yaml"), &HashMap::new()).unwrap();
    xoauth2_proxy::tls::install_default_provider();
    let tls = xoauth2_proxy::tls::client_config(None).unwrap();
    let state = SharedState::connect(config.state.as_ref().unwrap()).await.unwrap();
    let ctx = xoauth2_proxy::token::shared_context_for(&config, tls, Some(state.clone())).unwrap();
    let tokens = xoauth2_proxy::token::manager_with(&config, ctx).unwrap();
    Replica { tokens, state, config, _dir: dir }
}

impl Replica {
    fn store(&self) -> TokenStore {
        TokenStore::open(self.config.token_store.as_ref().unwrap()).unwrap()
    }

    fn seed(&self, rt: &str) {
        self.store()
            .save(&StoredTokens {
                identity: "contoso".into(),
                account: "printer".into(),
                refresh_token: rt.into(),
                access_token: None,
                access_expires_at: None,
                updated_at: unix_now(),
                version: 0,
            })
            .unwrap();
    }

    async fn token(&self) -> String {
        let key = self.tokens.key_for("contoso", "printer");
        self.tokens.get(&key).await.unwrap().expose().to_string()
    }
}

async fn until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

macro_rules! redis_or_skip {
    () => {
        match RedisServer::start() {
            Some(r) => r,
            None => return,
        }
    };
}

#[tokio::test]
async fn replaced_shared_tokens_leave_no_task_behind() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let r = replica(&token, &redis.url(), "client_credentials").await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    // What a reload that rebuilds the identities does, five times over.
    for _ in 0..5 {
        drop(xoauth2_proxy::token::shared::SharedTokens::new(r.state.clone(), Arc::new(r.store())));
    }
    until("the replaced write-back tasks to end", Duration::from_secs(5), async || metrics.num_alive_tasks() <= before)
        .await;
}

#[tokio::test]
async fn concurrent_first_logins_on_three_replicas_make_one_token_request() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    token.set_fault(Some(testkit::Fault::Delay(Duration::from_millis(300))));
    let replicas = [
        replica(&token, &redis.url(), "client_credentials").await,
        replica(&token, &redis.url(), "client_credentials").await,
        replica(&token, &redis.url(), "client_credentials").await,
    ];
    let mut tasks = Vec::new();
    for i in 0..90 {
        let tokens = replicas[i % 3].tokens.clone();
        tasks.push(tokio::spawn(async move {
            let key = tokens.key_for("contoso", "printer");
            tokens.get(&key).await.unwrap().expose().to_string()
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(token.requests(), 1, "one token request for the whole fleet");
    assert_eq!(seen.len(), 1, "every replica uses the same token");
    // Redis holds it sealed: the token text is nowhere in its keys or values.
    let issued = token.issued();
    let dump = redis.command(&["HGET", "test:at:contoso", "data"]);
    assert!(dump.len() > 100, "{dump}");
    assert!(!dump.contains(&issued[0][..40]), "the access token is in Redis in the clear");
}

#[tokio::test]
async fn a_replica_whose_identity_asks_for_another_scope_gets_its_own_token() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let first = replica(&token, &redis.url(), "client_credentials").await;
    let same = replica(&token, &redis.url(), "client_credentials").await;
    // The same identity name, as a reload that changed the scope leaves it.
    let other = replica_from(&token, &redis.url(), "client_credentials", |text| {
        text.replace(
            "    token_timeout: 2s\n",
            "    token_timeout: 2s\n    scope: https://outlook.office.com/.default\n",
        )
    })
    .await;
    let shared = first.token().await;
    assert!(same.token().await == shared, "the same settings did not take the fleet's token");
    assert_eq!(token.requests(), 1);
    let own = other.token().await;
    assert!(own != shared, "a token issued for another scope was taken");
    assert_eq!(token.requests(), 2, "the other scope's replica asked Entra");
    let asked: Vec<_> = token.forms().iter().map(|f| f["scope"].clone()).collect();
    assert_eq!(asked, ["https://outlook.office365.com/.default", "https://outlook.office.com/.default"]);
}

#[tokio::test]
async fn a_rotated_refresh_token_is_the_one_the_other_replicas_use() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let a = replica(&token, &redis.url(), "refresh_token").await;
    let b = replica(&token, &redis.url(), "refresh_token").await;
    // `login` ran on replica A only.
    a.seed(&token.seed_refresh_token("printer"));
    let first = a.token().await;
    assert_eq!(b.token().await, first, "B takes A's access token from Redis");
    assert_eq!(token.grants("refresh_token"), 1);
    // The upstream refuses that token on B: B needs a new one, which spends
    // the rotated refresh token A stored (not the one A's file started with).
    let key = b.tokens.key_for("contoso", "printer");
    let held = b.tokens.get(&key).await.unwrap();
    b.tokens.invalidate(&key, &held);
    let second = b.token().await;
    assert_ne!(second, first);
    assert_eq!(token.grants("refresh_token"), 2);
    assert_eq!(token.refused_refreshes(), 0, "no replica spent an old refresh token");
    // A's copy was `first`, also refused now: A takes B's token from Redis,
    // without a request, and brings its own file up to B's rotation.
    let a_key = a.tokens.key_for("contoso", "printer");
    let a_held = a.tokens.get(&a_key).await.unwrap();
    a.tokens.invalidate(&a_key, &a_held);
    assert_eq!(a.token().await, second);
    assert_eq!(token.grants("refresh_token"), 2);
    let live = token.live_refresh_tokens();
    assert_eq!(live.len(), 1);
    assert_eq!(a.store().load("contoso", "printer").unwrap().unwrap().refresh_token, live[0]);
    // And when A must refresh, it spends B's rotated refresh token.
    let a_held = a.tokens.get(&a_key).await.unwrap();
    a.tokens.invalidate(&a_key, &a_held);
    let third = a.token().await;
    assert!(third != second && third != first);
    assert_eq!(token.grants("refresh_token"), 3);
    assert_eq!(token.refused_refreshes(), 0, "no replica spent an old refresh token");
    let live = token.live_refresh_tokens();
    // Refresh tokens are sealed in Redis as on disk.
    let dump = redis.command(&["HGET", "test:rt:contoso:printer", "data"]);
    assert!(dump.contains("X2PTS1") && !dump.contains(&live[0][..40]));
}

#[tokio::test]
async fn a_dead_lock_holder_delays_the_others_by_at_most_the_lock_expiry() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let a = replica(&token, &redis.url(), "client_credentials").await;
    // A replica took the lock and died (never released it).
    let held = a.state.lock("contoso", None).await.unwrap();
    assert!(held.is_some());
    assert!(a.state.lock("contoso", None).await.unwrap().is_none(), "the lock excludes a second holder");
    let b = replica(&token, &redis.url(), "client_credentials").await;
    let started = Instant::now();
    b.token().await;
    let waited = started.elapsed();
    assert!(waited <= Duration::from_millis(3600), "waited {waited:?} for a 3 s lock");
    assert!(waited >= Duration::from_millis(2000), "did not wait for the lock ({waited:?})");
    assert_eq!(token.requests(), 1);
    eprintln!("measured: dead lock holder delayed a login by {} ms (refresh_lock 3 s)", waited.as_millis());
    // A lock is released only by its owner: the expired holder's release is a no-op.
    assert!(!a.state.unlock(held.unwrap()).await.unwrap());
}

#[tokio::test]
async fn session_slots_are_fifo_leases_that_expire_without_renewal() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let r1 = replica(&token, &redis.url(), "client_credentials").await;
    let r2 = replica(&token, &redis.url(), "client_credentials").await;
    let (p, m, beat) = (Protocol::Smtp, "Scanner@Contoso.example", Duration::from_secs(2));
    assert_eq!(r1.state.slot_acquire(p, m, 2, "a", true, beat).await.unwrap(), SlotAnswer::Granted);
    assert_eq!(
        r2.state.slot_acquire(p, "scanner@contoso.example", 2, "b", true, beat).await.unwrap(),
        SlotAnswer::Granted
    );
    assert_eq!(r1.state.slot_acquire(p, m, 2, "c", true, beat).await.unwrap(), SlotAnswer::Queued(0));
    assert_eq!(r2.state.slot_acquire(p, m, 2, "d", true, beat).await.unwrap(), SlotAnswer::Queued(1));
    // Other protocols have their own slots.
    assert_eq!(r2.state.slot_acquire(Protocol::Imap, m, 2, "i", true, beat).await.unwrap(), SlotAnswer::Granted);
    r1.state.slot_release(p, m, "a").await.unwrap();
    // d asks first, but c is ahead of it.
    assert_eq!(r2.state.slot_acquire(p, m, 2, "d", true, beat).await.unwrap(), SlotAnswer::Queued(1));
    assert_eq!(r1.state.slot_acquire(p, m, 2, "c", true, beat).await.unwrap(), SlotAnswer::Granted);
    assert_eq!(r1.state.slot_count(p, m).await.unwrap(), 2);
    // b's replica dies: its lease is not renewed, and expires (3 s); c's is renewed.
    let started = Instant::now();
    let waited = until("b's lease to expire", Duration::from_secs(6), async || {
        r1.state.slot_renew(p, m, "c").await.unwrap();
        r2.state.slot_acquire(p, m, 2, "d", true, beat).await.unwrap() == SlotAnswer::Granted
    })
    .await;
    assert!(waited >= Duration::from_millis(2500), "{waited:?}");
    eprintln!(
        "measured: a dead replica's slot came back after {} ms (session_lease 3 s)",
        started.elapsed().as_millis()
    );
    // A waiter that stops asking loses its place after its heartbeat.
    r1.state.slot_release(p, m, "c").await.unwrap();
    assert_eq!(
        r1.state.slot_acquire(p, m, 1, "gone", true, Duration::from_millis(300)).await.unwrap(),
        SlotAnswer::Queued(0)
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    r1.state.slot_release(p, m, "d").await.unwrap();
    assert_eq!(r2.state.slot_acquire(p, m, 1, "e", true, beat).await.unwrap(), SlotAnswer::Granted);
}

#[tokio::test]
async fn failure_counts_are_shared_and_forgotten() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let r1 = replica(&token, &redis.url(), "client_credentials").await;
    let r2 = replica(&token, &redis.url(), "client_credentials").await;
    let ip = "192.0.2.7".parse().unwrap();
    let forget = Duration::from_millis(800);
    assert_eq!(r1.state.fail(ip, "printer", forget).await.unwrap(), (1, 1));
    assert_eq!(r2.state.fail(ip, "PRINTER", forget).await.unwrap(), (2, 2));
    assert_eq!(r1.state.fail("192.0.2.8".parse().unwrap(), "printer", forget).await.unwrap(), (1, 3));
    assert_eq!(r2.state.failures(ip, "printer").await.unwrap(), (2, 3));
    r1.state.clear_user("Printer").await.unwrap();
    assert_eq!(r2.state.failures(ip, "printer").await.unwrap(), (2, 0));
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(r2.state.failures(ip, "printer").await.unwrap(), (0, 0));
}

#[tokio::test]
async fn redis_down_then_back_logins_go_on_and_a_token_rotated_meanwhile_is_written_back() {
    let mut redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let a = replica(&token, &redis.url(), "refresh_token").await;
    let b = replica(&token, &redis.url(), "refresh_token").await;
    a.seed(&token.seed_refresh_token("printer"));
    let first = a.token().await;
    assert_eq!(b.token().await, first);
    redis.stop();
    // A needs a new token while Redis is away: it refreshes alone, from its
    // own store, without waiting for Redis.
    let key = a.tokens.key_for("contoso", "printer");
    let held = a.tokens.get(&key).await.unwrap();
    a.tokens.invalidate(&key, &held);
    let started = Instant::now();
    let during = a.token().await;
    assert!(started.elapsed() < Duration::from_secs(2), "a login waited for the missing Redis");
    assert_ne!(during, first);
    assert!(!a.state.is_up());
    // B still has its token and serves from it.
    assert_eq!(b.token().await, first);
    redis.restart();
    let back = until("A to see Redis again", Duration::from_secs(5), async || a.state.is_up()).await;
    eprintln!("measured: redis back in use {} ms after its restart", back.as_millis());
    // Redis lost everything; A wrote its rotated refresh token back.
    until("the write-back", Duration::from_secs(3), async || {
        redis.command(&["EXISTS", "test:rt:contoso:printer"]).contains(":1")
    })
    .await;
    // B's next refresh uses the token A rotated while Redis was down.
    until("B to see Redis again", Duration::from_secs(5), async || {
        let _ = b.state.ping().await;
        b.state.is_up()
    })
    .await;
    let b_key = b.tokens.key_for("contoso", "printer");
    let b_held = b.tokens.get(&b_key).await.unwrap();
    b.tokens.invalidate(&b_key, &b_held);
    b.token().await;
    assert_eq!(token.refused_refreshes(), 0, "B used the newest refresh token");
}

#[tokio::test]
async fn replicas_with_another_key_are_told_and_ignore_the_fleets_tokens() {
    let redis = redis_or_skip!();
    let token = TokenServer::start().await;
    let a = replica(&token, &redis.url(), "client_credentials").await;
    a.token().await;
    let store = a.store();
    let shared = xoauth2_proxy::token::shared::SharedTokens::new(a.state.clone(), Arc::new(store));
    assert!(shared.key_matches().await.unwrap());
    // A replica with another key.
    let dir = tempfile::tempdir().unwrap();
    let other = TokenStore::open(&xoauth2_proxy::config::TokenStoreConfig {
        path: dir.path().join("s"),
        key: xoauth2_proxy::config::TokenStoreKey::Inline(xoauth2_proxy::secret::Secret::new(
            "HxwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgEAAAE=".into(),
        )),
    })
    .unwrap();
    let stranger = xoauth2_proxy::token::shared::SharedTokens::new(a.state.clone(), Arc::new(other));
    assert!(!stranger.key_matches().await.unwrap());
}

mod fleet {
    use super::*;
    use xoauth2_proxy::config::LoginThrottle;
    use xoauth2_proxy::server::fleet::{FleetSlots, SessionSlots};
    use xoauth2_proxy::server::limits::{LoginThrottler, MailboxBusy, MailboxLimiter};

    fn slots(r: &Replica) -> FleetSlots {
        FleetSlots::new(r.state.clone(), Arc::new(MailboxLimiter::new()))
    }

    #[tokio::test]
    async fn the_cap_holds_across_replicas_and_a_waiting_login_gets_the_freed_slot() {
        let redis = redis_or_skip!();
        let token = TokenServer::start().await;
        let (r1, r2) = (
            replica(&token, &redis.url(), "client_credentials").await,
            replica(&token, &redis.url(), "client_credentials").await,
        );
        let (s1, s2) = (Arc::new(slots(&r1)), Arc::new(slots(&r2)));
        let (p, m, wait) = (Protocol::Smtp, "scanner@contoso.example", Duration::from_secs(5));
        let (a, _) = s1.acquire(p, m, 2, wait).await.unwrap();
        let (_b, _) = s2.acquire(p, m, 2, wait).await.unwrap();
        assert_eq!(r1.state.slot_count(p, m).await.unwrap(), 2);
        // Over the fleet's cap: waits, then gets the slot another replica frees.
        let waiter = {
            let s1 = s1.clone();
            tokio::spawn(async move { s1.acquire(p, m, 2, wait).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "a third session was admitted over a cap of 2");
        drop(a);
        let (_c, waited) = waiter.await.unwrap().unwrap();
        assert!(waited >= Duration::from_millis(450), "{waited:?}");
        // The wait runs out: the temporary-failure answer, and no lease or place left behind.
        assert_eq!(s2.acquire(p, m, 2, Duration::from_millis(300)).await.err(), Some(MailboxBusy));
        assert_eq!(r2.state.slot_count(p, m).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn without_redis_the_local_caps_hold_and_the_leases_come_back_with_it() {
        let mut redis = redis_or_skip!();
        let token = TokenServer::start().await;
        let r = replica(&token, &redis.url(), "client_credentials").await;
        let s = slots(&r);
        let (p, m) = (Protocol::Imap, "scanner@contoso.example");
        let (_first, _) = s.acquire(p, m, 2, Duration::from_secs(1)).await.unwrap();
        redis.stop();
        let started = Instant::now();
        // The session already open counts locally: one more fits, then the cap.
        let (_second, _) = s.acquire(p, m, 2, Duration::from_secs(1)).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(1500), "the fallback waited for Redis");
        assert_eq!(s.acquire(p, m, 2, Duration::from_millis(200)).await.err(), Some(MailboxBusy));
        redis.restart();
        // Renewals (every session_lease / 3 = 1 s) put both sessions back in Redis.
        until("the leases re-created in the restarted Redis", Duration::from_secs(6), async || {
            let _ = r.state.ping().await;
            r.state.slot_count(p, m).await.unwrap_or(0) == 2
        })
        .await;
    }

    fn throttle(r: &Replica) -> LoginThrottler {
        LoginThrottler::new(LoginThrottle {
            free_failures: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            forget_after: Duration::from_secs(60),
        })
        .with_shared(Some(r.state.clone()))
    }

    #[tokio::test]
    async fn failures_spread_over_replicas_are_throttled_as_one() {
        let redis = redis_or_skip!();
        let token = TokenServer::start().await;
        let rs = [
            replica(&token, &redis.url(), "client_credentials").await,
            replica(&token, &redis.url(), "client_credentials").await,
            replica(&token, &redis.url(), "client_credentials").await,
        ];
        let throttles: Vec<LoginThrottler> = rs.iter().map(throttle).collect();
        let ip = "192.0.2.7".parse().unwrap();
        let mut delays = Vec::new();
        for i in 0..6 {
            let attempt = throttles[i % 3].admit(ip, &format!("guess{i}")).await;
            delays.push(attempt.failed().await.as_secs());
        }
        // Each replica saw two failures; the fleet saw six.
        assert_eq!(delays, [0, 0, 0, 1, 2, 4]);
        // A login for a username that failed elsewhere is slowed too, and a
        // success clears the username for every replica.
        let attempt = throttles[0].admit("192.0.2.99".parse().unwrap(), "printer").await;
        assert_eq!(attempt.failed().await, Duration::ZERO);
        drop(attempt);
        for t in &throttles[1..] {
            let _ = t.admit("192.0.2.98".parse().unwrap(), "printer").await.failed().await;
        }
        throttles[2].admit("192.0.2.97".parse().unwrap(), "printer").await.succeeded();
        until("the success to reach Redis", Duration::from_secs(2), async || {
            rs[0].state.failures("192.0.2.1".parse().unwrap(), "printer").await.unwrap().1 == 0
        })
        .await;
    }
}
