//! Fake upstream mail servers (IMAP, POP3, SMTP) over TLS that accept only
//! XOAUTH2 with a token the fake token endpoint issued, Exchange-style.
//!
//! After authentication a server either echoes every byte back (to test the
//! splice) or plays a tiny mailbox (for the demo and real clients).

use crate::certs::TestPki;
use crate::mailbox::Mailbox;
use crate::token::TokenValidator;
use base64::Engine;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Imap,
    Pop3,
    Smtp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    Implicit,
    Starttls,
}

#[derive(Clone)]
pub enum AfterAuth {
    /// Send every byte back, counting them.
    Echo,
    /// Speak enough of the protocol to deliver and read messages.
    Mailbox(Arc<Mailbox>),
    /// IMAP only, for throughput benchmarks: a fast in-memory mailbox whose
    /// message 1 is this buffer (`FETCH 1 BODY[]` sends it as one literal, no
    /// copy), while `APPEND` reads its literal and discards it, counting the
    /// bytes. `SELECT`, `NOOP`, `IDLE` and `LOGOUT` are answered too.
    ImapBulk(Arc<Vec<u8>>),
}

/// What Exchange Online answers to a valid token when something on its side
/// is not set up, word for word. The wording comes from Microsoft's XOAUTH2
/// document (../shared/seeds/001_*.txt) and from transcripts in peers' issue
/// trackers, cited per variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeFault {
    /// The service principal is missing from Exchange, was registered with
    /// the App Registration's Object ID, or has no FullAccess on the mailbox:
    /// IMAP `NO AUTHENTICATE failed.`, POP3 `-ERR Authentication failure:
    /// unknown user name or bad password.`, SMTP `535 5.7.3 Authentication
    /// unsuccessful [...]` (all three in Microsoft's document; POP3 with a
    /// valid client-credentials token in simonrob/email-oauth2-proxy#238).
    AuthenticationFailed,
    /// IMAP: AUTHENTICATE succeeds, then every command gets `BAD User is
    /// authenticated but not connected.` and the server hangs up with
    /// `* BYE Connection closed. 14` (simonrob/email-oauth2-proxy#74,
    /// jstedfast/MailKit#1496). The other protocols answer as
    /// `AuthenticationFailed`.
    NotConnected,
    /// SMTP: `535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication
    /// is disabled for the Tenant. ...` (simonrob/email-oauth2-proxy#193,
    /// nodemailer/nodemailer#1484).
    SmtpAuthDisabledTenant,
    /// SMTP: `535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication
    /// is disabled for the Mailbox. ...` (the per-mailbox variant of the above).
    SmtpAuthDisabledMailbox,
    /// SMTP: the login succeeds; `MAIL FROM` gets `554 5.2.252 SendAsDenied;
    /// ... not allowed to send as ...` (gophish/gophish#2900; Exchange says it
    /// at the end of DATA, this fake as early as MAIL FROM so a check sees it).
    SendAsDenied,
    /// SMTP: the login succeeds; `MAIL FROM` gets `432 4.3.2
    /// STOREDRV.ClientSubmit; sender thread limit exceeded [...]`, Exchange's
    /// answer to too many concurrent connections for one mailbox
    /// (timeoff-management/timeoff-management-application#308).
    ThreadLimit,
    /// SMTP: the mailbox already has the 3 concurrent SMTP AUTH connections
    /// Exchange Online allows: `432 4.3.2 Concurrent connections limit
    /// exceeded` in answer to the XOAUTH2 response (Microsoft, "Exchange
    /// Online limits", SMTP AUTH client submission).
    ConcurrentConnections,
    /// The token is refused with this XOAUTH2 error challenge (JSON, sent
    /// base64 in `+ ` / `334 `), then the protocol's failure.
    Challenge(String),
}

#[derive(Clone)]
pub struct UpstreamOptions {
    pub proto: Proto,
    pub tls: UpstreamTls,
    pub after_auth: AfterAuth,
    /// IMAP: capabilities in the greeting (as Dovecot) or not (as Exchange).
    pub greeting_capabilities: bool,
    /// IMAP: advertise SASL-IR (Exchange and Dovecot both do).
    pub sasl_ir: bool,
    /// Send bytes right after the STARTTLS go-ahead, as a man in the middle would.
    pub inject_after_starttls: bool,
    /// Stop answering at this point, keeping the connection open.
    pub stall: Option<Stall>,
    /// Wait this long before answering an XOAUTH2 attempt (a slow server).
    /// A client that hangs up meanwhile is counted in
    /// [`FakeUpstream::abandoned_auths`] and gets no answer.
    pub auth_delay: std::time::Duration,
}

/// Where a fake upstream goes silent (a hung server, a black-holed network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Accept the connection, never greet.
    Greeting,
    /// Read the XOAUTH2 response, never answer it.
    Auth,
}

