//! A model-based concurrency test (issue #13 item 3), against Dovecot and Cyrus: one to three
//! POP3 clients (Python's poplib) of one user run random sessions through popbridge (STAT, LIST,
//! UIDL, RETR, TOP, DELE, RSET, NOOP, QUIT, dropped connections, also inside a body) while an
//! IMAP client (imaplib) appends, sets and clears flags (the hide keyword too), stores
//! `\Deleted` and expunges, MOVEs messages out and COPYs them in, with random pauses of 0 to
//! 1.5 s on both sides and targeted changes (the message about to be read, the one prefetched,
//! the one being streamed, a marked one before QUIT), so that changes land at every point of a
//! session. Rounds run in the three deletion modes (hide twice as often as expunge and move).
//!
//! The model, the random choices and the checks live in `tests/clients/model_check.py` (its
//! docstring says what is allowed and asserted); this file starts the servers and popbridge,
//! runs it, reports the figures and fails on any violation, printing the seed of every failing
//! round with all its steps.
//!
//! `SEED=n` replays a run (round i runs with seed n+i; `SEED=<round seed> MODEL_ROUNDS=1`
//! replays one round), `MODEL_ROUNDS=n` sets the rounds per server (default: what fits the CI
//! budget: 10 rounds against Dovecot, about 50 s, and 5 against Cyrus, about 30 s, side by side;
//! with `imap.keep_alive_secs`, 4 and 2 rounds).

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const MODES: [&str; 3] = ["hide", "expunge", "move"];
const PASSWORD: &str = "model-pw";

/// What `model_check.py` prints.
#[derive(Debug, serde::Deserialize)]
struct Figures {
    seed: u64,
    rounds: u64,
    modes: std::collections::BTreeMap<String, u64>,
    sessions: u64,
    pop3_steps: u64,
    in_use: u64,
    changes: std::collections::BTreeMap<String, u64>,
    errors: std::collections::BTreeMap<String, u64>,
    ends: std::collections::BTreeMap<String, u64>,
    /// Changes a POP3 client asked for at a chosen point of its session.
    pokes: std::collections::BTreeMap<String, u64>,
    violations: u64,
    failed: Vec<FailedRound>,
    secs: f64,
}

