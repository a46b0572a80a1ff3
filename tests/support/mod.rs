//! Integration-test harness: a private Dovecot (via `scripts/dovecot-sandbox`) or Cyrus
//! ([`cyrus::Cyrus`]), both behind the [`MailServer`] trait, a running `popbridge serve`, and
//! real clients (Python's poplib and imaplib, curl).
//!
//! Use it from a test file with `mod support;`. Std, tempfile, serde(_json) and base64 only.
//!
//! ```ignore
//! let dc = Dovecot::start();                       // panics if Dovecot is not installed
//! // or Dovecot::start_with_conf("imap_capability = IMAP4rev1 IDLE") to append to dovecot.conf
//! dc.add_user("alice", "pw");
//! dc.seed("alice", &[b"Subject: hi\r\n\r\nhello\r\n"]);   // UIDs 1.. in this order
//! let pb = Popbridge::start(&dc, "[deletion]\nmode = \"expunge\"\n");
//! let s = poplib(pb.pop3_port(), &["user alice", "pass pw", "retr 1", "quit"]);
//! assert!(s.step("retr 1").ok);
//! let st = dc.imap_state("alice", "pw", "INBOX");
//! ```
//!
//! Needs root (Dovecot drops to the `mail` user), `dovecot-imapd`, `dovecot-pop3d`, `openssl`,
//! `python3` and `curl`: `scripts/test` installs them. Set `POPBRIDGE_KEEP_SANDBOX=1` to keep the
//! temp directories of a run for inspection.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod cyrus;
pub mod imap_do;
pub mod imap_raw;
pub mod prometheus;
pub mod raw;
pub mod relay;

const INSTALL_HINT: &str = "run scripts/test, which installs it \
     (or: apt-get install -y dovecot-imapd dovecot-pop3d openssl python3 curl)";

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn keep_dirs() -> bool {
    std::env::var_os("POPBRIDGE_KEEP_SANDBOX").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Panics (never skips) when the machine lacks what the integration tests need.
pub fn require_tools() {
    let missing: Vec<&str> = [
        ("/usr/sbin/dovecot", "dovecot-core"),
        ("/usr/lib/dovecot/imap", "dovecot-imapd"),
        ("/usr/lib/dovecot/pop3", "dovecot-pop3d"),
    ]
    .iter()
    .filter(|(p, _)| !Path::new(p).exists())
    .map(|(_, pkg)| *pkg)
    .collect();
    if !missing.is_empty() {
        panic!(
            "Dovecot is not installed (missing {}): these integration tests need it; {INSTALL_HINT}",
            missing.join(", ")
        );
    }
    for tool in ["openssl", "python3", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(found, "{tool} is not installed: {INSTALL_HINT}");
    }
    // SAFETY-free check of the effective uid via /proc (std has no getuid).
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    assert!(
        euid_root,
        "the Dovecot sandbox must run as root (it switches to the mail user)"
    );
}

/// Prints a test's figures (soak, kill rounds, upstream versions) and, when
/// `POPBRIDGE_FIGURES` names a file, appends them to it: `scripts/test` shows that file in its
/// summary, since cargo hides what passing tests print.
pub fn report(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("POPBRIDGE_FIGURES").filter(|p| !p.is_empty()) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", Path::new(&path).display()));
        std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).unwrap();
    }
}

/// `n` distinct loopback ports that were free a moment ago (bound to port 0, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Waits until 127.0.0.1:`port` accepts a connection; false after `timeout`.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn mail_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == "mail").then(|| (f[2].parse().ok(), f[3].parse().ok()))
            })
            .and_then(|(u, g)| Some((u?, g?)))
            .expect("no `mail` user in /etc/passwd")
    })
}

/// An upstream IMAP server the end-to-end tests can run popbridge against: the private
/// [`Dovecot`] or the private [`cyrus::Cyrus`]. Tests written against this trait run on both.
pub trait MailServer {
    /// e.g. "dovecot", for messages.
    fn name(&self) -> &'static str;
    /// Plain IMAP on 127.0.0.1.
    fn imap_port(&self) -> u16;
    fn add_user(&self, user: &str, password: &str);
    /// Gives `messages` UIDs in this order, after any seeded before (CRLF line ends: Cyrus
    /// refuses bare LF).
    fn seed(&self, user: &str, messages: &[&[u8]]);
    /// The account as Python's imaplib sees it.
    fn imap_state(&self, user: &str, password: &str, mailbox: &str) -> ImapState {
        imap_state(self.imap_port(), user, password, mailbox)
    }
}