impl UpstreamOptions {
    /// Exchange-like defaults: IMAP/POP3 implicit TLS, SMTP STARTTLS, echo.
    pub fn new(proto: Proto) -> Self {
        UpstreamOptions {
            proto,
            tls: if proto == Proto::Smtp { UpstreamTls::Starttls } else { UpstreamTls::Implicit },
            after_auth: AfterAuth::Echo,
            greeting_capabilities: false,
            sasl_ir: true,
            inject_after_starttls: false,
            stall: None,
            auth_delay: std::time::Duration::ZERO,
        }
    }
}

struct Shared {
    opts: UpstreamOptions,
    acceptor: TlsAcceptor,
    validator: TokenValidator,
    temporary_failure: AtomicBool,
    refuse_all: AtomicBool,
    exchange_fault: Mutex<Option<ExchangeFault>>,
    logins: Mutex<Vec<String>>,
    auth_attempts: AtomicUsize,
    connections: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    ehlo_names: Mutex<Vec<String>>,
    echoed: AtomicU64,
    appended: AtomicU64,
    abandoned_auths: AtomicUsize,
}

pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    pub async fn start(opts: UpstreamOptions, pki: &TestPki, validator: TokenValidator) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake upstream");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            opts,
            acceptor: TlsAcceptor::from(pki.server_config()),
            validator,
            temporary_failure: AtomicBool::new(false),
            refuse_all: AtomicBool::new(false),
            exchange_fault: Mutex::new(None),
            logins: Mutex::new(Vec::new()),
            auth_attempts: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            ehlo_names: Mutex::new(Vec::new()),
            echoed: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            abandoned_auths: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let shared = accept_shared.clone();
                tokio::spawn(async move { connection(shared, tcp).await });
            }
        });
        FakeUpstream { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `user=` of every accepted XOAUTH2 login, in order.
    pub fn logins(&self) -> Vec<String> {
        self.shared.logins.lock().unwrap().clone()
    }

    /// XOAUTH2 attempts, accepted or not.
    pub fn auth_attempts(&self) -> usize {
        self.shared.auth_attempts.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// The most connections that were open at once.
    pub fn max_open_connections(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// SMTP: the EHLO names received.
    pub fn ehlo_names(&self) -> Vec<String> {
        self.shared.ehlo_names.lock().unwrap().clone()
    }

    /// Echo mode: bytes sent back so far.
    pub fn echoed(&self) -> u64 {
        self.shared.echoed.load(Ordering::SeqCst)
    }

    /// Bulk mode: literal bytes received by `APPEND` so far.
    pub fn appended(&self) -> u64 {
        self.shared.appended.load(Ordering::SeqCst)
    }

    /// XOAUTH2 attempts whose client hung up during `auth_delay`, before the answer.
    pub fn abandoned_auths(&self) -> usize {
        self.shared.abandoned_auths.load(Ordering::SeqCst)
    }

    /// Stops listening: new connections are refused (established ones go on).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Answer every XOAUTH2 attempt with a temporary failure (throttling).
    pub fn set_temporary_failure(&self, on: bool) {
        self.shared.temporary_failure.store(on, Ordering::SeqCst);
    }

    /// Refuse every token, even valid ones (a missing mailbox permission).
    pub fn set_refuse_all(&self, on: bool) {
        self.shared.refuse_all.store(on, Ordering::SeqCst);
    }

    /// Answer valid tokens as Exchange does when this is wrong on its side.
    pub fn set_exchange_fault(&self, fault: Option<ExchangeFault>) {
        *self.shared.exchange_fault.lock().unwrap() = fault;
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A stream with a line reader on top.
struct Wire<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: Io> Wire<S> {
    fn new(s: S) -> Self {
        Wire { s, buf: Vec::new() }
    }

    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=at).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(line);
            }
            if self.buf.len() > 1 << 20 {
                return None;
            }
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The initial response if the client sent one, else the line after `prompt`.
    async fn sasl_response(&mut self, initial: Vec<u8>, prompt: &str) -> Option<Vec<u8>> {
        if !initial.is_empty() {
            return Some(initial);
        }
        self.send(prompt).await?;
        self.line().await
    }

    /// Waits `delay` while watching the connection: false (and counted as
    /// abandoned) if the peer hangs up first. Bytes that arrive meanwhile are kept.
    async fn hold(&mut self, delay: std::time::Duration, abandoned: &AtomicUsize) -> bool {
        if delay.is_zero() {
            return true;
        }
        let until = tokio::time::sleep(delay);
        tokio::pin!(until);
        loop {
            let mut chunk = [0u8; 1024];
            tokio::select! {
                _ = &mut until => return true,
                read = self.s.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => {
                        abandoned.fetch_add(1, Ordering::SeqCst);
                        return false;
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                },
            }
        }
    }

    async fn send(&mut self, data: impl AsRef<[u8]>) -> Option<()> {
        self.s.write_all(data.as_ref()).await.ok()?;
        self.s.flush().await.ok()
    }

    /// Says nothing more; returns (None) only when the peer hangs up.
    async fn stall(&mut self) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 1024];
        while matches!(self.s.read(&mut chunk).await, Ok(n) if n > 0) {}
        None
    }
}

enum Phase {
    StartTls,
    LoggedIn,
    Done,
}

enum Verdict {
    Temporary,
    Rejected,
    /// A valid token that Exchange's own set-up refuses.
    Exchange(ExchangeFault),
}

