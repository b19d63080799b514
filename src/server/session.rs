//! One client connection: the pre-auth dialogue, the login carried upstream,
//! then the splice. Generic over the protocol's [`Spec`]; nothing here
//! depends on which protocol it is.

use super::fleet::SessionSlot;
use super::limits::MailboxBusy;
use super::stream::ClientStream;
use super::ListenerCtx;
use crate::accounts::AuthError;
use crate::config::LocalTls as LocalTlsMode;
use crate::metrics::{LoginResult as Counted, Phase, PhaseGuard};
use crate::protocol::{Failure, LoginRequest, Next, PreAuth, SessionOptions, Spec, Xoauth2User};
use crate::sasl::xoauth2;
use crate::splice::{splice, SpliceEnd};
use crate::text::printable;
use crate::upstream::{Authenticated, LoginError, UpstreamError};
use bytes::BytesMut;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

/// Shutdown signals a session listens to, and the count of open sessions.
#[derive(Clone)]
pub(crate) struct Signals {
    /// Stop: sessions still logging in are told the proxy is going away.
    pub drain: CancellationToken,
    /// The drain deadline passed: spliced sessions are cut too.
    pub abort: CancellationToken,
    open: Arc<AtomicUsize>,
}

impl Signals {
    pub fn new() -> Self {
        Signals { drain: CancellationToken::new(), abort: CancellationToken::new(), open: Arc::default() }
    }

    pub fn sessions(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a session as open until the guard is dropped.
    pub fn session_opened(&self) -> SessionGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        SessionGuard(self.open.clone())
    }
}

pub(crate) struct SessionGuard(Arc<AtomicUsize>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one connection to its end, inside a span that names it.
pub(crate) async fn run<P: Spec>(ctx: Arc<ListenerCtx>, tcp: TcpStream, peer: SocketAddr, signals: Signals) {
    let span = tracing::info_span!(
        "session",
        listener = %ctx.config.name,
        protocol = %P::PROTOCOL,
        client.addr = %peer,
        user = tracing::field::Empty,
        mailbox = tracing::field::Empty,
    );
    async move {
        debug!("connection accepted");
        let phase = ctx.metrics.session();
        // Absolute, whatever the client does: a slow client cannot hold its
        // connection (and its place under the per-address cap) for longer.
        let deadline = Instant::now() + ctx.config.limits.login_deadline;
        let _ = tcp.set_nodelay(true);
        let stream = match start_tls(&ctx, tcp, deadline).await {
            Some(stream) => stream,
            None => return,
        };
        Session::<P> {
            phase,
            ctx: &ctx,
            peer,
            stream,
            inbuf: BytesMut::with_capacity(4096),
            out: Vec::new(),
            signals,
            deadline,
            named: Default::default(),
            protocol: PhantomData,
        }
        .drive()
        .await;
    }
    .instrument(span)
    .await
}

/// How long an implicit-TLS listener waits for a client's ClientHello
/// before concluding that the client waits for a plain-text greeting: TLS
/// clients send it at once.
const CLIENT_HELLO_WAIT: Duration = Duration::from_secs(3);

/// How long a `local_tls: auto` listener waits for the client's first byte
/// before greeting in plain text: the cost every plain-text client pays on
/// such a port.
pub const AUTO_TLS_WAIT: Duration = Duration::from_millis(500);

/// The first byte of a TLS record carrying a handshake (the ClientHello);
/// no plain-text command of SMTP, IMAP or POP3 starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

/// The client connection as the pre-auth dialogue starts: TLS first where the
/// listener wants it (implicit), or where the client starts it (auto).
/// `None`: the connection is over (logged).
async fn start_tls(ctx: &ListenerCtx, tcp: TcpStream, deadline: Instant) -> Option<ClientStream> {
    let Some(tls) = &ctx.local_tls else {
        return Some(ClientStream::Plain(tcp));
    };
    let first = |wait: Duration| {
        let tcp = &tcp;
        async move {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(wait, tcp.peek(&mut byte)).await {
                Ok(Ok(1)) => Some(byte[0]),
                _ => None,
            }
        }
    };
    match tls.mode {
        LocalTlsMode::Starttls | LocalTlsMode::None => return Some(ClientStream::Plain(tcp)),
        LocalTlsMode::Auto => {
            if first(AUTO_TLS_WAIT).await != Some(TLS_HANDSHAKE) {
                return Some(ClientStream::Plain(tcp));
            }
        }
        LocalTlsMode::Implicit => {
            let spoke = first(CLIENT_HELLO_WAIT).await;
            if spoke != Some(TLS_HANDSHAKE) {
                // A plain-text client: it understands this answer, so say why.
                let why = if spoke.is_some() {
                    "sent plain text"
                } else {
                    "sent nothing (it waits for a plain-text greeting)"
                };
                info!(
                    "the client {why} on an implicit-TLS port: set it to SSL/TLS, or make this listener local_tls: auto (or starttls)"
                );
                let mut tcp = tcp;
                let reply = crate::protocol::reply::for_protocol(ctx.config.protocol, Failure::TlsExpected, None);
                let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&reply)).await;
                return None;
            }
        }
    }
    let timeout = ctx.config.limits.preauth_timeout.min(deadline.saturating_duration_since(Instant::now()));
    match tls.accept(ClientStream::Plain(tcp), timeout).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            debug!(error = %e, "TLS handshake with the client failed");
            None
        }
    }
}

