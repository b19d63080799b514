//! What the service manager sees: readiness, reload and stop notifications
//! with a one-line status, watchdog pings (systemd's `sd_notify` protocol),
//! and an open-file limit sized for the configured sessions.
//!
//! Every notification is a no-op when the proxy was not started by systemd
//! (no `NOTIFY_SOCKET` in the environment), so `run` behaves the same in a
//! terminal, a container or a test.

use crate::config::Config;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use sd_notify::NotifyState;
use std::time::Duration;
use tracing::{debug, warn};

/// Descriptors one session holds: the client's socket and the upstream's.
pub const FDS_PER_SESSION: u64 = 2;

/// Descriptors the process holds besides sessions: stdin/stdout/stderr
/// (stderr is the journal stream), the runtime's epoll instance and waker,
/// the notify socket while a message is sent, the config file while a reload
/// reads it, the pipes of an `on_reauth_required` child, connections turned
/// away over `max_connections` (held for at most the few seconds their
/// refusal takes). 32 covers these with room to spare; per-listener and
/// per-token descriptors are added by [`descriptors_needed`].
pub const FIXED_FDS: u64 = 32;

/// Without `fs.nr_open` at hand, the kernel's default ceiling for a soft
/// limit when the hard one is reported as infinite.
const KERNEL_NR_OPEN_DEFAULT: u64 = 1 << 20;

/// Sessions every listener admits together (`max_connections` summed).
pub fn configured_sessions(config: &Config) -> u64 {
    config.listeners.iter().map(|l| l.limits.max_connections as u64).sum()
}

/// Descriptors the configuration can use at once: two per session, and
/// besides [`FIXED_FDS`], per listener its socket and a capability probe,
/// per identity and account (a token key) one connection to the token
/// endpoint and one token store file (a lock or a temporary file).
pub fn descriptors_needed(config: &Config) -> u64 {
    let listeners = config.listeners.len() as u64;
    let token_keys = (config.identities.len() + config.accounts.len()) as u64;
    configured_sessions(config) * FDS_PER_SESSION + FIXED_FDS + 2 * listeners + 2 * token_keys
}

/// The one-line warning when `limit` descriptors cannot serve what the
/// configuration allows, or `None` when it can.
pub fn nofile_warning(limit: u64, config: &Config) -> Option<String> {
    let needed = descriptors_needed(config);
    if limit >= needed {
        return None;
    }
    let fit = limit.saturating_sub(needed - configured_sessions(config) * FDS_PER_SESSION) / FDS_PER_SESSION;
    Some(format!(
        "the open-file limit is {limit}: room for about {fit} sessions, but the listeners admit {} \
         (max_connections, {FDS_PER_SESSION} descriptors each); raise it to at least {needed} \
         (LimitNOFILE= in the systemd unit, ulimit -n in a shell) or lower max_connections",
        configured_sessions(config)
    ))
}

/// Raises the soft open-file limit to the hard one (systemd starts services
/// with a soft limit of 1024 for the sake of old `select()` users; this
/// process uses epoll) and returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let hard = maximum.unwrap_or(KERNEL_NR_OPEN_DEFAULT);
    let soft = current.unwrap_or(hard);
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum }) {
        Ok(()) => {
            debug!(from = soft, to = hard, "raised the open-file limit");
            hard
        }
        Err(e) => {
            debug!(error = %e, "cannot raise the open-file limit");
            soft
        }
    }
}

/// `3 listeners, 2 accounts, 1 warm token`: what `systemctl status` shows.
pub fn status_line(listeners: usize, accounts: usize, warm_tokens: usize) -> String {
    let n = |count: usize, what: &str| format!("{count} {what}{}", if count == 1 { "" } else { "s" });
    format!("{}, {}, {}", n(listeners, "listener"), n(accounts, "account"), n(warm_tokens, "warm token"))
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Every listener is bound: systemd may start what depends on the proxy.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts. systemd 253 and later require the monotonic time with
/// `RELOADING=1` to tell this reload from an earlier one.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading the configuration")];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

/// The proxy stops accepting and drains its sessions.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pings the watchdog (when `WatchdogSec=` is set) at half its period, and
/// refreshes the status line when it changes, until the task is dropped.
/// The pings come from a task on the same runtime as the sessions, so a
/// wedged runtime stops them and systemd restarts the service.
pub fn supervise(status: impl Fn() -> String + Send + 'static) -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let watchdog = sd_notify::watchdog_enabled();
    // Without a watchdog, the status is refreshed every 10 s.
    let period = watchdog.map_or(Duration::from_secs(10), |d| (d / 2).max(Duration::from_millis(10)));
    Some(tokio::spawn(async move {
        let mut last = status();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = status();
            let mut states = Vec::new();
            if watchdog.is_some() {
                states.push(NotifyState::Watchdog);
            }
            if now != last {
                states.push(NotifyState::Status(&now));
            }
            if !states.is_empty() {
                notify(&states);
            }
            last = now;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProcessEnv;
    use std::path::Path;

    fn config(listeners: &[usize]) -> Config {
        let mut text = String::from("listeners:\n");
        for (i, max) in listeners.iter().enumerate() {
            text.push_str(&format!(
                "  - {{ name: l{i}, protocol: imap, bind: \"127.0.0.1:{}\", upstream: \"x:993\", max_connections: {max} }}\n",
                10000 + i
            ));
        }
        Config::parse(&text, Path::new("/etc/xoauth2-proxy/config.yaml"), &ProcessEnv).unwrap()
    }

    #[test]
    fn two_descriptors_per_session_plus_a_margin() {
        let c = config(&[1000, 1000, 1000]);
        assert_eq!(configured_sessions(&c), 3000);
        assert_eq!(descriptors_needed(&c), 6000 + FIXED_FDS + 6);
    }

    #[test]
    fn systemds_default_soft_limit_cannot_hold_the_default_listener() {
        let c = config(&[1000]);
        let warning = nofile_warning(1024, &c).expect("1024 is too few for 1000 sessions");
        // 1024 - 32 fixed - 2 for the listener = 990 descriptors: 495 sessions.
        assert!(warning.contains("room for about 495 sessions"), "{warning}");
        assert!(warning.contains("admit 1000"), "{warning}");
        assert!(warning.contains(&format!("at least {}", descriptors_needed(&c))), "{warning}");
        assert!(!warning.contains('\n'), "one line");
        assert_eq!(nofile_warning(65536, &c), None);
        assert_eq!(nofile_warning(descriptors_needed(&c), &c), None);
        assert!(nofile_warning(descriptors_needed(&c) - 1, &c).is_some());
    }

    #[test]
    fn a_tiny_limit_does_not_underflow() {
        let warning = nofile_warning(3, &config(&[10])).unwrap();
        assert!(warning.contains("room for about 0 sessions"), "{warning}");
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_nofile_limit();
        let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
        assert_eq!(current, Some(limit));
        assert_eq!(current, maximum.or(Some(limit)));
    }

    #[test]
    fn status_lines_count_in_english() {
        assert_eq!(status_line(3, 2, 1), "3 listeners, 2 accounts, 1 warm token");
        assert_eq!(status_line(1, 0, 0), "1 listener, 0 accounts, 0 warm tokens");
    }
}