impl Shared {
    /// Checks an XOAUTH2 initial response independently of the proxy's code.
    fn check(&self, response: &[u8]) -> Result<String, Verdict> {
        self.auth_attempts.fetch_add(1, Ordering::SeqCst);
        if self.temporary_failure.load(Ordering::SeqCst) {
            return Err(Verdict::Temporary);
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(response).map_err(|_| Verdict::Rejected)?;
        let text = String::from_utf8(decoded).map_err(|_| Verdict::Rejected)?;
        let body = text.strip_suffix("\x01\x01").ok_or(Verdict::Rejected)?;
        let (user, auth) = body.split_once('\x01').ok_or(Verdict::Rejected)?;
        let user = user.strip_prefix("user=").filter(|u| !u.is_empty()).ok_or(Verdict::Rejected)?;
        let token = auth.strip_prefix("auth=Bearer ").ok_or(Verdict::Rejected)?;
        if self.refuse_all.load(Ordering::SeqCst) || !self.validator.is_valid(token) {
            return Err(Verdict::Rejected);
        }
        match self.fault() {
            // These let the login through and refuse what follows it.
            Some(ExchangeFault::NotConnected) if self.opts.proto == Proto::Imap => {}
            Some(ExchangeFault::SendAsDenied | ExchangeFault::ThreadLimit) if self.opts.proto == Proto::Smtp => {}
            Some(
                ExchangeFault::SmtpAuthDisabledTenant
                | ExchangeFault::SmtpAuthDisabledMailbox
                | ExchangeFault::ConcurrentConnections,
            ) if self.opts.proto != Proto::Smtp => {}
            Some(ExchangeFault::SendAsDenied | ExchangeFault::ThreadLimit) => {}
            Some(fault) => return Err(Verdict::Exchange(fault)),
            None => {}
        }
        self.logins.lock().unwrap().push(user.to_string());
        Ok(user.to_string())
    }

    fn fault(&self) -> Option<ExchangeFault> {
        self.exchange_fault.lock().unwrap().clone()
    }

    fn error_challenge(&self) -> String {
        let json = match self.fault() {
            Some(ExchangeFault::Challenge(json)) => json,
            _ => r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office365.com/"}"#.to_string(),
        };
        base64::engine::general_purpose::STANDARD.encode(json)
    }
}

/// Counts a connection as open until dropped.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream) {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let open = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_open.fetch_max(open, Ordering::SeqCst);
    let _open = Open(shared.clone());
    if shared.opts.stall == Some(Stall::Greeting) {
        Wire::new(tcp).stall().await;
        return;
    }
    // Small request/response lines: without this, Nagle and delayed ACKs add 40 ms per exchange.
    let _ = tcp.set_nodelay(true);
    match shared.opts.tls {
        UpstreamTls::Implicit => {
            let Ok(tls) = shared.acceptor.accept(tcp).await else { return };
            let mut wire = Wire::new(Box::new(tls) as Box<dyn Io>);
            if let Phase::LoggedIn = phase(&shared, &mut wire, true, true).await {
                after_auth(&shared, wire).await;
            }
        }
        UpstreamTls::Starttls => {
            let mut plain = Wire::new(tcp);
            match phase(&shared, &mut plain, false, true).await {
                Phase::StartTls => {
                    let Ok(tls) = shared.acceptor.accept(plain.s).await else { return };
                    let mut wire = Wire::new(Box::new(tls) as Box<dyn Io>);
                    if let Phase::LoggedIn = phase(&shared, &mut wire, true, false).await {
                        after_auth(&shared, wire).await;
                    }
                }
                Phase::LoggedIn | Phase::Done => {}
            }
        }
    }
}

async fn phase<S: Io>(shared: &Shared, wire: &mut Wire<S>, tls: bool, greet: bool) -> Phase {
    let result = match shared.opts.proto {
        Proto::Imap => imap_phase(shared, wire, tls, greet).await,
        Proto::Pop3 => pop3_phase(shared, wire, tls, greet).await,
        Proto::Smtp => smtp_phase(shared, wire, tls, greet).await,
    };
    result.unwrap_or(Phase::Done)
}

/// An IMAP tag and the rest, the tag kept as sent.
fn split_tag(line: &[u8]) -> (String, Vec<u8>) {
    match line.iter().position(|&b| b == b' ') {
        Some(at) => (String::from_utf8_lossy(&line[..at]).into_owned(), line[at + 1..].to_vec()),
        None => (String::from_utf8_lossy(line).into_owned(), Vec::new()),
    }
}

/// A command word, upper-cased, and the rest.
fn split_word(line: &[u8]) -> (String, Vec<u8>) {
    match line.iter().position(|&b| b == b' ') {
        Some(at) => (String::from_utf8_lossy(&line[..at]).to_ascii_uppercase(), line[at + 1..].to_vec()),
        None => (String::from_utf8_lossy(line).to_ascii_uppercase(), Vec::new()),
    }
}

