//! `xoauth2-proxy generate man|completions DIR` (hidden): the man pages and
//! the bash, zsh and fish completions the Debian package ships, made from
//! the same clap definitions the binary parses with, so they cannot drift.
//!
//! A subcommand rather than a build script: the build stays free of
//! generated files and build-time dependencies, and packagers run the
//! binary they ship (as ripgrep's `--generate` does).

use clap_complete::Shell;
use std::path::Path;
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// xoauth2-proxy.1 and one page per subcommand (xoauth2-proxy-run.1, ...).
    Man,
    /// xoauth2-proxy.bash, _xoauth2-proxy (zsh) and xoauth2-proxy.fish.
    Completions,
}

pub fn run(mut command: clap::Command, what: What, dir: &Path) -> ExitCode {
    let result = std::fs::create_dir_all(dir).and_then(|()| match what {
        What::Man => clap_mangen::generate_to(command, dir),
        What::Completions => {
            let name = command.get_name().to_string();
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut command, &name, dir)?;
            }
            Ok(())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
