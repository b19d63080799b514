//! The admin's own ids, and the exact lines they paste: Exchange Online
//! PowerShell commands and Entra admin center paths. `check --online` writes
//! its fixes with these and `setup` its guide, so the two always agree.

use crate::config::Flow;
use crate::protocol::Protocol;

/// Shown where an id is not known yet.
pub const APP_ID_PLACEHOLDER: &str = "<APPLICATION_ID>";
pub const OBJECT_ID_PLACEHOLDER: &str = "<ENTERPRISE_APP_OBJECT_ID>";
pub const MAILBOX_PLACEHOLDER: &str = "<MAILBOX>";

/// How the app proves itself to the token endpoint, as far as fixes care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Secret,
    SecretFile(String),
    Certificate(String),
    None,
}

/// Everything a fix may name, from the config and from what the checks found.
#[derive(Debug, Clone)]
pub struct Ids {
    /// The config file, for commands such as `login -c FILE`.
    pub config: String,
    pub identity: String,
    /// As configured: a tenant ID or a domain.
    pub tenant: String,
    /// The directory (tenant) ID, once the discovery document or a token told it.
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub flow: Flow,
    pub credential: Credential,
    /// The Enterprise application's Object ID (an app-only token's `oid`).
    pub sp_object_id: Option<String>,
    /// The account's username, mailbox and SMTP user.
    pub account: Option<String>,
    pub mailbox: Option<String>,
    pub smtp_user: Option<String>,
    /// Delegated tokens: the user who signed in (`upn`).
    pub signed_in: Option<String>,
}

impl Ids {
    pub fn client_id(&self) -> &str {
        self.client_id.as_deref().unwrap_or(APP_ID_PLACEHOLDER)
    }

    pub fn mailbox(&self) -> &str {
        self.mailbox.as_deref().unwrap_or(MAILBOX_PLACEHOLDER)
    }

    pub fn smtp_user(&self) -> &str {
        self.smtp_user.as_deref().or(self.mailbox.as_deref()).unwrap_or(MAILBOX_PLACEHOLDER)
    }

    /// The user= of XOAUTH2 for a protocol.
    pub fn login_user(&self, protocol: Protocol) -> &str {
        match protocol {
            Protocol::Smtp => self.smtp_user(),
            Protocol::Imap | Protocol::Pop3 => self.mailbox(),
        }
    }

    pub fn app_only(&self) -> bool {
        self.flow == Flow::ClientCredentials
    }

    /// `xoauth2-proxy login` for this account.
    pub fn login_command(&self) -> String {
        format!("xoauth2-proxy login -c {} {}", self.config, self.account.as_deref().unwrap_or("<ACCOUNT>"))
    }

    pub fn check_command(&self) -> String {
        format!("xoauth2-proxy check --online -c {}", self.config)
    }
}

/// The permission each protocol needs: application (`roles`) or delegated (`scp`).
pub fn permission(protocol: Protocol, flow: Flow) -> &'static str {
    match (flow, protocol) {
        (Flow::ClientCredentials, Protocol::Imap) => "IMAP.AccessAsApp",
        (Flow::ClientCredentials, Protocol::Pop3) => "POP.AccessAsApp",
        (Flow::ClientCredentials, Protocol::Smtp) => "SMTP.SendAsApp",
        (Flow::RefreshToken, Protocol::Imap) => "IMAP.AccessAsUser.All",
        (Flow::RefreshToken, Protocol::Pop3) => "POP.AccessAsUser.All",
        (Flow::RefreshToken, Protocol::Smtp) => "SMTP.Send",
    }
}

/// How an Exchange Online PowerShell session starts (ExchangeOnlineManagement module).
pub fn ps_connect(ids: &Ids) -> Vec<String> {
    vec![
        "Install-Module -Name ExchangeOnlineManagement -Scope CurrentUser".into(),
        format!("Connect-ExchangeOnline -Organization {}", ids.tenant),
    ]
}

/// "In Exchange Online PowerShell (...)": where the lines after it go.
pub fn ps_where(ids: &Ids) -> String {
    format!("in Exchange Online PowerShell (Connect-ExchangeOnline -Organization {}):", ids.tenant)
}

pub fn ps_get_service_principal(ids: &Ids) -> String {
    format!("Get-ServicePrincipal -Identity {} | Format-List DisplayName,AppId,ObjectId", ids.client_id())
}

/// Registers the app in Exchange. The Object ID is the Enterprise
/// application's; the App Registration's is a different object.
pub fn ps_new_service_principal(ids: &Ids) -> String {
    format!(
        "New-ServicePrincipal -AppId {} -ObjectId {} -DisplayName \"xoauth2-proxy {}\"",
        ids.client_id(),
        ids.sp_object_id.as_deref().unwrap_or(OBJECT_ID_PLACEHOLDER),
        ids.identity
    )
}

pub fn ps_remove_service_principal(ids: &Ids) -> String {
    format!("Remove-ServicePrincipal -Identity {}", ids.client_id())
}

/// The Exchange service principal, as a parameter value (Microsoft's
/// example passes `.Identity` of Get-ServicePrincipal's result).
fn sp_ref(ids: &Ids) -> String {
    format!("(Get-ServicePrincipal -Identity {}).Identity", ids.client_id())
}

/// FullAccess on `mailbox` for the app (app-only) or for `user` (delegated).
pub fn ps_full_access(ids: &Ids, mailbox: &str, user: Option<&str>) -> String {
    match user {
        Some(user) => format!(
            "Add-MailboxPermission -Identity \"{mailbox}\" -User \"{user}\" -AccessRights FullAccess -AutoMapping $false"
        ),
        None => format!("Add-MailboxPermission -Identity \"{mailbox}\" -User {} -AccessRights FullAccess", sp_ref(ids)),
    }
}

