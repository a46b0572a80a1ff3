//! The maildrop backed by an IMAP folder: login with the client's credentials, a snapshot of
//! UIDs and sizes, message bytes in `BODY.PEEK[]<offset.length>` pieces, and the deletion policy
//! applied with UID commands only.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::{Atom, Vec1};
use imap_next::imap_types::fetch::{MessageDataItem, MessageDataItemName};
use imap_next::imap_types::flag::{Flag, FlagPerm, StoreResponse, StoreType};
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data, StatusKind};
use imap_next::imap_types::search::SearchKey;
use imap_next::imap_types::sequence::SequenceSet;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::conn::{
    BodyStart, Completion, ConnLimits, FetchOrder, ImapConnection, ImapError, Transport, Untagged,
};
use super::metadata::{self, MetadataError};
use crate::config::{read_secret, DeletionConfig, DeletionMode, ImapConfig, Security};
use crate::maildrop::{BodyPart, Maildrop, MaildropError, Mailstore, MessageEntry, Snapshot};
use crate::metrics::{metrics, Timer};
use crate::uidl::map::{MapHead, UidlMap};

use crate::pop3::command::Password;
use crate::state::StateStore;
use imap_next::imap_types::auth::AuthMechanism;
use imap_next::imap_types::secret::Secret;
use std::borrow::Cow;

/// Everything needed to open maildrops on one IMAP server; shared by all sessions.
pub struct ImapUpstream {
    host: String,
    port: u16,
    security: Security,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    mailbox: String,
    deletion: DeletionMode,
    move_to: String,
    hide_keyword: String,
    limits: ConnLimits,
    state: Option<Arc<StateStore>>,
    /// Put before the login in state keys (see [`ImapUpstream::new`]).
    state_prefix: String,
    /// Master user and password, when the operator logs in for the users.
    master: Option<(String, Password)>,
    /// Read migrated UIDL maps from IMAP METADATA (`migration.shared_map`).
    shared_map: bool,
    /// Decoded legacy UIDL maps, shared by the sessions.
    maps: Arc<super::legacy::MapCache>,
    /// The server's FETCH item order, as its connections found it.
    fetch_order: Arc<FetchOrder>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error(transparent)]
    Tls(#[from] super::tls::TlsSetupError),
    #[error("imap.tls_server_name / imap.host {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("master_password_file: {0}")]
    Secret(String),
}

impl ImapUpstream {
    /// The upstream for one IMAP backend. `state_prefix` keeps its users' cache entries apart
    /// from another backend's users of the same name (empty for `[imap]`).
    pub fn new(
        imap: &ImapConfig,
        deletion: &DeletionConfig,
        state: Option<Arc<StateStore>>,
        state_prefix: &str,
        shared_map: bool,
    ) -> Result<ImapUpstream, UpstreamSetupError> {
        let tls = match imap.security {
            Security::None => None,
            Security::Tls | Security::Starttls => {
                let client = super::tls::client_config(imap.ca_file.as_deref())?;
                let name = imap.tls_server_name.as_deref().unwrap_or(&imap.host);
                let name = ServerName::try_from(name.to_owned())
                    .map_err(|_| UpstreamSetupError::ServerName(name.to_owned()))?;
                Some((TlsConnector::from(client), name))
            }
        };
        let master = match (&imap.master_user, &imap.master_password_file) {
            (Some(user), Some(file)) => Some((
                user.clone(),
                Password::new(read_secret(file).map_err(UpstreamSetupError::Secret)?),
            )),
            _ => None,
        };
        Ok(ImapUpstream {
            host: imap.host.clone(),
            port: imap.port(),
            security: imap.security,
            tls,
            mailbox: imap.mailbox.clone(),
            deletion: deletion.mode,
            move_to: deletion.move_to.clone(),
            hide_keyword: deletion.hide_keyword.clone(),
            limits: ConnLimits {
                connect_timeout: Duration::from_secs(imap.connect_timeout_secs),
                io_timeout: Duration::from_secs(imap.command_timeout_secs),
                // A piece plus the FETCH framing around it, with room to spare.
                // A FETCH piece and its framing, or the one-line UID SEARCH of a huge mailbox.
                max_response_size: imap.fetch_chunk_bytes.saturating_mul(2).max(16 << 20),
            },
            state,
            state_prefix: state_prefix.to_owned(),
            master,
            shared_map,
            maps: Arc::default(),
            fetch_order: Arc::default(),
        })
    }

    /// Check `password` by logging in and out (for `verify_password_with`).
    pub async fn check_password(&self, user: &str, password: &str) -> Result<(), MaildropError> {
        let mut conn =
            ImapConnection::connect(&self.host, self.port, self.transport(), self.limits)
                .await
                .map_err(unavailable)?;
        let login = CommandBody::login(user.to_owned(), password.to_owned())
            .map_err(|_| MaildropError::Auth)?;
        let done = conn.execute(login, |_| {}).await.map_err(unavailable)?;
        conn.logout().await;
        if done.is_ok() {
            Ok(())
        } else {
            Err(login_failure(&done))
        }
    }

