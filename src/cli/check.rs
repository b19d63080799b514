//! `xoauth2-proxy check`: validate a config; with `--online`, also obtain a
//! token for each identity and reach each upstream.

use crate::config::{Config, Flow, LocalTls};
use crate::server::Proxy;
use std::path::Path;
use std::process::ExitCode;

pub async fn run(config_path: &Path, online: bool) -> ExitCode {
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    summarize(&config);
    if !online {
        return ExitCode::SUCCESS;
    }
    if check_online(&config).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn summarize(config: &Config) {
    println!("{}: configuration is valid", config.source.display());
    for l in &config.listeners {
        let auth = match (l.local_tls, l.plaintext_allowed, l.require_tls) {
            (LocalTls::Implicit, _, _) => "logins over TLS",
            (LocalTls::Starttls, _, true) | (LocalTls::Starttls, false, _) => "logins after STARTTLS only",
            (LocalTls::Starttls, true, false) => "logins with or without STARTTLS",
            (LocalTls::None, true, _) => "plain-text logins (loopback or allow_plaintext_auth)",
            (LocalTls::None, false, _) => "NO logins possible: plain text on a non-loopback address",
        };
        println!(
            "  listener {:?}: {} on {} -> {} ({:?}), {auth}",
            l.name, l.protocol, l.bind, l.upstream, l.upstream_tls
        );
    }
    for id in config.identities.values() {
        println!("  identity {:?}: {}, token endpoint {}", id.name, id.flow.as_str(), id.token_url);
    }
    println!("  {} account(s)", config.accounts.len());
    for w in &config.warnings {
        println!("  warning: {w}");
    }
}

async fn check_online(config: &Config) -> bool {
    crate::tls::install_default_provider();
    let tls = match crate::tls::client_config(config.upstream_ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            println!("  FAIL tls: {e}");
            return false;
        }
    };
    let tokens = match crate::token::manager_for(config, tls) {
        Ok(t) => t,
        Err(e) => {
            println!("  FAIL {e}");
            return false;
        }
    };
    let mut ok = true;
    for id in config.identities.values() {
        // App-only identities have one token; delegated ones one per account.
        let accounts: Vec<&str> = match id.flow {
            Flow::ClientCredentials => vec![""],
            Flow::RefreshToken => {
                config.accounts.iter().filter(|a| a.identity == id.name).map(|a| a.username.as_str()).collect()
            }
        };
        for account in accounts {
            let key = tokens.key_for(&id.name, account);
            let label = if account.is_empty() {
                format!("identity {:?}", id.name)
            } else {
                format!("identity {:?} account {account:?}", id.name)
            };
            match tokens.get(&key).await {
                Ok(token) => println!("  ok   {label}: token obtained, valid for {}s", token.remaining().as_secs()),
                Err(e) => {
                    ok = false;
                    println!("  FAIL {label}: {e}");
                }
            }
        }
    }
    match Proxy::probe_upstreams(config).await {
        Ok(results) => {
            for (name, result) in results {
                match result {
                    Ok(caps) => {
                        println!("  ok   listener {name:?}: upstream reachable over TLS ({} capabilities)", caps.len())
                    }
                    Err(e) => {
                        ok = false;
                        println!("  FAIL listener {name:?}: {e}");
                    }
                }
            }
        }
        Err(e) => {
            ok = false;
            println!("  FAIL {e}");
        }
    }
    ok
}
