//! Retention (hide mode): at a session's commit, hidden mail older than `retention_days`
//! (INTERNALDATE) is expunged or moved, in each folder of the maildrop. The server picks the
//! messages: `UID SEARCH KEYWORD <hide keyword> BEFORE <date>`, so a message without the
//! keyword is never named; then bounded batches of UID commands only (`UID STORE \Deleted` +
//! `UID EXPUNGE` of exactly those UIDs, or `UID MOVE`, or `UID COPY` + the same).
//!
//! Another client may un-hide a message between the SEARCH and the removal. With CONDSTORE
//! (RFC 7162) that window is closed: the SEARCH also asks `MODSEQ`, which answers the highest
//! mod-sequence of what it found, and the first STORE of each batch carries `UNCHANGEDSINCE`
//! that value; a message changed since the SEARCH comes back in `[MODIFIED ...]`, is left
//! alone and is looked at again at a later commit. Without CONDSTORE the window stays (a
//! round trip wide; the README says so).

use std::num::NonZeroU32;
use std::time::{SystemTime, UNIX_EPOCH};

use std::num::NonZeroU64;

use imap_next::imap_types::command::{CommandBody, StoreModifier};
use imap_next::imap_types::core::{Atom, Vec1};
use imap_next::imap_types::datetime::NaiveDate;
use imap_next::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_next::imap_types::response::{Code, Data};
use imap_next::imap_types::search::SearchKey;
use imap_next::imap_types::sequence::SequenceSet;

use super::{expect_ok, ImapMaildrop};
use crate::config::RetentionAction;
use crate::maildrop::MaildropError;
use crate::metrics::metrics;
use crate::upstream::imap::{uid_sets, Untagged};

/// Batches of `retention_batch` UIDs per folder and commit, at most; the rest waits for the
/// next commit (a first run over years of hidden mail cannot hold a QUIT for long).
pub(super) const MAX_BATCHES: usize = 10;

/// What retention does, for one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    pub days: NonZeroU32,
    pub action: RetentionAction,
    pub batch: usize,
}

/// The first day whose mail is kept: today (UTC) minus `days`. SEARCH BEFORE compares dates
/// only (RFC 3501), so mail is removed once it is `days` to `days + 1` days old.
pub(crate) fn cutoff(now: SystemTime, days: NonZeroU32) -> Option<chrono::NaiveDate> {
    let today = now.duration_since(UNIX_EPOCH).ok()?.as_secs() / 86_400;
    let day = today.checked_sub(u64::from(days.get()))?;
    chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?.checked_add_days(chrono::Days::new(day))
}

