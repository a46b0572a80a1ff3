//! RFC 1939 exclusive access within this process: one POP3 session per maildrop, whatever
//! backend name or route reached it (the lock is keyed by [`MaildropKey`], as the maildrop's
//! cache entries are).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::maildrop::MaildropKey;

/// The maildrops held by a session of this process.
#[derive(Debug, Clone, Default)]
pub struct MaildropLocks {
    held: Arc<Mutex<HashSet<MaildropKey>>>,
}

impl MaildropLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// The lock of `maildrop`, or `None` if another session holds it.
    pub fn try_lock(&self, maildrop: &MaildropKey) -> Option<MaildropLock> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.insert(maildrop.clone()) {
            Some(MaildropLock {
                key: maildrop.clone(),
                held: Arc::clone(&self.held),
            })
        } else {
            None
        }
    }

    pub fn is_locked(&self, maildrop: &MaildropKey) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(maildrop)
    }
}

/// Held for the life of a TRANSACTION; released on drop.
#[derive(Debug)]
pub struct MaildropLock {
    key: MaildropKey,
    held: Arc<Mutex<HashSet<MaildropKey>>>,
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}
