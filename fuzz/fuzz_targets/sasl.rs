#![no_main]
//! SASL decoding: PLAIN and LOGIN exchanges fed arbitrary lines.

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::sasl::{self, Mechanism, ServerExchange, Step};

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };
    let _ = sasl::plain::decode(input);
    let _ = sasl::decode_base64(input);
    let _ = sasl::xoauth2::describe_error_challenge(input);
    let mechanism = if control & 1 == 0 { Mechanism::Plain } else { Mechanism::Login };
    let mut lines = input.split(|&b| b == b'\n');
    let initial = if control & 2 == 0 { None } else { lines.next() };
    let Ok((mut exchange, mut step)) = ServerExchange::start(mechanism, initial) else { return };
    for line in lines {
        match step {
            Step::Done(credentials) => {
                assert!(!credentials.username.is_empty() && !credentials.password.expose().is_empty());
                return;
            }
            Step::Challenge(_) => match exchange.respond(line) {
                Ok(next) => step = next,
                Err(_) => return,
            },
        }
    }
});
