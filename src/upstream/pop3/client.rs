//! The one POP3 client popbridge has: the relay logs in with it before it hands the connection
//! over, `migrate` reads a legacy maildrop with it. Every read and write has the endpoint's
//! deadline, every line and multi-line answer a cap; credentials are checked before a byte of
//! them is sent.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::AsyncWriteExt;

use super::response::{
    join_listings, parse_listing, parse_status, ListedMessage, LoginRefusal, Pop3Error, Response,
    Status,
};
use crate::upstream::client_address::{self, ClientAddress};
use crate::upstream::credentials::{self, Unsendable};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::reader::Reader;
use crate::upstream::transport::AsyncStream;

/// Longest line accepted: status lines are short, but message lines in RETR and TOP can be
/// long in real mail (RFC 5322's 998 octets is often ignored).
pub const MAX_LINE: usize = 1024 * 1024;

/// A connection to a POP3 server.
pub struct Pop3Client {
    io: Box<dyn AsyncStream>,
    reader: Reader,
    timeout: Duration,
}

impl Pop3Client {
    /// Connects as `endpoint` says (implicit TLS, or STLS before anything else) and reads the
    /// greeting, which must be `+OK`.
    pub async fn connect(endpoint: &Endpoint) -> Result<Pop3Client, Pop3Error> {
        let connected = endpoint.connect().await?;
        let mut c = Pop3Client::over(connected.io, endpoint.io_timeout);
        let greeting = if connected.greeted {
            None
        } else {
            Some(c.expect_ok("greeting").await?)
        };
        if endpoint.forward_client_address {
            if let Some(client) = client_address::current() {
                c.forward_client(&client, greeting.as_deref()).await?;
            }
        }
        Ok(c)
    }

