//! RFC 1939 exclusive access within this process: one POP3 session per maildrop.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

/// One POP3 session per maildrop (RFC 1939 exclusive access), within this process. Keys are
/// lower-cased login names (for a routed backend other than `[imap]`: the backend name, a line
/// feed, and the login sent upstream, so the same name on two backends is two maildrops).
#[derive(Debug, Clone, Default)]
pub struct MaildropLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

impl MaildropLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// The lock for `user`, or `None` if another session holds it.
    pub fn try_lock(&self, user: &str) -> Option<MaildropLock> {
        let key = user.to_lowercase();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.insert(key.clone()) {
            Some(MaildropLock {
                key,
                held: Arc::clone(&self.held),
            })
        } else {
            None
        }
    }

    pub fn is_locked(&self, user: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&user.to_lowercase())
    }
}

/// Held for the life of a TRANSACTION; released on drop.
#[derive(Debug)]
pub struct MaildropLock {
    key: String,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}
