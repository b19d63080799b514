#![no_main]
//! What an upstream (or a man in the middle) can send before authentication.

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::{imap, pop3, smtp};

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };
    let chunk = 1 + (control & 0x3f) as usize;

    let mut reader = imap::ResponseReader::new(512);
    let mut replies = smtp::ReplyReader::new(512);
    let (mut ibuf, mut sbuf) = (BytesMut::new(), BytesMut::new());
    let (mut imap_ok, mut smtp_ok) = (true, true);
    for piece in input.chunks(chunk) {
        // After an error the proxy drops the connection: stop feeding that parser.
        if imap_ok {
            ibuf.extend_from_slice(piece);
        }
        if smtp_ok {
            sbuf.extend_from_slice(piece);
        }
        while imap_ok {
            match reader.next(&mut ibuf) {
                Ok(Some(imap::Response::Untagged(line))) => {
                    let _ = imap::client::capabilities(&line);
                }
                Ok(Some(imap::Response::Tagged { text, .. })) => {
                    let _ = imap::client::is_temporary(&text);
                    let _ = imap::client::capabilities(&text);
                }
                Ok(Some(imap::Response::Continuation(text))) => {
                    let _ = xoauth2_proxy::sasl::xoauth2::describe_error_challenge(&text);
                }
                Ok(None) => break,
                Err(_) => imap_ok = false,
            }
        }
        while smtp_ok {
            match replies.next(&mut sbuf) {
                Ok(Some(reply)) => {
                    let _ = reply.ehlo_keywords();
                    let _ = reply.summary();
                    assert!(reply.to_wire().ends_with(b"\r\n"));
                }
                Ok(None) => break,
                Err(_) => smtp_ok = false,
            }
        }
        // Whatever a parser has not consumed stays bounded.
        assert!(!imap_ok || ibuf.len() <= 2 * 512 + chunk + 2, "IMAP buffer grew to {}", ibuf.len());
        assert!(!smtp_ok || sbuf.len() <= 512 + chunk + 2, "SMTP buffer grew to {}", sbuf.len());
    }
    for line in input.split(|&b| b == b'\n') {
        if let Ok(pop3::Reply::Err(text)) = pop3::client::parse_reply(line) {
            let _ = pop3::client::is_temporary(&text);
        }
        let _ = pop3::client::multiline_item(line);
    }
});
