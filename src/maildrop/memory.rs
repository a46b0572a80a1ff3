//! An in-memory mailbox store for the driver's unit tests: users with passwords and
//! messages, failure injection, and a log of every call.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::{Credential, Maildrop, MaildropError, Mailstore, MessageEntry, Snapshot};
use crate::uidl::map::UidlMap;

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
        credential: Credential<'_>,
    ) -> impl Future<Output = Result<MemoryMaildrop, MaildropError>> + Send {
        let r = match credential {
            Credential::Password(password) => self.login_now(user, password),
            // A token is a password of the form `token:<password>` here.
            Credential::Bearer(token) => match token.strip_prefix("token:") {
                Some(password) => self.login_now(user, password),
                None => Err(MaildropError::Auth),
            },
        };
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
                others: None,
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
