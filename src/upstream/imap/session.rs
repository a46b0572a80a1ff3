//! Setting up an IMAP session: connect, log in with a [`Mechanism`], learn the capabilities
//! (from the login's answer when the server lists them there, else with `CAPABILITY`), and the
//! `SELECT`/`EXAMINE` answer every user of a folder needs ([`MailboxStatus`]). `serve` and
//! `migrate` open their sessions here.

use std::collections::HashSet;

use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::{IString, NString};
use imap_next::imap_types::flag::FlagPerm;
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data};

use super::conn::ImapConnection;
use super::engine::{Completion, ConnLimits, ImapError, Untagged};
use super::login::Mechanism;
use crate::maildrop::Signal;
use crate::metrics::{metrics, Timer};
use crate::upstream::client_address::{self, ClientAddress};
use crate::upstream::credentials::Unsendable;
use crate::upstream::endpoint::Endpoint;

/// What the server says it can do after login, upper-cased (`MOVE`, `UIDPLUS`, `METADATA`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities(HashSet<String>);

impl Capabilities {
    pub fn has(&self, name: &str) -> bool {
        self.0.contains(&name.to_ascii_uppercase())
    }

    /// Adds capabilities as the server names them (`Capability` displays as on the wire).
    pub fn extend<T: std::fmt::Display>(&mut self, list: impl IntoIterator<Item = T>) {
        self.0
            .extend(list.into_iter().map(|c| c.to_string().to_ascii_uppercase()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Connecting, TLS or the conversation failed.
    #[error(transparent)]
    Imap(#[from] ImapError),
    /// The credentials cannot be sent; nothing was.
    #[error(transparent)]
    Unsendable(#[from] Unsendable),
    /// The server answered the login NO or BAD (RFC 5530 codes tell why); `challenge` is
    /// the status an OAuth mechanism received first (RFC 7628), if any.
    #[error("login refused: {}", done.text)]
    Refused {
        done: Completion,
        challenge: Option<String>,
    },
    /// The `CAPABILITY` command failed.
    #[error("CAPABILITY failed: {0}")]
    Capability(String),
}

/// A logged-in IMAP session.
pub struct Session {
    pub conn: ImapConnection,
    pub capabilities: Capabilities,
}

/// Connects to `endpoint` and logs in with `mechanism`.
pub async fn open(
    endpoint: &Endpoint,
    limits: ConnLimits,
    mechanism: &dyn Mechanism,
) -> Result<Session, SessionError> {
    let mut conn = ImapConnection::connect(endpoint, limits).await?;
    let login = match mechanism.command(conn.offers_sasl_ir()) {
        Ok(l) => l,
        Err(e) => {
            conn.logout().await;
            return Err(e.into());
        }
    };
    // The client's address goes ahead of the login, pipelined: no extra round trip.
    let id = if endpoint.forward_client_address && conn.offers_id() {
        client_address::current().and_then(|c| id_command(&c))
    } else {
        None
    };
    let timer = Timer::start(&metrics().upstream_login_duration);
    let done = conn.execute_login_after(id, login).await;
    drop(timer);
    let result = match &done {
        Ok(d) if d.is_ok() => "ok",
        Ok(_) => "refused",
        Err(_) => "failed",
    };
    metrics()
        .upstream_logins
        .with_label_values(&[&mechanism.name().to_ascii_lowercase(), result])
        .inc();
    let done = done?;
    if !done.is_ok() {
        // RFC 7628's JSON status, when the mechanism got one (it never holds the token).
        let challenge = conn.take_sasl_challenge();
        conn.logout().await;
        return Err(SessionError::Refused {
            done,
            challenge: challenge.map(|c| String::from_utf8_lossy(&c).chars().take(512).collect()),
        });
    }
    // Servers may list their post-login capabilities in the login's answer (Dovecot and
    // Cyrus do, RFC 3501 7.1): that saves a round trip on every login.
    let mut capabilities = Capabilities::default();
    if let Some(Code::Capability(list)) = &done.code {
        capabilities.extend(list.as_ref());
    }
    if capabilities.is_empty() {
        let done = conn
            .execute(CommandBody::Capability, |u| {
                if let Untagged::Data(Data::Capability(list)) = u {
                    capabilities.extend(list.as_ref());
                }
            })
            .await?;
        if !done.is_ok() {
            return Err(SessionError::Capability(done.text));
        }
    }
    conn.logged_in_at = Some(std::time::Instant::now());
    Ok(Session { conn, capabilities })
}

/// `ID ("x-originating-ip" "..." ...)` (RFC 2971) for `client`; `None` if a value cannot be
/// sent (never the case for addresses and popbridge's session ids).
fn id_command(client: &ClientAddress) -> Option<CommandBody<'static>> {
    let parameters = client
        .id_fields()
        .into_iter()
        .map(|(k, v)| {
            Some((
                IString::try_from(k).ok()?,
                NString(Some(IString::try_from(v).ok()?)),
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(CommandBody::Id {
        parameters: Some(parameters),
    })
}

/// What a NO or BAD says about the server's load, from its response code (RFC 5530 and the
/// `THROTTLED` of big providers): `None` for anything else (bad credentials, a missing
/// folder, a server bug). Checked at login, SELECT and FETCH.
pub fn pressure(done: &Completion) -> Option<Signal> {
    if done.is_ok() {
        return None;
    }
    // The streamed FETCH's own parser leaves the code in the text (`[THROTTLED] Slow down`).
    let code = done.other_code().or_else(|| {
        let (code, _) = done.text.strip_prefix('[')?.split_once(']')?;
        Some(code.to_ascii_uppercase())
    })?;
    let name = code.split(' ').next().unwrap_or_default();
    match name {
        "THROTTLED" => Some(Signal::Throttled),
        "LIMIT" => Some(Signal::Limit),
        "INUSE" => Some(Signal::InUse),
        "UNAVAILABLE" => Some(Signal::Unavailable),
        _ => None,
    }
}

/// `SELECT` (or, `read_only`, `EXAMINE`) of `name`.
pub fn select(name: &str, read_only: bool) -> Result<CommandBody<'static>, String> {
    let mailbox =
        Mailbox::try_from(name.to_owned()).map_err(|e| format!("mailbox name {name:?}: {e}"))?;
    let body = if read_only {
        CommandBody::examine(mailbox)
    } else {
        CommandBody::select(mailbox)
    };
    body.map_err(|e| format!("mailbox name {name:?}: {e}"))
}

/// What a `SELECT`/`EXAMINE` reported about the folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailboxStatus {
    pub uid_validity: Option<u32>,
    /// UIDNEXT, when reported (bounds a legacy UIDL map's entries).
    pub uid_next: Option<u32>,
    pub read_only: bool,
    /// `PERMANENTFLAGS`: whether `\*` (any new keyword) is allowed, and the flags named
    /// (lower-cased); `None` when not reported (RFC 3501: then every flag is permanent).
    pub permanent_flags: Option<(bool, HashSet<String>)>,
}

impl MailboxStatus {
    /// Takes what it needs from an untagged response of the SELECT; `false` for anything else.
    pub fn absorb(&mut self, u: &Untagged) -> bool {
        let Untagged::Status {
            code: Some(code), ..
        } = u
        else {
            return false;
        };
        match code {
            Code::UidValidity(v) => self.uid_validity = Some(v.get()),
            Code::UidNext(v) => self.uid_next = Some(v.get()),
            Code::ReadOnly => self.read_only = true,
            Code::PermanentFlags(flags) => {
                let any = flags.iter().any(|f| matches!(f, FlagPerm::Asterisk));
                let named = flags
                    .iter()
                    .filter_map(|f| match f {
                        FlagPerm::Flag(f) => Some(f.to_string().to_ascii_lowercase()),
                        FlagPerm::Asterisk => None,
                    })
                    .collect();
                self.permanent_flags = Some((any, named));
            }
            _ => return false,
        }
        true
    }

    /// The SELECT's own completion may say `[READ-ONLY]`.
    pub fn complete(&mut self, done: &Completion) {
        if matches!(done.code, Some(Code::ReadOnly)) {
            self.read_only = true;
        }
    }

    /// Whether keyword `flag` can be stored for good in this folder.
    pub fn can_store(&self, flag: &str) -> bool {
        match &self.permanent_flags {
            None => true,
            Some((any, named)) => *any || named.contains(&flag.to_ascii_lowercase()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_next::imap_types::response::{CodeOther, StatusKind};

    fn done(kind: StatusKind, code: Option<&'static [u8]>) -> Completion {
        Completion {
            kind,
            code: code.map(|c| Code::Other(CodeOther::unvalidated(c))),
            text: "x".into(),
        }
    }

    /// ID goes out in the same write as the login: the server reads both lines before it
    /// answers anything (a client waiting for ID's answer would stall here).
    #[tokio::test]
    async fn id_is_pipelined_with_the_login() {
        use super::super::engine::ConnLimits;
        use super::super::login::LoginCommand;
        use std::time::Duration;
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"* OK [CAPABILITY IMAP4rev1 ID] ready\r\n")
                .await
                .unwrap();
            let mut lines = Vec::new();
            for _ in 0..2 {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                lines.push(l);
            }
            let tag = |l: &str| l.split(' ').next().unwrap().to_owned();
            let reply = format!(
                "* ID NIL\r\n{} OK ID done\r\n{} OK [CAPABILITY IMAP4rev1] Logged in\r\n",
                tag(&lines[0]),
                tag(&lines[1])
            );
            w.write_all(reply.as_bytes()).await.unwrap();
            lines
        });
        let limits = ConnLimits {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
            max_response_size: 1 << 20,
        };
        let mut conn = ImapConnection::over(Box::new(a), limits, false)
            .await
            .unwrap();
        assert!(conn.offers_id());
        let client = ClientAddress {
            client: "203.0.113.7:51000".parse().unwrap(),
            local: "127.0.0.1:110".parse().unwrap(),
            session: "s1".into(),
        };
        let login = LoginCommand {
            command: CommandBody::login("u", "p").unwrap(),
            continuation: None,
            after_error: None,
        };
        let done = conn
            .execute_login_after(id_command(&client), login)
            .await
            .unwrap();
        assert!(done.is_ok(), "{done:?}");
        let lines = server.await.unwrap();
        assert!(
            lines[0].contains(
                "ID (\"x-originating-ip\" \"203.0.113.7\" \"x-originating-port\" \"51000\" \
                 \"x-connected-ip\" \"127.0.0.1\" \"x-connected-port\" \"110\" \
                 \"x-session-id\" \"s1\")"
            ),
            "{lines:?}"
        );
        assert!(lines[1].contains("LOGIN"), "{lines:?}");
    }

    #[test]
    fn pressure_codes() {
        use StatusKind::*;
        assert_eq!(
            pressure(&done(No, Some(b"THROTTLED"))),
            Some(Signal::Throttled)
        );
        assert_eq!(pressure(&done(No, Some(b"limit"))), Some(Signal::Limit));
        assert_eq!(pressure(&done(Bad, Some(b"INUSE"))), Some(Signal::InUse));
        assert_eq!(
            pressure(&done(No, Some(b"UNAVAILABLE"))),
            Some(Signal::Unavailable)
        );
        assert_eq!(pressure(&done(No, Some(b"AUTHENTICATIONFAILED"))), None);
        assert_eq!(pressure(&done(No, Some(b"SERVERBUG"))), None);
        assert_eq!(pressure(&done(No, None)), None);
        assert_eq!(pressure(&done(Ok, Some(b"THROTTLED"))), None);
        let in_text = Completion {
            kind: No,
            code: None,
            text: "[throttled] Slow down".into(),
        };
        assert_eq!(pressure(&in_text), Some(Signal::Throttled));
    }
}
