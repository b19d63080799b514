//! The listeners: bind, accept, one task per connection, graceful drain.

mod balancer;
mod caps;
pub mod fleet;
pub mod limits;
mod local_tls;
mod session;
mod stream;

use crate::accounts::Accounts;
use crate::config::{Config, ListenerConfig, LocalTls as LocalTlsMode};
use crate::protocol::{Failure, Spec, WithSpec};
use crate::tls::{self, TlsError};
use crate::token::{TokenError, TokenManager};
use crate::upstream::{BadServerName, Upstream};
use caps::CapabilityCache;
use limits::{ConnectionLimiter, LoginThrottler, MailboxLimiter, Refusal};
use local_tls::{Certificates, LocalTls};
use session::Signals;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// How long sessions get to wind down once the shutdown deadline has passed.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// State shared by every listener.
pub struct Shared {
    /// Replaced as a whole when the configuration is reloaded.
    accounts: RwLock<Arc<Accounts>>,
    pub tokens: TokenManager,
    /// Outlives reloads, with its memory of recent successful logins.
    pub verifier: crate::verifier::Verifier,
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
    caps: CapabilityCache,
    pub shared: Arc<Shared>,
    local_tls: Option<LocalTls>,
    connections: ConnectionLimiter,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsError),
    #[error("token endpoint setup: {0}")]
    Token(#[from] TokenError),
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
    #[error("listener {listener}: {source}")]
    Listener { listener: String, source: BadServerName },
    #[error("state: {0}")]
    State(#[from] crate::state::StateError),
}

pub struct Proxy {
    listeners: Vec<(TcpListener, Arc<ListenerCtx>)>,
    shutdown_timeout: Duration,
    certificates: Arc<Certificates>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Builds the shared state and binds every listener; nothing is accepted
    /// until [`Proxy::run`].
    pub async fn bind(config: &Config) -> Result<Proxy, StartError> {
        tls::install_default_provider();
        let client_tls = tls::client_config(config.upstream_ca_file.as_deref())?;
        let state = match &config.state {
            Some(state) => Some(crate::state::SharedState::connect(state).await?),
            None => None,
        };
        let tokens = crate::token::manager_with(
            config,
            crate::token::shared_context_for(config, client_tls.clone(), state.clone())?,
        )?;
        let accounts = Accounts::from_config(config);
        let verifier = crate::verifier::Verifier::start(&config.password_verification);
        let shared = Arc::new(Shared {
            accounts: RwLock::new(Arc::new(accounts)),
            tokens,
            verifier,
            throttle: LoginThrottler::new(config.login_throttle.clone()).with_shared(state.clone()),
            mailboxes: match &state {
                Some(state) => Arc::new(fleet::FleetSlots::new(state.clone(), Arc::new(MailboxLimiter::new()))),
                None => Arc::new(MailboxLimiter::new()),
            },
            state,
        });
        let mut certificates = Certificates::default();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let socket =
                listen(l).map_err(|source| StartError::Bind { listener: l.name.clone(), addr: l.bind, source })?;
            let upstream = Upstream::new(l, client_tls.clone())
                .map_err(|source| StartError::Listener { listener: l.name.clone(), source })?;
            let local_tls = certificates.for_listener(config, l)?;
            let ctx = ListenerCtx {
                config: l.clone(),
                upstream,
                caps: CapabilityCache::default(),
                shared: shared.clone(),
                local_tls,
                connections: ConnectionLimiter::new(l.limits.max_connections, l.limits.max_connections_per_ip),
            };
            listeners.push((socket, Arc::new(ctx)));
        }
        Ok(Proxy { listeners, shutdown_timeout: config.shutdown_timeout, certificates: Arc::new(certificates), shared })
    }

    /// Starts obtaining tokens for every delegated account, so their refresh
    /// tokens stay in use even when no client logs in for months.
    pub fn warm_up_delegated(&self, config: &Config) {
        let tokens = &self.shared.tokens;
        let keys = config
            .accounts
            .iter()
            .filter(|a| config.identity(&a.identity).is_some_and(|i| i.flow == crate::config::Flow::RefreshToken))
            .map(|a| tokens.key_for(&a.identity, &a.username))
            .collect();
        tokens.warm_up(keys);
    }

    /// The address each listener is bound to (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(socket, ctx)| socket.local_addr().ok().map(|a| (ctx.config.name.clone(), a)))
            .collect()
    }

    /// The token cache the sessions use (for the service status line).
    pub fn tokens(&self) -> TokenManager {
        self.shared.tokens.clone()
    }

    /// With `state:`, the link to the replicas' Redis: whether it is in use
    /// (`is_up`) is what `/readyz` and the metrics report.
    pub fn shared_state(&self) -> Option<Arc<crate::state::SharedState>> {
        self.shared.state.clone()
    }

    /// A handle that applies a re-read configuration while [`Proxy::run`] owns the proxy.
    pub fn reloader(&self) -> Reloader {
        Reloader { certificates: self.certificates.clone(), shared: self.shared.clone() }
    }

    /// Serves until `shutdown` completes, then stops accepting, tells clients
    /// that are still logging in, and lets spliced sessions finish for up to
    /// the shutdown timeout before cutting them.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let signals = Signals::new();
        let tracker = TaskTracker::new();
        for (socket, ctx) in self.listeners {
            info!(
                listener = %ctx.config.name,
                protocol = %ctx.config.protocol,
                bind = %socket.local_addr().map_or_else(|_| ctx.config.bind.to_string(), |a| a.to_string()),
                upstream = %ctx.upstream.addr,
                "listening"
            );
            tracker.spawn(accept_loop(socket, ctx, signals.clone(), tracker.clone()));
        }
        shutdown.await;
        info!(sessions = signals.sessions(), deadline = ?self.shutdown_timeout, "shutting down: no new connections");
        signals.drain.cancel();
        tracker.close();
        if tokio::time::timeout(self.shutdown_timeout, tracker.wait()).await.is_err() {
            warn!(sessions = signals.sessions(), "shutdown deadline reached; closing the remaining sessions");
            signals.abort.cancel();
            // Every phase watches the abort signal; this bound only guards
            // against a task that does not, so shutdown stays a deadline.
            if tokio::time::timeout(ABORT_GRACE, tracker.wait()).await.is_err() {
                warn!(
                    sessions = signals.sessions(),
                    "sessions still running after the shutdown deadline; exiting anyway"
                );
            }
        }
        info!("stopped");
    }
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
    certificates: Arc<Certificates>,
    shared: Arc<Shared>,
}

