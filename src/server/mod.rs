//! The listeners: bind, accept, one task per connection, graceful drain;
//! and reloads that replace the whole configuration under running sessions.
//!
//! # Reloads
//!
//! What sessions use is one generation: a [`ListenerCtx`] per listener and
//! the [`Shared`] state they point to. A reload builds the next generation
//! beside the running one, with everything that can fail done first (files
//! read, token sources built, new addresses bound); only then does it swap
//! the generations, which cannot fail. Sessions hold an `Arc` of the
//! context they were accepted with, so they finish with the settings they
//! started with; new connections get the new ones. What must stay true across
//! generations is carried over rather than rebuilt: sockets whose address did
//! not change (the backlog is never closed), connection counts, the
//! mailbox slots (this process's or the fleet's, with the logins waiting
//! for one), the login throttle's records, the link to the shared state
//! (`state:` connects at start only), each TLS listener's acceptor (it
//! takes the re-read certificate), cached tokens of identities whose
//! settings did not change, the verification pool and its memory of recent
//! logins (unless `password_verification` changed), learned capabilities.

mod balancer;
mod caps;
pub mod fleet;
pub mod limits;
mod local_tls;
mod session;
mod stream;

use crate::accounts::Accounts;
use crate::config::{Config, ListenerConfig, LocalTls as LocalTlsMode, PasswordVerification};
use crate::metrics::{ListenerMetrics, Metrics, Refused};
use crate::protocol::{Failure, Spec, WithSpec};
use crate::tls::{self, TlsError};
use crate::token::{Applied, IdentityPlan, TokenError, TokenManager};
use crate::upstream::{BadServerName, Upstream};
use crate::verifier::Verifier;
use caps::CapabilityCache;
use limits::{ConnectionLimiter, LoginThrottler, MailboxLimiter, Refusal};
use local_tls::{Certificates, LocalTls};
use rustls::ClientConfig;
use session::Signals;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// How long sessions get to wind down once the shutdown deadline has passed.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// State shared by every listener of one generation.
pub struct Shared {
    accounts: RwLock<Arc<Accounts>>,
    /// One for the process: a reload updates its identities in place.
    pub tokens: TokenManager,
    /// Kept across reloads, with its memory of recent successful logins,
    /// unless `password_verification` changes.
    pub verifier: Verifier,
    pub throttle: LoginThrottler,
    /// Upstream sessions per mailbox: this process's counts, or the
    /// fleet's (`state:`), behind one interface.
    pub mailboxes: Arc<dyn fleet::SessionSlots>,
    /// With `state:`, the link to the replicas' Redis.
    pub state: Option<Arc<crate::state::SharedState>>,
}

