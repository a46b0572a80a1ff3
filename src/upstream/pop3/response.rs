//! POP3 responses as the client side reads them, sans-I/O: status lines, RFC 3206 response
//! codes, multi-line data (dot-unstuffed, bounded), UIDL/LIST listings.

use std::time::Duration;

use crate::upstream::credentials::Unsendable;
use crate::upstream::reader::ReadError;
use crate::upstream::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum Pop3Error {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("POP3 server: {0}")]
    Read(#[from] ReadError),
    #[error("POP3 server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("POP3 I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("POP3 response over {0} octets")]
    TooBig(usize),
    #[error("POP3 server sent something unexpected: {0}")]
    Protocol(String),
    /// `-ERR` to a command; `text` is the server's (never a password: none is ever sent in a
    /// command the server could echo).
    #[error("POP3 server answered {command} with -ERR {text}")]
    Refused { command: &'static str, text: String },
    /// A credential that cannot be sent: nothing was.
    #[error(transparent)]
    Unsendable(#[from] Unsendable),
}

impl Pop3Error {
    /// What a failed login means for the client: refused credentials, a locked maildrop, or
    /// a server that is not working.
    pub fn login_refusal(&self) -> LoginRefusal {
        match self {
            Pop3Error::Refused { text, .. } => login_refusal(text),
            Pop3Error::Unsendable(_) => LoginRefusal::Auth,
            _ => LoginRefusal::Unavailable,
        }
    }
}

/// A parsed status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok(String),
    Err(String),
    /// `+ ` continuation (SASL).
    Continue(String),
}

/// Parses a status line (without its line end).
pub fn parse_status(line: &[u8]) -> Result<Status, Pop3Error> {
    let text = |rest: &[u8]| String::from_utf8_lossy(rest).trim().to_string();
    if let Some(rest) = line.strip_prefix(b"+OK") {
        Ok(Status::Ok(text(rest)))
    } else if let Some(rest) = line.strip_prefix(b"-ERR") {
        Ok(Status::Err(text(rest)))
    } else if line == b"+" || line.starts_with(b"+ ") {
        Ok(Status::Continue(text(&line[1..])))
    } else {
        Err(Pop3Error::Protocol(format!(
            "not a status line: {:?}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        )))
    }
}

/// The data part of a multi-line response, built line by line: dot-unstuffed, CRLF line ends,
/// at most `max` octets.
#[derive(Debug)]
pub struct Response {
    data: Vec<u8>,
    max: usize,
    done: bool,
}

impl Response {
    pub fn new(max: usize) -> Response {
        Response {
            data: Vec::new(),
            max,
            done: false,
        }
    }

    /// Feeds one line (without its line end); true once the terminating `.` arrived.
    pub fn line(&mut self, line: &[u8]) -> Result<bool, Pop3Error> {
        if self.done {
            return Ok(true);
        }
        if line == b"." {
            self.done = true;
            return Ok(true);
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        if self.data.len() + line.len() + 2 > self.max {
            return Err(Pop3Error::TooBig(self.max));
        }
        self.data.extend_from_slice(line);
        self.data.extend_from_slice(b"\r\n");
        Ok(false)
    }

    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// `n value` lines of a UIDL or LIST response.
pub fn parse_listing(data: &[u8]) -> Result<Vec<(u32, String)>, Pop3Error> {
    let mut out = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(line)
            .map_err(|_| Pop3Error::Protocol("listing line is not UTF-8".into()))?;
        let mut parts = text.split_ascii_whitespace();
        let (Some(n), Some(v)) = (parts.next(), parts.next()) else {
            return Err(Pop3Error::Protocol(format!("bad listing line {text:?}")));
        };
        let n = n
            .parse::<u32>()
            .map_err(|_| Pop3Error::Protocol(format!("bad message number in {text:?}")))?;
        out.push((n, v.to_owned()));
    }
    Ok(out)
}

/// One message as the legacy server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedMessage {
    pub number: u32,
    pub uidl: String,
    pub size: u64,
}

/// UIDL and LIST joined by message number; every message must appear in both.
pub fn join_listings(
    uidls: &[(u32, String)],
    sizes: &[(u32, String)],
) -> Result<Vec<ListedMessage>, Pop3Error> {
    if uidls.len() != sizes.len() {
        return Err(Pop3Error::Protocol(format!(
            "UIDL lists {} messages, LIST {}",
            uidls.len(),
            sizes.len()
        )));
    }
    let mut out = Vec::with_capacity(uidls.len());
    for ((n1, uidl), (n2, size)) in uidls.iter().zip(sizes) {
        if n1 != n2 {
            return Err(Pop3Error::Protocol(format!(
                "UIDL and LIST disagree on message numbers ({n1} vs {n2})"
            )));
        }
        let size = size
            .parse::<u64>()
            .map_err(|_| Pop3Error::Protocol(format!("bad size {size:?}")))?;
        out.push(ListedMessage {
            number: *n1,
            uidl: uidl.clone(),
            size,
        });
    }
    Ok(out)
}

/// What an `-ERR` to a login means (RFC 3206 response codes): `[IN-USE]` the maildrop is
/// locked, `[LOGIN-DELAY]` the user logged in too recently (RFC 2449), `[SYS/...]` the
/// server is failing; anything else is taken as refused credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    Auth,
    InUse,
    LoginDelay,
    Unavailable,
}

/// Classifies the text after `-ERR`.
pub fn login_refusal(text: &str) -> LoginRefusal {
    let code = text
        .trim_start()
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(c, _)| c.to_ascii_uppercase());
    match code.as_deref() {
        Some("IN-USE") => LoginRefusal::InUse,
        Some("LOGIN-DELAY") => LoginRefusal::LoginDelay,
        Some(c) if c.starts_with("SYS/") => LoginRefusal::Unavailable,
        _ => LoginRefusal::Auth,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"+OK ready").unwrap(),
            Status::Ok("ready".into())
        );
        assert_eq!(parse_status(b"+OK").unwrap(), Status::Ok(String::new()));
        assert_eq!(
            parse_status(b"-ERR [AUTH] nope").unwrap(),
            Status::Err("[AUTH] nope".into())
        );
        assert_eq!(
            parse_status(b"+ ").unwrap(),
            Status::Continue(String::new())
        );
        assert!(parse_status(b"* OK imap").is_err());
    }

    #[test]
    fn multiline_unstuffs_and_is_bounded() {
        let mut r = Response::new(100);
        for l in [&b"Subject: x"[..], b"", b"..leading dot", b".", b"after"] {
            if r.line(l).unwrap() {
                break;
            }
        }
        assert_eq!(r.into_data(), b"Subject: x\r\n\r\n.leading dot\r\n");
        let mut r = Response::new(10);
        assert!(matches!(r.line(b"0123456789"), Err(Pop3Error::TooBig(10))));
    }

    #[test]
    fn listings_join_by_number() {
        let u = parse_listing(b"1 abc\r\n2 def\r\n").unwrap();
        let l = parse_listing(b"1 120\r\n2 7\r\n").unwrap();
        let j = join_listings(&u, &l).unwrap();
        assert_eq!(
            j[1],
            ListedMessage {
                number: 2,
                uidl: "def".into(),
                size: 7
            }
        );
        assert!(join_listings(&u, &l[..1]).is_err());
        let l2 = parse_listing(b"1 120\r\n3 7\r\n").unwrap();
        assert!(join_listings(&u, &l2).is_err());
        assert!(parse_listing(b"x abc\r\n").is_err());
        assert!(parse_listing(b"1\r\n").is_err());
        let bad = parse_listing(b"1 1x\r\n").unwrap();
        assert!(join_listings(&u[..1], &bad).is_err());
    }

    #[test]
    fn login_refusals_follow_the_response_codes() {
        assert_eq!(
            login_refusal("[AUTH] Authentication failed."),
            LoginRefusal::Auth
        );
        assert_eq!(login_refusal("bad password"), LoginRefusal::Auth);
        assert_eq!(login_refusal("[IN-USE] locked"), LoginRefusal::InUse);
        assert_eq!(
            login_refusal("[LOGIN-DELAY] wait"),
            LoginRefusal::LoginDelay
        );
        assert_eq!(
            login_refusal(" [sys/temp] later"),
            LoginRefusal::Unavailable
        );
        assert_eq!(login_refusal("[SYS/PERM] never"), LoginRefusal::Unavailable);
    }
}