    /// LOGIN with the user's password, or, with a master user, `AUTHENTICATE PLAIN` with the
    /// user as authorization identity (Dovecot's master passdb).
    fn login_command(
        &self,
        user: &str,
        password: &str,
    ) -> Result<CommandBody<'static>, MaildropError> {
        match &self.master {
            None => CommandBody::login(user.to_owned(), password.to_owned())
                .map_err(|_| MaildropError::Auth),
            // A NUL would move the boundary between authorization and authentication identity.
            Some(_) if user.is_empty() || user.contains('\0') => Err(MaildropError::Auth),
            Some((master, master_pw)) => {
                let mut ir = Vec::with_capacity(user.len() + master.len() + 64);
                ir.extend_from_slice(user.as_bytes());
                ir.push(0);
                ir.extend_from_slice(master.as_bytes());
                ir.push(0);
                ir.extend_from_slice(master_pw.as_str().as_bytes());
                Ok(CommandBody::Authenticate {
                    mechanism: AuthMechanism::Plain,
                    initial_response: Some(Secret::new(Cow::Owned(ir))),
                })
            }
        }
    }

    fn transport(&self) -> Transport<'_> {
        match (&self.tls, self.security) {
            (Some((connector, name)), Security::Tls) => Transport::Tls {
                connector,
                name: name.clone(),
            },
            (Some((connector, name)), Security::Starttls) => Transport::StartTls {
                connector,
                name: name.clone(),
            },
            _ => Transport::Plain,
        }
    }

    /// Connect and read the greeting, without logging in: is the upstream there?
    pub async fn probe(&self) -> Result<(), ImapError> {
        let conn =
            ImapConnection::connect(&self.host, self.port, self.transport(), self.limits).await?;
        conn.logout().await;
        Ok(())
    }

    async fn open(&self, user: &str, password: &str) -> Result<ImapMaildrop, MaildropError> {
        let mut conn =
            ImapConnection::connect(&self.host, self.port, self.transport(), self.limits)
                .await
                .map_err(unavailable)?;
        conn.share_fetch_order(Arc::clone(&self.fetch_order));

        let login = self.login_command(user, password)?;
        let timer = Timer::start(&metrics().upstream_login_duration);
        let done = conn.execute(login, |_| {}).await.map_err(unavailable)?;
        drop(timer);
        if !done.is_ok() {
            conn.logout().await;
            return Err(login_failure(&done));
        }

        // Servers may list their post-login capabilities in the LOGIN answer (Dovecot and
        // Cyrus do, RFC 3501 7.1): that saves a round trip on every login.
        let mut caps: HashSet<String> = match &done.code {
            Some(Code::Capability(list)) => list
                .as_ref()
                .iter()
                .map(|c| c.to_string().to_ascii_uppercase())
                .collect(),
            _ => HashSet::new(),
        };
        if caps.is_empty() {
            let done = conn
                .execute(CommandBody::Capability, |u| {
                    if let Untagged::Data(Data::Capability(list)) = u {
                        caps.extend(
                            list.as_ref()
                                .iter()
                                .map(|c| c.to_string().to_ascii_uppercase()),
                        );
                    }
                })
                .await
                .map_err(unavailable)?;
            if !done.is_ok() {
                return Err(MaildropError::Unavailable(format!(
                    "CAPABILITY failed: {}",
                    done.text
                )));
            }
        }
        let has_move = caps.contains("MOVE");
        let has_metadata = caps.contains("METADATA");
        let has_uidplus = caps.contains("UIDPLUS");
        match self.deletion {
            DeletionMode::Expunge if !has_uidplus => {
                conn.logout().await;
                return Err(MaildropError::Unsupported(
                    "deletion.mode = \"expunge\" needs UIDPLUS (UID EXPUNGE), which the server lacks".into(),
                ));
            }
            DeletionMode::Move if !has_move && !has_uidplus => {
                conn.logout().await;
                return Err(MaildropError::Unsupported(
                    "deletion.mode = \"move\" needs MOVE or UIDPLUS, which the server lacks".into(),
                ));
            }
            _ => {}
        }

        Ok(ImapMaildrop {
            conn: Some(conn),
            state: self.state.clone(),
            user: format!("{}{user}", self.state_prefix),
            mailbox: self.mailbox.clone(),
            // Set by `select`, which `snapshot` runs under the IN-USE lock.
            uid_validity: 0,
            uid_next: None,
            deletion: self.deletion,
            move_to: self.move_to.clone(),
            hide_keyword: self.hide_keyword.clone(),
            has_move,
            shared_map: self.shared_map && has_metadata,
            maps: Arc::clone(&self.maps),
            pending_seen: Vec::new(),
            retrieved_before: Vec::new(),
            retrieved_now: HashSet::new(),
            retrieved_pruned: false,
            ahead_hint: Vec::new(),
            ahead: HashMap::new(),
        })
    }
}

/// What one login's pipelined SELECT, UID SEARCH and GETMETADATA found.
struct Opened {
    /// The UIDs POP3 may see, ascending.
    uids: Vec<u32>,
    /// The migrated map's head, when METADATA is read.
    head: Option<Result<Option<MapHead>, MetadataError>>,
}

