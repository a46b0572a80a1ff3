//! The sections that configure popbridge itself: the POP3 listeners, limits, the PROXY
//! protocol, metrics, the state directory, deletion and migration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

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

/// Per-device views (`recent:alice`): a login form giving a session the last days of mail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewsConfig {
    /// What a login starts with to ask for the view (matched without regard to ASCII case).
    pub prefix: String,
    /// Days of mail a view lists, for backends without their own `recent_days`; 0: no view.
    pub recent_days: u32,
    /// What a view's committed DELE does upstream.
    pub dele: ViewDele,
}

impl Default for ViewsConfig {
    fn default() -> Self {
        ViewsConfig {
            prefix: "recent:".into(),
            recent_days: 0,
            dele: ViewDele::Nothing,
        }
    }
}

/// What a per-device view's committed DELE does upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewDele {
    /// Nothing: the message stays as it was for every device.
    Nothing,
    /// `UID STORE +FLAGS (\Seen)`.
    Seen,
}

/// Defaults for what each IMAP backend serves (a backend's own keys win).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoldersConfig {
    /// Folders served together as one maildrop, for backends without `mailboxes`.
    pub mailboxes: Vec<String>,
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
    /// RFC 2449 LOGIN-DELAY: least seconds between two logins of one user (0: none), unless
    /// the user's backend sets its own `login_delay_secs`.
    pub login_delay_secs: u64,
    /// After an upstream answers with pressure (RFC 5530 THROTTLED, LIMIT, UNAVAILABLE), new
    /// logins of that user (or, for UNAVAILABLE, that backend) are answered at once for this
    /// long, doubling while the pressure goes on ...
    pub backoff_base_secs: u64,
    /// ... up to this.
    pub backoff_max_secs: u64,
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
            login_delay_secs: 0,
            backoff_base_secs: 5,
            backoff_max_secs: 300,
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
    /// Lame duck: how long a stopping server still accepts new sessions while `/readyz`
    /// answers 503, so a load balancer takes it out of rotation before its listener closes.
    #[serde(default)]
    pub shutdown_lame_duck_secs: u64,
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
    /// With `mode = "hide"`: hidden mail older than this many days (INTERNALDATE) is removed
    /// at a session's commit; 0 keeps it for ever. Backends may set their own.
    #[serde(default)]
    pub retention_days: u32,
    /// What retention does to such mail.
    #[serde(default = "default_retention_action")]
    pub retention_action: RetentionAction,
    /// UIDs per retention command (and a tenth of the most removed per folder and commit).
    #[serde(default = "default_retention_batch")]
    pub retention_batch: u32,
}

/// What retention does to hidden mail past its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionAction {
    /// `UID STORE +FLAGS (\Deleted)` + `UID EXPUNGE` (UIDPLUS).
    Expunge,
    /// `UID MOVE` (or `UID COPY` + `UID EXPUNGE`) into `move_to`.
    Move,
}

impl Default for DeletionConfig {
    fn default() -> Self {
        Self {
            mode: default_mode(),
            move_to: default_move_to(),
            hide_keyword: default_hide_keyword(),
            retention_days: 0,
            retention_action: default_retention_action(),
            retention_batch: default_retention_batch(),
        }
    }
}

fn default_retention_action() -> RetentionAction {
    RetentionAction::Expunge
}
fn default_retention_batch() -> u32 {
    500
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
fn default_mode() -> DeletionMode {
    DeletionMode::Hide
}
fn default_move_to() -> String {
    "Trash".into()
}
fn default_hide_keyword() -> String {
    "$POP3Deleted".into()
}

/// RFC 3501 `atom`: what a keyword flag may contain.
pub(super) fn is_imap_atom(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| (0x21..0x7f).contains(&b) && !b"(){ %*\"\\]".contains(&b))
}
