//! `xoauth2-proxy probe [URL]`: exit 0 when URL answers 2xx within the
//! timeout, 1 otherwise. The container image's HEALTHCHECK runs it against
//! the admin listener's `/healthz`: the runtime image has no shell and no
//! curl, and the binary already carries an HTTP client.

use std::process::ExitCode;
use std::time::Duration;

pub const DEFAULT_URL: &str = "http://127.0.0.1:9464/healthz";

pub async fn run(url: &str, timeout: Duration) -> ExitCode {
    match probe(url, timeout).await {
        Ok(status) => {
            println!("{url}: {status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn probe(url: &str, timeout: Duration) -> Result<reqwest::StatusCode, String> {
    crate::tls::install_default_provider();
    let tls = crate::tls::client_config(None).map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .user_agent(concat!("xoauth2-proxy/", env!("CARGO_PKG_VERSION"), " probe"))
        // A health check asks this process's own listener, never through an HTTP proxy.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    if status.is_success() {
        Ok(status)
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(format!("{status} {}", body.lines().next().unwrap_or("").chars().take(200).collect::<String>()))
    }
}
