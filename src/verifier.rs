//! Password verification as a bounded resource.
//!
//! argon2id is deliberately expensive: with the default cost every
//! verification fills 19 MiB of memory. Run on demand for every attempt, a
//! burst of logins (or of guesses) allocates that much per attempt at once,
//! and the allocator keeps the memory afterwards. So verifications run here:
//!
//! - on a fixed pool of worker threads (about one per core), each owning one
//!   block of argon2 memory allocated once and reused;
//! - from a bounded queue, each waiting at most a deadline: a login that
//!   cannot be verified in time gets the temporary-failure answer;
//! - at most once for identical attempts in flight (same username, hash and
//!   password): the others wait for that one result;
//! - with recent successes remembered as HMAC tags under a per-process key
//!   (a printer that logs in per page does not pay argon2 each time); the tag
//!   covers the hash, so the memory survives a reload for every account whose
//!   hash did not change.
//!
//! Unknown usernames are checked against a decoy hash through the same pool,
//! so they cost what a wrong password costs.

use crate::secret::Secret;
use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;
use tokio::time::Instant;
use zeroize::Zeroize;

/// How many recent successes are remembered, and for how long.
const VERIFIED_CAPACITY: usize = 1024;
const VERIFIED_TTL: Duration = Duration::from_secs(3600);

use crate::config::keys::MAX_M_COST;

/// An argon2 PHC string, parsed once when the accounts are loaded.
#[derive(Debug)]
pub struct Hash {
    /// The PHC string, part of the success tag.
    phc: String,
    algorithm: Algorithm,
    version: Version,
    params: Params,
    salt: Vec<u8>,
    expected: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("not a valid argon2 PHC string: {0}")]
    Invalid(String),
    #[error("memory cost m={0} KiB is above the {MAX_M_COST} KiB this proxy allows")]
    TooCostly(u32),
}

impl Hash {
    pub fn parse(phc: &str) -> Result<Hash, HashError> {
        let invalid = |e: &dyn std::fmt::Display| HashError::Invalid(e.to_string());
        let parsed = PasswordHash::new(phc).map_err(|e| invalid(&e))?;
        let algorithm = Algorithm::try_from(parsed.algorithm.as_str()).map_err(|e| invalid(&e))?;
        let version = match parsed.version {
            Some(v) => Version::try_from(v).map_err(|e| invalid(&e))?,
            None => Version::default(),
        };
        let params = Params::try_from(&parsed).map_err(|e| invalid(&e))?;
        if params.m_cost() > MAX_M_COST {
            return Err(HashError::TooCostly(params.m_cost()));
        }
        let salt = parsed.salt.as_ref().ok_or_else(|| invalid(&"no salt"))?.as_ref().to_vec();
        let expected = parsed.hash.as_ref().ok_or_else(|| invalid(&"no hash"))?.as_ref().to_vec();
        Ok(Hash { phc: phc.to_string(), algorithm, version, params, salt, expected })
    }

    /// Checks `password` using `memory` as argon2's working memory.
    fn matches(&self, password: &[u8], memory: &mut Vec<Block>) -> bool {
        let blocks = self.params.block_count();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        let argon = Argon2::new(self.algorithm, self.version, self.params.clone());
        let mut out = vec![0u8; self.expected.len()];
        let ok = argon.hash_password_into_with_memory(password, &self.salt, &mut out, &mut memory[..blocks]).is_ok()
            && bool::from(out.ct_eq(&self.expected));
        // The working memory is derived from the password.
        for block in &mut memory[..blocks] {
            block.zeroize();
        }
        ok
    }
}

/// The result of one verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Match,
    Mismatch,
    /// The pool could not verify in time (queue full or deadline passed).
    Overloaded,
}

pub use crate::config::PasswordVerification as PoolConfig;

type Tag = [u8; 32];

struct Job {
    tag: Tag,
    hash: Arc<Hash>,
    password: Secret<Vec<u8>>,
}

/// Attempts in flight, by tag: everyone waiting for that verification.
type Waiters = Mutex<HashMap<Tag, Vec<oneshot::Sender<Verdict>>>>;

struct Inner {
    key: ring::hmac::Key,
    waiters: Waiters,
    verified: Mutex<(HashMap<Tag, Instant>, VecDeque<Tag>)>,
    decoy: Arc<Hash>,
    verifications: std::sync::atomic::AtomicU64,
}

/// The verification pool; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
    queue: SyncSender<Job>,
    timeout: Duration,
}

