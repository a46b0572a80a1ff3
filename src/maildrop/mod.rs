//! The maildrop as the POP3 session sees it: a fixed snapshot taken at login, byte ranges of
//! messages, and one commit of deletions at QUIT. [`imap::ImapMaildrop`] is the real one;
//! [`memory::MemoryMaildrop`] serves unit tests of the session driver.

pub mod imap;
pub mod key;
pub mod memory;

pub use key::MaildropKey;

use std::future::Future;
use std::sync::Arc;

use crate::uidl::folders::OtherUidls;
use crate::uidl::map::UidlMap;
use crate::uidl::moved::Origin;
use crate::uidl::UidlFormat;

use bytes::Bytes;

/// One message of the snapshot: its upstream UID (a handle standing for folder and UID for
/// messages of a several-folder maildrop's later folders, see [`crate::uidl::folders`]) and its size in octets (CRLF line ends,
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
    /// UIDLs migrated from a legacy POP3 server (`popbridge migrate`), when this maildrop has
    /// a map for `uid_validity`; mapped messages are served with their legacy UIDL.
    pub legacy: Option<Arc<UidlMap>>,
    /// With several folders: the UIDLs of the messages of the folders after the first.
    pub others: Option<Arc<OtherUidls>>,
}

impl Snapshot {
    /// The UIDL message `uid` is shown with: its legacy UIDL when migrated, else `format`'s
    /// (escaped when it would equal a legacy UIDL; see [`UidlMap::serve`]).
    pub fn uidl(&self, uid: u32, format: &UidlFormat) -> String {
        let mut uid = uid;
        if let Some(others) = &self.others {
            // A message moved between folders, served as where it was first listed.
            match others.pinned(uid) {
                Some(Origin::Other(uidl)) => return uidl.clone(),
                Some(Origin::First { uid: first, .. }) => uid = *first,
                None => {
                    if let Some(uidl) = others.get(uid) {
                        return uidl.to_owned();
                    }
                }
            }
        }
        match &self.legacy {
            Some(map) => map.serve(uid, self.uid_validity, format).into_string(),
            None => format.format(uid, self.uid_validity),
        }
    }
}

/// Why the upstream could not do what the session asked. Each maps onto one RFC 3206 code.
#[derive(Debug, thiserror::Error, Clone)]
pub enum MaildropError {
    /// The upstream rejected the credentials: `-ERR [AUTH]`.
    #[error("authentication failed")]
    Auth,
    /// The user's OAuth grant was revoked or has expired (or was never given): `-ERR [AUTH]`
    /// saying to authorize again.
    #[error("the OAuth grant is revoked, expired or missing")]
    Reauthorize,
    /// The upstream is down, timed out or failed: `-ERR [SYS/TEMP]`. `source` says why
    /// (shown whole by [`crate::errors::Chain`]).
    #[error("upstream unavailable: {context}")]
    Unavailable {
        context: String,
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
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
    /// The upstream is under pressure or busy (an RFC 5530 code such as `THROTTLED`,
    /// `LIMIT`, `INUSE`, `UNAVAILABLE`), or popbridge's own LOGIN-DELAY or backoff answered
    /// for it: try again later. Never a credentials problem: no `[AUTH]`, no login penalty.
    #[error("upstream busy ({}): {context}", signal.label())]
    Busy { signal: Signal, context: String },
}

/// Why an upstream (or popbridge on its behalf) asks a client to come back later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Too many logins or commands for this user (`THROTTLED`): `-ERR [LOGIN-DELAY]`; the
    /// user backs off.
    Throttled,
    /// A per-user limit, such as connections (`LIMIT`): `-ERR [IN-USE]`; the user backs off.
    Limit,
    /// The mailbox is locked by another process upstream (`INUSE`): `-ERR [IN-USE]`.
    InUse,
    /// The server or a subsystem is down or overloaded (`UNAVAILABLE`): `-ERR [SYS/TEMP]`;
    /// the whole backend backs off.
    Unavailable,
    /// popbridge's own RFC 2449 LOGIN-DELAY: this user logged in too recently.
    LoginDelay,
}

