//! The command line: one module per subcommand.

pub mod check;
pub mod gen_cert;
pub mod hash_password;
pub mod login;
pub mod run;
pub mod token;

use crate::config::Config;
use std::path::Path;
use std::process::ExitCode;

/// Exit status for a configuration that does not load.
pub const EXIT_CONFIG: u8 = 2;

/// Loads the config or prints every problem and returns the exit code.
pub fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}
