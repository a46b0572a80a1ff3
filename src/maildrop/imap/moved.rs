//! Moved messages keep their UIDL (several folders on a server that offers OBJECTID, RFC
//! 8474): the snapshot learns each listed message's EMAILID and serves a message listed
//! before elsewhere under the UIDL it was first listed with, from the per-maildrop map in
//! sled ([`crate::uidl::moved`] decides). A message still where it was first listed, or
//! where a moved one was last listed, has the EMAILID the records give that place; the
//! others (new or just moved) are asked for, one pipelined `UID FETCH <set> (UID EMAILID)`
//! per folder that has any (see [`crate::upstream::imap::objectid`]). Off (nothing asked,
//! nothing stored) with one folder, without OBJECTID, or without a state directory.

use std::collections::HashMap;
use std::sync::Arc;

use super::{unavailable, ImapMaildrop};
use crate::maildrop::{MaildropError, MessageEntry};
use crate::uidl::folders::{self, OtherUidls};
use crate::uidl::moved::{self, Listed, Origin, Origins};

/// What a snapshot that follows moves carries from folder to folder.
pub(super) struct Moves {
    /// The maildrop's map, as read at the start of the snapshot.
    known: Origins,
    /// The same, by origin: a message still where it was first listed has the EMAILID its
    /// origin is mapped from (a UID names one message for its folder's UIDVALIDITY), so it
    /// need not be asked for again.
    at: HashMap<Origin, String>,
    /// (folder index, UID) -> EMAILID of the listed messages.
    ids: HashMap<(usize, u32), String>,
    /// Where the moved messages were last listed, as read.
    moved_at: Origins,
}

impl ImapMaildrop {
    /// Whether this session follows moved messages: several folders, a server that offers
    /// OBJECTID, and a state directory to remember first UIDLs in; then the map, read.
    pub(super) fn start_moves(&mut self) -> Option<Moves> {
        if !(self.has_objectid && self.folders.len() > 1) {
            return None;
        }
        let state = self.state.clone()?;
        self.load_state(0);
        let known = state.email_origins(&self.key);
        let moved_at = state.moved_locations(&self.key);
        // A location names one message for its folder's UIDVALIDITY, whichever record says
        // an EMAILID was there. A location two records give different EMAILIDs (a damaged
        // cache, or a server that changed one) is asked for instead.
        let mut at: HashMap<Origin, String> = HashMap::new();
        let mut doubtful = Vec::new();
        for (e, o) in known.iter().chain(moved_at.iter()) {
            if at.get(o).is_some_and(|was| was != e) {
                doubtful.push(o.clone());
            }
            at.insert(o.clone(), e.clone());
        }
        for o in doubtful {
            at.remove(&o);
        }
        Some(Moves {
            known,
            at,
            ids: HashMap::new(),
            moved_at,
        })
    }

    /// The EMAILIDs of the current (selected) folder's `messages`: those still where the map
    /// says they were first listed are known; the others (new or moved) are asked for, in one
    /// pipelined round trip (none when there are none).
    pub(super) async fn learn_email_ids(
        &mut self,
        moves: &mut Moves,
        messages: &[MessageEntry],
    ) -> Result<(), MaildropError> {
        let folder = self.current;
        let tag = folders::folder_tag(&self.mailbox);
        let mut ask = Vec::new();
        for m in messages {
            let here = if folder == 0 {
                Origin::First {
                    uid_validity: self.uid_validity,
                    uid: m.uid,
                }
            } else {
                // Without the legacy map (not read yet): a UIDL it made take `~<n>` is
                // simply asked for.
                Origin::Other(folders::folder_uidl(tag, m.uid, self.uid_validity, None))
            };
            match moves.at.get(&here) {
                Some(e) => {
                    moves.ids.insert((folder, m.uid), e.clone());
                }
                None => ask.push(m.uid),
            }
        }
        if ask.is_empty() {
            return Ok(());
        }
        tracing::debug!(maildrop = %self.lock_key, folder = %self.mailbox, asked = ask.len(), known = messages.len() - ask.len(), "asking the server for EMAILIDs");
        let conn = self.conn.as_mut().ok_or_else(super::lost)?;
        match conn.email_ids(&ask).await {
            Ok(ids) => {
                moves
                    .ids
                    .extend(ids.into_iter().map(|(u, e)| ((folder, u), e)));
                Ok(())
            }
            Err(e) => {
                self.conn = None;
                Err(unavailable(e))
            }
        }
    }

    /// Pin the moved messages of the listing `messages` (first folder's UIDs, then later
    /// folders' handles) to the UIDLs they were first listed with, and remember the UIDLs of
    /// the messages listed for the first time. Runs with the first folder's state current.
    pub(super) fn pin_moved(
        &mut self,
        messages: &[MessageEntry],
        mut others: Arc<OtherUidls>,
        moves: Moves,
    ) -> Arc<OtherUidls> {
        let Some(state) = self.state.clone() else {
            return others;
        };
        let Moves {
            known,
            ids,
            moved_at,
            ..
        } = moves;
        let listed: Vec<Listed> = messages
            .iter()
            .filter_map(|m| {
                let (folder, uid) = self.resolve(m.uid)?;
                let here = if folder == 0 {
                    Origin::First {
                        uid_validity: self.uid_validity,
                        uid,
                    }
                } else {
                    Origin::Other(others.get(m.uid)?.to_owned())
                };
                Some(Listed {
                    handle: m.uid,
                    here,
                    email_id: ids.get(&(folder, uid)).cloned(),
                })
            })
            .collect();
        // Forget EMAILIDs no longer listed only when the listing is complete: a per-device
        // view lists recent mail only, and a folder may have been skipped.
        let complete = self.view.is_none() && self.served.len() == self.folders.len();
        let r = moved::resolve(&listed, &known, self.uid_validity, complete);
        if r.collisions > 0 {
            tracing::warn!(maildrop = %self.lock_key, count = r.collisions, "moved messages whose first UIDL another listed message has: served under the UIDL of where they are");
        }
        if let Some(store) = &r.store {
            state.store_email_origins(&self.key, store);
        }
        // Where the pinned ones are now: next time their EMAILIDs need not be asked for.
        let now: Origins = listed
            .iter()
            .filter(|l| r.pins.contains_key(&l.handle))
            .filter_map(|l| Some((l.email_id.clone()?, l.here.clone())))
            .take(moved::MAX_ORIGINS)
            .collect();
        if now != moved_at {
            state.store_moved_locations(&self.key, &now);
        }
        if !r.pins.is_empty() {
            tracing::debug!(maildrop = %self.lock_key, count = r.pins.len(), "moved messages served under their first UIDL");
            Arc::make_mut(&mut others).pin(r.pins);
        }
        others
    }
}
