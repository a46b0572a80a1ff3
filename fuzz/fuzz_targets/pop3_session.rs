//! `Session` driven like `pop3::connection` drives it: client bytes -> `LineBuffer` (limit from
//! `max_line_len()`) -> `on_line` -> actions answered from the fuzz input.
//!
//! Input layout (16-byte header, then the client byte stream):
//!   0      UIDL format (index into FORMATS)
//!   1      number of messages in the snapshot (0..=5)
//!   2..6   UIDVALIDITY
//!   6      first UID / UID gap seed
//!   7      size seed
//!   8..12  answers to Login (cycled): Ok or one of the MaildropError variants
//!   12..14 answers to Retrieve (cycled): streamed, Gone, Unavailable (neither failure counts
//!          towards the error cap: Gone goes on, Unavailable closes)
//!   14     bit 0: answer to Commit (Ok / Err); bits 1-3: `Security` (tls, stls,
//!          plaintext_auth) the connection starts with
//!   15     chunk size seed
//!
//! Checks: no panic; every reply is non-empty, starts with `+`/`-`, ends in CRLF, has no bare CR
//! or LF; single-line replies are one line, multi-line ones (CAPA, LIST, UIDL, AUTH) end in
//! `\r\n.\r\n` with every inner line dot-stuffed; Login only after PASS (with the USER name) or
//! AUTH; Retrieve/LIST/UIDL/STAT/DELE/Commit agree with a model of the snapshot and deletions;
//! UIDLs are 1..=70 chars of 0x21..=0x7E and unique; the error cap closes at exactly MAX_ERRORS;
//! STLS: `StartTls` only when offered (and not yet TLS), the driver then drops everything
//! buffered (CVE-2011-0411) and the session restarts AUTHORIZATION; no Login without TLS unless
//! plaintext is allowed; CAPA advertises STLS / USER exactly when they would be accepted.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use popbridge::maildrop::{MaildropError, MessageEntry, Snapshot};
use popbridge::pop3::command::{parse, Command, LineBuffer, MAX_BUFFERED, MAX_COMMAND_LINE};
use popbridge::pop3::response::DotStuffer;
use popbridge::pop3::session::{Action, LoginSecret, Security, Session, SessionConfig, MAX_ERRORS};
use popbridge::uidl::UidlFormat;

const HEADER: usize = 16;
const FORMATS: &[&str] = &[
    "%08Xu%08Xv",
    "%u",
    "%v.%u",
    "%{uid}",
    "%%%u%%",
    "%070u",
    "%010u%010v",
    "%x{uidvalidity}-%08xu",
    ".%u",
];

#[derive(Default)]
struct Model {
    snapshot: Option<Snapshot>,
    deleted: Vec<bool>,
    /// Name given by the last USER in AUTHORIZATION.
    user: Option<String>,
    errors: u32,
    sec: Option<Security>,
    login_i: usize,
    retr_i: usize,
}

/// What the line that produced an action was, as far as the checks care.
#[derive(Debug)]
enum Sent {
    Sasl,
    Cmd(Command),
    Other,
}

#[derive(PartialEq)]
enum Flow {
    Continue,
    End,
    /// STLS accepted: the driver discards the buffered bytes and handshakes.
    StartTls,
}

fn lines_of(reply: &[u8]) -> Vec<&[u8]> {
    assert!(!reply.is_empty(), "empty reply");
    assert!(
        reply.ends_with(b"\r\n"),
        "reply without CRLF: {:?}",
        String::from_utf8_lossy(reply)
    );
    let body = &reply[..reply.len() - 2];
    let lines: Vec<&[u8]> = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    for l in &lines {
        assert!(
            !l.contains(&b'\r') && !l.contains(&b'\n'),
            "bare CR/LF in reply {:?}",
            String::from_utf8_lossy(reply)
        );
    }
    // Every LF was part of a CRLF.
    assert_eq!(
        reply.iter().filter(|&&b| b == b'\n').count(),
        reply.windows(2).filter(|w| w == b"\r\n").count()
    );
    lines
}

