//! Passthrough to a legacy POP3 server (`kind = "pop3"` backends): popbridge logs in there with
//! the client's (rewritten) login and password, through the upstream layer's POP3 client, and
//! from then on relays bytes both ways ([`relay`]: bounded buffers, idle timeout, shutdown).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::config::Pop3BackendConfig;
use crate::maildrop::MaildropError;
use crate::metrics::metrics;
use crate::upstream::pop3::{LoginRefusal, Pop3Client, Pop3Error};
use crate::upstream::{AsyncStream, Endpoint, Protocol, SetupError};

/// Size of each direction's relay buffer.
pub const RELAY_BUFFER: usize = 16 * 1024;

/// Why a login at the legacy server failed, and what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The server refused the credentials: `-ERR [AUTH]`.
    #[error("credentials refused")]
    Auth,
    /// The server says the maildrop is locked: `-ERR [IN-USE]`.
    #[error("maildrop in use at the legacy server")]
    InUse,
    /// The server says the user logged in too recently (`-ERR [LOGIN-DELAY]`).
    #[error("the legacy server's LOGIN-DELAY")]
    LoginDelay,
    /// The server is not working (`-ERR [SYS/TEMP]`, a bad greeting, STLS refused): the client
    /// gets `-ERR [SYS/TEMP]`.
    #[error("{0}")]
    Unavailable(String),
}

impl From<Pop3Error> for LoginError {
    fn from(e: Pop3Error) -> LoginError {
        match e.login_refusal() {
            LoginRefusal::Auth => LoginError::Auth,
            LoginRefusal::InUse => LoginError::InUse,
            LoginRefusal::LoginDelay => LoginError::LoginDelay,
            LoginRefusal::Unavailable => LoginError::Unavailable(format!("legacy server: {e}")),
        }
    }
}

impl From<LoginError> for MaildropError {
    fn from(e: LoginError) -> MaildropError {
        match e {
            LoginError::Auth => MaildropError::Auth,
            LoginError::InUse => MaildropError::InUse,
            LoginError::LoginDelay => {
                MaildropError::busy(crate::maildrop::Signal::Throttled, "legacy server")
            }
            LoginError::Unavailable(m) => MaildropError::unavailable(m),
        }
    }
}

/// A logged-in session at the legacy server, ready to be relayed.
pub struct Relayed {
    pub stream: Box<dyn AsyncStream>,
    /// The server's `+OK` answer to the login, for the client.
    pub ok_line: Vec<u8>,
    /// Bytes the server sent after that line (none from a well-behaved server).
    pub leftover: Vec<u8>,
}

/// One `kind = "pop3"` backend: where it is and how to reach it.
pub struct Pop3Backend {
    pub name: Arc<str>,
    endpoint: Endpoint,
}

impl Pop3Backend {
    pub fn new(name: &str, c: &Pop3BackendConfig) -> Result<Pop3Backend, SetupError> {
        Ok(Pop3Backend {
            name: Arc::from(name),
            endpoint: Endpoint::new(Protocol::Pop3, &c.endpoint())?,
        })
    }

    /// Connect and log in with `user` and `password`.
    pub async fn login(&self, user: &str, password: &str) -> Result<Relayed, LoginError> {
        let mut client = Pop3Client::connect(&self.endpoint).await?;
        match client.login(user, password).await {
            Ok(ok_line) => {
                let (stream, leftover) = client.into_parts();
                Ok(Relayed {
                    stream,
                    ok_line,
                    leftover,
                })
            }
            Err(e) => {
                client.quit().await;
                Err(e.into())
            }
        }
    }

    /// Check a password: log in and QUIT (for `verify_password_with`).
    pub async fn check_password(&self, user: &str, password: &str) -> Result<(), LoginError> {
        let mut client = Pop3Client::connect(&self.endpoint).await?;
        let r = client.login(user, password).await;
        client.quit().await;
        r.map(|_| ()).map_err(Into::into)
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
    use tokio::io::AsyncReadExt;

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

    impl crate::pop3::routed::Upstream for Legacy {
        type Maildrop = crate::maildrop::memory::MemoryMaildrop;

        async fn route(
            &self,
            user: &str,
            credential: crate::maildrop::Credential<'_>,
        ) -> crate::pop3::routed::Routed<crate::maildrop::memory::MemoryMaildrop> {
            let crate::maildrop::Credential::Password(password) = credential else {
                return crate::pop3::routed::Routed {
                    backend: None,
                    gated: None,
                    result: Err(MaildropError::Auth),
                };
            };
            crate::pop3::routed::Routed {
                backend: Some(self.0.name.clone()),
                gated: None,
                result: self
                    .0
                    .login(user, password)
                    .await
                    .map(|r| crate::pop3::routed::Opened::Relay(Box::new(r)))
                    .map_err(Into::into),
            }
        }
    }

    #[tokio::test]
    async fn session_hands_over_to_the_relay_with_what_was_pipelined() {
        use crate::pop3::connection::{serve, ConnectionLimits, SessionOutcome};
        use crate::pop3::locks::MaildropLocks;
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
