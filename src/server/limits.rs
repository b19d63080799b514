//! Admission control: connection caps per listener and per client address,
//! upstream sessions per mailbox, and growing delays after failed logins.

use crate::config::LoginThrottle;
use crate::protocol::Protocol;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Counts held by guards; a guard gives its unit back when dropped.
#[derive(Debug)]
struct Counter<K: Hash + Eq> {
    counts: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Counter<K> {
    fn new() -> Self {
        Counter { counts: Mutex::new(HashMap::new()) }
    }

    fn try_take(&self, key: &K, max: usize) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, key: &K) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(key);
            }
        }
    }

    fn get(&self, key: &K) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ListenerFull,
    AddressFull,
}

/// Open connections on one listener, in total and per client address.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max: usize,
    per_ip: usize,
    counts: Arc<Counter<Option<IpAddr>>>,
}

/// Holds one connection's place until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    ip: IpAddr,
    counts: Arc<Counter<Option<IpAddr>>>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.counts.give_back(&Some(self.ip));
        self.counts.give_back(&None);
    }
}

impl ConnectionLimiter {
    pub fn new(max: usize, per_ip: usize) -> Self {
        ConnectionLimiter { max, per_ip, counts: Arc::new(Counter::new()) }
    }

    pub fn try_admit(&self, ip: IpAddr) -> Result<ConnectionGuard, Refusal> {
        if !self.counts.try_take(&None, self.max) {
            return Err(Refusal::ListenerFull);
        }
        if !self.counts.try_take(&Some(ip), self.per_ip) {
            self.counts.give_back(&None);
            return Err(Refusal::AddressFull);
        }
        Ok(ConnectionGuard { ip, counts: self.counts.clone() })
    }

    pub fn open(&self) -> usize {
        self.counts.get(&None)
    }

    /// New caps over the same counts (a reload): connections already open
    /// still count against them.
    pub fn with_limits(&self, max: usize, per_ip: usize) -> Self {
        ConnectionLimiter { max, per_ip, counts: self.counts.clone() }
    }
}

/// Upstream sessions per mailbox and protocol, across the listeners of that
/// protocol: Exchange refuses a mailbox's sessions beyond its own limits. A
/// login over the cap waits for a place, first come first served, instead of
/// being refused.
#[derive(Debug, Default)]
pub struct MailboxLimiter {
    slots: Arc<Mutex<HashMap<(Protocol, String), Slots>>>,
}

#[derive(Debug, Default)]
struct Slots {
    open: usize,
    waiting: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    cap: usize,
    wake: tokio::sync::oneshot::Sender<()>,
}

/// Holds one upstream session's place until dropped.
#[derive(Debug)]
pub struct MailboxGuard {
    key: (Protocol, String),
    slots: Arc<Mutex<HashMap<(Protocol, String), Slots>>>,
}

impl Drop for MailboxGuard {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = slots.get_mut(&self.key) {
            entry.open = entry.open.saturating_sub(1);
            // Hand the place to the first waiter still waiting that it fits.
            while let Some(first) = entry.waiting.front() {
                if entry.open >= first.cap {
                    break;
                }
                let Some(first) = entry.waiting.pop_front() else { break };
                if first.wake.send(()).is_ok() {
                    entry.open += 1;
                    break;
                }
            }
            if entry.open == 0 && entry.waiting.is_empty() {
                slots.remove(&self.key);
            }
        }
    }
}

/// The wait for a place ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxBusy;

impl MailboxLimiter {
    pub fn new() -> Self {
        MailboxLimiter::default()
    }

    /// A place among `cap` upstream sessions of `mailbox` for `protocol`,
    /// waiting up to `wait` behind earlier waiters. Returns the guard and
    /// how long it waited.
    pub async fn acquire(
        &self,
        protocol: Protocol,
        mailbox: &str,
        cap: usize,
        wait: Duration,
    ) -> Result<(MailboxGuard, Duration), MailboxBusy> {
        let key = (protocol, mailbox.to_lowercase());
        let guard = || MailboxGuard { key: key.clone(), slots: self.slots.clone() };
        let started = Instant::now();
        let (id, woken) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let entry = slots.entry(key.clone()).or_default();
            if entry.waiting.is_empty() && entry.open < cap {
                entry.open += 1;
                return Ok((guard(), Duration::ZERO));
            }
            let id = NEXT_WAITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (wake, woken) = tokio::sync::oneshot::channel();
            entry.waiting.push_back(Waiter { id, cap, wake });
            (id, woken)
        };
        if let Ok(Ok(())) = tokio::time::timeout(wait, woken).await {
            return Ok((guard(), started.elapsed()));
        }
        // Timed out (or cancelled): leave the queue, unless a place was handed
        // over at the last moment, which is then this attempt's.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = slots.get_mut(&key) else { return Err(MailboxBusy) };
        match entry.waiting.iter().position(|w| w.id == id) {
            Some(at) => {
                entry.waiting.remove(at);
                if entry.open == 0 && entry.waiting.is_empty() {
                    slots.remove(&key);
                }
                Err(MailboxBusy)
            }
            None => {
                drop(slots);
                Ok((guard(), started.elapsed()))
            }
        }
    }

    /// Upstream sessions open now for `mailbox` and `protocol`.
    pub fn open(&self, protocol: Protocol, mailbox: &str) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(&(protocol, mailbox.to_lowercase())).map_or(0, |e| e.open)
    }
}

