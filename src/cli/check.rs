//! `xoauth2-proxy check`: validate a config; with `--online`, also obtain a
//! token for each identity and reach each upstream.

use crate::config::{Config, LocalTls};
use crate::server::Proxy;
use crate::token::{provider, TokenKey, TokenManager};
use std::path::Path;
use std::process::ExitCode;

pub async fn run(config_path: &Path, online: bool) -> ExitCode {
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(tls) = &config.tls {
        if config.listeners.iter().any(|l| l.local_tls != LocalTls::None) {
            if let Err(e) = crate::tls::server_config(&tls.cert_file, &tls.key_file) {
                eprintln!("{}: tls: {e}", config.source.display());
                return ExitCode::from(super::EXIT_CONFIG);
            }
        }
    }
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
    let mut ok = true;
    for id in config.identities.values() {
        let mut tokens = TokenManager::new();
        let result = match provider::source_for(id, tls.clone()) {
            Ok(source) => {
                tokens.add_identity(&id.name, source, id.min_token_lifetime);
                tokens.get(&TokenKey::app(&id.name)).await.map(|t| t.remaining())
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(remaining) => {
                println!("  ok   identity {:?}: token obtained, valid for {}s", id.name, remaining.as_secs())
            }
            Err(e) => {
                ok = false;
                println!("  FAIL identity {:?}: {e}", id.name);
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