impl Shared {
    pub fn accounts(&self) -> Arc<Accounts> {
        self.accounts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Everything a session on one listener needs.
pub struct ListenerCtx {
    pub config: ListenerConfig,
    pub upstream: Upstream,
    caps: Arc<CapabilityCache>,
    pub shared: Arc<Shared>,
    local_tls: Option<LocalTls>,
    connections: ConnectionLimiter,
    pub metrics: ListenerMetrics,
}

/// Why the proxy cannot start, or a reload cannot apply.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsError),
    #[error("token endpoint setup: {0}")]
    Token(#[from] TokenError),
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
    #[error("admin listener: cannot listen on {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: std::io::Error },
    #[error("listener {listener}: {source}")]
    Listener { listener: String, source: BadServerName },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("the reload was interrupted")]
    Interrupted,
    #[error("state: {0}")]
    State(#[from] crate::state::StateError),
}

/// A listener's socket and the accept loop serving it.
struct Bound {
    ctx: Arc<ListenerCtx>,
    socket: Arc<TcpListener>,
    addr: SocketAddr,
    /// Stops this accept loop only (a child of the drain signal).
    stop: CancellationToken,
}

/// The admin listener's socket and its server.
struct AdminBound {
    /// As configured (port 0 stays 0), to tell whether a reload moves it.
    bind: SocketAddr,
    socket: Arc<TcpListener>,
    addr: SocketAddr,
    stop: CancellationToken,
}

/// The running generation and what a reload compares against.
struct Running {
    listeners: Vec<Bound>,
    admin: Option<AdminBound>,
    shared: Arc<Shared>,
    /// Every listener's local TLS acceptor, re-read by a reload.
    certificates: Certificates,
    /// As the process started: the shared state connects at start only.
    state: Option<crate::config::StateConfig>,
    shutdown_timeout: Duration,
    password_verification: PasswordVerification,
    /// Verifications computed by pools a reload replaced, so the metric
    /// keeps counting up.
    retired_verifications: u64,
    /// `run` has started the accept loops; before, a reload only swaps.
    started: bool,
}

struct Core {
    running: Mutex<Running>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    signals: Signals,
    /// Accept loops and sessions, drained at shutdown.
    tracker: TaskTracker,
    /// The admin server, stopped after the drain (`/readyz` says so meanwhile).
    admin_tasks: TaskTracker,
    metrics: Arc<Metrics>,
    tokens: TokenManager,
}

pub struct Proxy {
    core: Arc<Core>,
}

fn bind_listener(l: &ListenerConfig) -> Result<(Arc<TcpListener>, SocketAddr), StartError> {
    let fail = |source| StartError::Bind { listener: l.name.clone(), addr: l.bind, source };
    let socket = listen(l).map_err(fail)?;
    let addr = socket.local_addr().map_err(fail)?;
    Ok((Arc::new(socket), addr))
}

async fn bind_admin(bind: SocketAddr) -> Result<AdminBound, StartError> {
    let fail = |source| StartError::AdminBind { addr: bind, source };
    let socket = TcpListener::bind(bind).await.map_err(fail)?;
    let addr = socket.local_addr().map_err(fail)?;
    Ok(AdminBound { bind, socket: Arc::new(socket), addr, stop: CancellationToken::new() })
}

/// One listener's context in a new generation; `previous` is the running
/// listener of the same name, whose counts and learned capabilities carry over.
fn listener_ctx(
    l: &ListenerConfig,
    client_tls: &Arc<ClientConfig>,
    shared: &Arc<Shared>,
    local_tls: Option<LocalTls>,
    metrics: &Metrics,
    previous: Option<&ListenerCtx>,
) -> Result<ListenerCtx, StartError> {
    let upstream = Upstream::new(l, client_tls.clone())
        .map_err(|source| StartError::Listener { listener: l.name.clone(), source })?;
    let (max, per_ip) = (l.limits.max_connections, l.limits.max_connections_per_ip);
    let same_upstream = |p: &&ListenerCtx| {
        p.config.protocol == l.protocol && p.config.upstream == l.upstream && p.config.upstream_tls == l.upstream_tls
    };
    Ok(ListenerCtx {
        config: l.clone(),
        upstream,
        caps: previous.filter(same_upstream).map_or_else(Arc::default, |p| p.caps.clone()),
        shared: shared.clone(),
        local_tls,
        connections: previous
            .map_or_else(|| ConnectionLimiter::new(max, per_ip), |p| p.connections.with_limits(max, per_ip)),
        metrics: metrics.listener(&l.name),
    })
}

impl Proxy {
    /// Builds the shared state and binds every listener (and the admin
    /// listener); nothing is accepted until [`Proxy::run`].
    pub async fn bind(config: &Config) -> Result<Proxy, StartError> {
        tls::install_default_provider();
        let metrics = Arc::new(Metrics::new()?);
        let client_tls = tls::client_config(config.upstream_ca_file.as_deref())?;
        let state = match &config.state {
            Some(state) => Some(crate::state::SharedState::connect(state).await?),
            None => None,
        };
        let tokens = crate::token::manager_counted(
            config,
            crate::token::shared_context_for(config, client_tls.clone(), state.clone())?,
            Some(metrics.clone()),
        )?;
        let accounts = Accounts::from_config(config);
        let verifier = Verifier::start(&config.password_verification);
        let shared = Arc::new(Shared {
            accounts: RwLock::new(Arc::new(accounts)),
            tokens: tokens.clone(),
            verifier,
            throttle: LoginThrottler::new(config.login_throttle.clone()).with_shared(state.clone()),
            mailboxes: match &state {
                Some(state) => Arc::new(fleet::FleetSlots::new(state.clone(), Arc::new(MailboxLimiter::new()))),
                None => Arc::new(MailboxLimiter::new()),
            },
            state,
        });
        let certificates = Certificates::default().stage(Certificates::load(config)?);
        let signals = Signals::new();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let (socket, addr) = bind_listener(l)?;
            let ctx = listener_ctx(l, &client_tls, &shared, certificates.for_listener(l), &metrics, None)?;
            listeners.push(Bound { ctx: Arc::new(ctx), socket, addr, stop: signals.drain.child_token() });
        }
        let admin = match &config.admin {
            Some(admin) => Some(bind_admin(admin.bind).await?),
            None => None,
        };
        let running = Running {
            listeners,
            admin,
            shared,
            certificates: certificates.commit().0,
            state: config.state.clone(),
            shutdown_timeout: config.shutdown_timeout,
            password_verification: config.password_verification.clone(),
            retired_verifications: 0,
            started: false,
        };
        let core = Core {
            running: Mutex::new(running),
            reloading: tokio::sync::Mutex::new(()),
            signals,
            tracker: TaskTracker::new(),
            admin_tasks: TaskTracker::new(),
            metrics,
            tokens,
        };
        Ok(Proxy { core: Arc::new(core) })
    }

    /// Starts obtaining tokens for every delegated account, so their refresh
    /// tokens stay in use even when no client logs in for months.
    pub fn warm_up_delegated(&self, config: &Config) {
        warm_up_delegated(&self.core.tokens, config);
    }

    /// The address each listener is bound to (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.core.local_addrs()
    }