static NEXT_WAITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug)]
struct Record {
    failures: u32,
    last: Instant,
    /// Attempts running now without waiting at the gate.
    in_flight: u32,
    /// Held by an attempt (and through its failure delay) once the record is
    /// out of free attempts, so attempts go one at a time.
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Record {
    fn new(now: Instant) -> Self {
        Record { failures: 0, last: now, in_flight: 0, gate: Arc::default() }
    }
}

/// Bounds memory against a spray of usernames or addresses.
const MAX_RECORDS: usize = 50_000;

/// Failed logins per client address and per username, and the delay the
/// next failure earns: none for the first few, then doubling up to a cap.
///
/// The throttle gates attempts, not connections: past the free failures,
/// every attempt from the address (or for the username) waits for the one
/// before it, including that one's delay, so parallel connections guess no
/// faster than one.
///
/// With `state:`, the failure counts are the fleet's: each attempt first
/// adopts the shared counts for its address and username, and each failure
/// is counted in Redis too, so guesses spread over replicas are slowed as
/// one. The gate stays per replica (it holds attempts in this process).
#[derive(Debug)]
pub struct LoginThrottler {
    config: LoginThrottle,
    /// Shared with the throttler a reload makes ([`LoginThrottler::with_config`]).
    by_ip: Arc<Mutex<HashMap<IpAddr, Record>>>,
    by_user: Arc<Mutex<HashMap<String, Record>>>,
    shared: Option<Arc<crate::state::SharedState>>,
}

/// How an attempt got past one record: freely, or holding its gate.
#[derive(Debug)]
enum Pass {
    Free,
    Gated(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>),
}

/// One login attempt admitted by the throttle; report how it went.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottler,
    ip: IpAddr,
    user: String,
    passes: [Pass; 2],
}

impl Attempt<'_> {
    /// Records a failed login; returns how long to wait before answering.
    /// Keep the attempt alive while waiting: gated attempts behind it wait too.
    pub async fn failed(&self) -> Duration {
        let local = self.throttle.count_failure(self.ip, &self.user);
        let fleet = match &self.throttle.shared {
            Some(shared) if shared.is_up() => {
                match shared.fail(self.ip, &self.user, self.throttle.config.forget_after).await {
                    Ok((by_ip, by_user)) => {
                        self.throttle.adopt(self.ip, &self.user, by_ip, by_user);
                        by_ip.max(by_user)
                    }
                    Err(_) => 0,
                }
            }
            _ => 0,
        };
        self.throttle.delay_for(local.max(fleet))
    }

    /// A successful login clears the username's record (not the address's:
    /// one good password must not let an address keep guessing others).
    pub fn succeeded(&self) {
        self.throttle.succeeded(&self.user);
        if let Some(shared) = self.throttle.shared.clone().filter(|s| s.is_up()) {
            let user = self.user.clone();
            tokio::spawn(async move {
                let _ = shared.clear_user(&user).await;
            });
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Pass::Free = self.passes[0] {
            LoginThrottler::leave(&self.throttle.by_ip, &self.ip);
        }
        if let Pass::Free = self.passes[1] {
            LoginThrottler::leave(&self.throttle.by_user, &self.user);
        }
    }
}

impl LoginThrottler {
    pub fn new(config: LoginThrottle) -> Self {
        LoginThrottler { config, by_ip: Arc::default(), by_user: Arc::default(), shared: None }
    }

    /// New settings over the same records (a reload): failures already
    /// counted, attempts waiting at a gate and the fleet's shared counts
    /// carry over.
    pub fn with_config(&self, config: LoginThrottle) -> Self {
        LoginThrottler { config, by_ip: self.by_ip.clone(), by_user: self.by_user.clone(), shared: self.shared.clone() }
    }

    /// Counts failures for the whole fleet in the shared state as well.
    pub fn with_shared(mut self, shared: Option<Arc<crate::state::SharedState>>) -> Self {
        self.shared = shared;
        self
    }

