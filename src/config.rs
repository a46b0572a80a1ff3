//! The TOML configuration: its schema (serde, unknown keys rejected) and the checks run at
//! start-up. Every error names the file, the key and what is wrong, so an operator can fix a
//! typo without reading source. Every key is documented in `config/popbridge.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::routing::{check_rule, RoutingConfig, RoutingSource};
use crate::uidl::UidlFormat;
use crate::upstream::{EndpointSettings, Protocol};

pub use crate::routing::{RouteRule, UnknownUsers, DEFAULT_BACKEND};
pub use crate::upstream::credentials::read_secret;
pub use crate::upstream::Security;

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
}

/// Where migrated legacy UIDL maps are shared between popbridge instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedMap {
    /// IMAP METADATA (RFC 5464) on the maildrop folder, when the server offers it.
    Metadata,
    /// Only the local sled cache (a single instance, or a server without METADATA).
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    pub shared_map: SharedMap,
    /// Largest METADATA value written per chunk of a map.
    pub metadata_chunk_bytes: usize,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            shared_map: SharedMap::Metadata,
            metadata_chunk_bytes: 256 * 1024,
        }
    }
}

/// Declares a server section: the endpoint keys every server section shares
/// ([`EndpointSettings`], validated there), then the section's own keys. A macro rather than
/// `#[serde(flatten)]`, which would lose the key names in error messages.
macro_rules! server_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            pub host: String,
            /// Defaults to the protocol's port: 993/143 (IMAP), 995/110 (POP3).
            pub port: Option<u16>,
            #[serde(default = "default_security")]
            pub security: Security,
            /// Extra trust anchor (PEM) besides the system roots; verification is always on.
            pub ca_file: Option<PathBuf>,
            /// Name checked against the server certificate; defaults to `host`.
            pub tls_server_name: Option<String>,
            #[serde(default = "default_connect_timeout")]
            pub connect_timeout_secs: u64,
            /// Deadline for the greeting and each read or write after it.
            #[serde(default = "default_command_timeout")]
            pub command_timeout_secs: u64,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// The endpoint keys of this section.
            pub fn endpoint(&self) -> EndpointSettings {
                EndpointSettings {
                    host: self.host.clone(),
                    port: self.port,
                    security: self.security,
                    ca_file: self.ca_file.clone(),
                    tls_server_name: self.tls_server_name.clone(),
                    connect_timeout_secs: self.connect_timeout_secs,
                    command_timeout_secs: self.command_timeout_secs,
                }
            }
        }
    };
}

/// One upstream a login can be routed to.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendConfig {
    /// An IMAP store, served through the bridge (same keys as `[imap]`).
    Imap(ImapConfig),
    /// A legacy POP3 server: after login the session is relayed byte for byte.
    Pop3(Pop3BackendConfig),
}

server_section! {
    /// A legacy POP3 server (`kind = "pop3"`): the endpoint keys, then its own.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Pop3BackendConfig {
        /// Operator credentials for `popbridge migrate` (SASL PLAIN with the user as
        /// authorization identity); client sessions always log in with the client's own
        /// password.
        pub master_user: Option<String>,
        /// File holding the master user's password (first line); never inline in this file.
        pub master_password_file: Option<PathBuf>,
    }
}

