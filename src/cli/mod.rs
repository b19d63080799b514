//! The command line: one module per subcommand.

pub mod check;
pub mod gen_cert;
pub mod generate;
pub mod hash_password;
pub mod login;
mod owner;
pub mod probe;
pub mod reload;
pub mod run;
pub mod setup;
pub mod token;

use crate::config::Config;
use std::path::Path;
use std::process::ExitCode;

/// Exit status for a configuration that does not load.
pub const EXIT_CONFIG: u8 = 2;

/// Loads the config and checks the files it names, or prints every
/// problem and returns the exit code.
pub fn load_config(path: &Path) -> Result<Config, ExitCode> {
    let config = Config::load(path).and_then(|config| crate::preflight::check(&config).map(|()| config));
    config.map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}
