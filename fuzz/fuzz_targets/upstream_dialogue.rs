#![no_main]
//! What an upstream (or a man in the middle) can send to the proxy's own
//! dialogues — probe and XOAUTH2 login, implicit TLS or STARTTLS — for all
//! three protocols, driven the way the upstream driver drives them.

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::client::{Action, Goal, Login, Outcome};
use xoauth2_proxy::protocol::{imap, pop3, smtp, Dialogue};
use xoauth2_proxy::secret::Secret;

/// Feeds `input` in chunks of `chunk` bytes, as the driver does: a read per
/// `Read`, the handshake at `StartTls` (refused if bytes are left over).
fn run<D: Dialogue>(starttls: bool, goal: Goal, input: &[u8], chunk: usize) {
    let mut dialogue = D::new(starttls, goal);
    let mut buf = BytesMut::new();
    let mut pieces = input.chunks(chunk);
    let mut sends = 0usize;
    loop {
        match dialogue.step(&mut buf) {
            Ok(Action::Send(bytes)) => {
                assert!(bytes.ends_with(b"\r\n"), "every command is a CRLF line");
                sends += 1;
            }
            Ok(Action::SendSecret(line)) => {
                assert!(line.expose().ends_with(b"\r\n"));
                sends += 1;
            }
            Ok(Action::Read) => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => return,
            },
            Ok(Action::StartTls) => {
                if !buf.is_empty() {
                    return; // the driver refuses: possible injection
                }
                dialogue.tls_started();
            }
            Ok(Action::Done(outcome)) => {
                if let Outcome::Capabilities(caps) = outcome {
                    assert!(caps.len() <= 1024);
                }
                return;
            }
            Err(e) => {
                // Errors are text an admin can read: no raw control bytes.
                assert!(!e.to_string().bytes().any(|b| b < 0x20), "{e}");
                return;
            }
        }
        // A dialogue that keeps talking without reading is a loop.
        assert!(sends < 64, "too many commands without an answer");
        // What is not consumed stays bounded by the line limits.
        assert!(buf.len() <= 2 * 64 * 1024 + chunk + 2, "buffer grew to {}", buf.len());
    }
}

fn login() -> Goal {
    Goal::Login(Login {
        initial_response: Secret::new("dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==".into()),
        client_name: Some("client.example".into()),
        known_caps: vec!["IMAP4rev1".to_string(), "SASL-IR".to_string()].into(),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };
    let chunk = 1 + (control & 0x1f) as usize;
    let starttls = control & 0x20 != 0;
    let probe = control & 0x40 != 0;
    let goal = || if probe { Goal::Probe } else { login() };
    match control >> 7 {
        0 => {
            run::<imap::ImapClient>(starttls, goal(), input, chunk);
            run::<pop3::Pop3Client>(starttls, goal(), input, chunk);
        }
        _ => run::<smtp::SmtpClient>(starttls, goal(), input, chunk),
    }
});
