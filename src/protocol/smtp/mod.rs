//! SMTP (RFC 5321, AUTH per RFC 4954, STARTTLS per RFC 3207): the local
//! pre-auth dialogue and the upstream reply parser.

pub mod client;
pub mod server;

pub use client::{Reply, ReplyReader, SmtpClient, SmtpSuccess};
pub use server::SmtpServer;

use super::SessionOptions;

/// The upstream's EHLO keywords with the authentication part rewritten.
pub fn preauth_capabilities(upstream: &[String], opts: &SessionOptions) -> Vec<String> {
    let mut caps: Vec<String> = upstream
        .iter()
        .filter(|line| {
            let word = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            !(word == "AUTH" || word.starts_with("AUTH=") || word == "STARTTLS")
        })
        .cloned()
        .collect();
    if opts.offer_starttls() {
        caps.push("STARTTLS".into());
    }
    if opts.auth_refusal().is_none() {
        caps.push("AUTH PLAIN LOGIN".into());
        if opts.auth_equals_line {
            caps.push("AUTH=PLAIN LOGIN".into());
        }
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::plain_options;

    #[test]
    fn ehlo_rewrite_keeps_extensions() {
        let upstream: Vec<String> = [
            "SIZE 157286400",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "AUTH LOGIN XOAUTH2",
            "AUTH=LOGIN",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
            "STARTTLS",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            preauth_capabilities(&upstream, &plain_options()),
            [
                "SIZE 157286400",
                "PIPELINING",
                "DSN",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "BINARYMIME",
                "CHUNKING",
                "SMTPUTF8",
                "AUTH PLAIN LOGIN"
            ]
        );
        let mut opts = plain_options();
        opts.starttls = true;
        opts.require_tls = true;
        assert_eq!(preauth_capabilities(&upstream[..2], &opts), ["SIZE 157286400", "PIPELINING", "STARTTLS"]);
        // Outlook Express-era clients look for the `AUTH=` form, on request only.
        let mut opts = plain_options();
        opts.auth_equals_line = true;
        assert_eq!(
            preauth_capabilities(&upstream[..1], &opts),
            ["SIZE 157286400", "AUTH PLAIN LOGIN", "AUTH=PLAIN LOGIN"]
        );
        opts.plaintext_allowed = false;
        assert_eq!(preauth_capabilities(&upstream[..1], &opts), ["SIZE 157286400"]);
    }
}