struct Session<'a, P: Spec> {
    /// Counts the session in the metrics' phase gauge.
    phase: PhaseGuard,
    ctx: &'a ListenerCtx,
    peer: SocketAddr,
    stream: ClientStream,
    inbuf: BytesMut,
    out: Vec<u8>,
    signals: Signals,
    /// When the client must have logged in.
    deadline: Instant,
    /// Which span fields (`user`, `mailbox`) are recorded already.
    named: Named,
    protocol: PhantomData<P>,
}

/// A span field recorded twice is printed twice: each is recorded once.
#[derive(Default)]
struct Named {
    user: AtomicBool,
    mailbox: AtomicBool,
}

enum ReadOutcome {
    Data,
    Closed,
    Failed(Failure),
}

/// The most a client may pipeline while its login is carried upstream.
const MAX_PIPELINED: usize = 64 * 1024;

impl<P: Spec> Session<'_, P> {
    fn options(&self) -> SessionOptions {
        let c = &self.ctx.config;
        SessionOptions {
            max_line: c.limits.max_line_length,
            max_auth_failures: c.limits.max_auth_failures,
            max_bad_commands: c.limits.max_bad_commands,
            starttls: self.ctx.local_tls.as_ref().is_some_and(|t| t.mode != LocalTlsMode::Implicit),
            tls_active: self.stream.is_tls(),
            require_tls: c.require_tls,
            plaintext_allowed: c.plaintext_allowed,
            auth_equals_line: c.broken_sasl_auth_clients,
        }
    }

    /// The pre-auth silence timeout, shortened to what is left of the deadline.
    fn patience(&self) -> Duration {
        self.ctx.config.limits.preauth_timeout.min(self.deadline.saturating_duration_since(Instant::now()))
    }

    /// Writes pending output; false if the client is gone.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        // Answers still go out after the deadline, with a short bound.
        let timeout = self.patience().max(Duration::from_secs(1));
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        let result = tokio::time::timeout(timeout, write).await;
        self.out.clear();
        match result {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                debug!(error = %e, "client went away");
                false
            }
            Err(_) => {
                debug!("client stopped reading; closing");
                false
            }
        }
    }

    async fn read(&mut self) -> ReadOutcome {
        self.inbuf.reserve(4096);
        let timeout = self.patience();
        tokio::select! {
            result = tokio::time::timeout(timeout, self.stream.read_buf(&mut self.inbuf)) => match result {
                Ok(Ok(0)) => ReadOutcome::Closed,
                Ok(Ok(_)) => ReadOutcome::Data,
                Ok(Err(e)) => {
                    debug!(error = %e, "client connection failed");
                    ReadOutcome::Closed
                }
                Err(_) => ReadOutcome::Failed(Failure::Timeout),
            },
            _ = self.signals.drain.cancelled() => ReadOutcome::Failed(Failure::ShuttingDown),
        }
    }

    /// A TLS ClientHello as the first bytes of a plain-text connection: the
    /// client is set to implicit TLS on a plain-text port. It cannot read a
    /// plain-text answer, so the log says what to change and the connection
    /// is closed at once rather than at the timeout.
    fn client_hello_in_the_clear(&self) -> bool {
        if self.stream.is_tls() || self.inbuf.first() != Some(&TLS_HANDSHAKE) {
            return false;
        }
        let fix = match self.ctx.local_tls.as_ref().map(|t| t.mode) {
            Some(LocalTlsMode::Starttls) => "set it to STARTTLS, or make this listener local_tls: auto",
            _ => "set it to STARTTLS or None, or make this listener local_tls: implicit (or auto)",
        };
        info!("the client started TLS on a plain-text port: {fix}; closing");
        true
    }

    /// The upstream's capabilities (probed once per listener and cached),
    /// unless the proxy is past its shutdown deadline.
    async fn capabilities(&self) -> Option<Result<Arc<[String]>, crate::upstream::UpstreamError>> {
        let upstream = &self.ctx.upstream;
        tokio::select! {
            caps = self.ctx.caps.get(|| upstream.probe::<P::Client>()) => Some(caps),
            _ = self.signals.abort.cancelled() => None,
        }
    }

    async fn drive(mut self) {
        let caps = match self.capabilities().await {
            Some(Ok(caps)) => caps,
            Some(Err(e)) => {
                let failure = unavailable(&e);
                error!(upstream = %self.ctx.upstream.addr, error = %e, "{}; turning the client away", failure.as_str());
                PreAuth::<P::Dialect>::new(Arc::from([]), self.options()).abort(failure, &mut self.out);
                self.flush().await;
                return;
            }
            None => return,
        };
        let mut machine = PreAuth::<P::Dialect>::new(caps.clone(), self.options());
        machine.greeting(&mut self.out);
        let mut first_read = true;
        loop {
            match machine.handle(&mut self.inbuf, &mut self.out) {
                Next::Read => {
                    if !self.flush().await {
                        return;
                    }
                    match self.read().await {
                        ReadOutcome::Data => {
                            if std::mem::take(&mut first_read) && self.client_hello_in_the_clear() {
                                return;
                            }
                        }
                        ReadOutcome::Closed => {
                            debug!("client closed the connection before logging in");
                            return;
                        }
                        ReadOutcome::Failed(failure) => {
                            info!(reason = failure.as_str(), "closing the connection before login");
                            machine.abort(failure, &mut self.out);
                            self.flush().await;
                            return;
                        }
                    }
                }
                Next::Close => {
                    self.flush().await;
                    return;
                }
                Next::StartTls => {
                    if !self.flush().await {
                        return;
                    }
                    let Some(tls) = &self.ctx.local_tls else { return };
                    let stream = std::mem::replace(&mut self.stream, ClientStream::Closed);
                    match tls.accept(stream, self.patience()).await {
                        Ok(stream) => {
                            self.stream = stream;
                            self.inbuf.clear();
                            machine.tls_started();
                            debug!("STARTTLS completed");
                        }
                        Err(e) => {
                            debug!(error = %e, "STARTTLS handshake with the client failed");
                            return;
                        }
                    }
                }
                Next::Authenticate(request) => {
                    if !self.flush().await {
                        return;
                    }
                    self.phase.enter(Phase::Authenticating);
                    let result = {
                        let login = Login::<P> {
                            ctx: self.ctx,
                            peer: self.peer,
                            signals: &self.signals,
                            named: &self.named,
                            protocol: PhantomData,
                        };
                        let authenticate = login.authenticate(&caps, request);
                        let client_gone = client_gone(&mut self.stream, &mut self.inbuf);
                        tokio::select! {
                            result = authenticate => Some(result),
                            // Dropping the login cancels it: no token request or
                            // upstream session is completed for nobody.
                            () = client_gone => None,
                            _ = tokio::time::sleep_until(self.deadline) => Some(Err(Failure::Timeout)),
                            // Past the shutdown deadline a login in progress is cut too.
                            _ = self.signals.abort.cancelled() => Some(Err(Failure::ShuttingDown)),
                        }
                    };
                    let Some(result) = result else {
                        debug!("client went away during the login; cancelled");
                        return;
                    };
                    match result {
                        Ok(logged_in) => {
                            self.phase.enter(Phase::Spliced);
                            machine.auth_succeeded(&logged_in.upstream.success, &mut self.out);
                            if !self.flush().await {
                                return;
                            }
                            self.splice(logged_in).await;
                            return;
                        }
                        Err(failure) => {
                            self.phase.enter(Phase::PreAuth);
                            if matches!(failure, Failure::Timeout | Failure::ShuttingDown) {
                                self.ctx.metrics.login(Counted::Limit);
                            }
                            if failure == Failure::Timeout {
                                info!(reason = "login deadline", "closing the connection before login");
                            }
                            let next = machine.auth_failed(failure, &mut self.out);
                            if matches!(next, Next::Close) {
                                self.flush().await;
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn splice(self, logged_in: LoggedIn<P>) {
        let LoggedIn { upstream, slot } = logged_in;
        // Only what the splice needs lives on with it: the pre-auth reply
        // buffer would otherwise stay allocated for the session's life.
        let Session { ctx, stream, inbuf, out, signals, .. } = self;
        drop(out);
        let stats = splice(
            stream,
            inbuf,
            upstream.stream,
            upstream.leftover,
            ctx.config.limits.idle_timeout,
            signals.abort.clone(),
        )
        .await;
        // The mailbox's upstream session is over: its place is free again.
        drop(slot);
        self.ctx.metrics.spliced(&stats);
        let end = match &stats.end {
            SpliceEnd::Closed => "closed".to_string(),
            SpliceEnd::IdleTimeout => "idle timeout".to_string(),
            SpliceEnd::Shutdown => "shutdown deadline".to_string(),
            // Many servers hang up without a TLS close_notify after QUIT/LOGOUT.
            SpliceEnd::Error(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => "closed".to_string(),
            SpliceEnd::Error(e) => format!("network error: {e}"),
        };
        info!(
            bytes.from_client = stats.client_to_upstream,
            bytes.to_client = stats.upstream_to_client,
            duration_ms = stats.duration.as_millis() as u64,
            end = %end,
            "session ended"
        );
    }
}

/// Completes when the client hangs up while its login is carried upstream.
/// What it pipelines meanwhile is kept (it belongs to the upstream, or to
/// the pre-auth dialogue if the login fails), up to a bound.
async fn client_gone(stream: &mut ClientStream, inbuf: &mut BytesMut) {
    loop {
        if inbuf.len() >= MAX_PIPELINED {
            // Stop reading: back-pressure on the client until the login ends.
            return std::future::pending().await;
        }
        inbuf.reserve(4096);
        match stream.read_buf(inbuf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The failure a client sees when the upstream cannot be reached: the
/// proxy's own lack of descriptors or memory is not the upstream's fault.
fn unavailable(e: &UpstreamError) -> Failure {
    if e.is_local_exhaustion() {
        Failure::ProxyResources
    } else {
        Failure::Unavailable
    }
}

/// What a login needs from the session, borrowed apart from its streams so
/// the client can be watched while the login runs.
struct Login<'a, P: Spec> {
    ctx: &'a ListenerCtx,
    peer: SocketAddr,
    signals: &'a Signals,
    named: &'a Named,
    protocol: PhantomData<P>,
}

impl<P: Spec> Login<'_, P> {
    /// Verifies the local login, obtains a token, and logs in upstream,
    /// retrying once with a fresh token if the upstream refuses the first.
    async fn authenticate(&self, caps: &Arc<[String]>, request: LoginRequest) -> Result<LoggedIn<P>, Failure> {
        let span = tracing::Span::current();
        let shared = &self.ctx.shared;
        let username = printable(request.credentials.username.as_bytes(), 128);
        if !self.named.user.swap(true, Ordering::Relaxed) {
            span.record("user", username.as_str());
        }
        // While this address or username is being slowed down, its attempts
        // queue here one at a time: parallel connections buy no extra guesses.
        let attempt = shared.throttle.admit(self.peer.ip(), &request.credentials.username).await;
        let account = match shared.accounts().verify(&request.credentials, &shared.verifier).await {
            Ok(account) => {
                attempt.succeeded();
                account
            }
            Err(AuthError::Overloaded) => {
                warn!(
                    "password verification is overloaded (queue full or too slow); answering with a temporary failure"
                );
                self.ctx.metrics.login(Counted::Limit);
                return Err(Failure::Temporary);
            }
            Err(e) => {
                let delay = attempt.failed().await;
                // One line per failure, with the address and username, for fail2ban.
                warn!(
                    client.ip = %self.peer.ip(),
                    user = %username,
                    reason = %e,
                    delay_ms = delay.as_millis() as u64,
                    "authentication failure"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.signals.drain.cancelled() => {}
                }
                self.ctx.metrics.login(Counted::BadCredentials);
                return Err(Failure::AuthFailed);
            }
        };
        if !self.named.mailbox.swap(true, Ordering::Relaxed) {
            span.record("mailbox", account.mailbox.as_str());
        }
        let limits = &self.ctx.config;
        let cap = limits.max_sessions_per_mailbox;
        let slot = match shared.mailboxes.acquire(P::PROTOCOL, &account.mailbox, cap, limits.session_wait).await {
            Ok((slot, waited)) => {
                if !waited.is_zero() {
                    self.ctx.metrics.mailbox_slot_waited(waited);
                }
                if waited >= Duration::from_secs(1) {
                    info!(
                        waited_ms = waited.as_millis() as u64,
                        cap, "waited for a place among the mailbox's upstream sessions"
                    );
                }
                slot
            }
            Err(MailboxBusy) => {
                warn!(
                    cap,
                    waited_ms = limits.session_wait.as_millis() as u64,
                    "refused: the mailbox kept max_sessions_per_mailbox upstream sessions for the whole session_wait"
                );
                self.ctx.metrics.mailbox_slot_waited(limits.session_wait);
                self.ctx.metrics.login(Counted::Limit);
                return Err(Failure::MailboxBusy);
            }
        };
        let key = shared.tokens.key_for(&account.identity, &account.username);
        let user = match P::XOAUTH2_USER {
            Xoauth2User::Mailbox => &account.mailbox,
            Xoauth2User::SmtpUser => &account.smtp_user,
        };
        let mut retried = false;
        loop {
            let token = match shared.tokens.get(&key).await {
                Ok(token) => token,
                Err(e) => {
                    error!(identity = %account.identity, error = %e, "cannot obtain an access token");
                    self.ctx.metrics.login(Counted::TokenUnavailable);
                    return Err(if e.requires_reauthorization() { Failure::AuthFailed } else { Failure::Temporary });
                }
            };
            debug!(upstream = %self.ctx.upstream.addr, xoauth2.user = %user, "authenticating upstream with XOAUTH2");
            let login = crate::protocol::client::Login {
                initial_response: xoauth2::initial_response(user, token.expose()),
                client_name: request.client_name.clone(),
                known_caps: caps.clone(),
            };
            match self.ctx.metrics.timed(self.ctx.upstream.login::<P::Client>(login)).await {
                Ok(upstream) => {
                    self.ctx.metrics.login(Counted::Ok);
                    info!(upstream = %self.ctx.upstream.addr, xoauth2.user = %user, "logged in: plain login accepted locally, XOAUTH2 accepted upstream");
                    return Ok(LoggedIn { upstream, slot });
                }
                Err(LoginError::Rejected(reason)) if !retried => {
                    warn!(%reason, "upstream refused the access token; retrying once with a fresh token");
                    shared.tokens.invalidate(&key, &token);
                    retried = true;
                }
                Err(LoginError::Rejected(reason)) => {
                    error!(%reason, "upstream refused a fresh access token too; check the app's permissions for this mailbox");
                    self.ctx.metrics.login(Counted::UpstreamRefused);
                    return Err(Failure::AuthFailed);
                }
                Err(LoginError::Temporary(reason)) => {
                    if reason.reply.contains("4.3.2") {
                        // Other clients of the mailbox, outside this proxy, hold Exchange's places.
                        warn!(mailbox = %account.mailbox, %reason, "upstream refused: the mailbox is at Exchange's concurrent connection limit");
                    } else {
                        warn!(%reason, "upstream answered with a temporary failure");
                    }
                    self.ctx.metrics.login(Counted::Throttled);
                    return Err(Failure::Temporary);
                }
                Err(LoginError::Unavailable(e)) => {
                    let failure = unavailable(&e);
                    error!(upstream = %self.ctx.upstream.addr, error = %e, "{}", failure.as_str());
                    self.ctx.metrics.login(if failure == Failure::Unavailable {
                        Counted::UpstreamUnavailable
                    } else {
                        Counted::Limit
                    });
                    return Err(failure);
                }
            }
        }
    }
}

/// An upstream session that accepted the token, with the mailbox's session
/// place it holds until the splice ends.
struct LoggedIn<P: Spec> {
    upstream: Authenticated<<P::Client as crate::protocol::Dialogue>::Success>,
    slot: SessionSlot,
}
