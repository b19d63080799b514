//! From the raw file to a typed [`Config`], collecting every problem with
//! its key path. One submodule per section; nothing here reads the disk
//! (that is `crate::preflight`'s job, after validation).

mod accounts;
mod identities;
mod listeners;
mod state;

use super::raw::{self, RawConfig};
use super::{
    AdminConfig, Config, LogConfig, LoginThrottle, PasswordVerification, Problem, SessionCaps, TlsFiles,
    TokenStoreConfig, TokenStoreKey, UpstreamAddr, DEFAULT_SESSION_WAIT, DEFAULT_SHUTDOWN_TIMEOUT,
};
use crate::secret::Secret;
use std::path::{Path, PathBuf};

/// What every section's validation shares: where problems and warnings go,
/// and the directory relative file names are resolved against.
struct Ctx<'a> {
    problems: Vec<Problem>,
    warnings: Vec<String>,
    base: &'a Path,
}

impl Ctx<'_> {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into() });
    }

    fn resolve(&self, s: &str) -> PathBuf {
        let path = Path::new(s);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }
}

pub(super) fn validate(raw: RawConfig, source: &Path, base: &Path) -> Result<Config, Vec<Problem>> {
    let mut cx = Ctx { problems: Vec::new(), warnings: Vec::new(), base };
    let tls = raw.tls.map(|t| TlsFiles { cert_file: cx.resolve(&t.cert_file), key_file: cx.resolve(&t.key_file) });
    let upstream_ca_file = raw.upstream_ca_file.as_deref().map(|f| cx.resolve(f));
    let session_caps = session_caps(raw.max_sessions_per_mailbox, &mut cx);
    let session_wait = raw.session_wait.map_or(DEFAULT_SESSION_WAIT, |d| d.0);
    let listeners = listeners::validate(raw.listeners, tls.is_some(), session_caps, session_wait, &mut cx);
    let identities = identities::validate(raw.identities, raw.token_store.is_some(), &mut cx);
    let accounts = accounts::validate(raw.accounts, &identities, &mut cx);
    let token_store = raw.token_store.map(|s| token_store(s, &mut cx));
    if let Some(hook) = &raw.on_reauth_required {
        if hook.trim().is_empty() {
            cx.add("on_reauth_required", "must not be empty (remove the key to run nothing)");
        }
    }
    let login_throttle = login_throttle(raw.login_throttle, &mut cx);
    let password_verification = password_verification(raw.password_verification, &mut cx);
    let admin = raw.admin.and_then(|a| admin(a, &listeners, &mut cx));
    let state = raw.state.map(|s| state::validate(s, &identities, &mut cx));
    if state.is_some() {
        match &token_store {
            None => cx.add(
                "state",
                "needs token_store: its key seals the tokens Redis holds (set token_store with the same key on every replica)",
            ),
            Some(store) if matches!(store.key, TokenStoreKey::File(_)) => cx.warnings.push(
                "state: every replica must use the same token_store key; with a key_file, copy the same file to every \
                 replica (or use token_store.key: ${VAR}), or they cannot read each other's tokens"
                    .to_string(),
            ),
            Some(_) => {}
        }
    }
    let log = LogConfig {
        level: raw.log.level.unwrap_or(raw::LogLevel::Info),
        format: raw.log.format.unwrap_or(raw::LogFormat::Text),
    };
    if !cx.problems.is_empty() {
        return Err(cx.problems);
    }
    Ok(Config {
        source: source.to_path_buf(),
        listeners,
        upstream_ca_file,
        tls,
        identities,
        accounts,
        token_store,
        log,
        shutdown_timeout: raw.shutdown_timeout.map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.0),
        on_reauth_required: raw.on_reauth_required,
        session_caps,
        session_wait,
        login_throttle,
        password_verification,
        admin,
        state,
        warnings: cx.warnings,
    })
}

fn session_caps(raw: Option<raw::RawSessionCaps>, cx: &mut Ctx) -> SessionCaps {
    let defaults = SessionCaps::EXCHANGE;
    let caps = match raw {
        None => defaults,
        Some(raw::RawSessionCaps::All(n)) => SessionCaps { smtp: n, imap: n, pop3: n },
        Some(raw::RawSessionCaps::PerProtocol(p)) => SessionCaps {
            smtp: p.smtp.unwrap_or(defaults.smtp),
            imap: p.imap.unwrap_or(defaults.imap),
            pop3: p.pop3.unwrap_or(defaults.pop3),
        },
    };
    if caps.smtp == 0 || caps.imap == 0 || caps.pop3 == 0 {
        cx.add("max_sessions_per_mailbox", "must be at least 1");
    }
    caps
}