async fn imap_phase<S: Io>(sh: &Shared, w: &mut Wire<S>, tls: bool, greet: bool) -> Option<Phase> {
    let starttls_pending = sh.opts.tls == UpstreamTls::Starttls && !tls;
    let caps = if starttls_pending {
        "IMAP4rev1 STARTTLS LOGINDISABLED".to_string()
    } else {
        format!(
            "IMAP4rev1 {}LITERAL+ ID IDLE UIDPLUS CHILDREN AUTH=XOAUTH2 AUTH=OAUTHBEARER",
            if sh.opts.sasl_ir { "SASL-IR " } else { "" }
        )
    };
    if greet {
        if sh.opts.greeting_capabilities {
            w.send(format!("* OK [CAPABILITY {caps}] Fake IMAP ready.\r\n")).await?;
        } else {
            w.send("* OK The Microsoft Exchange IMAP4 service is ready.\r\n").await?;
        }
    }
    loop {
        let line = w.line().await?;
        let (tag, rest) = split_tag(&line);
        let (command, args) = split_word(&rest);
        match command.as_str() {
            "CAPABILITY" => w.send(format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed.\r\n")).await?,
            "NOOP" => w.send(format!("{tag} OK NOOP completed.\r\n")).await?,
            "LOGOUT" => {
                w.send(format!("* BYE Logging out\r\n{tag} OK LOGOUT completed.\r\n")).await?;
                return Some(Phase::Done);
            }
            "STARTTLS" if starttls_pending => {
                w.send(format!("{tag} OK Begin TLS negotiation now.\r\n")).await?;
                if sh.opts.inject_after_starttls {
                    w.send("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n").await?;
                }
                return Some(Phase::StartTls);
            }
            "AUTHENTICATE" if !starttls_pending => {
                let (mechanism, initial) = split_word(&args);
                if mechanism != "XOAUTH2" {
                    w.send(format!("{tag} NO Unsupported mechanism\r\n")).await?;
                    continue;
                }
                let response = w.sasl_response(initial, "+ \r\n").await?;
                if sh.opts.stall == Some(Stall::Auth) {
                    w.stall().await?;
                }
                if !w.hold(sh.opts.auth_delay, &sh.abandoned_auths).await {
                    return None;
                }
                match sh.check(&response) {
                    Ok(_) if sh.fault() == Some(ExchangeFault::NotConnected) => {
                        w.send(format!("{tag} OK AUTHENTICATE completed.\r\n")).await?;
                        not_connected(w).await;
                        return Some(Phase::Done);
                    }
                    Ok(_) => {
                        w.send(format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS MOVE AUTH=XOAUTH2] AUTHENTICATE completed.\r\n")).await?;
                        return Some(Phase::LoggedIn);
                    }
                    Err(Verdict::Temporary) => {
                        w.send(format!("{tag} NO [UNAVAILABLE] Server is busy, try again later\r\n")).await?
                    }
                    Err(Verdict::Rejected | Verdict::Exchange(ExchangeFault::Challenge(_))) => {
                        w.send(format!("+ {}\r\n", sh.error_challenge())).await?;
                        let answer = w.line().await?;
                        if !answer.is_empty() {
                            w.send(format!("{tag} BAD Expected an empty response to the challenge\r\n")).await?;
                            continue;
                        }
                        w.send(format!("{tag} NO [AUTHENTICATIONFAILED] AUTHENTICATE failed.\r\n")).await?;
                    }
                    // Exchange refuses a valid token it cannot map to a mailbox without a challenge.
                    Err(Verdict::Exchange(_)) => w.send(format!("{tag} NO AUTHENTICATE failed.\r\n")).await?,
                }
            }
            "LOGIN" => w.send(format!("{tag} NO [AUTHENTICATIONFAILED] Plain login refused: use XOAUTH2\r\n")).await?,
            _ => w.send(format!("{tag} BAD Command Error. 12\r\n")).await?,
        }
    }
}

async fn pop3_phase<S: Io>(sh: &Shared, w: &mut Wire<S>, tls: bool, greet: bool) -> Option<Phase> {
    let starttls_pending = sh.opts.tls == UpstreamTls::Starttls && !tls;
    if greet {
        w.send("+OK The Microsoft Exchange POP3 service is ready.\r\n").await?;
    }
    loop {
        let line = w.line().await?;
        let (command, args) = split_word(&line);
        match command.as_str() {
            "CAPA" => {
                let stls = if starttls_pending { "STLS\r\n" } else { "" };
                w.send(format!(
                    "+OK\r\nTOP\r\nUIDL\r\nSASL XOAUTH2\r\nUSER\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n{stls}.\r\n"
                ))
                .await?
            }
            "STLS" if starttls_pending => {
                w.send("+OK Begin TLS negotiation\r\n").await?;
                if sh.opts.inject_after_starttls {
                    w.send("+OK injected\r\n").await?;
                }
                return Some(Phase::StartTls);
            }
            "AUTH" if !starttls_pending && args.eq_ignore_ascii_case(b"XOAUTH2") => {
                w.send("+ \r\n").await?;
                let response = w.line().await?;
                if sh.opts.stall == Some(Stall::Auth) {
                    w.stall().await?;
                }
                if !w.hold(sh.opts.auth_delay, &sh.abandoned_auths).await {
                    return None;
                }
                match sh.check(&response) {
                    Ok(_) => {
                        w.send("+OK User successfully authenticated.\r\n").await?;
                        return Some(Phase::LoggedIn);
                    }
                    Err(Verdict::Temporary) => w.send("-ERR [SYS/TEMP] Server is busy, try again later\r\n").await?,
                    Err(Verdict::Rejected | Verdict::Exchange(ExchangeFault::Challenge(_))) => {
                        w.send(format!("+ {}\r\n", sh.error_challenge())).await?;
                        w.line().await?;
                        w.send("-ERR Authentication failure: unknown user name or bad password.\r\n").await?;
                    }
                    Err(Verdict::Exchange(_)) => {
                        w.send("-ERR Authentication failure: unknown user name or bad password.\r\n").await?
                    }
                }
            }
            "USER" | "PASS" => w.send("-ERR [AUTH] Plain login refused: use XOAUTH2\r\n").await?,
            "QUIT" => {
                w.send("+OK Microsoft Exchange Server POP3 server signing off.\r\n").await?;
                return Some(Phase::Done);
            }
            _ => w.send("-ERR Protocol error. 14\r\n").await?,
        }
    }
}

fn smtp_ehlo(starttls_pending: bool, tls: bool) -> String {
    let mut lines =
        vec!["fake.example Hello [127.0.0.1]", "SIZE 157286400", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES"];
    if starttls_pending {
        lines.push("STARTTLS");
    }
    if tls {
        lines.push("AUTH LOGIN XOAUTH2");
    }
    lines.extend(["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"]);
    let last = lines.len() - 1;
    lines.iter().enumerate().map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' })).collect()
}

async fn smtp_phase<S: Io>(sh: &Shared, w: &mut Wire<S>, tls: bool, greet: bool) -> Option<Phase> {
    let starttls_pending = sh.opts.tls == UpstreamTls::Starttls && !tls;
    if greet {
        w.send("220 fake.example Microsoft ESMTP MAIL Service ready\r\n").await?;
    }
    loop {
        let line = w.line().await?;
        let (command, args) = split_word(&line);
        match command.as_str() {
            "EHLO" => {
                sh.ehlo_names.lock().unwrap().push(String::from_utf8_lossy(&args).into_owned());
                w.send(smtp_ehlo(starttls_pending, tls)).await?;
            }
            "STARTTLS" if starttls_pending => {
                w.send("220 2.0.0 SMTP server ready\r\n").await?;
                if sh.opts.inject_after_starttls {
                    w.send("250 injected\r\n").await?;
                }
                return Some(Phase::StartTls);
            }
            "AUTH" if tls => {
                let (mechanism, initial) = split_word(&args);
                if mechanism != "XOAUTH2" {
                    w.send("504 5.7.4 Unrecognized authentication type\r\n").await?;
                    continue;
                }
                let response = w.sasl_response(initial, "334 \r\n").await?;
                if sh.opts.stall == Some(Stall::Auth) {
                    w.stall().await?;
                }
                if !w.hold(sh.opts.auth_delay, &sh.abandoned_auths).await {
                    return None;
                }
                match sh.check(&response) {
                    Ok(_) => {
                        w.send("235 2.7.0 Authentication successful\r\n").await?;
                        return Some(Phase::LoggedIn);
                    }
                    Err(Verdict::Temporary) => w.send("454 4.7.0 Temporary authentication failure\r\n").await?,
                    Err(Verdict::Rejected | Verdict::Exchange(ExchangeFault::Challenge(_))) => {
                        w.send(format!("334 {}\r\n", sh.error_challenge())).await?;
                        w.line().await?;
                        w.send("535 5.7.3 Authentication unsuccessful [FAKE.example.com]\r\n").await?;
                    }
                    Err(Verdict::Exchange(ExchangeFault::SmtpAuthDisabledTenant)) => {
                        w.send("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [MN2PR05CA0004.namprd05.prod.outlook.com 2023-09-12T20:59:57.214Z 08DBB276B7E699C4]\r\n").await?
                    }
                    Err(Verdict::Exchange(ExchangeFault::ConcurrentConnections)) => {
                        w.send("432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [SN4PR0201CA0050.namprd02.prod.outlook.com]\r\n").await?
                    }
                    Err(Verdict::Exchange(ExchangeFault::SmtpAuthDisabledMailbox)) => {
                        w.send("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. [MN2PR05CA0004.namprd05.prod.outlook.com 2023-09-12T20:59:57.214Z 08DBB276B7E699C4]\r\n").await?
                    }
                    Err(Verdict::Exchange(_)) => {
                        w.send("535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]\r\n").await?
                    }
                }
            }
            "AUTH" => w.send("504 5.7.4 Unrecognized authentication type\r\n").await?,
            "QUIT" => {
                w.send("221 2.0.0 Service closing transmission channel\r\n").await?;
                return Some(Phase::Done);
            }
            "MAIL" | "RCPT" | "DATA" | "BDAT" => {
                w.send("530 5.7.57 Client not authenticated to send mail.\r\n").await?
            }
            "NOOP" | "RSET" => w.send("250 2.0.0 OK\r\n").await?,
            _ => w.send("500 5.3.3 Unrecognized command\r\n").await?,
        }
    }
}

/// Exchange's answer to `MAIL FROM:<...>` after a login.
fn mail_from_answer(args: &[u8], fault: Option<&ExchangeFault>) -> String {
    let sender = String::from_utf8_lossy(args);
    let sender = sender.split(['<', '>']).nth(1).unwrap_or("").to_string();
    match fault {
        Some(ExchangeFault::SendAsDenied) => format!(
            "554 5.2.252 SendAsDenied; authenticated@fake.example not allowed to send as {sender}; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.\r\n"
        ),
        Some(ExchangeFault::ThreadLimit) => {
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=DM5SPR00MB2471.namprd08.prod.outlook.com]\r\n".to_string()
        }
        _ => "250 2.1.0 Sender OK\r\n".to_string(),
    }
}

/// IMAP after a login Exchange cannot connect to a mailbox: every command
/// is refused, and after the second the server hangs up (MailKit#1496).
async fn not_connected<S: Io>(w: &mut Wire<S>) {
    for n in 0..2 {
        let Some(line) = w.line().await else { return };
        let (tag, _) = split_tag(&line);
        let bye = if n == 1 { "* BYE Connection closed. 14\r\n" } else { "" };
        if w.send(format!("{tag} BAD User is authenticated but not connected.\r\n{bye}")).await.is_none() {
            return;
        }
    }
}

async fn after_auth(shared: &Shared, mut wire: Wire<Box<dyn Io>>) {
    let smtp_fault = shared.fault().filter(|f| matches!(f, ExchangeFault::SendAsDenied | ExchangeFault::ThreadLimit));
    if shared.opts.proto == Proto::Smtp && smtp_fault.is_some() {
        // A transaction is refused whatever follows; the echo would hide it.
        let _ = smtp_mailbox(&mut wire, &Mailbox::default(), smtp_fault).await;
        let _ = wire.s.shutdown().await;
        return;
    }
    match &shared.opts.after_auth {
        AfterAuth::Echo => {
            let pending = std::mem::take(&mut wire.buf);
            if wire.send(&pending).await.is_none() {
                return;
            }
            shared.echoed.fetch_add(pending.len() as u64, Ordering::SeqCst);
            let (mut reader, mut writer) = tokio::io::split(wire.s);
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if writer.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                shared.echoed.fetch_add(n as u64, Ordering::SeqCst);
            }
            let _ = writer.shutdown().await;
        }
        AfterAuth::Mailbox(mailbox) => {
            let _ = match shared.opts.proto {
                Proto::Smtp => smtp_mailbox(&mut wire, mailbox, shared.fault()).await,
                Proto::Imap => imap_mailbox(&mut wire, mailbox).await,
                Proto::Pop3 => pop3_mailbox(&mut wire, mailbox).await,
            };
            let _ = wire.s.shutdown().await;
        }
        AfterAuth::ImapBulk(message) => {
            let _ = imap_bulk(shared, &mut wire, message).await;
            let _ = wire.s.shutdown().await;
        }
    }
}

