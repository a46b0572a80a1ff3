//! Per-device views (`recent:alice`): the session lists the last `recent_days` days of mail
//! (INTERNALDATE, `UID SEARCH SINCE`) whatever other devices hid, and its committed DELE does
//! nothing upstream, or sets `\Seen`: never the deletion mode, so the user's other devices
//! keep seeing what they saw.

use std::num::NonZeroU32;
use std::time::SystemTime;

use imap_next::imap_types::datetime::NaiveDate;
use imap_next::imap_types::flag::Flag;
use imap_next::imap_types::search::SearchKey;

use super::{retention, ImapMaildrop};
use crate::config::ViewDele;
use crate::maildrop::MaildropError;
use crate::upstream::imap::uid_sets;

/// A per-device view, as a backend serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub days: NonZeroU32,
    pub dele: ViewDele,
}

impl View {
    /// `SINCE <today - days>`: mail of the last `days` days (dates only, RFC 3501).
    pub(super) fn criterion(&self) -> Result<SearchKey<'static>, MaildropError> {
        retention::cutoff(SystemTime::now(), self.days)
            .and_then(|d| NaiveDate::try_from(d).ok())
            .map(SearchKey::Since)
            .ok_or_else(|| MaildropError::unavailable("view: no valid date"))
    }
}

impl ImapMaildrop {
    /// A view's commit: `\Seen` on the DELEted messages, each in its folder, or nothing.
    pub(super) async fn commit_view(
        &mut self,
        view: View,
        handles: &[u32],
    ) -> Result<(), MaildropError> {
        if view.dele == ViewDele::Nothing || handles.is_empty() {
            tracing::debug!(maildrop = %self.lock_key, marked = handles.len(), "view session: DELE changes nothing upstream");
            return Ok(());
        }
        let mut groups = self.by_folder(handles);
        if let Some(sel) = self.selected {
            groups.sort_by_key(|(f, _)| (*f != sel, *f));
        }
        for (folder, uids) in groups {
            self.enter(folder).await?;
            for set in uid_sets(&uids).map_err(MaildropError::unavailable)? {
                self.store(&set, Flag::Seen).await?;
            }
        }
        Ok(())
    }
}
