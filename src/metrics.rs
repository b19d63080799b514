//! What the admin listener's `/metrics` shows: one Prometheus registry per
//! proxy, and typed handles for the places that count.
//!
//! The session path never looks a label up: each listener gets its handles
//! resolved once ([`ListenerMetrics`], built when the listener is set up or
//! reloaded), so an event costs one atomic add. Values that already live
//! elsewhere (token lifetimes, the password verification pool, the process's
//! descriptors) are read when a scrape asks ([`Metrics::render`]).
//!
//! Names follow Prometheus' conventions: the `xoauth2_proxy_` prefix, base
//! units (seconds, bytes), `_total` on counters. Labels hold only names from
//! the configuration (listener, identity, account username) and fixed
//! words, never a mailbox or a client address: their number is bounded by
//! the config.

use crate::token::TokenError;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

const PREFIX: &str = "xoauth2_proxy";

/// How a login the pre-auth dialogue handed over ended (the `result` label
/// of `xoauth2_proxy_logins_total`). Every failure the session can answer a
/// login with maps to one of these (see the README, "Observability").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginResult {
    /// Accepted locally and upstream; the session is spliced.
    Ok,
    /// Wrong local username or password.
    BadCredentials,
    /// The upstream answered with a temporary failure (Exchange throttling).
    Throttled,
    /// No access token: the token endpoint fails, or a delegated account
    /// must sign in again.
    TokenUnavailable,
    /// The upstream refused the token, even a fresh one.
    UpstreamRefused,
    /// The upstream could not be reached, or its TLS failed.
    UpstreamUnavailable,
    /// One of the proxy's own bounds: `max_sessions_per_mailbox`, password
    /// verification overloaded, `login_deadline`, out of descriptors, the
    /// shutdown deadline.
    Limit,
}

impl LoginResult {
    pub const ALL: [LoginResult; 7] = [
        LoginResult::Ok,
        LoginResult::BadCredentials,
        LoginResult::Throttled,
        LoginResult::TokenUnavailable,
        LoginResult::UpstreamRefused,
        LoginResult::UpstreamUnavailable,
        LoginResult::Limit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginResult::Ok => "ok",
            LoginResult::BadCredentials => "bad_credentials",
            LoginResult::Throttled => "throttled",
            LoginResult::TokenUnavailable => "token_unavailable",
            LoginResult::UpstreamRefused => "upstream_refused",
            LoginResult::UpstreamUnavailable => "upstream_unavailable",
            LoginResult::Limit => "limit",
        }
    }
}

/// Where a session is (the `phase` label of `xoauth2_proxy_sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Talking to the proxy: greeting, capabilities, STARTTLS, login commands.
    PreAuth,
    /// Its login is being carried out: password check, token, upstream login.
    Authenticating,
    /// Logged in; bytes flow between client and upstream.
    Spliced,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::PreAuth, Phase::Authenticating, Phase::Spliced];

    fn as_str(self) -> &'static str {
        match self {
            Phase::PreAuth => "pre_auth",
            Phase::Authenticating => "authenticating",
            Phase::Spliced => "spliced",
        }
    }
}

/// Why a connection was turned away at accept (the `reason` label of
/// `xoauth2_proxy_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The client's address is not in the listener's `allow_from`.
    AllowFrom,
    /// The listener has `max_connections` open.
    MaxConnections,
    /// The client's address has `max_connections_per_ip` open.
    MaxConnectionsPerIp,
    /// The proxy is out of descriptors or memory.
    Resources,
    /// A `proxy_protocol` listener: the peer is not in `proxy_protocol_from`,
    /// or sent no valid PROXY header.
    ProxyProtocol,
}

impl Refused {
    const ALL: [Refused; 5] = [
        Refused::AllowFrom,
        Refused::MaxConnections,
        Refused::MaxConnectionsPerIp,
        Refused::Resources,
        Refused::ProxyProtocol,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refused::AllowFrom => "allow_from",
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerIp => "max_connections_per_ip",
            Refused::Resources => "resources",
            Refused::ProxyProtocol => "proxy_protocol",
        }
    }
}

