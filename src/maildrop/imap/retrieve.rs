//! Message bytes for RETR and TOP: one streamed FETCH per message (small ones read ahead in
//! the same FETCH, the next one prefetched once the current one is handed out), or decoded
//! pieces where streaming cannot apply; and the record of what the user retrieved.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;

use bytes::Bytes;
use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::fetch::{MessageDataItem, MessageDataItemName};
use imap_next::imap_types::response::{Data, StatusKind};

use super::{
    lost, unavailable, ImapMaildrop, HEAD_AHEAD_MAX_PIECE, PREFETCH_MAX_MESSAGE,
    PREFETCH_QUEUE_MIN_RTT, READ_AHEAD_BYTES, READ_AHEAD_MAX_MESSAGE, STREAM_AHEAD_BYTES,
    STREAM_AHEAD_MAX_BYTES, STREAM_AHEAD_MAX_MESSAGE, STREAM_AHEAD_RATE,
};
use crate::maildrop::{BodyPart, MaildropError};
use crate::metrics::metrics;
use crate::upstream::imap::conn::PREFETCH_QUEUE_MAX;
use crate::upstream::imap::{uid_sets, BodyStart, Completion, ImapError, Untagged};

/// At most this many messages' first pieces in one FETCH (the command line stays short).
const HEADS_MAX: usize = 128;
/// Near the server, a window of first pieces asked for when a TOP reaches it (not ahead)
/// holds this many: its first piece answers that TOP without waiting for a whole window
/// (4-5 ms for 128 pieces on loopback), and a client that does not preview has asked for
/// little. The windows asked for ahead then double, up to HEADS_MAX, each asked for while
/// the client reads one half its size. On a distant server every window is HEADS_MAX: there
/// a round trip costs more than the server's work.
const HEADS_FIRST: usize = 16;

impl ImapMaildrop {
    /// Whether `body`, read ahead for `uid`, can be the whole message: an empty one only if
    /// the listing says the message is empty.
    pub(super) fn plausibly_whole(&self, uid: u32, body: &Bytes) -> bool {
        !body.is_empty()
            || self
                .ahead_hint
                .iter()
                .any(|&(u, size)| u == uid && size == 0)
    }

    /// Keeps the messages a streamed FETCH read ahead, but for empty ones that cannot be.
    pub(super) fn keep_ahead(&mut self, read: Vec<(u32, Bytes)>) {
        for (uid, body) in read {
            if self.plausibly_whole(uid, &body) {
                self.ahead.insert(uid, body);
            }
        }
    }

    /// The small messages to fetch along with `uid` (from the session's hint): bounded in
    /// count and bytes, each smaller than `len`.
    pub(super) fn ahead_wanted(
        &self,
        uid: u32,
        len: u64,
        (mut budget, max): (u64, u64),
    ) -> Vec<u32> {
        let mut wanted = Vec::new();
        for &(next, size) in &self.ahead_hint {
            if next == uid || size > max || size >= len {
                continue;
            }
            let Some(left) = budget.checked_sub(size) else {
                break;
            };
            budget = left;
            wanted.push(next);
        }
        wanted
    }

    /// The byte budget of a streamed read-ahead window: STREAM_AHEAD_BYTES, or on a distant
    /// server what arrives in one round trip at STREAM_AHEAD_RATE, at most
    /// STREAM_AHEAD_MAX_BYTES. With the next window prefetched while the client reads this
    /// one (`prefetch_next`), a session holds at most about two windows: one read into
    /// `ahead`, one waiting unread in the socket (the kernel's buffers).
    pub(super) fn stream_budget(&self) -> u64 {
        let bdp = self
            .link_rtt()
            .map_or(0, |rtt| (rtt.as_secs_f64() * STREAM_AHEAD_RATE) as u64);
        bdp.clamp(STREAM_AHEAD_BYTES, STREAM_AHEAD_MAX_BYTES)
    }

