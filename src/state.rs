//! Local state in sled, treated strictly as a cache: everything that decides what a client sees
//! (UIDs, sizes, hidden flags) lives on the IMAP server, so deleting this directory loses no mail
//! and shows no hidden mail again. Keys are versioned (`v3/...`) so a later layout can live
//! beside this one, and a database that will not open is moved aside and rebuilt, not fatal.
//! Every entry of a maildrop is keyed by its [`MaildropKey`] (server, login, folder); v2 keyed
//! them by backend name and login, and a v2 UIDL map is adopted under its v3 key when first
//! looked for ([`StateStore::adopt_v2_uidl_map`]).
//!
//! It remembers, per user and folder, the UIDVALIDITY last served, so a change (which makes
//! every POP3 client download the whole mailbox again) is logged loudly; message sizes; and the
//! legacy UIDL map of migrated users, a copy of the one kept in IMAP METADATA (so losing this
//! directory changes no UIDL when the server holds the map).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::maildrop::MaildropKey;
use crate::uidl::map::{MapHead, UidlMap};
use crate::uidl::moved::{self, Origins};

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

    /// Record that `maildrop` was served with `uid_validity`; warn and return true
    /// when it changed since the last session. A failure to write is logged and otherwise
    /// ignored: the cache must never block mail. The time last seen is kept to within
    /// [`LAST_SEEN_STEP_SECS`]: a session that finds the same UIDVALIDITY recorded more
    /// recently than that writes nothing (a poll then writes nothing to sled at all).
    pub fn observe_mailbox(&self, maildrop: &MaildropKey, uid_validity: u32) -> bool {
        let key = entry(MBOX, maildrop);
        let now = unix_now();
        if let Ok(Some(old)) = self.db.get(&key) {
            if decode(&old).is_some_and(|old| {
                old.uid_validity == uid_validity
                    && now.saturating_sub(old.last_seen_unix) < LAST_SEEN_STEP_SECS
            }) {
                return false;
            }
        }
        let record = MailboxRecord {
            uid_validity,
            last_seen_unix: now,
        };
        match self.db.insert(&key, encode(record).as_slice()) {
            Ok(Some(old)) => {
                if let Some(old) = decode(&old) {
                    if old.uid_validity != uid_validity {
                        tracing::warn!(
                            maildrop = %maildrop,
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
    pub fn retrieved(&self, maildrop: &MaildropKey, uid_validity: u32) -> Vec<u32> {
        self.uid_records(entry(RETRIEVED, maildrop), uid_validity, 1)
    }

    /// Replace the record of retrieved messages with `uids` (sorted, no duplicates).
    pub fn store_retrieved(&self, maildrop: &MaildropKey, uid_validity: u32, uids: &[u32]) {
        self.store_uid_records(
            entry(RETRIEVED, maildrop),
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
    pub fn sizes(&self, maildrop: &MaildropKey, uid_validity: u32) -> Vec<(u32, u32)> {
        self.uid_records(entry(SIZES, maildrop), uid_validity, 2)
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .collect()
    }

    /// Replace the cached sizes of `user`'s `mailbox` (`sizes` sorted by UID).
    pub fn store_sizes(&self, maildrop: &MaildropKey, uid_validity: u32, sizes: &[(u32, u32)]) {
        let words = sizes.iter().flat_map(|&(uid, size)| [uid, size]);
        self.store_uid_records(entry(SIZES, maildrop), uid_validity, words);
    }

    /// Which UIDL each EMAILID of `maildrop` (the first folder's key) was first listed under
    /// (see [`crate::uidl::moved`]); empty when absent or damaged.
    pub fn email_origins(&self, maildrop: &MaildropKey) -> Origins {
        self.origins_at(entry(ORIGINS, maildrop))
    }

    /// Replace that map (bounded by [`moved::MAX_ORIGINS`]).
    pub fn store_email_origins(&self, maildrop: &MaildropKey, origins: &Origins) {
        self.store_origins_at(entry(ORIGINS, maildrop), origins);
    }

    /// Where the moved messages of `maildrop` were last listed (EMAILID -> location, same
    /// form), so their EMAILIDs need not be asked for again; empty when absent or damaged.
    pub fn moved_locations(&self, maildrop: &MaildropKey) -> Origins {
        self.origins_at(entry(MOVED_AT, maildrop))
    }

    /// Replace that record.
    pub fn store_moved_locations(&self, maildrop: &MaildropKey, at: &Origins) {
        self.store_origins_at(entry(MOVED_AT, maildrop), at);
    }

    fn origins_at(&self, key: Vec<u8>) -> Origins {
        let Ok(Some(blob)) = self.db.get(key) else {
            return Origins::new();
        };
        std::str::from_utf8(&blob)
            .ok()
            .and_then(moved::decode)
            .unwrap_or_default()
    }

    fn store_origins_at(&self, key: Vec<u8>, origins: &Origins) {
        if let Err(e) = self.db.insert(key, moved::encode(origins).into_bytes()) {
            tracing::warn!(error = %e, "could not update state cache");
        }
    }

    /// The head of the cached legacy UIDL map of `user`'s `mailbox` (small: read at every
    /// login to compare with the head in METADATA). `None` when absent or damaged.
    pub fn uidl_map_head(&self, maildrop: &MaildropKey) -> Option<MapHead> {
        let blob = self.db.get(entry(UIDL_HEAD, maildrop)).ok()??;
        MapHead::parse(std::str::from_utf8(&blob).ok()?).ok()
    }

    /// The cached legacy UIDL map of `user`'s `mailbox` with its head, whatever its
    /// UIDVALIDITY (the caller compares). Decoding a large map takes a while: `serve` calls this
    /// off the async runtime. `None` when absent or damaged (length or checksum wrong).
    pub fn uidl_map(&self, maildrop: &MaildropKey) -> Option<(MapHead, UidlMap)> {
        let head = self.uidl_map_head(maildrop)?;
        let blob = self.db.get(entry(UIDL_MAP, maildrop)).ok()??;
        let text = std::str::from_utf8(&blob).ok()?;
        match UidlMap::from_text(&head, text) {
            Ok(map) => Some((head, map)),
            Err(e) => {
                tracing::warn!(maildrop = %maildrop, error = %e, "cached UIDL map is damaged; ignoring it");
                None
            }
        }
    }

    /// A UIDL map a version before v3 kept under `v2_user` (the backend-name prefix and the
    /// login, see [`state_prefix`]) and `v2_mailbox` (the folder as configured), moved under `maildrop`'s v3
    /// key; whether there was one. Maps are the one entry whose loss costs something (the
    /// user's UIDLs, where METADATA has no copy), so they are carried over, not dropped.
    pub fn adopt_v2_uidl_map(
        &self,
        maildrop: &MaildropKey,
        v2_user: &str,
        v2_mailbox: &str,
    ) -> bool {
        let (old_head, old_map) = (
            v2_key(b"v2/uidlhead/", v2_user, v2_mailbox),
            v2_key(b"v2/uidlmap/", v2_user, v2_mailbox),
        );
        let (Ok(Some(head)), Ok(Some(text))) = (self.db.get(&old_head), self.db.get(&old_map))
        else {
            return false;
        };
        let mut batch = sled::Batch::default();
        batch.insert(entry(UIDL_HEAD, maildrop), head);
        batch.insert(entry(UIDL_MAP, maildrop), text);
        batch.remove(old_head);
        batch.remove(old_map);
        match self.db.apply_batch(batch) {
            Ok(()) => {
                tracing::info!(maildrop = %maildrop, "legacy UIDL map carried over from the v2 state layout");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not carry the v2 UIDL map over");
                false
            }
        }
    }

    /// Replace the cached legacy UIDL map of `user`'s `mailbox` (head and entry text, in one
    /// atomic batch), and write it to disk now: `popbridge migrate` exits right after.
    pub fn store_uidl_map(
        &self,
        maildrop: &MaildropKey,
        head: &MapHead,
        text: &str,
    ) -> Result<(), sled::Error> {
        self.db.apply_batch(uidl_batch(maildrop, head, text))?;
        self.db.flush()?;
        Ok(())
    }

    /// [`StateStore::store_uidl_map`] without waiting for the disk (a session caching what it
    /// read from METADATA: losing it costs one more METADATA read, nothing else).
    pub fn cache_uidl_map(&self, maildrop: &MaildropKey, head: &MapHead, text: &str) {
        if let Err(e) = self.db.apply_batch(uidl_batch(maildrop, head, text)) {
            tracing::warn!(error = %e, "could not cache the legacy UIDL map");
        }
    }

    /// Forget the cached legacy UIDL map of `user`'s `mailbox` (METADATA no longer has one).
    pub fn remove_uidl_map(&self, maildrop: &MaildropKey) {
        let mut batch = sled::Batch::default();
        batch.remove(entry(UIDL_HEAD, maildrop));
        batch.remove(entry(UIDL_MAP, maildrop));
        if let Err(e) = self.db.apply_batch(batch) {
            tracing::warn!(error = %e, "could not drop the cached legacy UIDL map");
        }
    }

    /// What was last recorded for `user`'s `mailbox`.
    pub fn mailbox(&self, maildrop: &MaildropKey) -> Option<MailboxRecord> {
        let value = self.db.get(entry(MBOX, maildrop)).ok()??;
        decode(&value)
    }

    /// Write everything to disk now (used at shutdown).
    pub fn flush(&self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "could not flush state cache");
        }
    }
}

/// How old the recorded time a maildrop was last seen may get before a session rewrites it.
pub const LAST_SEEN_STEP_SECS: u64 = 3600;

/// Entry kinds, each followed by the maildrop's [`MaildropKey::state_id`]:
/// the UIDVALIDITY last served and when ...
const MBOX: &[u8] = b"v3/mbox/";
/// ... UIDVALIDITY, then the UIDs retrieved, ascending ...
const RETRIEVED: &[u8] = b"v3/retrieved/";
/// ... UIDVALIDITY, then (UID, RFC822.SIZE) pairs ...
const SIZES: &[u8] = b"v3/sizes/";
/// ... the legacy UIDL map's entry text (see [`crate::uidl::map`]) ...
const UIDL_MAP: &[u8] = b"v3/uidlmap/";
/// ... and its head line (UIDVALIDITY, count, checksum; the METADATA head it was read from,
/// or a local one).
const UIDL_HEAD: &[u8] = b"v3/uidlhead/";
/// ... with OBJECTID and several folders, EMAILID -> first-listed UIDL lines ...
const ORIGINS: &[u8] = b"v3/emailids/";
/// ... and where the moved ones among them were last listed.
const MOVED_AT: &[u8] = b"v3/movedat/";

fn entry(kind: &[u8], maildrop: &MaildropKey) -> Vec<u8> {
    let mut key = kind.to_vec();
    key.extend_from_slice(&maildrop.state_id());
    key
}

/// A v2 key: `<kind><user>\0<mailbox>`, the user lower-cased.
fn v2_key(kind: &[u8], user: &str, mailbox: &str) -> Vec<u8> {
    let mut key = kind.to_vec();
    key.extend_from_slice(user.to_lowercase().as_bytes());
    key.push(0);
    key.extend_from_slice(mailbox.as_bytes());
    key
}

fn uidl_batch(maildrop: &MaildropKey, head: &MapHead, text: &str) -> sled::Batch {
    let mut batch = sled::Batch::default();
    batch.insert(entry(UIDL_HEAD, maildrop), head.to_string().into_bytes());
    batch.insert(entry(UIDL_MAP, maildrop), text.as_bytes());
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

/// What went before a login in the v2 state keys for users of backend `name`: nothing for
/// `[imap]`, `name` and a line feed otherwise (see [`StateStore::adopt_v2_uidl_map`]).
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

    fn k(login: &str, mailbox: &str) -> MaildropKey {
        MaildropKey::new("imap.example:993", login, mailbox)
    }

    #[test]
    fn a_v2_uidl_map_is_carried_over_once() {
        let s = StateStore::temporary().unwrap();
        let mut m = UidlMap::new(9);
        m.insert(4, "legacy.4").unwrap();
        let (head, text) = m.to_local().unwrap();
        // As v2 kept it for user "alice" of backend "new".
        let v2_user = format!("{}alice", state_prefix("new"));
        s.db.insert(
            v2_key(b"v2/uidlhead/", &v2_user, "INBOX"),
            head.to_string().as_bytes(),
        )
        .unwrap();
        s.db.insert(v2_key(b"v2/uidlmap/", &v2_user, "INBOX"), text.as_bytes())
            .unwrap();
        let key = k("alice", "INBOX");
        assert_eq!(s.uidl_map(&key), None);
        assert!(
            !s.adopt_v2_uidl_map(&key, "alice", "INBOX"),
            "another backend's user"
        );
        assert!(s.adopt_v2_uidl_map(&key, &v2_user, "INBOX"));
        assert_eq!(s.uidl_map(&key), Some((head, m)));
        assert!(
            !s.adopt_v2_uidl_map(&key, &v2_user, "INBOX"),
            "moved, not copied"
        );
    }

    #[test]
    fn records_round_trip_and_user_is_case_insensitive() {
        let s = StateStore::temporary().unwrap();
        assert_eq!(s.mailbox(&k("alice", "INBOX")), None);
        s.observe_mailbox(&k("Alice", "INBOX"), 42);
        let r = s.mailbox(&k("alice", "INBOX")).unwrap();
        assert_eq!(r.uid_validity, 42);
        assert!(r.last_seen_unix > 0);
        assert_eq!(s.mailbox(&k("alice", "Other")), None);
        assert!(!s.observe_mailbox(&k("alice", "INBOX"), 42), "unchanged");
        assert!(s.observe_mailbox(&k("alice", "INBOX"), 43), "changed");
        assert_eq!(s.mailbox(&k("alice", "INBOX")).unwrap().uid_validity, 43);
    }

    /// A session that finds the same UIDVALIDITY seen less than LAST_SEEN_STEP_SECS ago
    /// writes nothing; an older record is brought up to date.
    #[test]
    fn last_seen_is_rewritten_only_when_a_step_old() {
        let s = StateStore::temporary().unwrap();
        let key = k("bob", "INBOX");
        let plant = |ago: u64| {
            let record = MailboxRecord {
                uid_validity: 7,
                last_seen_unix: unix_now() - ago,
            };
            s.db.insert(entry(MBOX, &key), encode(record).as_slice())
                .unwrap();
            record.last_seen_unix
        };
        let recent = plant(10);
        assert!(!s.observe_mailbox(&key, 7));
        assert_eq!(
            s.mailbox(&key).unwrap().last_seen_unix,
            recent,
            "not rewritten"
        );
        let old = plant(LAST_SEEN_STEP_SECS + 5);
        assert!(!s.observe_mailbox(&key, 7));
        let now = s.mailbox(&key).unwrap().last_seen_unix;
        assert!(
            now >= old + LAST_SEEN_STEP_SECS,
            "rewritten: {old} -> {now}"
        );
        plant(10);
        assert!(
            s.observe_mailbox(&key, 8),
            "a new UIDVALIDITY is always seen"
        );
        assert_eq!(s.mailbox(&key).unwrap().uid_validity, 8);
    }

    #[test]
    fn retrievals_round_trip_per_user_folder_and_uidvalidity() {
        let s = StateStore::temporary().unwrap();
        assert!(s.retrieved(&k("dave", "INBOX"), 1).is_empty());
        s.store_retrieved(&k("dave", "INBOX"), 1, &[3, 5, 9]);
        assert_eq!(s.retrieved(&k("Dave", "INBOX"), 1), vec![3, 5, 9]);
        assert!(
            s.retrieved(&k("dave", "INBOX"), 2).is_empty(),
            "new UIDVALIDITY, new messages"
        );
        assert!(
            s.retrieved(&k("erin", "INBOX"), 1).is_empty(),
            "another user"
        );
        assert!(
            s.retrieved(&k("dave", "Other"), 1).is_empty(),
            "another folder"
        );
        s.store_retrieved(&k("dave", "INBOX"), 1, &[5]);
        assert_eq!(s.retrieved(&k("dave", "INBOX"), 1), vec![5], "replaced");
        s.db.insert(
            entry(RETRIEVED, &k("dave", "INBOX")),
            &[0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 2][..],
        )
        .unwrap();
        assert!(
            s.retrieved(&k("dave", "INBOX"), 1).is_empty(),
            "unsorted is damage"
        );
    }

    #[test]
    fn sizes_round_trip_and_are_dropped_on_uidvalidity_change_or_damage() {
        let s = StateStore::temporary().unwrap();
        assert!(s.sizes(&k("u", "INBOX"), 7).is_empty());
        s.store_sizes(&k("u", "INBOX"), 7, &[(1, 100), (5, 2000)]);
        assert_eq!(s.sizes(&k("U", "INBOX"), 7), vec![(1, 100), (5, 2000)]);
        assert!(
            s.sizes(&k("u", "INBOX"), 8).is_empty(),
            "another UIDVALIDITY"
        );
        assert!(s.sizes(&k("u", "Other"), 7).is_empty(), "another folder");
        s.db.insert(entry(SIZES, &k("u", "INBOX")), &[0, 0, 0, 7, 1, 2, 3][..])
            .unwrap();
        assert!(s.sizes(&k("u", "INBOX"), 7).is_empty(), "truncated blob");
        s.store_sizes(&k("u", "INBOX"), 7, &[(5, 1), (1, 1)]);
        assert!(s.sizes(&k("u", "INBOX"), 7).is_empty(), "unsorted blob");
    }

    #[test]
    fn uidl_maps_round_trip_per_user_and_folder() {
        let s = StateStore::temporary().unwrap();
        assert_eq!(s.uidl_map(&k("u", "INBOX")), None);
        let mut m = UidlMap::new(9);
        m.insert(4, "legacy.4").unwrap();
        let (head, text) = m.to_local().unwrap();
        s.store_uidl_map(&k("U", "INBOX"), &head, &text).unwrap();
        assert_eq!(
            s.uidl_map(&k("u", "INBOX")),
            Some((head.clone(), m.clone()))
        );
        assert_eq!(s.uidl_map_head(&k("u", "INBOX")), Some(head.clone()));
        assert_eq!(s.uidl_map(&k("u", "Other")), None);
        // Entry text that does not match its head (a torn or damaged write) reads as absent.
        s.db.insert(entry(UIDL_MAP, &k("u", "INBOX")), &b"4:legacy.5"[..])
            .unwrap();
        assert_eq!(s.uidl_map(&k("u", "INBOX")), None, "damage reads as absent");
        s.cache_uidl_map(&k("u", "INBOX"), &head, &text);
        assert_eq!(s.uidl_map(&k("u", "INBOX")), Some((head, m)));
        s.remove_uidl_map(&k("u", "INBOX"));
        assert_eq!(s.uidl_map(&k("u", "INBOX")), None);
        assert_eq!(s.uidl_map_head(&k("u", "INBOX")), None);
    }

    #[test]
    fn reopens_persisted_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = StateStore::open(&path).unwrap();
            s.observe_mailbox(&k("bob", "INBOX"), 7);
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
        assert_eq!(s.mailbox(&k("bob", "INBOX")).unwrap().uid_validity, 7);
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
        s.observe_mailbox(&k("carol", "INBOX"), 1);
        assert_eq!(s.mailbox(&k("carol", "INBOX")).unwrap().uid_validity, 1);
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("db.broken-"))
            .collect();
        assert_eq!(moved.len(), 1);
        assert_eq!(std::fs::read(moved[0].path()).unwrap(), b"not a database");
    }
}
