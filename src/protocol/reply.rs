//! The one table from failure kind to wire reply (DESIGN.md "What a client
//! sees on errors"). Session code raises a [`Failure`]; nothing else writes
//! an error reply by hand.

/// Why a client request did not succeed, independent of protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Wrong local username or password, or the upstream refused the token
    /// even after one retry with a fresh token.
    AuthFailed,
    /// The token endpoint is down or slow, or the upstream answered with a
    /// temporary failure (throttling). The client should retry later.
    Temporary,
    /// The upstream is unreachable or its TLS failed. Ends the session.
    Unavailable,
    /// A command line exceeded the pre-auth limit.
    LineTooLong,
    /// A command we cannot parse or do not know.
    Syntax,
    /// A command that needs an authenticated session (MAIL, SELECT, STAT...).
    AuthFirst,
    /// The client response to a SASL challenge could not be decoded.
    SaslMalformed,
    /// The client cancelled a SASL exchange with `*`.
    SaslCancelled,
    /// A SASL mechanism other than PLAIN or LOGIN.
    UnsupportedMechanism,
    /// Authentication attempted before TLS on a listener that requires it.
    TlsRequired,
    /// Authentication attempted in the clear where that is not allowed.
    PlaintextDisabled,
    /// The client was silent for longer than the pre-auth timeout. Ends the session.
    Timeout,
    /// Too many failed authentications on this connection. Ends the session.
    TooManyFailures,
    /// The client's address or the listener is over a connection limit. Ends the session.
    TooManyConnections,
    /// The mailbox already has as many upstream sessions as allowed.
    MailboxBusy,
    /// STARTTLS when it is not offered (not configured, or already TLS).
    StartTlsUnavailable,
    /// Bytes pipelined after STARTTLS, before the handshake: a command
    /// injection attempt. Ends the session.
    StartTlsInjection,
    /// The proxy is shutting down. Ends the session.
    ShuttingDown,
    /// Too many refused commands before login. Ends the session.
    TooManyErrors,
    /// Plain text (or nothing) on a listener that expects TLS from the first
    /// byte: the client is set to the wrong mode. Ends the session.
    TlsExpected,
    /// The proxy itself ran out of descriptors or memory (not the upstream's
    /// fault). Ends the session.
    ProxyResources,
}

impl Failure {
    /// Every kind, for tests that must cover the whole table.
    pub const ALL: [Failure; 21] = [
        Failure::AuthFailed,
        Failure::Temporary,
        Failure::Unavailable,
        Failure::LineTooLong,
        Failure::Syntax,
        Failure::AuthFirst,
        Failure::SaslMalformed,
        Failure::SaslCancelled,
        Failure::UnsupportedMechanism,
        Failure::TlsRequired,
        Failure::PlaintextDisabled,
        Failure::Timeout,
        Failure::TooManyFailures,
        Failure::TooManyConnections,
        Failure::MailboxBusy,
        Failure::StartTlsUnavailable,
        Failure::StartTlsInjection,
        Failure::ShuttingDown,
        Failure::TooManyErrors,
        Failure::TlsExpected,
        Failure::ProxyResources,
    ];

    /// Whether the session ends after this reply.
    pub fn closes_session(self) -> bool {
        matches!(
            self,
            Failure::Unavailable
                | Failure::Timeout
                | Failure::TooManyFailures
                | Failure::TooManyConnections
                | Failure::StartTlsInjection
                | Failure::ShuttingDown
                | Failure::TooManyErrors
                | Failure::TlsExpected
                | Failure::ProxyResources
        )
    }

    /// A short reason for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::AuthFailed => "authentication failed",
            Failure::Temporary => "temporary failure",
            Failure::Unavailable => "upstream unavailable",
            Failure::LineTooLong => "line too long",
            Failure::Syntax => "syntax error",
            Failure::AuthFirst => "command before authentication",
            Failure::SaslMalformed => "malformed SASL response",
            Failure::SaslCancelled => "SASL exchange cancelled",
            Failure::UnsupportedMechanism => "unsupported SASL mechanism",
            Failure::TlsRequired => "TLS required",
            Failure::PlaintextDisabled => "plaintext authentication disabled",
            Failure::Timeout => "timeout",
            Failure::TooManyFailures => "too many authentication failures",
            Failure::TooManyConnections => "too many connections",
            Failure::MailboxBusy => "too many sessions for this mailbox",
            Failure::StartTlsUnavailable => "STARTTLS not offered",
            Failure::StartTlsInjection => "data pipelined after STARTTLS",
            Failure::ShuttingDown => "shutting down",
            Failure::TooManyErrors => "too many invalid commands",
            Failure::TlsExpected => "TLS expected from the first byte",
            Failure::ProxyResources => "proxy out of resources",
        }
    }
}

