//! `xoauth2-proxy setup`: the Entra and Exchange steps for one flow and a
//! set of protocols, numbered, with the exact PowerShell lines and a config
//! fragment in the admin's ids. What real products ask of an admin (the
//! seeds: an IMAP collector, OpenFire's SMTP, MailStore's certificate,
//! imapsync's delegated IMAP) decides which steps are here. The README's
//! Entra sections are this output, checked by a test.

use super::commands::{self as cmd, Credential, Ids, APP_ID_PLACEHOLDER, MAILBOX_PLACEHOLDER};
use crate::config::Flow;
use crate::protocol::Protocol;
use std::fmt::Write;

/// The Debian package's service user: it owns the token store and reads
/// the secrets (README, "Running as a service").
const SERVICE_USER: &str = "xoauth2-proxy";

/// How an app-only registration proves itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppCredential {
    Secret,
    Certificate,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub flow: Flow,
    pub protocols: Vec<Protocol>,
    pub tenant: String,
    pub client_id: Option<String>,
    pub mailbox: Option<String>,
    pub credential: AppCredential,
    /// Where the config goes, for the commands printed.
    pub config: String,
}

/// The default upstream and local port of each protocol.
fn listener(protocol: Protocol) -> (&'static str, &'static str) {
    match protocol {
        Protocol::Imap => ("127.0.0.1:1143", "outlook.office365.com:993"),
        Protocol::Pop3 => ("127.0.0.1:1110", "outlook.office365.com:995"),
        Protocol::Smtp => ("127.0.0.1:1587", "smtp.office365.com:587"),
    }
}

/// A name for the identity: the tenant's first domain label ("contoso").
fn identity_name(tenant: &str) -> String {
    let label = tenant.split('.').next().unwrap_or("");
    if tenant.contains('.') && !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        label.to_ascii_lowercase()
    } else {
        "entra".to_string()
    }
}

fn config_dir(config: &str) -> String {
    match config.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => dir.to_string(),
        _ => ".".to_string(),
    }
}

/// Writes numbered steps; commands are indented eight spaces.
struct Guide {
    out: String,
    step: usize,
}

impl Guide {
    fn step(&mut self, title: &str) {
        self.step += 1;
        let _ = writeln!(self.out, "\n{}. {title}", self.step);
    }

    fn say(&mut self, text: &str) {
        let _ = writeln!(self.out, "   {text}");
    }

    fn run(&mut self, line: &str) {
        let _ = writeln!(self.out, "       {line}");
    }
}

