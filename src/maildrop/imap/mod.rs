//! The maildrop backed by an IMAP folder. [`ImapUpstream`] (one per IMAP backend) logs users
//! in (`login.rs`: password, master user, OAuth tokens); each session's [`ImapMaildrop`] takes
//! the listing (`snapshot.rs`), serves message bytes with read-ahead and prefetch
//! (`retrieve.rs`), and applies the deletion mode at QUIT with UID commands only
//! (`commit.rs`), then retention of old hidden mail (`retention.rs`). Several folders share one
//! connection (`folders.rs`); a per-device view lists recent mail and deletes nothing
//! (`view.rs`). Migrated UIDL maps come from [`legacy_map`]; moved messages keep their UIDL
//! with OBJECTID (`moved.rs`). With `keep_alive_secs`, a session's connection is kept at its
//! clean end for the same user's next session instead of logged out ([`keepalive`]).

mod commit;
mod distance;
mod folders;
pub mod keepalive;
pub mod legacy_map;
mod login;
mod moved;
mod retention;
mod retrieve;
mod snapshot;
mod view;

use login::login_error;
pub use view::View;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;

use bytes::Bytes;

use imap_next::imap_types::mailbox::Mailbox;

use crate::config::{read_secret, DeletionConfig, DeletionMode, ImapConfig, RetentionAction};
use crate::maildrop::{
    BodyPart, Credential, Maildrop, MaildropError, MaildropKey, Mailstore, Snapshot,
};
use crate::password_file::PasswordFile;
use crate::pop3::command::Password;
use crate::state::StateStore;
use crate::upstream::imap::login::password;
use crate::upstream::imap::session;
use crate::upstream::imap::{Completion, ConnLimits, FetchOrder, ImapConnection, ImapError};
use crate::upstream::oauth::settings::TokenSource;
use crate::upstream::oauth::OAuthClient;
use crate::upstream::{Endpoint, Protocol, SetupError};

/// Everything needed to open maildrops on one IMAP server; shared by all sessions.
pub struct ImapUpstream {
    endpoint: Endpoint,
    limits: ConnLimits,
    mailbox: String,
    /// Every folder served, in listing order (`mailbox` first).
    folders: Vec<String>,
    /// Hidden mail past its time removed at commits (hide mode with `retention_days`).
    retention: Option<retention::Retention>,
    /// Days of mail a per-device view lists (`recent_days`); 0: no view here.
    recent_days: u32,
    deletion: DeletionMode,
    move_to: String,
    hide_keyword: String,
    state: Option<Arc<StateStore>>,
    /// Put before the login in the v2 state keys (see [`StateStore::adopt_v2_uidl_map`]).
    v2_prefix: String,
    /// Master user and password, when the operator logs in for the users.
    master: Option<(String, Password)>,
    /// Read migrated UIDL maps from IMAP METADATA (`migration.shared_map`).
    shared_map: bool,
    /// Decoded legacy UIDL maps, shared by the sessions.
    maps: Arc<legacy_map::MapCache>,
    /// The server's FETCH item order, as its connections found it.
    fetch_order: Arc<FetchOrder>,
    /// The server's FETCH round trip, as the latest session measured it.
    distance: Arc<distance::ServerDistance>,
    /// Log in with OAuth 2.0 tokens: where they come from, and the cache of them.
    oauth: Option<Arc<OAuthClient>>,
    /// `oauth.tokens = "app"`: the file that checks POP3 passwords.
    password_file: Option<Arc<PasswordFile>>,
    /// Connections kept after a session for the user's next one (`keep_alive_secs`).
    keep_alive: Option<Arc<keepalive::KeepAlive>>,
}

/// Where a session's connection goes at its clean end instead of LOGOUT.
pub(super) struct Keep {
    pool: Arc<keepalive::KeepAlive>,
    key: keepalive::ParkKey,
    capabilities: session::Capabilities,
}

