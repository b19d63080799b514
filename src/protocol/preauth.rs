//! The one pre-authentication state machine, shared by the three protocols.
//!
//! It owns every decision that does not depend on the protocol's syntax:
//! whether a login may be attempted on this connection, the STARTTLS
//! go-ahead and the injection check behind it, the SASL exchange and its
//! continuation lines, counting failed logins, and what happens after a
//! login succeeds or fails. A [`Dialect`] supplies only the syntax: how
//! commands are framed and parsed, how replies are written, and the
//! commands only its protocol has (EHLO, CAPA, CAPABILITY, ID...).

use super::line::{LineError, LineFramer};
use super::reply::Failure;
use super::{LoginRequest, Next, SessionOptions};
use crate::sasl::{Credentials, Mechanism, SaslError, ServerExchange, Step};
use crate::secret::Secret;
use bytes::BytesMut;
use std::sync::Arc;

/// What a dialect made of the client's next command.
#[derive(Debug)]
pub enum Request {
    /// A command the dialect answered itself (CAPABILITY, EHLO, NOOP...).
    Answered,
    /// The dialect said goodbye (QUIT, LOGOUT): close the connection.
    Close,
    /// A command that cannot be carried out; answered with this failure.
    Refused(Failure),
    /// As `Refused`, but the stream is no longer in sync: answer, then close.
    Fatal(Failure),
    StartTls,
    /// Complete credentials in one command (IMAP LOGIN, POP3 USER+PASS).
    Login(Credentials),
    /// A SASL exchange: PLAIN or LOGIN (`None`: a mechanism we do not offer),
    /// with the initial response exactly as sent (base64, or `=` for empty).
    Authenticate {
        mechanism: Option<Mechanism>,
        initial: Option<Secret<Vec<u8>>>,
    },
}

/// A request and the tag it answers to (IMAP); the other protocols have none.
#[derive(Debug)]
pub struct Tagged {
    pub tag: Option<String>,
    pub request: Request,
}

impl Tagged {
    pub fn untagged(request: Request) -> Self {
        Tagged { tag: None, request }
    }
}

/// The syntax of one protocol before login.
pub trait Dialect {
    /// What the upstream said when it accepted the token.
    type Success;

    /// Prefix of a SASL challenge line (`+ ` or `334 `).
    const CHALLENGE: &'static [u8];

    /// `upstream_caps` are the upstream's capabilities before login.
    fn new(upstream_caps: Arc<[String]>, opts: &SessionOptions) -> Self;

    fn greeting(&self, opts: &SessionOptions, out: &mut Vec<u8>);

    /// The next request in `input`, or `None` until more bytes arrive.
    /// Commands the dialect answers itself write to `out`.
    fn next(&mut self, input: &mut BytesMut, opts: &SessionOptions, out: &mut Vec<u8>) -> Option<Tagged>;

    /// The next raw line: a client's response inside a SASL exchange.
    fn line(&mut self, input: &mut BytesMut) -> Result<Option<BytesMut>, LineError>;

    /// Writes `failure` as this protocol's reply (DESIGN.md error table).
    fn failure(failure: Failure, tag: Option<&str>, out: &mut Vec<u8>);

    /// The answer to STARTTLS when the handshake may begin.
    fn starttls_go_ahead(tag: Option<&str>, out: &mut Vec<u8>);

    /// The answer to a login the upstream accepted.
    fn succeeded(&self, success: &Self::Success, tag: Option<&str>, out: &mut Vec<u8>);

    /// The name the client gave for itself (SMTP EHLO/HELO), reused upstream.
    fn client_name(&self) -> Option<String> {
        None
    }

    /// The connection is now TLS: forget everything said before (RFC 3207,
    /// RFC 2595). The framing starts afresh.
    fn reset(&mut self, opts: &SessionOptions);
}

