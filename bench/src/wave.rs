//! `popbridge-bench wave`: a migration wave (`popbridge migrate uidls --users-file`) between two
//! private Dovecots (the legacy POP3 server and the new IMAP store), at several `--jobs`, with
//! users per second and the CPU time each Dovecot and popbridge used.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/popbridge-bench wave                      # 100 users x 100 messages, by size
//! target/release/popbridge-bench wave --match header --jobs 1,4,8
//! ```
//!
//! Every run starts from nothing stored: the local state is fresh and each user's METADATA
//! (Dovecot's `dovecot-attributes` file) is removed, so every run matches and writes every map.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use popbridge_testkit::Dovecot;

use crate::cleanup;
use crate::procfs::{busy_cpu_ms, process_cpu_ms};
use crate::servers::start_dovecot;
use crate::Result;

#[derive(Parser)]
#[command(about = "A migration wave between two private Dovecots, by --jobs")]
struct WaveCli {
    /// Users in the wave.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Messages per user.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// The --jobs values to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    jobs: Vec<u16>,
    /// How the copies match: same bytes (by size), or an added header on every copy (every
    /// message goes to the header pass).
    #[arg(long, value_enum, default_value_t = Match::Size)]
    r#match: Match,
    /// Runs per --jobs value (the best is reported with the others).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The popbridge executable (default: `popbridge` next to this executable).
    #[arg(long, value_name = "PATH")]
    popbridge: Option<PathBuf>,
    /// Keep the temp directory.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Match {
    Size,
    Header,
}

const PASSWORD: &str = "wavepw";

/// `popbridge-bench wave ...` (the arguments after the program name).
pub fn main(args: Vec<String>) -> ExitCode {
    let cli = WaveCli::parse_from(args);
    cleanup::install_signal_handler(cli.keep);
    let r = run(&cli);
    cleanup::cleanup_all(cli.keep);
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("popbridge-bench wave: {e}");
            ExitCode::from(2)
        }
    }
}

/// A message of about `size` octets whose size differs from its neighbours'.
fn message(user: usize, n: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender{n}@example.org\r\nTo: user{user}@example.net\r\nSubject: wave message {n}\r\nMessage-ID: <w{user}.{n}@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    );
    for i in 0..(10 + (n * 7 + user) % 40) {
        m.push_str(&format!(
            "line {i} of message {n} for user {user}, some text to fill it up\r\n"
        ));
    }
    m.into_bytes()
}

/// CPU time in ms of `master` and all its descendants, with the children they reaped.
fn tree_cpu_ms(master: u32) -> f64 {
    let mut parents = std::collections::HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
                let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ppid: u32 = f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
                let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                // utime stime cutime cstime, in ticks of 10 ms.
                let cpu = (t(11) + t(12) + t(13) + t(14)) as f64 * 10.0;
                parents.insert(pid, (ppid, cpu));
            }
        }
    }
    let in_tree = |mut pid: u32| {
        for _ in 0..16 {
            if pid == master {
                return true;
            }
            match parents.get(&pid) {
                Some((pp, _)) if *pp != 0 => pid = *pp,
                _ => return false,
            }
        }
        false
    };
    parents
        .iter()
        .filter(|(pid, _)| in_tree(**pid))
        .map(|(_, (_, cpu))| cpu)
        .sum()
}

fn master_pid(dc: &Dovecot) -> Result<u32> {
    let text = fs::read_to_string(dc.dir().join("run/master.pid"))?;
    Ok(text.trim().parse()?)
}

struct Measured {
    jobs: u16,
    secs: f64,
    legacy_cpu: f64,
    new_cpu: f64,
    popbridge_cpu: f64,
    machine_cpu: f64,
}

