//! The command engine of one upstream IMAP connection: a thin tokio driver around imap-next's
//! sans-I/O `Client` (`execute`, pipelined `execute_all`, `logout`).
//!
//! imap-next's own `Stream` only takes a `TcpStream` or a `TlsStream`, and keeps its buffers
//! unbounded; this driver works over any `AsyncRead + AsyncWrite`, puts a deadline on every read
//! and write, and treats any failure (timeout included) as fatal to the connection, because a
//! command cut off mid-write leaves the IMAP session in an unknown state. The one response it
//! does not let imap-next decode, a message body, is streamed by [`super::conn`], which owns
//! an engine and reads the socket through it.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::fetch_parse;
use super::login::LoginCommand;
use crate::metrics::{metrics, Timer};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::reader::{ReadError, Reader, SMALL_READ};
use crate::upstream::transport::{AsyncStream, TransportError};

use imap_next::client::{Client, Event, Options};
use std::borrow::Cow;

use imap_next::imap_types::auth::AuthenticateData;
use imap_next::imap_types::command::{Command, CommandBody};
use imap_next::imap_types::core::Tag;
use imap_next::imap_types::fetch::MessageDataItem;
use imap_next::imap_types::response::{
    Code, CommandContinuationRequest, Data, Greeting, GreetingKind, Status, StatusKind,
};
use imap_next::imap_types::secret::Secret;
use imap_next::{Interrupt, Io, State};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream closed the connection")]
    Closed,
    #[error("upstream I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS with upstream failed: {0}")]
    Tls(String),
    #[error("upstream sent something we cannot parse")]
    Malformed,
    #[error("upstream said BYE: {0}")]
    Bye(String),
    #[error("upstream refused STARTTLS: {0}")]
    StartTlsRefused(String),
    #[error("connection is unusable after an earlier failure")]
    Broken,
    #[error("cannot build IMAP command: {0}")]
    Command(String),
    #[error(transparent)]
    Stream(#[from] fetch_parse::StreamError),
    #[error("upstream refused the command: {0}")]
    Refused(String),
}

impl ImapError {
    /// The `kind` label of `popbridge_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ImapError::Connect { .. } => "connect",
            ImapError::Timeout(_) => "timeout",
            ImapError::Closed | ImapError::Broken => "closed",
            ImapError::Io(_) => "io",
            ImapError::Tls(_) | ImapError::StartTlsRefused(_) => "tls",
            ImapError::Malformed | ImapError::Command(_) | ImapError::Stream(_) => "protocol",
            ImapError::Refused(_) => "command_failed",
            ImapError::Bye(_) => "bye",
        }
    }
}

/// A tagged completion: OK, NO or BAD, with its response code and text.
#[derive(Debug, Clone)]
pub struct Completion {
    pub kind: StatusKind,
    pub code: Option<Code<'static>>,
    pub text: String,
}

impl Completion {
    pub fn is_ok(&self) -> bool {
        self.kind == StatusKind::Ok
    }

    /// The response code imap-types does not model (RFC 5530's `EXPUNGEISSUED`,
    /// `UNAVAILABLE`, ...), upper-cased, with any argument after a space.
    pub fn other_code(&self) -> Option<String> {
        match &self.code {
            Some(Code::Other(other)) => {
                Some(String::from_utf8_lossy(other.inner()).to_ascii_uppercase())
            }
            _ => None,
        }
    }

    /// OK, or `NO [EXPUNGEISSUED]`: a FETCH whose other messages were answered while some
    /// had gone away meanwhile (another client expunged them).
    pub fn answered_but_expunged(&self) -> bool {
        self.is_ok() || (self.kind == StatusKind::No && self.expunge_issued())
    }

    /// `[EXPUNGEISSUED]` (RFC 5530): the command named a message that was expunged.
    pub fn expunge_issued(&self) -> bool {
        self.other_code()
            .is_some_and(|c| c.split(' ').next() == Some("EXPUNGEISSUED"))
    }
}

