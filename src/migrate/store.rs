//! The new IMAP mailbox as `popbridge migrate` sees it: logged in with the user's password or
//! the backend's master user (AUTHENTICATE PLAIN, SASL-IR, the user as authorization
//! identity), the maildrop folder examined read-only, sizes and headers fetched in batches,
//! and the legacy UIDL map read from and written to METADATA.

use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::Vec1;
use imap_next::imap_types::fetch::{MessageDataItem, MessageDataItemName, Section};
use imap_next::imap_types::response::Data;
use imap_next::imap_types::search::SearchKey;
use imap_next::imap_types::sequence::SequenceSet;

use super::matcher::NewMessage;
use super::Credential;
use crate::config::ImapConfig;
use crate::maildrop::MaildropKey;
use crate::uidl::map::{MapHead, UidlMap};
use crate::upstream::credentials::Unsendable;
use crate::upstream::imap::login::{password, plain, Mechanism};
use crate::upstream::imap::metadata::{self, MetadataError};
use crate::upstream::imap::session::{self, MailboxStatus, SessionError};
use crate::upstream::imap::{uid_sets, ConnLimits, ImapConnection, ImapError, Untagged};
use crate::upstream::{Endpoint, Protocol, SetupError};

/// UIDs per FETCH command.
const BATCH: usize = 256;

