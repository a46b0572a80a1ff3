//! A blocking POP3 client that behaves like poplib or fetchmail: one command at a time,
//! `TCP_NODELAY` on, every multi-line response read to its `.CRLF` terminator.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;

/// How long any single read or write may block before the session counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for the greeting after the TCP connection is up.
const GREETING_TIMEOUT: Duration = Duration::from_secs(30);

/// A transport: plain TCP or TLS over TCP.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

/// Where to connect, and whether with implicit TLS (POP3S).
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What a download session saw. `content` is a cheap order-sensitive checksum of every
/// retrieved message (after dot-unstuffing); `listing` one of the UIDL (and LIST) output.
#[derive(Clone, Debug, Default)]
pub struct Download {
    pub messages: u64,
    pub bytes: u64,
    pub content: u64,
    pub listing: u64,
    /// Per-RETR latency (command written → terminator read), with the message size.
    pub retr: Vec<(u64, Duration)>,
    /// Connect → `+OK` to PASS.
    pub login: Duration,
    pub elapsed: Duration,
}

pub struct Client {
    io: BufReader<Transport>,
    line: Vec<u8>,
}

fn proto(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A fast, order-sensitive 64-bit mix (not cryptographic; it only has to notice differences).
#[derive(Clone, Copy)]
pub struct Mix(u64);

impl Mix {
    pub fn new() -> Mix {
        Mix(0x9e37_79b9_7f4a_7c15)
    }
    pub fn bytes(&mut self, data: &[u8]) {
        let mut chunks = data.chunks_exact(8);
        let mut h = self.0;
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            h = (h.rotate_left(23) ^ w).wrapping_mul(0x0000_0100_0000_01b3 | 1);
        }
        for &b in chunks.remainder() {
            h = (h.rotate_left(7) ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // The length separates "ab"+"c" from "a"+"bc".
        self.0 = (h ^ data.len() as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
    }
    pub fn value(self) -> u64 {
        self.0
    }
}

impl Client {
    /// Connects, reads the greeting.
    pub fn connect(ep: &Endpoint) -> io::Result<Client> {
        let tcp = TcpStream::connect_timeout(&ep.addr, Duration::from_secs(30))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        let transport = match &ep.tls {
            None => Transport::Plain(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(|e| proto(e.to_string()))?;
                let conn = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| proto(format!("TLS: {e}")))?;
                Transport::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        };
        let mut c = Client {
            io: BufReader::with_capacity(64 * 1024, transport),
            line: Vec::with_capacity(1024),
        };
        // A server-speaks-first protocol: a connection the kernel completed but the server
        // never accepted (listen-queue overflow, SYN cookies) just sits silent. Name it.
        c.set_read_timeout(GREETING_TIMEOUT)?;
        match c.status("greeting") {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "no greeting within {} s (connected, but never served: listen backlog overflow?)",
                        GREETING_TIMEOUT.as_secs()
                    ),
                ));
            }
            r => r?,
        };
        c.set_read_timeout(IO_TIMEOUT)?;
        Ok(c)
    }

    fn set_read_timeout(&mut self, t: Duration) -> io::Result<()> {
        match self.io.get_ref() {
            Transport::Plain(s) => s.set_read_timeout(Some(t)),
            Transport::Tls(s) => s.sock.set_read_timeout(Some(t)),
        }
    }

    fn send(&mut self, cmd: &str) -> io::Result<()> {
        let w = self.io.get_mut();
        w.write_all(cmd.as_bytes())?;
        w.write_all(b"\r\n")?;
        w.flush()
    }

    fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        let n = self.io.read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        if !self.line.ends_with(b"\r\n") {
            return Err(proto(format!(
                "line without CRLF: {:?}",
                String::from_utf8_lossy(&self.line[..self.line.len().min(80)])
            )));
        }
        Ok(())
    }

    /// Reads a status line; `+OK` gives its text, anything else is an error naming `what`.
    fn status(&mut self, what: &str) -> io::Result<String> {
        self.read_line()?;
        if self.line.starts_with(b"+OK") {
            Ok(String::from_utf8_lossy(&self.line[..self.line.len() - 2]).into_owned())
        } else {
            Err(proto(format!(
                "{what}: {}",
                String::from_utf8_lossy(&self.line).trim_end()
            )))
        }
    }

    fn command(&mut self, cmd: &str, what: &str) -> io::Result<String> {
        self.send(cmd)?;
        self.status(what)
    }

    /// Reads a multi-line body to `.CRLF`, un-stuffing; returns (octets, checksum).
    fn multiline(&mut self, mix: &mut Mix) -> io::Result<u64> {
        let mut bytes = 0u64;
        loop {
            self.read_line()?;
            let line: &[u8] = &self.line;
            if line == b".\r\n" {
                return Ok(bytes);
            }
            let data = line.strip_prefix(b".").unwrap_or(line);
            bytes += data.len() as u64;
            mix.bytes(data);
        }
    }

    pub fn login(&mut self, user: &str, pw: &str) -> io::Result<()> {
        self.command(&format!("USER {user}"), "USER")?;
        self.command(&format!("PASS {pw}"), "PASS")?;
        Ok(())
    }

    /// STAT: (messages, octets).
    pub fn stat(&mut self) -> io::Result<(u64, u64)> {
        let s = self.command("STAT", "STAT")?;
        let mut it = s.split_ascii_whitespace().skip(1);
        let n = it.next().and_then(|v| v.parse().ok());
        let o = it.next().and_then(|v| v.parse().ok());
        match (n, o) {
            (Some(n), Some(o)) => Ok((n, o)),
            _ => Err(proto(format!("bad STAT answer: {s}"))),
        }
    }

    /// A multi-line listing command (UIDL, LIST); returns (lines' octets, checksum mixed in).
    pub fn listing(&mut self, cmd: &str, mix: &mut Mix) -> io::Result<u64> {
        self.command(cmd, cmd)?;
        self.multiline(mix)
    }

    /// RETR n: message octets (unstuffed), mixed into `mix`.
    pub fn retr(&mut self, n: u64, mix: &mut Mix) -> io::Result<u64> {
        self.command(&format!("RETR {n}"), "RETR")?;
        self.multiline(mix)
    }

    pub fn quit(mut self) -> io::Result<()> {
        self.command("QUIT", "QUIT")?;
        Ok(())
    }
}

