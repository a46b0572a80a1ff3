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

/// How many following messages the maildrop is told about before a RETR/TOP: at least the
/// first, more while their listed octets stay under what the maildrop asks for
/// (`Maildrop::read_ahead_octets`), at most the second (its read-ahead is bounded in bytes;
/// this only caps the count and the hint's size, 64 KiB, see ImapMaildrop::stream_budget).
pub(super) const READ_AHEAD_MESSAGES: (usize, usize) = (512, 4096);

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
        // Boxed, like login, RETR and QUIT: held only while it runs, not in every idle
        // session's task (the close drains pending FETCHes, a deep future).
        if stopping && !cut {
            let _ = tokio::time::timeout(STOP_GOODBYE, Box::pin(md.close())).await;
        } else if !cut {
            Box::pin(md.close()).await;
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
mod tests;
