//! The validated configuration the rest of the proxy sees.
//!
//! Loading is three steps: YAML into a generic tree, `${VAR}` expansion of
//! string values, then typed deserialization ([`raw`]) and validation
//! (`validate`). Every problem names the file, the key path and what is wrong.

pub mod cidr;
pub mod expand;
pub mod keys;
pub mod raw;
mod validate;

use crate::protocol::Protocol;
use crate::secret::Secret;
pub use expand::{Env, ProcessEnv};
pub use raw::{Flow, JwtAlgorithm, LocalTls, LocalTlsProfile, LogFormat, LogLevel, StateBackend, UpstreamTls};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug)]
pub struct Config {
    /// The file this came from, for messages.
    pub source: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub upstream_ca_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    pub identities: BTreeMap<String, IdentityConfig>,
    pub accounts: Vec<AccountConfig>,
    pub token_store: Option<TokenStoreConfig>,
    pub log: LogConfig,
    pub shutdown_timeout: Duration,
    /// Run (by `/bin/sh -c`) when an account needs `xoauth2-proxy login` again.
    pub on_reauth_required: Option<String>,
    /// Upstream sessions (logins in progress and spliced) per mailbox and protocol.
    pub session_caps: SessionCaps,
    /// How long a login over a mailbox's cap waits for a slot.
    pub session_wait: Duration,
    pub login_throttle: LoginThrottle,
    pub password_verification: PasswordVerification,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); off when absent.
    pub admin: Option<AdminConfig>,
    /// Shared state for several replicas; `None`: files and memory.
    pub state: Option<StateConfig>,
    /// Things that are allowed but deserve the admin's attention.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Protocol,
    pub bind: SocketAddr,
    pub local_tls: LocalTls,
    /// Which TLS stack serves `local_tls` (modern unless `legacy` is asked for).
    pub local_tls_profile: LocalTlsProfile,
    /// The listener's own certificate (`listeners[].tls`), if it has one;
    /// otherwise the top-level `tls:` serves it ([`Config::local_tls_files`]).
    pub tls: Option<TlsFiles>,
    pub upstream: UpstreamAddr,
    pub upstream_tls: UpstreamTls,
    pub require_tls: bool,
    /// Passwords may arrive over an unencrypted connection: a loopback bind,
    /// or `allow_plaintext_auth: true`.
    pub plaintext_allowed: bool,
    /// Client addresses allowed to connect; empty means everyone.
    pub allow_from: Vec<cidr::Cidr>,
    /// Upstream sessions per mailbox for this listener's protocol (the
    /// listener's own setting, or the top-level one).
    pub max_sessions_per_mailbox: usize,
    /// How long a login over that cap waits for a place.
    pub session_wait: Duration,
    /// Add the `AUTH=PLAIN LOGIN` line of pre-RFC 4954 clients to EHLO (Postfix's
    /// `broken_sasl_auth_clients`).
    pub broken_sasl_auth_clients: bool,
    /// `proxy_protocol: true`: every connection starts with a PROXY header
    /// from one of these balancer addresses (`proxy_protocol_from`).
    pub proxy_protocol_from: Option<Vec<cidr::Cidr>>,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_line_length: usize,
    pub max_auth_failures: u32,
    /// Commands refused before login (syntax, unknown, too long...) after
    /// which the connection is closed.
    pub max_bad_commands: u32,
    /// Silence allowed before login.
    pub preauth_timeout: Duration,
    /// From accept to authenticated, whatever the client does.
    pub login_deadline: Duration,
    pub idle_timeout: Duration,
    pub upstream_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Connections the kernel may hold waiting for `accept`; `None`: as many
    /// as it allows (`net.core.somaxconn`), read when the listener is bound.
    pub listen_backlog: Option<u32>,
}

impl Limits {
    pub const DEFAULT_MAX_LINE_LENGTH: usize = 8192;
    pub const DEFAULT_MAX_AUTH_FAILURES: u32 = 3;
    pub const DEFAULT_MAX_BAD_COMMANDS: u32 = 10;
    pub const DEFAULT_PREAUTH_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_LOGIN_DEADLINE: Duration = Duration::from_secs(60);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
    pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 50;
}

/// Delays after repeated failed logins, per client address and per username.
#[derive(Debug, Clone)]
pub struct LoginThrottle {
    /// Failures allowed without delay.
    pub free_failures: u32,
    /// The first delay; each further failure doubles it.
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// A record is forgotten after this long without failures.
    pub forget_after: Duration,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            free_failures: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            forget_after: Duration::from_secs(15 * 60),
        }
    }
}

