//! FETCHes sent before the client asks ([`ImapConnection::prefetch`],
//! [`ImapConnection::prefetch_heads`]): a bounded queue of commands whose responses wait
//! unread in the socket (the kernel's buffers) until the RETR or TOP that reaches them reads
//! them, in the order sent; anything else drains them first, bounded.
//!
//! Servers may run pipelined commands concurrently (RFC 9051 5.5). Dovecot does so with
//! UID FETCHes: it holds its output for one command only while one FETCH response is
//! half-written, so once its output blocks between two messages of one FETCH (popbridge
//! leaves pending responses unread on purpose) it starts the next pending UID FETCH, whose
//! responses, and even its tagged completion, then arrive in the middle of the earlier one's.
//! Every pending FETCH names its own UIDs (no two share one), so each whole FETCH response
//! is known to be whose before its literal is read: one of a later command is kept in
//! [`ImapConnection::stash`] (bounded) and its completion noted, and the command reads them
//! from there when its turn comes.

use std::time::Instant;

use bytes::Bytes;

use super::conn::{
    ImapConnection, Prefetch, Step, AHEAD_LITERAL_MAX, DRAIN_MAX, PREFETCH_QUEUE_MAX, STASH_MAX,
};
use super::engine::ImapError;
use super::fetch::completion;
use super::fetch_parse::{self, Line};
use crate::metrics::metrics;

impl ImapConnection {
    /// Sends the FETCH of [`Self::fetch_heads`] for `uids` now and leaves its response
    /// unread in the socket: the next `fetch_heads` of the same `len` whose first UID is
    /// among them reads it without a round trip; any other command first drains it
    /// ([`Self::drain_prefetch`], every literal one of `uids` and bounded). Only when no
    /// FETCH is streamed or prefetched and the server sends `UID` before `BODY[]`.
    pub async fn prefetch_heads(&mut self, uids: &[u32], len: u32) -> Result<(), ImapError> {
        if self.engine.broken {
            return Err(ImapError::Broken);
        }
        let Some((&first, rest)) = uids.split_first() else {
            return Err(ImapError::Command("cannot prefetch heads now".into()));
        };
        if !self.prefetch.is_empty()
            || self.body.is_some()
            || !self.uid_before_body
            || uids.contains(&0)
            || len == 0
            || len > AHEAD_LITERAL_MAX
        {
            return Err(ImapError::Command("cannot prefetch heads now".into()));
        }
        let started = Instant::now();
        let tag = self.send_heads(uids, len).await?;
        self.prefetch.push_back(Prefetch {
            tag,
            uid: first,
            others: rest.to_vec(),
            started,
            heads: Some(len),
            done: None,
        });
        Ok(())
    }

    /// Whether the pieces `len` long of the next FETCH sent ahead ([`Self::prefetch_heads`])
    /// include `uid`'s.
    pub fn heads_prefetched(&self, uid: u32, len: u32) -> bool {
        self.prefetch
            .front()
            .is_some_and(|p| p.heads == Some(len) && (p.uid == uid || p.others.contains(&uid)))
    }

    /// Sends `UID FETCH <uid>,<others> (UID BODY.PEEK[])` now and leaves its response unread
    /// in the socket, behind those of the FETCHes sent before it: if the next body asked for
    /// is the first pending one's, [`Self::body_start`] streams it without a round trip; any
    /// other command first drains them all ([`Self::drain_prefetch`]). Only while no body
    /// is being streamed (a delivered one whose tail is unread is fine), fewer than
    /// [`PREFETCH_QUEUE_MAX`] are pending and none of them is TOP's pieces, none of the UIDs
    /// is already on its way, and the server is known to send `UID` before `BODY[]` (so
    /// every literal is known to be whose before it arrives).
    pub async fn prefetch(&mut self, uid: u32, others: &[u32]) -> Result<(), ImapError> {
        if self.engine.broken {
            return Err(ImapError::Broken);
        }
        let refused = {
            // Every UID on its way, gathered once (up to a few hundred, checked for each of
            // `others`).
            let coming: std::collections::HashSet<u32> = self
                .in_flight()
                .chain(self.body.as_ref().map(|b| b.uid))
                .collect();
            let taken = |u: &u32| coming.contains(u) || self.stash.contains_key(u);
            self.prefetch.len() >= PREFETCH_QUEUE_MAX
                || self.prefetch.iter().any(|p| p.heads.is_some())
                || !self.uid_before_body
                || self.body.as_ref().is_some_and(|b| !b.delivered)
                || taken(&uid)
                || others.iter().any(taken)
        };
        if refused {
            return Err(ImapError::Command("cannot prefetch now".into()));
        }
        let started = Instant::now();
        let tag = self.send_fetch(uid, 0, others).await?;
        self.prefetch.push_back(Prefetch {
            tag,
            uid,
            others: others.to_vec(),
            started,
            heads: None,
            done: None,
        });
        Ok(())
    }

    /// Whether the next prefetched FETCH is `uid`'s, waiting to be streamed.
    pub fn prefetched(&self, uid: u32) -> bool {
        self.prefetch
            .front()
            .is_some_and(|p| p.uid == uid && p.heads.is_none())
    }

    /// Whether some FETCH was prefetched.
    pub fn has_prefetch(&self) -> bool {
        !self.prefetch.is_empty()
    }

    /// How many FETCHes are pending; whether one of them is TOP's pieces.
    pub fn prefetch_queue(&self) -> (usize, bool) {
        (
            self.prefetch.len(),
            self.prefetch.iter().any(|p| p.heads.is_some()),
        )
    }