impl ImapMaildrop {
    /// SELECT the maildrop folder, list the UIDs POP3 may see and, with a shared map, ask
    /// for the map's head: three commands, pipelined into one round trip (the SEARCH runs
    /// on the folder the SELECT before it opened; the GETMETADATA does not depend on it).
    ///
    /// `snapshot` runs this under the IN-USE lock, so the view starts after any commit of
    /// the session that held the lock before: a SELECT taken before the lock would show
    /// what that commit hid (tests/faults.rs), and a NOOP to resync it would cost every
    /// login a round trip.
    async fn open_mailbox(&mut self) -> Result<Opened, MaildropError> {
        let select = CommandBody::select(mailbox_arg(&self.mailbox)?)
            .map_err(|e| MaildropError::Unsupported(e.to_string()))?;
        let criteria = if self.deletion == DeletionMode::Hide {
            let atom = Atom::try_from(self.hide_keyword.clone())
                .map_err(|e| MaildropError::Unsupported(e.to_string()))?;
            SearchKey::Not(Box::new(SearchKey::Keyword(atom)))
        } else {
            SearchKey::All
        };
        let mut bodies = vec![
            select,
            CommandBody::search(None, Vec1::from(criteria), true),
        ];
        if self.shared_map {
            match metadata::head_command(&self.mailbox) {
                Ok(body) => bodies.push(body),
                Err(e) => return Err(self.map_unusable(e)),
            }
        }
        let mut uid_validity = None;
        let mut uid_next = None;
        let mut read_only = false;
        let mut permanent: Option<(bool, HashSet<String>)> = None;
        let mut uids: Vec<u32> = Vec::new();
        let mut values = metadata::Values::default();
        let conn = self.conn.as_mut().ok_or_else(lost)?;
        let mut done = conn
            .execute_all(bodies, |u| match values.absorb(u) {
                Some(Untagged::Data(Data::Search(found, ..))) => {
                    uids.extend(found.iter().map(|u| u.get()))
                }
                Some(Untagged::Status {
                    code: Some(code), ..
                }) => match code {
                    Code::UidValidity(v) => uid_validity = Some(v.get()),
                    Code::UidNext(v) => uid_next = Some(v.get()),
                    Code::ReadOnly => read_only = true,
                    Code::PermanentFlags(flags) => {
                        let any = flags.iter().any(|f| matches!(f, FlagPerm::Asterisk));
                        let named = flags
                            .iter()
                            .filter_map(|f| match f {
                                FlagPerm::Flag(f) => Some(f.to_string().to_ascii_lowercase()),
                                FlagPerm::Asterisk => None,
                            })
                            .collect();
                        permanent = Some((any, named));
                    }
                    _ => {}
                },
                _ => {}
            })
            .await
            .map_err(|e| {
                self.conn = None;
                unavailable(e)
            })?;
        let head_done = if self.shared_map { done.pop() } else { None };
        let (Some(search_done), Some(select_done)) = (done.pop(), done.pop()) else {
            return Err(MaildropError::Unavailable("no completion".into()));
        };
        if !select_done.is_ok() {
            self.abandon().await;
            return Err(MaildropError::Unsupported(format!(
                "cannot open mailbox {:?}: {}",
                self.mailbox, select_done.text
            )));
        }
        if read_only || matches!(select_done.code, Some(Code::ReadOnly)) {
            self.abandon().await;
            return Err(MaildropError::Unsupported(format!(
                "mailbox {:?} is read-only upstream",
                self.mailbox
            )));
        }
        let Some(uid_validity) = uid_validity else {
            self.abandon().await;
            return Err(MaildropError::Unavailable(
                "server did not report UIDVALIDITY on SELECT".into(),
            ));
        };
        if self.deletion == DeletionMode::Hide {
            // RFC 3501: without PERMANENTFLAGS, all flags can be changed permanently.
            let storable = match &permanent {
                None => true,
                Some((any, named)) => {
                    *any || named.contains(&self.hide_keyword.to_ascii_lowercase())
                }
            };
            if !storable {
                self.abandon().await;
                return Err(MaildropError::Unsupported(format!(
                    "deletion.mode = \"hide\" needs the keyword {} but the mailbox cannot store it",
                    self.hide_keyword
                )));
            }
        }
        if !search_done.is_ok() {
            return Err(MaildropError::Unavailable(format!(
                "listing failed: {}",
                search_done.text
            )));
        }
        self.uid_validity = uid_validity;
        self.uid_next = uid_next;
        uids.sort_unstable();
        uids.dedup();
        let head = head_done.map(|done| metadata::head_from(values, done));
        Ok(Opened { uids, head })
    }