/// One status line: `+OK...`, `-ERR...` or the SASL `+ `.
fn check_single(reply: &[u8]) -> bool {
    let lines = lines_of(reply);
    assert_eq!(
        lines.len(),
        1,
        "several lines in {:?}",
        String::from_utf8_lossy(reply)
    );
    let l = lines[0];
    assert!(
        l == b"+OK"
            || l.starts_with(b"+OK ")
            || l == b"-ERR"
            || l.starts_with(b"-ERR ")
            || l == b"+ ",
        "bad status line {:?}",
        String::from_utf8_lossy(l)
    );
    l.starts_with(b"-ERR")
}

/// A multi-line `+OK` reply; returns its inner lines, un-stuffed.
fn check_multi(reply: &[u8]) -> Vec<Vec<u8>> {
    let lines = lines_of(reply);
    assert!(
        lines.len() >= 2,
        "multi-line reply too short: {:?}",
        String::from_utf8_lossy(reply)
    );
    assert!(lines[0] == b"+OK" || lines[0].starts_with(b"+OK "));
    assert_eq!(
        *lines.last().unwrap(),
        b".",
        "no terminator: {:?}",
        String::from_utf8_lossy(reply)
    );
    lines[1..lines.len() - 1]
        .iter()
        .map(|l| {
            assert_ne!(
                *l,
                b".",
                "early terminator in {:?}",
                String::from_utf8_lossy(reply)
            );
            match l.strip_prefix(b".") {
                Some(rest) => {
                    assert!(!rest.is_empty());
                    rest.to_vec()
                }
                None => l.to_vec(),
            }
        })
        .collect()
}

fn legal_uidl(s: &[u8]) -> bool {
    !s.is_empty() && s.len() <= 70 && s.iter().all(|b| (0x21..=0x7e).contains(b))
}

struct Run<'a> {
    header: &'a [u8],
    m: Model,
    session: Session,
    fmt: UidlFormat,
}

