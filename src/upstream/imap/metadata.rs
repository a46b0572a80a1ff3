//! The shared copy of a legacy UIDL map in IMAP METADATA (RFC 5464), private to the user, on
//! the maildrop folder: every popbridge instance reads the same map, whichever instance ran
//! `popbridge migrate`. Layout (see [`crate::uidl::map`]): the head at
//! [`METADATA_ENTRY`], the chunks of generation `gen` at `<ENTRY>/<gen>/0`, `<ENTRY>/<gen>/1`,
//! ... A write puts a new generation's chunks first and the head naming it last, then deletes
//! the previous generation's chunks: a reader sees the old map or the new one, never a mix,
//! and an interrupted write leaves the old map in force.
//!
//! What a user can write to /private is never trusted for more than the limits of
//! [`crate::uidl::map`]: the head is asked for with `MAXSIZE`, the chunks in batches of
//! bounded size, each with `MAXSIZE` of the head's largest chunk, and reading stops past the
//! bytes the head announced (itself at most [`MAX_MAP_BYTES`]).

use std::borrow::Cow;

use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::{AString, NString, NString8, Vec1};
use imap_next::imap_types::extensions::metadata::{
    Entry, EntryValue, GetMetadataOption, MetadataCode, MetadataResponse,
};
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data};

use super::conn::ImapConnection;
use super::engine::{Completion, ImapError, Untagged};
use crate::uidl::map::{
    new_generation, MapError, MapHead, UidlMap, MAX_HEAD_BYTES, MAX_MAP_BYTES, METADATA_ENTRY,
};

/// Most chunks requested per GETMETADATA command (with at least 512 octets per chunk, a head
/// can make popbridge send at most 256 GETMETADATA for a whole map) ...
const CHUNKS_PER_COMMAND: usize = 256;
/// ... and most octets of chunk values one answer may carry.
const BYTES_PER_COMMAND: usize = 4 << 20;
/// Old chunks deleted per SETMETADATA command.
const DELETES_PER_COMMAND: usize = 64;
/// Smallest chunk size popbridge falls back to when the server announces a MAXSIZE.
pub const MIN_CHUNK_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error("the server refused {command}: {text}")]
    Refused { command: &'static str, text: String },
    #[error("the server's METADATA values are limited to {0} octets, too small for a UIDL map")]
    TooSmall(u32),
    #[error("the UIDL map in METADATA is unusable: {0}")]
    Map(#[from] MapError),
    #[error("cannot build the METADATA command: {0}")]
    Command(String),
}

fn entry(name: &str) -> Result<Entry<'static>, MetadataError> {
    let a =
        AString::try_from(name.to_owned()).map_err(|e| MetadataError::Command(e.to_string()))?;
    Entry::try_from(a).map_err(|e| MetadataError::Command(e.to_string()))
}

fn chunk_name(gen: &str, i: usize) -> String {
    format!("{METADATA_ENTRY}/{gen}/{i}")
}

fn mailbox_arg(name: &str) -> Result<Mailbox<'static>, MetadataError> {
    Mailbox::try_from(name.to_owned()).map_err(|e| MetadataError::Command(e.to_string()))
}

/// Entry names with their values, and whether the server left any value out as too long.
type Found = (Vec<(String, Vec<u8>)>, bool);

/// A GETMETADATA in flight: collects the values its answer carries, so the command can be
/// pipelined with others (the login sends the head's with SELECT and UID SEARCH).
#[derive(Default)]
pub struct Values {
    found: Vec<(String, Vec<u8>)>,
}

/// GETMETADATA of `names` on `mailbox`. Values larger than `max_size` are left out by the
/// server (RFC 5464 MAXSIZE), which says so with `[METADATA LONGENTRIES n]`.
fn get_command(
    mailbox: &str,
    names: &[String],
    max_size: usize,
) -> Result<CommandBody<'static>, MetadataError> {
    let entries = names
        .iter()
        .map(|n| entry(n))
        .collect::<Result<Vec<_>, _>>()?;
    let entries: Vec1<Entry<'static>> =
        Vec1::try_from(entries).map_err(|_| MetadataError::Command("no entries".into()))?;
    Ok(CommandBody::GetMetadata {
        options: vec![GetMetadataOption::MaxSize(
            u32::try_from(max_size).unwrap_or(u32::MAX),
        )],
        mailbox: mailbox_arg(mailbox)?,
        entries,
    })
}

