//! Shared state for several replicas (`state:`): one Redis (or Valkey)
//! server that every replica with the same prefix uses for tokens, the
//! cross-replica refresh lock, mailbox session leases and the login
//! throttle's failure counts.
//!
//! This module owns the connection, the key layout ([`scripts`] holds the
//! atomic operations) and the health of the link. Callers never wait for a
//! Redis that is down: while it is unreachable every operation fails at once
//! with [`StateError::Down`] and the callers fall back to local state. A
//! monitor pings it meanwhile; the switch and the return are each logged
//! once, and [`SharedState::recovered`] tells whoever has something to
//! write back (rotated refresh tokens) that it is back.
//!
//! Redis never sees a token in the clear: token records are sealed by the
//! token store before they get here.

pub mod scripts;

use crate::config::{StateConfig, StatePassword};
use crate::protocol::Protocol;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often a replica whose Redis is down tries it again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    /// Not tried: the link is down (local state serves meanwhile).
    #[error("shared state unreachable")]
    Down,
    #[error("shared state: {0}")]
    Failed(String),
    #[error("state.password_file {path}: {error}")]
    PasswordFile { path: std::path::PathBuf, error: String },
    #[error("state.ca_file {path}: {error}")]
    CaFile { path: std::path::PathBuf, error: String },
    #[error("state.url: {0}")]
    Url(String),
}

/// The link to Redis and whether it works.
pub struct SharedState {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    /// The URL with its password masked, for log lines.
    url: String,
    pub session_lease: Duration,
    pub refresh_lock: Duration,
    up: AtomicBool,
    /// `true` while reachable; bumps wake the monitor and the write-back.
    health: watch::Sender<bool>,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState").field("url", &self.url).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

/// One component of a key: anything that could be mistaken for the
/// separator (or is not printable) is percent-encoded, so `at:a:b` can only
/// mean identity `a`, account `b`.
pub fn key_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ':' || c == '%' || c.is_whitespace() || c.is_control() {
            for b in c.to_string().bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What a token record's key is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// The account's refresh-token record (a sealed token file), kept until replaced.
    Refresh,
    /// The current access token, expiring with it.
    Access,
}

/// A lock held in Redis; release it with [`SharedState::unlock`].
#[derive(Debug)]
pub struct LockToken {
    key: String,
    owner: String,
}

/// The outcome of asking for a mailbox session slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAnswer {
    Granted,
    /// Full: this many waiters (or, without queueing, leases) are ahead.
    Queued(u64),
}

fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // SystemRandom only fails when the OS has no randomness at all; the id
    // then still differs per call through the time and a counter.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&crate::token::store::unix_millis().to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
    }
    crate::text::hex(&bytes)
}