impl Run<'_> {
    fn live(&self) -> Vec<(usize, &MessageEntry)> {
        let s = self.m.snapshot.as_ref().unwrap();
        s.messages
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.m.deleted[*i])
            .map(|(i, e)| (i + 1, e))
            .collect()
    }

    /// A `Reply`/`Close` payload; counts `-ERR`s against the cap.
    fn reply(&mut self, bytes: &[u8], sent: &Sent, closing: bool) {
        let multi = bytes.starts_with(b"+OK")
            && matches!(
                sent,
                Sent::Cmd(Command::Capa)
                    | Sent::Cmd(Command::List(None))
                    | Sent::Cmd(Command::Uidl(None))
                    | Sent::Cmd(Command::Auth {
                        mechanism: None,
                        ..
                    })
            )
            && !closing;
        if multi {
            let inner = check_multi(bytes);
            self.check_multi_content(sent, &inner);
            return;
        }
        let is_err = check_single(bytes);
        if is_err {
            self.m.errors += 1;
            if closing {
                // Only the error cap closes with -ERR from on_line.
                assert_eq!(self.m.errors, MAX_ERRORS, "closed with -ERR before the cap");
                assert!(self.session.error_limit_reached());
            } else {
                assert!(
                    self.m.errors < MAX_ERRORS,
                    "error cap passed without closing"
                );
                assert!(!self.session.error_limit_reached());
            }
            return;
        }
        if bytes == b"+ \r\n" {
            assert!(matches!(
                sent,
                Sent::Cmd(Command::Auth {
                    mechanism: Some(_),
                    initial_response: None
                })
            ));
            return;
        }
        // +OK: keep the model in step and check the figures.
        let text = String::from_utf8_lossy(&bytes[..bytes.len() - 2]).into_owned();
        match sent {
            Sent::Cmd(Command::Stat) if self.m.snapshot.is_some() => {
                let live = self.live();
                let octets: u64 = live.iter().map(|(_, e)| e.size).sum();
                assert_eq!(text, format!("+OK {} {octets}", live.len()));
            }
            Sent::Cmd(Command::List(Some(n))) => {
                let e = self.m.snapshot.as_ref().unwrap().messages[*n as usize - 1];
                assert!(!self.m.deleted[*n as usize - 1]);
                assert_eq!(text, format!("+OK {n} {}", e.size));
            }
            Sent::Cmd(Command::Uidl(Some(n))) => {
                let s = self.m.snapshot.as_ref().unwrap();
                let e = s.messages[*n as usize - 1];
                assert!(!self.m.deleted[*n as usize - 1]);
                let uidl = self.fmt.format(e.uid, s.uid_validity);
                assert!(legal_uidl(uidl.as_bytes()));
                assert_eq!(text, format!("+OK {n} {uidl}"));
            }
            Sent::Cmd(Command::Dele(n)) => {
                let i = *n as usize - 1;
                assert!(
                    i < self.m.deleted.len() && !self.m.deleted[i],
                    "DELE {n} accepted"
                );
                self.m.deleted[i] = true;
            }
            Sent::Cmd(Command::Rset) if self.m.snapshot.is_some() => {
                self.m.deleted.iter_mut().for_each(|d| *d = false);
            }
            Sent::Cmd(Command::User(u)) if self.m.snapshot.is_none() => {
                self.m.user = Some(u.clone());
            }
            _ => {}
        }
    }

    fn check_multi_content(&mut self, sent: &Sent, inner: &[Vec<u8>]) {
        match sent {
            Sent::Cmd(Command::List(None)) => {
                let want: Vec<Vec<u8>> = self
                    .live()
                    .iter()
                    .map(|(i, e)| format!("{i} {}", e.size).into_bytes())
                    .collect();
                assert_eq!(inner, &want[..]);
            }
            Sent::Cmd(Command::Uidl(None)) => {
                let live = self.live();
                assert_eq!(inner.len(), live.len());
                let mut seen = std::collections::HashSet::new();
                for (l, (i, _)) in inner.iter().zip(&live) {
                    let (num, uidl) = l.split_at(l.iter().position(|&b| b == b' ').unwrap());
                    assert_eq!(num, i.to_string().as_bytes());
                    assert!(
                        legal_uidl(&uidl[1..]),
                        "illegal UIDL {:?}",
                        String::from_utf8_lossy(uidl)
                    );
                    assert!(seen.insert(uidl.to_vec()), "duplicate UIDL");
                }
            }
            Sent::Cmd(Command::Capa) => {
                assert!(inner.iter().any(|l| l == b"UIDL"));
                let authed = self.m.snapshot.is_some();
                let sec = self.m.sec.unwrap();
                let auth_ok = sec.tls || sec.plaintext_auth;
                assert_eq!(inner.iter().any(|l| l == b"USER"), !authed && auth_ok);
                assert_eq!(inner.iter().any(|l| l == b"SASL PLAIN"), !authed && auth_ok);
                assert_eq!(
                    inner.iter().any(|l| l == b"STLS"),
                    !authed && sec.stls && !sec.tls
                );
            }
            _ => {}
        }
    }

    fn action(&mut self, a: Action, sent: &Sent) -> Flow {
        match a {
            Action::Reply(b) => {
                self.reply(&b, sent, false);
                Flow::Continue
            }
            Action::Close(b) => {
                self.reply(&b, sent, true);
                Flow::End
            }
            Action::StartTls(b) => {
                let sec = self.m.sec.as_mut().unwrap();
                assert!(self.m.snapshot.is_none(), "StartTls after login");
                assert!(sec.stls && !sec.tls, "StartTls not offered: {sec:?}");
                assert!(matches!(sent, Sent::Cmd(Command::Stls)));
                assert!(!check_single(&b));
                sec.tls = true;
                sec.stls = false;
                self.m.user = None;
                Flow::StartTls
            }
            Action::Login { user, secret } => {
                // Bearer tokens come only with sasl_oauth, which this target leaves off.
                let LoginSecret::Password(password) = secret else {
                    panic!("a bearer token without XOAUTH2/OAUTHBEARER offered");
                };
                assert!(self.m.snapshot.is_none(), "Login while logged in");
                let sec = self.m.sec.unwrap();
                assert!(sec.tls || sec.plaintext_auth, "Login on plaintext: {sec:?}");
                assert!(!user.is_empty() && !password.as_str().is_empty());
                match sent {
                    Sent::Cmd(Command::Pass(p)) => {
                        assert_eq!(p.as_str(), password.as_str());
                        assert_eq!(self.m.user.as_deref(), Some(user.as_str()));
                    }
                    Sent::Cmd(Command::Auth {
                        initial_response: Some(_),
                        ..
                    })
                    | Sent::Sasl => {}
                    other => panic!("Login after {other:?}"),
                }
                // USER is consumed by PASS (and AUTH leaves it alone, but a later PASS needs a
                // fresh USER only if PASS consumed it).
                if matches!(sent, Sent::Cmd(Command::Pass(_))) {
                    self.m.user = None;
                }
                let pick = self.header[8 + self.m.login_i % 4];
                self.m.login_i += 1;
                let result = match pick % 8 {
                    0 => Err(MaildropError::Auth),
                    1 => Err(MaildropError::unavailable("upstream\r\n+OK evil")),
                    2 => Err(MaildropError::Unsupported("x".into())),
                    3 => Err(MaildropError::InUse),
                    4 => Err(MaildropError::Gone),
                    _ => Ok(self.snapshot()),
                };
                let ok = result.is_ok();
                if !ok {
                    // A failed login restarts AUTHORIZATION.
                    self.m.user = None;
                }
                if let Ok(s) = &result {
                    self.m.deleted = vec![false; s.messages.len()];
                    self.m.snapshot = Some(s.clone());
                }
                let next = self.session.on_login(result);
                assert_eq!(self.session.is_authenticated(), ok);
                if next.close {
                    assert!(!ok);
                    self.reply(&next.bytes, &Sent::Other, true);
                    Flow::End
                } else {
                    self.reply(&next.bytes, &Sent::Other, false);
                    assert_eq!(next.bytes.starts_with(b"+OK"), ok);
                    Flow::Continue
                }
            }
            Action::Retrieve {
                msg,
                uid,
                size,
                top_lines,
                ok_line,
            } => {
                let s = self.m.snapshot.as_ref().expect("Retrieve before login");
                assert!(
                    msg >= 1 && (msg as usize) <= s.messages.len(),
                    "msg {msg} out of range"
                );
                let i = msg as usize - 1;
                assert!(!self.m.deleted[i], "Retrieve of deleted message {msg}");
                assert_eq!(s.messages[i].uid, uid);
                assert_eq!(s.messages[i].size, size);
                match sent {
                    Sent::Cmd(Command::Retr(n)) => assert_eq!((*n, top_lines), (msg, None)),
                    Sent::Cmd(Command::Top { msg: n, lines }) => {
                        assert_eq!((*n, top_lines), (msg, Some(*lines)))
                    }
                    other => panic!("Retrieve after {other:?}"),
                }
                assert!(!check_single(&ok_line));
                let pick = self.header[12 + self.m.retr_i % 2];
                self.m.retr_i += 1;
                match pick % 4 {
                    0 => {
                        // A message gone since the listing: -ERR, not an error towards the cap.
                        let r = self.session.on_retrieve_failed(msg, &MaildropError::Gone);
                        assert!(!r.close, "a gone message never closes the session");
                        assert!(check_single(&r.bytes), "a gone message is -ERR");
                        assert!(!self.session.error_limit_reached());
                        Flow::Continue
                    }
                    1 => {
                        // The upstream is gone: -ERR [SYS/TEMP] and the driver closes. Not a
                        // client error: it does not count towards the cap either.
                        let before = self.session.error_limit_reached();
                        let r = self
                            .session
                            .on_retrieve_failed(msg, &MaildropError::unavailable("down"));
                        assert!(r.close, "an upstream failure ends the session");
                        assert!(check_single(&r.bytes), "an upstream failure is -ERR");
                        assert!(r.bytes.starts_with(b"-ERR [SYS/TEMP] "));
                        assert_eq!(self.session.error_limit_reached(), before);
                        Flow::End
                    }
                    _ => {
                        // Stream a small body the way the driver does.
                        let mut st = top_lines.map_or_else(DotStuffer::new, DotStuffer::top);
                        let mut out = ok_line.clone();
                        st.feed(b"Subject: x\r\n\r\n.\r\nbody\n", &mut out);
                        st.finish(&mut out);
                        assert!(out.ends_with(b"\r\n.\r\n"));
                        Flow::Continue
                    }
                }
            }
            Action::Commit { uids } => {
                let s = self.m.snapshot.as_ref().expect("Commit before login");
                assert!(matches!(sent, Sent::Cmd(Command::Quit)));
                let want: Vec<u32> = s
                    .messages
                    .iter()
                    .zip(&self.m.deleted)
                    .filter(|(_, d)| **d)
                    .map(|(e, _)| e.uid)
                    .collect();
                assert_eq!(uids, want);
                let r = if self.header[14] & 1 == 0 {
                    Ok(())
                } else {
                    Err(MaildropError::unavailable("x"))
                };
                let ok = r.is_ok();
                let b = self.session.on_commit(r);
                check_single(&b);
                assert_eq!(b.starts_with(b"+OK"), ok);
                Flow::End
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let h = self.header;
        let n = (h[1] % 6) as usize;
        let mut uid = u32::from(h[6] % 4) + 1;
        let messages = (0..n)
            .map(|i| {
                let e = MessageEntry {
                    uid,
                    size: u64::from(h[7].rotate_left(i as u32)) * 37 + i as u64,
                };
                uid = uid.saturating_add(1 + u32::from(h[6] >> 4) * (i as u32 + 1));
                e
            })
            .collect();
        Snapshot {
            uid_validity: u32::from_le_bytes([h[2], h[3], h[4], h[5]]),
            messages,
            legacy: None,
            others: None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let (header, stream) = data.split_at(HEADER);
    let fmt_src = FORMATS[header[0] as usize % FORMATS.len()];
    let fmt = UidlFormat::parse(fmt_src).expect("seed formats are valid");
    let cfg = SessionConfig {
        uidl_format: fmt.clone(),
        ..SessionConfig::default()
    };
    let sec = Security {
        tls: header[14] & 2 != 0,
        stls: header[14] & 4 != 0,
        plaintext_auth: header[14] & 8 != 0,
    };
    let session = Session::new(Arc::new(cfg)).with_security(sec);
    let greeting = session.greeting();
    let m = Model {
        sec: Some(sec),
        ..Model::default()
    };
    let mut run = Run {
        header,
        m,
        session,
        fmt,
    };
    assert!(!check_single(&greeting) && greeting.starts_with(b"+OK"));

    let chunk = header[15] as usize + 1;
    let mut lb = LineBuffer::new();
    let mut pos = 0;
    loop {
        lb.set_limit(run.session.max_line_len());
        while let Some(line) = lb.next_line() {
            let in_sasl = run.session.max_line_len() > MAX_COMMAND_LINE;
            let sent = match &line {
                Ok(_) if in_sasl => Sent::Sasl,
                Ok(l) => parse(l).map(Sent::Cmd).unwrap_or(Sent::Other),
                Err(_) => Sent::Other,
            };
            let action = run.session.on_line(line.as_deref().map_err(|e| *e));
            match run.action(action, &sent) {
                Flow::End => return,
                Flow::Continue => {}
                Flow::StartTls => {
                    // Pipelined plaintext must never be executed (CVE-2011-0411).
                    lb = LineBuffer::new();
                    run.session.on_tls_established();
                    assert!(!run.session.is_authenticated());
                    assert_eq!(run.session.max_line_len(), MAX_COMMAND_LINE);
                }
            }
            lb.set_limit(run.session.max_line_len());
        }
        if pos >= stream.len() {
            return;
        }
        let n = chunk.min(lb.room()).min(stream.len() - pos);
        assert!(n > 0);
        lb.push(&stream[pos..pos + n]);
        pos += n;
        assert!(lb.buffered() <= MAX_BUFFERED);
    }
});