/// How a request to the token endpoint ended (the `result` label of
/// `xoauth2_proxy_token_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenResult {
    Ok,
    /// Entra refused the app's request (a wrong secret, missing consent...).
    Refused,
    /// A delegated account must sign in again (`invalid_grant`, never signed in).
    ReauthRequired,
    /// The endpoint did not answer usefully: unreachable, too slow, HTTP 5xx.
    Unavailable,
    /// Anything else: an unusable answer, a local problem (secret file, token
    /// store, client assertion).
    Error,
}

impl TokenResult {
    const ALL: [TokenResult; 5] = [
        TokenResult::Ok,
        TokenResult::Refused,
        TokenResult::ReauthRequired,
        TokenResult::Unavailable,
        TokenResult::Error,
    ];

    fn as_str(self) -> &'static str {
        match self {
            TokenResult::Ok => "ok",
            TokenResult::Refused => "refused",
            TokenResult::ReauthRequired => "reauth_required",
            TokenResult::Unavailable => "unavailable",
            TokenResult::Error => "error",
        }
    }

    pub fn of(outcome: Result<(), &TokenError>) -> TokenResult {
        let Err(e) = outcome else { return TokenResult::Ok };
        if e.requires_reauthorization() {
            return TokenResult::ReauthRequired;
        }
        match e {
            TokenError::Unreachable(_) | TokenError::Timeout(_) | TokenError::Server { .. } => TokenResult::Unavailable,
            TokenError::Entra(_) => TokenResult::Refused,
            _ => TokenResult::Error,
        }
    }
}

