#![no_main]
#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::imap::{ImapServer, ImapSuccess};

fuzz_target!(|data: &[u8]| {
    let caps: Vec<String> = ["IMAP4rev1", "IDLE", "LITERAL+", "AUTH=XOAUTH2"].map(String::from).to_vec();
    let server = ImapServer::new(caps.into(), common::options(256));
    common::drive(server, data, 256, || ImapSuccess {
        untagged: vec![b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2".to_vec()],
        text: b"[CAPABILITY IMAP4rev1 IDLE] ok".to_vec(),
    });
});