impl Verifier {
    /// Starts the workers. Each allocates its argon2 memory at its first
    /// verification (an idle proxy, or one with plain passwords only, holds
    /// none) and keeps it, growing it once if a costlier hash comes along.
    pub fn start(config: &PoolConfig) -> Verifier {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>()));
        let decoy = crate::accounts::hash_password(b"decoy password for unknown usernames")
            .ok()
            .and_then(|phc| Hash::parse(&phc).ok())
            .unwrap_or_else(|| Hash {
                phc: String::new(),
                algorithm: Algorithm::Argon2id,
                version: Version::default(),
                params: Params::default(),
                salt: vec![0; 16],
                expected: vec![0; 32],
            });
        let inner = Arc::new(Inner {
            key,
            waiters: Mutex::new(HashMap::new()),
            verified: Mutex::new((HashMap::new(), VecDeque::new())),
            decoy: Arc::new(decoy),
            verifications: Default::default(),
        });
        let (queue, jobs) = sync_channel::<Job>(config.queue.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..config.workers.max(1) {
            let (jobs, inner) = (jobs.clone(), inner.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || worker(&jobs, &inner, Vec::new()));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password verification worker");
            }
        }
        Verifier { inner, queue, timeout: config.timeout }
    }

    /// Verifications actually computed (not shared, not cached), for tests
    /// and metrics.
    pub fn verifications(&self) -> u64 {
        self.inner.verifications.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks `password` for `username` against `hash`; `None` checks it
    /// against the decoy (an unknown username) and never matches.
    pub async fn verify(&self, username: &str, hash: Option<&Arc<Hash>>, password: &Secret<Vec<u8>>) -> Verdict {
        let hash = hash.unwrap_or(&self.inner.decoy).clone();
        let tag = self.tag(username, &hash.phc, password.expose());
        let real = !Arc::ptr_eq(&hash, &self.inner.decoy);
        if real && self.recently_verified(&tag) {
            return Verdict::Match;
        }
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let entry = waiters.entry(tag).or_default();
            entry.push(tx);
            entry.len() == 1
        };
        if first {
            let job = Job { tag, hash, password: password.clone() };
            if let Err(e) = self.queue.try_send(job) {
                let verdict = match e {
                    TrySendError::Full(_) => "full",
                    TrySendError::Disconnected(_) => "stopped",
                };
                tracing::warn!(queue = verdict, "password verification queue cannot take the attempt");
                self.inner.answer(&tag, Verdict::Overloaded);
            }
        }
        let verdict = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(_)) | Err(_) => Verdict::Overloaded,
        };
        if verdict == Verdict::Match && real {
            self.remember(tag);
        }
        // The decoy never admits anyone, whatever was typed.
        if real {
            verdict
        } else {
            match verdict {
                Verdict::Overloaded => Verdict::Overloaded,
                Verdict::Match | Verdict::Mismatch => Verdict::Mismatch,
            }
        }
    }

    fn tag(&self, username: &str, phc: &str, password: &[u8]) -> Tag {
        let mut ctx = ring::hmac::Context::with_key(&self.inner.key);
        ctx.update(username.to_lowercase().as_bytes());
        ctx.update(b"\0");
        ctx.update(phc.as_bytes());
        ctx.update(b"\0");
        ctx.update(password);
        let mut tag = [0u8; 32];
        tag.copy_from_slice(ctx.sign().as_ref());
        tag
    }

    fn recently_verified(&self, tag: &Tag) -> bool {
        let verified = self.inner.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.0.get(tag).is_some_and(|at| at.elapsed() < VERIFIED_TTL)
    }

    fn remember(&self, tag: Tag) {
        let mut verified = self.inner.verified.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *verified;
        if map.insert(tag, Instant::now()).is_none() {
            order.push_back(tag);
        }
        while order.len() > VERIFIED_CAPACITY {
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
            }
        }
    }
}

impl Inner {
    /// Hands `verdict` to everyone waiting for `tag`.
    fn answer(&self, tag: &Tag, verdict: Verdict) {
        let waiting = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(tag).unwrap_or_default();
        for tx in waiting {
            let _ = tx.send(verdict);
        }
    }