    /// Tells the server who the client is with `XCLIENT` (Dovecot applies it from
    /// `login_trusted_networks`), if the server offers it: in its greeting (`+OK [XCLIENT]`,
    /// Dovecot's way to a trusted client, no round trip) or else in CAPA. A refusal is
    /// logged, not fatal. Whether the server took it.
    pub async fn forward_client(
        &mut self,
        client: &ClientAddress,
        greeting: Option<&str>,
    ) -> Result<bool, Pop3Error> {
        let in_greeting = greeting.is_some_and(|g| {
            g.trim_start()
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .is_some_and(|(code, _)| code.eq_ignore_ascii_case("XCLIENT"))
        });
        let offered = in_greeting || {
            let capa = match self.multiline("CAPA", b"CAPA", 64 * 1024).await {
                Ok(c) => c,
                Err(Pop3Error::Refused { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            capa.split(|&b| b == b'\n').any(|l| {
                let word = trim_eol(l).split(|&b| b == b' ').next().unwrap_or_default();
                word.eq_ignore_ascii_case(b"XCLIENT")
            })
        };
        if !offered {
            tracing::debug!("the POP3 server does not offer XCLIENT: client address not forwarded");
            return Ok(false);
        }
        match self
            .command("XCLIENT", client.xclient_line().as_bytes())
            .await
        {
            Ok(_) => Ok(true),
            Err(e @ Pop3Error::Refused { .. }) => {
                tracing::warn!(error = %e, "the POP3 server refused XCLIENT (is popbridge in its login_trusted_networks?)");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// A client over an established stream whose greeting is next.
    pub fn over(io: Box<dyn AsyncStream>, timeout: Duration) -> Pop3Client {
        Pop3Client {
            io,
            reader: Reader::new(MAX_LINE),
            timeout,
        }
    }

    /// Logs in as `user` with `USER`/`PASS`; a server that refuses `USER` without saying why
    /// (some take SASL only) is asked with `AUTH PLAIN` instead. The server's `+OK` line,
    /// line end included, for a client the session is then handed to.
    pub async fn login(&mut self, user: &str, password: &str) -> Result<Vec<u8>, Pop3Error> {
        credentials::check("user name", user)?;
        credentials::check("password", password)?;
        if user.is_empty() || user.contains(' ') {
            return Err(Unsendable {
                what: "user name",
                why: "is empty or holds a space, which POP3 USER cannot carry",
            }
            .into());
        }
        match self
            .command("USER", format!("USER {user}").as_bytes())
            .await
        {
            Ok(_) => {}
            Err(e @ Pop3Error::Refused { .. }) if e.login_refusal() != LoginRefusal::Auth => {
                return Err(e)
            }
            Err(Pop3Error::Refused { .. }) => return self.auth_plain("", user, password).await,
            Err(e) => return Err(e),
        }
        let mut line = format!("PASS {password}").into_bytes();
        let r = self.command_line("PASS", &line).await;
        line.iter_mut().for_each(|b| *b = 0);
        r
    }

    /// Logs in as `user` through a master user (SASL PLAIN, `user` as the authorization
    /// identity); the server's `+OK` line.
    pub async fn login_master(
        &mut self,
        user: &str,
        master: &str,
        master_password: &str,
    ) -> Result<Vec<u8>, Pop3Error> {
        if user.is_empty() {
            return Err(Unsendable::empty("user name").into());
        }
        self.auth_plain(user, master, master_password).await
    }

    async fn auth_plain(
        &mut self,
        authzid: &str,
        authcid: &str,
        password: &str,
    ) -> Result<Vec<u8>, Pop3Error> {
        let mut message = credentials::sasl_plain(authzid, authcid, password)?;
        let mut line = b"AUTH PLAIN ".to_vec();
        line.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(&message)
                .as_bytes(),
        );
        message.iter_mut().for_each(|b| *b = 0);
        let r = self.command_line("AUTH PLAIN", &line).await;
        line.iter_mut().for_each(|b| *b = 0);
        r
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

    /// QUIT and close, waiting briefly (best effort).
    pub async fn quit(mut self) {
        self.timeout = self.timeout.min(Duration::from_secs(2));
        let _ = self.command("QUIT", b"QUIT").await;
        let _ = self.io.shutdown().await;
    }

    /// The connection, for a relay, and what the server sent beyond its last answer (nothing,
    /// from a well-behaved server).
    pub fn into_parts(self) -> (Box<dyn AsyncStream>, Vec<u8>) {
        (self.io, self.reader.into_leftover())
    }

    async fn send(&mut self, line: &[u8]) -> Result<(), Pop3Error> {
        let t = self.timeout;
        tokio::time::timeout(t, async {
            self.io.write_all(line).await?;
            self.io.write_all(b"\r\n").await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| Pop3Error::Timeout(t))??;
        Ok(())
    }

    /// Sends `line`; the text after `+OK`.
    async fn command(&mut self, name: &'static str, line: &[u8]) -> Result<String, Pop3Error> {
        self.send(line).await?;
        self.expect_ok(name).await
    }

    /// Sends `line`; the whole `+OK` line, line end included.
    async fn command_line(
        &mut self,
        name: &'static str,
        line: &[u8],
    ) -> Result<Vec<u8>, Pop3Error> {
        self.send(line).await?;
        let raw = self.reader.read_line(&mut self.io, self.timeout).await?;
        match parse_status(trim_eol(&raw))? {
            Status::Ok(_) => Ok(raw.to_vec()),
            Status::Err(text) => Err(Pop3Error::Refused {
                command: name,
                text,
            }),
            Status::Continue(_) => Err(Pop3Error::Protocol(format!(
                "unexpected continuation after {name}"
            ))),
        }
    }

    async fn expect_ok(&mut self, name: &'static str) -> Result<String, Pop3Error> {
        let raw = self.reader.read_line(&mut self.io, self.timeout).await?;
        match parse_status(trim_eol(&raw))? {
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
            let raw = self.reader.read_line(&mut self.io, self.timeout).await?;
            if response.line(trim_eol(&raw))? {
                return Ok(response.into_data());
            }
        }
    }
}

/// A line without its CRLF (a bare LF is accepted).
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    /// A scripted server on a pipe: sends `greeting`, then for each line it reads, the next
    /// reply of `replies` (as long as there are some). Returns what it read.
    fn scripted(
        greeting: &'static str,
        replies: Vec<&'static str>,
    ) -> (Pop3Client, tokio::task::JoinHandle<Vec<String>>) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(theirs);
            let mut r = BufReader::new(r);
            w.write_all(greeting.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                got.push(line);
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            let mut rest = String::new();
            let _ = r.read_to_string(&mut rest).await;
            if !rest.is_empty() {
                got.push(rest);
            }
            got
        });
        (
            Pop3Client::over(Box::new(ours), Duration::from_secs(5)),
            task,
        )
    }

    #[tokio::test]
    async fn user_pass_login_returns_the_servers_line() {
        let (mut c, server) = scripted("+OK ready\r\n", vec!["+OK\r\n", "+OK Logged in.\r\n"]);
        c.expect_ok("greeting").await.unwrap();
        assert_eq!(
            c.login("bob", "s3cret").await.unwrap(),
            b"+OK Logged in.\r\n"
        );
        drop(c);
        assert_eq!(server.await.unwrap(), ["USER bob\r\n", "PASS s3cret\r\n"]);
    }

    #[tokio::test]
    async fn refusals_follow_the_response_codes() {
        for (reply, want) in [
            ("-ERR [AUTH] Authentication failed.\r\n", LoginRefusal::Auth),
            ("-ERR bad password\r\n", LoginRefusal::Auth),
            ("-ERR [IN-USE] locked\r\n", LoginRefusal::InUse),
            ("-ERR [SYS/TEMP] try later\r\n", LoginRefusal::Unavailable),
            ("* OK imap?\r\n", LoginRefusal::Unavailable),
        ] {
            let (mut c, _server) = scripted("+OK\r\n", vec!["+OK\r\n", reply]);
            c.expect_ok("greeting").await.unwrap();
            let e = c.login("bob", "pw").await.unwrap_err();
            assert_eq!(e.login_refusal(), want, "{reply}: {e}");
        }
    }

    #[tokio::test]
    async fn a_refused_user_falls_back_to_auth_plain() {
        let (mut c, server) = scripted("+OK\r\n", vec!["-ERR USER disabled\r\n", "+OK in\r\n"]);
        c.expect_ok("greeting").await.unwrap();
        assert_eq!(c.login("bob", "pw").await.unwrap(), b"+OK in\r\n");
        drop(c);
        let plain = base64::engine::general_purpose::STANDARD.encode(b"\0bob\0pw");
        assert_eq!(
            server.await.unwrap(),
            ["USER bob\r\n".to_owned(), format!("AUTH PLAIN {plain}\r\n")]
        );
        // ... but not when the server said why (the maildrop is locked).
        let (mut c, _s) = scripted("+OK\r\n", vec!["-ERR [IN-USE] locked\r\n"]);
        c.expect_ok("greeting").await.unwrap();
        assert_eq!(
            c.login("bob", "pw").await.unwrap_err().login_refusal(),
            LoginRefusal::InUse
        );
    }

    #[tokio::test]
    async fn master_login_is_sasl_plain_with_the_user_as_authorization_identity() {
        let (mut c, server) = scripted("+OK\r\n", vec!["+OK welcome bob\r\n"]);
        c.expect_ok("greeting").await.unwrap();
        c.login_master("bob", "admin", "secret").await.unwrap();
        drop(c);
        let plain = base64::engine::general_purpose::STANDARD.encode(b"bob\0admin\0secret");
        assert_eq!(server.await.unwrap(), [format!("AUTH PLAIN {plain}\r\n")]);
    }

    /// CR, LF or NUL in a credential, or a user name USER cannot carry, is refused before a
    /// byte goes to the server (a CR LF in `USER` would smuggle a second command; a NUL would
    /// split the SASL PLAIN message).
    #[tokio::test]
    async fn credentials_that_cannot_be_sent_never_are() {
        for (user, pw, master) in [
            ("a\r\nDELE 1", "pw", None),
            ("alice", "pw\r\nDELE 1", None),
            ("alice", "pw\nx", None),
            ("al\0ice", "pw", None),
            ("al ice", "pw", None),
            ("", "pw", None),
            ("al\0ice", "", Some(("admin", "secret"))),
            ("alice", "", Some(("ad\0min", "secret"))),
            ("alice", "", Some(("admin", "sec\0ret"))),
            ("", "", Some(("admin", "secret"))),
        ] {
            let (mut c, server) = scripted("", vec![]);
            let e = match master {
                None => c.login(user, pw).await.unwrap_err(),
                Some((m, mpw)) => c.login_master(user, m, mpw).await.unwrap_err(),
            };
            assert!(matches!(e, Pop3Error::Unsendable(_)), "{e}");
            assert_eq!(e.login_refusal(), LoginRefusal::Auth);
            drop(c);
            assert!(
                server.await.unwrap().is_empty(),
                "{user:?}: something was sent"
            );
        }
    }

    #[tokio::test]
    async fn listing_top_and_retr_are_unstuffed_and_bounded() {
        let (mut c, _server) = scripted(
            "+OK\r\n",
            vec![
                "+OK\r\n1 u1\r\n2 u2\r\n.\r\n",
                "+OK\r\n1 10\r\n2 20\r\n.\r\n",
                "+OK\r\nSubject: x\r\n\r\n.\r\n",
                "+OK\r\nSubject: x\r\n\r\n..dot\r\n.\r\n",
                "+OK\r\n0123456789\r\n.\r\n",
            ],
        );
        c.expect_ok("greeting").await.unwrap();
        let l = c.listing().await.unwrap();
        assert_eq!((l[1].uidl.as_str(), l[1].size), ("u2", 20));
        assert_eq!(c.top0(1, 100).await.unwrap(), b"Subject: x\r\n\r\n");
        assert_eq!(c.retr(1, 100).await.unwrap(), b"Subject: x\r\n\r\n.dot\r\n");
        assert!(matches!(c.retr(2, 5).await, Err(Pop3Error::TooBig(5))));
    }
}
