//! The thin tokio driver: moves bytes between the client and the [`Session`], performs its
//! [`Action`]s against the upstream, and streams message bodies chunk by chunk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::command::LineBuffer;
use super::locks::{MaildropLock, MaildropLocks};
use super::relay::{self, Relayed};
use super::routed::Upstream;
use super::session::{Action, Security, Session, SessionConfig};
use super::stream::ClientStream;
use crate::limits::AuthPenalty;
use crate::maildrop::{Maildrop, MaildropError};
use crate::metrics::{command_label, metrics};
use std::net::IpAddr;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// RFC 1939 autologout: no complete read or write progress for this long closes the
    /// connection without committing.
    pub idle_timeout: Duration,
    /// Octets asked of the upstream per fetch, unless the session's backend sets its own.
    pub fetch_chunk: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(600),
            fetch_chunk: 256 * 1024,
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutcome {
    /// The client sent QUIT.
    Quit,
    /// Idle timeout (read or write).
    Timeout,
    /// The client closed the connection or a write failed.
    ClientGone,
    /// The upstream failed in a way the session cannot recover from.
    UpstreamError,
    /// The server is shutting down.
    Shutdown,
    /// The error cap was reached.
    TooManyErrors,
}

impl SessionOutcome {
    /// The `outcome` label of `popbridge_sessions_ended_total` (one of
    /// [`crate::metrics::OUTCOMES`]).
    pub fn label(self) -> &'static str {
        match self {
            SessionOutcome::Quit => "quit",
            SessionOutcome::Timeout => "timeout",
            SessionOutcome::ClientGone => "client_gone",
            SessionOutcome::UpstreamError => "upstream_error",
            SessionOutcome::Shutdown => "shutdown",
            SessionOutcome::TooManyErrors => "too_many_errors",
        }
    }
}

/// Resolves when shutdown is signalled; never, if the sender is gone without signalling.
async fn wait_shutdown(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How long a session closed by a stopping server may take to say goodbye (TLS close_notify
/// to the client, LOGOUT upstream) before its connections are just dropped.
const STOP_GOODBYE: Duration = Duration::from_millis(500);

/// How many following messages the maildrop is told about before a RETR/TOP (its read-ahead
/// is bounded in bytes; this only caps the count, see ImapMaildrop::stream_budget).
pub(super) const READ_AHEAD_MESSAGES: usize = 512;

/// Flush the output buffer when it grows past this while streaming a body.
pub(super) const FLUSH_AT: usize = 64 * 1024;

pub(super) enum Flow {
    Continue,
    End(SessionOutcome),
    /// Write what is queued for the client, then end.
    EndAfterFlush(SessionOutcome),
    /// STLS was answered with +OK: switch to TLS before reading another byte.
    StartTls,
    /// Logged in at a legacy POP3 server: relay everything from now on.
    Relay(Box<Relayed>, Arc<str>),
}

/// What a listener offers one client: TLS, whether passwords may cross without it, and the
/// limits that bound how long an unauthenticated client may stay and how fast it may guess.
#[derive(Clone)]
pub struct ClientPolicy {
    /// Acceptor for STLS on a plain connection; `None` means STLS is not offered.
    pub stls: Option<TlsAcceptor>,
    /// Whether policy allows USER/PASS and AUTH PLAIN on this connection without TLS.
    pub plaintext_auth: bool,
    /// Deadline for the TLS handshake after STLS.
    pub handshake_timeout: Duration,
    /// From connect to a successful login, however busy the client keeps the line.
    pub auth_timeout: Duration,
    /// The client's address, for the login penalty.
    pub peer: Option<IpAddr>,
    /// Growing delay after failed logins; `None` disables it.
    pub penalty: Option<Arc<AuthPenalty>>,
}

impl Default for ClientPolicy {
    /// No TLS, passwords allowed, no penalty: a trusted network (and the unit tests).
    fn default() -> Self {
        ClientPolicy {
            stls: None,
            plaintext_auth: true,
            handshake_timeout: Duration::from_secs(60),
            auth_timeout: Duration::from_secs(60),
            peer: None,
            penalty: None,
        }
    }
}

/// The header part of a TOP's first piece at the start of a session: most headers are a few
/// KiB, and a server reads (and sends) the whole piece of every message previewed, so a
/// shorter piece is less work on both sides (issue 17: in the previews benchmark popbridge's
/// CPU a quarter lower than with 16 KiB, Dovecot's a tenth; see docs/performance.md).
pub(super) const TOP_HEADER_SHORT: u32 = 8 * 1024;
/// ... and once a TOP of the session needed more than its first piece (a second FETCH for the
/// rest of its header, a round trip on a distant server), the longer piece from then on.
pub(super) const TOP_HEADER_LONG: u32 = 16 * 1024;

pub(super) struct Conn<'a, IO, U: Upstream> {
    /// Octets asked of the upstream per piece: the session's backend's.
    pub(super) fetch_chunk: u32,
    /// The header part of a TOP's first piece (see `retrieve::top_first_piece`): short until
    /// a header in this session turned out longer.
    pub(super) top_header: u32,
    pub(super) io: ClientStream<IO>,
    pub(super) tls: &'a ClientPolicy,
    pub(super) out: Vec<u8>,
    pub(super) upstream: &'a U,
    pub(super) locks: &'a MaildropLocks,
    pub(super) cfg: &'a Arc<SessionConfig>,
    pub(super) limits: &'a ConnectionLimits,
    pub(super) session: Session,
    pub(super) user: Option<String>,
    pub(super) maildrop: Option<(U::Maildrop, MaildropLock)>,
    /// Whether the answer to the command being handled began with +OK (for metrics).
    pub(super) reply_ok: Option<bool>,
    pub(super) stats: SessionStats,
    /// The logged-in user's place at the login gate (FETCH-time pressure starts a backoff).
    pub(super) gated: Option<super::routed::Gated>,
}

/// What one session did, for its summary log line.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SessionStats {
    pub(super) retrieved: u32,
    pub(super) bytes_sent: u64,
    pub(super) deleted: usize,
}

