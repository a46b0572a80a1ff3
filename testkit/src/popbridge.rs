//! A running `popbridge serve --config FILE`, for tests and for the benchmark.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{config_listen_port, test_config};
use crate::mail_server::MailServer;
use crate::ports::{accepts, try_free_ports};
use crate::reaper::{Registration, Started};
use crate::{file_tail, keep_dirs};

/// How [`Popbridge::try_start`] runs popbridge.
#[derive(Debug, Clone)]
pub struct PopbridgeOptions {
    /// The popbridge executable.
    pub bin: PathBuf,
    /// Where `popbridge.toml` and `popbridge.log` go; created if missing, kept after the drop.
    pub dir: PathBuf,
    /// The whole configuration file.
    pub config: String,
    /// popbridge's `RUST_LOG`.
    pub rust_log: String,
    /// Ports that must all accept connections before the start counts as done, in the order
    /// [`Popbridge::listen_ports`] gives them back; the first is [`Popbridge::pop3_port`].
    pub ports: Vec<u16>,
    /// How long to wait for them.
    pub timeout: Duration,
}

/// A running `popbridge serve --config FILE`. Dropping it kills the process.
///
/// The test form, [`Popbridge::start_bin`] (the tests' shim adds `Popbridge::start`, which
/// supplies their popbridge), writes the defaults below merged with `extra_toml`. `extra_toml`
/// is TOML made of `[section]` headers and one-line `key = value` entries: each entry replaces
/// the default of that key in that section or adds it; new sections are appended. Defaults:
///
/// ```toml
/// [pop3]
/// listen = "127.0.0.1:<free port>"
/// mark_seen = true
/// uidl_format = "%08Xu%08Xv"
/// idle_timeout_secs = 600
/// plaintext_auth_loopback = true
/// [imap]
/// host = "127.0.0.1"
/// port = <upstream.imap_port()>
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
/// `RUST_LOG` defaults to `popbridge=debug,info` unless the test environment sets it.
///
/// The fallible form, [`Popbridge::try_start`], runs a configuration written whole by the caller
/// in a directory of its choosing.
pub struct Popbridge {
    child: Child,
    /// Until the child is killed; taken before it is reaped, so that [`crate::stop_all`] never
    /// signals a pid that may have been reused.
    registration: Option<Registration>,
    ports: Vec<u16>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bin: PathBuf,
    rust_log: String,
}

