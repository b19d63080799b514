//! Text from peers, made fit for a log line or an error message.

/// Renders bytes for a log line: printable ASCII as is, the rest escaped,
/// at most `max` bytes, so a peer cannot forge log lines.
pub fn printable(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &b in bytes.iter().take(max) {
        if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if bytes.len() > max {
        out.push_str("...");
    }
    out
}

/// Lower-case hex of `bytes`, for ids and digests that end up in names.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lower_case_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn control_bytes_are_escaped_and_length_capped() {
        assert_eq!(printable(b"250 ok", 100), "250 ok");
        assert_eq!(printable(b"a\r\nFAKE", 100), "a\\x0d\\x0aFAKE");
        assert_eq!(printable(b"\xff", 100), "\\xff");
        assert_eq!(printable(b"abcdef", 3), "abc...");
    }
}