    /// The admin listener's address, if it is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.core.admin_addr()
    }

    /// The token cache the sessions use (for the service status line).
    pub fn tokens(&self) -> TokenManager {
        self.core.tokens.clone()
    }

    /// With `state:`, the link to the replicas' Redis: whether it is in use
    /// (`is_up`) is what `/readyz` and the metrics report.
    pub fn shared_state(&self) -> Option<Arc<crate::state::SharedState>> {
        self.core.running.lock().unwrap_or_else(|e| e.into_inner()).shared.state.clone()
    }

    /// A handle that applies a re-read configuration while [`Proxy::run`] owns the proxy.
    pub fn reloader(&self) -> Reloader {
        Reloader { core: self.core.clone() }
    }

    /// Serves until `shutdown` completes, then stops accepting, tells clients
    /// that are still logging in, and lets spliced sessions finish for up to
    /// the shutdown timeout before cutting them. The admin listener serves
    /// throughout (`/readyz` answers 503 while sessions drain).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let core = self.core;
        {
            let mut running = core.running.lock().unwrap_or_else(|e| e.into_inner());
            running.started = true;
            for bound in &running.listeners {
                core.serve_listener(bound, true);
            }
            if let Some(admin) = &running.admin {
                core.serve_admin(admin);
            }
        }
        shutdown.await;
        let deadline = core.running.lock().unwrap_or_else(|e| e.into_inner()).shutdown_timeout;
        let signals = &core.signals;
        info!(sessions = signals.sessions(), deadline = ?deadline, "shutting down: no new connections");
        signals.drain.cancel();
        // The accept loops end and drop their sockets; these are the last
        // handles: new connection attempts are refused from now on.
        drop(std::mem::take(&mut core.running.lock().unwrap_or_else(|e| e.into_inner()).listeners));
        core.tracker.close();
        if tokio::time::timeout(deadline, core.tracker.wait()).await.is_err() {
            warn!(sessions = signals.sessions(), "shutdown deadline reached; closing the remaining sessions");
            signals.abort.cancel();
            // Every phase watches the abort signal; this bound only guards
            // against a task that does not, so shutdown stays a deadline.
            if tokio::time::timeout(ABORT_GRACE, core.tracker.wait()).await.is_err() {
                warn!(
                    sessions = signals.sessions(),
                    "sessions still running after the shutdown deadline; exiting anyway"
                );
            }
        }
        if let Some(admin) = core.running.lock().unwrap_or_else(|e| e.into_inner()).admin.take() {
            admin.stop.cancel();
        }
        core.admin_tasks.close();
        let _ = tokio::time::timeout(ABORT_GRACE, core.admin_tasks.wait()).await;
        info!("stopped");
    }
}

fn warm_up_delegated(tokens: &TokenManager, config: &Config) {
    let keys = config
        .accounts
        .iter()
        .filter(|a| config.identity(&a.identity).is_some_and(|i| i.flow == crate::config::Flow::RefreshToken))
        .map(|a| tokens.key_for(&a.identity, &a.username))
        .collect();
    tokens.warm_up(keys);
}