/// Send As on `mailbox` for the app (app-only) or for `user` (delegated).
pub fn ps_send_as(ids: &Ids, mailbox: &str, user: Option<&str>) -> String {
    let trustee = match user {
        Some(user) => format!("\"{user}\""),
        None => sp_ref(ids),
    };
    format!("Add-RecipientPermission -Identity \"{mailbox}\" -Trustee {trustee} -AccessRights SendAs -Confirm:$false")
}

pub fn ps_get_mailbox_permission(mailbox: &str) -> String {
    format!("Get-MailboxPermission -Identity \"{mailbox}\" | Where-Object {{ $_.AccessRights -like '*FullAccess*' }}")
}

/// Turns the protocol on for one mailbox (IMAP and POP3 can be off per
/// mailbox; SMTP AUTH per mailbox or for the whole tenant).
pub fn ps_enable_protocol(protocol: Protocol, mailbox: &str) -> String {
    match protocol {
        Protocol::Imap => format!("Set-CASMailbox -Identity \"{mailbox}\" -ImapEnabled $true"),
        Protocol::Pop3 => format!("Set-CASMailbox -Identity \"{mailbox}\" -PopEnabled $true"),
        Protocol::Smtp => format!("Set-CASMailbox -Identity \"{mailbox}\" -SmtpClientAuthenticationDisabled $false"),
    }
}

pub fn ps_show_protocols(mailbox: &str) -> String {
    format!(
        "Get-CASMailbox -Identity \"{mailbox}\" | Format-List ImapEnabled,PopEnabled,SmtpClientAuthenticationDisabled"
    )
}

pub const PS_SMTP_AUTH_TENANT: &str = "Set-TransportConfig -SmtpClientAuthenticationDisabled $false";
pub const PS_SHOW_SMTP_AUTH_TENANT: &str = "Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled";

/// The app registration's page in the Entra admin center.
pub fn portal_app(ids: &Ids) -> String {
    format!("Entra admin center > App registrations > {}", ids.client_id())
}

/// Where an API permission is added: Exchange's application permissions are
/// under "APIs my organization uses", the delegated ones under Microsoft Graph.
pub fn portal_add_permission(ids: &Ids, permission: &str) -> String {
    let api = if ids.app_only() {
        "APIs my organization uses > Office 365 Exchange Online > Application permissions"
    } else {
        "Microsoft APIs > Microsoft Graph > Delegated permissions"
    };
    format!("{} > API permissions > Add a permission > {api} > {permission} > Add permissions", portal_app(ids))
}

pub fn portal_grant_consent(ids: &Ids) -> String {
    format!("{} > API permissions > Grant admin consent for {}", portal_app(ids), ids.tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Ids {
        Ids {
            config: "/etc/xoauth2-proxy/config.yaml".into(),
            identity: "contoso".into(),
            tenant: "contoso.onmicrosoft.com".into(),
            tenant_id: None,
            client_id: Some("11111111-2222-3333-4444-555555555555".into()),
            flow: Flow::ClientCredentials,
            credential: Credential::Secret,
            sp_object_id: Some("0c9f3a52-7d1e-4b8a-9e6f-2a4b6c8d0e1f".into()),
            account: Some("printer".into()),
            mailbox: Some("scanner@contoso.com".into()),
            smtp_user: None,
            signed_in: None,
        }
    }

    #[test]
    fn commands_carry_the_admins_ids() {
        let ids = ids();
        assert_eq!(
            ps_new_service_principal(&ids),
            "New-ServicePrincipal -AppId 11111111-2222-3333-4444-555555555555 -ObjectId 0c9f3a52-7d1e-4b8a-9e6f-2a4b6c8d0e1f -DisplayName \"xoauth2-proxy contoso\""
        );
        assert_eq!(
            ps_full_access(&ids, ids.mailbox(), None),
            "Add-MailboxPermission -Identity \"scanner@contoso.com\" -User (Get-ServicePrincipal -Identity 11111111-2222-3333-4444-555555555555).Identity -AccessRights FullAccess"
        );
        assert_eq!(ids.smtp_user(), "scanner@contoso.com", "smtp_user defaults to the mailbox");
        assert_eq!(ids.login_command(), "xoauth2-proxy login -c /etc/xoauth2-proxy/config.yaml printer");
    }

    #[test]
    fn unknown_ids_become_visible_placeholders() {
        let ids = Ids { client_id: None, sp_object_id: None, mailbox: None, ..ids() };
        let line = ps_new_service_principal(&ids);
        assert!(line.contains("-AppId <APPLICATION_ID> -ObjectId <ENTERPRISE_APP_OBJECT_ID>"), "{line}");
        assert!(ps_enable_protocol(Protocol::Imap, ids.mailbox()).contains("\"<MAILBOX>\""));
    }

    #[test]
    fn permissions_per_flow() {
        assert_eq!(permission(Protocol::Pop3, Flow::ClientCredentials), "POP.AccessAsApp");
        assert_eq!(permission(Protocol::Smtp, Flow::RefreshToken), "SMTP.Send");
        let delegated = Ids { flow: Flow::RefreshToken, ..ids() };
        assert!(portal_add_permission(&delegated, "SMTP.Send").contains("Microsoft Graph > Delegated permissions"));
        assert!(portal_add_permission(&ids(), "SMTP.SendAsApp").contains("Office 365 Exchange Online > Application"));
    }
}
