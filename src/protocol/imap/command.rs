//! Incremental receiver for IMAP commands before authentication.
//!
//! IMAP is not purely line-based: `a LOGIN {5}\r\n` announces a literal of 5
//! bytes that follows once the server sends a continuation request (`{5+}`
//! does not wait). The receiver assembles a command from its line fragments
//! and literals, then parses the handful of commands valid before login.

use super::super::line::{LineError, LineFramer};
use super::super::reply::Failure;
use crate::sasl::Mechanism;
use crate::secret::Secret;
use bytes::{Buf, BytesMut};
use zeroize::Zeroize;

/// A command valid in the not-authenticated state, or a hint about one that is not.
#[derive(Debug)]
pub enum Command {
    Capability {
        tag: String,
    },
    Noop {
        tag: String,
    },
    Logout {
        tag: String,
    },
    Id {
        tag: String,
    },
    StartTls {
        tag: String,
    },
    Login {
        tag: String,
        username: String,
        password: Secret<Vec<u8>>,
    },
    Authenticate {
        tag: String,
        mechanism: Option<Mechanism>,
        initial: Option<Secret<Vec<u8>>>,
    },
    /// A command only valid after login (SELECT, FETCH...).
    NeedsAuth {
        tag: String,
    },
}

impl Command {
    pub fn tag(&self) -> &str {
        match self {
            Command::Capability { tag }
            | Command::Noop { tag }
            | Command::Logout { tag }
            | Command::Id { tag }
            | Command::StartTls { tag }
            | Command::Login { tag, .. }
            | Command::Authenticate { tag, .. }
            | Command::NeedsAuth { tag } => tag,
        }
    }
}

#[derive(Debug)]
pub enum Received {
    Command(Command),
    /// A synchronizing literal was announced: the client waits for `+`.
    NeedContinuation,
    /// The command is rejected; `close` when the stream can no longer be
    /// trusted to be in sync (an oversized non-synchronizing literal).
    Rejected {
        tag: Option<String>,
        failure: Failure,
        close: bool,
    },
}

/// One piece of a command: a line fragment or the content of a literal.
enum Part {
    Text(Vec<u8>),
    Literal(Vec<u8>),
}

impl Drop for Part {
    fn drop(&mut self) {
        // Fragments may hold a password in a quoted string or literal.
        match self {
            Part::Text(b) | Part::Literal(b) => b.zeroize(),
        }
    }
}

pub struct Receiver {
    framer: LineFramer,
    parts: Vec<Part>,
    /// Bytes still owed to the literal at the end of `parts`.
    literal_remaining: usize,
    assembled: usize,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("parts", &self.parts.len()).finish_non_exhaustive()
    }
}

impl Receiver {
    /// `max` bounds each line, each literal, and (times two) a whole command.
    pub fn new(max: usize) -> Self {
        Receiver { framer: LineFramer::new(max), parts: Vec::new(), literal_remaining: 0, assembled: 0 }
    }

    /// A raw line, for SASL responses that are not commands.
    pub fn next_line(&mut self, input: &mut BytesMut) -> Result<Option<BytesMut>, LineError> {
        self.framer.next_line(input)
    }

    pub fn poll(&mut self, input: &mut BytesMut) -> Option<Received> {
        loop {
            if self.literal_remaining > 0 {
                let take = self.literal_remaining.min(input.len());
                if take == 0 {
                    return None;
                }
                if let Some(Part::Literal(lit)) = self.parts.last_mut() {
                    lit.extend_from_slice(&input[..take]);
                }
                input.advance(take);
                self.literal_remaining -= take;
                continue;
            }
            let line = match self.framer.next_line(input) {
                Ok(Some(line)) => line,
                Ok(None) => return None,
                Err(e) => {
                    let tag = self.first_tag();
                    self.reset();
                    let close = e == LineError::Endless;
                    return Some(Received::Rejected { tag, failure: Failure::LineTooLong, close });
                }
            };
            self.assembled += line.len();
            let literal = literal_marker(&line);
            self.parts.push(Part::Text(line.to_vec()));
            let Some((size, synchronizing)) = literal else {
                let parts = std::mem::take(&mut self.parts);
                self.assembled = 0;
                return Some(parse(&parts));
            };
            let max = self.framer.max();
            if size > max || self.assembled + size > 2 * max {
                let tag = self.first_tag();
                self.reset();
                // A client waiting for `+` sends nothing more for this command;
                // one that does not wait is already sending bytes we cannot skip.
                return Some(Received::Rejected { tag, failure: Failure::LineTooLong, close: !synchronizing });
            }
            self.assembled += size;
            self.parts.push(Part::Literal(Vec::with_capacity(size)));
            self.literal_remaining = size;
            if synchronizing {
                return Some(Received::NeedContinuation);
            }
        }
    }

