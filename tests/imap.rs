//! IMAP through the proxy: LOGIN in all its syntaxes, AUTHENTICATE PLAIN and
//! LOGIN, capability rewriting, and each row of the error table.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;
use testkit::{Fault, Proto, UpstreamOptions, UpstreamTls};
use tokio::net::TcpStream;

const REWRITTEN: &str = "IMAP4rev1 SASL-IR";

async fn greeting(c: &mut TestClient<TcpStream>) -> String {
    c.expect("* OK [CAPABILITY ").await
}

/// After a successful login the session is spliced to the echo upstream.
async fn assert_spliced(c: &mut TestClient<TcpStream>) {
    c.send("z1 SELECT INBOX\r\n").await;
    assert_eq!(c.line().await, "z1 SELECT INBOX");
}

#[tokio::test]
async fn exchange_greeting_gets_capabilities_rewritten() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    let g = greeting(&mut c).await;
    for cap in ["IMAP4rev1", "LITERAL+", "ID", "IDLE", "UIDPLUS", "CHILDREN", "SASL-IR", "AUTH=PLAIN", "AUTH=LOGIN"] {
        assert!(g.split([' ', '[', ']']).any(|w| w == cap), "{cap} missing from {g}");
    }
    assert!(!g.contains("XOAUTH2") && !g.contains("OAUTHBEARER") && !g.contains("LOGINDISABLED"), "{g}");
    c.send("c1 CAPABILITY\r\n").await;
    let caps = c.expect("* CAPABILITY IMAP4rev1 ").await;
    assert!(caps.ends_with("AUTH=PLAIN AUTH=LOGIN"), "{caps}");
    c.expect("c1 OK").await;
    let _ = REWRITTEN;
}

#[tokio::test]
async fn login_with_atoms_and_rewritten_ok_capabilities() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send("a1 LOGIN app app-pass\r\n").await;
    let ok = c.expect("a1 OK [CAPABILITY ").await;
    assert!(ok.contains("IDLE") && ok.contains("MOVE") && !ok.contains("XOAUTH2"), "{ok}");
    assert_spliced(&mut c).await;
    assert_eq!(h.imap.logins(), [SHARED_MAILBOX]);
}

#[tokio::test]
async fn login_with_quoted_strings_and_escapes() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send(format!("a1 LOGIN \"printer\" \"{}\"\r\n", PRINTER_PASSWORD)).await;
    c.expect("a1 OK").await;
    assert_eq!(h.imap.logins(), [MAILBOX]);
}

#[tokio::test]
async fn login_with_synchronizing_literals() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send("a1 LOGIN {7}\r\n").await;
    c.expect("+ ").await;
    c.send(format!("printer {{{}}}\r\n", PRINTER_PASSWORD.len())).await;
    c.expect("+ ").await;
    c.send(format!("{PRINTER_PASSWORD}\r\n")).await;
    c.expect("a1 OK").await;
    assert_spliced(&mut c).await;
}

#[tokio::test]
async fn login_with_non_synchronizing_literals_in_one_write() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send(format!("a1 LOGIN {{7+}}\r\nprinter {{{}+}}\r\n{PRINTER_PASSWORD}\r\n", PRINTER_PASSWORD.len())).await;
    c.expect("a1 OK").await;
    assert_spliced(&mut c).await;
}

