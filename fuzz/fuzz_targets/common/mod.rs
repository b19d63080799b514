//! Drives a pre-auth state machine with arbitrary client bytes, the way the
//! session driver does, and checks what must hold whatever the input.

use bytes::BytesMut;
use xoauth2_proxy::protocol::{Dialect, Failure, Next, PreAuth, SessionOptions};

pub fn options(max_line: usize) -> SessionOptions {
    SessionOptions {
        max_line,
        max_auth_failures: 3,
        max_bad_commands: 10,
        starttls: true,
        tls_active: false,
        require_tls: false,
        plaintext_allowed: true,
        auth_equals_line: false,
    }
}

/// The first byte picks the chunk size and how logins end; the rest is what
/// the client sends.
pub fn drive<D: Dialect>(mut machine: PreAuth<D>, data: &[u8], max_line: usize, success: impl Fn() -> D::Success) {
    let Some((&control, input)) = data.split_first() else { return };
    let chunk = 1 + (control & 0x3f) as usize;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    machine.greeting(&mut out);
    let mut logins = 0u32;
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match machine.handle(&mut buf, &mut out) {
                Next::Read => break,
                Next::Authenticate(request) => {
                    assert!(!request.credentials.username.is_empty());
                    logins += 1;
                    if control & 0x80 != 0 && logins == 2 {
                        machine.auth_succeeded(&success(), &mut out);
                        return;
                    }
                    let failure = if control & 0x40 != 0 { Failure::Temporary } else { Failure::AuthFailed };
                    if let Next::Close = machine.auth_failed(failure, &mut out) {
                        return;
                    }
                }
                Next::StartTls => machine.tls_started(),
                Next::Close => return,
            }
        }
        // Unconsumed input is bounded: an endless line is discarded, not kept.
        assert!(buf.len() <= 2 * max_line + chunk + 2, "buffer grew to {}", buf.len());
        // Every reply is made of complete CRLF lines.
        assert!(out.is_empty() || out.ends_with(b"\r\n"));
        out.clear();
    }
}
