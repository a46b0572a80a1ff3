//! Framing and parsing of client command lines. Sans-I/O: the driver pushes whatever bytes it
//! read and pops complete lines; nothing here can panic on hostile input.

use std::fmt;

use bytes::{Buf, BytesMut};

/// RFC 2449: a command line is at most 255 octets including the CRLF.
pub const MAX_COMMAND_LINE: usize = 255;
/// SASL responses (the line after `+ `), and AUTH lines with an initial response, may be longer
/// than a command (RFC 5034): OAuth tokens run to kilobytes.
pub const MAX_SASL_LINE: usize = 24 * 1024;
/// Bound on buffered, not yet handled client bytes (pipelined commands). The driver stops reading
/// while [`LineBuffer::room`] is zero.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// A line exceeded the current limit. Its bytes are discarded up to its line end; the session
/// answers `-ERR` once and carries on with the next line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line too long")]
pub struct TooLong;

/// Splits the client byte stream into lines (CRLF, or a bare LF).
#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    limit: usize,
    /// Inside an over-long line: drop bytes up to and including the next LF.
    discarding: bool,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuffer {
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            limit: MAX_COMMAND_LINE,
            discarding: false,
        }
    }

    /// The longest line accepted, line end included. Applies to lines not yet popped.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.max(3);
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Appends received bytes. The driver should push at most [`room`](Self::room) bytes; more is
    /// accepted but defeats the bound.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// How many more bytes may be read before the buffered lines must be handled first.
    pub fn room(&self) -> usize {
        MAX_BUFFERED.saturating_sub(self.buf.len())
    }

    /// Bytes received but not yet popped.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Everything received but not yet popped (for a relay taking over the connection).
    pub fn take_buffered(&mut self) -> BytesMut {
        self.discarding = false;
        std::mem::take(&mut self.buf)
    }

    /// The next complete line without its line end, or `TooLong` (reported once per line, as soon
    /// as the limit is passed). `None`: more input is needed. The returned buffer is owned so the
    /// caller can zero it (it may hold a password).
    pub fn next_line(&mut self) -> Option<Result<BytesMut, TooLong>> {
        if self.discarding {
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.buf.advance(i + 1);
                    self.discarding = false;
                }
                None => {
                    self.buf.clear();
                    return None;
                }
            }
        }
        let window = self.buf.len().min(self.limit);
        if let Some(i) = self.buf[..window].iter().position(|&b| b == b'\n') {
            let mut line = self.buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            return Some(Ok(line));
        }
        if self.buf.len() >= self.limit {
            // Drop the line now (up to its end if that is already here) so the buffer stays
            // bounded; without its end, keep discarding on later calls.
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(i) => self.buf.advance(i + 1),
                None => {
                    self.buf.clear();
                    self.discarding = true;
                }
            }
            return Some(Err(TooLong));
        }
        None
    }
}

/// A secret that never shows up in logs and is zeroed when dropped.
pub struct Password(String);