impl Core {
    fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.listeners.iter().map(|b| (b.ctx.config.name.clone(), b.addr)).collect()
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).admin.as_ref().map(|a| a.addr)
    }

    /// Starts the accept loop of `bound`; `announce`: log it at info (a new
    /// address), else at debug (the same socket under new settings).
    fn serve_listener(&self, bound: &Bound, announce: bool) {
        let ctx = &bound.ctx;
        if announce {
            info!(
                listener = %ctx.config.name,
                protocol = %ctx.config.protocol,
                bind = %bound.addr,
                upstream = %ctx.upstream.addr,
                "listening"
            );
        } else {
            debug!(listener = %ctx.config.name, bind = %bound.addr, "listening with the reloaded settings");
        }
        self.tracker.spawn(accept_loop(
            bound.socket.clone(),
            ctx.clone(),
            bound.stop.clone(),
            self.signals.clone(),
            self.tracker.clone(),
        ));
    }

    fn serve_admin(self: &Arc<Self>, admin: &AdminBound) {
        info!(bind = %admin.addr, "admin listener: /metrics, /healthz, /readyz");
        let backend: Arc<dyn crate::admin::Backend> = self.clone();
        self.admin_tasks.spawn(crate::admin::serve(
            admin.socket.clone(),
            self.metrics.clone(),
            backend,
            admin.stop.clone(),
        ));
    }
}

impl crate::admin::Backend for Core {
    fn readiness(&self) -> Result<(), String> {
        if self.signals.drain.is_cancelled() {
            return Err("shutting down: draining sessions".into());
        }
        {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if !running.started {
                return Err("starting".into());
            }
            if let Some(b) = running.listeners.iter().find(|b| b.socket.local_addr().is_err()) {
                return Err(format!("listener {} is not bound", b.ctx.config.name));
            }
        }
        self.tokens.readiness()
    }

    /// Ready, but without the fleet's state: this replica serves with local
    /// state (its own caps, counts and token requests), which is why it stays
    /// ready (every replica losing Redis at once must not take them all out).
    fn degraded(&self) -> Option<String> {
        let state = self.running.lock().unwrap_or_else(|e| e.into_inner()).shared.state.clone()?;
        (!state.is_up()).then(|| format!("shared state unreachable ({}): serving with local state", state.url()))
    }

    fn snapshot(&self) -> crate::metrics::Snapshot {
        let (verifications, state) = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            (running.retired_verifications + running.shared.verifier.verifications(), running.shared.state.clone())
        };
        crate::metrics::Snapshot {
            tokens: self.tokens.lifetimes(),
            verifications,
            shared_state_up: state.map(|s| s.is_up()),
        }
    }
}

enum AdminChange {
    Keep,
    Off,
    New(AdminBound),
}

/// What a reload reads from files, built before anything changes.
struct Prepared {
    client_tls: Arc<ClientConfig>,
    certificates: local_tls::Loaded,
    identities: Vec<IdentityPlan>,
}

/// `state`: the shared state the process started with, which new token
/// sources go through like the first ones.
fn prepare(
    config: &Config,
    tokens: &TokenManager,
    state: Option<Arc<crate::state::SharedState>>,
) -> Result<Prepared, StartError> {
    let client_tls = tls::client_config(config.upstream_ca_file.as_deref())?;
    let certificates = Certificates::load(config)?;
    let identities = crate::token::plan_for(config, client_tls.clone(), state, tokens)?;
    Ok(Prepared { client_tls, certificates, identities })
}

/// The kernel's cap on a listener's accept queue (`net.core.somaxconn`);
/// Linux's default since 5.4 where it cannot be read.
fn kernel_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(4096)
}

/// Binds `l.bind` with an accept queue that holds a burst: std and tokio ask
/// for 128, and when a thousand clients connect at once the kernel drops the
/// final ACK of those that do not fit (`ListenOverflows`), leaving them
/// waiting seconds for retransmissions before their greeting. Sets
/// SO_REUSEADDR as std's bind does.
fn listen(l: &ListenerConfig) -> std::io::Result<TcpListener> {
    let kernel = kernel_backlog();
    let backlog = l.limits.listen_backlog.unwrap_or(kernel);
    if backlog > kernel {
        warn!(
            listener = %l.name,
            listen_backlog = backlog,
            "the kernel caps the accept queue at {kernel} (net.core.somaxconn)"
        );
    }
    let socket = if l.bind.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(l.bind)?;
    socket.listen(backlog)
}

