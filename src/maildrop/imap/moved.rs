//! Moved messages keep their UIDL (several folders on a server that offers OBJECTID, RFC
//! 8474): the snapshot learns each listed message's EMAILID (one pipelined
//! `UID FETCH <set> (UID EMAILID)` per folder, see [`crate::upstream::imap::objectid`]) and
//! serves a message listed before elsewhere under the UIDL it was first listed with, from the
//! per-maildrop map in sled ([`crate::uidl::moved`] decides). Off (nothing asked, nothing
//! stored) with one folder, without OBJECTID, or without a state directory.

use std::collections::HashMap;
use std::sync::Arc;

use super::{unavailable, ImapMaildrop};
use crate::maildrop::{MaildropError, MessageEntry};
use crate::uidl::folders::OtherUidls;
use crate::uidl::moved::{self, Listed, Origin};

/// EMAILIDs of one folder's listed messages: (folder index, sorted (UID, EMAILID)).
pub(super) type FolderIds = (usize, Vec<(u32, String)>);

impl ImapMaildrop {
    /// Whether this session follows moved messages.
    pub(super) fn tracks_moves(&self) -> bool {
        self.has_objectid && self.folders.len() > 1 && self.state.is_some()
    }

    /// The EMAILIDs of the current (selected) folder's `messages`.
    pub(super) async fn email_ids_here(
        &mut self,
        messages: &[MessageEntry],
    ) -> Result<FolderIds, MaildropError> {
        let uids: Vec<u32> = messages.iter().map(|m| m.uid).collect();
        let conn = self.conn.as_mut().ok_or_else(super::lost)?;
        match conn.email_ids(&uids).await {
            Ok(ids) => Ok((self.current, ids)),
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
        ids: Vec<FolderIds>,
    ) -> Arc<OtherUidls> {
        let Some(state) = self.state.clone() else {
            return others;
        };
        let ids: HashMap<(usize, u32), String> = ids
            .into_iter()
            .flat_map(|(f, list)| list.into_iter().map(move |(u, e)| ((f, u), e)))
            .collect();
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
        let known = state.email_origins(&self.key);
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
        if !r.pins.is_empty() {
            tracing::debug!(maildrop = %self.lock_key, count = r.pins.len(), "moved messages served under their first UIDL");
            Arc::make_mut(&mut others).pin(r.pins);
        }
        others
    }
}