/// The reply for `failure` in `protocol`'s syntax (IMAP untagged unless `tag`).
pub fn for_protocol(protocol: super::Protocol, failure: Failure, tag: Option<&str>) -> Vec<u8> {
    struct Render<'a>(Failure, Option<&'a str>);
    impl super::WithSpec for Render<'_> {
        type Output = Vec<u8>;
        fn call<P: super::Spec>(self) -> Vec<u8> {
            let mut out = Vec::new();
            <P::Dialect as super::Dialect>::failure(self.0, self.1, &mut out);
            out
        }
    }
    protocol.with(Render(failure, tag))
}

/// SMTP replies (RFC 5321, enhanced codes per RFC 3463 / RFC 4954).
pub fn smtp(failure: Failure) -> &'static [u8] {
    match failure {
        Failure::AuthFailed => b"535 5.7.8 Authentication credentials invalid\r\n",
        Failure::Temporary => b"454 4.7.0 Temporary authentication failure, try again later\r\n",
        Failure::Unavailable => b"421 4.4.2 Upstream mail server unavailable, closing connection\r\n",
        Failure::LineTooLong => b"500 5.5.2 Line too long\r\n",
        Failure::Syntax => b"500 5.5.2 Syntax error, command unrecognized\r\n",
        Failure::AuthFirst => b"530 5.7.0 Authentication required\r\n",
        Failure::SaslMalformed => b"501 5.5.2 Cannot decode authentication response\r\n",
        Failure::SaslCancelled => b"501 5.0.0 Authentication cancelled\r\n",
        Failure::UnsupportedMechanism => b"504 5.5.4 Unrecognized authentication type\r\n",
        Failure::TlsRequired => b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
        Failure::PlaintextDisabled => b"538 5.7.11 Plaintext authentication disabled, use TLS\r\n",
        Failure::Timeout => b"421 4.4.2 Timeout, closing connection\r\n",
        Failure::TooManyFailures => b"421 4.7.0 Too many failed authentication attempts, closing connection\r\n",
        Failure::TooManyConnections => b"421 4.7.0 Too many connections, try again later\r\n",
        Failure::MailboxBusy => b"454 4.7.0 Too many concurrent sessions for this mailbox, try again later\r\n",
        Failure::StartTlsUnavailable => b"454 4.7.0 TLS not available\r\n",
        Failure::StartTlsInjection => {
            b"421 4.7.0 Data sent after STARTTLS before the TLS handshake, closing connection\r\n"
        }
        Failure::ShuttingDown => b"421 4.3.2 Service shutting down, closing connection\r\n",
        Failure::TooManyErrors => b"421 4.7.0 Too many invalid commands, closing connection\r\n",
        Failure::TlsExpected => b"421 4.7.0 This port expects TLS from the first byte: set the client to SSL/TLS\r\n",
        Failure::ProxyResources => b"421 4.3.0 Proxy out of resources, try again later\r\n",
    }
}

/// POP3 replies (RFC 1939, response codes per RFC 2449 / RFC 3206).
pub fn pop3(failure: Failure) -> &'static [u8] {
    match failure {
        Failure::AuthFailed => b"-ERR [AUTH] Authentication failed\r\n",
        Failure::Temporary => b"-ERR [SYS/TEMP] Temporary authentication failure, try again later\r\n",
        Failure::Unavailable => b"-ERR [SYS/TEMP] Upstream mail server unavailable\r\n",
        Failure::LineTooLong => b"-ERR Line too long\r\n",
        Failure::Syntax => b"-ERR Unknown command\r\n",
        Failure::AuthFirst => b"-ERR Authenticate first\r\n",
        Failure::SaslMalformed => b"-ERR Cannot decode authentication response\r\n",
        Failure::SaslCancelled => b"-ERR Authentication cancelled\r\n",
        Failure::UnsupportedMechanism => b"-ERR Unsupported authentication mechanism\r\n",
        Failure::TlsRequired => b"-ERR Authentication requires TLS, use STLS first\r\n",
        Failure::PlaintextDisabled => b"-ERR [AUTH] Plaintext authentication disabled, use TLS\r\n",
        Failure::Timeout => b"-ERR Timeout, closing connection\r\n",
        Failure::TooManyFailures => b"-ERR [AUTH] Too many authentication failures, closing connection\r\n",
        Failure::TooManyConnections => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
        Failure::MailboxBusy => b"-ERR [IN-USE] Too many concurrent sessions for this mailbox\r\n",
        Failure::StartTlsUnavailable => b"-ERR STLS not available\r\n",
        Failure::StartTlsInjection => b"-ERR Data sent after STLS before the TLS handshake\r\n",
        Failure::ShuttingDown => b"-ERR [SYS/TEMP] Server shutting down\r\n",
        Failure::TooManyErrors => b"-ERR Too many invalid commands, closing connection\r\n",
        Failure::TlsExpected => b"-ERR This port expects TLS from the first byte: set the client to SSL/TLS\r\n",
        Failure::ProxyResources => b"-ERR [SYS/TEMP] Proxy out of resources, try again later\r\n",
    }
}

