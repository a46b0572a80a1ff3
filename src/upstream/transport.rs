//! Opening a connection to an [`Endpoint`]: TCP (with `TCP_NODELAY`), then implicit TLS, or the
//! protocol's plaintext upgrade (IMAP `STARTTLS`, POP3 `STLS`) and TLS, or nothing. Every step
//! has a deadline; certificates are always verified.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::endpoint::{Endpoint, Protocol, Security};
use super::reader::{ReadError, Reader};

/// Anything a connection can run over: TCP, or TLS on TCP (or an in-memory pipe in tests).
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("TLS with the server failed: {0}")]
    Tls(String),
    /// The greeting or the STARTTLS/STLS answer was not what the protocol promises.
    #[error("server refused the upgrade to TLS: {0}")]
    Refused(String),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// An open connection, secured as the endpoint asks.
pub struct Connected {
    pub io: Box<dyn AsyncStream>,
    /// The greeting was read (and checked) before the TLS upgrade: no new one follows it
    /// (RFC 3501 6.2.1, RFC 2595 4).
    pub greeted: bool,
}

/// The longest line accepted during the plaintext upgrade.
const MAX_PREAMBLE_LINE: usize = 8 * 1024;

impl Endpoint {
    /// Connects and secures the connection; the greeting is left to the protocol's reader
    /// unless the upgrade dialogue had to read it.
    pub async fn connect(&self) -> Result<Connected, TransportError> {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| TransportError::Connect {
            addr: addr.clone(),
            reason: format!("timed out after {:?}", self.connect_timeout),
        })?
        .map_err(|e| TransportError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        // Without it every small command waits for the peer's delayed ACK (~40 ms).
        tcp.set_nodelay(true)?;
        match (self.security, &self.tls) {
            (Security::None, _) => Ok(Connected {
                io: Box::new(tcp),
                greeted: false,
            }),
            (Security::Tls, Some(_)) => Ok(Connected {
                io: self.handshake(tcp).await?,
                greeted: false,
            }),
            (Security::Starttls, Some(_)) => {
                let mut tcp = tcp;
                upgrade_dialogue(&mut tcp, self.protocol, self.io_timeout).await?;
                Ok(Connected {
                    io: self.handshake(tcp).await?,
                    greeted: true,
                })
            }
            (_, None) => Err(TransportError::Tls("no TLS configuration".into())),
        }
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<Box<dyn AsyncStream>, TransportError> {
        let Some((connector, name)) = &self.tls else {
            return Err(TransportError::Tls("no TLS configuration".into()));
        };
        let tls = tokio::time::timeout(self.io_timeout, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| TransportError::Timeout(self.io_timeout))?
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        Ok(Box::new(tls))
    }
}

/// The plaintext part of STARTTLS / STLS: the greeting, the command, its OK. Any byte the
/// server sends after that OK and before the handshake would be read as if it came through
/// TLS, so it is an error (the client-side mirror of CVE-2011-0411).
async fn upgrade_dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    protocol: Protocol,
    timeout: Duration,
) -> Result<(), TransportError> {
    let mut reader = Reader::new(MAX_PREAMBLE_LINE);
    let shown = |line: &[u8]| String::from_utf8_lossy(line).trim_end().to_string();
    let (greeting_ok, command, untagged, ok): (&[u8], &[u8], &[u8], &[u8]) = match protocol {
        Protocol::Imap => (b"* OK", b"S0 STARTTLS\r\n", b"* ", b"S0 OK"),
        Protocol::Pop3 => (b"+OK", b"STLS\r\n", b"", b"+OK"),
    };
    let greeting = reader.read_line(io, timeout).await?;
    if !greeting.starts_with(greeting_ok) {
        return Err(TransportError::Refused(shown(&greeting)));
    }
    tokio::time::timeout(timeout, async {
        io.write_all(command).await?;
        io.flush().await
    })
    .await
    .map_err(|_| TransportError::Timeout(timeout))??;
    loop {
        let line = reader.read_line(io, timeout).await?;
        if !untagged.is_empty() && line.starts_with(untagged) {
            continue;
        }
        if !line.starts_with(ok) {
            return Err(TransportError::Refused(shown(&line)));
        }
        if !reader.is_empty() {
            return Err(TransportError::Refused(
                "server sent data after its answer to the upgrade".into(),
            ));
        }
        return Ok(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    /// A scripted server: sends `greeting`, reads one line, sends `reply`.
    async fn dialogue(
        protocol: Protocol,
        greeting: &[u8],
        reply: &[u8],
    ) -> (Result<(), TransportError>, String) {
        let (mut ours, theirs) = tokio::io::duplex(4096);
        let (greeting, reply) = (greeting.to_vec(), reply.to_vec());
        let server = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(theirs);
            let mut r = BufReader::new(r);
            w.write_all(&greeting).await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            w.write_all(&reply).await.unwrap();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
            line
        });
        let r = upgrade_dialogue(&mut ours, protocol, Duration::from_secs(2)).await;
        drop(ours);
        (r, server.await.unwrap())
    }

    #[tokio::test]
    async fn starttls_and_stls_dialogues() {
        let (r, sent) = dialogue(
            Protocol::Imap,
            b"* OK ready\r\n",
            b"* CAPABILITY x\r\nS0 OK go\r\n",
        )
        .await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(sent, "S0 STARTTLS\r\n");
        let (r, sent) = dialogue(Protocol::Pop3, b"+OK pop\r\n", b"+OK begin TLS\r\n").await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(sent, "STLS\r\n");
        for (p, g, reply) in [
            (
                Protocol::Imap,
                &b"* OK ready\r\n"[..],
                &b"S0 NO never\r\n"[..],
            ),
            (Protocol::Imap, b"* BYE busy\r\n", b""),
            (Protocol::Pop3, b"+OK pop\r\n", b"-ERR no TLS\r\n"),
            (Protocol::Pop3, b"-ERR go away\r\n", b""),
            // Injection: bytes after the OK, before the handshake.
            (
                Protocol::Imap,
                b"* OK ready\r\n",
                b"S0 OK go\r\n* injected\r\n",
            ),
            (
                Protocol::Pop3,
                b"+OK pop\r\n",
                b"+OK go\r\n+OK injected\r\n",
            ),
        ] {
            let (r, _) = dialogue(p, g, reply).await;
            assert!(
                matches!(
                    r,
                    Err(TransportError::Refused(_)) | Err(TransportError::Read(_))
                ),
                "{g:?} {reply:?}: {r:?}"
            );
        }
    }
}