/// What arrives untagged while a command runs.
pub enum Untagged {
    Data(Data<'static>),
    /// `* OK [CODE] text` and friends (SELECT reports UIDVALIDITY and PERMANENTFLAGS this way).
    Status {
        kind: StatusKind,
        code: Option<Code<'static>>,
    },
}

impl Untagged {
    /// `(UID, RFC822.SIZE)` of a FETCH response that carries both; `None` for anything else
    /// (unsolicited FETCHes, such as another client's flag changes, lack a size).
    pub fn uid_and_size(&self) -> Option<(u32, u32)> {
        let Untagged::Data(Data::Fetch { items, .. }) = self else {
            return None;
        };
        let (mut uid, mut size) = (None, None);
        for item in items.as_ref() {
            match item {
                MessageDataItem::Uid(u) => uid = Some(u.get()),
                MessageDataItem::Rfc822Size(s) => size = Some(*s),
                _ => {}
            }
        }
        uid.zip(size)
    }
}

impl From<TransportError> for ImapError {
    fn from(e: TransportError) -> ImapError {
        match e {
            TransportError::Connect { addr, reason } => ImapError::Connect { addr, reason },
            TransportError::Timeout(t) => ImapError::Timeout(t),
            TransportError::Tls(m) => ImapError::Tls(m),
            TransportError::Refused(m) => ImapError::StartTlsRefused(m),
            TransportError::Read(e) => e.into(),
            TransportError::Io(e) => ImapError::Io(e),
        }
    }
}

impl From<ReadError> for ImapError {
    fn from(e: ReadError) -> ImapError {
        match e {
            ReadError::Timeout(t) => ImapError::Timeout(t),
            ReadError::Closed => ImapError::Closed,
            ReadError::Io(e) => ImapError::Io(e),
            ReadError::LineTooLong(_) => ImapError::Malformed,
        }
    }
}

/// Limits that bound what one connection may cost.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub connect_timeout: Duration,
    /// Deadline for each read and each write; an upstream silent for longer is dead.
    pub io_timeout: Duration,
    /// Largest single response accepted (a FETCH piece and its framing must fit).
    pub max_response_size: u32,
}

impl ConnLimits {
    /// The endpoint's deadlines, and responses up to `max_response_size`.
    pub fn of(endpoint: &Endpoint, max_response_size: u32) -> ConnLimits {
        ConnLimits {
            connect_timeout: endpoint.connect_timeout,
            io_timeout: endpoint.io_timeout,
            max_response_size,
        }
    }
}

pub struct Engine {
    pub(super) io: Box<dyn AsyncStream>,
    client: Client,
    /// Bytes read from the server and not yet consumed. imap-next is fed from here one line
    /// or literal at a time and never past the end of a response, so between commands it
    /// holds no input and a streamed FETCH can read the socket itself.
    pub(super) reader: Reader,
    /// Literal bytes still due to imap-next.
    feed_literal: u64,
    pub(super) limits: ConnLimits,
    pub(super) next_tag: u32,
    pub(super) broken: bool,
    /// The greeting listed SASL-IR (RFC 4959): AUTHENTICATE may carry its first response.
    sasl_ir: bool,
    /// The greeting listed ID (RFC 2971).
    id: bool,
    /// The response to send after the server's `+` in a two-step AUTHENTICATE.
    sasl_continuation: Option<Vec<u8>>,
    /// The response to an error challenge after that (RFC 7628), and the challenge received.
    sasl_after_error: Option<Vec<u8>>,
    sasl_challenge: Option<Vec<u8>>,
    /// Command bytes imap-next produced and not yet written: everything pipelined goes out
    /// in one write when imap-next next needs the server's answer (one segment, one system
    /// call, one wake-up of the server, instead of one per command).
    out: Vec<u8>,
}