fn token_store(s: raw::RawTokenStore, cx: &mut Ctx) -> TokenStoreConfig {
    if s.key_file.is_some() && s.key.is_some() {
        cx.add("token_store.key", "set either key_file or key, not both");
    }
    let key = match (s.key_file, s.key) {
        (_, Some(key)) => {
            if let Err(e) = super::keys::parse_store_key(&key) {
                cx.add("token_store.key", e.to_string());
            }
            TokenStoreKey::Inline(Secret::new(key))
        }
        (Some(file), None) => TokenStoreKey::File(cx.resolve(&file)),
        (None, None) => TokenStoreKey::File(cx.resolve(&s.path).join("key")),
    };
    if s.path.trim().is_empty() {
        cx.add("token_store.path", "must not be empty");
    }
    TokenStoreConfig { path: cx.resolve(&s.path), key }
}

fn login_throttle(raw: Option<raw::RawLoginThrottle>, cx: &mut Ctx) -> LoginThrottle {
    let defaults = LoginThrottle::default();
    let throttle = match raw {
        None => defaults,
        Some(t) => LoginThrottle {
            free_failures: t.free_failures.unwrap_or(defaults.free_failures),
            initial_delay: t.initial_delay.map_or(defaults.initial_delay, |d| d.0),
            max_delay: t.max_delay.map_or(defaults.max_delay, |d| d.0),
            forget_after: t.forget_after.map_or(defaults.forget_after, |d| d.0),
        },
    };
    if throttle.max_delay < throttle.initial_delay {
        cx.add("login_throttle.max_delay", "must not be shorter than initial_delay");
    }
    throttle
}

fn password_verification(raw: Option<raw::RawPasswordVerification>, cx: &mut Ctx) -> PasswordVerification {
    let defaults = PasswordVerification::default();
    let Some(raw) = raw else { return defaults };
    let pool = PasswordVerification {
        workers: raw.workers.unwrap_or(defaults.workers),
        queue: raw.queue.unwrap_or(defaults.queue),
        timeout: raw.timeout.map_or(defaults.timeout, |d| d.0),
    };
    if !(1..=64).contains(&pool.workers) {
        cx.add("password_verification.workers", "must be between 1 and 64");
    }
    if !(1..=100_000).contains(&pool.queue) {
        cx.add("password_verification.queue", "must be between 1 and 100000");
    }
    if pool.timeout.is_zero() {
        cx.add("password_verification.timeout", "must be longer than zero");
    }
    pool
}

/// The admin listener's address: an IP and port like a listener's, not one
/// a listener uses. Off loopback it is allowed (a Kubernetes kubelet probes
/// the pod's address) with a warning: anyone who reaches it reads the
/// metrics, which name listeners, identities and usernames.
fn admin(raw: raw::RawAdmin, listeners: &[super::ListenerConfig], cx: &mut Ctx) -> Option<AdminConfig> {
    let text = raw.bind.as_deref().unwrap_or(AdminConfig::DEFAULT_BIND);
    let Ok(bind) = text.parse::<std::net::SocketAddr>() else {
        cx.add("admin.bind", format!("{text:?} is not an IP address and port, e.g. 127.0.0.1:9464 or [::1]:9464"));
        return None;
    };
    if bind.port() != 0 {
        if let Some(l) = listeners.iter().find(|l| l.bind == bind) {
            cx.add("admin.bind", format!("{bind} is already used by listener {:?}", l.name));
        }
    }
    if !bind.ip().is_loopback() {
        cx.warnings.push(format!(
            "admin.bind {bind} is not loopback: whoever reaches it reads /metrics (listener, identity and \
             account names, counts); restrict it with a firewall or a network policy"
        ));
    }
    Some(AdminConfig { bind })
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// `host:port` or `[v6]:port`.
pub(crate) fn parse_host_port(s: &str) -> Result<UpstreamAddr, String> {
    let bad = || format!("{s:?} is not host:port, e.g. outlook.office365.com:993");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
        (host, port)
    } else {
        s.rsplit_once(':').ok_or_else(bad)?
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(char::is_whitespace) || (host.contains(':') && !s.starts_with('['))
    {
        return Err(bad());
    }
    Ok(UpstreamAddr { host: host.to_string(), port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(
            parse_host_port("outlook.office365.com:993"),
            Ok(UpstreamAddr { host: "outlook.office365.com".into(), port: 993 })
        );
        assert_eq!(parse_host_port("[::1]:143"), Ok(UpstreamAddr { host: "::1".into(), port: 143 }));
        assert_eq!(parse_host_port("127.0.0.1:25").map(|u| u.to_string()), Ok("127.0.0.1:25".into()));
        for bad in ["host", "host:", ":25", "host:0", "host:99999", "::1:25", "a b:25", "[::1]25"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }
}