fn run(cli: &WaveCli) -> Result<bool> {
    let root = cleanup::make_root()?;
    let bin = match &cli.popbridge {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("no directory of the bench executable")?
            .join("popbridge"),
    };
    eprintln!(
        "wave: {} users x {} messages, matched by {}; starting two Dovecots",
        cli.users,
        cli.messages,
        if cli.r#match == Match::Size {
            "size"
        } else {
            "header"
        }
    );
    let legacy = start_dovecot(None, root.join("legacy"))?;
    let new = start_dovecot(None, root.join("new"))?;
    let users: Vec<String> = (0..cli.users).map(|i| format!("w{i:05}")).collect();
    for u in &users {
        legacy.try_add_user(u, PASSWORD)?;
        new.try_add_user(u, PASSWORD)?;
    }
    for (i, u) in users.iter().enumerate() {
        let msgs: Vec<Vec<u8>> = (1..=cli.messages).map(|n| message(i, n)).collect();
        legacy.try_seed(u, &msgs)?;
        let copies = msgs.iter().map(|m| match cli.r#match {
            Match::Size => m.clone(),
            Match::Header => [&b"Return-Path: <bounce@example.org>\r\n"[..], m].concat(),
        });
        new.try_seed(u, copies)?;
    }
    // Dovecot re-reads its passwd-file at most once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let users_file = root.join("wave.txt");
    let lines: Vec<String> = users.iter().map(|u| format!("{u}\t{PASSWORD}")).collect();
    fs::write(&users_file, lines.join("\n") + "\n")?;
    let (lm, nm) = (master_pid(&legacy)?, master_pid(&new)?);
    let mut results = Vec::new();
    let mut ok = true;
    for &jobs in &cli.jobs {
        for run in 0..cli.runs {
            let state = root.join(format!("state-{jobs}-{run}"));
            let config = root.join(format!("wave-{jobs}-{run}.toml"));
            fs::write(
                &config,
                format!(
                    "[pop3]\nlisten = \"127.0.0.1:1\"\nplaintext_auth = \"always\"\n\
                     [imap]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
                     [state]\ndir = \"{}\"\n\
                     [backends.legacy]\nkind = \"pop3\"\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
                    new.imap_port(),
                    state.display(),
                    legacy.pop3_port()
                ),
            )?;
            for u in &users {
                let _ = fs::remove_file(new.maildir(u).join("dovecot-attributes"));
            }
            let (l0, n0, m0) = (tree_cpu_ms(lm), tree_cpu_ms(nm), busy_cpu_ms());
            let t = Instant::now();
            let mut child = Command::new(&bin)
                .args(["migrate", "uidls", "--config"])
                .arg(&config)
                .args(["--from", "legacy", "--to", "imap", "--users-file"])
                .arg(&users_file)
                .args(["--jobs", &jobs.to_string(), "--journal"])
                .arg(root.join(format!("journal-{jobs}-{run}")))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let pid = child.id();
            let mut pb_cpu = 0.0;
            let stdout = child.stdout.take();
            let reader = std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut o) = stdout {
                    let _ = std::io::Read::read_to_string(&mut o, &mut s);
                }
                s
            });
            let status = loop {
                if let Some(c) = process_cpu_ms(pid) {
                    pb_cpu = c;
                }
                if let Some(s) = child.try_wait()? {
                    break s;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let secs = t.elapsed().as_secs_f64();
            let out = reader.join().unwrap_or_default();
            let (l1, n1, m1) = (tree_cpu_ms(lm), tree_cpu_ms(nm), busy_cpu_ms());
            let clean = out.contains(&format!("{} users: {} clean", cli.users, cli.users));
            if !status.success() || !clean {
                ok = false;
                eprintln!("wave --jobs {jobs}: not every user clean:\n{out}");
            }
            let m = Measured {
                jobs,
                secs,
                legacy_cpu: (l1 - l0) / 1000.0,
                new_cpu: (n1 - n0) / 1000.0,
                popbridge_cpu: pb_cpu / 1000.0,
                machine_cpu: m0.zip(m1).map_or(0.0, |(a, b)| (b - a) / 1000.0),
            };
            eprintln!(
                "  --jobs {jobs} run {}: {:.2} s, {:.1} users/s",
                run + 1,
                secs,
                cli.users as f64 / secs
            );
            results.push(m);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "wave: {} users x {} messages, matched by {}, {} cores",
        cli.users,
        cli.messages,
        if cli.r#match == Match::Size {
            "size"
        } else {
            "header"
        },
        cores
    );
    println!(
        "{:>5} {:>8} {:>9} {:>14} {:>14} {:>14} {:>14}",
        "jobs", "secs", "users/s", "legacy CPU %", "new CPU %", "popbridge %", "machine %"
    );
    let pct = |cpu: f64, secs: f64| 100.0 * cpu / secs;
    for m in &results {
        println!(
            "{:>5} {:>8.2} {:>9.1} {:>14.0} {:>14.0} {:>14.0} {:>14.0}",
            m.jobs,
            m.secs,
            cli.users as f64 / m.secs,
            pct(m.legacy_cpu, m.secs),
            pct(m.new_cpu, m.secs),
            pct(m.popbridge_cpu, m.secs),
            pct(m.machine_cpu, m.secs),
        );
    }
    println!("(CPU %: of one core; the machine has {cores} cores, 100% each)");
    Ok(ok)
}