#[tokio::test]
async fn authenticate_plain_with_sasl_ir_and_with_continuation() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send(format!("a1 AUTHENTICATE PLAIN {}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("a1 OK").await;

    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send("a2 AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(format!("{}\r\n", plain("printer", PRINTER_PASSWORD))).await;
    c.expect("a2 OK").await;
    assert_spliced(&mut c).await;
    assert_eq!(h.imap.logins().len(), 2);
}

#[tokio::test]
async fn authenticate_login() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send("a1 AUTHENTICATE LOGIN\r\n").await;
    assert_eq!(c.line().await, "+ VXNlcm5hbWU6");
    c.send(format!("{}\r\n", b64(b"printer"))).await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(format!("{}\r\n", b64(PRINTER_PASSWORD.as_bytes()))).await;
    c.expect("a1 OK").await;
}

#[tokio::test]
async fn upstream_without_sasl_ir_gets_the_continuation_form() {
    let mut imap = UpstreamOptions::new(Proto::Imap);
    imap.sasl_ir = false;
    imap.greeting_capabilities = true;
    let h = Harness::with(Options { imap, ..Options::default() }).await;
    let mut c = h.connect("imap").await;
    let g = greeting(&mut c).await;
    assert!(g.contains("SASL-IR AUTH=PLAIN"), "{g}");
    c.send("a1 LOGIN printer \"s3cret pass\"\r\n").await;
    c.expect("a1 OK").await;
    assert_eq!(h.imap.logins(), [MAILBOX]);
}

#[tokio::test]
async fn upstream_with_starttls() {
    let mut imap = UpstreamOptions::new(Proto::Imap);
    imap.tls = UpstreamTls::Starttls;
    imap.greeting_capabilities = true;
    let h = Harness::with(Options { imap, ..Options::default() }).await;
    let mut c = h.connect("imap").await;
    let g = greeting(&mut c).await;
    assert!(!g.contains("STARTTLS") && !g.contains("LOGINDISABLED"), "{g}");
    c.send("a1 LOGIN app app-pass\r\n").await;
    c.expect("a1 OK").await;
    assert_spliced(&mut c).await;
}

#[tokio::test]
async fn commands_before_login_get_authenticate_first() {
    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send("s1 SELECT INBOX\r\ns2 UID FETCH 1:* (FLAGS)\r\ns3 NOOP\r\n").await;
    c.expect("s1 BAD").await;
    c.expect("s2 BAD").await;
    c.expect("s3 OK").await;
    c.send("i1 ID (\"name\" \"test\")\r\n").await;
    c.expect("* ID ").await;
    c.expect("i1 OK").await;
    c.send("l1 LOGOUT\r\n").await;
    c.expect("* BYE").await;
    c.expect("l1 OK").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn error_rows() {
    let h = Harness::start().await;
    let login = format!("t LOGIN printer \"{PRINTER_PASSWORD}\"\r\n");

    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send("t LOGIN printer wrong\r\n").await;
    c.expect("t NO [AUTHENTICATIONFAILED]").await;
    assert_eq!(h.token.requests(), 0);

    h.imap.set_temporary_failure(true);
    c.send(&login).await;
    c.expect("t NO [UNAVAILABLE]").await;
    h.imap.set_temporary_failure(false);

    h.imap.set_refuse_all(true);
    c.send(&login).await;
    c.expect("t NO [AUTHENTICATIONFAILED]").await;
    assert_eq!(h.imap.auth_attempts(), 3, "temporary once, refused twice (one retry)");
    h.imap.set_refuse_all(false);
    // Temporary failures do not count towards the limit; the third refusal does.
    c.send("t LOGIN printer wrong\r\n").await;
    c.expect("t NO [AUTHENTICATIONFAILED]").await;
    c.expect("* BYE").await;
    assert!(c.closed().await);

    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send(format!("t LOGIN {} x\r\n", "u".repeat(10_000))).await;
    c.expect("* BAD").await;
    c.send("no-command-here\r\n").await;
    c.expect("no-command-here BAD").await;
    c.send(&login).await;
    c.expect("t OK").await;

    // The token endpoint down: a temporary failure (and, for the backoff
    // that follows, for every login until it ends).
    let h = Harness::start().await;
    h.token.set_fault(Some(Fault::Status(500)));
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    c.send(&login).await;
    c.expect("t NO [UNAVAILABLE]").await;
}

#[tokio::test]
async fn upstream_unreachable_is_bye_unavailable() {
    let mut options = Options::default();
    options.upstream_override.insert("imap", closed_port().await);
    let h = Harness::with(options).await;
    let mut c = h.connect("imap").await;
    c.expect("* BYE [UNAVAILABLE]").await;
    assert!(c.closed().await);

    let h = Harness::start().await;
    let mut c = h.connect("imap").await;
    greeting(&mut c).await;
    h.imap.stop();
    c.send(format!("t LOGIN printer \"{PRINTER_PASSWORD}\"\r\n")).await;
    c.expect("* BYE [UNAVAILABLE]").await;
    assert!(c.closed().await);
}