/// The fetchmail/poplib sequence: USER, PASS, STAT, UIDL, RETR 1..n, QUIT (no DELE).
pub fn download_all(ep: &Endpoint, user: &str, pw: &str) -> io::Result<Download> {
    let t0 = Instant::now();
    let mut c = Client::connect(ep)?;
    c.login(user, pw)?;
    let login = t0.elapsed();
    let (n, _) = c.stat()?;
    let mut listing = Mix::new();
    c.listing("UIDL", &mut listing)?;
    let mut content = Mix::new();
    let mut d = Download {
        retr: Vec::with_capacity(n as usize),
        login,
        ..Download::default()
    };
    for i in 1..=n {
        let t = Instant::now();
        let b = c.retr(i, &mut content)?;
        d.retr.push((b, t.elapsed()));
        d.bytes += b;
        d.messages += 1;
    }
    c.quit()?;
    d.elapsed = t0.elapsed();
    d.content = content.value();
    d.listing = listing.value();
    Ok(d)
}

/// USER, PASS, STAT, UIDL, LIST, QUIT: what a client checking a big mailbox does.
pub fn list_only(ep: &Endpoint, user: &str, pw: &str) -> io::Result<Download> {
    let t0 = Instant::now();
    let mut c = Client::connect(ep)?;
    c.login(user, pw)?;
    let login = t0.elapsed();
    let (n, octets) = c.stat()?;
    let mut listing = Mix::new();
    let a = c.listing("UIDL", &mut listing)?;
    let b = c.listing("LIST", &mut listing)?;
    c.quit()?;
    Ok(Download {
        messages: n,
        bytes: octets,
        content: a + b,
        listing: listing.value(),
        retr: Vec::new(),
        login,
        elapsed: t0.elapsed(),
    })
}

impl Client {
    /// TOP n lines: the header, the blank line and `lines` body lines (unstuffed), mixed
    /// into `mix`; returns the octets.
    pub fn top(&mut self, n: u64, lines: u64, mix: &mut Mix) -> io::Result<u64> {
        self.command(&format!("TOP {n} {lines}"), "TOP")?;
        self.multiline(mix)
    }