    /// Log out and forget the connection (a refused SELECT).
    async fn abandon(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.logout().await;
        }
    }

    /// The messages POP3 may see, with their sizes. The server answers which UIDs exist and
    /// are not hidden (`UID SEARCH`, see [`Self::open_mailbox`]) every time; only sizes,
    /// which never change for a UID, come from the cache, and only unknown ones are fetched.
    /// So the cache can never show a deleted or hidden message, and losing it only costs one
    /// full size fetch.
    async fn sizes(&mut self, uids: Vec<u32>) -> Result<Vec<MessageEntry>, MaildropError> {
        let (user, uid_validity) = (self.user.clone(), self.uid_validity);
        let user = user.as_str();
        let Some(conn) = self.conn.as_mut() else {
            return Err(MaildropError::Unavailable(
                "upstream connection lost".into(),
            ));
        };
        let cached = self
            .state
            .as_ref()
            .map(|s| s.sizes(user, &self.mailbox, uid_validity))
            .unwrap_or_default();
        let known = |uid: u32| {
            cached
                .binary_search_by_key(&uid, |&(u, _)| u)
                .ok()
                .map(|i| cached[i].1)
        };
        let missing: Vec<u32> = uids
            .iter()
            .copied()
            .filter(|&u| known(u).is_none())
            .collect();
        let mut fetched: Vec<(u32, u32)> = Vec::with_capacity(missing.len());
        if !missing.is_empty() {
            let fetches = uid_set(&missing)?
                .into_iter()
                .map(|set| {
                    CommandBody::fetch(
                        set,
                        vec![MessageDataItemName::Uid, MessageDataItemName::Rfc822Size],
                        true,
                    )
                    .map_err(|e| MaildropError::Unavailable(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let done = conn
                .execute_all(fetches, |u| fetched.extend(u.uid_and_size()))
                .await
                .map_err(unavailable)?;
            // NO [EXPUNGEISSUED]: some went away since the SEARCH; they get no size and are
            // not listed.
            if let Some(failed) = done.iter().find(|d| !d.answered_but_expunged()) {
                return Err(MaildropError::Unavailable(format!(
                    "listing sizes failed: {}",
                    failed.text
                )));
            }
            fetched.sort_unstable();
            fetched.dedup_by_key(|e| e.0);
        }
        let fresh = |uid: u32| {
            fetched
                .binary_search_by_key(&uid, |&(u, _)| u)
                .ok()
                .map(|i| fetched[i].1)
        };
        // A UID expunged between SEARCH and FETCH has no size: it is simply not listed.
        let listing: Vec<(u32, u32)> = uids
            .iter()
            .filter_map(|&u| known(u).or_else(|| fresh(u)).map(|size| (u, size)))
            .collect();
        if let Some(state) = &self.state {
            if listing.len() != cached.len() || !fetched.is_empty() {
                state.store_sizes(user, &self.mailbox, uid_validity, &listing);
            }
        }
        Ok(listing
            .into_iter()
            .map(|(uid, size)| MessageEntry {
                uid,
                size: u64::from(size),
            })
            .collect())
    }
}

impl ImapUpstream {
    /// `host:port`, which with the login names one maildrop whatever backend reaches it.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host.to_lowercase(), self.port)
    }
}

impl Mailstore for ImapUpstream {
    type Maildrop = ImapMaildrop;

    /// With a master user this logs in for `user` whatever `password` is: callers serving
    /// clients must check the password first (`RoutedUpstream` does, via
    /// `verify_password_with`, which the configuration requires with a master user).
    async fn login(&self, user: &str, password: &str) -> Result<ImapMaildrop, MaildropError> {
        self.open(user, password).await
    }
}

/// An authenticated upstream session with the maildrop folder selected.
pub struct ImapMaildrop {
    /// `None` once the connection failed: every later call fails fast.
    conn: Option<ImapConnection>,
    state: Option<Arc<StateStore>>,
    /// The user in state keys: the upstream login, after the backend's name and a line feed
    /// for backends other than `[imap]`.
    user: String,
    mailbox: String,
    uid_validity: u32,
    /// UIDNEXT at SELECT, when reported (bounds a legacy UIDL map's entries).
    uid_next: Option<u32>,
    deletion: DeletionMode,
    move_to: String,
    hide_keyword: String,
    has_move: bool,
    /// Look for a migrated UIDL map in METADATA (configured, and the server offers it).
    shared_map: bool,
    maps: Arc<super::legacy::MapCache>,
    /// Retrieved messages still to be flagged `\Seen`.
    pending_seen: Vec<u32>,
    /// Listed messages retrieved in earlier sessions (from sled at login, sorted): a RETR
    /// of one of them counts as a repeated download.
    retrieved_before: Vec<u32>,
    /// Listed messages first retrieved in this session; with `retrieved_before`, written
    /// back at the end of the session (when anything changed).
    retrieved_now: HashSet<u32>,
    /// `retrieved_before` lost messages no longer listed: the record needs writing.
    retrieved_pruned: bool,
    /// What the session expects to be asked for next: (UID, size).
    ahead_hint: Vec<(u32, u64)>,
    /// Whole small messages fetched ahead, by UID; at most READ_AHEAD_BYTES in all.
    ahead: HashMap<u32, Bytes>,
}

/// Read ahead at most this many bytes per session ...
const READ_AHEAD_BYTES: u64 = 256 * 1024;
/// The same limits when the messages read ahead come in a streamed FETCH (no decoding cost,
/// so medium-sized messages are worth reading ahead too: each saves two round trips).
const STREAM_AHEAD_BYTES: u64 = 1024 * 1024;
const STREAM_AHEAD_MAX_MESSAGE: u64 = 256 * 1024;
/// ... and only messages up to this size (bigger ones are streamed anyway).
const READ_AHEAD_MAX_MESSAGE: u64 = 64 * 1024;
/// The next message is prefetched (its FETCH sent as soon as the current one was handed out,
/// see [`ImapMaildrop::prefetch_next`]) only up to this size: a client that asks for
/// something else makes popbridge read and discard it before its next command.
const PREFETCH_MAX_MESSAGE: u64 = 4 << 20;

impl ImapMaildrop {
    /// Whether `body`, read ahead for `uid`, can be the whole message: an empty one only if
    /// the listing says the message is empty.
    fn plausibly_whole(&self, uid: u32, body: &Bytes) -> bool {
        !body.is_empty()
            || self
                .ahead_hint
                .iter()
                .any(|&(u, size)| u == uid && size == 0)
    }

    /// Keeps the messages a streamed FETCH read ahead, but for empty ones that cannot be.
    fn keep_ahead(&mut self, read: Vec<(u32, Bytes)>) {
        for (uid, body) in read {
            if self.plausibly_whole(uid, &body) {
                self.ahead.insert(uid, body);
            }
        }
    }

    /// The small messages to fetch along with `uid` (from the session's hint): bounded in
    /// count and bytes, each smaller than `len`.
    fn ahead_wanted(&self, uid: u32, len: u64, (mut budget, max): (u64, u64)) -> Vec<u32> {
        let mut wanted = Vec::new();
        for &(next, size) in &self.ahead_hint {
            if next == uid || size > max || size >= len {
                continue;
            }
            let Some(left) = budget.checked_sub(size) else {
                break;
            };
            budget = left;
            wanted.push(next);
        }
        wanted
    }

    async fn run(
        &mut self,
        body: CommandBody<'static>,
        on_untagged: impl FnMut(Untagged),
    ) -> Result<Completion, MaildropError> {
        let mut done = self.run_all(vec![body], on_untagged).await?;
        done.pop()
            .ok_or_else(|| MaildropError::Unavailable("no completion".into()))
    }

    /// Run commands pipelined, preceded by any `\Seen` flags still owed for retrieved messages
    /// (sent with the next command instead of costing a round trip of their own).
    async fn run_all(
        &mut self,
        bodies: Vec<CommandBody<'static>>,
        on_untagged: impl FnMut(Untagged),
    ) -> Result<Vec<Completion>, MaildropError> {
        let mut all = self.seen_owed()?;
        let owed = all.len();
        all.extend(bodies);
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| MaildropError::Unavailable("upstream connection lost".into()))?;
        match conn.execute_all(all, on_untagged).await {
            Ok(mut done) => {
                for failed in done.iter().take(owed).filter(|d| !d.is_ok()) {
                    tracing::warn!(text = %failed.text, "could not flag retrieved messages \\Seen");
                }
                Ok(done.split_off(owed.min(done.len())))
            }
            Err(e) => {
                self.conn = None;
                Err(unavailable(e))
            }
        }
    }

    /// The `UID STORE +FLAGS.SILENT (\Seen)` commands owed for retrieved messages, taken.
    fn seen_owed(&mut self) -> Result<Vec<CommandBody<'static>>, MaildropError> {
        let seen = std::mem::take(&mut self.pending_seen);
        uid_set(&seen)?
            .into_iter()
            .map(|set| {
                CommandBody::store(
                    set,
                    StoreType::Add,
                    StoreResponse::Silent,
                    vec![Flag::Seen],
                    true,
                )
                .map_err(|e| MaildropError::Unavailable(e.to_string()))
            })
            .collect()
    }

    /// Runs a command of the commit. A `NO [EXPUNGEISSUED]` means it named a message another
    /// client expunged, which this session was not told of yet; Dovecot then copies or moves
    /// nothing at all. A NOOP delivers the expunge, and the one retry passes over the message.
    async fn run_commit(
        &mut self,
        body: CommandBody<'static>,
    ) -> Result<Completion, MaildropError> {
        let done = self.run(body.clone(), |_| {}).await?;
        if done.kind != StatusKind::No || !done.expunge_issued() {
            return Ok(done);
        }
        tracing::debug!(text = %done.text, "commit command named an expunged message; retrying after NOOP");
        expect_ok("NOOP", self.run(CommandBody::Noop, |_| {}).await?)?;
        self.run(body, |_| {}).await
    }

    async fn store(&mut self, set: &SequenceSet, flag: Flag<'static>) -> Result<(), MaildropError> {
        let body = CommandBody::store(
            set.clone(),
            StoreType::Add,
            StoreResponse::Silent,
            vec![flag],
            true,
        )
        .map_err(|e| MaildropError::Unavailable(e.to_string()))?;
        expect_ok("UID STORE", self.run_commit(body).await?)
    }

    async fn uid_expunge(&mut self, set: &SequenceSet) -> Result<(), MaildropError> {
        let body = CommandBody::ExpungeUid {
            sequence_set: set.clone(),
        };
        expect_ok("UID EXPUNGE", self.run_commit(body).await?)
    }

    /// MOVE or COPY into `move_to`, creating it once if the server says TRYCREATE.
    async fn transfer(&mut self, set: &SequenceSet, moving: bool) -> Result<(), MaildropError> {
        let name = if moving { "UID MOVE" } else { "UID COPY" };
        for attempt in 0..2 {
            let mailbox = mailbox_arg(&self.move_to)?;
            let body = if moving {
                CommandBody::Move {
                    sequence_set: set.clone(),
                    mailbox,
                    uid: true,
                }
            } else {
                CommandBody::Copy {
                    sequence_set: set.clone(),
                    mailbox,
                    uid: true,
                }
            };
            let done = self.run_commit(body).await?;
            if done.is_ok() {
                return Ok(());
            }
            if attempt == 0 && matches!(done.code, Some(Code::TryCreate)) {
                let create = CommandBody::create(mailbox_arg(&self.move_to)?)
                    .map_err(|e| MaildropError::Unavailable(e.to_string()))?;
                let created = self.run(create, |_| {}).await?;
                tracing::info!(mailbox = %self.move_to, ok = created.is_ok(), "created deletion target folder");
                continue;
            }
            return expect_ok(name, done);
        }
        Err(MaildropError::Unavailable(format!("{name} failed")))
    }
}