impl Values {
    /// Keep the values of a METADATA response; anything else is handed back.
    pub fn absorb(&mut self, u: Untagged) -> Option<Untagged> {
        let Untagged::Data(Data::Metadata {
            items: MetadataResponse::WithValues(values),
            ..
        }) = u
        else {
            return Some(u);
        };
        for EntryValue { entry, value } in values.into_inner() {
            let bytes: Option<Cow<[u8]>> = match value {
                NString8::NString(n) => n.into_option(),
                NString8::Literal8(l) => Some(l.data),
            };
            if let Some(bytes) = bytes {
                let name = String::from_utf8_lossy(entry.as_ref()).into_owned();
                self.found.push((name, bytes.into_owned()));
            }
        }
        None
    }

    /// The values found (absent or NIL entries are missing), and whether the server left
    /// any out for being longer than MAXSIZE.
    fn finish(self, done: Completion) -> Result<Found, MetadataError> {
        if !done.is_ok() {
            return Err(MetadataError::Refused {
                command: "GETMETADATA",
                text: done.text,
            });
        }
        let long = matches!(
            done.code,
            Some(Code::Metadata(MetadataCode::LongEntries(_)))
        );
        Ok((self.found, long))
    }
}

/// Values of `names` on `mailbox`, one command (see [`Values::finish`]).
async fn get(
    conn: &mut ImapConnection,
    mailbox: &str,
    names: &[String],
    max_size: usize,
) -> Result<Found, MetadataError> {
    let body = get_command(mailbox, names, max_size)?;
    let mut values = Values::default();
    let done = conn
        .execute(body, |u| {
            values.absorb(u);
        })
        .await?;
    values.finish(done)
}

/// The GETMETADATA that asks for the head of the map on `mailbox`; [`head_from`] reads its
/// answer.
pub fn head_command(mailbox: &str) -> Result<CommandBody<'static>, MetadataError> {
    get_command(mailbox, &[METADATA_ENTRY.to_owned()], MAX_HEAD_BYTES)
}

/// The head a [`head_command`] answered, if any.
pub fn head_from(values: Values, done: Completion) -> Result<Option<MapHead>, MetadataError> {
    let (values, long) = values.finish(done)?;
    let Some((_, head)) = values
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(METADATA_ENTRY))
    else {
        // Absent, or longer than any head (the server said LONGENTRIES): not a head popbridge
        // wrote, and not to be taken for "no map".
        if long {
            return Err(MapError::Malformed("head line too long".into()).into());
        }
        return Ok(None);
    };
    let head =
        String::from_utf8(head).map_err(|_| MapError::Malformed("head is not UTF-8".into()))?;
    Ok(Some(MapHead::parse(&head)?))
}

/// The head of the map stored on `mailbox`, if any (one small GETMETADATA).
pub async fn read_head(
    conn: &mut ImapConnection,
    mailbox: &str,
) -> Result<Option<MapHead>, MetadataError> {
    let mut values = Values::default();
    let done = conn
        .execute(head_command(mailbox)?, |u| {
            values.absorb(u);
        })
        .await?;
    head_from(values, done)
}

/// The entry text of the map `head` names: its chunks, read in batches of at most
/// [`CHUNKS_PER_COMMAND`] chunks and [`BYTES_PER_COMMAND`] octets, joined by spaces, and
/// never more than the head's `bytes` (at most [`MAX_MAP_BYTES`]). Not decoded or checked
/// against the checksum here: see [`UidlMap::from_text`].
pub async fn read_text(
    conn: &mut ImapConnection,
    mailbox: &str,
    head: &MapHead,
    uid_next: Option<u32>,
) -> Result<String, MetadataError> {
    head.check_uid_next(uid_next)?;
    if head.bytes > MAX_MAP_BYTES {
        return Err(MapError::TooLarge(head.bytes).into());
    }
    let per_command = (BYTES_PER_COMMAND / head.chunk.max(1)).clamp(1, CHUNKS_PER_COMMAND);
    // Grows with what arrives, never reserved on the head's word beyond a small start.
    let mut text = String::with_capacity(head.bytes.min(64 << 10));
    let mut next = 0;
    while next < head.chunks {
        let end = (next + per_command).min(head.chunks);
        let names: Vec<String> = (next..end).map(|i| chunk_name(&head.gen, i)).collect();
        let (values, _) = get(conn, mailbox, &names, head.chunk).await?;
        for name in &names {
            let value = values
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    MapError::Malformed(format!(
                        "chunk {} of {} is missing or larger than the head says",
                        name.rsplit('/').next().unwrap_or(""),
                        head.chunks
                    ))
                })?;
            let chunk = std::str::from_utf8(value)
                .map_err(|_| MapError::Malformed("a chunk is not UTF-8".into()))?;
            if chunk.is_empty() {
                return Err(MapError::Malformed("an empty chunk".into()).into());
            }
            let grown = text.len() + usize::from(!text.is_empty()) + chunk.len();
            if grown > head.bytes {
                return Err(MapError::Checksum.into());
            }
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(chunk);
        }
        next = end;
    }
    if text.len() != head.bytes {
        return Err(MapError::Checksum.into());
    }
    Ok(text)
}