/// IMAP replies (RFC 9051, response codes per RFC 5530). Failures that end
/// the session are an untagged BYE; the others answer the command's tag, or
/// are untagged when the command had no usable tag.
pub fn imap(failure: Failure, tag: Option<&str>, out: &mut Vec<u8>) {
    let (kind, text): (&str, &str) = match failure {
        Failure::AuthFailed => ("NO", "[AUTHENTICATIONFAILED] Authentication failed"),
        Failure::Temporary => ("NO", "[UNAVAILABLE] Temporary authentication failure, try again later"),
        Failure::Unavailable => ("BYE", "[UNAVAILABLE] Upstream mail server unavailable"),
        Failure::LineTooLong => ("BAD", "[TOOBIG] Line too long"),
        Failure::Syntax => ("BAD", "Syntax error or unknown command"),
        Failure::AuthFirst => ("BAD", "Command not allowed before authentication, log in first"),
        Failure::SaslMalformed => ("BAD", "Cannot decode authentication response"),
        Failure::SaslCancelled => ("BAD", "Authentication cancelled"),
        Failure::UnsupportedMechanism => ("NO", "[CANNOT] Unsupported authentication mechanism"),
        Failure::TlsRequired => ("NO", "[PRIVACYREQUIRED] Authentication requires TLS, use STARTTLS first"),
        Failure::PlaintextDisabled => ("NO", "[PRIVACYREQUIRED] Plaintext authentication disabled, use TLS"),
        Failure::Timeout => ("BYE", "Autologout, idle for too long"),
        Failure::TooManyFailures => ("BYE", "Too many authentication failures"),
        Failure::TooManyConnections => ("BYE", "[UNAVAILABLE] Too many connections, try again later"),
        Failure::MailboxBusy => ("NO", "[INUSE] Too many concurrent sessions for this mailbox"),
        Failure::StartTlsUnavailable => ("BAD", "STARTTLS not available"),
        Failure::StartTlsInjection => ("BYE", "Data sent after STARTTLS before the TLS handshake"),
        Failure::ShuttingDown => ("BYE", "[UNAVAILABLE] Server shutting down"),
        Failure::TooManyErrors => ("BYE", "Too many invalid commands"),
        Failure::TlsExpected => ("BYE", "This port expects TLS from the first byte: set the client to SSL/TLS"),
        Failure::ProxyResources => ("BYE", "[UNAVAILABLE] Proxy out of resources, try again later"),
    };
    let tag = match (kind, tag) {
        ("BYE", _) | (_, None) => "*",
        (_, Some(tag)) => tag,
    };
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(kind.as_bytes());
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imap_line(f: Failure, tag: Option<&str>) -> String {
        let mut out = Vec::new();
        imap(f, tag, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// The DESIGN.md error table, row by row.
    #[test]
    fn design_error_table() {
        let rows = [
            (Failure::AuthFailed, "535 5.7.8", "a NO [AUTHENTICATIONFAILED]", "-ERR [AUTH]"),
            (Failure::Temporary, "454 4.7.0", "a NO [UNAVAILABLE]", "-ERR [SYS/TEMP]"),
            (Failure::Unavailable, "421 4.4.2", "* BYE [UNAVAILABLE]", "-ERR [SYS/TEMP]"),
            (Failure::LineTooLong, "500 5.5.2", "* BAD", "-ERR"),
            (Failure::Syntax, "500 5.5.2", "a BAD", "-ERR"),
            (Failure::AuthFirst, "530 5.7.0", "a BAD", "-ERR"),
        ];
        for (failure, smtp_prefix, imap_prefix, pop_prefix) in rows {
            let tag = if failure == Failure::LineTooLong { None } else { Some("a") };
            assert!(String::from_utf8_lossy(smtp(failure)).starts_with(smtp_prefix), "{failure:?}");
            assert!(imap_line(failure, tag).starts_with(imap_prefix), "{failure:?}");
            assert!(String::from_utf8_lossy(pop3(failure)).starts_with(pop_prefix), "{failure:?}");
        }
    }

    #[test]
    fn every_reply_is_one_crlf_terminated_line() {
        for f in Failure::ALL {
            for line in [smtp(f).to_vec(), pop3(f).to_vec(), imap_line(f, Some("t1")).into_bytes()] {
                assert!(line.ends_with(b"\r\n"));
                assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            }
            // 421 and BYE are exactly the replies after which the server hangs up.
            assert_eq!(smtp(f).starts_with(b"421"), f.closes_session(), "{f:?}");
            assert_eq!(imap_line(f, Some("t1")).starts_with("* BYE"), f.closes_session(), "{f:?}");
        }
    }
}
