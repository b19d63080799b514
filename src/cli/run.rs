//! `xoauth2-proxy run`: serve until SIGTERM or SIGINT.

use crate::server::Proxy;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

/// Signals that arrived before `run` could listen for them.
pub struct EarlySignals {
    hangup: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl EarlySignals {
    /// The default action of SIGTERM and SIGHUP is to end the process: the
    /// binary calls this first thing, before the runtime exists, so that a
    /// signal during start-up is handled (TERM or INT: a clean exit; HUP: a
    /// reload once serving), never fatal.
    pub fn catch() -> std::io::Result<EarlySignals> {
        let early = EarlySignals { hangup: Arc::default(), stop: Arc::default() };
        signal_hook::flag::register(signal_hook::consts::SIGHUP, early.hangup.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGTERM, early.stop.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, early.stop.clone())?;
        Ok(early)
    }
}

pub async fn run(config_path: &Path, early: EarlySignals) -> ExitCode {
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Signals { mut hangup, terminate, interrupt } = signals;
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::telemetry::init(&config.log);
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let proxy = match Proxy::bind(&config).await {
        Ok(p) => p,
        Err(e) => {
            error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config.source.display(),
        accounts = config.accounts.len(),
        identities = config.identities.len(),
        "xoauth2-proxy starting"
    );
    proxy.warm_up_delegated(&config);
    let reloader = proxy.reloader();
    let path = config_path.to_path_buf();
    let early_reload = early.hangup.swap(false, Ordering::SeqCst);
    let reload_task = tokio::spawn(async move {
        if early_reload {
            info!("SIGHUP arrived during start-up: reloading now");
        }
        let mut pending = early_reload;
        while std::mem::take(&mut pending) || hangup.recv().await.is_some() {
            let loaded =
                crate::config::Config::load(&path).and_then(|config| crate::preflight::check(&config).map(|()| config));
            let config = match loaded {
                Ok(c) => c,
                Err(e) => {
                    error!("SIGHUP: the configuration has errors; keeping the current one:\n{e}");
                    continue;
                }
            };
            match reloader.reload(&config) {
                Ok(done) => {
                    info!("SIGHUP: reloaded {done}; listeners, identities and token_store apply at the next start")
                }
                Err(e) => error!("SIGHUP: keeping the current configuration: {e}"),
            }
        }
    });
    if early.stop.load(Ordering::SeqCst) {
        info!("SIGTERM or SIGINT arrived during start-up: stopping");
        proxy.run(std::future::ready(())).await;
    } else {
        proxy.run(shutdown_signal(terminate, interrupt)).await;
    }
    reload_task.abort();
    ExitCode::SUCCESS
}

/// The signals `run` acts on, registered together at start.
struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Completes on the first SIGTERM or SIGINT (including one that arrived
/// before this was first polled).
async fn shutdown_signal(mut terminate: Signal, mut interrupt: Signal) {
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM received"),
        _ = interrupt.recv() => info!("SIGINT received"),
    }
}