impl Maildrop for ImapMaildrop {
    async fn snapshot(&mut self) -> Result<Snapshot, MaildropError> {
        let opened = self.open_mailbox().await?;
        let messages = self.sizes(opened.uids).await?;
        if let Some(state) = &self.state {
            let before = state.retrieved(&self.user, &self.mailbox, self.uid_validity);
            let listed = |uid: &u32| {
                messages
                    .binary_search_by_key(uid, |m: &MessageEntry| m.uid)
                    .is_ok()
            };
            self.retrieved_before = before.iter().copied().filter(listed).collect();
            self.retrieved_pruned = self.retrieved_before.len() != before.len();
        }
        if let Some(state) = &self.state {
            if state.observe_mailbox(&self.user, &self.mailbox, self.uid_validity) {
                metrics().uidl_changed_sessions.inc();
            }
        }
        let legacy = self.legacy_map(opened.head).await?;
        Ok(Snapshot {
            uid_validity: self.uid_validity,
            messages,
            legacy,
        })
    }

    async fn fetch(&mut self, uid: u32, offset: u64, len: u32) -> Result<Bytes, MaildropError> {
        let (Some(_), Some(len_nz), Ok(offset32)) = (
            NonZeroU32::new(uid),
            NonZeroU32::new(len),
            u32::try_from(offset),
        ) else {
            return Ok(Bytes::new());
        };
        let mut wanted = vec![uid];
        if offset == 0 {
            if let Some(whole) = self.ahead.remove(&uid) {
                return Ok(whole);
            }
            // Whatever was read ahead and not asked for is stale now.
            self.ahead.clear();
            // Small messages the client will probably ask for next come along in the same
            // FETCH: a one-command-at-a-time client then costs one upstream round trip per
            // window of messages instead of two per message. Bounded in count and bytes.
            wanted.extend(self.ahead_wanted(
                uid,
                u64::from(len),
                (READ_AHEAD_BYTES, READ_AHEAD_MAX_MESSAGE),
            ));
        }
        let set = uid_set(&wanted)?
            .into_iter()
            .next()
            .ok_or_else(|| MaildropError::Unavailable("empty UID set".into()))?;
        let body = CommandBody::fetch(
            set,
            vec![
                MessageDataItemName::Uid,
                MessageDataItemName::BodyExt {
                    section: None,
                    partial: Some((offset32, len_nz)),
                    peek: true,
                },
            ],
            true,
        )
        .map_err(|e| MaildropError::Unavailable(e.to_string()))?;
        let mut pieces: HashMap<u32, Bytes> = HashMap::with_capacity(wanted.len());
        let done = self
            .run(body, |u| {
                let Untagged::Data(Data::Fetch { items, .. }) = u else {
                    return;
                };
                let mut this_uid = None;
                let mut data = None;
                for item in items.into_iter() {
                    match item {
                        MessageDataItem::Uid(u) => this_uid = Some(u.get()),
                        // NIL: the server has no body for it (another client expunged it):
                        // no data, so the message reads as gone.
                        MessageDataItem::BodyExt {
                            section: None,
                            data: d,
                            ..
                        } => data = d.into_option().map(|c| Bytes::from(c.into_owned())),
                        _ => {}
                    }
                }
                // Unsolicited FETCHes (flag updates) and UIDs we did not ask for are ignored.
                if let (Some(u), Some(d)) = (this_uid, data) {
                    if wanted.contains(&u) {
                        pieces.insert(u, d);
                    }
                }
            })
            .await?;
        let piece = pieces.remove(&uid);
        // Keep only read-ahead pieces that are whole messages (shorter than asked, and not
        // empty unless the listing says so: `""` is what some servers send for one gone).
        self.ahead = pieces
            .into_iter()
            .filter(|(u, b)| b.len() < len as usize && self.plausibly_whole(*u, b))
            .collect();
        match piece {
            Some(bytes) => Ok(bytes),
            // No data for the UID: the message was expunged by another client since login.
            None if done.is_ok() || done.kind == StatusKind::No => Err(MaildropError::Gone),
            None => Err(MaildropError::Unavailable(format!(
                "UID FETCH failed: {}",
                done.text
            ))),
        }
    }