    /// The FETCH round trip: this session's once it measured one, before that the latest
    /// session's (see `distance.rs`).
    fn link_rtt(&self) -> Option<std::time::Duration> {
        self.fetch_rtt.or_else(|| self.distance.get())
    }

    /// Listed octets after the next message worth telling this maildrop about: the window
    /// being read, the two a distant server may have pending, and the one planned next.
    pub(super) fn hint_octets(&self) -> u64 {
        4 * self.stream_budget()
    }

    /// For a short first piece (a TOP's): the next messages of the hint whose same piece is
    /// not at hand yet, each costing at most `len` of `budget`. Those shorter than
    /// `len` come whole (kept in `ahead`), the others' first `len` octets in `heads`.
    fn heads_wanted(&self, uid: u32, len: u64, mut budget: u64, max: usize) -> Vec<u32> {
        let mut wanted = Vec::new();
        for &(next, size) in &self.ahead_hint {
            if next == uid || self.ahead.contains_key(&next) {
                continue;
            }
            let Some(left) = budget.checked_sub(size.min(len)) else {
                break;
            };
            budget = left;
            wanted.push(next);
            if wanted.len() >= max {
                break;
            }
        }
        wanted
    }

    /// Sends the FETCH of the next window of first pieces `len` long (the hint's messages
    /// after those at hand or just asked for, `asked`), leaving its response unread
    /// (`ImapConnection::prefetch_heads`): at most one window held (`heads`, `ahead`) and
    /// one on its way; anything but the TOP that reaches it drains it first (bounded).
    async fn prefetch_heads(&mut self, uid: u32, len: u32, asked: &HashSet<u32>) {
        let budget = self.stream_budget();
        let mut next = Vec::new();
        let mut left = budget;
        for &(u, size) in &self.ahead_hint {
            if u == uid
                || asked.contains(&u)
                || self.ahead.contains_key(&u)
                || self.heads.contains_key(&u)
            {
                continue;
            }
            let Some(l) = left.checked_sub(size.min(u64::from(len))) else {
                break;
            };
            left = l;
            next.push(u);
            if next.len() >= self.heads_window {
                break;
            }
        }
        if next.is_empty() {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match conn.prefetch_heads(&next, len).await {
            Ok(()) => {
                tracing::debug!(uid = next[0], "next window of first pieces asked for ahead");
                self.heads_window = (self.heads_window * 2).min(HEADS_MAX);
            }
            Err(e) => {
                tracing::debug!(error = %e, "heads prefetch failed");
                if !matches!(e, ImapError::Command(_)) {
                    self.conn = None;
                }
            }
        }
    }

    /// Up to `len` octets of `uid` from `offset` (see [`Maildrop::fetch`]): decoded by
    /// imap-next, or, for a TOP's first piece on a server that sends UID before BODY[],
    /// read whole by the streamed-FETCH reader (`fetch_heads`).
    pub(super) async fn fetch_piece(
        &mut self,
        uid: u32,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, MaildropError> {
        let (Some(_), Some(len_nz), Ok(offset32)) = (
            NonZeroU32::new(uid),
            NonZeroU32::new(len),
            u32::try_from(offset),
        ) else {
            return Ok(Bytes::new());
        };
        let mut wanted = vec![uid];
        let heads_too = offset == 0 && u64::from(len) <= HEAD_AHEAD_MAX_PIECE;
        if offset == 0 {
            if let Some(whole) = self.ahead.remove(&uid) {
                return Ok(whole);
            }
            // The same first piece, fetched ahead (a header preview of the next message).
            if let Some(head) = self.heads.remove(&uid) {
                if head.len() == len as usize {
                    // The first piece of this window the client used: it is previewing, so the
                    // next window is asked for now, while it reads this one, instead of when
                    // it reaches the next window (a stall of a whole window's FETCH: 4-5 ms
                    // for 128 pieces on loopback). Not while a RETR's FETCH is on its way (a
                    // client alternating TOP and RETR).
                    if !std::mem::replace(&mut self.heads_used, true)
                        && self.conn.as_ref().is_some_and(|c| !c.has_prefetch())
                    {
                        self.prefetch_heads(uid, len, &HashSet::new()).await;
                    }
                    return Ok(head);
                }
            }
            // Whatever was read ahead and not asked for is stale now.
            self.ahead.clear();
            self.heads.clear();
            // Small messages the client will probably ask for next come along in the same
            // FETCH: a one-command-at-a-time client then costs one upstream round trip per
            // window of messages instead of two per message. Bounded in count and bytes.
            // For a TOP's short first piece, the same piece of the next messages: a client
            // previewing every header costs one round trip per window of messages.
            if heads_too {
                // Read without decoding (below), a window as big as a streamed one.
                let budget = if self.conn.as_ref().is_some_and(|c| c.uid_before_body()) {
                    self.stream_budget()
                } else {
                    READ_AHEAD_BYTES
                };
                let near = self
                    .link_rtt()
                    .is_some_and(|rtt| rtt < PREFETCH_QUEUE_MIN_RTT);
                let first = if near { HEADS_FIRST } else { HEADS_MAX };
                // This window: the TOP's piece and the next ones (`first` in all); the
                // next window asked for ahead holds twice as many.
                wanted.extend(self.heads_wanted(uid, u64::from(len), budget, first - 1));
                self.heads_window = (first * 2).min(HEADS_MAX);
            } else {
                wanted.extend(self.ahead_wanted(
                    uid,
                    u64::from(len),
                    (READ_AHEAD_BYTES, READ_AHEAD_MAX_MESSAGE),
                ));
            }
        }
        // On a server that sends UID before BODY[], the pieces are read without decoding.
        if heads_too
            && self
                .conn
                .as_ref()
                .is_some_and(|c| c.uid_before_body() && c.fetch_order_known())
        {
            if let Some(conn) = self.conn.as_mut().filter(|c| c.unsettled()) {
                let settled = conn.settle().await.map(|()| conn.take_ahead());
                match settled {
                    Ok(read) => self.keep_ahead(read),
                    Err(e) => {
                        self.conn = None;
                        return Err(unavailable(e));
                    }
                }
            }
            // What the settle read ahead may be what is asked for.
            if let Some(whole) = self.ahead.remove(&uid) {
                return Ok(whole);
            }
            let conn = self.conn.as_mut().ok_or_else(lost)?;
            // The UIDs of the window about to be read (the one sent ahead, if it has `uid`).
            let asked: HashSet<u32> = if conn.heads_prefetched(uid, len) {
                conn.in_flight().collect()
            } else {
                wanted.iter().copied().collect()
            };
            match conn.fetch_heads(&wanted, len).await {
                Ok((done, read)) => {
                    let pieces: HashMap<u32, Bytes> = read.into_iter().collect();
                    let piece = self.keep_pieces(uid, len, true, pieces, done);
                    // The client used the heads of the window before this one: it is
                    // previewing, so the next window is asked for while it reads this one.
                    if std::mem::take(&mut self.heads_used) {
                        self.prefetch_heads(uid, len, &asked).await;
                    }
                    return piece;
                }
                // Not possible on this connection now: the decoded way below.
                Err(ImapError::Command(_)) => {}
                Err(e) => {
                    self.conn = None;
                    return Err(unavailable(e));
                }
            }
        }
        let set = uid_sets(&wanted)
            .map_err(MaildropError::unavailable)?
            .into_iter()
            .next()
            .ok_or_else(|| MaildropError::unavailable("empty UID set"))?;
        let body = CommandBody::fetch(
            set,
            vec![
                MessageDataItemName::Uid,
                MessageDataItemName::BodyExt {
                    section: None,
                    partial: Some((offset32, len_nz)),
                    peek: true,
                },
            ],
            true,
        )
        .map_err(|e| MaildropError::unavailable_by("cannot build the IMAP command", e))?;
        let mut pieces: HashMap<u32, Bytes> = HashMap::with_capacity(wanted.len());
        let done = self
            .run(body, |u| {
                let Untagged::Data(Data::Fetch { items, .. }) = u else {
                    return;
                };
                let mut this_uid = None;
                let mut data = None;
                for item in items.into_iter() {
                    match item {
                        MessageDataItem::Uid(u) => this_uid = Some(u.get()),
                        // NIL: the server has no body for it (another client expunged it):
                        // no data, so the message reads as gone.
                        MessageDataItem::BodyExt {
                            section: None,
                            data: d,
                            ..
                        } => data = d.into_option().map(|c| Bytes::from(c.into_owned())),
                        _ => {}
                    }
                }
                // Unsolicited FETCHes (flag updates) and UIDs we did not ask for are ignored.
                if let (Some(u), Some(d)) = (this_uid, data) {
                    if wanted.contains(&u) {
                        pieces.insert(u, d);
                    }
                }
            })
            .await?;
        self.keep_pieces(uid, len, heads_too, pieces, done)
    }

    /// The piece of `uid` from a FETCH of first pieces `len` long; the others kept as
    /// read-ahead (whole messages), and with `heads_too` as heads.
    fn keep_pieces(
        &mut self,
        uid: u32,
        len: u32,
        heads_too: bool,
        mut pieces: HashMap<u32, Bytes>,
        done: Completion,
    ) -> Result<Bytes, MaildropError> {
        let piece = pieces.remove(&uid);
        // Keep read-ahead pieces that are whole messages (shorter than asked, and not empty
        // unless the listing says so: `""` is what some servers send for one gone), and
        // for a TOP's piece the pieces of the next messages as long as asked.
        let (whole, cut): (HashMap<u32, Bytes>, HashMap<u32, Bytes>) = pieces
            .into_iter()
            .partition(|(_, b)| b.len() < len as usize);
        self.ahead = whole
            .into_iter()
            .filter(|(u, b)| self.plausibly_whole(*u, b))
            .collect();
        if heads_too {
            self.heads = cut;
        }
        match piece {
            Some(bytes) => Ok(bytes),
            // NO [THROTTLED] and friends: the server is busy, the message is not gone.
            None if super::pressure_error("UID FETCH", &done).is_some() => {
                Err(super::pressure_error("UID FETCH", &done).unwrap_or_else(lost))
            }
            // No data for the UID: the message was expunged by another client since login.
            None if done.is_ok() || done.kind == StatusKind::No => Err(MaildropError::Gone),
            None => Err(MaildropError::unavailable(format!(
                "UID FETCH failed: {}",
                done.text
            ))),
        }
    }

    /// Messages too big to read ahead are streamed: one `UID FETCH uid (UID BODY.PEEK[])`
    /// whose literal goes to the client as it arrives, instead of `fetch_chunk_bytes` pieces
    /// each decoded whole by imap-next before the first byte of it could be sent. A read that
    /// starts past the beginning (the rest of a TOP whose first piece did not end it) streams
    /// the rest of the message from there in one literal, so it cannot end short if the
    /// message goes away meanwhile.
    pub(super) async fn read_part(
        &mut self,
        uid: u32,
        size: u64,
        offset: u64,
        max: u32,
    ) -> Result<BodyPart, MaildropError> {
        if offset == 0 {
            if let Some(conn) = self.conn.as_mut().filter(|c| c.unsettled()) {
                let settled = conn.settle().await.map(|()| conn.take_ahead());
                match settled {
                    Ok(read) => self.keep_ahead(read),
                    Err(e) => {
                        self.conn = None;
                        return Err(unavailable(e));
                    }
                }
            }
        }
        let (streaming, uid_first, order_known) = match &self.conn {
            Some(c) => (c.streaming(uid), c.uid_before_body(), c.fetch_order_known()),
            None => (false, false, false),
        };
        // Its FETCH was sent right after the previous message (`prefetch_next`).
        let prefetched = offset == 0
            && !self.ahead.contains_key(&uid)
            && self.conn.as_ref().is_some_and(|c| c.prefetched(uid));
        // The first message of a session is streamed alone, whatever its size: that shows
        // whether the server puts UID before BODY[]. If it does, everything is streamed
        // (small messages read ahead come in the same FETCH, and the next FETCH is sent
        // ahead, see `prefetch_next`); if not, small messages are fetched whole and decoded,
        // with a read-ahead window (`fetch`). Decoding is the costlier path: imap-codec
        // takes a literal a byte at a time.
        let stream_it = offset == 0
            && (size > READ_AHEAD_MAX_MESSAGE || uid_first || !order_known)
            && !self.ahead.contains_key(&uid)
            && self.conn.is_some();
        let origin = u32::try_from(offset).unwrap_or(u32::MAX);
        let ranged = offset > 0 && !streaming && self.conn.is_some();
        if !streaming && !stream_it && !ranged {
            let data = self.fetch_piece(uid, offset, max).await?;
            let last = data.len() < max as usize;
            if last {
                self.prefetch_next(max).await;
            }
            return Ok(BodyPart { data, last });
        }
        if stream_it || ranged {
            if stream_it && !prefetched {
                self.ahead.clear();
            }
            let others = if uid_first && stream_it && !prefetched {
                self.ahead_wanted(
                    uid,
                    u64::from(max),
                    (self.stream_budget(), STREAM_AHEAD_MAX_MESSAGE),
                )
            } else {
                Vec::new()
            };
            let conn = self.conn.as_mut().ok_or_else(lost)?;
            let sent = std::time::Instant::now();
            let started = conn
                .body_start_at(uid, if ranged { origin } else { 0 }, &others)
                .await
                .map(|s| (s, conn.take_ahead()));
            if !prefetched {
                let took = sent.elapsed();
                let rtt = self.fetch_rtt.map_or(took, |r| r.min(took));
                self.fetch_rtt = Some(rtt);
                self.distance.record(rtt);
            }
            match started {
                Ok((BodyStart::Streaming, read)) => self.keep_ahead(read),
                // NO [THROTTLED] and friends: the server is busy, the message is not gone.
                Ok((BodyStart::NoBody(done), _))
                    if super::pressure_error("UID FETCH", &done).is_some() =>
                {
                    return Err(super::pressure_error("UID FETCH", &done).unwrap_or_else(lost));
                }
                // No body for it: another client expunged it (NIL, or no FETCH data, with
                // OK or NO [EXPUNGEISSUED]).
                Ok((BodyStart::NoBody(done), read))
                    if done.is_ok() || done.kind == StatusKind::No =>
                {
                    self.keep_ahead(read);
                    return Err(MaildropError::Gone);
                }
                Ok((BodyStart::NoBody(done), _)) => {
                    return Err(MaildropError::unavailable(format!(
                        "UID FETCH failed: {}",
                        done.text
                    )))
                }
                Err(e) => {
                    self.conn = None;
                    return Err(unavailable(e));
                }
            }
        }
        let conn = self.conn.as_mut().ok_or_else(lost)?;
        let next = conn.body_next(max as usize).await.map(|(data, last)| {
            (
                data,
                last,
                if last { conn.take_ahead() } else { Vec::new() },
            )
        });
        match next {
            Ok((data, last, read)) => {
                if last {
                    self.keep_ahead(read);
                    self.prefetch_next(max).await;
                }
                Ok(BodyPart { data, last })
            }
            Err(e) => {
                self.conn = None;
                Err(unavailable(e))
            }
        }
    }

    /// A RETR of `uid` completed: note it for the repeated-download record.
    pub(super) fn note_retrieved(&mut self, uid: u32) {
        if self.state.is_none() {
            return;
        }
        if self.retrieved_before.binary_search(&uid).is_ok() {
            metrics().retr_repeated.inc();
        } else {
            // At most one entry per listed message.
            self.retrieved_now.insert(uid);
        }
    }

    /// Write back the record of retrieved messages, if this session changed it.
    pub(super) fn store_retrieved(&mut self) {
        let Some(state) = &self.state else {
            return;
        };
        if self.retrieved_now.is_empty() && !self.retrieved_pruned {
            return;
        }
        let mut all = std::mem::take(&mut self.retrieved_before);
        all.extend(self.retrieved_now.drain());
        all.sort_unstable();
        all.dedup();
        state.store_retrieved(&self.key, self.uid_validity, &all);
    }

    /// A message was handed out whole: send the FETCH of the first message the client will
    /// probably ask for that is neither read ahead nor on its way (with the small messages
    /// after it, within the window's budget) now instead of after the client asked: while
    /// the client reads the window at hand, the next one is on its way, and the RETR that
    /// reaches it needs no upstream round trip at all (no NOOP either, like a message read
    /// ahead). Anything else the client does first drains the responses (bounded, with
    /// deadlines).
    ///
    /// Near the server one such FETCH is pending at a time. On a distant server (a FETCH
    /// round trip of PREFETCH_QUEUE_MIN_RTT or more) up to PREFETCH_QUEUE_MAX are, as
    /// long as the listed octets of everything unread (the current window's rest and every
    /// pending FETCH) stay within two windows: a message too big for a window (streamed,
    /// never held) is then asked for a bandwidth-delay product ahead too, instead of when the
    /// message before it is handed out. Their responses wait in the socket (the kernel's
    /// buffers), not in popbridge, unless the server interleaves them (see
    /// `upstream::imap::prefetch`: then at most those listed octets are held).
    pub(super) async fn prefetch_next(&mut self, max: u32) {
        let window = self.stream_budget();
        let distant = self
            .link_rtt()
            .is_some_and(|rtt| rtt >= PREFETCH_QUEUE_MIN_RTT);
        let (depth, total) = if distant {
            (PREFETCH_QUEUE_MAX, 2 * window)
        } else {
            (1, 0)
        };
        loop {
            let Some(conn) = self.conn.as_ref() else {
                return;
            };
            let (queued, heads) = conn.prefetch_queue();
            if self.ahead_hint.is_empty()
                || !conn.uid_before_body()
                || queued >= depth
                || heads
                || conn.streaming_any()
            {
                return;
            }
            let coming: HashSet<u32> = conn.in_flight().chain(self.ahead.keys().copied()).collect();
            // Listed octets not read yet: the current window's rest and the FETCHes pending.
            let unread: u64 = self
                .ahead_hint
                .iter()
                .filter(|(u, _)| !self.ahead.contains_key(u) && coming.contains(u))
                .map(|&(_, size)| size)
                .sum();
            let Some(at) = self
                .ahead_hint
                .iter()
                .position(|(u, _)| !coming.contains(u))
            else {
                return;
            };
            let (next, size) = self.ahead_hint[at];
            // Behind another pending FETCH only what fits in two windows.
            let room = total.saturating_sub(unread);
            if size > PREFETCH_MAX_MESSAGE || (queued > 0 && size > room) {
                return;
            }
            let mut budget = if queued > 0 {
                window.min(room - size)
            } else {
                window
            };
            let mut others = Vec::new();
            let mut octets = size;
            for &(u, size) in &self.ahead_hint[at + 1..] {
                if coming.contains(&u) || size > STREAM_AHEAD_MAX_MESSAGE || size >= u64::from(max)
                {
                    continue;
                }
                let Some(left) = budget.checked_sub(size) else {
                    break;
                };
                budget = left;
                octets += size;
                others.push(u);
            }
            // ... and a window of small messages behind it only if it is at least half a
            // window (the hint shows a few more messages each time one is handed out: a few
            // big FETCHes, not a small one per message). The last ones of the mailbox come
            // once nothing else is pending.
            if queued > 0 && size <= STREAM_AHEAD_MAX_MESSAGE && octets < window / 2 {
                return;
            }
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            if let Err(e) = conn.prefetch(next, &others).await {
                tracing::debug!(error = %e, uid = next, "prefetch failed");
                if !matches!(e, ImapError::Command(_)) {
                    self.conn = None;
                }
                return;
            }
        }
    }
}
