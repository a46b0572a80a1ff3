//! `popbridge-bench`: popbridge (B) against Dovecot's own POP3 service (D) on the same
//! mailboxes of a private Dovecot, with a fetchmail-like client.
//!
//! ```sh
//! cargo build --release --workspace                        # popbridge and popbridge-bench
//! target/release/popbridge-bench --scenario all            # the full benchmark
//! target/release/popbridge-bench --smoke                   # tiny, seconds
//! ```
//!
//! A workspace member of its own (`bench/`, not published, not installed by `cargo install
//! popbridge`); it runs popbridge as a black box and imports nothing from the library. The
//! private Dovecot and the popbridge processes come from the test kit the integration tests use
//! (`testkit/`, crate `popbridge-testkit`); the bench adds its settings for them
//! (`servers.rs`), its own POP3 client (`pop3.rs`), mailboxes (`corpus.rs`), /proc readings
//! (`procfs.rs`) and clean-up on exit or Ctrl-C (`cleanup.rs`). `bench/tests/smoke.rs` runs
//! `--smoke` in the suite.
//!
//! Exits 0 when every session succeeded and popbridge delivered exactly what Dovecot did
//! (message count, octets, a checksum of the content, UIDL and LIST output); 1 otherwise;
//! 2 when the environment could not be set up. Missed performance targets are reported in
//! the table (`MISS`) but do not change the exit status.

mod cleanup;
mod corpus;
mod pop3;
mod procfs;
mod servers;
mod wave;

// Issue 17: scenarios where users feel performance (wan, polls, previews).
mod feel;
mod polls;
mod previews;
mod relay;
mod wan;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio_rustls::rustls;

use popbridge_testkit::{Dovecot, Popbridge};

use corpus::{Pool, Rng};
use pop3::{Download, Endpoint};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Parser)]
#[command(about = "Benchmark popbridge (B) against Dovecot's POP3 service (D)")]
struct Cli {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Tiny sizes, one run: a correctness and plumbing check that takes seconds.
    #[arg(long)]
    smoke: bool,
    /// Measured runs per side (default 5; 1 with --smoke).
    #[arg(long)]
    runs: Option<usize>,
    /// The popbridge executable (default: `popbridge` next to this executable).
    #[arg(long, value_name = "PATH")]
    popbridge: Option<PathBuf>,
    /// The sandbox script (default: scripts/dovecot-sandbox of this source tree).
    #[arg(long, value_name = "PATH")]
    sandbox_script: Option<PathBuf>,
    /// Keep the temp directory (/tmp/pbb<pid>: Dovecot sandbox, popbridge configs and logs).
    #[arg(long)]
    keep: bool,
    /// TOML appended to popbridge's configuration, to measure a variant, e.g.
    /// `--popbridge-config '[migration]
    /// shared_map = "none"'`.
    #[arg(long, value_name = "TOML", default_value = "")]
    popbridge_config: String,

    #[command(flatten)]
    feel: feel::Opts,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Throughput,
    Tls,
    Huge,
    Big,
    Concurrency,
    /// The IMAP store behind a latency relay (issue 17).
    Wan,
    /// 2,000 users polling (issue 17).
    Polls,
    /// TOP n 0 on every message, then ten RETRs (issue 17).
    Previews,
}

/// Workload sizes.
struct Sizes {
    tput_msgs: u64,
    tput_min: u64,
    tput_max: u64,
    huge_msgs: u64,
    big_bytes: u64,
    conc_users: usize,
    conc_msgs: u64,
}

const FULL: Sizes = Sizes {
    tput_msgs: 2000,
    tput_min: 1024,
    tput_max: 1 << 20,
    huge_msgs: 100_000,
    big_bytes: 50 << 20,
    conc_users: 500,
    conc_msgs: 20,
};

const SMOKE: Sizes = Sizes {
    tput_msgs: 20,
    tput_min: 1024,
    tput_max: 256 << 10,
    huge_msgs: 500,
    big_bytes: 2 << 20,
    conc_users: 10,
    conc_msgs: 5,
};

const PASSWORD: &str = "benchpw";