impl MailServer for Dovecot {
    fn name(&self) -> &'static str {
        "dovecot"
    }
    fn imap_port(&self) -> u16 {
        Dovecot::imap_port(self)
    }
    fn add_user(&self, user: &str, password: &str) {
        Dovecot::add_user(self, user, password)
    }
    fn seed(&self, user: &str, messages: &[&[u8]]) {
        Dovecot::seed(self, user, messages)
    }
}

impl MailServer for cyrus::Cyrus {
    fn name(&self) -> &'static str {
        "cyrus"
    }
    fn imap_port(&self) -> u16 {
        cyrus::Cyrus::imap_port(self)
    }
    fn add_user(&self, user: &str, password: &str) {
        cyrus::Cyrus::add_user(self, user, password)
    }
    fn seed(&self, user: &str, messages: &[&[u8]]) {
        cyrus::Cyrus::seed(self, user, messages)
    }
}

/// `on_both_servers!(f, g)`: for each generic `fn f<S: MailServer>(server: S)` of the test file,
/// a module `f` with the tests `f::dovecot` and `f::cyrus`, each calling `f` with a freshly
/// started server of that kind (`use support::*` brings it in).
#[allow(unused_macros)]
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn dovecot() {
                super::$name($crate::support::Dovecot::start());
            }
            #[test]
            fn cyrus() {
                super::$name($crate::support::cyrus::Cyrus::start());
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both_servers;

/// A private Dovecot under a short temp dir in /tmp. Dropping it stops it and removes the dir.
pub struct Dovecot {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    imap: u16,
    imaps: u16,
    pop3: u16,
    pop3s: u16,
    seq: AtomicU64,
}

impl Dovecot {
    /// Starts a sandbox with fresh ports (a few tries in case a port was taken meanwhile).
    pub fn start() -> Dovecot {
        Dovecot::start_with_conf("")
    }

    /// [`Dovecot::start`] with `extra` appended to the generated `dovecot.conf` (passed to
    /// `scripts/dovecot-sandbox start` as `DOVECOT_EXTRA_CONF`). Later settings win, so this
    /// can override the defaults, e.g. `"imap_capability = IMAP4rev1 IDLE"` replaces the
    /// capability list Dovecot advertises (before and after login; the commands themselves
    /// keep working). Panics if Dovecot refuses the config.
    pub fn start_with_conf(extra: &str) -> Dovecot {
        require_tools();
        let script = repo_root().join("scripts/dovecot-sandbox");
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("pbd")
                .tempdir_in("/tmp")
                .expect("create temp dir in /tmp");
            let path = dir.path().to_path_buf();
            let p = free_ports(4);
            let out = Command::new(&script)
                .arg("start")
                .arg(&path)
                .args(["--imap-port", &p[0].to_string()])
                .args(["--imaps-port", &p[1].to_string()])
                .args(["--pop3-port", &p[2].to_string()])
                .args(["--pop3s-port", &p[3].to_string()])
                .env("DOVECOT_EXTRA_CONF", extra)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if out.status.success() {
                return Dovecot {
                    dir: Some(dir),
                    path,
                    imap: p[0],
                    imaps: p[1],
                    pop3: p[2],
                    pop3s: p[3],
                    seq: AtomicU64::new(0),
                };
            }
            last_err = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = Command::new(&script)
                .args(["stop"])
                .arg(&path)
                .arg("--fast")
                .output();
        }
        panic!("scripts/dovecot-sandbox start failed three times:\n{last_err}");
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }
    pub fn imap_port(&self) -> u16 {
        self.imap
    }
    pub fn imaps_port(&self) -> u16 {
        self.imaps
    }
    pub fn pop3_port(&self) -> u16 {
        self.pop3
    }
    pub fn pop3s_port(&self) -> u16 {
        self.pop3s
    }
    /// The sandbox CA: Dovecot's certificate (for `localhost` and 127.0.0.1) verifies against it.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.path.join("ca.pem")
    }
    /// Dovecot's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path.join("dovecot.log")).unwrap_or_default()
    }
    /// The maildir of `user` (`cur`, `new`, `tmp` inside).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.path.join("mail").join(user)
    }

    pub fn add_user(&self, user: &str, password: &str) {
        let out = Command::new(repo_root().join("scripts/dovecot-sandbox"))
            .arg("adduser")
            .arg(&self.path)
            .args([user, password])
            .output()
            .expect("run scripts/dovecot-sandbox adduser");
        assert!(
            out.status.success(),
            "adduser {user} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes `messages` into `mail/<user>/cur` (no flags) so that Dovecot gives them UIDs in
    /// this order, after any seeded before. File names carry increasing timestamps, which is
    /// what Dovecot sorts new maildir files by, plus `S=` (size) and `W=` (size with CRLF line
    /// ends). Files are written in `tmp/`, owned by `mail`, then renamed into `cur/`.
    pub fn seed(&self, user: &str, messages: &[&[u8]]) {
        let md = self.maildir(user);
        assert!(
            md.join("cur").is_dir(),
            "no maildir for {user}: call add_user first"
        );
        let (uid, gid) = mail_ids();
        for msg in messages {
            let n = self.seq.fetch_add(1, Ordering::SeqCst);
            let base = format!(
                "{}.M{:06}P{}Q{}.popbridge-seed,S={},W={}",
                1_600_000_000 + n,
                n % 1_000_000,
                std::process::id(),
                n,
                msg.len(),
                crlf_size(msg)
            );
            let tmp = md.join("tmp").join(&base);
            fs::write(&tmp, msg).expect("write seed message");
            chown(&tmp, Some(uid), Some(gid)).expect("chown seed message to mail");
            fs::rename(&tmp, md.join("cur").join(format!("{base}:2,")))
                .expect("move seed message into cur");
        }
    }

    /// The upstream account as Python's imaplib sees it (plain IMAP on loopback).
    pub fn imap_state(&self, user: &str, password: &str, mailbox: &str) -> ImapState {
        imap_state(self.imap, user, password, mailbox)
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- last lines of {}/dovecot.log ---", self.path.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = Command::new(repo_root().join("scripts/dovecot-sandbox"))
            .arg("stop")
            .arg(&self.path)
            .arg("--fast")
            .stdout(Stdio::null())
            .output();
        if let Some(dir) = self.dir.take() {
            if keep_dirs() {
                eprintln!("keeping Dovecot sandbox {}", dir.keep().display());
            }
        }
    }
}

/// Size of `msg` with every bare LF counted as CRLF: what POP3 LIST and IMAP RFC822.SIZE say.
pub fn crlf_size(msg: &[u8]) -> usize {
    msg.len() + bare_lfs(msg)
}

fn bare_lfs(msg: &[u8]) -> usize {
    msg.iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' && (i == 0 || msg[i - 1] != b'\r'))
        .count()
}

/// `msg` with every bare LF turned into CRLF.
pub fn to_crlf(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + bare_lfs(msg));
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' && (i == 0 || msg[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// What a POP3 server's RETR should carry for `msg` before dot-stuffing: CRLF line ends, and a
/// final CRLF added when the message lacks one (Dovecot does this).
pub fn expected_retr_body(msg: &[u8]) -> Vec<u8> {
    let mut body = to_crlf(msg);
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// RFC 1939 byte-stuffing plus the terminating `.CRLF`, for a body whose lines end in CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 3);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Undoes [`dot_stuff`]: the data part of a multi-line response (status line already removed),
/// up to the `.CRLF` terminator. Panics if there is no terminator.
pub fn dot_unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or_else(|| panic!("multi-line response without .CRLF terminator"));
        let line = &rest[..end];
        if line == b"." {
            assert_eq!(
                end + 2,
                rest.len(),
                "bytes after the .CRLF terminator of a multi-line response"
            );
            return out;
        }
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        out.extend_from_slice(b"\r\n");
        rest = &rest[end + 2..];
    }
}

