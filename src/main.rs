//! The `xoauth2-proxy` binary: parse arguments, dispatch to `cli`.

use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use xoauth2_proxy::cli;
use xoauth2_proxy::config::raw::HumanDuration;

const DEFAULT_CONFIG: &str = "/etc/xoauth2-proxy/config.yaml";

/// `--version`, with the optional features this binary was built with, so
/// that an admin (and packaging/deb.sh) can tell whether it serves
/// `local_tls_profile: legacy`.
const VERSION: &str = if cfg!(feature = "legacy-tls") {
    concat!(env!("CARGO_PKG_VERSION"), " (features: legacy-tls)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Parser)]
#[command(
    name = "xoauth2-proxy",
    version = VERSION,
    about = "SMTP/IMAP/POP3 proxy: plain logins in, OAuth2 (XOAUTH2) to Microsoft 365 out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `-c FILE`, the same on every subcommand that reads the configuration.
#[derive(Args)]
struct ConfigArg {
    /// The configuration file (YAML; config.example.yaml documents every
    /// key). Relative file names in it are relative to its directory.
    #[arg(short, long, value_name = "FILE", env = "XOAUTH2_PROXY_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every listener until SIGTERM or SIGINT; SIGHUP re-reads the configuration.
    #[command(long_about = "Serve every listener until SIGTERM or SIGINT (running sessions then get \
        shutdown_timeout to finish).\n\n\
        SIGHUP (`xoauth2-proxy reload`, or `systemctl reload xoauth2-proxy`) applies the whole \
        re-read configuration without dropping a session: listeners added, removed or moved \
        (an unchanged address keeps its socket), identities (a changed one gets a new token \
        source, the others keep their cached tokens), accounts, the local TLS certificate, \
        limits, the admin listener and the log level (log.format applies at the next start). \
        Sessions already running keep the settings they started with. A configuration with \
        errors, or an address that cannot be bound, changes nothing: the reason is logged in \
        one line and the running configuration kept.\n\n\
        Under systemd (Type=notify) the proxy reports READY=1 once every listener is bound, \
        RELOADING=1 and READY=1 around a reload, STOPPING=1 at shutdown, and pings the \
        watchdog when WatchdogSec= is set.")]
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Write the process id to this file once every listener is bound
        /// (removed at exit), for `reload --pid-file`.
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
    },
    /// Validate the configuration; with --online, diagnose every identity and
    /// account against Entra and Exchange. Exit 0 all ok, 1 something failed,
    /// 2 invalid config.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Check the token endpoint, a token and its claims, and a real login
        /// to each upstream; print the fix for each failing step.
        #[arg(long)]
        online: bool,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Print the Entra admin center steps and Exchange Online PowerShell
    /// commands for a new app registration, and a config fragment.
    Setup {
        /// How the proxy gets tokens: app-only, or a user signing in once.
        #[arg(long, value_enum, default_value_t = SetupFlow::ClientCredentials)]
        flow: SetupFlow,
        /// The protocols the legacy clients use.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "imap,pop3,smtp")]
        protocols: Vec<SetupProtocol>,
        /// The tenant: its directory (tenant) ID or a domain (contoso.onmicrosoft.com).
        #[arg(long)]
        tenant: String,
        /// The app registration's Application (client) ID, once it exists.
        #[arg(long)]
        client_id: Option<String>,
        /// The mailbox the proxy serves.
        #[arg(long)]
        mailbox: Option<String>,
        /// How an app-only registration proves itself.
        #[arg(long, value_enum, default_value_t = SetupCredential::Secret)]
        credential: SetupCredential,
        /// Where the config will live (used in the commands printed).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: String,
    },
    /// Check the configuration, then make the running proxy re-read it (SIGHUP).
    #[command(long_about = "Check the configuration as `check` does, then send SIGHUP to the running proxy, \
        which re-reads it without dropping sessions. A configuration with errors is printed \
        (exit 2) and the proxy is not signalled.\n\n\
        The systemd unit runs `reload --pid $MAINPID` for `systemctl reload xoauth2-proxy`; \
        elsewhere start the proxy with `run --pid-file FILE` and reload with `--pid-file FILE`. \
        Run it with the proxy's environment (the unit's EnvironmentFile=), since ${VAR} in the \
        configuration is expanded here too.")]
    #[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "pid_file"])))]
    Reload {
        #[command(flatten)]
        config: ConfigArg,
        /// The proxy's process id.
        #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
        pid: Option<i32>,
        /// A file holding the proxy's process id (see `run --pid-file`).
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
    },
    /// Sign in an account of a delegated (refresh_token) identity with the
    /// device code flow and store its refresh token.
    Login {
        #[command(flatten)]
        config: ConfigArg,
        /// The account's username (or its mailbox).
        account: String,
    },
    /// Print (or write) a valid access token for an account, refreshing as needed.
    Token {
        #[command(flatten)]
        config: ConfigArg,
        /// The account's username (or its mailbox).
        account: String,
        /// Write the token to this file (atomically, mode 0600) instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Refresh unless the token has at least this long to live (e.g. 30m).
        #[arg(long, value_parser = parse_duration)]
        min_lifetime: Option<Duration>,
    },
    /// Read a password (no echo on a terminal, else one line of stdin) and
    /// print its argon2id hash for `password_hash`.
    HashPassword,
    /// Write a self-signed certificate (local.pem) and key (local-key.pem,
    /// mode 0600) for local TLS; with --key-type rsa, local-rsa.pem and
    /// local-rsa-key.pem for the legacy profile.
    GenCert {
        /// Directory for the two files.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// A host name or IP address clients use to reach the proxy (repeat
        /// for several; default localhost, 127.0.0.1 and ::1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
        /// ecdsa (P-256, local.pem) for the default TLS profile; rsa (2048
        /// bits, local-rsa.pem) for `local_tls_profile: legacy`.
        #[arg(long, value_enum, default_value = "ecdsa")]
        key_type: cli::gen_cert::KeyType,
    },
    /// Exit 0 if URL answers 2xx (for container health checks).
    Probe {
        /// The URL to ask.
        #[arg(default_value = cli::probe::DEFAULT_URL)]
        url: String,
        /// Give up after this long (e.g. 5s).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Write man pages or shell completions into DIR (for packagers).
    #[command(hide = true)]
    Generate { what: cli::generate::What, dir: PathBuf },
}