/// The map stored on `mailbox`, if any, with its head (for `popbridge migrate`, which decodes
/// in place; `serve` decodes off the runtime, see `ImapMaildrop::legacy_map`).
pub async fn read_map(
    conn: &mut ImapConnection,
    mailbox: &str,
    uid_next: Option<u32>,
) -> Result<Option<(MapHead, UidlMap)>, MetadataError> {
    let Some(head) = read_head(conn, mailbox).await? else {
        return Ok(None);
    };
    let text = read_text(conn, mailbox, &head, uid_next).await?;
    let map = UidlMap::from_text(&head, &text)?;
    Ok(Some((head, map)))
}

/// Store `map` on `mailbox` as a new generation: its chunks first, then the head naming it,
/// then (best effort) the previous generation's chunks are deleted. A server that answers
/// `[METADATA MAXSIZE n]` gets chunks of `n`. Returns the head written.
pub async fn write_map(
    conn: &mut ImapConnection,
    mailbox: &str,
    map: &UidlMap,
    chunk_bytes: usize,
) -> Result<MapHead, MetadataError> {
    // What to delete afterwards; a head that cannot be read names nothing to delete.
    let previous = read_head(conn, mailbox).await.ok().flatten();
    let gen = new_generation();
    let mut chunk_bytes = chunk_bytes.max(MIN_CHUNK_BYTES);
    let head = 'attempt: loop {
        let (head, chunks) = map.to_metadata(chunk_bytes, &gen)?;
        for (i, chunk) in chunks.iter().enumerate() {
            match set(conn, mailbox, &chunk_name(&gen, i), Some(chunk)).await? {
                None => {}
                Some(max) if (max as usize) < chunk_bytes && max as usize >= MIN_CHUNK_BYTES => {
                    chunk_bytes = max as usize;
                    continue 'attempt;
                }
                Some(max) => return Err(MetadataError::TooSmall(max)),
            }
        }
        break head;
    };
    if let Some(max) = set(conn, mailbox, METADATA_ENTRY, Some(&head.to_string())).await? {
        return Err(MetadataError::TooSmall(max));
    }
    if let Some(old) = previous.filter(|p| p.gen != gen) {
        let names: Vec<String> = (0..old.chunks).map(|i| chunk_name(&old.gen, i)).collect();
        for batch in names.chunks(DELETES_PER_COMMAND) {
            if let Err(e) = delete(conn, mailbox, batch).await {
                tracing::warn!(error = %e, "could not delete the previous UIDL map's chunks");
                break;
            }
        }
    }
    Ok(head)
}

/// SETMETADATA `names` to NIL (deletes them).
async fn delete(
    conn: &mut ImapConnection,
    mailbox: &str,
    names: &[String],
) -> Result<(), MetadataError> {
    let values = names
        .iter()
        .map(|n| {
            Ok(EntryValue {
                entry: entry(n)?,
                value: NString8::NString(NString(None)),
            })
        })
        .collect::<Result<Vec<_>, MetadataError>>()?;
    let entry_values =
        Vec1::try_from(values).map_err(|_| MetadataError::Command("no entries".into()))?;
    let body = CommandBody::SetMetadata {
        mailbox: mailbox_arg(mailbox)?,
        entry_values,
    };
    let done = conn.execute(body, |_| {}).await?;
    if done.is_ok() {
        Ok(())
    } else {
        Err(MetadataError::Refused {
            command: "SETMETADATA",
            text: done.text,
        })
    }
}

/// SETMETADATA one entry: `Ok(Some(max))` when refused for size.
async fn set(
    conn: &mut ImapConnection,
    mailbox: &str,
    name: &str,
    value: Option<&str>,
) -> Result<Option<u32>, MetadataError> {
    let value = match value {
        Some(v) => {
            NString::try_from(v.to_owned()).map_err(|e| MetadataError::Command(e.to_string()))?
        }
        None => NString(None),
    };
    let body = CommandBody::SetMetadata {
        mailbox: mailbox_arg(mailbox)?,
        entry_values: Vec1::from(EntryValue {
            entry: entry(name)?,
            value: NString8::NString(value),
        }),
    };
    let done = conn.execute(body, |_| {}).await?;
    if done.is_ok() {
        return Ok(None);
    }
    if let Some(Code::Metadata(MetadataCode::MaxSize(max))) = done.code {
        return Ok(Some(max));
    }
    Err(MetadataError::Refused {
        command: "SETMETADATA",
        text: done.text,
    })
}
