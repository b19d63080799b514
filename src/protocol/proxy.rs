//! The PROXY protocol header (HAProxy's `doc/proxy-protocol.txt`, versions 1
//! and 2) that a load balancer sends before the client's first byte, so the
//! proxy learns the client's real address.
//!
//! [`parse`] is pure and incremental: it looks at the bytes received so far
//! and answers "need at least N more", "done: this header, this many bytes",
//! or "invalid". The driver reads exactly the bytes asked for, so it never
//! reads past the header: whatever follows (a TLS ClientHello, a pipelined
//! command) stays in the socket for the session.
//!
//! Bounds: a version 1 line is at most 107 bytes including CRLF (the spec's
//! worst case); a version 2 header at most [`V2_MAX_LEN`] bytes after its
//! fixed 16 (addresses plus TLVs, which are skipped).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature (12 bytes) that starts every binary header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6
/// addresses and ports, section 2.1).
pub const V1_MAX_LINE: usize = 107;
/// The shortest version 1 line, "PROXY UNKNOWN\r\n": once the first byte says
/// version 1, the next read asks for the rest of this much.
const V1_MIN_LINE: usize = 15;
/// The fixed part of a version 2 header.
const V2_FIXED: usize = 16;
/// Most bytes accepted after a version 2 header's fixed part: 216 for the
/// largest address block (AF_UNIX) plus room for the TLVs balancers send
/// (ALPN, authority, unique ID, SSL details). HAProxy itself refuses more
/// than its buffer; a longer header is refused here.
pub const V2_MAX_LEN: usize = 2048;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Relayed on behalf of a client: the real endpoints.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// The balancer's own connection (a v2 LOCAL health check), or one it
    /// could not describe (v1 UNKNOWN, v2 UNSPEC or UNIX/UDP families): the
    /// spec says to use the real connection's endpoints.
    Local,
}

/// How far parsing got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The header is incomplete: at least this many more bytes are needed,
    /// and no fewer than that can complete it (so reading exactly this many
    /// never reads past the header).
    Need(usize),
    /// A complete header of `len` bytes.
    Done { header: Header, len: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header (the connection did not start with one)")]
    Missing,
    #[error("PROXY v1 line longer than {V1_MAX_LINE} bytes")]
    V1TooLong,
    #[error("PROXY v1 line: {0}")]
    V1Syntax(&'static str),
    #[error("PROXY v2: unsupported version {0}")]
    V2Version(u8),
    #[error("PROXY v2: unknown command {0:#x}")]
    V2Command(u8),
    #[error("PROXY v2: invalid address family/protocol {0:#04x}")]
    V2Family(u8),
    #[error("PROXY v2: header of {0} bytes exceeds the limit of {V2_MAX_LEN}")]
    V2TooLong(usize),
    #[error("PROXY v2: address block of {got} bytes, {family} needs {need}")]
    V2ShortAddress { family: &'static str, got: usize, need: usize },
}

/// Parses the start of a connection. Bytes beyond the header are never
/// looked at, so `input` may hold more than the header.
pub fn parse(input: &[u8]) -> Result<Progress, ProxyError> {
    // Which version, by the bytes seen so far: a byte that matches neither
    // signature is refused at once, without waiting for more.
    let v1 = b"PROXY ";
    let seen = input.len().min(v1.len());
    if input[..seen] == v1[..seen] {
        // One byte first: it tells the versions apart, and a client that is
        // not speaking the protocol is refused at it, not after 15 bytes.
        return if input.is_empty() { Ok(Progress::Need(1)) } else { parse_v1(input) };
    }
    let seen = input.len().min(V2_SIGNATURE.len());
    if input[..seen] == V2_SIGNATURE[..seen] {
        return parse_v2(input);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(input: &[u8]) -> Result<Progress, ProxyError> {
    let window = &input[..input.len().min(V1_MAX_LINE)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if window.len() >= V1_MAX_LINE {
            return Err(ProxyError::V1TooLong);
        }
        if window.contains(&b'\r') && window.last() != Some(&b'\r') {
            return Err(ProxyError::V1Syntax("CR not followed by LF"));
        }
        // The line ends with CRLF, and is at least V1_MIN_LINE long.
        return Ok(Progress::Need(V1_MIN_LINE.saturating_sub(window.len()).max(1)));
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::V1Syntax("line not ended by CRLF"));
    }
    let line = &window[..lf - 1];
    if line.contains(&b'\r') {
        return Err(ProxyError::V1Syntax("CR inside the line"));
    }
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Syntax("not US-ASCII"))?;
    let header = v1_fields(line)?;
    Ok(Progress::Done { header, len: lf + 1 })
}

fn v1_fields(line: &str) -> Result<Header, ProxyError> {
    let rest = line.strip_prefix("PROXY ").ok_or(ProxyError::V1Syntax("missing \"PROXY \""))?;
    let mut fields = rest.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        // "the receiver must ignore anything presented before the CRLF".
        return Ok(Header::Local);
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(ProxyError::V1Syntax("family is not TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(ProxyError::V1Syntax("expected source, destination and two ports, separated by one space"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        if v6 {
            // Only hex groups and colons: no embedded IPv4 or zone.
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                return Err(ProxyError::V1Syntax("bad IPv6 address"));
            }
            s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| ProxyError::V1Syntax("bad IPv6 address"))
        } else {
            // std refuses leading zeroes ("010.0.0.1"), as the spec asks.
            s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| ProxyError::V1Syntax("bad IPv4 address"))
        }
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
        if !canonical {
            return Err(ProxyError::V1Syntax("bad port"));
        }
        s.parse::<u16>().map_err(|_| ProxyError::V1Syntax("bad port"))
    };
    Ok(Header::Proxied {
        source: SocketAddr::new(ip(src)?, port(sport)?),
        destination: SocketAddr::new(ip(dst)?, port(dport)?),
    })
}

