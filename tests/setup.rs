//! `xoauth2-proxy setup`: the README's Entra sections are its output (a
//! changed guide fails here until the README is regenerated), and the config
//! fragment it prints is a configuration the proxy accepts.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;
use support::cheap_hash;
use xoauth2_proxy::config::Config;

fn setup(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy")).arg("setup").args(args).output().unwrap();
    assert!(out.status.success(), "setup {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const BEGIN: &str = "<!-- setup ";
const END: &str = "<!-- end setup -->";

/// Each block of the README between `<!-- setup ARGS -->` and
/// `<!-- end setup -->` must be, in a text fence, what `setup ARGS` prints.
/// `XOAUTH2_PROXY_BLESS=1 cargo test --test setup` rewrites them.
#[test]
fn the_readme_shows_what_setup_prints() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let mut rebuilt = String::new();
    let mut rest = readme.as_str();
    let mut blocks = 0;
    let mut stale = Vec::new();
    while let Some(at) = rest.find(BEGIN) {
        let line_end = at + rest[at..].find("-->").expect("an unterminated setup marker") + 3;
        let args: Vec<&str> = rest[at + BEGIN.len()..line_end - 3].split_whitespace().collect();
        let end = rest[line_end..].find(END).expect("a setup block without its end marker") + line_end;
        let want = format!("\n```text\n{}```\n", setup(&args));
        if rest[line_end..end] != want {
            stale.push(args.join(" "));
        }
        rebuilt.push_str(&rest[..line_end]);
        rebuilt.push_str(&want);
        rest = &rest[end..];
        blocks += 1;
    }
    rebuilt.push_str(rest);
    assert!(blocks >= 3, "the README embeds the guide of each flow ({blocks} blocks)");
    if !stale.is_empty() {
        if std::env::var_os("XOAUTH2_PROXY_BLESS").is_some() {
            std::fs::write(&path, rebuilt).unwrap();
        } else {
            panic!(
                "README.md differs from `xoauth2-proxy setup {}`; regenerate with XOAUTH2_PROXY_BLESS=1 cargo test --test setup",
                stale.join("`, `setup ")
            );
        }
    }
}

/// The numbered step "Configure the proxy", as a file under `dir`.
fn fragment(guide: &str, dir: &Path) -> String {
    let start = guide.find("Configure the proxy: ").expect("a config step");
    let body = &guide[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let end = body.find("\n\n").unwrap_or(body.len());
    body[..end]
        .lines()
        .map(|l| l.strip_prefix("       ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("<the hash-password output>", &cheap_hash("printer's password"))
        .replace("/etc/xoauth2-proxy", &dir.display().to_string())
        .replace("/var/lib/xoauth2-proxy", &dir.join("store").display().to_string())
}

#[test]
fn the_config_fragment_is_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    // What the guide's own steps would have made: the secret file and, with
    // its openssl command, an RSA certificate and key.
    std::fs::write(dir.path().join("client-secret"), "x\n").unwrap();
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/certs");
    std::fs::copy(certs.join("rsa-2048-cert.pem"), dir.path().join("app.pem")).unwrap();
    std::fs::copy(certs.join("rsa-2048-pkcs8.pem"), dir.path().join("app-key.pem")).unwrap();
    let ids = [
        "--tenant",
        "contoso.onmicrosoft.com",
        "--client-id",
        "11111111-2222-3333-4444-555555555555",
        "--mailbox",
        "scanner@contoso.com",
    ];
    for (extra, flow, listeners) in [
        (&["--protocols", "imap,pop3,smtp"][..], "client_credentials", 3),
        (&["--protocols", "smtp", "--credential", "certificate"][..], "client_credentials", 1),
        (&["--flow", "refresh_token", "--protocols", "imap,smtp"][..], "refresh_token", 2),
    ] {
        let args: Vec<&str> = ids.iter().chain(extra).copied().collect();
        let text = fragment(&setup(&args), dir.path());
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, &text).unwrap();
        let config = Config::load_with_env(&path, &std::collections::HashMap::new())
            .and_then(|c| xoauth2_proxy::preflight::check(&c).map(|()| c))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.listeners.len(), listeners, "{text}");
        let identity = &config.identities["contoso"];
        assert_eq!(identity.flow.as_str(), flow);
        assert_eq!(identity.client_id, "11111111-2222-3333-4444-555555555555");
        assert_eq!(config.accounts[0].mailbox, "scanner@contoso.com");
    }
}

#[test]
fn setup_refuses_a_certificate_for_the_delegated_flow() {
    let out = Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"))
        .args(["setup", "--flow", "refresh_token", "--credential", "certificate", "--tenant", "t.example"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--credential applies to --flow client_credentials only"));
}