/// Why the new store could not do what `migrate` asked. The message names what failed and
/// includes the underlying error's; [`std::error::Error::source`] gives that error itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("IMAP: {0}")]
    Imap(#[from] ImapError),
    /// The server refused the connection or the login for now (refused or reset at connect,
    /// BYE, `NO [THROTTLED]`, `[LIMIT]`, `[UNAVAILABLE]`, `[INUSE]`): worth trying again later.
    #[error("IMAP busy: {0}")]
    Busy(String),
    /// The server refused the login (its text).
    #[error("IMAP login refused: {0}")]
    Login(String),
    /// The credentials cannot be sent; nothing was.
    #[error("IMAP login refused: {0}")]
    Unsendable(#[source] Unsendable),
    #[error("IMAP {command} failed: {text}")]
    Failed { command: &'static str, text: String },
    /// The session could not be set up after the login (CAPABILITY).
    #[error("IMAP setup: {0}")]
    Session(#[source] SessionError),
    /// The configured mailbox name cannot be sent.
    #[error("IMAP setup: {0}")]
    Mailbox(String),
    /// A UID set cannot be sent.
    #[error("IMAP setup: {0}")]
    UidSet(String),
    #[error("IMAP setup: {0}")]
    Endpoint(#[from] SetupError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

pub struct Store {
    conn: ImapConnection,
    pub mailbox: String,
    pub uid_validity: u32,
    /// UIDNEXT at EXAMINE, when reported: bounds the entries of a map read from METADATA.
    pub uid_next: Option<u32>,
    pub has_metadata: bool,
    /// Which maildrop this is: the key its sled entries are under, as for a `serve` session.
    pub key: MaildropKey,
    /// How the v2 state layout named the user (see [`crate::state::state_prefix`]): a map
    /// kept there is carried over.
    pub v2_user: String,
}

fn failed(command: &'static str, text: String) -> StoreError {
    StoreError::Failed { command, text }
}

impl Store {
    pub async fn open(
        imap: &ImapConfig,
        user: &str,
        cred: &Credential,
    ) -> Result<Store, StoreError> {
        let endpoint = Endpoint::new(Protocol::Imap, &imap.endpoint())?;
        let limits = ConnLimits::of(&endpoint, 64 << 20);
        let by_password;
        let by_master;
        let mechanism: &dyn Mechanism = match cred {
            Credential::Password(pw) => {
                by_password = password::Password { user, password: pw };
                &by_password
            }
            Credential::Master { user: m, password } => {
                by_master = plain::Plain::master(user, m, password);
                &by_master
            }
        };
        let session::Session {
            mut conn,
            capabilities,
        } = match session::open(&endpoint, limits, mechanism).await {
            Ok(s) => s,
            Err(SessionError::Refused { done, .. }) => {
                let busy = done.other_code().is_some_and(|c| {
                    let code = c.split(' ').next().unwrap_or_default();
                    ["THROTTLED", "LIMIT", "UNAVAILABLE", "INUSE"].contains(&code)
                });
                return Err(if busy {
                    StoreError::Busy(format!("login: {}", done.text))
                } else {
                    StoreError::Login(done.text)
                });
            }
            Err(SessionError::Unsendable(e)) => return Err(StoreError::Unsendable(e)),
            Err(SessionError::Imap(
                e @ (ImapError::Connect { .. }
                | ImapError::Closed
                | ImapError::Io(_)
                | ImapError::Bye(_)
                | ImapError::Timeout(_)),
            )) => return Err(StoreError::Busy(e.to_string())),
            Err(SessionError::Imap(e)) => return Err(e.into()),
            Err(e @ SessionError::Capability(_)) => return Err(StoreError::Session(e)),
        };
        let examine = session::select(&imap.mailbox, true).map_err(StoreError::Mailbox)?;
        let mut status = MailboxStatus::default();
        let done = conn
            .execute(examine, |u| {
                status.absorb(&u);
            })
            .await?;
        if !done.is_ok() {
            return Err(failed("EXAMINE", done.text));
        }
        let uid_validity = status
            .uid_validity
            .ok_or_else(|| failed("EXAMINE", "no UIDVALIDITY reported".into()))?;
        Ok(Store {
            conn,
            mailbox: imap.mailbox.clone(),
            uid_validity,
            uid_next: status.uid_next,
            has_metadata: capabilities.has("METADATA"),
            key: MaildropKey::new(&endpoint.address(), user, &imap.mailbox),
            v2_user: user.to_owned(),
        })
    }

    /// Every message of the folder with its RFC822.SIZE, in UID order.
    pub async fn messages(&mut self) -> Result<Vec<NewMessage>, StoreError> {
        let mut uids = Vec::new();
        let done = self
            .conn
            .execute(
                CommandBody::search(None, Vec1::from(SearchKey::All), true),
                |u| {
                    if let Untagged::Data(Data::Search(found, ..)) = u {
                        uids.extend(found.iter().map(|u| u.get()));
                    }
                },
            )
            .await?;
        if !done.is_ok() {
            return Err(failed("UID SEARCH", done.text));
        }
        uids.sort_unstable();
        uids.dedup();
        let mut sizes = std::collections::HashMap::new();
        for batch in uids.chunks(BATCH) {
            // A `SequenceSet` converts into itself: building the command cannot fail.
            let Ok(body) = CommandBody::fetch(
                set(batch)?,
                vec![MessageDataItemName::Uid, MessageDataItemName::Rfc822Size],
                true,
            );
            let done = self
                .conn
                .execute(body, |u| {
                    if let Some((uid, size)) = u.uid_and_size() {
                        sizes.insert(uid, u64::from(size));
                    }
                })
                .await?;
            if !done.answered_but_expunged() {
                return Err(failed("UID FETCH", done.text));
            }
        }
        Ok(uids
            .into_iter()
            .filter_map(|uid| sizes.get(&uid).map(|&size| NewMessage { uid, size }))
            .collect())
    }

    /// `BODY.PEEK[HEADER]` (or the whole `BODY.PEEK[]` with `whole`) of `uids`, handed to
    /// `each` as every message arrives (a batch of [`BATCH`] headers or 16 whole messages per
    /// command, so at most one answer is in memory); messages expunged meanwhile are skipped.
    pub async fn each_section(
        &mut self,
        uids: &[u32],
        whole: bool,
        mut each: impl FnMut(u32, &[u8]),
    ) -> Result<(), StoreError> {
        let per_command = if whole { 16 } else { BATCH };
        for batch in uids.chunks(per_command) {
            let Ok(body) = CommandBody::fetch(
                set(batch)?,
                vec![
                    MessageDataItemName::Uid,
                    MessageDataItemName::BodyExt {
                        section: if whole {
                            None
                        } else {
                            Some(Section::Header(None))
                        },
                        partial: None,
                        peek: true,
                    },
                ],
                true,
            );
            let done = self
                .conn
                .execute(body, |u| {
                    if let Untagged::Data(Data::Fetch { items, .. }) = u {
                        let (mut uid, mut data) = (None, None);
                        for item in items.into_iter() {
                            match item {
                                MessageDataItem::Uid(u) => uid = Some(u.get()),
                                MessageDataItem::BodyExt { data: d, .. } => data = d.into_option(),
                                _ => {}
                            }
                        }
                        // NIL or "": the message went away meanwhile (no message is empty).
                        if let (Some(uid), Some(data)) = (uid, data) {
                            if !data.is_empty() {
                                each(uid, &data);
                            }
                        }
                    }
                })
                .await?;
            if !done.answered_but_expunged() {
                return Err(failed("UID FETCH", done.text));
            }
        }
        Ok(())
    }

    /// The map in METADATA with its head, bounded as [`metadata::read_text`] describes.
    pub async fn read_map(&mut self) -> Result<Option<(MapHead, UidlMap)>, StoreError> {
        Ok(metadata::read_map(&mut self.conn, &self.mailbox, self.uid_next).await?)
    }

    /// Writes `map` to METADATA as a new generation; the head written.
    pub async fn write_map(
        &mut self,
        map: &UidlMap,
        chunk_bytes: usize,
    ) -> Result<MapHead, StoreError> {
        Ok(metadata::write_map(&mut self.conn, &self.mailbox, map, chunk_bytes).await?)
    }

    pub async fn logout(self) {
        self.conn.logout().await;
    }
}

fn set(uids: &[u32]) -> Result<SequenceSet, StoreError> {
    uid_sets(uids)
        .map_err(StoreError::UidSet)?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::UidSet("empty UID set".into()))
}