/// Serves one plain client connection, no TLS on offer, passwords allowed.
pub async fn serve<IO, U>(
    io: IO,
    upstream: &U,
    locks: &MaildropLocks,
    cfg: &Arc<SessionConfig>,
    limits: &ConnectionLimits,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> SessionOutcome
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    U: Upstream,
{
    let tls = ClientPolicy::default();
    let io = ClientStream::Plain(io);
    serve_client(io, &tls, upstream, locks, cfg, limits, shutdown).await
}

/// Serves one client connection (plain or TLS) to its end. Deletions are committed only after
/// QUIT.
pub async fn serve_client<IO, U>(
    io: ClientStream<IO>,
    tls: &ClientPolicy,
    upstream: &U,
    locks: &MaildropLocks,
    cfg: &Arc<SessionConfig>,
    limits: &ConnectionLimits,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> SessionOutcome
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    U: Upstream,
{
    let security = Security {
        tls: io.is_tls(),
        stls: tls.stls.is_some() && !io.is_tls(),
        plaintext_auth: tls.plaintext_auth,
    };
    let mut conn = Conn {
        io,
        tls,
        out: Vec::new(),
        upstream,
        locks,
        cfg,
        limits,
        session: Session::new(Arc::clone(cfg)).with_security(security),
        fetch_chunk: limits.fetch_chunk,
        top_header: TOP_HEADER_SHORT,
        user: None,
        maildrop: None,
        reply_ok: None,
        stats: SessionStats::default(),
        gated: None,
    };
    let started = Instant::now();
    // Between commands the session ends itself on `shutdown` (the kill at the end of a drain);
    // wherever else it waits (writing to a client that stopped reading, an upstream answer, a
    // commit) it is cut there: nothing applied, the connections dropped without a goodbye.
    let mut kill = shutdown.clone();
    let (outcome, cut) = tokio::select! {
        biased;
        o = conn.run(shutdown) => (o, false),
        () = wait_shutdown(&mut kill) => (SessionOutcome::Shutdown, true),
    };
    // A stopping server closes at once: the client first, and the goodbyes bounded.
    let stopping = outcome == SessionOutcome::Shutdown;
    if !cut {
        if stopping {
            let _ = tokio::time::timeout(STOP_GOODBYE, conn.io.shutdown()).await;
        } else {
            let _ = conn.io.shutdown().await;
        }
    }
    if let Some((md, _lock)) = conn.maildrop.take() {
        // No commit: only QUIT commits, and it already closed the maildrop. A cut session's
        // upstream connection may be in the middle of a command: dropped, not logged out.
        if stopping && !cut {
            let _ = tokio::time::timeout(STOP_GOODBYE, md.close()).await;
        } else if !cut {
            md.close().await;
        }
    }
    let SessionStats {
        retrieved,
        bytes_sent,
        deleted,
    } = conn.stats;
    info!(
        user = conn.user.as_deref().unwrap_or("-"),
        ?outcome,
        duration_ms = started.elapsed().as_millis() as u64,
        cut,
        retrieved,
        bytes_sent,
        deleted,
        "pop3 session ended"
    );
    outcome
}

impl<IO, U> Conn<'_, IO, U>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    U: Upstream,
{
    async fn run(&mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) -> SessionOutcome {
        self.out = self.session.greeting();
        if let Err(o) = self.flush().await {
            return o;
        }
        let mut lines = LineBuffer::new();
        let mut buf = vec![0u8; 16 * 1024];
        let auth_deadline = Instant::now() + self.tls.auth_timeout;
        let mut last_command = Instant::now();
        loop {
            lines.set_limit(self.session.max_line_len());
            while let Some(line) = lines.next_line() {
                let started = Instant::now();
                last_command = started;
                // A line while a SASL continuation is awaited is part of AUTH.
                let in_sasl = self.session.awaits_sasl_response();
                let (action, label) = match line {
                    Ok(mut l) => {
                        let label = if in_sasl { "AUTH" } else { command_label(&l) };
                        let a = self.session.on_line(Ok(&l));
                        // The line may have carried a password.
                        l.iter_mut().for_each(|b| *b = 0);
                        (a, label)
                    }
                    Err(e) => (self.session.on_line(Err(e)), "OTHER"),
                };
                self.reply_ok = None;
                let flow = self.perform(action).await;
                let m = metrics();
                let outcome = if self.reply_ok == Some(true) {
                    "ok"
                } else {
                    "err"
                };
                m.commands.with_label_values(&[label, outcome]).inc();
                m.command_duration
                    .with_label_values(&[label])
                    .observe(started.elapsed().as_secs_f64());
                match flow {
                    Flow::Continue => {}
                    Flow::End(o) => return o,
                    Flow::EndAfterFlush(o) => {
                        let _ = self.flush().await;
                        return o;
                    }
                    Flow::Relay(up, backend) => {
                        // What the client pipelined behind its login belongs to the relayed
                        // session.
                        let mut pending = lines.take_buffered();
                        let stats = relay::relay(
                            &mut self.io,
                            *up,
                            &pending,
                            &backend,
                            self.limits.idle_timeout,
                            &mut shutdown,
                        )
                        .await;
                        pending.iter_mut().for_each(|b| *b = 0);
                        let m = metrics();
                        m.relay_sessions
                            .with_label_values(&[&backend, stats.end.label()])
                            .inc();
                        m.client_sent_bytes.inc_by(stats.to_client);
                        self.stats.bytes_sent += stats.to_client;
                        info!(
                            backend = %backend,
                            end = stats.end.label(),
                            to_server = stats.to_server,
                            to_client = stats.to_client,
                            "relayed session ended"
                        );
                        return match stats.end {
                            relay::RelayEnd::Closed => SessionOutcome::Quit,
                            relay::RelayEnd::Idle => SessionOutcome::Timeout,
                            relay::RelayEnd::Shutdown => SessionOutcome::Shutdown,
                            relay::RelayEnd::Error => SessionOutcome::ClientGone,
                        };
                    }
                    Flow::StartTls => {
                        // Whatever the client pipelined behind STLS was sent in the clear and
                        // must not be executed as if it came through TLS (CVE-2011-0411).
                        let discarded = lines.buffered();
                        if discarded > 0 {
                            info!(discarded, "discarded bytes pipelined after STLS");
                        }
                        lines = LineBuffer::new();
                        if let Err(o) = self.start_tls().await {
                            return o;
                        }
                        self.session.on_tls_established();
                    }
                }
                lines.set_limit(self.session.max_line_len());
            }
            if let Err(o) = self.flush().await {
                return o;
            }
            if *shutdown.borrow() {
                return SessionOutcome::Shutdown;
            }
            let room = lines.room().min(buf.len());
            // Idle time counts from the last complete command, not the last byte, so a client
            // trickling a byte at a time cannot hold its slot; before login the whole
            // authorization phase has a deadline too.
            let mut wait = self
                .limits
                .idle_timeout
                .saturating_sub(last_command.elapsed());
            if !self.session.is_authenticated() {
                wait = wait.min(auth_deadline.saturating_duration_since(Instant::now()));
            }
            let n = tokio::select! {
                r = tokio::time::timeout(wait, self.io.read(&mut buf[..room])) => match r {
                    Err(_) => return SessionOutcome::Timeout,
                    Ok(Err(_)) | Ok(Ok(0)) => return SessionOutcome::ClientGone,
                    Ok(Ok(n)) => n,
                },
                _ = wait_shutdown(&mut shutdown) => return SessionOutcome::Shutdown,
            };
            lines.push(&buf[..n]);
            buf[..n].iter_mut().for_each(|b| *b = 0);
        }
    }

    /// Hand the plain connection to a TLS handshake and continue over TLS.
    async fn start_tls(&mut self) -> Result<(), SessionOutcome> {
        let Some(acceptor) = self.tls.stls.clone() else {
            return Err(SessionOutcome::ClientGone);
        };
        let ClientStream::Plain(plain) = std::mem::replace(&mut self.io, ClientStream::Detached)
        else {
            return Err(SessionOutcome::ClientGone);
        };
        match tokio::time::timeout(self.tls.handshake_timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => {
                self.io = ClientStream::Tls(Box::new(tls));
                debug!("STLS handshake done");
                Ok(())
            }
            Ok(Err(e)) => {
                info!(error = %e, "STLS handshake failed");
                Err(SessionOutcome::ClientGone)
            }
            Err(_) => Err(SessionOutcome::Timeout),
        }
    }

    /// Queue reply bytes for the client, noting whether the command's answer is +OK.
    pub(super) fn emit(&mut self, bytes: &[u8]) {
        if self.reply_ok.is_none() {
            self.reply_ok = bytes.first().map(|&b| b == b'+');
        }
        self.out.extend_from_slice(bytes);
    }

    pub(super) async fn flush(&mut self) -> Result<(), SessionOutcome> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.out).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.limits.idle_timeout, write).await {
            Err(_) => Err(SessionOutcome::Timeout),
            Ok(Err(_)) => Err(SessionOutcome::ClientGone),
            Ok(Ok(())) => {
                metrics().client_sent_bytes.inc_by(self.out.len() as u64);
                self.stats.bytes_sent += self.out.len() as u64;
                self.out.clear();
                Ok(())
            }
        }
    }

    async fn perform(&mut self, action: Action) -> Flow {
        match action {
            Action::Reply(b) => {
                self.emit(&b);
                Flow::Continue
            }
            Action::Close(b) => {
                self.emit(&b);
                let _ = self.flush().await;
                Flow::End(if self.session.error_limit_reached() {
                    SessionOutcome::TooManyErrors
                } else {
                    SessionOutcome::Quit
                })
            }
            // Boxed: the login's deep future (routing, connect, TLS, listing) is only held
            // while it runs, not in every idle session's task for its whole life.
            Action::Login { user, secret } => Box::pin(self.login(user, secret)).await,
            Action::StartTls(b) => {
                self.emit(&b);
                match self.flush().await {
                    Ok(()) => Flow::StartTls,
                    Err(o) => Flow::End(o),
                }
            }
            Action::Retrieve {
                msg,
                uid,
                size,
                top_lines,
                ok_line,
            } => Box::pin(self.retrieve(msg, uid, size, top_lines, ok_line)).await,
            Action::Commit { uids } => Box::pin(self.commit(uids)).await,
        }
    }

    /// QUIT: apply the marks, close the maildrop, answer and end.
    async fn commit(&mut self, uids: Vec<u32>) -> Flow {
        let result = match self.maildrop.take() {
            Some((mut md, lock)) => {
                let r = md.commit(&uids).await;
                if r.is_ok() {
                    self.stats.deleted = uids.len();
                }
                if let Err(e) = &r {
                    warn!(user = self.user.as_deref().unwrap_or("-"), error = %crate::errors::Chain(e), "commit failed");
                }
                if let (Err(MaildropError::Busy { signal, .. }), Some(g)) = (&r, &self.gated) {
                    g.pressure(*signal);
                }
                md.close().await;
                drop(lock);
                r
            }
            None => Err(MaildropError::unavailable("no maildrop")),
        };
        let reply = self.session.on_commit(result);
        self.emit(&reply);
        let _ = self.flush().await;
        Flow::End(SessionOutcome::Quit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maildrop::memory::{MemoryEvent, MemoryUpstream};
    use crate::maildrop::MaildropKey;
    use crate::pop3::routed::{Unrouted, UNROUTED_SERVER};

    /// The maildrop an unrouted `BoB` (any case) logs in to.
    fn bob() -> MaildropKey {
        MaildropKey::new(UNROUTED_SERVER, "BoB", "INBOX")
    }
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    struct Client {
        rd: BufReader<ReadHalf<DuplexStream>>,
        wr: WriteHalf<DuplexStream>,
    }

    impl Client {
        async fn send(&mut self, s: &str) {
            self.wr.write_all(s.as_bytes()).await.unwrap();
        }

        async fn line(&mut self) -> String {
            let mut l = Vec::new();
            self.rd.read_until(b'\n', &mut l).await.unwrap();
            String::from_utf8(l).unwrap()
        }

        async fn cmd(&mut self, s: &str) -> String {
            self.send(&format!("{s}\r\n")).await;
            self.line().await
        }

        /// Lines of a multi-line body (after the status line), raw, up to and excluding ".".
        async fn body(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            loop {
                let mut l = Vec::new();
                self.rd.read_until(b'\n', &mut l).await.unwrap();
                assert!(l.ends_with(b"\r\n"), "unterminated line {l:?}");
                if l == b".\r\n" {
                    return out;
                }
                out.extend_from_slice(&l);
            }
        }

        async fn eof(&mut self) -> bool {
            let mut l = Vec::new();
            matches!(self.rd.read_until(b'\n', &mut l).await, Ok(0))
        }
    }

    struct Harness {
        up: MemoryUpstream,
        locks: MaildropLocks,
        cfg: Arc<SessionConfig>,
        limits: ConnectionLimits,
        shutdown: watch::Sender<bool>,
    }

    impl Harness {
        fn new() -> Self {
            let up = MemoryUpstream::new();
            up.add_user("bob", "pw", 0x6b08_0e83);
            up.add_message("bob", 1, &b"Subject: one\r\n\r\nfirst\r\n"[..]);
            up.add_message("bob", 4, &b"Subject: two\r\n\r\n.dot\r\nsecond\r\n"[..]);
            up.add_message("bob", 7, &b"Subject: three\r\n\r\nthird\r\n"[..]);
            Self {
                up,
                locks: MaildropLocks::new(),
                cfg: Arc::new(SessionConfig {
                    mark_seen: true,
                    ..SessionConfig::default()
                }),
                limits: ConnectionLimits {
                    idle_timeout: Duration::from_secs(5),
                    fetch_chunk: 64 * 1024,
                },
                shutdown: watch::channel(false).0,
            }
        }

        async fn connect(&self) -> (Client, JoinHandle<SessionOutcome>) {
            let (client, server) = tokio::io::duplex(8 * 1024);
            let (up, locks, cfg, limits) = (
                Unrouted(self.up.clone()),
                self.locks.clone(),
                Arc::clone(&self.cfg),
                self.limits.clone(),
            );
            let rx = self.shutdown.subscribe();
            let task =
                tokio::spawn(async move { serve(server, &up, &locks, &cfg, &limits, rx).await });
            let (rd, wr) = tokio::io::split(client);
            let mut c = Client {
                rd: BufReader::new(rd),
                wr,
            };
            assert_eq!(c.line().await, "+OK popbridge ready.\r\n");
            (c, task)
        }

        async fn login(&self) -> (Client, JoinHandle<SessionOutcome>) {
            let (mut c, t) = self.connect().await;
            assert_eq!(c.cmd("USER bob").await, "+OK\r\n");
            assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
            (c, t)
        }
    }

    #[test]
    fn outcome_labels_are_the_preinitialised_ones() {
        use SessionOutcome::*;
        for o in [
            Quit,
            Timeout,
            ClientGone,
            UpstreamError,
            Shutdown,
            TooManyErrors,
        ] {
            assert!(crate::metrics::OUTCOMES.contains(&o.label()), "{o:?}");
        }
    }

    #[tokio::test]
    async fn full_session() {
        let h = Harness::new();
        let (mut c, task) = h.connect().await;
        assert_eq!(c.cmd("USER bob").await, "+OK\r\n");
        assert_eq!(
            c.cmd("PASS wrong").await,
            "-ERR [AUTH] Authentication failed.\r\n"
        );
        assert_eq!(c.cmd("STAT").await.get(..4), Some("-ERR"));
        assert_eq!(c.cmd("USER BOB").await, "+OK\r\n");
        assert!(c.cmd("PASS pw").await.starts_with("-ERR [AUTH]"));
        assert_eq!(c.cmd("USER bob").await, "+OK\r\n");
        assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
        assert_eq!(c.cmd("STAT").await, "+OK 3 78\r\n");
        assert_eq!(c.cmd("LIST").await, "+OK 3 messages (78 octets)\r\n");
        assert_eq!(c.body().await, b"1 23\r\n2 30\r\n3 25\r\n");
        assert_eq!(c.cmd("UIDL").await, "+OK\r\n");
        assert_eq!(
            c.body().await,
            b"1 000000016b080e83\r\n2 000000046b080e83\r\n3 000000076b080e83\r\n"
        );
        assert_eq!(c.cmd("RETR 2").await, "+OK 30 octets\r\n");
        assert_eq!(c.body().await, b"Subject: two\r\n\r\n..dot\r\nsecond\r\n");
        assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted\r\n");
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert!(c.eof().await);
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        assert_eq!(h.up.commits("bob"), vec![vec![1]]);
        assert_eq!(h.up.seen("bob"), vec![4]);
        assert_eq!(h.up.uids("bob"), vec![4, 7]);
        assert!(!h.locks.is_locked(&bob()));
        assert_eq!(h.up.events("bob").last(), Some(&MemoryEvent::Close));
    }

    #[tokio::test]
    async fn pipelining_fifty_commands_in_one_write() {
        let h = Harness::new();
        let (mut c, task) = h.login().await;
        let mut batch = String::new();
        for i in 0..50 {
            batch.push_str(match i % 5 {
                0 => "STAT\r\n",
                1 => "LIST 2\r\n",
                2 => "RETR 3\r\n",
                3 => "NOOP\r\n",
                _ => "UIDL 1\r\n",
            });
        }
        c.send(&batch).await;
        for i in 0..50 {
            let l = c.line().await;
            match i % 5 {
                0 => assert_eq!(l, "+OK 3 78\r\n"),
                1 => assert_eq!(l, "+OK 2 30\r\n"),
                2 => {
                    assert_eq!(l, "+OK 25 octets\r\n");
                    assert_eq!(c.body().await, b"Subject: three\r\n\r\nthird\r\n");
                }
                3 => assert_eq!(l, "+OK\r\n"),
                _ => assert_eq!(l, "+OK 1 000000016b080e83\r\n"),
            }
        }
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        assert_eq!(h.up.seen("bob"), vec![7; 10]);
    }

    #[tokio::test]
    async fn dele_rset_quit_commits_only_marked() {
        let h = Harness::new();
        let (mut c, task) = h.login().await;
        assert!(c.cmd("DELE 1").await.starts_with("+OK"));
        assert!(c.cmd("DELE 2").await.starts_with("+OK"));
        assert_eq!(c.cmd("STAT").await, "+OK 1 25\r\n");
        assert_eq!(
            c.cmd("RSET").await,
            "+OK maildrop has 3 messages (78 octets)\r\n"
        );
        assert!(c.cmd("DELE 3").await.starts_with("+OK"));
        assert_eq!(c.cmd("DELE 3").await, "-ERR message 3 already deleted\r\n");
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        assert_eq!(h.up.commits("bob"), vec![vec![7]]);
        assert_eq!(h.up.uids("bob"), vec![1, 4]);
    }

    #[tokio::test]
    async fn failed_commit_reports_sys_temp() {
        let h = Harness::new();
        h.up.fail_commit("bob", MaildropError::unavailable("boom"));
        let (mut c, task) = h.login().await;
        c.cmd("DELE 1").await;
        assert_eq!(
            c.cmd("QUIT").await,
            "-ERR [SYS/TEMP] some deleted messages not removed\r\n"
        );
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        assert_eq!(h.up.uids("bob"), vec![1, 4, 7]);
    }

    #[tokio::test]
    async fn dropped_connection_commits_nothing() {
        let h = Harness::new();
        let (mut c, task) = h.login().await;
        assert!(c.cmd("DELE 1").await.starts_with("+OK"));
        assert!(h.locks.is_locked(&bob()));
        drop(c);
        assert_eq!(task.await.unwrap(), SessionOutcome::ClientGone);
        assert!(h.up.commits("bob").is_empty());
        assert_eq!(h.up.uids("bob"), vec![1, 4, 7]);
        assert_eq!(h.up.events("bob").last(), Some(&MemoryEvent::Close));
        assert!(!h.locks.is_locked(&bob()));
    }

    #[tokio::test]
    async fn idle_timeout_closes_without_commit() {
        let mut h = Harness::new();
        h.limits.idle_timeout = Duration::from_millis(100);
        let (mut c, task) = h.login().await;
        assert!(c.cmd("DELE 1").await.starts_with("+OK"));
        let outcome = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome, SessionOutcome::Timeout);
        assert!(c.eof().await);
        assert!(h.up.commits("bob").is_empty());
    }

    #[tokio::test]
    async fn shutdown_closes_without_commit() {
        let h = Harness::new();
        let (mut c, task) = h.login().await;
        assert!(c.cmd("DELE 1").await.starts_with("+OK"));
        h.shutdown.send_replace(true);
        assert_eq!(task.await.unwrap(), SessionOutcome::Shutdown);
        assert!(h.up.commits("bob").is_empty());
    }

    #[tokio::test]
    async fn second_session_gets_in_use() {
        let h = Harness::new();
        let (mut a, task_a) = h.login().await;
        let (mut b, task_b) = h.connect().await;
        assert_eq!(b.cmd("USER Bob").await, "+OK\r\n");
        // Upstream accepts "Bob"? No: memory users are case-sensitive, so use the real name.
        assert!(b.cmd("PASS pw").await.starts_with("-ERR [AUTH]"));
        assert_eq!(b.cmd("USER bob").await, "+OK\r\n");
        assert!(b.cmd("PASS pw").await.starts_with("-ERR [IN-USE]"));
        // The refused session's upstream maildrop was closed: two logins ok, one close so far.
        let closes = |h: &Harness| {
            h.up.events("bob")
                .iter()
                .filter(|e| **e == MemoryEvent::Close)
                .count()
        };
        assert_eq!(closes(&h), 1);
        assert_eq!(a.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task_a.await.unwrap(), SessionOutcome::Quit);
        // Released: now b can log in.
        assert_eq!(b.cmd("USER bob").await, "+OK\r\n");
        assert_eq!(b.cmd("PASS pw").await, "+OK Logged in.\r\n");
        assert_eq!(b.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task_b.await.unwrap(), SessionOutcome::Quit);
    }

    #[tokio::test]
    async fn expunged_message_is_gone_and_session_continues() {
        let h = Harness::new();
        let (mut c, task) = h.login().await;
        h.up.expunge("bob", 4);
        assert_eq!(c.cmd("RETR 2").await, "-ERR message 2 no longer exists\r\n");
        assert_eq!(
            c.cmd("TOP 2 0").await,
            "-ERR message 2 no longer exists\r\n"
        );
        assert_eq!(c.cmd("RETR 1").await, "+OK 23 octets\r\n");
        assert_eq!(c.body().await, b"Subject: one\r\n\r\nfirst\r\n");
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        assert_eq!(h.up.seen("bob"), vec![1]);
    }

    fn big_message(len: usize) -> Vec<u8> {
        let mut m = b"Subject: big\r\nX-Test: yes\r\n\r\n".to_vec();
        let mut i = 0u32;
        while m.len() < len {
            i += 1;
            match i % 4 {
                0 => m.extend_from_slice(b".leading dot line\r\n"),
                1 => m.extend_from_slice(b"bare lf line\n"),
                2 => m.extend_from_slice(format!("line {i} {}\r\n", "x".repeat(60)).as_bytes()),
                _ => m.extend_from_slice(b"..two dots\r\n"),
            }
        }
        m
    }

    fn unstuff_normalised(body: &[u8]) -> Vec<u8> {
        body.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .flat_map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                let l = l.strip_prefix(b".").unwrap_or(l);
                l.iter().copied().chain(*b"\r\n")
            })
            .collect()
    }

    #[tokio::test]
    async fn three_megabyte_message_streamed_in_chunks() {
        let h = Harness::new();
        let msg = big_message(3 * 1024 * 1024);
        h.up.add_message("bob", 9, msg.clone());
        let (mut c, task) = h.login().await;
        assert_eq!(
            c.cmd("RETR 4").await,
            format!("+OK {} octets\r\n", msg.len())
        );
        let body = c.body().await;
        let expected: Vec<u8> = msg
            .split_inclusive(|&b| b == b'\n')
            .flat_map(|l| {
                let l = l.strip_suffix(b"\n").unwrap_or(l);
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                l.iter().copied().chain(*b"\r\n")
            })
            .collect();
        assert_eq!(unstuff_normalised(&body), expected);
        assert!(body.windows(3).any(|w| w == b"\n.."));
        let fetches: Vec<_> =
            h.up.events("bob")
                .into_iter()
                .filter_map(|e| match e {
                    MemoryEvent::Fetch {
                        uid: 9,
                        offset,
                        len,
                    } => Some((offset, len)),
                    _ => None,
                })
                .collect();
        assert_eq!(fetches.len(), msg.len().div_ceil(64 * 1024));
        assert!(fetches.iter().all(|&(_, len)| len == 64 * 1024));
        assert_eq!(fetches[1].0, 64 * 1024);
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        assert_eq!(h.up.seen("bob"), vec![9]);
    }

    #[tokio::test]
    async fn top_sends_header_and_n_lines_and_stops_fetching() {
        let mut h = Harness::new();
        h.limits.fetch_chunk = 1024;
        let msg = big_message(100 * 1024);
        h.up.add_message("bob", 9, msg);
        let (mut c, task) = h.login().await;
        assert_eq!(c.cmd("TOP 4 2").await, "+OK\r\n");
        assert_eq!(
            c.body().await,
            b"Subject: big\r\nX-Test: yes\r\n\r\nbare lf line\r\n"
                .iter()
                .copied()
                .chain(b"line 2 ".iter().copied())
                .chain("x".repeat(60).bytes())
                .chain(*b"\r\n")
                .collect::<Vec<u8>>()
        );
        assert_eq!(c.cmd("TOP 1 0").await, "+OK\r\n");
        assert_eq!(c.body().await, b"Subject: one\r\n\r\n");
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        let fetches =
            h.up.events("bob")
                .iter()
                .filter(|e| matches!(e, MemoryEvent::Fetch { uid: 9, .. }))
                .count();
        assert_eq!(fetches, 1);
        // TOP does not mark messages seen.
        assert!(h.up.seen("bob").is_empty());
    }

    #[tokio::test]
    async fn failure_mid_stream_closes_connection() {
        let mut h = Harness::new();
        h.limits.fetch_chunk = 1024;
        h.up.add_message("bob", 9, big_message(200 * 1024));
        // Past the first 64 KiB flush: the body is partly on the wire.
        h.up.fail_fetch_from("bob", 9, 128 * 1024, MaildropError::unavailable("lost"));
        let (mut c, task) = h.login().await;
        c.cmd("DELE 1").await;
        let status = c.cmd("RETR 4").await;
        assert!(status.starts_with("+OK"), "{status}");
        let mut rest = Vec::new();
        c.rd.read_to_end(&mut rest).await.unwrap();
        assert!(!rest.ends_with(b"\r\n.\r\n"));
        assert_eq!(task.await.unwrap(), SessionOutcome::UpstreamError);
        assert!(h.up.commits("bob").is_empty());
        assert!(h.up.seen("bob").is_empty());
    }

    #[tokio::test]
    async fn early_failure_before_anything_is_flushed_becomes_err() {
        let mut h = Harness::new();
        h.limits.fetch_chunk = 1024;
        h.up.add_message("bob", 9, big_message(10 * 1024));
        h.up.fail_fetch_from("bob", 9, 2048, MaildropError::Gone);
        let (mut c, task) = h.login().await;
        assert_eq!(c.cmd("RETR 4").await, "-ERR message 4 no longer exists\r\n");
        assert_eq!(c.cmd("NOOP").await, "+OK\r\n");
        h.up.fail_fetch_from("bob", 9, 2048, MaildropError::unavailable("x"));
        assert!(c.cmd("RETR 4").await.starts_with("-ERR [SYS/TEMP]"));
        assert!(c.eof().await);
        assert_eq!(task.await.unwrap(), SessionOutcome::UpstreamError);
    }

    #[tokio::test]
    async fn a_top_whose_message_goes_away_after_its_first_piece_is_err_not_truncated() {
        let mut h = Harness::new();
        // A first piece far past the flush threshold, the rest of the message gone.
        h.limits.fetch_chunk = 128 * 1024;
        h.up.add_message("bob", 9, big_message(300 * 1024));
        h.up.fail_fetch_from("bob", 9, 128 * 1024, MaildropError::Gone);
        let (mut c, task) = h.login().await;
        assert_eq!(
            c.cmd("TOP 4 100000").await,
            "-ERR message 4 no longer exists\r\n"
        );
        // Many such answers never reach the error cap: the session goes on.
        for _ in 0..super::super::session::MAX_ERRORS + 5 {
            assert_eq!(
                c.cmd("TOP 4 100000").await,
                "-ERR message 4 no longer exists\r\n"
            );
        }
        // A TOP its first piece ends is served as before.
        assert_eq!(c.cmd("TOP 4 0").await, "+OK\r\n");
        assert!(!c.body().await.is_empty());
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    }

    #[tokio::test]
    async fn first_fetch_failure_other_than_gone_closes() {
        let h = Harness::new();
        h.up.fail_fetch_from("bob", 1, 0, MaildropError::unavailable("lost"));
        let (mut c, task) = h.login().await;
        assert!(c.cmd("RETR 1").await.starts_with("-ERR [SYS/TEMP]"));
        assert!(c.eof().await);
        assert_eq!(task.await.unwrap(), SessionOutcome::UpstreamError);
    }

    #[tokio::test]
    async fn long_line_gets_err_and_session_continues() {
        let h = Harness::new();
        let (mut c, task) = h.connect().await;
        let long = format!("USER {}\r\nUSER bob\r\n", "a".repeat(400));
        c.send(&long).await;
        assert_eq!(c.line().await, "-ERR Line too long.\r\n");
        assert_eq!(c.line().await, "+OK\r\n");
        assert_eq!(c.cmd("PASS pw").await, "+OK Logged in.\r\n");
        // A giant line in pieces: one error only.
        for _ in 0..20 {
            c.send(&"z".repeat(1000)).await;
        }
        c.send("\r\nNOOP\r\n").await;
        assert_eq!(c.line().await, "-ERR Line too long.\r\n");
        assert_eq!(c.line().await, "+OK\r\n");
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
    }

    #[tokio::test]
    async fn auth_plain_continuation_may_exceed_command_limit() {
        let h = Harness::new();
        let long_pw = "p".repeat(400);
        h.up.add_user("carol", &long_pw, 1);
        let (mut c, task) = h.connect().await;
        assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
        use base64::Engine as _;
        let resp = base64::engine::general_purpose::STANDARD.encode(format!("\0carol\0{long_pw}"));
        assert_eq!(c.cmd(&resp).await, "+OK Logged in.\r\n");
        assert_eq!(c.cmd("STAT").await, "+OK 0 0\r\n");
        drop(c);
        assert_eq!(task.await.unwrap(), SessionOutcome::ClientGone);
    }

    #[tokio::test]
    async fn too_many_errors_closes() {
        let h = Harness::new();
        let (mut c, task) = h.connect().await;
        let mut batch = String::new();
        for _ in 0..30 {
            batch.push_str("BOGUS\r\n");
        }
        c.send(&batch).await;
        for _ in 0..19 {
            assert_eq!(c.line().await, "-ERR Unknown command.\r\n");
        }
        assert_eq!(
            c.line().await,
            "-ERR Too many errors, closing connection.\r\n"
        );
        assert!(c.eof().await);
        assert_eq!(task.await.unwrap(), SessionOutcome::TooManyErrors);
    }

    #[tokio::test]
    async fn quit_in_authorization_and_login_unavailable() {
        let h = Harness::new();
        h.up.fail_logins(Some(MaildropError::unavailable("down")));
        let (mut c, task) = h.connect().await;
        c.cmd("USER bob").await;
        assert!(c.cmd("PASS pw").await.starts_with("-ERR [SYS/TEMP]"));
        assert_eq!(c.cmd("QUIT").await, "+OK Logging out.\r\n");
        assert!(c.eof().await);
        assert_eq!(task.await.unwrap(), SessionOutcome::Quit);
        assert!(!h.locks.is_locked(&bob()));
    }
}
