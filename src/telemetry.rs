//! Logging: one line per event, text or JSON, to stderr (journald picks it up).
//!
//! Field names used across the code: `listener`, `protocol`, `client.addr`,
//! `user`, `mailbox`, `upstream`, `identity`, `error`, `reason`.

use crate::config::{LogConfig, LogFormat, LogLevel};
use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Environment variable with `tracing` filter directives that override the
/// config's level, e.g. `XOAUTH2_PROXY_LOG=xoauth2_proxy=debug`.
pub const LOG_ENV: &str = "XOAUTH2_PROXY_LOG";

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
}

/// The filter for a config level: our crate at that level, libraries at warn.
pub fn filter(level: LogLevel) -> EnvFilter {
    match std::env::var(LOG_ENV) {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(format!("warn,xoauth2_proxy={}", level_name(level))),
    }
}

/// The level filter of the installed subscriber, replaceable by a reload,
/// and the format it was installed with (which is not).
static INSTALLED: OnceLock<(reload::Handle<EnvFilter, Registry>, LogFormat)> = OnceLock::new();

pub fn init(config: &LogConfig) {
    let (filter, handle) = reload::Layer::new(filter(config.level));
    let registry = tracing_subscriber::registry().with(filter);
    let stderr = || std::io::stderr();
    let result = match config.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(stderr),
            )
            .try_init(),
        LogFormat::Text => {
            registry.with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(stderr)).try_init()
        }
    };
    // A second init (tests, embedding) keeps the first subscriber.
    if result.is_ok() {
        let _ = INSTALLED.set((handle, config.format));
    }
}

/// Applies a reloaded `log.level`. Returns false when `log.format` changed,
/// which applies at the next start (the writer's format is fixed once the
/// subscriber is installed).
pub fn reconfigure(config: &LogConfig) -> bool {
    let Some((handle, format)) = INSTALLED.get() else { return true };
    if let Err(e) = handle.reload(filter(config.level)) {
        tracing::warn!(error = %e, "cannot apply the reloaded log level");
    }
    *format == config.format
}