impl ImapUpstream {
    /// The upstream for one IMAP backend. `v2_prefix` is what the v2 state layout put before
    /// its users' logins ([`crate::state::state_prefix`]), to carry their UIDL maps over.
    pub fn new(
        imap: &ImapConfig,
        deletion: &DeletionConfig,
        state: Option<Arc<StateStore>>,
        v2_prefix: &str,
        shared_map: bool,
    ) -> Result<ImapUpstream, SetupError> {
        let endpoint = Endpoint::new(Protocol::Imap, &imap.endpoint())?;
        let master = match (&imap.master_user, &imap.master_password_file) {
            (Some(user), Some(file)) => Some((
                user.clone(),
                Password::new(read_secret(file).map_err(SetupError::Secret)?),
            )),
            _ => None,
        };
        let oauth = match &imap.oauth {
            Some(o) => Some(Arc::new(
                OAuthClient::new(o).map_err(|e| SetupError::OAuth(e.to_string()))?,
            )),
            None => None,
        };
        let password_file = match imap.oauth.as_ref().and_then(|o| o.password_file.as_deref()) {
            Some(p) => Some(Arc::new(
                PasswordFile::load(p).map_err(|e| SetupError::OAuth(e.to_string()))?,
            )),
            None => None,
        };
        // Password logins only: an OAuth login's token expires on its own schedule.
        let keep_alive = match oauth {
            None => keepalive::KeepAlive::new(imap.keep_alive_secs, imap.keep_alive_max)?,
            Some(_) => None,
        };
        Ok(ImapUpstream {
            keep_alive,
            oauth,
            password_file,
            // A FETCH piece and its framing, or the one-line UID SEARCH of a huge mailbox.
            limits: ConnLimits::of(
                &endpoint,
                imap.fetch_chunk_bytes.saturating_mul(2).max(16 << 20),
            ),
            endpoint,
            mailbox: imap.mailbox.clone(),
            folders: imap.folders(),
            retention: imap
                .retention_days
                .or(Some(deletion.retention_days))
                .and_then(NonZeroU32::new)
                .filter(|_| deletion.mode == DeletionMode::Hide)
                .map(|days| retention::Retention {
                    days,
                    action: deletion.retention_action,
                    batch: deletion.retention_batch.max(1) as usize,
                }),
            recent_days: imap.recent_days.unwrap_or(0),
            deletion: deletion.mode,
            move_to: deletion.move_to.clone(),
            hide_keyword: deletion.hide_keyword.clone(),
            state,
            v2_prefix: v2_prefix.to_owned(),
            master,
            shared_map,
            maps: Arc::default(),
            fetch_order: Arc::default(),
            distance: Arc::default(),
        })
    }

    /// `host:port`, which with the login names one maildrop whatever backend reaches it.
    pub fn endpoint(&self) -> String {
        self.endpoint.address()
    }

    /// Check `password` by logging in and out (for `verify_password_with`). With
    /// `keep_alive_secs` (and no master user here, so the key's login form is this one's), a
    /// connection kept for the same user and password stands for a login made with them at
    /// most that long ago, as it does for a session: it is checked (see
    /// [`keepalive::KeepAlive::take`]) and kept again; a new login is kept instead of logged
    /// out.
    pub async fn check_password(&self, user: &str, password: &str) -> Result<(), MaildropError> {
        let keep = if self.master.is_none() {
            self.keep_key(user, Credential::Password(password), false)
        } else {
            None
        };
        if let Some(k) = &keep {
            if let Some(s) = k.pool.take(&k.key).await {
                k.pool.park(k.key, s.conn, s.capabilities, Vec::new()).await;
                return Ok(());
            }
        }
        let login = password::Password { user, password };
        let s = session::open(&self.endpoint, self.limits, &login)
            .await
            .map_err(login_error)?;
        match keep {
            Some(k) => k.pool.park(k.key, s.conn, s.capabilities, Vec::new()).await,
            None => s.conn.logout().await,
        }
        Ok(())
    }

    /// Log out the connections kept for users' next sessions, waiting at most `bound`
    /// (a stopping server).
    pub async fn log_out_kept(&self, bound: std::time::Duration) {
        if let Some(pool) = &self.keep_alive {
            pool.log_out_all(bound).await;
        }
    }

    /// Connect and read the greeting, without logging in: is the upstream there?
    pub async fn probe(&self) -> Result<(), ImapError> {
        let conn = ImapConnection::connect(&self.endpoint, self.limits).await?;
        conn.logout().await;
        Ok(())
    }

    /// The OAuth client, when this backend logs in with tokens.
    pub fn oauth(&self) -> Option<&Arc<OAuthClient>> {
        self.oauth.as_ref()
    }

    /// Whether POP3 clients may bring their own OAuth token for this backend.
    pub fn takes_client_tokens(&self) -> bool {
        self.oauth
            .as_ref()
            .is_some_and(|o| o.tokens() == TokenSource::Client)
    }