    /// Messages too big to read ahead are streamed: one `UID FETCH uid (UID BODY.PEEK[])`
    /// whose literal goes to the client as it arrives, instead of `fetch_chunk_bytes` pieces
    /// each decoded whole by imap-next before the first byte of it could be sent. A read that
    /// starts past the beginning (the rest of a TOP whose first piece did not end it) streams
    /// the rest of the message from there in one literal, so it cannot end short if the
    /// message goes away meanwhile.
    async fn read_body(
        &mut self,
        uid: u32,
        size: u64,
        offset: u64,
        max: u32,
    ) -> Result<BodyPart, MaildropError> {
        if offset == 0 {
            if let Some(conn) = self.conn.as_mut().filter(|c| c.unsettled()) {
                let settled = conn.settle().await.map(|()| conn.take_ahead());
                match settled {
                    Ok(read) => self.keep_ahead(read),
                    Err(e) => {
                        self.conn = None;
                        return Err(unavailable(e));
                    }
                }
            }
        }
        let (streaming, uid_first, order_known) = match &self.conn {
            Some(c) => (c.streaming(uid), c.uid_before_body(), c.fetch_order_known()),
            None => (false, false, false),
        };
        // Its FETCH was sent right after the previous message (`prefetch_next`).
        let prefetched = offset == 0
            && !self.ahead.contains_key(&uid)
            && self.conn.as_ref().is_some_and(|c| c.prefetched(uid));
        // The first message of a session is streamed alone, whatever its size: that shows
        // whether the server puts UID before BODY[]. If it does, everything is streamed
        // (small messages read ahead come in the same FETCH, and the next FETCH is sent
        // ahead, see `prefetch_next`); if not, small messages are fetched whole and decoded,
        // with a read-ahead window (`fetch`). Decoding is the costlier path: imap-codec
        // takes a literal a byte at a time.
        let stream_it = offset == 0
            && (size > READ_AHEAD_MAX_MESSAGE || uid_first || !order_known)
            && !self.ahead.contains_key(&uid)
            && self.conn.is_some();
        let origin = u32::try_from(offset).unwrap_or(u32::MAX);
        let ranged = offset > 0 && !streaming && self.conn.is_some();
        if !streaming && !stream_it && !ranged {
            let data = self.fetch(uid, offset, max).await?;
            let last = data.len() < max as usize;
            if last {
                self.prefetch_next(max).await;
            }
            return Ok(BodyPart { data, last });
        }
        if stream_it || ranged {
            if stream_it && !prefetched {
                self.ahead.clear();
            }
            let others = if uid_first && stream_it && !prefetched {
                self.ahead_wanted(
                    uid,
                    u64::from(max),
                    (STREAM_AHEAD_BYTES, STREAM_AHEAD_MAX_MESSAGE),
                )
            } else {
                Vec::new()
            };
            let conn = self.conn.as_mut().ok_or_else(lost)?;
            let started = conn
                .body_start_at(uid, if ranged { origin } else { 0 }, &others)
                .await
                .map(|s| (s, conn.take_ahead()));
            match started {
                Ok((BodyStart::Streaming, read)) => self.keep_ahead(read),
                // No body for it: another client expunged it (NIL, or no FETCH data, with
                // OK or NO [EXPUNGEISSUED]).
                Ok((BodyStart::NoBody(done), read))
                    if done.is_ok() || done.kind == StatusKind::No =>
                {
                    self.keep_ahead(read);
                    return Err(MaildropError::Gone);
                }
                Ok((BodyStart::NoBody(done), _)) => {
                    return Err(MaildropError::Unavailable(format!(
                        "UID FETCH failed: {}",
                        done.text
                    )))
                }
                Err(e) => {
                    self.conn = None;
                    return Err(unavailable(e));
                }
            }
        }
        let conn = self.conn.as_mut().ok_or_else(lost)?;
        let next = conn.body_next(max as usize).await.map(|(data, last)| {
            (
                data,
                last,
                if last { conn.take_ahead() } else { Vec::new() },
            )
        });
        match next {
            Ok((data, last, read)) => {
                if last {
                    self.keep_ahead(read);
                    self.prefetch_next(max).await;
                }
                Ok(BodyPart { data, last })
            }
            Err(e) => {
                self.conn = None;
                Err(unavailable(e))
            }
        }
    }

