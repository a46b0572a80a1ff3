//! The `popbridge` command: thin glue between the command line and the library.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use popbridge::config::Config;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// A POP3 server whose maildrop is a folder on an upstream IMAP server.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log level or filter (e.g. `debug`, `popbridge=trace`); overrides RUST_LOG.
    /// Without either, `info`.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    /// Log line format: `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM.
    Serve {
        /// Configuration file (TOML); every key is documented in config/popbridge.toml.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit: 0 if valid, 2 with the file, key and problem if not.
    CheckConfig {
        /// Configuration file (TOML) to check.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Move users from a legacy POP3 server without any client noticing (UIDL maps, checks).
    #[command(subcommand)]
    Migrate(MigrateCommand),
}

/// Exit status of `migrate`: 0 clean, 1 a user needs attention (changed UIDLs, differences,
/// failures), 2 bad arguments or configuration.
#[derive(Subcommand)]
enum MigrateCommand {
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
struct LoginArgs {
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
struct UsersArgs {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("popbridge: invalid log filter: {e}");
            return ExitCode::from(2);
        }
    };
    // imap-next traces every IMAP fragment it reads and writes: LOGIN passwords and message
    // bodies. No filter a user writes may turn that on, so its events are dropped here.
    let no_wire_data = filter_fn(|meta| !meta.target().starts_with("imap_next"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // Colour codes only for a person at a terminal, never in files or journald.
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(no_wire_data)
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .finish()
            .with(no_wire_data)
            .init(),
    }

    match cli.command {
        Command::Migrate(cmd) => migrate(cmd),
        Command::CheckConfig { config } => match Config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                // The routing file too: a bad line would refuse the reload that brings it.
                popbridge::routing::Router::from_config(&c)
                    .map(drop)
                    .map_err(|e| format!("{}: routing: {e}", config.display()))
            }) {
            Ok(()) => {
                println!("{}: configuration is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("popbridge: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("popbridge: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("popbridge: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(popbridge::server::serve(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("popbridge: {e}");
                    ExitCode::FAILURE
                }
            }
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

fn migrate(cmd: MigrateCommand) -> ExitCode {
    use popbridge::migrate::run;
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
    let users_from_file = |path: &PathBuf| -> Result<Vec<run::UserSpec>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        run::parse_users_file(path, &text).map_err(|e| e.to_string())
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
                (Some(u), _) => vec![run::UserSpec {
                    user: u.clone(),
                    password: password_from_env(&users.password_env)?,
                }],
                (None, Some(f)) => users_from_file(f)?,
                (None, None) => return Err("give --user or --users-file".into()),
            };
            let opts = run::UidlsOptions {
                from,
                to,
                users: specs,
                accept_changed_uidls,
                from_login: logins.from_login,
                to_login: logins.to_login,
            };
            runtime
                .block_on(run::uidls(&config, &opts))
                .map_err(|e| e.to_string())
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
            let mut passwords = std::collections::HashMap::new();
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
            runtime
                .block_on(run::import(
                    &config,
                    &to,
                    &file,
                    &passwords,
                    accept_changed_uidls,
                    to_login,
                ))
                .map_err(|e| e.to_string())
        })(),
        MigrateCommand::Verify {
            from,
            to,
            user,
            password_env,
            logins,
            ..
        } => (|| {
            let spec = run::UserSpec {
                user,
                password: password_from_env(&password_env)?,
            };
            let logins = run::Logins::new(&config, logins.from_login, logins.to_login)
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(run::verify(&config, &from, &to, &spec, &logins))
                .map_err(|e| e.to_string())
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