/// One line of the result table.
struct Row {
    scenario: &'static str,
    metric: String,
    d: Option<f64>,
    b: Option<f64>,
    /// Shown B/D ratio (rates: B/D of rates; times: B/D of times).
    ratio: Option<f64>,
    target: String,
    pass: Option<bool>,
}

struct Ctx {
    dc: Dovecot,
    bin: PathBuf,
    root: PathBuf,
    sizes: &'static Sizes,
    runs: usize,
    pool: Pool,
    rows: Vec<Row>,
    /// Protocol errors and D/B content mismatches: any makes the exit status 1.
    failures: Vec<String>,
    pb_seq: usize,
    /// Appended to every popbridge configuration (`--popbridge-config`).
    pb_extra: String,
    tls: Arc<rustls::ClientConfig>,
    seeded_tput: bool,

    /// Options of wan, polls and previews; `--smoke` given.
    feel: feel::Opts,
    smoke: bool,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

fn same(a: &Download, b: &Download) -> bool {
    a.messages == b.messages
        && a.bytes == b.bytes
        && a.content == b.content
        && a.listing == b.listing
}

impl Ctx {
    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
    fn d_plain(&self) -> Endpoint {
        Endpoint {
            addr: Self::addr(self.dc.pop3_port()),
            tls: None,
        }
    }
    fn d_tls(&self) -> Endpoint {
        Endpoint {
            addr: Self::addr(self.dc.pop3s_port()),
            tls: Some(self.tls.clone()),
        }
    }
    fn b_plain(pb: &Popbridge) -> Endpoint {
        Endpoint {
            addr: Self::addr(pb.pop3_port()),
            tls: None,
        }
    }
    fn b_tls(&self, pb: &Popbridge) -> Endpoint {
        Endpoint {
            addr: Self::addr(servers::tls_port(pb)),
            tls: Some(self.tls.clone()),
        }
    }

    fn popbridge(&mut self) -> Result<Popbridge> {
        self.pb_seq += 1;
        servers::start_popbridge(
            &self.bin,
            &self.dc,
            self.root.join(format!("pb{}", self.pb_seq)),
            &self.pb_extra,
        )
    }

    fn fail(&mut self, msg: String) {
        eprintln!("popbridge-bench: FAILURE: {msg}");
        self.failures.push(msg);
    }