impl Engine {
    /// Connect to `endpoint`, secure the connection as it says, and read the greeting.
    pub async fn connect(endpoint: &Endpoint, limits: ConnLimits) -> Result<Engine, ImapError> {
        let _timer = Timer::start(&metrics().upstream_connect_duration);
        let connected = async {
            let c = endpoint.connect().await?;
            Self::over(c.io, limits, c.greeted).await
        };
        connected.await.inspect_err(|e| {
            metrics()
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc()
        })
    }

    /// A connection over an established stream (`greeting_done`: the greeting was already
    /// read, as after STARTTLS).
    pub async fn over(
        io: Box<dyn AsyncStream>,
        limits: ConnLimits,
        greeting_done: bool,
    ) -> Result<Engine, ImapError> {
        let mut options = Options::default();
        options.max_response_size = limits.max_response_size;
        options.discard_greeting = greeting_done;
        // Some servers end lines with a bare LF; accepting it costs nothing.
        options.crlf_relaxed = true;
        let mut conn = Engine {
            io,
            client: Client::new(options),
            reader: Reader::new(limits.max_response_size as usize),
            feed_literal: 0,
            limits,
            next_tag: 1,
            broken: false,
            sasl_ir: false,
            id: false,
            sasl_continuation: None,
            sasl_after_error: None,
            sasl_challenge: None,
            out: Vec::new(),
        };
        if !greeting_done {
            match conn.next_event().await? {
                Event::GreetingReceived { greeting } => {
                    check_greeting(&greeting)?;
                    let listed = |name: &str| {
                        matches!(&greeting.code, Some(Code::Capability(list))
                        if list.as_ref().iter().any(|c| c.to_string().eq_ignore_ascii_case(name)))
                    };
                    conn.sasl_ir = listed("SASL-IR");
                    conn.id = listed("ID");
                }
                _ => return Err(ImapError::Malformed),
            }
        }
        Ok(conn)
    }

    /// Run one command to its tagged completion, handing every untagged response to
    /// `on_untagged` as it arrives.
    pub async fn execute(
        &mut self,
        body: CommandBody<'static>,
        on_untagged: impl FnMut(Untagged),
    ) -> Result<Completion, ImapError> {
        let mut done = self.execute_all(vec![body], on_untagged).await?;
        done.pop().ok_or(ImapError::Malformed)
    }

