//! POP3 (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH): the local pre-auth
//! dialogue and the upstream reply parser.

pub mod client;
pub mod server;

pub use client::{Pop3Client, Pop3Success, Reply};
pub use server::Pop3Server;

use super::SessionOptions;

/// The upstream's CAPA lines with the authentication part rewritten.
pub fn preauth_capabilities(upstream: &[String], opts: &SessionOptions) -> Vec<String> {
    let mut caps: Vec<String> = upstream
        .iter()
        .filter(|line| {
            let word = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            !matches!(word.as_str(), "SASL" | "STLS" | "USER")
        })
        .cloned()
        .collect();
    if opts.offer_starttls() {
        caps.push("STLS".into());
    }
    if opts.auth_refusal().is_none() {
        caps.push("USER".into());
        caps.push("SASL PLAIN LOGIN".into());
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::plain_options;

    #[test]
    fn capa_rewrite() {
        let upstream: Vec<String> =
            ["TOP", "UIDL", "SASL XOAUTH2 OAUTHBEARER", "USER", "STLS", "RESP-CODES", "AUTH-RESP-CODE"]
                .map(String::from)
                .to_vec();
        assert_eq!(
            preauth_capabilities(&upstream, &plain_options()),
            ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "USER", "SASL PLAIN LOGIN"]
        );
        let mut opts = plain_options();
        opts.starttls = true;
        opts.plaintext_allowed = false;
        assert_eq!(preauth_capabilities(&upstream, &opts), ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "STLS"]);
    }
}
