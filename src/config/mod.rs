//! The TOML configuration: its schema (serde, unknown keys rejected) and the checks run at
//! start-up. Every error names the file, the key and what is wrong, so an operator can fix a
//! typo without reading source. Every key is documented in `config/popbridge.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::routing::{check_rule, RoutingConfig, RoutingSource};
use crate::uidl::UidlFormat;

pub use crate::routing::{RouteRule, UnknownUsers, DEFAULT_BACKEND};
pub use crate::upstream::credentials::read_secret;
pub use crate::upstream::Security;

mod maildrops;
mod policy;
mod sections;
mod servers;

pub use policy::expire;

use sections::is_imap_atom;
pub use sections::*;
pub use servers::*;
use servers::{validate_imap, validate_pop3_backend};

/// A configuration that could not be loaded: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {}{message}", key.as_deref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the offending key (`pop3.listen`), when one is to blame.
    pub key: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pop3: Pop3Config,
    pub imap: ImapConfig,
    pub state: StateConfig,
    #[serde(default)]
    pub deletion: DeletionConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolConfig,
    /// Named upstreams besides `[imap]` (which routing calls `imap`), for routing and migration.
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub migration: MigrationConfig,
    #[serde(default)]
    pub folders: FoldersConfig,
    #[serde(default)]
    pub views: ViewsConfig,
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parse and validate `text`; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |key: Option<String>, message: String| ConfigError {
            file: path.to_owned(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| err(None, one_line(&e)))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = (key != ".").then_some(key);
            err(key, one_line(e.inner()))
        })?;
        config
            .validate()
            .map_err(|(key, msg)| err(Some(key), msg))?;
        config.inherit_defaults();
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_general()
            .map_err(|(k, m)| (k.to_owned(), m))?;
        validate_imap("imap", &self.imap)?;
        for (name, backend) in &self.backends {
            let prefix = format!("backends.{name}");
            if name == DEFAULT_BACKEND {
                return Err((
                    prefix,
                    format!("the name {DEFAULT_BACKEND:?} is taken by the [imap] section"),
                ));
            }
            match backend {
                BackendConfig::Imap(imap) => validate_imap(&prefix, imap)?,
                BackendConfig::Pop3(pop3) => validate_pop3_backend(&prefix, pop3)?,
            }
        }
        self.validate_maildrops()?;
        self.validate_policy()?;
        self.validate_routing()
    }

    /// The backend a routing rule or `verify_password_with` names, if it exists.
    pub fn backend(&self, name: &str) -> Option<BackendRef<'_>> {
        if name == DEFAULT_BACKEND {
            return Some(BackendRef::Imap(&self.imap));
        }
        self.backends.get(name).map(|b| match b {
            BackendConfig::Imap(i) => BackendRef::Imap(i),
            BackendConfig::Pop3(p) => BackendRef::Pop3(p),
        })
    }

    fn validate_routing(&self) -> Result<(), (String, String)> {
        let r = &self.routing;
        if self.backend(&r.default_backend).is_none() {
            return Err((
                "routing.default_backend".into(),
                format!("names no backend: {:?}", r.default_backend),
            ));
        }
        for (i, rule) in r.rules.iter().enumerate() {
            let key = format!("routing.rules[{i}]");
            check_rule(self, rule).map_err(|m| (key, m))?;
        }
        let imaps = std::iter::once(("imap".to_owned(), &self.imap)).chain(
            self.backends.iter().filter_map(|(n, b)| match b {
                BackendConfig::Imap(i) => Some((format!("backends.{n}"), i)),
                BackendConfig::Pop3(_) => None,
            }),
        );
        for (prefix, imap) in imaps {
            if let Some(v) = &imap.verify_password_with {
                if self.backend(v).is_none() {
                    return Err((
                        format!("{prefix}.verify_password_with"),
                        format!("names no backend: {v:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_general(&self) -> Result<(), (&'static str, String)> {
        UidlFormat::parse(&self.pop3.uidl_format)
            .map_err(|e| ("pop3.uidl_format", e.to_string()))?;
        if self.metrics.listen.is_some() && self.metrics.listen == Some(self.pop3.listen) {
            return Err(("metrics.listen", "must differ from pop3.listen".into()));
        }
        if let Some(tls) = &self.pop3.tls {
            crate::client_tls::load_certified_key(&tls.cert, &tls.key)
                .map_err(|e| ("pop3.tls", e.to_string()))?;
        }
        if self.pop3.listen_tls.is_some() && self.pop3.tls.is_none() {
            return Err((
                "pop3.listen_tls",
                "needs a certificate: add [pop3.tls] with cert and key".into(),
            ));
        }
        if self.pop3.listen_tls == Some(self.pop3.listen) {
            return Err(("pop3.listen_tls", "must differ from pop3.listen".into()));
        }
        if self.pop3.plaintext_auth == PlaintextAuth::TlsOnly
            && self.pop3.tls.is_none()
            && !self.pop3.plaintext_auth_loopback
        {
            return Err((
                "pop3.plaintext_auth",
                "is \"tls_only\" (the default) but no [pop3.tls] certificate is configured, so every login would be refused: add [pop3.tls], or set plaintext_auth = \"always\" (or plaintext_auth_loopback = true) for a trusted network".into(),
            ));
        }
        if self.pop3.listen_backlog == 0 {
            return Err(("pop3.listen_backlog", "must be at least 1".into()));
        }
        if self.pop3.tls_handshake_timeout_secs == 0 {
            return Err((
                "pop3.tls_handshake_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        let pp = &self.proxy_protocol;
        for name in &pp.listeners {
            match name.as_str() {
                "pop3" => {}
                "pop3s" if self.pop3.listen_tls.is_some() => {}
                "pop3s" => {
                    return Err((
                        "proxy_protocol.listeners",
                        "names pop3s but pop3.listen_tls is not set".into(),
                    ))
                }
                other => {
                    return Err((
                        "proxy_protocol.listeners",
                        format!("unknown listener {other:?} (expected \"pop3\" or \"pop3s\")"),
                    ))
                }
            }
        }
        if !pp.listeners.is_empty() && pp.trusted_networks.is_empty() {
            return Err((
                "proxy_protocol.trusted_networks",
                "must list the load balancers' networks when proxy_protocol.listeners is set"
                    .into(),
            ));
        }
        if pp.header_timeout_secs == 0 {
            return Err((
                "proxy_protocol.header_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip as u64,
            ),
            ("limits.auth_timeout_secs", l.auth_timeout_secs),
            (
                "limits.auth_penalty_window_secs",
                l.auth_penalty_window_secs,
            ),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".into()));
            }
        }
        if l.max_connections_per_ip > l.max_connections {
            return Err((
                "limits.max_connections_per_ip",
                "must not exceed limits.max_connections".into(),
            ));
        }
        if !(1024..=crate::uidl::map::MAX_CHUNK_BYTES)
            .contains(&self.migration.metadata_chunk_bytes)
        {
            return Err((
                "migration.metadata_chunk_bytes",
                format!(
                    "must be between 1024 and {}",
                    crate::uidl::map::MAX_CHUNK_BYTES
                ),
            ));
        }
        if self.pop3.idle_timeout_secs == 0 {
            return Err(("pop3.idle_timeout_secs", "must be at least 1".into()));
        }
        if !is_imap_atom(&self.deletion.hide_keyword) {
            return Err((
                "deletion.hide_keyword",
                format!(
                    "{:?} is not a valid IMAP keyword (an atom: no spaces, no \\, no ()%*\"]{{)",
                    self.deletion.hide_keyword
                ),
            ));
        }
        if self.deletion.mode == DeletionMode::Move {
            if self.deletion.move_to.is_empty() {
                return Err(("deletion.move_to", "must not be empty".into()));
            }
            if self
                .deletion
                .move_to
                .eq_ignore_ascii_case(&self.imap.mailbox)
            {
                return Err((
                    "deletion.move_to",
                    "must differ from imap.mailbox (moving a message into its own folder deletes nothing)".into(),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The most upstream connections kept for users' next sessions at once: the sum of
    /// `keep_alive_max` over the IMAP sections that keep any (`keep_alive_secs` > 0).
    pub fn kept_connections_max(&self) -> u64 {
        std::iter::once(&self.imap)
            .chain(self.backends.values().filter_map(|b| match b {
                BackendConfig::Imap(i) => Some(i),
                BackendConfig::Pop3(_) => None,
            }))
            .filter(|i| i.keep_alive_secs > 0)
            .map(|i| u64::from(i.keep_alive_max))
            .sum()
    }

    /// Whether any IMAP backend takes the client's own OAuth token (POP3 then offers AUTH
    /// XOAUTH2 and OAUTHBEARER).
    pub fn takes_client_tokens(&self) -> bool {
        std::iter::once(&self.imap)
            .chain(self.backends.values().filter_map(|b| match b {
                BackendConfig::Imap(i) => Some(i),
                BackendConfig::Pop3(_) => None,
            }))
            .any(|i| {
                i.oauth.as_ref().is_some_and(|o| {
                    o.tokens == crate::upstream::oauth::settings::TokenSource::Client
                })
            })
    }
}

impl RoutingSource for Config {
    fn routing(&self) -> &RoutingConfig {
        &self.routing
    }

    fn has_backend(&self, name: &str) -> bool {
        self.backend(name).is_some()
    }
}

/// A backend looked up by name: `[imap]` or one of `[backends]`.
#[derive(Debug, Clone, Copy)]
pub enum BackendRef<'a> {
    Imap(&'a ImapConfig),
    Pop3(&'a Pop3BackendConfig),
}

/// toml errors come as a multi-line snippet; keep the message and the position on one line.
fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.chars().next().is_some_and(|c| c.is_ascii_digit())
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// Configurations for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::Config;
    use std::path::Path;

    /// The smallest valid configuration.
    pub const MINIMAL: &str = r#"
[pop3]
listen = "127.0.0.1:1110"
plaintext_auth = "always"
[imap]
host = "127.0.0.1"
security = "none"
[state]
dir = "/tmp/x"
"#;

    /// [`MINIMAL`] with a POP3 backend `legacy` and an IMAP backend `new`, then `extra`.
    pub fn two_backends(extra: &str) -> Config {
        let text = format!(
            r#"{MINIMAL}[backends.legacy]
kind = "pop3"
host = "127.0.0.1"
security = "none"
[backends.new]
kind = "imap"
host = "127.0.0.1"
security = "none"
{extra}"#
        );
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::MINIMAL;
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.pop3.mark_seen);
        assert_eq!(c.pop3.uidl_format, "%08Xu%08Xv");
        assert_eq!(c.pop3.idle_timeout_secs, 600);
        assert_eq!(c.imap.port(), 143);
        assert_eq!(c.imap.mailbox, "INBOX");
        assert_eq!(c.deletion.mode, DeletionMode::Hide);
        assert_eq!(c.deletion.hide_keyword, "$POP3Deleted");
        assert_eq!(c.migration.shared_map, SharedMap::Metadata);
        assert_eq!(c.migration.metadata_chunk_bytes, 262144);
        let e = parse(&format!(
            "{MINIMAL}[migration]\nmetadata_chunk_bytes = 10\n"
        ))
        .unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("migration.metadata_chunk_bytes"),
            "{e}"
        );
        let c = parse(&format!("{MINIMAL}[migration]\nshared_map = \"none\"\n")).unwrap();
        assert_eq!(c.migration.shared_map, SharedMap::None);
    }

    #[test]
    fn keep_alive_keys_are_checked() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!((c.imap.keep_alive_secs, c.imap.keep_alive_max), (0, 256));
        let with = |extra: &str| parse(&MINIMAL.replace("[imap]", &format!("[imap]\n{extra}")));
        let c = with("keep_alive_secs = 120\nkeep_alive_max = 10").unwrap();
        assert_eq!((c.imap.keep_alive_secs, c.imap.keep_alive_max), (120, 10));
        assert_eq!(c.kept_connections_max(), 10);
        assert_eq!(parse(MINIMAL).unwrap().kept_connections_max(), 0);
        for (extra, key) in [
            ("keep_alive_secs = 1801", "imap.keep_alive_secs"),
            ("keep_alive_secs = -1", "imap.keep_alive_secs"),
            ("keep_alive_secs = \"2m\"", "imap.keep_alive_secs"),
            ("keep_alive_max = 0", "imap.keep_alive_max"),
            ("keep_alive_max = 65537", "imap.keep_alive_max"),
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}");
            assert!(e.to_string().starts_with("test.toml: "), "{e}");
        }
        let e = parse(&format!(
            "{MINIMAL}[backends.b]\nkind = \"imap\"\nhost = \"h\"\nkeep_alive_secs = 9999\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("backends.b.keep_alive_secs"), "{e}");
        // OAuth logins are never kept.
        let oauth = "\n[imap.oauth]\ntokens = \"client\"\n";
        assert!(parse(&format!("{MINIMAL}{oauth}")).is_ok());
        let e = parse(&format!(
            "{}{oauth}",
            MINIMAL.replace("[imap]", "[imap]\nkeep_alive_secs = 60")
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.keep_alive_secs"), "{e}");
        assert!(e.to_string().contains("password logins only"), "{e}");
    }

    #[test]
    fn tls_default_port_is_993() {
        let c = parse(&MINIMAL.replace("security = \"none\"", "security = \"tls\"")).unwrap();
        assert_eq!(c.imap.port(), 993);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse(&MINIMAL.replace("[imap]", "[imap]\nmailboxx = \"INBOX\"")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("test.toml: "), "{msg}");
        assert!(msg.contains("mailboxx"), "{msg}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let e = parse(&MINIMAL.replace("\"none\"", "\"sometimes\"")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.security"), "{e}");
        let e = parse(&MINIMAL.replace("127.0.0.1:1110", "nowhere")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("pop3.listen"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases = [
            (
                "[deletion]\nhide_keyword = \"has space\"",
                "deletion.hide_keyword",
            ),
            (
                "[deletion]\nmode = \"move\"\nmove_to = \"inbox\"",
                "deletion.move_to",
            ),
            ("[deletion]\nmode = \"shred\"", "deletion.mode"),
        ];
        for (extra, key) in cases {
            let e = parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = parse(&MINIMAL.replace("[imap]", "[imap]\nca_file = \"/nonexistent.pem\""))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("imap.ca_file"), "{e}");
        let e = parse(&MINIMAL.replace("[pop3]", "[pop3]\nuidl_format = \"%m\"")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("pop3.uidl_format"), "{e}");
    }

    #[test]
    fn tls_only_without_certificate_is_refused() {
        let e = parse(&MINIMAL.replace("plaintext_auth = \"always\"", "")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("pop3.plaintext_auth"), "{e}");
        let c = parse(&MINIMAL.replace(
            "plaintext_auth = \"always\"",
            "plaintext_auth_loopback = true",
        ))
        .unwrap();
        assert_eq!(c.pop3.plaintext_auth, PlaintextAuth::TlsOnly);
        let e = parse(&MINIMAL.replace("[imap]", "listen_tls = \"127.0.0.1:1995\"\n[imap]"))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("pop3.listen_tls"), "{e}");
        let e = parse(&MINIMAL.replace(
            "[imap]",
            "[pop3.tls]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"\n[imap]",
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("pop3.tls"), "{e}");
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
    }

    #[test]
    fn missing_section_is_reported() {
        let e = parse("[pop3]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.to_string().contains("imap"), "{e}");
    }

    #[test]
    fn example_config_in_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/popbridge.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // The example points at placeholder certificate paths (tests/cli.rs checks it with
        // real files); everything else must validate as written.
        let text = text
            .replace("ca_file =", "# ca_file =")
            .replace("[pop3.tls]", "# [pop3.tls]")
            .replace("\ncert =", "\n# cert =")
            .replace("\nkey =", "\n# key =")
            .replace("\nlisten_tls =", "\n# listen_tls =")
            .replace(
                "plaintext_auth = \"tls_only\"",
                "plaintext_auth = \"always\"",
            );
        let c = Config::parse(&path, &text).unwrap();
        assert!(c.metrics.listen.is_some());
    }

    const ROUTED: &str = r#"
[backends.legacy]
kind = "pop3"
host = "127.0.0.1"
port = 2110
security = "none"

[backends.new]
kind = "imap"
host = "127.0.0.1"
port = 2143
security = "none"
uidl_format = "%v.%u"

[routing]
default_backend = "legacy"
unknown_users = "reject"
rules = [
  { match = "alice@example.org", backend = "new", login = "%n" },
  { match = "@example.net", backend = "imap" },
]
"#;

    #[test]
    fn backends_and_routing_parse() {
        let c = parse(&format!("{MINIMAL}{ROUTED}")).unwrap();
        assert!(matches!(c.backend("legacy"), Some(BackendRef::Pop3(p)) if p.port() == 2110));
        assert!(
            matches!(c.backend("new"), Some(BackendRef::Imap(i)) if i.uidl_format.as_deref() == Some("%v.%u"))
        );
        assert!(matches!(c.backend("imap"), Some(BackendRef::Imap(i)) if i.host == "127.0.0.1"));
        assert!(c.backend("nope").is_none());
        assert_eq!(c.routing.unknown_users, UnknownUsers::Reject);
        assert_eq!(c.routing.rules.len(), 2);
        assert_eq!(c.routing.rules[0].login.as_deref(), Some("%n"));
    }

    #[test]
    fn routing_errors_name_the_key() {
        let cases = [
            (
                ROUTED.replace("backend = \"imap\"", "backend = \"old\""),
                "routing.rules[1]",
                "\"old\" is not defined",
            ),
            (
                ROUTED.replace("default_backend = \"legacy\"", "default_backend = \"x\""),
                "routing.default_backend",
                "names no backend",
            ),
            (
                ROUTED.replace("login = \"%n\"", "login = \"%q\""),
                "routing.rules[0]",
                "unknown variable %q",
            ),
            (
                ROUTED.replace("match = \"@example.net\"", "match = \"a b\""),
                "routing.rules[1]",
                "must be `user`",
            ),
            (
                ROUTED.replace("port = 2110", "port = 2110\nbogus = 1"),
                "backends",
                "bogus",
            ),
            (
                ROUTED.replace("kind = \"pop3\"", "kind = \"smtp\""),
                "backends",
                "smtp",
            ),
            (
                ROUTED
                    .replace("[backends.legacy]", "[backends.imap]")
                    .replace("\"legacy\"", "\"imap\""),
                "backends.imap",
                "taken",
            ),
            (
                ROUTED.replace("uidl_format = \"%v.%u\"", "uidl_format = \"%m\""),
                "backends.new.uidl_format",
                "%m",
            ),
            (
                ROUTED.replace("port = 2143", "port = 2143\nmaster_user = \"m\""),
                "backends.new.master_password_file",
                "required",
            ),
        ];
        for (extra, key, msg) in cases {
            let e = parse(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert!(
                e.key.as_deref().is_some_and(|k| k.starts_with(key)),
                "{key}: {e}"
            );
            assert!(e.to_string().contains(msg), "{msg}: {e}");
        }
    }

    #[test]
    fn master_user_requires_a_password_check() {
        let dir = std::env::temp_dir().join(format!("pbcfg-master-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("master.pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let master = format!(
            "port = 2143\nmaster_user = \"m\"\nmaster_password_file = \"{}\"",
            pw.display()
        );
        let e = parse(&format!(
            "{MINIMAL}{}",
            ROUTED.replace("port = 2143", &master)
        ))
        .unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("backends.new.verify_password_with"),
            "{e}"
        );
        let ok = format!("{master}\nverify_password_with = \"legacy\"");
        let c = parse(&format!("{MINIMAL}{}", ROUTED.replace("port = 2143", &ok))).unwrap();
        assert!(
            matches!(c.backend("new"), Some(BackendRef::Imap(i)) if i.master_user.as_deref() == Some("m"))
        );
        assert_eq!(read_secret(&pw).unwrap(), "s3cret");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