    /// Checks `got` (from `side`) against the reference download; records a failure if not equal.
    fn check(&mut self, what: &str, side: &str, reference: &Download, got: &Download) {
        if !same(reference, got) {
            self.fail(format!(
                "{what}: {side} differs from Dovecot's POP3: {} msgs / {} octets / content {:016x} / listing {:016x} vs {} / {} / {:016x} / {:016x}",
                got.messages, got.bytes, got.content, got.listing,
                reference.messages, reference.bytes, reference.content, reference.listing
            ));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        scenario: &'static str,
        metric: &str,
        d: Option<f64>,
        b: Option<f64>,
        ratio: Option<f64>,
        target: &str,
        pass: Option<bool>,
    ) {
        self.rows.push(Row {
            scenario,
            metric: metric.to_string(),
            d,
            b,
            ratio,
            target: target.to_string(),
            pass,
        });
    }

    /// A session that must succeed: an error is recorded as a failure and returned.
    fn session(
        &mut self,
        what: &str,
        f: impl FnOnce() -> std::io::Result<Download>,
    ) -> Result<Download> {
        match f() {
            Ok(d) => Ok(d),
            Err(e) => {
                let msg = format!("{what}: session failed: {e}");
                self.fail(msg.clone());
                Err(msg.into())
            }
        }
    }

    fn seed_tput(&mut self) -> Result<()> {
        if self.seeded_tput {
            return Ok(());
        }
        let t = Instant::now();
        let mut rng = Rng::new(1);
        let s = self.sizes;
        let pool = &self.pool;
        let mut total = 0;
        let msgs = (0..s.tput_msgs).map(|i| {
            let size = rng.log_uniform(s.tput_min, s.tput_max);
            let m = pool.message(i, size, &mut rng);
            total += m.len() as u64;
            m
        });
        self.dc.try_seed("tput", msgs)?;
        eprintln!(
            "popbridge-bench: seeded {} messages ({:.1} MB) in {:.1} s",
            s.tput_msgs,
            mb(total),
            t.elapsed().as_secs_f64()
        );
        self.seeded_tput = true;
        Ok(())
    }

    /// throughput (plain) or tls: one user's mixed mailbox, downloaded whole per session.
    fn throughput(&mut self, tls: bool) -> Result<()> {
        let name = if tls { "tls" } else { "throughput" };
        eprintln!("popbridge-bench: scenario {name}");
        self.seed_tput()?;
        let mut pb = self.popbridge()?;
        let (d_ep, b_ep) = if tls {
            (self.d_tls(), self.b_tls(&pb))
        } else {
            (self.d_plain(), Self::b_plain(&pb))
        };
        // Warm-up, untimed: Dovecot's index and \Seen flags, popbridge's cache, the page cache.
        let reference = self.session(&format!("{name} D warm-up"), || {
            pop3::download_all(&d_ep, "tput", PASSWORD)
        })?;
        let warm = self.session(&format!("{name} B warm-up"), || {
            pop3::download_all(&b_ep, "tput", PASSWORD)
        })?;
        self.check(name, "popbridge", &reference, &warm);
        let (mut d_runs, mut b_runs) = (Vec::new(), Vec::new());
        for r in 0..self.runs {
            for side in if r % 2 == 0 { ["D", "B"] } else { ["B", "D"] } {
                let ep = if side == "D" { &d_ep } else { &b_ep };
                let got = self.session(&format!("{name} {side} run {r}"), || {
                    pop3::download_all(ep, "tput", PASSWORD)
                })?;
                self.check(name, side, &reference, &got);
                eprintln!(
                    "  {name} run {r} {side}: {:.0} msgs/s, {:.1} MB/s",
                    got.messages as f64 / got.elapsed.as_secs_f64(),
                    mb(got.bytes) / got.elapsed.as_secs_f64()
                );
                if side == "D" {
                    d_runs.push(got)
                } else {
                    b_runs.push(got)
                }
            }
        }
        pb.check_alive()?;
        let rate = |v: &[Download], f: &dyn Fn(&Download) -> f64| {
            median(
                &v.iter()
                    .map(|d| f(d) / d.elapsed.as_secs_f64())
                    .collect::<Vec<_>>(),
            )
        };
        let (dm, bm) = (
            rate(&d_runs, &|d| d.messages as f64),
            rate(&b_runs, &|d| d.messages as f64),
        );
        self.row(
            name,
            "msgs/s",
            Some(dm),
            Some(bm),
            Some(bm / dm),
            ">= 0.9",
            Some(bm / dm >= 0.9),
        );
        let (dy, by) = (
            rate(&d_runs, &|d| mb(d.bytes)),
            rate(&b_runs, &|d| mb(d.bytes)),
        );
        self.row(
            name,
            "MB/s",
            Some(dy),
            Some(by),
            Some(by / dy),
            ">= 0.9",
            Some(by / dy >= 0.9),
        );
        // Where the time goes: per-command latencies (medians over all runs).
        let lat = |v: &[Download], lo: u64, hi: u64| {
            median(
                &v.iter()
                    .flat_map(|d| d.retr.iter())
                    .filter(|(b, _)| *b >= lo && *b < hi)
                    .map(|(_, t)| ms(*t))
                    .collect::<Vec<_>>(),
            )
        };
        for (label, lo, hi) in [
            ("RETR p50 ms, < 16 KB", 0, 16_000),
            ("RETR p50 ms, 16-256 KB", 16_000, 256_000),
            ("RETR p50 ms, >= 256 KB", 256_000, u64::MAX),
        ] {
            let (d, b) = (lat(&d_runs, lo, hi), lat(&b_runs, lo, hi));
            if d.is_finite() && b.is_finite() {
                self.row(name, label, Some(d), Some(b), Some(b / d), "info", None);
            }
        }
        let login = |v: &[Download]| median(&v.iter().map(|d| ms(d.login)).collect::<Vec<_>>());
        let (d, b) = (login(&d_runs), login(&b_runs));
        self.row(
            name,
            "login ms",
            Some(d),
            Some(b),
            Some(b / d),
            "info",
            None,
        );
        Ok(())
    }

    /// huge: a 100,000-message mailbox; login + STAT + UIDL + LIST + QUIT.
    fn huge(&mut self) -> Result<()> {
        eprintln!("popbridge-bench: scenario huge");
        let t = Instant::now();
        let mut rng = Rng::new(2);
        let pool = &self.pool;
        let msgs = (0..self.sizes.huge_msgs).map(|i| {
            let size = rng.log_uniform(600, 2000);
            pool.message(i, size, &mut rng)
        });
        let n = self.dc.try_seed("huge", msgs)?;
        eprintln!(
            "popbridge-bench: seeded {n} messages in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let d_ep = self.d_plain();
        // The very first D session builds Dovecot's index: reported for information only.
        let cold = self.session("huge D cold", || pop3::list_only(&d_ep, "huge", PASSWORD))?;
        let (mut d_t, mut b_first, mut b_later) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..self.runs {
            // A fresh popbridge with an empty state directory: its first session is cold.
            let mut pb = self.popbridge()?;
            let b_ep = Self::b_plain(&pb);
            let d = self.session(&format!("huge D run {r}"), || {
                pop3::list_only(&d_ep, "huge", PASSWORD)
            })?;
            self.check("huge", "D", &cold, &d);
            d_t.push(ms(d.elapsed));
            let b = self.session(&format!("huge B first run {r}"), || {
                pop3::list_only(&b_ep, "huge", PASSWORD)
            })?;
            self.check("huge", "popbridge (first)", &cold, &b);
            b_first.push(ms(b.elapsed));
            eprintln!(
                "  huge run {r}: D {:.0} ms, B first {:.0} ms",
                ms(d.elapsed),
                ms(b.elapsed)
            );
            for _ in 0..2 {
                let b = self.session(&format!("huge B later run {r}"), || {
                    pop3::list_only(&b_ep, "huge", PASSWORD)
                })?;
                self.check("huge", "popbridge (later)", &cold, &b);
                b_later.push(ms(b.elapsed));
                let d = self.session(&format!("huge D run {r}"), || {
                    pop3::list_only(&d_ep, "huge", PASSWORD)
                })?;
                self.check("huge", "D", &cold, &d);
                d_t.push(ms(d.elapsed));
                eprintln!(
                    "  huge run {r}: B later {:.0} ms, D {:.0} ms",
                    ms(b.elapsed),
                    ms(d.elapsed)
                );
            }
            pb.check_alive()?;
        }
        let (d, bf, bl) = (median(&d_t), median(&b_first), median(&b_later));
        self.row(
            "huge",
            "first session ms (B cold cache)",
            Some(d),
            Some(bf),
            Some(bf / d),
            "<= 2.0 (time)",
            Some(bf / d <= 2.0),
        );
        self.row(
            "huge",
            "later sessions ms",
            Some(d),
            Some(bl),
            Some(bl / d),
            "<= 1.0 (time)",
            Some(bl / d <= 1.0),
        );
        self.row(
            "huge",
            "D cold-index first session ms",
            Some(ms(cold.elapsed)),
            None,
            None,
            "info",
            None,
        );
        Ok(())
    }

    /// big: RETR of one 50 MB message; popbridge's peak RSS growth during it.
    fn big(&mut self) -> Result<()> {
        eprintln!("popbridge-bench: scenario big");
        let mut rng = Rng::new(3);
        let m = self.pool.message(0, self.sizes.big_bytes, &mut rng);
        self.dc.try_seed("big", std::iter::once(m))?;
        let mut pb = self.popbridge()?;
        let (d_ep, b_ep) = (self.d_plain(), Self::b_plain(&pb));
        let reference = self.session("big D warm-up", || {
            pop3::download_all(&d_ep, "big", PASSWORD)
        })?;
        let retr_rate = |d: &Download| mb(d.bytes) / d.retr[0].1.as_secs_f64();
        let (mut d_r, mut b_r, mut growth) = (Vec::new(), Vec::new(), Vec::new());
        let mut hwm_exact = true;
        for r in 0..self.runs {
            for side in if r % 2 == 0 { ["D", "B"] } else { ["B", "D"] } {
                if side == "D" {
                    let got = self.session(&format!("big D run {r}"), || {
                        pop3::download_all(&d_ep, "big", PASSWORD)
                    })?;
                    self.check("big", "D", &reference, &got);
                    d_r.push(retr_rate(&got));
                } else {
                    let pid = pb.pid();
                    hwm_exact &= procfs::reset_hwm(pid);
                    let before = procfs::proc_kib(pid, "VmRSS")?;
                    let hwm_before = procfs::proc_kib(pid, "VmHWM")?;
                    let got = self.session(&format!("big B run {r}"), || {
                        pop3::download_all(&b_ep, "big", PASSWORD)
                    })?;
                    let hwm = procfs::proc_kib(pid, "VmHWM")?;
                    self.check("big", "popbridge", &reference, &got);
                    b_r.push(retr_rate(&got));
                    let g = hwm.saturating_sub(before.max(if hwm_exact { 0 } else { hwm_before }));
                    eprintln!(
                        "  big run {r} B: {:.1} MB/s, RSS before {before} KiB, peak {hwm} KiB",
                        retr_rate(&got)
                    );
                    growth.push(g as f64 / 1024.0);
                }
            }
        }
        pb.check_alive()?;
        let (d, b) = (median(&d_r), median(&b_r));
        self.row(
            "big",
            "RETR MB/s",
            Some(d),
            Some(b),
            Some(b / d),
            ">= 0.9",
            Some(b / d >= 0.9),
        );
        let g = growth.iter().cloned().fold(0.0, f64::max);
        let metric = if hwm_exact {
            "B peak RSS growth MiB (max)"
        } else {
            "B peak RSS growth MiB (max, approx.)"
        };
        self.row(
            "big",
            metric,
            None,
            Some(g),
            None,
            "< 16 MiB",
            Some(g < 16.0),
        );
        Ok(())
    }

    /// concurrency: N users downloading at once; then N idle authenticated sessions.
    fn concurrency(&mut self) -> Result<()> {
        eprintln!("popbridge-bench: scenario concurrency");
        let n = self.sizes.conc_users;
        let t = Instant::now();
        for u in 0..n {
            let user = format!("user{u}");
            let mut rng = Rng::new(1000 + u as u64);
            let pool = &self.pool;
            let msgs = (0..self.sizes.conc_msgs).map(|i| {
                let size = rng.log_uniform(1000, 8000);
                pool.message(u as u64 * 1000 + i, size, &mut rng)
            });
            self.dc.try_seed(&user, msgs)?;
        }
        eprintln!(
            "popbridge-bench: seeded {n} users in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let mut pb = self.popbridge()?;
        let (d_ep, b_ep) = (self.d_plain(), Self::b_plain(&pb));

        // Warm-up (untimed, also concurrent): the reference downloads per user.
        let (warm, errs) = swarm(&d_ep, n);
        let reference: Vec<Download> = match warm.into_iter().collect::<Option<Vec<_>>>() {
            Some(v) => v,
            None => {
                let msg = format!("concurrency D warm-up: {}", errs.join("; "));
                self.fail(msg.clone());
                return Err(msg.into());
            }
        };
        let (warm_b, errs) = swarm(&b_ep, n);
        self.swarm_check("B warm-up", &reference, &warm_b, &errs);
        let warm_b_err = errs.len();

        let (mut d_rate, mut b_rate) = (Vec::new(), Vec::new());
        let (mut d_cpu, mut b_cpu, mut pb_cpu) = (Vec::new(), Vec::new(), Vec::new());
        let (mut d_err, mut b_err) = (0usize, warm_b_err);
        for r in 0..self.runs {
            for side in if r % 2 == 0 { ["D", "B"] } else { ["B", "D"] } {
                let ep = if side == "D" { &d_ep } else { &b_ep };
                let t0 = Instant::now();
                let busy0 = procfs::busy_cpu_ms();
                let pb0 = procfs::process_cpu_ms(pb.pid());
                let (got, errs) = swarm(ep, n);
                let wall = t0.elapsed();
                let cpu = procfs::busy_cpu_ms()
                    .zip(busy0)
                    .map(|(b, a)| (b - a) / n as f64);
                if side == "B" {
                    if let Some(used) = procfs::process_cpu_ms(pb.pid())
                        .zip(pb0)
                        .map(|(b, a)| b - a)
                    {
                        pb_cpu.push(used / n as f64);
                    }
                }
                let msgs: u64 = got.iter().flatten().map(|d| d.messages).sum();
                let rate = msgs as f64 / wall.as_secs_f64();
                eprintln!(
                    "  concurrency run {r} {side}: {rate:.0} msgs/s, {} errors, {:.2} s, {:.2} CPU ms/session",
                    errs.len(),
                    wall.as_secs_f64(),
                    cpu.unwrap_or(f64::NAN)
                );
                if let Some(cpu) = cpu {
                    if side == "D" {
                        d_cpu.push(cpu);
                    } else {
                        b_cpu.push(cpu);
                    }
                }
                self.swarm_check(&format!("{side} run {r}"), &reference, &got, &errs);
                if side == "D" {
                    d_rate.push(rate);
                    d_err += errs.len();
                } else {
                    b_rate.push(rate);
                    b_err += errs.len();
                }
            }
        }
        pb.check_alive()?;
        let (d, b) = (median(&d_rate), median(&b_rate));
        self.row(
            "concurrency",
            &format!("{n} sessions: aggregate msgs/s"),
            Some(d),
            Some(b),
            Some(b / d),
            ">= 1.0",
            Some(b / d >= 1.0),
        );
        if !d_cpu.is_empty() && !b_cpu.is_empty() {
            let (d, b) = (median(&d_cpu), median(&b_cpu));
            self.row(
                "concurrency",
                "machine CPU ms per session (all processes)",
                Some(d),
                Some(b),
                Some(b / d),
                "info",
                None,
            );
        }
        if !pb_cpu.is_empty() {
            self.row(
                "concurrency",
                "of which popbridge itself",
                None,
                Some(median(&pb_cpu)),
                None,
                "info",
                None,
            );
        }
        self.row(
            "concurrency",
            "failed sessions (all runs + B warm-up)",
            Some(d_err as f64),
            Some(b_err as f64),
            None,
            "0",
            Some(d_err == 0 && b_err == 0),
        );
        drop(pb);

        // Idle sessions: a fresh popbridge, one warm-up login, then n logged-in sessions.
        let mut pb = self.popbridge()?;
        let b_ep = Self::b_plain(&pb);
        self.session("idle warm-up", || pop3::list_only(&b_ep, "user0", PASSWORD))?;
        std::thread::sleep(Duration::from_millis(300));
        let before = procfs::proc_kib(pb.pid(), "VmRSS")?;
        let (clients, errs) = open_idle(&b_ep, n);
        std::thread::sleep(Duration::from_millis(500));
        let with = procfs::proc_kib(pb.pid(), "VmRSS")?;
        let ok = clients.len();
        for c in clients {
            let _ = c.quit();
        }
        for e in &errs {
            self.fail(format!("idle session: {e}"));
        }
        pb.check_alive()?;
        let per = with.saturating_sub(before) as f64 / ok.max(1) as f64;
        eprintln!("  idle: RSS {before} KiB -> {with} KiB with {ok} sessions");
        self.row(
            "concurrency",
            &format!("B RSS per idle session KiB ({ok} open)"),
            None,
            Some(per),
            None,
            "<= 64 KiB",
            Some(per <= 64.0 && errs.is_empty()),
        );
        Ok(())
    }

    fn swarm_check(
        &mut self,
        what: &str,
        reference: &[Download],
        got: &[Option<Download>],
        errs: &[String],
    ) {
        for e in errs.iter().take(5) {
            self.fail(format!("concurrency {what}: {e}"));
        }
        if errs.len() > 5 {
            self.fail(format!(
                "concurrency {what}: {} more failed sessions",
                errs.len() - 5
            ));
        }
        for (u, g) in got.iter().enumerate() {
            if let Some(g) = g {
                self.check(
                    &format!("concurrency {what} user{u}"),
                    "session",
                    &reference[u],
                    g,
                );
            }
        }
    }
}

/// `n` threads, user0..user{n-1}, released together; each downloads its whole mailbox.
fn swarm(ep: &Endpoint, n: usize) -> (Vec<Option<Download>>, Vec<String>) {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|u| {
            let (ep, barrier) = (ep.clone(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    pop3::download_all(&ep, &format!("user{u}"), PASSWORD)
                        .map_err(|e| format!("user{u}: {e}"))
                })
        })
        .collect();
    let (mut out, mut errs) = (Vec::new(), Vec::new());
    for h in handles {
        match h {
            Err(e) => {
                errs.push(format!("spawn: {e}"));
                out.push(None);
            }
            Ok(h) => match h.join() {
                Ok(Ok(d)) => out.push(Some(d)),
                Ok(Err(e)) => {
                    errs.push(e);
                    out.push(None);
                }
                Err(_) => {
                    errs.push("client thread panicked".into());
                    out.push(None);
                }
            },
        }
    }
    (out, errs)
}

/// Opens `n` sessions (user0..), each logged in and past STAT, using 16 threads.
fn open_idle(ep: &Endpoint, n: usize) -> (Vec<pop3::Client>, Vec<String>) {
    let threads = 16.min(n.max(1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ep = ep.clone();
            std::thread::spawn(move || {
                let (mut ok, mut errs) = (Vec::new(), Vec::new());
                for u in (t..n).step_by(threads) {
                    let r = pop3::Client::connect(&ep).and_then(|mut c| {
                        c.login(&format!("user{u}"), PASSWORD)?;
                        c.stat()?;
                        Ok(c)
                    });
                    match r {
                        Ok(c) => ok.push(c),
                        Err(e) => errs.push(format!("user{u}: {e}")),
                    }
                }
                (ok, errs)
            })
        })
        .collect();
    let (mut ok, mut errs) = (Vec::new(), Vec::new());
    for h in handles {
        match h.join() {
            Ok((o, e)) => {
                ok.extend(o);
                errs.extend(e);
            }
            Err(_) => errs.push("client thread panicked".into()),
        }
    }
    (ok, errs)
}

fn tls_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if !v.is_finite() => "n/a".into(),
        Some(v) if v.abs() >= 100.0 || v == v.trunc() => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn print_table(rows: &[Row]) {
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.to_string(),
                r.metric.clone(),
                fmt_num(r.d),
                fmt_num(r.b),
                fmt_num(r.ratio),
                r.target.clone(),
                match r.pass {
                    None => "".into(),
                    Some(true) => "ok".into(),
                    Some(false) => "MISS".into(),
                },
            ]
        })
        .collect();
    let head = ["scenario", "metric", "D", "B", "B/D", "target", ""];
    let mut w = head.map(str::len);
    for c in &cells {
        for i in 0..7 {
            w[i] = w[i].max(c[i].len());
        }
    }
    let line = |c: &[String; 7]| {
        let mut s = String::from("|");
        for i in 0..7 {
            if (2..5).contains(&i) {
                s += &format!(" {:>w$} |", c[i], w = w[i]);
            } else {
                s += &format!(" {:<w$} |", c[i], w = w[i]);
            }
        }
        s
    };
    println!("{}", line(&head.map(String::from)));
    let mut sep = String::from("|");
    for (i, wi) in w.iter().enumerate() {
        sep += &if (2..5).contains(&i) {
            format!("{}:|", "-".repeat(wi + 1))
        } else {
            format!("{}|", "-".repeat(wi + 2))
        };
    }
    println!("{sep}");
    for c in &cells {
        println!("{}", line(c));
    }
}