    async fn open(
        &self,
        user: &str,
        credential: Credential<'_>,
        view: bool,
    ) -> Result<ImapMaildrop, MaildropError> {
        let mut keep = self.keep_key(user, credential, view);
        let kept = match &keep {
            Some(k) => k.pool.take(&k.key).await,
            None => None,
        };
        let session::Session {
            mut conn,
            capabilities: caps,
        } = match kept {
            Some(s) => s,
            None => self.log_in(user, credential).await?,
        };
        if let Some(k) = &mut keep {
            k.capabilities = caps.clone();
        }
        conn.share_fetch_order(Arc::clone(&self.fetch_order));
        let has_move = caps.has("MOVE");
        let has_metadata = caps.has("METADATA");
        let has_uidplus = caps.has("UIDPLUS");
        let has_objectid = caps.has("OBJECTID");
        let has_condstore = caps.has("CONDSTORE") || caps.has("QRESYNC");
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
        let retention = self.retention.filter(|r| {
            let able = match r.action {
                RetentionAction::Expunge => has_uidplus,
                RetentionAction::Move => has_move || has_uidplus,
            };
            if !able {
                tracing::warn!(
                    user,
                    "retention needs UIDPLUS (expunge) or MOVE/UIDPLUS (move), which the server lacks: hidden mail is kept"
                );
            }
            able
        });

        let key = MaildropKey::new(&self.endpoint.address(), user, &self.mailbox);
        let folders = self
            .folders
            .iter()
            .enumerate()
            .map(|(i, name)| {
                if i == 0 {
                    folders::Folder::default()
                } else {
                    folders::Folder::new(
                        name,
                        MaildropKey::new(&self.endpoint.address(), user, name),
                    )
                }
            })
            .collect();
        Ok(ImapMaildrop {
            conn: Some(conn),
            keep,
            state: self.state.clone(),
            lock_key: key.clone(),
            key,
            folders,
            served: Vec::new(),
            retention,
            view: None,
            current: 0,
            selected: None,
            others: Vec::new(),
            first_other: None,
            hint: Vec::new(),
            v2_user: format!("{}{user}", self.v2_prefix),
            mailbox: self.mailbox.clone(),
            // Set by `select`, which `snapshot` runs under the IN-USE lock.
            uid_validity: 0,
            uid_next: None,
            deletion: self.deletion,
            move_to: self.move_to.clone(),
            hide_keyword: self.hide_keyword.clone(),
            has_move,
            has_objectid,
            has_condstore,
            shared_map: self.shared_map && has_metadata,
            maps: Arc::clone(&self.maps),
            pending_seen: Vec::new(),
            retrieved_before: Vec::new(),
            retrieved_now: HashSet::new(),
            retrieved_pruned: false,
            ahead_hint: Vec::new(),
            ahead: HashMap::new(),
            heads: HashMap::new(),
            heads_used: false,
            heads_window: 0,
            fetch_rtt: None,
            distance: Arc::clone(&self.distance),
        })
    }
}

impl ImapUpstream {
    /// Log `user` in for a per-device view (see [`View`]) with the user's own credentials.
    /// Its lock is `view_login`'s (the login form, e.g. `recent:alice`), not the user's: a
    /// view never hides or removes mail, so it runs beside the user's normal session; two
    /// sessions of the same view still exclude each other. Caches stay the user's.
    pub async fn login_view(
        &self,
        user: &str,
        view_login: &str,
        credential: Credential<'_>,
        dele: crate::config::ViewDele,
    ) -> Result<ImapMaildrop, MaildropError> {
        let Some(days) = NonZeroU32::new(self.recent_days) else {
            tracing::info!(
                user,
                "login in the per-device view form, but this backend has no view (recent_days = 0)"
            );
            return Err(MaildropError::Unsupported(
                "per-device views are not enabled for this mailbox".into(),
            ));
        };
        let mut md = self.open(user, credential, true).await?;
        md.view = Some(View { days, dele });
        md.retention = None;
        md.lock_key = MaildropKey::new(&self.endpoint.address(), view_login, &self.mailbox);
        Ok(md)
    }
}

impl Mailstore for ImapUpstream {
    type Maildrop = ImapMaildrop;

    /// With a master user, or an application's OAuth token checked by `verify_password_with`,
    /// this logs in for `user` whatever the password is: callers serving clients must check
    /// the password first (`RoutedUpstream` does, via `verify_password_with`, which the
    /// configuration requires then).
    async fn login(
        &self,
        user: &str,
        credential: Credential<'_>,
    ) -> Result<ImapMaildrop, MaildropError> {
        self.open(user, credential, false).await
    }
}