/// Applies a reloaded configuration (SIGHUP) to a running proxy.
#[derive(Clone)]
pub struct Reloader {
    core: Arc<Core>,
}

impl Reloader {
    /// Makes `config` the running configuration, all of it, or nothing:
    /// every file is read, every token source built and every new address
    /// bound before anything is replaced; any failure leaves the proxy as
    /// it was. Listeners are added, removed or rebound (an unchanged
    /// address keeps its socket, so no connection attempt is refused);
    /// sessions already running keep the settings they started with, to
    /// their end. Returns what changed, in one line.
    pub async fn reload(&self, config: Config) -> Result<String, StartError> {
        let core = &self.core;
        let _one_at_a_time = core.reloading.lock().await;
        if core.signals.drain.is_cancelled() {
            return Err(StartError::ShuttingDown);
        }
        // Files are read on the blocking pool, not the threads serving clients.
        let tokens = core.tokens.clone();
        let state = core.running.lock().unwrap_or_else(|e| e.into_inner()).shared.state.clone();
        let (config, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = prepare(&config, &tokens, state);
            (config, prepared)
        })
        .await
        .map_err(|_| StartError::Interrupted)?;
        let prepared = prepared?;

        struct Old {
            name: String,
            bind: SocketAddr,
            socket: Arc<TcpListener>,
            addr: SocketAddr,
            ctx: Arc<ListenerCtx>,
        }
        let (old, old_admin, old_shared, certificates, old_pool, state_changed) = {
            let running = core.running.lock().unwrap_or_else(|e| e.into_inner());
            let old: Vec<Old> = running
                .listeners
                .iter()
                .map(|b| Old {
                    name: b.ctx.config.name.clone(),
                    bind: b.ctx.config.bind,
                    socket: b.socket.clone(),
                    addr: b.addr,
                    ctx: b.ctx.clone(),
                })
                .collect();
            let admin = running.admin.as_ref().map(|a| a.bind);
            // The acceptors are only staged here: they change at the swap.
            let certificates = running.certificates.stage(prepared.certificates);
            let state_changed = running.state != config.state;
            (old, admin, running.shared.clone(), certificates, running.password_verification.clone(), state_changed)
        };

        // Sockets: a listener keeps its socket if its name and bind are
        // unchanged, or takes over another's with the same fixed address;
        // any other address is bound now, beside the running ones.
        let mut sockets = Vec::new();
        for l in &config.listeners {
            let same = old.iter().find(|o| o.name == l.name && o.bind == l.bind);
            let taken = same.or_else(|| old.iter().find(|o| l.bind.port() != 0 && o.bind == l.bind));
            sockets.push(match taken {
                Some(o) => (o.socket.clone(), o.addr, false),
                None => {
                    let (socket, addr) = bind_listener(l)?;
                    (socket, addr, true)
                }
            });
        }
        // The admin server keeps running where its address is unchanged.
        let admin = match (&config.admin, old_admin) {
            (None, None) => AdminChange::Keep,
            (None, Some(_)) => AdminChange::Off,
            (Some(want), Some(bind)) if want.bind == bind => AdminChange::Keep,
            (Some(want), _) => AdminChange::New(bind_admin(want.bind).await?),
        };

        // The next generation.
        let accounts = Accounts::from_config(&config);
        let pool_changed = config.password_verification != old_pool;
        let verifier = match pool_changed {
            false => old_shared.verifier.clone(),
            true => Verifier::start(&config.password_verification),
        };
        let shared = Arc::new(Shared {
            accounts: RwLock::new(Arc::new(accounts)),
            tokens: core.tokens.clone(),
            verifier,
            throttle: old_shared.throttle.with_config(config.login_throttle.clone()),
            // The caps are the listeners' (`session_caps`, `session_wait`):
            // the same slots, so open sessions and waiting logins carry over.
            mailboxes: old_shared.mailboxes.clone(),
            // Connected at start only; a changed `state:` waits for a restart.
            state: old_shared.state.clone(),
        });
        let mut listeners = Vec::new();
        for (l, (socket, addr, fresh)) in config.listeners.iter().zip(sockets) {
            let previous = old.iter().find(|o| o.name == l.name).map(|o| o.ctx.as_ref());
            let local_tls = certificates.for_listener(l);
            let ctx = listener_ctx(l, &prepared.client_tls, &shared, local_tls, &core.metrics, previous)?;
            let bound = Bound { ctx: Arc::new(ctx), socket, addr, stop: core.signals.drain.child_token() };
            listeners.push((bound, fresh));
        }