    /// Send `bodies` back to back (IMAP pipelining: one round trip instead of one each) and
    /// collect their tagged completions in order, handing every untagged response to
    /// `on_untagged` as it arrives.
    pub async fn execute_all(
        &mut self,
        bodies: Vec<CommandBody<'static>>,
        mut on_untagged: impl FnMut(Untagged),
    ) -> Result<Vec<Completion>, ImapError> {
        if self.broken {
            return Err(ImapError::Broken);
        }
        let started = Instant::now();
        let mut pending = Vec::with_capacity(bodies.len());
        let mut logging_out = false;
        for body in bodies {
            logging_out |= matches!(body, CommandBody::Logout);
            let name = body.name();
            let tag = Tag::try_from(format!("P{}", self.next_tag))
                .map_err(|e| ImapError::Command(e.to_string()))?;
            self.next_tag = self.next_tag.wrapping_add(1);
            let handle = self.client.enqueue_command(Command {
                tag: tag.clone(),
                body,
            });
            pending.push((name, tag, handle, None::<Completion>));
        }
        let m = metrics();
        loop {
            if pending.iter().all(|p| p.3.is_some()) {
                break;
            }
            let event = match self.next_event().await {
                Ok(e) => e,
                Err(e) => {
                    if !logging_out {
                        m.upstream_errors.with_label_values(&[e.kind()]).inc();
                    }
                    return Err(e);
                }
            };
            let (index, completion) = match event {
                Event::StatusReceived {
                    status: Status::Tagged(tagged),
                } => match pending.iter().position(|p| p.1 == tagged.tag) {
                    Some(i) => (
                        i,
                        Completion {
                            kind: tagged.body.kind,
                            code: tagged.body.code,
                            text: tagged.body.text.to_string(),
                        },
                    ),
                    None => continue,
                },
                // AUTHENTICATE (with SASL-IR: no continuation) completes through its own event.
                Event::CommandRejected { handle, status, .. }
                | Event::AuthenticateStatusReceived { handle, status, .. } => {
                    let Some(i) = pending.iter().position(|p| p.2 == handle) else {
                        continue;
                    };
                    let (kind, code, text) = match status {
                        Status::Tagged(t) => (t.body.kind, t.body.code, t.body.text.to_string()),
                        Status::Untagged(b) => (b.kind, b.code, b.text.to_string()),
                        Status::Bye(b) => return Err(self.fail(ImapError::Bye(b.text.to_string()))),
                    };
                    (i, Completion { kind, code, text })
                }
                // The two-step AUTHENTICATE: the response owed after `+`, once. A `+` after the
                // response is an error challenge (RFC 7628: the server's JSON status), kept for
                // the caller and answered as the mechanism says; anything more is cancelled
                // (the server then answers NO/BAD).
                Event::AuthenticateContinuationRequestReceived {
                    continuation_request,
                    ..
                } => {
                    let data = if let Some(r) = self.sasl_continuation.take() {
                        AuthenticateData::Continue(Secret::new(Cow::Owned(r)))
                    } else if let Some(r) = self.sasl_after_error.take() {
                        self.sasl_challenge = Some(match continuation_request {
                            CommandContinuationRequest::Base64(data) => data.into_owned(),
                            CommandContinuationRequest::Basic(basic) => {
                                basic.text().to_string().into_bytes()
                            }
                        });
                        AuthenticateData::Continue(Secret::new(Cow::Owned(r)))
                    } else {
                        AuthenticateData::Cancel
                    };
                    let _ = self.client.set_authenticate_data(data);
                    continue;
                }
                // The BYE that answers our LOGOUT is the expected goodbye, not a failure.
                Event::StatusReceived {
                    status: Status::Bye(_),
                } if logging_out => {
                    self.broken = true;
                    continue;
                }
                Event::StatusReceived {
                    status: Status::Bye(bye),
                } => {
                    m.upstream_errors.with_label_values(&["bye"]).inc();
                    return Err(self.fail(ImapError::Bye(bye.text.to_string())));
                }
                Event::StatusReceived {
                    status: Status::Untagged(body),
                } => {
                    on_untagged(Untagged::Status {
                        kind: body.kind,
                        code: body.code,
                    });
                    continue;
                }
                Event::DataReceived { data } => {
                    on_untagged(Untagged::Data(data));
                    continue;
                }
                // Our own command being sent, or a continuation request we never asked for
                // (we send no IDLE): nothing to do.
                _ => continue,
            };
            let name = pending[index].0;
            m.upstream_command_duration
                .with_label_values(&[name])
                .observe(started.elapsed().as_secs_f64());
            // A refused LOGIN is a user's wrong password, counted by popbridge_logins_total.
            if !completion.is_ok() && name != "LOGIN" && name != "AUTHENTICATE" {
                m.upstream_errors
                    .with_label_values(&["command_failed"])
                    .inc();
            }
            pending[index].3 = Some(completion);
        }
        // Every completion came after its command was written, so nothing is left; should
        // imap-next ever produce output it does not wait on, it goes out now.
        self.write_out().await?;
        self.reader.shrink_idle();
        Ok(pending.into_iter().filter_map(|p| p.3).collect())
    }

    /// Whether AUTHENTICATE may carry an initial response (the greeting listed SASL-IR).
    pub fn offers_sasl_ir(&self) -> bool {
        self.sasl_ir
    }

    /// Whether the greeting listed ID (RFC 2971).
    pub fn offers_id(&self) -> bool {
        self.id
    }

    /// Runs a login command (see [`super::login`]), answering the server's continuation
    /// request with the response it owes, if any.
    pub async fn execute_login(&mut self, login: LoginCommand) -> Result<Completion, ImapError> {
        self.execute_login_after(None, login).await
    }