fn parse_v2(input: &[u8]) -> Result<Progress, ProxyError> {
    if input.len() < V2_FIXED {
        return Ok(Progress::Need(V2_FIXED - input.len()));
    }
    let ver_cmd = input[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2Version(ver_cmd >> 4));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        other => return Err(ProxyError::V2Command(other)),
    };
    let fam = input[13];
    let (af, proto) = (fam >> 4, fam & 0x0f);
    if af > 3 || proto > 2 {
        return Err(ProxyError::V2Family(fam));
    }
    let len = usize::from(u16::from_be_bytes([input[14], input[15]]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::V2TooLong(len));
    }
    let total = V2_FIXED + len;
    if input.len() < total {
        return Ok(Progress::Need(total - input.len()));
    }
    let block = &input[V2_FIXED..total];
    // LOCAL: "must use the real connection endpoints and discard the
    // protocol block including the family". TLVs after the addresses are skipped.
    let header = match (local, af, proto) {
        (true, _, _) => Header::Local,
        (false, 1, 1) => {
            let need = 12;
            if block.len() < need {
                return Err(ProxyError::V2ShortAddress { family: "TCP over IPv4", got: block.len(), need });
            }
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]));
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            Header::Proxied { source: SocketAddr::new(ip(0), port(8)), destination: SocketAddr::new(ip(4), port(10)) }
        }
        (false, 2, 1) => {
            let need = 36;
            if block.len() < need {
                return Err(ProxyError::V2ShortAddress { family: "TCP over IPv6", got: block.len(), need });
            }
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            Header::Proxied { source: SocketAddr::new(ip(0), port(32)), destination: SocketAddr::new(ip(16), port(34)) }
        }
        // UNSPEC, UDP, UNIX: valid combinations this receiver does not use;
        // the spec says to fall back to the real endpoints.
        (false, _, _) => Header::Local,
    };
    Ok(Progress::Done { header, len: total })
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Header::Proxied { source, destination } => write!(f, "{source} -> {destination}"),
            Header::Local => f.write_str("LOCAL"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | cmd);
        out.push(fam);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn tcp4_block(tlvs: &[u8]) -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 10, 0, 0, 5];
        b.extend_from_slice(&50123u16.to_be_bytes());
        b.extend_from_slice(&587u16.to_be_bytes());
        b.extend_from_slice(tlvs);
        b
    }

    /// Feeds `input` the way the driver does: exactly the bytes asked for,
    /// from a stream where `trailing` follows the header.
    fn drive(input: &[u8]) -> Result<(Header, usize), ProxyError> {
        let mut have = 0;
        loop {
            match parse(&input[..have])? {
                Progress::Need(n) => {
                    assert!(n > 0);
                    assert!(have + n <= input.len(), "asked for more than the stream has (have {have}, need {n})");
                    have += n;
                }
                Progress::Done { header, len } => {
                    assert_eq!(len, have, "the driver read exactly the header");
                    return Ok((header, len));
                }
            }
        }
    }

    /// Every prefix of a valid header is "need more", never an error, and
    /// never "done" early; the whole header plus anything is "done" with the
    /// same answer.
    fn check_chunks(header: &[u8], expected: Header) {
        for cut in 0..header.len() {
            match parse(&header[..cut]) {
                Ok(Progress::Need(n)) => assert!(cut + n <= header.len(), "cut {cut}: need {n} overshoots"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        let mut with_data = header.to_vec();
        with_data.extend_from_slice(b"\x16\x03\x01 then the client's bytes\r\n");
        assert_eq!(parse(&with_data), Ok(Progress::Done { header: expected, len: header.len() }));
        assert_eq!(drive(&with_data), Ok((expected, header.len())));
    }

    fn proxied(src: &str, dst: &str) -> Header {
        Header::Proxied { source: src.parse().unwrap(), destination: dst.parse().unwrap() }
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        check_chunks(b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 587\r\n", proxied("192.0.2.7:50123", "10.0.0.5:587"));
        check_chunks(b"PROXY TCP6 2001:db8::7 fd00::5 50123 993\r\n", proxied("[2001:db8::7]:50123", "[fd00::5]:993"));
        check_chunks(b"PROXY UNKNOWN\r\n", Header::Local);
        check_chunks(
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            Header::Local,
        );
        // The spec's worst case is exactly the limit.
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), V1_MAX_LINE);
        check_chunks(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", proxied("0.0.0.0:0", "255.255.255.255:65535"));
    }

    #[test]
    fn v1_invalid_lines() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 587\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 587\r\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.5 50123\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 587 9\r\n",
            b"PROXY TCP4  192.0.2.7 10.0.0.5 50123 587\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.5 050123 587\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.5 65536 587\r\n",
            b"PROXY TCP4 192.0.2.07 10.0.0.5 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.5 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
            b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.5 1 2\r\n",
            b"PROXY tcp4 192.0.2.7 10.0.0.5 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.5 +1 2\r\n",
            b"PROXY TCP4 192.0.2.7\r10.0.0.5 1 2\r\n",
            b"PROXY \xff\xfe\r\n",
        ];
        for line in bad {
            // Fed in any chunks, the outcome is an error, never "done".
            let result = drive_to_end(line);
            assert!(result.is_err(), "{:?} gave {result:?}", String::from_utf8_lossy(line));
        }
    }

    /// Feeds growing prefixes until the parser decides.
    fn drive_to_end(input: &[u8]) -> Result<Progress, ProxyError> {
        for cut in 0..=input.len() {
            match parse(&input[..cut])? {
                Progress::Need(_) => continue,
                done => return Ok(done),
            }
        }
        parse(input)
    }

    #[test]
    fn v1_line_without_crlf_is_refused_at_the_limit() {
        let mut long = b"PROXY TCP6 ".to_vec();
        long.resize(V1_MAX_LINE - 1, b'f');
        assert!(matches!(parse(&long), Ok(Progress::Need(1))));
        long.push(b'f');
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn anything_else_is_refused_at_the_first_wrong_byte() {
        for start in [&b"EHLO printer\r\n"[..], b"\x16\x03\x01\x02\x00", b"a1 LOGIN", b"PROXX", b"\r\n\r\n\0\r\nQUIX"] {
            assert_eq!(drive_to_end(start), Err(ProxyError::Missing), "{start:?}");
        }
        assert_eq!(parse(b"G"), Err(ProxyError::Missing));
        assert_eq!(parse(b""), Ok(Progress::Need(1)));
        assert_eq!(parse(b"P"), Ok(Progress::Need(V1_MIN_LINE - 1)));
        assert_eq!(parse(b"\r"), Ok(Progress::Need(V2_FIXED - 1)));
    }

    #[test]
    fn v2_tcp4_tcp6_local_unspec() {
        check_chunks(&v2(1, 0x11, &tcp4_block(&[])), proxied("192.0.2.7:50123", "10.0.0.5:587"));
        let mut b6 = Vec::new();
        b6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        b6.extend_from_slice(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets());
        b6.extend_from_slice(&443u16.to_be_bytes());
        b6.extend_from_slice(&993u16.to_be_bytes());
        check_chunks(&v2(1, 0x21, &b6), proxied("[2001:db8::7]:443", "[fd00::5]:993"));
        // LOCAL (health check), with or without an address block.
        check_chunks(&v2(0, 0x00, &[]), Header::Local);
        check_chunks(&v2(0, 0x11, &tcp4_block(&[])), Header::Local);
        // UNSPEC, UDP and UNIX fall back to the real endpoints.
        check_chunks(&v2(1, 0x00, &[]), Header::Local);
        check_chunks(&v2(1, 0x12, &tcp4_block(&[])), Header::Local);
        check_chunks(&v2(1, 0x31, &[0u8; 216]), Header::Local);
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        // ALPN "smtp", a unique ID, and a NOOP: as HAProxy may send them.
        let tlvs = [&[0x01, 0, 4][..], b"smtp", &[0x05, 0, 3], b"abc", &[0x04, 0, 0]].concat();
        check_chunks(&v2(1, 0x11, &tcp4_block(&tlvs)), proxied("192.0.2.7:50123", "10.0.0.5:587"));
    }

    #[test]
    fn v2_invalid_headers() {
        let mut bad_version = v2(1, 0x11, &tcp4_block(&[]));
        bad_version[12] = 0x11;
        assert_eq!(drive_to_end(&bad_version), Err(ProxyError::V2Version(1)));
        assert_eq!(drive_to_end(&v2(2, 0x11, &tcp4_block(&[]))), Err(ProxyError::V2Command(2)));
        assert_eq!(drive_to_end(&v2(1, 0x41, &tcp4_block(&[]))), Err(ProxyError::V2Family(0x41)));
        assert_eq!(drive_to_end(&v2(1, 0x13, &tcp4_block(&[]))), Err(ProxyError::V2Family(0x13)));
        assert!(matches!(drive_to_end(&v2(1, 0x11, &[1, 2, 3])), Err(ProxyError::V2ShortAddress { .. })));
        assert!(matches!(drive_to_end(&v2(1, 0x21, &tcp4_block(&[]))), Err(ProxyError::V2ShortAddress { .. })));
        // A length over the bound is refused from the fixed part alone.
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&huge), Err(ProxyError::V2TooLong(65535)));
        // At the bound it is accepted.
        let mut tlvs = vec![0x04];
        tlvs.extend_from_slice(&u16::try_from(V2_MAX_LEN - 12 - 3).unwrap().to_be_bytes());
        tlvs.resize(V2_MAX_LEN - 12, 0);
        check_chunks(&v2(1, 0x11, &tcp4_block(&tlvs)), proxied("192.0.2.7:50123", "10.0.0.5:587"));
    }
}