/// An authenticated upstream session with the maildrop folder selected.
pub struct ImapMaildrop {
    /// `None` once the connection failed: every later call fails fast.
    conn: Option<ImapConnection>,
    /// Keep the connection for the user's next session at a clean end (`keep_alive_secs`).
    keep: Option<Keep>,
    state: Option<Arc<StateStore>>,
    /// Which maildrop this is: its lock and its log lines (the first folder's key).
    lock_key: MaildropKey,
    /// The current folder's key: its cache entries, its decoded map.
    key: MaildropKey,
    /// Every folder served, in listing order; the current one's state is in this struct's
    /// fields, the others' parked here (see `folders.rs`).
    folders: Vec<folders::Folder>,
    /// Which of `folders` the listing holds (opened at login).
    served: Vec<usize>,
    /// Retention to apply at the commit, when configured and possible.
    retention: Option<retention::Retention>,
    /// A per-device view session: what it lists and what its DELE does.
    view: Option<View>,
    /// Which of `folders` is current.
    current: usize,
    /// Which of `folders` is selected upstream.
    selected: Option<usize>,
    /// Where the snapshot's handles of later folders' messages point: (folder, UID), the
    /// message with handle `u32::MAX - i` at `others[i]`.
    others: Vec<(usize, u32)>,
    /// The lowest such handle.
    first_other: Option<u32>,
    /// The session's read-ahead hint, in handles.
    hint: Vec<(u32, u64)>,
    /// How the v2 state layout named the user (backend prefix and login), to carry a map over.
    v2_user: String,
    mailbox: String,
    uid_validity: u32,
    /// UIDNEXT at SELECT, when reported (bounds a legacy UIDL map's entries).
    uid_next: Option<u32>,
    deletion: DeletionMode,
    move_to: String,
    hide_keyword: String,
    has_move: bool,
    /// The server offers OBJECTID (RFC 8474): with several folders, moved messages keep
    /// their UIDL (see `snapshot.rs` and [`crate::uidl::moved`]).
    has_objectid: bool,
    /// The server offers CONDSTORE (RFC 7162): retention removes only what did not change
    /// since its SEARCH (see `retention.rs`).
    has_condstore: bool,
    /// Look for a migrated UIDL map in METADATA (configured, and the server offers it).
    shared_map: bool,
    maps: Arc<legacy_map::MapCache>,
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
    /// Whole small messages fetched ahead, by UID; at most one read-ahead window in all
    /// (READ_AHEAD_BYTES decoded, `stream_budget` streamed).
    ahead: HashMap<u32, Bytes>,
    /// The first octets (a TOP's first piece) of messages longer than that, fetched ahead for
    /// the TOPs a header-previewing client sends next, by UID: one window, at most HEADS_MAX
    /// pieces of at most HEAD_AHEAD_MAX_PIECE each, within `stream_budget` (READ_AHEAD_BYTES
    /// on a server whose FETCH answers must be decoded).
    heads: HashMap<u32, Bytes>,
    /// A TOP was served from `heads` since the last FETCH of first pieces: the client is
    /// previewing, and the next window was asked for ahead (`prefetch_heads`).
    heads_used: bool,
    /// How many first pieces the next window asked for ahead holds (see HEADS_FIRST).
    heads_window: usize,
    /// The shortest time a streamed FETCH took to its first body byte (a round trip plus the
    /// server's work): sizes the read-ahead to the link, see `stream_budget`.
    fetch_rtt: Option<std::time::Duration>,
    /// Where this session's `fetch_rtt` is told to the next sessions, and where it starts
    /// from before it has one (see `distance.rs`).
    distance: Arc<distance::ServerDistance>,
}