    /// Whether anyone still waits for `tag` (they give up at their deadline
    /// or when their client goes away).
    fn wanted(&self, tag: &Tag) -> bool {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        match waiters.get_mut(tag) {
            Some(list) => {
                list.retain(|tx| !tx.is_closed());
                if list.is_empty() {
                    waiters.remove(tag);
                    false
                } else {
                    true
                }
            }
            None => false,
        }
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>, inner: &Inner, mut memory: Vec<Block>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        // A job nobody waits for any more is not worth 19 MiB of hashing.
        if !inner.wanted(&job.tag) {
            continue;
        }
        inner.verifications.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let verdict =
            if job.hash.matches(job.password.expose(), &mut memory) { Verdict::Match } else { Verdict::Mismatch };
        inner.answer(&job.tag, verdict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap(password: &str) -> Arc<Hash> {
        use argon2::password_hash::PasswordHasher;
        let params = Params::new(8, 1, 1, None).unwrap();
        let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params).hash_password(password.as_bytes()).unwrap();
        Arc::new(Hash::parse(&phc.to_string()).unwrap())
    }

    fn pw(p: &str) -> Secret<Vec<u8>> {
        Secret::new(p.as_bytes().to_vec())
    }

    fn pool(workers: usize, queue: usize) -> Verifier {
        Verifier::start(&PoolConfig { workers, queue, timeout: Duration::from_secs(10) })
    }

    #[tokio::test]
    async fn right_wrong_and_unknown() {
        let v = pool(2, 16);
        let hash = cheap("s3cret");
        assert_eq!(v.verify("printer", Some(&hash), &pw("s3cret")).await, Verdict::Match);
        assert_eq!(v.verify("printer", Some(&hash), &pw("s3cre")).await, Verdict::Mismatch);
        assert_eq!(v.verify("nobody", None, &pw("decoy password for unknown usernames")).await, Verdict::Mismatch);
    }

    #[tokio::test]
    async fn the_default_cost_is_what_hash_password_writes() {
        let v = pool(1, 4);
        let hash = Arc::new(Hash::parse(&crate::accounts::hash_password(b"pw").unwrap()).unwrap());
        assert_eq!(hash.params.m_cost(), Params::DEFAULT_M_COST);
        assert_eq!(v.verify("u", Some(&hash), &pw("pw")).await, Verdict::Match);
    }

    #[tokio::test]
    async fn identical_attempts_in_flight_share_one_verification() {
        let v = pool(1, 16);
        let hash = cheap("right");
        let attempts: Vec<_> = (0..50)
            .map(|_| {
                let (v, hash) = (v.clone(), hash.clone());
                tokio::spawn(async move { v.verify("printer", Some(&hash), &pw("wrong")).await })
            })
            .collect();
        for a in attempts {
            assert_eq!(a.await.unwrap(), Verdict::Mismatch);
        }
        assert!(v.verifications() < 50, "{} verifications for 50 identical attempts", v.verifications());
        let unknown: Vec<_> = (0..50)
            .map(|_| {
                let v = v.clone();
                tokio::spawn(async move { v.verify("nosuch", None, &pw("wrong")).await })
            })
            .collect();
        let before = v.verifications();
        for a in unknown {
            assert_eq!(a.await.unwrap(), Verdict::Mismatch);
        }
        assert!(v.verifications() - before < 50);
    }

    #[tokio::test]
    async fn successes_are_remembered_across_reloads_while_the_hash_is_unchanged() {
        let v = pool(1, 4);
        let hash = cheap("right");
        assert_eq!(v.verify("printer", Some(&hash), &pw("right")).await, Verdict::Match);
        let n = v.verifications();
        // The same PHC string parsed again, as a reload does.
        let reloaded = Arc::new(Hash::parse(&hash.phc).unwrap());
        for _ in 0..20 {
            assert_eq!(v.verify("PRINTER", Some(&reloaded), &pw("right")).await, Verdict::Match);
        }
        assert_eq!(v.verifications(), n, "served from the remembered success");
        // A wrong password is never served from memory; a changed hash starts afresh.
        assert_eq!(v.verify("printer", Some(&hash), &pw("wrong")).await, Verdict::Mismatch);
        let changed = cheap("new");
        assert_eq!(v.verify("printer", Some(&changed), &pw("right")).await, Verdict::Mismatch);
    }

    #[tokio::test]
    async fn a_full_queue_answers_overloaded_at_once() {
        // No worker can drain the queue: every slot stays taken.
        let v = Verifier::start(&PoolConfig { workers: 1, queue: 1, timeout: Duration::from_secs(30) });
        let slow = Arc::new(Hash::parse(&crate::accounts::hash_password(b"x").unwrap()).unwrap());
        let mut pending = Vec::new();
        for i in 0..4 {
            let (v, slow) = (v.clone(), slow.clone());
            pending.push(tokio::spawn(async move { v.verify(&format!("u{i}"), Some(&slow), &pw("y")).await }));
        }
        let verdicts: Vec<Verdict> = futures_verdicts(pending).await;
        assert!(verdicts.contains(&Verdict::Overloaded), "{verdicts:?}");
        assert!(verdicts.contains(&Verdict::Mismatch), "{verdicts:?}");
    }

    async fn futures_verdicts(tasks: Vec<tokio::task::JoinHandle<Verdict>>) -> Vec<Verdict> {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[test]
    fn the_success_memory_is_bounded() {
        let v = pool(1, 1);
        for i in 0..(VERIFIED_CAPACITY + 10) {
            v.remember(v.tag(&format!("user{i}"), "h", b"pw"));
        }
        assert!(!v.recently_verified(&v.tag("user0", "h", b"pw")));
        assert!(v.recently_verified(&v.tag(&format!("user{}", VERIFIED_CAPACITY + 9), "h", b"pw")));
        assert_eq!(v.inner.verified.lock().unwrap().0.len(), VERIFIED_CAPACITY);
    }

    #[test]
    fn costly_and_malformed_hashes_are_refused() {
        assert!(matches!(Hash::parse("plain"), Err(HashError::Invalid(_))));
        let huge = "$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert_eq!(Hash::parse(huge).unwrap_err(), HashError::TooCostly(1048576));
    }
}
