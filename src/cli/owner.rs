//! One ownership story: the proxy runs as its own system user (the Debian
//! package's `xoauth2-proxy`), and the commands that write files for it
//! (`login` and `token` write the token store and its key, `gen-cert` the
//! local TLS key) run as that user too. Those files are mode 0600, so a file
//! root writes into the service user's directory is one the service cannot
//! read. When root is about to do that, the command refuses and prints the
//! same command line run as the directory's owner.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Refuses (with the command to run instead) when this process runs as root
/// and the nearest existing directory of `target` belongs to another user.
pub fn check_writer(target: &Path) -> Result<(), String> {
    let euid = rustix::process::geteuid().as_raw();
    let Some((dir, owner)) = nearest_existing(target) else {
        return Ok(());
    };
    match refusal(euid, owner, &dir, user_name(owner).as_deref(), &command_line()) {
        Some(message) => Err(message),
        None => Ok(()),
    }
}

fn refusal(euid: u32, owner: u32, dir: &Path, owner_name: Option<&str>, command: &str) -> Option<String> {
    if euid != 0 || owner == 0 {
        return None;
    }
    // sudo takes `#UID` for a user without a name.
    let user = owner_name.map_or_else(|| format!("#{owner}"), str::to_string);
    Some(format!(
        "{} belongs to {user}, the user the proxy runs as; files root writes there (mode 0600) would be \
         unreadable to it. Run the command as that user: sudo -u {} {command}",
        dir.display(),
        shell_quote(&user)
    ))
}

/// `path` itself if it exists, else its closest existing ancestor, with its owner.
fn nearest_existing(path: &Path) -> Option<(PathBuf, u32)> {
    let absolute = std::path::absolute(path).ok()?;
    absolute.ancestors().find_map(|p| std::fs::metadata(p).ok().map(|m| (p.to_path_buf(), m.uid())))
}

/// The name of `uid` from /etc/passwd (no NSS: enough for system users,
/// which the package creates there; sudo also accepts `#UID`).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// This process's command line, ready to paste into a shell.
fn command_line() -> String {
    let mut args = std::env::args();
    let program = args.next().unwrap_or_else(|| "xoauth2-proxy".into());
    std::iter::once(program).chain(args).map(|a| shell_quote(&a)).collect::<Vec<_>>().join(" ")
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c))
        && !word.starts_with('#');
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_writing_into_the_service_users_directory_is_refused() {
        let dir = Path::new("/var/lib/xoauth2-proxy");
        let cmd = "xoauth2-proxy login -c /etc/xoauth2-proxy/config.yaml crm";
        let message = refusal(0, 998, dir, Some("xoauth2-proxy"), cmd).unwrap();
        assert!(message.starts_with("/var/lib/xoauth2-proxy belongs to xoauth2-proxy"), "{message}");
        assert!(message.ends_with(&format!("sudo -u xoauth2-proxy {cmd}")), "{message}");
        // A user without a name is named the way sudo accepts, quoted for the shell.
        assert!(refusal(0, 998, dir, None, cmd).unwrap().contains("sudo -u '#998' xoauth2-proxy"));
    }

    #[test]
    fn the_owner_itself_and_root_in_roots_directories_may_write() {
        let dir = Path::new("/srv/proxy");
        assert_eq!(refusal(998, 998, dir, Some("xoauth2-proxy"), "x"), None);
        assert_eq!(refusal(0, 0, dir, Some("root"), "x"), None);
        // Another user writing elsewhere gets the system's own permission error, if any.
        assert_eq!(refusal(1000, 998, dir, Some("xoauth2-proxy"), "x"), None);
    }

    #[test]
    fn the_nearest_existing_directory_decides() {
        let dir = tempfile::tempdir().unwrap();
        let owner = std::fs::metadata(dir.path()).unwrap().uid();
        let (found, uid) = nearest_existing(&dir.path().join("certs/new")).unwrap();
        assert_eq!((found.as_path(), uid), (dir.path(), owner));
    }

    #[test]
    fn arguments_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("/etc/xoauth2-proxy/config.yaml"), "/etc/xoauth2-proxy/config.yaml");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("#998"), "'#998'");
    }

    #[test]
    fn user_names_come_from_etc_passwd() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
