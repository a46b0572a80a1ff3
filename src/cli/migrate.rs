//! `popbridge migrate uidls | import | verify`: arguments, the library's jobs
//! ([`popbridge::migrate`]), and their reports printed as they come (one line per user on
//! stdout, the progress of a wave on stderr).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use popbridge::config::Config;
use popbridge::migrate::import::{ImportOptions, ImportWave};
use popbridge::migrate::uidls::{UidlsOptions, UidlsWave};
use popbridge::migrate::users::{parse_users_file, Logins, UserSpec};
use popbridge::migrate::verify::Verify;

use super::print;
use super::progress::Progress;

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
    },
    /// Compare what the legacy server shows a user with what popbridge would show (count,
    /// UIDLs, sizes, message bytes); exit 0 only when there is no difference.
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
        /// The user to compare.
        #[arg(long, value_name = "USER")]
        user: String,
        /// Environment variable holding the user's password (not needed on a side whose
        /// backend has a master_user).
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
        #[command(flatten)]
        logins: LoginArgs,
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

fn password_from_env(var: &Option<String>) -> Result<Option<String>, String> {
    match var {
        None => Ok(None),
        Some(v) => std::env::var(v)
            .map(Some)
            .map_err(|_| format!("environment variable {v} is not set")),
    }
}

/// Runs a `migrate` subcommand. Exit status: 0 clean, 1 a user needs attention (changed
/// UIDLs, differences, failures), 2 bad arguments or configuration.
pub fn run(cmd: MigrateCommand) -> ExitCode {
    let config_path = match &cmd {
        MigrateCommand::Uidls { config, .. }
        | MigrateCommand::Import { config, .. }
        | MigrateCommand::Verify { config, .. } => config.clone(),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("popbridge: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("popbridge: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome: Result<bool, String> = match cmd {
        MigrateCommand::Uidls {
            from,
            to,
            users,
            accept_changed_uidls,
            logins,
            ..
        } => (|| {
            let specs = match (&users.user, &users.users_file) {
                (Some(u), _)
                    if u.is_empty()
                        || u.contains(|c: char| c.is_whitespace() || c.is_control()) =>
                {
                    return Err(format!(
                        "--user {u:?}: a user name has no spaces or control characters"
                    ));
                }
                (Some(u), _) => vec![UserSpec {
                    user: u.clone(),
                    password: password_from_env(&users.password_env)?,
                }],
                (None, Some(f)) => users_from_file(f)?,
                (None, None) => return Err("give --user or --users-file".into()),
            };
            let opts = UidlsOptions {
                from,
                to,
                users: specs,
                accept_changed_uidls,
                from_login: logins.from_login,
                to_login: logins.to_login,
            };
            let mut wave = UidlsWave::start(&config, &opts).map_err(|e| e.to_string())?;
            if let Some(w) = wave.state_warning() {
                print::warning(w);
            }
            let mut progress = Progress::new(wave.users());
            let mut all_ok = true;
            while let Some(user) = runtime.block_on(wave.next_user()) {
                all_ok &= print::uidls_user(&user);
                progress.step(&user.user);
            }
            Ok(all_ok)
        })(),
        MigrateCommand::Import {
            to,
            file,
            password_env,
            users_file,
            accept_changed_uidls,
            to_login,
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
                file,
                passwords,
                accept_changed_uidls,
                to_login,
            };
            let mut wave = ImportWave::start(&config, &opts).map_err(|e| e.to_string())?;
            if let Some(w) = wave.state_warning() {
                print::warning(w);
            }
            let mut progress = Progress::new(wave.users());
            let mut all_ok = true;
            while let Some(user) = runtime.block_on(wave.next_user()) {
                all_ok &= print::import_user(&user);
                progress.step(&user.user);
            }
            Ok(all_ok)
        })(),
        MigrateCommand::Verify {
            from,
            to,
            user,
            password_env,
            logins,
            ..
        } => (|| {
            let spec = UserSpec {
                user,
                password: password_from_env(&password_env)?,
            };
            let logins = Logins::new(&config, logins.from_login, logins.to_login)
                .map_err(|e| e.to_string())?;
            let verify =
                Verify::new(&config, &from, &to, &spec, &logins).map_err(|e| e.to_string())?;
            print::verify_logins(verify.logins());
            let report = runtime
                .block_on(verify.run(|d| print::verify_size_diff(&spec.user, d)))
                .map_err(|e| e.to_string())?;
            Ok(print::verify_report(&report))
        })(),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("popbridge migrate: {e}");
            ExitCode::from(2)
        }
    }
}

fn users_from_file(path: &Path) -> Result<Vec<UserSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_users_file(path, &text).map_err(|e| e.to_string())
}