/// Upstream logins: connect, TLS, the protocol's dialogue and XOAUTH2.
const UPSTREAM_LOGIN_BUCKETS: &[f64] = &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Spliced sessions: a printer's one message to an archiver's day-long IDLE.
const SESSION_BUCKETS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0];
/// Waiting for a mailbox's session place.
const WAIT_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The registry and every metric family the proxy exports.
pub struct Metrics {
    registry: Registry,
    accepted: IntCounterVec,
    refused: IntCounterVec,
    sessions: IntGaugeVec,
    logins: IntCounterVec,
    spliced_bytes: IntCounterVec,
    upstream_login: HistogramVec,
    session_duration: HistogramVec,
    mailbox_wait: HistogramVec,
    token_requests: IntCounterVec,
    token_expires_in: IntGaugeVec,
    verifications: IntCounter,
    reloads: IntCounterVec,
    open_fds: IntGauge,
    max_fds: IntGauge,
    resident_memory: IntGauge,
    /// 1 while the shared state (`state:`) is in use; absent without it.
    shared_state_up: IntGaugeVec,
    /// Scrape-time values are reset and refilled: one scrape at a time.
    scrape: Mutex<()>,
}

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        fn add<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> Result<C, prometheus::Error> {
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let counter = |n: &str, help: &str, labels: &[&str]| {
            add(&registry, IntCounterVec::new(Opts::new(name(n), help), labels)?)
        };
        let histogram = |n: &str, help: &str, buckets: &[f64]| {
            add(
                &registry,
                HistogramVec::new(HistogramOpts::new(name(n), help).buckets(buckets.to_vec()), &["listener"])?,
            )
        };
        let gauge = |n: &str, help: &str| add(&registry, IntGauge::new(n, help)?);
        let metrics = Metrics {
            accepted: counter("connections_accepted_total", "Connections admitted to a session.", &["listener"])?,
            refused: counter(
                "connections_refused_total",
                "Connections turned away at accept, by reason.",
                &["listener", "reason"],
            )?,
            sessions: add(
                &registry,
                IntGaugeVec::new(
                    Opts::new(name("sessions"), "Open sessions, by phase (pre_auth, authenticating, spliced)."),
                    &["listener", "phase"],
                )?,
            )?,
            logins: counter("logins_total", "Logins carried out, by result.", &["listener", "result"])?,
            spliced_bytes: counter(
                "spliced_bytes_total",
                "Bytes passed between client and upstream after login, counted when the session ends.",
                &["listener", "direction"],
            )?,
            upstream_login: histogram(
                "upstream_login_duration_seconds",
                "Time of one upstream login attempt: connect, TLS, the protocol's dialogue, XOAUTH2.",
                UPSTREAM_LOGIN_BUCKETS,
            )?,
            session_duration: histogram(
                "session_duration_seconds",
                "Length of spliced sessions, from login to close.",
                SESSION_BUCKETS,
            )?,
            mailbox_wait: histogram(
                "mailbox_slot_wait_seconds",
                "Time a login waited for a place under its mailbox's session cap.",
                WAIT_BUCKETS,
            )?,
            token_requests: counter(
                "token_requests_total",
                "Requests to the token endpoint, by identity and result.",
                &["identity", "result"],
            )?,
            token_expires_in: add(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        name("token_expires_in_seconds"),
                        "Seconds until each cached access token expires (account: the username, for delegated identities).",
                    ),
                    &["identity", "account"],
                )?,
            )?,
            verifications: add(
                &registry,
                IntCounter::new(
                    name("password_verifications_total"),
                    "argon2 verifications computed by the pool (not shared with an identical attempt, not remembered).",
                )?,
            )?,
            reloads: counter("config_reloads_total", "Configuration reloads (SIGHUP), by result.", &["result"])?,
            open_fds: gauge("process_open_fds", "Open file descriptors.")?,
            max_fds: gauge("process_max_fds", "The soft limit of open file descriptors.")?,
            resident_memory: gauge("process_resident_memory_bytes", "Resident memory size in bytes.")?,
            shared_state_up: add(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        name("shared_state_up"),
                        "1 while the replicas' shared state (state:) is reachable and in use, 0 while local state serves.",
                    ),
                    &[],
                )?,
            )?,
            registry,
            scrape: Mutex::new(()),
        };
        let info = IntGaugeVec::new(Opts::new(name("build_info"), "The running version."), &["version"])?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics.registry.register(Box::new(info))?;
        for result in ["ok", "failed"] {
            metrics.reloads.with_label_values(&[result]);
        }
        Ok(metrics)
    }

    /// The handles of one listener, every series created (at zero) now.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            accepted: self.accepted.with_label_values(&[listener]),
            refused: Refused::ALL.map(|r| self.refused.with_label_values(&[listener, r.as_str()])),
            sessions: Phase::ALL.map(|p| self.sessions.with_label_values(&[listener, p.as_str()])),
            logins: LoginResult::ALL.map(|r| self.logins.with_label_values(&[listener, r.as_str()])),
            from_client: self.spliced_bytes.with_label_values(&[listener, "from_client"]),
            to_client: self.spliced_bytes.with_label_values(&[listener, "to_client"]),
            upstream_login: self.upstream_login.with_label_values(&[listener]),
            session_duration: self.session_duration.with_label_values(&[listener]),
            mailbox_wait: self.mailbox_wait.with_label_values(&[listener]),
        }
    }

    /// The token request counters of one identity.
    pub fn identity(&self, identity: &str) -> TokenMetrics {
        TokenMetrics {
            requests: TokenResult::ALL.map(|r| self.token_requests.with_label_values(&[identity, r.as_str()])),
        }
    }

    pub fn reloaded(&self, ok: bool) {
        self.reloads.with_label_values(&[if ok { "ok" } else { "failed" }]).inc();
    }

    /// The exposition in the classic text format (`text/plain; version=0.0.4`),
    /// with the scrape-time values from `now` first.
    pub fn render(&self, now: &Snapshot) -> Vec<u8> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.token_expires_in.reset();
        for (identity, account, remaining) in &now.tokens {
            let seconds = i64::try_from(remaining.as_secs()).unwrap_or(i64::MAX);
            self.token_expires_in.with_label_values(&[identity.as_str(), account.as_str()]).set(seconds);
        }
        let counted = self.verifications.get();
        self.verifications.inc_by(now.verifications.saturating_sub(counted));
        let process = Process::read();
        self.open_fds.set(process.open_fds);
        self.max_fds.set(process.max_fds);
        self.resident_memory.set(process.resident_bytes);
        self.shared_state_up.reset();
        if let Some(up) = now.shared_state_up {
            self.shared_state_up.with_label_values::<&str>(&[]).set(i64::from(up));
        }
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for lack of room; names and labels
        // were checked when the families were registered.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// Scrape-time values the metrics module does not own.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (identity, account or "", time left) per cached token.
    pub tokens: Vec<(String, String, Duration)>,
    /// Verifications the password pool has computed, ever (it is replaced
    /// only when `password_verification` changes; the counter never goes back).
    pub verifications: u64,
    /// With `state:`: whether the shared state is in use now.
    pub shared_state_up: Option<bool>,
}

