//! Who is migrated and how each side is reached: users files, the backends named by `--from`
//! and `--to`, each side's login ([`Logins`]) and credential, the legacy POP3 session.

use std::path::{Path, PathBuf};

use super::report::{BackendLogin, LoginsUsed};
use super::{Credential, MigrateError};
use crate::config::{read_secret, BackendRef, Config, ImapConfig, Pop3BackendConfig};
use crate::routing::{expand, Router};
use crate::upstream::pop3::{Pop3Client, Pop3Error};
use crate::upstream::transport::TransportError;
use crate::upstream::{Endpoint, Protocol};

/// One user to work on, and the password given for them (if any).
#[derive(Clone)]
pub struct UserSpec {
    pub user: String,
    pub password: Option<String>,
}

/// Parses a users file: one user per line, optionally a TAB and the user's password; blank
/// lines and lines starting with `#` are ignored.
pub fn parse_users_file(path: &Path, text: &str) -> Result<Vec<UserSpec>, MigrateError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (user, password) = match line.split_once('\t') {
            Some((u, p)) => (u.trim(), Some(p.to_owned())),
            None => (line.trim(), None),
        };
        if user.is_empty() || user.contains(char::is_whitespace) {
            return Err(MigrateError::Usage(format!(
                "{}:{}: bad user name (a line is `user` or `user<TAB>password`)",
                path.display(),
                i + 1
            )));
        }
        if password.as_deref() == Some("") {
            return Err(MigrateError::Usage(format!(
                "{}:{}: empty password after the TAB",
                path.display(),
                i + 1
            )));
        }
        out.push(UserSpec {
            user: user.to_owned(),
            password,
        });
    }
    Ok(out)
}

/// The legacy POP3 backend named `name`.
pub fn pop3_backend<'a>(
    config: &'a Config,
    name: &str,
) -> Result<&'a Pop3BackendConfig, MigrateError> {
    match config.backend(name) {
        Some(BackendRef::Pop3(p)) => Ok(p),
        Some(BackendRef::Imap(_)) => Err(MigrateError::Usage(format!(
            "backend {name:?} is an IMAP backend; --from needs kind = \"pop3\""
        ))),
        None => Err(MigrateError::Usage(format!("no backend named {name:?}"))),
    }
}

/// The IMAP backend named `name` (`imap` is the `[imap]` section).
pub fn imap_backend<'a>(config: &'a Config, name: &str) -> Result<&'a ImapConfig, MigrateError> {
    match config.backend(name) {
        Some(BackendRef::Imap(i)) => Ok(i),
        Some(BackendRef::Pop3(_)) => Err(MigrateError::Usage(format!(
            "backend {name:?} is a POP3 backend; --to needs an IMAP backend"
        ))),
        None => Err(MigrateError::Usage(format!("no backend named {name:?}"))),
    }
}

/// Which login a user has on each side. `--user` (and a users-file line) is the *client*
/// login: what the POP3 client types and what routing rules match. On a backend, the login is
/// `--from-login` / `--to-login` expanded for it when given (the rewrite the user's route will
/// have after the switch), else the rewrite of the user's current route when that route
/// points at this backend, else the client login unchanged. The map is stored under the new
/// store's login, which is the key a routed session uses.
pub struct Logins {
    router: Router,
    from: Option<String>,
    to: Option<String>,
}

impl Logins {
    /// Reads the configuration's routing rules and routing file.
    pub fn new(
        config: &Config,
        from_template: Option<String>,
        to_template: Option<String>,
    ) -> Result<Logins, MigrateError> {
        let router = Router::from_config(config).map_err(MigrateError::Routing)?;
        for t in [&from_template, &to_template].into_iter().flatten() {
            let sample = expand(t, "user@example.org");
            if sample.is_empty() || sample.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err(MigrateError::Usage(format!(
                    "login template {t:?} gives {sample:?} for user@example.org: not a login"
                )));
            }
        }
        Ok(Logins {
            router,
            from: from_template,
            to: to_template,
        })
    }

    fn on(&self, backend: &str, template: &Option<String>, user: &str) -> String {
        if let Some(t) = template {
            return expand(t, user);
        }
        match self.router.route(user) {
            Some(r) if &*r.backend == backend => r.login,
            _ => user.to_owned(),
        }
    }

    /// `user`'s login on the legacy backend `backend`.
    pub fn from(&self, backend: &str, user: &str) -> String {
        self.on(backend, &self.from, user)
    }

    /// `user`'s login on the new store `backend`.
    pub fn to(&self, backend: &str, user: &str) -> String {
        self.on(backend, &self.to, user)
    }

    /// `user`'s logins on the legacy backend `from` (when given) and the new store `to`.
    pub fn used(&self, from: Option<&str>, to: &str, user: &str) -> LoginsUsed {
        LoginsUsed {
            user: user.to_owned(),
            legacy: from.map(|b| BackendLogin {
                backend: b.to_owned(),
                login: self.from(b, user),
            }),
            new: BackendLogin {
                backend: to.to_owned(),
                login: self.to(to, user),
            },
        }
    }
}

