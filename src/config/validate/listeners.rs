//! `listeners[]`: addresses, TLS modes, limits and who may connect.

use super::{parse_host_port, Ctx};
use crate::config::cidr::Cidr;
use crate::config::raw::{LocalTls, LocalTlsProfile, RawListener, UpstreamTls};
use crate::config::{Limits, ListenerConfig, SessionCaps, TlsFiles, LEGACY_FEATURE};
use crate::protocol::Protocol;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

pub(super) fn validate(
    raw: Vec<RawListener>,
    have_certificate: bool,
    caps: SessionCaps,
    session_wait: Duration,
    cx: &mut Ctx,
) -> Vec<ListenerConfig> {
    if raw.is_empty() {
        cx.add("listeners", "at least one listener is required");
    }
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    let mut listeners = Vec::new();
    for (i, l) in raw.into_iter().enumerate() {
        let at = |key: &str| format!("listeners[{i}].{key}");
        if l.name.trim().is_empty() {
            cx.add(at("name"), "must not be empty");
        } else if !names.insert(l.name.clone()) {
            cx.add(at("name"), format!("duplicate listener name {:?}", l.name));
        }
        let bind = match l.bind.parse::<SocketAddr>() {
            Ok(addr) => {
                // Port 0 asks the OS for any free port: never a clash.
                if addr.port() != 0 && !binds.insert(addr) {
                    cx.add(at("bind"), format!("{addr} is already used by another listener"));
                }
                Some(addr)
            }
            Err(_) => {
                cx.add(
                    at("bind"),
                    format!("{:?} is not an IP address and port, e.g. 127.0.0.1:1587 or [::1]:1143", l.bind),
                );
                None
            }
        };
        let upstream = match parse_host_port(&l.upstream) {
            Ok(u) => Some(u),
            Err(e) => {
                cx.add(at("upstream"), e);
                None
            }
        };
        let local_tls = l.local_tls.unwrap_or(LocalTls::None);
        let tls =
            l.tls.as_ref().map(|t| TlsFiles { cert_file: cx.resolve(&t.cert_file), key_file: cx.resolve(&t.key_file) });
        if local_tls != LocalTls::None && !have_certificate && tls.is_none() {
            cx.add(
                at("local_tls"),
                "local TLS needs a certificate: set tls.cert_file and tls.key_file (for every listener), \
                 or this listener's own tls: {cert_file, key_file}",
            );
        }
        if tls.is_some() && local_tls == LocalTls::None {
            cx.add(at("tls"), "a certificate for a listener without local TLS: set local_tls, or remove tls");
        }
        let local_tls_profile = l.local_tls_profile.unwrap_or_default();
        if local_tls_profile == LocalTlsProfile::Legacy {
            legacy_profile(&l.name, local_tls, &at, cx);
        }
        let require_tls = l.require_tls.unwrap_or(false);
        if require_tls && local_tls == LocalTls::None {
            cx.add(at("require_tls"), "require_tls needs local_tls: starttls or implicit");
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
                cx.warnings.push(format!(
                    "listener {:?} binds {bind}, which is not loopback, without local TLS: logins are refused \
                     because passwords would cross the network in the clear; set local_tls, or \
                     allow_plaintext_auth: true if the network is trusted",
                    l.name
                ));
            } else if !plaintext_allowed && local_tls == LocalTls::Starttls && !require_tls {
                cx.warnings.push(format!(
                    "listener {:?} binds {bind}, which is not loopback: clients must use STARTTLS before logging in",
                    l.name
                ));
            }
        }
        let limits = limits(&l, &at, cx);
        let mut allow_from = Vec::new();
        for (j, range) in l.allow_from.iter().flatten().enumerate() {
            match range.parse::<Cidr>() {
                Ok(c) => allow_from.push(c),
                Err(e) => cx.add(format!("listeners[{i}].allow_from[{j}]"), e),
            }
        }
        let max_sessions_per_mailbox = l.max_sessions_per_mailbox.unwrap_or(caps.for_protocol(l.protocol));
        if max_sessions_per_mailbox == 0 {
            cx.add(at("max_sessions_per_mailbox"), "must be at least 1");
        }
        let session_wait = l.session_wait.map_or(session_wait, |d| d.0);
        let broken_sasl_auth_clients = l.broken_sasl_auth_clients.unwrap_or(false);
        if broken_sasl_auth_clients && l.protocol != Protocol::Smtp {
            cx.add(at("broken_sasl_auth_clients"), "applies to smtp listeners only");
        }
        if l.allow_from.as_ref().is_some_and(|a| a.is_empty()) {
            cx.add(at("allow_from"), "an empty list would refuse every client; remove the key to allow all");
        }
        let proxy_protocol_from = proxy_protocol(&l, i, cx);
        // Behind a balancer, a loopback bind says nothing about where the
        // client's password travelled: the loopback exemption does not apply.
        let plaintext_allowed = if proxy_protocol_from.is_some() { allow_plaintext } else { plaintext_allowed };
        if let (Some(bind), Some(upstream)) = (bind, upstream) {
            listeners.push(ListenerConfig {
                name: l.name,
                protocol: l.protocol,
                bind,
                local_tls,
                local_tls_profile,
                tls,
                upstream,
                upstream_tls,
                require_tls,
                plaintext_allowed,
                allow_from,
                max_sessions_per_mailbox,
                session_wait,
                broken_sasl_auth_clients,
                proxy_protocol_from,
                limits,
            });
        }
    }
    listeners
}