/// The literal length `{n}` or `{n+}` at the end of an IMAP command line.
fn trailing_literal(line: &[u8]) -> Option<(usize, bool)> {
    let open = line.iter().rposition(|&b| b == b'{')?;
    let inner = line[open + 1..].strip_suffix(b"}")?;
    let (digits, non_sync) = match inner.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (inner, false),
    };
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, non_sync))
}

async fn imap_bulk<S: Io>(sh: &Shared, w: &mut Wire<S>, message: &[u8]) -> Option<()> {
    loop {
        let line = w.line().await?;
        let (tag, rest) = split_tag(&line);
        let (command, args) = split_word(&rest);
        match command.as_str() {
            "SELECT" | "EXAMINE" => {
                w.send(format!(
                    "* 1 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 2] next\r\n{tag} OK [READ-WRITE] {command} completed.\r\n"
                ))
                .await?
            }
            "FETCH" => {
                // One response for message 1 whatever was asked: the point is
                // moving the bytes, from memory, with as little work as possible.
                w.send(format!("* 1 FETCH (BODY[] {{{}}}\r\n", message.len())).await?;
                w.send(message).await?;
                w.send(format!(")\r\n{tag} OK FETCH completed.\r\n")).await?
            }
            "APPEND" => {
                let Some((mut left, non_sync)) = trailing_literal(&args) else {
                    w.send(format!("{tag} BAD APPEND needs a literal\r\n")).await?;
                    continue;
                };
                if !non_sync {
                    w.send("+ Ready for literal data\r\n").await?;
                }
                let buffered = left.min(w.buf.len());
                w.buf.drain(..buffered);
                left -= buffered;
                sh.appended.fetch_add(buffered as u64, Ordering::SeqCst);
                let mut chunk = vec![0u8; 256 * 1024];
                while left > 0 {
                    let want = left.min(chunk.len());
                    let n = w.s.read(&mut chunk[..want]).await.ok().filter(|n| *n > 0)?;
                    left -= n;
                    sh.appended.fetch_add(n as u64, Ordering::SeqCst);
                }
                // The rest of the command line after the literal (normally empty).
                w.line().await?;
                w.send(format!("{tag} OK APPEND completed.\r\n")).await?
            }
            "IDLE" => {
                w.send("+ idling\r\n").await?;
                while !w.line().await?.eq_ignore_ascii_case(b"DONE") {}
                w.send(format!("{tag} OK IDLE terminated.\r\n")).await?
            }
            "NOOP" | "CHECK" | "CLOSE" => w.send(format!("{tag} OK {command} completed.\r\n")).await?,
            "LOGOUT" => {
                w.send(format!("* BYE Logging out\r\n{tag} OK LOGOUT completed.\r\n")).await?;
                return Some(());
            }
            _ => w.send(format!("{tag} BAD Command Error. 12\r\n")).await?,
        }
    }
}