    /// UIDL as (message number, unique id) pairs, also mixed into `mix`.
    pub fn uidl(&mut self, mix: &mut Mix) -> io::Result<Vec<(u64, String)>> {
        self.command("UIDL", "UIDL")?;
        let mut out = Vec::new();
        loop {
            self.read_line()?;
            if self.line == b".\r\n" {
                return Ok(out);
            }
            mix.bytes(&self.line);
            let s = String::from_utf8_lossy(&self.line[..self.line.len() - 2]).into_owned();
            let mut it = s.splitn(2, ' ');
            match (it.next().and_then(|n| n.parse().ok()), it.next()) {
                (Some(n), Some(id)) => out.push((n, id.to_string())),
                _ => return Err(proto(format!("bad UIDL line: {s}"))),
            }
        }
    }
}

/// USER, PASS, STAT, UIDL, RETR 1..min(n, limit), QUIT: [`download_all`] cut to the first
/// `limit` messages (so a run over a slow link can be short).
pub fn download_first(ep: &Endpoint, user: &str, pw: &str, limit: u64) -> io::Result<Download> {
    let t0 = Instant::now();
    let mut c = Client::connect(ep)?;
    c.login(user, pw)?;
    let login = t0.elapsed();
    let (n, _) = c.stat()?;
    let mut listing = Mix::new();
    c.listing("UIDL", &mut listing)?;
    let mut content = Mix::new();
    let mut d = Download {
        login,
        ..Download::default()
    };
    for i in 1..=n.min(limit) {
        let t = Instant::now();
        let b = c.retr(i, &mut content)?;
        d.retr.push((b, t.elapsed()));
        d.bytes += b;
        d.messages += 1;
    }
    c.quit()?;
    d.elapsed = t0.elapsed();
    d.content = content.value();
    d.listing = listing.value();
    Ok(d)
}

/// A header preview: USER, PASS, STAT, UIDL, `TOP i 0` for every message, then RETR of the
/// `retr` messages given, QUIT. `content` mixes every TOP and RETR output in order.
pub fn preview(ep: &Endpoint, user: &str, pw: &str, retr: &[u64]) -> io::Result<Download> {
    let t0 = Instant::now();
    let mut c = Client::connect(ep)?;
    c.login(user, pw)?;
    let login = t0.elapsed();
    let (n, _) = c.stat()?;
    let mut listing = Mix::new();
    c.listing("UIDL", &mut listing)?;
    let mut content = Mix::new();
    let mut d = Download {
        login,
        ..Download::default()
    };
    for i in 1..=n {
        d.bytes += c.top(i, 0, &mut content)?;
        d.messages += 1;
    }
    for &i in retr.iter().filter(|&&i| i >= 1 && i <= n) {
        let t = Instant::now();
        let b = c.retr(i, &mut content)?;
        d.retr.push((b, t.elapsed()));
        d.bytes += b;
    }
    c.quit()?;
    d.elapsed = t0.elapsed();
    d.content = content.value();
    d.listing = listing.value();
    Ok(d)
}

/// A poll: USER, PASS, STAT, UIDL, RETR of every message whose unique id is not in `known`
/// (which it then adds), QUIT. `messages` counts the RETRs.
pub fn poll(
    ep: &Endpoint,
    user: &str,
    pw: &str,
    known: &mut std::collections::HashSet<String>,
) -> io::Result<Download> {
    let t0 = Instant::now();
    let mut c = Client::connect(ep)?;
    c.login(user, pw)?;
    let login = t0.elapsed();
    c.stat()?;
    let mut listing = Mix::new();
    let ids = c.uidl(&mut listing)?;
    let mut content = Mix::new();
    let mut d = Download {
        login,
        ..Download::default()
    };
    for (n, id) in ids {
        if known.contains(&id) {
            continue;
        }
        let b = c.retr(n, &mut content)?;
        d.bytes += b;
        d.messages += 1;
        known.insert(id);
    }
    c.quit()?;
    d.elapsed = t0.elapsed();
    d.content = content.value();
    d.listing = listing.value();
    Ok(d)
}