/// The syntax of a protocol with one command per line (POP3, SMTP): what
/// [`LineBased`] needs to be a [`Dialect`].
pub trait LineCommands {
    type Success;
    const CHALLENGE: &'static [u8];
    fn new(upstream_caps: Arc<[String]>) -> Self;
    fn greeting(&self, opts: &SessionOptions, out: &mut Vec<u8>);
    /// One complete command line, without its line ending.
    fn command(&mut self, line: &[u8], opts: &SessionOptions, out: &mut Vec<u8>) -> Request;
    fn failure(failure: Failure, out: &mut Vec<u8>);
    fn starttls_go_ahead(out: &mut Vec<u8>);
    fn succeeded(&self, success: &Self::Success, out: &mut Vec<u8>);
    fn client_name(&self) -> Option<String> {
        None
    }
    /// Forget what was said before TLS.
    fn reset(&mut self);
}

/// A line-based protocol's [`Dialect`]: the framing, written once.
pub struct LineBased<C> {
    framer: LineFramer,
    commands: C,
}

impl<C: LineCommands> Dialect for LineBased<C> {
    type Success = C::Success;
    const CHALLENGE: &'static [u8] = C::CHALLENGE;

    fn new(upstream_caps: Arc<[String]>, opts: &SessionOptions) -> Self {
        LineBased { framer: LineFramer::new(opts.max_line), commands: C::new(upstream_caps) }
    }

    fn greeting(&self, opts: &SessionOptions, out: &mut Vec<u8>) {
        self.commands.greeting(opts, out);
    }

    fn next(&mut self, input: &mut BytesMut, opts: &SessionOptions, out: &mut Vec<u8>) -> Option<Tagged> {
        let request = match self.framer.next_line(input) {
            Ok(Some(line)) => self.commands.command(&line, opts, out),
            Ok(None) => return None,
            Err(LineError::TooLong) => Request::Refused(Failure::LineTooLong),
            Err(LineError::Endless) => Request::Fatal(Failure::LineTooLong),
        };
        Some(Tagged::untagged(request))
    }

    fn line(&mut self, input: &mut BytesMut) -> Result<Option<BytesMut>, LineError> {
        self.framer.next_line(input)
    }

    fn failure(failure: Failure, _tag: Option<&str>, out: &mut Vec<u8>) {
        C::failure(failure, out);
    }

    fn starttls_go_ahead(_tag: Option<&str>, out: &mut Vec<u8>) {
        C::starttls_go_ahead(out);
    }

    fn succeeded(&self, success: &C::Success, _tag: Option<&str>, out: &mut Vec<u8>) {
        self.commands.succeeded(success, out);
    }

    fn client_name(&self) -> Option<String> {
        self.commands.client_name()
    }

    fn reset(&mut self, opts: &SessionOptions) {
        self.framer = LineFramer::new(opts.max_line);
        self.commands.reset();
    }
}

enum State {
    Commands,
    Sasl { tag: Option<String>, exchange: ServerExchange },
    Authenticating { tag: Option<String> },
    Done,
}

/// The pre-authentication dialogue of one connection: a [`Dialect`] and the
/// shared policy. A session driver feeds client bytes to [`PreAuth::handle`],
/// writes what it produces, and acts on the [`Next`] step it returns.
pub struct PreAuth<D: Dialect> {
    dialect: D,
    opts: SessionOptions,
    state: State,
    failures: FailureCount,
    bad_commands: FailureCount,
}

impl<D: Dialect> PreAuth<D> {
    pub fn new(upstream_caps: Arc<[String]>, opts: SessionOptions) -> Self {
        PreAuth {
            dialect: D::new(upstream_caps, &opts),
            failures: FailureCount::new(opts.max_auth_failures),
            bad_commands: FailureCount::new(opts.max_bad_commands),
            opts,
            state: State::Commands,
        }
    }

    /// Answers a refused command; past the limit, says goodbye instead of
    /// reading more (a client sending garbage gets a bounded number of
    /// answers, not one per line for as long as it keeps going).
    fn refuse(&mut self, failure: Failure, tag: Option<&str>, out: &mut Vec<u8>) -> Option<Next> {
        D::failure(failure, tag, out);
        if self.bad_commands.exhausted_after_one_more() {
            D::failure(Failure::TooManyErrors, None, out);
            return Some(self.close());
        }
        None
    }

