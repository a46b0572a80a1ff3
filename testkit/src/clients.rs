//! Real clients, run as the tests' users would run them: Python's poplib
//! (`tests/clients/pop3_session.py`) and imaplib (`tests/clients/imap_state.py`), and curl.
//! The Python scripts print JSON (binary data as base64), deserialized here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use crate::mail::{dot_unstuff, split_status};
use crate::repo_root;

/// How [`poplib_with`] connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopTls {
    None,
    /// TLS from the first byte (pop3s).
    Implicit,
    /// STLS right after the greeting (recorded as a first step named `stls`).
    Stls,
}

#[derive(Debug, Clone)]
pub struct PopOpts {
    pub port: u16,
    pub tls: PopTls,
    pub cafile: Option<PathBuf>,
    /// Leave out poplib's decoded lines (halves the output for huge messages).
    pub no_lines: bool,
}

impl PopOpts {
    pub fn plain(port: u16) -> PopOpts {
        PopOpts {
            port,
            tls: PopTls::None,
            cafile: None,
            no_lines: false,
        }
    }
}

/// One POP3 session run by `tests/clients/pop3_session.py` (deserialized from what it prints).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PopSession {
    /// The greeting line, raw.
    #[serde(deserialize_with = "de_b64")]
    pub greeting: Vec<u8>,
    pub steps: Vec<PopStep>,
    /// A connection-level failure (EOF, reset, TLS error) that ended the script early.
    pub fatal: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct PopStep {
    /// The step as given, e.g. `"top 1 0"`.
    pub step: String,
    /// The server answered +OK.
    pub ok: bool,
    /// The status line (without CRLF) as text (latin-1).
    pub resp: String,
    /// Every byte the server sent for this step, exactly as received.
    #[serde(deserialize_with = "de_b64")]
    pub raw: Vec<u8>,
    /// For multi-line replies, the lines poplib hands to an application: dot-unstuffed,
    /// without CRLF. `None` for one-line replies and with `no_lines`.
    #[serde(deserialize_with = "de_b64_lines")]
    pub lines: Option<Vec<Vec<u8>>>,
    pub error: Option<String>,
}

