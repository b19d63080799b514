//! Logging: one line per event, text or JSON, to stderr (journald picks it up).
//!
//! Field names used across the code: `listener`, `protocol`, `client.addr`,
//! `user`, `mailbox`, `upstream`, `identity`, `error`, `reason`.

use crate::config::{LogConfig, LogFormat, LogLevel};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

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

pub fn init(config: &LogConfig) {
    let builder = tracing_subscriber::fmt().with_env_filter(filter(config.level)).with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = result;
}
