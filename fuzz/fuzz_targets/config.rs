#![no_main]
//! The config loader: YAML, ${VAR} expansion, typed deserialization, validation.

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::path::Path;
use xoauth2_proxy::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Parsing and validation never read the disk (file probes are the
    // preflight step's), so any path in the input is safe to fuzz.
    let env: HashMap<String, String> = [("SECRET".to_string(), "s".to_string())].into_iter().collect();
    if let Err(e) = Config::parse(text, Path::new("/nonexistent/fuzz.yaml"), &env) {
        // Every problem names the file.
        assert!(e.to_string().starts_with("/nonexistent/fuzz.yaml"));
    }
});