impl Popbridge {
    /// Starts `bin` (`popbridge`, or another executable with the same `serve --config FILE`
    /// interface) in a fresh temp dir in front of `upstream`, with the test defaults merged with
    /// `extra_toml` (see [`Popbridge`]). Panics, with the config and the log, if it does not
    /// listen within 20 s.
    pub fn start_bin<S: MailServer + ?Sized>(
        bin: impl AsRef<Path>,
        upstream: &S,
        extra_toml: &str,
    ) -> Popbridge {
        let dir = tempfile::Builder::new()
            .prefix("pbb")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let path = dir.path().to_path_buf();
        let port = try_free_ports(1).expect("bind 127.0.0.1:0")[0];
        let config = test_config(upstream.imap_port(), port, &path.join("state"), extra_toml);
        let listen_port = config_listen_port(&config).unwrap_or(port);
        let opts = PopbridgeOptions {
            bin: bin.as_ref().to_path_buf(),
            dir: path,
            config,
            rust_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "popbridge=debug,info".into()),
            ports: vec![listen_port],
            timeout: Duration::from_secs(20),
        };
        Popbridge::launch(opts, Some(dir)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes `opts.config` to `DIR/popbridge.toml` and runs `BIN serve --config` on it, its
    /// output going to `DIR/popbridge.log`, until every port in `opts.ports` accepts
    /// connections. `Err` (with the config and the log) if it exits first or is not listening
    /// within `opts.timeout`.
    pub fn try_start(opts: PopbridgeOptions) -> Result<Popbridge, String> {
        Popbridge::launch(opts, None)
    }

    fn launch(opts: PopbridgeOptions, dir: Option<tempfile::TempDir>) -> Result<Popbridge, String> {
        let path = opts.dir;
        fs::create_dir_all(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let config_path = path.join("popbridge.toml");
        fs::write(&config_path, &opts.config)
            .map_err(|e| format!("write {}: {e}", config_path.display()))?;
        let log_path = path.join("popbridge.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let mut pb = Popbridge {
            child: spawn(&opts.bin, &config_path, &opts.rust_log, log)?,
            registration: None,
            ports: opts.ports,
            dir,
            path,
            bin: opts.bin,
            rust_log: opts.rust_log,
        };
        pb.registration = Some(Registration::new(Started::Process(pb.child.id())));
        pb.wait_listening(opts.timeout).map_err(|e| {
            format!(
                "{e}.\nconfig:\n{}\nlog:\n{}",
                opts.config,
                fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
        Ok(pb)
    }

    /// Waits until every listen port accepts connections; `Err` if the process exits first
    /// or `timeout` passes (it is then killed).
    fn wait_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return Err(format!(
                        "popbridge exited with {status} before listening on {:?}",
                        self.ports
                    ))
                }
                Err(e) => return Err(format!("wait for popbridge: {e}")),
            }
            if self.ports.iter().all(|&p| accepts(p)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.end();
                return Err(format!(
                    "popbridge did not listen on {:?} within {timeout:?}",
                    self.ports
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and reaps it (deregistered in between; see `registration`).
    fn end(&mut self) {
        let _ = self.child.kill();
        self.registration = None;
        let _ = self.child.wait();
    }

    /// Kills popbridge and starts it again with the same config file, state directory and
    /// log (appended), waiting until it listens again; panics if it does not within 20 s.
    pub fn restart(&mut self) {
        self.end();
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .expect("open popbridge log");
        self.child = spawn(&self.bin, &self.config_path(), &self.rust_log, log)
            .unwrap_or_else(|e| panic!("restart popbridge: {e}"));
        self.registration = Some(Registration::new(Started::Process(self.child.id())));
        if let Err(e) = self.wait_listening(Duration::from_secs(20)) {
            panic!("{e} on restart:\n{}", self.log());
        }
    }

    /// The process id, e.g. to read its memory use from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first listen port: the POP3 one.
    pub fn pop3_port(&self) -> u16 {
        self.ports[0]
    }
    /// The ports waited for at start, in the order given.
    pub fn listen_ports(&self) -> &[u16] {
        &self.ports
    }
    pub fn dir(&self) -> &Path {
        &self.path
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
    /// The last `lines` lines of [`Popbridge::log`].
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path(), lines)
    }
    /// Waits until the log contains `needle`; false after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout)
    }
    /// How many times the log has `needle` so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }
    /// Waits until the log has `needle` at least `count` times (an event that may already have
    /// happened once: count the lines before causing it again); false after `timeout`.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_count(needle) >= count {
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
    /// `Err` with the exit status and the log's last lines once the process has exited (a
    /// crash must not pass for a slow server).
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "popbridge died ({status}); log tail:\n{}",
                self.log_tail(20)
            )),
            Err(e) => Err(format!("wait for popbridge: {e}")),
        }
    }
    /// Kills the process now, keeping its directory (config, state, log) for [`restart`].
    ///
    /// [`restart`]: Popbridge::restart
    pub fn kill(&mut self) {
        self.end();
    }
    /// Sends `signal` (`TERM`, `HUP`, `KILL`, ...) to the process with `kill(1)`; panics if
    /// that fails.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{signal} {} failed", self.child.id());
    }
    /// Waits for the process to exit on its own (e.g. after SIGTERM, its lame duck phase and
    /// drain); its exit status, or `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    /// Kills the process now and returns its log.
    pub fn stop(mut self) -> String {
        self.end();
        self.log()
    }
}

/// `bin serve --config config` with `RUST_LOG`, stdout and stderr to `log`.
fn spawn(bin: &Path, config: &Path, rust_log: &str, log: fs::File) -> Result<Child, String> {
    let log2 = log.try_clone().map_err(|e| format!("popbridge log: {e}"))?;
    Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(log2)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

impl Drop for Popbridge {
    fn drop(&mut self) {
        self.end();
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
