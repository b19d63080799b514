#![no_main]
#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::smtp::{Reply, SmtpServer, SmtpSuccess};

fuzz_target!(|data: &[u8]| {
    let caps: Vec<String> = ["SIZE 1000", "PIPELINING", "AUTH XOAUTH2", "STARTTLS"].map(String::from).to_vec();
    let server = SmtpServer::new(caps.into(), common::options(256));
    common::drive(server, data, 256, || SmtpSuccess { reply: Reply { code: 235, lines: vec![b"2.7.0 ok".to_vec()] } });
});