impl Pop3BackendConfig {
    pub fn port(&self) -> u16 {
        self.endpoint().port(Protocol::Pop3)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolConfig {
    /// Listeners (`pop3`, `pop3s`) whose connections start with a PROXY v1/v2 header.
    pub listeners: Vec<String>,
    /// Only these source networks may send a header; anyone else is disconnected.
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Deadline for the header after connect.
    pub header_timeout_secs: u64,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        ProxyProtocolConfig {
            listeners: Vec::new(),
            trusted_networks: Vec::new(),
            header_timeout_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections open at once, all listeners together.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_ip: usize,
    /// From connect to a successful login, however active the client is.
    pub auth_timeout_secs: u64,
    /// Delay before answering the second failed login in a row; doubles after each failure.
    pub auth_penalty_base_ms: u64,
    /// Longest delay after a failed login.
    pub auth_penalty_max_secs: u64,
    /// Failures older than this are forgotten.
    pub auth_penalty_window_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1000,
            max_connections_per_ip: 20,
            auth_timeout_secs: 60,
            auth_penalty_base_ms: 2000,
            auth_penalty_max_secs: 15,
            auth_penalty_window_secs: 900,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// HTTP listener for /metrics, /healthz and /readyz; none when absent.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pop3Config {
    /// Plain POP3 listener.
    pub listen: SocketAddr,
    /// RETR sets `\Seen` upstream; TOP never does.
    #[serde(default = "default_true")]
    pub mark_seen: bool,
    /// Dovecot-compatible `pop3_uidl_format`.
    #[serde(default = "default_uidl_format")]
    pub uidl_format: String,
    /// RFC 1939 autologout timer for an idle client.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// How long a stopping server waits for running sessions before closing them.
    #[serde(default = "default_drain")]
    pub shutdown_drain_secs: u64,
    /// Accept queue length of the POP3 listeners (the kernel caps it at net.core.somaxconn).
    #[serde(default = "default_backlog")]
    pub listen_backlog: u32,
    /// Implicit-TLS listener (POP3S); needs `[pop3.tls]`.
    pub listen_tls: Option<SocketAddr>,
    /// Whether passwords may cross a connection without TLS.
    #[serde(default = "default_plaintext_auth")]
    pub plaintext_auth: PlaintextAuth,
    /// With `plaintext_auth = "tls_only"`, still allow passwords from loopback clients.
    #[serde(default)]
    pub plaintext_auth_loopback: bool,
    /// Deadline for a client's TLS handshake (POP3S or after STLS).
    #[serde(default = "default_handshake_timeout")]
    pub tls_handshake_timeout_secs: u64,
    /// Certificate for POP3S and STLS; STLS is offered on `listen` when present.
    pub tls: Option<ClientTlsConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaintextAuth {
    /// USER/PASS and AUTH PLAIN only over TLS (POP3S or after STLS).
    TlsOnly,
    /// Passwords are accepted on plain connections too.
    Always,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

server_section! {
    /// An IMAP store, served through the bridge: `[imap]` and `kind = "imap"` backends.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ImapConfig {
        /// The folder served as the POP3 maildrop.
        #[serde(default = "default_mailbox")]
        pub mailbox: String,
        /// Size of each `BODY.PEEK[]<offset.length>` piece (TOP, and RETR of small messages
        /// on servers that send UID after the body); also bounds one upstream response.
        #[serde(default = "default_fetch_chunk")]
        pub fetch_chunk_bytes: u32,
        /// UIDL format for users of this store; defaults to `pop3.uidl_format`.
        pub uidl_format: Option<String>,
        /// Log in as this master user (SASL PLAIN, the user as authorization identity)
        /// instead of with the client's password. Needs `verify_password_with`.
        pub master_user: Option<String>,
        /// File holding the master user's password (first line); never inline in this file.
        pub master_password_file: Option<PathBuf>,
        /// With a master user: the backend (a name from `[backends]`) that checks the client's
        /// password first, so no login is ever let in unchecked.
        pub verify_password_with: Option<String>,
    }
}

impl ImapConfig {
    pub fn port(&self) -> u16 {
        self.endpoint().port(Protocol::Imap)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the sled database (created if missing).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeletionMode {
    /// Keep the message upstream, flag it with `hide_keyword` and never show it to POP3 again.
    Hide,
    /// `UID STORE \Deleted` + `UID EXPUNGE` (UIDPLUS): removes only the committed messages.
    Expunge,
    /// `UID MOVE` (or `UID COPY` + `UID EXPUNGE`) into `move_to`.
    Move,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletionConfig {
    #[serde(default = "default_mode")]
    pub mode: DeletionMode,
    #[serde(default = "default_move_to")]
    pub move_to: String,
    #[serde(default = "default_hide_keyword")]
    pub hide_keyword: String,
}

impl Default for DeletionConfig {
    fn default() -> Self {
        Self {
            mode: default_mode(),
            move_to: default_move_to(),
            hide_keyword: default_hide_keyword(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_uidl_format() -> String {
    "%08Xu%08Xv".into()
}
fn default_idle_timeout() -> u64 {
    600
}
fn default_drain() -> u64 {
    30
}
fn default_backlog() -> u32 {
    1024
}
fn default_plaintext_auth() -> PlaintextAuth {
    PlaintextAuth::TlsOnly
}
fn default_handshake_timeout() -> u64 {
    60
}
fn default_security() -> Security {
    Security::Tls
}
fn default_mailbox() -> String {
    "INBOX".into()
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_command_timeout() -> u64 {
    60
}
fn default_fetch_chunk() -> u32 {
    1024 * 1024
}
fn default_mode() -> DeletionMode {
    DeletionMode::Hide
}
fn default_move_to() -> String {
    "Trash".into()
}
fn default_hide_keyword() -> String {
    "$POP3Deleted".into()
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
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = (key != ".").then_some(key);
            err(key, one_line(e.inner()))
        })?;
        config
            .validate()
            .map_err(|(key, msg)| err(Some(key), msg))?;
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

fn validate_imap(prefix: &str, imap: &ImapConfig) -> Result<(), (String, String)> {
    let key = |k: &str| format!("{prefix}.{k}");
    validate_endpoint(prefix, &imap.endpoint())?;
    if imap.mailbox.is_empty() {
        return Err((key("mailbox"), "must not be empty".into()));
    }
    if !(4096..=16 * 1024 * 1024).contains(&imap.fetch_chunk_bytes) {
        return Err((
            key("fetch_chunk_bytes"),
            "must be between 4096 and 16777216".into(),
        ));
    }
    if let Some(f) = &imap.uidl_format {
        UidlFormat::parse(f).map_err(|e| (key("uidl_format"), e.to_string()))?;
    }
    validate_master(
        prefix,
        imap.master_user.as_deref(),
        imap.master_password_file.as_deref(),
    )?;
    match (&imap.master_user, &imap.verify_password_with) {
        (Some(_), None) => Err((
            key("verify_password_with"),
            "is required with master_user: name the backend that checks the client's password (a master login alone would let any password in)".into(),
        )),
        (None, Some(_)) => Err((key("verify_password_with"), "only makes sense with master_user".into())),
        _ => Ok(()),
    }
}

fn validate_pop3_backend(prefix: &str, p: &Pop3BackendConfig) -> Result<(), (String, String)> {
    validate_endpoint(prefix, &p.endpoint())?;
    validate_master(
        prefix,
        p.master_user.as_deref(),
        p.master_password_file.as_deref(),
    )
}

/// The endpoint keys of a server section, checked where they are defined.
fn validate_endpoint(prefix: &str, e: &EndpointSettings) -> Result<(), (String, String)> {
    e.validate().map_err(|(key, why)| {
        // The reasons may name sibling keys ("security"): qualify them too.
        let why = why.replace("security = ", &format!("{prefix}.security = "));
        (format!("{prefix}.{key}"), why)
    })
}

fn validate_master(
    prefix: &str,
    user: Option<&str>,
    password_file: Option<&Path>,
) -> Result<(), (String, String)> {
    match (user, password_file) {
        (None, None) => Ok(()),
        (Some(_), None) => Err((
            format!("{prefix}.master_password_file"),
            "is required with master_user".into(),
        )),
        (None, Some(_)) => Err((
            format!("{prefix}.master_user"),
            "is required with master_password_file".into(),
        )),
        (Some(u), Some(f)) => {
            if u.is_empty() {
                return Err((format!("{prefix}.master_user"), "must not be empty".into()));
            }
            read_secret(f)
                .map(|_| ())
                .map_err(|e| (format!("{prefix}.master_password_file"), e))
        }
    }
}

/// RFC 3501 `atom`: what a keyword flag may contain.
fn is_imap_atom(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| (0x21..0x7f).contains(&b) && !b"(){ %*\"\\]".contains(&b))
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