/// Upstream sessions per mailbox, per protocol, across the listeners of that
/// protocol. The defaults are Exchange Online's published limits: SMTP AUTH
/// client submission allows 3 concurrent connections per mailbox ("432 4.3.2
/// Concurrent connections limit exceeded"); IMAP4 and POP3 allow 20 each
/// (Exchange Online limits: "Receiving and sending limits", "IMAP4 and POP3
/// limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCaps {
    pub smtp: usize,
    pub imap: usize,
    pub pop3: usize,
}

impl SessionCaps {
    pub const EXCHANGE: SessionCaps = SessionCaps { smtp: 3, imap: 20, pop3: 20 };

    pub fn for_protocol(&self, protocol: Protocol) -> usize {
        match protocol {
            Protocol::Smtp => self.smtp,
            Protocol::Imap => self.imap,
            Protocol::Pop3 => self.pop3,
        }
    }
}

/// Well under the 30-60 s clients usually wait for an answer.
pub const DEFAULT_SESSION_WAIT: Duration = Duration::from_secs(20);

/// How the argon2 verification pool is sized (`password_verification`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordVerification {
    /// Worker threads, each with its own argon2 memory.
    pub workers: usize,
    /// Attempts waiting for a worker; more get the temporary-failure answer.
    pub queue: usize,
    /// How long an attempt may wait for its verification.
    pub timeout: Duration,
}

impl Default for PasswordVerification {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        PasswordVerification { workers: cores.clamp(1, 16), queue: 64, timeout: Duration::from_secs(10) }
    }
}

/// Where the admin listener serves `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
}

impl AdminConfig {
    /// Loopback, on the port the Prometheus exporter registry lists for no
    /// one in particular and the packaging's probes use.
    pub const DEFAULT_BIND: &'static str = "127.0.0.1:9464";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug)]
pub struct IdentityConfig {
    pub name: String,
    /// `{authority}/{tenant}/oauth2/v2.0/token`
    pub token_url: String,
    /// `{authority}/{tenant}/oauth2/v2.0/devicecode`
    pub device_code_url: String,
    pub client_id: String,
    pub credential: ClientCredential,
    pub flow: Flow,
    pub scope: String,
    pub min_token_lifetime: Duration,
    pub token_timeout: Duration,
}

impl IdentityConfig {
    pub const DEFAULT_AUTHORITY: &'static str = "https://login.microsoftonline.com";
    pub const DEFAULT_MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);
    pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
    pub const APP_ONLY_SCOPE: &'static str = "https://outlook.office365.com/.default";
    pub const DELEGATED_SCOPE: &'static str = "https://outlook.office.com/IMAP.AccessAsUser.All \
        https://outlook.office.com/POP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access";
}

/// How the app proves its identity to the token endpoint.
#[derive(Debug)]
pub enum ClientCredential {
    Secret(Secret<String>),
    /// Read at each token request, so a rotated secret needs no restart.
    SecretFile(PathBuf),
    /// A signed client assertion (JWT) instead of a secret.
    Certificate {
        cert_file: PathBuf,
        key_file: PathBuf,
        algorithm: JwtAlgorithm,
    },
    /// A public client (delegated flows only).
    None,
}

#[derive(Debug)]
pub struct AccountConfig {
    pub username: String,
    pub password: PasswordConfig,
    pub mailbox: String,
    pub smtp_user: String,
    pub identity: String,
}

#[derive(Debug)]
pub enum PasswordConfig {
    /// An argon2 PHC string.
    Hash(String),
    Plain(Secret<String>),
}

#[derive(Debug)]
pub struct TokenStoreConfig {
    /// Directory of encrypted refresh tokens, one file per account.
    pub path: PathBuf,
    pub key: TokenStoreKey,
}

#[derive(Debug)]
pub enum TokenStoreKey {
    File(PathBuf),
    Inline(Secret<String>),
}

/// `state:`: the Redis (or Valkey) server that replicas share.
/// Comparable, so a reload can tell that `state:` changed (it applies at
/// the next start).
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// `redis://` or `rediss://` (TLS); a password in it is a secret.
    pub url: Secret<String>,
    /// Every key starts with `{prefix}:`; replicas with the same prefix share.
    pub prefix: String,
    pub password: Option<StatePassword>,
    /// Extra trust root for `rediss://` (else the public web roots).
    pub ca_file: Option<PathBuf>,
    /// Bound on every Redis round trip (and on connecting).
    pub timeout: Duration,
    /// A mailbox session slot lives this long unless renewed (every third of it).
    pub session_lease: Duration,
    /// Expiry of the cross-replica refresh lock.
    pub refresh_lock: Duration,
}

