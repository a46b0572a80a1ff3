//! A minimal IMAP client over a raw socket (tagged commands, LITERAL+ appends): load from outside
//! popbridge in the soak and crash tests, and mailbox set-up for the Cyrus sandbox. Untagged
//! lines are returned as text (literals in FETCH replies come back as the lines they contain).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct Imap {
    r: BufReader<TcpStream>,
    w: TcpStream,
    tag: u32,
    /// The greeting line as received.
    pub greeting: String,
}

impl Imap {
    /// Connects to 127.0.0.1:`port` and reads the greeting (30 s read timeout).
    pub fn connect(port: u16) -> Imap {
        let s = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("IMAP connect to 127.0.0.1:{port}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Imap {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            tag: 0,
            greeting: String::new(),
        };
        c.greeting = c.line();
        assert!(
            c.greeting.starts_with("* OK"),
            "IMAP greeting: {:?}",
            c.greeting
        );
        c
    }

    /// Connects, logs in and selects INBOX, panicking on any failure.
    pub fn login(port: u16, user: &str, pw: &str) -> Imap {
        let mut c = Imap::connect(port);
        c.run(&format!("LOGIN {user} {pw}"), &[]);
        c.run("SELECT INBOX", &[]);
        c
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }

    /// Sends a command (with an optional LITERAL+ payload appended as its last argument);
    /// returns the untagged lines on OK, the tagged line otherwise.
    pub fn try_run(&mut self, cmd: &str, literal: &[u8]) -> Result<Vec<String>, String> {
        self.tag += 1;
        let tag = format!("s{}", self.tag);
        let mut bytes = format!("{tag} {cmd}").into_bytes();
        if !literal.is_empty() {
            bytes.extend_from_slice(format!(" {{{}+}}\r\n", literal.len()).as_bytes());
            bytes.extend_from_slice(literal);
        }
        bytes.extend_from_slice(b"\r\n");
        self.w.write_all(&bytes).map_err(|e| e.to_string())?;
        let mut untagged = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                return Err(format!("{cmd}: connection closed"));
            }
            if l.starts_with(&format!("{tag} ")) {
                return if l.starts_with(&format!("{tag} OK")) {
                    Ok(untagged)
                } else {
                    Err(l)
                };
            }
            untagged.push(l);
        }
    }

    /// [`Imap::try_run`], panicking unless the server answers OK.
    pub fn run(&mut self, cmd: &str, literal: &[u8]) -> Vec<String> {
        self.try_run(cmd, literal)
            .unwrap_or_else(|e| panic!("IMAP {cmd}: {e}"))
    }
}
