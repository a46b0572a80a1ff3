//! The `popbridge` command: thin glue between the command line and the library.
#![forbid(unsafe_code)]

mod cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use popbridge::config::Config;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// `popbridge --version`: the version and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("POPBRIDGE_COMMIT"),
    ")"
);

/// A POP3 server whose maildrop is a folder on an upstream IMAP server.
#[derive(Parser)]
#[command(version = VERSION, about, long_about = None)]
struct Cli {
    /// Log level or filter (e.g. `debug`, `popbridge=trace`); overrides RUST_LOG.
    /// Without either, `info`. Unless the filter names `rustls`, rustls logs only errors: its
    /// warnings are about clients (an IP address sent as TLS server name by mpop, fdm or
    /// neomutt connecting to an address), nothing an operator can act on.
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
    Migrate(cli::migrate::MigrateCommand),
    /// OAuth 2.0 grants for backends that take per-user tokens.
    #[command(subcommand)]
    Oauth(cli::oauth::OAuthCommand),
}

/// rustls warns about what clients do (`Illegal SNI extension: ignoring IP address presented as
/// hostname` for every mpop, fdm or neomutt session to an IP address): nothing for an operator
/// to act on. So it logs errors only, unless the filter asks for rustls by name.
fn quiet_rustls(filter: EnvFilter, given: Option<&str>) -> EnvFilter {
    let text = given
        .map(str::to_owned)
        .or_else(|| std::env::var(EnvFilter::DEFAULT_ENV).ok())
        .unwrap_or_default();
    if text.contains("rustls") {
        return filter;
    }
    match "rustls=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    };
    let filter = match filter {
        Ok(f) => quiet_rustls(f, cli.log_level.as_deref()),
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
        Command::Migrate(cmd) => cli::migrate::run(cmd),
        Command::Oauth(cmd) => cli::oauth::run(cmd),
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