    /// [`Self::execute_login`] with `before` (an ID) pipelined ahead of it in the same write:
    /// no extra round trip. What `before` gets back does not matter.
    pub async fn execute_login_after(
        &mut self,
        before: Option<CommandBody<'static>>,
        login: LoginCommand,
    ) -> Result<Completion, ImapError> {
        self.sasl_continuation = login.continuation;
        self.sasl_after_error = login.after_error;
        self.sasl_challenge = None;
        let bodies: Vec<_> = before.into_iter().chain([login.command]).collect();
        let done = self
            .execute_all(bodies, |_| {})
            .await
            .and_then(|mut d| d.pop().ok_or(ImapError::Malformed));
        if let Some(mut r) = self.sasl_continuation.take() {
            r.iter_mut().for_each(|b| *b = 0);
        }
        self.sasl_after_error = None;
        done
    }

    /// The error challenge the last login received, if any (RFC 7628: a JSON status object).
    pub fn take_sasl_challenge(&mut self) -> Option<Vec<u8>> {
        self.sasl_challenge.take()
    }

    /// Say LOGOUT and wait briefly for the answer; errors are irrelevant at this point.
    pub async fn logout(self) {
        self.logout_after(Vec::new()).await;
    }

    /// Run `before` pipelined with a LOGOUT behind it, waiting briefly; returns the texts of
    /// those of `before` the server refused or could not answer (LOGOUT's own fate is
    /// irrelevant at this point).
    pub async fn logout_after(mut self, before: Vec<CommandBody<'static>>) -> Vec<String> {
        self.limits.io_timeout = self.limits.io_timeout.min(Duration::from_secs(2));
        let owed = before.len();
        let mut bodies = before;
        bodies.push(CommandBody::Logout);
        let failed = match self.execute_all(bodies, |_| {}).await {
            Ok(done) => done
                .into_iter()
                .take(owed)
                .filter(|d| !d.is_ok())
                .map(|d| d.text)
                .collect(),
            Err(e) if owed > 0 => vec![e.to_string()],
            Err(_) => Vec::new(),
        };
        let _ = self.io.shutdown().await;
        failed
    }

    pub(super) fn fail(&mut self, e: ImapError) -> ImapError {
        self.broken = true;
        e
    }

    async fn next_event(&mut self) -> Result<Event, ImapError> {
        loop {
            match self.client.next() {
                Ok(event) => return Ok(event),
                Err(Interrupt::Io(Io::Output(bytes))) => self.out.extend_from_slice(&bytes),
                Err(Interrupt::Io(Io::NeedMoreInput)) => {
                    self.write_out().await?;
                    let fragment = self.next_fragment().await?;
                    self.client.enqueue_input(&fragment);
                }
                Err(Interrupt::Error(e)) => {
                    tracing::warn!(error = %e, "upstream response could not be parsed");
                    return Err(self.fail(ImapError::Malformed));
                }
            }
        }
    }

    /// Writes the command bytes gathered in `out` (see there), with the I/O deadline.
    async fn write_out(&mut self) -> Result<(), ImapError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let t = self.limits.io_timeout;
        let written = tokio::time::timeout(t, async {
            self.io.write_all(&self.out).await?;
            self.io.flush().await
        })
        .await;
        self.out.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.fail(e.into())),
            Err(_) => Err(self.fail(ImapError::Timeout(t))),
        }
    }
}

impl Engine {
    /// Reads more from the server (see [`Reader::fill`]), with the I/O deadline; any failure
    /// breaks the connection.
    pub(super) async fn fill(&mut self, at_least: usize) -> Result<(), ImapError> {
        match self
            .reader
            .fill(&mut self.io, at_least, self.limits.io_timeout)
            .await
        {
            Ok(n) => {
                metrics().upstream_received_bytes.inc_by(n as u64);
                Ok(())
            }
            Err(e) => Err(self.fail(e.into())),
        }
    }

