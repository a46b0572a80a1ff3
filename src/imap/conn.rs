//! One upstream IMAP connection: a thin tokio driver around imap-next's sans-I/O `Client`.
//!
//! imap-next's own `Stream` only takes a `TcpStream` or a `TlsStream`, and keeps its buffers
//! unbounded; this driver works over any `AsyncRead + AsyncWrite`, puts a deadline on every read
//! and write, and treats any failure (timeout included) as fatal to the connection, because a
//! command cut off mid-write leaves the IMAP session in an unknown state.

use std::time::{Duration, Instant};

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
            ImapError::Malformed | ImapError::Command(_) => "protocol",
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
    read_buf: Box<[u8]>,
    limits: ConnLimits,
    next_tag: u32,
    broken: bool,
}

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
            read_buf: vec![0u8; 64 * 1024].into_boxed_slice(),
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
                // AUTHENTICATE is only ever sent with its initial response (SASL-IR).
                Event::AuthenticateContinuationRequestReceived { .. } => {
                    return Err(self.fail(ImapError::Command(
                        "server asked for more SASL data (AUTHENTICATE needs SASL-IR)".into(),
                    )));
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
                    let t = self.limits.io_timeout;
                    match tokio::time::timeout(t, self.io.read(&mut self.read_buf)).await {
                        Ok(Ok(0)) => return Err(self.fail(ImapError::Closed)),
                        Ok(Ok(n)) => {
                            metrics().upstream_received_bytes.inc_by(n as u64);
                            self.client.enqueue_input(&self.read_buf[..n]);
                        }
                        Ok(Err(e)) => return Err(self.fail(e.into())),
                        Err(_) => return Err(self.fail(ImapError::Timeout(t))),
                    }
                }
                Err(Interrupt::Error(e)) => {
                    tracing::warn!(error = %e, "upstream response could not be parsed");
                    return Err(self.fail(ImapError::Malformed));
                }
            }
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
