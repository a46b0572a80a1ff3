//! A private Dovecot, run by `scripts/dovecot-sandbox` on four fresh loopback ports, with
//! maildir seeding that bypasses IMAP.

use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::clients::{imap_state, ImapState};
use crate::mail::crlf_size;
use crate::ports::try_free_ports;
use crate::reaper::{Registration, Started};
use crate::tools::{check_dovecot, require_tools};
use crate::{file_tail, keep_dirs, repo_root};

/// The `mail` user's uid and gid (Dovecot refuses uid 0 for mail access).
fn mail_ids() -> Result<(u32, u32), String> {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    if let Some(ids) = IDS.get() {
        return Ok(*ids);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(|e| format!("read /etc/passwd: {e}"))?;
    let ids = passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "mail").then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .ok_or("no `mail` user in /etc/passwd")?;
    Ok(*IDS.get_or_init(|| ids))
}

/// How [`Dovecot::try_start`] sets up the sandbox.
#[derive(Debug, Clone)]
pub struct DovecotOptions {
    /// The sandbox script (default: `scripts/dovecot-sandbox` of this repository).
    pub script: PathBuf,
    /// The sandbox directory, created if missing and kept after the drop (which stops its
    /// Dovecot). `None` (the default): a fresh temp dir `/tmp/pbd…`, removed on drop unless
    /// `POPBRIDGE_KEEP_SANDBOX` is set. Keep it short: Dovecot's unix socket paths live under it.
    pub dir: Option<PathBuf>,
    /// Appended to the generated `dovecot.conf` (`DOVECOT_EXTRA_CONF`): later settings win.
    pub extra_conf: String,
}

impl Default for DovecotOptions {
    fn default() -> DovecotOptions {
        DovecotOptions {
            script: repo_root().join("scripts/dovecot-sandbox"),
            dir: None,
            extra_conf: String::new(),
        }
    }
}

/// A private Dovecot (see [`DovecotOptions`] for where it lives). Dropping it stops it.
pub struct Dovecot {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    script: PathBuf,
    imap: u16,
    imaps: u16,
    pop3: u16,
    pop3s: u16,
    seq: AtomicU64,
    _registration: Registration,
}

impl Dovecot {
    /// Starts a sandbox in a fresh temp dir with fresh ports (a few tries in case a port was
    /// taken meanwhile). Panics (never skips) if that fails or the machine lacks a tool the
    /// integration tests need.
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
        let opts = DovecotOptions {
            extra_conf: extra.to_string(),
            ..DovecotOptions::default()
        };
        Dovecot::try_start(&opts).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a sandbox as `opts` say, with fresh ports (three tries); `Err` says why not.
    pub fn try_start(opts: &DovecotOptions) -> Result<Dovecot, String> {
        check_dovecot()?;
        let script = &opts.script;
        let mut last_err = String::new();
        for _ in 0..3 {
            let (dir, path) = match &opts.dir {
                Some(path) => (None, path.clone()),
                None => {
                    let dir = tempfile::Builder::new()
                        .prefix("pbd")
                        .tempdir_in("/tmp")
                        .map_err(|e| format!("create temp dir in /tmp: {e}"))?;
                    let path = dir.path().to_path_buf();
                    (Some(dir), path)
                }
            };
            let p = try_free_ports(4).map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
            // Registered before it runs: an interrupted start is stopped too.
            let registration = Registration::new(Started::Sandbox {
                script: script.clone(),
                dir: path.clone(),
            });
            let out = Command::new(script)
                .arg("start")
                .arg(&path)
                .args(["--imap-port", &p[0].to_string()])
                .args(["--imaps-port", &p[1].to_string()])
                .args(["--pop3-port", &p[2].to_string()])
                .args(["--pop3s-port", &p[3].to_string()])
                .env("DOVECOT_EXTRA_CONF", &opts.extra_conf)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if out.status.success() {
                return Ok(Dovecot {
                    dir,
                    path,
                    script: script.clone(),
                    imap: p[0],
                    imaps: p[1],
                    pop3: p[2],
                    pop3s: p[3],
                    seq: AtomicU64::new(0),
                    _registration: registration,
                });
            }
            last_err = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            stop(script, &path);
        }
        Err(format!(
            "scripts/dovecot-sandbox start failed three times:\n{last_err}"
        ))
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
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    /// The last `lines` lines of Dovecot's log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path(), lines)
    }
    fn log_path(&self) -> PathBuf {
        self.path.join("dovecot.log")
    }
    /// The maildir of `user` (`cur`, `new`, `tmp` inside).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.path.join("mail").join(user)
    }

    /// Adds (or replaces) a passwd-file user with an empty maildir; panics on failure.
    pub fn add_user(&self, user: &str, password: &str) {
        self.try_add_user(user, password)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Dovecot::add_user`], returning `Err` instead of panicking.
    pub fn try_add_user(&self, user: &str, password: &str) -> Result<(), String> {
        let out = Command::new(&self.script)
            .arg("adduser")
            .arg(&self.path)
            .args([user, password])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "adduser {user} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Writes `messages` into `mail/<user>/cur` (no flags) so that Dovecot gives them UIDs in
    /// this order, after any seeded before; panics on failure. See [`Dovecot::try_seed`].
    pub fn seed(&self, user: &str, messages: &[&[u8]]) {
        self.try_seed(user, messages)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Writes `messages` into `mail/<user>/cur` (no flags) so that Dovecot gives them UIDs in
    /// this order, after any seeded before (~10,000 messages/s, where IMAP APPEND or `doveadm
    /// save` manage under 100), and returns how many it wrote. File names carry increasing
    /// timestamps, which is what Dovecot sorts new maildir files by, plus `S=` (size) and `W=`
    /// (size with CRLF line ends), which spare Dovecot reading the file. Files are written in
    /// `tmp/`, owned by `mail`, then renamed into `cur/`.
    pub fn try_seed<I>(&self, user: &str, messages: I) -> Result<u64, String>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let md = self.maildir(user);
        if !md.join("cur").is_dir() {
            return Err(format!("no maildir for {user}: call add_user first"));
        }
        let (uid, gid) = mail_ids()?;
        let mut seeded = 0;
        for msg in messages {
            let msg = msg.as_ref();
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
            let cur = md.join("cur").join(format!("{base}:2,"));
            fs::write(&tmp, msg).map_err(|e| format!("write {}: {e}", tmp.display()))?;
            chown(&tmp, Some(uid), Some(gid))
                .map_err(|e| format!("chown {} to mail: {e}", tmp.display()))?;
            fs::rename(&tmp, &cur).map_err(|e| format!("move into {}: {e}", cur.display()))?;
            seeded += 1;
        }
        Ok(seeded)
    }

    /// The upstream account as Python's imaplib sees it (plain IMAP on loopback).
    pub fn imap_state(&self, user: &str, password: &str, mailbox: &str) -> ImapState {
        imap_state(self.imap, user, password, mailbox)
    }
}

/// `SCRIPT stop DIR --fast`, quietly: the data is throwaway.
fn stop(script: &Path, dir: &Path) {
    let _ = Command::new(script)
        .arg("stop")
        .arg(dir)
        .arg("--fast")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- last lines of {}/dovecot.log ---", self.path.display());
            eprintln!("{}", self.log_tail(30));
        }
        stop(&self.script, &self.path);
        if let Some(dir) = self.dir.take() {
            if keep_dirs() {
                eprintln!("keeping Dovecot sandbox {}", dir.keep().display());
            }
        }
    }
}
