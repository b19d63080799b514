//! IMAP (RFC 3501 / RFC 9051): the local pre-auth dialogue and the upstream
//! response parser.

pub mod client;
pub mod command;
pub mod server;

pub use client::{ImapClient, ImapSuccess, Response, ResponseReader, Status};
pub use server::ImapServer;

use super::SessionOptions;

/// Capabilities the proxy controls itself; the upstream's versions are removed.
fn is_auth_related(cap: &str) -> bool {
    let upper = cap.to_ascii_uppercase();
    upper.starts_with("AUTH=") || upper == "LOGINDISABLED" || upper == "STARTTLS" || upper == "SASL-IR"
}

/// What the client is told before login: the upstream's capabilities with the
/// authentication part rewritten to what the proxy accepts.
pub fn preauth_capabilities(upstream: &[String], opts: &SessionOptions) -> String {
    let mut caps: Vec<&str> = upstream.iter().map(String::as_str).filter(|c| !is_auth_related(c)).collect();
    if !caps.iter().any(|c| c.eq_ignore_ascii_case("IMAP4rev1") || c.eq_ignore_ascii_case("IMAP4rev2")) {
        caps.insert(0, "IMAP4rev1");
    }
    if opts.offer_starttls() {
        caps.push("STARTTLS");
    }
    if opts.auth_refusal().is_some() {
        caps.push("LOGINDISABLED");
    } else {
        caps.extend(["SASL-IR", "AUTH=PLAIN", "AUTH=LOGIN"]);
    }
    caps.join(" ")
}

/// What the client is told after login: the upstream's list without any
/// mechanism the client could not use through us.
pub fn postauth_capabilities(upstream: &str) -> String {
    upstream.split(' ').filter(|c| !c.is_empty() && !is_auth_related(c)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::plain_options;

    fn caps(list: &str) -> Vec<String> {
        list.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn preauth_rewrite_keeps_extensions_and_replaces_auth() {
        let upstream = caps(
            "IMAP4rev1 IDLE UIDPLUS LITERAL+ ID STARTTLS AUTH=XOAUTH2 AUTH=OAUTHBEARER SASL-IR LOGINDISABLED CHILDREN",
        );
        assert_eq!(
            preauth_capabilities(&upstream, &plain_options()),
            "IMAP4rev1 IDLE UIDPLUS LITERAL+ ID CHILDREN SASL-IR AUTH=PLAIN AUTH=LOGIN"
        );
    }

    #[test]
    fn preauth_rewrite_follows_tls_policy() {
        let upstream = caps("IMAP4rev1 IDLE");
        let mut opts = plain_options();
        opts.starttls = true;
        opts.require_tls = true;
        assert_eq!(preauth_capabilities(&upstream, &opts), "IMAP4rev1 IDLE STARTTLS LOGINDISABLED");
        opts.tls_active = true;
        assert_eq!(preauth_capabilities(&upstream, &opts), "IMAP4rev1 IDLE SASL-IR AUTH=PLAIN AUTH=LOGIN");
        assert_eq!(preauth_capabilities(&[], &opts), "IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=LOGIN");
    }

    #[test]
    fn postauth_rewrite() {
        assert_eq!(postauth_capabilities("IMAP4rev1 IDLE AUTH=XOAUTH2 MOVE  UIDPLUS"), "IMAP4rev1 IDLE MOVE UIDPLUS");
    }
}
