//! Several folders served as one maildrop (`mailboxes`), over one upstream connection: each
//! folder's own state (key, UIDVALIDITY, retrieved record), which of them is selected, and
//! the handles the session knows later folders' messages by (see [`crate::uidl::folders`]).
//!
//! The session-facing code of the maildrop (`snapshot.rs`, `retrieve.rs`, `commit.rs`) works
//! on "the current folder": its state lives in [`ImapMaildrop`]'s fields, the other folders'
//! is parked in [`Folder`]s and swapped in by [`ImapMaildrop::load_state`]. With one folder
//! nothing here ever runs a command, and handles are UIDs.

use std::collections::HashSet;

use super::ImapMaildrop;
use crate::maildrop::{MaildropError, MaildropKey};
use crate::upstream::imap::session::{self, MailboxStatus};

/// A folder's own state while another folder is current.
#[derive(Debug, Default)]
pub(super) struct Folder {
    pub(super) name: String,
    pub(super) key: Option<MaildropKey>,
    pub(super) uid_validity: u32,
    pub(super) uid_next: Option<u32>,
    pub(super) retrieved_before: Vec<u32>,
    pub(super) retrieved_now: HashSet<u32>,
    pub(super) retrieved_pruned: bool,
}

impl Folder {
    pub(super) fn new(name: &str, key: MaildropKey) -> Folder {
        Folder {
            name: name.to_owned(),
            key: Some(key),
            ..Folder::default()
        }
    }
}

impl ImapMaildrop {
    fn swap_state(&mut self, i: usize) {
        let f = &mut self.folders[i];
        std::mem::swap(&mut self.mailbox, &mut f.name);
        if let Some(key) = f.key.as_mut() {
            std::mem::swap(&mut self.key, key);
        }
        std::mem::swap(&mut self.uid_validity, &mut f.uid_validity);
        std::mem::swap(&mut self.uid_next, &mut f.uid_next);
        std::mem::swap(&mut self.retrieved_before, &mut f.retrieved_before);
        std::mem::swap(&mut self.retrieved_now, &mut f.retrieved_now);
        std::mem::swap(&mut self.retrieved_pruned, &mut f.retrieved_pruned);
    }

    /// Make folder `i`'s state the current one (no upstream command).
    pub(super) fn load_state(&mut self, i: usize) {
        if i == self.current || i >= self.folders.len() {
            return;
        }
        // Park the current folder's state in its slot, then take folder i's from its own.
        self.swap_state(self.current);
        self.swap_state(i);
        self.current = i;
    }

    /// The name of folder `i`.
    pub(super) fn folder_name(&self, i: usize) -> &str {
        if i == self.current {
            &self.mailbox
        } else {
            &self.folders[i].name
        }
    }

    /// Which folder and UID a snapshot handle stands for (`None`: not a listed message).
    pub(super) fn resolve(&self, handle: u32) -> Option<(usize, u32)> {
        match self.first_other {
            Some(lowest) if handle >= lowest => {
                self.others.get((u32::MAX - handle) as usize).copied()
            }
            _ => Some((0, handle)),
        }
    }

    /// Select folder `i` upstream, if it is not the selected one, and make its state current.
    /// The `\Seen` flags owed in the folder selected before go out first, in the same round
    /// trip; what was read ahead there is dropped. A folder that is gone, or came back with
    /// another UIDVALIDITY, has none of the listed messages any more:
    /// [`MaildropError::Gone`].
    pub(super) async fn enter(&mut self, i: usize) -> Result<(), MaildropError> {
        if self.selected == Some(i) {
            self.load_state(i);
            return Ok(());
        }
        self.ahead.clear();
        self.ahead_hint.clear();
        let name = self.folder_name(i).to_owned();
        let select = session::select(&name, false).map_err(MaildropError::Unsupported)?;
        let mut status = MailboxStatus::default();
        let done = self
            .run(select, |u| {
                status.absorb(&u);
            })
            .await?;
        if let Some(c) = self.conn.as_mut() {
            // Bodies of the folder left behind, read ahead before the SELECT.
            drop(c.take_ahead());
        }
        self.load_state(i);
        status.complete(&done);
        if !done.is_ok() {
            self.selected = None;
            tracing::warn!(maildrop = %self.lock_key, folder = %name, text = %done.text, "a served folder can no longer be selected; its messages read as gone");
            return Err(MaildropError::Gone);
        }
        self.selected = Some(i);
        if status.uid_validity != Some(self.uid_validity) {
            tracing::warn!(maildrop = %self.lock_key, folder = %name, "a served folder changed its UIDVALIDITY during the session; its listed messages read as gone");
            return Err(MaildropError::Gone);
        }
        Ok(())
    }

    /// Resolve `handle` and select its folder: the UID to ask for there.
    pub(super) async fn enter_for(&mut self, handle: u32) -> Result<u32, MaildropError> {
        let (i, uid) = self.resolve(handle).ok_or(MaildropError::Gone)?;
        if self.folders.len() > 1 {
            self.enter(i).await?;
            // The session's hint, in handles: only what follows in this folder.
            self.ahead_hint = self
                .hint
                .iter()
                .map_while(|&(h, size)| match self.resolve(h) {
                    Some((f, u)) if f == i => Some((u, size)),
                    _ => None,
                })
                .collect();
        }
        Ok(uid)
    }

    /// Group committed handles by folder: (folder, UIDs), in folder order.
    pub(super) fn by_folder(&self, handles: &[u32]) -> Vec<(usize, Vec<u32>)> {
        let mut groups: Vec<(usize, Vec<u32>)> = Vec::new();
        for &h in handles {
            let Some((f, uid)) = self.resolve(h) else {
                continue;
            };
            match groups.iter_mut().find(|(g, _)| *g == f) {
                Some((_, uids)) => uids.push(uid),
                None => groups.push((f, vec![uid])),
            }
        }
        groups.sort_by_key(|(f, _)| *f);
        groups
    }
}