impl ImapMaildrop {
    /// Retention in the selected folder (see the module documentation). Returns how many
    /// messages it removed.
    pub(super) async fn apply_retention(&mut self, r: Retention) -> Result<u64, MaildropError> {
        let date = cutoff(SystemTime::now(), r.days)
            .and_then(|d| NaiveDate::try_from(d).ok())
            .ok_or_else(|| MaildropError::unavailable("retention: no valid cutoff date"))?;
        let keyword = Atom::try_from(self.hide_keyword.clone())
            .map_err(|e| MaildropError::Unsupported(e.to_string()))?;
        let mut keys = vec![SearchKey::Keyword(keyword.clone()), SearchKey::Before(date)];
        if self.has_condstore {
            // Matches every message; makes the answer carry the highest MODSEQ found.
            keys.push(SearchKey::ModSequence {
                entry: None,
                modseq: 1,
            });
        }
        let criteria = Vec1::try_from(keys)
            .map_err(|_| MaildropError::unavailable("retention: empty search"))?;
        let mut uids: Vec<u32> = Vec::new();
        let mut searched_at: Option<NonZeroU64> = None;
        let done = self
            .run(CommandBody::search(None, criteria, true), |u| {
                if let Untagged::Data(Data::Search(found, modseq)) = u {
                    uids.extend(found.iter().map(|u| u.get()));
                    searched_at = searched_at.max(modseq);
                }
            })
            .await?;
        expect_ok("retention UID SEARCH", done)?;
        uids.sort_unstable();
        uids.dedup();
        uids.truncate(r.batch.saturating_mul(MAX_BATCHES));
        let mut removed = 0u64;
        for chunk in uids.chunks(r.batch.max(1)) {
            let mut chunk = chunk.to_vec();
            if let Some(modseq) = searched_at {
                // The first STORE only where nothing changed since the SEARCH: \Deleted for
                // an expunge; for a move the hide keyword again, a no-op that only checks.
                let flag = match r.action {
                    RetentionAction::Expunge => Flag::Deleted,
                    RetentionAction::Move => Flag::Keyword(keyword.clone()),
                };
                let changed = self.store_unchanged_since(&chunk, flag, modseq).await?;
                if !changed.is_empty() {
                    tracing::info!(
                        changed = changed.len(),
                        "retention: messages changed since the search are left alone"
                    );
                    chunk.retain(|u| !changed.contains(u));
                }
            }
            for set in uid_sets(&chunk).map_err(MaildropError::unavailable)? {
                match r.action {
                    RetentionAction::Expunge => {
                        if searched_at.is_none() {
                            self.store(&set, Flag::Deleted).await?;
                        }
                        self.uid_expunge(&set).await?;
                    }
                    RetentionAction::Move if self.has_move => self.transfer(&set, true).await?,
                    RetentionAction::Move => {
                        self.transfer(&set, false).await?;
                        self.store(&set, Flag::Deleted).await?;
                        self.uid_expunge(&set).await?;
                    }
                }
            }
            let label = match r.action {
                RetentionAction::Expunge => "expunge",
                RetentionAction::Move => "move",
            };
            metrics()
                .retention_removed
                .with_label_values(&[label])
                .inc_by(chunk.len() as u64);
            removed += chunk.len() as u64;
        }
        Ok(removed)
    }

    /// `UID STORE <uids> (UNCHANGEDSINCE modseq) +FLAGS.SILENT (flag)`: returns the UIDs the
    /// server refused because they changed since `modseq` (`[MODIFIED ...]`).
    async fn store_unchanged_since(
        &mut self,
        uids: &[u32],
        flag: Flag<'static>,
        modseq: NonZeroU64,
    ) -> Result<Vec<u32>, MaildropError> {
        let mut changed = Vec::new();
        for set in uid_sets(uids).map_err(MaildropError::unavailable)? {
            let body = CommandBody::Store {
                sequence_set: set,
                kind: StoreType::Add,
                response: StoreResponse::Silent,
                flags: vec![flag.clone()],
                uid: true,
                modifiers: vec![StoreModifier::UnchangedSince(modseq.get())],
            };
            let done = self.run(body, |_| {}).await?;
            if let Some(Code::Modified(set)) = &done.code {
                changed.extend(modified_uids(set, uids));
            }
            expect_ok("UID STORE UNCHANGEDSINCE", done)?;
        }
        Ok(changed)
    }
}

/// The UIDs of `uids` that `set` (a `[MODIFIED ...]` answer) names.
fn modified_uids(set: &SequenceSet, uids: &[u32]) -> Vec<u32> {
    let Some(largest) = uids
        .iter()
        .max()
        .and_then(|&u| std::num::NonZeroU32::new(u))
    else {
        return Vec::new();
    };
    let named: std::collections::HashSet<u32> = set.iter(largest).map(|u| u.get()).collect();
    uids.iter().copied().filter(|u| named.contains(u)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cutoff_is_today_minus_days() {
        let d = |n| NonZeroU32::new(n).unwrap();
        // 2024-03-01 12:00 UTC.
        let now = UNIX_EPOCH + Duration::from_secs(1_709_294_400);
        assert_eq!(
            cutoff(now, d(1)),
            chrono::NaiveDate::from_ymd_opt(2024, 2, 29)
        );
        assert_eq!(
            cutoff(now, d(30)),
            chrono::NaiveDate::from_ymd_opt(2024, 1, 31)
        );
        assert_eq!(cutoff(UNIX_EPOCH, d(1)), None);
    }
}
