//! `popbridge migrate uidls | import | verify`: arguments, the library's jobs
//! ([`popbridge::migrate`]) run as waves, and their reports printed as they come (lines per
//! user and a summary on stdout, the progress of a wave on stderr, `--report-json` lines).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;
use popbridge::config::Config;
use popbridge::migrate::import::{ImportJob, ImportOptions};
use popbridge::migrate::journal::{self, Journal};
use popbridge::migrate::report::{LegacyWithoutCopy, NewWithoutLegacy, Policies, UserOutcome};
use popbridge::migrate::summary::{user_json, Described, Tally};
use popbridge::migrate::uidls::{UidlsJob, UidlsOptions};
use popbridge::migrate::users::{parse_users_file, Logins, UserSpec};
use popbridge::migrate::verify::VerifyJob;
use popbridge::migrate::wave::{Stop, WaveEvent, WaveJob, WaveRun, WaveSettings};

use super::print;
use super::progress::{clock, Progress};

/// Exit status of `migrate`: 0 clean, 1 a user needs attention (changed UIDLs, differences,
/// failures), 2 bad arguments or configuration.
#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Match each user's legacy POP3 messages to the new IMAP mailbox and store the legacy
    /// UIDLs (sled + IMAP METADATA), so clients keep their UIDLs after the switch.
    Uidls {
        /// Configuration file with the backends, [state] and [migration].
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The legacy backend (a `[backends.X]` with kind = "pop3").
        #[arg(long, value_name = "BACKEND")]
        from: String,
        /// The new store: `imap` ([imap]) or a `[backends.X]` with kind = "imap".
        #[arg(long, value_name = "BACKEND")]
        to: String,
        #[command(flatten)]
        users: UsersArgs,
        #[command(flatten)]
        logins: LoginArgs,
        /// Store the map even when some legacy messages have no match (their clients will
        /// download them again) or an existing mapping would change (the old one is kept).
        #[arg(long)]
        accept_changed_uidls: bool,
        /// A legacy message with no copy in the new store: `refuse` stores nothing for the
        /// user (they need attention); `drop` stores the map without it.
        #[arg(long, value_enum, value_name = "POLICY", default_value_t = LegacyPolicy::Refuse)]
        legacy_without_copy: LegacyPolicy,
        /// A new-store message with no legacy message: `refuse` stores nothing for the user;
        /// `new` stores the map and serves it as new mail (clients download it once).
        #[arg(long, value_enum, value_name = "POLICY", default_value_t = NewPolicy::Refuse)]
        new_without_legacy: NewPolicy,
        /// Skip the size pass (the legacy server's POP3 sizes are known to be wrong): every
        /// message is matched by its header.
        #[arg(long)]
        no_size_pass: bool,
        /// Pair messages by the `X-UIDL:` header of the new store's copies first (mbox-era
        /// servers wrote the POP3 UIDL into the message); implies the header pass for all.
        #[arg(long)]
        x_uidl: bool,
        #[command(flatten)]
        wave: WaveArgs,
    },
    /// Import legacy UIDLs from a file of `user uid legacy-uidl` lines (the legacy server is
    /// gone); the UIDVALIDITY is the mailbox's at import time.
    Import {
        /// Configuration file with the backends, [state] and [migration].
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The new store: `imap` or an IMAP backend.
        #[arg(long, value_name = "BACKEND")]
        to: String,
        /// The map file; every line is checked before anything is stored.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Environment variable holding the password of the file's users (without a master
        /// user on the backend).
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
        /// `user<TAB>password` lines giving each user's password.
        #[arg(long, value_name = "FILE")]
        users_file: Option<PathBuf>,
        /// Store even when a line contradicts an existing mapping (the old one is kept).
        #[arg(long)]
        accept_changed_uidls: bool,
        /// The file's users are client logins; their login on the new store is this template
        /// expanded (%u, %n, %d, %%). Default: the rewrite of the user's current route when it
        /// points at --to, else the client login.
        #[arg(long, value_name = "TEMPLATE")]
        to_login: Option<String>,
        #[command(flatten)]
        wave: WaveArgs,
    },
    /// Compare what the legacy server shows a user (or each user of a wave) with what
    /// popbridge would show (count, UIDLs, sizes, message bytes); exit 0 only when there is no
    /// difference.
    Verify {
        /// Configuration file with the backends, [state] and [migration].
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The legacy backend (kind = "pop3").
        #[arg(long, value_name = "BACKEND")]
        from: String,
        /// The new store: `imap` or an IMAP backend.
        #[arg(long, value_name = "BACKEND")]
        to: String,
        #[command(flatten)]
        users: UsersArgs,
        #[command(flatten)]
        logins: LoginArgs,
        #[command(flatten)]
        wave: WaveArgs,
    },
}