        // Nothing can fail from here on: swap, unless a shutdown began
        // meanwhile (it closes the listeners under this lock).
        let summary = {
            let mut running = core.running.lock().unwrap_or_else(|e| e.into_inner());
            if core.signals.drain.is_cancelled() {
                return Err(StartError::ShuttingDown);
            }
            let applied = core.tokens.apply(prepared.identities);
            let (certificates, reread) = certificates.commit();
            let names: Vec<(String, SocketAddr)> =
                listeners.iter().map(|(b, _)| (b.ctx.config.name.clone(), b.addr)).collect();
            let mut changes = Vec::new();
            for (bound, fresh) in &listeners {
                let name = &bound.ctx.config.name;
                match old.iter().find(|o| &o.name == name) {
                    None => changes.push(format!("added {name} on {}", bound.addr)),
                    Some(o) if o.addr != bound.addr => changes.push(format!("moved {name} to {}", bound.addr)),
                    Some(_) => {}
                }
                if running.started {
                    core.serve_listener(bound, *fresh);
                }
            }
            for o in old.iter().filter(|o| !names.iter().any(|(n, _)| *n == o.name)) {
                changes.push(format!("removed {}", o.name));
                info!(listener = %o.name, "no longer listening (removed by the reload); its sessions run to their end");
            }
            for bound in std::mem::replace(&mut running.listeners, listeners.into_iter().map(|(b, _)| b).collect()) {
                bound.stop.cancel();
            }
            let admin_change = match admin {
                AdminChange::Keep => None,
                AdminChange::Off => running.admin.take().map(|old| {
                    old.stop.cancel();
                    "admin listener off".to_string()
                }),
                AdminChange::New(admin) => {
                    let change = format!("admin listener on {}", admin.addr);
                    if running.started {
                        core.serve_admin(&admin);
                    }
                    if let Some(old) = running.admin.replace(admin) {
                        old.stop.cancel();
                    }
                    Some(change)
                }
            };
            if pool_changed {
                running.retired_verifications += old_shared.verifier.verifications();
            }
            running.shared = shared;
            running.certificates = certificates;
            running.shutdown_timeout = config.shutdown_timeout;
            running.password_verification = config.password_verification.clone();
            let mut summary =
                summarize(&names, &changes, &applied, config.accounts.len(), reread, admin_change, pool_changed);
            if !crate::telemetry::reconfigure(&config.log) {
                summary.push_str("; log.format applies at the next start");
            }
            if state_changed {
                summary.push_str("; state applies at the next start (the replica keeps its shared state link)");
            }
            summary
        };
        warm_up_delegated(&core.tokens, &config);
        Ok(summary)
    }

    /// Counts a reload attempt, applied or refused, in the metrics.
    pub fn reloaded(&self, ok: bool) {
        self.core.metrics.reloaded(ok);
    }

    /// The address each listener is bound to now.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.core.local_addrs()
    }

    /// The admin listener's address now, if it is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.core.admin_addr()
    }
}

/// What a reload did, in one line: `3 listeners (added pop3 on ...), 2
/// identities (contoso: settings changed, tokens dropped), 5 accounts, ...`.
fn summarize(
    listeners: &[(String, SocketAddr)],
    changes: &[String],
    applied: &Applied,
    accounts: usize,
    certificates: usize,
    admin: Option<String>,
    pool: bool,
) -> String {
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut out = plural(listeners.len(), "listener", "listeners");
    if !changes.is_empty() {
        out.push_str(&format!(" ({})", changes.join(", ")));
    }
    let identities = applied.added.len() + applied.replaced.len() + applied.rewired.len() + applied.kept.len();
    out.push_str(&format!(", {}", plural(identities, "identity", "identities")));
    let mut ids = Vec::new();
    ids.extend(applied.added.iter().map(|n| format!("added {n}")));
    ids.extend(applied.replaced.iter().map(|n| format!("{n}: settings changed, tokens dropped")));
    ids.extend(applied.rewired.iter().map(|n| format!("{n}: new trust roots, store or hook, tokens kept")));
    ids.extend(applied.removed.iter().map(|n| format!("removed {n}")));
    if !ids.is_empty() {
        out.push_str(&format!(" ({})", ids.join(", ")));
    }
    out.push_str(&format!(", {}", plural(accounts, "account", "accounts")));
    match certificates {
        0 => {}
        1 => out.push_str(", the local TLS certificate"),
        n => out.push_str(&format!(", the local TLS certificates of {n} listeners")),
    }
    if let Some(admin) = admin {
        out.push_str(&format!(", {admin}"));
    }
    if pool {
        out.push_str(", a new password verification pool");
    }
    out
}

