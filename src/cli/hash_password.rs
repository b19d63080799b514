//! `xoauth2-proxy hash-password`: an argon2id PHC string for `password_hash`.

use crate::secret::Secret;
use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

pub fn run() -> ExitCode {
    let password = match read_password() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match crate::accounts::hash_password(password.expose().as_bytes()) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot hash: {e}");
            ExitCode::FAILURE
        }
    }
}

/// From a terminal: prompt twice without echo. Otherwise: the first line of stdin.
fn read_password() -> Result<Secret<String>, String> {
    let password = if std::io::stdin().is_terminal() {
        let first = Secret::new(rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?);
        let second = Secret::new(rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?);
        if first != second {
            return Err("the passwords do not match".into());
        }
        first
    } else {
        let mut line = Secret::new(String::new());
        std::io::stdin().lock().read_line(line.expose_mut()).map_err(|e| e.to_string())?;
        let trimmed = line.expose().trim_end_matches(['\r', '\n']).to_string();
        Secret::new(trimmed)
    };
    if password.expose().is_empty() {
        return Err("empty password".into());
    }
    Ok(password)
}