/// What a [`Signal`] makes wait: one user of a backend, or the whole backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Backend,
}

impl Signal {
    /// The `code` label of `popbridge_upstream_pressure_total` (one of
    /// [`crate::metrics::PRESSURE_CODES`]), and the log name.
    pub fn label(self) -> &'static str {
        match self {
            Signal::Throttled => "throttled",
            Signal::Limit => "limit",
            Signal::InUse => "inuse",
            Signal::Unavailable => "unavailable",
            Signal::LoginDelay => "login_delay",
        }
    }

    /// What backs off after an upstream sent this, if anything.
    pub fn backoff(self) -> Option<Scope> {
        match self {
            Signal::Throttled | Signal::Limit => Some(Scope::User),
            Signal::Unavailable => Some(Scope::Backend),
            Signal::InUse | Signal::LoginDelay => None,
        }
    }
}

impl PartialEq for MaildropError {
    /// The same kind and text; causes are not compared.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                MaildropError::Unavailable { context: a, .. },
                MaildropError::Unavailable { context: b, .. },
            ) => a == b,
            (MaildropError::Unsupported(a), MaildropError::Unsupported(b)) => a == b,
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

impl Eq for MaildropError {}

impl MaildropError {
    /// [`MaildropError::Unavailable`] with nothing behind it.
    pub fn unavailable(context: impl Into<String>) -> MaildropError {
        MaildropError::Unavailable {
            context: context.into(),
            source: None,
        }
    }

    /// [`MaildropError::Busy`] for `signal`.
    pub fn busy(signal: Signal, context: impl Into<String>) -> MaildropError {
        MaildropError::Busy {
            signal,
            context: context.into(),
        }
    }