/// One descriptor kept open for the moment the process runs out: closing it
/// makes room to accept the waiting connection and tell it why it is
/// refused, instead of leaving it unanswered in the backlog.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn new() -> Self {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    /// Closes the reserve; false when it was not there to close.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }

    /// One round while `socket`'s accept(2) fails for want of descriptors:
    /// the clients waiting in its backlog told "out of resources" through
    /// the reserve's descriptor. `None` when nobody waits, else how many
    /// were told (0: the reserve could not be had back).
    ///
    /// accept(2) wants a free descriptor before it looks for a waiting
    /// connection, so such rounds also come while nobody waits. The reserve
    /// is let go only for a client that is there: let go idly, a session's
    /// upstream connect takes the descriptor and nobody can be told any more.
    async fn turn_away_waiting(&mut self, socket: &TcpListener, ctx: &ListenerCtx) -> Option<usize> {
        self.restore();
        if !waiting(socket) {
            return None;
        }
        let mut told = 0;
        if self.release() {
            // The one descriptor is reused for each waiting connection in
            // turn: each is told and closed before the next is taken.
            while told < TURN_AWAY_BATCH && waiting(socket) {
                let Ok(Ok((tcp, _))) = tokio::time::timeout(Duration::from_millis(50), socket.accept()).await else {
                    break;
                };
                ctx.metrics.refused(Refused::Resources);
                turn_away(ctx, tcp, Failure::ProxyResources);
                told += 1;
            }
            self.restore();
        }
        Some(told)
    }
}

/// The most waiting connections told "out of resources" per exhaustion
/// round, so that a listener's backlog is answered, not left to time out,
/// while the round still ends (and its error is logged again) when clients
/// keep coming.
const TURN_AWAY_BATCH: usize = 64;

/// While clients wait and none can be told (the reserve itself could not be
/// had back), the error is logged this often, not every round.
const EXHAUSTED_LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether a connection waits in `socket`'s backlog. A poll(2) of the
/// listening socket itself, because tokio's readiness for it is only
/// learnt through accept(2), which fails first while descriptors are out.
fn waiting(socket: &TcpListener) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(socket, PollFlags::IN)];
    let now = Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0)
}