impl StateConfig {
    pub const DEFAULT_PREFIX: &'static str = "xoauth2-proxy";
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_SESSION_LEASE: Duration = Duration::from_secs(30);
    pub const DEFAULT_REFRESH_LOCK: Duration = Duration::from_secs(30);

    /// The URL with any password in it masked, for messages.
    pub fn display_url(&self) -> String {
        let url = self.url.expose();
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &url[scheme + 3..at];
                let user = userinfo.split_once(':').map_or("", |(u, _)| u);
                format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StatePassword {
    Inline(Secret<String>),
    /// Read when connecting, so a rotated password needs no restart.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: LogLevel::Info, format: LogFormat::Text }
    }
}

/// The cargo feature that serves `local_tls_profile: legacy` (OpenSSL).
pub const LEGACY_FEATURE: &str = "legacy-tls";

pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// One thing wrong in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `listeners[0].bind`; empty for the whole file.
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.path.is_empty() {
                write!(f, "{}: {}", self.file.display(), p.message)?;
            } else {
                write!(f, "{}: {}: {}", self.file.display(), p.path, p.message)?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates `path`, expanding `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &ProcessEnv)
    }

    pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem { path: String::new(), message: format!("cannot read: {e}") }],
        })?;
        Config::parse(&text, path, env)
    }

    /// Parses `text` as if read from `path`; relative file names in it are
    /// resolved against `path`'s directory.
    pub fn parse(text: &str, path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError { file: path.to_path_buf(), problems };
        let mut tree: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
            .map_err(|e| fail(vec![Problem { path: String::new(), message: format!("invalid YAML: {e}") }]))?;
        if tree.is_null() {
            return Err(fail(vec![Problem { path: String::new(), message: "the file is empty".into() }]));
        }
        let mut problems = Vec::new();
        expand_tree(&mut tree, String::new(), env, &mut problems);
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        let raw: raw::RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            fail(vec![Problem { path, message: e.into_inner().to_string() }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        validate::validate(raw, path, base).map_err(fail)
    }

    /// The certificate and key a listener's local TLS uses: its own
    /// `tls:`, else the top-level one. None for listeners without local TLS.
    pub fn local_tls_files<'a>(&'a self, listener: &'a ListenerConfig) -> Option<&'a TlsFiles> {
        if listener.local_tls == LocalTls::None {
            return None;
        }
        listener.tls.as_ref().or(self.tls.as_ref())
    }

    pub fn identity(&self, name: &str) -> Option<&IdentityConfig> {
        self.identities.get(name)
    }

    /// The account a command-line ACCOUNT names: a username (without regard
    /// to case) or, failing that, a unique mailbox.
    pub fn find_account(&self, name: &str) -> Result<&AccountConfig, String> {
        if let Some(a) = self.accounts.iter().find(|a| a.username.eq_ignore_ascii_case(name)) {
            return Ok(a);
        }
        let by_mailbox: Vec<&AccountConfig> =
            self.accounts.iter().filter(|a| a.mailbox.eq_ignore_ascii_case(name)).collect();
        match by_mailbox.as_slice() {
            [one] => Ok(one),
            [] => Err(format!("no account with username or mailbox {name:?} in {}", self.source.display())),
            many => Err(format!(
                "mailbox {name:?} belongs to several accounts ({}); name one by username",
                many.iter().map(|a| a.username.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

fn expand_tree(value: &mut serde_yaml_ng::Value, path: String, env: &dyn Env, problems: &mut Vec<Problem>) {
    use serde_yaml_ng::Value;
    match value {
        Value::String(s) => match expand::expand(s, env) {
            Ok(expanded) => *s = expanded,
            Err(e) => problems.push(Problem { path, message: e.to_string() }),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_tree(item, format!("{path}[{i}]"), env, problems);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = match key {
                    Value::String(k) => k.clone(),
                    other => serde_yaml_ng::to_string(other).unwrap_or_default().trim().to_string(),
                };
                let child = if path.is_empty() { key } else { format!("{path}.{key}") };
                expand_tree(item, child, env, problems);
            }
        }
        Value::Tagged(tagged) => expand_tree(&mut tagged.value, path, env, problems),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}