    fn reset(&mut self) {
        self.parts.clear();
        self.literal_remaining = 0;
        self.assembled = 0;
    }

    fn first_tag(&self) -> Option<String> {
        Cursor::new(&self.parts).tag()
    }
}

/// `{123}` or `{123+}` at the end of a line fragment.
fn literal_marker(line: &[u8]) -> Option<(usize, bool)> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let mut digits = &body[open + 1..];
    let synchronizing = match digits.strip_suffix(b"+").or_else(|| digits.strip_suffix(b"-")) {
        Some(d) => {
            digits = d;
            false
        }
        None => true,
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((size, synchronizing))
}

fn parse(parts: &[Part]) -> Received {
    let mut cur = Cursor::new(parts);
    let Some(tag) = cur.tag() else {
        return Received::Rejected { tag: None, failure: Failure::Syntax, close: false };
    };
    let rejected = |failure| Received::Rejected { tag: Some(tag.clone()), failure, close: false };
    if !cur.sp() {
        return rejected(Failure::Syntax);
    }
    let Some(name) = cur.atom() else {
        return rejected(Failure::Syntax);
    };
    let name = name.to_ascii_uppercase();
    let command = match name.as_slice() {
        b"CAPABILITY" | b"NOOP" | b"LOGOUT" | b"STARTTLS" => {
            if !cur.at_end() {
                return rejected(Failure::Syntax);
            }
            match name.as_slice() {
                b"CAPABILITY" => Command::Capability { tag },
                b"NOOP" => Command::Noop { tag },
                b"LOGOUT" => Command::Logout { tag },
                _ => Command::StartTls { tag },
            }
        }
        // The arguments are the client's self-description; we answer without them.
        b"ID" => Command::Id { tag },
        b"LOGIN" => {
            let (Some(username), Some(password)) = (cur.sp_astring(), cur.sp_astring()) else {
                return rejected(Failure::Syntax);
            };
            if !cur.at_end() {
                return rejected(Failure::Syntax);
            }
            let password = Secret::new(password);
            match String::from_utf8(username) {
                Ok(username) if !username.is_empty() => Command::Login { tag, username, password },
                _ => return rejected(Failure::Syntax),
            }
        }
        b"AUTHENTICATE" => {
            if !cur.sp() {
                return rejected(Failure::Syntax);
            }
            let Some(mechanism) = cur.atom() else {
                return rejected(Failure::Syntax);
            };
            let mechanism = Mechanism::parse(&mechanism);
            let initial = if cur.sp() {
                match cur.atom() {
                    Some(ir) => Some(Secret::new(ir)),
                    None => return rejected(Failure::Syntax),
                }
            } else {
                None
            };
            if !cur.at_end() {
                return rejected(Failure::Syntax);
            }
            Command::Authenticate { tag, mechanism, initial }
        }
        n if AUTHENTICATED_COMMANDS.contains(&n) => Command::NeedsAuth { tag },
        _ => return rejected(Failure::Syntax),
    };
    Received::Command(command)
}

/// Commands of the authenticated and selected states (RFC 3501, RFC 9051 and
/// common extensions): recognised so the client hears "log in first" rather
/// than "unknown command".
const AUTHENTICATED_COMMANDS: &[&[u8]] = &[
    b"SELECT",
    b"EXAMINE",
    b"CREATE",
    b"DELETE",
    b"RENAME",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"LIST",
    b"LSUB",
    b"STATUS",
    b"APPEND",
    b"CHECK",
    b"CLOSE",
    b"UNSELECT",
    b"EXPUNGE",
    b"SEARCH",
    b"FETCH",
    b"STORE",
    b"COPY",
    b"MOVE",
    b"UID",
    b"IDLE",
    b"ENABLE",
    b"NAMESPACE",
    b"GETQUOTA",
    b"GETQUOTAROOT",
    b"SETQUOTA",
    b"GETACL",
    b"SETACL",
    b"DELETEACL",
    b"LISTRIGHTS",
    b"MYRIGHTS",
    b"GETMETADATA",
    b"SETMETADATA",
    b"COMPRESS",
    b"NOTIFY",
    b"SORT",
    b"THREAD",
    b"ESEARCH",
    b"UNAUTHENTICATE",
    b"REPLACE",
];

