//! A bare POP3 connection for tests that need exact control over what is sent when (pipelining,
//! sessions held open across a kill or a reload). Real clients (poplib, curl) cover the rest.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct RawPop3 {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
    /// The greeting line as received.
    pub greeting: String,
}

impl RawPop3 {
    /// Connect to 127.0.0.1:`port` and read the greeting (30 s read timeout).
    pub fn connect(port: u16) -> RawPop3 {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = RawPop3 {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
            greeting: String::new(),
        };
        c.greeting = c.line();
        c
    }

    /// Connect and assert the greeting is +OK.
    pub fn ready(port: u16) -> RawPop3 {
        let c = RawPop3::connect(port);
        assert!(c.greeting.starts_with("+OK"), "greeting: {:?}", c.greeting);
        c
    }

    /// Reads until the server closes the connection (or resets it); false if it is still
    /// open after `t`.
    pub fn wait_closed(&mut self, t: Duration) -> bool {
        self.reader.get_ref().set_read_timeout(Some(t)).unwrap();
        let mut sink = Vec::new();
        match std::io::Read::read_to_end(&mut self.reader, &mut sink) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// One line, CRLF included; empty at end of stream.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        let _ = self.reader.read_line(&mut l);
        l
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Send one command line and return the first line of the answer ("" if the peer closed).
    pub fn cmd(&mut self, line: &str) -> String {
        if self
            .writer
            .write_all(format!("{line}\r\n").as_bytes())
            .is_err()
        {
            return String::new();
        }
        self.line()
    }

    /// The rest of a multi-line reply, terminator excluded.
    pub fn multi(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line();
            if l == ".\r\n" || l.is_empty() {
                return out;
            }
            out.push(l);
        }
    }

    /// USER and PASS, asserting both succeed.
    pub fn login(&mut self, user: &str, password: &str) {
        let r = self.cmd(&format!("USER {user}"));
        assert!(r.starts_with("+OK"), "USER: {r}");
        let r = self.cmd(&format!("PASS {password}"));
        assert!(r.starts_with("+OK"), "PASS: {r}");
    }
}
