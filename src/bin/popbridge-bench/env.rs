//! The bench's surroundings: a private Dovecot (via `scripts/dovecot-sandbox`), popbridge
//! processes, maildir seeding, /proc memory readings, and clean-up on exit or Ctrl-C.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// What must be undone however the bench ends: sandbox dirs to stop, child pids to kill,
/// temp roots to delete.
struct Cleanup {
    sandboxes: Vec<(PathBuf, PathBuf)>, // (script, dir)
    pids: Vec<u32>,
    roots: Vec<PathBuf>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    sandboxes: Vec::new(),
    pids: Vec::new(),
    roots: Vec::new(),
});

/// Stops everything still registered (idempotent). Called at the end, on error, on a signal.
pub fn cleanup_all(keep: bool) {
    let mut c = match CLEANUP.lock() {
        Ok(c) => c,
        Err(p) => p.into_inner(),
    };
    for pid in c.pids.drain(..) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    for (script, dir) in c.sandboxes.drain(..) {
        let _ = Command::new(&script)
            .arg("stop")
            .arg(&dir)
            .arg("--fast")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    for root in c.roots.drain(..) {
        if keep {
            eprintln!("popbridge-bench: keeping {}", root.display());
        } else {
            let _ = fs::remove_dir_all(&root);
        }
    }
}

/// SIGINT/SIGTERM: clean up, then exit 130.
pub fn install_signal_handler(keep: bool) {
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return,
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("popbridge-bench: interrupted, cleaning up");
            cleanup_all(keep);
            std::process::exit(130);
        });
    });
}

/// A fresh private directory /tmp/pbb<pid> (short: Dovecot's socket paths live under it).
pub fn make_root() -> Result<PathBuf> {
    let root = PathBuf::from(format!("/tmp/pbb{}", std::process::id()));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir(&root)?;
    CLEANUP.lock().unwrap().roots.push(root.clone());
    Ok(root)
}

pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<_>>()?;
    ls.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn wait_port(port: u16, timeout: Duration) -> bool {
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

fn mail_ids() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[0] == "mail" {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
        .ok_or_else(|| "no `mail` user in /etc/passwd".into())
}

/// Dovecot settings the bench needs on top of the sandbox's: hundreds of simultaneous
/// sessions (each a login process, then a pop3 or imap process).
const DOVECOT_EXTRA: &str = "default_process_limit = 1500
default_client_limit = 20000
default_vsz_limit = 1G
service anvil {
  client_limit = 20000
}
service auth {
  client_limit = 20000
}
";

pub struct Dovecot {
    script: PathBuf,
    pub dir: PathBuf,
    pub imap: u16,
    pub pop3: u16,
    pub pop3s: u16,
    mail_uid: u32,
    mail_gid: u32,
    seq: AtomicU64,
}

impl Dovecot {
    pub fn start(script: &Path, dir: PathBuf) -> Result<Dovecot> {
        let mut last = String::new();
        for _ in 0..3 {
            let p = free_ports(4)?;
            {
                let mut c = CLEANUP.lock().unwrap();
                if !c.sandboxes.iter().any(|(_, d)| d == &dir) {
                    c.sandboxes.push((script.to_path_buf(), dir.clone()));
                }
            }
            let out = Command::new(script)
                .arg("start")
                .arg(&dir)
                .args(["--imap-port", &p[0].to_string()])
                .args(["--imaps-port", &p[1].to_string()])
                .args(["--pop3-port", &p[2].to_string()])
                .args(["--pop3s-port", &p[3].to_string()])
                .env("DOVECOT_EXTRA_CONF", DOVECOT_EXTRA)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if out.status.success() {
                let (mail_uid, mail_gid) = mail_ids()?;
                return Ok(Dovecot {
                    script: script.to_path_buf(),
                    dir,
                    imap: p[0],
                    pop3: p[2],
                    pop3s: p[3],
                    mail_uid,
                    mail_gid,
                    seq: AtomicU64::new(0),
                });
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(format!("scripts/dovecot-sandbox start failed three times:\n{last}").into())
    }

    pub fn add_user(&self, user: &str, pw: &str) -> Result<()> {
        let out = Command::new(&self.script)
            .arg("adduser")
            .arg(&self.dir)
            .args([user, pw])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "adduser {user}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(())
    }

    /// Writes messages (CRLF line ends already) into `mail/<user>/cur`, owned by `mail`, named
    /// `<time>.M..P..Q..,S=<size>,W=<size>:2,` with increasing times so UIDs follow the order.
    pub fn seed(&self, user: &str, messages: impl Iterator<Item = Vec<u8>>) -> Result<u64> {
        let md = self.dir.join("mail").join(user);
        let (tmp, cur) = (md.join("tmp"), md.join("cur"));
        let mut n_seeded = 0;
        for msg in messages {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let base = format!(
                "{}.M{:06}P{}Q{}.pbbench,S={},W={}",
                1_600_000_000 + n,
                n % 1_000_000,
                std::process::id(),
                n,
                msg.len(),
                msg.len()
            );
            let t = tmp.join(&base);
            fs::write(&t, &msg)?;
            chown(&t, Some(self.mail_uid), Some(self.mail_gid))?;
            fs::rename(&t, cur.join(format!("{base}:2,")))?;
            n_seeded += 1;
        }
        Ok(n_seeded)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default();
        let v: Vec<&str> = log.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .arg("--fast")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        CLEANUP
            .lock()
            .unwrap()
            .sandboxes
            .retain(|(_, d)| d != &self.dir);
    }
}

/// A running `popbridge serve`. Dropping it kills it.
pub struct Popbridge {
    child: Child,
    pub port: u16,
    pub tls_port: u16,
    pub dir: PathBuf,
}

impl Popbridge {
    /// Starts `bin` with a fresh state directory `dir` in front of `dc`'s plain IMAP port;
    /// `extra` is appended to its configuration.
    pub fn start(bin: &Path, dc: &Dovecot, dir: PathBuf, extra: &str) -> Result<Popbridge> {
        fs::create_dir_all(&dir)?;
        let p = free_ports(2)?;
        let config = format!(
            r#"[pop3]
listen = "127.0.0.1:{port}"
listen_tls = "127.0.0.1:{tls}"
plaintext_auth = "always"
mark_seen = true

[pop3.tls]
cert = "{dc}/server.pem"
key = "{dc}/server.key"

[imap]
host = "127.0.0.1"
port = {imap}
security = "none"

[state]
dir = "{state}"

[limits]
max_connections = 2000
max_connections_per_ip = 2000
auth_penalty_base_ms = 1

{extra}
"#,
            port = p[0],
            tls = p[1],
            dc = dc.dir.display(),
            imap = dc.imap,
            state = dir.join("state").display(),
        );
        let config_path = dir.join("popbridge.toml");
        fs::write(&config_path, config)?;
        let log = fs::File::create(dir.join("popbridge.log"))?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        CLEANUP.lock().unwrap().pids.push(child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait()? {
                return Err(format!(
                    "popbridge exited ({st}) before listening; log:\n{}",
                    fs::read_to_string(dir.join("popbridge.log")).unwrap_or_default()
                )
                .into());
            }
            if wait_port(p[0], Duration::from_millis(100))
                && wait_port(p[1], Duration::from_millis(100))
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("popbridge did not listen within 30 s".into());
            }
        }
        Ok(Popbridge {
            child,
            port: p[0],
            tls_port: p[1],
            dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running? (A crash mid-scenario must not pass for a slow server.)
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(st) => {
                Err(format!("popbridge died ({st}); log tail:\n{}", self.log_tail(20)).into())
            }
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("popbridge.log")).unwrap_or_default();
        let v: Vec<&str> = log.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Popbridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        CLEANUP.lock().unwrap().pids.retain(|&p| p != pid);
    }
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM, ...).
pub fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0, `echo 5 > /proc/PID/clear_refs`).
pub fn reset_hwm(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

// ---------------------------------------------------------------------------------------------
// Deterministic message generation

/// splitmix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform integer in [lo, hi].
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        ((a + self.unit() * (b - a)).exp() as u64).clamp(lo, hi)
    }
}

/// Body text: ~4 MiB of 30..78-character CRLF lines; about one line in 40 starts with a dot
/// (so dot-stuffing is exercised), one in 25 is empty.
pub struct Pool {
    text: Vec<u8>,
    /// Offsets where lines start.
    starts: Vec<usize>,
}

impl Pool {
    pub fn new(seed: u64) -> Pool {
        const WORDS: &[&str] = &[
            "the",
            "mail",
            "server",
            "proxy",
            "quarterly",
            "report",
            "attached",
            "please",
            "invoice",
            "meeting",
            "tomorrow",
            "regards",
            "ticket",
            "scanner",
            "document",
            "pop3",
            "imap",
            "bridge",
            "lorem",
            "ipsum",
            "dolor",
            "sit",
            "amet",
            "consectetur",
        ];
        let mut rng = Rng::new(seed);
        let mut text = Vec::with_capacity(4 << 20);
        let mut starts = Vec::new();
        while text.len() < 4 << 20 {
            starts.push(text.len());
            let r = rng.next() % 1000;
            if r < 40 {
                text.extend_from_slice(b"\r\n");
                continue;
            }
            if r < 65 {
                text.push(b'.');
            }
            let len = 30 + (rng.next() % 49) as usize;
            let start = text.len();
            while text.len() - start < len {
                let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
                text.extend_from_slice(w.as_bytes());
                text.push(b' ');
            }
            text.extend_from_slice(b"\r\n");
        }
        Pool { text, starts }
    }

    /// A message of about `size` octets (at least the header): CRLF line ends, ends in CRLF.
    pub fn message(&self, id: u64, size: u64, rng: &mut Rng) -> Vec<u8> {
        let mut m = format!(
            "Return-Path: <sender@example.org>\r\nFrom: Bench Sender <sender@example.org>\r\n\
             To: user@example.net\r\nSubject: popbridge bench message {id}\r\n\
             Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <{id}.bench@example.org>\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        .into_bytes();
        let size = size as usize;
        while m.len() < size {
            let want = size - m.len();
            let i = (rng.next() % self.starts.len() as u64) as usize;
            let from = self.starts[i];
            let avail = self.text.len() - from;
            let mut take = want.min(avail);
            // Cut at a line end: extend to the next CRLF.
            match self.text[from + take.saturating_sub(1)..]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                Some(p) => take = take.saturating_sub(1) + p + 2,
                None => take = avail,
            }
            m.extend_from_slice(&self.text[from..from + take]);
        }
        m
    }
}

/// CPU time the whole machine has spent busy (not idle or waiting for I/O) since boot, in
/// milliseconds, from /proc/stat; `None` where that cannot be read.
pub fn busy_cpu_ms() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...: user, nice, system, irq, softirq.
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    // USER_HZ is 100 on Linux.
    Some(busy as f64 * 10.0)
}

/// CPU time (user + system) process `pid` has used, in milliseconds, from /proc/PID/stat.
pub fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ... utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 * 10.0)
}