    /// The next line (with its line end) or literal part for imap-next, never reaching past
    /// the end of the response it belongs to.
    async fn next_fragment(&mut self) -> Result<BytesMut, ImapError> {
        loop {
            if self.feed_literal > 0 {
                if !self.reader.is_empty() {
                    let k = usize::try_from(self.feed_literal)
                        .unwrap_or(usize::MAX)
                        .min(self.reader.len());
                    self.feed_literal -= k as u64;
                    return Ok(self.reader.split_to(k));
                }
            } else if let Some(line) = self.take_line()? {
                if let Some(n) = fetch_parse::announced_literal(&line) {
                    self.feed_literal = u64::from(n);
                }
                return Ok(line);
            }
            self.fill(SMALL_READ).await?;
        }
    }

    /// A complete line out of the buffer, if there is one; bounded by `max_response_size`.
    fn take_line(&mut self) -> Result<Option<BytesMut>, ImapError> {
        match self.reader.take_line() {
            Ok(line) => Ok(line),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    pub(super) async fn read_line(&mut self) -> Result<BytesMut, ImapError> {
        loop {
            if let Some(line) = self.take_line()? {
                return Ok(line);
            }
            self.fill(SMALL_READ).await?;
        }
    }

    /// Reads and drops `n` bytes (a literal nobody asked for).
    pub(super) async fn skip(&mut self, n: u64) -> Result<(), ImapError> {
        match self
            .reader
            .skip(&mut self.io, n, self.limits.io_timeout)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    /// Exactly `n` bytes (n is bounded by the caller).
    pub(super) async fn take_exact(&mut self, n: usize) -> Result<Bytes, ImapError> {
        match self
            .reader
            .take_exact(&mut self.io, n, self.limits.io_timeout)
            .await
        {
            Ok(b) => Ok(b),
            Err(e) => Err(self.fail(e.into())),
        }
    }
}

fn check_greeting(greeting: &Greeting<'_>) -> Result<(), ImapError> {
    match greeting.kind {
        GreetingKind::Ok => Ok(()),
        // PREAUTH would log us in as someone else's identity: never acceptable for a proxy
        // that logs in with the client's credentials.
        GreetingKind::PreAuth => Err(ImapError::Bye(
            "server greeted with PREAUTH; popbridge needs to log in as the POP3 user".into(),
        )),
        GreetingKind::Bye => Err(ImapError::Bye(greeting.text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader, ReadBuf};

    /// A stream that counts the writes made to it.
    struct Counted {
        inner: tokio::io::DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Pipelined commands go to the server in one write (one segment, one wake-up of the
    /// server), and each still gets its own completion.
    #[tokio::test]
    async fn pipelined_commands_go_out_in_one_write() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let writes = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"* OK ready\r\n").await.unwrap();
            let mut tags = Vec::new();
            for _ in 0..3 {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                tags.push(l.split(' ').next().unwrap().to_owned());
            }
            let mut reply = String::from("* 2 EXISTS\r\n");
            for t in &tags {
                reply.push_str(&format!("{t} OK done\r\n"));
            }
            w.write_all(reply.as_bytes()).await.unwrap();
        });
        let limits = ConnLimits {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
            max_response_size: 1 << 20,
        };
        let io = Counted {
            inner: a,
            writes: Arc::clone(&writes),
        };
        let mut engine = Engine::over(Box::new(io), limits, false).await.unwrap();
        let mut untagged = 0;
        let done = engine
            .execute_all(
                vec![CommandBody::Noop, CommandBody::Check, CommandBody::Noop],
                |_| untagged += 1,
            )
            .await
            .unwrap();
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(Completion::is_ok), "{done:?}");
        assert_eq!(untagged, 1);
        assert_eq!(
            writes.load(Ordering::SeqCst),
            1,
            "one write for three commands"
        );
        server.await.unwrap();
    }
}
