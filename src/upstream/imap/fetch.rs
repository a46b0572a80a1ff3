//! The responses popbridge reads itself instead of letting imap-next decode them:
//! `UID FETCH <uid>,<others> (UID BODY.PEEK[])`, and the first pieces TOP needs
//! (`UID FETCH <uids> (UID BODY.PEEK[]<0.len>)`, [`ImapConnection::fetch_heads`]). The body literal of `<uid>` goes to the client
//! in bounded parts as it arrives ([`ImapConnection::body_start`], [`ImapConnection::body_next`]);
//! small messages named in `<others>` are read ahead whole; the FETCHes of the next messages
//! can be sent before the client asks for them ([`ImapConnection::prefetch`], a bounded queue
//! whose responses a server may interleave: see [`super::prefetch`]), and so can the next
//! window of first pieces ([`ImapConnection::prefetch_heads`]). The lines around the
//! literals are read by the pure parser in [`super::fetch_parse`], which accepts every shape a
//! server sends for a message that went away under the session.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use imap_next::imap_types::response::StatusKind;
use tokio::io::AsyncWriteExt;

use super::conn::{
    BodyStart, BodyStream, FetchOrder, ImapConnection, Step, AHEAD_LITERAL_MAX, DRAIN_MAX,
    RANGE_TO_END,
};
use super::engine::{Completion, ImapError};
use super::fetch_parse::{self, BodyValue, FetchInfo, Items, Line};
use crate::metrics::metrics;
use crate::upstream::reader::LARGE_READ;

impl ImapConnection {
    /// Sends `UID FETCH <uid>,<others> (UID BODY.PEEK[])` and reads up to the start of the
    /// body literal of `uid`, which [`Self::body_next`] then hands out in parts as it arrives,
    /// so a message of any size flows to the client through bounded buffers without being
    /// decoded. The bodies of `others` (small messages read ahead; only when
    /// [`Self::uid_before_body`]) are kept whole for [`Self::take_ahead`].
    pub async fn body_start(&mut self, uid: u32, others: &[u32]) -> Result<BodyStart, ImapError> {
        self.body_start_at(uid, 0, others).await
    }

    /// [`Self::body_start`] of the part of the body from octet `origin` on
    /// (`BODY.PEEK[]<origin.n>`, one literal); with `origin` 0, the whole body.
    pub async fn body_start_at(
        &mut self,
        uid: u32,
        origin: u32,
        others: &[u32],
    ) -> Result<BodyStart, ImapError> {
        let r = self.body_start_inner(uid, origin, others).await;
        if let Err(e) = &r {
            metrics()
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
        }
        r
    }

