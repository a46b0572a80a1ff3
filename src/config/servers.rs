//! The upstream server sections: `[imap]` and `[backends.X]` of either kind. Their endpoint
//! keys are declared once ([`server_section!`]) and checked by the upstream layer
//! ([`EndpointSettings::validate`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::read_secret;
use crate::uidl::UidlFormat;
use crate::upstream::oauth::settings::{OAuthSettings, TokenSource};
use crate::upstream::{EndpointSettings, Protocol, Security};

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
            /// Tell the server the client's address before login: IMAP ID (RFC 2971,
            /// `x-originating-ip` ...) or POP3 XCLIENT, when the server offers it.
            #[serde(default)]
            pub forward_client_address: bool,
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
                    forward_client_address: self.forward_client_address,
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
        /// RFC 2449 LOGIN-DELAY for users of this backend, in seconds (0: none); defaults to
        /// `limits.login_delay_secs`.
        pub login_delay_secs: Option<u64>,
        /// RFC 2449 EXPIRE: days the store itself keeps mail a POP3 client leaves on it (an
        /// autoexpunge, a provider's policy). Unset: popbridge never removes such mail, so
        /// CAPA says `EXPIRE NEVER`.
        pub expire_days: Option<u32>,
    }
}

impl Pop3BackendConfig {
    pub fn port(&self) -> u16 {
        self.endpoint().port(Protocol::Pop3)
    }
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
        /// With a master user or an application's OAuth token: the backend (a name from
        /// `[backends]`) that checks the client's password first, so no login is ever let in
        /// unchecked.
        pub verify_password_with: Option<String>,
        /// Log in with OAuth 2.0 tokens (`[imap.oauth]`, `[backends.X.oauth]`).
        pub oauth: Option<Box<OAuthSettings>>,
        /// Folders served together as one maildrop, in this order; the first must be
        /// `mailbox`. Empty: `folders.mailboxes` (filled in at load), else `mailbox` alone.
        #[serde(default)]
        pub mailboxes: Vec<String>,
        /// RFC 2449 LOGIN-DELAY for users of this backend, in seconds (0: none); defaults to
        /// `limits.login_delay_secs`.
        pub login_delay_secs: Option<u64>,
        /// RFC 2449 EXPIRE: days the store itself keeps mail a POP3 client leaves on it (an
        /// autoexpunge, a provider's policy). Unset: popbridge never removes such mail, so
        /// CAPA says `EXPIRE NEVER`.
        pub expire_days: Option<u32>,
        /// Days hidden mail is kept (see `deletion.retention_days`, the default, filled in
        /// at load).
        pub retention_days: Option<u32>,
        /// Days of mail a per-device view lists (see `[views]`, the default, filled in at
        /// load); 0: this backend has no view.
        pub recent_days: Option<u32>,
        /// Seconds a user's logged-in upstream connection is kept after a clean end of the
        /// POP3 session, for that user's next session (0: off, the default). Password logins
        /// only (LOGIN, master PLAIN); at most [`KEEP_ALIVE_SECS_MAX`].
        #[serde(default)]
        pub keep_alive_secs: u64,
        /// At most this many connections kept for this backend on this node; when full, the
        /// oldest is logged out.
        #[serde(default = "default_keep_alive_max")]
        pub keep_alive_max: u32,
    }
}

/// The longest `keep_alive_secs` accepted: a kept connection delays a server-side password
/// change (or a disabled account) for that long.
pub const KEEP_ALIVE_SECS_MAX: u64 = 1800;
/// The most `keep_alive_max` accepted.
pub const KEEP_ALIVE_MAX_MAX: u32 = 65536;

impl ImapConfig {
    pub fn port(&self) -> u16 {
        self.endpoint().port(Protocol::Imap)
    }

    /// The folders served, in listing order: `mailboxes`, or `mailbox` alone.
    pub fn folders(&self) -> Vec<String> {
        if self.mailboxes.is_empty() {
            vec![self.mailbox.clone()]
        } else {
            self.mailboxes.clone()
        }
    }
}

pub(super) fn validate_imap(prefix: &str, imap: &ImapConfig) -> Result<(), (String, String)> {
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
    if let Some(oauth) = &imap.oauth {
        if imap.master_user.is_some() {
            return Err((
                key("oauth"),
                "and master_user are two ways to log in: keep one".into(),
            ));
        }
        oauth
            .validate(imap.verify_password_with.is_some())
            .map_err(|(k, m)| (format!("{prefix}.oauth.{k}"), m))?;
    }
    if imap.keep_alive_secs > KEEP_ALIVE_SECS_MAX {
        return Err((
            key("keep_alive_secs"),
            format!("must be at most {KEEP_ALIVE_SECS_MAX} (seconds)"),
        ));
    }
    if !(1..=KEEP_ALIVE_MAX_MAX).contains(&imap.keep_alive_max) {
        return Err((
            key("keep_alive_max"),
            format!("must be between 1 and {KEEP_ALIVE_MAX_MAX}"),
        ));
    }
    if imap.keep_alive_secs > 0 && imap.oauth.is_some() {
        return Err((
            key("keep_alive_secs"),
            "applies to password logins only; this backend logs in with OAuth tokens: set it to 0"
                .into(),
        ));
    }
    let app_tokens = imap
        .oauth
        .as_ref()
        .is_some_and(|o| o.tokens == TokenSource::App);
    match (&imap.master_user, &imap.verify_password_with) {
        (Some(_), None) => Err((
            key("verify_password_with"),
            "is required with master_user: name the backend that checks the client's password (a master login alone would let any password in)".into(),
        )),
        (None, Some(_)) if !app_tokens => Err((
            key("verify_password_with"),
            "only makes sense with master_user or oauth.tokens = \"app\"".into(),
        )),
        _ => Ok(()),
    }
}

pub(super) fn validate_pop3_backend(
    prefix: &str,
    p: &Pop3BackendConfig,
) -> Result<(), (String, String)> {
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
fn default_keep_alive_max() -> u32 {
    256
}
fn default_fetch_chunk() -> u32 {
    1024 * 1024
}
