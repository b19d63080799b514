//! `xoauth2-proxy login ACCOUNT`: device code sign-in for a delegated
//! identity; stores the account's refresh token. Ctrl-C leaves the store as it was.

use crate::config::{Config, Flow};
use crate::token::provider::{poll_device_login, Source};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(config_path: &Path, account: &str) -> ExitCode {
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::telemetry::init(&config.log);
    match login(&config, account).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("login failed: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn login(config: &Config, name: &str) -> Result<ExitCode, String> {
    let account = config.find_account(name)?;
    let identity = config.identity(&account.identity).ok_or("the account's identity is missing")?;
    if identity.flow != Flow::RefreshToken {
        return Err(format!(
            "account {} uses identity {} with {}: app-only tokens need no login",
            account.username,
            identity.name,
            identity.flow.as_str()
        ));
    }
    let source = super::token::source(config, identity).await?;
    let Source::Delegated(tokens) = source else {
        return Err("identity is not delegated".into());
    };
    let endpoint = tokens.endpoint();
    let authorization = endpoint.device_authorization().await.map_err(|e| e.to_string())?;
    println!();
    match &authorization.message {
        Some(message) => println!("{message}"),
        None => println!(
            "To sign in, use a web browser to open the page {} and enter the code {} to authenticate.",
            authorization.verification_uri, authorization.user_code
        ),
    }
    println!(
        "Sign in as the Microsoft 365 user whose mail {} reaches ({}). Waiting up to {} minutes; Ctrl-C cancels.",
        account.username,
        account.smtp_user,
        authorization.expires_in / 60
    );
    let poll = poll_device_login(
        Duration::from_secs(authorization.interval),
        Duration::from_secs(authorization.expires_in),
        || endpoint.poll_device(&authorization),
    );
    tokio::select! {
        result = poll => {
            let fresh = result.map_err(|e| e.to_string())?;
            let path = tokens.store_login(&account.username, &fresh).await.map_err(|e| e.to_string())?;
            println!("Signed in. The refresh token for {} is stored, encrypted, in {}.", account.username, path.display());
            println!("The proxy refreshes it from now on; no restart is needed.");
            Ok(ExitCode::SUCCESS)
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!("cancelled; the token store was not changed");
            Ok(ExitCode::from(130))
        }
    }
}