    async fn body_start_inner(
        &mut self,
        uid: u32,
        origin: u32,
        others: &[u32],
    ) -> Result<BodyStart, ImapError> {
        if self.engine.broken {
            return Err(ImapError::Broken);
        }
        self.abandon_body().await?;
        self.ahead.clear();
        // A FETCH of this very message sent ahead: its response is next in the socket, no
        // command and no round trip needed (its `others` replace the ones asked for now).
        let front = self
            .prefetch
            .front()
            .is_some_and(|p| p.uid == uid && origin == 0 && p.heads.is_none());
        let taken = if front {
            self.prefetch.pop_front()
        } else {
            None
        };
        let (tag, others, started) = match taken {
            Some(p) => {
                if !self.prefetch.is_empty() {
                    tracing::debug!(
                        uid,
                        pending = self.prefetch.len(),
                        "body read from a FETCH sent ahead, more pending"
                    );
                }
                // What of it arrived early, in the middle of an earlier response.
                self.unstash_ahead(&p.others);
                // NIL (`Some(None)`): gone; the rest of the response has no body for it
                // either.
                if let Some(Some(data)) = self.stash_take(uid) {
                    self.body = Some(BodyStream {
                        tag: p.tag,
                        uid,
                        others: p.others,
                        left: 0,
                        inline: Some(data),
                        items_pending: false,
                        origin: 0,
                        delivered: false,
                        info: FetchInfo {
                            uid: Some(uid),
                            ..FetchInfo::default()
                        },
                        started: p.started,
                        done: p.done,
                    });
                    return Ok(BodyStart::Streaming);
                }
                if let Some(done) = p.done {
                    return Ok(BodyStart::NoBody(done));
                }
                (p.tag, p.others, p.started)
            }
            None => {
                self.drain_prefetch().await?;
                let started = Instant::now();
                let others = if origin == 0 { others } else { &[] };
                let tag = self.send_fetch(uid, origin, others).await?;
                (tag, others.to_vec(), started)
            }
        };
        let (left, inline, items_pending, info) =
            match self.fetch_lines(&tag, Some((uid, origin)), &others).await? {
                Step::Done(done) => return Ok(BodyStart::NoBody(done)),
                Step::Body { len, info } => {
                    self.learn_fetch_order(info.uid.is_some());
                    (u64::from(len), None, true, info)
                }
                Step::Inline { data, info } => (0, data, false, info),
            };
        self.body = Some(BodyStream {
            tag,
            uid,
            others,
            left,
            inline,
            items_pending,
            origin,
            delivered: false,
            info,
            started,
            done: None,
        });
        Ok(BodyStart::Streaming)
    }

    /// Writes `UID FETCH <uid>,<others> (UID BODY.PEEK[])`, or with a non-zero `origin` (and
    /// no others) `UID FETCH <uid> (UID BODY.PEEK[]<origin.n>)` for the rest of the body from
    /// there (deadline on the write); its tag.
    pub(super) async fn send_fetch(
        &mut self,
        uid: u32,
        origin: u32,
        others: &[u32],
    ) -> Result<String, ImapError> {
        if uid == 0 || others.contains(&0) || others.contains(&uid) {
            return Err(ImapError::Command("bad UID set".into()));
        }
        if !others.is_empty() && !self.uid_before_body {
            return Err(ImapError::Command(
                "read-ahead needs UID before BODY".into(),
            ));
        }
        let tag = format!("P{}", self.engine.next_tag);
        self.engine.next_tag = self.engine.next_tag.wrapping_add(1);
        let mut command = format!("{tag} UID FETCH {uid}");
        for o in others {
            command.push_str(&format!(",{o}"));
        }
        if origin == 0 {
            command.push_str(" (UID BODY.PEEK[])\r\n");
        } else {
            // The rest of the message, however long: servers end the range at its end.
            let len = RANGE_TO_END - origin.min(RANGE_TO_END - 1);
            command.push_str(&format!(" (UID BODY.PEEK[]<{origin}.{len}>)\r\n"));
        }
        self.write_command(&command).await?;
        Ok(tag)
    }

