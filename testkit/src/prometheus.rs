//! A private Prometheus server for tests, plus small HTTP and promtool helpers.
//!
//! ```ignore
//! let prom = Prometheus::start(&[format!("127.0.0.1:{metrics_port}")]);  // job "popbridge"
//! prom.wait_for("popbridge_build_info", Duration::from_secs(10));
//! let series = prom.query("sum by (result) (popbridge_logins_total)").unwrap();
//! ```
//!
//! The server runs as `prometheus --config.file=DIR/prometheus.yml --storage.tsdb.path=DIR/data
//! --web.listen-address=127.0.0.1:PORT` with a 1 s scrape and rule-evaluation interval and
//! `rule_files` pointing at `dashboards/alerts.yml`. Dropping it kills the process. Needs the
//! Debian package `prometheus` (server and `promtool`): `scripts/test` installs it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::reaper::{Registration, Started};
use crate::tools::have;
use crate::{free_ports, keep_dirs, repo_root};

const INSTALL_HINT: &str = "run scripts/test, which installs it (or: apt-get install -y \
     --no-install-recommends prometheus)";

/// The Grafana dashboard shipped in the repository.
pub fn dashboard_path() -> PathBuf {
    repo_root().join("dashboards/popbridge.json")
}

/// The Prometheus alerting rules shipped in the repository.
pub fn alerts_path() -> PathBuf {
    repo_root().join("dashboards/alerts.yml")
}

/// Panics (never skips) unless `prometheus` and `promtool` are installed.
pub fn require_prometheus() {
    for tool in ["prometheus", "promtool"] {
        assert!(
            have(tool),
            "{tool} is not installed: these tests need it; {INSTALL_HINT}"
        );
    }
}

/// Runs `promtool ARGS`, feeding `stdin` to it.
pub fn promtool(args: &[&str], stdin: &[u8]) -> Output {
    require_prometheus();
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    // promtool may exit before reading everything: a write error is then not ours to report.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().expect("wait for promtool")
}

/// The sum of the samples of `name` on popbridge's `/metrics` at 127.0.0.1:`port` whose labels
/// include every one of `labels` (0 if there is none). Panics if the scrape fails.
pub fn metric_sum(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, body) = http_get(port, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`: the status code and the body (chunked transfer
/// encoding undone). Errors are connection or protocol failures, never HTTP status codes.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send request to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read response from {addr}{path}: {e}"))?;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in response from {addr}{path}"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut body = raw[head_end + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}{path}: {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| format!("bad chunked body from {addr}{path}"))?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One element of a query result: its labels (`__name__` included when Prometheus keeps it)
/// and its value as Prometheus formats it (`"1"`, `"0.25"`, `"NaN"`, `"+Inf"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: String,
}

impl Sample {
    /// The value as a number (NaN and infinities included).
    pub fn f64(&self) -> f64 {
        self.value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {:?}", self.value))
    }
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A private Prometheus (see the module documentation). Dropping it kills the process.
pub struct Prometheus {
    child: Child,
    /// Until the child is killed (then taken, before it is reaped).
    registration: Option<Registration>,
    port: u16,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Prometheus {
    /// Scrapes `targets` (`host:port`, path `/metrics`) as job `popbridge` every second and
    /// evaluates `dashboards/alerts.yml` every second; returns once `/-/ready` answers 200.
    pub fn start(targets: &[String]) -> Prometheus {
        require_prometheus();
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("pbprom")
                .tempdir_in("/tmp")
                .expect("create temp dir in /tmp");
            let path = dir.path().to_path_buf();
            let port = free_ports(1)[0];
            fs::write(path.join("prometheus.yml"), config(targets, &alerts_path()))
                .expect("write prometheus.yml");
            let log = fs::File::create(path.join("prometheus.log")).expect("create log");
            let child = Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    path.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    path.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start prometheus: {e}; {INSTALL_HINT}"));
            let registration = Some(Registration::new(Started::Process(child.id())));
            let mut prom = Prometheus {
                child,
                registration,
                port,
                dir: Some(dir),
                path,
            };
            match prom.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return prom,
                Err(e) => last_err = format!("{e}\nlog:\n{}", prom.log()),
            }
        }
        panic!("prometheus did not start three times:\n{last_err}");
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for prometheus") {
                return Err(format!("prometheus exited with {status}"));
            }
            if let Ok((200, _)) = http_get(self.port, "/-/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("/-/ready did not answer 200 within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn dir(&self) -> &Path {
        &self.path
    }
    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query at the current time through `/api/v1/query`. `Err` carries
    /// Prometheus's error (`bad_data: parse error ...`) or a transport failure. A scalar
    /// result comes back as one sample without labels.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", url_encode(expr)),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, body is not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or(&body)
            ));
        }
        let data = &v["data"];
        let value_of = |pair: &serde_json::Value| -> Result<String, String> {
            pair.get(1)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("bad sample value in {body}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .ok_or_else(|| format!("vector without result: {body}"))?
                .iter()
                .map(|s| {
                    Ok(Sample {
                        labels: s["metric"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").into()))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        value: value_of(&s["value"])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: value_of(&data["result"])?,
            }]),
            other => Err(format!("unexpected result type {other:?}: {body}")),
        }
    }

    /// Polls [`Prometheus::query`] until it returns at least one sample; panics with the last
    /// result (or error) after `timeout`.
    pub fn wait_for(&self, expr: &str, timeout: Duration) -> Vec<Sample> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query(expr);
            if let Ok(s) = &r {
                if !s.is_empty() {
                    return s.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no data for {expr:?} within {timeout:?}: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        self.registration = None;
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- last lines of {}/prometheus.log ---",
                self.path.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(dir) = self.dir.take() {
            if keep_dirs() {
                eprintln!("keeping Prometheus dir {}", dir.keep().display());
            }
        }
    }
}

/// prometheus.yml: 1 s scrapes of `targets` as job `popbridge`, 1 s rule evaluation.
fn config(targets: &[String], rules: &Path) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - '{}'\n\
         scrape_configs:\n  - job_name: popbridge\n    metrics_path: /metrics\n    \
         static_configs:\n      - targets: [{}]\n",
        rules.display(),
        targets.join(", ")
    )
}
