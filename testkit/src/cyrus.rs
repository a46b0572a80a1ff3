//! A private Cyrus IMAP server as a second, different upstream.
//!
//! Debian's `cyrus-imapd` package conflicts with `dovecot-imapd`, so it is never installed:
//! `scripts/test` installs `cyrus-common` (the `master` process, `ctl_cyrusdb`, the libraries)
//! and `sasl2-bin` (`saslpasswd2`), and unpacks `cyrus-imapd` (the `imapd` binary) into a private
//! directory, passed as `POPBRIDGE_CYRUS_IMAPD` (default `target/cyrus-imapd/.../imapd`).
//!
//! Each [`Cyrus`] gets its own temp dir with `imapd.conf`, `cyrus.conf`, config directory,
//! partition and sasldb, one loopback port, and runs `master` in the foreground (no system
//! service, no syslog needed). Users live in sasldb under realm `localhost` (the server name);
//! `cyrus` is the admin that creates their INBOX. Mail is seeded with IMAP APPEND as the user.
//! Dropping it stops master and every process it started.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clients::{imap_state, ImapState};
use crate::imap_raw::Imap;
use crate::reaper::{Registration, Started};
use crate::{free_ports, keep_dirs, repo_root, require_tools, wait_port};

const MASTER: &str = "/usr/lib/cyrus/bin/master";
const SASLPASSWD: &str = "/usr/sbin/saslpasswd2";
const ADMIN: &str = "cyrus";
const ADMIN_PW: &str = "cyrus-admin-pw";
const HINT: &str = "run scripts/test, which installs cyrus-common and sasl2-bin and unpacks \
     cyrus-imapd into target/cyrus-imapd (or set POPBRIDGE_CYRUS_IMAPD to an imapd binary)";

/// The unpacked `imapd` binary.
pub fn imapd_path() -> PathBuf {
    std::env::var_os("POPBRIDGE_CYRUS_IMAPD")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/cyrus-imapd/usr/lib/cyrus/bin/imapd"))
}

/// Panics (never skips) when Cyrus is not available.
pub fn require_cyrus() {
    require_tools();
    for (path, what) in [
        (PathBuf::from(MASTER), "cyrus-common (master)"),
        (PathBuf::from(SASLPASSWD), "sasl2-bin (saslpasswd2)"),
        (imapd_path(), "the unpacked cyrus-imapd (imapd)"),
    ] {
        assert!(
            path.exists(),
            "Cyrus IMAP is not available: {} is missing ({what}); {HINT}",
            path.display()
        );
    }
}

pub struct Cyrus {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    port: u16,
    master: Child,
    /// Master's process group, until it is killed (then taken, before master is reaped).
    registration: Option<Registration>,
    passwords: Mutex<HashMap<String, String>>,
    greeting: String,
}