/// How a client login (`--user`, a users-file line) becomes each backend's login.
#[derive(clap::Args)]
pub struct LoginArgs {
    /// The user's login on the legacy backend: this template expanded (%u the client login,
    /// %n its local part, %d its domain, %% a percent sign). Default: the rewrite of the
    /// user's current route when it points at --from, else the client login.
    #[arg(long, value_name = "TEMPLATE")]
    from_login: Option<String>,
    /// The user's login on the new store, as its route will rewrite it after the switch.
    /// Default: the rewrite of the user's current route when it points at --to, else the
    /// client login.
    #[arg(long, value_name = "TEMPLATE")]
    to_login: Option<String>,
}

#[derive(clap::Args)]
pub struct UsersArgs {
    /// One user.
    #[arg(
        long,
        value_name = "USER",
        required_unless_present = "users_file",
        conflicts_with = "users_file"
    )]
    user: Option<String>,
    /// A wave: one user per line, optionally `<TAB>password` (mode 600, please).
    #[arg(long, value_name = "FILE")]
    users_file: Option<PathBuf>,
    /// Environment variable holding `--user`'s password (needed on each side without a
    /// master user).
    #[arg(long, value_name = "VAR", requires = "user")]
    password_env: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LegacyPolicy {
    Refuse,
    Drop,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NewPolicy {
    Refuse,
    New,
}

/// How a wave runs: parallel users, connections per backend, backoff, journal, JSON report.
#[derive(clap::Args)]
pub struct WaveArgs {
    /// Users worked on at once.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=512))]
    jobs: u16,
    /// Connections open at once to each backend (default: --jobs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    connections_per_backend: Option<u16>,
    /// Tries per user when a backend throttles (connection refused or reset, NO [THROTTLED],
    /// [LIMIT], [UNAVAILABLE], -ERR [SYS/TEMP], [IN-USE], [LOGIN-DELAY]); between them the
    /// whole wave pauses, 0.25 s doubling up to --max-backoff.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    attempts: u32,
    /// The longest pause after throttling, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    max_backoff: u64,
    /// The wave's journal: each user's outcome, so that a re-run skips the users done
    /// (default with a users or import file: next to it, FILE.<job>.journal).
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
    /// Work on every user again, also those the journal records as done.
    #[arg(long)]
    redo: bool,
    /// Write one JSON object per line per user (job, login, outcome, attempts, counts,
    /// reasons, warnings, error).
    #[arg(long, value_name = "FILE")]
    report_json: Option<PathBuf>,
}

impl WaveArgs {
    fn settings(&self) -> WaveSettings {
        WaveSettings {
            jobs: usize::from(self.jobs),
            connections_per_backend: usize::from(self.connections_per_backend.unwrap_or(self.jobs)),
            backoff_max: Duration::from_secs(self.max_backoff),
            attempts: self.attempts,
            ..WaveSettings::default()
        }
    }
}

fn password_from_env(var: &Option<String>) -> Result<Option<String>, String> {
    match var {
        None => Ok(None),
        Some(v) => std::env::var(v)
            .map(Some)
            .map_err(|_| format!("environment variable {v} is not set")),
    }
}

/// Exit status when a wave was stopped by SIGINT before every user was done.
const INTERRUPTED: u8 = 130;

/// Runs a `migrate` subcommand. Exit status: 0 clean, 1 a user needs attention (changed
/// UIDLs, differences, failures), 2 bad arguments or configuration, 130 stopped by SIGINT.
pub fn run(cmd: MigrateCommand) -> ExitCode {
    let config_path = match &cmd {
        MigrateCommand::Uidls { config, .. }
        | MigrateCommand::Import { config, .. }
        | MigrateCommand::Verify { config, .. } => config.clone(),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("popbridge: {e}");
            return ExitCode::from(2);
        }
    };
    let jobs = match &cmd {
        MigrateCommand::Uidls { wave, .. }
        | MigrateCommand::Import { wave, .. }
        | MigrateCommand::Verify { wave, .. } => wave.jobs,
    };
    let mut builder = if jobs > 1 {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("popbridge: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome: Result<Ended, String> = match cmd {
        MigrateCommand::Uidls {
            from,
            to,
            users,
            accept_changed_uidls,
            logins,
            legacy_without_copy,
            new_without_legacy,
            no_size_pass,
            x_uidl,
            wave,
            ..
        } => (|| {
            let (specs, file) = users.specs()?;
            let policies = Policies {
                legacy_without_copy: match legacy_without_copy {
                    LegacyPolicy::Refuse => LegacyWithoutCopy::Refuse,
                    LegacyPolicy::Drop => LegacyWithoutCopy::Drop,
                },
                new_without_legacy: match new_without_legacy {
                    NewPolicy::Refuse => NewWithoutLegacy::Refuse,
                    NewPolicy::New => NewWithoutLegacy::New,
                },
            };
            if specs.len() > 1 {
                println!(
                    "policies: {policies}{}{}{}",
                    if accept_changed_uidls {
                        "; changed UIDLs accepted"
                    } else {
                        ""
                    },
                    if no_size_pass { "; no size pass" } else { "" },
                    if x_uidl { "; X-UIDL headers first" } else { "" },
                );
            }
            let opts = UidlsOptions {
                from,
                to,
                accept_changed_uidls,
                from_login: logins.from_login,
                to_login: logins.to_login,
                no_size_pass,
                x_uidl,
                policies,
            };
            let (job, warning) = UidlsJob::start(config, opts).map_err(|e| e.to_string())?;
            if let Some(w) = &warning {
                print::warning(w);
            }
            let ended = run_wave(
                &runtime,
                "uidls",
                job.clone(),
                specs,
                &wave,
                file.as_deref(),
                print::uidls_user,
            );
            job.flush();
            ended
        })(),
        MigrateCommand::Import {
            to,
            file,
            password_env,
            users_file,
            accept_changed_uidls,
            to_login,
            wave,
            ..
        } => (|| {
            let mut passwords = HashMap::new();
            if let Some(f) = &users_file {
                for spec in users_from_file(f)? {
                    if let Some(p) = spec.password {
                        passwords.insert(spec.user, p);
                    }
                }
            }
            if let Some(pw) = password_from_env(&password_env)? {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                for line in text.lines() {
                    if let Some(user) = line
                        .split_whitespace()
                        .next()
                        .filter(|u| !u.starts_with('#'))
                    {
                        passwords
                            .entry(user.to_owned())
                            .or_insert_with(|| pw.clone());
                    }
                }
            }
            let opts = ImportOptions {
                to,
                file: file.clone(),
                passwords,
                accept_changed_uidls,
                to_login,
            };
            let (job, items, warning) =
                ImportJob::start(config, opts).map_err(|e| e.to_string())?;
            if let Some(w) = &warning {
                print::warning(w);
            }
            let ended = run_wave(
                &runtime,
                "import",
                job.clone(),
                items,
                &wave,
                Some(&file),
                print::import_user,
            );
            job.flush();
            ended
        })(),
        MigrateCommand::Verify {
            from,
            to,
            users,
            logins,
            wave,
            ..
        } => (|| {
            let (specs, file) = users.specs()?;
            let logins = Logins::new(&config, logins.from_login, logins.to_login)
                .map_err(|e| e.to_string())?;
            // Inside the runtime: the upstream it sets up may start tasks.
            let job = runtime
                .block_on(async { VerifyJob::start(config, &from, &to, logins) })
                .map_err(|e| e.to_string())?;
            for spec in &specs {
                job.check_credentials(spec).map_err(|e| e.to_string())?;
            }
            run_wave(
                &runtime,
                "verify",
                job,
                specs,
                &wave,
                file.as_deref(),
                print::verify_user,
            )
        })(),
    };
    match outcome {
        Ok(Ended::Clean) => ExitCode::SUCCESS,
        Ok(Ended::Attention) => ExitCode::FAILURE,
        Ok(Ended::Interrupted) => ExitCode::from(INTERRUPTED),
        Err(e) => {
            eprintln!("popbridge migrate: {e}");
            ExitCode::from(2)
        }
    }
}

/// How a wave ended.
enum Ended {
    Clean,
    Attention,
    Interrupted,
}

impl UsersArgs {
    /// The users, and the users file they came from.
    fn specs(&self) -> Result<(Vec<UserSpec>, Option<PathBuf>), String> {
        match (&self.user, &self.users_file) {
            (Some(u), _)
                if u.is_empty() || u.contains(|c: char| c.is_whitespace() || c.is_control()) =>
            {
                Err(format!(
                    "--user {u:?}: a user name has no spaces or control characters"
                ))
            }
            (Some(u), _) => Ok((
                vec![UserSpec {
                    user: u.clone(),
                    password: password_from_env(&self.password_env)?,
                }],
                None,
            )),
            (None, Some(f)) => Ok((users_from_file(f)?, Some(f.clone()))),
            (None, None) => Err("give --user or --users-file".into()),
        }
    }
}

/// Runs `items` through `job` as a wave: the journal (skipping the users done), the progress
/// on stderr, each user printed by `print_user` (false: needs attention), the JSON lines, Ctrl-C
/// (the first stops starting users, the second abandons those in flight), and the summary.
fn run_wave<J: WaveJob>(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    job: Arc<J>,
    items: Vec<J::Item>,
    args: &WaveArgs,
    file: Option<&Path>,
    print_user: fn(&UserOutcome<J::Report>) -> bool,
) -> Result<Ended, String>
where
    J::Report: Described,
{
    let journal_path = args
        .journal
        .clone()
        .or_else(|| file.map(|f| journal::default_path(f, name)));
    let journal = match &journal_path {
        Some(p) => Some(Journal::open(p, name, args.redo).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut json = match &args.report_json {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("--report-json {}: {e}", p.display()))?,
        )),
        None => None,
    };
    let mut tally = Tally::default();
    let items: Vec<J::Item> = match &journal {
        Some(j) => {
            if j.unreadable > 0 {
                eprintln!(
                    "popbridge migrate: warning: journal {}: {} unreadable lines ignored",
                    j.path().display(),
                    j.unreadable
                );
            }
            let all = items.len();
            let left: Vec<J::Item> = items.into_iter().filter(|i| !j.done(J::login(i))).collect();
            tally.skipped = all - left.len();
            left
        }
        None => items,
    };
    if tally.skipped > 0 {
        eprintln!(
            "popbridge migrate: {} users already done according to {} (--redo to work on them again)",
            tally.skipped,
            journal_path.as_deref().unwrap_or(Path::new("")).display()
        );
    }
    let started = Instant::now();
    let mut progress = Progress::new(items.len());
    let mut all_ok = true;
    let mut json_error = None;
    runtime.block_on(async {
        let mut run = WaveRun::start(job, items, &args.settings(), journal);
        // One listener for the whole wave: no SIGINT is missed between two events.
        let mut sigint =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        let mut interrupts = 0;
        loop {
            let event = tokio::select! {
                e = run.next() => e,
                Some(()) = async {
                    match &mut sigint {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    interrupts += 1;
                    if interrupts == 1 {
                        run.stop(Stop::NoNewUsers);
                        eprintln!("\npopbridge migrate: interrupted: starting no new user, finishing those in flight (Ctrl-C again to abandon them)");
                    } else {
                        run.stop(Stop::Abandon);
                        eprintln!("\npopbridge migrate: abandoning the users in flight (a re-run redoes them)");
                    }
                    continue;
                }
            };
            let Some(event) = event else { break };
            match event {
                WaveEvent::User {
                    outcome,
                    class,
                    attempts,
                } => {
                    all_ok &= print_user(&outcome);
                    tally.add(&outcome, class, attempts);
                    if let Some(w) = &mut json {
                        let line = user_json(name, &outcome, class, attempts);
                        // Written through at once: a killed wave keeps the lines it printed.
                        if let Err(e) = writeln!(w, "{line}").and_then(|()| w.flush()) {
                            json_error.get_or_insert(e);
                        }
                    }
                    progress.step(&outcome.user);
                }
                WaveEvent::Abandoned { user } => {
                    tally.abandoned += 1;
                    println!("user {user}: abandoned (stopped; a re-run redoes it)");
                }
                WaveEvent::Journal(e) => {
                    eprintln!("popbridge migrate: {e}: stopping the wave");
                    all_ok = false;
                }
                WaveEvent::End {
                    not_started,
                    throttles,
                } => {
                    tally.not_started = not_started;
                    if throttles > 0 {
                        eprintln!(
                            "popbridge migrate: the backends throttled {throttles} times; the wave slowed down"
                        );
                    }
                    break;
                }
            }
        }
    });
    let interrupted = tally.abandoned + tally.not_started > 0;
    if interrupted {
        progress.interrupted();
    }
    if let Some(w) = &mut json {
        if let Err(e) = w.flush() {
            json_error.get_or_insert(e);
        }
    }
    print::summary(name, &tally, started.elapsed(), &clock(started.elapsed()));
    if let Some(e) = json_error {
        return Err(format!("--report-json: {e}"));
    }
    Ok(if interrupted {
        Ended::Interrupted
    } else if all_ok && tally.attention == 0 && tally.failed == 0 {
        Ended::Clean
    } else {
        Ended::Attention
    })
}

fn users_from_file(path: &Path) -> Result<Vec<UserSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_users_file(path, &text).map_err(|e| e.to_string())
}
