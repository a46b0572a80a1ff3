//! `popbridge oauth authorize`: a user's delegated grant for a backend with
//! `oauth.tokens = "user"`, by the device authorization grant (RFC 8628). It prints where to
//! go and the code to enter, polls until the user approved, and seals the refresh token with
//! the user's POP3 password ([`popbridge::upstream::oauth::store`]).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use popbridge::config::{BackendRef, Config};
use popbridge::upstream::oauth::settings::TokenSource;
use popbridge::upstream::oauth::{DevicePoll, OAuthClient};

/// Exit status: 0 stored, 1 not authorized (denied, expired, failed), 2 bad arguments or
/// configuration.
#[derive(Subcommand)]
pub enum OAuthCommand {
    /// Authorize popbridge to read a user's mailbox (the device authorization grant) and
    /// store the refresh token, sealed with the user's POP3 password.
    Authorize {
        /// Configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The backend: `imap` ([imap]) or a `[backends.X]`, with `oauth.tokens = "user"`.
        #[arg(long, value_name = "BACKEND", default_value = "imap")]
        backend: String,
        /// The login as that backend sees it (after any routing rewrite).
        #[arg(long, value_name = "LOGIN")]
        user: String,
        /// Environment variable holding the password the user will give POP3 (else it is
        /// read from standard input).
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
    /// Print an argon2id hash of a password (from standard input or --password-env), for a
    /// line `user:HASH` of `oauth.password_file`.
    HashPassword {
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
    /// Forget a user's stored grant.
    Forget {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "BACKEND", default_value = "imap")]
        backend: String,
        #[arg(long, value_name = "LOGIN")]
        user: String,
    },
}

pub fn run(cmd: OAuthCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("popbridge oauth: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cmd {
        OAuthCommand::Authorize {
            config,
            backend,
            user,
            password_env,
        } => {
            let client = match client(&config, &backend) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("popbridge oauth: {e}");
                    return ExitCode::from(2);
                }
            };
            runtime.block_on(authorize(&client, &user, password_env.as_deref()))
        }
        OAuthCommand::HashPassword { password_env } => {
            match password(password_env.as_deref())
                .and_then(|p| popbridge::password_file::hash_password(&p))
            {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("popbridge oauth: {e}");
                    ExitCode::from(2)
                }
            }
        }
        OAuthCommand::Forget {
            config,
            backend,
            user,
        } => match client(&config, &backend).and_then(|c| {
            let store = c.store().ok_or("no token_store")?;
            store.remove(&user).map_err(|e| e.to_string())
        }) {
            Ok(()) => {
                println!("user {user}: grant forgotten");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("popbridge oauth: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// The OAuth client of `backend`, which must take users' own grants.
fn client(config: &Path, backend: &str) -> Result<OAuthClient, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let imap = match config.backend(backend) {
        Some(BackendRef::Imap(i)) => i,
        Some(BackendRef::Pop3(_)) => return Err(format!("backend {backend:?} is a POP3 backend")),
        None => return Err(format!("no backend named {backend:?}")),
    };
    let oauth = imap
        .oauth
        .as_ref()
        .filter(|o| o.tokens == TokenSource::User)
        .ok_or_else(|| format!("backend {backend:?} has no oauth with tokens = \"user\""))?;
    OAuthClient::new(oauth).map_err(|e| e.to_string())
}

async fn authorize(client: &OAuthClient, user: &str, password_env: Option<&str>) -> ExitCode {
    // Everything local first, so nobody approves a grant that then cannot be stored.
    let Some(store) = client.store() else {
        eprintln!("popbridge oauth: no token_store configured");
        return ExitCode::from(2);
    };
    let password = match password(password_env) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("popbridge oauth: {e}");
            return ExitCode::from(2);
        }
    };
    let device = match client.device_start().await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("popbridge oauth: cannot start the authorization: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "To let popbridge read {user}'s mail, open {} and enter the code {}",
        device.verification_uri, device.user_code
    );
    if let Some(complete) = &device.verification_uri_complete {
        println!("(or open {complete})");
    }
    println!(
        "Waiting for the approval ({} s at most)...",
        device.expires_in
    );
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_secs(device.expires_in);
    let mut interval = Duration::from_secs(device.interval.unwrap_or(5).max(1));
    let answer = loop {
        if Instant::now() >= deadline {
            eprintln!("popbridge oauth: the code expired before it was approved");
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(interval).await;
        match client.device_poll(&device.device_code).await {
            Ok(DevicePoll::Done(t)) => break t,
            Ok(DevicePoll::Pending) => {}
            Ok(DevicePoll::SlowDown) => interval += Duration::from_secs(5),
            Err(e) => {
                eprintln!("popbridge oauth: not authorized: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let Some(refresh) = answer.refresh_token.as_deref() else {
        eprintln!(
            "popbridge oauth: the provider granted no refresh token (is offline access in the scope?)"
        );
        return ExitCode::FAILURE;
    };
    match store.seal(user, &password, refresh) {
        Ok(()) => {
            println!("user {user}: authorized; the grant is stored, sealed with the user's POP3 password");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("popbridge oauth: cannot store the grant: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The user's POP3 password: from the environment variable, or a line of standard input.
fn password(env: Option<&str>) -> Result<String, String> {
    if let Some(var) = env {
        return std::env::var(var).map_err(|_| format!("environment variable {var} is not set"));
    }
    let terminal = std::io::stdin().is_terminal();
    let mut line = String::new();
    {
        // Typed at a terminal, the password is not echoed (restored on every path out). Echo
        // goes off before the prompt: turning it off discards what was typed ahead.
        let _quiet = terminal.then(EchoOff::new).flatten();
        if terminal {
            eprint!("The password the user will give POP3 (not shown): ");
        }
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password: {e}"))?;
    }
    if terminal {
        eprintln!();
    }
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        return Err("empty password".into());
    }
    Ok(line)
}

/// The terminal on standard input with echo off, until dropped. `None` if its modes cannot be
/// read or set (the password is then read as typed).
struct EchoOff {
    before: rustix::termios::Termios,
}

impl EchoOff {
    fn new() -> Option<EchoOff> {
        use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
        let stdin = std::io::stdin();
        let before = tcgetattr(&stdin).ok()?;
        let mut quiet = before.clone();
        quiet.local_modes -= LocalModes::ECHO;
        tcsetattr(&stdin, OptionalActions::Flush, &quiet).ok()?;
        Some(EchoOff { before })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.before,
        );
    }
}
