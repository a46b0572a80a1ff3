//! The new IMAP mailbox as `popbridge migrate` sees it: logged in with the user's password or
//! the backend's master user (AUTHENTICATE PLAIN, SASL-IR, the user as authorization
//! identity), the maildrop folder examined read-only, sizes and headers fetched in batches,
//! and the legacy UIDL map read from and written to METADATA.

use std::collections::HashSet;
use std::time::Duration;

use imap_next::imap_types::auth::AuthMechanism;
use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::Vec1;
use imap_next::imap_types::fetch::{MessageDataItem, MessageDataItemName, Section};
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data};
use imap_next::imap_types::search::SearchKey;
use imap_next::imap_types::sequence::SequenceSet;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::matcher::NewMessage;
use super::Credential;
use crate::config::{ImapConfig, Security};
use crate::imap::conn::{ConnLimits, ImapConnection, ImapError, Transport, Untagged};
use crate::imap::metadata::{self, MetadataError};
use crate::uidl::map::{MapHead, UidlMap};

/// UIDs per FETCH command.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("IMAP: {0}")]
    Imap(#[from] ImapError),
    #[error("IMAP login refused: {0}")]
    Login(String),
    #[error("IMAP {command} failed: {text}")]
    Failed { command: &'static str, text: String },
    #[error("IMAP setup: {0}")]
    Setup(String),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

pub struct Store {
    conn: ImapConnection,
    pub mailbox: String,
    pub uid_validity: u32,
    /// UIDNEXT at EXAMINE, when reported: bounds the entries of a map read from METADATA.
    pub uid_next: Option<u32>,
    pub has_metadata: bool,
    /// The user's key in the local state (see [`crate::state::state_prefix`]).
    pub state_key: String,
}

fn failed(command: &'static str, text: String) -> StoreError {
    StoreError::Failed { command, text }
}

impl Store {
    pub async fn open(
        imap: &ImapConfig,
        user: &str,
        cred: &Credential,
    ) -> Result<Store, StoreError> {
        let limits = ConnLimits {
            connect_timeout: Duration::from_secs(imap.connect_timeout_secs),
            io_timeout: Duration::from_secs(imap.command_timeout_secs),
            max_response_size: 64 << 20,
        };
        let tls = match imap.security {
            Security::None => None,
            _ => {
                let config = crate::imap::tls::client_config(imap.ca_file.as_deref())
                    .map_err(|e| StoreError::Setup(e.to_string()))?;
                let name = imap.tls_server_name.as_deref().unwrap_or(&imap.host);
                let name = ServerName::try_from(name.to_owned())
                    .map_err(|_| StoreError::Setup(format!("bad TLS server name {name:?}")))?;
                Some((TlsConnector::from(config), name))
            }
        };
        let transport = match (&tls, imap.security) {
            (Some((c, n)), Security::Tls) => Transport::Tls {
                connector: c,
                name: n.clone(),
            },
            (Some((c, n)), Security::Starttls) => Transport::StartTls {
                connector: c,
                name: n.clone(),
            },
            _ => Transport::Plain,
        };
        let mut conn = ImapConnection::connect(&imap.host, imap.port(), transport, limits).await?;
        let login = match cred {
            Credential::Password(pw) => CommandBody::login(user.to_owned(), pw.clone())
                .map_err(|_| StoreError::Login("user name or password not sendable".into()))?,
            Credential::Master { user: m, password } => CommandBody::authenticate_with_ir(
                AuthMechanism::Plain,
                sasl_plain(user, m, password)?,
            ),
        };
        let done = conn.execute(login, |_| {}).await?;
        if !done.is_ok() {
            conn.logout().await;
            return Err(StoreError::Login(done.text));
        }
        let mut caps = HashSet::new();
        conn.execute(CommandBody::Capability, |u| {
            if let Untagged::Data(Data::Capability(list)) = u {
                caps.extend(
                    list.as_ref()
                        .iter()
                        .map(|c| c.to_string().to_ascii_uppercase()),
                );
            }
        })
        .await?;
        let mailbox = Mailbox::try_from(imap.mailbox.clone())
            .map_err(|e| StoreError::Setup(format!("mailbox {:?}: {e}", imap.mailbox)))?;
        let examine =
            CommandBody::examine(mailbox).map_err(|e| StoreError::Setup(e.to_string()))?;
        let (mut uid_validity, mut uid_next) = (None, None);
        let done = conn
            .execute(examine, |u| match u {
                Untagged::Status {
                    code: Some(Code::UidValidity(v)),
                    ..
                } => uid_validity = Some(v.get()),
                Untagged::Status {
                    code: Some(Code::UidNext(v)),
                    ..
                } => uid_next = Some(v.get()),
                _ => {}
            })
            .await?;
        if !done.is_ok() {
            return Err(failed("EXAMINE", done.text));
        }
        let uid_validity =
            uid_validity.ok_or_else(|| failed("EXAMINE", "no UIDVALIDITY reported".into()))?;
        Ok(Store {
            conn,
            mailbox: imap.mailbox.clone(),
            uid_validity,
            uid_next,
            has_metadata: caps.contains("METADATA"),
            state_key: user.to_owned(),
        })
    }

    /// Every message of the folder with its RFC822.SIZE, in UID order.
    pub async fn messages(&mut self) -> Result<Vec<NewMessage>, StoreError> {
        let mut uids = Vec::new();
        let done = self
            .conn
            .execute(
                CommandBody::search(None, Vec1::from(SearchKey::All), true),
                |u| {
                    if let Untagged::Data(Data::Search(found, ..)) = u {
                        uids.extend(found.iter().map(|u| u.get()));
                    }
                },
            )
            .await?;
        if !done.is_ok() {
            return Err(failed("UID SEARCH", done.text));
        }
        uids.sort_unstable();
        uids.dedup();
        let mut sizes = std::collections::HashMap::new();
        for batch in uids.chunks(BATCH) {
            let body = CommandBody::fetch(
                set(batch)?,
                vec![MessageDataItemName::Uid, MessageDataItemName::Rfc822Size],
                true,
            )
            .map_err(|e| StoreError::Setup(e.to_string()))?;
            let done = self
                .conn
                .execute(body, |u| {
                    if let Some((uid, size)) = u.uid_and_size() {
                        sizes.insert(uid, u64::from(size));
                    }
                })
                .await?;
            if !done.answered_but_expunged() {
                return Err(failed("UID FETCH", done.text));
            }
        }
        Ok(uids
            .into_iter()
            .filter_map(|uid| sizes.get(&uid).map(|&size| NewMessage { uid, size }))
            .collect())
    }

    /// `BODY.PEEK[HEADER]` (or the whole `BODY.PEEK[]` with `whole`) of `uids`, handed to
    /// `each` as every message arrives (a batch of [`BATCH`] headers or 16 whole messages per
    /// command, so at most one answer is in memory); messages expunged meanwhile are skipped.
    pub async fn each_section(
        &mut self,
        uids: &[u32],
        whole: bool,
        mut each: impl FnMut(u32, &[u8]),
    ) -> Result<(), StoreError> {
        let per_command = if whole { 16 } else { BATCH };
        for batch in uids.chunks(per_command) {
            let body = CommandBody::fetch(
                set(batch)?,
                vec![
                    MessageDataItemName::Uid,
                    MessageDataItemName::BodyExt {
                        section: if whole {
                            None
                        } else {
                            Some(Section::Header(None))
                        },
                        partial: None,
                        peek: true,
                    },
                ],
                true,
            )
            .map_err(|e| StoreError::Setup(e.to_string()))?;
            let done = self
                .conn
                .execute(body, |u| {
                    if let Untagged::Data(Data::Fetch { items, .. }) = u {
                        let (mut uid, mut data) = (None, None);
                        for item in items.into_iter() {
                            match item {
                                MessageDataItem::Uid(u) => uid = Some(u.get()),
                                MessageDataItem::BodyExt { data: d, .. } => data = d.into_option(),
                                _ => {}
                            }
                        }
                        // NIL or "": the message went away meanwhile (no message is empty).
                        if let (Some(uid), Some(data)) = (uid, data) {
                            if !data.is_empty() {
                                each(uid, &data);
                            }
                        }
                    }
                })
                .await?;
            if !done.answered_but_expunged() {
                return Err(failed("UID FETCH", done.text));
            }
        }
        Ok(())
    }

    /// The map in METADATA with its head, bounded as [`metadata::read_text`] describes.
    pub async fn read_map(&mut self) -> Result<Option<(MapHead, UidlMap)>, StoreError> {
        Ok(metadata::read_map(&mut self.conn, &self.mailbox, self.uid_next).await?)
    }

    /// Writes `map` to METADATA as a new generation; the head written.
    pub async fn write_map(
        &mut self,
        map: &UidlMap,
        chunk_bytes: usize,
    ) -> Result<MapHead, StoreError> {
        Ok(metadata::write_map(&mut self.conn, &self.mailbox, map, chunk_bytes).await?)
    }

    pub async fn logout(self) {
        self.conn.logout().await;
    }
}

/// The SASL PLAIN message `authzid NUL authcid NUL password` (RFC 4616), refused when a part
/// holds a NUL (it would shift the parts: another user, or a password the server cuts short).
fn sasl_plain(user: &str, master: &str, password: &str) -> Result<Vec<u8>, StoreError> {
    if [user, master, password].iter().any(|s| s.contains('\0')) {
        return Err(StoreError::Login(
            "the user name, master user or master password contains NUL and cannot be sent in AUTHENTICATE PLAIN".into(),
        ));
    }
    Ok(format!("{user}\0{master}\0{password}").into_bytes())
}

fn set(uids: &[u32]) -> Result<SequenceSet, StoreError> {
    let text = uids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    SequenceSet::try_from(text.as_str()).map_err(|e| StoreError::Setup(format!("UID set: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_plain_refuses_nul_in_any_part() {
        assert_eq!(
            sasl_plain("alice", "admin", "pw").unwrap(),
            b"alice\0admin\0pw"
        );
        for (u, m, p) in [
            ("al\0ice", "admin", "pw"),
            ("alice", "ad\0min", "pw"),
            ("alice", "admin", "p\0w"),
        ] {
            let e = sasl_plain(u, m, p).unwrap_err();
            assert!(e.to_string().contains("contains NUL"), "{e}");
        }
    }
}
