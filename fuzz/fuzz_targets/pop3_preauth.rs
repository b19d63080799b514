#![no_main]
#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::pop3::{Pop3Server, Pop3Success};

fuzz_target!(|data: &[u8]| {
    let caps: Vec<String> = ["TOP", "UIDL", "SASL XOAUTH2", "STLS"].map(String::from).to_vec();
    let server = Pop3Server::new(caps.into(), common::options(256));
    common::drive(server, data, 256, || Pop3Success { line: b"+OK".to_vec() });
});