async fn smtp_mailbox<S: Io>(w: &mut Wire<S>, mailbox: &Mailbox, fault: Option<ExchangeFault>) -> Option<()> {
    loop {
        let line = w.line().await?;
        let (command, args) = split_word(&line);
        match command.as_str() {
            "MAIL" => w.send(mail_from_answer(&args, fault.as_ref())).await?,
            "RCPT" => w.send("250 2.1.5 Recipient OK\r\n").await?,
            "DATA" => {
                w.send("354 Start mail input; end with <CRLF>.<CRLF>\r\n").await?;
                let mut data = Vec::new();
                loop {
                    let line = w.line().await?;
                    if line == b"." {
                        break;
                    }
                    data.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
                    data.extend_from_slice(b"\r\n");
                }
                let uid = mailbox.deliver(data);
                w.send(format!("250 2.6.0 <{uid}@fake.example> Queued mail for delivery\r\n")).await?;
            }
            "EHLO" => w.send(smtp_ehlo(false, true)).await?,
            "RSET" | "NOOP" => w.send("250 2.0.0 OK\r\n").await?,
            "QUIT" => {
                w.send("221 2.0.0 Service closing transmission channel\r\n").await?;
                return Some(());
            }
            _ => w.send("500 5.3.3 Unrecognized command\r\n").await?,
        }
    }
}

