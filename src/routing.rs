//! Which backend serves which login, sans-I/O: inline rules from `[routing]` plus an optional
//! routing file (`match,backend[,login]` lines), looked up by whole login (case-insensitive),
//! then by `@domain`, then the default backend (or a refusal). Built for a million rules: two
//! hash maps, backend names and login templates interned: about 130 MB and a second or two
//! (release build) per million rules; a reload holds the old table until the new one is built.

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// Longest line accepted in a routing file.
pub const MAX_LINE: usize = 4096;
/// Largest routing file accepted (a million rules fit in about 50 MiB).
pub const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// Why a routing table could not be built. A routing file error names the file and line.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RoutingError {
    #[error("{}:{line}: {reason}", file.display())]
    Line {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", file.display())]
    File { file: PathBuf, reason: String },
    #[error("routing.rules[{index}]: {reason}")]
    Rule { index: usize, reason: String },
}

/// One rule's target, compact: an index into the backend names, the routing file line it came
/// from (0: an inline rule), an optional interned template.
#[derive(Debug, Clone)]
struct Target {
    backend: u32,
    line: u32,
    login: Option<Arc<str>>,
}

/// Where one login goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// A backend name from the configuration (`imap` for `[imap]`).
    pub backend: Arc<str>,
    /// The login name to use upstream (after the rule's rewrite, if any).
    pub login: String,
    /// Whether a rule matched (false: the default backend).
    pub matched: bool,
}

/// The routing table. Immutable; a reload builds a new one.
#[derive(Debug, Default)]
pub struct Router {
    backends: Vec<Arc<str>>,
    exact: HashMap<Box<str>, Target>,
    domains: HashMap<Box<str>, Target>,
    /// `None`: unknown users are refused.
    default: Option<u32>,
}

/// Interns backend names and templates while a table is built.
#[derive(Default)]
struct Builder {
    router: Router,
    names: HashMap<String, u32>,
    templates: HashMap<String, Arc<str>>,
}

impl Builder {
    fn backend(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.names.get(name) {
            return i;
        }
        let i = self.router.backends.len() as u32;
        self.router.backends.push(Arc::from(name));
        self.names.insert(name.to_owned(), i);
        i
    }

    fn target(&mut self, rule: &RouteRule, line: u32) -> Target {
        let backend = self.backend(&rule.backend);
        let login = rule.login.as_deref().map(|t| match self.templates.get(t) {
            Some(interned) => interned.clone(),
            None => {
                let interned: Arc<str> = Arc::from(t);
                self.templates.insert(t.to_owned(), interned.clone());
                interned
            }
        });
        Target {
            backend,
            line,
            login,
        }
    }

    /// Insert a checked rule (`line` 0 for an inline rule); the target it replaced, if its
    /// match was already routed.
    fn insert(&mut self, rule: &RouteRule, line: u32) -> Option<Target> {
        let target = self.target(rule, line);
        let key = rule.matches.trim().to_lowercase();
        match key.strip_prefix('@') {
            Some(domain) => self.router.domains.insert(domain.into(), target),
            None => self.router.exact.insert(key.into(), target),
        }
    }
}

impl Router {
    /// The table for `config`: its inline rules, then its routing file (whose rules win over
    /// inline rules with the same match). Any bad rule or file line refuses the whole table.
    /// File lines go straight into the table: a million rules cost no second copy.
    pub fn from_config(config: &dyn RoutingSource) -> Result<Router, RoutingError> {
        match &config.routing().file {
            Some(path) => {
                let f = std::fs::File::open(path).map_err(|e| RoutingError::File {
                    file: path.to_owned(),
                    reason: format!("cannot open: {e}"),
                })?;
                Self::build(config, path, std::io::BufReader::new(f))
            }
            None => Self::build(config, Path::new("-"), &b""[..]),
        }
    }

    /// Build from the configuration's inline rules plus routing file text (`file` names it in
    /// errors).
    pub fn build(
        config: &dyn RoutingSource,
        file: &Path,
        text: impl BufRead,
    ) -> Result<Router, RoutingError> {
        let mut b = Builder::default();
        let r = config.routing();
        b.router.default = match r.unknown_users {
            UnknownUsers::Default => Some(b.backend(&r.default_backend)),
            UnknownUsers::Reject => None,
        };
        for (index, rule) in r.rules.iter().enumerate() {
            check_rule(config, rule).map_err(|reason| RoutingError::Rule { index, reason })?;
            if b.insert(rule, 0).is_some() {
                return Err(RoutingError::Rule {
                    index,
                    reason: format!("match {:?} appears twice", rule.matches),
                });
            }
        }
        parse_routing_file(file, text, config, |line, rule| {
            let line = u32::try_from(line).unwrap_or(u32::MAX);
            match b.insert(&rule, line) {
                Some(Target { line: first, .. }) if first != 0 => Err(format!(
                    "{:?} is already routed on line {first}",
                    rule.matches
                )),
                _ => Ok(()),
            }
        })?;
        b.router.exact.shrink_to_fit();
        b.router.domains.shrink_to_fit();
        Ok(b.router)
    }