    /// Takes the fleet's counts where they are higher than this replica's,
    /// as failures seen just now (they are forgotten `forget_after` later).
    fn adopt(&self, ip: IpAddr, user: &str, by_ip: u32, by_user: u32) {
        let now = Instant::now();
        if by_ip > 0 {
            self.raise(&mut self.by_ip.lock().unwrap_or_else(|e| e.into_inner()), &ip, by_ip, now);
        }
        if by_user > 0 {
            self.raise(&mut self.by_user.lock().unwrap_or_else(|e| e.into_inner()), &user.to_string(), by_user, now);
        }
    }

    fn raise<K: Hash + Eq + Clone>(&self, map: &mut HashMap<K, Record>, key: &K, n: u32, now: Instant) {
        let record = self.record(map, key, now);
        if n > record.failures {
            record.failures = n;
            record.last = now;
        }
    }

    /// Admits an attempt from `ip` for `username`, waiting behind the
    /// attempts before it once either is out of free failures. The address
    /// is always passed first, so two attempts never wait for each other.
    pub async fn admit(&self, ip: IpAddr, username: &str) -> Attempt<'_> {
        let user = username.to_lowercase();
        if let Some(shared) = self.shared.as_ref().filter(|s| s.is_up()) {
            if let Ok((by_ip, by_user)) = shared.failures(ip, &user).await {
                self.adopt(ip, &user, by_ip, by_user);
            }
        }
        let by_ip = self.pass(&self.by_ip, &ip).await;
        let by_user = self.pass(&self.by_user, &user).await;
        Attempt { throttle: self, ip, user, passes: [by_ip, by_user] }
    }

    async fn pass<K: Hash + Eq + Clone>(&self, map: &Mutex<HashMap<K, Record>>, key: &K) -> Pass {
        let gate = {
            let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
            let record = self.record(&mut map, key, Instant::now());
            if record.failures + record.in_flight < self.config.free_failures.max(1) {
                record.in_flight += 1;
                return Pass::Free;
            }
            record.gate.clone()
        };
        Pass::Gated(gate.lock_owned().await)
    }

    fn leave<K: Hash + Eq>(map: &Mutex<HashMap<K, Record>>, key: &K) {
        if let Some(record) = map.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key) {
            record.in_flight = record.in_flight.saturating_sub(1);
        }
    }

    fn prune<K: Hash + Eq>(&self, map: &mut HashMap<K, Record>, now: Instant) {
        if map.len() >= MAX_RECORDS {
            let forget = self.config.forget_after;
            map.retain(|_, r| r.in_flight > 0 || now.duration_since(r.last) < forget);
            if map.len() >= MAX_RECORDS {
                map.retain(|_, r| r.in_flight > 0);
            }
        }
    }

    /// The record for `key`, its failures forgotten if they are old enough.
    fn record<'m, K: Hash + Eq + Clone>(
        &self,
        map: &'m mut HashMap<K, Record>,
        key: &K,
        now: Instant,
    ) -> &'m mut Record {
        self.prune(map, now);
        let record = map.entry(key.clone()).or_insert_with(|| Record::new(now));
        if now.duration_since(record.last) >= self.config.forget_after {
            record.failures = 0;
        }
        record
    }

    fn bump<K: Hash + Eq + Clone>(&self, map: &Mutex<HashMap<K, Record>>, key: &K) -> u32 {
        let now = Instant::now();
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.record(&mut map, key, now);
        record.failures += 1;
        record.last = now;
        record.failures
    }

    /// Records a failed login and returns how long to wait before answering.
    pub fn failed(&self, ip: IpAddr, username: &str) -> Duration {
        self.delay_for(self.count_failure(ip, username))
    }

    /// Records a failed login in this replica's records; the higher count.
    fn count_failure(&self, ip: IpAddr, username: &str) -> u32 {
        let by_ip = self.bump(&self.by_ip, &ip);
        let by_user = self.bump(&self.by_user, &username.to_lowercase());
        by_ip.max(by_user)
    }

    fn delay_for(&self, failures: u32) -> Duration {
        if failures <= self.config.free_failures {
            return Duration::ZERO;
        }
        let doublings = (failures - self.config.free_failures - 1).min(16);
        self.config.initial_delay.saturating_mul(1 << doublings).min(self.config.max_delay)
    }

    /// A successful login clears the username's record.
    pub fn succeeded(&self, username: &str) {
        self.by_user.lock().unwrap_or_else(|e| e.into_inner()).remove(&username.to_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_caps_total_and_per_address() {
        let limiter = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = limiter.try_admit(a).unwrap();
        let _g2 = limiter.try_admit(a).unwrap();
        assert_eq!(limiter.try_admit(a).unwrap_err(), Refusal::AddressFull);
        let _g3 = limiter.try_admit(b).unwrap();
        assert_eq!(limiter.try_admit(b).unwrap_err(), Refusal::ListenerFull);
        assert_eq!(limiter.open(), 3);
        drop(g1);
        assert_eq!(limiter.open(), 2);
        let _g4 = limiter.try_admit(b).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn mailbox_caps_are_per_protocol_ignore_case_and_wait_in_order() {
        let limiter = MailboxLimiter::new();
        let wait = Duration::from_secs(20);
        let (g1, _) = limiter.acquire(Protocol::Smtp, "Scanner@Contoso.com", 2, wait).await.unwrap();
        let (_g2, _) = limiter.acquire(Protocol::Smtp, "scanner@contoso.com", 2, wait).await.unwrap();
        // Another protocol, or another mailbox, has its own places.
        let (_imap, waited) = limiter.acquire(Protocol::Imap, "scanner@contoso.com", 2, wait).await.unwrap();
        assert_eq!(waited, Duration::ZERO);
        assert!(limiter.acquire(Protocol::Smtp, "other@contoso.com", 2, wait).await.is_ok());
        // Over the cap: wait, first come first served.
        let l = Arc::new(limiter);
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let l = l.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(i)).await;
                    let (guard, waited) = l.acquire(Protocol::Smtp, "SCANNER@contoso.com", 2, wait).await.unwrap();
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    drop(guard);
                    (i, waited.as_secs_f64().round() as u64)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(l.open(Protocol::Smtp, "scanner@contoso.com"), 2);
        drop(g1);
        let mut got = Vec::new();
        for w in waiters {
            got.push(w.await.unwrap());
        }
        // The first waiter gets g1's place after 1 s; the next ones each a
        // place freed 5 s later; never more than 2 open.
        assert_eq!(got, [(0, 1), (1, 6), (2, 11)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_runs_out_and_leaves_no_trace() {
        let limiter = MailboxLimiter::new();
        let (g, _) = limiter.acquire(Protocol::Pop3, "m", 1, Duration::ZERO).await.unwrap();
        assert_eq!(limiter.acquire(Protocol::Pop3, "m", 1, Duration::from_secs(3)).await.unwrap_err(), MailboxBusy);
        drop(g);
        assert_eq!(limiter.open(Protocol::Pop3, "m"), 0);
        assert!(limiter.slots.lock().unwrap().is_empty());
    }

    fn throttler() -> LoginThrottler {
        LoginThrottler::new(LoginThrottle {
            free_failures: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            forget_after: Duration::from_secs(900),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_per_address_and_per_username_then_are_forgotten() {
        let t = throttler();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let delays: Vec<u64> = (0..8).map(|_| t.failed(ip, "printer").as_secs()).collect();
        assert_eq!(delays, [0, 0, 0, 1, 2, 4, 8, 8]);
        // Another address trying the same username is slowed too...
        assert_eq!(t.failed("192.0.2.2".parse().unwrap(), "PRINTER"), Duration::from_secs(8));
        // ...and the same address trying other usernames.
        assert_eq!(t.failed(ip, "someone-else"), Duration::from_secs(8));
        t.succeeded("printer");
        assert_eq!(t.failed("192.0.2.3".parse().unwrap(), "printer"), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(901)).await;
        assert_eq!(t.failed(ip, "fresh"), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_attempts_from_one_address_wait_behind_each_other() {
        let t = Arc::new(throttler());
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let started = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let t = t.clone();
                tokio::spawn(async move {
                    let attempt = t.admit(ip, &format!("guess{i}")).await;
                    let delay = attempt.failed().await;
                    tokio::time::sleep(delay).await;
                    started.elapsed()
                })
            })
            .collect();
        let mut answered = Vec::new();
        for task in tasks {
            answered.push(task.await.unwrap().as_secs());
        }
        answered.sort();
        // Three free attempts at once; then one at a time, each after the
        // delay the one before earned (1, 2, 4, 8, 8... with an 8 s cap).
        assert_eq!(answered, [0, 0, 0, 1, 3, 7, 15, 23, 31, 39]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_attempt_gives_its_place_back() {
        let t = throttler();
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        for _ in 0..5 {
            drop(t.admit(ip, "u").await);
        }
        // None of those failed: the address still has its free attempts.
        let a = t.admit(ip, "u").await;
        let b = t.admit(ip, "v").await;
        assert!(matches!((&a.passes[0], &b.passes[0]), (Pass::Free, Pass::Free)));
    }
}
