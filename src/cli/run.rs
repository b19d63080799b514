//! `xoauth2-proxy run`: serve until SIGTERM or SIGINT.

use crate::server::Proxy;
use std::path::Path;
use std::process::ExitCode;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

pub async fn run(config_path: &Path) -> ExitCode {
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
    let reload_task = tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
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
    proxy.run(shutdown_signal()).await;
    reload_task.abort();
    ExitCode::SUCCESS
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the only way out is being killed; say so.
        error!("cannot install signal handlers; graceful shutdown unavailable");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}