    /// Number of rules (whole logins, domains).
    pub fn len(&self) -> (usize, usize) {
        (self.exact.len(), self.domains.len())
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.domains.is_empty()
    }

    /// Where `login` goes: a whole-login rule, else a rule for its domain, else the default
    /// backend; `None` when unknown users are refused.
    pub fn route(&self, login: &str) -> Option<Route> {
        let lower = login.to_lowercase();
        // A domain rule only takes `local@domain` with one `@`: `alice@other.org@example.org`
        // must not reach the example.org backend as `alice@other.org` through `%n`.
        let hit = self.exact.get(lower.as_str()).or_else(|| {
            lower
                .split_once('@')
                .filter(|(_, domain)| !domain.contains('@'))
                .and_then(|(_, domain)| self.domains.get(domain))
        });
        let (backend, template, matched) = match hit {
            Some(t) => (t.backend, t.login.as_deref(), true),
            None => (self.default?, None, false),
        };
        Some(Route {
            backend: self.backends[backend as usize].clone(),
            login: template.map_or_else(|| login.to_owned(), |t| expand(t, login)),
            matched,
        })
    }
}

/// Expand a login template: `%u` the login as given, `%n` its local part, `%d` its domain
/// (empty without `@`), `%%` a percent sign.
pub fn expand(template: &str, login: &str) -> String {
    let (local, domain) = login.rsplit_once('@').unwrap_or((login, ""));
    let mut out = String::with_capacity(template.len() + login.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => out.push_str(login),
            Some('n') => out.push_str(local),
            Some('d') => out.push_str(domain),
            Some('%') => out.push('%'),
            // Checked when the rule was loaded; kept literally if ever reached.
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Parse routing file text, handing each rule (with its line number) to `each`, which may
/// refuse it. `file` is only used in error messages.
pub fn parse_routing_file(
    file: &Path,
    reader: impl BufRead,
    config: &dyn RoutingSource,
    mut each: impl FnMut(usize, RouteRule) -> Result<(), String>,
) -> Result<(), RoutingError> {
    let err = |line: usize, reason: String| RoutingError::Line {
        file: file.to_owned(),
        line,
        reason,
    };
    let mut reader = reader.take(MAX_FILE_BYTES + 1);
    let mut buf = Vec::with_capacity(256);
    let mut n = 0usize;
    let mut total = 0u64;
    loop {
        buf.clear();
        let read = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| RoutingError::File {
                file: file.to_owned(),
                reason: format!("cannot read: {e}"),
            })?;
        if read == 0 {
            break;
        }
        n += 1;
        total += read as u64;
        if total > MAX_FILE_BYTES {
            return Err(RoutingError::File {
                file: file.to_owned(),
                reason: format!("larger than {MAX_FILE_BYTES} bytes"),
            });
        }
        if buf.len() > MAX_LINE && buf.last() != Some(&b'\n') {
            return Err(err(n, format!("line longer than {MAX_LINE} bytes")));
        }
        let text = std::str::from_utf8(&buf).map_err(|_| err(n, "not UTF-8".into()))?;
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        let rule = match fields.as_slice() {
            [m, b] => RouteRule {
                matches: (*m).to_owned(),
                backend: (*b).to_owned(),
                login: None,
            },
            [m, b, l] => RouteRule {
                matches: (*m).to_owned(),
                backend: (*b).to_owned(),
                login: (!l.is_empty()).then(|| (*l).to_owned()),
            },
            _ => {
                return Err(err(
                    n,
                    "expected `match,backend` or `match,backend,login`".into(),
                ))
            }
        };
        check_rule(config, &rule).map_err(|reason| err(n, reason))?;
        each(n, rule).map_err(|reason| err(n, reason))?;
    }
    Ok(())
}

/// The name routing rules use for the `[imap]` section.
pub const DEFAULT_BACKEND: &str = "imap";

/// What routing needs of the configuration: its `[routing]` section, and which backend names
/// exist (a rule may only name one of those).
pub trait RoutingSource {
    fn routing(&self) -> &RoutingConfig;
    fn has_backend(&self, name: &str) -> bool;
}

/// What happens to a login no routing rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownUsers {
    /// Send it to `routing.default_backend`.
    Default,
    /// Refuse it with `-ERR [AUTH]`, without asking any upstream.
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Backend for logins no rule matches (when `unknown_users = "default"`).
    pub default_backend: String,
    pub unknown_users: UnknownUsers,
    /// Optional routing file (`match,backend[,login]` lines), reloaded on SIGHUP and on change.
    pub file: Option<PathBuf>,
    /// Inline rules; the routing file's rules take precedence over them for the same match.
    pub rules: Vec<RouteRule>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            default_backend: DEFAULT_BACKEND.into(),
            unknown_users: UnknownUsers::Default,
            file: None,
            rules: Vec::new(),
        }
    }
}

