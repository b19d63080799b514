//! The configuration file as written: serde structs that reject unknown keys.
//! Nothing here is validated beyond its type; see `validate.rs`.

use crate::protocol::Protocol;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub upstream_ca_file: Option<String>,
    #[serde(default)]
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub identities: BTreeMap<String, RawIdentity>,
    #[serde(default)]
    pub accounts: Vec<RawAccount>,
    #[serde(default)]
    pub token_store: Option<RawTokenStore>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub shutdown_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub on_reauth_required: Option<String>,
    #[serde(default)]
    pub max_sessions_per_mailbox: Option<RawSessionCaps>,
    #[serde(default)]
    pub session_wait: Option<HumanDuration>,
    #[serde(default)]
    pub login_throttle: Option<RawLoginThrottle>,
    #[serde(default)]
    pub password_verification: Option<RawPasswordVerification>,
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub state: Option<RawState>,
}

/// The admin listener: metrics and health checks over HTTP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default)]
    pub bind: Option<String>,
}

/// Where replicas share their state (`state:`); absent means files and memory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub backend: StateBackend,
    pub url: String,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default, deserialize_with = "secret_scalar")]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<String>,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub session_lease: Option<HumanDuration>,
    #[serde(default)]
    pub refresh_lock: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    Redis,
}

/// Upstream sessions per mailbox: one number for every protocol, or one per protocol.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSessionCaps {
    All(usize),
    PerProtocol(RawProtocolCaps),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProtocolCaps {
    #[serde(default)]
    pub smtp: Option<usize>,
    #[serde(default)]
    pub imap: Option<usize>,
    #[serde(default)]
    pub pop3: Option<usize>,
}

/// The pool that runs argon2 verifications.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPasswordVerification {
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default)]
    pub queue: Option<usize>,
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
}

/// Delays after repeated failed logins from one client address or for one username.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLoginThrottle {
    #[serde(default)]
    pub free_failures: Option<u32>,
    #[serde(default)]
    pub initial_delay: Option<HumanDuration>,
    #[serde(default)]
    pub max_delay: Option<HumanDuration>,
    #[serde(default)]
    pub forget_after: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub protocol: Protocol,
    pub bind: String,
    #[serde(default)]
    pub local_tls: Option<LocalTls>,
    #[serde(default)]
    pub local_tls_profile: Option<LocalTlsProfile>,
    /// This listener's own certificate, instead of the top-level `tls:`.
    #[serde(default)]
    pub tls: Option<RawTls>,
    pub upstream: String,
    #[serde(default)]
    pub upstream_tls: Option<UpstreamTls>,
    #[serde(default)]
    pub require_tls: Option<bool>,
    #[serde(default)]
    pub allow_plaintext_auth: Option<bool>,
    #[serde(default)]
    pub max_line_length: Option<usize>,
    #[serde(default)]
    pub max_auth_failures: Option<u32>,
    #[serde(default)]
    pub preauth_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub login_deadline: Option<HumanDuration>,
    #[serde(default)]
    pub max_bad_commands: Option<u32>,
    #[serde(default)]
    pub idle_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub upstream_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub max_connections_per_ip: Option<usize>,
    #[serde(default)]
    pub listen_backlog: Option<u32>,
    #[serde(default)]
    pub allow_from: Option<Vec<String>>,
    #[serde(default)]
    pub max_sessions_per_mailbox: Option<usize>,
    #[serde(default)]
    pub session_wait: Option<HumanDuration>,
    #[serde(default)]
    pub broken_sasl_auth_clients: Option<bool>,
    pub proxy_protocol: Option<bool>,
    #[serde(default)]
    pub proxy_protocol_from: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalTls {
    None,
    Starttls,
    Implicit,
    /// Implicit TLS or plain text/STARTTLS on one port, by the client's first byte.
    Auto,
}

impl LocalTls {
    /// The config's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalTls::None => "none",
            LocalTls::Starttls => "starttls",
            LocalTls::Implicit => "implicit",
            LocalTls::Auto => "auto",
        }
    }
}

/// Which TLS stack and settings serve a listener's local TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalTlsProfile {
    /// rustls: TLS 1.2 and 1.3, forward-secret AEAD suites only.
    #[default]
    Modern,
    /// OpenSSL (cargo feature `legacy-tls`): also TLS 1.0/1.1 and RSA key
    /// exchange, for devices that cannot do better.
    Legacy,
}

impl LocalTlsProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalTlsProfile::Modern => "modern",
            LocalTlsProfile::Legacy => "legacy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    Implicit,
    Starttls,
}

impl UpstreamTls {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamTls::Implicit => "implicit",
            UpstreamTls::Starttls => "starttls",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    #[serde(default)]
    pub authority: Option<String>,
    pub tenant: String,
    pub client_id: String,
    #[serde(default, deserialize_with = "secret_scalar")]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<String>,
    #[serde(default)]
    pub certificate: Option<RawCertificate>,
    #[serde(default)]
    pub flow: Option<Flow>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub min_token_lifetime: Option<HumanDuration>,
    #[serde(default)]
    pub token_timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert_file: String,
    pub key_file: String,
    #[serde(default)]
    pub algorithm: Option<JwtAlgorithm>,
}

/// Signature algorithm of the client assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    PS256,
    RS256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    ClientCredentials,
    RefreshToken,
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::ClientCredentials => "client_credentials",
            Flow::RefreshToken => "refresh_token",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    pub username: String,
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default, deserialize_with = "secret_scalar")]
    pub password: Option<String>,
    pub mailbox: String,
    #[serde(default)]
    pub smtp_user: Option<String>,
    pub identity: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenStore {
    pub path: String,
    #[serde(default)]
    pub key_file: Option<String>,
    #[serde(default, deserialize_with = "secret_scalar")]
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub level: Option<LogLevel>,
    #[serde(default)]
    pub format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A secret written as any YAML scalar: `password: 123456` is the string
/// "123456". Type errors never echo the value, which a default serde message
/// would put in the error text.
fn secret_scalar<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom("write this secret in quotes: a number with a fraction loses digits"))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom("expected a string, found a list"))
        }
        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom("expected a string, found a mapping"))
        }
    }
    deserializer.deserialize_any(V)
}

/// A duration written as `90s`, `30m`, `1h`, `500ms`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 =
            digits.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 10m, 1h, 500ms"))?;
        let d = match unit.trim() {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            other => return Err(format!("invalid duration unit {other:?} in {s:?}: use ms, s, m, h or d")),
        };
        Ok(HumanDuration(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30s, 10m, 1h, 500ms, or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|v| HumanDuration(Duration::from_secs(v)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [("30s", 30), ("30", 30), ("10m", 600), ("1h", 3600), ("2d", 172800), (" 5 s ", 5)];
        for (s, secs) in ok {
            assert_eq!(s.parse::<HumanDuration>(), Ok(HumanDuration(Duration::from_secs(secs))), "{s}");
        }
        assert_eq!("250ms".parse::<HumanDuration>(), Ok(HumanDuration(Duration::from_millis(250))));
        for bad in ["", "m", "10x", "-5s", "1.5h"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
    }
}
