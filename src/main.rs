//! The `xoauth2-proxy` binary: parse arguments, dispatch to `cli`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use xoauth2_proxy::cli;

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
    /// Read a password (no echo on a terminal, else one line of stdin) and
    /// print its argon2id hash for `password_hash`.
    HashPassword,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run { config } => runtime.block_on(cli::run::run(&config)),
        Command::Check { config, online } => runtime.block_on(cli::check::run(&config, online)),
        Command::HashPassword => cli::hash_password::run(),
    }
}