/// `local_tls_profile: legacy`: only where TLS is served, only in a build
/// that has OpenSSL, and always with a warning saying what it gives up.
fn legacy_profile(name: &str, local_tls: LocalTls, at: &dyn Fn(&str) -> String, cx: &mut Ctx) {
    if local_tls == LocalTls::None {
        cx.add(
            at("local_tls_profile"),
            "the legacy profile is a kind of local TLS: set local_tls: implicit, starttls or auto",
        );
        return;
    }
    if !cfg!(feature = "legacy-tls") {
        cx.add(
            at("local_tls_profile"),
            format!(
                "this xoauth2-proxy was built without the cargo feature {LEGACY_FEATURE:?}, which serves the legacy \
                 profile through OpenSSL: use the Debian package or the container image, or build with \
                 `cargo build --release --features {LEGACY_FEATURE}`"
            ),
        );
        return;
    }
    cx.warnings.push(legacy_warning(name));
}

/// What `check` (and `run`, at start) says about a listener on the legacy profile.
fn legacy_warning(name: &str) -> String {
    format!(
        "listener {name:?} uses local_tls_profile: legacy: it accepts TLS 1.0 and 1.1, RSA key exchange (no \
         forward secrecy: a recorded session can be decrypted later with the key) and CBC suites with SHA-1 MACs; \
         acceptable only on a trusted segment such as a printer VLAN"
    )
}

/// `proxy_protocol: true` with the balancers that may send the header.
fn proxy_protocol(l: &RawListener, i: usize, cx: &mut Ctx) -> Option<Vec<Cidr>> {
    let at = |key: &str| format!("listeners[{i}].{key}");
    let enabled = l.proxy_protocol.unwrap_or(false);
    match (&l.proxy_protocol_from, enabled) {
        (None, false) => None,
        (Some(_), false) => {
            cx.add(at("proxy_protocol_from"), "is only used with proxy_protocol: true");
            None
        }
        (None, true) => {
            cx.add(
                at("proxy_protocol_from"),
                "proxy_protocol: true needs the balancers' addresses (e.g. [10.0.0.5/32]): a header from anyone \
                 else would let a client choose the address the proxy sees",
            );
            None
        }
        (Some(list), true) => {
            if list.is_empty() {
                cx.add(at("proxy_protocol_from"), "must list at least one balancer address");
            }
            let mut ranges = Vec::new();
            for (j, range) in list.iter().enumerate() {
                match range.parse::<Cidr>() {
                    Ok(c) => ranges.push(c),
                    Err(e) => cx.add(format!("listeners[{i}].proxy_protocol_from[{j}]"), e),
                }
            }
            Some(ranges)
        }
    }
}

fn limits(l: &RawListener, at: &dyn Fn(&str) -> String, cx: &mut Ctx) -> Limits {
    let limits = Limits {
        max_line_length: l.max_line_length.unwrap_or(Limits::DEFAULT_MAX_LINE_LENGTH),
        max_auth_failures: l.max_auth_failures.unwrap_or(Limits::DEFAULT_MAX_AUTH_FAILURES),
        max_bad_commands: l.max_bad_commands.unwrap_or(Limits::DEFAULT_MAX_BAD_COMMANDS),
        preauth_timeout: l.preauth_timeout.map_or(Limits::DEFAULT_PREAUTH_TIMEOUT, |d| d.0),
        login_deadline: l.login_deadline.map_or(Limits::DEFAULT_LOGIN_DEADLINE, |d| d.0),
        idle_timeout: l.idle_timeout.map_or(Limits::DEFAULT_IDLE_TIMEOUT, |d| d.0),
        upstream_timeout: l.upstream_timeout.map_or(Limits::DEFAULT_UPSTREAM_TIMEOUT, |d| d.0),
        max_connections: l.max_connections.unwrap_or(Limits::DEFAULT_MAX_CONNECTIONS),
        max_connections_per_ip: l.max_connections_per_ip.unwrap_or(Limits::DEFAULT_MAX_CONNECTIONS_PER_IP),
        listen_backlog: l.listen_backlog,
    };
    if limits.listen_backlog == Some(0) {
        cx.add(at("listen_backlog"), "must be at least 1 (remove the key for the kernel's maximum)");
    }
    for (key, n) in
        [("max_connections", limits.max_connections), ("max_connections_per_ip", limits.max_connections_per_ip)]
    {
        if n == 0 {
            cx.add(at(key), "must be at least 1");
        }
    }
    if !(512..=1 << 20).contains(&limits.max_line_length) {
        cx.add(at("max_line_length"), "must be between 512 and 1048576 bytes");
    }
    if limits.max_auth_failures == 0 {
        cx.add(at("max_auth_failures"), "must be at least 1");
    }
    if limits.max_bad_commands == 0 {
        cx.add(at("max_bad_commands"), "must be at least 1");
    }
    for (key, d) in [
        ("preauth_timeout", limits.preauth_timeout),
        ("login_deadline", limits.login_deadline),
        ("idle_timeout", limits.idle_timeout),
        ("upstream_timeout", limits.upstream_timeout),
    ] {
        if d.is_zero() {
            cx.add(at(key), "must be longer than zero");
        }
    }
    limits
}
