//! Passthrough to a legacy POP3 server (`kind = "pop3"` backends): popbridge logs in there with
//! the client's (rewritten) login and password, and from then on relays bytes both ways.
//!
//! The login is a sans-I/O state machine ([`Pop3Login`]); [`Pop3Backend::login`] is its thin
//! tokio driver (connect, STLS, deadlines, bounded lines) and [`relay`] the byte pump (bounded
//! buffers, idle timeout, shutdown).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::command::Password;
use crate::config::{Pop3BackendConfig, Security};
use crate::imap::UpstreamSetupError;
use crate::maildrop::MaildropError;
use crate::metrics::metrics;

/// Longest line accepted from the legacy server during login (RFC 2449 allows 512).
pub const MAX_LINE: usize = 4096;
/// Size of each direction's relay buffer.
pub const RELAY_BUFFER: usize = 16 * 1024;

/// What the login state machine wants done next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read one more line from the server and hand it to [`Pop3Login::on_line`].
    Read,
    /// Write these bytes (they may carry the password: zero them after writing), then read.
    Send(Vec<u8>),
    /// Run the TLS handshake (after STLS was accepted), then call [`Pop3Login::on_tls`].
    StartTls,
    /// Logged in: this is the server's `+OK` line (line end included), for the client.
    LoggedIn(Vec<u8>),
    /// The login failed.
    Failed(LoginError),
}

/// Why a login at the legacy server failed, and what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The server refused the credentials: `-ERR [AUTH]`.
    #[error("credentials refused")]
    Auth,
    /// The server says the maildrop is locked: `-ERR [IN-USE]`.
    #[error("maildrop in use at the legacy server")]
    InUse,
    /// The server is not working (`-ERR [SYS/TEMP]`, a bad greeting, STLS refused): the client
    /// gets `-ERR [SYS/TEMP]`.
    #[error("{0}")]
    Unavailable(String),
}