impl Password {
    pub fn new(s: String) -> Self {
        Password(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Password {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.iter_mut().for_each(|b| *b = 0);
        // Keeps the optimiser from eliding the writes to memory about to be freed.
        std::hint::black_box(&mut bytes);
    }
}

/// One POP3 command (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH, RFC 2595 STLS).
#[derive(Debug)]
pub enum Command {
    User(String),
    Pass(Password),
    Apop {
        name: String,
        digest: String,
    },
    Auth {
        mechanism: Option<String>,
        initial_response: Option<String>,
    },
    Capa,
    Stat,
    List(Option<u32>),
    Retr(u32),
    Dele(u32),
    Noop,
    Rset,
    Quit,
    Top {
        msg: u32,
        lines: u32,
    },
    Uidl(Option<u32>),
    Stls,
}

/// Why a line is not a valid command. The `Display` text is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("unknown command")]
    Unknown,
    #[error("{0}: missing argument")]
    MissingArgument(&'static str),
    #[error("{0}: invalid number")]
    BadNumber(&'static str),
    #[error("{0}: too many arguments")]
    ExtraArguments(&'static str),
    #[error("{0}: argument is not valid UTF-8")]
    NotUtf8(&'static str),
}

/// Parses a line (without its line end). Keywords are case-insensitive; arguments are separated
/// by exactly one space.
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    if line.is_empty() {
        return Err(CommandError::Empty);
    }
    let (kw, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    if kw.len() > 4 {
        return Err(CommandError::Unknown);
    }
    let mut upper = [0u8; 4];
    upper[..kw.len()].copy_from_slice(kw);
    upper.make_ascii_uppercase();
    let kw = &upper[..kw.len()];
    let cmd: &'static str = match kw {
        b"USER" => "USER",
        b"PASS" => "PASS",
        b"APOP" => "APOP",
        b"AUTH" => "AUTH",
        b"CAPA" => "CAPA",
        b"STAT" => "STAT",
        b"LIST" => "LIST",
        b"RETR" => "RETR",
        b"DELE" => "DELE",
        b"NOOP" => "NOOP",
        b"RSET" => "RSET",
        b"QUIT" => "QUIT",
        b"TOP" => "TOP",
        b"UIDL" => "UIDL",
        b"STLS" => "STLS",
        _ => return Err(CommandError::Unknown),
    };
    let args = Args { cmd, rest };
    Ok(match cmd {
        "USER" => Command::User(args.rest_str()?),
        "PASS" => Command::Pass(Password::new(args.rest_str()?)),
        "APOP" => {
            let [name, digest] = args.exactly::<2>()?;
            Command::Apop {
                name: utf8(cmd, name)?,
                digest: utf8(cmd, digest)?,
            }
        }
        "AUTH" => {
            let parts = args.up_to::<2>()?;
            Command::Auth {
                mechanism: parts[0]
                    .map(|m| utf8(cmd, m).map(|m| m.to_ascii_uppercase()))
                    .transpose()?,
                initial_response: parts[1].map(|r| utf8(cmd, r)).transpose()?,
            }
        }
        "CAPA" => args.none(Command::Capa)?,
        "STAT" => args.none(Command::Stat)?,
        "NOOP" => args.none(Command::Noop)?,
        "RSET" => args.none(Command::Rset)?,
        "QUIT" => args.none(Command::Quit)?,
        "STLS" => args.none(Command::Stls)?,
        "LIST" => Command::List(args.optional_msg()?),
        "UIDL" => Command::Uidl(args.optional_msg()?),
        "RETR" => Command::Retr(msg_number(cmd, args.exactly::<1>()?[0])?),
        "DELE" => Command::Dele(msg_number(cmd, args.exactly::<1>()?[0])?),
        "TOP" => {
            let [msg, lines] = args.exactly::<2>()?;
            Command::Top {
                msg: msg_number(cmd, msg)?,
                lines: number(cmd, lines)?,
            }
        }
        _ => return Err(CommandError::Unknown),
    })
}

struct Args<'a> {
    cmd: &'static str,
    rest: Option<&'a [u8]>,
}

impl<'a> Args<'a> {
    /// Everything after the first space, spaces included (passwords, user names).
    fn rest_str(&self) -> Result<String, CommandError> {
        match self.rest {
            None | Some(b"") => Err(CommandError::MissingArgument(self.cmd)),
            Some(r) => utf8(self.cmd, r),
        }
    }

    fn none(&self, c: Command) -> Result<Command, CommandError> {
        match self.rest {
            None => Ok(c),
            Some(_) => Err(CommandError::ExtraArguments(self.cmd)),
        }
    }

    /// Up to N space-separated arguments; a present but empty argument is missing.
    fn up_to<const N: usize>(&self) -> Result<[Option<&'a [u8]>; N], CommandError> {
        let mut out = [None; N];
        let Some(rest) = self.rest else {
            return Ok(out);
        };
        for (i, part) in rest.split(|&b| b == b' ').enumerate() {
            if i >= N {
                return Err(CommandError::ExtraArguments(self.cmd));
            }
            if part.is_empty() {
                return Err(CommandError::MissingArgument(self.cmd));
            }
            out[i] = Some(part);
        }
        Ok(out)
    }

    fn exactly<const N: usize>(&self) -> Result<[&'a [u8]; N], CommandError> {
        let parts = self.up_to::<N>()?;
        let mut out: [&[u8]; N] = [b""; N];
        for (o, p) in out.iter_mut().zip(parts) {
            *o = p.ok_or(CommandError::MissingArgument(self.cmd))?;
        }
        Ok(out)
    }

    fn optional_msg(&self) -> Result<Option<u32>, CommandError> {
        let [n] = self.up_to::<1>()?;
        n.map(|n| msg_number(self.cmd, n)).transpose()
    }
}

fn utf8(cmd: &'static str, b: &[u8]) -> Result<String, CommandError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| CommandError::NotUtf8(cmd))
}

/// Decimal digits only, fitting a u32 (no sign, no hex, no spaces).
fn number(cmd: &'static str, b: &[u8]) -> Result<u32, CommandError> {
    if b.is_empty() || b.len() > 10 || !b.iter().all(u8::is_ascii_digit) {
        return Err(CommandError::BadNumber(cmd));
    }
    b.iter()
        .try_fold(0u32, |acc, &d| {
            acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        })
        .ok_or(CommandError::BadNumber(cmd))
}

/// A message number: 1..=u32::MAX.
fn msg_number(cmd: &'static str, b: &[u8]) -> Result<u32, CommandError> {
    match number(cmd, b)? {
        0 => Err(CommandError::BadNumber(cmd)),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(lb: &mut LineBuffer) -> Vec<Result<Vec<u8>, TooLong>> {
        std::iter::from_fn(|| lb.next_line())
            .map(|r| r.map(|l| l.to_vec()))
            .collect()
    }

    #[test]
    fn crlf_and_bare_lf_and_split_input() {
        let mut lb = LineBuffer::new();
        lb.push(b"STAT\r\nLIST\nNO");
        assert_eq!(
            lines(&mut lb),
            vec![Ok(b"STAT".to_vec()), Ok(b"LIST".to_vec())]
        );
        lb.push(b"OP\r");
        assert!(lb.next_line().is_none());
        lb.push(b"\n\r\n");
        assert_eq!(lines(&mut lb), vec![Ok(b"NOOP".to_vec()), Ok(Vec::new())]);
        assert_eq!(lb.buffered(), 0);
    }

    #[test]
    fn only_one_trailing_cr_is_stripped() {
        let mut lb = LineBuffer::new();
        lb.push(b"PASS a\r\r\n");
        assert_eq!(lines(&mut lb), vec![Ok(b"PASS a\r".to_vec())]);
    }

    #[test]
    fn limit_is_inclusive_of_crlf() {
        let mut lb = LineBuffer::new();
        let ok = vec![b'a'; MAX_COMMAND_LINE - 2];
        lb.push(&ok);
        lb.push(b"\r\n");
        assert_eq!(lines(&mut lb), vec![Ok(ok.clone())]);
        let long = vec![b'a'; MAX_COMMAND_LINE - 1];
        lb.push(&long);
        lb.push(b"\r\nSTAT\r\n");
        assert_eq!(lines(&mut lb), vec![Err(TooLong), Ok(b"STAT".to_vec())]);
    }

    #[test]
    fn too_long_line_reported_once_and_discarded_across_pushes() {
        let mut lb = LineBuffer::new();
        for _ in 0..100 {
            lb.push(&[b'x'; 1000]);
            let got = lines(&mut lb);
            assert!(got.len() <= 1);
            assert!(lb.buffered() < MAX_COMMAND_LINE);
        }
        lb.push(b"xx\nQUIT\r\n");
        assert_eq!(lines(&mut lb), vec![Ok(b"QUIT".to_vec())]);
        // Exactly one TooLong for the whole giant line.
        let mut lb = LineBuffer::new();
        let mut count = 0;
        for _ in 0..10 {
            lb.push(&[b'y'; 300]);
            count += lines(&mut lb).iter().filter(|l| l.is_err()).count();
        }
        lb.push(b"\n");
        count += lines(&mut lb).iter().filter(|l| l.is_err()).count();
        assert_eq!(count, 1);
    }

    #[test]
    fn raised_limit_for_sasl() {
        let mut lb = LineBuffer::new();
        lb.set_limit(MAX_SASL_LINE);
        let resp = vec![b'Q'; 4000];
        lb.push(&resp);
        lb.push(b"\r\n");
        assert_eq!(lines(&mut lb), vec![Ok(resp)]);
        lb.set_limit(MAX_COMMAND_LINE);
        assert_eq!(lb.limit(), MAX_COMMAND_LINE);
    }

    #[test]
    fn room_shrinks_with_buffered_bytes() {
        let mut lb = LineBuffer::new();
        assert_eq!(lb.room(), MAX_BUFFERED);
        lb.push(&b"NOOP\r\n".repeat(1000));
        assert_eq!(lb.room(), MAX_BUFFERED - 6000);
        assert_eq!(lines(&mut lb).len(), 1000);
        assert_eq!(lb.room(), MAX_BUFFERED);
    }

    #[test]
    fn keywords_and_arguments() {
        assert!(matches!(parse(b"user alice"), Ok(Command::User(u)) if u == "alice"));
        match parse(b"PASS  s3cret with spaces ") {
            Ok(Command::Pass(p)) => {
                assert_eq!(p.as_str(), " s3cret with spaces ");
                assert_eq!(format!("{p:?}"), "<redacted>");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(b"sTaT"), Ok(Command::Stat)));
        assert!(matches!(parse(b"LIST"), Ok(Command::List(None))));
        assert!(matches!(parse(b"list 7"), Ok(Command::List(Some(7)))));
        assert!(matches!(
            parse(b"UIDL 4294967295"),
            Ok(Command::Uidl(Some(u32::MAX)))
        ));
        assert!(matches!(parse(b"RETR 1"), Ok(Command::Retr(1))));
        assert!(matches!(parse(b"DELE 02"), Ok(Command::Dele(2))));
        assert!(matches!(
            parse(b"top 3 0"),
            Ok(Command::Top { msg: 3, lines: 0 })
        ));
        assert!(
            matches!(parse(b"APOP bob c4c9334bac560ecc979e58001b3e22fb"),
            Ok(Command::Apop { name, digest }) if name == "bob" && digest.len() == 32)
        );
        assert!(matches!(
            parse(b"AUTH"),
            Ok(Command::Auth {
                mechanism: None,
                initial_response: None
            })
        ));
        assert!(matches!(parse(b"auth plain"),
            Ok(Command::Auth { mechanism: Some(m), initial_response: None }) if m == "PLAIN"));
        assert!(matches!(parse(b"AUTH PLAIN AGJvYgBwdw=="),
            Ok(Command::Auth { initial_response: Some(r), .. }) if r == "AGJvYgBwdw=="));
        for (line, want) in [
            (&b"CAPA"[..], "Capa"),
            (b"NOOP", "Noop"),
            (b"RSET", "Rset"),
            (b"QUIT", "Quit"),
            (b"STLS", "Stls"),
        ] {
            assert_eq!(format!("{:?}", parse(line).unwrap()), want);
        }
    }

    #[test]
    fn nasty_input_gives_specific_errors() {
        use CommandError::*;
        let cases: &[(&[u8], CommandError)] = &[
            (b"", Empty),
            (b" STAT", Unknown),
            (b"STATS", Unknown),
            (b"XYZZY 1", Unknown),
            (b"\xff\xfe", Unknown),
            (b"RETR", MissingArgument("RETR")),
            (b"RETR ", MissingArgument("RETR")),
            (b"USER", MissingArgument("USER")),
            (b"USER ", MissingArgument("USER")),
            (b"PASS", MissingArgument("PASS")),
            (b"TOP 1", MissingArgument("TOP")),
            (b"APOP bob", MissingArgument("APOP")),
            (b"RETR 0", BadNumber("RETR")),
            (b"RETR +1", BadNumber("RETR")),
            (b"RETR -1", BadNumber("RETR")),
            (b"RETR 0x1", BadNumber("RETR")),
            (b"RETR 1a", BadNumber("RETR")),
            (b"RETR 4294967296", BadNumber("RETR")),
            (b"RETR 99999999999999999999", BadNumber("RETR")),
            (b"RETR \xd9\xa1", BadNumber("RETR")),
            (b"TOP 1 -1", BadNumber("TOP")),
            (b"LIST  1", MissingArgument("LIST")),
            (b"LIST 1 ", ExtraArguments("LIST")),
            (b"RETR 1 2", ExtraArguments("RETR")),
            (b"TOP 1 2 3", ExtraArguments("TOP")),
            (b"STAT ", ExtraArguments("STAT")),
            (b"QUIT now", ExtraArguments("QUIT")),
            (b"AUTH PLAIN a b", ExtraArguments("AUTH")),
            (b"USER \xff", NotUtf8("USER")),
            (b"PASS \xc3(", NotUtf8("PASS")),
        ];
        for (line, want) in cases {
            match parse(line) {
                Err(e) => assert_eq!(&e, want, "{:?}", String::from_utf8_lossy(line)),
                Ok(c) => panic!("{:?} parsed as {c:?}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn never_panics_on_random_bytes() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"RETRTOPLISTUIDLUSERPASSAUTH 0123456789\r\n\0\xff.+-x";
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 24) as usize;
            let line: Vec<u8> = (0..len)
                .map(|i| alphabet[((x >> (i % 8 * 8)) as usize + i * 31) % alphabet.len()])
                .collect();
            let _ = parse(&line);
            let mut lb = LineBuffer::new();
            lb.push(&line);
            while lb.next_line().is_some() {}
        }
    }
}
