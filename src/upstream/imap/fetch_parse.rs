//! A small, strict reader for the one response popbridge streams instead of decoding:
//! `UID FETCH <uid> (UID BODY.PEEK[])`.
//!
//! imap-next decodes a FETCH response whole, literal included, copying every byte several
//! times (fragmentizer, decoder, `into_static`): for message bodies that was most of
//! popbridge's CPU time. This module parses only the lines *around* the body literal; the
//! literal itself is handed to the client in bounded chunks as it arrives
//! ([`super::conn::ImapConnection::body_start`]).
//!
//! Everything here is pure (bytes in, verdict out) so it can be unit-tested and fuzzed. It
//! accepts exactly what a FETCH response of that command may carry: `UID n`, `FLAGS (..)`,
//! `MODSEQ (n)`, `RFC822.SIZE n` and one `BODY[]` / `BODY[]<origin>` item (a literal, a
//! quoted string, or `NIL` for a message another client expunged), in any order, plus
//! untagged responses unrelated to the command (EXISTS, EXPUNGE, VANISHED, RECENT, `* OK`,
//! flag updates). Anything else is a [`StreamError`] and ends the upstream connection.

/// Why a streamed FETCH response was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("malformed FETCH response: {0}")]
    Malformed(&'static str),
    #[error("upstream said BYE")]
    Bye,
}

/// A line of the response, classified. `line` excludes its CRLF / LF.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// The tagged completion of our command.
    Done { kind: Completion, text: &'a [u8] },
    /// `* n FETCH (`: the items start at this offset of the line.
    Fetch { items_at: usize },
    /// Any other untagged response; if it announces a literal, that many bytes follow and
    /// belong to it.
    Other { literal: Option<u32> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Ok,
    No,
    Bad,
}

/// Strips the line ending (CRLF, or a bare LF: servers with relaxed line ends exist).
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The literal a line announces at its end, `{n}` or `{n+}` right before the line end, the
/// same rule imap-codec's fragmentizer applies (so both agree on where a response ends).
/// `line` includes its LF.
pub fn announced_literal(line: &[u8]) -> Option<u32> {
    let l = line.strip_suffix(b"\n")?;
    // One CR at most: `}\r\r\n` is not an announcement for the fragmentizer either.
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    let l = l.strip_suffix(b"}")?;
    let l = l.strip_suffix(b"+").unwrap_or(l);
    let digits = l.len() - l.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == l.len() || digits == 0 || l[digits - 1] != b'{' {
        return None;
    }
    parse_u32(&l[digits..])
}

fn parse_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        } else {
            None
        }
    })
}

/// Classifies one complete line (with its line end) received while our command `tag` runs.
pub fn classify<'a>(line: &'a [u8], tag: &[u8]) -> Result<Line<'a>, StreamError> {
    let body = trim_eol(line);
    if let Some(rest) = body.strip_prefix(tag).and_then(|r| r.strip_prefix(b" ")) {
        let (word, text) = split_word(rest);
        let kind = if word.eq_ignore_ascii_case(b"OK") {
            Completion::Ok
        } else if word.eq_ignore_ascii_case(b"NO") {
            Completion::No
        } else if word.eq_ignore_ascii_case(b"BAD") {
            Completion::Bad
        } else {
            return Err(StreamError::Malformed("tagged line without OK/NO/BAD"));
        };
        return Ok(Line::Done { kind, text });
    }
    let Some(rest) = body.strip_prefix(b"* ") else {
        // A continuation request or another tag: we sent nothing that could cause either.
        return Err(StreamError::Malformed("unexpected line"));
    };
    let (first, after) = split_word(rest);
    if first.eq_ignore_ascii_case(b"BYE") {
        return Err(StreamError::Bye);
    }
    if parse_u32(first).is_some() {
        let (second, _) = split_word(after);
        if second.eq_ignore_ascii_case(b"FETCH") {
            let items = &after[second.len()..];
            let Some(items) = items.strip_prefix(b" (") else {
                return Err(StreamError::Malformed("FETCH without item list"));
            };
            return Ok(Line::Fetch {
                items_at: body.len() - items.len(),
            });
        }
    }
    Ok(Line::Other {
        literal: announced_literal(line),
    })
}

fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    match s.iter().position(|&b| b == b' ') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &[]),
    }
}

/// Where a FETCH item list stands after parsing a fragment of it.
#[derive(Debug, PartialEq, Eq)]
pub enum Items {
    /// The list ended with `)` at the end of the line.
    End,
    /// `BODY[] {n}` ends the line: n literal bytes follow, then more of the list.
    Body(u32),
}

/// What the body item of a FETCH response carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyValue {
    /// A literal of this many octets, which follows the line that announced it.
    Literal(u32),
    /// `NIL`: the server has no body for the message. Dovecot answers so for a message
    /// another client expunged before this session was told (`BODY[] NIL`, then
    /// `OK [EXPUNGEISSUED]`).
    Nil,
    /// A quoted string, unescaped: a short body, or `""` for a message that went away.
    Quoted(Vec<u8>),
}

/// What the items of one FETCH response said.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FetchInfo {
    pub uid: Option<u32>,
    /// The body item, if the response had one (at most one per response is accepted).
    pub body: Option<BodyValue>,
    /// The origin octet of a partial body (`BODY[]<origin>`); 0 for a whole one.
    pub origin: u32,
}

/// Parses a fragment of a FETCH item list: the part of a line after `* n FETCH (`, or the
/// line that follows a literal. `frag` excludes the line end. Accepts what a response to
/// `UID FETCH .. (UID BODY.PEEK[])` (or a partial `BODY.PEEK[]<o.n>`) may carry, including
/// the shapes servers send for a message that went away under the session (`BODY[] NIL`,
/// `BODY[] ""`, no body item at all), and the flag updates other clients cause.
pub fn parse_items(mut frag: &[u8], info: &mut FetchInfo) -> Result<Items, StreamError> {
    let m = StreamError::Malformed;
    loop {
        if frag.first() == Some(&b' ') {
            frag = &frag[1..];
        }
        if frag == b")" {
            return Ok(Items::End);
        }
        let (name, rest) = split_word(frag);
        if name.is_empty() {
            return Err(m("empty FETCH item"));
        }
        if name.eq_ignore_ascii_case(b"UID") {
            let (n, rest) = split_item_value(rest);
            let uid = parse_u32(n).filter(|&u| u != 0).ok_or(m("bad UID"))?;
            if info.uid.is_some_and(|u| u != uid) {
                return Err(m("two UIDs in one FETCH"));
            }
            info.uid = Some(uid);
            frag = rest;
        } else if name.eq_ignore_ascii_case(b"RFC822.SIZE") {
            let (n, rest) = split_item_value(rest);
            parse_u32(n).ok_or(m("bad RFC822.SIZE"))?;
            frag = rest;
        } else if name.eq_ignore_ascii_case(b"FLAGS") || name.eq_ignore_ascii_case(b"MODSEQ") {
            // A parenthesised list without nesting, literals or quotes.
            let rest = rest.strip_prefix(b"(").ok_or(m("list expected"))?;
            let close = rest
                .iter()
                .position(|&b| b == b')')
                .ok_or(m("unterminated list"))?;
            if rest[..close]
                .iter()
                .any(|&b| matches!(b, b'(' | b'"' | b'{' | b'\r' | b'\n'))
            {
                return Err(m("unexpected byte in list"));
            }
            frag = &rest[close + 1..];
        } else if let Some(origin) = body_origin(name) {
            if info.body.is_some() {
                return Err(m("two bodies in one FETCH"));
            }
            info.origin = origin;
            if let Some(n) = rest.strip_prefix(b"{").and_then(|r| r.strip_suffix(b"}")) {
                let len = parse_u32(n).ok_or(m("bad literal length"))?;
                info.body = Some(BodyValue::Literal(len));
                return Ok(Items::Body(len));
            }
            let (value, after) = if rest.starts_with(b"\"") {
                let (text, after) = quoted(rest)?;
                (BodyValue::Quoted(text), after)
            } else {
                let (word, after) = split_item_value(rest);
                if !word.eq_ignore_ascii_case(b"NIL") {
                    return Err(m("body is neither a literal, a string nor NIL"));
                }
                (BodyValue::Nil, after)
            };
            info.body = Some(value);
            frag = after;
        } else {
            return Err(m("unexpected FETCH item"));
        }
        if !(frag.is_empty() || frag.starts_with(b" ") || frag == b")") {
            return Err(m("junk after FETCH item"));
        }
        if frag.is_empty() {
            return Err(m("FETCH item list not closed"));
        }
    }
}

