//! The `xoauth2-proxy` binary: parse arguments, dispatch to `cli`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use xoauth2_proxy::cli;
use xoauth2_proxy::config::raw::HumanDuration;

const DEFAULT_CONFIG: &str = "/etc/xoauth2-proxy/config.yaml";

#[derive(Parser)]
#[command(
    name = "xoauth2-proxy",
    version,
    about = "SMTP/IMAP/POP3 proxy: plain logins in, OAuth2 (XOAUTH2) to Microsoft 365 out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every listener until SIGTERM or SIGINT.
    Run {
        #[arg(short, long, env = "XOAUTH2_PROXY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration; exit non-zero with the problems.
    Check {
        #[arg(short, long, env = "XOAUTH2_PROXY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also obtain a token for each identity and connect to each upstream.
        #[arg(long)]
        online: bool,
    },
    /// Sign in an account of a delegated (refresh_token) identity with the
    /// device code flow and store its refresh token.
    Login {
        #[arg(short, long, env = "XOAUTH2_PROXY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The account's username (or its mailbox).
        account: String,
    },
    /// Print (or write) a valid access token for an account, refreshing as needed.
    Token {
        #[arg(short, long, env = "XOAUTH2_PROXY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
    /// mode 0600) for local TLS.
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
    },
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
        Command::Run { config } => match early {
            Some(early) => runtime.block_on(cli::run::run(&config, early)),
            None => ExitCode::FAILURE,
        },
        Command::Check { config, online } => runtime.block_on(cli::check::run(&config, online)),
        Command::Login { config, account } => runtime.block_on(cli::login::run(&config, &account)),
        Command::Token { config, account, output, min_lifetime } => {
            runtime.block_on(cli::token::run(&config, &account, output.as_deref(), min_lifetime))
        }
        Command::HashPassword => cli::hash_password::run(),
        Command::GenCert { out, hosts, days, force } => cli::gen_cert::run(&out, &hosts, days, force),
    };
    // Do not wait for blocking work (a config read on a stuck file system)
    // once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