    /// `UID FETCH <uids> (UID BODY.PEEK[]<0.len>)` with every body read whole and not decoded
    /// (imap-codec takes a literal a byte at a time): the first pieces TOP needs, of the
    /// message asked for and of the next ones. Each literal is at most `len` (at most
    /// `AHEAD_LITERAL_MAX`); a message another client expunged is simply absent (or empty).
    /// Only when [`Self::uid_before_body`]; any read-ahead of an unsettled streamed FETCH
    /// must have been taken first ([`Self::settle`], [`Self::take_ahead`]).
    pub async fn fetch_heads(
        &mut self,
        uids: &[u32],
        len: u32,
    ) -> Result<(Completion, Vec<(u32, Bytes)>), ImapError> {
        if self.engine.broken {
            return Err(ImapError::Broken);
        }
        if !self.uid_before_body
            || uids.is_empty()
            || uids.contains(&0)
            || len == 0
            || len > AHEAD_LITERAL_MAX
        {
            return Err(ImapError::Command("cannot fetch heads".into()));
        }
        self.abandon_body().await?;
        // The same pieces of these messages asked for ahead (`prefetch_heads`): their
        // response is next in the socket, no command and no round trip needed (its UIDs
        // replace the ones asked for now).
        let front = self.prefetch.front().is_some_and(|p| {
            p.heads == Some(len) && (p.uid == uids[0] || p.others.contains(&uids[0]))
        });
        let taken = if front {
            self.prefetch.pop_front()
        } else {
            None
        };
        let (tag, uids, started) = match taken {
            Some(p) => {
                tracing::debug!(uid = uids[0], "first pieces read from a FETCH sent ahead");
                let mut all = p.others;
                all.insert(0, p.uid);
                (p.tag, all, p.started)
            }
            None => {
                self.drain_prefetch().await?;
                let started = Instant::now();
                let tag = self.send_heads(uids, len).await?;
                (tag, uids.to_vec(), started)
            }
        };
        self.ahead.clear();
        match self.fetch_lines(&tag, None, &uids).await {
            Ok(Step::Done(done)) => {
                metrics()
                    .upstream_command_duration
                    .with_label_values(&["FETCH"])
                    .observe(started.elapsed().as_secs_f64());
                self.engine.reader.shrink_idle();
                Ok((done, std::mem::take(&mut self.ahead)))
            }
            Ok(_) => Err(self.engine.fail(ImapError::Malformed)),
            Err(e) => {
                metrics()
                    .upstream_errors
                    .with_label_values(&[e.kind()])
                    .inc();
                Err(e)
            }
        }
    }

    /// Writes `UID FETCH <uids> (UID BODY.PEEK[]<0.len>)`; its tag.
    pub(super) async fn send_heads(&mut self, uids: &[u32], len: u32) -> Result<String, ImapError> {
        let tag = format!("P{}", self.engine.next_tag);
        self.engine.next_tag = self.engine.next_tag.wrapping_add(1);
        let set: Vec<String> = uids.iter().map(u32::to_string).collect();
        let command = format!(
            "{tag} UID FETCH {} (UID BODY.PEEK[]<0.{len}>)\r\n",
            set.join(",")
        );
        self.write_command(&command).await?;
        Ok(tag)
    }

    /// Writes one command line (deadline on the write).
    async fn write_command(&mut self, command: &str) -> Result<(), ImapError> {
        let t = self.engine.limits.io_timeout;
        let written = tokio::time::timeout(t, async {
            self.engine.io.write_all(command.as_bytes()).await?;
            self.engine.io.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.engine.fail(e.into())),
            Err(_) => Err(self.engine.fail(ImapError::Timeout(t))),
        }
    }

    /// The next step of the response to our FETCH `tag`: its completion, a FETCH response
    /// whose body literal of `len` octets starts next in the buffer, or one whose body came
    /// inline (quoted, or NIL). Other untagged responses (EXISTS, EXPUNGE, VANISHED, `* OK`;
    /// their literals skipped) and FETCH responses without a body (flag updates) are passed
    /// over.
    pub(super) async fn next_fetch_body(&mut self, tag: &str) -> Result<Step, ImapError> {
        loop {
            let line = self.engine.read_line().await?;
            // The completion of a FETCH sent after this one: the server ran them at once.
            if self.early_completion(fetch_parse::trim_eol(&line))? {
                continue;
            }
            let classified = fetch_parse::classify(&line, tag.as_bytes());
            let items_at = match classified.map_err(|e| self.engine.fail(e.into()))? {
                Line::Done { kind, text } => return Ok(Step::Done(completion(kind, text))),
                Line::Other { literal } => {
                    // The response goes on after its literal (`* STATUS {5}\r\nINBOX
                    // (MESSAGES 3)\r\n`), maybe with more literals: read it to its end.
                    let mut literal = literal;
                    while let Some(n) = literal {
                        self.engine.skip(u64::from(n)).await?;
                        literal = fetch_parse::announced_literal(&self.engine.read_line().await?);
                    }
                    continue;
                }
                Line::Fetch { items_at } => items_at,
            };
            let mut info = FetchInfo::default();
            let items = &fetch_parse::trim_eol(&line)[items_at..];
            let parsed = fetch_parse::parse_items(items, &mut info)
                .map_err(|e| self.engine.fail(e.into()))?;
            // A whole FETCH response of a FETCH sent after this one (its UID comes first):
            // kept for that command, which reads it from the stash when its turn comes.
            if let Some(u) = info.uid.filter(|&u| self.queued_body(u)) {
                self.stash_early(u, parsed, info).await?;
                continue;
            }
            match parsed {
                Items::Body(len) => return Ok(Step::Body { len, info }),
                Items::End => match info.body.take() {
                    None => continue,
                    Some(BodyValue::Nil) => return Ok(Step::Inline { data: None, info }),
                    Some(BodyValue::Quoted(q)) => {
                        return Ok(Step::Inline {
                            data: Some(Bytes::from(q)),
                            info,
                        })
                    }
                    Some(BodyValue::Literal(_)) => {
                        return Err(self.engine.fail(ImapError::Malformed))
                    }
                },
            }
        }
    }