/// Splits a raw POP3 response into its status line (without CRLF) and the rest.
pub fn split_status(raw: &[u8]) -> (&[u8], &[u8]) {
    let end = raw
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("response without CRLF");
    (&raw[..end], &raw[end + 2..])
}

/// RFC 1939 TOP n: all header lines, the blank line, then the first `n` body lines (CRLF form).
pub fn expected_top(msg: &[u8], n: usize) -> Vec<u8> {
    let body = expected_retr_body(msg);
    let sep = body.windows(4).position(|w| w == b"\r\n\r\n");
    let Some(sep) = sep else { return body };
    let mut out = body[..sep + 4].to_vec();
    let mut lines = 0;
    let mut rest = &body[sep + 4..];
    while lines < n && !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        out.extend_from_slice(&rest[..end]);
        rest = &rest[end..];
        lines += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// popbridge

/// Config sections in order, each with its keys in order; values are TOML literals.
type Sections = Vec<(String, Vec<(String, String)>)>;

/// A running `popbridge serve --config FILE`. Dropping it kills the process.
///
/// The config file is the defaults below merged with `extra_toml`. `extra_toml` is TOML made of
/// `[section]` headers and one-line `key = value` entries: each entry replaces the default of
/// that key in that section or adds it; new sections are appended. Defaults:
///
/// ```toml
/// [pop3]
/// listen = "127.0.0.1:<free port>"
/// mark_seen = true
/// uidl_format = "%08Xu%08Xv"
/// idle_timeout_secs = 600
/// [imap]
/// host = "127.0.0.1"
/// port = <dovecot.imap_port()>
/// security = "none"
/// mailbox = "INBOX"
/// [state]
/// dir = "<temp dir>/state"
/// [deletion]
/// mode = "hide"
/// move_to = "Trash"
/// hide_keyword = "$POP3Deleted"
/// ```
///
/// E.g. `Popbridge::start(&dc, &format!("[imap]\nport = {}\nsecurity = \"tls\"\nca_file = \"{}\"",
/// dc.imaps_port(), dc.ca_pem_path().display()))`. stdout and stderr go to [`Popbridge::log`];
/// `RUST_LOG` defaults to `debug` unless the test environment sets it.
pub struct Popbridge {
    child: Child,
    port: u16,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bin: String,
}

impl Popbridge {
    /// Against any [`MailServer`] (the private Dovecot or Cyrus).
    pub fn start<S: MailServer + ?Sized>(upstream: &S, extra_toml: &str) -> Popbridge {
        Popbridge::start_bin(env!("CARGO_BIN_EXE_popbridge"), upstream, extra_toml)
    }

    /// [`Popbridge::start`] with another executable (same `serve --config FILE` interface).
    pub fn start_bin<S: MailServer + ?Sized>(
        bin: &str,
        upstream: &S,
        extra_toml: &str,
    ) -> Popbridge {
        let dir = tempfile::Builder::new()
            .prefix("pbb")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let path = dir.path().to_path_buf();
        let port = free_ports(1)[0];
        let config = render_config(&merge_toml(
            default_sections(upstream.imap_port(), port, &path.join("state")),
            extra_toml,
        ));
        let listen_port = config_listen_port(&config).unwrap_or(port);
        let config_path = path.join("popbridge.toml");
        fs::write(&config_path, &config).expect("write popbridge config");
        let log_path = path.join("popbridge.log");
        let log = fs::File::create(&log_path).expect("create popbridge log");
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "popbridge=debug,info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let addr = SocketAddr::from(([127, 0, 0, 1], listen_port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait for popbridge") {
                panic!(
                    "popbridge exited with {status} before listening on {addr}.\nconfig:\n{config}\nlog:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "popbridge did not listen on {addr} within 20 s.\nconfig:\n{config}\nlog:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Popbridge {
            child,
            port: listen_port,
            dir: Some(dir),
            path,
            bin: bin.to_string(),
        }
    }

    /// Kills popbridge and starts it again with the same config file, state directory and
    /// log (appended), waiting until it listens again.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .expect("open popbridge log");
        self.child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "popbridge=debug,info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("restart popbridge");
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.try_wait().expect("wait for popbridge") {
                panic!("popbridge exited with {status} on restart:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "popbridge did not listen again within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, e.g. to read its memory use from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pop3_port(&self) -> u16 {
        self.port
    }
    pub fn config_path(&self) -> PathBuf {
        self.path.join("popbridge.toml")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.path.join("state")
    }
    pub fn log_path(&self) -> PathBuf {
        self.path.join("popbridge.log")
    }
    /// Everything popbridge wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    /// Waits until the log contains `needle`; false after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// Kills the process now, keeping its directory (config, state, log) for [`restart`].
    ///
    /// [`restart`]: Popbridge::restart
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Kills the process now and returns its log.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for Popbridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- popbridge log ({}) ---", self.log_path().display());
            eprintln!("{}", self.log());
        }
        if let Some(dir) = self.dir.take() {
            if keep_dirs() {
                eprintln!("keeping popbridge dir {}", dir.keep().display());
            }
        }
    }
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn default_sections(imap_port: u16, port: u16, state: &Path) -> Sections {
    let kv = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    vec![
        (
            "pop3".into(),
            kv(&[
                ("listen", toml_str(&format!("127.0.0.1:{port}"))),
                ("mark_seen", "true".into()),
                ("uidl_format", toml_str("%08Xu%08Xv")),
                ("idle_timeout_secs", "600".into()),
                ("plaintext_auth_loopback", "true".into()),
            ]),
        ),
        (
            "imap".into(),
            kv(&[
                ("host", toml_str("127.0.0.1")),
                ("port", imap_port.to_string()),
                ("security", toml_str("none")),
                ("mailbox", toml_str("INBOX")),
            ]),
        ),
        (
            "state".into(),
            kv(&[("dir", toml_str(&state.display().to_string()))]),
        ),
        (
            "deletion".into(),
            kv(&[
                ("mode", toml_str("hide")),
                ("move_to", toml_str("Trash")),
                ("hide_keyword", toml_str("$POP3Deleted")),
            ]),
        ),
    ]
}

/// Merges one-line `key = value` entries under `[section]` headers into `base` (see
/// [`Popbridge`]). Panics on a line it does not understand.
pub fn merge_toml(mut base: Sections, extra: &str) -> Sections {
    let mut section: Option<String> = None;
    for raw in extra.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            if !base.iter().any(|(s, _)| *s == name) {
                base.push((name.clone(), Vec::new()));
            }
            section = Some(name);
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("extra_toml: not `key = value`: {raw:?}"));
        let sec = section
            .as_ref()
            .unwrap_or_else(|| panic!("extra_toml: `{raw}` comes before any [section]"));
        let entries = &mut base.iter_mut().find(|(s, _)| s == sec).unwrap().1;
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        match entries.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = value,
            None => entries.push((key, value)),
        }
    }
    base
}