    fn read_ahead_hint(&mut self, upcoming: &[(u32, u64)]) {
        self.ahead_hint.clear();
        self.ahead_hint.extend_from_slice(upcoming);
    }

    /// Owed until the next upstream command (or the end of the session), so a RETR costs one
    /// round trip, not two.
    async fn mark_seen(&mut self, uid: u32) -> Result<(), MaildropError> {
        self.pending_seen.push(uid);
        Ok(())
    }

    fn retrieved(&mut self, uid: u32) {
        if self.state.is_none() {
            return;
        }
        if self.retrieved_before.binary_search(&uid).is_ok() {
            metrics().retr_repeated.inc();
        } else {
            // At most one entry per listed message.
            self.retrieved_now.insert(uid);
        }
    }

    async fn commit(&mut self, uids: &[u32]) -> Result<(), MaildropError> {
        self.commit_sets(uids).await?;
        let mode = match self.deletion {
            DeletionMode::Hide => "hide",
            DeletionMode::Expunge => "expunge",
            DeletionMode::Move => "move",
        };
        metrics()
            .deletions
            .with_label_values(&[mode])
            .inc_by(uids.len() as u64);
        Ok(())
    }

    /// The `\Seen` flags still owed go out with the LOGOUT: one round trip.
    async fn close(mut self) {
        self.store_retrieved();
        let owed = self.seen_owed().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not flag retrieved messages \\Seen");
            Vec::new()
        });
        if let Some(conn) = self.conn.take() {
            for failed in conn.logout_after(owed).await {
                tracing::warn!(text = %failed, "could not flag retrieved messages \\Seen");
            }
        }
    }
}

impl ImapMaildrop {
    /// Write back the record of retrieved messages, if this session changed it.
    fn store_retrieved(&mut self) {
        let Some(state) = &self.state else {
            return;
        };
        if self.retrieved_now.is_empty() && !self.retrieved_pruned {
            return;
        }
        let mut all = std::mem::take(&mut self.retrieved_before);
        all.extend(self.retrieved_now.drain());
        all.sort_unstable();
        all.dedup();
        state.store_retrieved(&self.user, &self.mailbox, self.uid_validity, &all);
    }

    /// A message was handed out whole: if the client's next RETR is probably for a message
    /// that is neither read ahead nor on its way, send its FETCH (with the small messages
    /// after it, as `read_body` would) now instead of after the client asked: that RETR then
    /// needs no upstream round trip at all (no NOOP either, like a message read ahead).
    /// Anything else the client does first drains the response (bounded, with deadlines).
    async fn prefetch_next(&mut self, max: u32) {
        let Some(&(next, size)) = self.ahead_hint.first() else {
            return;
        };
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        if size > PREFETCH_MAX_MESSAGE
            || !conn.uid_before_body()
            || conn.has_prefetch()
            || conn.streaming_any()
            || self.ahead.contains_key(&next)
        {
            return;
        }
        let coming: HashSet<u32> = conn.in_flight().chain(self.ahead.keys().copied()).collect();
        if coming.contains(&next) {
            return;
        }
        let others: Vec<u32> = self
            .ahead_wanted(
                next,
                u64::from(max),
                (STREAM_AHEAD_BYTES, STREAM_AHEAD_MAX_MESSAGE),
            )
            .into_iter()
            .filter(|u| !coming.contains(u))
            .collect();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = conn.prefetch(next, &others).await {
            tracing::debug!(error = %e, uid = next, "prefetch failed");
            if matches!(e, ImapError::Command(_)) {
                return;
            }
            self.conn = None;
        }
    }

    /// The migrated UIDL map for this folder's UIDVALIDITY (see [`super::legacy`]): METADATA
    /// is authoritative when configured and offered, its head read at every login and its
    /// chunks only when that head is not the one cached; otherwise sled. A map for another
    /// UIDVALIDITY describes other messages and is ignored. A METADATA map that cannot be
    /// read, or is over the limits, refuses the login (SYS/TEMP): serving generated UIDLs to
    /// a migrated user would make the client download everything again. `head` is what the
    /// login's pipelined GETMETADATA found, `None` when METADATA is not read.
    async fn legacy_map(
        &mut self,
        head: Option<Result<Option<MapHead>, MetadataError>>,
    ) -> Result<Option<Arc<UidlMap>>, MaildropError> {
        use super::legacy::{Lookup, Source};
        let m = metrics();
        let lookup = Lookup {
            state: self.state.as_ref(),
            cache: &self.maps,
            user: &self.user,
            mailbox: &self.mailbox,
            uid_validity: self.uid_validity,
            uid_next: self.uid_next,
        };
        let shared = match head {
            None => None,
            Some(Err(e)) => return Err(self.map_unusable(e)),
            Some(Ok(head)) => match self.conn.as_mut() {
                Some(c) => Some((c, head)),
                None => return Err(lost()),
            },
        };
        match lookup.load(shared).await {
            Ok((map, source)) => {
                match source {
                    Source::Cache => m.uidl_maps.with_label_values(&["cache"]).inc(),
                    Source::Metadata => m.uidl_maps.with_label_values(&["metadata"]).inc(),
                    Source::Stale => {
                        m.uidl_maps.with_label_values(&["stale"]).inc();
                        tracing::warn!(
                            uidvalidity = self.uid_validity,
                            "legacy UIDL map is for another UIDVALIDITY; ignoring it"
                        );
                    }
                    Source::None => {}
                }
                Ok(map)
            }
            Err(e) => Err(self.map_unusable(e)),
        }
    }