#[derive(Clone, Copy, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
enum SetupFlow {
    ClientCredentials,
    RefreshToken,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SetupProtocol {
    Imap,
    Pop3,
    Smtp,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SetupCredential {
    Secret,
    Certificate,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<HumanDuration>().map(|d| d.0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let early = match cli.command {
        Command::Run { .. } => match cli::run::EarlySignals::catch() {
            Ok(early) => Some(early),
            Err(e) => {
                eprintln!("error: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Command::Run { config, pid_file } => match early {
            Some(early) => runtime.block_on(cli::run::run(&config.config, pid_file.as_deref(), early)),
            None => ExitCode::FAILURE,
        },
        Command::Check { config, online, json } => runtime.block_on(cli::check::run(&config.config, online, json)),
        Command::Reload { config, pid, pid_file } => {
            let target = match (pid, &pid_file) {
                (Some(pid), _) => cli::reload::Target::Pid(pid),
                (None, Some(file)) => cli::reload::Target::PidFile(file),
                // clap's "target" group requires one of them; say so all the same.
                (None, None) => {
                    eprintln!("error: name the proxy with --pid PID or --pid-file FILE");
                    return ExitCode::from(cli::EXIT_CONFIG);
                }
            };
            cli::reload::run(&config.config, target)
        }
        Command::Setup { flow, protocols, tenant, client_id, mailbox, credential, config } => {
            use xoauth2_proxy::config::Flow;
            use xoauth2_proxy::doctor::setup::{AppCredential, Request};
            use xoauth2_proxy::protocol::Protocol;
            cli::setup::run(&Request {
                flow: match flow {
                    SetupFlow::ClientCredentials => Flow::ClientCredentials,
                    SetupFlow::RefreshToken => Flow::RefreshToken,
                },
                protocols: protocols
                    .iter()
                    .map(|p| match p {
                        SetupProtocol::Imap => Protocol::Imap,
                        SetupProtocol::Pop3 => Protocol::Pop3,
                        SetupProtocol::Smtp => Protocol::Smtp,
                    })
                    .collect(),
                tenant,
                client_id,
                mailbox,
                credential: match credential {
                    SetupCredential::Secret => AppCredential::Secret,
                    SetupCredential::Certificate => AppCredential::Certificate,
                },
                config,
            })
        }
        Command::Login { config, account } => runtime.block_on(cli::login::run(&config.config, &account)),
        Command::Token { config, account, output, min_lifetime } => {
            runtime.block_on(cli::token::run(&config.config, &account, output.as_deref(), min_lifetime))
        }
        Command::HashPassword => cli::hash_password::run(),
        Command::GenCert { out, hosts, days, force, key_type } => {
            cli::gen_cert::run(&out, &hosts, days, force, key_type)
        }
        Command::Probe { url, timeout } => runtime.block_on(cli::probe::run(&url, timeout)),
        Command::Generate { what, dir } => cli::generate::run(Cli::command(), what, &dir),
    };
    // Do not wait for blocking work (a config read on a stuck file system)
    // once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
