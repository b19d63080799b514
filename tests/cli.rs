//! The small commands: `gen-cert` makes a certificate clients can trust and a
//! key only the proxy can read; `hash-password` makes a hash logins verify against.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use argon2::password_hash::{phc::PasswordHash, PasswordVerifier};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use support::*;
use tokio::io::AsyncWriteExt;

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"));
    cmd.env_remove("XOAUTH2_PROXY_LOG");
    cmd
}

#[tokio::test]
async fn gen_cert_makes_a_certificate_clients_can_trust() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |force: bool| {
        let mut cmd = binary();
        cmd.args(["gen-cert", "--out"]).arg(&out).args(["--host", "localhost", "--host", "127.0.0.1"]);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let first = run(false);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let (cert, key) = (out.join("local.pem"), out.join("local-key.pem"));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777, 0o644);
    assert!(String::from_utf8_lossy(&first.stdout).contains("SHA-256 fingerprint"));
    // Existing files are not replaced by accident.
    let again = run(false);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists; use --force"));
    let original = std::fs::read(&cert).unwrap();
    assert!(run(true).status.success());
    assert_ne!(std::fs::read(&cert).unwrap(), original);

    // A client that trusts local.pem completes the handshake with the proxy.
    let tls = format!("tls: {{cert_file: \"{}\", key_file: \"{}\"}}", cert.display(), key.display());
    let h = Harness::with(Options {
        listener_extra: vec!["local_tls: implicit".into()],
        top_extra: vec![tls],
        ..Options::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for c in xoauth2_proxy::tls::load_certificates(&cert).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(xoauth2_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(h.addr("smtp")).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("a client trusting local.pem accepts the proxy");
    TestClient::new(stream).expect("220 ").await;
}

/// Without OpenSSL in the build there is no way to generate an RSA key
/// (ring cannot): gen-cert says which feature is missing and prints the
/// openssl command that makes the same pair, and writes nothing.
#[cfg(not(feature = "legacy-tls"))]
#[test]
fn gen_cert_rsa_without_the_feature_prints_the_openssl_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = binary()
        .args(["gen-cert", "--key-type", "rsa", "--host", "printer.lan", "--host", "192.0.2.10", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        "cargo feature legacy-tls",
        "openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj '/CN=printer.lan'",
        "-keyout local-rsa-key.pem -out local-rsa.pem",
        "subjectAltName=DNS:printer.lan,IP:192.0.2.10",
        "keyUsage=critical,digitalSignature,keyEncipherment",
    ] {
        assert!(stderr.contains(part), "{part} missing in {stderr}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is written");
}

#[tokio::test]
async fn hash_password_reads_stdin_and_prints_a_verifiable_hash() {
    let mut child = tokio::process::Command::from({
        let mut cmd = binary();
        cmd.arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    })
    .spawn()
    .unwrap();
    child.stdin.take().unwrap().write_all(b"correct horse \"battery\"\n").await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let parsed = PasswordHash::new(hash.trim()).unwrap();
    assert!(argon2::Argon2::default().verify_password(b"correct horse \"battery\"", &parsed).is_ok());
    assert!(argon2::Argon2::default().verify_password(b"correct horse", &parsed).is_err());

    let empty = binary().arg("hash-password").stdin(Stdio::null()).output().unwrap();
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("empty password"));
}

#[test]
fn gen_cert_prints_paths_a_config_file_elsewhere_can_use() {
    let work = tempfile::tempdir().unwrap();
    let out = binary().current_dir(work.path()).args(["gen-cert", "--out", "certs"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let certs = std::fs::canonicalize(work.path().join("certs")).unwrap();
    let snippet: Vec<&str> = stdout.lines().skip_while(|l| *l != "  tls:").take(3).collect();
    assert_eq!(
        snippet,
        [
            "  tls:".to_string(),
            format!("    cert_file: {}", certs.join("local.pem").display()),
            format!("    key_file: {}", certs.join("local-key.pem").display()),
        ]
    );
    // Pasted into a config file in another directory, it loads.
    let etc = tempfile::tempdir().unwrap();
    let config = etc.path().join("config.yaml");
    let listener = "listeners:\n  - { name: s, protocol: smtp, bind: \"127.0.0.1:0\", upstream: \"h:587\", local_tls: implicit }\n";
    std::fs::write(
        &config,
        format!("{listener}{}\n", snippet.join("\n").replacen("  tls:", "tls:", 1).replace("\n  ", "\n")),
    )
    .unwrap();
    let check = binary().args(["check", "-c"]).arg(&config).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn every_subcommand_that_reads_the_config_explains_c() {
    for sub in ["run", "check", "reload", "login", "token"] {
        let out = binary().args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains("-c, --config <FILE>"), "{sub}: {help}");
        assert!(help.contains("The configuration file (YAML"), "{sub}: {help}");
    }
    let run = String::from_utf8(binary().args(["run", "--help"]).output().unwrap().stdout).unwrap();
    assert!(run.contains("SIGHUP") && run.contains("READY=1"), "{run}");
}

#[test]
fn generate_writes_man_pages_and_completions_from_the_parser() {
    let dir = tempfile::tempdir().unwrap();
    for what in ["man", "completions"] {
        let out = binary().args(["generate", what]).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    assert!(read("xoauth2-proxy.1").starts_with(".ie"), "roff");
    assert!(read("xoauth2-proxy-reload.1").contains("SIGHUP"));
    for sub in ["run", "check", "reload", "login", "token", "hash-password", "gen-cert"] {
        assert!(dir.path().join(format!("xoauth2-proxy-{sub}.1")).exists(), "{sub}");
        assert!(read("xoauth2-proxy.bash").contains(sub), "bash: {sub}");
        assert!(read("_xoauth2-proxy").contains(sub), "zsh: {sub}");
        assert!(read("xoauth2-proxy.fish").contains(sub), "fish: {sub}");
    }
    // The packagers' command has no man page of its own.
    assert!(!dir.path().join("xoauth2-proxy-generate.1").exists());
}

/// The ownership story: the service user owns its state directory, and root
/// must not leave 0600 files there that the service cannot read.
#[test]
fn root_is_sent_to_the_service_user_for_files_the_service_reads() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root (CI runs as root) to give a directory to another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // 65534 is nobody on Debian.
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - {{ name: i, protocol: imap, bind: \"127.0.0.1:0\", upstream: \"h:993\" }}\n\
             identities:\n  f: {{ tenant: t, client_id: c, flow: refresh_token, authority: \"http://127.0.0.1:1\" }}\n\
             accounts:\n  - {{ username: crm, password: pw, mailbox: crm@example.com, identity: f }}\n\
             token_store: {{ path: {} }}\n",
            state.display()
        ),
    )
    .unwrap();
    for args in [vec!["login", "crm"], vec!["token", "crm"]] {
        let out = binary().args(&args).arg("-c").arg(&config).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("{} belongs to nobody", state.display())), "{stderr}");
        assert!(
            stderr.contains(&format!("sudo -u nobody {} {}", env!("CARGO_BIN_EXE_xoauth2-proxy"), args[0])),
            "{stderr}"
        );
    }
    let out = binary().args(["gen-cert", "--out"]).arg(state.join("tls")).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("sudo -u nobody"), "{out:?}");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "nothing was written: no key, no certificate");
}

/// A one-shot HTTP server on loopback answering `status` to the first request.
fn answer_once(status: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/healthz", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        let body = "{\"reason\":\"identity contoso has no token\"}";
        let _ =
            write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    });
    url
}

#[tokio::test]
async fn probe_succeeds_only_on_a_2xx_answer() {
    let run = |url: String| binary().args(["probe", &url, "--timeout", "5s"]).output().unwrap();
    let ok = run(answer_once("200 OK"));
    assert!(ok.status.success(), "{ok:?}");
    let unready = run(answer_once("503 Service Unavailable"));
    assert_eq!(unready.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unready.stderr)
            .contains("503 Service Unavailable {\"reason\":\"identity contoso has no token\"}"),
        "{unready:?}"
    );
    let down = run(format!("http://{}/healthz", closed_port().await));
    assert_eq!(down.status.code(), Some(1), "{down:?}");
}