/// A fresh unique id for a lock owner, a lease or a waiter.
pub fn new_id() -> String {
    random_id()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Whether an error says the server is out of reach (rather than that it
/// refused one command).
fn unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

impl SharedState {
    /// Prepares the link. It does not wait for Redis: an unreachable server
    /// is logged and the proxy starts on local state, switching over once
    /// the monitor reaches it.
    pub async fn connect(config: &StateConfig) -> Result<Arc<SharedState>, StateError> {
        let state = Arc::new(Self::build(config)?);
        state.clone().start_monitor();
        match state.ping().await {
            Ok(()) => info!(state.url = %state.url, prefix = %state.prefix, "shared state: connected to redis"),
            Err(e) => warn!(
                state.url = %state.url,
                error = %e,
                "shared state unreachable at start: serving with local state (tokens held, local caps, local throttle) until it answers"
            ),
        }
        Ok(state)
    }

    /// The link without the start-up log line, for `check --online`.
    pub fn connect_quiet(config: &StateConfig) -> Result<Arc<SharedState>, StateError> {
        Ok(Arc::new(Self::build(config)?))
    }

    fn build(config: &StateConfig) -> Result<SharedState, StateError> {
        let url = config.display_url();
        let mut info =
            config.url.expose().as_str().into_connection_info().map_err(|e| StateError::Url(e.to_string()))?;
        if let Some(password) = &config.password {
            let password = match password {
                StatePassword::Inline(p) => p.clone(),
                StatePassword::File(path) => {
                    let text = crate::secret::Secret::new(
                        std::fs::read_to_string(path)
                            .map_err(|e| StateError::PasswordFile { path: path.clone(), error: e.to_string() })?,
                    );
                    crate::secret::Secret::new(text.expose().trim().to_string())
                }
            };
            let settings = info.redis_settings().clone().set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_file {
            Some(path) => {
                let root_cert =
                    std::fs::read(path).map_err(|e| StateError::CaFile { path: path.clone(), error: e.to_string() })?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| StateError::Url(e.to_string()))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            // The monitor retries; a command fails fast instead of queueing behind reconnects.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| StateError::Failed(e.to_string()))?;
        let (health, _) = watch::channel(true);
        Ok(SharedState {
            conn,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            url,
            session_lease: config.session_lease,
            refresh_lock: config.refresh_lock,
            up: AtomicBool::new(true),
            health,
        })
    }

    /// Whether Redis is in use right now (false: local state serves).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// The URL, password masked.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A receiver that changes whenever the link goes down or comes back.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }

    fn went_down(&self, error: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            warn!(
                state.url = %self.url,
                error,
                "shared state unreachable: serving with local state (tokens held, local caps, local throttle) until it returns"
            );
            self.health.send_replace(false);
        }
    }

    fn came_back(&self) {
        if !self.up.swap(true, Ordering::SeqCst) {
            info!(state.url = %self.url, "shared state reachable again: caps, throttle and tokens are shared again");
            self.health.send_replace(true);
        }
    }

    /// Pings while the link is down, every [`RETRY_EVERY`].
    fn start_monitor(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        let mut changes = self.watch();
        drop(self);
        tokio::spawn(async move {
            loop {
                let Some(state) = weak.upgrade() else { return };
                if state.is_up() {
                    drop(state);
                    if changes.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                let pinged = state.raw_ping().await;
                if pinged.is_ok() {
                    state.came_back();
                    continue;
                }
                drop(state);
                tokio::time::sleep(RETRY_EVERY).await;
            }
        });
    }

    async fn raw_ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let pong = tokio::time::timeout(self.timeout, redis::cmd("PING").query_async::<String>(&mut conn)).await;
        match pong {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StateError::Failed(e.to_string())),
            Err(_) => Err(StateError::Failed(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// One round trip, marking the link down if it fails for lack of Redis.
    pub async fn ping(&self) -> Result<(), StateError> {
        match self.raw_ping().await {
            Ok(()) => {
                self.came_back();
                Ok(())
            }
            Err(e) => {
                self.went_down(&e.to_string());
                Err(e)
            }
        }
    }

    /// Runs one operation unless the link is down, bounded by the timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StateError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        if !self.is_up() {
            return Err(StateError::Down);
        }
        match tokio::time::timeout(self.timeout, op(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if unreachable(&e) => {
                self.went_down(&e.to_string());
                Err(StateError::Down)
            }
            Ok(Err(e)) => {
                warn!(state.url = %self.url, error = %e, "shared state refused an operation");
                Err(StateError::Failed(e.to_string()))
            }
            Err(_) => {
                self.went_down(&format!("no answer within {:?}", self.timeout));
                Err(StateError::Down)
            }
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for part in parts {
            key.push(':');
            key.push_str(&key_part(part));
        }
        key
    }

    fn record_key(&self, kind: Record, identity: &str, account: Option<&str>) -> String {
        let tag = match kind {
            Record::Refresh => "rt",
            Record::Access => "at",
        };
        match account {
            Some(account) => self.key(&[tag, identity, account]),
            None => self.key(&[tag, identity]),
        }
    }

    /// A sealed record and its version.
    pub async fn get_record(
        &self,
        kind: Record,
        identity: &str,
        account: Option<&str>,
    ) -> Result<Option<(u64, Vec<u8>)>, StateError> {
        let key = self.record_key(kind, identity, account);
        let (version, data): (Option<u64>, Option<Vec<u8>>) = self
            .run(|mut c| async move { redis::cmd("HMGET").arg(&key).arg("v").arg("data").query_async(&mut c).await })
            .await?;
        Ok(match (version, data) {
            (Some(v), Some(d)) => Some((v, d)),
            _ => None,
        })
    }

    /// Stores a sealed record unless a newer one (a higher version) is
    /// there already; `ttl` makes it expire. True if written.
    pub async fn put_record(
        &self,
        kind: Record,
        identity: &str,
        account: Option<&str>,
        version: u64,
        data: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        let key = self.record_key(kind, identity, account);
        let ttl = ttl.map_or(0, millis);
        let written: i64 = self
            .run(|mut c| async move {
                scripts::PUT_NEWER.key(&key).arg(version).arg(data).arg(ttl).invoke_async(&mut c).await
            })
            .await?;
        Ok(written == 1)
    }

    /// Deletes a record if it is still at `version`.
    pub async fn delete_record(
        &self,
        kind: Record,
        identity: &str,
        account: Option<&str>,
        version: u64,
    ) -> Result<bool, StateError> {
        let key = self.record_key(kind, identity, account);
        let n: i64 = self
            .run(|mut c| async move { scripts::DELETE_VERSION.key(&key).arg(version).invoke_async(&mut c).await })
            .await?;
        Ok(n == 1)
    }

    /// Takes the refresh lock for a token key: `SET key owner NX PX`.
    pub async fn lock(&self, identity: &str, account: Option<&str>) -> Result<Option<LockToken>, StateError> {
        let key = self.lock_key(identity, account);
        let owner = random_id();
        let ttl = millis(self.refresh_lock);
        let (k, o) = (key.clone(), owner.clone());
        let set: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("SET").arg(&k).arg(&o).arg("NX").arg("PX").arg(ttl).query_async(&mut c).await
            })
            .await?;
        Ok(set.map(|_| LockToken { key, owner }))
    }

    /// Whether anyone holds the refresh lock for a token key.
    pub async fn locked(&self, identity: &str, account: Option<&str>) -> Result<bool, StateError> {
        let key = self.lock_key(identity, account);
        let n: i64 = self.run(|mut c| async move { redis::cmd("EXISTS").arg(&key).query_async(&mut c).await }).await?;
        Ok(n == 1)
    }

    /// Releases a lock if this replica still owns it (it may have expired
    /// and been taken by another).
    pub async fn unlock(&self, lock: LockToken) -> Result<bool, StateError> {
        let LockToken { key, owner } = lock;
        let n: i64 =
            self.run(|mut c| async move { scripts::UNLOCK.key(&key).arg(&owner).invoke_async(&mut c).await }).await?;
        Ok(n == 1)
    }

    fn lock_key(&self, identity: &str, account: Option<&str>) -> String {
        match account {
            Some(account) => self.key(&["lock", identity, account]),
            None => self.key(&["lock", identity]),
        }
    }

    fn slot_keys(&self, protocol: Protocol, mailbox: &str) -> [String; 3] {
        let mailbox = mailbox.to_lowercase();
        [
            self.key(&["slots", protocol.as_str(), &mailbox]),
            self.key(&["slotq", protocol.as_str(), &mailbox]),
            self.key(&["slotqx", protocol.as_str(), &mailbox]),
        ]
    }

    /// Takes a session slot for `id` if fewer than `cap` leases are live and
    /// no earlier waiter is ahead; otherwise, with `queue`, keeps `id` in
    /// line (its place expires after `heartbeat` unless asked again).
    pub async fn slot_acquire(
        &self,
        protocol: Protocol,
        mailbox: &str,
        cap: usize,
        id: &str,
        queue: bool,
        heartbeat: Duration,
    ) -> Result<SlotAnswer, StateError> {
        let [slots, q, qx] = self.slot_keys(protocol, mailbox);
        let lease = millis(self.session_lease);
        let heartbeat = millis(heartbeat);
        let answer: i64 = self
            .run(|mut c| async move {
                scripts::SLOT_ACQUIRE
                    .key(&slots)
                    .key(&q)
                    .key(&qx)
                    .arg(cap)
                    .arg(id)
                    .arg(lease)
                    .arg(u8::from(queue))
                    .arg(heartbeat)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(if answer < 0 { SlotAnswer::Granted } else { SlotAnswer::Queued(answer.unsigned_abs()) })
    }

    /// Extends a lease (re-creating it if Redis lost it, e.g. restarted).
    pub async fn slot_renew(&self, protocol: Protocol, mailbox: &str, id: &str) -> Result<(), StateError> {
        let [slots, _, _] = self.slot_keys(protocol, mailbox);
        let lease = millis(self.session_lease);
        let _: i64 = self
            .run(|mut c| async move { scripts::SLOT_RENEW.key(&slots).arg(id).arg(lease).invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Gives a lease back, or leaves the queue.
    pub async fn slot_release(&self, protocol: Protocol, mailbox: &str, id: &str) -> Result<(), StateError> {
        let [slots, q, qx] = self.slot_keys(protocol, mailbox);
        let _: i64 = self
            .run(|mut c| async move {
                scripts::SLOT_RELEASE.key(&slots).key(&q).key(&qx).arg(id).invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// Live leases of a mailbox (for tests and diagnostics).
    pub async fn slot_count(&self, protocol: Protocol, mailbox: &str) -> Result<u64, StateError> {
        let [slots, _, _] = self.slot_keys(protocol, mailbox);
        self.run(|mut c| async move { scripts::SLOT_COUNT.key(&slots).invoke_async(&mut c).await }).await
    }

    fn fail_keys(&self, ip: std::net::IpAddr, user: &str) -> [String; 2] {
        [self.key(&["fail", "ip", &ip.to_string()]), self.key(&["fail", "user", &user.to_lowercase()])]
    }

    /// Counts a failed login for the address and the username, each
    /// forgotten `forget_after` after its last failure; the new counts.
    pub async fn fail(
        &self,
        ip: std::net::IpAddr,
        user: &str,
        forget_after: Duration,
    ) -> Result<(u32, u32), StateError> {
        let [by_ip, by_user] = self.fail_keys(ip, user);
        let ttl = millis(forget_after);
        self.run(|mut c| async move {
            scripts::FAIL.key(&by_ip).key(&by_user).arg(ttl).invoke_async::<(u32, u32)>(&mut c).await
        })
        .await
    }

    /// The failure counts for the address and the username.
    pub async fn failures(&self, ip: std::net::IpAddr, user: &str) -> Result<(u32, u32), StateError> {
        let [by_ip, by_user] = self.fail_keys(ip, user);
        let (a, b): (Option<u32>, Option<u32>) = self
            .run(|mut c| async move { redis::cmd("MGET").arg(&by_ip).arg(&by_user).query_async(&mut c).await })
            .await?;
        Ok((a.unwrap_or(0), b.unwrap_or(0)))
    }

    /// A successful login clears the username's count.
    pub async fn clear_user(&self, user: &str) -> Result<(), StateError> {
        let key = self.key(&["fail", "user", &user.to_lowercase()]);
        let _: i64 = self.run(|mut c| async move { redis::cmd("DEL").arg(&key).query_async(&mut c).await }).await?;
        Ok(())
    }

    /// Reads the fleet's key check value, storing `sealed` if there is none
    /// yet: replicas must share one token-store key, or they cannot read
    /// each other's tokens.
    pub async fn key_check(&self, sealed: &[u8]) -> Result<Vec<u8>, StateError> {
        let key = self.key(&["keycheck"]);
        self.run(|mut c| async move {
            let _: bool = redis::cmd("SET")
                .arg(&key)
                .arg(sealed)
                .arg("NX")
                .query_async::<Option<String>>(&mut c)
                .await?
                .is_some();
            redis::cmd("GET").arg(&key).query_async(&mut c).await
        })
        .await
    }
}