    /// Reads the body of `uid` of a pending FETCH (see [`super::prefetch`]) whose response
    /// arrived early into the stash: a literal (bounded), a quoted string, or NIL.
    async fn stash_early(
        &mut self,
        uid: u32,
        parsed: Items,
        mut info: FetchInfo,
    ) -> Result<(), ImapError> {
        if info.origin != 0 {
            return Err(self.engine.fail(ImapError::Malformed));
        }
        let data = match parsed {
            Items::Body(len) => {
                if !self.stash_room(u64::from(len)) {
                    return Err(self.engine.fail(ImapError::Malformed));
                }
                let data = self.engine.take_exact(len as usize).await?;
                self.finish_items(&mut info).await?;
                if info.uid != Some(uid) {
                    return Err(self.engine.fail(ImapError::Malformed));
                }
                Some(data)
            }
            Items::End => match info.body.take() {
                // A flag update of it: nothing to keep.
                None => return Ok(()),
                Some(BodyValue::Nil) => None,
                Some(BodyValue::Quoted(q)) => Some(Bytes::from(q)),
                Some(BodyValue::Literal(_)) => return Err(self.engine.fail(ImapError::Malformed)),
            },
        };
        tracing::debug!(uid, "a body of a FETCH sent ahead came early");
        self.stash_put(uid, data)
    }

    /// Reads the rest of a FETCH response's item list after a body literal into `info`; it
    /// must hold no further literal.
    pub(super) async fn finish_items(&mut self, info: &mut FetchInfo) -> Result<(), ImapError> {
        let line = self.engine.read_line().await?;
        match fetch_parse::parse_items(fetch_parse::trim_eol(&line), info) {
            Ok(Items::End) => Ok(()),
            _ => Err(self.engine.fail(ImapError::Malformed)),
        }
    }

