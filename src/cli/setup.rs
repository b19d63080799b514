//! `xoauth2-proxy setup`: prints the Entra and Exchange steps for a flow and
//! protocols, in the admin's ids (the guide itself is `doctor::setup`).

use crate::doctor::setup::{guide, AppCredential, Request};
use std::process::ExitCode;

pub fn run(request: &Request) -> ExitCode {
    if request.flow == crate::config::Flow::RefreshToken && request.credential == AppCredential::Certificate {
        eprintln!("error: --credential applies to --flow client_credentials only (the delegated flow signs in with a device code)");
        return ExitCode::from(2);
    }
    print!("{}", guide(request));
    ExitCode::SUCCESS
}