    /// The UIDs of the streamed FETCH (read-ahead not handed out yet) and of every
    /// prefetched one.
    pub fn in_flight(&self) -> impl Iterator<Item = u32> + '_ {
        let body = self.body.iter().flat_map(|b| b.others.iter().copied());
        let pre = self
            .prefetch
            .iter()
            .flat_map(|p| std::iter::once(p.uid).chain(p.others.iter().copied()));
        body.chain(pre)
    }

    /// Reads and discards the responses to every prefetched FETCH, in order, before any
    /// other command: every body must be one of their UIDs and at most `DRAIN_MAX` bytes,
    /// every read has the I/O deadline; anything else ends the connection.
    pub(super) async fn drain_prefetch(&mut self) -> Result<(), ImapError> {
        while let Some(p) = self.prefetch.pop_front() {
            for u in std::iter::once(p.uid).chain(p.others.iter().copied()) {
                self.stash_take(u);
            }
            if p.done.is_some() {
                continue;
            }
            let r = self.drain_inner(&p).await;
            if let Err(e) = r {
                self.engine.broken = true;
                metrics()
                    .upstream_errors
                    .with_label_values(&[e.kind()])
                    .inc();
                return Err(e);
            }
        }
        self.stash.clear();
        self.stash_bytes = 0;
        Ok(())
    }

    async fn drain_inner(&mut self, p: &Prefetch) -> Result<(), ImapError> {
        loop {
            let (len, mut info) = match self.next_fetch_body(&p.tag).await? {
                Step::Done(_) => {
                    tracing::debug!(uid = p.uid, "prefetched FETCH drained");
                    self.engine.reader.shrink_idle();
                    return Ok(());
                }
                // Nothing to skip: a NIL (gone) or quoted body is already read; but it too must
                // be one the prefetch asked for.
                Step::Inline { info, .. } => {
                    if info
                        .uid
                        .is_some_and(|u| u != p.uid && !p.others.contains(&u))
                    {
                        return Err(self.engine.fail(ImapError::Malformed));
                    }
                    continue;
                }
                Step::Body { len, info } => (len, info),
            };
            let ours = info
                .uid
                .is_some_and(|u| u == p.uid || p.others.contains(&u));
            if info.uid.is_none() {
                self.learn_fetch_order(false);
            }
            if !ours || u64::from(len) > DRAIN_MAX {
                return Err(self.engine.fail(ImapError::Malformed));
            }
            self.engine.skip(u64::from(len)).await?;
            self.finish_items(&mut info).await?;
        }
    }

    /// Whether `uid` is one of a pending FETCH of whole bodies (its response may come in
    /// the middle of the one being read).
    pub(super) fn queued_body(&self, uid: u32) -> bool {
        self.prefetch
            .iter()
            .any(|p| p.heads.is_none() && (p.uid == uid || p.others.contains(&uid)))
    }

    /// If `line` is the tagged completion of a pending FETCH (it completed before the one
    /// being read did), notes it there: `true`.
    pub(super) fn early_completion(&mut self, line: &[u8]) -> Result<bool, ImapError> {
        let Some(i) = self.prefetch.iter().position(|p| {
            p.done.is_none()
                && line.starts_with(p.tag.as_bytes())
                && line.get(p.tag.len()) == Some(&b' ')
        }) else {
            return Ok(false);
        };
        let tag = self.prefetch[i].tag.clone();
        match fetch_parse::classify(line, tag.as_bytes()) {
            Ok(Line::Done { kind, text }) => {
                tracing::debug!(tag, "a FETCH sent ahead completed early");
                self.prefetch[i].done = Some(completion(kind, text));
                Ok(true)
            }
            _ => Err(self.engine.fail(ImapError::Malformed)),
        }
    }

    /// Keeps the body of `uid` (of a pending FETCH) that arrived early: `None` for NIL.
    /// Bounded by [`STASH_MAX`] octets in all; a literal is read from the socket by the
    /// caller only after [`Self::stash_room`] said yes.
    pub(super) fn stash_put(&mut self, uid: u32, data: Option<Bytes>) -> Result<(), ImapError> {
        let n = data.as_ref().map_or(0, |d| d.len() as u64);
        if self.stash.contains_key(&uid) || !self.stash_room(n) {
            return Err(self.engine.fail(ImapError::Malformed));
        }
        self.stash_bytes += n;
        self.stash.insert(uid, data);
        Ok(())
    }

    /// Whether a body of `n` octets fits in the stash.
    pub(super) fn stash_room(&self, n: u64) -> bool {
        n <= DRAIN_MAX && self.stash_bytes + n <= STASH_MAX
    }

    /// The body of `uid` that arrived early, if any (`Some(None)`: NIL, gone).
    pub(super) fn stash_take(&mut self, uid: u32) -> Option<Option<Bytes>> {
        let data = self.stash.remove(&uid)?;
        self.stash_bytes -= data.as_ref().map_or(0, |d| d.len() as u64);
        Some(data)
    }

    /// Moves the bodies of `uids` that arrived early to the read-ahead (NIL ones are gone).
    pub(super) fn unstash_ahead(&mut self, uids: &[u32]) {
        for &u in uids {
            if let Some(Some(data)) = self.stash_take(u) {
                if self.ahead.iter().all(|(a, _)| *a != u) {
                    self.ahead.push((u, data));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
