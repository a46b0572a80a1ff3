//! The maildrop as the POP3 session sees it: a fixed snapshot taken at login, byte ranges of
//! messages, and one commit of deletions at QUIT. `ImapMaildrop` (in `imap`) is the real one;
//! `MemoryMaildrop` here serves unit tests of the session driver.

use std::future::Future;
use std::sync::Arc;

use crate::uidl::map::UidlMap;
use crate::uidl::UidlFormat;

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
    /// UIDLs migrated from a legacy POP3 server (`popbridge migrate`), when this maildrop has
    /// a map for `uid_validity`; mapped messages are served with their legacy UIDL.
    pub legacy: Option<Arc<UidlMap>>,
}

impl Snapshot {
    /// The UIDL message `uid` is shown with: its legacy UIDL when migrated, else `format`'s
    /// (escaped when it would equal a legacy UIDL; see [`UidlMap::serve`]).
    pub fn uidl(&self, uid: u32, format: &UidlFormat) -> String {
        match &self.legacy {
            Some(map) => map.serve(uid, self.uid_validity, format).into_string(),
            None => format.format(uid, self.uid_validity),
        }
    }
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

impl MaildropError {
    /// The `result` label of `popbridge_logins_total` for a login that failed so (one of
    /// [`crate::metrics::LOGIN_RESULTS`], with `ok`).
    pub fn login_label(&self) -> &'static str {
        match self {
            MaildropError::Auth => "bad_credentials",
            MaildropError::Unavailable(_) | MaildropError::Gone => "upstream_unavailable",
            MaildropError::Unsupported(_) => "refused",
            MaildropError::InUse => "in_use",
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
        password: &str,
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
    fn read_ahead_hint(&mut self, _upcoming: &[(u32, u64)]) {}
}

/// A part of a message read by [`Maildrop::read_body`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyPart {
    pub data: Bytes,
    /// Nothing of the message follows this part.
    pub last: bool,
}

/// One recorded call on a [`MemoryMaildrop`], for assertions in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryEvent {
    Login(String),
    Fetch { uid: u32, offset: u64, len: u32 },
    MarkSeen(u32),
    Commit(Vec<u32>),
    Close,
}

#[derive(Debug, Default)]
struct MemoryUser {
    password: String,
    uid_validity: u32,
    messages: std::collections::BTreeMap<u32, Bytes>,
    /// Fetches at or beyond this offset of this UID fail with this error.
    fail_fetch: Option<(u32, u64, MaildropError)>,
    fail_commit: Option<MaildropError>,
    legacy: Option<Arc<UidlMap>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    users: std::collections::HashMap<String, MemoryUser>,
    login_error: Option<MaildropError>,
    events: Vec<(String, MemoryEvent)>,
}

type Shared = std::sync::Arc<std::sync::Mutex<MemoryState>>;

fn locked(s: &Shared) -> std::sync::MutexGuard<'_, MemoryState> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An in-memory mailbox store for driver tests: users with passwords and messages, failure
/// injection, and a log of every call.
#[derive(Debug, Clone, Default)]
pub struct MemoryUpstream {
    state: Shared,
}

