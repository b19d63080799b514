//! `xoauth2-proxy run`: serve until SIGTERM or SIGINT; SIGHUP re-reads the
//! configuration. Tells systemd when it is ready, reloading and stopping
//! (see [`crate::service`]).

use crate::config::Config;
use crate::server::{Proxy, Reloader};
use crate::service;
use crate::token::TokenManager;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

pub async fn run(config_path: &Path, pid_file: Option<&Path>, early: EarlySignals) -> ExitCode {
    // The streams see every signal from here on; `early` saw those before.
    let hangup = signal(SignalKind::hangup());
    let shutdown = ShutdownSignals::install();
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::telemetry::init(&config.log);
    log_warnings(&config);
    let limit = service::raise_nofile_limit();
    if let Some(warning) = service::nofile_warning(limit, &config) {
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
        open_file_limit = limit,
        "xoauth2-proxy starting"
    );
    // Written once every listener is bound, so its presence means "serving".
    if let Some(path) = pid_file {
        let pid = format!("{}\n", std::process::id());
        if let Err(e) = crate::fsutil::write_atomically_with_mode(path, pid.as_bytes(), 0o644) {
            error!("cannot write the pid file: {e}");
            return ExitCode::FAILURE;
        }
    }
    proxy.warm_up_delegated(&config);
    let status = Status {
        listeners: Arc::new(AtomicUsize::new(proxy.local_addrs().len())),
        accounts: Arc::new(AtomicUsize::new(config.accounts.len())),
        reload_failed: Arc::new(AtomicBool::new(false)),
        tokens: proxy.tokens(),
        state: proxy.shared_state(),
    };
    service::ready(&status.line());
    let supervisor = service::supervise({
        let status = status.clone();
        move || status.line()
    });
    let early_reload = early.hangup.swap(false, Ordering::SeqCst);
    let reload_task =
        tokio::spawn(reload_on_hangup(hangup, early_reload, config_path.to_path_buf(), proxy.reloader(), status));
    let stop_now = early.stop.load(Ordering::SeqCst);
    if stop_now {
        info!("SIGTERM or SIGINT arrived during start-up: stopping");
    }
    proxy
        .run(async {
            if !stop_now {
                shutdown.recv().await;
            }
            service::stopping("stopping: no new connections, draining sessions");
        })
        .await;
    reload_task.abort();
    if let Some(task) = supervisor {
        task.abort();
    }
    if let Some(path) = pid_file {
        let _ = std::fs::remove_file(path);
    }
    ExitCode::SUCCESS
}

/// Logs what the configuration allows but deserves attention (plain-text
/// passwords, listeners that refuse logins), one line each.
pub fn log_warnings(config: &Config) {
    for warning in &config.warnings {
        warn!("{warning}");
    }
}

/// What the status line is made of; the account count follows reloads.
#[derive(Clone)]
struct Status {
    listeners: Arc<AtomicUsize>,
    accounts: Arc<AtomicUsize>,
    reload_failed: Arc<AtomicBool>,
    tokens: TokenManager,
    state: Option<Arc<crate::state::SharedState>>,
}

impl Status {
    fn line(&self) -> String {
        let mut line = service::status_line(
            self.listeners.load(Ordering::Relaxed),
            self.accounts.load(Ordering::Relaxed),
            self.tokens.valid_tokens(),
        );
        if self.state.as_ref().is_some_and(|s| !s.is_up()) {
            line.push_str("; shared state unreachable, serving with local state");
        }
        if self.reload_failed.load(Ordering::Relaxed) {
            format!("{line}; the last reload failed, see the log (previous configuration kept)")
        } else {
            line
        }
    }
}

/// Each SIGHUP: tell systemd a reload runs, apply the re-read configuration
/// as a whole (or keep the current one, saying why in one line), tell
/// systemd it is done.
/// `pending`: a SIGHUP came during start-up; it is applied first.
async fn reload_on_hangup(
    hangup: std::io::Result<Signal>,
    mut pending: bool,
    path: PathBuf,
    reloader: Reloader,
    status: Status,
) {
    let mut hup = match hangup {
        Ok(hup) => hup,
        Err(e) => {
            error!(error = %e, "cannot install the SIGHUP handler; reloading is unavailable");
            return;
        }
    };
    if pending {
        info!("SIGHUP arrived during start-up: reloading now");
    }
    while std::mem::take(&mut pending) || hup.recv().await.is_some() {
        service::reloading();
        // Reading files blocks: keep it off the threads that serve clients.
        let path = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            Config::load(&path).and_then(|config| crate::preflight::check(&config).map(|()| config))
        })
        .await;
        let ok = match loaded {
            Err(_) => {
                error!("SIGHUP: keeping the current configuration: the reload task failed");
                false
            }
            Ok(Err(e)) => {
                let problems: Vec<String> = e.to_string().lines().map(str::to_string).collect();
                error!("SIGHUP: the configuration has errors; keeping the current one: {}", problems.join("; "));
                false
            }
            Ok(Ok(config)) => {
                let accounts = config.accounts.len();
                let warnings = config.warnings.clone();
                match reloader.reload(config).await {
                    Ok(done) => {
                        for warning in &warnings {
                            warn!("{warning}");
                        }
                        status.accounts.store(accounts, Ordering::Relaxed);
                        status.listeners.store(reloader.local_addrs().len(), Ordering::Relaxed);
                        info!("SIGHUP: reloaded {done}");
                        true
                    }
                    Err(e) => {
                        error!("SIGHUP: keeping the current configuration: {e}");
                        false
                    }
                }
            }
        };
        reloader.reloaded(ok);
        status.reload_failed.store(!ok, Ordering::Relaxed);
        service::ready(&status.line());
    }
}

/// SIGTERM and SIGINT handlers, installed before the proxy says it runs:
/// a SIGTERM right after READY=1 must drain, not kill.
struct ShutdownSignals(Option<(Signal, Signal)>);

impl ShutdownSignals {
    fn install() -> Self {
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => ShutdownSignals(Some((term, int))),
            _ => {
                // Without signal handlers the only way out is being killed; say so.
                error!("cannot install signal handlers; graceful shutdown unavailable");
                ShutdownSignals(None)
            }
        }
    }

    /// Completes on the first SIGTERM or SIGINT.
    async fn recv(self) {
        let Some((mut term, mut int)) = self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    }
}