/// `BODY[]` is origin 0, `BODY[]<n>` origin n; `None` for any other item name.
fn body_origin(name: &[u8]) -> Option<u32> {
    let upper = name.get(..6)?;
    if !upper.eq_ignore_ascii_case(b"BODY[]") {
        return None;
    }
    match &name[6..] {
        [] => Some(0),
        [b'<', digits @ .., b'>'] => parse_u32(digits),
        _ => None,
    }
}

/// An IMAP quoted string at the start of `s` (RFC 3501: `\\` and `\"` are the only
/// escapes); its unescaped bytes and what follows it.
fn quoted(s: &[u8]) -> Result<(Vec<u8>, &[u8]), StreamError> {
    let m = StreamError::Malformed;
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        match s.get(i) {
            None => return Err(m("unterminated string")),
            Some(b'"') => return Ok((out, &s[i + 1..])),
            Some(b'\\') => match s.get(i + 1) {
                Some(&c @ (b'\\' | b'"')) => {
                    out.push(c);
                    i += 2;
                }
                _ => return Err(m("bad escape in string")),
            },
            Some(&c) => {
                out.push(c);
                i += 1;
            }
        }
    }
}

/// A value up to the next space or the closing `)`.
fn split_item_value(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s
        .iter()
        .position(|&b| b == b' ' || b == b')')
        .unwrap_or(s.len());
    (&s[..end], &s[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_announcements_match_the_fragmentizer() {
        assert_eq!(announced_literal(b"* 1 FETCH (BODY[] {12}\r\n"), Some(12));
        assert_eq!(announced_literal(b"x {0}\n"), Some(0));
        assert_eq!(announced_literal(b"x {7+}\r\n"), Some(7));
        assert_eq!(announced_literal(b"{4294967295}\r\n"), Some(u32::MAX));
        assert_eq!(announced_literal(b"{4294967296}\r\n"), None);
        assert_eq!(announced_literal(b"x {12}\r\r\n"), None);
        assert_eq!(announced_literal(b"x {}\r\n"), None);
        assert_eq!(announced_literal(b"x 12}\r\n"), None);
        assert_eq!(announced_literal(b"x {1a}\r\n"), None);
        assert_eq!(announced_literal(b"x {12} \r\n"), None);
        assert_eq!(announced_literal(b"x {12}"), None);
        assert_eq!(announced_literal(b"}\n"), None);
    }

    #[test]
    fn classify_lines() {
        let tag = b"P7";
        assert_eq!(
            classify(b"P7 OK Fetch completed.\r\n", tag).unwrap(),
            Line::Done {
                kind: Completion::Ok,
                text: b"Fetch completed."
            }
        );
        assert_eq!(
            classify(b"P7 no gone\n", tag).unwrap(),
            Line::Done {
                kind: Completion::No,
                text: b"gone"
            }
        );
        assert!(classify(b"P7 MAYBE\r\n", tag).is_err());
        assert!(classify(b"P8 OK\r\n", tag).is_err());
        assert!(classify(b"+ go on\r\n", tag).is_err());
        assert_eq!(
            classify(b"* BYE shutting down\r\n", tag),
            Err(StreamError::Bye)
        );
        assert_eq!(
            classify(b"* 3 FETCH (UID 9 BODY[] {5}\r\n", tag).unwrap(),
            Line::Fetch { items_at: 11 }
        );
        assert_eq!(
            classify(b"* 3 EXISTS\r\n", tag).unwrap(),
            Line::Other { literal: None }
        );
        assert_eq!(
            classify(b"* OK [ALERT] {3}\r\n", tag).unwrap(),
            Line::Other { literal: Some(3) }
        );
        assert!(classify(b"* 3 FETCH UID 9\r\n", tag).is_err());
    }

    fn items(frag: &[u8]) -> Result<(Items, FetchInfo), StreamError> {
        let mut info = FetchInfo::default();
        parse_items(frag, &mut info).map(|i| (i, info))
    }

    #[test]
    fn fetch_items() {
        let (i, info) = items(b"UID 9 BODY[] {5}").unwrap();
        assert_eq!(i, Items::Body(5));
        assert_eq!(info.uid, Some(9));
        let (i, info) = items(b"BODY[]<0> {77}").unwrap();
        assert_eq!(i, Items::Body(77));
        assert_eq!(info.uid, None);
        assert_eq!(info.body, Some(BodyValue::Literal(77)));
        let (i, info) = items(b"BODY[]<1048576> {5}").unwrap();
        assert_eq!((i, info.origin), (Items::Body(5), 1_048_576));
        // What Dovecot sends for a message another client expunged.
        let (i, info) = items(b"UID 5 RFC822.SIZE 0 BODY[] NIL)").unwrap();
        assert_eq!(i, Items::End);
        assert_eq!((info.uid, info.body), (Some(5), Some(BodyValue::Nil)));
        let (_, info) = items(b"BODY[]<0> nil UID 5)").unwrap();
        assert_eq!((info.uid, info.body), (Some(5), Some(BodyValue::Nil)));
        let (_, info) = items(b"BODY[] \"\" UID 6)").unwrap();
        assert_eq!(info.body, Some(BodyValue::Quoted(Vec::new())));
        let (_, info) = items(b"UID 6 BODY[] \"a \\\\ \\\"b\\\") {1}\")").unwrap();
        assert_eq!(
            info.body,
            Some(BodyValue::Quoted(b"a \\ \"b\") {1}".to_vec()))
        );
        let (_, info) = items(b"UID 6 FLAGS (\\Seen))").unwrap();
        assert_eq!(info.body, None);
        let (i, info) = items(b"FLAGS (\\Seen $X) MODSEQ (12) UID 4)").unwrap();
        assert_eq!(i, Items::End);
        assert_eq!(info.uid, Some(4));
        assert_eq!(items(b")").unwrap().0, Items::End);
        assert_eq!(items(b" UID 3)").unwrap().0, Items::End);
        assert_eq!(items(b"RFC822.SIZE 10 UID 3)").unwrap().0, Items::End);
        for bad in [
            &b"UID 0)"[..],
            b"UID x)",
            b"UID 3",
            b"UID 3 ",
            b"UID 3)x",
            b"ENVELOPE (NIL))",
            b"BODY[] \"abc)",
            b"BODY[] \"a\\x\")",
            b"BODY[] NILL)",
            b"BODY[] NIL",
            b"BODY[] NIL UID 3 BODY[] NIL)",
            b"BODY[] {5} UID 3",
            b"BODY[1] {5}",
            b"BODY[]<x> {5}",
            b"BODY[]<> {5}",
            b"FLAGS (\\Seen",
            b"FLAGS (a (b)))",
            b"FLAGS \\Seen)",
            b"",
            b"  )",
        ] {
            assert!(items(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut info = FetchInfo::default();
        assert!(parse_items(b"UID 3 UID 4)", &mut info).is_err());
        let mut info = FetchInfo {
            body: Some(BodyValue::Nil),
            ..FetchInfo::default()
        };
        assert!(parse_items(b"BODY[] {5}", &mut info).is_err());
    }

    /// Arbitrary bytes never panic the parsers (the fuzz targets' property, cheaply).
    #[test]
    fn random_input_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet: &[u8] =
            b"* 0123456789 FETCH ( ) UID BODY[]<0> {} + FLAGS MODSEQ \\r\\n P7 OK NO BAD BYE\r\n";
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 48) as usize;
            let mut y = x;
            let line: Vec<u8> = (0..len)
                .map(|_| {
                    y = y
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    alphabet[(y >> 33) as usize % alphabet.len()]
                })
                .collect();
            let _ = announced_literal(&line);
            if let Ok(Line::Fetch { items_at }) = classify(&line, b"P7") {
                let mut info = FetchInfo::default();
                let _ = parse_items(&trim_eol(&line)[items_at..], &mut info);
            }
            let mut info = FetchInfo::default();
            let _ = parse_items(&line, &mut info);
        }
    }
}