fn chown_cyrus(path: &Path) {
    let out = Command::new("chown")
        .args(["-R", "cyrus:mail"])
        .arg(path)
        .output()
        .expect("run chown");
    assert!(
        out.status.success(),
        "chown cyrus:mail {}: {} (is there a `cyrus` user? cyrus-common creates it)",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn saslpasswd(dir: &Path, user: &str, password: &str) {
    let db = dir.join("sasldb2");
    let mut child = Command::new(SASLPASSWD)
        .args(["-p", "-c", "-u", "localhost", "-f"])
        .arg(&db)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {SASLPASSWD}: {e}; {HINT}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "saslpasswd2 {user}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    chown_cyrus(&db);
}

impl Cyrus {
    pub fn start() -> Cyrus {
        Cyrus::start_with_conf("")
    }

    /// [`Cyrus::start`] with `extra` lines appended to the generated `imapd.conf`.
    pub fn start_with_conf(extra: &str) -> Cyrus {
        require_cyrus();
        let mut last = String::new();
        for _ in 0..3 {
            match Cyrus::try_start(extra) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("Cyrus did not start three times:\n{last}");
    }

    fn try_start(extra: &str) -> Result<Cyrus, String> {
        let dir = tempfile::Builder::new()
            .prefix("pbc")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let d = dir.path().to_path_buf();
        for sub in ["conf", "part", "run", "bin", "sieve"] {
            fs::create_dir(d.join(sub)).unwrap();
        }
        // master runs imapd as the cyrus user, which may not reach the unpacked copy.
        fs::copy(imapd_path(), d.join("bin/imapd")).expect("copy imapd into the sandbox");
        let port = free_ports(1)[0];
        let ds = d.display();
        let conf = format!(
            "configdirectory: {ds}/conf\n\
             partition-default: {ds}/part\n\
             defaultpartition: default\n\
             sievedir: {ds}/sieve\n\
             servername: localhost\n\
             admins: {ADMIN}\n\
             allowplaintext: yes\n\
             sasl_pwcheck_method: auxprop\n\
             sasl_auxprop_plugin: sasldb\n\
             sasl_sasldb_path: {ds}/sasldb2\n\
             sasl_mech_list: PLAIN LOGIN\n\
             failedloginpause: 0\n\
             munge8bit: no\n\
             idlesocket: {ds}/run/idle\n\
             notifysocket: {ds}/run/notify\n\
             lmtpsocket: {ds}/run/lmtp\n\
             proc_path: {ds}/run/proc\n\
             mboxname_lockpath: {ds}/run/lock\n\
             {extra}\n"
        );
        fs::write(d.join("imapd.conf"), conf).unwrap();
        fs::write(
            d.join("cyrus.conf"),
            format!(
                "START {{\n  recover cmd=\"/usr/lib/cyrus/bin/ctl_cyrusdb -C {ds}/imapd.conf -r\"\n}}\n\
                 SERVICES {{\n  imap cmd=\"{ds}/bin/imapd -C {ds}/imapd.conf\" \
                 listen=\"127.0.0.1:{port}\" prefork=0 maxchild=200\n}}\nEVENTS {{\n}}\n"
            ),
        )
        .unwrap();
        saslpasswd(&d, ADMIN, ADMIN_PW);
        chown_cyrus(&d);
        let log = fs::File::create(d.join("master.log")).unwrap();
        let master = Command::new(MASTER)
            .arg("-C")
            .arg(d.join("imapd.conf"))
            .arg("-M")
            .arg(d.join("cyrus.conf"))
            .arg("-p")
            .arg(d.join("master.pid"))
            // Its own process group: master signals its group when it stops, which must not
            // reach other tests' servers (or the test process); and the group is what the
            // drop kills.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {MASTER}: {e}"))?;
        // From here on, dropping `c` stops master and its children.
        let registration = Some(Registration::new(Started::Group(master.id())));
        let mut c = Cyrus {
            path: d,
            dir: Some(dir),
            port,
            master,
            registration,
            passwords: Mutex::new(HashMap::new()),
            greeting: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.master.try_wait().unwrap() {
                // 78 (EX_CONFIG) is how Cyrus says its configuration is wrong, silently.
                return Err(format!(
                    "cyrus master exited with {status} (78 = configuration error; \
                     Cyrus logs only to syslog):\n{}",
                    c.master_log()
                ));
            }
            if wait_port(port, Duration::from_millis(200)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("cyrus master did not listen on {port} within 20 s"));
            }
        }
        let mut admin = Imap::connect(port);
        c.greeting = admin.greeting.trim_end().to_string();
        admin
            .try_run(&format!("LOGIN {ADMIN} {ADMIN_PW}"), &[])
            .map_err(|e| format!("Cyrus admin login failed: {e}"))?;
        let _ = admin.try_run("LOGOUT", &[]);
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }
    pub fn imap_port(&self) -> u16 {
        self.port
    }
    /// The server's greeting, e.g. `* OK [CAPABILITY ...] localhost Cyrus IMAP 3.6.1-... ready`.
    pub fn greeting(&self) -> &str {
        &self.greeting
    }
    /// The version from the greeting (`3.6.1-Debian-...`).
    pub fn version(&self) -> String {
        self.greeting
            .split("Cyrus IMAP ")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("unknown")
            .to_string()
    }
    fn master_log(&self) -> String {
        fs::read_to_string(self.path.join("master.log")).unwrap_or_default()
    }

    /// A SASL user in realm `localhost` with its INBOX (`user/NAME`, created by the admin).
    pub fn add_user(&self, user: &str, password: &str) {
        saslpasswd(&self.path, user, password);
        let mut admin = Imap::connect(self.port);
        admin.run(&format!("LOGIN {ADMIN} {ADMIN_PW}"), &[]);
        admin.run(&format!("CREATE user/{user}"), &[]);
        let _ = admin.try_run("LOGOUT", &[]);
        self.passwords
            .lock()
            .unwrap()
            .insert(user.to_string(), password.to_string());
    }

    /// APPENDs `messages` to the INBOX of `user` (as that user), so they get UIDs in this
    /// order. Cyrus refuses bare LF line ends in APPEND: pass CRLF messages.
    pub fn seed(&self, user: &str, messages: &[&[u8]]) {
        let pw = self.passwords.lock().unwrap().get(user).cloned();
        let pw = pw.unwrap_or_else(|| panic!("no Cyrus user {user}: call add_user first"));
        let mut c = Imap::connect(self.port);
        c.run(&format!("LOGIN {user} {pw}"), &[]);
        for m in messages {
            c.try_run("APPEND INBOX", m)
                .unwrap_or_else(|e| panic!("Cyrus refused APPEND ({} bytes): {e}", m.len()));
        }
        let _ = c.try_run("LOGOUT", &[]);
    }

    pub fn imap_state(&self, user: &str, password: &str, mailbox: &str) -> ImapState {
        imap_state(self.port, user, password, mailbox)
    }

    /// Processes started by this sandbox's master (their command lines name the sandbox dir).
    fn sandbox_pids(&self) -> Vec<u32> {
        let needle = self.path.display().to_string();
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- Cyrus sandbox {} ---", self.path.display());
            eprintln!("{}", self.master_log());
        }
        // The data is throwaway: no graceful stop.
        let group = format!("-{}", self.master.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        self.registration = None;
        let _ = self.master.wait();
        // Anything that left the group but still runs from the sandbox.
        for pid in self.sandbox_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if let Some(dir) = self.dir.take() {
            if keep_dirs() {
                eprintln!("keeping Cyrus sandbox {}", dir.keep().display());
            }
        }
    }
}
