//! Local state in sled, treated strictly as a cache: everything that decides what a client sees
//! (UIDs, sizes, hidden flags) lives on the IMAP server, so deleting this directory loses no mail
//! and shows no hidden mail again. Keys are versioned (`v1/...`) so a later layout can live
//! beside this one, and a database that will not open is moved aside and rebuilt, not fatal.
//!
//! It remembers, per user and folder, the UIDVALIDITY last served, so a change (which makes
//! every POP3 client download the whole mailbox again) is logged loudly; message sizes; and the
//! legacy UIDL map of migrated users, a copy of the one kept in IMAP METADATA (so losing this
//! directory changes no UIDL when the server holds the map).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::uidl::map::{MapHead, UidlMap};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open sled database in {path} (is another popbridge using it?): {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot move unreadable state {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the store remembers about one user's maildrop folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxRecord {
    pub uid_validity: u32,
    pub last_seen_unix: u64,
}

pub struct StateStore {
    db: sled::Db,
}

impl StateStore {
    /// Open the database under `dir`, creating it if needed. If it exists but cannot be opened,
    /// it is renamed to `<dir>.broken-<unix time>` with an error log line and a fresh one made.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StateError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        match Self::open_at(dir) {
            Ok(db) => Ok(StateStore { db }),
            // Held by another process (or not ours to touch): moving it aside would pull the
            // directory out from under a running instance.
            Err(sled::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::PermissionDenied
                ) || e.to_string().contains("lock") =>
            {
                Err(StateError::Open {
                    path: dir.to_owned(),
                    source: sled::Error::Io(e),
                })
            }
            Err(first) => {
                let aside = PathBuf::from(format!("{}.broken-{}", dir.display(), unix_now()));
                tracing::error!(
                    dir = %dir.display(),
                    moved_to = %aside.display(),
                    error = %first,
                    "state database unreadable; moving it aside and rebuilding (it is only a cache: no mail is affected)"
                );
                std::fs::rename(dir, &aside).map_err(|source| StateError::MoveAside {
                    path: dir.to_owned(),
                    source,
                })?;
                let db = Self::open_at(dir).map_err(|source| StateError::Open {
                    path: dir.to_owned(),
                    source,
                })?;
                Ok(StateStore { db })
            }
        }
    }

    /// An in-memory store for tests.
    pub fn temporary() -> Result<StateStore, sled::Error> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(StateStore { db })
    }

    fn open_at(dir: &Path) -> Result<sled::Db, sled::Error> {
        sled::Config::new()
            .path(dir)
            // sled's default is 1 GiB; this is a small cache.
            .cache_capacity(64 * 1024 * 1024)
            .open()
    }

    /// Record that `user`'s `mailbox` was served with `uid_validity`; warn and return true
    /// when it changed since the last session. A failure to write is logged and otherwise
    /// ignored: the cache must never block mail.
    pub fn observe_mailbox(&self, user: &str, mailbox: &str, uid_validity: u32) -> bool {
        let key = mailbox_key(user, mailbox);
        let record = MailboxRecord {
            uid_validity,
            last_seen_unix: unix_now(),
        };
        match self.db.insert(&key, encode(record).as_slice()) {
            Ok(Some(old)) => {
                if let Some(old) = decode(&old) {
                    if old.uid_validity != uid_validity {
                        tracing::warn!(
                            user,
                            mailbox,
                            old = old.uid_validity,
                            new = uid_validity,
                            "UIDVALIDITY changed upstream: every UIDL of this maildrop changes and POP3 clients will download all of its mail again"
                        );
                        return true;
                    }
                }
                false
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not update state cache");
                false
            }
        }
    }

    /// UIDs of `user`'s `mailbox` retrieved in earlier sessions under `uid_validity`, sorted;
    /// empty when unknown, damaged, or recorded under another UIDVALIDITY. One read per
    /// login (a read per RETR was a tenth of popbridge's CPU in the concurrency benchmark).
    pub fn retrieved(&self, user: &str, mailbox: &str, uid_validity: u32) -> Vec<u32> {
        self.uid_records(retrieved_key(user, mailbox), uid_validity, 1)
    }

    /// Replace the record of retrieved messages with `uids` (sorted, no duplicates).
    pub fn store_retrieved(&self, user: &str, mailbox: &str, uid_validity: u32, uids: &[u32]) {
        self.store_uid_records(
            retrieved_key(user, mailbox),
            uid_validity,
            uids.iter().copied(),
        );
    }

    /// The words after the UIDVALIDITY head of the blob at `key`, in records of `width`
    /// words led by a UID; empty when absent, recorded under another UIDVALIDITY (then every
    /// UID is another message) or damaged: a length that is not whole records, or records not
    /// in ascending UID order (they are only ever written sorted).
    fn uid_records(&self, key: Vec<u8>, uid_validity: u32, width: usize) -> Vec<u32> {
        let Ok(Some(blob)) = self.db.get(key) else {
            return Vec::new();
        };
        let Some((head, body)) = blob.split_first_chunk::<4>() else {
            return Vec::new();
        };
        if u32::from_be_bytes(*head) != uid_validity || body.len() % (4 * width) != 0 {
            return Vec::new();
        }
        let words: Vec<u32> = body
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let sorted = words
            .iter()
            .step_by(width)
            .zip(words.iter().step_by(width).skip(1))
            .all(|(a, b)| a < b);
        if sorted {
            words
        } else {
            Vec::new()
        }
    }

    fn store_uid_records(&self, key: Vec<u8>, uid_validity: u32, words: impl Iterator<Item = u32>) {
        let mut blob = uid_validity.to_be_bytes().to_vec();
        for w in words {
            blob.extend_from_slice(&w.to_be_bytes());
        }
        if let Err(e) = self.db.insert(key, blob) {
            tracing::warn!(error = %e, "could not update state cache");
        }
    }

    /// Cached message sizes of `user`'s `mailbox` under `uid_validity`, sorted by UID; empty
    /// when unknown or recorded under another UIDVALIDITY (then every UID is another message).
    pub fn sizes(&self, user: &str, mailbox: &str, uid_validity: u32) -> Vec<(u32, u32)> {
        self.uid_records(sizes_key(user, mailbox), uid_validity, 2)
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .collect()
    }

    /// Replace the cached sizes of `user`'s `mailbox` (`sizes` sorted by UID).
    pub fn store_sizes(&self, user: &str, mailbox: &str, uid_validity: u32, sizes: &[(u32, u32)]) {
        let words = sizes.iter().flat_map(|&(uid, size)| [uid, size]);
        self.store_uid_records(sizes_key(user, mailbox), uid_validity, words);
    }

    /// The head of the cached legacy UIDL map of `user`'s `mailbox` (small: read at every
    /// login to compare with the head in METADATA). `None` when absent or damaged.
    pub fn uidl_map_head(&self, user: &str, mailbox: &str) -> Option<MapHead> {
        let blob = self.db.get(uidl_head_key(user, mailbox)).ok()??;
        MapHead::parse(std::str::from_utf8(&blob).ok()?).ok()
    }

    /// The cached legacy UIDL map of `user`'s `mailbox` with its head, whatever its
    /// UIDVALIDITY (the caller compares). Decoding a large map takes a while: `serve` calls this
    /// off the async runtime. `None` when absent or damaged (length or checksum wrong).
    pub fn uidl_map(&self, user: &str, mailbox: &str) -> Option<(MapHead, UidlMap)> {
        let head = self.uidl_map_head(user, mailbox)?;
        let blob = self.db.get(uidl_map_key(user, mailbox)).ok()??;
        let text = std::str::from_utf8(&blob).ok()?;
        match UidlMap::from_text(&head, text) {
            Ok(map) => Some((head, map)),
            Err(e) => {
                tracing::warn!(user, mailbox, error = %e, "cached UIDL map is damaged; ignoring it");
                None
            }
        }
    }

    /// Replace the cached legacy UIDL map of `user`'s `mailbox` (head and entry text, in one
    /// atomic batch), and write it to disk now: `popbridge migrate` exits right after.
    pub fn store_uidl_map(
        &self,
        user: &str,
        mailbox: &str,
        head: &MapHead,
        text: &str,
    ) -> Result<(), sled::Error> {
        self.db.apply_batch(uidl_batch(user, mailbox, head, text))?;
        self.db.flush()?;
        Ok(())
    }

    /// [`StateStore::store_uidl_map`] without waiting for the disk (a session caching what it
    /// read from METADATA: losing it costs one more METADATA read, nothing else).
    pub fn cache_uidl_map(&self, user: &str, mailbox: &str, head: &MapHead, text: &str) {
        if let Err(e) = self.db.apply_batch(uidl_batch(user, mailbox, head, text)) {
            tracing::warn!(error = %e, "could not cache the legacy UIDL map");
        }
    }

    /// Forget the cached legacy UIDL map of `user`'s `mailbox` (METADATA no longer has one).
    pub fn remove_uidl_map(&self, user: &str, mailbox: &str) {
        let mut batch = sled::Batch::default();
        batch.remove(uidl_head_key(user, mailbox));
        batch.remove(uidl_map_key(user, mailbox));
        if let Err(e) = self.db.apply_batch(batch) {
            tracing::warn!(error = %e, "could not drop the cached legacy UIDL map");
        }
    }

    /// What was last recorded for `user`'s `mailbox`.
    pub fn mailbox(&self, user: &str, mailbox: &str) -> Option<MailboxRecord> {
        let value = self.db.get(mailbox_key(user, mailbox)).ok()??;
        decode(&value)
    }

    /// Write everything to disk now (used at shutdown).
    pub fn flush(&self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "could not flush state cache");
        }
    }
}