/// Walks the parts of one command. Literals appear only right after a text
/// fragment that ended with their `{n}` marker.
struct Cursor<'a> {
    parts: &'a [Part],
    index: usize,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(parts: &'a [Part]) -> Self {
        Cursor { parts, index: 0, pos: 0 }
    }

    fn text(&self) -> &'a [u8] {
        match self.parts.get(self.index) {
            Some(Part::Text(t)) => &t[self.pos.min(t.len())..],
            _ => &[],
        }
    }

    fn at_end(&self) -> bool {
        self.index + 1 >= self.parts.len() && self.text().is_empty()
    }

    fn sp(&mut self) -> bool {
        if self.text().first() == Some(&b' ') {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn tag(&mut self) -> Option<String> {
        let text = self.text();
        let len = text.iter().take_while(|&&b| is_astring_char(b) && b != b'+').count();
        if len == 0 {
            return None;
        }
        self.pos += len;
        String::from_utf8(text[..len].to_vec()).ok()
    }

    fn atom(&mut self) -> Option<Vec<u8>> {
        let text = self.text();
        let len = text.iter().take_while(|&&b| is_atom_char(b)).count();
        if len == 0 {
            return None;
        }
        self.pos += len;
        Some(text[..len].to_vec())
    }

    fn sp_astring(&mut self) -> Option<Vec<u8>> {
        if !self.sp() {
            return None;
        }
        let text = self.text();
        match text.first()? {
            b'"' => self.quoted(),
            b'{' => self.literal(),
            _ => {
                let len = text.iter().take_while(|&&b| is_astring_char(b)).count();
                if len == 0 {
                    return None;
                }
                self.pos += len;
                Some(text[..len].to_vec())
            }
        }
    }

    fn quoted(&mut self) -> Option<Vec<u8>> {
        let text = self.text();
        let mut value = Vec::new();
        let mut i = 1;
        loop {
            match *text.get(i)? {
                b'"' => break,
                b'\\' => match *text.get(i + 1)? {
                    c @ (b'"' | b'\\') => {
                        value.push(c);
                        i += 2;
                    }
                    _ => return None,
                },
                b'\r' | b'\n' | 0 => return None,
                c => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        self.pos += i + 1;
        Some(value)
    }

    /// The marker must end the current fragment; the literal is the next part.
    fn literal(&mut self) -> Option<Vec<u8>> {
        literal_marker(self.text())?;
        match self.parts.get(self.index + 1)? {
            Part::Literal(content) => {
                let value = content.clone();
                self.index += 2;
                self.pos = 0;
                Some(value)
            }
            Part::Text(_) => None,
        }
    }
}

/// ATOM-CHAR: any CHAR except atom-specials.
fn is_atom_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// ASTRING-CHAR: ATOM-CHAR or resp-specials (`]`).
fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Ev {
        Cont,
        Cmd(String),
        Rej(Option<String>, Failure, bool),
    }

    fn describe(cmd: &Command) -> String {
        match cmd {
            Command::Login { tag, username, password } => {
                format!("{tag} LOGIN {username} {}", String::from_utf8_lossy(password.expose()))
            }
            Command::Authenticate { tag, mechanism, initial } => format!(
                "{tag} AUTHENTICATE {mechanism:?} {:?}",
                initial.as_ref().map(|i| String::from_utf8_lossy(i.expose()).into_owned())
            ),
            Command::Capability { tag } => format!("{tag} CAPABILITY"),
            Command::Noop { tag } => format!("{tag} NOOP"),
            Command::Logout { tag } => format!("{tag} LOGOUT"),
            Command::Id { tag } => format!("{tag} ID"),
            Command::StartTls { tag } => format!("{tag} STARTTLS"),
            Command::NeedsAuth { tag } => format!("{tag} NEEDSAUTH"),
        }
    }

    fn run(max: usize, input: &[u8], chunk: usize) -> Vec<Ev> {
        let mut rx = Receiver::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(r) = rx.poll(&mut buf) {
                out.push(match r {
                    Received::Command(c) => Ev::Cmd(describe(&c)),
                    Received::NeedContinuation => Ev::Cont,
                    Received::Rejected { tag, failure, close } => Ev::Rej(tag, failure, close),
                });
            }
        }
        out
    }

    fn cmd(s: &str) -> Ev {
        Ev::Cmd(s.to_string())
    }

    fn rej(tag: Option<&str>, f: Failure) -> Ev {
        Ev::Rej(tag.map(str::to_string), f, false)
    }

    #[test]
    fn table_at_every_chunk_size() {
        let cases: Vec<(&[u8], Vec<Ev>)> = vec![
            (b"a1 LOGIN printer s3cret\r\n", vec![cmd("a1 LOGIN printer s3cret")]),
            (b"a1 login printer s3cret\n", vec![cmd("a1 LOGIN printer s3cret")]),
            (b"a2 LOGIN \"pr\\\"int\" \"p w\\\\d\"\r\n", vec![cmd("a2 LOGIN pr\"int p w\\d")]),
            (b"a3 LOGIN \"\" pw\r\n", vec![rej(Some("a3"), Failure::Syntax)]),
            (b"a3 LOGIN \"x\\n\" pw\r\n", vec![rej(Some("a3"), Failure::Syntax)]),
            (b"a4 LOGIN {7}\r\nprinter {6}\r\ns3cret\r\n", vec![Ev::Cont, Ev::Cont, cmd("a4 LOGIN printer s3cret")]),
            (b"a5 LOGIN {7+}\r\nprinter {8+}\r\ns3 {c}\"t\r\n", vec![cmd("a5 LOGIN printer s3 {c}\"t")]),
            (b"a6 LOGIN user {3}\r\n\r\n\r\r\n", vec![Ev::Cont, cmd("a6 LOGIN user \r\n\r")]),
            (b"a7 LOGIN only\r\n", vec![rej(Some("a7"), Failure::Syntax)]),
            (b"a8 LOGIN a b c\r\n", vec![rej(Some("a8"), Failure::Syntax)]),
            (b"x CAPABILITY\r\n", vec![cmd("x CAPABILITY")]),
            (b"x capability extra\r\n", vec![rej(Some("x"), Failure::Syntax)]),
            (b"x NOOP\r\ny LOGOUT\r\n", vec![cmd("x NOOP"), cmd("y LOGOUT")]),
            (b"x ID (\"name\" \"mutt\")\r\n", vec![cmd("x ID")]),
            (b"x ID (\"name\" {4}\r\nmutt)\r\n", vec![Ev::Cont, cmd("x ID")]),
            (b"s STARTTLS\r\n", vec![cmd("s STARTTLS")]),
            (b"s SELECT INBOX\r\n", vec![cmd("s NEEDSAUTH")]),
            (b"s uid fetch 1:* (FLAGS)\r\n", vec![cmd("s NEEDSAUTH")]),
            (b"s FROB\r\n", vec![rej(Some("s"), Failure::Syntax)]),
            (b"\r\n", vec![rej(None, Failure::Syntax)]),
            (b"+tag NOOP\r\n", vec![rej(None, Failure::Syntax)]),
            (b"tag\r\n", vec![rej(Some("tag"), Failure::Syntax)]),
            (
                b"t AUTHENTICATE PLAIN AHByaW50ZXIAczNjcmV0\r\n",
                vec![cmd("t AUTHENTICATE Some(Plain) Some(\"AHByaW50ZXIAczNjcmV0\")")],
            ),
            (b"t AUTHENTICATE plain\r\n", vec![cmd("t AUTHENTICATE Some(Plain) None")]),
            (b"t AUTHENTICATE PLAIN =\r\n", vec![cmd("t AUTHENTICATE Some(Plain) Some(\"=\")")]),
            (b"t AUTHENTICATE LOGIN\r\n", vec![cmd("t AUTHENTICATE Some(Login) None")]),
            (b"t AUTHENTICATE XOAUTH2 abc\r\n", vec![cmd("t AUTHENTICATE None Some(\"abc\")")]),
            (b"t AUTHENTICATE\r\n", vec![rej(Some("t"), Failure::Syntax)]),
            (
                b"t LOGIN xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx pw\r\nu NOOP\r\n",
                vec![rej(None, Failure::LineTooLong), cmd("u NOOP")],
            ),
            (b"t LOGIN {99}\r\nu NOOP\r\n", vec![rej(Some("t"), Failure::LineTooLong), cmd("u NOOP")]),
            (b"t LOGIN {99+}\r\n", vec![Ev::Rej(Some("t".into()), Failure::LineTooLong, true)]),
        ];
        for (input, expected) in &cases {
            for chunk in 1..=input.len() {
                assert_eq!(
                    &run(48, input, chunk),
                    expected,
                    "input {:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn literal_markers() {
        assert_eq!(literal_marker(b"a LOGIN {5}"), Some((5, true)));
        assert_eq!(literal_marker(b"a LOGIN {5+}"), Some((5, false)));
        assert_eq!(literal_marker(b"a LOGIN {5-}"), Some((5, false)));
        assert_eq!(literal_marker(b"{0}"), Some((0, true)));
        assert_eq!(literal_marker(b"a {}"), None);
        assert_eq!(literal_marker(b"a {x}"), None);
        assert_eq!(literal_marker(b"a {99999999999}"), None);
        assert_eq!(literal_marker(b"a 5}"), None);
    }

    #[test]
    fn many_literals_cannot_grow_a_command_without_bound() {
        let mut rx = Receiver::new(48);
        let mut buf = BytesMut::new();
        let mut rejected = false;
        for _ in 0..100 {
            buf.extend_from_slice(b"a ID {40+}\r\n0123456789012345678901234567890123456789 {40+}\r\n");
            while let Some(r) = rx.poll(&mut buf) {
                if matches!(r, Received::Rejected { .. }) {
                    rejected = true;
                }
            }
            if rejected {
                break;
            }
        }
        assert!(rejected);
    }
}