    pub fn greeting(&mut self, out: &mut Vec<u8>) {
        self.dialect.greeting(&self.opts, out);
    }

    /// Consumes as much of `input` as makes progress. Bytes after a complete
    /// login stay in `input`: they belong to the upstream.
    pub fn handle(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> Next {
        loop {
            match &mut self.state {
                State::Commands => {
                    let Some(Tagged { tag, request }) = self.dialect.next(input, &self.opts, out) else {
                        return Next::Read;
                    };
                    if let Some(next) = self.request(tag, request, input, out) {
                        return next;
                    }
                }
                State::Sasl { tag, exchange } => {
                    let line = match self.dialect.line(input) {
                        Ok(Some(line)) => line,
                        Ok(None) => return Next::Read,
                        Err(LineError::Endless) => {
                            let tag = tag.take();
                            D::failure(Failure::LineTooLong, tag.as_deref(), out);
                            return self.close();
                        }
                        Err(LineError::TooLong) => {
                            let tag = tag.take();
                            self.state = State::Commands;
                            if let Some(next) = self.refuse(Failure::LineTooLong, tag.as_deref(), out) {
                                return next;
                            }
                            continue;
                        }
                    };
                    match exchange.respond(&line) {
                        Ok(Step::Challenge(challenge)) => challenge_line(D::CHALLENGE, challenge, out),
                        Ok(Step::Done(credentials)) => {
                            let tag = tag.take();
                            return self.login(tag, credentials);
                        }
                        Err(e) => {
                            let (tag, failure) = (tag.take(), sasl_failure(e));
                            self.state = State::Commands;
                            if let Some(next) = self.refusal(failure, tag.as_deref(), out) {
                                return next;
                            }
                        }
                    }
                }
                State::Authenticating { .. } | State::Done => return Next::Read,
            }
        }
    }

    /// Acts on one request; `None` means carry on reading commands.
    fn request(
        &mut self,
        tag: Option<String>,
        request: Request,
        input: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Option<Next> {
        let tag_ref = tag.as_deref();
        match request {
            Request::Answered => None,
            Request::Close => Some(self.close()),
            Request::Refused(failure) => self.refuse(failure, tag_ref, out),
            Request::Fatal(failure) => {
                D::failure(failure, tag_ref, out);
                Some(self.close())
            }
            Request::StartTls => {
                if !self.opts.offer_starttls() {
                    self.refuse(Failure::StartTlsUnavailable, tag_ref, out)
                } else if !input.is_empty() {
                    // Commands pipelined behind STARTTLS would run inside the
                    // TLS session if kept: a man in the middle could inject them.
                    input.clear();
                    D::failure(Failure::StartTlsInjection, tag_ref, out);
                    Some(self.close())
                } else {
                    D::starttls_go_ahead(tag_ref, out);
                    Some(Next::StartTls)
                }
            }
            Request::Login(credentials) => match self.opts.auth_refusal() {
                Some(refusal) => self.refuse(refusal, tag_ref, out),
                None => Some(self.login(tag, credentials)),
            },
            Request::Authenticate { mechanism, initial } => {
                if let Some(refusal) = self.opts.auth_refusal() {
                    return self.refuse(refusal, tag_ref, out);
                }
                let Some(mechanism) = mechanism else {
                    return self.refuse(Failure::UnsupportedMechanism, tag_ref, out);
                };
                match ServerExchange::start(mechanism, initial.as_ref().map(|i| i.expose().as_slice())) {
                    Ok((exchange, Step::Challenge(challenge))) => {
                        challenge_line(D::CHALLENGE, challenge, out);
                        self.state = State::Sasl { tag, exchange };
                        None
                    }
                    Ok((_, Step::Done(credentials))) => Some(self.login(tag, credentials)),
                    Err(e) => self.refusal(sasl_failure(e), tag_ref, out),
                }
            }
        }
    }

    /// A SASL exchange that failed: malformed or cancelled input counts as
    /// a bad command; an authorization refusal is an authentication failure.
    fn refusal(&mut self, failure: Failure, tag: Option<&str>, out: &mut Vec<u8>) -> Option<Next> {
        if failure == Failure::AuthFailed {
            D::failure(failure, tag, out);
            if self.failures.exhausted_after_one_more() {
                D::failure(Failure::TooManyFailures, None, out);
                return Some(self.close());
            }
            return None;
        }
        self.refuse(failure, tag, out)
    }

    fn login(&mut self, tag: Option<String>, credentials: Credentials) -> Next {
        self.state = State::Authenticating { tag };
        Next::Authenticate(LoginRequest { credentials, client_name: self.dialect.client_name() })
    }

    fn close(&mut self) -> Next {
        self.state = State::Done;
        Next::Close
    }

    /// The pending login failed; answers the client. Returns [`Next::Close`]
    /// when the failure ends the session.
    pub fn auth_failed(&mut self, failure: Failure, out: &mut Vec<u8>) -> Next {
        let tag = match std::mem::replace(&mut self.state, State::Commands) {
            State::Authenticating { tag } => tag,
            _ => None,
        };
        D::failure(failure, tag.as_deref(), out);
        if failure.closes_session() {
            return self.close();
        }
        if failure == Failure::AuthFailed && self.failures.exhausted_after_one_more() {
            D::failure(Failure::TooManyFailures, None, out);
            return self.close();
        }
        Next::Read
    }

    /// The pending login succeeded upstream; answers the client. From here
    /// the session is a splice.
    pub fn auth_succeeded(&mut self, success: &D::Success, out: &mut Vec<u8>) {
        let tag = match std::mem::replace(&mut self.state, State::Done) {
            State::Authenticating { tag } => tag,
            _ => None,
        };
        self.dialect.succeeded(success, tag.as_deref(), out);
    }

    /// The client connection is now TLS: the dialogue starts over.
    pub fn tls_started(&mut self) {
        self.opts.tls_active = true;
        self.state = State::Commands;
        self.dialect.reset(&self.opts);
    }

    /// Ends the session for a reason outside the dialogue (timeout, shutdown).
    pub fn abort(&mut self, failure: Failure, out: &mut Vec<u8>) {
        D::failure(failure, None, out);
        self.state = State::Done;
    }
}

/// Counts failed logins on one connection.
#[derive(Debug)]
struct FailureCount {
    count: u32,
    max: u32,
}

impl FailureCount {
    fn new(max: u32) -> Self {
        FailureCount { count: 0, max: max.max(1) }
    }

    /// Records a failure; true when the connection must now be closed.
    fn exhausted_after_one_more(&mut self) -> bool {
        self.count += 1;
        self.count >= self.max
    }
}

/// A SASL challenge line: `prefix` (`+ ` or `334 `), then the base64 challenge.
fn challenge_line(prefix: &[u8], challenge: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(prefix);
    out.extend_from_slice(crate::sasl::encode_base64(challenge).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The reply for a SASL exchange that went wrong.
fn sasl_failure(e: SaslError) -> Failure {
    match e {
        SaslError::Cancelled => Failure::SaslCancelled,
        SaslError::BadBase64 | SaslError::Malformed(_) => Failure::SaslMalformed,
        SaslError::AuthzidMismatch => Failure::AuthFailed,
    }
}

/// `AUTH <mechanism> [initial-response]` as POP3 (RFC 5034) and SMTP
/// (RFC 4954) write it: the arguments after the verb.
pub(crate) fn auth_arguments(args: &[u8]) -> Request {
    let (mechanism, initial) = match args.iter().position(|&b| b == b' ') {
        Some(at) => (&args[..at], Some(&args[at + 1..])),
        None => (args, None),
    };
    Request::Authenticate { mechanism: Mechanism::parse(mechanism), initial: initial.map(|i| Secret::new(i.to_vec())) }
}

/// Splits `VERB rest` at the first space; the verb is upper-cased.
pub(crate) fn split_verb(line: &[u8]) -> (Vec<u8>, &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(at) => (line[..at].to_ascii_uppercase(), &line[at + 1..]),
        None => (line.to_ascii_uppercase(), &[]),
    }
}
