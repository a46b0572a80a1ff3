//! One upstream IMAP connection: a thin tokio driver around imap-next's sans-I/O `Client`.
//!
//! imap-next's own `Stream` only takes a `TcpStream` or a `TlsStream`, and keeps its buffers
//! unbounded; this driver works over any `AsyncRead + AsyncWrite`, puts a deadline on every read
//! and write, and treats any failure (timeout included) as fatal to the connection, because a
//! command cut off mid-write leaves the IMAP session in an unknown state.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::fetch_stream::{self, FetchInfo, Items, Line};
use crate::metrics::{metrics, Timer};

use imap_next::client::{Client, Event, Options};
use imap_next::imap_types::command::{Command, CommandBody};
use imap_next::imap_types::core::Tag;
use imap_next::imap_types::response::{Code, Data, Greeting, GreetingKind, Status, StatusKind};
use imap_next::{Interrupt, Io, State};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Anything a connection can run over: TCP, or TLS on TCP.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

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
    Stream(#[from] fetch_stream::StreamError),
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

/// Limits that bound what one connection may cost.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub connect_timeout: Duration,
    /// Deadline for each read and each write; an upstream silent for longer is dead.
    pub io_timeout: Duration,
    /// Largest single response accepted (a FETCH piece and its framing must fit).
    pub max_response_size: u32,
}

pub struct ImapConnection {
    io: Box<dyn AsyncStream>,
    client: Client,
    /// Bytes read from the server and not yet consumed. imap-next is fed from here one line
    /// or literal at a time and never past the end of a response, so between commands it
    /// holds no input and a streamed FETCH ([`Self::body_start`]) can read the socket itself.
    inbuf: BytesMut,
    /// Framing of what imap-next is fed: literal bytes still due to it ...
    feed_literal: u64,
    /// ... or how much of the current line was already searched for its end.
    line_scan: usize,
    /// A FETCH body being streamed by [`Self::body_next`].
    body: Option<BodyStream>,
    limits: ConnLimits,
    next_tag: u32,
    broken: bool,
}

/// The state of one streamed `UID FETCH <uid> (UID BODY.PEEK[])`.
struct BodyStream {
    tag: String,
    uid: u32,
    /// Literal bytes still to come.
    left: u64,
    info: FetchInfo,
    started: Instant,
}

/// How [`ImapConnection::body_start`] went.
pub enum BodyStart {
    /// The literal has begun: read it with [`ImapConnection::body_next`].
    Streaming,
    /// The command completed without a body for the UID (expunged, or refused).
    NoBody(Completion),
}

/// Read at least this much free space into while streaming a body ...
const BODY_READ: usize = 128 * 1024;
/// ... and this much otherwise (responses between bodies are small).
const LINE_READ: usize = 8 * 1024;
/// An abandoned body stream is read to its end if at most this much is left; otherwise the
/// connection is given up.
const DRAIN_MAX: u64 = 4 << 20;

/// How to reach the server.
pub enum Transport<'a> {
    Plain,
    Tls {
        connector: &'a TlsConnector,
        name: ServerName<'static>,
    },
    StartTls {
        connector: &'a TlsConnector,
        name: ServerName<'static>,
    },
}

impl ImapConnection {
    /// Connect, secure the connection as asked, and read the greeting.
    pub async fn connect(
        host: &str,
        port: u16,
        transport: Transport<'_>,
        limits: ConnLimits,
    ) -> Result<ImapConnection, ImapError> {
        let _timer = Timer::start(&metrics().upstream_connect_duration);
        Self::connect_inner(host, port, transport, limits)
            .await
            .inspect_err(|e| {
                metrics()
                    .upstream_errors
                    .with_label_values(&[e.kind()])
                    .inc()
            })
    }

