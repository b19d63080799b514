//! From the raw file to a typed [`Config`], collecting every problem with its key path.

use super::cidr::Cidr;
use super::raw::{self, Flow, JwtAlgorithm, LocalTls, RawConfig, UpstreamTls};
use super::{
    AccountConfig, ClientCredential, Config, IdentityConfig, Limits, ListenerConfig, LogConfig, LoginThrottle,
    PasswordConfig, Problem, TlsFiles, TokenStoreConfig, TokenStoreKey, UpstreamAddr, DEFAULT_MAX_SESSIONS_PER_MAILBOX,
    DEFAULT_SHUTDOWN_TIMEOUT,
};
use crate::protocol::Protocol;
use crate::secret::Secret;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem { path: path.into(), message: message.into() });
    }
}

pub(super) fn validate(raw: RawConfig, source: &Path, base: &Path) -> Result<Config, Vec<Problem>> {
    let mut p = Problems(Vec::new());
    let mut warnings = Vec::new();
    let resolve = |s: &str| -> PathBuf {
        let path = Path::new(s);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        }
    };

    let tls = raw.tls.map(|t| TlsFiles { cert_file: resolve(&t.cert_file), key_file: resolve(&t.key_file) });
    if let Some(t) = &tls {
        readable_file(&mut p, "tls.cert_file", &t.cert_file);
        readable_file(&mut p, "tls.key_file", &t.key_file);
    }

    let upstream_ca_file = raw.upstream_ca_file.as_deref().map(resolve);
    if let Some(ca) = &upstream_ca_file {
        if readable_file(&mut p, "upstream_ca_file", ca) {
            if let Err(e) = crate::tls::load_certificates(ca) {
                p.add("upstream_ca_file", e.to_string());
            }
        }
    }

    if raw.listeners.is_empty() {
        p.add("listeners", "at least one listener is required");
    }
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    let mut listeners = Vec::new();
    for (i, l) in raw.listeners.into_iter().enumerate() {
        let at = |key: &str| format!("listeners[{i}].{key}");
        if l.name.trim().is_empty() {
            p.add(at("name"), "must not be empty");
        } else if !names.insert(l.name.clone()) {
            p.add(at("name"), format!("duplicate listener name {:?}", l.name));
        }
        let bind = match l.bind.parse::<SocketAddr>() {
            Ok(addr) => {
                // Port 0 asks the OS for any free port: never a clash.
                if addr.port() != 0 && !binds.insert(addr) {
                    p.add(at("bind"), format!("{addr} is already used by another listener"));
                }
                Some(addr)
            }
            Err(_) => {
                p.add(
                    at("bind"),
                    format!("{:?} is not an IP address and port, e.g. 127.0.0.1:1587 or [::1]:1143", l.bind),
                );
                None
            }
        };
        let upstream = match parse_host_port(&l.upstream) {
            Ok(u) => Some(u),
            Err(e) => {
                p.add(at("upstream"), e);
                None
            }
        };
        let local_tls = l.local_tls.unwrap_or(LocalTls::None);
        if local_tls != LocalTls::None && tls.is_none() {
            p.add(at("local_tls"), "local TLS needs a certificate: set tls.cert_file and tls.key_file");
        }
        let require_tls = l.require_tls.unwrap_or(false);
        if require_tls && local_tls == LocalTls::None {
            p.add(at("require_tls"), "require_tls needs local_tls: starttls or implicit");
        }
        let upstream_tls = l.upstream_tls.unwrap_or(match l.protocol {
            Protocol::Smtp => UpstreamTls::Starttls,
            Protocol::Imap | Protocol::Pop3 => UpstreamTls::Implicit,
        });
        let allow_plaintext = l.allow_plaintext_auth.unwrap_or(false);
        let loopback = bind.is_some_and(|b| b.ip().is_loopback());
        let plaintext_allowed = loopback || allow_plaintext;
        if let Some(bind) = bind {
            if !plaintext_allowed && local_tls == LocalTls::None {
                warnings.push(format!(
                    "listener {:?} binds {bind}, which is not loopback, without local TLS: logins are refused \
                     because passwords would cross the network in the clear; set local_tls, or \
                     allow_plaintext_auth: true if the network is trusted",
                    l.name
                ));
            } else if !plaintext_allowed && local_tls == LocalTls::Starttls && !require_tls {
                warnings.push(format!(
                    "listener {:?} binds {bind}, which is not loopback: clients must use STARTTLS before logging in",
                    l.name
                ));
            }
        }
        let limits = Limits {
            max_line_length: l.max_line_length.unwrap_or(Limits::DEFAULT_MAX_LINE_LENGTH),
            max_auth_failures: l.max_auth_failures.unwrap_or(Limits::DEFAULT_MAX_AUTH_FAILURES),
            preauth_timeout: l.preauth_timeout.map_or(Limits::DEFAULT_PREAUTH_TIMEOUT, |d| d.0),
            idle_timeout: l.idle_timeout.map_or(Limits::DEFAULT_IDLE_TIMEOUT, |d| d.0),
            upstream_timeout: l.upstream_timeout.map_or(Limits::DEFAULT_UPSTREAM_TIMEOUT, |d| d.0),
            max_connections: l.max_connections.unwrap_or(Limits::DEFAULT_MAX_CONNECTIONS),
            max_connections_per_ip: l.max_connections_per_ip.unwrap_or(Limits::DEFAULT_MAX_CONNECTIONS_PER_IP),
        };
        for (key, n) in
            [("max_connections", limits.max_connections), ("max_connections_per_ip", limits.max_connections_per_ip)]
        {
            if n == 0 {
                p.add(at(key), "must be at least 1");
            }
        }
        let mut allow_from = Vec::new();
        for (j, range) in l.allow_from.iter().flatten().enumerate() {
            match range.parse::<Cidr>() {
                Ok(c) => allow_from.push(c),
                Err(e) => p.add(format!("listeners[{i}].allow_from[{j}]"), e),
            }
        }
        if l.allow_from.as_ref().is_some_and(|a| a.is_empty()) {
            p.add(at("allow_from"), "an empty list would refuse every client; remove the key to allow all");
        }
        if !(512..=1 << 20).contains(&limits.max_line_length) {
            p.add(at("max_line_length"), "must be between 512 and 1048576 bytes");
        }
        if limits.max_auth_failures == 0 {
            p.add(at("max_auth_failures"), "must be at least 1");
        }
        for (key, d) in [
            ("preauth_timeout", limits.preauth_timeout),
            ("idle_timeout", limits.idle_timeout),
            ("upstream_timeout", limits.upstream_timeout),
        ] {
            if d.is_zero() {
                p.add(at(key), "must be longer than zero");
            }
        }
        if let (Some(bind), Some(upstream)) = (bind, upstream) {
            listeners.push(ListenerConfig {
                name: l.name,
                protocol: l.protocol,
                bind,
                local_tls,
                upstream,
                upstream_tls,
                require_tls,
                plaintext_allowed,
                allow_from,
                limits,
            });
        }
    }

    let mut identities = BTreeMap::new();
    for (name, id) in raw.identities {
        let at = |key: &str| format!("identities.{name}.{key}");
        let authority = id.authority.as_deref().unwrap_or(IdentityConfig::DEFAULT_AUTHORITY).trim_end_matches('/');
        if let Err(e) = check_authority(authority) {
            p.add(at("authority"), e);
        }
        for (key, value) in [("tenant", &id.tenant), ("client_id", &id.client_id)] {
            if value.trim().is_empty() {
                p.add(at(key), "must not be empty");
            } else if !value.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
                p.add(at(key), format!("{value:?} has characters that cannot appear in a {key}"));
            }
        }
        let flow = id.flow.unwrap_or(Flow::ClientCredentials);
        let given = [id.client_secret.is_some(), id.client_secret_file.is_some(), id.certificate.is_some()]
            .iter()
            .filter(|&&b| b)
            .count();
        if given > 1 {
            p.add(at("client_secret"), "set only one of client_secret, client_secret_file and certificate");
        }
        let credential = if let Some(secret) = id.client_secret {
            if secret.is_empty() {
                p.add(at("client_secret"), "must not be empty");
            }
            ClientCredential::Secret(Secret::new(secret))
        } else if let Some(file) = id.client_secret_file {
            let file = resolve(&file);
            readable_file(&mut p, &at("client_secret_file"), &file);
            ClientCredential::SecretFile(file)
        } else if let Some(cert) = id.certificate {
            let (cert_file, key_file) = (resolve(&cert.cert_file), resolve(&cert.key_file));
            let algorithm = cert.algorithm.unwrap_or(JwtAlgorithm::PS256);
            if readable_file(&mut p, &at("certificate.cert_file"), &cert_file)
                && readable_file(&mut p, &at("certificate.key_file"), &key_file)
            {
                if let Err(e) = crate::token::assertion::Signer::load(&cert_file, &key_file, algorithm) {
                    p.add(at("certificate"), e.to_string());
                }
            }
            ClientCredential::Certificate { cert_file, key_file, algorithm }
        } else {
            if flow == Flow::ClientCredentials {
                p.add(at("client_secret"), "client_credentials needs client_secret, client_secret_file or certificate");
            }
            ClientCredential::None
        };
        if flow == Flow::RefreshToken && raw.token_store.is_none() {
            p.add(at("flow"), "flow refresh_token keeps refresh tokens in token_store: configure token_store.path");
        }
        let scope = id.scope.unwrap_or_else(|| match flow {
            Flow::ClientCredentials => IdentityConfig::APP_ONLY_SCOPE.to_string(),
            Flow::RefreshToken => IdentityConfig::DELEGATED_SCOPE.to_string(),
        });
        if scope.trim().is_empty() {
            p.add(at("scope"), "must not be empty");
        }
        let min_token_lifetime = id.min_token_lifetime.map_or(IdentityConfig::DEFAULT_MIN_TOKEN_LIFETIME, |d| d.0);
        let token_timeout = id.token_timeout.map_or(IdentityConfig::DEFAULT_TOKEN_TIMEOUT, |d| d.0);
        if token_timeout.is_zero() {
            p.add(at("token_timeout"), "must be longer than zero");
        }
        let tenant = id.tenant.trim();
        identities.insert(
            name.clone(),
            IdentityConfig {
                name: name.clone(),
                token_url: format!("{authority}/{tenant}/oauth2/v2.0/token"),
                device_code_url: format!("{authority}/{tenant}/oauth2/v2.0/devicecode"),
                client_id: id.client_id.trim().to_string(),
                credential,
                flow,
                scope,
                min_token_lifetime,
                token_timeout,
            },
        );
    }

    let mut usernames = HashSet::new();
    let mut accounts = Vec::new();
    for (i, a) in raw.accounts.into_iter().enumerate() {
        let at = |key: &str| format!("accounts[{i}].{key}");
        if a.username.is_empty() {
            p.add(at("username"), "must not be empty");
        } else if !usernames.insert(a.username.to_lowercase()) {
            p.add(at("username"), format!("duplicate username {:?} (usernames are compared without case)", a.username));
        }
        let password = match (a.password_hash, a.password) {
            (Some(_), Some(_)) => {
                p.add(at("password"), "set either password_hash or password, not both");
                None
            }
            (None, None) => {
                p.add(
                    at("password_hash"),
                    "missing: set password_hash (see `xoauth2-proxy hash-password`) or password",
                );
                None
            }
            (Some(hash), None) => {
                if let Err(e) = crate::accounts::check_phc(&hash) {
                    p.add(at("password_hash"), e);
                }
                Some(PasswordConfig::Hash(hash))
            }
            (None, Some(plain)) => {
                if plain.is_empty() {
                    p.add(at("password"), "must not be empty");
                }
                warnings.push(format!(
                    "account {:?} has a plain-text password in the config; prefer password_hash (xoauth2-proxy hash-password)",
                    a.username
                ));
                Some(PasswordConfig::Plain(Secret::new(plain)))
            }
        };
        if let Err(e) = check_mail_user(&a.mailbox) {
            p.add(at("mailbox"), e);
        }
        let smtp_user = a.smtp_user.unwrap_or_else(|| a.mailbox.clone());
        if let Err(e) = check_mail_user(&smtp_user) {
            p.add(at("smtp_user"), e);
        }
        if !identities.contains_key(&a.identity) {
            let known: Vec<&str> = identities.keys().map(String::as_str).collect();
            p.add(at("identity"), format!("no identity named {:?} (defined: {})", a.identity, list_or_none(&known)));
        }
        if let Some(password) = password {
            accounts.push(AccountConfig {
                username: a.username,
                password,
                mailbox: a.mailbox,
                smtp_user,
                identity: a.identity,
            });
        }
    }

    let token_store = raw.token_store.map(|s| {
        if s.key_file.is_some() && s.key.is_some() {
            p.add("token_store.key", "set either key_file or key, not both");
        }
        let key = match (s.key_file, s.key) {
            (_, Some(key)) => {
                if let Err(e) = crate::token::store::parse_key(&key) {
                    p.add("token_store.key", e.to_string());
                }
                TokenStoreKey::Inline(Secret::new(key))
            }
            (Some(file), None) => TokenStoreKey::File(resolve(&file)),
            (None, None) => TokenStoreKey::File(resolve(&s.path).join("key")),
        };
        if s.path.trim().is_empty() {
            p.add("token_store.path", "must not be empty");
        }
        TokenStoreConfig { path: resolve(&s.path), key }
    });
    if let Some(hook) = &raw.on_reauth_required {
        if hook.trim().is_empty() {
            p.add("on_reauth_required", "must not be empty (remove the key to run nothing)");
        }
    }

    let max_sessions_per_mailbox = raw.max_sessions_per_mailbox.unwrap_or(DEFAULT_MAX_SESSIONS_PER_MAILBOX);
    if max_sessions_per_mailbox == 0 {
        p.add("max_sessions_per_mailbox", "must be at least 1");
    }
    let defaults = LoginThrottle::default();
    let login_throttle = match raw.login_throttle {
        None => defaults,
        Some(t) => LoginThrottle {
            free_failures: t.free_failures.unwrap_or(defaults.free_failures),
            initial_delay: t.initial_delay.map_or(defaults.initial_delay, |d| d.0),
            max_delay: t.max_delay.map_or(defaults.max_delay, |d| d.0),
            forget_after: t.forget_after.map_or(defaults.forget_after, |d| d.0),
        },
    };
    if login_throttle.max_delay < login_throttle.initial_delay {
        p.add("login_throttle.max_delay", "must not be shorter than initial_delay");
    }

    let log = LogConfig {
        level: raw.log.level.unwrap_or(raw::LogLevel::Info),
        format: raw.log.format.unwrap_or(raw::LogFormat::Text),
    };

    if p.0.is_empty() {
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
            max_sessions_per_mailbox,
            login_throttle,
            warnings,
        })
    } else {
        Err(p.0)
    }
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

