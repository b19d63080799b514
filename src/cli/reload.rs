//! `xoauth2-proxy reload`: check the configuration as `check` does, then
//! send SIGHUP to the running proxy, which applies it without dropping
//! sessions. A configuration with errors is reported (exit 2) and nothing
//! is signalled, so a typo never reaches the running proxy.
//!
//! The proxy is found by its process id: `--pid` (the systemd unit's
//! `ExecReload=` passes `$MAINPID`) or `--pid-file` (the file `run
//! --pid-file` writes once every listener is bound).

use rustix::process::{kill_process, Pid, Signal};
use std::path::Path;
use std::process::ExitCode;

/// The running proxy to signal.
pub enum Target<'a> {
    Pid(i32),
    PidFile(&'a Path),
}

pub fn run(config_path: &Path, target: Target<'_>) -> ExitCode {
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match target {
        Target::Pid(pid) => Ok(pid),
        Target::PidFile(path) => read_pid_file(path),
    }
    .and_then(hangup);
    match result {
        Ok(pid) => {
            println!(
                "{}: configuration is valid; sent SIGHUP to xoauth2-proxy (pid {pid}), which logs what it applied",
                config.source.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_pid_file(path: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("{}: {e} (is the proxy running with `run --pid-file {}`?)", path.display(), path.display())
    })?;
    parse_pid(text.trim()).ok_or_else(|| format!("{}: {:?} is not a process id", path.display(), text.trim()))
}

fn parse_pid(text: &str) -> Option<i32> {
    text.parse::<i32>().ok().filter(|pid| *pid > 0)
}

/// Signals `pid` after making sure it is an xoauth2-proxy: a stale pid
/// file must not send SIGHUP (whose default action is to terminate) to
/// whatever process got the number since.
fn hangup(pid: i32) -> Result<i32, String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_err(|e| format!("no process {pid} ({e}); is the proxy running?"))?;
    if !comm.trim_end().starts_with("xoauth2-proxy") {
        return Err(format!("process {pid} is {:?}, not xoauth2-proxy (a stale pid file?)", comm.trim_end()));
    }
    let target = Pid::from_raw(pid).ok_or_else(|| format!("{pid} is not a process id"))?;
    kill_process(target, Signal::HUP).map_err(|e| format!("cannot signal process {pid}: {e}"))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_positive_process_ids_are_accepted() {
        // 0 and negative numbers would signal process groups.
        assert_eq!(parse_pid("4242"), Some(4242));
        for bad in ["0", "-1", "-4242", "", "12a", "99999999999"] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_process_that_is_not_the_proxy_is_never_signalled() {
        // This test binary is not called xoauth2-proxy.
        let err = hangup(std::process::id() as i32).unwrap_err();
        assert!(err.contains("not xoauth2-proxy"), "{err}");
        let err = hangup(i32::MAX).unwrap_err();
        assert!(err.contains("no process"), "{err}");
    }
}
