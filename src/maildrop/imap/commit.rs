//! QUIT's deletions with UID commands only (the hide keyword, `UID EXPUNGE` of exactly the
//! committed messages, or `UID MOVE`/`COPY` into the target folder), the `\Seen` flags owed
//! for retrieved messages, and the end of the session.

use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::Atom;
use imap_next::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_next::imap_types::response::{Code, StatusKind};
use imap_next::imap_types::sequence::SequenceSet;

use super::{expect_ok, mailbox_arg, unavailable, ImapMaildrop};
use crate::config::DeletionMode;
use crate::maildrop::MaildropError;
use crate::metrics::metrics;
use crate::upstream::imap::{uid_sets, Completion, Untagged};

impl ImapMaildrop {
    pub(super) async fn run(
        &mut self,
        body: CommandBody<'static>,
        on_untagged: impl FnMut(Untagged),
    ) -> Result<Completion, MaildropError> {
        let mut done = self.run_all(vec![body], on_untagged).await?;
        done.pop()
            .ok_or_else(|| MaildropError::unavailable("no completion"))
    }

    /// Run commands pipelined, preceded by any `\Seen` flags still owed for retrieved messages
    /// (sent with the next command instead of costing a round trip of their own).
    pub(super) async fn run_all(
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
            .ok_or_else(|| MaildropError::unavailable("upstream connection lost"))?;
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
    pub(super) fn seen_owed(&mut self) -> Result<Vec<CommandBody<'static>>, MaildropError> {
        let seen = std::mem::take(&mut self.pending_seen);
        uid_sets(&seen)
            .map_err(MaildropError::unavailable)?
            .into_iter()
            .map(|set| {
                CommandBody::store(
                    set,
                    StoreType::Add,
                    StoreResponse::Silent,
                    vec![Flag::Seen],
                    true,
                )
                .map_err(|e| MaildropError::unavailable_by("cannot build the IMAP command", e))
            })
            .collect()
    }

    /// Runs a command of the commit. A `NO [EXPUNGEISSUED]` means it named a message another
    /// client expunged, which this session was not told of yet; Dovecot then copies or moves
    /// nothing at all. A NOOP delivers the expunge, and the one retry passes over the message.
    pub(super) async fn run_commit(
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

    pub(super) async fn store(
        &mut self,
        set: &SequenceSet,
        flag: Flag<'static>,
    ) -> Result<(), MaildropError> {
        let body = CommandBody::store(
            set.clone(),
            StoreType::Add,
            StoreResponse::Silent,
            vec![flag],
            true,
        )
        .map_err(|e| MaildropError::unavailable_by("cannot build the IMAP command", e))?;
        expect_ok("UID STORE", self.run_commit(body).await?)
    }

    pub(super) async fn uid_expunge(&mut self, set: &SequenceSet) -> Result<(), MaildropError> {
        let body = CommandBody::ExpungeUid {
            sequence_set: set.clone(),
        };
        expect_ok("UID EXPUNGE", self.run_commit(body).await?)
    }

    /// MOVE or COPY into `move_to`, creating it once if the server says TRYCREATE.
    pub(super) async fn transfer(
        &mut self,
        set: &SequenceSet,
        moving: bool,
    ) -> Result<(), MaildropError> {
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
                let create = CommandBody::create(mailbox_arg(&self.move_to)?).map_err(|e| {
                    MaildropError::unavailable_by("cannot build the IMAP command", e)
                })?;
                let created = self.run(create, |_| {}).await?;
                tracing::info!(mailbox = %self.move_to, ok = created.is_ok(), "created deletion target folder");
                continue;
            }
            return expect_ok(name, done);
        }
        Err(MaildropError::unavailable(format!("{name} failed")))
    }
    /// Applies the deletion mode to the messages of these handles (see [`Maildrop::commit`]),
    /// each in its own folder: the selected folder first (no SELECT needed), then the others
    /// in listing order. A folder that fails does not stop the others; the first error is
    /// returned (the client is told not everything was removed).
    pub(super) async fn apply_deletions(&mut self, handles: &[u32]) -> Result<(), MaildropError> {
        if let Some(view) = self.view {
            return self.commit_view(view, handles).await;
        }
        let mut groups = self.by_folder(handles);
        if let Some(sel) = self.selected {
            groups.sort_by_key(|(f, _)| (*f != sel, *f));
        }
        let mut first_error = None;
        for (folder, uids) in groups {
            let applied = match self.enter(folder).await {
                Ok(()) => self.commit_sets(&uids).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => self.count_deletions(uids.len()),
                Err(e) => {
                    tracing::warn!(maildrop = %self.lock_key, folder = %self.folder_name(folder), error = %crate::errors::Chain(&e), "deletions in this folder not applied");
                    first_error.get_or_insert(e);
                    if self.conn.is_none() {
                        break;
                    }
                }
            }
        }
        if first_error.is_none() {
            self.retain().await;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Retention in every served folder, the selected one first. Housekeeping: a failure is
    /// logged and does not change the client's answer (its deletions were applied).
    async fn retain(&mut self) {
        let Some(r) = self.retention else {
            return;
        };
        let mut folders = self.served.clone();
        folders.sort_by_key(|&f| (Some(f) != self.selected, f));
        for folder in folders {
            let result = match self.enter(folder).await {
                Ok(()) => self.apply_retention(r).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(maildrop = %self.lock_key, folder = %self.folder_name(folder), removed = n, days = r.days.get(), "retention removed hidden mail")
                }
                Err(e) => {
                    tracing::warn!(maildrop = %self.lock_key, folder = %self.folder_name(folder), error = %crate::errors::Chain(&e), "retention failed");
                    if self.conn.is_none() {
                        return;
                    }
                }
            }
        }
    }

    fn count_deletions(&self, n: usize) {
        let mode = match self.deletion {
            DeletionMode::Hide => "hide",
            DeletionMode::Expunge => "expunge",
            DeletionMode::Move => "move",
        };
        metrics()
            .deletions
            .with_label_values(&[mode])
            .inc_by(n as u64);
    }

    /// The `\Seen` flags still owed go out with the LOGOUT: one round trip.
    pub(super) async fn finish(mut self) {
        for i in 0..self.folders.len() {
            self.load_state(i);
            self.store_retrieved();
        }
        let owed = self.seen_owed().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not flag retrieved messages \\Seen");
            Vec::new()
        });
        if let Some(conn) = self.conn.take() {
            if let Some(k) = self.keep.take() {
                // Kept for the user's next session instead of LOGOUT (see `keepalive`).
                k.pool.park(k.key, conn, k.capabilities, owed).await;
                return;
            }
            for failed in conn.logout_after(owed).await {
                tracing::warn!(text = %failed, "could not flag retrieved messages \\Seen");
            }
        }
    }
    pub(super) async fn commit_sets(&mut self, uids: &[u32]) -> Result<(), MaildropError> {
        for set in uid_sets(uids).map_err(MaildropError::unavailable)? {
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