/// The backend's master user, when it has one.
pub(super) fn master(
    user: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<Credential>, MigrateError> {
    match (user, file) {
        (Some(u), Some(f)) => Ok(Some(Credential::Master {
            user: u.clone(),
            password: read_secret(f).map_err(MigrateError::Usage)?,
        })),
        _ => Ok(None),
    }
}

/// How `spec` logs in on the `side` ("legacy", "new"): the master user, else their password.
pub(super) fn credential(
    master: &Option<Credential>,
    spec: &UserSpec,
    side: &str,
) -> Result<Credential, MigrateError> {
    if let Some(m) = master {
        return Ok(m.clone());
    }
    spec.password
        .clone()
        .map(Credential::Password)
        .ok_or_else(|| {
            MigrateError::Usage(format!(
                "no credentials for {} on the {side} side: configure a master user for that backend, or give the user's password (--password-env, or a TAB and the password in the users file)",
                spec.user
            ))
        })
}

/// Connects to the legacy POP3 backend and logs `user` in.
pub(super) async fn legacy_session(
    backend: &Pop3BackendConfig,
    user: &str,
    cred: &Credential,
) -> Result<Pop3Client, MigrateError> {
    let endpoint = Endpoint::new(Protocol::Pop3, &backend.endpoint())?;
    let mut pop = Pop3Client::connect(&endpoint).await.map_err(|e| match e {
        // TLS that fails is a setting to fix, not a busy server.
        Pop3Error::Transport(TransportError::Tls(_)) => MigrateError::Pop3(e),
        e => MigrateError::Pop3Busy(e),
    })?;
    let login = match cred {
        Credential::Password(pw) => pop.login(user, pw).await,
        Credential::Master { user: m, password } => pop.login_master(user, m, password).await,
    };
    match login {
        Ok(_) => Ok(pop),
        Err(e) if busy_refusal(&e) => Err(MigrateError::Pop3Busy(e)),
        Err(e) => Err(e.into()),
    }
}

/// A POP3 login refused for now (RFC 2449, RFC 3206): `[SYS/TEMP]`, `[IN-USE]`,
/// `[LOGIN-DELAY]`.
fn busy_refusal(e: &Pop3Error) -> bool {
    let Pop3Error::Refused { text, .. } = e else {
        return false;
    };
    let code = text
        .trim_start()
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map(|(c, _)| c.to_ascii_uppercase());
    matches!(code.as_deref(), Some("SYS/TEMP" | "IN-USE" | "LOGIN-DELAY"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_follow_templates_then_the_current_route_then_the_client_login() {
        let config = crate::config::fixtures::two_backends(
            r#"[routing]
rules = [{ match = "@example.org", backend = "legacy", login = "%n" }, { match = "done@example.org", backend = "new", login = "%n@new.example" }]
"#,
        );
        let l = Logins::new(&config, None, None).unwrap();
        // The current route's rewrite for the backend it points at; else the client login.
        assert_eq!(l.from("legacy", "Al@example.org"), "Al");
        assert_eq!(l.to("new", "al@example.org"), "al@example.org");
        assert_eq!(l.to("new", "done@example.org"), "done@new.example");
        assert_eq!(l.from("legacy", "done@example.org"), "done@example.org");
        assert_eq!(l.from("legacy", "x@other.org"), "x@other.org");
        // Templates win.
        let l = Logins::new(&config, Some("%u".into()), Some("%n@new.example".into())).unwrap();
        assert_eq!(l.from("legacy", "al@example.org"), "al@example.org");
        assert_eq!(l.to("new", "al@example.org"), "al@new.example");
        // A template that gives no login is refused.
        assert!(Logins::new(&config, None, Some("%n x".into())).is_err());
        assert!(Logins::new(&config, Some(String::new()), None).is_err());
    }

    #[test]
    fn a_report_names_only_the_logins_that_differ() {
        let config = crate::config::fixtures::two_backends("");
        let l = Logins::new(&config, None, Some("%n@new.example".into())).unwrap();
        let used = l.used(Some("legacy"), "new", "al@example.org");
        assert_eq!(
            used.differing(),
            vec![&BackendLogin {
                backend: "new".into(),
                login: "al@new.example".into()
            }]
        );
        let l = Logins::new(&config, None, None).unwrap();
        assert!(l.used(None, "new", "al").differing().is_empty());
    }

    #[test]
    fn users_files_take_an_optional_tab_password() {
        let p = Path::new("wave.txt");
        let u = parse_users_file(p, "# wave 1\nalice\tpw one\n\nbob\n").unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].password.as_deref(), Some("pw one"));
        assert_eq!(u[1].password, None);
        let e = parse_users_file(p, "alice\t\n").err().unwrap();
        assert!(e.to_string().starts_with("wave.txt:1:"), "{e}");
        let e = parse_users_file(p, "al ice\n").err().unwrap();
        assert!(e.to_string().starts_with("wave.txt:1:"), "{e}");
    }
}