impl From<LoginError> for MaildropError {
    fn from(e: LoginError) -> MaildropError {
        match e {
            LoginError::Auth => MaildropError::Auth,
            LoginError::InUse => MaildropError::InUse,
            LoginError::Unavailable(m) => MaildropError::Unavailable(m),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Stls,
    User,
    Pass,
    AuthPlain,
    Done,
}

/// The client side of a POP3 login: greeting, optional STLS, `USER`/`PASS` (or `AUTH PLAIN`
/// with an initial response when the server refuses `USER`).
pub struct Pop3Login {
    state: State,
    stls: bool,
    user: String,
    password: Password,
}

impl Pop3Login {
    pub fn new(user: &str, password: &str, stls: bool) -> Pop3Login {
        Pop3Login {
            state: State::Greeting,
            stls,
            user: user.to_owned(),
            password: Password::new(password.to_owned()),
        }
    }

    /// The first step: read the greeting.
    pub fn start(&self) -> Step {
        Step::Read
    }

    /// The handshake after STLS succeeded: log in (RFC 2595: no new greeting).
    pub fn on_tls(&mut self) -> Step {
        self.user_step()
    }

    fn user_step(&mut self) -> Step {
        if self.user.is_empty() || self.user.contains(['\r', '\n', ' ']) {
            self.state = State::Done;
            return Step::Failed(LoginError::Auth);
        }
        self.state = State::User;
        Step::Send(format!("USER {}\r\n", self.user).into_bytes())
    }

    /// One line from the server, line end included or not.
    pub fn on_line(&mut self, line: &[u8]) -> Step {
        let ok = line.starts_with(b"+OK");
        let shown = || {
            let s = String::from_utf8_lossy(line);
            let s = s.trim_end();
            s.chars().take(200).collect::<String>()
        };
        match self.state {
            State::Greeting if ok => {
                if self.stls {
                    self.state = State::Stls;
                    Step::Send(b"STLS\r\n".to_vec())
                } else {
                    self.user_step()
                }
            }
            State::Greeting => self.fail(LoginError::Unavailable(format!(
                "legacy server greeting: {}",
                shown()
            ))),
            State::Stls if ok => Step::StartTls,
            State::Stls => self.fail(LoginError::Unavailable(format!(
                "legacy server refused STLS: {}",
                shown()
            ))),
            State::User if ok => {
                self.state = State::Pass;
                if self.password.as_str().contains(['\r', '\n']) {
                    return self.fail(LoginError::Auth);
                }
                Step::Send(format!("PASS {}\r\n", self.password.as_str()).into_bytes())
            }
            State::User if classify(line) != LoginError::Auth => self.fail(classify(line)),
            State::User => {
                // Some servers take SASL only.
                self.state = State::AuthPlain;
                let mut plain =
                    Vec::with_capacity(self.user.len() + self.password.as_str().len() + 2);
                plain.push(0);
                plain.extend_from_slice(self.user.as_bytes());
                plain.push(0);
                plain.extend_from_slice(self.password.as_str().as_bytes());
                let b64 = base64::engine::general_purpose::STANDARD.encode(&plain);
                plain.iter_mut().for_each(|b| *b = 0);
                std::hint::black_box(&mut plain);
                Step::Send(format!("AUTH PLAIN {b64}\r\n").into_bytes())
            }
            State::Pass | State::AuthPlain if ok => {
                self.state = State::Done;
                let mut l = line.to_vec();
                if !l.ends_with(b"\n") {
                    l.extend_from_slice(b"\r\n");
                }
                Step::LoggedIn(l)
            }
            State::Pass | State::AuthPlain => self.fail(classify(line)),
            State::Done => Step::Failed(LoginError::Unavailable("login already finished".into())),
        }
    }

    fn fail(&mut self, e: LoginError) -> Step {
        self.state = State::Done;
        Step::Failed(e)
    }
}

/// What a `-ERR` during login means (RFC 3206 codes).
fn classify(line: &[u8]) -> LoginError {
    let rest = line.strip_prefix(b"-ERR").unwrap_or(line);
    let rest = String::from_utf8_lossy(rest);
    let rest = rest.trim_start();
    let code = rest
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(c, _)| c.to_ascii_uppercase());
    match code.as_deref() {
        Some("IN-USE") => LoginError::InUse,
        Some(c) if c.starts_with("SYS/") => {
            LoginError::Unavailable(format!("legacy server: [{c}]"))
        }
        _ if !line.starts_with(b"-ERR") => {
            LoginError::Unavailable("legacy server sent neither +OK nor -ERR".into())
        }
        _ => LoginError::Auth,
    }
}

/// A connection to the legacy server: plain TCP or TLS.
pub enum LegacyStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for LegacyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LegacyStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            LegacyStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LegacyStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LegacyStream::Plain(s) => Pin::new(s).poll_write(cx, b),
            LegacyStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LegacyStream::Plain(s) => Pin::new(s).poll_flush(cx),
            LegacyStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LegacyStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            LegacyStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A logged-in session at the legacy server, ready to be relayed.
pub struct Relayed {
    pub stream: LegacyStream,
    /// The server's `+OK` answer to the login, for the client.
    pub ok_line: Vec<u8>,
    /// Bytes the server sent after that line (none from a well-behaved server).
    pub leftover: Vec<u8>,
}

/// One `kind = "pop3"` backend: where it is and how to reach it.
pub struct Pop3Backend {
    pub name: Arc<str>,
    host: String,
    port: u16,
    security: Security,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl Pop3Backend {
    pub fn new(name: &str, c: &Pop3BackendConfig) -> Result<Pop3Backend, UpstreamSetupError> {
        let tls = match c.security {
            Security::None => None,
            Security::Tls | Security::Starttls => {
                let client = crate::imap::tls::client_config(c.ca_file.as_deref())?;
                let sni = c.tls_server_name.as_deref().unwrap_or(&c.host);
                let sni = ServerName::try_from(sni.to_owned())
                    .map_err(|_| UpstreamSetupError::ServerName(sni.to_owned()))?;
                Some((TlsConnector::from(client), sni))
            }
        };
        Ok(Pop3Backend {
            name: Arc::from(name),
            host: c.host.clone(),
            port: c.port(),
            security: c.security,
            tls,
            connect_timeout: Duration::from_secs(c.connect_timeout_secs),
            command_timeout: Duration::from_secs(c.command_timeout_secs),
        })
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<LegacyStream, LoginError> {
        let Some((connector, name)) = &self.tls else {
            return Err(LoginError::Unavailable("no TLS configuration".into()));
        };
        match tokio::time::timeout(self.command_timeout, connector.connect(name.clone(), tcp)).await
        {
            Ok(Ok(tls)) => Ok(LegacyStream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(LoginError::Unavailable(format!(
                "TLS with the legacy server failed: {e}"
            ))),
            Err(_) => Err(LoginError::Unavailable(
                "TLS handshake with the legacy server timed out".into(),
            )),
        }
    }

    /// Connect and log in with `user` and `password`.
    pub async fn login(&self, user: &str, password: &str) -> Result<Relayed, LoginError> {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(LoginError::Unavailable(format!(
                    "cannot connect to {addr}: {e}"
                )))
            }
            Err(_) => {
                return Err(LoginError::Unavailable(format!(
                    "cannot connect to {addr}: timed out"
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut stream = match self.security {
            Security::Tls => self.handshake(tcp).await?,
            _ => LegacyStream::Plain(tcp),
        };
        let mut machine = Pop3Login::new(user, password, self.security == Security::Starttls);
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        let mut step = machine.start();
        loop {
            step = match step {
                Step::Read => {
                    let line = read_line(&mut stream, &mut buf, self.command_timeout).await?;
                    machine.on_line(&line)
                }
                Step::Send(mut bytes) => {
                    let w = tokio::time::timeout(self.command_timeout, async {
                        stream.write_all(&bytes).await?;
                        stream.flush().await
                    })
                    .await;
                    bytes.iter_mut().for_each(|b| *b = 0);
                    std::hint::black_box(&mut bytes);
                    match w {
                        Ok(Ok(())) => Step::Read,
                        Ok(Err(e)) => return Err(LoginError::Unavailable(format!("write: {e}"))),
                        Err(_) => {
                            return Err(LoginError::Unavailable("legacy server timed out".into()))
                        }
                    }
                }
                Step::StartTls => {
                    // Anything sent before the handshake would be injected into the TLS
                    // session's view (CVE-2011-0411 class).
                    if !buf.is_empty() {
                        return Err(LoginError::Unavailable(
                            "legacy server sent data after its STLS reply".into(),
                        ));
                    }
                    let LegacyStream::Plain(tcp) = stream else {
                        return Err(LoginError::Unavailable("STLS on a TLS connection".into()));
                    };
                    stream = self.handshake(tcp).await?;
                    machine.on_tls()
                }
                Step::LoggedIn(ok_line) => {
                    return Ok(Relayed {
                        stream,
                        ok_line,
                        leftover: buf,
                    })
                }
                Step::Failed(e) => {
                    quit(&mut stream).await;
                    return Err(e);
                }
            };
        }
    }

    /// Check a password: log in and QUIT (for `verify_password_with`).
    pub async fn check_password(&self, user: &str, password: &str) -> Result<(), LoginError> {
        let mut r = self.login(user, password).await?;
        quit(&mut r.stream).await;
        Ok(())
    }
}

/// Say QUIT and close, without waiting long (best effort).
async fn quit(stream: &mut LegacyStream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(b"QUIT\r\n").await?;
        stream.flush().await?;
        let mut sink = [0u8; 512];
        let _ = stream.read(&mut sink).await;
        stream.shutdown().await
    })
    .await;
}

/// One line (through LF) from `stream`, at most [`MAX_LINE`] bytes; `buf` keeps what follows.
async fn read_line(
    stream: &mut LegacyStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, LoginError> {
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let rest = buf.split_off(end + 1);
            return Ok(std::mem::replace(buf, rest));
        }
        if buf.len() > MAX_LINE {
            return Err(LoginError::Unavailable(
                "legacy server sent an over-long line".into(),
            ));
        }
        let mut chunk = [0u8; 1024];
        let n = match tokio::time::timeout(timeout, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                return Err(LoginError::Unavailable(
                    "legacy server closed the connection".into(),
                ))
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(LoginError::Unavailable(format!("read: {e}"))),
            Err(_) => return Err(LoginError::Unavailable("legacy server timed out".into())),
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed (normally after QUIT).
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The server is shutting down (after the drain time).
    Shutdown,
    /// A read or write failed.
    Error,
}

impl RelayEnd {
    pub fn label(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::Idle => "timeout",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::Error => "error",
        }
    }
}

/// What a relayed session moved, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub end: RelayEnd,
    pub to_server: u64,
    pub to_client: u64,
}

/// A stream that notes when it last moved a byte and counts what it reads.
struct Tracked<'a, T> {
    inner: T,
    epoch: Instant,
    last: &'a AtomicU64,
    read_bytes: IntCounter,
    read_total: &'a AtomicU64,
}

impl<T> Tracked<'_, T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read_bytes.inc_by(n as u64);
            this.read_total.fetch_add(n as u64, Ordering::Relaxed);
            this.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Relay bytes between `client` and the legacy server until both sides close, nothing moves
/// for `idle`, or `shutdown` turns true. `pending` (what the client pipelined behind its
/// login) goes to the server first, `up.leftover` to the client.
pub async fn relay<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    up: Relayed,
    pending: &[u8],
    backend: &str,
    idle: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> RelayStats {
    let to_server = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let end = pump(
        client, up, pending, backend, idle, shutdown, &to_server, &to_client,
    )
    .await;
    RelayStats {
        end,
        to_server: to_server.into_inner(),
        to_client: to_client.into_inner(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn pump<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    mut up: Relayed,
    pending: &[u8],
    backend: &str,
    idle: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    server_total: &AtomicU64,
    client_total: &AtomicU64,
) -> RelayEnd {
    let m = metrics();
    let to_server = m
        .relay_bytes
        .with_label_values(&[backend, "client_to_server"]);
    let to_client = m
        .relay_bytes
        .with_label_values(&[backend, "server_to_client"]);
    let first = tokio::time::timeout(idle, async {
        if !pending.is_empty() {
            up.stream.write_all(pending).await?;
            up.stream.flush().await?;
            to_server.inc_by(pending.len() as u64);
            server_total.fetch_add(pending.len() as u64, Ordering::Relaxed);
        }
        if !up.leftover.is_empty() {
            client.write_all(&up.leftover).await?;
            client.flush().await?;
            to_client.inc_by(up.leftover.len() as u64);
            client_total.fetch_add(up.leftover.len() as u64, Ordering::Relaxed);
        }
        Ok::<_, io::Error>(())
    })
    .await;
    match first {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return RelayEnd::Error,
        Err(_) => return RelayEnd::Idle,
    }
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let mut a = Tracked {
        inner: client,
        epoch,
        last: &last,
        read_bytes: to_server,
        read_total: server_total,
    };
    let mut b = Tracked {
        inner: &mut up.stream,
        epoch,
        last: &last,
        read_bytes: to_client,
        read_total: client_total,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER);
    tokio::pin!(copy);
    loop {
        let quiet_since = epoch + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = tokio::time::Instant::from_std(quiet_since + idle);
        tokio::select! {
            r = &mut copy => return if r.is_ok() { RelayEnd::Closed } else { RelayEnd::Error },
            _ = tokio::time::sleep_until(deadline) => {
                let quiet = epoch + Duration::from_millis(last.load(Ordering::Relaxed));
                if quiet.elapsed() >= idle {
                    return RelayEnd::Idle;
                }
            }
            stopping = async { shutdown.wait_for(|v| *v).await.is_ok() } => {
                if stopping {
                    return RelayEnd::Shutdown;
                }
                // The sender is gone without a shutdown: nothing more to wait for.
                return match copy.await { Ok(_) => RelayEnd::Closed, Err(_) => RelayEnd::Error };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &mut Pop3Login, lines: &[&str]) -> Vec<Step> {
        let mut out = vec![m.start()];
        for l in lines {
            out.push(m.on_line(l.as_bytes()));
        }
        out
    }

    #[test]
    fn user_pass_login() {
        let mut m = Pop3Login::new("bob", "s3cret", false);
        let steps = run(
            &mut m,
            &["+OK Dovecot ready.\r\n", "+OK\r\n", "+OK Logged in.\r\n"],
        );
        assert_eq!(
            steps,
            vec![
                Step::Read,
                Step::Send(b"USER bob\r\n".to_vec()),
                Step::Send(b"PASS s3cret\r\n".to_vec()),
                Step::LoggedIn(b"+OK Logged in.\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn stls_first() {
        let mut m = Pop3Login::new("bob", "pw", true);
        assert_eq!(m.start(), Step::Read);
        assert_eq!(m.on_line(b"+OK hi\r\n"), Step::Send(b"STLS\r\n".to_vec()));
        assert_eq!(m.on_line(b"+OK Begin TLS\r\n"), Step::StartTls);
        assert_eq!(m.on_tls(), Step::Send(b"USER bob\r\n".to_vec()));
        let mut m = Pop3Login::new("bob", "pw", true);
        m.on_line(b"+OK hi\r\n");
        assert!(matches!(
            m.on_line(b"-ERR no TLS here\r\n"),
            Step::Failed(LoginError::Unavailable(t)) if t.contains("refused STLS")
        ));
    }

    #[test]
    fn wrong_password_and_response_codes() {
        for (line, want) in [
            ("-ERR [AUTH] Authentication failed.\r\n", LoginError::Auth),
            ("-ERR bad password\r\n", LoginError::Auth),
            ("-ERR [IN-USE] locked\r\n", LoginError::InUse),
            (
                "-ERR [SYS/TEMP] try later\r\n",
                LoginError::Unavailable("legacy server: [SYS/TEMP]".into()),
            ),
        ] {
            let mut m = Pop3Login::new("bob", "pw", false);
            let steps = run(&mut m, &["+OK\r\n", "+OK\r\n", line]);
            assert_eq!(steps.last(), Some(&Step::Failed(want)), "{line}");
        }
    }

    #[test]
    fn user_refused_falls_back_to_auth_plain() {
        let mut m = Pop3Login::new("bob", "pw", false);
        let steps = run(&mut m, &["+OK\r\n", "-ERR USER disabled\r\n", "+OK in\r\n"]);
        let plain = base64::engine::general_purpose::STANDARD.encode(b"\0bob\0pw");
        assert_eq!(
            steps[2],
            Step::Send(format!("AUTH PLAIN {plain}\r\n").into_bytes())
        );
        assert_eq!(steps[3], Step::LoggedIn(b"+OK in\r\n".to_vec()));
        let mut m = Pop3Login::new("bob", "pw", false);
        let steps = run(&mut m, &["+OK\r\n", "-ERR no\r\n", "-ERR [AUTH] no\r\n"]);
        assert_eq!(steps[3], Step::Failed(LoginError::Auth));
    }

    #[test]
    fn bad_greeting_and_injection_attempts() {
        let mut m = Pop3Login::new("bob", "pw", false);
        assert!(matches!(
            m.on_line(b"-ERR go away\r\n"),
            Step::Failed(LoginError::Unavailable(_))
        ));
        // A login name or password with a line break would smuggle a second command.
        let mut m = Pop3Login::new("bob\r\nDELE 1", "pw", false);
        assert_eq!(m.on_line(b"+OK\r\n"), Step::Failed(LoginError::Auth));
        let mut m = Pop3Login::new("bob", "pw\r\nDELE 1", false);
        m.on_line(b"+OK\r\n");
        assert_eq!(m.on_line(b"+OK\r\n"), Step::Failed(LoginError::Auth));
        // Garbage instead of a status line is a server failure, not a wrong password.
        let mut m = Pop3Login::new("bob", "pw", false);
        m.on_line(b"+OK\r\n");
        m.on_line(b"+OK\r\n");
        assert!(matches!(
            m.on_line(b"* OK imap?\r\n"),
            Step::Failed(LoginError::Unavailable(_))
        ));
    }

    /// A scripted legacy server: greeting, USER, PASS (accepting only `pw`), then an echo of
    /// every line prefixed with `>`. Returns its port.
    async fn legacy_server() -> u16 {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut r = tokio::io::BufReader::new(r);
                    w.write_all(b"+OK legacy ready\r\n").await.unwrap();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let reply = match line.trim_end() {
                            l if l.starts_with("USER ") => "+OK\r\n".to_owned(),
                            "PASS pw" => "+OK legacy says hello\r\n".to_owned(),
                            l if l.starts_with("PASS ") => "-ERR [AUTH] no\r\n".to_owned(),
                            "QUIT" => {
                                let _ = w.write_all(b"+OK bye\r\n").await;
                                return;
                            }
                            l => format!(">{l}\r\n"),
                        };
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    fn backend(port: u16) -> Pop3Backend {
        let c: Pop3BackendConfig = toml::from_str(&format!(
            "host = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\ncommand_timeout_secs = 5"
        ))
        .unwrap();
        Pop3Backend::new("legacy", &c).unwrap()
    }

    #[tokio::test]
    async fn driver_logs_in_relays_pipelined_bytes_and_ends_on_quit() {
        let b = backend(legacy_server().await);
        assert_eq!(b.login("bob", "wrong").await.err(), Some(LoginError::Auth));
        b.check_password("bob", "pw").await.unwrap();
        let up = b.login("bob", "pw").await.unwrap();
        assert_eq!(up.ok_line, b"+OK legacy says hello\r\n");
        let (mut client, mut ours) = tokio::io::duplex(64);
        let (_tx, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            relay(
                &mut ours,
                up,
                b"STAT\r\n",
                "legacy",
                Duration::from_secs(5),
                &mut rx,
            )
            .await
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b">STAT\r\n") {
            let n = client.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        // More than one relay buffer's worth, through a 64-byte pipe.
        let long = format!("NOOP {}\r\n", "x".repeat(40_000));
        client.write_all(long.as_bytes()).await.unwrap();
        client.write_all(b"QUIT\r\n").await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, format!(">{}+OK bye\r\n", long).into_bytes());
        drop(client);
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Closed);
        assert_eq!(stats.to_server, (6 + long.len() + 6) as u64);
        assert_eq!(
            stats.to_client,
            (">STAT\r\n".len() + 1 + long.len() + "+OK bye\r\n".len()) as u64
        );
    }

    #[tokio::test]
    async fn relay_ends_when_idle_or_on_shutdown() {
        let b = backend(legacy_server().await);
        let up = b.login("bob", "pw").await.unwrap();
        let (mut client, mut ours) = tokio::io::duplex(1024);
        let (_tx, mut rx) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let end = relay(
            &mut ours,
            up,
            b"",
            "legacy",
            Duration::from_millis(300),
            &mut rx,
        )
        .await;
        assert_eq!(end.end, RelayEnd::Idle);
        assert!(started.elapsed() >= Duration::from_millis(300));

        // Traffic keeps it alive; the shutdown signal ends it.
        let up = b.login("bob", "pw").await.unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            relay(
                &mut ours,
                up,
                b"",
                "legacy",
                Duration::from_millis(300),
                &mut rx,
            )
            .await
        });
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.write_all(b"NOOP\r\n").await.unwrap();
            let mut buf = [0u8; 16];
            let n = client.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b">NOOP\r\n");
        }
        assert!(!task.is_finished());
        tx.send_replace(true);
        assert_eq!(task.await.unwrap().end, RelayEnd::Shutdown);
    }

    /// Routes every login to the scripted legacy server.
    struct Legacy(Pop3Backend);

    impl crate::pop3::connection::Upstream for Legacy {
        type Maildrop = crate::maildrop::MemoryMaildrop;

        async fn route(
            &self,
            user: &str,
            password: &str,
        ) -> crate::pop3::connection::Routed<crate::maildrop::MemoryMaildrop> {
            crate::pop3::connection::Routed {
                backend: Some(self.0.name.clone()),
                result: self
                    .0
                    .login(user, password)
                    .await
                    .map(|r| crate::pop3::connection::Opened::Relay(Box::new(r)))
                    .map_err(Into::into),
            }
        }
    }

    #[tokio::test]
    async fn session_hands_over_to_the_relay_with_what_was_pipelined() {
        use crate::pop3::connection::{serve, ConnectionLimits, MaildropLocks, SessionOutcome};
        let up = Legacy(backend(legacy_server().await));
        let (client, ours) = tokio::io::duplex(4096);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let cfg = Arc::new(crate::pop3::SessionConfig::default());
        let task = tokio::spawn(async move {
            serve(
                ours,
                &up,
                &MaildropLocks::new(),
                &cfg,
                &ConnectionLimits::default(),
                rx,
            )
            .await
        });
        let mut client = tokio::io::BufReader::new(client);
        let mut line = String::new();
        let mut next = async |c: &mut tokio::io::BufReader<tokio::io::DuplexStream>| {
            line.clear();
            tokio::io::AsyncBufReadExt::read_line(c, &mut line)
                .await
                .unwrap();
            line.clone()
        };
        assert!(next(&mut client).await.starts_with("+OK popbridge"));
        // A wrong password is popbridge's -ERR [AUTH]; the session goes on.
        client
            .get_mut()
            .write_all(b"USER bob\r\nPASS nope\r\n")
            .await
            .unwrap();
        assert_eq!(next(&mut client).await, "+OK\r\n");
        assert!(next(&mut client).await.starts_with("-ERR [AUTH]"));
        // Login and two commands in one write: the commands go to the legacy server.
        client
            .get_mut()
            .write_all(b"USER bob\r\nPASS pw\r\nSTAT\r\nUIDL\r\n")
            .await
            .unwrap();
        assert_eq!(next(&mut client).await, "+OK\r\n");
        assert_eq!(next(&mut client).await, "+OK legacy says hello\r\n");
        assert_eq!(next(&mut client).await, ">STAT\r\n");
        assert_eq!(next(&mut client).await, ">UIDL\r\n");
        client.get_mut().write_all(b"QUIT\r\n").await.unwrap();
        assert_eq!(next(&mut client).await, "+OK bye\r\n");
        drop(client);
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    }
}