    /// Reads the responses of our FETCH `tag` until the body of `cur` (UID and origin) starts
    /// or the command completes; bodies of `others` are read whole into `self.ahead`. A `NIL`
    /// body (a message another client expunged) is passed over: the message's absence from
    /// the response says it is gone.
    async fn fetch_lines(
        &mut self,
        tag: &str,
        cur: Option<(u32, u32)>,
        others: &[u32],
    ) -> Result<Step, ImapError> {
        let cur_uid = cur.map(|c| c.0);
        loop {
            let (len, mut info) = match self.next_fetch_body(tag).await? {
                Step::Done(done) => return Ok(Step::Done(done)),
                Step::Inline { data: None, .. } => continue,
                Step::Inline {
                    data: Some(data),
                    info,
                } => {
                    // A short body sent as a quoted string: whose it is, the line said whole
                    // (with one UID asked for, it can only be that one's).
                    let whose = info.uid.or(cur_uid.filter(|_| others.is_empty()));
                    match whose {
                        Some(u) if Some((u, info.origin)) == cur => {
                            return Ok(Step::Inline {
                                data: Some(data),
                                info,
                            })
                        }
                        Some(u) if others.contains(&u) && info.origin == 0 => {
                            if self.ahead.iter().all(|(a, _)| *a != u) {
                                self.ahead.push((u, data));
                            }
                            continue;
                        }
                        _ => return Err(self.engine.fail(ImapError::Malformed)),
                    }
                }
                Step::Body { len, info } => (len, info),
            };
            match (info.uid, cur) {
                (Some(u), Some((c, origin))) if u == c && info.origin == origin => {
                    return Ok(Step::Body { len, info })
                }
                // UID after the body: only acceptable when the command named one UID.
                (None, Some((_, origin))) if others.is_empty() && info.origin == origin => {
                    return Ok(Step::Body { len, info })
                }
                // What earlier connections showed no longer holds (another server behind the
                // address): this session fails, the next ones learn again.
                (None, Some(_)) => {
                    self.learn_fetch_order(false);
                    return Err(self.engine.fail(ImapError::Malformed));
                }
                (Some(u), _)
                    if others.contains(&u) && len <= AHEAD_LITERAL_MAX && info.origin == 0 =>
                {
                    let data = self.engine.take_exact(len as usize).await?;
                    self.finish_items(&mut info).await?;
                    if info.uid != Some(u) {
                        return Err(self.engine.fail(ImapError::Malformed));
                    }
                    if self.ahead.iter().all(|(a, _)| *a != u) {
                        self.ahead.push((u, data));
                    }
                }
                _ => return Err(self.engine.fail(ImapError::Malformed)),
            }
        }
    }

    /// The next part of the body being streamed: at least one byte unless the body is
    /// empty, at most `max`; `true` with the last part, once the response has completed.
    pub async fn body_next(&mut self, max: usize) -> Result<(Bytes, bool), ImapError> {
        let r = self.body_next_inner(max).await;
        if let Err(e) = &r {
            metrics()
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
        }
        r
    }

