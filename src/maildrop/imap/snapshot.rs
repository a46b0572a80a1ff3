//! The listing a session serves: SELECT, the UIDs POP3 may see, their sizes (cached in sled,
//! fetched when unknown), and the migrated UIDL map, under the IN-USE lock.

use std::sync::Arc;

use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::{Atom, Vec1};
use imap_next::imap_types::fetch::MessageDataItemName;
use imap_next::imap_types::response::Data;
use imap_next::imap_types::search::SearchKey;

use super::{lost, unavailable, ImapMaildrop};
use crate::config::DeletionMode;
use crate::maildrop::{MaildropError, MessageEntry, Snapshot};
use crate::metrics::metrics;
use crate::uidl::folders::{self, OtherUidls};
use crate::uidl::map::{MapHead, UidlMap};
use crate::upstream::imap::metadata::{self, MetadataError};
use crate::upstream::imap::session::{self, MailboxStatus};
use crate::upstream::imap::uid_sets;
use crate::upstream::imap::Untagged;

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
    ///
    /// A later folder of a several-folder maildrop (`primary` false) that cannot be served
    /// (missing, read-only, cannot store the hide keyword) is a warning and `None`: the
    /// session serves the others.
    async fn open_mailbox(&mut self, primary: bool) -> Result<Option<Opened>, MaildropError> {
        let select = session::select(&self.mailbox, false).map_err(MaildropError::Unsupported)?;
        let criteria = if let Some(view) = self.view {
            view.criterion()?
        } else if self.deletion == DeletionMode::Hide {
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
        if self.shared_map && primary {
            match metadata::head_command(&self.mailbox) {
                Ok(body) => bodies.push(body),
                Err(e) => return Err(self.map_unusable(e)),
            }
        }
        let mut status = MailboxStatus::default();
        let mut uids: Vec<u32> = Vec::new();
        let mut values = metadata::Values::default();
        let conn = self.conn.as_mut().ok_or_else(lost)?;
        let mut done = conn
            .execute_all(bodies, |u| match values.absorb(u) {
                Some(Untagged::Data(Data::Search(found, ..))) => {
                    uids.extend(found.iter().map(|u| u.get()))
                }
                Some(u) => {
                    status.absorb(&u);
                }
                None => {}
            })
            .await
            .map_err(|e| {
                self.conn = None;
                unavailable(e)
            })?;
        let head_done = if self.shared_map && primary {
            done.pop()
        } else {
            None
        };
        let (Some(search_done), Some(select_done)) = (done.pop(), done.pop()) else {
            return Err(MaildropError::unavailable("no completion"));
        };
        if !primary {
            let refusal = if !select_done.is_ok() {
                Some(select_done.text.clone())
            } else if status.read_only {
                Some("read-only".to_owned())
            } else if self.deletion == DeletionMode::Hide
                && self.view.is_none()
                && !status.can_store(&self.hide_keyword)
            {
                Some(format!(
                    "cannot store the hide keyword {}",
                    self.hide_keyword
                ))
            } else if status.uid_validity.is_none() {
                Some("no UIDVALIDITY".to_owned())
            } else {
                None
            };
            if let Some(why) = refusal {
                self.selected = None;
                metrics().folders_skipped.inc();
                tracing::warn!(maildrop = %self.lock_key, folder = %self.mailbox, reason = %why, "a folder of this maildrop cannot be served; serving the others");
                return Ok(None);
            }
        }
        if !select_done.is_ok() {
            self.abandon().await;
            if let Some(e) = super::pressure_error("SELECT refused", &select_done) {
                return Err(e);
            }
            return Err(MaildropError::Unsupported(format!(
                "cannot open mailbox {:?}: {}",
                self.mailbox, select_done.text
            )));
        }
        status.complete(&select_done);
        if status.read_only {
            self.abandon().await;
            return Err(MaildropError::Unsupported(format!(
                "mailbox {:?} is read-only upstream",
                self.mailbox
            )));
        }
        let Some(uid_validity) = status.uid_validity else {
            self.abandon().await;
            return Err(MaildropError::unavailable(
                "server did not report UIDVALIDITY on SELECT",
            ));
        };
        if self.deletion == DeletionMode::Hide && self.view.is_none() {
            // RFC 3501: without PERMANENTFLAGS, all flags can be changed permanently.
            if !status.can_store(&self.hide_keyword) {
                self.abandon().await;
                return Err(MaildropError::Unsupported(format!(
                    "deletion.mode = \"hide\" needs the keyword {} but the mailbox cannot store it",
                    self.hide_keyword
                )));
            }
        }
        if !search_done.is_ok() {
            return Err(MaildropError::unavailable(format!(
                "listing failed: {}",
                search_done.text
            )));
        }
        self.uid_validity = uid_validity;
        self.uid_next = status.uid_next;
        self.selected = Some(self.current);
        uids.sort_unstable();
        uids.dedup();
        let head = head_done.map(|done| metadata::head_from(values, done));
        Ok(Some(Opened { uids, head }))
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
        let (key, uid_validity) = (self.key.clone(), self.uid_validity);
        let Some(conn) = self.conn.as_mut() else {
            return Err(MaildropError::unavailable("upstream connection lost"));
        };
        let cached = self
            .state
            .as_ref()
            .map(|s| s.sizes(&key, uid_validity))
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
            let fetches = uid_sets(&missing)
                .map_err(MaildropError::unavailable)?
                .into_iter()
                .map(|set| {
                    CommandBody::fetch(
                        set,
                        vec![MessageDataItemName::Uid, MessageDataItemName::Rfc822Size],
                        true,
                    )
                    .map_err(|e| MaildropError::unavailable_by("cannot build the IMAP command", e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let done = conn
                .execute_all(fetches, |u| fetched.extend(u.uid_and_size()))
                .await
                .map_err(unavailable)?;
            // NO [EXPUNGEISSUED]: some went away since the SEARCH; they get no size and are
            // not listed.
            if let Some(failed) = done.iter().find(|d| !d.answered_but_expunged()) {
                return Err(MaildropError::unavailable(format!(
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
                state.store_sizes(&key, uid_validity, &listing);
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

impl ImapMaildrop {
    /// The listing, under the IN-USE lock (see [`Maildrop::snapshot`]): the folders in
    /// listing order, each listed while selected. They are opened last to first, so the
    /// first folder, where most mail is read, is the one left selected.
    pub(super) async fn take_snapshot(&mut self) -> Result<Snapshot, MaildropError> {
        let mut later: Vec<(usize, Vec<MessageEntry>)> = Vec::new();
        let mut moves = self.start_moves();
        self.served.clear();
        for i in (1..self.folders.len()).rev() {
            self.load_state(i);
            if let Some(opened) = self.open_mailbox(false).await? {
                let messages = self.folder_listing(opened.uids).await?;
                if let Some(moves) = moves.as_mut() {
                    self.learn_email_ids(moves, &messages).await?;
                }
                later.push((i, messages));
                self.served.push(i);
            }
        }
        self.served.push(0);
        self.load_state(0);
        let Some(opened) = self.open_mailbox(true).await? else {
            return Err(MaildropError::unavailable("no first folder"));
        };
        let mut messages = self.folder_listing(opened.uids).await?;
        if let Some(moves) = moves.as_mut() {
            self.learn_email_ids(moves, &messages).await?;
        }
        let legacy = self.legacy_map(opened.head).await?;
        let mut others = self.number_later(&mut messages, later, legacy.as_deref());
        if let Some(moves) = moves {
            others = others.map(|o| self.pin_moved(&messages, o, moves));
        }
        Ok(Snapshot {
            uid_validity: self.uid_validity,
            messages,
            legacy,
            others,
        })
    }

    /// Later folders' messages, appended to the first folder's in listing order, with
    /// handles for UIDs (see [`crate::uidl::folders`]) and their UIDLs.
    fn number_later(
        &mut self,
        messages: &mut Vec<MessageEntry>,
        mut later: Vec<(usize, Vec<MessageEntry>)>,
        legacy: Option<&UidlMap>,
    ) -> Option<Arc<OtherUidls>> {
        if self.folders.len() < 2 {
            return None;
        }
        later.sort_by_key(|(i, _)| *i);
        let count: usize = later.iter().map(|(_, m)| m.len()).sum();
        let lowest = count.checked_sub(1).map(folders::handle);
        let top = messages.last().map_or(0, |m| m.uid);
        if lowest.is_some_and(|l| l <= top) {
            // UIDs this close to 2^32 do not happen (servers renumber long before).
            tracing::error!(maildrop = %self.lock_key, "first folder's UIDs reach the handles of later folders; serving the first folder only");
            return None;
        }
        self.others.clear();
        let mut uidls = Vec::with_capacity(count);
        for (i, listed) in later {
            self.load_state(i);
            let tag = folders::folder_tag(&self.mailbox);
            for m in listed {
                uidls.push(folders::folder_uidl(tag, m.uid, self.uid_validity, legacy));
                messages.push(MessageEntry {
                    uid: folders::handle(self.others.len()),
                    size: m.size,
                });
                self.others.push((i, m.uid));
            }
        }
        self.load_state(0);
        self.first_other = lowest;
        Some(Arc::new(OtherUidls::new(uidls)))
    }

    /// The current folder's listing with sizes, and its records updated.
    async fn folder_listing(&mut self, uids: Vec<u32>) -> Result<Vec<MessageEntry>, MaildropError> {
        let messages = self.sizes(uids).await?;
        if let Some(state) = &self.state {
            let before = state.retrieved(&self.key, self.uid_validity);
            let listed = |uid: &u32| {
                messages
                    .binary_search_by_key(uid, |m: &MessageEntry| m.uid)
                    .is_ok()
            };
            self.retrieved_before = before.iter().copied().filter(listed).collect();
            self.retrieved_pruned = self.retrieved_before.len() != before.len();
        }
        if let Some(state) = &self.state {
            if state.observe_mailbox(&self.key, self.uid_validity) {
                metrics().uidl_changed_sessions.inc();
            }
        }
        Ok(messages)
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
        use super::legacy_map::{Lookup, Source};
        let m = metrics();
        if let Some(state) = &self.state {
            if state.uidl_map_head(&self.key).is_none() {
                state.adopt_v2_uidl_map(&self.key, &self.v2_user, &self.mailbox);
            }
        }
        let lookup = Lookup {
            state: self.state.as_ref(),
            cache: &self.maps,
            key: &self.key,
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
        tracing::error!(maildrop = %self.key, error = %e, "cannot use the legacy UIDL map from METADATA; refusing the login");
        if matches!(e, MetadataError::Imap(_)) {
            self.conn = None;
        }
        MaildropError::unavailable(format!("legacy UIDL map unusable: {e}"))
    }
}