/// `v1/mbox/<user>\0<mailbox>`: a NUL cannot occur in either part.
fn mailbox_key(user: &str, mailbox: &str) -> Vec<u8> {
    let mut key = b"v1/mbox/".to_vec();
    key.extend_from_slice(user.to_lowercase().as_bytes());
    key.push(0);
    key.extend_from_slice(mailbox.as_bytes());
    key
}

/// `v2/retrieved/<user>\0<mailbox>`: UIDVALIDITY, then the UIDs retrieved, ascending.
fn retrieved_key(user: &str, mailbox: &str) -> Vec<u8> {
    let mut key = b"v2/retrieved/".to_vec();
    key.extend_from_slice(&mailbox_key(user, mailbox)[b"v1/mbox/".len()..]);
    key
}

/// `v1/sizes/<user>\0<mailbox>`: UIDVALIDITY, then (UID, RFC822.SIZE) pairs.
fn sizes_key(user: &str, mailbox: &str) -> Vec<u8> {
    let mut key = b"v1/sizes/".to_vec();
    key.extend_from_slice(&mailbox_key(user, mailbox)[b"v1/mbox/".len()..]);
    key
}

/// `v2/uidlmap/<user>\0<mailbox>`: the map's entry text (see [`crate::uidl::map`]).
fn uidl_map_key(user: &str, mailbox: &str) -> Vec<u8> {
    let mut key = b"v2/uidlmap/".to_vec();
    key.extend_from_slice(&mailbox_key(user, mailbox)[b"v1/mbox/".len()..]);
    key
}