#[derive(Debug, serde::Deserialize)]
struct FailedRound {
    seed: u64,
    mode: String,
    violations: Vec<String>,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

fn join<V: std::fmt::Display>(m: &std::collections::BTreeMap<String, V>) -> String {
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn random_changes_keep_the_pop3_promise<S: MailServer>(server: S) {
    let rounds = if server.name() == "cyrus" { 5 } else { 10 };
    run_model(server, 0, rounds);
}

/// The same with `imap.keep_alive_secs`: each session after the first of a user runs over the
/// upstream connection the user's previous session left (changes made meanwhile by the IMAP
/// client included), so the promise must hold across kept connections too. Fewer rounds.
fn random_changes_over_kept_upstream_connections<S: MailServer>(server: S) {
    let rounds = if server.name() == "cyrus" { 2 } else { 4 };
    run_model(server, 120, rounds);
}

fn run_model<S: MailServer>(server: S, keep_alive_secs: u64, default_rounds: u64) {
    let name = server.name();
    let seed = env_u64("SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000_007
    });
    let rounds = env_u64("MODEL_ROUNDS").unwrap_or(default_rounds);
    eprintln!("model test ({name}, keep_alive_secs {keep_alive_secs}): seed {seed}, {rounds} rounds (replay: SEED={seed})");

    let mut pop3_args = Vec::new();
    let mut bridges = Vec::new();
    for mode in MODES {
        let user = format!("model{mode}");
        server.add_user(&user, PASSWORD);
        let pb = Popbridge::start(
            &server,
            &format!(
                "[deletion]\nmode = \"{mode}\"\nmove_to = \"Trash\"\n\
                 [limits]\nmax_connections_per_ip = 100\n\
                 [imap]\nkeep_alive_secs = {keep_alive_secs}"
            ),
        );
        pop3_args.push(("--pop3".to_string(), format!("{mode}={}", pb.pop3_port())));
        pop3_args.push(("--user".to_string(), format!("{mode}={user}")));
        bridges.push(pb);
    }

    let script = repo_root().join("tests/clients/model_check.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["--imap", &server.imap_port().to_string()])
        .args(["--password", PASSWORD])
        .args(["--seed", &seed.to_string()])
        .args(["--rounds", &rounds.to_string()]);
    for (flag, value) in &pop3_args {
        cmd.args([flag, value]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    // Every socket operation of the script times out after 30 s; this bounds the whole run.
    let deadline = Instant::now() + Duration::from_secs(120 + 60 * rounds);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for model_check.py") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
            panic!("model_check.py ({name}, seed {seed}) still running after its deadline:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out_reader.join().unwrap();
    let log = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    // cargo shows this only for a failing test (or with --nocapture).
    eprintln!("{log}");
    assert!(
        status.success(),
        "model_check.py ({name}, seed {seed}) failed ({status}):\n{log}"
    );
    let f: Figures = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "model_check.py printed unexpected JSON ({e}): {}",
            String::from_utf8_lossy(&stdout)
        )
    });
    let changes_total: u64 = f.changes.values().sum();
    report(&format!(
        "model test ({name}, keep_alive_secs {keep_alive_secs}): seed {}, {} rounds ({}) in {:.1} s, {} POP3 sessions ({}), \
         {} POP3 steps, {changes_total} changes injected ({}; aimed at a point of a session: {}), \
         -ERR answers: {}, IN-USE refusals {}, violations {}",
        f.seed,
        f.rounds,
        join(&f.modes),
        f.secs,
        f.sessions,
        join(&f.ends),
        f.pop3_steps,
        join(&f.changes),
        join(&f.pokes),
        join(&f.errors),
        f.in_use,
        f.violations,
    ));
    let mut panics = Vec::new();
    for (mode, pb) in MODES.iter().zip(bridges) {
        let plog = pb.stop();
        if plog.contains("panicked") {
            panics.push(format!("popbridge ({mode}) panicked:\n{plog}"));
        }
        if !f.failed.is_empty() {
            // What popbridge said went wrong (its whole debug log would drown the output).
            let bad: Vec<&str> = plog
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "--- popbridge ({mode}) warnings and errors: {} lines ---",
                bad.len()
            );
            for l in bad.iter().take(60) {
                eprintln!("{l}");
            }
        }
    }
    if !f.failed.is_empty() {
        let mut msg = format!(
            "{} of {} rounds against {name} broke the POP3 promise ({} violations); \
             replay a round with `SEED=<round seed> MODEL_ROUNDS=1 cargo test --test \
             mailbox_changes -- {name}` (every step of each failing round is printed above):\n",
            f.failed.len(),
            f.rounds,
            f.violations
        );
        for r in &f.failed {
            msg.push_str(&format!("  round seed {} ({}):\n", r.seed, r.mode));
            for v in r.violations.iter().take(8) {
                msg.push_str(&format!("    {v}\n"));
            }
            if r.violations.len() > 8 {
                msg.push_str(&format!("    ... {} more\n", r.violations.len() - 8));
            }
        }
        panic!("{msg}");
    }
    assert!(panics.is_empty(), "{}", panics.join("\n"));
    assert_eq!(f.rounds, rounds, "not every round ran");
    assert_eq!(f.violations, 0);
    // The run must have done something worth checking.
    assert!(
        f.sessions >= rounds && f.pop3_steps > 5 * rounds && changes_total > 5 * rounds,
        "the model test did too little: {f:?}"
    );
}

on_both_servers!(
    random_changes_keep_the_pop3_promise,
    random_changes_over_kept_upstream_connections,
);
