#![no_main]
//! The PROXY protocol header parser: arbitrary connection starts, parsed
//! whole and as the driver reads them (exactly the bytes asked for).

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::proxy::{parse, Progress, V1_MAX_LINE, V2_MAX_LEN};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    let mut have = 0;
    let driven = loop {
        match parse(&data[..have]) {
            Ok(Progress::Need(n)) => {
                assert!(n > 0, "asked for nothing");
                if have + n > data.len() {
                    break None;
                }
                have += n;
            }
            Ok(Progress::Done { header, len }) => {
                assert_eq!(len, have, "the driver read past the header");
                break Some(Ok((header, len)));
            }
            Err(e) => break Some(Err(e)),
        }
    };
    // Reading step by step decides as parsing everything at once does.
    match (&whole, driven) {
        (Ok(Progress::Done { header, len }), Some(Ok((h, l)))) => {
            assert_eq!((*header, *len), (h, l));
            assert!(*len <= V1_MAX_LINE.max(16 + V2_MAX_LEN));
        }
        (Ok(Progress::Done { .. }), other) => panic!("whole input done, driven {other:?}"),
        (Err(_), Some(Ok(_))) => panic!("whole input invalid, driven done"),
        (Ok(Progress::Need(_)), Some(Ok(_))) => panic!("whole input incomplete, driven done"),
        _ => {}
    }
});