/// Read ahead at most this many bytes per session ...
const READ_AHEAD_BYTES: u64 = 256 * 1024;
/// The same limits when the messages read ahead come in a streamed FETCH (no decoding cost,
/// so medium-sized messages are worth reading ahead too: each saves two round trips).
const STREAM_AHEAD_BYTES: u64 = 1024 * 1024;
/// On a distant server the streamed read-ahead grows to what arrives in one round trip at
/// STREAM_AHEAD_RATE (the bandwidth-delay product the client can use), up to this.
const STREAM_AHEAD_MAX_BYTES: u64 = 4 << 20;
const STREAM_AHEAD_RATE: f64 = 64e6;
const STREAM_AHEAD_MAX_MESSAGE: u64 = 256 * 1024;
/// ... and only messages up to this size (bigger ones are streamed anyway).
const READ_AHEAD_MAX_MESSAGE: u64 = 64 * 1024;
/// A first piece at most this long is a TOP's (see `pop3::retrieve`): the same piece of the
/// next messages is fetched along with it (heads), within READ_AHEAD_BYTES.
const HEAD_AHEAD_MAX_PIECE: u64 = 64 * 1024;
/// The next message is prefetched (its FETCH sent as soon as the current one was handed out,
/// see [`ImapMaildrop::prefetch_next`]) only up to this size: a client that asks for
/// something else makes popbridge read and discard it before its next command.
const PREFETCH_MAX_MESSAGE: u64 = 4 << 20;
/// On a server at least this far (the shortest FETCH round trip seen), several FETCHes are
/// sent ahead at once (see [`ImapMaildrop::prefetch_next`]); nearer (loopback, a LAN) one.
const PREFETCH_QUEUE_MIN_RTT: std::time::Duration = std::time::Duration::from_millis(5);

impl ImapMaildrop {
    /// Which maildrop this is (the key of its RFC 1939 lock).
    // The lock is the first folder's whatever folder is current (`self.key`).
    #[allow(clippy::misnamed_getters)]
    pub fn key(&self) -> &MaildropKey {
        &self.lock_key
    }
}

impl Maildrop for ImapMaildrop {
    async fn snapshot(&mut self) -> Result<Snapshot, MaildropError> {
        self.take_snapshot().await
    }

    /// `handle` is a UID, or with several folders one of the snapshot's handles (see
    /// `folders.rs`); so in the methods below.
    async fn fetch(&mut self, handle: u32, offset: u64, len: u32) -> Result<Bytes, MaildropError> {
        let uid = self.enter_for(handle).await?;
        self.fetch_piece(uid, offset, len).await
    }

    async fn read_body(
        &mut self,
        handle: u32,
        size: u64,
        offset: u64,
        max: u32,
    ) -> Result<BodyPart, MaildropError> {
        let uid = self.enter_for(handle).await?;
        self.read_part(uid, size, offset, max).await
    }

    fn read_ahead_octets(&self) -> u64 {
        self.hint_octets()
    }

    fn read_ahead_hint(&mut self, upcoming: Vec<(u32, u64)>) {
        // Moved, not copied: this runs before every RETR and TOP, with up to 4,096 entries.
        if self.folders.len() > 1 {
            self.hint = upcoming;
        } else {
            self.ahead_hint = upcoming;
        }
    }

    /// Owed until the next upstream command (or the end of the session), so a RETR costs one
    /// round trip, not two.
    async fn mark_seen(&mut self, handle: u32) -> Result<(), MaildropError> {
        let uid = self.enter_for(handle).await?;
        self.pending_seen.push(uid);
        Ok(())
    }

    fn retrieved(&mut self, handle: u32) {
        let Some((i, uid)) = self.resolve(handle) else {
            return;
        };
        let was = self.current;
        self.load_state(i);
        self.note_retrieved(uid);
        self.load_state(was);
    }

    async fn commit(&mut self, handles: &[u32]) -> Result<(), MaildropError> {
        self.apply_deletions(handles).await
    }

    /// The `\Seen` flags still owed go out with the LOGOUT: one round trip.
    async fn close(self) {
        self.finish().await;
    }
}

pub(super) fn lost() -> MaildropError {
    MaildropError::unavailable("upstream connection lost")
}

pub(super) fn unavailable(e: ImapError) -> MaildropError {
    MaildropError::unavailable_by("IMAP connection failed", e)
}

pub(super) fn expect_ok(what: &str, done: Completion) -> Result<(), MaildropError> {
    if done.is_ok() {
        Ok(())
    } else if let Some(e) = pressure_error(what, &done) {
        Err(e)
    } else {
        Err(MaildropError::unavailable(format!(
            "{what} failed: {}",
            done.text
        )))
    }
}

/// A NO or BAD that says the server is under pressure (see [`session::pressure`]).
pub(super) fn pressure_error(what: &str, done: &Completion) -> Option<MaildropError> {
    session::pressure(done)
        .map(|signal| MaildropError::busy(signal, format!("{what}: {}", done.text)))
}

pub(super) fn mailbox_arg(name: &str) -> Result<Mailbox<'static>, MaildropError> {
    Mailbox::try_from(name.to_owned())
        .map_err(|e| MaildropError::Unsupported(format!("mailbox name {name:?}: {e}")))
}
