//! `xoauth2-proxy token ACCOUNT`: print or write a valid access token, for
//! imapsync's `--oauthaccesstoken1` and scripts.

use crate::config::{Config, IdentityConfig, TokenStoreKey};
use crate::fsutil::write_atomically;
use crate::token::provider::{self, Source};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(config_path: &Path, account: &str, output: Option<&Path>, min_lifetime: Option<Duration>) -> ExitCode {
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::telemetry::init(&config.log);
    match token(&config, account, output, min_lifetime).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The token source for one identity, built as the proxy builds it: with
/// `state:`, records are read from and written to the replicas' Redis too
/// (so a `login` on one replica reaches them all).
pub(super) async fn source(config: &Config, identity: &IdentityConfig) -> Result<Source, String> {
    crate::tls::install_default_provider();
    let tls = crate::tls::client_config(config.upstream_ca_file.as_deref()).map_err(|e| e.to_string())?;
    if let Some(store) = &config.token_store {
        // Opening the store creates its key file on first use.
        super::owner::check_writer(&store.path)?;
        if let TokenStoreKey::File(key) = &store.key {
            super::owner::check_writer(key)?;
        }
    }
    let state = match &config.state {
        Some(state) => {
            let shared = crate::state::SharedState::connect_quiet(state).map_err(|e| e.to_string())?;
            if let Err(e) = shared.ping().await {
                eprintln!(
                    "warning: the shared state ({}) does not answer ({e}): using the local token store only",
                    state.display_url()
                );
            }
            Some(shared)
        }
        None => None,
    };
    let ctx = crate::token::shared_context_for(config, tls, state).map_err(|e| e.to_string())?;
    provider::source_for(identity, &ctx).map_err(|e| e.to_string())
}

async fn token(
    config: &Config,
    name: &str,
    output: Option<&Path>,
    min_lifetime: Option<Duration>,
) -> Result<(), String> {
    let account = config.find_account(name)?;
    let identity = config.identity(&account.identity).ok_or("the account's identity is missing")?;
    let fresh = match source(config, identity).await? {
        // Every app-only token is new, with its full lifetime.
        Source::App(app) => app.fetch_new().await,
        Source::Delegated(tokens) => {
            tokens.fetch_with(&account.username, min_lifetime.unwrap_or(identity.min_token_lifetime)).await
        }
    }
    .map_err(|e| e.to_string())?;
    let mut line = crate::secret::Secret::new(fresh.access_token.expose().clone());
    line.expose_mut().push('\n');
    match output {
        Some(path) => {
            write_atomically(path, line.expose().as_bytes()).map_err(|e| e.to_string())?;
            eprintln!(
                "token for {} written to {} (valid for {}s)",
                account.username,
                path.display(),
                fresh.expires_in.as_secs()
            );
        }
        None => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(line.expose().as_bytes()).and_then(|_| stdout.flush()).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