impl Reloader {
    /// Replaces the accounts (the memory of recent successful logins stays
    /// valid for every account whose hash is unchanged) and re-reads the local TLS certificate and key. Sessions
    /// already running keep what they started with. Listeners, identities
    /// and the token store are read at start only.
    pub fn reload(&self, config: &Config) -> Result<String, TlsError> {
        let fresh_tls = self.certificates.prepare(config)?;
        let accounts = Accounts::from_config(config);
        let count = accounts.len();
        *self.shared.accounts.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(accounts);
        let mut done = format!("{count} accounts");
        match fresh_tls.apply() {
            0 => {}
            1 => done.push_str(" and the local TLS certificate"),
            n => done.push_str(&format!(" and the local TLS certificates of {n} listeners")),
        }
        Ok(done)
    }
}

/// One descriptor kept open for the moment the process runs out: closing it
/// makes room to accept the waiting connection and tell it why it is
/// refused, instead of leaving it unanswered in the backlog.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn new() -> Self {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    fn release(&mut self) {
        self.0 = None;
    }

    fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

async fn accept_loop(socket: TcpListener, ctx: Arc<ListenerCtx>, signals: Signals, tracker: TaskTracker) {
    let mut reserve = Reserve::new();
    loop {
        let accepted = tokio::select! {
            _ = signals.drain.cancelled() => return,
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
                        }
                    }
                });
            }
            Err(e) if crate::upstream::is_exhaustion(&e) => {
                error!(
                    listener = %ctx.config.name,
                    error = %e,
                    "proxy out of resources: cannot accept a connection (raise the open-file limit, LimitNOFILE)"
                );
                reserve.release();
                let pending = tokio::time::timeout(Duration::from_millis(50), socket.accept()).await;
                if let Ok(Ok((tcp, _))) = pending {
                    tracker.spawn(turn_away(ctx.clone(), tcp, Failure::ProxyResources));
                }
                reserve.restore();
                // The condition lasts: do not spin, or flood the log.
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
        return;
    }
    let admitted = match ctx.connections.try_admit(peer.ip()) {
        Ok(guard) => guard,
        Err(refusal) => {
            let (what, limit) = match refusal {
                Refusal::ListenerFull => ("max_connections", ctx.config.limits.max_connections),
                Refusal::AddressFull => ("max_connections_per_ip", ctx.config.limits.max_connections_per_ip),
            };
            warn!(listener = %ctx.config.name, client.addr = %peer, limit, "connection refused: {what} reached");
            tracker.spawn(turn_away(ctx.clone(), tcp, Failure::TooManyConnections));
            return;
        }
    };
    let open = signals.session_opened();
    let (ctx, signals) = (ctx.clone(), signals.clone());
    tracker.spawn(async move {
        let _held = (open, admitted);
        dispatch(ctx, tcp, peer, signals).await;
    });
}

/// Tells a client turned away at accept why, then hangs up. (On an
/// implicit-TLS listener there is no way to say it in the clear.)
async fn turn_away(ctx: Arc<ListenerCtx>, mut tcp: TcpStream, failure: Failure) {
    if ctx.local_tls.as_ref().is_some_and(|t| t.mode == LocalTlsMode::Implicit) {
        return;
    }
    let reply = crate::protocol::reply::for_protocol(ctx.config.protocol, failure, None);
    let _ = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncWriteExt::write_all(&mut tcp, &reply)).await;
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