/// `v2/uidlhead/<user>\0<mailbox>`: the map's head line (UIDVALIDITY, count, checksum; the
/// METADATA head it was read from, or a local one).
fn uidl_head_key(user: &str, mailbox: &str) -> Vec<u8> {
    let mut key = b"v2/uidlhead/".to_vec();
    key.extend_from_slice(&mailbox_key(user, mailbox)[b"v1/mbox/".len()..]);
    key
}

fn uidl_batch(user: &str, mailbox: &str, head: &MapHead, text: &str) -> sled::Batch {
    let mut batch = sled::Batch::default();
    batch.insert(uidl_head_key(user, mailbox), head.to_string().into_bytes());
    batch.insert(uidl_map_key(user, mailbox), text.as_bytes());
    batch
}

fn encode(r: MailboxRecord) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&r.uid_validity.to_be_bytes());
    out[4..].copy_from_slice(&r.last_seen_unix.to_be_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<MailboxRecord> {
    let uid_validity = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    let last_seen_unix = u64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?);
    Some(MailboxRecord {
        uid_validity,
        last_seen_unix,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What goes before a login in the local state's keys for users of backend `name`: nothing
/// for `[imap]` (the keys it always had), `name` and a line feed otherwise, which no POP3 login
/// contains, so the same login on two backends is two maildrops whose caches never mix. The
/// `migrate` commands store UIDL maps under the same keys.
pub fn state_prefix(name: &str) -> String {
    if name == crate::routing::DEFAULT_BACKEND {
        String::new()
    } else {
        format!("{name}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_user_is_case_insensitive() {
        let s = StateStore::temporary().unwrap();
        assert_eq!(s.mailbox("alice", "INBOX"), None);
        s.observe_mailbox("Alice", "INBOX", 42);
        let r = s.mailbox("alice", "INBOX").unwrap();
        assert_eq!(r.uid_validity, 42);
        assert!(r.last_seen_unix > 0);
        assert_eq!(s.mailbox("alice", "Other"), None);
        assert!(!s.observe_mailbox("alice", "INBOX", 42), "unchanged");
        assert!(s.observe_mailbox("alice", "INBOX", 43), "changed");
        assert_eq!(s.mailbox("alice", "INBOX").unwrap().uid_validity, 43);
    }

    #[test]
    fn retrievals_round_trip_per_user_folder_and_uidvalidity() {
        let s = StateStore::temporary().unwrap();
        assert!(s.retrieved("dave", "INBOX", 1).is_empty());
        s.store_retrieved("dave", "INBOX", 1, &[3, 5, 9]);
        assert_eq!(s.retrieved("Dave", "INBOX", 1), vec![3, 5, 9]);
        assert!(
            s.retrieved("dave", "INBOX", 2).is_empty(),
            "new UIDVALIDITY, new messages"
        );
        assert!(s.retrieved("erin", "INBOX", 1).is_empty(), "another user");
        assert!(s.retrieved("dave", "Other", 1).is_empty(), "another folder");
        s.store_retrieved("dave", "INBOX", 1, &[5]);
        assert_eq!(s.retrieved("dave", "INBOX", 1), vec![5], "replaced");
        s.db.insert(
            retrieved_key("dave", "INBOX"),
            &[0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 2][..],
        )
        .unwrap();
        assert!(
            s.retrieved("dave", "INBOX", 1).is_empty(),
            "unsorted is damage"
        );
    }

    #[test]
    fn sizes_round_trip_and_are_dropped_on_uidvalidity_change_or_damage() {
        let s = StateStore::temporary().unwrap();
        assert!(s.sizes("u", "INBOX", 7).is_empty());
        s.store_sizes("u", "INBOX", 7, &[(1, 100), (5, 2000)]);
        assert_eq!(s.sizes("U", "INBOX", 7), vec![(1, 100), (5, 2000)]);
        assert!(s.sizes("u", "INBOX", 8).is_empty(), "another UIDVALIDITY");
        assert!(s.sizes("u", "Other", 7).is_empty(), "another folder");
        s.db.insert(sizes_key("u", "INBOX"), &[0, 0, 0, 7, 1, 2, 3][..])
            .unwrap();
        assert!(s.sizes("u", "INBOX", 7).is_empty(), "truncated blob");
        s.store_sizes("u", "INBOX", 7, &[(5, 1), (1, 1)]);
        assert!(s.sizes("u", "INBOX", 7).is_empty(), "unsorted blob");
    }

    #[test]
    fn uidl_maps_round_trip_per_user_and_folder() {
        let s = StateStore::temporary().unwrap();
        assert_eq!(s.uidl_map("u", "INBOX"), None);
        let mut m = UidlMap::new(9);
        m.insert(4, "legacy.4").unwrap();
        let (head, text) = m.to_local().unwrap();
        s.store_uidl_map("U", "INBOX", &head, &text).unwrap();
        assert_eq!(s.uidl_map("u", "INBOX"), Some((head.clone(), m.clone())));
        assert_eq!(s.uidl_map_head("u", "INBOX"), Some(head.clone()));
        assert_eq!(s.uidl_map("u", "Other"), None);
        // Entry text that does not match its head (a torn or damaged write) reads as absent.
        s.db.insert(uidl_map_key("u", "INBOX"), &b"4:legacy.5"[..])
            .unwrap();
        assert_eq!(s.uidl_map("u", "INBOX"), None, "damage reads as absent");
        s.cache_uidl_map("u", "INBOX", &head, &text);
        assert_eq!(s.uidl_map("u", "INBOX"), Some((head, m)));
        s.remove_uidl_map("u", "INBOX");
        assert_eq!(s.uidl_map("u", "INBOX"), None);
        assert_eq!(s.uidl_map_head("u", "INBOX"), None);
    }

    #[test]
    fn reopens_persisted_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = StateStore::open(&path).unwrap();
            s.observe_mailbox("bob", "INBOX", 7);
            s.flush();
        }
        // sled releases its file lock from a background thread shortly after the drop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            match StateStore::open(&path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("another popbridge"), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(s.mailbox("bob", "INBOX").unwrap().uid_validity, 7);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "db")
            .count();
        assert_eq!(aside, 0, "a healthy database is never moved aside");
    }

    #[test]
    fn a_database_in_use_is_an_error_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _held = StateStore::open(&path).unwrap();
        let e = StateStore::open(&path)
            .err()
            .expect("second open must fail");
        assert!(e.to_string().contains("another popbridge"), "{e}");
        assert!(path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unreadable_database_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // A plain file where sled expects a directory cannot be opened.
        std::fs::write(&path, b"not a database").unwrap();
        let s = StateStore::open(&path).unwrap();
        s.observe_mailbox("carol", "INBOX", 1);
        assert_eq!(s.mailbox("carol", "INBOX").unwrap().uid_validity, 1);
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("db.broken-"))
            .collect();
        assert_eq!(moved.len(), 1);
        assert_eq!(std::fs::read(moved[0].path()).unwrap(), b"not a database");
    }
}