    async fn connect_inner(
        host: &str,
        port: u16,
        transport: Transport<'_>,
        limits: ConnLimits,
    ) -> Result<ImapConnection, ImapError> {
        let addr = format!("{host}:{port}");
        let tcp = tokio::time::timeout(limits.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| ImapError::Connect {
                addr: addr.clone(),
                reason: format!("timed out after {:?}", limits.connect_timeout),
            })?
            .map_err(|e| ImapError::Connect {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        // Without it every small command waits for the peer's delayed ACK (~40 ms).
        tcp.set_nodelay(true)?;

        let (io, greeting_done): (Box<dyn AsyncStream>, bool) = match transport {
            Transport::Plain => (Box::new(tcp), false),
            Transport::Tls { connector, name } => {
                let tls = tokio::time::timeout(limits.io_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| ImapError::Timeout(limits.io_timeout))?
                    .map_err(|e| ImapError::Tls(e.to_string()))?;
                (Box::new(tls), false)
            }
            Transport::StartTls { connector, name } => {
                let mut tcp = tcp;
                starttls_preamble(&mut tcp, limits.io_timeout).await?;
                let tls = tokio::time::timeout(limits.io_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| ImapError::Timeout(limits.io_timeout))?
                    .map_err(|e| ImapError::Tls(e.to_string()))?;
                (Box::new(tls), true)
            }
        };

        let mut options = Options::default();
        options.max_response_size = limits.max_response_size;
        options.discard_greeting = greeting_done;
        // Some servers end lines with a bare LF; accepting it costs nothing.
        options.crlf_relaxed = true;
        let mut conn = ImapConnection {
            io,
            client: Client::new(options),
            inbuf: BytesMut::new(),
            feed_literal: 0,
            line_scan: 0,
            body: None,
            limits,
            next_tag: 1,
            broken: false,
        };
        if !greeting_done {
            match conn.next_event().await? {
                Event::GreetingReceived { greeting } => check_greeting(&greeting)?,
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
        self.abandon_body().await?;
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
                Event::CommandRejected { handle, status, .. } => {
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
                // (we send no AUTHENTICATE or IDLE): nothing to do.
                _ => continue,
            };
            let name = pending[index].0;
            m.upstream_command_duration
                .with_label_values(&[name])
                .observe(started.elapsed().as_secs_f64());
            // A refused LOGIN is a user's wrong password, counted by popbridge_logins_total.
            if !completion.is_ok() && name != "LOGIN" {
                m.upstream_errors
                    .with_label_values(&["command_failed"])
                    .inc();
            }
            pending[index].3 = Some(completion);
        }
        Ok(pending.into_iter().filter_map(|p| p.3).collect())
    }

    /// Say LOGOUT and wait briefly for the answer; errors are irrelevant at this point.
    pub async fn logout(mut self) {
        self.limits.io_timeout = self.limits.io_timeout.min(Duration::from_secs(2));
        let _ = self.execute(CommandBody::Logout, |_| {}).await;
        let _ = self.io.shutdown().await;
    }

    fn fail(&mut self, e: ImapError) -> ImapError {
        self.broken = true;
        e
    }

    async fn next_event(&mut self) -> Result<Event, ImapError> {
        loop {
            match self.client.next() {
                Ok(event) => return Ok(event),
                Err(Interrupt::Io(Io::Output(bytes))) => {
                    let t = self.limits.io_timeout;
                    let written = tokio::time::timeout(t, async {
                        self.io.write_all(&bytes).await?;
                        self.io.flush().await
                    })
                    .await;
                    match written {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(self.fail(e.into())),
                        Err(_) => return Err(self.fail(ImapError::Timeout(t))),
                    }
                }
                Err(Interrupt::Io(Io::NeedMoreInput)) => {
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
}

impl ImapConnection {
    /// Reads more from the server into `inbuf`, with the I/O deadline.
    async fn fill(&mut self, at_least: usize) -> Result<(), ImapError> {
        if self.inbuf.capacity() - self.inbuf.len() < at_least / 2 {
            self.inbuf.reserve(at_least.max(self.inbuf.len()));
        }
        let t = self.limits.io_timeout;
        match tokio::time::timeout(t, self.io.read_buf(&mut self.inbuf)).await {
            Ok(Ok(0)) => Err(self.fail(ImapError::Closed)),
            Ok(Ok(n)) => {
                metrics().upstream_received_bytes.inc_by(n as u64);
                Ok(())
            }
            Ok(Err(e)) => Err(self.fail(e.into())),
            Err(_) => Err(self.fail(ImapError::Timeout(t))),
        }
    }

    /// The next line (with its line end) or literal part for imap-next, never reaching past
    /// the end of the response it belongs to.
    async fn next_fragment(&mut self) -> Result<BytesMut, ImapError> {
        loop {
            if self.feed_literal > 0 {
                if !self.inbuf.is_empty() {
                    let k = usize::try_from(self.feed_literal)
                        .unwrap_or(usize::MAX)
                        .min(self.inbuf.len());
                    self.feed_literal -= k as u64;
                    return Ok(self.inbuf.split_to(k));
                }
            } else if let Some(line) = self.take_line()? {
                if let Some(n) = fetch_stream::announced_literal(&line) {
                    self.feed_literal = u64::from(n);
                }
                return Ok(line);
            }
            self.fill(LINE_READ).await?;
        }
    }

    /// A complete line out of `inbuf`, if there is one; bounded by `max_response_size`.
    fn take_line(&mut self) -> Result<Option<BytesMut>, ImapError> {
        match memchr::memchr(b'\n', &self.inbuf[self.line_scan..]) {
            Some(i) => {
                let end = self.line_scan + i + 1;
                self.line_scan = 0;
                Ok(Some(self.inbuf.split_to(end)))
            }
            None => {
                self.line_scan = self.inbuf.len();
                if self.line_scan > self.limits.max_response_size as usize {
                    return Err(self.fail(ImapError::Malformed));
                }
                Ok(None)
            }
        }
    }

    async fn read_line(&mut self) -> Result<BytesMut, ImapError> {
        loop {
            if let Some(line) = self.take_line()? {
                return Ok(line);
            }
            self.fill(LINE_READ).await?;
        }
    }

    /// Reads and drops `n` bytes (a literal nobody asked for).
    async fn skip(&mut self, mut n: u64) -> Result<(), ImapError> {
        loop {
            let k = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.inbuf.len());
            let _ = self.inbuf.split_to(k);
            n -= k as u64;
            if n == 0 {
                return Ok(());
            }
            self.fill(BODY_READ).await?;
        }
    }

    /// Sends `UID FETCH <uid> (UID BODY.PEEK[])` and reads up to the start of the body
    /// literal, which [`Self::body_next`] then hands out in parts as it arrives, so a message
    /// of any size flows to the client through bounded buffers without being decoded.
    pub async fn body_start(&mut self, uid: u32) -> Result<BodyStart, ImapError> {
        let r = self.body_start_inner(uid).await;
        if let Err(e) = &r {
            metrics()
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
        }
        r
    }

    async fn body_start_inner(&mut self, uid: u32) -> Result<BodyStart, ImapError> {
        if self.broken {
            return Err(ImapError::Broken);
        }
        self.abandon_body().await?;
        if uid == 0 {
            return Err(ImapError::Command("UID 0".into()));
        }
        let started = Instant::now();
        let tag = format!("P{}", self.next_tag);
        self.next_tag = self.next_tag.wrapping_add(1);
        let command = format!("{tag} UID FETCH {uid} (UID BODY.PEEK[])\r\n");
        let t = self.limits.io_timeout;
        let written = tokio::time::timeout(t, async {
            self.io.write_all(command.as_bytes()).await?;
            self.io.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.fail(e.into())),
            Err(_) => return Err(self.fail(ImapError::Timeout(t))),
        }
        loop {
            let line = self.read_line().await?;
            let classified = fetch_stream::classify(&line, tag.as_bytes());
            match classified.map_err(|e| self.fail(e.into()))? {
                Line::Done { kind, text } => {
                    return Ok(BodyStart::NoBody(completion(kind, text)));
                }
                Line::Fetch { items_at } => {
                    let mut info = FetchInfo::default();
                    let items = &fetch_stream::trim_eol(&line)[items_at..];
                    match fetch_stream::parse_items(items, &mut info)
                        .map_err(|e| self.fail(e.into()))?
                    {
                        // A flag update, or a FETCH without a body: not ours to stream.
                        Items::End => {}
                        Items::Body(_) if info.uid.is_some_and(|u| u != uid) => {
                            return Err(self.fail(ImapError::Malformed));
                        }
                        Items::Body(n) => {
                            self.body = Some(BodyStream {
                                tag,
                                uid,
                                left: u64::from(n),
                                info,
                                started,
                            });
                            return Ok(BodyStart::Streaming);
                        }
                    }
                }
                Line::Other { literal } => self.skip(literal.map_or(0, u64::from)).await?,
            }
        }
    }

    /// The next part of the body being streamed: at least one byte unless the body is
    /// empty, at most `max`; `true` with the last part, once the response has completed.
    pub async fn body_next(&mut self, max: usize) -> Result<(Bytes, bool), ImapError> {
        let r = self.body_next_inner(max).await;
        if let Err(e) = &r {
            metrics()
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
        }
        r
    }

    async fn body_next_inner(&mut self, max: usize) -> Result<(Bytes, bool), ImapError> {
        let left = match &self.body {
            Some(b) => b.left,
            None => return Err(ImapError::Command("no body is being streamed".into())),
        };
        let mut data = Bytes::new();
        if left > 0 {
            if self.inbuf.is_empty() {
                self.fill(BODY_READ).await?;
            }
            let k = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.inbuf.len())
                .min(max.max(1));
            data = self.inbuf.split_to(k).freeze();
            let left = left - k as u64;
            if let Some(b) = self.body.as_mut() {
                b.left = left;
            }
            if left > 0 {
                return Ok((data, false));
            }
        }
        self.finish_body().await?;
        Ok((data, true))
    }

    /// Reads what follows the body literal up to the tagged completion.
    async fn finish_body(&mut self) -> Result<(), ImapError> {
        let Some(stream) = self.body.take() else {
            return Ok(());
        };
        let BodyStream {
            tag,
            uid,
            mut info,
            started,
            ..
        } = stream;
        // The rest of the FETCH item list.
        let line = self.read_line().await?;
        match fetch_stream::parse_items(fetch_stream::trim_eol(&line), &mut info) {
            Ok(Items::End) if info.uid == Some(uid) => {}
            Ok(_) | Err(_) => return Err(self.fail(ImapError::Malformed)),
        }
        loop {
            let line = self.read_line().await?;
            let classified = fetch_stream::classify(&line, tag.as_bytes());
            match classified.map_err(|e| self.fail(e.into()))? {
                Line::Done { kind, text } => {
                    metrics()
                        .upstream_command_duration
                        .with_label_values(&["FETCH"])
                        .observe(started.elapsed().as_secs_f64());
                    if self.inbuf.is_empty() {
                        // Give the big read buffer back between messages.
                        self.inbuf = BytesMut::new();
                    }
                    let done = completion(kind, text);
                    return if done.is_ok() {
                        Ok(())
                    } else {
                        Err(ImapError::Refused(done.text))
                    };
                }
                Line::Fetch { items_at } => {
                    let mut other = FetchInfo::default();
                    let items = &fetch_stream::trim_eol(&line)[items_at..];
                    match fetch_stream::parse_items(items, &mut other) {
                        Ok(Items::End) => {}
                        Ok(Items::Body(_)) | Err(_) => return Err(self.fail(ImapError::Malformed)),
                    }
                }
                Line::Other { literal } => self.skip(literal.map_or(0, u64::from)).await?,
            }
        }
    }

    /// Whether a body is being streamed for `uid`.
    pub fn streaming(&self, uid: u32) -> bool {
        self.body.as_ref().is_some_and(|b| b.uid == uid)
    }

    /// Ends a body stream nobody will read further: read to its end if that is cheap,
    /// otherwise give the connection up.
    async fn abandon_body(&mut self) -> Result<(), ImapError> {
        let Some(left) = self.body.as_ref().map(|b| b.left) else {
            return Ok(());
        };
        if left > DRAIN_MAX {
            self.body = None;
            return Err(self.fail(ImapError::Broken));
        }
        self.skip(left).await?;
        match self.finish_body().await {
            Ok(()) | Err(ImapError::Refused(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn completion(kind: fetch_stream::Completion, text: &[u8]) -> Completion {
    Completion {
        kind: match kind {
            fetch_stream::Completion::Ok => StatusKind::Ok,
            fetch_stream::Completion::No => StatusKind::No,
            fetch_stream::Completion::Bad => StatusKind::Bad,
        },
        code: None,
        text: String::from_utf8_lossy(text).into_owned(),
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

/// The plaintext part of STARTTLS: greeting, `STARTTLS`, tagged OK. Any byte the server sends
/// after its OK and before the handshake would be injected into the TLS session's view, so it
/// is an error (the server-side mirror of CVE-2011-0411).
async fn starttls_preamble(tcp: &mut TcpStream, timeout: Duration) -> Result<(), ImapError> {
    const MAX_LINE: usize = 8 * 1024;
    let mut buf = Vec::with_capacity(1024);
    let greeting = read_line(tcp, &mut buf, MAX_LINE, timeout).await?;
    if !greeting.starts_with(b"* OK") {
        return Err(ImapError::StartTlsRefused(
            String::from_utf8_lossy(&greeting).trim_end().to_string(),
        ));
    }
    tokio::time::timeout(timeout, tcp.write_all(b"S0 STARTTLS\r\n"))
        .await
        .map_err(|_| ImapError::Timeout(timeout))??;
    loop {
        let line = read_line(tcp, &mut buf, MAX_LINE, timeout).await?;
        if line.starts_with(b"* ") {
            continue;
        }
        if line.starts_with(b"S0 OK") {
            if !buf.is_empty() {
                return Err(ImapError::StartTlsRefused(
                    "server sent data after its STARTTLS reply".into(),
                ));
            }
            return Ok(());
        }
        return Err(ImapError::StartTlsRefused(
            String::from_utf8_lossy(&line).trim_end().to_string(),
        ));
    }
}

/// Read one line (through LF) out of `buf`, reading more from `tcp` as needed.
async fn read_line(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ImapError> {
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let rest = buf.split_off(end + 1);
            return Ok(std::mem::replace(buf, rest));
        }
        if buf.len() > max {
            return Err(ImapError::Malformed);
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(timeout, tcp.read(&mut chunk))
            .await
            .map_err(|_| ImapError::Timeout(timeout))??;
        if n == 0 {
            return Err(ImapError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