/// Which logins go where, and under what upstream login name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// `user@domain` or `user` (whole login, case-insensitive), or `@domain` (every login in it).
    #[serde(rename = "match")]
    pub matches: String,
    /// A name from `[backends]`, or `imap` for `[imap]`.
    pub backend: String,
    /// Login sent upstream: `%u` the whole login, `%n` its local part, `%d` its domain,
    /// `%%` a percent sign. Absent: the login as the client gave it.
    pub login: Option<String>,
}

/// Why a routing rule is unusable; shared by inline rules and the routing file.
pub fn check_rule(config: &dyn RoutingSource, rule: &RouteRule) -> Result<(), String> {
    let m = rule.matches.trim();
    let ok = match m.split_once('@') {
        Some((local, domain)) => {
            !domain.is_empty() && !domain.contains('@') && !local.contains(char::is_whitespace)
        }
        None => !m.is_empty(),
    };
    if !ok || m.contains(char::is_whitespace) {
        return Err(format!(
            "match {:?} must be `user`, `user@domain` or `@domain`",
            rule.matches
        ));
    }
    if !config.has_backend(&rule.backend) {
        return Err(format!("backend {:?} is not defined", rule.backend));
    }
    if let Some(login) = &rule.login {
        check_login_template(login)?;
    }
    Ok(())
}

