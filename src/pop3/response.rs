//! Status lines and the streaming multi-line body encoder (dot-stuffing, CRLF normalisation,
//! TOP truncation) used for RETR and TOP.

/// RFC 2449 / RFC 3206 response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCode {
    Auth,
    SysTemp,
    SysPerm,
    InUse,
    LoginDelay,
}

impl RespCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RespCode::Auth => "AUTH",
            RespCode::SysTemp => "SYS/TEMP",
            RespCode::SysPerm => "SYS/PERM",
            RespCode::InUse => "IN-USE",
            RespCode::LoginDelay => "LOGIN-DELAY",
        }
    }
}

/// Appends `text` with CR, LF and other controls replaced by spaces, so text that came from
/// elsewhere (an upstream error) cannot inject a line.
fn push_text(out: &mut Vec<u8>, text: &str) {
    out.extend(
        text.bytes()
            .map(|b| if b.is_ascii_control() { b' ' } else { b }),
    );
}

/// `+OK text\r\n` (`+OK\r\n` for empty text).
pub fn ok(text: &str) -> Vec<u8> {
    let mut out = b"+OK".to_vec();
    if !text.is_empty() {
        out.push(b' ');
        push_text(&mut out, text);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `-ERR [CODE] text\r\n`.
pub fn err(code: Option<RespCode>, text: &str) -> Vec<u8> {
    let mut out = b"-ERR".to_vec();
    if let Some(code) = code {
        out.extend_from_slice(b" [");
        out.extend_from_slice(code.as_str().as_bytes());
        out.push(b']');
    }
    if !text.is_empty() {
        out.push(b' ');
        push_text(&mut out, text);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A complete multi-line response of short lines that never need stuffing (LIST, UIDL, CAPA):
/// `+OK first`, each line, then `.`.
pub fn multiline<I, S>(first: &str, lines: I) -> Vec<u8>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = ok(first);
    for l in lines {
        let l = l.as_ref();
        if l.starts_with('.') {
            out.push(b'.');
        }
        push_text(&mut out, l);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// Plain RETR: everything.
    All,
    /// TOP: still in the header, then `n` body lines.
    Header(u32),
    Body(u32),
    Done,
}

/// Streaming encoder for a message body in a multi-line response. Feed chunks split anywhere;
/// output is the same as for the message in one piece. Lines end in CRLF (bare LF becomes CRLF,
/// a lone CR is content), a leading `.` is doubled, and [`finish`](Self::finish) closes an
/// unterminated last line and appends `.\r\n`.
///
/// Works a line at a time (`memchr` for the LF, one copy of the line): this runs over every
/// byte popbridge sends.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    /// Octets of the current line emitted so far (saturating; only 0, 1 and "more" matter).
    line_len: usize,
    /// The last octet emitted was a CR (a CRLF split across chunks, or a lone CR).
    last_cr: bool,
    top: Top,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    /// For RETR: the whole message.
    pub fn new() -> Self {
        Self {
            line_len: 0,
            last_cr: false,
            top: Top::All,
        }
    }

    /// For TOP: the header, the blank line, then `lines` body lines (RFC 1939). A message without
    /// a blank line is all header.
    pub fn top(lines: u32) -> Self {
        Self {
            top: Top::Header(lines),
            ..Self::new()
        }
    }

    /// True once TOP has emitted all it will: the driver can stop fetching.
    pub fn is_done(&self) -> bool {
        self.top == Top::Done
    }

    /// Encodes `input`, appending to `out`. Input after TOP is done is ignored.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + 16);
        let mut rest = input;
        while !rest.is_empty() && !self.is_done() {
            if self.line_len == 0 && rest[0] == b'.' {
                out.push(b'.');
            }
            let Some(lf) = memchr::memchr(b'\n', rest) else {
                out.extend_from_slice(rest);
                self.line_len = self.line_len.saturating_add(rest.len());
                self.last_cr = rest.last() == Some(&b'\r');
                return;
            };
            let line = &rest[..lf];
            out.extend_from_slice(line);
            let cr = match line.last() {
                Some(&b) => b == b'\r',
                None => self.last_cr,
            };
            if cr {
                out.push(b'\n');
            } else {
                out.extend_from_slice(b"\r\n");
            }
            // Empty: nothing before the LF but (at most) the CR of its CRLF.
            let len = self.line_len.saturating_add(line.len());
            self.end_line(len == usize::from(cr));
            rest = &rest[lf + 1..];
        }
    }

    fn end_line(&mut self, was_empty: bool) {
        self.line_len = 0;
        self.last_cr = false;
        self.top = match self.top {
            Top::Header(0) if was_empty => Top::Done,
            Top::Header(n) if was_empty => Top::Body(n),
            Top::Body(n) if n <= 1 => Top::Done,
            Top::Body(n) => Top::Body(n - 1),
            other => other,
        };
    }

    /// Ends the body: a CRLF if the last line was unterminated (a trailing lone CR stays
    /// content), then `.\r\n`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.is_done() && self.line_len > 0 {
            out.extend_from_slice(b"\r\n");
        }
        self.top = Top::Done;
        self.line_len = 0;
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(ok(""), b"+OK\r\n");
        assert_eq!(ok("2 320"), b"+OK 2 320\r\n");
        assert_eq!(
            err(Some(RespCode::SysTemp), "down"),
            b"-ERR [SYS/TEMP] down\r\n"
        );
        assert_eq!(err(Some(RespCode::InUse), ""), b"-ERR [IN-USE]\r\n");
        assert_eq!(err(None, "no"), b"-ERR no\r\n");
        assert_eq!(
            err(Some(RespCode::LoginDelay), "x\r\n+OK evil"),
            b"-ERR [LOGIN-DELAY] x  +OK evil\r\n"
        );
        assert_eq!(RespCode::Auth.as_str(), "AUTH");
        assert_eq!(RespCode::SysPerm.as_str(), "SYS/PERM");
        assert_eq!(
            multiline("list", ["1 10", ".x"]),
            b"+OK list\r\n1 10\r\n..x\r\n.\r\n"
        );
    }

    fn one_shot(msg: &[u8], top: Option<u32>) -> Vec<u8> {
        let mut s = top.map_or_else(DotStuffer::new, DotStuffer::top);
        let mut out = Vec::new();
        s.feed(msg, &mut out);
        s.finish(&mut out);
        out
    }

    #[test]
    fn examples() {
        assert_eq!(one_shot(b"", None), b".\r\n");
        assert_eq!(one_shot(b"a", None), b"a\r\n.\r\n");
        assert_eq!(one_shot(b".\r\n..x\n", None), b"..\r\n...x\r\n.\r\n");
        assert_eq!(one_shot(b"a\rb\r\n", None), b"a\rb\r\n.\r\n");
        assert_eq!(one_shot(b"a\r", None), b"a\r\r\n.\r\n");
        assert_eq!(one_shot(b"x.y\n.", None), b"x.y\r\n..\r\n.\r\n");
        let msg = b"Subject: a\r\nX: b\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(one_shot(msg, Some(0)), b"Subject: a\r\nX: b\r\n\r\n.\r\n");
        assert_eq!(
            one_shot(msg, Some(2)),
            b"Subject: a\r\nX: b\r\n\r\nl1\r\nl2\r\n.\r\n"
        );
        assert_eq!(one_shot(msg, Some(9)), one_shot(msg, None));
        // No blank line: all header.
        assert_eq!(one_shot(b"A: 1\nB: 2", Some(0)), b"A: 1\r\nB: 2\r\n.\r\n");
    }

    #[test]
    fn top_done_stops_consuming() {
        let mut s = DotStuffer::top(1);
        let mut out = Vec::new();
        s.feed(b"H: v\r\n\r\nbody1\r", &mut out);
        assert!(!s.is_done());
        s.feed(b"\nbody2\r\n", &mut out);
        assert!(s.is_done());
        s.feed(b"more", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"H: v\r\n\r\nbody1\r\n.\r\n");
    }

    /// Independent reference: split into lines, select, stuff, join.
    fn reference(msg: &[u8], top: Option<u32>) -> Vec<u8> {
        let mut lines: Vec<&[u8]> = Vec::new();
        let mut start = 0;
        for (i, &b) in msg.iter().enumerate() {
            if b == b'\n' {
                let end = if i > start && msg[i - 1] == b'\r' {
                    i - 1
                } else {
                    i
                };
                lines.push(&msg[start..end]);
                start = i + 1;
            }
        }
        if start < msg.len() {
            lines.push(&msg[start..]);
        }
        if let Some(n) = top {
            if let Some(h) = lines.iter().position(|l| l.is_empty()) {
                lines.truncate((h + 1 + n as usize).min(lines.len()));
            }
        }
        let mut out = Vec::new();
        for l in lines {
            if l.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    /// What a client recovers: lines up to ".", leading dot removed.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = wire;
        loop {
            let i = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("terminated");
            let line = &rest[..i];
            rest = &rest[i + 2..];
            if line == b"." {
                assert!(rest.is_empty(), "data after terminator");
                return out;
            }
            let line = line.strip_prefix(b".").unwrap_or(line);
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }

    fn normalise(msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &b) in msg.iter().enumerate() {
            if b == b'\n' && (i == 0 || msg[i - 1] != b'\r') {
                out.push(b'\r');
            }
            out.push(b);
        }
        if !out.ends_with(b"\r\n") && !out.is_empty() {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_messages_and_chunkings_match_reference() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let alphabet = b"..\r\n\n\nab :";
        for round in 0..3000 {
            let len = rng.below(if round % 10 == 0 { 2000 } else { 60 });
            let msg: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let top = match rng.below(3) {
                0 => None,
                _ => Some(rng.below(5) as u32),
            };
            let want = reference(&msg, top);
            assert_eq!(one_shot(&msg, top), want, "one-shot {msg:?} {top:?}");
            for _ in 0..4 {
                let mut s = top.map_or_else(DotStuffer::new, DotStuffer::top);
                let mut out = Vec::new();
                let mut pos = 0;
                while pos < msg.len() {
                    let n = 1 + rng.below(7);
                    let end = (pos + n).min(msg.len());
                    s.feed(&msg[pos..end], &mut out);
                    pos = end;
                }
                s.finish(&mut out);
                assert_eq!(out, want, "chunked {msg:?} {top:?}");
            }
            if top.is_none() {
                assert_eq!(unstuff(&want), normalise(&msg), "{msg:?}");
            }
        }
    }
}