    async fn body_next_inner(&mut self, max: usize) -> Result<(Bytes, bool), ImapError> {
        let Some(b) = self.body.as_mut() else {
            return Err(ImapError::Command("no body is being streamed".into()));
        };
        let max = max.max(1);
        let mut data = Bytes::new();
        if let Some(mut inline) = b.inline.take() {
            data = inline.split_to(inline.len().min(max));
            if !inline.is_empty() {
                b.inline = Some(inline);
                return Ok((data, false));
            }
        } else if b.left > 0 {
            let left = b.left;
            if self.engine.reader.is_empty() {
                self.engine.fill(LARGE_READ).await?;
            }
            let k = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.engine.reader.len())
                .min(max);
            data = self.engine.reader.split_to(k).freeze();
            let left = left - k as u64;
            if let Some(b) = self.body.as_mut() {
                b.left = left;
            }
            if left > 0 {
                return Ok((data, false));
            }
        }
        match self.body.as_mut() {
            // Whose body this was is known: the rest can wait for the next command.
            Some(b) if b.info.uid.is_some() => b.delivered = true,
            _ => self.finish_body().await?,
        }
        Ok((data, true))
    }

    /// Reads what follows the body literal up to the tagged completion.
    async fn finish_body(&mut self) -> Result<(), ImapError> {
        let Some(stream) = self.body.take() else {
            return Ok(());
        };
        let BodyStream {
            tag,
            uid,
            others,
            mut info,
            started,
            items_pending,
            done: early,
            ..
        } = stream;
        // The rest of the FETCH item list.
        if items_pending {
            self.finish_items(&mut info).await?;
        }
        if info.uid != Some(uid) {
            return Err(self.engine.fail(ImapError::Malformed));
        }
        let done = match early {
            // Completed before its turn (its bodies came early): nothing left to read.
            Some(done) => done,
            None => match self.fetch_lines(&tag, None, &others).await? {
                Step::Done(done) => done,
                _ => return Err(self.engine.fail(ImapError::Malformed)),
            },
        };
        metrics()
            .upstream_command_duration
            .with_label_values(&["FETCH"])
            .observe(started.elapsed().as_secs_f64());
        self.engine.reader.shrink_idle();
        if !done.is_ok() {
            // The body was complete and its UID checked: a NO after it (`[EXPUNGEISSUED]`
            // for a message read ahead that went away) changes nothing already handed out.
            tracing::debug!(uid, text = %done.text, "streamed FETCH completed with NO/BAD");
        }
        Ok(())
    }

    /// The read-ahead messages of the last streamed FETCH.
    pub fn take_ahead(&mut self) -> Vec<(u32, Bytes)> {
        std::mem::take(&mut self.ahead)
    }

    /// Whether a FETCH of several UIDs may be streamed (see the field).
    pub fn uid_before_body(&self) -> bool {
        self.uid_before_body
    }

    /// Start from what earlier connections to this server showed about its FETCH item
    /// order, and tell them what this one shows.
    pub fn share_fetch_order(&mut self, order: Arc<FetchOrder>) {
        if let Some(uid_first) = order.get() {
            self.uid_before_body = uid_first;
            self.fetch_order_known = true;
        }
        self.fetch_order = Some(order);
    }

    pub(super) fn learn_fetch_order(&mut self, uid_first: bool) {
        self.uid_before_body = uid_first;
        self.fetch_order_known = true;
        if let Some(order) = &self.fetch_order {
            order.set(uid_first);
        }
    }

    /// Whether a streamed FETCH has shown the server's order of `UID` and `BODY[]` yet.
    pub fn fetch_order_known(&self) -> bool {
        self.fetch_order_known
    }

    /// Whether a body is being streamed and not yet handed out whole.
    pub fn streaming_any(&self) -> bool {
        self.body.as_ref().is_some_and(|b| !b.delivered)
    }

    /// Whether a body is being streamed for `uid`.
    pub fn streaming(&self, uid: u32) -> bool {
        self.body
            .as_ref()
            .is_some_and(|b| b.uid == uid && !b.delivered)
    }

    /// Whether a streamed FETCH has not been read to its completion yet.
    pub fn unsettled(&self) -> bool {
        self.body.is_some()
    }

    /// Reads the rest of a streamed FETCH (see [`BodyStream::delivered`]); the read-ahead
    /// bodies in it are then ready for [`Self::take_ahead`].
    pub async fn settle(&mut self) -> Result<(), ImapError> {
        let r = self.abandon_body().await;
        if let Err(e) = &r {
            metrics()
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
        }
        r
    }

    /// Ends a body stream: read to its end if that is cheap (always, once the body was
    /// delivered), otherwise give the connection up.
    pub(super) async fn abandon_body(&mut self) -> Result<(), ImapError> {
        let Some((left, origin)) = self.body.as_mut().map(|b| {
            b.inline = None;
            (b.left, b.origin)
        }) else {
            return Ok(());
        };
        // A range (TOP's remainder) was asked for because the client needs its start: read to
        // its end whatever its size (bounded by the message, every read with its deadline).
        if left > DRAIN_MAX && origin == 0 {
            self.body = None;
            return Err(self.engine.fail(ImapError::Broken));
        }
        self.engine.skip(left).await?;
        self.finish_body().await
    }
}

pub(super) fn completion(kind: fetch_parse::Completion, text: &[u8]) -> Completion {
    Completion {
        kind: match kind {
            fetch_parse::Completion::Ok => StatusKind::Ok,
            fetch_parse::Completion::No => StatusKind::No,
            fetch_parse::Completion::Bad => StatusKind::Bad,
        },
        code: None,
        text: String::from_utf8_lossy(text).into_owned(),
    }
}

#[cfg(test)]
pub(super) mod tests;