    /// [`MaildropError::Unavailable`] because of `source`.
    pub fn unavailable_by(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> MaildropError {
        MaildropError::Unavailable {
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The `result` label of `popbridge_logins_total` for a login that failed so (one of
    /// [`crate::metrics::LOGIN_RESULTS`], with `ok`).
    pub fn login_label(&self) -> &'static str {
        match self {
            MaildropError::Auth | MaildropError::Reauthorize => "bad_credentials",
            MaildropError::Unavailable { .. } | MaildropError::Gone => "upstream_unavailable",
            MaildropError::Unsupported(_) => "refused",
            MaildropError::InUse => "in_use",
            MaildropError::Busy {
                signal: Signal::LoginDelay,
                ..
            } => "login_delay",
            MaildropError::Busy { .. } => "upstream_busy",
        }
    }
}

/// What a client proves itself with, as a store sees it.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// USER/PASS or AUTH PLAIN.
    Password(&'a str),
    /// An OAuth 2.0 bearer token the client brought (AUTH XOAUTH2, OAUTHBEARER).
    Bearer(&'a str),
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Password(_) => f.write_str("Password(<redacted>)"),
            Credential::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// A mailbox store users log in to (an IMAP backend in production, memory in tests).
pub trait Mailstore: Send + Sync {
    type Maildrop: Maildrop;

    /// Authenticate and open the maildrop, without listing it yet (see
    /// [`Maildrop::snapshot`]).
    fn login(
        &self,
        user: &str,
        credential: Credential<'_>,
    ) -> impl Future<Output = Result<Self::Maildrop, MaildropError>> + Send;
}

/// An open, authenticated maildrop. One per POP3 session.
pub trait Maildrop: Send {
    /// The mailbox as it stands now: message numbers, sizes and UIDLs for the whole session.
    /// Taken only once the session holds the maildrop lock, so a session that just committed
    /// deletions and released it can never be listed from before its commit.
    fn snapshot(&mut self) -> impl Future<Output = Result<Snapshot, MaildropError>> + Send;

    /// Up to `len` octets of message `uid` starting at `offset`. An empty result means the end of
    /// the message; [`MaildropError::Gone`] means the message was expunged upstream.
    fn fetch(
        &mut self,
        uid: u32,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, MaildropError>> + Send;

    /// Part of message `uid` (`size` octets in the snapshot) from `offset` for RETR, which reads
    /// a message front to back: at most `max` octets, and [`BodyPart::last`] set on the part
    /// that ends the message. A maildrop may stream the message here instead of fetching it
    /// in pieces; the default asks [`fetch`](Self::fetch).
    fn read_body(
        &mut self,
        uid: u32,
        size: u64,
        offset: u64,
        max: u32,
    ) -> impl Future<Output = Result<BodyPart, MaildropError>> + Send {
        let _ = size;
        async move {
            let data = self.fetch(uid, offset, max).await?;
            let last = data.len() < max as usize;
            Ok(BodyPart { data, last })
        }
    }

    /// Flag the message as read upstream (after a complete RETR, when `mark_seen` is on).
    fn mark_seen(&mut self, uid: u32) -> impl Future<Output = Result<(), MaildropError>> + Send;

    /// Apply the deletion policy to these UIDs. Called once, only after a client's QUIT.
    fn commit(&mut self, uids: &[u32]) -> impl Future<Output = Result<(), MaildropError>> + Send;

    /// Close the upstream connection politely (best effort).
    fn close(self) -> impl Future<Output = ()> + Send;

    /// A RETR of `uid` completed: a hook for bookkeeping (repeated-download metrics).
    fn retrieved(&mut self, _uid: u32) {}

    /// The messages (UID, size) the client will probably ask for after the one about to be
    /// fetched; a maildrop may fetch small ones ahead in the same round trip.
    fn read_ahead_hint(&mut self, _upcoming: Vec<(u32, u64)>) {}

    /// How many listed octets of the following messages the hint should cover (beyond the
    /// minimum count of messages the caller always gives): a maildrop
    /// that reads ahead by the bandwidth-delay product of a distant server plans its FETCHes
    /// further ahead than a few hundred small messages.
    fn read_ahead_octets(&self) -> u64 {
        0
    }
}

/// A part of a message read by [`Maildrop::read_body`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyPart {
    pub data: Bytes,
    /// Nothing of the message follows this part.
    pub last: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_messages_are_served_as_first_listed() {
        let junk_uidl = "000000076b080e83~eb20faab";
        let mut others = OtherUidls::new(vec![junk_uidl.into(), "00000009x~t".into()]);
        let mut pins = std::collections::HashMap::new();
        // INBOX's UID 5 was first listed in Junk; Junk's second was INBOX's UID 2.
        pins.insert(5, Origin::Other("00000003x~t".into()));
        pins.insert(
            u32::MAX - 1,
            Origin::First {
                uid_validity: 0x6b08_0e83,
                uid: 2,
            },
        );
        others.pin(pins);
        let snap = Snapshot {
            uid_validity: 0x6b08_0e83,
            messages: Vec::new(),
            legacy: None,
            others: Some(Arc::new(others)),
        };
        let f = UidlFormat::default();
        assert_eq!(snap.uidl(1, &f), f.format(1, 0x6b08_0e83));
        assert_eq!(snap.uidl(5, &f), "00000003x~t");
        assert_eq!(snap.uidl(u32::MAX, &f), junk_uidl);
        assert_eq!(snap.uidl(u32::MAX - 1, &f), f.format(2, 0x6b08_0e83));
    }

    #[test]
    fn login_labels_are_the_preinitialised_ones() {
        for e in [
            MaildropError::Auth,
            MaildropError::InUse,
            MaildropError::Gone,
            MaildropError::Unsupported(String::new()),
            MaildropError::unavailable(""),
            MaildropError::busy(Signal::Throttled, ""),
            MaildropError::busy(Signal::LoginDelay, ""),
        ] {
            assert!(
                crate::metrics::LOGIN_RESULTS.contains(&e.login_label()),
                "{e:?}"
            );
        }
        assert!(crate::metrics::LOGIN_RESULTS.contains(&"ok"));
    }
}