    /// A map that cannot be read or trusted refuses the login (its UIDLs would be wrong).
    fn map_unusable(&mut self, e: MetadataError) -> MaildropError {
        metrics().uidl_maps.with_label_values(&["error"]).inc();
        // The reason only (limits, checksum, IMAP error), and who: no map contents.
        let user = self.user.rsplit('\n').next().unwrap_or_default();
        tracing::error!(user, error = %e, "cannot use the legacy UIDL map from METADATA; refusing the login");
        if matches!(e, MetadataError::Imap(_)) {
            self.conn = None;
        }
        MaildropError::Unavailable(format!("legacy UIDL map unusable: {e}"))
    }

    async fn commit_sets(&mut self, uids: &[u32]) -> Result<(), MaildropError> {
        for set in uid_set(uids)? {
            match self.deletion {
                DeletionMode::Hide => {
                    let atom = Atom::try_from(self.hide_keyword.clone())
                        .map_err(|e| MaildropError::Unsupported(e.to_string()))?;
                    self.store(&set, Flag::keyword(atom)).await?;
                }
                DeletionMode::Expunge => {
                    self.store(&set, Flag::Deleted).await?;
                    self.uid_expunge(&set).await?;
                }
                DeletionMode::Move if self.has_move => self.transfer(&set, true).await?,
                DeletionMode::Move => {
                    self.transfer(&set, false).await?;
                    self.store(&set, Flag::Deleted).await?;
                    self.uid_expunge(&set).await?;
                }
            }
        }
        Ok(())
    }
}

fn lost() -> MaildropError {
    MaildropError::Unavailable("upstream connection lost".into())
}

fn unavailable(e: ImapError) -> MaildropError {
    MaildropError::Unavailable(e.to_string())
}

fn expect_ok(what: &str, done: Completion) -> Result<(), MaildropError> {
    if done.is_ok() {
        Ok(())
    } else {
        Err(MaildropError::Unavailable(format!(
            "{what} failed: {}",
            done.text
        )))
    }
}

/// LOGIN said NO or BAD. RFC 5530 codes tell a temporary server failure from bad credentials.
fn login_failure(done: &Completion) -> MaildropError {
    let code = done.other_code().unwrap_or_default();
    if ["UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "CONTACTADMIN"]
        .iter()
        .any(|c| code.starts_with(c))
    {
        MaildropError::Unavailable(format!("upstream login failed: {}", done.text))
    } else if code.starts_with("PRIVACYREQUIRED") {
        MaildropError::Unsupported("upstream requires TLS before login (set imap.security)".into())
    } else {
        MaildropError::Auth
    }
}

fn mailbox_arg(name: &str) -> Result<Mailbox<'static>, MaildropError> {
    Mailbox::try_from(name.to_owned())
        .map_err(|e| MaildropError::Unsupported(format!("mailbox name {name:?}: {e}")))
}

/// UIDs as compact `a:b,c` sets, split so no command line grows past a few KiB.
fn uid_set(uids: &[u32]) -> Result<Vec<SequenceSet>, MaildropError> {
    let mut sorted: Vec<u32> = uids.iter().copied().filter(|&u| u != 0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut sets = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        if !text.is_empty() {
            text.push(',');
        }
        if start == end {
            text.push_str(&start.to_string());
        } else {
            text.push_str(&format!("{start}:{end}"));
        }
        if text.len() > 4000 {
            sets.push(parse_set(&std::mem::take(&mut text))?);
        }
    }
    if !text.is_empty() {
        sets.push(parse_set(&text)?);
    }
    Ok(sets)
}

fn parse_set(text: &str) -> Result<SequenceSet, MaildropError> {
    SequenceSet::try_from(text).map_err(|e| MaildropError::Unavailable(format!("UID set: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(uids: &[u32]) -> Vec<String> {
        uid_set(uids)
            .unwrap()
            .iter()
            .map(|s| {
                s.0.as_ref()
                    .iter()
                    .map(|seq| format!("{seq:?}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    #[test]
    fn uid_sets_are_compact_and_bounded() {
        assert!(uid_set(&[]).unwrap().is_empty());
        assert_eq!(uid_set(&[5, 1, 2, 3, 9, 9, 10]).unwrap().len(), 1);
        let r = render(&[5, 1, 2, 3, 9, 10]);
        assert_eq!(r.len(), 1);
        // 100k scattered UIDs must split into several bounded commands, losing none.
        let many: Vec<u32> = (1..=100_000).map(|i| i * 2).collect();
        let sets = uid_set(&many).unwrap();
        assert!(sets.len() > 1);
        let total: usize = sets.iter().map(|s| s.0.as_ref().len()).sum();
        assert_eq!(total, 100_000);
    }

    #[test]
    fn login_failure_classification() {
        let c = |code: Option<Code<'static>>| Completion {
            kind: StatusKind::No,
            code,
            text: "x".into(),
        };
        assert_eq!(login_failure(&c(None)), MaildropError::Auth);
        let unavailable = Code::Other(imap_next::imap_types::response::CodeOther::unvalidated(
            &b"UNAVAILABLE"[..],
        ));
        assert!(matches!(
            login_failure(&c(Some(unavailable))),
            MaildropError::Unavailable(_)
        ));
    }
}
