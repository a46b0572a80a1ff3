//! The shared copy of a legacy UIDL map in IMAP METADATA (RFC 5464), private to the user, on
//! the maildrop folder: every popbridge instance reads the same map, whichever instance ran
//! `popbridge migrate`. Layout (see [`crate::migrate::map`]): the head at
//! [`METADATA_ENTRY`], chunks at `<ENTRY>/0`, `<ENTRY>/1`, ...

use std::borrow::Cow;

use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::{AString, NString, NString8, Vec1};
use imap_next::imap_types::extensions::metadata::{
    Entry, EntryValue, MetadataCode, MetadataResponse,
};
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data};

use super::conn::{ImapConnection, ImapError, Untagged};
use crate::migrate::map::{MapError, UidlMap, METADATA_ENTRY};

/// Chunks requested per GETMETADATA command.
const CHUNKS_PER_COMMAND: usize = 32;
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

fn chunk_name(i: usize) -> String {
    format!("{METADATA_ENTRY}/{i}")
}

fn mailbox_arg(name: &str) -> Result<Mailbox<'static>, MetadataError> {
    Mailbox::try_from(name.to_owned()).map_err(|e| MetadataError::Command(e.to_string()))
}

/// Values of `names` on `mailbox` (absent or NIL entries are missing from the result).
async fn get(
    conn: &mut ImapConnection,
    mailbox: &str,
    names: &[String],
) -> Result<Vec<(String, Vec<u8>)>, MetadataError> {
    let entries = names
        .iter()
        .map(|n| entry(n))
        .collect::<Result<Vec<_>, _>>()?;
    let entries: Vec1<Entry<'static>> =
        Vec1::try_from(entries).map_err(|_| MetadataError::Command("no entries".into()))?;
    let body = CommandBody::GetMetadata {
        options: Vec::new(),
        mailbox: mailbox_arg(mailbox)?,
        entries,
    };
    let mut found = Vec::new();
    let done = conn
        .execute(body, |u| {
            if let Untagged::Data(Data::Metadata {
                items: MetadataResponse::WithValues(values),
                ..
            }) = u
            {
                for EntryValue { entry, value } in values.into_inner() {
                    let bytes: Option<Cow<[u8]>> = match value {
                        NString8::NString(n) => n.into_option(),
                        NString8::Literal8(l) => Some(l.data),
                    };
                    if let Some(bytes) = bytes {
                        let name = String::from_utf8_lossy(entry.as_ref()).into_owned();
                        found.push((name, bytes.into_owned()));
                    }
                }
            }
        })
        .await?;
    if !done.is_ok() {
        return Err(MetadataError::Refused {
            command: "GETMETADATA",
            text: done.text,
        });
    }
    Ok(found)
}

/// The map stored on `mailbox`, if any.
pub async fn read_map(
    conn: &mut ImapConnection,
    mailbox: &str,
) -> Result<Option<UidlMap>, MetadataError> {
    let head = get(conn, mailbox, &[METADATA_ENTRY.to_owned()]).await?;
    let Some((_, head)) = head
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(METADATA_ENTRY))
    else {
        return Ok(None);
    };
    let head =
        String::from_utf8(head).map_err(|_| MapError::Malformed("head is not UTF-8".into()))?;
    let count = UidlMap::metadata_chunk_count(&head)?;
    let mut chunks: Vec<String> = Vec::with_capacity(count);
    let names: Vec<String> = (0..count).map(chunk_name).collect();
    for batch in names.chunks(CHUNKS_PER_COMMAND) {
        let values = get(conn, mailbox, batch).await?;
        for name in batch {
            let value = values
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .ok_or_else(|| MapError::Malformed(format!("chunk {name} is missing")))?;
            let text = String::from_utf8(value.1.clone())
                .map_err(|_| MapError::Malformed(format!("chunk {name} is not UTF-8")))?;
            chunks.push(text);
        }
    }
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    Ok(Some(UidlMap::from_metadata(&head, &refs)?))
}

/// Store `map` on `mailbox`: the chunks first, the head last (so a reader never sees a head
/// without its chunks). A server that answers `[METADATA MAXSIZE n]` gets chunks of `n`.
pub async fn write_map(
    conn: &mut ImapConnection,
    mailbox: &str,
    map: &UidlMap,
    chunk_bytes: usize,
) -> Result<(), MetadataError> {
    let mut chunk_bytes = chunk_bytes.max(MIN_CHUNK_BYTES);
    'attempt: loop {
        let (head, chunks) = map.to_metadata(chunk_bytes);
        for (i, chunk) in chunks.iter().enumerate() {
            match set(conn, mailbox, &chunk_name(i), chunk).await? {
                None => {}
                Some(max) if (max as usize) < chunk_bytes && max as usize >= MIN_CHUNK_BYTES => {
                    chunk_bytes = max as usize;
                    continue 'attempt;
                }
                Some(max) => return Err(MetadataError::TooSmall(max)),
            }
        }
        return match set(conn, mailbox, METADATA_ENTRY, &head).await? {
            None => Ok(()),
            Some(max) => Err(MetadataError::TooSmall(max)),
        };
    }
}

/// SETMETADATA one entry: `Ok(Some(max))` when refused for size.
async fn set(
    conn: &mut ImapConnection,
    mailbox: &str,
    name: &str,
    value: &str,
) -> Result<Option<u32>, MetadataError> {
    let value =
        NString::try_from(value.to_owned()).map_err(|e| MetadataError::Command(e.to_string()))?;
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