fn readable_file(p: &mut Problems, key: &str, path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => true,
        Ok(_) => {
            p.add(key, format!("{} is not a regular file", path.display()));
            false
        }
        Err(e) => {
            p.add(key, format!("cannot read {}: {e}", path.display()));
            false
        }
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

/// The token endpoint must be HTTPS: it receives the client secret. Plain
/// HTTP is allowed only to a loopback address, for local test endpoints.
fn check_authority(authority: &str) -> Result<(), String> {
    if authority.starts_with("https://") && authority.len() > "https://".len() {
        return Ok(());
    }
    if let Some(rest) = authority.strip_prefix("http://") {
        let hostport = rest.split('/').next().unwrap_or("");
        let host = match hostport.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
        };
        let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return Ok(());
        }
        return Err(format!("{authority:?} must use https (plain http is allowed only to a loopback address)"));
    }
    Err(format!("{authority:?} is not an https URL"))
}

/// A mailbox or SMTP user goes verbatim into `user=` of XOAUTH2, where a
/// control byte would corrupt the message.
fn check_mail_user(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{s:?} contains spaces or control characters"));
    }
    Ok(())
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

    #[test]
    fn authorities() {
        assert!(check_authority("https://login.microsoftonline.com").is_ok());
        assert!(check_authority("http://127.0.0.1:8080").is_ok());
        assert!(check_authority("http://localhost:1234/x").is_ok());
        assert!(check_authority("http://[::1]:9/").is_ok());
        assert!(check_authority("http://login.microsoftonline.com").is_err());
        assert!(check_authority("http://127.0.0.1.evil.com").is_err());
        assert!(check_authority("ftp://x").is_err());
        assert!(check_authority("https://").is_err());
    }
}