impl PopStep {
    /// The data of a multi-line reply, dot-unstuffed, CRLF line ends, terminator removed.
    pub fn data(&self) -> Vec<u8> {
        dot_unstuff(split_status(&self.raw).1)
    }
    /// poplib's lines joined back with CRLF after each line.
    pub fn lines_joined(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for l in self
            .lines
            .as_ref()
            .expect("no lines recorded for this step")
        {
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

impl PopSession {
    /// The first step named exactly `name`; panics listing the steps if there is none.
    pub fn step(&self, name: &str) -> &PopStep {
        self.steps
            .iter()
            .find(|s| s.step == name)
            .unwrap_or_else(|| {
                panic!(
                    "no step {name:?} in session (fatal: {:?}); steps: {:?}",
                    self.fatal,
                    self.steps
                        .iter()
                        .map(|s| (&s.step, &s.resp))
                        .collect::<Vec<_>>()
                )
            })
    }
    /// Panics unless every step got +OK and nothing failed at connection level.
    pub fn assert_all_ok(&self) {
        assert!(self.fatal.is_none(), "session failed: {:?}", self.fatal);
        for s in &self.steps {
            assert!(s.ok, "step {:?} failed: {:?}", s.step, s.resp);
        }
    }
}

/// Runs a POP3 session with poplib over plain TCP to 127.0.0.1:`port`. Steps as in
/// `tests/clients/pop3_session.py`: "user NAME", "pass PW", "stat", "list", "uidl", "retr N",
/// "top N M", "dele N", "rset", "noop", "capa", "quit", "raw LINE", "rawmulti LINE".
pub fn poplib(port: u16, steps: &[&str]) -> PopSession {
    poplib_with(&PopOpts::plain(port), steps)
}

pub fn poplib_with(opts: &PopOpts, steps: &[&str]) -> PopSession {
    let script = repo_root().join("tests/clients/pop3_session.py");
    let steps_json = serde_json::to_string(steps).expect("steps serialize");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).args(["--port", &opts.port.to_string()]);
    match opts.tls {
        PopTls::None => {}
        PopTls::Implicit => {
            cmd.args(["--tls", "implicit"]);
        }
        PopTls::Stls => {
            cmd.args(["--tls", "stls"]);
        }
    }
    if let Some(ca) = &opts.cafile {
        cmd.arg("--cafile").arg(ca);
    }
    if opts.no_lines {
        cmd.arg("--no-lines");
    }
    let out = cmd.arg(&steps_json).output().expect("run python3");
    assert!(
        out.status.success(),
        "pop3_session.py failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json("pop3_session.py", &out.stdout)
}

/// The result of one curl run.
#[derive(Debug, Clone)]
pub struct CurlResult {
    /// curl's exit code (0 = success; 67 = login denied, ...).
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `curl -sS --max-time 60 EXTRA_ARGS URL`, e.g.
/// `curl_pop3("pop3://u:p@127.0.0.1:1110/1", &[])` (RETR 1) or with `&["-X", "UIDL"]`.
pub fn curl_pop3(url: &str, extra_args: &[&str]) -> CurlResult {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(extra_args)
        .arg(url)
        .output()
        .expect("run curl");
    CurlResult {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One message as imaplib sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ImapMessage {
    pub uid: u32,
    /// Sorted, e.g. `["$POP3Deleted", "\\Seen"]`.
    pub flags: Vec<String>,
    pub size: u64,
}

impl ImapMessage {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
    }
}

/// An IMAP account as seen by `tests/clients/imap_state.py` (read-only EXAMINE), deserialized
/// from what it prints.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ImapState {
    /// Every selectable mailbox with its message count.
    pub mailboxes: BTreeMap<String, u64>,
    pub uidvalidity: u32,
    pub uidnext: u32,
    /// Messages of the examined mailbox, by UID.
    pub messages: Vec<ImapMessage>,
}

impl ImapState {
    pub fn uids(&self) -> Vec<u32> {
        self.messages.iter().map(|m| m.uid).collect()
    }
    pub fn message(&self, uid: u32) -> Option<&ImapMessage> {
        self.messages.iter().find(|m| m.uid == uid)
    }
    /// Dovecot's default POP3 UIDL (`%08Xu%08Xv`) of `uid`: lower-case hex, UID then UIDVALIDITY.
    pub fn uidl(&self, uid: u32) -> String {
        format!("{uid:08x}{:08x}", self.uidvalidity)
    }
}

/// Logs in with imaplib over plain IMAP to 127.0.0.1:`port` and reports the account.
pub fn imap_state(port: u16, user: &str, password: &str, mailbox: &str) -> ImapState {
    let out = Command::new("python3")
        .arg(repo_root().join("tests/clients/imap_state.py"))
        .args(["--port", &port.to_string()])
        .args(["--user", user, "--password", password, "--mailbox", mailbox])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "imap_state.py failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json("imap_state.py", &out.stdout)
}

/// `s` as a JSON string literal (quotes included).
pub fn json_quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}
/// Parses the JSON a helper script printed into `T`; panics with the script's output on error.
fn parse_json<T: serde::de::DeserializeOwned>(script: &str, stdout: &[u8]) -> T {
    serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed unexpected JSON ({e}): {}",
            String::from_utf8_lossy(&stdout[..stdout.len().min(400)])
        )
    })
}

/// Decodes standard base64 (with padding); panics on malformed input.
fn b64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("bad base64 from a helper script ({e}): {s:.80}"))
}

/// serde `deserialize_with` for a base64 string field (`null` decodes to no bytes).
fn de_b64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(s.as_deref().map(b64_decode).unwrap_or_default())
}

/// serde `deserialize_with` for `[B64...] | null`.
fn de_b64_lines<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Vec<u8>>>, D::Error> {
    let v: Option<Vec<String>> = serde::Deserialize::deserialize(d)?;
    Ok(v.map(|ls| ls.iter().map(|l| b64_decode(l)).collect()))
}

/// The UIDLs (second column of `UIDL`) a user sees now, through poplib; panics on any -ERR.
pub fn uidl_list(port: u16, user: &str, password: &str) -> Vec<String> {
    let s = poplib(
        port,
        &[
            &format!("user {user}"),
            &format!("pass {password}"),
            "uidl",
            "quit",
        ],
    );
    s.assert_all_ok();
    String::from_utf8(s.step("uidl").data())
        .expect("UIDLs are ASCII")
        .lines()
        .map(|l| {
            l.split(' ')
                .nth(1)
                .expect("UIDL line has two fields")
                .to_string()
        })
        .collect()
}