/// The process's own descriptors and memory, as the Prometheus client
/// libraries' `process_*` metrics report them (without their collector,
/// which needs the procfs crate).
struct Process {
    open_fds: i64,
    max_fds: i64,
    resident_bytes: i64,
}

impl Process {
    fn read() -> Process {
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let max_fds = limit.current.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX));
        // statm: size resident shared ... in pages.
        let resident_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|n| n.parse::<i64>().ok()))
            .unwrap_or(0);
        let page = i64::try_from(rustix::param::page_size()).unwrap_or(4096);
        Process { open_fds, max_fds, resident_bytes: resident_pages.saturating_mul(page) }
    }
}

/// One listener's handles, resolved once.
#[derive(Clone)]
pub struct ListenerMetrics {
    accepted: IntCounter,
    refused: [IntCounter; 5],
    sessions: [IntGauge; 3],
    logins: [IntCounter; 7],
    from_client: IntCounter,
    to_client: IntCounter,
    upstream_login: Histogram,
    session_duration: Histogram,
    mailbox_wait: Histogram,
}

impl ListenerMetrics {
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    pub fn refused(&self, why: Refused) {
        self.refused[why as usize].inc();
    }

    /// Counts a new session in the pre-auth phase until the guard is dropped.
    pub fn session(&self) -> PhaseGuard {
        let phase = Phase::PreAuth;
        self.sessions[phase as usize].inc();
        PhaseGuard { sessions: self.sessions.clone(), phase }
    }

    pub fn login(&self, result: LoginResult) {
        self.logins[result as usize].inc();
    }

    /// Runs one upstream login and records how long it took.
    pub async fn timed<T>(&self, login: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let result = login.await;
        self.upstream_login.observe(started.elapsed().as_secs_f64());
        result
    }

    /// A spliced session ended: its bytes each way and its length.
    pub fn spliced(&self, stats: &crate::splice::SpliceStats) {
        self.from_client.inc_by(stats.client_to_upstream);
        self.to_client.inc_by(stats.upstream_to_client);
        self.session_duration.observe(stats.duration.as_secs_f64());
    }

    /// A login waited `waited` for its mailbox's session place (only logins
    /// that found the cap reached: the others take a place at once).
    pub fn mailbox_slot_waited(&self, waited: Duration) {
        self.mailbox_wait.observe(waited.as_secs_f64());
    }
}

/// Keeps a session counted in its current phase.
pub struct PhaseGuard {
    sessions: [IntGauge; 3],
    phase: Phase,
}

impl PhaseGuard {
    pub fn enter(&mut self, phase: Phase) {
        if phase != self.phase {
            self.sessions[self.phase as usize].dec();
            self.sessions[phase as usize].inc();
            self.phase = phase;
        }
    }
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        self.sessions[self.phase as usize].dec();
    }
}

/// One identity's token request counters.
#[derive(Clone)]
pub struct TokenMetrics {
    requests: [IntCounter; 5],
}

