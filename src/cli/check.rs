//! `xoauth2-proxy check`: validate a config and say what it sets up; with
//! `--online`, diagnose every identity and account against Entra and
//! Exchange (the `doctor` module). `--json` prints the same as one document.
//! Exit status: 0 all ok, 1 something failed, 2 the config is invalid.

use crate::config::{Config, ListenerConfig, LocalTls, LocalTlsProfile};
use serde_json::json;
use std::path::Path;
use std::process::ExitCode;

pub async fn run(config_path: &Path, online: bool, json: bool) -> ExitCode {
    // Validation, then the files the config names (certificates, keys, secrets).
    let loaded = Config::load(config_path).and_then(|config| crate::preflight::check(&config).map(|()| config));
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            if json {
                let problems: Vec<_> =
                    e.problems.iter().map(|p| json!({"key": p.path, "problem": p.message})).collect();
                print_json(&json!({"config": config_path.display().to_string(), "valid": false, "problems": problems}));
            } else {
                eprintln!("{e}");
            }
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let report = match online {
        true => Some(crate::doctor::diagnose(&config, &super::owner::check_writer).await),
        false => None,
    };
    let failed = report.as_ref().is_some_and(|r| r.failed());
    let code = u8::from(failed);
    if json {
        let mut doc = summary_json(&config);
        doc["online"] = json!(online);
        if let Some(report) = &report {
            doc["checks"] = json!(report.checks);
            doc["result"] = json!({"counts": report.counts(), "exit_code": code});
        }
        print_json(&doc);
    } else {
        print!("{}", summary_text(&config));
        if let Some(report) = &report {
            println!();
            print!("{}", report.render_text());
        }
    }
    ExitCode::from(code)
}

fn print_json(doc: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(doc).unwrap_or_default());
}

/// Which logins a listener accepts, and why, in the config's words.
fn logins(l: &ListenerConfig) -> String {
    let why = if l.bind.ip().is_loopback() { "loopback bind" } else { "allow_plaintext_auth: true" };
    match (l.local_tls, l.plaintext_allowed, l.require_tls) {
        (LocalTls::Implicit, _, _) => "logins over TLS".to_string(),
        (LocalTls::Auto, _, _) if !l.plaintext_allowed || l.require_tls => {
            "implicit TLS or STARTTLS on one port, logins over TLS only".to_string()
        }
        (LocalTls::Auto, _, _) => {
            format!("implicit TLS, STARTTLS or plain text on one port, by the client's first byte ({why})")
        }
        (LocalTls::Starttls, _, true) => "logins after STARTTLS only (require_tls: true)".to_string(),
        (LocalTls::Starttls, false, _) => "logins after STARTTLS only (not a loopback bind)".to_string(),
        (LocalTls::Starttls, true, false) => format!("logins with or without STARTTLS ({why})"),
        (LocalTls::None, true, _) => format!("plain-text logins ({why})"),
        (LocalTls::None, false, _) => {
            "NO logins possible: plain text on a non-loopback bind (set local_tls, or allow_plaintext_auth: true)"
                .to_string()
        }
    }
}

/// The listener's local TLS in the config's words: the mode, and the
/// profile and the certificate where they are not the defaults.
fn local_tls(l: &ListenerConfig) -> String {
    let mut out = format!("local_tls: {}", l.local_tls.as_str());
    if l.local_tls_profile != LocalTlsProfile::Modern {
        out.push_str(&format!(", local_tls_profile: {}", l.local_tls_profile.as_str()));
    }
    if let Some(own) = &l.tls {
        out.push_str(&format!(", certificate {}", own.cert_file.display()));
    }
    out
}

fn summary_text(config: &Config) -> String {
    let mut out = format!("{}: configuration is valid\n", config.source.display());
    for l in &config.listeners {
        out.push_str(&format!(
            "  listener {:?}: {} on {} ({}) -> {} (upstream_tls: {}), {}\n",
            l.name,
            l.protocol,
            l.bind,
            local_tls(l),
            l.upstream,
            l.upstream_tls.as_str(),
            logins(l)
        ));
    }
    if let Some(admin) = &config.admin {
        out.push_str(&format!("  admin listener on {}: /metrics, /healthz, /readyz over HTTP\n", admin.bind));
    }
    for id in config.identities.values() {
        out.push_str(&format!("  identity {:?}: {}, token endpoint {}\n", id.name, id.flow.as_str(), id.token_url));
    }
    out.push_str(&format!("  {} account(s)\n", config.accounts.len()));
    for w in &config.warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    out
}

fn summary_json(config: &Config) -> serde_json::Value {
    let listeners: Vec<_> = config
        .listeners
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "protocol": l.protocol.as_str(),
                "bind": l.bind.to_string(),
                "local_tls": l.local_tls.as_str(),
                "local_tls_profile": l.local_tls_profile.as_str(),
                "certificate": config.local_tls_files(l).map(|f| f.cert_file.display().to_string()),
                "upstream": l.upstream.to_string(),
                "upstream_tls": l.upstream_tls.as_str(),
                "logins": logins(l),
            })
        })
        .collect();
    let identities: Vec<_> = config
        .identities
        .values()
        .map(|i| json!({"name": i.name, "flow": i.flow.as_str(), "token_endpoint": i.token_url, "client_id": i.client_id}))
        .collect();
    json!({
        "config": config.source.display().to_string(),
        "valid": true,
        "listeners": listeners,
        "admin": config.admin.as_ref().map(|a| json!({"bind": a.bind.to_string()})),
        "identities": identities,
        "accounts": config.accounts.len(),
        "warnings": config.warnings,
    })
}
