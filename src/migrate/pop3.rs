//! A small, bounded POP3 client for reading a legacy server during a migration: greeting,
//! STLS or implicit TLS, USER/PASS or AUTH PLAIN (with an authorization identity for master
//! users), UIDL, LIST, TOP n 0 and RETR. The response parsing is sans-I/O ([`Response`],
//! [`parse_listing`]); [`Pop3Client`] only moves bytes, with a deadline on every read and
//! write and a cap on every line and every multi-line response.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::config::{Pop3BackendConfig, Security};
use crate::imap::conn::AsyncStream;

/// Longest line accepted: status lines are short, but message lines in RETR and TOP can be
/// long in real mail (RFC 5322's 998 octets is often ignored).
pub const MAX_LINE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Pop3Error {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("POP3 server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("POP3 server closed the connection")]
    Closed,
    #[error("POP3 I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS with the POP3 server failed: {0}")]
    Tls(String),
    #[error("POP3 server sent a line over {MAX_LINE} octets")]
    LineTooLong,
    #[error("POP3 response over {0} octets")]
    TooBig(usize),
    #[error("POP3 server sent something unexpected: {0}")]
    Protocol(String),
    /// `-ERR` to a command; `text` is the server's (never contains a password: we never send
    /// one in a command the server could echo).
    #[error("POP3 server answered {command} with -ERR {text}")]
    Refused { command: &'static str, text: String },
    /// A credential holds a byte that would end or split the command line (CR, LF) or the
    /// SASL PLAIN message (NUL): nothing was sent.
    #[error("the {0} contains CR, LF or NUL and cannot be sent to the POP3 server")]
    Unsendable(&'static str),
}

/// Refuses credentials that would end or split a POP3 command line or a SASL PLAIN message.
fn sendable(what: &'static str, s: &str) -> Result<(), Pop3Error> {
    if s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(Pop3Error::Unsendable(what));
    }
    Ok(())
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

/// A logged-in (or about to be) POP3 connection.
pub struct Pop3Client {
    io: Box<dyn AsyncStream>,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Pop3Client {
    /// Connect as `backend` says (TCP_NODELAY; implicit TLS or STLS with verified
    /// certificates) and read the greeting.
    pub async fn connect(backend: &Pop3BackendConfig) -> Result<Pop3Client, Pop3Error> {
        let timeout = Duration::from_secs(backend.command_timeout_secs);
        let addr = format!("{}:{}", backend.host, backend.port());
        let connect = Duration::from_secs(backend.connect_timeout_secs);
        let tcp = tokio::time::timeout(
            connect,
            TcpStream::connect((backend.host.as_str(), backend.port())),
        )
        .await
        .map_err(|_| Pop3Error::Connect {
            addr: addr.clone(),
            reason: format!("timed out after {connect:?}"),
        })?
        .map_err(|e| Pop3Error::Connect {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
        tcp.set_nodelay(true)?;
        let tls = || -> Result<(TlsConnector, ServerName<'static>), Pop3Error> {
            let config = crate::imap::tls::client_config(backend.ca_file.as_deref())
                .map_err(|e| Pop3Error::Tls(e.to_string()))?;
            let name = backend.tls_server_name.as_deref().unwrap_or(&backend.host);
            let name = ServerName::try_from(name.to_owned())
                .map_err(|_| Pop3Error::Tls(format!("{name:?} is not a valid server name")))?;
            Ok((TlsConnector::from(Arc::clone(&config)), name))
        };
        match backend.security {
            Security::None => {
                let mut c = Pop3Client::new(Box::new(tcp), timeout);
                c.expect_ok("greeting").await?;
                Ok(c)
            }
            Security::Tls => {
                let (connector, name) = tls()?;
                let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| Pop3Error::Timeout(timeout))?
                    .map_err(|e| Pop3Error::Tls(e.to_string()))?;
                let mut c = Pop3Client::new(Box::new(stream), timeout);
                c.expect_ok("greeting").await?;
                Ok(c)
            }
            Security::Starttls => {
                let (connector, name) = tls()?;
                let mut tcp = tcp;
                stls_preamble(&mut tcp, timeout).await?;
                let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| Pop3Error::Timeout(timeout))?
                    .map_err(|e| Pop3Error::Tls(e.to_string()))?;
                Ok(Pop3Client::new(Box::new(stream), timeout))
            }
        }
    }

    fn new(io: Box<dyn AsyncStream>, timeout: Duration) -> Pop3Client {
        Pop3Client {
            io,
            buf: Vec::with_capacity(4096),
            timeout,
        }
    }

    /// Log in as `user`: with `master` = (master user, its password) by AUTH PLAIN with `user`
    /// as authorization identity; otherwise with USER/PASS and `password`.
    pub async fn login(
        &mut self,
        user: &str,
        password: &str,
        master: Option<(&str, &str)>,
    ) -> Result<(), Pop3Error> {
        sendable("user name", user)?;
        match master {
            Some((muser, mpass)) => {
                sendable("master user name", muser)?;
                sendable("master password", mpass)?;
                let blob = base64::engine::general_purpose::STANDARD
                    .encode(format!("{user}\0{muser}\0{mpass}"));
                let mut line = b"AUTH PLAIN ".to_vec();
                line.extend_from_slice(blob.as_bytes());
                self.command("AUTH PLAIN", &line).await.map(|_| ())
            }
            None => {
                sendable("password", password)?;
                self.command("USER", format!("USER {user}").as_bytes())
                    .await?;
                self.command("PASS", format!("PASS {password}").as_bytes())
                    .await
                    .map(|_| ())
            }
        }
    }

    /// UIDL and LIST of the whole maildrop, joined.
    pub async fn listing(&mut self) -> Result<Vec<ListedMessage>, Pop3Error> {
        const MAX: usize = 256 << 20;
        let uidls = parse_listing(&self.multiline("UIDL", b"UIDL", MAX).await?)?;
        let sizes = parse_listing(&self.multiline("LIST", b"LIST", MAX).await?)?;
        join_listings(&uidls, &sizes)
    }

    /// `TOP n 0`: the header, the blank line, no body.
    pub async fn top0(&mut self, n: u32, max: usize) -> Result<Vec<u8>, Pop3Error> {
        self.multiline("TOP", format!("TOP {n} 0").as_bytes(), max)
            .await
    }

    /// `RETR n`, dot-unstuffed, CRLF line ends, at most `max` octets.
    pub async fn retr(&mut self, n: u32, max: usize) -> Result<Vec<u8>, Pop3Error> {
        self.multiline("RETR", format!("RETR {n}").as_bytes(), max)
            .await
    }

    /// QUIT (best effort: the session is read-only, so nothing is lost if it fails).
    pub async fn quit(mut self) {
        self.timeout = self.timeout.min(Duration::from_secs(2));
        let _ = self.command("QUIT", b"QUIT").await;
        let _ = self.io.shutdown().await;
    }

    async fn command(&mut self, name: &'static str, line: &[u8]) -> Result<String, Pop3Error> {
        let mut out = line.to_vec();
        out.extend_from_slice(b"\r\n");
        let t = self.timeout;
        tokio::time::timeout(t, async {
            self.io.write_all(&out).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| Pop3Error::Timeout(t))??;
        self.expect_ok(name).await
    }

    async fn expect_ok(&mut self, name: &'static str) -> Result<String, Pop3Error> {
        let line = self.read_line().await?;
        match parse_status(&line)? {
            Status::Ok(text) => Ok(text),
            Status::Err(text) => Err(Pop3Error::Refused {
                command: name,
                text,
            }),
            Status::Continue(_) => Err(Pop3Error::Protocol(format!(
                "unexpected continuation after {name}"
            ))),
        }
    }

    async fn multiline(
        &mut self,
        name: &'static str,
        line: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, Pop3Error> {
        self.command(name, line).await?;
        let mut response = Response::new(max);
        loop {
            let line = self.read_line().await?;
            if response.line(&line)? {
                return Ok(response.into_data());
            }
        }
    }

    /// One line without its CRLF (a bare LF is accepted).
    async fn read_line(&mut self) -> Result<Vec<u8>, Pop3Error> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(Pop3Error::LineTooLong);
            }
            let mut chunk = [0u8; 16 * 1024];
            let t = self.timeout;
            let n = tokio::time::timeout(t, self.io.read(&mut chunk))
                .await
                .map_err(|_| Pop3Error::Timeout(t))??;
            if n == 0 {
                return Err(Pop3Error::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Greeting, `STLS`, `+OK`, on the plain stream. Anything the server sends after its `+OK`
/// and before the handshake would be read as if it came through TLS, so it is an error.
async fn stls_preamble(tcp: &mut TcpStream, timeout: Duration) -> Result<(), Pop3Error> {
    let mut buf = Vec::with_capacity(512);
    let read_line = async |tcp: &mut TcpStream, buf: &mut Vec<u8>| -> Result<Vec<u8>, Pop3Error> {
        loop {
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let rest = buf.split_off(end + 1);
                let mut line = std::mem::replace(buf, rest);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if buf.len() > MAX_LINE {
                return Err(Pop3Error::LineTooLong);
            }
            let mut chunk = [0u8; 512];
            let n = tokio::time::timeout(timeout, tcp.read(&mut chunk))
                .await
                .map_err(|_| Pop3Error::Timeout(timeout))??;
            if n == 0 {
                return Err(Pop3Error::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let greeting = read_line(tcp, &mut buf).await?;
    if !matches!(parse_status(&greeting)?, Status::Ok(_)) {
        return Err(Pop3Error::Refused {
            command: "greeting",
            text: String::from_utf8_lossy(&greeting).into_owned(),
        });
    }
    tokio::time::timeout(timeout, tcp.write_all(b"STLS\r\n"))
        .await
        .map_err(|_| Pop3Error::Timeout(timeout))??;
    let reply = read_line(tcp, &mut buf).await?;
    match parse_status(&reply)? {
        Status::Ok(_) if buf.is_empty() => Ok(()),
        Status::Ok(_) => Err(Pop3Error::Protocol(
            "server sent data after its STLS reply".into(),
        )),
        Status::Err(text) | Status::Continue(text) => Err(Pop3Error::Refused {
            command: "STLS",
            text,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CR, LF or NUL in a credential is refused before a byte goes to the server (a CR LF in
    /// `USER` would smuggle a second command; a NUL would split the SASL PLAIN message).
    #[tokio::test]
    async fn credentials_with_line_breaks_or_nul_are_never_sent() {
        for (user, pw, master) in [
            ("a\r\nDELE 1", "pw", None),
            ("alice", "pw\r\nDELE 1", None),
            ("alice", "pw\nx", None),
            ("al\0ice", "pw", None),
            ("al\0ice", "", Some(("admin", "secret"))),
            ("alice", "", Some(("ad\0min", "secret"))),
            ("alice", "", Some(("admin", "sec\0ret"))),
        ] {
            let (ours, mut theirs) = tokio::io::duplex(1024);
            let mut c = Pop3Client::new(Box::new(ours), Duration::from_secs(1));
            let e = c.login(user, pw, master).await.unwrap_err();
            assert!(matches!(e, Pop3Error::Unsendable(_)), "{e}");
            assert!(e.to_string().contains("CR, LF or NUL"), "{e}");
            drop(c);
            let mut sent = Vec::new();
            theirs.read_to_end(&mut sent).await.unwrap();
            assert!(sent.is_empty(), "{user:?}: sent {sent:?}");
        }
    }

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
}