/// A login template may use `%u`, `%n`, `%d` and `%%` only, and must not be empty.
pub fn check_login_template(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("login must not be empty".into());
    }
    let mut chars = t.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('u' | 'n' | 'd' | '%') => {}
                Some(o) => {
                    return Err(format!(
                        "login {t:?}: unknown variable %{o} (use %u, %n, %d or %%)"
                    ))
                }
                None => return Err(format!("login {t:?}: '%' at the end")),
            }
        } else if c.is_whitespace() || c.is_control() {
            return Err(format!(
                "login {t:?} must not contain spaces or control characters"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::Config;

    fn config(extra: &str) -> Config {
        crate::config::fixtures::two_backends(extra)
    }

    fn file(text: &str, c: &Config) -> Result<Router, RoutingError> {
        Router::build(c, Path::new("routes.csv"), text.as_bytes())
    }

    fn route(r: &Router, login: &str) -> Option<(String, String)> {
        r.route(login).map(|r| (r.backend.to_string(), r.login))
    }

    #[test]
    fn exact_beats_domain_beats_default_case_insensitively() {
        let c = config(
            r#"[routing]
default_backend = "new"
rules = [
  { match = "@Example.org", backend = "legacy", login = "%n" },
  { match = "Boss@example.org", backend = "imap" },
]"#,
        );
        let r = Router::from_config(&c).unwrap();
        assert_eq!(
            route(&r, "Ann@EXAMPLE.org"),
            Some(("legacy".into(), "Ann".into()))
        );
        assert_eq!(
            route(&r, "boss@Example.ORG"),
            Some(("imap".into(), "boss@Example.ORG".into()))
        );
        assert_eq!(route(&r, "zed"), Some(("new".into(), "zed".into())));
        assert!(!r.route("zed").unwrap().matched);
        assert!(r.route("boss@example.org").unwrap().matched);
        // A login with two @ is no login of example.org: it goes to the default backend,
        // unrewritten, so `%n` cannot turn it into another domain's account.
        assert_eq!(
            route(&r, "a@b@example.org"),
            Some(("new".into(), "a@b@example.org".into()))
        );
    }

    #[test]
    fn unknown_users_rejected() {
        let c = config(
            "[routing]\nunknown_users = \"reject\"\nrules = [{ match = \"x\", backend = \"new\" }]",
        );
        let r = Router::from_config(&c).unwrap();
        assert_eq!(route(&r, "X"), Some(("new".into(), "X".into())));
        assert_eq!(route(&r, "y"), None);
        assert_eq!(route(&r, "y@x"), None);
    }

    #[test]
    fn template_expansion() {
        assert_eq!(
            expand("%n@mail.example.net", "bob@a.org"),
            "bob@mail.example.net"
        );
        assert_eq!(expand("%d/%n/%u/%%", "bob@a.org"), "a.org/bob/bob@a.org/%");
        assert_eq!(expand("%n+%d", "bob"), "bob+");
        assert_eq!(expand("fixed", "bob"), "fixed");
    }

    #[test]
    fn routing_file_format_and_precedence_over_inline() {
        let c = config(
            "[routing]\nrules = [{ match = \"a@x.org\", backend = \"new\" }, { match = \"@x.org\", backend = \"new\" }]",
        );
        let r = file(
            "# wave 1\n\n  a@x.org , legacy , %n \r\n@y.org,new\nb@x.org,imap,\n",
            &c,
        )
        .unwrap();
        assert_eq!(route(&r, "A@x.org"), Some(("legacy".into(), "A".into())));
        assert_eq!(route(&r, "c@y.org"), Some(("new".into(), "c@y.org".into())));
        assert_eq!(route(&r, "c@x.org"), Some(("new".into(), "c@x.org".into())));
        assert_eq!(
            route(&r, "b@x.org"),
            Some(("imap".into(), "b@x.org".into()))
        );
        assert_eq!(r.len(), (2, 2));
    }

    #[test]
    fn any_bad_line_refuses_the_file_with_file_and_line() {
        let c = config("");
        let cases = [
            ("a,legacy\nb,nowhere\n", 2, "\"nowhere\" is not defined"),
            ("a,legacy\n\n# c\nb\n", 4, "expected `match,backend`"),
            ("a,legacy,x,y\n", 1, "expected"),
            ("a b,legacy\n", 1, "must be `user`"),
            ("a,legacy,%q\n", 1, "unknown variable %q"),
            ("a,legacy\nA,new\n", 2, "already routed on line 1"),
            ("@,legacy\n", 1, "must be"),
        ];
        for (text, line, reason) in cases {
            let e = file(text, &c).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("routes.csv:{line}: ")),
                "{text:?}: {msg}"
            );
            assert!(msg.contains(reason), "{text:?}: {msg}");
        }
        let long = format!("{},legacy\n", "a".repeat(MAX_LINE + 10));
        assert!(file(&long, &c)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
        let bad = Router::build(&c, Path::new("r"), &b"a,legacy\n\xff,new\n"[..]);
        assert_eq!(bad.unwrap_err().to_string(), "r:2: not UTF-8");
        let mut c = c;
        c.routing.file = Some("/nonexistent/routes.csv".into());
        let e = Router::from_config(&c).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/routes.csv: cannot open"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_inline_rules_are_refused() {
        let c = config(
            "[routing]\nrules = [{ match = \"a\", backend = \"new\" }, { match = \"A\", backend = \"imap\" }]",
        );
        let e = Router::from_config(&c).unwrap_err();
        assert_eq!(
            e,
            RoutingError::Rule {
                index: 1,
                reason: "match \"A\" appears twice".into()
            }
        );
    }

    #[test]
    fn a_million_rules_build_and_look_up_fast() {
        let c = config("");
        let mut text = String::with_capacity(40 * 1_000_000);
        for i in 0..1_000_000u32 {
            let backend = if i % 2 == 0 { "legacy" } else { "new" };
            text.push_str(&format!("user{i}@example.org,{backend},%n\n"));
        }
        let started = std::time::Instant::now();
        let r = file(&text, &c).unwrap();
        let built = started.elapsed();
        let started = std::time::Instant::now();
        for i in (0..1_000_000u32).step_by(7) {
            let got = r.route(&format!("USER{i}@example.org")).unwrap();
            assert_eq!(&*got.backend, if i % 2 == 0 { "legacy" } else { "new" });
            assert_eq!(got.login, format!("USER{i}"));
        }
        let looked_up = started.elapsed();
        assert_eq!(r.len(), (1_000_000, 0));
        // Generous bounds for a debug build on a busy 2-core machine.
        assert!(built.as_secs() < 60, "build took {built:?}");
        assert!(looked_up.as_secs() < 10, "lookups took {looked_up:?}");
    }
}