impl TokenMetrics {
    pub fn request(&self, outcome: Result<(), &TokenError>) {
        self.requests[TokenResult::of(outcome) as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::EntraError;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render(&Snapshot::default())).unwrap()
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_series_of_a_listener_exists_at_zero_then_counts() {
        let m = Metrics::new().unwrap();
        let l = m.listener("smtp");
        let t = text(&m);
        for result in LoginResult::ALL {
            let series = format!("xoauth2_proxy_logins_total{{listener=\"smtp\",result=\"{}\"}}", result.as_str());
            assert_eq!(value(&t, &series), Some(0.0), "{series} in\n{t}");
        }
        l.login(LoginResult::Ok);
        l.login(LoginResult::Ok);
        l.login(LoginResult::Limit);
        l.refused(Refused::MaxConnectionsPerIp);
        let t = text(&m);
        assert_eq!(value(&t, "xoauth2_proxy_logins_total{listener=\"smtp\",result=\"ok\"}"), Some(2.0));
        assert_eq!(value(&t, "xoauth2_proxy_logins_total{listener=\"smtp\",result=\"limit\"}"), Some(1.0));
        assert_eq!(
            value(&t, "xoauth2_proxy_connections_refused_total{listener=\"smtp\",reason=\"max_connections_per_ip\"}"),
            Some(1.0)
        );
        assert!(t.contains("# TYPE xoauth2_proxy_upstream_login_duration_seconds histogram"), "{t}");
    }

    #[test]
    fn a_session_is_counted_in_one_phase_at_a_time() {
        let m = Metrics::new().unwrap();
        let l = m.listener("imap");
        let phase = |p: &str| value(&text(&m), &format!("xoauth2_proxy_sessions{{listener=\"imap\",phase=\"{p}\"}}"));
        let mut guard = l.session();
        assert_eq!(phase("pre_auth"), Some(1.0));
        guard.enter(Phase::Authenticating);
        guard.enter(Phase::Authenticating);
        assert_eq!((phase("pre_auth"), phase("authenticating")), (Some(0.0), Some(1.0)));
        guard.enter(Phase::Spliced);
        assert_eq!((phase("authenticating"), phase("spliced")), (Some(0.0), Some(1.0)));
        drop(guard);
        assert_eq!(phase("spliced"), Some(0.0));
    }

    #[test]
    fn token_errors_map_to_results() {
        let entra = |error: &str| {
            TokenError::Entra(EntraError {
                status: 400,
                error: error.into(),
                description: String::new(),
                codes: vec![],
            })
        };
        assert_eq!(TokenResult::of(Ok(())), TokenResult::Ok);
        assert_eq!(TokenResult::of(Err(&entra("invalid_client"))), TokenResult::Refused);
        assert_eq!(TokenResult::of(Err(&entra("invalid_grant"))), TokenResult::ReauthRequired);
        assert_eq!(TokenResult::of(Err(&TokenError::Timeout(Duration::from_secs(1)))), TokenResult::Unavailable);
        assert_eq!(
            TokenResult::of(Err(&TokenError::Server { status: 503, detail: String::new() })),
            TokenResult::Unavailable
        );
        assert_eq!(TokenResult::of(Err(&TokenError::Malformed("x".into()))), TokenResult::Error);
    }

    #[test]
    fn scrape_time_values_replace_the_previous_ones() {
        let m = Metrics::new().unwrap();
        let snapshot = Snapshot {
            tokens: vec![("contoso".into(), String::new(), Duration::from_secs(3000))],
            verifications: 7,
            shared_state_up: Some(false),
        };
        let t = String::from_utf8(m.render(&snapshot)).unwrap();
        assert_eq!(
            value(&t, "xoauth2_proxy_token_expires_in_seconds{account=\"\",identity=\"contoso\"}"),
            Some(3000.0)
        );
        assert_eq!(value(&t, "xoauth2_proxy_password_verifications_total"), Some(7.0));
        assert_eq!(value(&t, "xoauth2_proxy_shared_state_up"), Some(0.0));
        // The identity is gone (a reload), the pool counted more.
        let t =
            String::from_utf8(m.render(&Snapshot { tokens: vec![], verifications: 9, shared_state_up: None })).unwrap();
        assert!(!t.contains("token_expires_in_seconds{"), "{t}");
        assert!(!t.contains("xoauth2_proxy_shared_state_up "), "{t}");
        assert_eq!(value(&t, "xoauth2_proxy_password_verifications_total"), Some(9.0));
        assert!(value(&t, "process_open_fds").is_some_and(|n| n > 0.0), "{t}");
    }
}