pub fn guide(r: &Request) -> String {
    let app_only = r.flow == Flow::ClientCredentials;
    let mut protocols = r.protocols.clone();
    protocols.sort_by_key(|p| match p {
        Protocol::Imap => 0,
        Protocol::Pop3 => 1,
        Protocol::Smtp => 2,
    });
    protocols.dedup();
    let dir = config_dir(&r.config);
    let identity = identity_name(&r.tenant);
    let ids = Ids {
        config: r.config.clone(),
        identity: identity.clone(),
        tenant: r.tenant.clone(),
        tenant_id: None,
        client_id: r.client_id.clone(),
        flow: r.flow,
        credential: Credential::None,
        sp_object_id: None,
        account: None,
        mailbox: r.mailbox.clone(),
        smtp_user: None,
        signed_in: None,
    };
    let mailbox = ids.mailbox().to_string();
    let username =
        r.mailbox.as_deref().and_then(|m| m.split('@').next()).filter(|u| !u.is_empty()).unwrap_or("printer");
    let names: Vec<String> = protocols.iter().map(|p| p.as_str().to_uppercase()).collect();
    let names = match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => "no protocol".into(),
    };
    let permissions: Vec<&str> = protocols.iter().map(|p| cmd::permission(*p, r.flow)).collect();
    let app = cmd::portal_app(&ids);

    let mut g = Guide { out: String::new(), step: 0 };
    let flow_text = if app_only {
        match r.credential {
            AppCredential::Secret => "app-only (client_credentials) with a client secret",
            AppCredential::Certificate => "app-only (client_credentials) with a certificate",
        }
    } else {
        "delegated (refresh_token): a user signs in once"
    };
    let _ = writeln!(g.out, "Entra and Exchange Online setup: {flow_text}, for {names} in tenant {}.", r.tenant);
    let _ = writeln!(
        g.out,
        "Commands for this machine assume the package's service user {SERVICE_USER} (drop sudo -u/-g where the proxy runs as you)."
    );
    if r.client_id.is_none() || r.mailbox.is_none() {
        let _ = writeln!(
            g.out,
            "Values in <ANGLE_BRACKETS> are not known yet: run setup again with --client-id and --mailbox to fill them in."
        );
    }

    g.step("Register the app.");
    g.say("Entra admin center (https://entra.microsoft.com) > App registrations > New registration:");
    g.say("name xoauth2-proxy; Accounts in this organizational directory only (single tenant); no redirect URI.");
    g.say("On its Overview page copy the Application (client) ID (client_id below) and the Directory (tenant) ID.");

    if app_only {
        match r.credential {
            AppCredential::Secret => {
                g.step("Give it a client secret.");
                g.say(&format!("{app} > Certificates & secrets > Client secrets > New client secret"));
                g.say("(up to 24 months; note the expiry date: the proxy then gets AADSTS7000222).");
                g.say("Copy the Value column at once, it is shown only now; not the Secret ID (that gives AADSTS7000215).");
                g.say("Store it for the proxy's user: paste the Value, then Ctrl-D:");
                g.run(&format!("sudo install -m 0640 -g {SERVICE_USER} /dev/stdin {dir}/client-secret"));
            }
            AppCredential::Certificate => {
                g.step("Give it a certificate (Microsoft recommends them over secrets).");
                g.run(&format!(
                    "sudo openssl req -x509 -newkey rsa:3072 -nodes -days 730 -subj \"/CN=xoauth2-proxy\" -keyout {dir}/app-key.pem -out {dir}/app.pem"
                ));
                g.run(&format!("sudo chgrp {SERVICE_USER} {dir}/app-key.pem && sudo chmod 0640 {dir}/app-key.pem"));
                g.say(&format!("{app} > Certificates & secrets > Certificates > Upload certificate: app.pem"));
                g.say("(the public half; the key never leaves this machine). A wrong one gives AADSTS700027.");
            }
        }
        g.step("Give it the Exchange permissions, and consent.");
        g.say(&format!(
            "{app} > API permissions > Add a permission > APIs my organization uses > Office 365 Exchange Online > Application permissions:"
        ));
        g.run(&permissions.join(", "));
        g.say(&format!("then Grant admin consent for {} (the Status column says Granted).", r.tenant));
        g.say("Application permissions, not Microsoft Graph's delegated IMAP.AccessAsUser.All: app-only tokens carry only these.");

        g.step("Register it in Exchange Online (its service principal).");
        g.say("In PowerShell, as an Exchange administrator:");
        for line in cmd::ps_connect(&ids) {
            g.run(&line);
        }
        g.say("Entra admin center > Enterprise applications > xoauth2-proxy: copy the Object ID shown THERE.");
        g.say("WARNING: the Object ID on the App registration's Overview is another object. New-ServicePrincipal accepts it,");
        g.say("and every login then fails (\"AUTHENTICATE failed\", \"User is authenticated but not connected\").");
        g.say("`check --online` prints the right one (the oid of the app's token) if in doubt.");
        g.run(&cmd::ps_new_service_principal(&ids));
        g.run(&cmd::ps_get_service_principal(&ids));

        g.step("Give it the mailbox.");
        g.run(&cmd::ps_full_access(&ids, &mailbox, None));
        if protocols.contains(&Protocol::Smtp) {
            g.say("SMTP logs in as that mailbox; to send as another address too:");
            g.run(&cmd::ps_send_as(&ids, "<OTHER_ADDRESS>", None));
        }
        g.say("Repeat for each mailbox the proxy serves; the app reaches no other.");
    } else {
        g.step("Allow the device code sign-in.");
        g.say(&format!("{app} > Authentication > Advanced settings > Allow public client flows: Yes"));
        g.say("(without it Entra answers AADSTS7000218). No client secret is needed.");

        g.step("Give it the delegated permissions, and consent.");
        g.say(&format!("{app} > API permissions > Add a permission > Microsoft Graph > Delegated permissions:"));
        g.run(&format!("{}, offline_access", permissions.join(", ")));
        g.say(&format!(
            "then Grant admin consent for {} (or each user consents when signing in; else AADSTS65001).",
            r.tenant
        ));

        g.step("Only if it is a shared mailbox: give it to the user who will sign in.");
        g.say("In Exchange Online PowerShell:");
        for line in cmd::ps_connect(&ids) {
            g.run(&line);
        }
        g.run(&cmd::ps_full_access(&ids, &mailbox, Some("<SIGNING_IN_USER>")));
        if protocols.contains(&Protocol::Smtp) {
            g.run(&cmd::ps_send_as(&ids, &mailbox, Some("<SIGNING_IN_USER>")));
            g.say(
                "and add `smtp_user: <SIGNING_IN_USER>` to the account: SMTP AUTH logs in only as the token's owner.",
            );
        }
    }

    g.step("Switch the protocols on for the mailbox.");
    if app_only {
        g.say("In the same PowerShell session:");
    } else {
        g.say("In Exchange Online PowerShell:");
    }
    for p in &protocols {
        g.run(&cmd::ps_enable_protocol(*p, &mailbox));
    }
    if protocols.contains(&Protocol::Smtp) {
        g.say("SMTP AUTH can also be off for the whole tenant; the mailbox setting above wins over it. To see:");
        g.run(cmd::PS_SHOW_SMTP_AUTH_TENANT);
    }

    g.step("Hash the password the legacy client will type.");
    g.run("xoauth2-proxy hash-password");

    g.step(&format!("Configure the proxy: {}", r.config));
    g.run("listeners:");
    for p in &protocols {
        let (bind, upstream) = listener(*p);
        g.run(&format!("  - name: {p}"));
        g.run(&format!("    protocol: {p}"));
        g.run(&format!("    bind: {bind}"));
        g.run(&format!("    upstream: {upstream}"));
    }
    g.run("identities:");
    g.run(&format!("  {identity}:"));
    g.run(&format!("    tenant: {}", r.tenant));
    g.run(&format!("    client_id: {}", r.client_id.as_deref().unwrap_or(APP_ID_PLACEHOLDER)));
    if app_only {
        match r.credential {
            AppCredential::Secret => g.run(&format!("    client_secret_file: {dir}/client-secret")),
            AppCredential::Certificate => {
                g.run(&format!("    certificate: {{ cert_file: {dir}/app.pem, key_file: {dir}/app-key.pem }}"))
            }
        }
    } else {
        g.run("    flow: refresh_token");
        let scopes: Vec<String> = permissions.iter().map(|p| format!("https://outlook.office.com/{p}")).collect();
        g.run(&format!("    scope: {} offline_access", scopes.join(" ")));
    }
    g.run("accounts:");
    g.run(&format!("  - username: {username}"));
    g.run("    password_hash: \"<the hash-password output>\"");
    g.run(&format!("    mailbox: {}", r.mailbox.as_deref().unwrap_or(MAILBOX_PLACEHOLDER)));
    g.run(&format!("    identity: {identity}"));
    if !app_only {
        g.run("token_store:");
        g.run("  path: /var/lib/xoauth2-proxy");
    }

    if app_only {
        g.step("Check every step against Entra and Exchange; a failing one says why and what to type.");
        g.run(&ids.check_command());
    } else {
        g.step("Check the configuration.");
        g.run(&format!("xoauth2-proxy check -c {}", r.config));
        g.step(&format!(
            "Sign in once, as {mailbox} (for a shared mailbox: the user above), from any browser; then `sudo -u {SERVICE_USER} xoauth2-proxy check --online -c {}` tests every step.",
            r.config
        ));
        // The store belongs to the service user: `login` writes it as that user.
        g.run(&format!("sudo -u {SERVICE_USER} xoauth2-proxy login -c {} {username}", r.config));
    }
    g.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(flow: Flow, protocols: &[Protocol]) -> Request {
        Request {
            flow,
            protocols: protocols.to_vec(),
            tenant: "contoso.onmicrosoft.com".into(),
            client_id: Some("11111111-2222-3333-4444-555555555555".into()),
            mailbox: Some("scanner@contoso.com".into()),
            credential: AppCredential::Secret,
            config: "/etc/xoauth2-proxy/config.yaml".into(),
        }
    }

    #[test]
    fn app_only_steps_follow_the_protocols() {
        let text = guide(&request(Flow::ClientCredentials, &[Protocol::Smtp, Protocol::Imap]));
        assert!(text.contains("       IMAP.AccessAsApp, SMTP.SendAsApp\n"), "{text}");
        assert!(!text.contains("POP"), "{text}");
        assert!(text.contains(
            "New-ServicePrincipal -AppId 11111111-2222-3333-4444-555555555555 -ObjectId <ENTERPRISE_APP_OBJECT_ID>"
        ));
        assert!(text.contains("WARNING: the Object ID on the App registration's Overview is another object"));
        assert!(text.contains("Set-CASMailbox -Identity \"scanner@contoso.com\" -ImapEnabled $true"));
        assert!(
            text.contains("Set-CASMailbox -Identity \"scanner@contoso.com\" -SmtpClientAuthenticationDisabled $false")
        );
        assert!(text.contains("client_secret_file: /etc/xoauth2-proxy/client-secret"));
        assert!(text.trim_end().ends_with("xoauth2-proxy check --online -c /etc/xoauth2-proxy/config.yaml"), "{text}");
        assert!(!text.contains("<ANGLE_BRACKETS>"), "every id was given");
    }

    #[test]
    fn the_delegated_guide_ends_with_login() {
        let text = guide(&request(Flow::RefreshToken, &[Protocol::Imap]));
        assert!(text.contains("Allow public client flows: Yes"));
        assert!(
            text.contains("Microsoft Graph > Delegated permissions:\n       IMAP.AccessAsUser.All, offline_access\n")
        );
        assert!(text.contains("scope: https://outlook.office.com/IMAP.AccessAsUser.All offline_access"));
        assert!(!text.contains("New-ServicePrincipal"));
        assert!(text.trim_end().ends_with("xoauth2-proxy login -c /etc/xoauth2-proxy/config.yaml scanner"), "{text}");
    }

    #[test]
    fn unknown_ids_are_placeholders_and_said_so() {
        let mut r = request(Flow::ClientCredentials, &[Protocol::Pop3]);
        r.client_id = None;
        r.mailbox = None;
        r.tenant = "5f4c7a1e-2b3d-4e6f-8a9b-0c1d2e3f4a5b".into();
        let text = guide(&r);
        assert!(text.contains("run setup again with --client-id and --mailbox"));
        assert!(text.contains("client_id: <APPLICATION_ID>") && text.contains("mailbox: <MAILBOX>"));
        assert!(text.contains("  entra:"), "a tenant ID gives a neutral identity name");
    }
}