impl MemoryUpstream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_user(&self, user: &str, password: &str, uid_validity: u32) {
        locked(&self.state).users.insert(
            user.to_owned(),
            MemoryUser {
                password: password.to_owned(),
                uid_validity,
                ..MemoryUser::default()
            },
        );
    }

    /// Adds (or replaces) message `uid`; no-op for an unknown user.
    pub fn add_message(&self, user: &str, uid: u32, body: impl Into<Bytes>) {
        if let Some(u) = locked(&self.state).users.get_mut(user) {
            u.messages.insert(uid, body.into());
        }
    }

    /// Gives `user` a migrated legacy UIDL map (served from the next snapshot on).
    pub fn set_legacy_map(&self, user: &str, map: UidlMap) {
        if let Some(u) = locked(&self.state).users.get_mut(user) {
            u.legacy = Some(Arc::new(map));
        }
    }

    /// Removes a message as another client's EXPUNGE would: later fetches say `Gone`.
    pub fn expunge(&self, user: &str, uid: u32) {
        if let Some(u) = locked(&self.state).users.get_mut(user) {
            u.messages.remove(&uid);
        }
    }

    /// Every later login fails with this error (`None` restores normal logins).
    pub fn fail_logins(&self, e: Option<MaildropError>) {
        locked(&self.state).login_error = e;
    }

    /// Fetches of `uid` at `offset` or later fail with `e`.
    pub fn fail_fetch_from(&self, user: &str, uid: u32, offset: u64, e: MaildropError) {
        if let Some(u) = locked(&self.state).users.get_mut(user) {
            u.fail_fetch = Some((uid, offset, e));
        }
    }

    /// The next commits for `user` fail with `e` (and delete nothing).
    pub fn fail_commit(&self, user: &str, e: MaildropError) {
        if let Some(u) = locked(&self.state).users.get_mut(user) {
            u.fail_commit = Some(e);
        }
    }

    /// Calls recorded for `user`, in order.
    pub fn events(&self, user: &str) -> Vec<MemoryEvent> {
        locked(&self.state)
            .events
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn commits(&self, user: &str) -> Vec<Vec<u32>> {
        self.events(user)
            .into_iter()
            .filter_map(|e| match e {
                MemoryEvent::Commit(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    pub fn seen(&self, user: &str) -> Vec<u32> {
        self.events(user)
            .into_iter()
            .filter_map(|e| match e {
                MemoryEvent::MarkSeen(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    /// UIDs currently stored for `user`.
    pub fn uids(&self, user: &str) -> Vec<u32> {
        locked(&self.state)
            .users
            .get(user)
            .map(|u| u.messages.keys().copied().collect())
            .unwrap_or_default()
    }

    fn login_now(&self, user: &str, password: &str) -> Result<MemoryMaildrop, MaildropError> {
        let mut st = locked(&self.state);
        st.events
            .push((user.to_owned(), MemoryEvent::Login(user.to_owned())));
        if let Some(e) = &st.login_error {
            return Err(e.clone());
        }
        let u = st.users.get(user).ok_or(MaildropError::Auth)?;
        if u.password != password {
            return Err(MaildropError::Auth);
        }
        Ok(MemoryMaildrop {
            user: user.to_owned(),
            state: std::sync::Arc::clone(&self.state),
        })
    }
}

impl Mailstore for MemoryUpstream {
    type Maildrop = MemoryMaildrop;

    fn login(
        &self,
        user: &str,
        password: &str,
    ) -> impl Future<Output = Result<MemoryMaildrop, MaildropError>> + Send {
        let r = self.login_now(user, password);
        async move { r }
    }
}

/// A session's view of one [`MemoryUpstream`] user. Commit deletes the messages.
#[derive(Debug)]
pub struct MemoryMaildrop {
    user: String,
    state: Shared,
}

impl MemoryMaildrop {
    fn record(&self, st: &mut MemoryState, e: MemoryEvent) {
        st.events.push((self.user.clone(), e));
    }

    fn fetch_now(&self, uid: u32, offset: u64, len: u32) -> Result<Bytes, MaildropError> {
        let mut st = locked(&self.state);
        self.record(&mut st, MemoryEvent::Fetch { uid, offset, len });
        let u = st.users.get(&self.user).ok_or(MaildropError::Gone)?;
        if let Some((f_uid, f_off, e)) = &u.fail_fetch {
            if *f_uid == uid && offset >= *f_off {
                return Err(e.clone());
            }
        }
        let body = u.messages.get(&uid).ok_or(MaildropError::Gone)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(body.len());
        let end = start.saturating_add(len as usize).min(body.len());
        Ok(body.slice(start..end))
    }
}

impl Maildrop for MemoryMaildrop {
    fn snapshot(&mut self) -> impl Future<Output = Result<Snapshot, MaildropError>> + Send {
        let st = locked(&self.state);
        let r = st
            .users
            .get(&self.user)
            .map(|u| Snapshot {
                uid_validity: u.uid_validity,
                messages: u
                    .messages
                    .iter()
                    .map(|(&uid, b)| MessageEntry {
                        uid,
                        size: b.len() as u64,
                    })
                    .collect(),
                legacy: u.legacy.clone(),
            })
            .ok_or(MaildropError::Auth);
        async move { r }
    }

    fn fetch(
        &mut self,
        uid: u32,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, MaildropError>> + Send {
        let r = self.fetch_now(uid, offset, len);
        async move { r }
    }

    fn mark_seen(&mut self, uid: u32) -> impl Future<Output = Result<(), MaildropError>> + Send {
        let mut st = locked(&self.state);
        self.record(&mut st, MemoryEvent::MarkSeen(uid));
        async { Ok(()) }
    }

    fn commit(&mut self, uids: &[u32]) -> impl Future<Output = Result<(), MaildropError>> + Send {
        let mut st = locked(&self.state);
        self.record(&mut st, MemoryEvent::Commit(uids.to_vec()));
        let r = match st.users.get_mut(&self.user) {
            Some(MemoryUser {
                fail_commit: Some(e),
                ..
            }) => Err(e.clone()),
            Some(u) => {
                for uid in uids {
                    u.messages.remove(uid);
                }
                Ok(())
            }
            None => Err(MaildropError::Gone),
        };
        async { r }
    }

    fn close(self) -> impl Future<Output = ()> + Send {
        let mut st = locked(&self.state);
        self.record(&mut st, MemoryEvent::Close);
        async {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_labels_are_the_preinitialised_ones() {
        for e in [
            MaildropError::Auth,
            MaildropError::InUse,
            MaildropError::Gone,
            MaildropError::Unsupported(String::new()),
            MaildropError::Unavailable(String::new()),
        ] {
            assert!(
                crate::metrics::LOGIN_RESULTS.contains(&e.login_label()),
                "{e:?}"
            );
        }
        assert!(crate::metrics::LOGIN_RESULTS.contains(&"ok"));
    }
}
