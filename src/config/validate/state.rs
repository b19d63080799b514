//! `state:`: the shared Redis for several replicas.

use super::Ctx;
use crate::config::raw::RawState;
use crate::config::{IdentityConfig, StateConfig, StatePassword};
use crate::secret::Secret;
use std::collections::BTreeMap;
use std::time::Duration;

pub(super) fn validate(raw: RawState, identities: &BTreeMap<String, IdentityConfig>, cx: &mut Ctx) -> StateConfig {
    let url = raw.url.trim().to_string();
    let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
    let tls = scheme == "rediss";
    if scheme != "redis" && scheme != "rediss" {
        cx.add("state.url", "must start with redis:// or rediss:// (TLS), e.g. redis://127.0.0.1:6379/0");
    } else {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host.is_empty() {
            cx.add("state.url", "names no host, e.g. redis://127.0.0.1:6379/0");
        }
        let db = rest.split_once('/').map(|(_, p)| p.split(['?', '#']).next().unwrap_or(""));
        if let Some(db) = db.filter(|d| !d.is_empty()) {
            if db.parse::<u16>().is_err() {
                cx.add("state.url", format!("the database after the host must be a number, not {db:?}"));
            }
        }
    }
    let has_url_password = rest.split(['/', '?', '#']).next().is_some_and(|a| {
        a.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.split_once(':').is_some_and(|(_, p)| !p.is_empty()))
    });
    let password = match (raw.password, raw.password_file) {
        (Some(_), Some(_)) => {
            cx.add("state.password", "set either password or password_file, not both");
            None
        }
        (Some(p), None) => Some(StatePassword::Inline(Secret::new(p))),
        (None, Some(f)) => Some(StatePassword::File(cx.resolve(&f))),
        (None, None) => None,
    };
    if password.is_some() && has_url_password {
        cx.add("state.url", "has a password, and so does state.password or password_file: keep one");
    }
    let prefix = raw.prefix.unwrap_or_else(|| StateConfig::DEFAULT_PREFIX.to_string());
    if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        cx.add("state.prefix", "must be 1 to 64 printable characters without spaces");
    }
    let ca_file = raw.ca_file.map(|f| cx.resolve(&f));
    if ca_file.is_some() && !tls {
        cx.add("state.ca_file", "is only used with a rediss:// (TLS) url");
    }
    let timeout = raw.timeout.map_or(StateConfig::DEFAULT_TIMEOUT, |d| d.0);
    if timeout < Duration::from_millis(50) || timeout > Duration::from_secs(30) {
        cx.add("state.timeout", "must be between 50ms and 30s");
    }
    let session_lease = raw.session_lease.map_or(StateConfig::DEFAULT_SESSION_LEASE, |d| d.0);
    if session_lease < Duration::from_secs(3) || session_lease > Duration::from_secs(3600) {
        cx.add("state.session_lease", "must be between 3s and 1h");
    } else if session_lease < timeout * 3 {
        cx.add("state.session_lease", "must be at least three times state.timeout, so a renewal can fail once");
    }
    let refresh_lock = raw.refresh_lock.map_or(StateConfig::DEFAULT_REFRESH_LOCK, |d| d.0);
    // The lock must outlive the token request it covers, or a slow request
    // would let a second replica spend the same refresh token.
    let slowest = identities.values().map(|i| i.token_timeout).max().unwrap_or(Duration::ZERO);
    if refresh_lock > Duration::from_secs(600) {
        cx.add("state.refresh_lock", "must be at most 10m");
    } else if refresh_lock <= slowest + timeout {
        cx.add(
            "state.refresh_lock",
            format!("must be longer than the slowest identity's token_timeout ({slowest:?}) plus state.timeout"),
        );
    }
    StateConfig {
        backend: raw.backend,
        url: Secret::new(url),
        prefix,
        password,
        ca_file,
        timeout,
        session_lease,
        refresh_lock,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::collections::HashMap;

    fn parse(state: &str, store: bool) -> Result<Config, String> {
        let store = if store {
            "token_store: {path: /tmp/s, key: \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"}\n"
        } else {
            ""
        };
        let text = format!(
            "listeners:\n  - {{name: a, protocol: imap, bind: '127.0.0.1:0', upstream: 'h:993'}}\n{store}state: {state}\n"
        );
        let env: HashMap<String, String> = [("PW".to_string(), "s3cret".to_string())].into_iter().collect();
        Config::parse(&text, std::path::Path::new("c.yaml"), &env).map_err(|e| e.to_string())
    }

    #[test]
    fn good_state_settings_and_their_defaults() {
        let c = parse("{backend: redis, url: \"redis://:${PW}@127.0.0.1:6379/0\"}", true).unwrap();
        let s = c.state.unwrap();
        assert_eq!(s.prefix, "xoauth2-proxy");
        assert_eq!(s.session_lease, std::time::Duration::from_secs(30));
        assert_eq!(s.display_url(), "redis://:***@127.0.0.1:6379/0", "the password is masked in messages");
        assert!(!format!("{s:?}").contains("s3cret"), "the password is in the config's Debug output");
        let c =
            parse("{backend: redis, url: \"rediss://redis.example:6380\", ca_file: ca.pem, password: \"${PW}\"}", true);
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn bad_state_settings_are_named() {
        let cases = [
            ("{backend: redis, url: \"http://x\"}", true, "state.url: must start with redis://"),
            ("{backend: redis, url: \"redis://\"}", true, "state.url: names no host"),
            ("{backend: redis, url: \"redis://h/zero\"}", true, "the database after the host must be a number"),
            (
                "{backend: redis, url: \"redis://h\", ca_file: ca.pem}",
                true,
                "state.ca_file: is only used with a rediss://",
            ),
            ("{backend: redis, url: \"redis://h\", password: a, password_file: f}", true, "state.password: set either"),
            ("{backend: redis, url: \"redis://:p@h\", password: a}", true, "state.url: has a password"),
            ("{backend: redis, url: \"redis://h\", prefix: \"a b\"}", true, "state.prefix"),
            ("{backend: redis, url: \"redis://h\", session_lease: 1s}", true, "state.session_lease: must be between"),
            ("{backend: redis, url: \"redis://h\", timeout: 2s, session_lease: 5s}", true, "at least three times"),
            ("{backend: redis, url: \"redis://h\", refresh_lock: 2s}", true, "state.refresh_lock: must be longer"),
            ("{backend: memcached, url: \"redis://h\"}", true, "unknown variant"),
            ("{backend: redis, url: \"redis://h\"}", false, "state: needs token_store"),
        ];
        for (state, store, expected) in cases {
            let err = parse(state, store).err().unwrap_or_else(|| panic!("{state} was accepted"));
            assert!(err.contains(expected), "{state}: {err}");
        }
    }
}
