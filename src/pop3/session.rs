//! The POP3 state machine (RFC 1939 AUTHORIZATION → TRANSACTION → UPDATE), sans-I/O: it turns
//! lines into [`Action`]s and upstream results into reply bytes. The driver in
//! [`super::connection`] owns the socket and the maildrop. SASL's mechanisms and responses
//! are in `sasl.rs`, the TRANSACTION commands in `transaction.rs`.

use std::sync::Arc;

use super::command::MAX_SASL_LINE;
use super::command::{parse, Command, CommandError, Password, TooLong, MAX_COMMAND_LINE};
use super::policy::{Advertised, UserPolicy};
use super::response::{err, multiline, ok, RespCode};
use crate::maildrop::{MaildropError, Signal, Snapshot};
use crate::uidl::UidlFormat;
use sasl::{Mechanism, OAUTH_ERROR_CHALLENGE};
use transaction::TxError;

/// After this many `-ERR`s the session is closed (slows down guessing and broken clients).
pub const MAX_ERRORS: u32 = 20;

/// Per-listener settings shared by all sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub uidl_format: UidlFormat,
    /// Flag messages `\Seen` upstream after a complete RETR.
    pub mark_seen: bool,
    /// Sent in CAPA as `IMPLEMENTATION`, e.g. "popbridge 0.1.0".
    pub implementation: String,
    /// Text of the `+OK` greeting.
    pub greeting: String,
    /// Offer and accept `AUTH XOAUTH2` and `AUTH OAUTHBEARER` (a backend takes the client's
    /// own token upstream).
    pub sasl_oauth: bool,
    /// RFC 2449 LOGIN-DELAY and EXPIRE as CAPA shows them before login.
    pub policy: Advertised,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            uidl_format: UidlFormat::default(),
            mark_seen: false,
            implementation: concat!("popbridge ", env!("CARGO_PKG_VERSION")).to_owned(),
            greeting: "popbridge ready.".to_owned(),
            sasl_oauth: false,
            policy: Advertised::default(),
        }
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Action {
    /// Write these bytes (complete single- or multi-line response).
    Reply(Vec<u8>),
    /// Log in upstream, then call [`Session::on_login`].
    Login { user: String, secret: LoginSecret },
    /// RETR/TOP of message number `msg`: fetch the first chunk, then write `ok_line`, stream the
    /// body through a [`super::response::DotStuffer`] (`top_lines` selects TOP), end with `.`.
    /// If the first fetch fails, write [`Session::on_retrieve_failed`] instead.
    Retrieve {
        msg: u32,
        uid: u32,
        size: u64,
        top_lines: Option<u32>,
        ok_line: Vec<u8>,
    },
    /// QUIT in TRANSACTION: apply the deletions, then call [`Session::on_commit`], write its
    /// reply and close.
    Commit { uids: Vec<u32> },
    /// STLS accepted: write these bytes, discard anything the client pipelined behind STLS
    /// (it must never be read as if it came through TLS: CVE-2011-0411), run the TLS
    /// handshake, then call [`Session::on_tls_established`].
    StartTls(Vec<u8>),
    /// Write these bytes and close without committing.
    Close(Vec<u8>),
}

/// What a client logs in with.
#[derive(Debug)]
pub enum LoginSecret {
    /// USER/PASS or AUTH PLAIN.
    Password(Password),
    /// An OAuth 2.0 bearer token (AUTH XOAUTH2 or OAUTHBEARER), for the backend to pass on.
    Bearer(Password),
}

#[derive(Debug)]
enum State {
    Authorization {
        user: Option<String>,
        /// `AUTH <mechanism>` sent `+ ` and waits for the client's response line.
        sasl_pending: Option<Mechanism>,
        /// A token login was refused: the error challenge went out, and this `-ERR` answers
        /// whatever the client sends next (RFC 7628 3.2.3).
        sasl_error: Option<Vec<u8>>,
        login_pending: bool,
        /// The login in progress uses a bearer token.
        bearer_login: bool,
    },
    Transaction {
        snapshot: Snapshot,
        deleted: Vec<bool>,
    },
    Update,
}

/// An answer to an upstream result (a login, a failed RETR/TOP): write `bytes`, then close
/// the connection if `close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub close: bool,
}

/// One client's POP3 session.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    state: State,
    errors: u32,
    security: Security,
    /// The logged-in user's LOGIN-DELAY and EXPIRE (their backend's).
    user_policy: Option<UserPolicy>,
}

/// What the connection offers: is it encrypted, can it become so, may passwords cross it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Security {
    /// The connection is TLS (POP3S, or after STLS).
    pub tls: bool,
    /// STLS can be offered (a certificate is configured and TLS is not yet on).
    pub stls: bool,
    /// Policy allows USER/PASS and AUTH PLAIN without TLS on this connection.
    pub plaintext_auth: bool,
}

