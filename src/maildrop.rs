//! The maildrop as the POP3 session sees it: a fixed snapshot taken at login, byte ranges of
//! messages, and one commit of deletions at QUIT. `ImapMaildrop` (in `imap`) is the real one;
//! `MemoryMaildrop` here serves unit tests of the session driver.

use std::future::Future;

use bytes::Bytes;

/// One message of the snapshot: its upstream UID and its size in octets (CRLF line ends,
/// before dot-stuffing) as `LIST` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageEntry {
    pub uid: u32,
    pub size: u64,
}

/// The mailbox as it stood at login. Message number n (1-based) is `messages[n - 1]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub uid_validity: u32,
    pub messages: Vec<MessageEntry>,
}

/// Why the upstream could not do what the session asked. Each maps onto one RFC 3206 code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MaildropError {
    /// The upstream rejected the credentials: `-ERR [AUTH]`.
    #[error("authentication failed")]
    Auth,
    /// The upstream is down, timed out or failed: `-ERR [SYS/TEMP]`.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The upstream cannot do what the configuration requires (missing capability, read-only
    /// mailbox): `-ERR [SYS/PERM]`.
    #[error("upstream cannot serve this maildrop: {0}")]
    Unsupported(String),
    /// Another session of this process holds the maildrop: `-ERR [IN-USE]`.
    #[error("maildrop already in use")]
    InUse,
    /// The message was expunged by another client after the snapshot was taken.
    #[error("message no longer exists upstream")]
    Gone,
}

/// An open, authenticated maildrop. One per POP3 session.
pub trait Maildrop: Send {
    /// Up to `len` octets of message `uid` starting at `offset`. An empty result means the end of
    /// the message; [`MaildropError::Gone`] means the message was expunged upstream.
    fn fetch(
        &mut self,
        uid: u32,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, MaildropError>> + Send;

    /// Flag the message as read upstream (after a complete RETR, when `mark_seen` is on).
    fn mark_seen(&mut self, uid: u32) -> impl Future<Output = Result<(), MaildropError>> + Send;

    /// Apply the deletion policy to these UIDs. Called once, only after a client's QUIT.
    fn commit(&mut self, uids: &[u32]) -> impl Future<Output = Result<(), MaildropError>> + Send;

    /// Close the upstream connection politely (best effort).
    fn close(self) -> impl Future<Output = ()> + Send;
}