pub fn render_config(sections: &Sections) -> String {
    let mut out = String::new();
    for (name, entries) in sections {
        out.push_str(&format!("[{name}]\n"));
        for (k, v) in entries {
            out.push_str(&format!("{k} = {v}\n"));
        }
        out.push('\n');
    }
    out
}

fn config_listen_port(config: &str) -> Option<u16> {
    let mut in_pop3 = false;
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_pop3 = line == "[pop3]";
        } else if in_pop3 {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "listen" {
                    return v.trim().trim_matches('"').rsplit(':').next()?.parse().ok();
                }
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Real clients

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
pub(crate) fn json_quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

// ---------------------------------------------------------------------------------------------
// Test mailboxes

/// One deterministic pseudo-random stream (xorshift), so generated messages never change.
fn prng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, wrapped at 76 columns with CRLF (MIME body style).
pub fn base64_wrapped(data: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let flat = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = Vec::with_capacity(flat.len() + flat.len() / 38 + 2);
    for line in flat.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn headers(from: &str, subject: &str, n: u32, extra: &str) -> String {
    format!(
        "Return-Path: <{from}>\r\nFrom: {from}\r\nTo: alice@example.test\r\n\
         Subject: {subject}\r\nDate: Tue, 1 Jul 2025 10:{:02}:00 +0000\r\n\
         Message-ID: <edge-{n}@example.test>\r\nMIME-Version: 1.0\r\n{extra}",
        n % 60
    )
}

/// The big message: about 21 MB of base64 text in 76-column CRLF lines (built once per process).
pub fn big_message() -> &'static [u8] {
    static BIG: OnceLock<Vec<u8>> = OnceLock::new();
    BIG.get_or_init(|| {
        let mut m = headers(
            "archive@example.test",
            "Big attachment (21 MB)",
            99,
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment; filename=\"big.bin\"\r\n\r\n",
        )
        .into_bytes();
        let mut next = prng(0x5eedb16);
        let line_count = 21 * 1024 * 1024 / 78 + 1;
        m.reserve(line_count * 78);
        for _ in 0..line_count {
            let mut r = next();
            for i in 0..76 {
                if i % 10 == 0 {
                    r = next();
                }
                m.push(B64[(r & 63) as usize]);
                r >>= 6;
            }
            m.extend_from_slice(b"\r\n");
        }
        m
    })
}

/// The edge-case mailbox without the 21 MB message, with a name for each message.
pub fn edge_case_named_small() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut n = 0u32;
    let mut h = |from: &str, subject: &str, extra: &str| {
        n += 1;
        headers(from, subject, n, extra)
    };
    let text = "Content-Type: text/plain; charset=us-ascii\r\n\r\n";

    v.push((
        "welcome",
        format!(
            "{}Welcome to your mailbox.\r\n\r\nThis is an ordinary message with CRLF line ends.\r\n\
             -- \r\nThe postmaster\r\n",
            h("postmaster@example.test", "Welcome!", text)
        )
        .into_bytes(),
    ));
    v.push((
        "dot-lines-crlf",
        format!(
            "{}.leading dot\r\n..two leading dots\r\n.\r\nthe line above is only a dot\r\n\
             . space after dot\r\n...\r\nend\r\n",
            h("dots@example.test", "Lines starting with dots", text)
        )
        .into_bytes(),
    ));
    v.push((
        "dot-lines-lf",
        format!(
            "{}.leading dot\n..two leading dots\n.\nonly-dot line above (LF only)\nend\n",
            h("dots@example.test", "Dots, LF line ends", "").replace("\r\n", "\n")
                + "Content-Type: text/plain\n\n"
        )
        .into_bytes(),
    ));
    v.push((
        "no-final-newline",
        format!(
            "{}first line\r\nlast line without newline",
            h("sloppy@example.test", "No final newline", text)
        )
        .into_bytes(),
    ));
    v.push((
        "dot-no-final-newline",
        format!(
            "{}a body whose last line is a lone dot without newline\r\n.",
            h("sloppy@example.test", "Lone dot at the end", text)
        )
        .into_bytes(),
    ));
    let mut eight = h(
        "J\u{f6}rg M\u{fc}ller <joerg@example.test>",
        "Gr\u{fc}\u{df}e aus K\u{f6}ln \u{2013} 8-bit header",
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    )
    .into_bytes();
    eight.extend_from_slice(
        "Umlaute: \u{e4}\u{f6}\u{fc} \u{c4}\u{d6}\u{dc} \u{df}, Euro \u{20ac}, emoji \u{1f600}\r\n"
            .as_bytes(),
    );
    eight.extend_from_slice(
        b"Latin-1 bytes: \xe9\xe8\xff\x80\x81\r\nNUL-free but every high byte: ",
    );
    eight.extend((0x80u8..=0xff).filter(|b| *b != b'\r' && *b != b'\n'));
    eight.extend_from_slice(b"\r\n");
    v.push(("8bit-headers-and-body", eight));
    let mut long = h("long@example.test", "A 12,345-character line", text).into_bytes();
    long.extend_from_slice(b"short line\r\n");
    let mut next = prng(42);
    long.extend((0..12_345).map(|_| b'a' + (next() % 26) as u8));
    long.extend_from_slice(b"\r\nafter the long line\r\n");
    v.push(("long-line", long));
    v.push((
        "headers-only",
        "From: nobody@example.test\r\nTo: alice@example.test\r\nSubject: Headers only, no blank line, no body\r\n"
            .as_bytes()
            .to_vec(),
    ));
    v.push((
        "empty-body",
        h("empty@example.test", "Empty body", "\r\n").into_bytes(),
    ));
    let mut att = Vec::new();
    let mut next = prng(7);
    att.extend((0..3000).map(|_| (next() >> 24) as u8));
    let mut mp = h(
        "reports@example.test",
        "Monthly report (with attachment)",
        "Content-Type: multipart/mixed; boundary=\"=_b0undary_42\"\r\n\r\n",
    )
    .into_bytes();
    mp.extend_from_slice(
        b"This is a multi-part message in MIME format.\r\n\r\n--=_b0undary_42\r\n\
          Content-Type: text/plain; charset=us-ascii\r\n\r\nPlease find the report attached.\r\n\
          .\r\n.. stuffed-looking line inside a part\r\n\r\n--=_b0undary_42\r\n\
          Content-Type: application/pdf; name=\"report.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\
          Content-Disposition: attachment; filename=\"report.pdf\"\r\n\r\n",
    );
    mp.extend_from_slice(&base64_wrapped(&att));
    mp.extend_from_slice(b"\r\n--=_b0undary_42--\r\n");
    v.push(("multipart-attachment", mp.clone()));
    let lf: Vec<u8> = String::from_utf8(mp)
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    v.push(("multipart-attachment-lf", lf));
    v
}

/// Every edge case, in seeding order: [`edge_case_named_small`] then the 21 MB message last.
pub fn edge_case_named() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = edge_case_named_small();
    v.push(("big-21mb", big_message().to_vec()));
    v
}

/// The edge-case mailbox (see [`edge_case_named`] for what each message is).
pub fn edge_case_messages() -> Vec<Vec<u8>> {
    edge_case_named().into_iter().map(|(_, m)| m).collect()
}

// ---------------------------------------------------------------------------------------------
// What the Python clients print (JSON, binary data as base64).

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

/// A fresh self-signed P-256 certificate for `localhost`, written with openssl.
pub fn self_signed_cert(cert: &Path, key: &Path) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