impl Default for Security {
    /// A plain connection where passwords are allowed (tests and trusted networks).
    fn default() -> Self {
        Security {
            tls: false,
            stls: false,
            plaintext_auth: true,
        }
    }
}

impl Security {
    fn auth_allowed(&self) -> bool {
        self.tls || self.plaintext_auth
    }
}

const PLAINTEXT_REFUSED: &str =
    "Plaintext authentication disallowed on non-secure connections: use STLS or POP3S first.";

fn auth_state() -> State {
    State::Authorization {
        user: None,
        sasl_pending: None,
        sasl_error: None,
        login_pending: false,
        bearer_login: false,
    }
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>) -> Self {
        Self {
            cfg,
            state: auth_state(),
            errors: 0,
            security: Security::default(),
            user_policy: None,
        }
    }

    /// Set what the connection offers; before the greeting.
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// Serve UIDLs in `format` (the backend the login was routed to has its own); before
    /// [`Session::on_login`].
    pub fn set_uidl_format(&mut self, format: UidlFormat) {
        Arc::make_mut(&mut self.cfg).uidl_format = format;
    }

    /// The logged-in user's backend's LOGIN-DELAY and EXPIRE, for CAPA after login.
    pub fn set_user_policy(&mut self, policy: UserPolicy) {
        self.user_policy = Some(policy);
    }

    /// The TLS handshake after STLS succeeded: RFC 2595 starts AUTHORIZATION afresh.
    pub fn on_tls_established(&mut self) {
        self.security.tls = true;
        self.security.stls = false;
        self.state = auth_state();
    }

    pub fn greeting(&self) -> Vec<u8> {
        ok(&self.cfg.greeting)
    }

    /// Line limit for the next line: before login, room for an AUTH command whose initial
    /// response carries a token, and for a SASL response (RFC 5034: the 255-octet command
    /// limit does not apply to them); other commands longer than that are refused by the
    /// session. After login, the command limit.
    pub fn max_line_len(&self) -> usize {
        match self.state {
            State::Authorization { .. } => MAX_SASL_LINE,
            _ => MAX_COMMAND_LINE,
        }
    }

    /// The next line is the client's answer to a SASL challenge, not a command.
    pub fn awaits_sasl_response(&self) -> bool {
        matches!(
            self.state,
            State::Authorization {
                sasl_pending: Some(_),
                ..
            } | State::Authorization {
                sasl_error: Some(_),
                ..
            }
        )
    }

    pub fn is_authenticated(&self) -> bool {
        !matches!(self.state, State::Authorization { .. })
    }

    /// True once the error cap closed the session.
    pub fn error_limit_reached(&self) -> bool {
        self.errors >= MAX_ERRORS
    }

    /// Counts an error; the reply, or a closing one once the cap is reached.
    fn fail(&mut self, reply: Vec<u8>) -> Action {
        let r = self.fail_reply(reply);
        if r.close {
            Action::Close(r.bytes)
        } else {
            Action::Reply(r.bytes)
        }
    }

    /// [`Self::fail`] as a [`Reply`].
    fn fail_reply(&mut self, reply: Vec<u8>) -> Reply {
        self.errors = self.errors.saturating_add(1);
        if self.error_limit_reached() {
            Reply {
                bytes: err(None, "Too many errors, closing connection."),
                close: true,
            }
        } else {
            Reply {
                bytes: reply,
                close: false,
            }
        }
    }

    pub fn on_line(&mut self, line: Result<&[u8], TooLong>) -> Action {
        if let State::Authorization { sasl_error, .. } = &mut self.state {
            if let Some(reply) = sasl_error.take() {
                // Whatever the client answered the error challenge with.
                return self.fail(reply);
            }
        }
        if let State::Authorization { sasl_pending, .. } = &mut self.state {
            if let Some(mechanism) = sasl_pending.take() {
                return match line {
                    Err(TooLong) => self.fail(err(None, "SASL response too long.")),
                    Ok(b"*") => self.fail(err(None, "Authentication cancelled.")),
                    Ok(resp) => self.sasl_response(mechanism, resp),
                };
            }
        }
        let line = match line {
            Ok(l) => l,
            Err(TooLong) => return self.fail(err(None, "Line too long.")),
        };
        // Only AUTH may exceed the command limit (its initial response carries a token).
        if line.len() > MAX_COMMAND_LINE
            && !line[..5.min(line.len())].eq_ignore_ascii_case(b"AUTH ")
        {
            return self.fail(err(None, "Line too long."));
        }
        let cmd = match parse(line) {
            Ok(c) => c,
            Err(e @ CommandError::Unknown) | Err(e @ CommandError::Empty) => {
                return self.fail(err(None, &format!("{}.", capitalise(&e.to_string()))))
            }
            Err(e) => return self.fail(err(None, &format!("{e}."))),
        };
        // Valid in every state.
        match cmd {
            Command::Capa => return Action::Reply(self.capa()),
            Command::Noop if self.is_authenticated() => return Action::Reply(ok("")),
            _ => {}
        }
        match &mut self.state {
            State::Authorization {
                login_pending: true,
                ..
            } => self.fail(err(None, "Login in progress.")),
            State::Authorization { .. }
                if !self.security.auth_allowed()
                    && matches!(cmd, Command::User(_) | Command::Pass(_) | Command::Auth { .. }) =>
            {
                self.fail(err(Some(RespCode::Auth), PLAINTEXT_REFUSED))
            }
            State::Authorization { .. } if matches!(cmd, Command::Stls) => {
                if self.security.tls {
                    self.fail(err(None, "Already using TLS."))
                } else if !self.security.stls {
                    self.fail(err(None, "STLS not available."))
                } else {
                    Action::StartTls(ok("Begin TLS negotiation now."))
                }
            }
            State::Authorization { user, .. } => match cmd {
                Command::User(name) => {
                    *user = Some(name);
                    Action::Reply(ok(""))
                }
                Command::Pass(password) => match user.take() {
                    Some(user) => self.login(user, LoginSecret::Password(password)),
                    None => self.fail(err(None, "No username given.")),
                },
                Command::Auth {
                    mechanism: None, ..
                } => Action::Reply(multiline("", self.mechanisms())),
                Command::Auth {
                    mechanism: Some(m),
                    initial_response,
                } => {
                    let Some(mechanism) = Mechanism::parse(&m, self.cfg.sasl_oauth) else {
                        return self.fail(err(None, "Unsupported authentication mechanism."));
                    };
                    match initial_response {
                        Some(r) => self.sasl_response(mechanism, r.as_bytes()),
                        None => {
                            if let State::Authorization { sasl_pending, .. } = &mut self.state {
                                *sasl_pending = Some(mechanism);
                            }
                            Action::Reply(b"+ \r\n".to_vec())
                        }
                    }
                }
                Command::Apop { .. } => self.fail(err(
                    None,
                    "APOP not supported: a proxy cannot verify APOP digests, use USER/PASS or AUTH PLAIN.",
                )),
                Command::Quit => {
                    self.state = State::Update;
                    Action::Close(ok("Logging out."))
                }
                _ => self.fail(err(None, "Unknown command in AUTHORIZATION state.")),
            },
            State::Transaction { snapshot, deleted } => {
                match Self::transaction(cmd, snapshot, deleted, &self.cfg) {
                    Ok(action) => action,
                    Err(TxError {
                        quit: Some(quit), ..
                    }) => {
                        self.state = State::Update;
                        quit
                    }
                    Err(e) => self.fail(e.reply),
                }
            }
            State::Update => self.fail(err(None, "Session is closing.")),
        }
    }

    fn login(&mut self, user: String, secret: LoginSecret) -> Action {
        // Control characters in a name would forge log lines, and no real login has them;
        // refusing them here also lets state and lock keys use `\n` as a separator.
        if user.chars().any(char::is_control) {
            return self.fail(err(
                Some(RespCode::Auth),
                "Invalid characters in the login name.",
            ));
        }
        if let State::Authorization {
            login_pending,
            bearer_login,
            ..
        } = &mut self.state
        {
            *login_pending = true;
            *bearer_login = matches!(secret, LoginSecret::Bearer(_));
        }
        Action::Login { user, secret }
    }

    /// Reply to the upstream login started by [`Action::Login`].
    pub fn on_login(&mut self, r: Result<Snapshot, MaildropError>) -> Reply {
        match r {
            Ok(snapshot) => {
                let deleted = vec![false; snapshot.messages.len()];
                self.state = State::Transaction { snapshot, deleted };
                Reply {
                    bytes: ok("Logged in."),
                    close: false,
                }
            }
            Err(e) => {
                let bearer = matches!(
                    self.state,
                    State::Authorization {
                        bearer_login: true,
                        ..
                    }
                );
                self.state = auth_state();
                let reply = match e {
                    MaildropError::Auth => err(Some(RespCode::Auth), "Authentication failed."),
                    MaildropError::Reauthorize => err(
                        Some(RespCode::Auth),
                        "Your authorization for the mail service has expired or was revoked: authorize again (popbridge oauth authorize).",
                    ),
                    MaildropError::Unavailable { .. } | MaildropError::Gone => err(
                        Some(RespCode::SysTemp),
                        "Mail server temporarily unavailable, try again later.",
                    ),
                    MaildropError::Unsupported(_) => {
                        err(Some(RespCode::SysPerm), "Mailbox cannot be served.")
                    }
                    MaildropError::InUse => err(
                        Some(RespCode::InUse),
                        "Mailbox is locked by another POP3 session.",
                    ),
                    MaildropError::Busy { signal, .. } => match signal {
                        Signal::LoginDelay => err(
                            Some(RespCode::LoginDelay),
                            "Logged in too recently, try again later.",
                        ),
                        Signal::Throttled => err(
                            Some(RespCode::LoginDelay),
                            "Too many logins for now, try again later.",
                        ),
                        Signal::Limit | Signal::InUse => err(
                            Some(RespCode::InUse),
                            "Mailbox busy on the mail server, try again later.",
                        ),
                        Signal::Unavailable => err(
                            Some(RespCode::SysTemp),
                            "Mail server busy, try again later.",
                        ),
                    },
                };
                if bearer && e == MaildropError::Auth {
                    // RFC 7628 3.2.3: the status as a challenge first; the -ERR answers the
                    // client's reply to it.
                    if let State::Authorization { sasl_error, .. } = &mut self.state {
                        *sasl_error = Some(reply);
                    }
                    return Reply {
                        bytes: OAUTH_ERROR_CHALLENGE.to_vec(),
                        close: false,
                    };
                }
                self.fail_reply(reply)
            }
        }
    }

    /// The messages after `msg` that are not marked deleted, as (UID, size): what a
    /// one-command-at-a-time client is likely to ask for next (read-ahead hints). At least
    /// `count.0` of them (when there are), more while their sizes add up to less than
    /// `octets`, never more than `count.1`.
    pub fn upcoming(&self, msg: u32, count: (usize, usize), octets: u64) -> Vec<(u32, u64)> {
        let State::Transaction { snapshot, deleted } = &self.state else {
            return Vec::new();
        };
        // Sliced, not skipped: this runs before every RETR of a 100,000-message download.
        let from = (msg as usize).min(snapshot.messages.len());
        let mut listed = 0u64;
        snapshot.messages[from..]
            .iter()
            .zip(&deleted[from..])
            .filter(|(_, &d)| !d)
            .take(count.1)
            .enumerate()
            .take_while(|&(i, (m, _))| {
                let more = i < count.0 || listed < octets;
                listed = listed.saturating_add(m.size);
                more
            })
            .map(|(_, (m, _))| (m.uid, m.size))
            .collect()
    }

    /// Reply for a RETR/TOP that failed before any of its bytes were sent.
    pub fn on_retrieve_failed(&mut self, msg: u32, e: &MaildropError) -> Reply {
        match e {
            // Another client removed it since the listing: a fact of a shared mailbox, not a
            // client error, so it does not count towards the error cap; the session goes on.
            MaildropError::Gone => Reply {
                bytes: err(None, &format!("message {msg} no longer exists")),
                close: false,
            },
            // The upstream connection is gone: nothing more can be served.
            _ => Reply {
                bytes: err(
                    Some(RespCode::SysTemp),
                    "Mail server temporarily unavailable.",
                ),
                close: true,
            },
        }
    }

    /// Reply to QUIT once the deletions were applied (or not). The driver closes afterwards.
    pub fn on_commit(&mut self, r: Result<(), MaildropError>) -> Vec<u8> {
        self.state = State::Update;
        match r {
            Ok(()) => ok("Logging out."),
            Err(_) => err(Some(RespCode::SysTemp), "some deleted messages not removed"),
        }
    }

    fn capa(&self) -> Vec<u8> {
        let mut lines = vec![
            "TOP".to_owned(),
            "UIDL".to_owned(),
            "RESP-CODES".to_owned(),
            "AUTH-RESP-CODE".to_owned(),
            "PIPELINING".to_owned(),
        ];
        if !self.is_authenticated() {
            if self.security.stls && !self.security.tls {
                lines.push("STLS".to_owned());
            }
            // RFC 2595: do not advertise what would be refused without TLS.
            if self.security.auth_allowed() {
                lines.push("USER".to_owned());
                lines.push(format!("SASL {}", self.mechanisms().join(" ")));
            }
        }
        let user = if self.is_authenticated() {
            Some(self.user_policy.unwrap_or_default())
        } else {
            None
        };
        lines.extend(self.cfg.policy.capa_lines(user));
        lines.push(format!("IMPLEMENTATION {}", self.cfg.implementation));
        multiline("Capability list follows", lines)
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

mod sasl;
mod transaction;

#[cfg(test)]
mod tests;
