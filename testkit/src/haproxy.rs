//! A private HAProxy (Debian's `haproxy`, 2.6) for the fleet tests: run in the foreground from
//! a configuration the caller writes, read through its admin socket (`show stat`).
//!
//! ```ignore
//! let lb = Haproxy::start(&cfg_text, &[front_port]);   // cfg has `stats socket {SOCKET}`
//! lb.wait_status("popbridge_pop3", "node1", "UP", Duration::from_secs(10));
//! let per_node = lb.stats();  // sessions per server (stot), status, ...
//! ```
//!
//! Dropping it kills the process. `scripts/test` installs the package.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::accepts;
use crate::reaper::{Registration, Started};
use crate::tools::have;
use crate::{file_tail, keep_dirs};

const INSTALL_HINT: &str =
    "run scripts/test, which installs it (or: apt-get install -y --no-install-recommends haproxy)";

/// Panics (never skips) unless `haproxy` is installed.
pub fn require_haproxy() {
    assert!(
        have("haproxy") || Path::new("/usr/sbin/haproxy").exists(),
        "haproxy is not installed: the fleet tests need it; {INSTALL_HINT}"
    );
}

fn haproxy_bin() -> &'static str {
    if have("haproxy") {
        "haproxy"
    } else {
        "/usr/sbin/haproxy"
    }
}

/// One line of `show stat`: a frontend, a backend or one server of a backend.
#[derive(Debug, Clone)]
pub struct ServerStat {
    /// `pxname`: the frontend or backend.
    pub proxy: String,
    /// `svname`: the server name, or `FRONTEND` / `BACKEND`.
    pub server: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (going up), `MAINT`, `OPEN`, ...
    pub status: String,
    /// Sessions so far.
    pub stot: u64,
    /// Sessions open now.
    pub scur: u64,
    /// Every field by its header name.
    pub fields: BTreeMap<String, String>,
}

/// A private HAProxy (see the module documentation).
pub struct Haproxy {
    child: Child,
    registration: Option<Registration>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Haproxy {
    /// The admin socket path to put in the configuration (`stats socket PATH level admin`)
    /// of a HAProxy that will run in `dir`.
    pub fn socket_in(dir: &Path) -> PathBuf {
        dir.join("admin.sock")
    }

    /// Writes `config` to a fresh temp dir (where [`Haproxy::socket_in`] points: `{DIR}` in
    /// `config` is replaced by that directory) and runs `haproxy -f FILE -db`, its output going
    /// to `haproxy.log` there; returns once `haproxy -c` accepted the file, the admin socket
    /// answers and every port of `ports` accepts connections. Panics with the log otherwise.
    pub fn start(config: &str, ports: &[u16]) -> Haproxy {
        require_haproxy();
        let dir = tempfile::Builder::new()
            .prefix("pbhap")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let path = dir.path().to_path_buf();
        let config = config.replace("{DIR}", &path.display().to_string());
        let file = path.join("haproxy.cfg");
        fs::write(&file, &config).expect("write haproxy.cfg");
        let check = Command::new(haproxy_bin())
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c refused the configuration:\n{}{}\n{config}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = fs::File::create(path.join("haproxy.log")).expect("create haproxy.log");
        let child = Command::new(haproxy_bin())
            .arg("-f")
            .arg(&file)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start haproxy: {e}; {INSTALL_HINT}"));
        let registration = Some(Registration::new(Started::Process(child.id())));
        let mut lb = Haproxy {
            child,
            registration,
            dir: Some(dir),
            path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = lb.child.try_wait().expect("wait for haproxy") {
                panic!("haproxy exited with {status}:\n{}", lb.log());
            }
            if lb.try_command("show info").is_ok() && ports.iter().all(|&p| accepts(p)) {
                return lb;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy not ready within 20 s:\n{}",
                lb.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn dir(&self) -> &Path {
        &self.path
    }
    /// What HAProxy printed so far (its `log stdout` lines included).
    pub fn log(&self) -> String {
        fs::read_to_string(self.path.join("haproxy.log")).unwrap_or_default()
    }

    /// One admin socket command and its whole answer.
    pub fn try_command(&self, cmd: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(Haproxy::socket_in(&self.path))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("{cmd}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// [`Haproxy::try_command`], panicking on failure.
    pub fn command(&self, cmd: &str) -> String {
        self.try_command(cmd)
            .unwrap_or_else(|e| panic!("haproxy admin socket, {cmd:?}: {e}"))
    }

    /// `show stat`, parsed.
    pub fn stats(&self) -> Vec<ServerStat> {
        let text = self.command("show stat");
        let mut lines = text.lines();
        let header: Vec<String> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .unwrap_or_else(|| panic!("show stat without a header: {text}"))
            .split(',')
            .map(str::to_string)
            .collect();
        lines
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let fields: BTreeMap<String, String> = header
                    .iter()
                    .cloned()
                    .zip(l.split(',').map(str::to_string))
                    .collect();
                let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
                ServerStat {
                    proxy: get("pxname"),
                    server: get("svname"),
                    status: get("status"),
                    stot: get("stot").parse().unwrap_or(0),
                    scur: get("scur").parse().unwrap_or(0),
                    fields,
                }
            })
            .collect()
    }

    /// The `show stat` line of `server` in `backend`; panics if there is none.
    pub fn server(&self, backend: &str, server: &str) -> ServerStat {
        self.stats()
            .into_iter()
            .find(|s| s.proxy == backend && s.server == server)
            .unwrap_or_else(|| panic!("no server {backend}/{server} in show stat"))
    }

    /// Polls until `backend/server`'s status starts with `status` (`UP`, `DOWN`); returns how
    /// long that took, or panics with the last status after `timeout`. `UP` does not match a
    /// server going down (`UP 1/2`), nor `DOWN` one going up.
    pub fn wait_status(
        &self,
        backend: &str,
        server: &str,
        status: &str,
        timeout: Duration,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let now = self.server(backend, server).status;
            if now == status {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{backend}/{server} not {status} within {timeout:?}: {now}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        self.registration = None;
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- last lines of {}/haproxy.log ---", self.path.display());
            eprintln!("{}", file_tail(&self.path.join("haproxy.log"), 40));
        }
        if let Some(dir) = self.dir.take() {
            if keep_dirs() {
                eprintln!("keeping HAProxy dir {}", dir.keep().display());
            }
        }
    }
}