/// Message numbers (1-based) a sequence set like `1`, `2:4`, `1:*` selects.
fn sequence_set(set: &str, max: usize) -> Vec<usize> {
    let num = |s: &str| if s == "*" { Some(max) } else { s.parse().ok() };
    let mut out = Vec::new();
    for part in set.split(',') {
        let (a, b) = part.split_once(':').unwrap_or((part, part));
        if let (Some(a), Some(b)) = (num(a), num(b)) {
            let (lo, hi) = (a.min(b), a.max(b));
            out.extend((lo.max(1)..=hi.min(max)).filter(|n| *n >= 1));
        }
    }
    out
}

async fn imap_mailbox<S: Io>(w: &mut Wire<S>, mailbox: &Mailbox) -> Option<()> {
    loop {
        let line = w.line().await?;
        let (tag, rest) = split_tag(&line);
        let (mut command, mut args) = split_word(&rest);
        let uid = command == "UID";
        if uid {
            (command, args) = split_word(&args);
        }
        let messages = mailbox.messages();
        match command.as_str() {
            "CAPABILITY" => {
                w.send(format!("* CAPABILITY IMAP4rev1 IDLE UIDPLUS MOVE\r\n{tag} OK CAPABILITY completed.\r\n"))
                    .await?
            }
            "NOOP" | "CLOSE" | "CHECK" | "EXPUNGE" => w.send(format!("{tag} OK {command} completed.\r\n")).await?,
            "LOGOUT" => {
                w.send(format!("* BYE Logging out\r\n{tag} OK LOGOUT completed.\r\n")).await?;
                return Some(());
            }
            "LIST" | "LSUB" => {
                w.send(format!("* {command} (\\HasNoChildren) \"/\" INBOX\r\n{tag} OK {command} completed.\r\n"))
                    .await?
            }
            "SELECT" | "EXAMINE" => {
                let next = messages.last().map_or(1, |m| m.uid + 1);
                w.send(format!(
                    "* {} EXISTS\r\n* 0 RECENT\r\n* FLAGS (\\Seen \\Deleted)\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT {next}] next\r\n{tag} OK [READ-WRITE] {command} completed.\r\n",
                    messages.len()
                ))
                .await?
            }
            "SEARCH" => {
                let ids: Vec<String> = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| if uid { m.uid.to_string() } else { (i + 1).to_string() })
                    .collect();
                w.send(format!("* SEARCH {}\r\n{tag} OK SEARCH completed.\r\n", ids.join(" "))).await?
            }
            "FETCH" => {
                let args = String::from_utf8_lossy(&args).into_owned();
                let set = args.split(' ').next().unwrap_or("");
                let selected: Vec<usize> = if uid {
                    let max_uid = messages.last().map_or(0, |m| m.uid as usize);
                    let uids = sequence_set(set, max_uid);
                    messages
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| uids.contains(&(m.uid as usize)))
                        .map(|(i, _)| i + 1)
                        .collect()
                } else {
                    sequence_set(set, messages.len())
                };
                for n in selected {
                    let m = &messages[n - 1];
                    w.send(format!("* {n} FETCH (UID {} BODY[] {{{}}}\r\n", m.uid, m.data.len())).await?;
                    w.send(&m.data).await?;
                    w.send(")\r\n").await?;
                }
                w.send(format!("{tag} OK FETCH completed.\r\n")).await?
            }
            "IDLE" => {
                w.send("+ idling\r\n").await?;
                let known = messages.len();
                loop {
                    tokio::select! {
                        line = w.line() => {
                            let line = line?;
                            if line.eq_ignore_ascii_case(b"DONE") {
                                w.send(format!("{tag} OK IDLE terminated.\r\n")).await?;
                                break;
                            }
                        }
                        _ = mailbox.arrived.notified() => {
                            let now = mailbox.messages().len();
                            if now != known {
                                w.send(format!("* {now} EXISTS\r\n")).await?;
                            }
                        }
                    }
                }
            }
            _ => w.send(format!("{tag} BAD Command Error. 12\r\n")).await?,
        }
    }
}