/// One scenario's entry point.
type Step = fn(&mut Ctx) -> Result<()>;

fn run(cli: &Cli) -> Result<bool> {
    let bin = match &cli.popbridge {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("popbridge"),
    };
    if !bin.is_file() {
        return Err(format!(
            "no popbridge executable at {} (build it: cargo build --release --workspace, or pass --popbridge)",
            bin.display()
        )
        .into());
    }
    let sizes = if cli.smoke { &SMOKE } else { &FULL };
    let runs = cli.runs.unwrap_or(if cli.smoke { 1 } else { 5 }).max(1);
    let root = cleanup::make_root()?;
    let t0 = Instant::now();
    let dc = servers::start_dovecot(cli.sandbox_script.clone(), root.join("dc"))?;
    let tls = tls_config(&dc.ca_pem_path())?;
    let mut ctx = Ctx {
        dc,
        bin,
        root,
        sizes,
        runs,
        pool: Pool::new(42),
        rows: Vec::new(),
        failures: Vec::new(),
        pb_seq: 0,
        pb_extra: cli.popbridge_config.clone(),
        tls,
        seeded_tput: false,
        feel: cli.feel.clone(),
        smoke: cli.smoke,
    };
    let all = cli.scenario == Scenario::All;
    let mut order: Vec<(&str, Step)> = Vec::new();
    if all || cli.scenario == Scenario::Throughput {
        order.push(("throughput", |c| c.throughput(false)));
    }
    if all || cli.scenario == Scenario::Tls {
        order.push(("tls", |c| c.throughput(true)));
    }
    if all || cli.scenario == Scenario::Huge {
        order.push(("huge", Ctx::huge));
    }
    if all || cli.scenario == Scenario::Big {
        order.push(("big", Ctx::big));
    }
    if all || cli.scenario == Scenario::Concurrency {
        order.push(("concurrency", Ctx::concurrency));
    }
    if all || cli.scenario == Scenario::Previews {
        order.push(("previews", Ctx::previews));
    }
    if all || cli.scenario == Scenario::Polls {
        order.push(("polls", Ctx::polls));
    }
    if all || cli.scenario == Scenario::Wan {
        order.push(("wan", Ctx::wan));
    }
    // Every user before any login: Dovecot's passwd-file is re-read at most once a second,
    // so a user added just after a login could stay unknown for that second.
    let mut users: Vec<String> = Vec::new();
    for (name, _) in &order {
        match *name {
            "throughput" | "tls" => users.push("tput".into()),
            "huge" => users.push("huge".into()),
            "big" => users.push("big".into()),
            "wan" | "polls" | "previews" => users.extend(feel::users(name, &cli.feel, cli.smoke)),
            _ => users.extend((0..sizes.conc_users).map(|u| format!("user{u}"))),
        }
    }
    users.sort();
    users.dedup();
    for u in &users {
        ctx.dc.try_add_user(u, PASSWORD)?;
    }
    std::thread::sleep(Duration::from_millis(1100));
    for (name, f) in order {
        let t = Instant::now();
        if let Err(e) = f(&mut ctx) {
            let msg = format!("scenario {name} aborted: {e}");
            ctx.fail(msg);
            eprintln!("dovecot.log tail:\n{}", ctx.dc.log_tail(10));
        }
        eprintln!(
            "popbridge-bench: {name} done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "\npopbridge-bench: D = Dovecot {} POP3, B = popbridge in front of its IMAP; {} run(s){}; {:.0} s",
        dovecot_version(),
        runs,
        if cli.smoke { ", smoke sizes" } else { "" },
        t0.elapsed().as_secs_f64()
    );
    print_table(&ctx.rows);
    if ctx.failures.is_empty() {
        println!(
            "\ncorrectness: every session succeeded; popbridge delivered exactly what Dovecot did"
        );
        Ok(true)
    } else {
        println!("\nFAILURES ({}):", ctx.failures.len());
        for f in &ctx.failures {
            println!("  {f}");
        }
        Ok(false)
    }
}

fn dovecot_version() -> String {
    std::process::Command::new("dovecot")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("wave") {
        return wave::main(std::env::args().skip(1).collect());
    }
    let cli = Cli::parse();
    cleanup::install_signal_handler(cli.keep);
    let r = run(&cli);
    cleanup::cleanup_all(cli.keep);
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("popbridge-bench: {e}");
            ExitCode::from(2)
        }
    }
}
