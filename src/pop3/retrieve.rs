//! RETR and TOP on a POP3 connection: the message's parts from the maildrop through the
//! dot-stuffer to the client, with an `-ERR` instead whenever nothing was sent yet.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::connection::{
    Conn, Flow, SessionOutcome, FLUSH_AT, READ_AHEAD_MESSAGES, TOP_HEADER_LONG,
};
use super::response::DotStuffer;
use super::routed::Upstream;
use crate::maildrop::{BodyPart, Maildrop, MaildropError};
use crate::metrics::metrics;

impl<IO, U> Conn<'_, IO, U>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    U: Upstream,
{
    pub(super) async fn retrieve(
        &mut self,
        msg: u32,
        uid: u32,
        size: u64,
        top_lines: Option<u32>,
        ok_line: Vec<u8>,
    ) -> Flow {
        let chunk = self.fetch_chunk.max(1);
        let top = top_lines.is_some();
        let Some((md, _)) = self.maildrop.as_mut() else {
            return self.retrieve_failed(msg, uid, MaildropError::unavailable("no maildrop"));
        };
        let octets = md.read_ahead_octets();
        md.read_ahead_hint(self.session.upcoming(msg, READ_AHEAD_MESSAGES, octets));
        let top_header = self.top_header;
        let mut part = match read_part(md, uid, size, top_lines, top_header, 0, chunk).await {
            Ok(d) => d,
            Err(e) => return self.retrieve_failed(msg, uid, e),
        };
        // Until something of this response is flushed, a failure can still become an -ERR.
        let mark = self.out.len();
        let mut flushed = false;
        let mut parts = 1u32;
        self.emit(&ok_line);
        let mut stuffer = top_lines.map_or_else(DotStuffer::new, DotStuffer::top);
        let mut offset = 0u64;
        loop {
            stuffer.feed(&part.data, &mut self.out);
            offset += part.data.len() as u64;
            // A TOP's first piece is held until the rest of the message is on its way in one
            // literal: if the message went away in between, the client gets -ERR, not a
            // truncated answer. A RETR streams one literal from its first part on.
            if self.out.len() >= FLUSH_AT && (!top || parts > 1) {
                if let Err(o) = self.flush().await {
                    return Flow::End(o);
                }
                flushed = true;
            }
            if stuffer.is_done() || part.last {
                break;
            }
            let Some((md, _)) = self.maildrop.as_mut() else {
                return Flow::End(SessionOutcome::UpstreamError);
            };
            if top && parts == 1 && self.top_header < TOP_HEADER_LONG {
                // This header (or the lines asked for) did not fit: the client's mail has
                // long headers, so the pieces of the next windows are the long ones.
                self.top_header = TOP_HEADER_LONG;
                debug!(uid, "TOP's first piece is the long one from now on");
            }
            part = match read_part(md, uid, size, top_lines, top_header, offset, chunk).await {
                Ok(d) => d,
                Err(e) if flushed => {
                    warn!(user = self.user.as_deref().unwrap_or("-"), uid, offset, error = %crate::errors::Chain(&e),
                        "fetch failed mid-message after part of it was sent");
                    return Flow::End(SessionOutcome::UpstreamError);
                }
                Err(e) => {
                    self.out.truncate(mark);
                    return self.retrieve_failed(msg, uid, e);
                }
            };
            parts += 1;
        }
        stuffer.finish(&mut self.out);
        debug!(uid, octets = offset, "message sent");
        if top {
            return Flow::Continue;
        }
        metrics().messages_retrieved.inc();
        self.stats.retrieved += 1;
        if let Some((md, _)) = self.maildrop.as_mut() {
            md.retrieved(uid);
        }
        if self.cfg.mark_seen {
            if let Some((md, _)) = self.maildrop.as_mut() {
                if let Err(e) = md.mark_seen(uid).await {
                    warn!(user = self.user.as_deref().unwrap_or("-"), uid, error = %crate::errors::Chain(&e), "mark_seen failed");
                }
            }
        }
        Flow::Continue
    }

    /// A RETR/TOP that failed before any of its bytes were sent: `-ERR`, and the end of the
    /// session unless the message is simply gone.
    fn retrieve_failed(&mut self, msg: u32, uid: u32, e: MaildropError) -> Flow {
        let user = self.user.as_deref().unwrap_or("-");
        if e == MaildropError::Gone {
            info!(user, uid, msg, "message removed upstream since the listing");
            metrics().retr_gone.inc();
        } else {
            warn!(user, uid, error = %crate::errors::Chain(&e), "fetch failed");
        }
        if let (MaildropError::Busy { signal, .. }, Some(g)) = (&e, &self.gated) {
            g.pressure(*signal);
        }
        let failed = self.session.on_retrieve_failed(msg, &e);
        self.emit(&failed.bytes);
        if failed.close {
            Flow::EndAfterFlush(SessionOutcome::UpstreamError)
        } else {
            Flow::Continue
        }
    }
}

/// A TOP's first piece: `header` octets for the header (see [`super::connection::TOP_HEADER_SHORT`])
/// plus 256 octets per line asked for.
fn top_first_piece(top_lines: Option<u32>, header: u32) -> u32 {
    const PER_LINE: u32 = 256;
    header.saturating_add(top_lines.unwrap_or(0).saturating_mul(PER_LINE))
}

/// The next part of message `uid` (`size` octets listed) from `offset`. A TOP starts with a
/// piece (usually all it needs: the header and a few lines); the rest, when needed, comes as
/// one streamed range. A message listed as non-empty whose first part is empty and final
/// went away under the session (some servers answer `""` instead of `NIL`).
async fn read_part<M: Maildrop>(
    md: &mut M,
    uid: u32,
    size: u64,
    top_lines: Option<u32>,
    top_header: u32,
    offset: u64,
    chunk: u32,
) -> Result<BodyPart, MaildropError> {
    let part = if top_lines.is_some() && offset == 0 {
        // Usually enough for the header and the lines asked for (and the same piece of the
        // next messages comes along with it, see ImapMaildrop::fetch_piece); else the rest
        // follows as one streamed range.
        let first = top_first_piece(top_lines, top_header).min(chunk);
        let data = md.fetch(uid, offset, first).await?;
        let last = data.len() < first as usize;
        BodyPart { data, last }
    } else {
        md.read_body(uid, size, offset, chunk).await?
    };
    if offset == 0 && size > 0 && part.last && part.data.is_empty() {
        return Err(MaildropError::Gone);
    }
    Ok(part)
}