async fn pop3_mailbox<S: Io>(w: &mut Wire<S>, mailbox: &Mailbox) -> Option<()> {
    let messages = mailbox.messages();
    let mut deleted = vec![false; messages.len()];
    let pick = |args: &[u8], deleted: &[bool]| -> Option<usize> {
        let n: usize = std::str::from_utf8(args).ok()?.trim().parse().ok()?;
        (n >= 1 && n <= deleted.len() && !deleted[n - 1]).then_some(n - 1)
    };
    loop {
        let line = w.line().await?;
        let (command, args) = split_word(&line);
        match command.as_str() {
            "STAT" => {
                let (count, size) = messages
                    .iter()
                    .zip(&deleted)
                    .filter(|(_, d)| !**d)
                    .fold((0, 0), |(c, s), (m, _)| (c + 1, s + m.data.len()));
                w.send(format!("+OK {count} {size}\r\n")).await?
            }
            "LIST" | "UIDL" => {
                let value = |i: usize| {
                    if command == "LIST" {
                        messages[i].data.len().to_string()
                    } else {
                        messages[i].uid.to_string()
                    }
                };
                if args.is_empty() {
                    let mut out = String::from("+OK\r\n");
                    for i in (0..messages.len()).filter(|i| !deleted[*i]) {
                        out.push_str(&format!("{} {}\r\n", i + 1, value(i)));
                    }
                    out.push_str(".\r\n");
                    w.send(out).await?
                } else {
                    match pick(&args, &deleted) {
                        Some(i) => w.send(format!("+OK {} {}\r\n", i + 1, value(i))).await?,
                        None => w.send("-ERR No such message\r\n").await?,
                    }
                }
            }
            "RETR" => match pick(&args, &deleted) {
                Some(i) => {
                    let mut out = format!("+OK {} octets\r\n", messages[i].data.len()).into_bytes();
                    for line in messages[i].data.split_inclusive(|&b| b == b'\n') {
                        if line.starts_with(b".") {
                            out.push(b'.');
                        }
                        out.extend_from_slice(line);
                    }
                    if !out.ends_with(b"\r\n") {
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b".\r\n");
                    w.send(out).await?
                }
                None => w.send("-ERR No such message\r\n").await?,
            },
            "DELE" => match pick(&args, &deleted) {
                Some(i) => {
                    deleted[i] = true;
                    w.send("+OK Deleted\r\n").await?
                }
                None => w.send("-ERR No such message\r\n").await?,
            },
            "NOOP" => w.send("+OK\r\n").await?,
            "RSET" => {
                deleted.iter_mut().for_each(|d| *d = false);
                w.send("+OK\r\n").await?
            }
            "QUIT" => {
                let gone: Vec<u32> = messages.iter().zip(&deleted).filter(|(_, d)| **d).map(|(m, _)| m.uid).collect();
                mailbox.remove(&gone);
                w.send("+OK Microsoft Exchange Server POP3 server signing off.\r\n").await?;
                return Some(());
            }
            _ => w.send("-ERR Protocol error. 14\r\n").await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{sequence_set, trailing_literal};

    #[test]
    fn literals() {
        assert_eq!(trailing_literal(b"INBOX {5}"), Some((5, false)));
        assert_eq!(trailing_literal(b"INBOX (\\Seen) {104857600+}"), Some((104857600, true)));
        assert_eq!(trailing_literal(b"INBOX"), None);
        assert_eq!(trailing_literal(b"INBOX {x}"), None);
    }

    #[test]
    fn sequence_sets() {
        assert_eq!(sequence_set("1", 3), vec![1]);
        assert_eq!(sequence_set("1:*", 3), vec![1, 2, 3]);
        assert_eq!(sequence_set("*", 3), vec![3]);
        assert_eq!(sequence_set("2,3:3", 3), vec![2, 3]);
        assert_eq!(sequence_set("5", 3), Vec::<usize>::new());
    }
}