/// Accepts on `socket` for `ctx` until `stop` (this listener removed or
/// reloaded) or the drain. The socket outlives the loop when a reload hands
/// it to the next generation's loop.
async fn accept_loop(
    socket: Arc<TcpListener>,
    ctx: Arc<ListenerCtx>,
    stop: CancellationToken,
    signals: Signals,
    tracker: TaskTracker,
) {
    let mut reserve = Reserve::new();
    let mut exhausted_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((mut tcp, peer)) => {
                let Some(from) = &ctx.config.proxy_protocol_from else {
                    admit(&ctx, tcp, peer, &signals, &tracker);
                    continue;
                };
                if !balancer::trusted(from, peer) {
                    warn!(listener = %ctx.config.name, balancer.addr = %peer, "connection refused: PROXY protocol is only accepted from proxy_protocol_from, which does not list this address");
                    ctx.metrics.refused(Refused::ProxyProtocol);
                    continue;
                }
                // The header is read in the connection's own task: a slow
                // balancer connection must not hold up the accept loop.
                let (ctx, signals, inner) = (ctx.clone(), signals.clone(), tracker.clone());
                tracker.spawn(async move {
                    let timeout = balancer::HEADER_TIMEOUT.min(ctx.config.limits.preauth_timeout);
                    let client = tokio::select! {
                        _ = signals.drain.cancelled() => return,
                        client = balancer::client_addr(&mut tcp, peer, timeout) => client,
                    };
                    match client {
                        Ok(client) => {
                            debug!(listener = %ctx.config.name, client.addr = %client, balancer.addr = %peer, "PROXY protocol header read");
                            admit(&ctx, tcp, client, &signals, &inner);
                        }
                        Err(e) => {
                            warn!(listener = %ctx.config.name, balancer.addr = %peer, error = %e, "connection refused: no valid PROXY protocol header");
                            ctx.metrics.refused(Refused::ProxyProtocol);
                        }
                    }
                });
            }
            Err(e) if crate::upstream::is_exhaustion(&e) => {
                let due = exhausted_logged.is_none_or(|at| at.elapsed() >= EXHAUSTED_LOG_EVERY);
                let told = reserve.turn_away_waiting(&socket, &ctx).await;
                if let Some(told) = told.filter(|&told| told > 0 || due) {
                    exhausted_logged = Some(Instant::now());
                    error!(
                        listener = %ctx.config.name,
                        error = %e,
                        turned_away = told,
                        "proxy out of resources: cannot accept a connection (raise the open-file limit, LimitNOFILE)"
                    );
                }
                // The condition lasts: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                error!(listener = %ctx.config.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Admits a connection from `peer` (the real client's address, behind a
/// balancer): `allow_from`, the connection caps, then its session task.
fn admit(ctx: &Arc<ListenerCtx>, tcp: TcpStream, peer: SocketAddr, signals: &Signals, tracker: &TaskTracker) {
    let allowed = &ctx.config.allow_from;
    if !allowed.is_empty() && !allowed.iter().any(|range| range.contains(peer.ip())) {
        info!(listener = %ctx.config.name, client.addr = %peer, "connection refused: address not in allow_from");
        ctx.metrics.refused(Refused::AllowFrom);
        return;
    }
    let admitted = match ctx.connections.try_admit(peer.ip()) {
        Ok(guard) => guard,
        Err(refusal) => {
            let (what, limit, why) = match refusal {
                Refusal::ListenerFull => {
                    ("max_connections", ctx.config.limits.max_connections, Refused::MaxConnections)
                }
                Refusal::AddressFull => {
                    ("max_connections_per_ip", ctx.config.limits.max_connections_per_ip, Refused::MaxConnectionsPerIp)
                }
            };
            ctx.metrics.refused(why);
            warn!(listener = %ctx.config.name, client.addr = %peer, limit, "connection refused: {what} reached");
            turn_away(ctx, tcp, Failure::TooManyConnections);
            return;
        }
    };
    ctx.metrics.accepted();
    let open = signals.session_opened();
    let (ctx, signals) = (ctx.clone(), signals.clone());
    tracker.spawn(async move {
        let _held = (open, admitted);
        dispatch(ctx, tcp, peer, signals).await;
    });
}

/// Tells a client turned away at accept why, then hangs up, before
/// returning: its descriptor is free again when this returns, which the
/// out-of-descriptors path relies on. The reply is one short line into a
/// fresh socket's empty send buffer, so a plain non-blocking write takes it
/// whole; a peer that is already gone just misses it. (On an implicit-TLS
/// listener there is no way to say it in the clear.)
fn turn_away(ctx: &ListenerCtx, tcp: TcpStream, failure: Failure) {
    if ctx.local_tls.as_ref().is_some_and(|t| t.mode == LocalTlsMode::Implicit) {
        return;
    }
    let reply = crate::protocol::reply::for_protocol(ctx.config.protocol, failure, None);
    // Out of tokio: its try_write answers WouldBlock until the reactor has
    // seen the new socket writable, which it has not yet.
    if let Ok(mut tcp) = tcp.into_std() {
        let _ = std::io::Write::write(&mut tcp, &reply);
    }
}

async fn dispatch(ctx: Arc<ListenerCtx>, tcp: TcpStream, peer: SocketAddr, signals: Signals) {
    struct Run(Arc<ListenerCtx>, TcpStream, SocketAddr, Signals);
    impl WithSpec for Run {
        type Output = crate::token::BoxFuture<'static, ()>;
        fn call<P: Spec>(self) -> Self::Output {
            Box::pin(session::run::<P>(self.0, self.1, self.2, self.3))
        }
    }
    let protocol = ctx.config.protocol;
    protocol.with(Run(ctx, tcp, peer, signals)).await;
}
